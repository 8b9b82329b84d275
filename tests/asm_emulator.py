"""Run the kernels' inline PTX under the Triton interpreter: a vectorized numpy model of the few
instructions qlk's asm blocks use, hooked into the interpreter's ``create_inline_asm``.

Why: the interpreter cannot run inline asm, so the kernels' ``PACKED`` / ``HALF2_ASM`` branches
(which asm constant a dtype and bit width select, the operand list, how pack=2 pairs elements,
the selectors and packed scales the kernel builds for the asm) would otherwise only run on a GPU.
With :func:`emulate_inline_asm` the same kernels run those branches on CPU against the float64
oracles; the bit-level semantics of each asm block are checked separately, exactly, by the
Fraction-based model in tests/test_decode_tile.py (and this model is checked against that one).

Instructions (PTX ISA semantics, 32-bit registers): ``prmt.b32`` (default mode, no sign
replication), ``lop3.b32``, ``mov.b32``, ``shl.b32`` / ``shr.b32`` (amounts clamped at 32),
``shf.r.wrap.b32``, ``fma.rn.{f16x2,bf16x2}`` (each half a·b + c in float64, rounded once to the
16-bit format: exact products of 16-bit floats, sums exact unless the exponents are > 53 bits
apart), ``cvt.rn.{f16x2,bf16x2}.f32 d, a, b`` and ``ld.global.nc.{b16,b32}``.

Operands as the LLVM constraints give them: outputs first, then each input; with ``pack`` = 2 a
16-bit input holds two consecutive elements (the first in the low half) in one register, a 32-bit
input is one register per element; elements are grouped along the flattened (C-order) tensor, which
is where ``tl.join`` puts a pair.
"""
from __future__ import annotations

import re

import numpy as np
import torch

M32 = np.uint64(0xFFFFFFFF)


def _u64(x):
    return np.asarray(x).astype(np.uint64) & M32


def prmt(a, b, sel):
    src = (_u64(b) << np.uint64(32)) | _u64(a)
    sel = _u64(sel)
    assert not np.any(sel & np.uint64(0x8888)), "sign-replicate selectors are not modelled"
    out = np.zeros_like(src)
    for i in range(4):
        idx = (sel >> np.uint64(4 * i)) & np.uint64(7)
        out |= ((src >> (np.uint64(8) * idx)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out


def lop3(a, b, c, lut):
    a, b, c = _u64(a), _u64(b), _u64(c)
    lut = int(np.asarray(lut).flat[0]) if np.ndim(lut) else int(lut)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for idx in range(8):
        if (lut >> idx) & 1:
            term = (a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c)
            out |= term & M32
    return out


def _halves_to_f64(h, fmt):
    h = (h & np.uint64(0xFFFF)).astype(np.uint16)
    if fmt == "f16":
        return h.view(np.float16).astype(np.float64)
    return (h.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _f64_to_half_bits(v, fmt):
    """Round float64 to the 16-bit format once, to nearest even."""
    if fmt == "f16":
        return v.astype(np.float16).view(np.uint16).astype(np.uint64)
    u = v.view(np.uint64)
    # round the float64 mantissa to bf16's 7 bits (45 bits dropped), ties to even; then the value is
    # exact in fp32 and its top 16 bits are the bf16 pattern
    keep = (u >> np.uint64(45)) & np.uint64(1)
    r = (u + np.uint64((1 << 44) - 1) + keep) & ~np.uint64((1 << 45) - 1)
    f32 = r.view(np.float64).astype(np.float32)
    return (f32.view(np.uint32) >> np.uint32(16)).astype(np.uint64)


def fma_x2(a, b, c, fmt):
    a, b, c = _u64(a), _u64(b), _u64(c)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for half in (0, 1):
        sh = np.uint64(16 * half)
        v = _halves_to_f64(a >> sh, fmt) * _halves_to_f64(b >> sh, fmt) + _halves_to_f64(c >> sh, fmt)
        out |= _f64_to_half_bits(v, fmt) << sh
    return out


def cvt_x2(hi_f32_bits, lo_f32_bits, fmt):
    """cvt.rn.{f16x2,bf16x2}.f32 d, a, b: d = {a rounded (upper half), b rounded (lower half)}."""
    to = lambda x: _f64_to_half_bits(_u64(x).astype(np.uint32).view(np.float32).astype(np.float64), fmt)  # noqa: E731
    return (to(hi_f32_bits) << np.uint64(16)) | to(lo_f32_bits)


def run_ptx(asm: str, regs: dict, load=None):
    """Execute ``asm`` on a dict of uint64 arrays (32-bit values) for $1 ..; returns the dict."""
    regs = dict(regs)

    def val(tok):
        tok = tok.strip()
        if re.match(r"^(0x[0-9a-fA-F]+|\d+)$", tok):
            return np.uint64(int(tok, 0) & 0xFFFFFFFF)
        return regs[tok]

    for line in asm.replace(";", ";\n").splitlines():
        line = line.strip().rstrip(";").strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op.startswith("ld.global.nc"):
            dst, src = [t.strip() for t in rest.split(",")]
            regs[dst] = load(src.strip("[] "))
            continue
        dst, *srcs = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":
            regs[dst] = prmt(val(srcs[0]), val(srcs[1]), val(srcs[2]))
        elif op == "lop3.b32":
            regs[dst] = lop3(val(srcs[0]), val(srcs[1]), val(srcs[2]), val(srcs[3]))
        elif op == "mov.b32":
            regs[dst] = _u64(val(srcs[0]))
        elif op == "shl.b32":
            regs[dst] = (_u64(val(srcs[0])) << np.minimum(_u64(val(srcs[1])), np.uint64(32))) & M32
        elif op == "shr.b32":
            regs[dst] = _u64(val(srcs[0])) >> np.minimum(_u64(val(srcs[1])), np.uint64(32))
        elif op == "shf.r.wrap.b32":
            n = _u64(val(srcs[2])) & np.uint64(31)
            regs[dst] = (((_u64(val(srcs[1])) << np.uint64(32)) | _u64(val(srcs[0]))) >> n) & M32
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            regs[dst] = fma_x2(val(srcs[0]), val(srcs[1]), val(srcs[2]), "bf16" if "bf16" in op else "f16")
        elif op in ("cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32"):
            regs[dst] = cvt_x2(val(srcs[0]), val(srcs[1]), "bf16" if "bf16" in op else "f16")
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the new instruction")
    return regs


class _Call:
    def __init__(self, results):
        self.results = results

    def get_result(self, i):
        return self.results[i]


def _np_uint(dtype):
    return {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[dtype.primitive_bitwidth]


def emulate_inline_asm(monkeypatch):
    """Make the interpreter execute inline asm with :func:`run_ptx` (for the rest of the test)."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        cons = [c.strip() for c in constraints.split(",")]
        n_out = sum(c.startswith("=") for c in cons)
        assert n_out == len(types) == 1, "one output modelled"
        out_ty = types[0].scalar if hasattr(types[0], "scalar") else types[0]
        shape = np.broadcast_shapes(*(v.data.shape for v in values))
        flat = [np.broadcast_to(v.data, shape).reshape(-1) for v in values]
        count = flat[0].size if flat else 1
        assert count % pack == 0, (count, pack)
        regs, slot = {}, 1
        for v, data in zip(values, flat):
            ty = v.get_element_ty()
            if isinstance(v.dtype, tl.pointer_type):
                assert pack == 1
                regs[f"${slot}"] = (v, data)
                slot += 1
                continue
            bits = data.view(_np_uint(ty)).astype(np.uint64)
            width = ty.primitive_bitwidth
            if width == 32:
                for e in range(pack):
                    regs[f"${slot}"] = bits[e::pack]
                    slot += 1
            else:
                assert width * pack == 32, (width, pack)
                word = np.zeros(count // pack, dtype=np.uint64)
                for e in range(pack):
                    word |= bits[e::pack] << np.uint64(width * e)
                regs[f"${slot}"] = word
                slot += 1
        assert slot - 1 == len(cons) - n_out, (constraints, slot)
        pointers = {k: v for k, v in regs.items() if isinstance(v, tuple)}
        for k in pointers:
            regs.pop(k)

        def load(reg):
            handle, data = pointers[reg]
            got = self.create_load(interp.TensorHandle(data.reshape(-1), handle.dtype), None, True)
            elem = handle.get_element_ty()
            return got.data.view(_np_uint(elem)).astype(np.uint64)

        res = run_ptx(asm, regs, load)["$0"]
        width = out_ty.primitive_bitwidth
        if width * pack == 32 and pack > 1:
            parts = [(res >> np.uint64(width * e)) & np.uint64((1 << width) - 1) for e in range(pack)]
            out = np.stack(parts, axis=1).reshape(-1)
        else:
            out = res & np.uint64((1 << width) - 1)
        data = out.astype(_np_uint(out_ty)).view(interp._get_np_dtype(out_ty)).reshape(shape)
        return _Call([interp.TensorHandle(data, out_ty)])

    monkeypatch.setattr(interp.InterpreterBuilder, "create_inline_asm", create_inline_asm)


def half_bits_of(values, dtype=torch.float16):
    return torch.tensor(values, dtype=dtype).view(torch.int16).numpy().astype(np.uint16).astype(np.uint64)

"""The input gradient's half2 transposed decoder (qlk/kernels/quant_tile_t.py, round 7): its inline asm
and the Triton twin the interpreter runs.

* **bit-level asm semantics, CPU.** ``pair_asm_t`` (PRMT with a register selector, LOP3 magic, two
  ``fma.rn.{f16x2,bf16x2}``) runs on the numpy model of the PTX instructions in
  tests/test_decode_tile.py for every pair of codes of INT2/3/4, each at every byte j of its word
  with random bits elsewhere, fp16 and bf16, scales and biases of both signs and several
  magnitudes; compared bit for bit with s·(q − 2^(b−1)) + c computed exactly and rounded once.
  The packing of a scale (``cvt.rn.{f16x2,bf16x2}.f32 d, x, x``) against torch's rounding.
* **the twin, interpreter.** ``_pair_half2(ASM=False)`` with ``_half2_pair``'s packing on the same
  grid equals the asm model bit for bit (fp16: the interpreter's bf16 arithmetic is not IEEE).

The decoder inside the tile and the GEMM: tests/test_quant_tile_t.py (``test_half2_tile_t``) and
tests/test_kernel_paths.py (the input gradient with fp16 dY takes it).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qlk.kernels import quant_tile_t
from test_decode_tile import BIASES, SCALES, half_bits, half_value, round_half, run_ptx

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _word(q: int, j: int, bits: int, rng) -> int:
    """A random 32-bit word whose byte j holds code q in its low ``bits`` bits."""
    w = int(rng.integers(0, 1 << 32))
    w &= ~(((1 << bits) - 1) << (8 * j)) & 0xFFFFFFFF
    return w | (q << (8 * j))


def _grid(bits: int):
    """(q0, q1, A, B, S, scale index): every code pair, every byte j (a function of q0, q1, the
    scale), random bits elsewhere."""
    rng = np.random.default_rng(10 + bits)
    for q0 in range(1 << bits):
        for q1 in range(1 << bits):
            for i in range(len(SCALES)):
                j = (q0 + q1 + i) % 4
                yield q0, q1, _word(q0, j, bits, rng), _word(q1, j, bits, rng), j | ((4 + j) << 8), i


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_pair_asm_t_bit_exact(bits, fmt):
    asm = quant_tile_t.pair_asm_t(bits, "fp16" if fmt == "f16" else "bf16")
    mid = 1 << (bits - 1)
    s_bits, c_bits = half_bits(SCALES, fmt), half_bits(BIASES, fmt)
    checked, js = 0, set()
    for q0, q1, a, b, sel, i in _grid(bits):
        s, c = s_bits[i], c_bits[(i + q0) % len(BIASES)]
        got = run_ptx(asm, {"$1": a, "$2": b, "$3": sel, "$4": s | (s << 16), "$5": c | (c << 16)})
        for half, q in ((0, q0), (1, q1)):
            exact = half_value(s, fmt) * (q - mid) + half_value(c, fmt)
            assert (got >> (16 * half)) & 0xFFFF == round_half(exact, fmt), (bits, fmt, q, s, c, half, sel)
            checked += 1
        js.add(sel & 3)
    assert checked == 2 * len(SCALES) * (1 << (2 * bits)) and js == {0, 1, 2, 3}


@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_scale_pair_cvt(act):
    """_half2_pair's asm is ``cvt.rn.{f16x2,bf16x2}.f32 $0, $1, $1`` (round to nearest even, the
    same source in both halves, the act dtype's format): the instruction the model cannot run,
    checked by its text."""
    ptx = "cvt.rn.f16x2.f32 $0, $1, $1;" if act == "fp16" else "cvt.rn.bf16x2.f32 $0, $1, $1;"
    assert ptx in open(quant_tile_t.__file__).read()
    op, operands = ptx.rstrip(";").split(None, 1)
    dst, hi_src, lo_src = [t.strip() for t in operands.split(",")]
    assert (op, dst) == (f"cvt.rn.{'f16x2' if act == 'fp16' else 'bf16x2'}.f32", "$0") and hi_src == lo_src == "$1"
    # PTX: d = {a rounded (upper half), b rounded (lower half)}, rn = to nearest even: with a = b = x
    # both halves hold x rounded, which the twin computes as x.to(fp32).to(act)


def _padded(n: int):
    """(block, pad, signed): the power-of-two launch block for n grid rows, its padding, and a function
    turning n unsigned 32-bit words into the kernel's int32 tensor of ``block`` elements."""
    block = 1 << (n - 1).bit_length()
    pad = block - n

    def signed(vs):
        return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in vs] + [0] * pad, dtype=torch.int32)
    return block, pad, signed


needs_kernels = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                   reason="needs CUDA or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["params-fp16", "params-fp32"])
def test_pair_twin_matches_asm_model(bits, param_dtype):
    """fp16 activations; scales and biases stored in fp16 (packed as they are) or fp32 (rounded to
    fp16 by the packing's twin first: the asm model gets those rounded values)."""
    import triton
    import triton.language as tl

    @triton.jit
    def twin(a_ptr, b_ptr, sel_ptr, s_ptr, c_ptr, out_ptr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        s2 = quant_tile_t._half2_pair(tl.load(s_ptr + offs), tl.float16, False)
        c2 = quant_tile_t._half2_pair(tl.load(c_ptr + offs), tl.float16, False)
        r = quant_tile_t._pair_half2(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(sel_ptr + offs),
                                     s2, c2, tl.float16, BITS, False)
        tl.store(out_ptr + offs, r)

    rows = list(_grid(bits))
    block, pad, signed = _padded(len(rows))
    jitter = 1.0 if param_dtype == torch.float16 else 1.0 + 2.0**-13  # fp32 values between fp16 neighbours
    s_vals = [SCALES[r[5]] * jitter for r in rows]
    c_vals = [BIASES[(r[5] + r[0]) % len(BIASES)] * jitter for r in rows]
    out = torch.zeros(block, dtype=torch.int32)
    twin[(1,)](signed([r[2] for r in rows]), signed([r[3] for r in rows]), signed([r[4] for r in rows]),
               torch.tensor(s_vals + [0.0] * pad, dtype=param_dtype), torch.tensor(c_vals + [0.0] * pad, dtype=param_dtype),
               out, BITS=bits, BLOCK=block)
    asm = quant_tile_t.pair_asm_t(bits, "fp16")
    sb = half_bits(torch.tensor(s_vals, dtype=param_dtype).tolist(), "f16")
    cb = half_bits(torch.tensor(c_vals, dtype=param_dtype).tolist(), "f16")
    for e, (q0, q1, a, b, sel, i) in enumerate(rows):
        ref = run_ptx(asm, {"$1": a, "$2": b, "$3": sel, "$4": sb[e] | (sb[e] << 16), "$5": cb[e] | (cb[e] << 16)})
        assert int(out[e]) & 0xFFFFFFFF == ref, (bits, q0, q1, hex(a), hex(b), sel, s_vals[e], c_vals[e])


def _nibble_grid(high: bool):
    """(q0, q1, A, B, S, scale index) for INT3 codes at bit 0 (``high`` False) or bit 4 of byte j:
    every code pair, every byte j, random bits elsewhere (the other nibble's code included)."""
    rng = np.random.default_rng(20 + high)
    shift = 4 if high else 0
    for q0 in range(8):
        for q1 in range(8):
            for i in range(len(SCALES)):
                j = (q0 + q1 + i) % 4
                words = []
                for q in (q0, q1):
                    w = int(rng.integers(0, 1 << 32)) & ~(7 << (8 * j + shift)) & 0xFFFFFFFF
                    words.append(w | (q << (8 * j + shift)))
                yield q0, q1, words[0], words[1], j | ((4 + j) << 8), i


@pytest.mark.parametrize("high", [False, True], ids=["low-nibble", "high-nibble"])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_pair_asm_t_nibbles_bit_exact(high, fmt):
    """Round 13's INT3 decoder (``pair_asm_t_nibbles``) reads the pair's codes at bit 0 or 4 of byte
    j with the mask and (u, u), (−n, −n) of ``nibble_consts``: ŵ = s·(q − 4) + c rounded once, bit
    for bit, for every code pair at either nibble (the other nibble holding random bits)."""
    act = "fp16" if fmt == "f16" else "bf16"
    asm = quant_tile_t.pair_asm_t_nibbles(act)
    mask, u, n = quant_tile_t.nibble_consts(act, high)
    s_bits, c_bits = half_bits(SCALES, fmt), half_bits(BIASES, fmt)
    checked = 0
    for q0, q1, a, b, sel, i in _nibble_grid(high):
        s, c = s_bits[i], c_bits[(i + q0) % len(BIASES)]
        got = run_ptx(asm, {"$1": a, "$2": b, "$3": sel, "$4": mask, "$5": u, "$6": n,
                            "$7": s | (s << 16), "$8": c | (c << 16)})
        for half, q in ((0, q0), (1, q1)):
            exact = half_value(s, fmt) * (q - 4) + half_value(c, fmt)
            assert (got >> (16 * half)) & 0xFFFF == round_half(exact, fmt), (high, fmt, q, s, c, half, sel)
            checked += 1
    assert checked == 2 * len(SCALES) * 64


@needs_kernels
@pytest.mark.parametrize("high", [False, True], ids=["low-nibble", "high-nibble"])
def test_pair_nibbles_twin_matches_asm_model(high):
    """``_pair_half2_nibbles(ASM=False)`` equals the asm model bit for bit (fp16), with the nibble
    flag per element as the tile gives it."""
    import triton
    import triton.language as tl

    @triton.jit
    def twin(a_ptr, b_ptr, sel_ptr, s_ptr, c_ptr, out_ptr, HIGH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        s2 = quant_tile_t._half2_pair(tl.load(s_ptr + offs), tl.float16, False)
        c2 = quant_tile_t._half2_pair(tl.load(c_ptr + offs), tl.float16, False)
        hi = tl.full((BLOCK,), HIGH, tl.int32)
        r = quant_tile_t._pair_half2_nibbles(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(sel_ptr + offs),
                                             hi, s2, c2, tl.float16, False)
        tl.store(out_ptr + offs, r)

    rows = list(_nibble_grid(high))
    block, pad, signed = _padded(len(rows))
    s_vals = [SCALES[r[5]] for r in rows]
    c_vals = [BIASES[(r[5] + r[0]) % len(BIASES)] for r in rows]
    out = torch.zeros(block, dtype=torch.int32)
    twin[(1,)](signed([r[2] for r in rows]), signed([r[3] for r in rows]), signed([r[4] for r in rows]),
               torch.tensor(s_vals + [0.0] * pad, dtype=torch.float16),
               torch.tensor(c_vals + [0.0] * pad, dtype=torch.float16), out, HIGH=int(high), BLOCK=block)
    asm = quant_tile_t.pair_asm_t_nibbles("fp16")
    mask, u, nn = quant_tile_t.nibble_consts("fp16", high)
    sb, cb = half_bits(s_vals, "f16"), half_bits(c_vals, "f16")
    for e, (q0, q1, a, b, sel, i) in enumerate(rows):
        ref = run_ptx(asm, {"$1": a, "$2": b, "$3": sel, "$4": mask, "$5": u, "$6": nn,
                            "$7": sb[e] | (sb[e] << 16), "$8": cb[e] | (cb[e] << 16)})
        assert int(out[e]) & 0xFFFFFFFF == ref, (high, q0, q1, hex(a), hex(b), sel, s_vals[e], c_vals[e])

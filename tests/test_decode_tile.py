"""The split-K decode dequantization (qlk/kernels/decode_tile.py): packed half2 inline asm and its twin.

* **bit-level asm semantics, CPU.** The PTX text the kernel compiles (``packed_asm``,
  ``int3_code_word_asm``, ...) is executed by a small numpy model of the instructions it uses
  (``prmt.b32`` with immediate and register selectors, ``lop3.b32``, ``mov.b32``, ``shl.b32``,
  ``shr.b32``, ``shf.r.wrap.b32``, ``fma.rn.{f16x2,bf16x2}``, written from the PTX ISA), for every
  pair of codes of every bit width,
  each code at every byte of its word (INT2/INT4: the byte the per-lane selector picks) with random
  bits elsewhere, fp16 and bf16, scales and biases of both signs and several magnitudes, and
  compared bit for bit with s·(q − 2^(b−1)) + c computed exactly and rounded once (round to
  nearest even) to the 16-bit format.
* **the twin, interpreter.** ``_byte_codes_to_weights(PACKED=False)`` (and the INT3 twins) on the
  same grid equals the model bit for bit (fp16; the interpreter's bf16 arithmetic is not IEEE).
* **the decode path in the kernel, interpreter.** fp16 activations through the split-K kernel (the
  path the asm takes on a GPU) against the float64 oracle: several groups per tile, groups over
  several tiles, groups that are not powers of two, partial INT3/INT2 words, several tiles per
  split slice, atomics and the NaN-poisoned deterministic workspace.
"""
from __future__ import annotations

import math
import os
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import oracles
import spies
import qlk
from qlk.kernels import decode_tile, heuristics
from qlk.kernels import fused_matmul as fm
from qlk.kernels import quant_matmul_forward

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ numpy model of the PTX
def prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 (default mode): result byte i = byte sel[4i+2:4i] of the 8-byte value b:a."""
    src = (b << 32) | a
    assert not sel & 0x8888, "sign-replicate selectors are not modelled"
    return sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """lop3.b32: each result bit is bit (4·a + 2·b + c) of the 8-bit truth table ``lut``."""
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def half_value(h: int, fmt: str) -> Fraction:
    if fmt == "f16":
        return Fraction(float(np.array(h, dtype=np.uint16).view(np.float16)))
    return Fraction(float(np.array(h << 16, dtype=np.uint32).view(np.float32)))


def round_half(v: Fraction, fmt: str) -> int:
    """Bits of the 16-bit float nearest to v (ties to even), normal results only."""
    if v == 0:
        return 0
    man_bits, bias = (10, 15) if fmt == "f16" else (7, 127)
    sign, v = (1, -v) if v < 0 else (0, v)
    e = math.floor(math.log2(v))
    while Fraction(2) ** e > v:
        e -= 1
    while Fraction(2) ** (e + 1) <= v:
        e += 1
    scaled = v / Fraction(2) ** (e - man_bits)  # in [2^man, 2^(man+1))
    r = math.floor(scaled)
    rem = scaled - r
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and r % 2 == 1):
        r += 1
    if r == 1 << (man_bits + 1):
        r, e = r >> 1, e + 1
    assert 1 - bias <= e <= bias, "outside the normal range of the test"
    exp_field = e + bias
    return (sign << 15) | (exp_field << man_bits) | (r - (1 << man_bits))


def fma_x2(a: int, b: int, c: int, fmt: str) -> int:
    """fma.rn.{f16x2,bf16x2}: each half a·b + c computed exactly, rounded once."""
    out = 0
    for half in (0, 1):
        sh = 16 * half
        v = half_value((a >> sh) & 0xFFFF, fmt) * half_value((b >> sh) & 0xFFFF, fmt) + half_value((c >> sh) & 0xFFFF,
                                                                                                  fmt)
        out |= round_half(v, fmt) << sh
    return out


def run_ptx(asm: str, inputs: dict) -> int:
    """Execute the asm block on 32-bit operands $1.. ; returns $0."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) & 0xFFFFFFFF if re.match(r"^(0x[0-9a-fA-F]+|\d+)$", tok) else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":
            regs[dst] = prmt(val(srcs[0]), val(srcs[1]), val(srcs[2]))
        elif op == "lop3.b32":
            regs[dst] = lop3(val(srcs[0]), val(srcs[1]), val(srcs[2]), val(srcs[3]))
        elif op == "mov.b32":
            regs[dst] = val(srcs[0])
        elif op == "shl.b32":
            regs[dst] = (val(srcs[0]) << min(val(srcs[1]), 32)) & 0xFFFFFFFF
        elif op == "shr.b32":  # logical (.b32), amounts above 32 clamped
            regs[dst] = val(srcs[0]) >> min(val(srcs[1]), 32)
        elif op == "shf.r.wrap.b32":  # funnel shift right of b:a by c mod 32, low word
            n = val(srcs[2]) & 31
            regs[dst] = (((val(srcs[1]) << 32) | val(srcs[0])) >> n) & 0xFFFFFFFF
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            regs[dst] = fma_x2(val(srcs[0]), val(srcs[1]), val(srcs[2]), "bf16" if "bf16x2" in op else "f16")
        else:
            raise AssertionError(f"the model does not know {op!r}: extend it with the new instruction")
    return regs["$0"]


def half_bits(values, fmt: str) -> list:
    t = torch.tensor(values, dtype=torch.float16 if fmt == "f16" else torch.bfloat16)
    return [int(v) & 0xFFFF for v in t.view(torch.int16).tolist()]


SCALES = [0.0078125, -0.3, 1.7, -23.5, 0.001]
BIASES = [0.0, 0.21, -5.25, 130.0, -0.0007]


def _word_with_code(q: int, j: int, bits: int, rng) -> int:
    """A random int32 word (as unsigned) whose byte j holds code q in its low ``bits`` bits."""
    w = int(rng.integers(0, 1 << 32))
    w &= ~(((1 << bits) - 1) << (8 * j)) & 0xFFFFFFFF
    return w | (q << (8 * j))


def _selector(j: int) -> int:
    """The kernel's per-element selector S = j | (4 + j) << 8 (decode_tile._decode_int_tile)."""
    return j | ((4 + j) << 8)


def _grid(bits: int):
    """(q0, q1, W0, W1, S0, S1, scale index): every pair of codes, each at every byte of its word
    over the grid, random bits elsewhere."""
    rng = np.random.default_rng(bits)
    for q0 in range(1 << bits):
        for q1 in range(1 << bits):
            for i in range(len(SCALES)):
                j0, j1 = (q0 + i) % 4, (q1 + 2 * i + 1) % 4
                yield (q0, q1, _word_with_code(q0, j0, bits, rng), _word_with_code(q1, j1, bits, rng),
                       _selector(j0), _selector(j1), i)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_packed_asm_bit_exact(bits, fmt):
    asm = decode_tile.packed_asm(bits, "fp16" if fmt == "f16" else "bf16")
    mid = 1 << (bits - 1)
    s_bits, c_bits = half_bits(SCALES, fmt), half_bits(BIASES, fmt)
    checked, bytes_seen = 0, set()
    for q0, q1, w0, w1, s0, s1, i in _grid(bits):
        s, c = s_bits[i], c_bits[(i + q0) % len(BIASES)]
        got = run_ptx(asm, {"$1": w0, "$2": w1, "$3": s0 | (s1 << 16), "$4": s | (s << 16), "$5": c | (c << 16)})
        for half, q in ((0, q0), (1, q1)):
            exact = half_value(s, fmt) * (q - mid) + half_value(c, fmt)
            assert (got >> (16 * half)) & 0xFFFF == round_half(exact, fmt), (bits, fmt, q, s, c, half)
            checked += 1
        bytes_seen |= {(0, s0 & 3), (1, s1 & 3)}
    assert checked == 2 * len(SCALES) * (1 << (2 * bits))
    assert len(bytes_seen) == 8  # every byte position in both halves


def _int3_chunk(codes) -> tuple:
    """The three words (w0, w1, w2) of an INT3 chunk of 32 codes, from docs/formats.md: w0 / w1 the
    low 2 bits of column i / 16 + i at bits 2i, 2i + 1, w2 the high bit of column i at bit i."""
    w0 = sum((q & 3) << (2 * i) for i, q in enumerate(codes[:16]))
    w1 = sum((q & 3) << (2 * i) for i, q in enumerate(codes[16:]))
    w2 = sum((q >> 2) << i for i, q in enumerate(codes))
    return w0, w1, w2


def _int3_controls(t: int, e: int) -> tuple:
    """The rebuild's operands (PRMT selector, shift, rotation) of lane t (pairs p = t + 4i of a
    chunk), element e of each pair, as ``_decode_int_tile`` computes them."""
    return 0x6420 + 0x1111 * (t // 2), 4 * (t % 2) + 2 * e, (2 * t + 30 + e) % 32


def _int3_chunks(n: int, seed: int) -> list:
    """n chunks of random codes; column i of chunk c is (c + i) mod 8 in the first 8, so every
    column meets every code."""
    rng = np.random.default_rng(seed)
    return [[(c + i) % 8 if c < 8 else int(rng.integers(0, 8)) for i in range(32)] for c in range(n)]


def test_int3_code_word_asm_puts_each_code_in_its_byte():
    """The INT3 rebuild asm (``int3_code_word_asm``) with the kernel's per-lane operands: byte i of
    lane t's word for element e holds, in bits 0-2, the code of column 2(t + 4i) + e (the column
    of that register in the MMA operand layout), for every column and every code."""
    asm = decode_tile.int3_code_word_asm()
    seen = set()
    for codes in _int3_chunks(12, 17):
        w0, w1, w2 = _int3_chunk(codes)
        for t in range(4):
            for e in range(2):
                sel, shift, rot = _int3_controls(t, e)
                word = run_ptx(asm, {"$1": w0, "$2": w1, "$3": w2, "$4": sel, "$5": shift, "$6": rot})
                for i in range(4):
                    col = 2 * (t + 4 * i) + e
                    assert (word >> (8 * i)) & 7 == codes[col], (t, e, i, codes)
                    seen.add((col, codes[col]))
    assert len(seen) == 32 * 8


def test_model_instructions():
    """The model's prmt / lop3 on hand-checked values (a wrong model would pass wrong asm)."""
    assert prmt(0x33221100, 0x77665544, 0x5410) == 0x55441100
    assert prmt(0x33221100, 0x77665544, 0x3210) == 0x33221100
    assert prmt(0x33221100, 0x77665544, 0x7654) == 0x77665544
    # the asm's register selector: byte 0 from byte j_a = 2 of a, byte 2 from byte j_b = 1 of b
    sel = prmt(_selector(2) | (_selector(1) << 16), _selector(2) | (_selector(1) << 16), 0x0030)
    assert sel & 0xFFFF == 0x0502
    assert prmt(0x33221100, 0x77665544, sel) & 0x00FF00FF == 0x00550022
    assert lop3(0xFFFF1234, 0x000F000F, 0x64006400, 0xEA) == 0x640F6404
    assert lop3(0x12345678, 0x9ABCDEF0, 0xFFFF0000, 0xE4) == 0x1234DEF0  # (a & c) | (b & ~c)
    assert prmt(0x33221100, 0x77665544, 0x7531) == 0x77553311
    ptx = "{\nshr.b32 $0, $1, $2;\n}"
    assert run_ptx(ptx, {"$1": 0x80000010, "$2": 4}) == 0x08000001
    assert run_ptx(ptx, {"$1": 0x80000010, "$2": 40}) == 0
    ptx = "{\nshf.r.wrap.b32 $0, $1, $1, $2;\n}"  # rotate right
    assert run_ptx(ptx, {"$1": 0x80000013, "$2": 4}) == 0x38000001
    assert run_ptx(ptx, {"$1": 0x80000013, "$2": 36}) == 0x38000001
    assert run_ptx(ptx, {"$1": 0x80000013, "$2": 0}) == 0x80000013
    assert half_value(0x6400, "f16") == 1024 and half_value(0x4300, "bf16") == 128
    # bf16 spacing at 1024 is 8: ties go to the even mantissa
    assert round_half(Fraction(1028), "bf16") == 0x4480  # tie -> 1024
    assert round_half(Fraction(1029), "bf16") == 0x4481  # -> 1032
    assert round_half(Fraction(1036), "bf16") == 0x4482  # tie -> 1040
    assert round_half(Fraction(-2049, 2), "f16") == 0xE400  # -1024.5: tie -> -1024


# ------------------------------------------------------------------ the twin (interpreter)
needs_kernels = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                   reason="needs CUDA or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_twin_matches_asm_model(bits):
    import triton
    import triton.language as tl

    @triton.jit
    def twin(words_ptr, sel_ptr, s_ptr, c_ptr, out_ptr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        w = decode_tile._byte_codes_to_weights(tl.load(words_ptr + offs), tl.load(sel_ptr + offs),
                                               tl.load(s_ptr + offs), tl.load(c_ptr + offs), BITS, False)
        tl.store(out_ptr + offs, w)

    fmt = "f16"
    words, sels, s_list, c_list = [], [], [], []
    for q0, q1, w0, w1, s0, s1, i in _grid(bits):
        words += [w0, w1]
        sels += [s0, s1]
        s_list += [SCALES[i]] * 2
        c_list += [BIASES[(i + q0) % len(BIASES)]] * 2
    n = len(words)
    block = 1 << (n - 1).bit_length()
    pad = block - n
    codes = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words] + [0] * pad, dtype=torch.int32)
    sel = torch.tensor(sels + [0] * pad, dtype=torch.int16)
    s = torch.tensor(s_list + [0.0] * pad, dtype=torch.float16)
    c = torch.tensor(c_list + [0.0] * pad, dtype=torch.float16)
    out = torch.full((block,), float("nan"), dtype=torch.float16)
    twin[(1,)](codes, sel, s, c, out, BITS=bits, BLOCK=block)
    got = [int(v) & 0xFFFF for v in out[:n].view(torch.int16).tolist()]
    asm = decode_tile.packed_asm(bits, "fp16")
    sb, cb = half_bits(s_list, fmt), half_bits(c_list, fmt)
    for e in range(0, n, 2):
        ref = run_ptx(asm, {"$1": words[e], "$2": words[e + 1], "$3": sels[e] | (sels[e + 1] << 16),
                            "$4": sb[e] | (sb[e + 1] << 16), "$5": cb[e] | (cb[e + 1] << 16)})
        assert (got[e], got[e + 1]) == (ref & 0xFFFF, ref >> 16), (e, words[e], s_list[e], c_list[e])


def _int3_twin_cases(split, seed):
    """Every code pair (q0, q1) with every scale: per element (low part, high part, scale, bias),
    ``split(q, rng)`` giving a code's two parts."""
    rng = np.random.default_rng(seed)
    lows, highs, s_list, c_list = [], [], [], []
    for q0 in range(8):
        for q1 in range(8):
            for i in range(len(SCALES)):
                for q in (q0, q1):
                    lo, hi = split(q, rng)
                    lows.append(lo)
                    highs.append(hi)
                    s_list.append(SCALES[i])
                    c_list.append(BIASES[(i + q1) % len(BIASES)])
    return lows, highs, s_list, c_list


def _run_int3_twin(twin, lows, highs, s_list, c_list, bits: int) -> list:
    """The fp16 bit patterns ``twin`` writes for the elements (signed ``bits``-bit integer inputs)."""
    n = len(lows)
    block = 1 << (n - 1).bit_length()
    pad = block - n
    dtype = torch.int32 if bits == 32 else torch.int16
    signed = lambda vs: torch.tensor([v - (1 << bits) if v >= 1 << (bits - 1) else v for v in vs] + [0] * pad,  # noqa: E731
                                     dtype=dtype)
    out = torch.full((block,), float("nan"), dtype=torch.float16)
    twin[(1,)](signed(lows), signed(highs), torch.tensor(s_list + [0.0] * pad, dtype=torch.float16),
               torch.tensor(c_list + [0.0] * pad, dtype=torch.float16), out, BLOCK=block)
    return [int(v) & 0xFFFF for v in out[:n].view(torch.int16).tolist()]


@needs_kernels
def test_int3_code_word_twin_matches_asm_model():
    """``_int3_code_word(PACKED=False)`` equals the asm model on all 32 bits: the kernel's
    operands for every lane and parity on chunks that hold every code in every column, and random
    words with random selectors, shifts and rotations."""
    import triton
    import triton.language as tl

    @triton.jit
    def twin(w_ptr, ctl_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        word = decode_tile._int3_code_word(tl.load(w_ptr + 3 * offs), tl.load(w_ptr + 3 * offs + 1),
                                           tl.load(w_ptr + 3 * offs + 2), tl.load(ctl_ptr + 3 * offs),
                                           tl.load(ctl_ptr + 3 * offs + 1), tl.load(ctl_ptr + 3 * offs + 2), False)
        tl.store(out_ptr + offs, word)

    rng = np.random.default_rng(23)
    cases = []
    for codes in _int3_chunks(12, 29):
        cases += [(_int3_chunk(codes), _int3_controls(t, e)) for t in range(4) for e in range(2)]
    while len(cases) < 256:
        words = tuple(int(v) for v in rng.integers(0, 1 << 32, size=3))
        sel = sum(int(v) << (4 * k) for k, v in enumerate(rng.integers(0, 8, size=4)))
        cases.append((words, (sel, int(rng.integers(0, 32)), int(rng.integers(0, 64)))))
    signed = lambda v: v - (1 << 32) if v >= 1 << 31 else v  # noqa: E731
    w = torch.tensor([signed(v) for words, _ in cases for v in words], dtype=torch.int32)
    ctl = torch.tensor([v for _, c in cases for v in c], dtype=torch.int32)
    out = torch.full((len(cases),), 0x5A5A5A5A, dtype=torch.int32)
    twin[(1,)](w, ctl, out, BLOCK=len(cases))
    asm = decode_tile.int3_code_word_asm()
    for n, ((w0, w1, w2), (sel, shift, rot)) in enumerate(cases):
        ref = run_ptx(asm, {"$1": w0, "$2": w1, "$3": w2, "$4": sel, "$5": shift, "$6": rot})
        assert int(out[n]) & 0xFFFFFFFF == ref, (n, hex(w0), hex(w1), hex(w2), sel, shift, rot)


# ------------------------------------------------------------------ the decode path in the kernel
N = 72
# (bits, group_size, in_features): g < BLOCK_K (several groups per tile), g > BLOCK_K (one group
# over several tiles), g not a power of two, partial INT3 / INT2 words (K mod 32 = 16, K mod 16 = 8);
# INT3 g32 (a group per chunk, a ragged last K tile) and g128 (a group over several K tiles)
CASES = [(4, 32, 512), (4, 256, 512), (3, 48, 528), (2, 8, 520), (3, 16, 784), (2, 64, 512), (3, 32, 544),
         (3, 128, 512)]


@pytest.fixture
def poisoned(monkeypatch):
    """Split rule told 1 SM (several tiles per slice); NaN in the deterministic workspace."""
    monkeypatch.setattr(fm, "num_sms", lambda device: 1)

    def workspace(shape, device):
        if len(shape) == 3 and INTERPRETED:
            return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    monkeypatch.setattr(fm, "_workspace", workspace)


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"int{c[0]}g{c[1]}k{c[2]}")
def test_decode_fp16_against_float64(case, poisoned):
    bits, g, k = case
    device = "cpu" if INTERPRETED else "cuda"
    gen = torch.Generator().manual_seed(bits * 100 + g + k)
    groups = k // g
    w = (torch.randn(N, groups, g, generator=gen) * torch.exp(torch.randn(N, groups, 1, generator=gen))
         + torch.randn(N, groups, 1, generator=gen)).reshape(N, k)
    qw = qlk.quantize(w, bits=bits, group_size=g)
    qw = qw.to(device)
    w64 = oracles.int_dequant64(qw)
    c = heuristics.candidates("splitk")[0].kwargs  # the one candidate under the interpreter
    if INTERPRETED:  # one config: the split rule at 1 SM gives >= 2 tiles in a slice
        tiles = math.ceil(k / c["BLOCK_K"])
        split = max(1, min(tiles, math.ceil(16 / math.ceil(N / c["BLOCK_N"]))))
        assert math.ceil(tiles / split) >= 2 and split >= 2
    # the cases alternate between the two reductions (atomics at M = 3, the deterministic
    # workspace at M = 17: two M tiles), so each reduction meets INT2, INT3 and INT4
    for m, det in ((3, False),) if CASES.index(case) % 2 == 0 else ((17, True),):
        x = torch.randn(m, k, generator=gen).to(torch.float16).to(device)
        bias = torch.randn(N, generator=gen).to(torch.float16).to(device)
        out = torch.full((m, N), float("nan"), dtype=torch.float16, device=device)
        y = quant_matmul_forward(x, qw, bias, out=out, path="splitk", deterministic=det)
        ref = x.cpu().double() @ w64.t() + bias.cpu().double()
        # Ŵ rounded once to fp16 (2^-11 relative), fp32 accumulation, fp16 output
        assert oracles.rel_err(y, ref) < 1.5e-3, (m, det)


# ------------------------------------------------------------------ round 4: lane-owned words (INT2/INT4)
def _halves_grid(bits: int):
    """(q0, q1, h0, h1, scale index): every pair of codes, each in the low ``bits`` bits of a
    16-bit input whose other bits are random (the kernel hands the asm a shifted word's halves)."""
    rng = np.random.default_rng(40 + bits)
    for q0 in range(1 << bits):
        for q1 in range(1 << bits):
            for i in range(len(SCALES)):
                h0, h1 = (int(v) & ~((1 << bits) - 1) for v in rng.integers(0, 1 << 16, size=2))
                yield q0, q1, h0 | q0, h1 | q1, i


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_packed_asm_halves_bit_exact(bits, fmt):
    asm = decode_tile.packed_asm_halves(bits, "fp16" if fmt == "f16" else "bf16")
    mid = 1 << (bits - 1)
    s_bits, c_bits = half_bits(SCALES, fmt), half_bits(BIASES, fmt)
    checked = 0
    for q0, q1, h0, h1, i in _halves_grid(bits):
        s, c = s_bits[i], c_bits[(i + q0) % len(BIASES)]
        got = run_ptx(asm, {"$1": h0 | (h1 << 16), "$2": s | (s << 16), "$3": c | (c << 16)})
        for half, q in ((0, q0), (1, q1)):
            exact = half_value(s, fmt) * (q - mid) + half_value(c, fmt)
            assert (got >> (16 * half)) & 0xFFFF == round_half(exact, fmt), (bits, fmt, q, s, c, half)
            checked += 1
    assert checked == 2 * len(SCALES) * (1 << (2 * bits))


@needs_kernels
@pytest.mark.parametrize("bits", [2, 4])
def test_halves_twin_matches_asm_model(bits):
    import triton
    import triton.language as tl

    @triton.jit
    def twin(h_ptr, s_ptr, c_ptr, out_ptr, BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        w = decode_tile._half_codes_to_weights(tl.load(h_ptr + offs), tl.load(s_ptr + offs), tl.load(c_ptr + offs),
                                               BITS, False)
        tl.store(out_ptr + offs, w)

    hs, s_list, c_list = [], [], []
    for q0, q1, h0, h1, i in _halves_grid(bits):
        hs += [h0, h1]
        s_list += [SCALES[i]] * 2
        c_list += [BIASES[(i + q0) % len(BIASES)]] * 2
    n = len(hs)
    block = 1 << (n - 1).bit_length()
    pad = block - n
    h = torch.tensor([v - (1 << 16) if v >= 1 << 15 else v for v in hs] + [0] * pad, dtype=torch.int16)
    s = torch.tensor(s_list + [0.0] * pad, dtype=torch.float16)
    c = torch.tensor(c_list + [0.0] * pad, dtype=torch.float16)
    out = torch.full((block,), float("nan"), dtype=torch.float16)
    twin[(1,)](h, s, c, out, BITS=bits, BLOCK=block)
    got = [int(v) & 0xFFFF for v in out[:n].view(torch.int16).tolist()]
    asm = decode_tile.packed_asm_halves(bits, "fp16")
    sb, cb = half_bits(s_list, "f16"), half_bits(c_list, "f16")
    for e in range(0, n, 2):
        ref = run_ptx(asm, {"$1": hs[e] | (hs[e + 1] << 16), "$2": sb[e] | (sb[e + 1] << 16),
                            "$3": cb[e] | (cb[e + 1] << 16)})
        assert (got[e], got[e + 1]) == (ref & 0xFFFF, ref >> 16), (e, hs[e], s_list[e], c_list[e])


@needs_kernels
@pytest.mark.parametrize("bits", [2, 4])
def test_lane_source_cols_give_each_lane_whole_words(bits):
    """The lane-owned k order: a permutation of each 4-word chunk; MMA column kk = e + 2t + 8j + ...
    (lane t of a quad, pair j, element e) reads word 4c + t, code j + J·e of it (the register's two
    halves after ``word >> bits·j``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cols(out_ptr, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK_K), decode_tile._lane_source_cols(BITS, BLOCK_K))

    per, block_k = 32 // bits, 256
    out = torch.full((block_k,), -1, dtype=torch.int32)
    cols[(1,)](out, BITS=bits, BLOCK_K=block_k)
    src = out.tolist()
    chunk = 4 * per
    assert sorted(src) == list(range(block_k))
    for kk, col in enumerate(src):
        e, t, j = kk % 2, (kk // 2) % 4, (kk // 8) % (per // 2)
        assert col // chunk == kk // chunk  # stays in its chunk (groups of >= 1 chunk keep their columns)
        assert (col // per) % 4 == t  # lane t owns word 4c + t
        assert col % per == j + (per // 2) * e  # code j + J·e: bits·j of the word, +16 for e = 1
    assert decode_tile.lane_order_ok(bits, 64) == (per * 4 <= 64)


# INT2/INT4 through the lane-owned tile (BLOCK_K = 64 under the interpreter: INT4 chunks of 32, INT2
# of 64): groups of whole tiles, several per tile, over several tiles, not powers of two, groups
# that split INT2 words (g = 8), ragged K (EVEN_K false: partial tiles, an INT2 partial word)
LANE_CASES = [(4, 32, 544), (4, 48, 528), (4, 128, 512), (2, 32, 576), (2, 8, 520), (2, 64, 512)]


@needs_kernels
@pytest.mark.parametrize("case", LANE_CASES, ids=lambda c: f"int{c[0]}g{c[1]}k{c[2]}")
def test_lane_order_decode_against_float64(case, poisoned):
    bits, g, k = case
    device = "cpu" if INTERPRETED else "cuda"
    gen = torch.Generator().manual_seed(400 + bits * 100 + g + k)
    groups = k // g
    w = (torch.randn(N, groups, g, generator=gen) * torch.exp(torch.randn(N, groups, 1, generator=gen))
         + torch.randn(N, groups, 1, generator=gen)).reshape(N, k)
    qw = qlk.quantize(w, bits=bits, group_size=g).to(device)
    w64 = oracles.int_dequant64(qw)
    c = heuristics.candidates("splitk")[0].kwargs
    assert decode_tile.lane_order_ok(bits, c["BLOCK_K"])  # the path under test
    for m, det in ((1, True), (5, False), (16, True)):
        x = torch.randn(m, k, generator=gen).to(torch.float16).to(device)
        out = torch.full((m, N), float("nan"), dtype=torch.float16, device=device)
        y = quant_matmul_forward(x, qw, None, out=out, path="splitk", deterministic=det)
        ref = x.cpu().double() @ w64.t()
        assert oracles.rel_err(y, ref) < 1.5e-3, (m, det)


def _int3_halves(q: int, rng, p: int = 0) -> tuple:
    """(lo, hi) 16-bit inputs of INT3 code q at bit p: q's low bits at bits p, p+1 of lo, its high
    bit at bit p+2 of hi, random bits elsewhere."""
    lo_g, hi_g = (int(v) for v in rng.integers(0, 1 << 16, size=2))
    return (lo_g & ~(3 << p)) | ((q & 3) << p), (hi_g & ~(4 << p)) | ((q >> 2) << (p + 2))


@pytest.mark.parametrize("p", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_packed_asm_int3_halves_bit_exact(fmt, p):
    """Round 11: the asm for codes at bit p (magic MAGIC_VALUE·2^−p) against s·(q − 4) + c rounded
    once, every code pair, random bits around the code."""
    asm = decode_tile.packed_asm_int3_halves("fp16" if fmt == "f16" else "bf16", p)
    rng = np.random.default_rng(43 + p)
    s_bits, c_bits = half_bits(SCALES, fmt), half_bits(BIASES, fmt)
    for q0 in range(8):
        for q1 in range(8):
            (l0, h0), (l1, h1) = _int3_halves(q0, rng, p), _int3_halves(q1, rng, p)
            for i in range(len(SCALES)):
                s, c = s_bits[i], c_bits[(i + q1) % len(BIASES)]
                got = run_ptx(asm, {"$1": l0 | (l1 << 16), "$2": h0 | (h1 << 16), "$3": s | (s << 16),
                                    "$4": c | (c << 16)})
                for half, q in ((0, q0), (1, q1)):
                    exact = half_value(s, fmt) * (q - 4) + half_value(c, fmt)
                    assert (got >> (16 * half)) & 0xFFFF == round_half(exact, fmt), (fmt, p, q, s, c, half)


def test_int3_lane_constants_reject_codes_past_the_mantissa():
    with pytest.raises(ValueError, match="p <= 4"):
        decode_tile.int3_lane_constants("bf16", 5)


def test_int3_lane_plan_aligns_every_pair():
    """INT3_LANE_PLAN (round 11): for pair j (columns j, j + 16 of a lane's chunk), ``low >> a``
    puts the two low bits of both columns at bits p, p+1 of their 16-bit halves and ``w2 >> b``
    the high bits at bit p+2, bit-exactly on chunks holding random codes; every p has its asm
    (0, 2, 4: the kernel's selects know no other); and the plan needs 14 distinct shifts."""
    rng = np.random.default_rng(11)
    plan = decode_tile.INT3_LANE_PLAN
    assert len(plan) == 16 and {p for _, _, p in plan} <= {0, 2, 4}

    def shift(x, n):
        return (x >> n if n >= 0 else x << -n) & 0xFFFFFFFF

    for _ in range(50):
        codes = rng.integers(0, 8, size=32).tolist()
        w0 = sum((c & 3) << (2 * i) for i, c in enumerate(codes[:16]))
        w1 = sum((c & 3) << (2 * i) for i, c in enumerate(codes[16:]))
        w2 = sum((c >> 2) << i for i, c in enumerate(codes))
        lows = (w0 & 0xFFFF) | ((w1 & 0xFFFF) << 16)
        highs = (w0 >> 16) | (w1 & 0xFFFF0000)
        for j, (a, b, p) in enumerate(plan):
            lo, hi = shift(lows if j < 8 else highs, a), shift(w2, b)
            for half, col in ((0, j), (1, j + 16)):
                got = (((lo >> (16 * half)) >> p) & 3) | (((hi >> (16 * half)) >> p) & 4)
                assert got == codes[col], (j, half)
    # the count the docs give: low words' and word 2's distinct non-zero shifts
    n_shifts = (len({a for a, _, _ in plan[:8]} - {0}) + len({a for a, _, _ in plan[8:]} - {0})
                + len({b for _, b, _ in plan} - {0}))
    assert n_shifts == 14


@needs_kernels
def test_int3_halves_twin_matches_asm_model():
    """``_int3_halves_to_weights(PACKED=False)`` against the asm model, every code pair at each of
    the plan's positions (0, 2, 4)."""
    import triton
    import triton.language as tl

    @triton.jit
    def twin(lo_ptr, hi_ptr, pos_ptr, s_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        w = decode_tile._int3_halves_to_weights(tl.load(lo_ptr + offs), tl.load(hi_ptr + offs),
                                                tl.load(pos_ptr + offs), tl.load(s_ptr + offs),
                                                tl.load(c_ptr + offs), False)
        tl.store(out_ptr + offs, w)

    for p in (0, 2, 4):
        lows, highs, s_list, c_list = _int3_twin_cases(lambda q, rng: _int3_halves(q, rng, p), 44 + p)
        n = len(lows)
        block = 1 << (n - 1).bit_length()
        pos = torch.full((block,), p, dtype=torch.int32)
        got = _run_int3_twin(_with_pos(twin, pos), lows, highs, s_list, c_list, 16)
        asm = decode_tile.packed_asm_int3_halves("fp16", p)
        sb, cb = half_bits(s_list, "f16"), half_bits(c_list, "f16")
        for e in range(0, n, 2):
            ref = run_ptx(asm, {"$1": lows[e] | (lows[e + 1] << 16), "$2": highs[e] | (highs[e + 1] << 16),
                                "$3": sb[e] | (sb[e + 1] << 16), "$4": cb[e] | (cb[e + 1] << 16)})
            assert (got[e], got[e + 1]) == (ref & 0xFFFF, ref >> 16), (p, e)


class _with_pos:
    """``twin[(1,)](lo, hi, s, c, out, BLOCK=...)`` with ``pos`` inserted after hi."""

    def __init__(self, twin, pos):
        self.twin, self.pos = twin, pos

    def __getitem__(self, grid):
        def launch(lo, hi, s, c, out, BLOCK):
            self.twin[grid](lo, hi, self.pos, s, c, out, BLOCK=BLOCK)
        return launch


@pytest.fixture
def block_k_128(monkeypatch):
    """The interpreter's split-K candidate with BLOCK_K = 128: the INT3 lane-owned order needs
    4 chunks of 32 columns per tile (the default 64 takes the stored-order tile)."""
    from qlk.kernels import config

    def one():
        return [config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=128)]

    monkeypatch.setattr(config, "splitk_configs", one)
    heuristics._choose_default.cache_clear()
    yield
    heuristics._choose_default.cache_clear()


# INT3 through the lane-owned tile: groups of one chunk, several groups per tile, one group over
# two tiles, a group that is not a power of two, ragged K (EVEN_K false, a partial chunk)
INT3_LANE_CASES = [(3, 32, 544), (3, 256, 512), (3, 96, 480), (3, 16, 400)]


@needs_kernels
@pytest.mark.parametrize("case", INT3_LANE_CASES, ids=lambda c: f"int{c[0]}g{c[1]}k{c[2]}")
def test_lane_order_int3_against_float64(case, block_k_128, poisoned):
    bits, g, k = case
    device = "cpu" if INTERPRETED else "cuda"
    gen = torch.Generator().manual_seed(700 + g + k)
    groups = k // g
    w = (torch.randn(N, groups, g, generator=gen) * torch.exp(torch.randn(N, groups, 1, generator=gen))
         + torch.randn(N, groups, 1, generator=gen)).reshape(N, k)
    qw = qlk.quantize(w, bits=bits, group_size=g).to(device)
    w64 = oracles.int_dequant64(qw)
    c = heuristics.candidates("splitk")[0].kwargs
    assert c["BLOCK_K"] == 128 and decode_tile.lane_order_ok(3, c["BLOCK_K"])
    for m, det in ((1, True), (5, False), (16, True)):
        x = torch.randn(m, k, generator=gen).to(torch.float16).to(device)
        out = torch.full((m, N), float("nan"), dtype=torch.float16, device=device)
        y = quant_matmul_forward(x, qw, None, out=out, path="splitk", deterministic=det)
        ref = x.cpu().double() @ w64.t()
        assert oracles.rel_err(y, ref) < 1.5e-3, (m, det)


# ------------------------------------------------------------------ round 7: the GEMM forward (M > 16)
@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"int{c[0]}g{c[1]}k{c[2]}")
def test_gemm_forward_fp16_rounds_like_decode(case):
    """fp16 activations through the large-M forward GEMM (``path="gemm"``), which decodes INT
    weights with the same half2 tile as the decode loop since round 7: Ŵ = fp16(s·(q − m) + c)
    rounded once, fp32 accumulation. M = 80 and N = 72 give ragged second M and third N tiles (the
    interpreter's 32x64x64 tile), K = 512 .. 784 several K tiles, with several groups per tile, one
    group over several tiles, groups that are not powers of two and partial INT3/INT2 words; the
    bias, NaN-poisoned Y. The oracle rounds the float64 Ŵ to fp16 once, so a weight decoded from
    the wrong group, column or code is far outside the tolerance (the fp16 output alone: ~1.5e-4)."""
    bits, g, k = case
    device = "cpu" if INTERPRETED else "cuda"
    gen = torch.Generator().manual_seed(900 + bits * 100 + g + k)
    groups = k // g
    w = (torch.randn(N, groups, g, generator=gen) * torch.exp(torch.randn(N, groups, 1, generator=gen))
         + torch.randn(N, groups, 1, generator=gen)).reshape(N, k)
    qw = qlk.quantize(w, bits=bits, group_size=g).to(device)
    w_half = oracles.int_dequant64(qw).half().double()  # s, c are stored in fp16: one rounding
    m = 80
    x = torch.randn(m, k, generator=gen).to(torch.float16).to(device)
    bias = torch.randn(N, generator=gen).to(torch.float16).to(device)
    out = torch.full((m, N), float("nan"), dtype=torch.float16, device=device)
    y = quant_matmul_forward(x, qw, bias, out=out, path="gemm")
    ref = x.cpu().double() @ w_half.t() + bias.cpu().double()
    assert not y.isnan().any()
    assert oracles.rel_err(y, ref) < 4e-4


# ------------------------------------------------ round 17: the GEMM forward in the lane-owned k order
# (tile, arch, lane order expected): the interpreter runs the tile's block sizes; the rules' target
# decides the order (heuristics.fwd_lane_order: sm_80 every tile, sm_90 the 64-row tile only)
LANE_GEMM_TILES = [
    pytest.param(dict(BLOCK_N=32, BLOCK_M=64, BLOCK_K=64), 90, True, id="64x32x64-sm90-lanes"),
    pytest.param(dict(BLOCK_N=32, BLOCK_M=128, BLOCK_K=64), 90, False, id="128x32x64-sm90-stored"),
    pytest.param(dict(BLOCK_N=32, BLOCK_M=128, BLOCK_K=64), 80, True, id="128x32x64-sm80-lanes"),
    # round 20: sm_90's 64x128x128 forward tile (heuristics.CANDIDATE_M_RANGE), whose 128-column K
    # tile spans INT3's quad of chunks: INT3 in the lane-owned order too
    pytest.param(dict(BLOCK_N=32, BLOCK_M=64, BLOCK_K=128), 90, True, id="64x32x128-sm90-lanes"),
]
# (bits, group, K): several groups per K tile, one group over two K tiles, a group that is not a
# power of two, and K that cuts the last tile (its tile decoded in the stored order, after the others)
LANE_GEMM_CASES = [(4, 32, 320), (4, 128, 384), (2, 16, 320), (2, 128, 256), (4, 96, 288), (2, 32, 288)]
# INT3 (round 20): lane-owned only where BLOCK_K spans 128 columns; 4 groups per K tile, 2 K tiles
# per group, a group of 96 (4 per 3 K tiles), K that cuts the last tile (stored order there)
LANE_GEMM_INT3_CASES = [(3, 32, 384), (3, 256, 512), (3, 96, 384), (3, 64, 320)]


LANE_GEMM_RUNS = [pytest.param(*t.values, c, id=f"{t.id}-int{c[0]}g{c[1]}k{c[2]}")
                  for t in LANE_GEMM_TILES for c in LANE_GEMM_CASES + LANE_GEMM_INT3_CASES
                  if c[0] != 3 or decode_tile.lane_order_ok(3, t.values[0]["BLOCK_K"])]


@needs_kernels
@pytest.mark.parametrize("tile,arch,lanes,case", LANE_GEMM_RUNS)
def test_gemm_forward_lane_order(tile, arch, lanes, case, monkeypatch):
    """Round 17: the forward GEMM decodes INT2/INT4 (round 20: and INT3 on 128-column K tiles) in the
    lane-owned k order and reads X in the same permuted order where :func:`heuristics.fwd_lane_order`
    says so. fp16, NaN-poisoned Y against
    float64 on Ŵ rounded once to fp16, M = 133 (3 or 2 M tiles, the last ragged), N = 72 (3 N tiles,
    the last ragged), 4-6 K tiles; the launch's LANE_ORDER is the rule's for the patched target."""
    from qlk.kernels import config

    if not INTERPRETED:
        pytest.skip("the tile is forced through the interpreter's candidate list")
    bits, g, k = case
    monkeypatch.setattr(fm, "target_arch", lambda: arch)
    cfg = config._cfg(None, 4, 1, GROUP_M=2, **tile)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [cfg] if op == "fwd" else real(op))
    heuristics._choose_default.cache_clear()
    seen = spies.record_launches(monkeypatch, fm, "_quant_matmul_fwd_kernel")
    decoded_lanes = spies.record_calls(monkeypatch, fm, "_decode_int_tile_lanes")  # which tile decoder ran
    gen = torch.Generator().manual_seed(1700 + bits * 100 + g + k)
    groups = k // g
    w = (torch.randn(N, groups, g, generator=gen) * torch.exp(torch.randn(N, groups, 1, generator=gen))
         + torch.randn(N, groups, 1, generator=gen)).reshape(N, k)
    qw = qlk.quantize(w, bits=bits, group_size=g)
    w_half = oracles.int_dequant64(qw).half().double()
    m = 133
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    out = torch.full((m, N), float("nan"), dtype=torch.float16)
    try:
        y = quant_matmul_forward(x, qw, None, out=out, path="gemm")
    finally:
        heuristics._choose_default.cache_clear()
    assert [kw["LANE_ORDER"] for kw in seen] == [lanes] and heuristics.fwd_lane_order(arch, tile["BLOCK_M"]) == lanes
    assert bool(decoded_lanes) == lanes  # INT3 too (round 20), where BLOCK_K spans 128 columns
    assert not y.isnan().any()
    assert oracles.rel_err(y, x.double() @ w_half.t()) < 4e-4


def test_fwd_lane_order_rule():
    """sm_80: every forward tile in the lane-owned order; sm_90: the 64-row tile only (the 128/256-row
    tiles lose to the permuted X tile's 8-byte runs); an unknown arch (0) is sm_80's family."""
    assert all(heuristics.fwd_lane_order(80, bm) for bm in (64, 128, 256))
    assert heuristics.fwd_lane_order(90, 64) and not heuristics.fwd_lane_order(90, 128)
    assert not heuristics.fwd_lane_order(100, 256) and heuristics.fwd_lane_order(0, 256)

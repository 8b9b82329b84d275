"""The NF4 pieces of the fused kernels that the interpreter cannot show (qlk/kernels/nf4_tile.py).

* The warp-shuffle lookup: its PTX text (``LANE_TABLE_PTX``, ``PAIR_LOOKUP_PTX``) is executed here
  instruction by instruction over a modelled 32-lane warp (a small model of mov/and/setp/@p/shr
  and ``shfl.sync.idx`` as the PTX ISA defines them), for every byte value, every lane position and
  random garbage above the byte, and must give the fp32 bits of NF4[high nibble], NF4[low nibble],
  which is also what the interpreter's twin (the byte table) gathers. The compiled kernels with
  this PTX are built by tests/test_kernel_static.py (no spills, estimates).
* The launch-time de-nesting of double-quantized absmax: bit for bit the reference's (and an
  independent numpy fp32 evaluation of bitsandbytes' formula), with > 256 blocks (nested index
  0..4), a block count that is neither a multiple of 256 nor of the kernel's block, and a
  NaN-poisoned output buffer.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qlk.formats.nf4 import quantize_nf4
from qlk.formats.nf4 import NF4_TABLE, nf4_absmax
from qlk.kernels import nf4_tile
from qlk.kernels.quant_tile import nf4_byte_table, weight_args

import asm_emulator

NF4_BITS = np.array(NF4_TABLE, dtype=np.float32).view(np.uint32)
LANES = np.arange(32, dtype=np.uint32)


def _imm(tok: str) -> np.ndarray:
    return np.full(32, int(tok, 0) & 0xFFFFFFFF, dtype=np.uint32)


def run_ptx(ptx: str, operands: dict) -> dict:
    """Execute ``ptx`` for the 32 lanes of one warp. ``operands``: {"$i": uint32[32]}; returns them
    with the outputs written. Knows exactly the instructions qlk's NF4 asm uses; anything else
    raises, so an edit to the PTX must come with its model here."""
    regs = {k: v.astype(np.uint32).copy() for k, v in operands.items()}
    preds = {}

    def val(tok):
        tok = tok.strip()
        if tok == "%laneid":
            return LANES.copy()
        if tok in regs:
            return regs[tok]
        return _imm(tok)

    for raw in ptx.splitlines():
        line = raw.strip().rstrip(";").strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        guard = None
        m = re.match(r"@(!?)(\w+)\s+(.*)", line)
        if m:
            guard = preds[m.group(2)] if not m.group(1) else ~preds[m.group(2)]
            line = m.group(3)
        op, rest = line.split(None, 1)
        m = re.match(r"\{\s*(\S+)\s*,\s*(\S+)\s*\}\s*,\s*(\S+)$", rest)
        if op == "mov.b32" and m:  # unpack into 16-bit registers: low half first
            v = val(m.group(3))
            regs[m.group(1)], regs[m.group(2)] = v & np.uint32(0xFFFF), v >> np.uint32(16)
            continue
        args = [a.strip() for a in rest.split(",")]
        if op == "prmt.b32":
            res = asm_emulator.prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            res = asm_emulator.fma_x2(val(args[1]), val(args[2]), val(args[3]), "bf16" if "bf16" in op else "f16")
        elif op in ("mov.u32", "mov.b32"):
            res = val(args[1])
        elif op == "and.b32":
            res = val(args[1]) & val(args[2])
        elif op in ("shr.b32", "shr.u32"):  # logical shift; amounts >= 32 give 0
            amount = val(args[2])
            res = np.where(amount < 32, val(args[1]) >> np.minimum(amount, 31), 0).astype(np.uint32)
        elif op == "setp.eq.u32":
            preds[args[0]] = val(args[1]) == val(args[2])
            continue
        elif op == "shfl.sync.idx.b32":
            # PTX ISA: c packs clamp (bits 0-4) and segmask (bits 8-12); every lane takes part
            assert int(args[4], 0) & 0xFFFFFFFF == 0xFFFFFFFF, "modelled for a full warp only"
            a, b, c = val(args[1]), val(args[2]), val(args[3])
            clamp, segmask = c & 0x1F, (c >> 8) & 0x1F
            min_lane = LANES & segmask
            max_lane = min_lane | (clamp & ~segmask & 0x1F)
            j = min_lane | (b & ~segmask & 0x1F)
            src = np.where(j > max_lane, LANES, j)
            res = a[src]
        else:
            raise AssertionError(f"instruction not modelled: {line!r}")
        if guard is not None:
            res = np.where(guard, res, regs[args[0]])
        regs[args[0]] = res.astype(np.uint32)
    return regs


def test_lane_table_holds_nf4_by_lane():
    regs = run_ptx(nf4_tile.LANE_TABLE_PTX, {"$0": np.zeros(32), "$1": np.zeros(32)})
    assert np.array_equal(regs["$0"], NF4_BITS[LANES % 16])


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_lookup_every_byte_every_lane(seed):
    """All 256 bytes, each at 4 random lane positions, with random bits above the byte (the
    kernel passes word >> 8i unmasked, arithmetic shift included): outputs equal NF4 of the
    nibbles and the twin's byte table."""
    rng = np.random.default_rng(seed)
    table = run_ptx(nf4_tile.LANE_TABLE_PTX, {"$0": np.zeros(32), "$1": np.zeros(32)})["$0"]
    twin = nf4_byte_table("cpu").numpy().view(np.uint32).reshape(256, 2)  # (even, odd) per byte
    all_bytes = np.concatenate([rng.permutation(256) for _ in range(4)]).astype(np.uint32)
    for start in range(0, all_bytes.size, 32):
        byte = all_bytes[start:start + 32]
        garbage = rng.integers(0, 1 << 24, 32, dtype=np.uint32) << np.uint32(8)
        regs = run_ptx(nf4_tile.PAIR_LOOKUP_PTX, {"$0": np.zeros(32), "$1": np.zeros(32),
                                                   "$2": byte | garbage, "$3": table})
        assert np.array_equal(regs["$0"], NF4_BITS[byte >> 4]), "even element (high nibble)"
        assert np.array_equal(regs["$1"], NF4_BITS[byte & 15]), "odd element (low nibble)"
        assert np.array_equal(regs["$0"], twin[byte, 0]) and np.array_equal(regs["$1"], twin[byte, 1])


def _act_round(v: np.ndarray, act: str) -> np.ndarray:
    """float64 values rounded once (to nearest even) to fp16/bf16, back as float64."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[act]
    return torch.from_numpy(v).to(dtype).double().numpy()


def _act_bits(v: np.ndarray, act: str) -> np.ndarray:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[act]
    return torch.from_numpy(np.asarray(v, dtype=np.float64)).to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF


def _half_pair_expected(byte: np.ndarray, scale: np.ndarray, act: str, scale_odd: np.ndarray | None = None):
    """(even, odd) 16-bit patterns of round_act(round_act(NF4[nibble])·round_act(s)), in float64: the even
    element (high nibble) scaled by ``scale`` (the operand's low half), the odd one by ``scale_odd``
    (its high half; the same scale when None)."""
    table = _act_round(np.array(NF4_TABLE, dtype=np.float64), act)
    s = _act_round(scale.astype(np.float64), act)
    s_odd = s if scale_odd is None else _act_round(scale_odd.astype(np.float64), act)
    return _act_bits(table[byte >> 4] * s, act), _act_bits(table[byte & 15] * s_odd, act)


@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_half_lane_table_holds_rounded_nf4_by_lane(act):
    regs = run_ptx(nf4_tile.lane_table_asm(act), {"$0": np.zeros(32), "$1": np.zeros(32)})
    want = _act_bits(np.array(NF4_TABLE, dtype=np.float64), act)[LANES % 16]
    assert np.array_equal(regs["$0"], want)
    assert act != "bf16" or not np.array_equal(want, NF4_BITS[LANES % 16] >> 16), "bf16 rounds, not truncates"


@pytest.mark.parametrize("act", ["fp16", "bf16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_half_pair_lookup_every_byte(act, seed):
    """Round 21's half2 lookup (pair_half_asm) over a modelled warp: all 256 bytes at random lane
    positions, garbage above the byte, absmax from subnormal to large: (even, odd) equal
    round_act(NF4_act[nibble]·s_act) computed in float64 (one rounding of the exact product)."""
    rng = np.random.default_rng(seed)
    table = run_ptx(nf4_tile.lane_table_asm(act), {"$0": np.zeros(32), "$1": np.zeros(32)})["$0"]
    all_bytes = np.concatenate([rng.permutation(256) for _ in range(4)]).astype(np.uint32)
    for start in range(0, all_bytes.size, 32):
        byte = all_bytes[start:start + 32]
        garbage = rng.integers(0, 1 << 24, 32, dtype=np.uint32) << np.uint32(8)
        scale = np.exp(rng.uniform(np.log(1e-6), np.log(3e3), 32)) * rng.choice([1.0, -1.0], 32)
        # the halves of $4 differ in one block in two (the scale operand's semantics: low half for
        # the even element, high half for the odd one; the kernels pass the same value in both)
        scale_odd = scale if start % 64 else np.roll(scale, 5) * 3.0
        s16, s16_odd = _act_bits(scale, act), _act_bits(scale_odd, act)
        regs = run_ptx(nf4_tile.pair_half_asm(act), {"$0": np.zeros(32), "$1": np.zeros(32), "$2": byte | garbage,
                                                     "$3": table, "$4": s16 | (s16_odd << np.uint32(16))})
        even, odd = _half_pair_expected(byte, scale, act, scale_odd)
        assert np.array_equal(regs["$0"], even), "even element (high nibble)"
        assert np.array_equal(regs["$1"], odd), "odd element (low nibble)"


def test_ptx_model_rejects_unknown_instructions():
    with pytest.raises(AssertionError, match="not modelled"):
        run_ptx("add.u32 $0, $0, 1;", {"$0": np.zeros(32)})


def _numpy_denest(qw) -> np.ndarray:
    """bitsandbytes' formula evaluated by numpy in fp32 (product rounded, then the sum)."""
    import bitsandbytes.functional as bnbf

    dyn = bnbf.create_dynamic_map(signed=True).numpy().astype(np.float32)
    codes = qw.absmax.cpu().numpy().astype(np.int64)
    nested = qw.absmax_scale.cpu().numpy().astype(np.float32)[np.arange(codes.size) // 256]
    prod = (dyn[codes] * nested).astype(np.float32)
    return (prod + np.float32(qw.absmax_offset.cpu().item())).astype(np.float32)


@pytest.mark.parametrize("rows,cols,block", [(41, 512, 64), (3, 64, 32), (130, 1024, 128)])
def test_denest_bit_exact(rows, cols, block, monkeypatch):
    """rows·cols/block = 328 / 6 / 1040 blocks: nested index 0..1 / 0 / 0..4, ragged last nested
    block, 1040 > one program's 1024; output poisoned with NaN."""
    pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 1, rows)[:, None]
    qw = quantize_nf4(w, blocksize=block, double_quant=True)
    real_empty = torch.empty
    monkeypatch.setattr(nf4_tile.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    out = nf4_tile.denest_absmax(qw)
    assert out.dtype == torch.float32 and out.shape == (rows * cols // block,)
    assert torch.equal(out.view(torch.int32), nf4_absmax(qw).view(torch.int32))
    assert np.array_equal(out.numpy().view(np.uint32), _numpy_denest(qw).view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows,cols,block", [(41, 512, 64), (130, 1024, 128)])
def test_denest_pairs_bit_exact(rows, cols, block, dtype, monkeypatch):
    """Round 26's paired buffer: each de-nested absmax rounded to the activation dtype (nearest even,
    torch's cast of the bit-exact fp32 value; values past fp16's range included), its 16 bits in both
    halves of an int32; the output poisoned."""
    gen = torch.Generator().manual_seed(rows + cols + block)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-9, 5, rows)[:, None]
    qw = quantize_nf4(w, blocksize=block, double_quant=True)
    real_empty = torch.empty
    monkeypatch.setattr(nf4_tile.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(-7))
    out = nf4_tile.denest_absmax(qw, pair=dtype)
    half = nf4_absmax(qw).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert out.dtype == torch.int32 and out.shape == (rows * cols // block,)
    assert torch.equal(out, half | (half << 16))
    assert half.unique().numel() > 16  # the rows' scales differ: a constant would not pass
    if dtype == torch.float16:
        assert (half == 0x7C00).any()  # rounded to inf, as the kernels' cvt.rn does
    with pytest.raises(ValueError, match="pair="):
        nf4_tile.denest_absmax(qw, pair=torch.float32)


def test_weight_args_pairs_only_the_half2_tiles_case():
    """``pair_act``: the de-nested buffer as activation-dtype pairs, flagged in the meta, only for a
    double-quantized NF4 weight de-nested for fp16/bf16 activations; anything else as before."""
    w = torch.randn(24, 256)
    dq = quantize_nf4(w, blocksize=64, double_quant=True)
    for dtype in (torch.float16, torch.bfloat16):
        args, meta = weight_args(dq, denest_absmax=True, pair_act=dtype)
        half = nf4_absmax(dq).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        assert meta["ABSMAX_PAIRED"] is True and meta["DOUBLE_QUANT"] is False
        assert torch.equal(args[1], half | (half << 16))
    for qw, kw in ((dq, dict(denest_absmax=True, pair_act=torch.float32)), (dq, dict(pair_act=torch.bfloat16)),
                   (quantize_nf4(w, blocksize=64, double_quant=False), dict(denest_absmax=True, pair_act=torch.float16))):
        args, meta = weight_args(qw, **kw)
        assert "ABSMAX_PAIRED" not in meta and args[1].dtype != torch.int32, kw


def test_weight_args_denest_switch():
    w = torch.randn(24, 256)
    qw = quantize_nf4(w, blocksize=64, double_quant=True)
    args, meta = weight_args(qw, denest_absmax=True)
    assert meta["DOUBLE_QUANT"] is False and meta["IS_NF4"]
    assert torch.equal(args[1], nf4_absmax(qw)) and args[8:] == (4, 1)
    args, meta = weight_args(qw)
    assert meta["DOUBLE_QUANT"] is True and args[1] is qw.absmax
    with pytest.raises(ValueError, match="double-quantized NF4"):
        nf4_tile.denest_absmax(quantize_nf4(w, blocksize=64, double_quant=False))


@pytest.mark.skipif(not (nf4_tile.INTERPRETED or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_half_pair_kernel_every_byte(act):
    """``_nf4_half_pair`` as the kernels call it (the interpreter's byte-table twin on CPU, the PTX on a
    GPU): every byte with 16 absmax values from subnormal to large and garbage above the byte, the odd
    element's scale (the operand's high half) different in half of them, against the same float64
    model as the PTX; the output poisoned with NaN."""
    import triton
    import triton.language as tl

    @triton.jit
    def pair(byte_ptr, s_ptr, s_odd_ptr, lut_ptr, even_ptr, odd_ptr, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        bits = tl.load(s_ptr + offs).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        bits_odd = tl.load(s_odd_ptr + offs).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        even, odd = nf4_tile._nf4_half_pair(tl.load(byte_ptr + offs), bits | (bits_odd << 16), lut_ptr, ACT)
        tl.store(even_ptr + offs, even)
        tl.store(odd_ptr + offs, odd)

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[act]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(7)
    byte = np.tile(np.arange(256, dtype=np.uint32), 16)
    scale = np.repeat(np.exp(rng.uniform(np.log(1e-6), np.log(3e3), 16)), 256)
    garbage = rng.integers(0, 1 << 23, byte.size, dtype=np.uint32) << np.uint32(8)
    words = torch.from_numpy((byte | garbage).view(np.int32)).to(device)
    # the odd element's scale differs from the even one's in half the bytes (the operand's halves)
    scale_odd = np.where(np.arange(byte.size) % 512 < 256, scale, np.roll(scale, 256) * 0.37)
    s = torch.from_numpy(scale).to(dtype).to(device)
    s_odd = torch.from_numpy(scale_odd).to(dtype).to(device)
    even = torch.full((byte.size,), float("nan"), dtype=dtype, device=device)
    odd = torch.full_like(even, float("nan"))
    pair[(1,)](words, s, s_odd, nf4_byte_table(device), even, odd,
               ACT=getattr(tl, {"fp16": "float16", "bf16": "bfloat16"}[act]), BLOCK=byte.size)
    want_even, want_odd = _half_pair_expected(byte, scale, act, scale_odd)
    assert np.array_equal(even.cpu().view(torch.int16).numpy().astype(np.uint32) & 0xFFFF, want_even)
    assert np.array_equal(odd.cpu().view(torch.int16).numpy().astype(np.uint32) & 0xFFFF, want_odd)

"""NF4 helpers of the fused kernels: the code -> value lookup by warp shuffle, and the launch-time
de-nesting of double-quantized absmax.

**Lookup by shuffle** (:func:`_nf4_pair_values`, compiled kernels). Every lane ℓ of a warp holds
NF4[ℓ mod 16] (fp32 bits) in one register, built once per kernel from immediates
(:data:`LANE_TABLE_PTX`, loop-invariant, hoisted). A code c is then looked up with one
``shfl.sync.idx.b32 v, table, c`` (:data:`PAIR_LOOKUP_PTX`): lane c's register is NF4[c]. The
source lane is the low 5 bits of the index operand, and both half-warps hold the table, so the
index may carry any garbage above bit 3: a byte shifted down from its word (``word >> 8i``) is
used unmasked for the odd (low-nibble) element, and shifted 4 more for the even one. Per code:
one SHF and one SHFL (SHFL: 32 lanes per clock per SM), no memory, exact fp32 values. The
interpreter cannot run inline PTX: it takes the pure-Triton twin (a 256-entry byte table
gathered from memory, ``quant_tile.nf4_byte_table``), selected by the constexpr
:data:`NF4_SHUFFLE`. tests/test_nf4_tile.py runs the PTX text itself, instruction by
instruction, over a modelled warp for every byte value.

**Half2 lookup** (:func:`_nf4_half_pair`, round 21; every fused tile with fp16/bf16 activations):
the lane table holds NF4[ℓ mod 16] rounded to the activation dtype (:func:`lane_table_asm`), the
two codes of a byte are looked up by two shuffles, put side by side by one PRMT and scaled by one
HFMA2 with the absmax in both halves (:func:`pair_half_asm`): a byte costs one SHF, two SHFL, one
PRMT and one HFMA2 where the fp32 lookup and its scaling took two FMUL and an F2FP after the same
shuffles (the 64-row GEMM tiles were issue-bound on it). Numerics: ŵ = round_act(NF4_a[q]·absmax_a),
three roundings where the fp32 tile has one: within about one unit in the last place of the fp32
value (tests/test_nf4_tile.py runs the PTX against a float64 model for every byte). The
interpreter's twin computes the same in fp32 (exact products of two 16-bit floats) and rounds bf16
by integer arithmetic (:func:`_round_act`: the interpreter's fp32 -> bf16 cast truncates).

Double quantization stores absmax per block i as an 8-bit code (bitsandbytes' QLoRA format):

    absmax[i] = DYN[qa[i]]·absmax2[i // 256] + offset        (fp32: product rounded, then the sum)

Done inside a GEMM's K loop this costs, per (row, block) of every tile, a byte load, a 256-entry
table gather, a nested-scale gather and two FP ops, on a layout that is not the MMA's (the
compiler moved the results through shared memory). The large-M kernels instead read an fp32
buffer [N, K/blocksize] that :func:`denest_absmax` writes once per call, in one pass over
~1/64 of the weight's bytes (0.5 bit per parameter read instead of 0.125: nothing at M = 4096,
but a second launch and a second pass at decode, where the split-K kernel keeps de-nesting in
its loop). The stored format is unchanged; the buffer is a temporary of the call.

The kernel launches with ``enable_fp_fusion=False``: the product and the sum round separately,
as in the reference (:func:`qlk.formats.nf4.nf4_absmax`), so the buffer equals it bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import struct

from ..formats.nf4 import NESTED_BLOCKSIZE, NF4_TABLE, dynamic_map
from ..formats.quantized_weight import QuantizedWeight
from .config import INTERPRETED, cdiv
from .ptx_loads import _ld_nc, _ld_nc_code

_DENEST_BLOCK = 1024

#: True: NF4 codes are looked up by warp shuffle (inline PTX); False (interpreter): byte-table gather
NF4_SHUFFLE = tl.constexpr(not INTERPRETED)
_INTERPRETED_BF16 = tl.constexpr(INTERPRETED)


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def half_bits(value: float, act: str) -> int:
    """16-bit pattern of ``value`` rounded to nearest (even) in the activation dtype ``act``."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[act]
    return int(torch.tensor([value], dtype=torch.float32).to(dtype).view(torch.int16).item()) & 0xFFFF


def _lane_table_asm(entries: list[int]) -> str:
    lines = ["{", ".reg .u32 lane;", ".reg .pred hit;", "mov.u32 lane, %laneid;", "and.b32 lane, lane, 15;",
             f"mov.b32 $0, 0x{entries[0]:08X};"]
    for code in range(1, 16):
        lines += [f"setp.eq.u32 hit, lane, {code};", f"@hit mov.b32 $0, 0x{entries[code]:08X};"]
    return "\n".join(lines + ["}"])


def lane_table_asm(act: str = "fp32") -> str:
    """PTX: $0 = NF4[laneid mod 16] as fp32 bits (``act="fp32"``), or as the fp16/bf16 bits of the
    value rounded to the activation dtype in the low 16 bits (upper bits 0); $1: an unused operand."""
    if act == "fp32":
        return _lane_table_asm([_f32_bits(v) for v in NF4_TABLE])
    return _lane_table_asm([half_bits(v, act) for v in NF4_TABLE])


def pair_half_asm(act: str) -> str:
    """PTX of one invocation (pack=1) of the half2 lookup of an NF4 byte: ($0, $1) = (NF4_a[$2 >> 4]·s,
    NF4_a[$2 & 15]·s) as fp16/bf16 (16-bit registers), the even element then the odd one, NF4_a = the
    table rounded to ``act``. $2 = int32 whose low byte is the packed byte (bits above it are
    ignored: a shuffle reads bits 0-4 of its index, and both half-warps hold the table, so bit 4 is free);
    $3 = the lane table register (``lane_table_asm(act)``); $4 = s in both 16-bit halves (``act``).
    One SHF, two SHFL, one PRMT and one HFMA2 (the product + −0: the product rounded once) a byte;
    the two 16-bit results are the halves of one 32-bit register, as the MMA operand holds the pair."""
    fma = {"fp16": "fma.rn.f16x2", "bf16": "fma.rn.bf16x2"}[act]
    return "\n".join([
        "{",
        ".reg .b32 ev, od, ix, nz;",
        "shr.b32 ix, $2, 4;",
        "shfl.sync.idx.b32 ev, $3, ix, 0x1f, 0xffffffff;",
        "shfl.sync.idx.b32 od, $3, $2, 0x1f, 0xffffffff;",
        "prmt.b32 ev, ev, od, 0x5410;",  # (NF4_a[even], NF4_a[odd]): the low half of each
        "mov.b32 nz, 0x80008000;",
        f"{fma} ev, ev, $4, nz;",
        "mov.b32 {$0, $1}, ev;",
        "}",
    ])


#: $0 = fp32 bits of NF4[laneid mod 16] ($1: an unused operand, inline asm needs one)
LANE_TABLE_PTX = lane_table_asm()
#: $0 = NF4[$2 >> 4 (mod 16)], $1 = NF4[$2 (mod 16)] (fp32 bits), $3 = the lane table register
PAIR_LOOKUP_PTX = "\n".join([
    "{",
    ".reg .b32 even_idx;",
    "shr.b32 even_idx, $2, 4;",
    "shfl.sync.idx.b32 $0, $3, even_idx, 0x1f, 0xffffffff;",
    "shfl.sync.idx.b32 $1, $3, $2, 0x1f, 0xffffffff;",
    "}",
])
_LANE_TABLE_ASM = tl.constexpr(LANE_TABLE_PTX)
_PAIR_LOOKUP_ASM = tl.constexpr(PAIR_LOOKUP_PTX)
_LANE_TABLE_F16_ASM = tl.constexpr(lane_table_asm("fp16"))
_LANE_TABLE_BF16_ASM = tl.constexpr(lane_table_asm("bf16"))
_PAIR_F16_ASM = tl.constexpr(pair_half_asm("fp16"))
_PAIR_BF16_ASM = tl.constexpr(pair_half_asm("bf16"))


@triton.jit
def _nf4_pair_values(byte):
    """(NF4[byte >> 4], NF4[byte & 15]) as fp32 for int32 ``byte`` whose low 8 bits are a packed NF4
    byte (bits above 8 are ignored): the even element's value, then the odd element's.
    Compiled only (warp shuffles in inline PTX; the interpreter takes the byte-table twin)."""
    table = tl.inline_asm_elementwise(_LANE_TABLE_ASM, "=r,r", [tl.zeros_like(byte)], dtype=tl.int32,
                                      is_pure=True, pack=1)
    # is_pure: lets the compiler keep the operand in the MMA layout (is_pure=False compiled to a
    # layout conversion through shared memory: 0.95..0.48 instead of 0.97..0.64 at M = 4096). The
    # full-warp shuffle stays legal because every caller runs it unconditionally on every lane
    # (tiles are whole warps; out-of-range rows are clamped, never branched around).
    even, odd = tl.inline_asm_elementwise(_PAIR_LOOKUP_ASM, "=r,=r,r,r", [byte, table],
                                          dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    return even.to(tl.float32, bitcast=True), odd.to(tl.float32, bitcast=True)


@triton.jit
def _nf4_half_pair(byte, s2, lut_ptr, ACT: tl.constexpr):
    """(NF4_a[b >> 4]·s, NF4_a[b & 15]·s) in ACT (fp16/bf16) for the low byte b of int32 ``byte``:
    the even and the odd element of a packed NF4 byte, NF4_a the table rounded to ACT, the product
    rounded once (round 21, docs/kernels.md). ``s2``: int32 holding the absmax's ACT bits in both
    16-bit halves, broadcastable to ``byte`` (the even value is scaled by the low half, the odd one by
    the high half, in the asm and its twin alike).

    Compiled (NF4_SHUFFLE): ``pair_half_asm``, per byte one SHF, two SHFL, one PRMT and one HFMA2
    where the fp32 lookup (:func:`_nf4_pair_values`) and its scaling take two SHFL, two FMUL and an
    F2FP. The interpreter's twin gathers the fp32 values from the byte table ``lut_ptr``
    (``quant_tile.nf4_byte_table``) and rounds as the asm does: NF4_a·s has at most 22 significant
    bits, exact in fp32, then one rounding to ACT."""
    byte, s2 = tl.broadcast(byte, s2)
    if NF4_SHUFFLE:
        if ACT == tl.float16:
            table = tl.inline_asm_elementwise(_LANE_TABLE_F16_ASM, "=r,r", [tl.zeros_like(byte)], dtype=tl.int32,
                                              is_pure=True, pack=1)
            even, odd = tl.inline_asm_elementwise(_PAIR_F16_ASM, "=h,=h,r,r,r", [byte, table, s2],
                                                  dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:
            tl.static_assert(ACT == tl.bfloat16)
            table = tl.inline_asm_elementwise(_LANE_TABLE_BF16_ASM, "=r,r", [tl.zeros_like(byte)], dtype=tl.int32,
                                              is_pure=True, pack=1)
            even, odd = tl.inline_asm_elementwise(_PAIR_BF16_ASM, "=h,=h,r,r,r", [byte, table, s2],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        pair = tl.load(lut_ptr + (byte & 0xFF))
        # the asm's HFMA2 scales the even value by s2's low half and the odd one by its high half
        s_even = (s2 & 0xFFFF).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
        s_odd = ((s2 >> 16) & 0xFFFF).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
        even = _round_act(_round_act(pair.to(tl.int32).to(tl.float32, bitcast=True), ACT).to(tl.float32) * s_even,
                          ACT)
        odd = _round_act(_round_act((pair >> 32).to(tl.int32).to(tl.float32, bitcast=True), ACT).to(tl.float32) * s_odd,
                         ACT)
    return even, odd


@triton.jit
def _round_act(x, ACT: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ACT (finite values): the cast when compiled
    (cvt.rn), but bf16 under the interpreter by integer arithmetic on the bits, as its fp32 -> bf16
    cast truncates."""
    if ACT == tl.bfloat16 and _INTERPRETED_BF16:
        u = x.to(tl.int32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ACT)


@triton.jit
def _nf4_denest_kernel(out_ptr, qa_ptr, absmax2_ptr, offset_ptr, dyn_ptr, n_blocks,
                       NESTED: tl.constexpr, BLOCK: tl.constexpr, PAIR: tl.constexpr = 0):
    """out[i] = DYN[qa[i]]·absmax2[i // NESTED] + offset for i < n_blocks (fp32). PAIR 1 / 2: instead
    int32, the value rounded to fp16 / bf16 (nearest even), its 16 bits in both halves."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_blocks
    qa = tl.load(qa_ptr + offs, mask=mask, other=0).to(tl.int32)
    nested = tl.load(absmax2_ptr + offs // NESTED, mask=mask, other=0.0)
    absmax = tl.load(dyn_ptr + qa) * nested + tl.load(offset_ptr)
    if PAIR == 0:
        tl.store(out_ptr + offs, absmax, mask=mask)
    else:
        if PAIR == 1:
            half = _round_act(absmax, tl.float16)
        else:
            half = _round_act(absmax, tl.bfloat16)
        bits = half.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store(out_ptr + offs, bits | (bits << 16), mask=mask)


#: denest_absmax's ``pair`` dtypes and the kernel's PAIR code for each
_PAIR_CODE = {torch.float16: 1, torch.bfloat16: 2}


def denest_absmax(qw: QuantizedWeight, pair: torch.dtype | None = None) -> torch.Tensor:
    """fp32 absmax [blocks] of a double-quantized NF4 weight, equal bit for bit to
    :func:`qlk.formats.nf4.nf4_absmax` (one Triton launch instead of its four torch ops).

    ``pair`` (fp16 / bf16, round 26): int32 [blocks] instead, each absmax rounded to ``pair`` (nearest
    even, as the half2 tile rounds it) with its 16 bits in both halves: the scale operand of
    :func:`_nf4_half_pair` as is, so the forward GEMM's K loop loads it instead of converting and
    duplicating each block's fp32 absmax (an F2F and an IMAD each: 569 -> 553 instructions an
    iteration on sm_90's 64x128x128 tile). Same bytes, same pass."""
    if not (qw.fmt == "nf4" and qw.double_quant):
        raise ValueError(f"denest_absmax: needs a double-quantized NF4 weight; got fmt={qw.fmt!r}, "
                         f"double_quant={qw.double_quant}")
    if pair is not None and pair not in _PAIR_CODE:
        raise ValueError(f"denest_absmax: pair={pair}; allowed: None, torch.float16, torch.bfloat16")
    qa = qw.absmax.reshape(-1)
    n_blocks = qa.numel()
    out = torch.empty(n_blocks, dtype=torch.float32 if pair is None else torch.int32, device=qa.device)
    if n_blocks:
        grid = (cdiv(n_blocks, _DENEST_BLOCK),)
        _nf4_denest_kernel[grid](out, qa, qw.absmax_scale, qw.absmax_offset, dynamic_map(qa.device), n_blocks,
                                 NESTED=NESTED_BLOCKSIZE, BLOCK=_DENEST_BLOCK, PAIR=_PAIR_CODE.get(pair, 0),
                                 enable_fp_fusion=False)
    return out


@triton.jit
def _absmax_nc(s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, idx, DOUBLE_QUANT: tl.constexpr, ASM: tl.constexpr):
    """fp32 absmax at the flat (row·stride + group·stride) indices ``idx`` (any shape, in range: the
    caller clamps them), ``quant_tile._group_params``' values: double quant DYN[qa]·absmax2[idx // 256]
    + offset, product and sum rounded apart as in the reference; else the stored absmax.

    The codes and the nested scales by :func:`qlk.kernels.ptx_loads._ld_nc_code` / ``_ld_nc`` (ASM:
    inline PTX, ``ld.global.nc``): neither staged through shared memory nor seen as 8-bit loads by the
    MMA operand's sizing (module docstring of ``ptx_loads``). The DYN gather stays a ``tl.load``
    (its address depends on the code: nothing to stage ahead)."""
    if DOUBLE_QUANT:
        qa = _ld_nc_code(s_ptr + idx, ASM)
        return tl.load(dyn_ptr + qa) * _ld_nc(am_scale_ptr + idx // 256, ASM) + tl.load(am_offset_ptr)
    return _ld_nc(s_ptr + idx, ASM).to(tl.float32)

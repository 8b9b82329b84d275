"""The transposed dequantized tile Ŵᵀ for the input gradient dX = dY·Ŵ, narrowed before any transpose.

Same formats, same documented layouts as :mod:`qlk.kernels.quant_tile` (the module docstring there
and docs/formats.md), and the same float64 oracles in the tests. What differs is *where* the tile
changes layout. The input gradient feeds Ŵᵀ [BLOCK_K, BLOCK_N] as the MMA A operand, whose register
layout pairs neighbouring *rows* n of Ŵ, while a packed word holds neighbouring *columns* k. Some
layout conversion through shared memory is unavoidable in this design (sm_90 leaves the design for
INT2/INT4 since round 18, INT3 since round 19: Ŵ as wgmma's B operand, ``decode_tile._decode_int_tile_rows``);
:func:`_dequant_tile_t` makes sure it moves the finished tile in the activation dtype (2 B per element), not the int32
codes (4 B written + 4 B read per element, which is where the compiler put it when the codes were
reshaped to [BLOCK_N, BLOCK_K] before dequantizing, as ``_dequant_tile`` does for the forward).

How: the loaded [BLOCK_N, words] tile is transposed first (a register relabelling, no data
movement), and every element-wise step (code -> float, NF4 table, scale, bias, rounding to the
activation dtype) runs on the packed shape [pairs, chunks, BLOCK_N], the even and the odd code of
each pair kept apart. With the rows as the fastest dim the compiler spreads rows over lanes and keeps
the pairs of a word in one thread's registers (pairs as the last dim put 4-16 lanes on each word,
each reading it again), so each thread reads its words once and loads the scale and bias of few rows (once per row and group, broadcast over whole chunks:
a chunk is what one word, or for INT3 one 3-word plane set, holds: 8 columns for INT4/NF4, 16 for
INT2, 32 for INT3; with ``INT2_HALVES``, the sm_80 choice, each half of an INT2 word is a chunk of
8 columns, the shape INT4 has). INT3 first rebuilds, per half chunk, two INT4-like words from the
bit planes (the high-bit plane spread once, ``_spread_bits``), so each code costs a shift and a mask
as in INT4 (masked in place, no bit-field extract: ``_scaled_code``). Then ``tl.join`` of the two
rounded halves, a permute to [k, n] and the reshape to [BLOCK_K, BLOCK_N]. Triton hoists the MMA
operand's layout conversion up through element-wise ops to the first op it cannot see through; the
join after the rounding is that op, so the conversion (an STSM/LDSM pair on sm_90) moves 16-bit
values. Estimates before/after are in
docs/kernels.md, "Input gradient, round 2" .. "round 4" (round 4: the words loaded one N tile ahead
by inline PTX, ``_words_t`` / ``_int3_planes_t`` / ``_ld_nc``, not through shared memory).

Rounding: ŵ is computed in fp32 exactly as ``_dequant_tile`` does (s·(q − 2^(b−1)) + c, or
NF4[q]·absmax) and rounded once to the activation dtype. The result is bit identical to
``_dequant_tile(...).to(dtype)``. Except: NF4 with fp16/bf16 (round 21) takes the forward's half2
lookup (``nf4_tile._nf4_half_pair``: ŵ = round_act(NF4_a[q]·absmax_a), as the forward rounds it)
on the same packed shape.

Round 7, ``HALF2`` (INT2/3/4 with fp16/bf16 activations; the GEMM input gradients use it): the same
packed shape, but each pair (even, odd column) of a row is decoded in one 32-bit register by the
decode path's half2 arithmetic (:func:`_pair_half2`, PTX :func:`pair_asm_t`):

    v = prmt(A, B, j | (4 + j) << 8)         byte j of A / of B at the bottom of the low / high half
    v = (v & MASK·0x10001) | MAGIC·0x10001    LOP3: each half = MAGIC_VALUE + q, exact
    v = v·1 − (MAGIC_VALUE + m)               HFMA2: q − m, exact
    ŵ = v·s + c                               HFMA2: s·(q − m) + c in (s, s), (c, c), rounded once

A is the word shifted so that the pair's byte offset is 0 and B that shifted by BITS more (INT3: the
half chunk's even / odd nibble words, :func:`_int3_nibble_words`), so the shifts are shared by the
pairs of a word; the selector j is a constant per register. The int32 result is split into its two
16-bit halves and joined exactly as the fp32 path's rounded values are (the join stays the op the
layout conversion hoists to: 16-bit values through shared memory). Numerics: the decode path's,
ŵ = round_act(s_a·(q − m) + c_a) with s_a, c_a the scale and bias rounded to the activation dtype
first (:func:`_half2_pair`: a move when they are stored in it, the usual case; else one
``cvt.rn.{f16x2,bf16x2}.f32``, e.g. fp16 scales under bf16 activations or QA-LoRA's fp32 folded
biases). Bit identical to the fp32 path whenever s and c are stored in the activation dtype and
the fp32 sum is exact. Estimates: docs/kernels.md "Input gradient, half2 transposed decoder (round 7)".

Group sizes that are not a power of two, or smaller than a chunk, take the forward's tile and
transpose it (correct, not faster).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode_tile import _absmax_half2, _act_consts, _half2_bits, _neg_magic
from .nf4_tile import NF4_SHUFFLE, _absmax_nc, _nf4_half_pair, _nf4_pair_values, _round_act
from .ptx_loads import _ld_nc
from .quant_tile import _dequant_tile, _group_params, _load_int3_planes


@triton.jit
def _spread_bits(x):
    """Bit b of ``x`` (b < 16, higher bits 0) moved to bit 2b, the other bits 0."""
    x = (x | (x << 8)) & 0x00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F
    x = (x | (x << 2)) & 0x33333333
    return (x | (x << 1)) & 0x55555555


@triton.jit
def _int3_nibble_words(low_plane, high_bits):
    """INT3 half chunk -> (even, odd): nibble q (bits 4q .. 4q+2) of ``even`` is the code of the
    half's column 2q, of ``odd`` column 2q + 1. ``low_plane``: the half's low-2-bit word (column i
    at bits 2i, 2i+1); ``high_bits``: the half's 16 high bits (column i at bit i)."""
    spread = _spread_bits(high_bits)  # column i's high bit at 2i: 4q (even i = 2q), 4q + 2 (odd)
    even = (low_plane & 0x33333333) | ((spread << 2) & 0x44444444)
    odd = ((low_plane >> 2) & 0x33333333) | (spread & 0x44444444)
    return even, odd


@triton.jit
def _scaled_code(word, pos, e, BITS: tl.constexpr, K=0):
    """(v, f) for the BITS-bit code q at bit ``pos`` of ``word``: v = 2^e·(q − 2^(BITS−1)) in fp32,
    exactly, and f = 2^-e (shaped like ``e``); 0 <= e <= pos, e + BITS <= 23.

    The code is masked *where it lies* in ``word >> (pos − e)`` (q·2^e as an integer, < 2^23) and the
    exponent of 2^23 ORed over it: the float 2^23 + q·2^e (mantissa ulp 1); one FADD subtracts
    2^23 + 2^(BITS−1)·2^e, both exact. The masked field is not at bit 0 (e > 0 whenever the word
    is shifted), so the compiler cannot turn shift-and-mask into a bit-field extract, which ptxas
    issues as two instructions before the OR (three per code; here one shift, often shared by the
    pair's two codes, and one LOP3). The caller multiplies the scale by f: s·2^-e·2^e·(q − MID) is the
    same exact product as s·(q − MID), so ŵ rounds identically, whenever s·2^-e is exact: every fp16
    and bf16 scale (e <= 8); the caller multiplies v by f instead for fp32 scales. ``K`` (the caller's, ≥ 0): the OR's constant is 0x4B000000 | (K >> 31),
    a value ptxas cannot rematerialize, so it stays in one register with the mask as the LOP3's
    immediate; with two literal constants ptxas reloaded one of them before every LOP3 (an IMAD.MOV
    per code: 47 → 19 IMAD per iteration, int4g128 sm_90)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = 1 << (BITS - 1)
    mask = tl.full(e.shape, MASK, tl.int32) << e
    mid = tl.full(e.shape, MID, tl.int32) << e
    magic = (K >> 31) | 0x4B000000  # = 0x4B000000 (K >= 0), see above
    v = (((word >> (pos - e)) & mask) | magic).to(tl.float32, bitcast=True)
    v = v - (mid | 0x4B000000).to(tl.float32, bitcast=True)
    f = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return v, f


@triton.jit
def _absmax_t(s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg, offs_n, offs_g, G,
              DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, PAIRED: tl.constexpr = False):
    """NF4's fp32 absmax of rows ``offs_n`` and groups ``offs_g`` (0 past G unless EVEN_K), transposed:
    [len(offs_g), len(offs_n)], each thread its own rows' values (the transposed tile's layout), loaded
    by :func:`qlk.kernels.nf4_tile._absmax_nc` (ASM: inline PTX). PAIRED: the buffer's int32
    activation-dtype pairs as loaded (``weight_args(pair_act=...)``; not with DOUBLE_QUANT)."""
    if EVEN_K:
        g = offs_g
    else:
        g = tl.minimum(offs_g, G - 1)
    idx = g[:, None] * stride_sg + offs_n[None, :] * stride_sn
    if PAIRED:
        tl.static_assert(not DOUBLE_QUANT)
        absmax = _ld_nc(s_ptr + idx, ASM)
        if not EVEN_K:
            absmax = tl.where((offs_g < G)[:, None], absmax, 0)
    else:
        absmax = _absmax_nc(s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, idx, DOUBLE_QUANT, ASM)
        if not EVEN_K:
            absmax = tl.where((offs_g < G)[:, None], absmax, 0.0)
    return absmax


@triton.jit
def _words_t(qw_ptr, stride_qn, offs_n, k0, K, BITS: tl.constexpr, IS_NF4: tl.constexpr, EVEN_K: tl.constexpr,
             BLOCK_K: tl.constexpr, AHEAD: tl.constexpr, ASM: tl.constexpr):
    """The packed words of columns k0 .. k0+BLOCK_K of rows ``offs_n``, transposed: [BLOCK_K // PER, len(offs_n)]
    int32 (PER codes a word: INT2/INT4/NF4, not INT3); words past the row's last read 0 unless EVEN_K.

    AHEAD (the input gradient's loop, which loads them one N tile ahead): pointers built transposed and
    loaded by :func:`_ld_nc` (ASM on a GPU: ``ld.global.nc.b32`` in inline PTX, which Triton's pipeliner
    cannot see, so the words are not staged through shared memory, cp.async 4 B + LDS 4 B a word, and
    the load takes the layout the unpacking wants: each thread its own words, no layout conversion).
    Not AHEAD: ``tl.load`` of the [rows, words] tile and ``tl.trans``, the same values."""
    PER: tl.constexpr = 8 if IS_NF4 else 32 // BITS
    NW: tl.constexpr = BLOCK_K // PER
    offs_w = k0 // PER + tl.arange(0, NW)
    if AHEAD:
        # clamped to the row's last word (always in bounds), zeroed below: inline asm takes no mask
        row = qw_ptr + offs_n[None, :] * stride_qn + k0 // PER
        if EVEN_K:
            words = _ld_nc(row + tl.arange(0, NW)[:, None], ASM)
        else:
            last = tl.cdiv(K, PER) - 1
            words = _ld_nc(row + (tl.minimum(offs_w, last) - k0 // PER)[:, None], ASM)
            words = tl.where(offs_w[:, None] <= last, words, 0)
    else:
        ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :]
        if EVEN_K:
            words = tl.load(ptrs)
        else:
            words = tl.load(ptrs, mask=offs_w[None, :] < tl.cdiv(K, PER), other=0)
        words = tl.trans(words)
    return words


@triton.jit
def _int3_planes_t(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
                   AHEAD: tl.constexpr, ASM: tl.constexpr):
    """INT3: :func:`qlk.kernels.quant_tile._load_int3_planes` transposed, three [BLOCK_K // 32, len(offs_n)]
    tiles; AHEAD, ASM: as in :func:`_words_t`."""
    if AHEAD:
        NC: tl.constexpr = BLOCK_K // 32
        row = qw_ptr + offs_n[None, :] * stride_qn + 3 * (k0 // 32)
        if EVEN_K:
            off = 3 * tl.arange(0, NC)[:, None]
        else:
            offs_c = k0 // 32 + tl.arange(0, NC)
            last = tl.cdiv(K, 32) - 1
            off = 3 * (tl.minimum(offs_c, last) - k0 // 32)[:, None]
        w0 = _ld_nc(row + off, ASM)
        w1 = _ld_nc(row + off + 1, ASM)
        w2 = _ld_nc(row + off + 2, ASM)
        if not EVEN_K:
            w0 = tl.where(offs_c[:, None] <= last, w0, 0)
            w1 = tl.where(offs_c[:, None] <= last, w1, 0)
            w2 = tl.where(offs_c[:, None] <= last, w2, 0)
    else:
        w0, w1, w2 = _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K)
        w0 = tl.trans(w0)
        w1 = tl.trans(w1)
        w2 = tl.trans(w2)
    return w0, w1, w2


@triton.jit
def _packed_values(qw_ptr, lut_ptr, stride_qn, offs_n, k0, K,
                   BITS: tl.constexpr, IS_NF4: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT2_HALVES: tl.constexpr,
                   words_pre, words_pre1, words_pre2, PRELOADED: tl.constexpr):
    """fp32 values before scaling, q − 2^(b−1) (INT) or NF4[q] (NF4), of columns k0 .. k0+BLOCK_K of
    rows ``offs_n``, as two tensors (even, odd) of the packed shape [C // 2, BLOCK_K // C, BLOCK_N]
    (C: the chunk width): element [p, c, n] of ``even`` is column k0 + C·c + 2·p, of ``odd`` the next
    column. Columns past K (unless EVEN_K) read code 0. PRELOADED: ``words_pre`` is the tile of
    :func:`_words_t` (INT2/INT4/NF4), or ``words_pre`` .. ``words_pre2`` the planes of
    :func:`_int3_planes_t` (INT3); else the words are loaded here."""
    if IS_NF4:
        # bytes of a word are little endian; the even element sits in the HIGH nibble of its byte
        if PRELOADED:
            words = words_pre
        else:
            words = _words_t(qw_ptr, stride_qn, offs_n, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_K, False, False)
        shifted = words[None, :, :] >> (tl.arange(0, 4)[:, None, None] * 8)
        if NF4_SHUFFLE:  # the forward's register-table lookup (qlk.kernels.nf4_tile)
            even, odd = _nf4_pair_values(shifted)
        else:
            pair = tl.load(lut_ptr + (shifted & 0xFF))  # nf4_byte_table: NF4[b >> 4] low 32 bits, NF4[b & 15] high
            even = pair.to(tl.int32).to(tl.float32, bitcast=True)
            odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        one = tl.full((4, 1, 1), 1.0, tl.float32)
        return even, odd, one, one
    else:
        # each code as (word, bit position); _scaled_code turns it into 2^e·(q − MID) without a bit-field
        # extract, the caller scales by 2^-e (see there)
        if BITS == 3:
            # chunk c = 3 words: word 3c+h holds the low 2 bits of column 32c+16h+i at bit 2i,
            # word 3c+2 the high bit of column 32c+i at bit i
            if PRELOADED:
                w0, w1, w2 = words_pre, words_pre1, words_pre2
            else:
                w0, w1, w2 = _int3_planes_t(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K, False, False)
            # rebuild two INT4-like words per half h: nibble q of even_h / odd_h is the 3-bit code
            # of column 16h + 2q / 16h + 2q + 1, so each code costs one shift and one mask like INT4
            # (extracting low and high bits per pair cost ~5 integer ops per code)
            even0, odd0 = _int3_nibble_words(w0, w2 & 0xFFFF)
            even1, odd1 = _int3_nibble_words(w1, (w2 >> 16) & 0xFFFF)
            p = tl.arange(0, 16)[:, None, None]
            nib = (p % 8) * 4
            e = tl.minimum(nib, 4)
            qf, ff = _scaled_code(tl.where(p < 8, even0[None, :, :], even1[None, :, :]), nib, e, BITS, K)
            qs, fs = _scaled_code(tl.where(p < 8, odd0[None, :, :], odd1[None, :, :]), nib, e, BITS, K)
        else:
            if PRELOADED:
                words = words_pre
            else:
                words = _words_t(qw_ptr, stride_qn, offs_n, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_K, False, False)
            if BITS == 2 and INT2_HALVES:
                # each half word (8 columns) as its own chunk, the shape INT4 has: [4, 2·words, rows]
                # (sm_80: 16 codes of a word in one thread's registers made ptxas copy the mma.sync
                # A fragments into place, 256 moves per iteration)
                PER: tl.constexpr = 32 // BITS
                NW: tl.constexpr = BLOCK_K // PER
                pos = tl.arange(0, 4)[:, None, None, None] * 4 + tl.arange(0, 2)[None, None, :, None] * 16
                pos = tl.reshape(tl.broadcast_to(pos, (4, NW, 2, 1)), (4, 2 * NW, 1))
                ww = tl.reshape(tl.broadcast_to(words[None, :, None, :], (4, NW, 2, BLOCK_N)), (4, 2 * NW, BLOCK_N))
                # e by pair only (the scale factor must not depend on the chunk): the first code of
                # the upper half is extracted from bit 0 after a shift of 16
                e = tl.where(tl.arange(0, 4)[:, None, None] == 0, 0, BITS)
                qf, ff = _scaled_code(ww, pos, e, BITS, K)
                qs, fs = _scaled_code(ww, pos + BITS, e + BITS, BITS, K)
            else:
                pos = tl.arange(0, 32 // BITS // 2)[:, None, None] * (2 * BITS)
                e = tl.minimum(pos, BITS)  # the pair's two codes share one shift, pos − e
                qf, ff = _scaled_code(words[None, :, :], pos, e, BITS, K)
                qs, fs = _scaled_code(words[None, :, :], pos + BITS, e + BITS, BITS, K)
        return qf, qs, ff, fs


# ------------------------------------------------------------------------------------------------
# Round 7: the half2 arithmetic on the packed shape (INT2/3/4, fp16/bf16 activations)
# ------------------------------------------------------------------------------------------------
def pair_asm_t(bits: int, act: str) -> str:
    """PTX of one invocation (pack=1) of the transposed half2 decoder: $0 = int32 holding the pair's
    two weights in the act dtype (the even column in the low half, the odd one in the high half);
    $1, $2 = int32 words A, B; $3 = selector S = j | (4 + j) << 8 (j in 0..3); $4, $5 = (s, s),
    (c, c) packed in the act dtype. The even code is the low ``bits`` bits of byte j of A, the odd
    code those of byte j of B (INT3: 3 bits, its nibble words). One PRMT puts the two bytes at the
    bottom of the two halves, then decode_tile's LOP3 magic and two HFMA2:
    ŵ = fma.rn(q − m, s, c), q − m exact."""
    magic, value, one, fma = _act_consts(act)
    mask = (1 << bits) - 1
    neg = _neg_magic(act, value + (1 << (bits - 1)))
    return ("{\n"
            ".reg .b32 v, one, neg;\n"
            "prmt.b32 v, $1, $2, $3;\n"  # byte 0 = byte j of A, byte 2 = byte j of B
            f"lop3.b32 v, v, {mask * 0x10001:#010x}, {magic * 0x10001:#010x}, 0xea;\n"
            f"mov.b32 one, {one * 0x10001:#010x};\n"
            f"mov.b32 neg, {neg * 0x10001:#010x};\n"
            f"{fma} v, v, one, neg;\n"
            f"{fma} $0, v, $4, $5;\n"
            "}")


def pair_asm_t_nibbles(act: str) -> str:
    """PTX of one invocation (pack=1) of the INT3 transposed half2 decoder, which reads a pair's two
    3-bit codes at bit 0 *or* bit 4 of byte j of A and B (the nibble words of
    :func:`_int3_nibble_words`, unshifted): $1, $2 = A, B; $3 = the selector of :func:`pair_asm_t`;
    $4 = the mask (M, M) with M = 0x7 or 0x70; $5, $6 = (u, u), (−n, −n) in the act dtype: u = 1 and
    n = MAGIC_VALUE + 4 for a low nibble, u = 1/16 and n = MAGIC_VALUE/16 + 4 for a high one; $7,
    $8 = (s, s), (c, c). The masked field is MAGIC_VALUE + q or MAGIC_VALUE + 16q exactly, and
    fma(v, u, −n) = q − 4 exactly in both cases (u is a power of two), so
    ŵ = fma.rn(q − 4, s, c) as in :func:`pair_asm_t`. The high nibble costs no shift: the mask and
    the two constants are per pair position, held in registers across the loop."""
    magic, _, _, fma = _act_consts(act)
    return ("{\n"
            ".reg .b32 v;\n"
            "prmt.b32 v, $1, $2, $3;\n"
            f"lop3.b32 v, v, $4, {magic * 0x10001:#010x}, 0xea;\n"
            f"{fma} v, v, $5, $6;\n"
            f"{fma} $0, v, $7, $8;\n"
            "}")


def nibble_consts(act: str, high: bool) -> tuple[int, int, int]:
    """(mask, (u, u), (−n, −n)) of :func:`pair_asm_t_nibbles` for a low or high nibble, as int32 bit
    patterns (the act dtype's 16-bit values in both halves)."""
    import numpy as np

    _, value, one, _ = _act_consts(act)
    if high:
        if act == "fp16":
            u = int(np.array(1 / 16, dtype=np.float16).view(np.uint16))
        else:
            u = 0x3D80  # bf16 1/16
        return 0x00700070, u * 0x10001, _neg_magic(act, value // 16 + 4) * 0x10001
    return 0x00070007, one * 0x10001, _neg_magic(act, value + 4) * 0x10001


ASM_T_NIB_F16: tl.constexpr = tl.constexpr(pair_asm_t_nibbles("fp16"))
ASM_T_NIB_BF16: tl.constexpr = tl.constexpr(pair_asm_t_nibbles("bf16"))
NIB_MASK_LO: tl.constexpr = tl.constexpr(nibble_consts("fp16", False)[0])
NIB_MASK_HI: tl.constexpr = tl.constexpr(nibble_consts("fp16", True)[0])
NIB_F16_U_LO: tl.constexpr = tl.constexpr(nibble_consts("fp16", False)[1])
NIB_F16_U_HI: tl.constexpr = tl.constexpr(nibble_consts("fp16", True)[1])
NIB_F16_N_LO: tl.constexpr = tl.constexpr(nibble_consts("fp16", False)[2])
NIB_F16_N_HI: tl.constexpr = tl.constexpr(nibble_consts("fp16", True)[2])
NIB_BF16_U_LO: tl.constexpr = tl.constexpr(nibble_consts("bf16", False)[1])
NIB_BF16_U_HI: tl.constexpr = tl.constexpr(nibble_consts("bf16", True)[1])
NIB_BF16_N_LO: tl.constexpr = tl.constexpr(nibble_consts("bf16", False)[2])
NIB_BF16_N_HI: tl.constexpr = tl.constexpr(nibble_consts("bf16", True)[2])

ASM_T_F16_B2: tl.constexpr = tl.constexpr(pair_asm_t(2, "fp16"))
ASM_T_F16_B3: tl.constexpr = tl.constexpr(pair_asm_t(3, "fp16"))
ASM_T_F16_B4: tl.constexpr = tl.constexpr(pair_asm_t(4, "fp16"))
ASM_T_BF16_B2: tl.constexpr = tl.constexpr(pair_asm_t(2, "bf16"))
ASM_T_BF16_B3: tl.constexpr = tl.constexpr(pair_asm_t(3, "bf16"))
ASM_T_BF16_B4: tl.constexpr = tl.constexpr(pair_asm_t(4, "bf16"))


@triton.jit
def _like(x, ref):
    """``x`` broadcast to the common shape of ``x`` and ``ref`` (an asm operand list must agree)."""
    x, _ = tl.broadcast(x, ref)
    return x


@triton.jit
def _half2_pair(x, ACT: tl.constexpr, ASM: tl.constexpr):
    """int32 holding ``x`` rounded to ACT (fp16/bf16) in both 16-bit halves: (x, x), the asm's
    packed scale or bias. ``x`` in its stored dtype: ACT itself is a move; another dtype is
    converted through fp32 (exact from fp16/bf16) and rounded to nearest even, with ASM by one
    ``cvt.rn.{f16x2,bf16x2}.f32`` (ptxas turns a direct fp16 -> bf16 cvt into F2F, a
    quarter-rate conversion, 8 a loop iteration at BLOCK_K 128)."""
    if x.dtype == ACT:
        h = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        pair = h | (h << 16)
    elif ASM:
        if ACT == tl.float16:
            pair = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,r", [x.to(tl.float32)],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            tl.static_assert(ACT == tl.bfloat16)
            pair = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [x.to(tl.float32)],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        h = x.to(tl.float32).to(ACT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        pair = h | (h << 16)
    return pair


@triton.jit
def _pair_half2(a, b, sel, s2, c2, ACT: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32: the low half = s·(q_a − 2^(BITS−1)) + c, the high half the same for q_b, computed in
    ACT (fp16/bf16), q_a / q_b = the low BITS bits of byte j = sel & 0xFF of ``a`` / ``b`` (``sel``:
    int32 j | (4 + j) << 8, the asm's PRMT selector); ``s2``, ``c2``: (s, s), (c, c) packed in ACT
    (:func:`_half2_pair`). All int32, broadcastable.
    ASM: :func:`pair_asm_t` in inline PTX (fma.rn: rounded once); else the Triton twin (fp32
    s·q + c, then rounded once: the same value whenever the fp32 sum is exact, e.g. fp16 s and c
    of similar magnitude)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = 1 << (BITS - 1)
    if ASM:
        a = _like(_like(_like(_like(a, b), sel), s2), c2)  # every operand at the common shape
        b, sel, s2, c2 = _like(b, a), _like(sel, a), _like(s2, a), _like(c2, a)
        if ACT == tl.float16:
            if BITS == 2:
                r = tl.inline_asm_elementwise(ASM_T_F16_B2, "=r,r,r,r,r,r", [a, b, sel, s2, c2], dtype=tl.int32,
                                              is_pure=True, pack=1)
            elif BITS == 3:
                r = tl.inline_asm_elementwise(ASM_T_F16_B3, "=r,r,r,r,r,r", [a, b, sel, s2, c2], dtype=tl.int32,
                                              is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise(ASM_T_F16_B4, "=r,r,r,r,r,r", [a, b, sel, s2, c2], dtype=tl.int32,
                                              is_pure=True, pack=1)
        else:
            tl.static_assert(ACT == tl.bfloat16)
            if BITS == 2:
                r = tl.inline_asm_elementwise(ASM_T_BF16_B2, "=r,r,r,r,r,r", [a, b, sel, s2, c2], dtype=tl.int32,
                                              is_pure=True, pack=1)
            elif BITS == 3:
                r = tl.inline_asm_elementwise(ASM_T_BF16_B3, "=r,r,r,r,r,r", [a, b, sel, s2, c2], dtype=tl.int32,
                                              is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise(ASM_T_BF16_B4, "=r,r,r,r,r,r", [a, b, sel, s2, c2], dtype=tl.int32,
                                              is_pure=True, pack=1)
    else:
        # the asm's operands as it reads them: the PRMT's byte 0 (low half) is byte sel & 7 of the
        # 8 bytes B:A, its byte 2 (high half) byte (sel >> 8) & 7; the low half of s2 / c2 scales
        # the low half, the high half the high one (a wrong selector or packing fails here too)
        i_lo = sel & 7
        i_hi = (sel >> 8) & 7
        q_lo = (tl.where(i_lo < 4, a, b) >> (8 * (i_lo & 3))) & MASK
        q_hi = (tl.where(i_hi < 4, a, b) >> (8 * (i_hi & 3))) & MASK
        r = _twin_pair(q_lo, q_hi, s2, c2, MID, ACT)
    return r


@triton.jit
def _twin_pair(q_lo, q_hi, s2, c2, MID: tl.constexpr, ACT: tl.constexpr):
    """The Triton twins' arithmetic: s·(q − MID) + c in fp32 for the low half's code with the low
    halves of the packed (s, s), (c, c) and the same for the high half, each rounded once to ACT,
    packed as the asm packs its result (the low half's weight in bits 0-15)."""
    sf = s2.to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    cf = c2.to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    sf_hi = (s2 >> 16).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    cf_hi = (c2 >> 16).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    lo = (sf * (q_lo - MID).to(tl.float32) + cf).to(ACT)
    hi = (sf_hi * (q_hi - MID).to(tl.float32) + cf_hi).to(ACT)
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _pair_half2_nibbles(a, b, sel, hi, s2, c2, ACT: tl.constexpr, ASM: tl.constexpr):
    """:func:`_pair_half2` for INT3's nibble words, unshifted: the pair's codes are bits 0-2 of byte
    j of ``a`` / ``b`` where ``hi`` is 0, bits 4-6 where it is 1 (int32, broadcastable).
    ASM: :func:`pair_asm_t_nibbles`, its mask and (u, u), (−n, −n) picked per pair position; else
    the Triton twin, which reads the mask as the asm does (a wrong mask or selector fails here too)."""
    mask = tl.where(hi != 0, NIB_MASK_HI, NIB_MASK_LO)
    if ACT == tl.float16:
        u = tl.where(hi != 0, NIB_F16_U_HI, NIB_F16_U_LO)
        n = tl.where(hi != 0, NIB_F16_N_HI, NIB_F16_N_LO)
    else:
        tl.static_assert(ACT == tl.bfloat16)
        u = tl.where(hi != 0, NIB_BF16_U_HI, NIB_BF16_U_LO)
        n = tl.where(hi != 0, NIB_BF16_N_HI, NIB_BF16_N_LO)
    if ASM:
        a = _like(_like(_like(_like(_like(_like(_like(a, b), sel), mask), u), n), s2), c2)
        b, sel, mask, u, n = _like(b, a), _like(sel, a), _like(mask, a), _like(u, a), _like(n, a)
        s2, c2 = _like(s2, a), _like(c2, a)
        if ACT == tl.float16:
            r = tl.inline_asm_elementwise(ASM_T_NIB_F16, "=r,r,r,r,r,r,r,r,r", [a, b, sel, mask, u, n, s2, c2],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise(ASM_T_NIB_BF16, "=r,r,r,r,r,r,r,r,r", [a, b, sel, mask, u, n, s2, c2],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        i_lo = sel & 7
        i_hi = (sel >> 8) & 7
        m = mask & 0xFF
        shift = tl.where(m == 0x70, 4, 0)
        q_lo = (((tl.where(i_lo < 4, a, b) >> (8 * (i_lo & 3))) & m) >> shift)
        q_hi = (((tl.where(i_hi < 4, a, b) >> (8 * (i_hi & 3))) & m) >> shift)
        r = _twin_pair(q_lo, q_hi, s2, c2, 4, ACT)
    return r


@triton.jit
def _pair_sources(qw_ptr, stride_qn, offs_n, k0, K, BITS: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT2_HALVES: tl.constexpr,
                  words_pre, words_pre1, words_pre2, PRELOADED: tl.constexpr):
    """(A, B, S) for :func:`_pair_half2` on the packed shape of :func:`_packed_values`: pair [p, c, n]
    (columns k0 + C·c + 2p and the next one of row n) has its even code at byte j of A, its odd code at
    byte j of B, S = j | (4 + j) << 8 (A, B: [C // 2, BLOCK_K // C, BLOCK_N]; S: [C // 2, BLOCK_K // C, 1]).
    The pair p's two codes sit BITS apart in one word (INT3: at the same nibble of the half chunk's
    even and odd nibble words), so A is the word shifted to put the pair's byte offset at 0 and B
    that shifted by BITS more: a shift per word and offset, shared by the pairs of equal offset."""
    if BITS == 3:
        if PRELOADED:
            w0, w1, w2 = words_pre, words_pre1, words_pre2
        else:
            w0, w1, w2 = _int3_planes_t(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K, False, False)
        even0, odd0 = _int3_nibble_words(w0, w2 & 0xFFFF)
        even1, odd1 = _int3_nibble_words(w1, (w2 >> 16) & 0xFFFF)
        p = tl.arange(0, 16)[:, None, None]  # pair p: half p // 8, nibble q = p % 8 (byte q // 2)
        # unshifted: the nibble (p % 2) is the decoder's mask (_pair_half2_nibbles), not a shift a word
        a = tl.where(p < 8, even0[None, :, :], even1[None, :, :])
        b = tl.where(p < 8, odd0[None, :, :], odd1[None, :, :])
        j = (p % 8) // 2
        hi = p % 2
    else:
        if PRELOADED:
            words = words_pre
        else:
            words = _words_t(qw_ptr, stride_qn, offs_n, k0, K, BITS, False, EVEN_K, BLOCK_K, False, False)
        if BITS == 4:  # pair p = the two nibbles of byte p
            p = tl.arange(0, 4)[:, None, None]
            a = tl.broadcast_to(words[None, :, :], (4, BLOCK_K // 8, BLOCK_N))
            b = a >> 4
            j = p
            hi = 0
        elif INT2_HALVES:  # chunk = a half word (8 columns): pair p of half h = bits 16h + 4p, +2
            PER: tl.constexpr = 16
            NW: tl.constexpr = BLOCK_K // PER
            p = tl.arange(0, 4)[:, None, None]
            ww = words[None, :, :] >> ((p % 2) * 4)  # [4, NW, BLOCK_N]
            a = tl.reshape(tl.broadcast_to(ww[:, :, None, :], (4, NW, 2, BLOCK_N)), (4, 2 * NW, BLOCK_N))
            b = a >> 2
            jh = p[:, :, :, None] // 2 + 2 * tl.arange(0, 2)[None, None, :, None]  # [4, 1, 2, 1]
            j = tl.reshape(tl.broadcast_to(jh, (4, NW, 2, 1)), (4, 2 * NW, 1))
            hi = 0
        else:  # INT2, 16-column chunks: pair p = bits 4p, 4p + 2 (byte p // 2)
            p = tl.arange(0, 8)[:, None, None]
            a = words[None, :, :] >> ((p % 2) * 4)
            b = a >> 2
            j = p // 2
            hi = 0
    return a, b, j | ((4 + j) << 8), hi


@triton.jit
def _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                    stride_qn, stride_sn, stride_sg,
                    offs_n, k0, K,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr, INT2_HALVES: tl.constexpr = False,
                    words_pre=0, words_pre1=0, words_pre2=0, PRELOADED: tl.constexpr = False,
                    LOAD_ASM: tl.constexpr = False, HALF2: tl.constexpr = False, HALF2_ASM: tl.constexpr = False,
                    ABSMAX_PAIRED: tl.constexpr = False):
    """Ŵᵀ[k0 : k0 + BLOCK_K, offs_n] ([BLOCK_K, BLOCK_N]) in OUT_DTYPE, = ``tl.trans(_dequant_tile(...)
    .to(OUT_DTYPE))`` bit for bit (NF4 with fp16/bf16: the forward's half2 rounding, module
    docstring). Same contract: k0 a multiple of BLOCK_K, rows ``offs_n`` all valid (clamped by the
    caller), columns >= K exactly 0 unless EVEN_K.

    PRELOADED (the input-gradient GEMM on sm_90 loads one N tile ahead): ``words_pre`` holds this
    tile's words, :func:`_words_t` of the same rows and k0 (INT3: ``words_pre`` .. ``words_pre2``, the
    planes of :func:`_int3_planes_t`); INT scales and biases then loaded by :func:`_ld_nc`, each
    thread its own rows' values, by inline PTX with LOAD_ASM (never under the interpreter).

    HALF2 (INT2/3/4 with an fp16/bf16 OUT_DTYPE; ignored otherwise): the half2 arithmetic of
    :func:`_pair_half2` instead of the fp32 one, ŵ = round_act(s_a·(q − m) + c_a) with s_a, c_a the
    group's scale and bias rounded to OUT_DTYPE first (exact when stored in it; the decode path's
    rounding, not bit identical to ``_dequant_tile`` when they are not). HALF2_ASM: its inline
    PTX (a GPU), else its Triton twin (the interpreter).

    ABSMAX_PAIRED (round 26, ``weight_args(pair_act=OUT_DTYPE)``): NF4's absmax buffer holds OUT_DTYPE
    pairs, the half2 lookup's operand as loaded (NF4 with fp16/bf16 and power-of-two blocks only)."""
    CHUNK: tl.constexpr = 32 if (BITS == 3 and not IS_NF4) else (16 if (BITS == 2 and not IS_NF4 and not INT2_HALVES) else 8)
    POW2: tl.constexpr = (GROUP_SIZE & (GROUP_SIZE - 1)) == 0
    NF4_HALF: tl.constexpr = IS_NF4 and (OUT_DTYPE == tl.float16 or OUT_DTYPE == tl.bfloat16)
    tl.static_assert(not ABSMAX_PAIRED or (NF4_HALF and POW2 and GROUP_SIZE >= CHUNK and BLOCK_K % CHUNK == 0))
    if NF4_HALF and POW2 and GROUP_SIZE >= CHUNK and BLOCK_K % CHUNK == 0:
        # round 21: the forward's half2 lookup (nf4_tile._nf4_half_pair), the same rounding as the
        # forward; the even and odd values joined after it as the fp32 path's are
        if PRELOADED:
            words = words_pre
        else:
            words = _words_t(qw_ptr, stride_qn, offs_n, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_K, False, False)
        NCH_H: tl.constexpr = BLOCK_K // 8
        NG_H: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NG_H)
        # each thread its own rows' absmax, by inline PTX on a GPU (the lookup's asm needs one anyway)
        absmax_t = _absmax_t(s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg, offs_n, offs_g,
                             K // GROUP_SIZE, DOUBLE_QUANT, EVEN_K, NF4_SHUFFLE, ABSMAX_PAIRED)
        s2 = _absmax_half2(absmax_t, OUT_DTYPE, ABSMAX_PAIRED)[None, :, None, :]  # [1, NG, 1, BLOCK_N]
        shifted = words[None, :, :] >> (tl.arange(0, 4)[:, None, None] * 8)  # [byte, chunk, BLOCK_N]
        ev, od = _nf4_half_pair(tl.reshape(shifted, (4, NG_H, NCH_H // NG_H, BLOCK_N)), s2, lut_ptr, OUT_DTYPE)
        w = tl.join(ev, od)  # [4, NG, NCH/NG, BLOCK_N, 2]
        wt = tl.reshape(tl.permute(w, (1, 2, 0, 4, 3)), (BLOCK_K, BLOCK_N))
    elif POW2 and GROUP_SIZE >= CHUNK and BLOCK_K % CHUNK == 0:
        HAS_BIAS: tl.constexpr = not IS_NF4
        USE_HALF2: tl.constexpr = HALF2 and not IS_NF4 and (OUT_DTYPE == tl.float16 or OUT_DTYPE == tl.bfloat16)
        G = K // GROUP_SIZE
        if USE_HALF2:
            ev, od, sel, nib = _pair_sources(qw_ptr, stride_qn, offs_n, k0, K, BITS, EVEN_K, BLOCK_N, BLOCK_K,
                                             INT2_HALVES, words_pre, words_pre1, words_pre2, PRELOADED)
            fe, fo = 0, 0
        else:
            ev, od, fe, fo = _packed_values(qw_ptr, lut_ptr, stride_qn, offs_n, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_N,
                                            BLOCK_K, INT2_HALVES, words_pre, words_pre1, words_pre2, PRELOADED)
        NCH: tl.constexpr = BLOCK_K // CHUNK
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
        if PRELOADED and not IS_NF4:
            # each thread loads the scales and biases of its own rows (several groups a tile: the
            # loaded [rows, groups] tile no longer goes through shared memory to the rows' threads)
            # one 64-bit row offset per row, the groups as constant offsets from it (stride_sg is
            # specialized to 1 in the usual layout; clamped only for a ragged K)
            row = offs_n[None, :] * stride_sn + (k0 // GROUP_SIZE) * stride_sg
            if EVEN_K:
                g_off = tl.arange(0, NG)[:, None] * stride_sg
            else:
                g_off = (tl.minimum(offs_g, G - 1) - k0 // GROUP_SIZE)[:, None] * stride_sg
            s = _ld_nc(s_ptr + row + g_off, LOAD_ASM)
            b = _ld_nc(b_ptr + row + g_off, LOAD_ASM)
            if not USE_HALF2:  # half2: converted by _half2_pair, from the stored dtype
                s = s.to(tl.float32)
                b = b.to(tl.float32)
            if not EVEN_K:
                s = tl.where((offs_g < G)[:, None], s, 0.0)
                b = tl.where((offs_g < G)[:, None], b, 0.0)
            s4 = s[None, :, None, :]
            b4 = b[None, :, None, :]
        else:
            s, b = _group_params(s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                                 offs_n, offs_g[None, :], (offs_g < G)[None, :], IS_NF4, DOUBLE_QUANT, HAS_BIAS,
                                 EVEN_K, USE_HALF2)
            s4 = tl.trans(s)[None, :, None, :]
            b4 = tl.trans(b)[None, :, None, :]
        ev = tl.reshape(ev, (CHUNK // 2, NG, NCH // NG, BLOCK_N))
        od = tl.reshape(od, (CHUNK // 2, NG, NCH // NG, BLOCK_N))
        if USE_HALF2:
            # (even, odd) of a pair in one 32-bit register, computed in half2; split into the two
            # 16-bit halves and joined as the fp32 path's rounded values are (the same join: the
            # layout conversion still moves 16-bit values)
            sel = tl.reshape(tl.broadcast_to(sel, (CHUNK // 2, NCH, 1)), (CHUNK // 2, NG, NCH // NG, 1))
            if BITS == 3:
                nib = tl.reshape(tl.broadcast_to(nib, (CHUNK // 2, NCH, 1)), (CHUNK // 2, NG, NCH // NG, 1))
                r = _pair_half2_nibbles(ev, od, sel, nib, _half2_pair(s4, OUT_DTYPE, HALF2_ASM),
                                        _half2_pair(b4, OUT_DTYPE, HALF2_ASM), OUT_DTYPE, HALF2_ASM)
            else:
                r = _pair_half2(ev, od, sel, _half2_pair(s4, OUT_DTYPE, HALF2_ASM),
                                _half2_pair(b4, OUT_DTYPE, HALF2_ASM), OUT_DTYPE, BITS, HALF2_ASM)
            w = tl.join(r.to(tl.int16).to(OUT_DTYPE, bitcast=True), (r >> 16).to(tl.int16).to(OUT_DTYPE, bitcast=True))
        else:
            # the values are 2^e·(q − MID) (_scaled_code): the scale times 2^-e gives the same exact
            # product when s·2^-e is exact in fp32. fp16 and bf16 scales are multiples of 2^-24 and
            # 2^-133 (subnormals included) and e <= 8, so it always is (NF4: e = 0); an fp32 scale
            # below 2^(e−126) would lose bits, so fp32 scales unscale the codes instead: one more FMUL
            # a code, exact (small integers)
            SCALE_TRICK: tl.constexpr = IS_NF4 or s_ptr.dtype.element_ty != tl.float32
            if SCALE_TRICK:
                se = s4 * tl.reshape(fe, (CHUNK // 2, 1, 1, 1))
                so = s4 * tl.reshape(fo, (CHUNK // 2, 1, 1, 1))
            else:
                ev = ev * tl.reshape(fe, (CHUNK // 2, 1, 1, 1))
                od = od * tl.reshape(fo, (CHUNK // 2, 1, 1, 1))
                se = s4
                so = s4
            if HAS_BIAS:
                ev = ev * se + b4
                od = od * so + b4
            else:
                ev = ev * se
                od = od * so
            # the join comes after the rounding: the compiler hoists the A operand's layout conversion
            # up to the first op it cannot see through, the join, so it moves 16-bit values
            w = tl.join(ev.to(OUT_DTYPE), od.to(OUT_DTYPE))  # [C/2, NG, NCH/NG, BLOCK_N, 2]
        wt = tl.reshape(tl.permute(w, (1, 2, 0, 4, 3)), (BLOCK_K, BLOCK_N))
    else:
        w = _dequant_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                          stride_qn, stride_sn, stride_sg, offs_n, k0, K,
                          BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K).to(OUT_DTYPE)
        wt = tl.trans(w)
    return wt

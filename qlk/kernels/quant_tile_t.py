"""The transposed dequantized tile Ŵᵀ for the input gradient dX = dY·Ŵ, narrowed before any transpose.

Same formats, same documented layouts as :mod:`qlk.kernels.quant_tile` (the module docstring there
and docs/formats.md), and the same float64 oracles in the tests. What differs is *where* the tile
changes layout. The input gradient feeds Ŵᵀ [BLOCK_K, BLOCK_N] as the MMA A operand, whose register
layout pairs neighbouring *rows* n of Ŵ, while a packed word holds neighbouring *columns* k. Some
layout conversion through shared memory is unavoidable in this design; :func:`_dequant_tile_t`
makes sure it moves the finished tile in the activation dtype (2 B per element), not the int32
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
as in INT4. Then ``tl.join`` of the two rounded halves, a permute to [k, n] and the reshape
to [BLOCK_K, BLOCK_N]. Triton hoists the MMA operand's layout conversion up through element-wise
ops to the first op it cannot see through; the join after the rounding is that op, so the
conversion (an STSM/LDSM pair on sm_90) moves 16-bit values. Estimates before/after are in
docs/kernels.md, "Input gradient, round 2".

Rounding: ŵ is computed in fp32 exactly as ``_dequant_tile`` does (s·(q − 2^(b−1)) + c, or
NF4[q]·absmax) and rounded once to the activation dtype, like the forward. The result is bit
identical to ``_dequant_tile(...).to(dtype)``.

Group sizes that are not a power of two, or smaller than a chunk, take the forward's tile and
transpose it (correct, not faster).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .nf4_tile import NF4_SHUFFLE, _nf4_pair_values
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
def _packed_values(qw_ptr, lut_ptr, stride_qn, offs_n, k0, K,
                   BITS: tl.constexpr, IS_NF4: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT2_HALVES: tl.constexpr):
    """fp32 values before scaling, q − 2^(b−1) (INT) or NF4[q] (NF4), of columns k0 .. k0+BLOCK_K of
    rows ``offs_n``, as two tensors (even, odd) of the packed shape [C // 2, BLOCK_K // C, BLOCK_N]
    (C: the chunk width): element [p, c, n] of ``even`` is column k0 + C·c + 2·p, of ``odd`` the next
    column. Columns past K (unless EVEN_K) read code 0."""
    if IS_NF4:
        # bytes of a word are little endian; the even element sits in the HIGH nibble of its byte
        NW: tl.constexpr = BLOCK_K // 8
        offs_w = k0 // 8 + tl.arange(0, NW)
        ptrs = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_w[None, :]
        if EVEN_K:
            words = tl.load(ptrs)
        else:
            words = tl.load(ptrs, mask=offs_w[None, :] < tl.cdiv(K, 8), other=0)
        words = tl.trans(words)
        shifted = words[None, :, :] >> (tl.arange(0, 4)[:, None, None] * 8)
        if NF4_SHUFFLE:  # the forward's register-table lookup (qlk.kernels.nf4_tile)
            even, odd = _nf4_pair_values(shifted)
        else:
            pair = tl.load(lut_ptr + (shifted & 0xFF))  # nf4_byte_table: NF4[b >> 4] low 32 bits, NF4[b & 15] high
            even = pair.to(tl.int32).to(tl.float32, bitcast=True)
            odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return even, odd
    else:
        MASK: tl.constexpr = (1 << BITS) - 1
        if BITS == 3:
            # chunk c = 3 words: word 3c+h holds the low 2 bits of column 32c+16h+i at bit 2i,
            # word 3c+2 the high bit of column 32c+i at bit i
            w0, w1, w2 = _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K)
            w0 = tl.trans(w0)
            w1 = tl.trans(w1)
            w2 = tl.trans(w2)
            # rebuild two INT4-like words per half h: nibble q of even_h / odd_h is the 3-bit code
            # of column 16h + 2q / 16h + 2q + 1, so each code costs one shift and one mask like INT4
            # (extracting low and high bits per pair cost ~5 integer ops per code)
            even0, odd0 = _int3_nibble_words(w0, w2 & 0xFFFF)
            even1, odd1 = _int3_nibble_words(w1, (w2 >> 16) & 0xFFFF)
            p = tl.arange(0, 16)[:, None, None]
            nib = (p % 8) * 4
            first = (tl.where(p < 8, even0[None, :, :], even1[None, :, :]) >> nib) & 7
            second = (tl.where(p < 8, odd0[None, :, :], odd1[None, :, :]) >> nib) & 7
        else:
            PER: tl.constexpr = 32 // BITS
            NW: tl.constexpr = BLOCK_K // PER
            offs_w = k0 // PER + tl.arange(0, NW)
            ptrs = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_w[None, :]
            if EVEN_K:
                words = tl.load(ptrs)
            else:
                words = tl.load(ptrs, mask=offs_w[None, :] < tl.cdiv(K, PER), other=0)
            words = tl.trans(words)
            if BITS == 2 and INT2_HALVES:
                # each half word (8 columns) as its own chunk, the shape INT4 has: [4, 2·words, rows]
                # (sm_80: 16 codes of a word in one thread's registers made ptxas copy the mma.sync
                # A fragments into place, 256 moves per iteration)
                shift = tl.arange(0, 4)[:, None, None, None] * 4 + tl.arange(0, 2)[None, None, :, None] * 16
                quads = words[None, :, None, :] >> shift
                first = tl.reshape(quads & MASK, (4, 2 * NW, BLOCK_N))
                second = tl.reshape((quads >> BITS) & MASK, (4, 2 * NW, BLOCK_N))
            else:
                shift = tl.arange(0, PER // 2)[:, None, None] * (2 * BITS)
                first = (words[None, :, :] >> shift) & MASK
                second = (words[None, :, :] >> (shift + BITS)) & MASK
        MID: tl.constexpr = 1 << (BITS - 1)
        # code -> float through the exponent bits (exact for codes < 2^23), −MID on the same FADD
        qf = (first | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + MID)
        qs = (second | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + MID)
        return qf, qs


@triton.jit
def _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                    stride_qn, stride_sn, stride_sg,
                    offs_n, k0, K,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr, INT2_HALVES: tl.constexpr = False):
    """Ŵᵀ[k0 : k0 + BLOCK_K, offs_n] ([BLOCK_K, BLOCK_N]) in OUT_DTYPE, = ``tl.trans(_dequant_tile(...)
    .to(OUT_DTYPE))`` bit for bit. Same contract: k0 a multiple of BLOCK_K, rows ``offs_n`` all valid
    (clamped by the caller), columns >= K exactly 0 unless EVEN_K."""
    CHUNK: tl.constexpr = 32 if (BITS == 3 and not IS_NF4) else (16 if (BITS == 2 and not IS_NF4 and not INT2_HALVES) else 8)
    POW2: tl.constexpr = (GROUP_SIZE & (GROUP_SIZE - 1)) == 0
    if POW2 and GROUP_SIZE >= CHUNK and BLOCK_K % CHUNK == 0:
        HAS_BIAS: tl.constexpr = not IS_NF4
        G = K // GROUP_SIZE
        ev, od = _packed_values(qw_ptr, lut_ptr, stride_qn, offs_n, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_N, BLOCK_K,
                                INT2_HALVES)
        NCH: tl.constexpr = BLOCK_K // CHUNK
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
        s, b = _group_params(s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                             offs_n, offs_g[None, :], (offs_g < G)[None, :], IS_NF4, DOUBLE_QUANT, HAS_BIAS,
                             EVEN_K)
        s4 = tl.trans(s)[None, :, None, :]
        b4 = tl.trans(b)[None, :, None, :]
        ev = tl.reshape(ev, (CHUNK // 2, NG, NCH // NG, BLOCK_N))
        od = tl.reshape(od, (CHUNK // 2, NG, NCH // NG, BLOCK_N))
        if HAS_BIAS:
            ev = ev * s4 + b4
            od = od * s4 + b4
        else:
            ev = ev * s4
            od = od * s4
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

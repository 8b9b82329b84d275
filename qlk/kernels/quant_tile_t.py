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
as in INT4 (masked in place, no bit-field extract: ``_scaled_code``). Then ``tl.join`` of the two
rounded halves, a permute to [k, n] and the reshape to [BLOCK_K, BLOCK_N]. Triton hoists the MMA
operand's layout conversion up through element-wise ops to the first op it cannot see through; the
join after the rounding is that op, so the conversion (an STSM/LDSM pair on sm_90) moves 16-bit
values. Estimates before/after are in
docs/kernels.md, "Input gradient, round 2" .. "round 4" (round 4: the words loaded one N tile ahead
by inline PTX, ``_words_t`` / ``_int3_planes_t`` / ``_ld_nc``, not through shared memory).

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
def _ld_nc(ptrs, ASM: tl.constexpr):
    """The values at ``ptrs`` (16- or 32-bit elements), no mask (the caller clamps the pointers).
    ASM: by ``ld.global.nc`` in inline PTX: Triton's pipeliner does not see it (nothing staged
    through shared memory) and the compiler gives the load the layout of its users (no layout
    conversion after it). Not ASM (the interpreter, which cannot run asm): ``tl.load``, the same
    values from the same pointers, so the tests check the index math the GPU runs."""
    if not ASM:
        return tl.load(ptrs)
    elif ptrs.dtype.element_ty.primitive_bitwidth == 16:
        return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs],
                                         dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs],
                                         dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)


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
        row = qw_ptr + offs_n[None, :].to(tl.int64) * stride_qn + k0 // PER
        if EVEN_K:
            words = _ld_nc(row + tl.arange(0, NW)[:, None], ASM)
        else:
            last = tl.cdiv(K, PER) - 1
            words = _ld_nc(row + (tl.minimum(offs_w, last) - k0 // PER)[:, None], ASM)
            words = tl.where(offs_w[:, None] <= last, words, 0)
    else:
        ptrs = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_w[None, :]
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
        row = qw_ptr + offs_n[None, :].to(tl.int64) * stride_qn + 3 * (k0 // 32)
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


@triton.jit
def _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                    stride_qn, stride_sn, stride_sg,
                    offs_n, k0, K,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr, INT2_HALVES: tl.constexpr = False,
                    words_pre=0, words_pre1=0, words_pre2=0, PRELOADED: tl.constexpr = False,
                    LOAD_ASM: tl.constexpr = False):
    """Ŵᵀ[k0 : k0 + BLOCK_K, offs_n] ([BLOCK_K, BLOCK_N]) in OUT_DTYPE, = ``tl.trans(_dequant_tile(...)
    .to(OUT_DTYPE))`` bit for bit. Same contract: k0 a multiple of BLOCK_K, rows ``offs_n`` all valid
    (clamped by the caller), columns >= K exactly 0 unless EVEN_K.

    PRELOADED (the input-gradient GEMM on sm_90 loads one N tile ahead): ``words_pre`` holds this
    tile's words, :func:`_words_t` of the same rows and k0 (INT3: ``words_pre`` .. ``words_pre2``, the
    planes of :func:`_int3_planes_t`); INT scales and biases then loaded by :func:`_ld_nc`, each
    thread its own rows' values, by inline PTX with LOAD_ASM (never under the interpreter)."""
    CHUNK: tl.constexpr = 32 if (BITS == 3 and not IS_NF4) else (16 if (BITS == 2 and not IS_NF4 and not INT2_HALVES) else 8)
    POW2: tl.constexpr = (GROUP_SIZE & (GROUP_SIZE - 1)) == 0
    if POW2 and GROUP_SIZE >= CHUNK and BLOCK_K % CHUNK == 0:
        HAS_BIAS: tl.constexpr = not IS_NF4
        G = K // GROUP_SIZE
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
            row = offs_n[None, :].to(tl.int64) * stride_sn + (k0 // GROUP_SIZE) * stride_sg
            if EVEN_K:
                g_off = tl.arange(0, NG)[:, None] * stride_sg
            else:
                g_off = (tl.minimum(offs_g, G - 1) - k0 // GROUP_SIZE)[:, None] * stride_sg
            s = _ld_nc(s_ptr + row + g_off, LOAD_ASM).to(tl.float32)
            b = _ld_nc(b_ptr + row + g_off, LOAD_ASM).to(tl.float32)
            if not EVEN_K:
                s = tl.where((offs_g < G)[:, None], s, 0.0)
                b = tl.where((offs_g < G)[:, None], b, 0.0)
            s4 = s[None, :, None, :]
            b4 = b[None, :, None, :]
        else:
            s, b = _group_params(s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                                 offs_n, offs_g[None, :], (offs_g < G)[None, :], IS_NF4, DOUBLE_QUANT, HAS_BIAS,
                                 EVEN_K)
            s4 = tl.trans(s)[None, :, None, :]
            b4 = tl.trans(b)[None, :, None, :]
        ev = tl.reshape(ev, (CHUNK // 2, NG, NCH // NG, BLOCK_N))
        od = tl.reshape(od, (CHUNK // 2, NG, NCH // NG, BLOCK_N))
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

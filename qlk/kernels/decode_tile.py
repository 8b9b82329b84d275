"""Forward weight tiles: INT-b codes -> fp16/bf16 weights in packed half2 math.

Used by every forward kernel for INT weights with fp16/bf16 activations: the split-K decode loop
(M <= 16), the grouped (MoE) kernels, and since round 7 the large-M GEMM's K loop
(``fused_matmul._fwd_loop``, stored order), so Y rounds the same way whatever kernel M picks.

The split-K decode loop is issue-bound, not DRAM-bound: the fp32 dequantization of
:func:`qlk.kernels.quant_tile._dequant_tile` spends ~6 instructions per weight (SHF, LOP3 with a
re-materialized mask, FADD, FFMA, half an F2FP to pack the pair for the MMA). Here a pair of
weights is produced in one 32-bit register, exactly as the MMA operand holds it (INT2/INT4,
``packed_asm``):

    v = prmt(W_a, W_b, sel)                       byte j_a of W_a, byte j_b of W_b at the bottom of each half
    v = (v & MASK·0x10001) | MAGIC·0x10001        LOP3: each half = float(MAGIC_VALUE + q), exact
    v = v·1 − (MAGIC_VALUE + m)                   HFMA2: q − m, exact (small integers)
    ŵ = v·s + c                                   HFMA2: s·(q − m) + c, rounded once

MAGIC is the 16-bit float whose unit in the last place is 1: fp16 0x6400 (1024), bf16 0x4300 (128),
so OR-ing a code q < 16 into its mantissa gives MAGIC_VALUE + q. The byte selector ``sel`` is one
PRMT of the two elements' per-lane constants S = j | (4 + j) << 8 (the same for every pair of a
lane: ptxas computes it once per loop iteration). In the MMA operand layout lane t holds codes 2p,
2p+1 of a word (its pair p) in one register, so the word itself needs no shift per pair: INT4 pair p
= the two nibbles of byte p, the high one read from byte p of ``word >> 4`` (the bf16 mantissa has 7
bits: a code must sit in bits 0-6, so a nibble at bits 4-7 cannot be masked in place); INT2 pair p =
bits 4p .. 4p+3, byte p // 2 of ``word >> 4(p % 2)`` and of that >> 2. Per pair: one SHF, PRMT,
LOP3, two HFMA2 (5; round 2: two SHF, 6). INT3 (bit planes; round 7) is first rebuilt into code
bytes, once per lane, chunk and element parity (``int3_code_word_asm``: PRMT, SHF, SHF.W, LOP3
shared by the lane's four pairs of a 32-column chunk), then decoded by the same byte asm
(``packed_asm(3, act)``): ~1.75 + 4 instructions per pair instead of ~11 (round 2: the planes
shifted per pair on the Triton side, merged per pair in the asm).

Numerics: ŵ = round_act(s_a·(q − m) + c_a) with s_a, c_a the group scale and bias rounded to the
activation dtype first (exact when they are stored in it, the usual case; QA-LoRA's fp32 folded
biases are rounded once more). NF4 (round 21, :func:`_decode_nf4_tile`): ŵ = round_act(NF4_a[q]·
absmax_a), the table and the absmax rounded first. The fp32 path (fp32 activations, the standalone
``dequantize``, which matches ``QuantizedWeight.dequantize`` bit for bit) rounds s·(q − m) + c (or
NF4[q]·absmax) in fp32, then to the activation dtype: a weight may differ by one unit in the last
place between the two.

Round 4, the dense split-K kernel's tile (:func:`_decode_int_tile_lanes`): in the stored order the
four lanes of a quad each need one byte of every word (4x the shared-memory reads, a PRMT per
pair). Permuting k inside each span of 4 lane units (INT4/INT2: a word, INT3: a 3-word chunk) gives
lane t unit 4c + t whole, and X is read in the same permuted order (:func:`_lane_x_tile`), so the
sum is unchanged and the stored format untouched. A pair is then codes j and j + J of the unit,
the two 16-bit halves of ``word >> bits·j``: LOP3 + 2 HFMA2 per pair (``packed_asm_halves``;
INT3 one more LOP3 to merge the planes, ``packed_asm_int3_halves``). The stored-order tile
(:func:`_decode_int_tile`) stays for the grouped MoE kernel and tiles narrower than the span.

The asm cannot run under the Triton interpreter: ``PACKED=False`` selects a pure-Triton twin with
the same semantics up to fp32 double rounding (the exact value s_a·(q − m) + c_a has at most
~15 significant bits for fp16 inputs of similar magnitude, so the fp32 step is exact there). The
bit-level semantics of the asm are checked on CPU against a numpy model of prmt (immediate and
register selectors) / lop3 / fma.rn.{f16x2,bf16x2} / shl (tests/test_decode_tile.py); the asm
itself is compiled for sm_90 and sm_80 by tests/test_kernel_static.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .nf4_tile import _nf4_half_pair, _round_act
from .quant_tile import _group_params, _load_int3_planes, _load_words

#: 16-bit float magic whose ulp is 1 (codes are OR-ed into its mantissa), its value, and 1.0
F16_MAGIC, F16_MAGIC_VALUE, F16_ONE = 0x6400, 1024, 0x3C00
BF16_MAGIC, BF16_MAGIC_VALUE, BF16_ONE = 0x4300, 128, 0x3F80


def _act_consts(act: str):
    """(16-bit magic, its value, 16-bit 1.0, the half2 FMA) of activation dtype ``act``."""
    if act == "fp16":
        return F16_MAGIC, F16_MAGIC_VALUE, F16_ONE, "fma.rn.f16x2"
    if act == "bf16":
        return BF16_MAGIC, BF16_MAGIC_VALUE, BF16_ONE, "fma.rn.bf16x2"
    raise ValueError(f"act={act!r}; allowed: 'fp16', 'bf16'")


def packed_asm(bits: int, act: str) -> str:
    """PTX of one invocation (pack=2) for INT2/INT4: $0 = two fp16/bf16 weights (a in the low half,
    b in the high half); $1, $2 = int32 words W_a, W_b; $3 = packed int16 selectors (S_a, S_b);
    $4, $5 = packed (s_a, s_b), (c_a, c_b) in the act dtype.

    Element e's code is the low ``bits`` bits of byte j_e of W_e, with S_e = j_e | (4 + j_e) << 8
    (j_e in 0..3): one PRMT built from (S_a, S_b) (per lane, so computed once per iteration) picks the selector,
    a second puts byte j_a of W_a and byte j_b of W_b at the bottom of the two halves."""
    magic, value, one, fma = _act_consts(act)
    mask = (1 << bits) - 1
    mid = 1 << (bits - 1)
    neg = _neg_magic(act, value + mid)
    return ("{\n"
            ".reg .b32 sel, v, one, neg;\n"
            "prmt.b32 sel, $3, $3, 0x0030;\n"  # byte 0 = j_a (S_a's low byte), byte 1 = 4 + j_b (S_b's high byte)
            "prmt.b32 v, $1, $2, sel;\n"  # byte 0 = byte j_a of W_a, byte 2 = byte j_b of W_b
            f"lop3.b32 v, v, {mask * 0x10001:#010x}, {magic * 0x10001:#010x}, 0xea;\n"
            f"mov.b32 one, {one * 0x10001:#010x};\n"
            f"mov.b32 neg, {neg * 0x10001:#010x};\n"
            f"{fma} v, v, one, neg;\n"
            f"{fma} $0, v, $4, $5;\n"
            "}")


def int3_code_word_asm() -> str:
    """PTX of the INT3 rebuild (one invocation per element, pack=1): $0 = a word whose byte j holds
    the element's 3-bit code in bits 0-2 (what ``packed_asm(3, act)`` decodes); $1, $2, $3 = the
    chunk's words w0, w1 (low-2-bit planes of columns 0-15 / 16-31, column i at bits 2i, 2i+1) and
    w2 (high bits, column i at bit i); $4 = a PRMT selector, $5 = a right shift (< 32),
    $6 = a right rotation (mod 32) of w2:

        lm = prmt(w0, w1, $4) >> $5                  low bits of the code at bits 8j, 8j + 1
        h  = rotr(w2, $6)                            its high bit at bit 8j + 2
        $0 = (lm & 0x03030303) | (h & ~0x03030303)   LOP3 bitfield select

    The operands are per lane (``_decode_int_tile``): a lane's four pairs of a chunk share w0..w2
    and the three controls, so ptxas keeps one rebuild per lane, chunk and element parity."""
    return ("{\n"
            ".reg .b32 lm, h;\n"
            "prmt.b32 lm, $1, $2, $4;\n"
            "shr.b32 lm, lm, $5;\n"
            "shf.r.wrap.b32 h, $3, $3, $6;\n"
            "lop3.b32 $0, lm, h, 0x03030303, 0xe4;\n"  # (lm & mask) | (h & ~mask)
            "}")


def _neg_magic(act: str, value: int) -> int:
    """16-bit pattern of −value (an integer below 2^11 (fp16) / 2^8 (bf16): exact)."""
    import struct

    if act == "fp16":
        import numpy as np

        return int(np.array(-float(value), dtype=np.float16).view(np.uint16))
    bits32 = struct.unpack("<I", struct.pack("<f", -float(value)))[0]
    assert bits32 & 0xFFFF == 0, "bf16 magic must be exact"
    return bits32 >> 16


ASM_F16_B2: tl.constexpr = tl.constexpr(packed_asm(2, "fp16"))
ASM_F16_B4: tl.constexpr = tl.constexpr(packed_asm(4, "fp16"))
ASM_BF16_B2: tl.constexpr = tl.constexpr(packed_asm(2, "bf16"))
ASM_BF16_B4: tl.constexpr = tl.constexpr(packed_asm(4, "bf16"))
ASM_F16_B3: tl.constexpr = tl.constexpr(packed_asm(3, "fp16"))
ASM_BF16_B3: tl.constexpr = tl.constexpr(packed_asm(3, "bf16"))
ASM_INT3_WORD: tl.constexpr = tl.constexpr(int3_code_word_asm())


@triton.jit
def _int3_code_word(w0, w1, w2, sel, shift, rot, PACKED: tl.constexpr):
    """int32, elementwise: (prmt(w0, w1, sel) >> shift & 0x03030303) | (rotr(w2, rot) & ~0x03030303)
    (``int3_code_word_asm``; ``sel`` has no sign-replicate bits, shift < 32). PACKED: the inline
    asm (GPU); else its Triton twin, a general model of the four instructions (the kernel's
    operands and any others: tests/test_decode_tile.py checks it against the PTX model)."""
    w0, w1 = tl.broadcast(w0, w1)
    w0, w2 = tl.broadcast(w0, w2)
    w0, sel = tl.broadcast(w0, sel)
    w0, shift = tl.broadcast(w0, shift)
    w0, rot = tl.broadcast(w0, rot)  # w0 now has the common shape
    w1 = tl.broadcast_to(w1, w0.shape)
    w2 = tl.broadcast_to(w2, w0.shape)
    sel = tl.broadcast_to(sel, w0.shape)
    shift = tl.broadcast_to(shift, w0.shape)
    if PACKED:
        word = tl.inline_asm_elementwise(ASM_INT3_WORD, "=r,r,r,r,r,r,r", [w0, w1, w2, sel, shift, rot],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        a = w0.to(tl.uint32, bitcast=True)
        b = w1.to(tl.uint32, bitcast=True)
        lm = tl.zeros(a.shape, tl.uint32)
        for k in tl.static_range(4):
            nib = (sel >> (4 * k)) & 7
            src = tl.where(nib < 4, a, b)
            lm |= ((src >> (8 * (nib & 3)).to(tl.uint32)) & 0xFF) << (8 * k)
        lm = lm >> shift.to(tl.uint32)
        h = w2.to(tl.uint32, bitcast=True)
        r = (rot & 31).to(tl.uint32)
        h = (h >> r) | (h << ((32 - r) & 31))
        word = ((lm & 0x03030303) | (h & 0xFCFCFCFC)).to(tl.int32, bitcast=True)
    return word


@triton.jit
def _byte_codes_to_weights(words, sel, s, c, BITS: tl.constexpr, PACKED: tl.constexpr):
    """ŵ = s·(q − 2^(BITS−1)) + c in s's dtype (fp16/bf16), elementwise, q = the low BITS bits of
    byte j of ``words`` (int32), j = sel & 0xFF (``sel``: int16 j | (4 + j) << 8, j in 0..3: the
    asm's byte selector, see ``packed_asm``). s, c: same dtype, broadcastable to words.
    PACKED: the half2 inline asm (GPU); else the Triton twin."""
    MASK: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = 1 << (BITS - 1)
    s, c = tl.broadcast(s, c)
    words, s = tl.broadcast(words, s)
    words, c = tl.broadcast(words, c)
    sel, words = tl.broadcast(sel, words)
    if PACKED:
        if s.dtype == tl.float16:
            if BITS == 2:
                w = tl.inline_asm_elementwise(ASM_F16_B2, "=r,r,r,r,r,r", [words, sel, s, c], dtype=tl.float16,
                                              is_pure=True, pack=2)
            elif BITS == 3:
                w = tl.inline_asm_elementwise(ASM_F16_B3, "=r,r,r,r,r,r", [words, sel, s, c], dtype=tl.float16,
                                              is_pure=True, pack=2)
            else:
                w = tl.inline_asm_elementwise(ASM_F16_B4, "=r,r,r,r,r,r", [words, sel, s, c], dtype=tl.float16,
                                              is_pure=True, pack=2)
        else:
            tl.static_assert(s.dtype == tl.bfloat16)
            if BITS == 2:
                w = tl.inline_asm_elementwise(ASM_BF16_B2, "=r,r,r,r,r,r", [words, sel, s, c], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
            elif BITS == 3:
                w = tl.inline_asm_elementwise(ASM_BF16_B3, "=r,r,r,r,r,r", [words, sel, s, c], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
            else:
                w = tl.inline_asm_elementwise(ASM_BF16_B4, "=r,r,r,r,r,r", [words, sel, s, c], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
    else:
        byte = (sel & 0xFF).to(tl.int32)
        q = (((words >> (8 * byte)) & MASK) - MID).to(tl.float32)
        w = (s.to(tl.float32) * q + c.to(tl.float32)).to(s.dtype)
        # the asm reads element a's byte from S_a's low byte and element b's from S_b's high byte
        # (4 + j: W_b's byte j); this elementwise twin reads the low byte, the same byte exactly
        # when the selector keeps its contract, so a selector that breaks it decodes to NaN here
        ok = (byte < 4) & (((sel >> 8) & 0xFF).to(tl.int32) == byte + 4)
        w = tl.where(ok, w, float("nan")).to(s.dtype)
    return w


@triton.jit
def _decode_int_tile(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, offs_n, k0, K,
                     ACT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PACKED: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ŵ[offs_n, k0 : k0 + BLOCK_K] of an INT-b weight in the activation dtype ACT (fp16/bf16).

    Same contract as ``_dequant_tile`` (rows all valid, k0 a multiple of BLOCK_K, columns >= K
    exactly 0 unless EVEN_K), same value up to where it rounds (module docstring)."""
    if BITS == 3:
        # the bit planes of _unpack_codes (chunk = 3 words: w0/w1 hold the low 2 bits of column i /
        # 16 + i at bit 2i, w2 the high bit of column i at bit i), rebuilt once per lane into code
        # words for the INT4-like byte decode (round 7, docs/kernels.md "INT3 forward tile, nibble
        # rebuild"). In the MMA operand layout lane t = p % 4 holds the pairs p = t + 4i (i = 0..3)
        # of a chunk, columns 2t + e + 8i: the low bits of its pair i sit in nibble t of the 16-bit
        # half i of (w0, w1), at bit 4t + 2e of that half, its high bits at bit 2t + e + 8i of w2.
        # One PRMT puts byte t // 2 of each half in byte i, a shift by 4(t % 2) + 2e brings element
        # e's two low bits to bits 8i, 8i + 1, and rotating w2 right by 2t + e − 2 its high bit to
        # bit 8i + 2: per lane, chunk and parity e one PRMT, SHF, SHF.W, LOP3 (the same operands for
        # the lane's four pairs), then the byte decode per pair: PRMT, LOP3, 2 HFMA2
        w0, w1, w2 = _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K)
        NC: tl.constexpr = BLOCK_K // 32
        p = tl.arange(0, 16)
        t = p % 4
        byte = p // 4
        sel_l = (0x6420 + 0x1111 * (t // 2))[None, None, :]
        shift = (4 * (t % 2))[None, None, :]
        rot = ((2 * t + 30) % 32)[None, None, :]
        w0 = w0[:, :, None]
        w1 = w1[:, :, None]
        w2 = w2[:, :, None]
        word = tl.join(_int3_code_word(w0, w1, w2, sel_l, shift, rot, PACKED),
                       _int3_code_word(w0, w1, w2, sel_l, shift + 2, (rot + 1) % 32, PACKED))
        codes = tl.reshape(word, (BLOCK_N, BLOCK_K))
        sel1 = (byte | ((4 + byte) << 8)).to(tl.int16)
        sel = tl.reshape(tl.broadcast_to(tl.join(sel1, sel1)[None, None, :, :], (BLOCK_N, NC, 16, 2)),
                         (BLOCK_N, BLOCK_K))
    else:
        # the pairs of _unpack_codes (pair p = codes 2p, 2p+1 of a word, a broadcast dim; the pair
        # in registers by tl.join), but no per-pair shift: the asm's PRMT picks the pair's byte j
        # by a per-lane selector. Each element gets its word shifted so that its code sits at the
        # bottom of byte j: INT4 codes 2p, 2p+1 = low/high nibble of byte p, i.e. byte p of the word
        # and of word >> 4 (one SHF per word); INT2 pair p = bits 4p .. 4p+3 = byte p // 2 at
        # offset o = 4·(p % 2): words >> o and >> o + 2 (two SHF per word, the lane's parity)
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = BLOCK_K // PER
        words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, PER, EVEN_K, BLOCK_K)
        p = tl.arange(0, PER // 2)
        byte = (2 * BITS * p) // 8
        if BITS == 4:
            first = tl.broadcast_to(words[:, :, None], (BLOCK_N, NW, PER // 2))
        else:
            first = words[:, :, None] >> ((2 * BITS * p) % 8)[None, None, :]
        second = first >> BITS
        codes = tl.reshape(tl.join(first, second), (BLOCK_N, BLOCK_K))
        sel1 = (byte | ((4 + byte) << 8)).to(tl.int16)
        sel = tl.reshape(tl.broadcast_to(tl.join(sel1, sel1)[None, None, :, :], (BLOCK_N, NW, PER // 2, 2)),
                         (BLOCK_N, BLOCK_K))
    G = K // GROUP_SIZE
    if (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        SPAN: tl.constexpr = BLOCK_K // NG
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
        s, b = _group_params(s_ptr, b_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg,
                             offs_n, offs_g[None, :], (offs_g < G)[None, :], False, False, True, EVEN_K, True)
        s3 = tl.broadcast_to(s.to(ACT)[:, :, None], (BLOCK_N, NG, SPAN))
        b3 = tl.broadcast_to(b.to(ACT)[:, :, None], (BLOCK_N, NG, SPAN))
        w = _byte_codes_to_weights(tl.reshape(codes, (BLOCK_N, NG, SPAN)), tl.reshape(sel, (BLOCK_N, NG, SPAN)),
                                   s3, b3, BITS, PACKED)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        j = (offs_k // GROUP_SIZE)[None, :]
        s, b = _group_params(s_ptr, b_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg,
                             offs_n, j, j < G, False, False, True, EVEN_K, True)
        w = _byte_codes_to_weights(codes, sel, s.to(ACT), b.to(ACT), BITS, PACKED)
    return w


@triton.jit
def _decode_nf4_tile(qw_ptr, s_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
                     offs_n, k0, K, ACT: tl.constexpr, GROUP_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     CLAMP_GROUPS: tl.constexpr = False, ABSMAX_PAIRED: tl.constexpr = False):
    """NF4's Ŵ[offs_n, k0 : k0 + BLOCK_K] in the activation dtype ACT (fp16/bf16), the stored k order:
    ŵ = round_act(NF4_a[q]·absmax_a), the table and the (de-nested) absmax rounded to ACT first
    (:func:`qlk.kernels.nf4_tile._nf4_half_pair`; round 21). Same contract as ``_dequant_tile``;
    the block size a multiple of 8 (a word's bytes share their absmax).

    Byte i of a word holds the (even, odd) codes in its (high, low) nibble; the pair comes back as
    two values that ``tl.join`` keeps in one thread, as the MMA operand holds it.

    CLAMP_GROUPS (the decode loop): the absmax of groups clamped into range, loaded unmasked, and the
    groups past K zeroed in the packed scale instead: with _group_params' masked loads the grouped
    small-M forward kept 80 registers and 8 B of stack on sm_80 at ragged K (1408, 2880); on the
    GEMM's 64-row tiles the clamp costs 10 instructions an iteration (569 -> 579), so they keep the
    masked loads.

    ABSMAX_PAIRED (round 26): ``s_ptr`` is ``weight_args(pair_act=ACT)``'s buffer, each absmax already
    rounded to ACT in both halves of an int32 (``s2`` as loaded: no F2F and IMAD per block); not with
    DOUBLE_QUANT (the buffer is de-nested)."""
    tl.static_assert(not (ABSMAX_PAIRED and DOUBLE_QUANT))
    NW: tl.constexpr = BLOCK_K // 8
    words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, 8, EVEN_K, BLOCK_K)
    shifted = words[:, :, None] >> (tl.arange(0, 4)[None, None, :] * 8)
    G = K // GROUP_SIZE
    if (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        offs_g = (k0 // GROUP_SIZE) + tl.arange(0, NG)  # the tile's absmax blocks
        if CLAMP_GROUPS:
            absmax, _ = _group_params(s_ptr, s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                                      offs_n, tl.minimum(offs_g, G - 1)[None, :], (offs_g < G)[None, :], True,
                                      DOUBLE_QUANT, False, True, ABSMAX_PAIRED)
            s2 = _absmax_half2(absmax, ACT, ABSMAX_PAIRED)
            if not EVEN_K:
                s2 = tl.where((offs_g < G)[None, :], s2, 0)
        else:
            absmax, _ = _group_params(s_ptr, s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                                      offs_n, offs_g[None, :], (offs_g < G)[None, :], True, DOUBLE_QUANT, False, EVEN_K,
                                      ABSMAX_PAIRED)
            s2 = _absmax_half2(absmax, ACT, ABSMAX_PAIRED)
        s2 = tl.reshape(tl.broadcast_to(s2[:, :, None], (BLOCK_N, NG, NW // NG)), (BLOCK_N, NW))
    else:
        j = ((k0 + 8 * tl.arange(0, NW)) // GROUP_SIZE)[None, :]
        absmax, _ = _group_params(s_ptr, s_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                                  offs_n, j, j < G, True, DOUBLE_QUANT, False, EVEN_K, ABSMAX_PAIRED)
        s2 = _absmax_half2(absmax, ACT, ABSMAX_PAIRED)
    even, odd = _nf4_half_pair(shifted, s2[:, :, None], lut_ptr, ACT)
    pairs = tl.join(even, odd)  # [BLOCK_N, NW, 4, 2]: the stored order
    return tl.reshape(pairs, (BLOCK_N, BLOCK_K))


@triton.jit
def _absmax_half2(absmax, ACT: tl.constexpr, PAIRED: tl.constexpr):
    """The half2 lookup's scale operand from a loaded absmax: as loaded when PAIRED (int32, ACT's bits
    in both halves: ``weight_args(pair_act=ACT)``), else the fp32 value rounded to ACT and duplicated."""
    if PAIRED:
        return absmax
    else:
        return _half2_bits(_round_act(absmax, ACT))


@triton.jit
def _half2_bits(v):
    """int32 holding the 16-bit pattern of ``v`` (fp16/bf16) in both halves."""
    bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


# ------------------------------------------------------------------------------------------------
# Round 4: lane-owned words (INT2/INT4), the MMA's k order permuted instead of the words shuffled
# ------------------------------------------------------------------------------------------------
def packed_asm_halves(bits: int, act: str) -> str:
    """PTX of one invocation (pack=2) for the lane-owned INT2/INT4 decode: $0 = two weights (a low,
    b high); $1 = packed int16 (h_a, h_b): element e's code is the low ``bits`` bits of h_e;
    $2, $3 = packed (s_a, s_b), (c_a, c_b) in the act dtype. One LOP3 and two HFMA2 per pair."""
    magic, value, one, fma = _act_consts(act)
    mask = (1 << bits) - 1
    neg = _neg_magic(act, value + (1 << (bits - 1)))
    return ("{\n"
            ".reg .b32 v, one, neg;\n"
            f"lop3.b32 v, $1, {mask * 0x10001:#010x}, {magic * 0x10001:#010x}, 0xea;\n"
            f"mov.b32 one, {one * 0x10001:#010x};\n"
            f"mov.b32 neg, {neg * 0x10001:#010x};\n"
            f"{fma} v, v, one, neg;\n"
            f"{fma} $0, v, $2, $3;\n"
            "}")


def packed_asm_int3_halves(act: str, p: int = 0) -> str:
    """PTX of one lane-owned INT3 invocation (pack=2) for codes at bit p: $0 = two weights; $1 =
    packed int16 whose bits p, p+1 are each code's two low bits; $2 = packed int16 whose bit p+2 is
    each code's high bit (other bits of $1, $2 are ignored); $3, $4 = packed (s_a, s_b), (c_a, c_b).

    Round 11: the code may sit at any p in 0..4: bits p..p+2 then lie in the mantissa of the magic
    MAGIC_VALUE·2^−p, whose ulp is 2^p, so OR-ing the code in gives MAGIC_VALUE·2^−p + q exactly
    (``int3_lane_constants``); the lane's pairs can then share the shifts that bring their planes
    together (``INT3_LANE_PLAN``). One LOP3 takes the low bits from $1 and the high bit from $2, one
    masks and adds the magic, then the two HFMA2 of every decoder: q − 4 (exact), s·(q − 4) + c
    rounded once."""
    _, _, one, fma = _act_consts(act)
    sel_mask, code_mask, magic, neg = int3_lane_constants(act, p)
    return ("{\n"
            ".reg .b32 v, one, neg;\n"
            f"lop3.b32 v, $1, $2, {sel_mask * 0x10001:#010x}, 0xe4;\n"  # (lo & sel) | (hi & ~sel) per half
            f"lop3.b32 v, v, {code_mask * 0x10001:#010x}, {magic * 0x10001:#010x}, 0xea;\n"
            f"mov.b32 one, {one * 0x10001:#010x};\n"
            f"mov.b32 neg, {neg * 0x10001:#010x};\n"
            f"{fma} v, v, one, neg;\n"
            f"{fma} $0, v, $3, $4;\n"
            "}")


def int3_lane_constants(act: str, p: int) -> tuple:
    """The 16-bit constants of ``packed_asm_int3_halves(act, p)``: (select mask, code mask, magic,
    −(magic value + 4))."""
    if p not in (0, 1, 2, 3, 4):
        raise ValueError(f"p={p}: an INT3 code at bits p..p+2 must lie in the bf16 mantissa (p <= 4)")
    magic, value, _, _ = _act_consts(act)
    shift = 10 if act == "fp16" else 7  # the exponent field's position
    return (1 << (p + 2)) - 1, 7 << p, magic - (p << shift), _neg_magic(act, (value >> p) + 4)


#: Round 11, the lane-owned INT3 tile: for pair j of a lane's chunk (columns j, j + 16), (a, b, p):
#: its low bits are brought to bit p by ``low_word >> a`` (the low halves of words 0/1 for j < 8,
#: their high halves for j ≥ 8; a < 0 shifts left), its high bit to bit p + 2 by ``w2 >> b``.
#: Pair j's low bits sit at bit 2·(j mod 8) of its low word and its high bit at bit j of word 2,
#: so a = 2·(j mod 8) − p and b = j − p − 2; with p free in {0, 2, 4} the 16 pairs need 14
#: distinct shifts (4 + 4 of the low words, 6 of word 2) instead of 29 at p = 0 (the smallest
#: count over all shift sets, searched exhaustively; tests/test_decode_tile.py checks the plan).
INT3_LANE_PLAN = (
    (0, -2, 0), (0, -3, 2), (2, -2, 2), (2, -3, 4), (4, -2, 4), (10, 3, 0), (12, 4, 0), (12, 3, 2),
    (-2, 4, 2), (-2, 3, 4), (0, 4, 4), (6, 9, 0), (6, 8, 2), (8, 9, 2), (8, 8, 4), (10, 9, 4),
)


def _plan_code(field: int, half: int) -> int:
    """INT3_LANE_PLAN's column ``field`` for pairs 8·half .. 8·half + 7, 4 bits each (+ 3)."""
    return sum((INT3_LANE_PLAN[8 * half + j][field] + 3) << (4 * j) for j in range(8))


INT3_PLAN_A0: tl.constexpr = tl.constexpr(_plan_code(0, 0))
INT3_PLAN_A1: tl.constexpr = tl.constexpr(_plan_code(0, 1))
INT3_PLAN_B0: tl.constexpr = tl.constexpr(_plan_code(1, 0))
INT3_PLAN_B1: tl.constexpr = tl.constexpr(_plan_code(1, 1))
INT3_PLAN_P0: tl.constexpr = tl.constexpr(_plan_code(2, 0))
INT3_PLAN_P1: tl.constexpr = tl.constexpr(_plan_code(2, 1))


@triton.jit
def _plan_field(jj, CODE_LO: tl.constexpr, CODE_HI: tl.constexpr):
    """INT3_LANE_PLAN's field for each pair index in ``jj`` (0..15), from its 4-bit codes."""
    v = tl.zeros(jj.shape, tl.int32)
    for i in tl.static_range(8):
        v = tl.where(jj == i, ((CODE_LO >> (4 * i)) & 15) - 3, v)
        v = tl.where(jj == i + 8, ((CODE_HI >> (4 * i)) & 15) - 3, v)
    return v


ASM_F16_H3: tl.constexpr = tl.constexpr(packed_asm_int3_halves("fp16"))
ASM_F16_H3_P2: tl.constexpr = tl.constexpr(packed_asm_int3_halves("fp16", 2))
ASM_F16_H3_P4: tl.constexpr = tl.constexpr(packed_asm_int3_halves("fp16", 4))
ASM_BF16_H3: tl.constexpr = tl.constexpr(packed_asm_int3_halves("bf16"))
ASM_BF16_H3_P2: tl.constexpr = tl.constexpr(packed_asm_int3_halves("bf16", 2))
ASM_BF16_H3_P4: tl.constexpr = tl.constexpr(packed_asm_int3_halves("bf16", 4))
ASM_F16_H2: tl.constexpr = tl.constexpr(packed_asm_halves(2, "fp16"))
ASM_F16_H4: tl.constexpr = tl.constexpr(packed_asm_halves(4, "fp16"))
ASM_BF16_H2: tl.constexpr = tl.constexpr(packed_asm_halves(2, "bf16"))
ASM_BF16_H4: tl.constexpr = tl.constexpr(packed_asm_halves(4, "bf16"))


def lane_order_ok(bits: int, block_k: int) -> bool:
    """Whether the lane-owned decode tile (:func:`_decode_int_tile_lanes`) applies: BLOCK_K a
    multiple of its quad's span (4 words: 32 INT4 / 64 INT2 columns; INT3: 4 chunks of 3 words,
    128 columns)."""
    return bits in (2, 3, 4) and block_k % (4 * _lane_unit(bits)) == 0


def _lane_unit(bits: int) -> int:
    """Columns one lane owns in a quad's span: a word (INT2 16, INT4 8), an INT3 chunk (32)."""
    return 32 if bits == 3 else 32 // bits


@triton.jit
def _lane_source_cols(BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 [BLOCK_K]: the tile column (0 .. BLOCK_K−1, stored order) that MMA column kk reads in
    the lane-owned order. PER = 32/BITS codes per word, J = PER/2, chunk = 4 words:
    kk = e + 2t + 8j + 8J·c  <->  column PER·(4c + t) + j + J·e
    (t: the lane in its quad, which owns word 4c + t; element e of its register pair p = j holds
    codes j and j + J of that word, i.e. bits BITS·j and BITS·j + 16)."""
    PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    J: tl.constexpr = PER // 2
    kk = tl.arange(0, BLOCK_K)
    e = kk % 2
    t = (kk // 2) % 4
    j = (kk // 8) % J
    c = kk // (8 * J)
    return PER * (4 * c + t) + j + J * e


@triton.jit
def _lane_x_tile(x_rows, mask_m, k0, K, stride_xk, BITS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """Xᵀ [BLOCK_K, BLOCK_M] in the lane-owned k order (row kk = X[:, k0 + _lane_source_cols(kk)]),
    zero past K (unless EVEN_K: k0 + BLOCK_K <= K) and for masked rows. Loaded as [chunks, j, t, e, m] so that the J consecutive
    columns of a run (j) stay one vector load."""
    PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    J: tl.constexpr = PER // 2
    NC: tl.constexpr = BLOCK_K // (8 * J)
    c = tl.arange(0, NC)[:, None, None, None, None]
    j = tl.arange(0, J)[None, :, None, None, None]
    t = tl.arange(0, 4)[None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, :, None]
    offs_k = k0 + PER * (4 * c + t) + j + J * e
    ptrs = x_rows[None, None, None, None, :] + offs_k * stride_xk
    if EVEN_K:  # whole tiles: only the padding rows are masked
        xt = tl.load(ptrs, mask=mask_m[None, None, None, None, :], other=0.0)
    else:
        xt = tl.load(ptrs, mask=mask_m[None, None, None, None, :] & (offs_k < K), other=0.0)
    return tl.reshape(xt, (BLOCK_K, BLOCK_M))


@triton.jit
def _half_codes_to_weights(h, s, c, BITS: tl.constexpr, PACKED: tl.constexpr):
    """ŵ = s·(q − 2^(BITS−1)) + c in s's dtype, elementwise, q = the low BITS bits of the int16 ``h``.
    PACKED: the half2 inline asm (``packed_asm_halves``); else the Triton twin."""
    MASK: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = 1 << (BITS - 1)
    s, c = tl.broadcast(s, c)
    h, s = tl.broadcast(h, s)
    h, c = tl.broadcast(h, c)
    if PACKED:
        if s.dtype == tl.float16:
            if BITS == 2:
                w = tl.inline_asm_elementwise(ASM_F16_H2, "=r,r,r,r", [h, s, c], dtype=tl.float16,
                                              is_pure=True, pack=2)
            else:
                w = tl.inline_asm_elementwise(ASM_F16_H4, "=r,r,r,r", [h, s, c], dtype=tl.float16,
                                              is_pure=True, pack=2)
        else:
            tl.static_assert(s.dtype == tl.bfloat16)
            if BITS == 2:
                w = tl.inline_asm_elementwise(ASM_BF16_H2, "=r,r,r,r", [h, s, c], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
            else:
                w = tl.inline_asm_elementwise(ASM_BF16_H4, "=r,r,r,r", [h, s, c], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
    else:
        q = ((h.to(tl.int32) & MASK) - MID).to(tl.float32)
        w = (s.to(tl.float32) * q + c.to(tl.float32)).to(s.dtype)
    return w


@triton.jit
def _int3_halves_to_weights(lo, hi, pos, s, c, PACKED: tl.constexpr):
    """ŵ = s·(q − 4) + c in s's dtype, elementwise, q = ((lo >> pos) & 3) | ((hi >> pos) & 4)
    (int16 lo, hi: the code's low bits at bits pos, pos + 1 of lo, its high bit at bit pos + 2 of
    hi; int32 pos in {0, 2, 4} (the asm: one per position; the twin takes any 0..4))."""
    s, c = tl.broadcast(s, c)
    lo, s = tl.broadcast(lo, s)
    lo, c = tl.broadcast(lo, c)
    hi, lo = tl.broadcast(hi, lo)
    pos, lo = tl.broadcast(pos, lo)
    if PACKED:
        # one asm per code position of INT3_LANE_PLAN (0, 2, 4), its constants as immediates: pos is
        # a constant per register in the kernel, so the selects fold and the other two asm die
        w0 = _int3_halves_asm(lo, hi, s, c, 0)
        w2 = _int3_halves_asm(lo, hi, s, c, 2)
        w4 = _int3_halves_asm(lo, hi, s, c, 4)
        w = tl.where(pos == 0, w0, tl.where(pos == 2, w2, w4))
    else:
        q = (((lo.to(tl.int32) >> pos) & 3) | ((hi.to(tl.int32) >> pos) & 4)) - 4
        w = (s.to(tl.float32) * q.to(tl.float32) + c.to(tl.float32)).to(s.dtype)
    return w


@triton.jit
def _int3_halves_asm(lo, hi, s, c, P: tl.constexpr):
    """``packed_asm_int3_halves(act, P)`` (P in {0, 2, 4}) on operands of one shape."""
    tl.static_assert(P == 0 or P == 2 or P == 4)
    if s.dtype == tl.float16:
        asm: tl.constexpr = ASM_F16_H3 if P == 0 else ASM_F16_H3_P2 if P == 2 else ASM_F16_H3_P4
    else:
        tl.static_assert(s.dtype == tl.bfloat16)
        asm: tl.constexpr = ASM_BF16_H3 if P == 0 else ASM_BF16_H3_P2 if P == 2 else ASM_BF16_H3_P4
    return tl.inline_asm_elementwise(asm, "=r,r,r,r,r", [lo, hi, s, c], dtype=s.dtype, is_pure=True, pack=2)


@triton.jit
def _decode_int_tile_lanes(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, offs_n, k0, K,
                           ACT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PACKED: tl.constexpr,
                           EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ŵ[offs_n, k0 + _lane_source_cols(kk)] for kk in 0 .. BLOCK_K (INT2/3/4, ``lane_order_ok``):
    the tile in the lane-owned k order, to be multiplied with ``_lane_x_tile``'s Xᵀ.

    Why: in the MMA operand layout the four lanes of a quad hold interleaved k (k = 2t + e + 8·i).
    In the stored order each lane needs one byte of every word, so every lane reads every word
    (4× the shared-memory traffic) and picks its byte per pair. Permuting k inside each chunk of
    4 words instead gives lane t word 4c + t whole: its pairs are (code j, code j + J) = the bits at
    BITS·j and BITS·j + 16 of one register, so ``word >> BITS·j`` (one SHF per j, none for j = 0)
    feeds both halves of a pair and the asm needs only LOP3 + 2 HFMA2. INT3: lane t owns chunk
    4c + t (3 words, 32 columns), pair j = columns j, j + 16 (J = 16). The sum over k is the same
    (X is read in the same permuted order); the weight format is unchanged.

    Same values as ``_decode_int_tile`` (same rounding); columns past K are 0 unless EVEN_K."""
    PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # columns per lane unit (word / INT3 chunk)
    J: tl.constexpr = PER // 2
    NW: tl.constexpr = BLOCK_K // PER
    NC: tl.constexpr = NW // 4
    jj = tl.arange(0, J)[None, None, :]
    if BITS == 3:
        # chunk = 3 words: word 0/1 hold the low 2 bits of columns i / 16 + i at bit 2i, word 2 the
        # high bit of column i at bit i. Pair j = columns j, j + 16: its low bits are at bit 2·(j % 8)
        # of the low halves of words 0 and 1 side by side (pairs 0-7; the high halves for 8-15: two
        # PRMT per chunk), its high bits at bit j of word 2's halves. INT3_LANE_PLAN brings them to
        # bits p, p + 1 and p + 2 with shifts shared between pairs (p per pair; the asm's magic follows)
        w0, w1, w2 = _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K)
        lows = (w0 & 0xFFFF) | (w1 << 16)
        highs = ((w0 >> 16) & 0xFFFF) | (w1 & -65536)
        sh_lo = _plan_field(jj, INT3_PLAN_A0, INT3_PLAN_A1)
        sh_hi = _plan_field(jj, INT3_PLAN_B0, INT3_PLAN_B1)
        src = tl.where(jj < 8, lows[:, :, None], highs[:, :, None])
        lo32 = tl.where(sh_lo >= 0, src >> tl.maximum(sh_lo, 0), src << tl.maximum(-sh_lo, 0))
        lo = tl.join(lo32.to(tl.int16), (lo32 >> 16).to(tl.int16))
        hi32 = tl.where(sh_hi >= 0, w2[:, :, None] >> tl.maximum(sh_hi, 0), w2[:, :, None] << tl.maximum(-sh_hi, 0))
        hi = tl.join(hi32.to(tl.int16), (hi32 >> 16).to(tl.int16))
        pos1 = _plan_field(jj, INT3_PLAN_P0, INT3_PLAN_P1) + tl.zeros(lo32.shape, tl.int32)
        pos = tl.join(pos1, pos1)
    else:
        words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, PER, EVEN_K, BLOCK_K)
        sh = words[:, :, None] >> (BITS * jj)  # [BLOCK_N, NW, J]
        h = tl.join(sh.to(tl.int16), (sh >> 16).to(tl.int16))  # [BLOCK_N, NW, J, 2]: codes j, j + J
    G = K // GROUP_SIZE
    if (GROUP_SIZE & (GROUP_SIZE - 1)) == 0 and GROUP_SIZE % PER == 0:
        # groups hold whole lane units: NG groups of the tile, each NW / NG units
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        offs_g = tl.arange(0, NG) + k0 // GROUP_SIZE
        s, b = _group_params(s_ptr, b_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg,
                             offs_n, offs_g[None, :], (offs_g < G)[None, :], False, False, True, EVEN_K, True)
        s5 = s.to(ACT)[:, :, None, None, None]
        b5 = b.to(ACT)[:, :, None, None, None]
        if BITS == 3:
            w = _int3_halves_to_weights(tl.reshape(lo, (BLOCK_N, NG, NW // NG, J, 2)),
                                        tl.reshape(hi, (BLOCK_N, NG, NW // NG, J, 2)),
                                        tl.reshape(pos, (BLOCK_N, NG, NW // NG, J, 2)), s5, b5, PACKED)
        else:
            w = _half_codes_to_weights(tl.reshape(h, (BLOCK_N, NG, NW // NG, J, 2)), s5, b5, BITS, PACKED)
    else:
        # a group that splits lane units or is not a power of two: one (cached) scale gather per
        # element, indexed by the element's stored column
        w_ = tl.arange(0, NW)[:, None, None]
        j_ = tl.arange(0, J)[None, :, None]
        e_ = tl.arange(0, 2)[None, None, :]
        col = k0 + PER * w_ + j_ + J * e_  # [NW, J, 2]
        grp = tl.reshape(col // GROUP_SIZE, (1, BLOCK_K))
        s, b = _group_params(s_ptr, b_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg,
                             offs_n, grp, grp < G, False, False, True, EVEN_K, True)
        if BITS == 3:
            w = _int3_halves_to_weights(tl.reshape(lo, (BLOCK_N, BLOCK_K)), tl.reshape(hi, (BLOCK_N, BLOCK_K)),
                                        tl.reshape(pos, (BLOCK_N, BLOCK_K)), s.to(ACT), b.to(ACT), PACKED)
        else:
            w = _half_codes_to_weights(tl.reshape(h, (BLOCK_N, BLOCK_K)), s.to(ACT), b.to(ACT), BITS, PACKED)
    w = tl.reshape(w, (BLOCK_N, NC, 4, J, 2))
    return tl.reshape(tl.permute(w, (0, 1, 3, 2, 4)), (BLOCK_N, BLOCK_K))


# ------------------------------------------------------------------------------------------------
# Round 18: the input gradient's Ŵ as the MMA's B operand, stored to shared memory in 16-byte rows
# ------------------------------------------------------------------------------------------------
@triton.jit
def _row_tile_words(qw_ptr, stride_qn, rows, k0, BITS: tl.constexpr, IS_NF4: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words of the B-operand tile's rows ``rows`` (in bounds), columns k0 .. k0 + BLOCK_K
    (inside K), as the row decoders take them (INT3: its three planes, else (words, 0, 0)).

    The input gradient loads them one N tile ahead (round 19): Triton's pipeliner leaves a load
    whose value only the next iteration uses in registers (LDG.128 straight into the layout the
    decoder wants), where a load in the same iteration went through cp.async into shared memory
    and back (LDGSTS + LDS, a fifth of the 64-row tile's shared-memory time). An inline-PTX load
    (``quant_tile_t._ld_nc``) is no better here: its default layout was not the decoder's, and the conversions
    cost 46 STS + 27 LDS an iteration."""
    if BITS == 3 and not IS_NF4:
        NC: tl.constexpr = BLOCK_K // 32
        row = qw_ptr + rows[:, None] * stride_qn + 3 * (k0 // 32) + 3 * tl.arange(0, NC)[None, :]
        return tl.load(row), tl.load(row + 1), tl.load(row + 2)
    else:
        PER: tl.constexpr = 8 if IS_NF4 else 32 // BITS
        NW: tl.constexpr = BLOCK_K // PER
        return tl.load(qw_ptr + rows[:, None] * stride_qn + k0 // PER + tl.arange(0, NW)[None, :]), 0, 0


@triton.jit
def _row_tile_stored_order(t, BITS: tl.constexpr, IS_NF4: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K] ``t`` whose columns are in :func:`_decode_int_tile_rows`'s order, relabelled
    into the stored order (column c then holds stored column c): inside each word, position
    p = 4a + 2b + e (INT4; INT2: 8a + 4b + 2d + e) holds code j + J·e with j = a + 2b (+ 4d) (INT3,
    :func:`_decode_int3_tile_rows`: inside each 32-column chunk p = 16a + 8b + 4c + 2d + e holds
    column j + 16e, j = a + 2b + 4c + 8d), NF4's
    (:func:`_decode_nf4_tile_rows`) element e of byte a + 2b, and the inverse is a reshape and a permute: registers renamed, nothing moves, so the store computes plain
    column offsets (the per-element map cost the split's atomics 255 registers and spills)."""
    PER: tl.constexpr = 32 // BITS if BITS != 3 else 32
    NW: tl.constexpr = BLOCK_K // PER
    if IS_NF4:  # (a, b, e) -> (b, a, e): byte a + 2b, its even and odd element
        t = tl.permute(tl.reshape(t, (ROWS, NW, 2, 2, 2)), (0, 1, 3, 2, 4))
    elif BITS == 3:  # a 32-column chunk, (a, b, c, d, e) -> (e, d, c, b, a): column j + 16e, j = a + 2b + 4c + 8d
        t = tl.permute(tl.reshape(t, (ROWS, NW, 2, 2, 2, 2, 2)), (0, 1, 6, 5, 4, 3, 2))
    elif BITS == 4:  # (a, b, e) -> (e, b, a): code j + 4e, j = a + 2b
        t = tl.permute(tl.reshape(t, (ROWS, NW, 2, 2, 2)), (0, 1, 4, 3, 2))
    else:  # INT2: (a, b, d, e) -> (e, d, b, a): code j + 8e, j = a + 2b + 4d
        t = tl.permute(tl.reshape(t, (ROWS, NW, 2, 2, 2, 2)), (0, 1, 5, 4, 3, 2))
    return tl.reshape(t, (ROWS, BLOCK_K))


@triton.jit
def _decode_int_tile_rows(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, offs_n, k0, K,
                          ACT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PACKED: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, words=None, PRELOADED: tl.constexpr = False):
    """Ŵ[offs_n, k0 + …] [BLOCK_N, BLOCK_K] in ACT (INT2/INT4; groups of whole words, a power of two at
    least a word's codes; k0 a multiple of the group and of BLOCK_K's words; the tile inside K): every
    word's codes decoded into one thread's registers, side by side, so the tile leaves them as whole
    16-byte rows.

    Why: the input gradient on sm_90 (round 18) computes dX = dY·Ŵ with Ŵ as wgmma's B operand,
    which wgmma reads from shared memory. The decoded tile goes there once, by 16-byte stores, and
    nothing reads it back into registers (Ŵᵀ as the A operand went through STS + LDSM: the
    shared-memory bound of the 64- and 128-row tiles). Pair (j, j + J) of a word is the low bits of
    the two 16-bit halves of ``word >> BITS·j``: one LOP3 and two HFMA2 (``packed_asm_halves``) as
    in the lane-owned tile; the shifts are joined (not broadcast) so that all of a word's pairs stay
    in its thread. The columns come out permuted inside each word (position p = 4a + 2b + e holds
    code a + 2b + 4e; INT2 p = 8a + 4b + 2d + e code a + 2b + 4d + 8e); the caller relabels its
    product back (:func:`_row_tile_stored_order`). Same values as ``_decode_int_tile`` (same rounding).
    PRELOADED: ``words`` [BLOCK_N, BLOCK_K/PER] were loaded by the caller (:func:`_row_tile_words`)."""
    PER: tl.constexpr = 32 // BITS
    NW: tl.constexpr = BLOCK_K // PER
    if not PRELOADED:
        words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, PER, True, BLOCK_K)
    if BITS == 4:
        sh = tl.join(tl.join(words, words >> 4), tl.join(words >> 8, words >> 12))  # [BN, NW, 2 (a), 2 (b)]
    else:
        s2 = tl.join(tl.join(words, words >> 2), tl.join(words >> 4, words >> 6))
        sh = tl.join(s2, s2 >> 8)  # [BN, NW, 2 (a), 2 (b), 2 (d)]
    low, high = sh.to(tl.int16), (sh >> 16).to(tl.int16)  # codes j and j + J
    h = tl.join(low, high)  # + [2 (e)]
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    offs_g = (k0 // GROUP_SIZE) + tl.arange(0, NG)  # the tile's groups
    s, b = _group_params(s_ptr, b_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg,
                         offs_n, offs_g[None, :], (offs_g < K // GROUP_SIZE)[None, :], False, False, True, True, True)
    w = _half_codes_to_weights(tl.reshape(h, (BLOCK_N, NG, NW // NG, PER)),
                               s.to(ACT)[:, :, None, None], b.to(ACT)[:, :, None, None], BITS, PACKED)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _int3_pair_rows(lows, highs, w2, J: tl.constexpr):
    """Pair J (columns J, J + 16 of every chunk) of :func:`_decode_int3_tile_rows`: (its low bits, its
    high bits, their position), brought together by INT3_LANE_PLAN[J]'s shifts (decoded from the plan's
    packed constants at compile time)."""
    if J < 8:
        A: tl.constexpr = ((INT3_PLAN_A0 >> (4 * J)) & 15) - 3
        B: tl.constexpr = ((INT3_PLAN_B0 >> (4 * J)) & 15) - 3
        P: tl.constexpr = ((INT3_PLAN_P0 >> (4 * J)) & 15) - 3
        src = lows
    else:
        A: tl.constexpr = ((INT3_PLAN_A1 >> (4 * (J - 8))) & 15) - 3
        B: tl.constexpr = ((INT3_PLAN_B1 >> (4 * (J - 8))) & 15) - 3
        P: tl.constexpr = ((INT3_PLAN_P1 >> (4 * (J - 8))) & 15) - 3
        src = highs
    if A >= 0:
        lo = src >> A
    else:
        lo = src << (-A)
    if B >= 0:
        hi = w2 >> B
    else:
        hi = w2 << (-B)
    return lo, hi, tl.full(lo.shape, P, tl.int32)


@triton.jit
def _int3_quad_rows(lows, highs, w2, J0: tl.constexpr):
    """Pairs J0 .. J0 + 3 of :func:`_decode_int3_tile_rows`, joined: (lo, hi, pos) [..., 2 (a), 2 (b)],
    pair J0 + a + 2b."""
    lo0, hi0, p0 = _int3_pair_rows(lows, highs, w2, J0)
    lo1, hi1, p1 = _int3_pair_rows(lows, highs, w2, J0 + 1)
    lo2, hi2, p2 = _int3_pair_rows(lows, highs, w2, J0 + 2)
    lo3, hi3, p3 = _int3_pair_rows(lows, highs, w2, J0 + 3)
    return (tl.join(tl.join(lo0, lo1), tl.join(lo2, lo3)), tl.join(tl.join(hi0, hi1), tl.join(hi2, hi3)),
            tl.join(tl.join(p0, p1), tl.join(p2, p3)))


@triton.jit
def _decode_int3_tile_rows(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, offs_n, k0, K,
                           ACT: tl.constexpr, GROUP_SIZE: tl.constexpr, PACKED: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, w0=None, w1=None, w2=None,
                           PRELOADED: tl.constexpr = False):
    """INT3's :func:`_decode_int_tile_rows`: Ŵ[offs_n, k0 + …] [BLOCK_N, BLOCK_K] in ACT, every
    32-column chunk (3 words) decoded into one thread's registers (tile position
    p = 16a + 8b + 4c + 2d + e of a chunk holds column j + 16e, j = a + 2b + 4c + 8d;
    :func:`_row_tile_stored_order` with BITS = 3 relabels the product). Groups a power of two of 32
    columns or more, k0 a multiple of the group, the tile inside K.

    The arithmetic is the lane-owned INT3 tile's (round 11): pair j = columns j, j + 16 is the two
    16-bit halves of the low-bit words' halves side by side (``lows``: pairs 0–7, ``highs``: 8–15)
    shifted by INT3_LANE_PLAN[j] and of word 2 shifted, merged and decoded by
    ``packed_asm_int3_halves`` at the pair's code position (2 LOP3 + 2 HFMA2 a pair; 14 shifts a
    chunk, shared between pairs). The pairs' 32-bit words are joined, not broadcast over a pair
    axis, and split into halves last, so a chunk stays in its thread, each asm result is two
    neighbouring tile positions, and the chunk leaves as four 16-byte rows. Same values as
    ``_decode_int_tile`` (same rounding). PRELOADED: the planes ``w0``, ``w1``, ``w2`` [BLOCK_N,
    BLOCK_K/32] were loaded by the caller (:func:`_row_tile_words`)."""
    NC: tl.constexpr = BLOCK_K // 32
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    if not PRELOADED:
        w0, w1, w2 = _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, True, BLOCK_K)
    w0 = tl.reshape(w0, (BLOCK_N, NG, NC // NG))
    w1 = tl.reshape(w1, (BLOCK_N, NG, NC // NG))
    w2 = tl.reshape(w2, (BLOCK_N, NG, NC // NG))
    lows = (w0 & 0xFFFF) | (w1 << 16)
    highs = ((w0 >> 16) & 0xFFFF) | (w1 & -65536)
    lo0, hi0, p0 = _int3_quad_rows(lows, highs, w2, 0)
    lo1, hi1, p1 = _int3_quad_rows(lows, highs, w2, 4)
    lo2, hi2, p2 = _int3_quad_rows(lows, highs, w2, 8)
    lo3, hi3, p3 = _int3_quad_rows(lows, highs, w2, 12)
    lo32 = tl.join(tl.join(lo0, lo1), tl.join(lo2, lo3))  # [BN, NG, NC/NG, 2 (a), 2 (b), 2 (c), 2 (d)]
    hi32 = tl.join(tl.join(hi0, hi1), tl.join(hi2, hi3))
    pos = tl.join(tl.join(p0, p1), tl.join(p2, p3))
    lo = tl.join(lo32.to(tl.int16), (lo32 >> 16).to(tl.int16))  # + [2 (e)]: columns j, j + 16
    hi = tl.join(hi32.to(tl.int16), (hi32 >> 16).to(tl.int16))
    offs_g = (k0 // GROUP_SIZE) + tl.arange(0, NG)  # the tile's groups
    s, b = _group_params(s_ptr, b_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg,
                         offs_n, offs_g[None, :], (offs_g < K // GROUP_SIZE)[None, :], False, False, True, True, True)
    w = _int3_halves_to_weights(lo, hi, tl.join(pos, pos), s.to(ACT)[:, :, None, None, None, None, None, None],
                                b.to(ACT)[:, :, None, None, None, None, None, None], PACKED)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_nf4_tile_rows(qw_ptr, s_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, offs_n, k0, K,
                          ACT: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          words=None, PRELOADED: tl.constexpr = False, ABSMAX_PAIRED: tl.constexpr = False):
    """NF4's :func:`_decode_int_tile_rows`: Ŵ = NF4[q]·absmax [BLOCK_N, BLOCK_K] in ACT, a word's 8
    values in its thread's registers (tile position p = 4a + 2b + e holds element e of byte a + 2b,
    :func:`_row_tile_stored_order` with IS_NF4); absmax fp32 per (row, block), plain or de-nested
    (``weight_args(denest_absmax=True)``), blocks a power of two of 8 columns or more; the tile inside
    K. Numerics: :func:`_decode_nf4_tile`'s (round 21: the half2 lookup, the table and absmax rounded
    to ACT, the product rounded once). PRELOADED: ``words`` were loaded by the caller
    (:func:`_row_tile_words`). ABSMAX_PAIRED: ``s_ptr`` holds ACT pairs (:func:`_decode_nf4_tile`)."""
    NW: tl.constexpr = BLOCK_K // 8
    if not PRELOADED:
        words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, 8, True, BLOCK_K)
    by = tl.join(tl.join(words, words >> 8), tl.join(words >> 16, words >> 24))  # [BN, NW, 2 (a), 2 (b)]
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    offs_g = (k0 // GROUP_SIZE) + tl.arange(0, NG)  # the tile's groups
    absmax, _ = _group_params(s_ptr, s_ptr, s_ptr, s_ptr, s_ptr, stride_sn, stride_sg, offs_n, offs_g[None, :],
                              (offs_g < K // GROUP_SIZE)[None, :], True, False, False, True, ABSMAX_PAIRED)
    s2 = tl.reshape(tl.broadcast_to(_absmax_half2(absmax, ACT, ABSMAX_PAIRED)[:, :, None], (BLOCK_N, NG, NW // NG)),
                    (BLOCK_N, NW))
    even, odd = _nf4_half_pair(by, s2[:, :, None, None], lut_ptr, ACT)
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))

"""One source of truth per format: a tile of packed words -> a tile of dequantized weights.

Every qlk kernel that reads a :class:`~qlk.formats.QuantizedWeight` (forward GEMM, split-K decode,
input gradient, standalone dequant) calls :func:`_dequant_tile`; nothing else knows the layouts.

Formats (``qlk.formats.packing`` / ``qlk.formats.nf4``), for W [N, K], group j = k // g:

* INT-b (b = 2, 3, 4):  ŵ[n, k] = s[n, j]·(q[n, k] − 2^(b−1)) + c[n, j]   (s, c any float dtype, [N, G])
* NF4:                  ŵ[n, k] = NF4[q[n, k]]·absmax[n·G + j]   (fp32; G = K / blocksize)
  double quant:         absmax[i] = DYN[qa[i]]·absmax2[i // 256] + offset
  (the large-M GEMMs get absmax de-nested at launch, ``weight_args(qw, denest_absmax=True)``;
  NF4 lookup and de-nesting: :mod:`qlk.kernels.nf4_tile`)

The NF4 bytes (flat, row-major, even element in the HIGH nibble) are read as int32 words: byte j of a
word sits at bits 8j (little endian), so element 8w + i of a row sits at bits 4·(i ^ 1). With
K % 8 == 0 a row is a whole number of words, exactly like INT4 with a different nibble order.

Why the unpacking looks the way it does: each int32 word is loaded once as a [BLOCK_N, BLOCK_K/per]
tile and expanded in registers by a broadcast shift (each thread owns whole words, so the reshape
to [BLOCK_N, BLOCK_K] moves no data). Codes become floats through the exponent bits,
``float(q | 0x4B000000) - (2^23 + 2^(b−1))`` (exact for q < 2^23): one LOP3 + one FADD instead of an I2F, which
costs 8 issue cycles per warp instruction. Scales/biases are loaded once per (row, group) of the
tile — BLOCK_K may span several groups (g = 32 with BLOCK_K = 128 loads 4 scale columns) — and
broadcast over the group in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.nf4 import NESTED_BLOCKSIZE, dynamic_map, nf4_table
from ..formats.quantized_weight import QuantizedWeight
from .nf4_tile import NF4_SHUFFLE, _nf4_pair_values
from .nf4_tile import denest_absmax as denest_absmax_buffer

@triton.jit
def _load_words(qw_ptr, stride_qn, offs_n, k0, K, PER: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int32 words of columns k0 .. k0+BLOCK_K of rows ``offs_n`` for a format of PER codes per
    word (INT4 and NF4: 8, INT2: 16), as a [len(offs_n), BLOCK_K/PER] tile; k0 a multiple of PER.
    Unless EVEN_K, words past the row's last one read 0. Every INT2/INT4/NF4 unpacker loads here."""
    NW: tl.constexpr = BLOCK_K // PER
    offs_w = k0 // PER + tl.arange(0, NW)
    ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :]
    if EVEN_K:
        words = tl.load(ptrs)
    else:
        words = tl.load(ptrs, mask=offs_w[None, :] < tl.cdiv(K, PER), other=0)
    return words


@triton.jit
def _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The INT3 words of columns k0 .. k0+BLOCK_K of rows ``offs_n``, as three [len(offs_n), BLOCK_K/32]
    tiles (w0, w1, w2), one per word of a chunk: chunk c = 3 words; word 3c+h holds the low 2 bits of
    column 32c+16h+i at bit 2i, word 3c+2 the high bit of column 32c+i at bit i. Unless EVEN_K,
    chunks past the row's last one read 0. Every INT3 unpacker (forward, transposed, decode) loads here."""
    NC: tl.constexpr = BLOCK_K // 32
    offs_c = k0 // 32 + tl.arange(0, NC)
    base = qw_ptr + offs_n[:, None] * stride_qn + 3 * offs_c[None, :]
    if EVEN_K:
        w0 = tl.load(base)
        w1 = tl.load(base + 1)
        w2 = tl.load(base + 2)
    else:
        mask = offs_c[None, :] < tl.cdiv(K, 32)
        w0 = tl.load(base, mask=mask, other=0)
        w1 = tl.load(base + 1, mask=mask, other=0)
        w2 = tl.load(base + 2, mask=mask, other=0)
    return w0, w1, w2


@triton.jit
def _unpack_codes(qw_ptr, stride_qn, offs_n, k0, K,
                  BITS: tl.constexpr, IS_NF4: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes [BLOCK_N, BLOCK_K] of columns k0 .. k0+BLOCK_K of rows ``offs_n`` (all < N).

    k0 must be a multiple of the chunk (8, 16 or 32 columns). Unless EVEN_K, columns past the
    row's last word read code 0.

    Neighbouring codes are produced in pairs: a broadcast dim indexes the pair inside the word, and
    ``tl.join`` (a dim held in registers) the two codes of the pair. That is how the MMA operand
    layouts hold k (k = ... + 2·lane + e), so the compiler can place each lane on its own bytes of
    the word and needs no layout conversion between the unpacking and the MMA."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        # bit planes: chunk c = 3 words; word 3c+h holds the low 2 bits of column 32c+16h+i at bit 2i,
        # word 3c+2 the high bit of column 32c+i at bit i
        w0, w1, w2 = _load_int3_planes(qw_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_K)
        p = tl.arange(0, 16)[None, None, :]  # pair p = columns 2p, 2p+1 of the chunk
        low = tl.where(p < 8, w0[:, :, None], w1[:, :, None]) >> ((p % 8) * 4)
        high = w2[:, :, None] >> (2 * p)
        first = (low & 3) | ((high & 1) << 2)
        second = ((low >> 2) & 3) | ((high & 2) << 1)
        codes = tl.join(first, second)
    else:
        PER: tl.constexpr = 32 // BITS  # codes per word
        words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, PER, EVEN_K, BLOCK_K)
        # shift amounts are per-lane constants: each code costs one SHF + one LOP3 (mask | magic)
        shift = tl.arange(0, PER // 2)[None, None, :] * (2 * BITS)
        first = (words[:, :, None] >> shift) & MASK
        second = (words[:, :, None] >> (shift + BITS)) & MASK
        if IS_NF4:
            codes = tl.join(second, first)  # even element in the high nibble of its byte
        else:
            codes = tl.join(first, second)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_values(qw_ptr, lut_ptr, stride_qn, offs_n, k0, K,
                EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 NF4[q] [BLOCK_N, BLOCK_K] of columns k0 .. k0+BLOCK_K of rows ``offs_n``.

    Byte i of each word, ``word >> 8i`` (a broadcast dim, as INT4's pairs), holds an (even, odd)
    code pair; ``tl.join`` puts the pair in registers in the MMA operand's k order. Compiled
    (NF4_SHUFFLE): both codes are looked up by warp shuffle from a register table
    (:func:`qlk.kernels.nf4_tile._nf4_pair_values`: one SHFL per code, no memory). Interpreter:
    one gather per byte from a 256-entry int64 table (``nf4_byte_table``): entry b holds
    NF4[b >> 4] (the even element) in its low 32 bits and NF4[b & 15] in the high 32 bits."""
    words = _load_words(qw_ptr, stride_qn, offs_n, k0, K, 8, EVEN_K, BLOCK_K)
    shifted = words[:, :, None] >> (tl.arange(0, 4)[None, None, :] * 8)
    even, odd = _nf4_byte_values(shifted, lut_ptr)
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_byte_values(byte, lut_ptr):
    """fp32 (NF4[b >> 4], NF4[b & 15]) of the low byte b of int32 ``byte`` (the even and the odd
    element of an NF4 byte): warp shuffles when compiled (NF4_SHUFFLE), the 256-entry byte table
    ``lut_ptr`` (``nf4_byte_table``) under the interpreter."""
    if NF4_SHUFFLE:
        even, odd = _nf4_pair_values(byte)
    else:
        pair = tl.load(lut_ptr + (byte & 0xFF))
        even = pair.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _group_params(s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                  offs_n, offs_g, mask_g,
                  IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                  STORED_DTYPE: tl.constexpr = False):
    """fp32 scale and bias of groups ``offs_g`` (any shape broadcastable with offs_n[:, None]),
    zero where ``mask_g`` is false (only looked at unless EVEN_K). STORED_DTYPE (INT formats only):
    in the dtype they are stored in instead (the decode tile converts once, to the activation dtype).

    NF4: scale = absmax (de-nested when double-quantized), bias = 0 (HAS_BIAS is False)."""
    if IS_NF4 and not DOUBLE_QUANT:
        # the de-nested absmax at a 64-bit row base: the forward's loops hoist it (NF4 64x128x128
        # sm_90: 564 -> 560 instructions); INT tiles and the in-loop de-nesting keep the 32-bit
        # product, shorter in theirs
        idx = (offs_n[:, None] * stride_sn).to(tl.int64) + offs_g * stride_sg
    else:
        idx = offs_n[:, None] * stride_sn + offs_g * stride_sg
    if IS_NF4 and DOUBLE_QUANT:
        if EVEN_K:
            qa = tl.load(s_ptr + idx).to(tl.int32)
            nested = tl.load(am_scale_ptr + idx // 256)
        else:
            qa = tl.load(s_ptr + idx, mask=mask_g, other=0).to(tl.int32)
            nested = tl.load(am_scale_ptr + idx // 256, mask=mask_g, other=0.0)
        # two roundings (product, then sum) as the reference; the kernels that must match it
        # bit for bit launch with enable_fp_fusion=False
        scale = tl.load(dyn_ptr + qa) * nested + tl.load(am_offset_ptr)
        if not EVEN_K:
            scale = tl.where(mask_g, scale, 0.0)
    else:
        if EVEN_K:
            scale = tl.load(s_ptr + idx)
        else:
            scale = tl.load(s_ptr + idx, mask=mask_g, other=0.0)
        if not STORED_DTYPE:
            scale = scale.to(tl.float32)
    if HAS_BIAS:
        if EVEN_K:
            bias = tl.load(b_ptr + idx)
        else:
            bias = tl.load(b_ptr + idx, mask=mask_g, other=0.0)
        if not STORED_DTYPE:
            bias = bias.to(tl.float32)
    else:
        bias = tl.zeros_like(scale)
    return scale, bias


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                  stride_qn, stride_sn, stride_sg,
                  offs_n, k0, K,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 Ŵ[offs_n, k0 : k0 + BLOCK_K] ([BLOCK_N, BLOCK_K]).

    INT: ŵ = s·(q − 2^(BITS−1)) + c.  NF4: ŵ = NF4[q]·absmax.  k0 must be a multiple of BLOCK_K.
    Rows ``offs_n`` must all be valid (< N): callers clamp them (their results are never stored,
    or meet a zero operand), which keeps row masks out of the loop. Unless EVEN_K
    (K % BLOCK_K == 0), columns >= K come out exactly 0."""
    if IS_NF4:
        q = _nf4_values(qw_ptr, lut_ptr, stride_qn, offs_n, k0, K, EVEN_K, BLOCK_N, BLOCK_K)
    else:
        codes = _unpack_codes(qw_ptr, stride_qn, offs_n, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_N, BLOCK_K)
        # the bias is the middle code's value (ŵ = s·(q − m) + c): −m rides on the same FADD
        MID: tl.constexpr = 1 << (BITS - 1)
        q = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + MID)
    HAS_BIAS: tl.constexpr = not IS_NF4
    G = K // GROUP_SIZE
    if (GROUP_SIZE & (GROUP_SIZE - 1)) == 0:
        # NG groups per tile (1 when the group is at least the tile): load [BLOCK_N, NG] once and
        # broadcast over the group in registers
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
        SPAN: tl.constexpr = BLOCK_K // NG
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
        s, b = _group_params(s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                             offs_n, offs_g[None, :], (offs_g < G)[None, :], IS_NF4, DOUBLE_QUANT, HAS_BIAS,
                             EVEN_K)
        q3 = tl.reshape(q, (BLOCK_N, NG, SPAN))
        if HAS_BIAS:
            w = q3 * s[:, :, None] + b[:, :, None]
        else:
            w = q3 * s[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        # a group size that is not a power of two: one (cached) scale gather per element
        offs_k = k0 + tl.arange(0, BLOCK_K)
        j = (offs_k // GROUP_SIZE)[None, :]
        s, b = _group_params(s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, dyn_ptr, stride_sn, stride_sg,
                             offs_n, j, j < G, IS_NF4, DOUBLE_QUANT, HAS_BIAS, EVEN_K)
        if HAS_BIAS:
            w = q * s + b
        else:
            w = q * s
    return w


# ------------------------------------------------------------------------------------------------
# Python side: a QuantizedWeight -> the kernel arguments of _dequant_tile
# ------------------------------------------------------------------------------------------------
_DUMMY = {}


def _dummy(device) -> torch.Tensor:
    dummy = _DUMMY.get(device)
    if dummy is None:
        dummy = _DUMMY[device] = _DUMMY.get(str(device)) or torch.zeros(1, dtype=torch.float32, device=device)
        _DUMMY[str(device)] = dummy
    return dummy


_BYTE_TABLES = {}


def nf4_byte_table(device) -> torch.Tensor:
    """int64 [256]: for a packed NF4 byte b, NF4[b >> 4] (fp32 bits) | NF4[b & 15] (fp32 bits) << 32."""
    key = str(torch.device(device))
    if key not in _BYTE_TABLES:
        bits = nf4_table("cpu").view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256)
        _BYTE_TABLES[key] = (bits[b >> 4] | (bits[b & 15] << 32)).to(device)
    return _BYTE_TABLES[key]


#: the largest element offset the kernels compute into a weight's buffers: they address packed
#: words, scales, biases and absmax with 32-bit row offsets (row · row stride, int32), not int64
#: ones (round 27: the input gradient's N loop recomputed a 64-bit product a row and iteration,
#: 8 IMAD + 16 LEA of the NF4 64x128x128 loop's 612 instructions)
INDEX_LIMIT = 2**31 - 1
#: rows past the last one a tile may form an offset for (masked or clamped, never read): the
#: widest tile's rows, so that no such product wraps either
INDEX_SLACK_ROWS = 512


def _index_reach(rows: int, row_stride: int, row_span: int) -> int:
    """The largest element offset a kernel may form into a buffer of ``rows`` rows ``row_stride``
    elements apart, each spanning offsets 0 .. ``row_span`` − 1, with :data:`INDEX_SLACK_ROWS`."""
    return (rows - 1 + INDEX_SLACK_ROWS) * row_stride + row_span - 1


def _index_reaches(qw: QuantizedWeight) -> dict[str, int]:
    """:func:`_index_reach` of each buffer of ``qw`` as the kernels index it (``weight_args``'s
    strides: NF4's bytes as int32 words [N, K/8], its absmax as [N, K/blocksize])."""
    n, k = qw.shape
    if qw.fmt == "int":
        q = qw.qweight
        reach = {"qweight": _index_reach(n, q.stride(0), q.shape[1] * q.stride(1))}
        for name in ("scales", "biases"):
            t = getattr(qw, name)
            reach[name] = _index_reach(n, t.stride(0), (t.shape[1] - 1) * t.stride(1) + 1)
        return reach
    g = k // qw.group_size
    return {"qweight": _index_reach(n, k // 8, k // 8), "absmax": _index_reach(n, g, g)}


def _memo(qw) -> dict | None:
    """``qw.launch_memo()`` (:class:`QuantizedWeight`), None for another object."""
    launch_memo = getattr(qw, "launch_memo", None)
    return launch_memo() if launch_memo is not None else None


def supports(qw: QuantizedWeight) -> str | None:
    """None when the kernels read ``qw`` as is, else the reason they cannot (callers then run the
    torch reference: slower, never wrong). Remembered in ``qw.launch_memo()``: it depends on the
    format fields and the tensors' shapes and strides only."""
    memo = _memo(qw)
    if memo is None:
        return _supports(qw)
    key = ("supports", INDEX_LIMIT, INDEX_SLACK_ROWS)  # the limits are module settings (tests lower them)
    if key not in memo:
        memo[key] = _supports(qw)
    return memo[key]


def _supports(qw: QuantizedWeight) -> str | None:
    n, k = qw.shape
    if qw.fmt == "int":
        if qw.bits not in (2, 3, 4):
            return f"bits={qw.bits}"
        if k % qw.group_size:
            return f"in_features={k} is not a multiple of group_size={qw.group_size}"
    elif qw.fmt == "nf4":
        if k % qw.group_size or k % 8:
            return f"NF4 in_features={k} is not a multiple of blocksize={qw.group_size} (blocks straddle rows)"
    else:
        return f"fmt={qw.fmt!r}"
    name, reach = max(_index_reaches(qw).items(), key=lambda kv: kv[1])
    if reach > INDEX_LIMIT:
        return (f"{name} spans {reach} elements with a tile's slack, past the kernels' 32-bit offsets "
                f"({INDEX_LIMIT}); quantize the layer in parts below that size to use the fused kernels")
    return None


@triton.jit
def aligned_rows(stride_qn, QN_ALIGN: tl.constexpr):
    """``stride_qn`` itself, written so that the compiler knows it is a multiple of QN_ALIGN
    (:func:`qlk.kernels.config.packed_rows_kernel` computes QN_ALIGN from the value, so the
    rounding never changes it): rows of packed words then start 4·QN_ALIGN-byte aligned, and
    loads of consecutive words vectorize up to 16 B."""
    if QN_ALIGN > 1:
        stride_qn = stride_qn // QN_ALIGN * QN_ALIGN
    return stride_qn


def weight_args(qw: QuantizedWeight, denest_absmax: bool = False,
                pair_act: torch.dtype | None = None) -> tuple[tuple, dict]:
    """(positional tensor/int args, constexpr kwargs) describing ``qw`` to :func:`_dequant_tile`.

    Order: qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn,
    stride_sn, stride_sg. No copies for qlk-packed weights (NF4 bytes are viewed as int32 words;
    a misaligned view is copied once).

    ``denest_absmax`` (double-quantized NF4 only): de-nest absmax once into an fp32 [N, G] buffer
    (:func:`qlk.kernels.nf4_tile.denest_absmax`, bit-identical to the reference) that the kernel
    reads like a plain absmax (``DOUBLE_QUANT=False``); the large-M GEMMs ask for it. False (default)
    keeps the 8-bit codes and de-nests inside the K loop: decode and the memory-bound dequantize,
    where a second launch and pass would cost more than the loop's de-nesting.

    ``pair_act`` (fp16 / bf16, with ``denest_absmax``; round 26): the buffer holds each absmax rounded
    to ``pair_act`` in both 16-bit halves of an int32 (``denest_absmax(qw, pair=...)``) and the meta
    says so (``ABSMAX_PAIRED=True``): only for a kernel that takes that flag (the forward GEMM) and
    activations of that dtype. Ignored for any other weight (plain NF4, INT, absmax blocks that are not
    a power of two of whole words).

    Remembered in ``qw.launch_memo()`` when the arguments are ``qw``'s own tensors or views of them
    (not a copy, not the de-nested absmax, whose values are computed from the data)."""
    memo = _memo(qw)
    key = ("weight_args", bool(denest_absmax and qw.double_quant), pair_act, INDEX_LIMIT, INDEX_SLACK_ROWS)
    if memo is not None and key in memo:
        return memo[key]
    args, meta, own = _weight_args(qw, denest_absmax, pair_act)
    if memo is not None and own:
        memo[key] = args, meta
    return args, meta


def _weight_args(qw: QuantizedWeight, denest_absmax: bool, pair_act) -> tuple[tuple, dict, bool]:
    """:func:`weight_args` and whether the arguments are ``qw``'s tensors (or views of them)."""
    reason = supports(qw)
    if reason is not None:
        raise ValueError(f"qlk kernels cannot read this QuantizedWeight: {reason}")
    n, k = qw.shape
    dev = qw.qweight.device
    dummy = _dummy(dev)
    g = k // qw.group_size
    if qw.fmt == "int":
        qweight = qw.qweight
        if qweight.stride(-1) != 1:
            qweight = qweight.contiguous()
        scales, biases = qw.scales, qw.biases
        if biases.stride() != scales.stride():
            scales, biases = scales.contiguous(), biases.contiguous()
        args = (qweight, scales, biases, dummy, dummy, dummy, dummy,
                qweight.stride(0), scales.stride(0), scales.stride(1))
        own = qweight is qw.qweight and scales is qw.scales
        return args, dict(BITS=qw.bits, GROUP_SIZE=qw.group_size, IS_NF4=False, DOUBLE_QUANT=False), own
    raw = qw.qweight.reshape(-1)
    own = raw.storage_offset() % 4 == 0 and raw.is_contiguous() and raw.data_ptr() == qw.qweight.data_ptr()
    if not own:
        raw = raw.contiguous().clone()
    words = raw.view(torch.int32).view(n, k // 8)
    lut = nf4_byte_table(dev)
    if qw.double_quant and denest_absmax:
        g_size = qw.group_size  # the half2 tiles' case: absmax blocks of whole words, a power of two
        paired = pair_act in (torch.float16, torch.bfloat16) and g_size >= 8 and g_size & (g_size - 1) == 0
        absmax = denest_absmax_buffer(qw, pair=pair_act if paired else None)
        meta = dict(BITS=4, GROUP_SIZE=qw.group_size, IS_NF4=True, DOUBLE_QUANT=False)
        return ((words, absmax, dummy, dummy, dummy, lut, dummy, k // 8, g, 1),
                dict(meta, ABSMAX_PAIRED=True) if paired else meta, False)
    if qw.double_quant:
        assert NESTED_BLOCKSIZE == 256  # _group_params hard-codes it
        args = (words, qw.absmax, dummy, qw.absmax_scale, qw.absmax_offset, lut, dynamic_map(dev), k // 8, g, 1)
    else:
        args = (words, qw.absmax, dummy, dummy, dummy, lut, dummy, k // 8, g, 1)
    return args, dict(BITS=4, GROUP_SIZE=qw.group_size, IS_NF4=True, DOUBLE_QUANT=qw.double_quant), own

"""Import of GPTQ checkpoints (AutoGPTQ / GPTQModel, 2/3/4-bit, v1 and v2 zeros, act-order).

A GPTQ linear stores, for W [N, K] with G groups:

    qweight  int32 [K·bits/32, N]   codes packed along K as one little-endian bit stream per column
    qzeros   int32 [G, N·bits/32]   integer zero points packed along N the same way
    scales   fp16  [G, N]
    g_idx    int32 [K]              group of each input row (a permutation under act-order)

    ŵ[n, k] = scales[g, n] · (q[k, n] − z[g, n]),  g = g_idx[k]
    z = stored + 1  (checkpoint_format="gptq", v1; read as GPTQModel does, see :func:`v1_zeros`)
    z = stored      ("gptq_v2")

qlk keeps contiguous groups, so an act-order checkpoint imports with the input permutation
``perm = argsort(g_idx)``: the stored columns are the inputs sorted by group. Codes are kept
as they are; the bias is the middle code's value c = s·(2^(bits−1) − z) (in ``scale_dtype``), so
ŵ = s·(q − 2^(bits−1)) + c (see :mod:`qlk.formats.int_group`).
"""
from __future__ import annotations

import torch

from .._checks import check_int_bits, check_tensor
from .packing import pack_codes
from .quantized_weight import QuantizedWeight, validate

FORMATS = ("gptq", "gptq_v2")


def unpack_bit_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Values 0..count-1 of the little-endian bit stream that each column of ``words`` [R, C]
    forms (value v at bit offset bits·v, straddling word boundaries for 3-bit). -> int64 [count, C]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])])  # a zero word so the straddle read never overruns
    pos = torch.arange(count, device=words.device) * bits
    word, off = pos // 32, (pos % 32)[:, None]
    both = w[word] | (w[word + 1] << 32)
    return (both >> off) & ((1 << bits) - 1)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Convert one GPTQ linear to a qlk INT ``QuantizedWeight`` (see the module docstring).

    ``checkpoint_format`` is ``"gptq"`` (v1, zeros stored minus one, the default for checkpoints
    without a marker) or ``"gptq_v2"``. ``scale_dtype`` defaults to the dtype of ``scales``.
    """
    check_int_bits(bits)
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; allowed: {FORMATS}")
    check_tensor(qweight, "qweight", torch.int32, ndim=2)
    check_tensor(qzeros, "qzeros", torch.int32, ndim=2)
    check_tensor(scales, "scales", (torch.float16, torch.bfloat16, torch.float32), ndim=2, device=qweight.device)
    check_tensor(qzeros, "qzeros", device=qweight.device)
    if (qweight.shape[0] * 32) % bits:
        raise ValueError(f"qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit codes")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if g_idx is None:
        if group_size <= 0 or k % group_size:
            raise ValueError(f"qweight holds in_features={k}, not divisible by group_size={group_size}")
        g_idx = torch.arange(k, device=qweight.device) // group_size
    check_tensor(g_idx, "g_idx", (torch.int32, torch.int64), shape=(k,))
    groups = k // group_size if group_size > 0 and k % group_size == 0 else -1
    if groups < 0 or scales.shape != (groups, n):
        raise ValueError(
            f"scales has shape {tuple(scales.shape)}; bits={bits}, group_size={group_size} and qweight "
            f"{tuple(qweight.shape)} (in={k}, out={n}) need [{k // max(group_size, 1)}, {n}]"
        )
    zero_words = -(-n * bits // 32)
    check_tensor(qzeros, "qzeros", shape=(groups, zero_words))
    g_idx = g_idx.to(torch.int64)
    if g_idx.min() < 0 or g_idx.max() >= groups or not torch.all(torch.bincount(g_idx, minlength=groups) == group_size):
        raise ValueError(f"g_idx must assign exactly group_size={group_size} input rows to each of the {groups} groups")

    q = unpack_bit_stream(qweight, bits, k)  # [K, N]
    z = v1_zeros(qzeros, bits, n) if checkpoint_format == "gptq" else _unpack_rows(qzeros, bits, n)  # [G, N]
    perm = None
    if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
        perm = torch.argsort(g_idx, stable=True)
        q = q[perm]
    sdt = scale_dtype or scales.dtype
    if sdt not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scale_dtype={sdt}; allowed: torch.float16, torch.bfloat16, torch.float32")
    s32 = scales.to(torch.float32).t()  # [N, G]
    qw = QuantizedWeight(
        fmt="int", shape=(n, k), bits=bits, group_size=group_size,
        qweight=pack_codes(q.t(), bits), scales=s32.to(sdt).contiguous(),
        biases=(s32 * ((1 << (bits - 1)) - z.t().to(torch.float32))).to(sdt).contiguous(), perm=perm,
        dtype=scales.dtype,
    )  # fmt: skip
    validate(qw, "GPTQ import")
    return qw


def v1_zeros(qzeros: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The zero points of a v1 (``checkpoint_format="gptq"``) ``qzeros`` [G, words], read as
    GPTQModel reads them (its v1 -> v2 conversion), int64 [G, count]:

    * 2- and 4-bit: add 1 to every field *as one 32-bit word* (``qzeros + 0x55555555`` /
      ``0x11111111``, wrapping): a field stored as all ones (a zero point of 0, which GPTQModel's
      v2 -> v1 writer stores by a word subtraction that borrowed from the next field) becomes 0
      and carries into the next field, undoing the borrow exactly.
    * 3-bit (fields straddle words): add 1 to each field modulo 8, as GPTQModel does there.

    For zero points 1 .. 2^bits − 1 (every v1 checkpoint AutoGPTQ could write correctly) all three
    readings equal stored + 1; they differ only for a zero point of 0, where the per-field
    stored + 1 = 2^bits of older kernels is wrong on most of the group's elements.
    """
    if bits == 3:
        return (_unpack_rows(qzeros, bits, count) + 1) & 0x7
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
    return _unpack_rows(words, bits, count)


def _unpack_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Values packed along each ROW of ``words`` [R, C] -> int64 [R, count]."""
    return unpack_bit_stream(words.t(), bits, count).t()


def dequantize_gptq(qweight, qzeros, scales, g_idx=None, bits=4, group_size=128, checkpoint_format="gptq"):
    """The GPTQ formula itself in float32, W [N, K] in the original input order (an oracle)."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // group_size
    q = unpack_bit_stream(qweight, bits, k).float()
    z = (v1_zeros(qzeros, bits, n) if checkpoint_format == "gptq" else _unpack_rows(qzeros, bits, n)).float()
    gi = g_idx.long()
    return (scales.float()[gi] * (q - z[gi])).t()

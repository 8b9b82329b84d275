"""Independent float64 oracles for the kernel tests, written from the documented formats.

Nothing here calls ``qlk.reference``, ``QuantizedWeight.dequantize``, ``qlk.formats.unpack_codes``
or any other qlk code path: the codes are read bit by bit from the layouts of docs/formats.md and
qlk/formats/packing.py's docstring, one column at a time, with plain integer arithmetic. A bug in
qlk's own unpacker therefore cannot hide a matching bug in a kernel.

* :func:`int_dequant64`   INT-b:  ŵ[n, k] = s[n, j]·(q[n, k] − 2^(b−1)) + c[n, j],  j = k // g
* :func:`nf4_dequant64`   NF4:    ŵ = NF4[q]·absmax[(n·K + k) // blocksize], bytes flat row-major,
                          even element in the high nibble; double quant:
                          absmax[i] = DYN[qa[i]]·absmax2[i // 256] + offset
* :func:`bnb_weight`      a weight quantized *and* dequantized by bitsandbytes itself
* :func:`qalora_forward64` / :func:`qalora_backward64`  QA-LoRA from the paper's formula (Xu et al.
  2023, eq. 4–5): mean-pool each group of g consecutive inputs, then A, B and σ, computed with
  explicit loops over the groups (no repeat_interleave, no reshape trick shared with qlk).
"""
from __future__ import annotations

import torch

#: the 16 NF4 values of QLoRA (Dettmers et al. 2023, appendix E) as printed in bitsandbytes
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
NESTED_BLOCK = 256  # bitsandbytes' blocksize of the second (absmax) quantization


def _u32(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their unsigned bit patterns as int64."""
    return words.to(torch.int64) & 0xFFFFFFFF


def int_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Codes [N, K] (int64) read column by column from the documented INT-b layout.

    INT4 / INT2: column c sits in word c // (32/b) at bit b·(c mod 32/b).
    INT3 (bit planes, chunks of 32 columns in 3 words): column c = 32·ch + i has its low two bits in
    word 3·ch + i // 16 at bit 2·(i mod 16) and its high bit in word 3·ch + 2 at bit i."""
    w = _u32(qweight.cpu())
    n = w.shape[0]
    out = torch.empty(n, k, dtype=torch.int64)
    for c in range(k):
        if bits == 3:
            ch, i = divmod(c, 32)
            low = (w[:, 3 * ch + i // 16] >> (2 * (i % 16))) & 3
            high = (w[:, 3 * ch + 2] >> i) & 1
            out[:, c] = low | (high << 2)
        else:
            per = 32 // bits
            out[:, c] = (w[:, c // per] >> (bits * (c % per))) & ((1 << bits) - 1)
    return out


def int_dequant64(qw) -> torch.Tensor:
    """float64 Ŵ [N, K] of an INT-b weight (stored column order; no act-order permutation)."""
    n, k = qw.shape
    g = qw.group_size
    q = int_codes(qw.qweight, qw.bits, k).double()
    cols = torch.arange(k) // g  # the group of each column
    s = qw.scales.cpu().double()[:, cols]
    c = qw.biases.cpu().double()[:, cols]
    return s * (q - 2 ** (qw.bits - 1)) + c


def dynamic_map64() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (the nested absmax code book), from bitsandbytes when it
    is installed; else qlk's copy of that constant table (the only qlk value an oracle uses)."""
    try:
        import bitsandbytes.functional as bnbf

        return bnbf.create_dynamic_map(signed=True).double()
    except ImportError:  # pragma: no cover - bitsandbytes is in requirements-test.txt
        from qlk.formats.nf4 import dynamic_map

        return dynamic_map().double()


def nf4_absmax64(qw) -> torch.Tensor:
    """float64 absmax per block: de-nested per the bitsandbytes double-quant formula."""
    if qw.absmax_scale is None:
        return qw.absmax.cpu().double()
    codes = qw.absmax.cpu().to(torch.int64)
    nested = qw.absmax_scale.cpu().double()
    idx = torch.arange(codes.numel()) // NESTED_BLOCK
    return dynamic_map64()[codes] * nested[idx] + qw.absmax_offset.cpu().double().reshape(())


def nf4_dequant64(qw) -> torch.Tensor:
    """float64 Ŵ [N, K] of an NF4 weight: element e = n·K + k of the flat weight is nibble
    (e even: high, e odd: low) of byte e // 2; its block is e // blocksize."""
    n, k = qw.shape
    raw = qw.qweight.cpu().reshape(-1).to(torch.int64)
    e = torch.arange(n * k)
    byte = raw[e // 2]
    code = torch.where(e % 2 == 0, byte >> 4, byte & 15)
    table = torch.tensor(NF4, dtype=torch.float64)
    return (table[code] * nf4_absmax64(qw)[e // qw.group_size]).reshape(n, k)


def nf4_dequant_act(qw, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ [N, K] (float64) as the fused kernels decode NF4 for fp16/bf16 activations (round 21):
    ŵ = rnd(rnd(NF4[q])·rnd(absmax)), rnd = round to nearest even in ``dtype``, the absmax de-nested
    in fp32 as bitsandbytes does it (product rounded, then the sum). Each product of two 16-bit
    floats is exact in float64 (and in fp32), so the last rounding is the only one of the product."""
    n, k = qw.shape
    if qw.absmax_scale is None:
        absmax = qw.absmax.cpu().float()
    else:
        codes = qw.absmax.cpu().to(torch.int64)
        idx = torch.arange(codes.numel()) // NESTED_BLOCK
        absmax = dynamic_map64().float()[codes] * qw.absmax_scale.cpu().float()[idx]
        absmax = absmax + qw.absmax_offset.cpu().float().reshape(())
    raw = qw.qweight.cpu().reshape(-1).to(torch.int64)
    e = torch.arange(n * k)
    byte = raw[e // 2]
    code = torch.where(e % 2 == 0, byte >> 4, byte & 15)
    table = torch.tensor(NF4, dtype=torch.float64).to(dtype).double()
    scale = absmax.to(dtype).double()
    return (table[code] * scale[e // qw.group_size]).to(dtype).double().reshape(n, k)


def dequant64(qw) -> torch.Tensor:
    """float64 Ŵ [N, K] in the stored column order, from the documented layout of either format."""
    return int_dequant64(qw) if qw.fmt == "int" else nf4_dequant64(qw)


def bnb_weight(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """(qlk QuantizedWeight imported from bitsandbytes' own quantization of ``w``, float64 Ŵ as
    bitsandbytes' own ``dequantize_4bit`` gives it). Needs bitsandbytes (callers importorskip)."""
    import bitsandbytes.functional as bnbf

    import qlk

    packed, state = bnbf.quantize_4bit(w.float().cpu(), blocksize=blocksize, quant_type="nf4",
                                       compress_statistics=double_quant)
    ref = bnbf.dequantize_4bit(packed, state).double()
    return qlk.from_bnb(packed, state), ref


# ------------------------------------------------------------------------------------ QA-LoRA
def pool64(x: torch.Tensor, g: int) -> torch.Tensor:
    """P(X)[m, j] = (1/g)·Σ_{i<g} X[m, j·g + i], one group at a time (float64)."""
    x = x.double().reshape(-1, x.shape[-1])
    groups = x.shape[1] // g
    return torch.stack([x[:, j * g:(j + 1) * g].sum(1) / g for j in range(groups)], dim=1)


def qalora_forward64(x, w64, a, b, sigma, g, bias=None):
    """(Y, P): Y = X·Ŵᵀ + σ·(P(X)·Aᵀ)·Bᵀ (+ bias), P(X) the group means of X (QA-LoRA eq. 4)."""
    x2 = x.double().reshape(-1, x.shape[-1])
    p = pool64(x2, g)
    y = x2 @ w64.t() + sigma * (p @ a.double().t()) @ b.double().t()
    if bias is not None:
        y = y + bias.double()
    return y, p


def qalora_backward64(x, dy, w64, a, b, sigma, g):
    """(dX, dA, dB) of :func:`qalora_forward64` by the chain rule, with U = P·Aᵀ, V = dY·B:
    dB = σ·dYᵀ·U, dA = σ·Vᵀ·P, dX = dY·Ŵ + σ·(V·A)·∂P/∂X where ∂P[m, j]/∂X[m, k] = 1/g for k in j."""
    x2 = x.double().reshape(-1, x.shape[-1])
    dy2 = dy.double().reshape(-1, dy.shape[-1])
    p = pool64(x2, g)
    a, b = a.double(), b.double()
    u, v = p @ a.t(), dy2 @ b
    dpool = sigma * v @ a  # dL/dP [M, G]
    dx = dy2 @ w64
    for j in range(p.shape[1]):
        dx[:, j * g:(j + 1) * g] += dpool[:, j:j + 1] / g
    return dx, sigma * v.t() @ p, sigma * dy2.t() @ u


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; any NaN/Inf in ``out`` gives inf (a poisoned value left over)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))

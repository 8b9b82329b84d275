"""QA-LoRA on the fused kernels: Y = X·Ŵᵀ + σ·P(X)·Aᵀ·Bᵀ (+ bias) and dX = dY·Ŵ + (σ/g)·expand_g(V·A).

Notation (docs/design.md): W [N, K], g = qw.group_size, G = K/g, P(X)[m, j] = mean of
X[m, k] over group j (stored column order, i.e. after ``x[..., qw.perm]``), A = lora_a [r, G],
B = lora_b [N, r], σ = scaling, V = dY·B.

**The low-rank term is folded into the group biases.** P(X)·Aᵀ·Bᵀ = X·Eᵀ with
E[n, k] = (1/g)·(B·A)[n, j(k)], constant within a group, so

    Y = X·Ŵ'ᵀ,   Ŵ' = s·q + b',   b'[n, j] = b[n, j] + (σ/g)·Σ_r B[n, r]·A[r, j]

(the QA-LoRA merge, done per call by ``_fold_bias_kernel`` into an [N, G] buffer, summed in fp32:
N·G·r FMAs, ~N·G·10 bytes, < 1 % of the GEMM at the Llama-8B shapes, see docs/kernels.md). b' is
fp32, except for the split-N input gradient (M <= 16), which gets it in dy's dtype: fp32 b' needs a
32-bit register per (row, group) of the tile, which made its best (256-row) tile spill; elsewhere
fp32 b' is as fast or faster (static estimates, docs/kernels.md "round 2").
The GEMM then runs unchanged on b' — no r-wide epilogue, no U = P(X)·Aᵀ, no extra MMA — and the
same b' turns the input-gradient kernel into dY·Ŵ' = dY·Ŵ + (σ/g)·expand_g(V·A): the expanded
adapter term costs nothing in that kernel either. The input-gradient launch also computes
V = dY·B, at every M: split-N (M <= 16) in one extra column of programs (one per N slice and M
tile), the GEMM in one extra program per M tile; both load dY and B only, no weight tile.

P(X), the activation the autograd saves, is computed inside the forward GEMM from the X tiles it
already loads, by the programs of the first N tile only (``POOL``; the others branch over it), so
X is not read again. Group sizes that are not powers of two (and, on the split-K decode path,
groups larger than its K tile) pool with one torch reduction instead.

Precision: Ŵ' is rounded once to the activation dtype before the MMA, like Ŵ in the plain kernel,
so the adapter's contribution is rounded together with the base weight (it is what the merged
model computes). On the split-N path b' itself is rounded to dy's dtype first (the dtype Ŵ' is
rounded to anyway, so no new range limit; ≤ ½ ulp of b', the same order as Ŵ''s own rounding);
P(X) is summed in fp32 and returned in fp32.

Formats: INT-b only (QA-LoRA needs per-group biases). NF4, float64, unsupported INT layouts and
bf16 under the Triton interpreter go through the plain-torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as _reference
from ..formats.quantized_weight import QuantizedWeight
from . import fused_matmul as _fm
from .config import INTERPRETED, cdiv, fma_kernel
from .fused_matmul import SPLITK_MAX_M, SPLITN_MAX_M, _as_2d, _forward, _grad_input
from .quant_tile import supports, weight_args

_FOLD_BLOCK_N, _FOLD_BLOCK_G, _FOLD_WARPS = 16, 16, 2  # small tiles: G is only K/g (32 at g=128)


@fma_kernel
@triton.jit
def _fold_bias_kernel(
    out_ptr,  # [N, G] in the activation dtype, strides (stride_sn, stride_sg)
    b_ptr,  # [N, G] group biases, same strides
    lb_ptr,  # lora_b [N, R] (any strides)
    la_ptr,  # lora_a [R, G] (any strides)
    N, G, R, coef,
    stride_sn, stride_sg, stride_lbn, stride_lbr, stride_lar, stride_lag,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """b'[n, j] = b[n, j] + coef·Σ_r B[n, r]·A[r, j] (summed in fp32, stored in out's dtype), one
    [BLOCK_N, BLOCK_G] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_n, mask_g = offs_n < N, offs_g < G
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for r in range(0, R):
        bcol = tl.load(lb_ptr + offs_n.to(tl.int64) * stride_lbn + r * stride_lbr, mask=mask_n, other=0.0)
        arow = tl.load(la_ptr + r * stride_lar + offs_g * stride_lag, mask=mask_g, other=0.0)
        acc += bcol.to(tl.float32)[:, None] * arow.to(tl.float32)[None, :]
    idx = offs_n[:, None] * stride_sn + offs_g[None, :] * stride_sg
    mask = mask_n[:, None] & mask_g[None, :]
    base = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, (base + coef * acc).to(out_ptr.dtype.element_ty), mask=mask)


def _check_adapter(qw: QuantizedWeight, lora_a: torch.Tensor, lora_b: torch.Tensor, what: str) -> None:
    n, k = qw.shape
    if k % qw.group_size:
        raise ValueError(f"{what}: in_features={k} is not a multiple of group_size={qw.group_size}")
    g_count = k // qw.group_size
    if lora_a.dim() != 2 or lora_a.shape[1] != g_count:
        raise ValueError(f"{what}: lora_a must be [r, {g_count}] (r × K/g); got {list(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.shape != (n, r):
        raise ValueError(f"{what}: lora_b must be [{n}, {r}] (N × r); got {list(lora_b.shape)}")


def _kernel_ok(qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    return (qw.fmt == "int" and supports(qw) is None and dtype != torch.float64
            and not (INTERPRETED and dtype == torch.bfloat16))


def _folded_weight_args(qw: QuantizedWeight, lora_a, lora_b, scaling: float, dtype: torch.dtype):
    """weight_args(qw) with the group biases replaced by b' = b + (σ/g)·B·A (in ``dtype``, the
    activations' dtype; the scales' strides)."""
    args, meta = weight_args(qw)
    scales, biases = args[1], args[2]
    n, g_count = scales.shape
    folded = torch.empty_strided(scales.shape, scales.stride(), dtype=dtype, device=scales.device)
    r = lora_a.shape[0]
    grid = (cdiv(n, _FOLD_BLOCK_N), cdiv(g_count, _FOLD_BLOCK_G))
    _fold_bias_kernel[grid](
        folded, biases, lora_b, lora_a, n, g_count, r, float(scaling) / qw.group_size,
        folded.stride(0), folded.stride(1), lora_b.stride(0), lora_b.stride(1), lora_a.stride(0), lora_a.stride(1),
        BLOCK_N=_FOLD_BLOCK_N, BLOCK_G=_FOLD_BLOCK_G, num_warps=_FOLD_WARPS)
    return args[:2] + (folded,) + args[3:], meta


def fold_biases(qw: QuantizedWeight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """b' = b + (σ/g)·B·A as a [N, G] tensor in ``dtype`` (summed in fp32): the folded biases the
    QA-LoRA kernels use (fp32; dy's dtype for the split-N input gradient)."""
    _check_adapter(qw, lora_a, lora_b, "fold_biases")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fold_biases: dtype={dtype}; allowed: torch.float16, torch.bfloat16, torch.float32")
    return _folded_weight_args(qw, lora_a, lora_b, scaling, dtype)[0][2]


def _dense_route(path: str, m: int, split_max_m: int) -> bool:
    """Path "auto" above the split kernels' rows on a GPU, while the fused GEMM is not trusted there
    (:data:`qlk.kernels.fused_matmul.FUSED_GEMM_AUTO`): dequantize + dense GEMMs, the adapter term
    added by its own small products (round 35)."""
    return path == "auto" and m > split_max_m and not INTERPRETED and not _fm.FUSED_GEMM_AUTO


def _qalora_forward_dense(x2, qw, lora_a, lora_b, scaling, bias, out):
    """(Y [M, N], P(X) [M, G] fp32): Y = X·Ŵᵀ (+ bias) by dequantize + GEMM, then
    + σ·(P(X)·Aᵀ)·Bᵀ summed in fp32 and added to Y (one more rounding of Y than the folded-bias
    kernel: ≤ ½ ulp of Y)."""
    pooled = _reference.pool_groups(_reference.to_stored_order(x2, qw).float(), qw.group_size)
    y = _fm.quant_matmul_forward(x2, qw, bias, out=out, path="dequant")
    y.add_(((pooled @ lora_a.float().t()) @ lora_b.float().t()).mul_(scaling).to(y.dtype))
    return y, pooled


def _qalora_grad_input_dense(dy2, qw, lora_a, lora_b, scaling, out):
    """(dX [M, K], V [M, r] fp32): dX = dY·Ŵ by dequantize + GEMM, + (σ/g)·expand_g(V·A) in the
    original column order; V = dY·B with B rounded to dy's dtype, fp32 sums."""
    v = dy2.float() @ lora_b.to(dy2.dtype).float()
    dx = _fm.quant_matmul_grad_input(dy2, qw, out=out, path="dequant")
    dpool = (v @ lora_a.float()).mul_(scaling / qw.group_size)
    dx.add_(_reference.from_stored_order(_reference.expand_groups(dpool, qw.group_size), qw).to(dx.dtype))
    return dx, v


def qalora_forward(x: torch.Tensor, qw: QuantizedWeight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: float, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                   path: str = "auto", deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, P(X)): Y = X·Ŵᵀ + σ·P(X)·Aᵀ·Bᵀ (+ bias) [..., N] in x's dtype, P(X) [..., G] fp32
    (float64 for float64 x), G = K / qw.group_size, pooled over the stored column order.

    x [..., K] fp16/bf16/fp32, any strides; lora_a [r, G], lora_b [N, r] (any float dtype);
    bias [N] or None. out: optional [M, N] output (2-D). path / deterministic: as
    :func:`quant_matmul_forward` (split-K decode at M <= 16)."""
    _check_adapter(qw, lora_a, lora_b, "qalora_forward")
    n, k = qw.shape
    lead = x.shape[:-1]
    g_count = k // qw.group_size
    if not _kernel_ok(qw, x.dtype):
        y = _reference.qalora_forward(x, qw, lora_a, lora_b, scaling, bias)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        pooled = _reference.pool_groups(_reference.to_stored_order(x, qw).to(acc), qw.group_size)
        if out is not None:
            out.copy_(y.reshape(-1, n))
            y = out.reshape(*lead, n)
        return y, pooled
    x2 = _as_2d(x, k, "x")
    if _dense_route(path, x2.shape[0], SPLITK_MAX_M):
        y, pooled = _qalora_forward_dense(x2, qw, lora_a, lora_b, scaling, bias, out)
        return y.reshape(*lead, n), pooled.reshape(*lead, g_count)
    wargs = _folded_weight_args(qw, lora_a, lora_b, scaling, torch.float32)
    y, pooled = _forward(x, qw, bias, out, path, deterministic, wargs=wargs, pool=True)
    return y, pooled.reshape(*lead, g_count)


def qalora_grad_input(dy: torch.Tensor, qw: QuantizedWeight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, *, out: torch.Tensor | None = None, path: str = "auto",
                      deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, V): dX = dY·Ŵ + (σ/g)·expand_g(V·A) [..., K] in dy's dtype (original column order),
    V = dY·B [..., r] in fp32 (float64 for float64 dy).

    dX is one input-gradient launch on the folded biases (the adapter term costs no extra pass
    over dX), and the same launch computes V (extra programs that load dY and B only; B rounded
    to dy's dtype, as the autograd's dY·B, fp32 sums) on every path: no separate V matmul.
    out: optional [M, K] output (2-D, no act-order). path / deterministic: as
    :func:`quant_matmul_grad_input` (split-N at M <= 16)."""
    _check_adapter(qw, lora_a, lora_b, "qalora_grad_input")
    n, k = qw.shape
    lead = dy.shape[:-1]
    dy2 = _as_2d(dy, n, "dy")
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    r = lora_b.shape[1]
    if not _kernel_ok(qw, dy.dtype):
        v = (dy2 @ lora_b.to(dy2.dtype)).to(acc)
        g = qw.group_size
        dpool = (v @ lora_a.to(acc)) * (scaling / g)
        dx = (_reference.quant_matmul_grad_input(dy2, qw).to(acc)
              + _reference.from_stored_order(_reference.expand_groups(dpool, g), qw)).to(dy.dtype)
        if out is not None:
            out.copy_(dx)
            dx = out
        return dx.reshape(*lead, k), v.reshape(*lead, r)
    # b' in dy's dtype on the split-N path (fp32 b' made its best tile spill), fp32 on the GEMM
    # path (16-bit b' there is +6 % or -6 % by format: no gain; docs/kernels.md, round 2)
    if _dense_route(path, dy2.shape[0], SPLITN_MAX_M):
        dx, v = _qalora_grad_input_dense(dy2, qw, lora_a, lora_b, scaling, out)
        return dx.reshape(*lead, k), v.reshape(*lead, r)
    splitn = path == "splitn" or (path in ("auto", "fused") and dy2.shape[0] <= SPLITN_MAX_M)
    wargs = _folded_weight_args(qw, lora_a, lora_b, scaling, dy.dtype if splitn else torch.float32)
    dx, v = _grad_input(dy, qw, out, path, deterministic, wargs=wargs, lora_b=lora_b)
    return dx, v.reshape(*lead, r)

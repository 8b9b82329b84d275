"""Plain-torch math of every qlk op: the oracle of the tests and the CPU fallback.

Notation (``docs/design.md``): W [N, K] (out × in), X [M, K], groups of g consecutive
inputs, G = K/g, σ the adapter scaling. Everything is computed in float32, or float64 when the
input is float64 (the gradcheck and test oracle), and returned in the input dtype.

Quantized base:          Y  = X·Ŵᵀ (+ bias)                dX = dY·Ŵ
QA-LoRA (A [r, G], B [N, r]):
    P(X)[m, j] = (1/g)·Σ_{k∈group j} X[m, k]
    Y  = X·Ŵᵀ + σ·P(X)·Aᵀ·Bᵀ (+ bias)
    with U = P(X)·Aᵀ [M, r] and V = dY·B [M, r]:
    dB = σ·dYᵀ·U,   dA = σ·Vᵀ·P(X),   dX = dY·Ŵ + (σ/g)·expand_g(V·A)
    merge: b'[n, j] = b[n, j] + (σ/g)·(B·A)[n, j]      (exact: codes unchanged)
LoRA (A [r, K], B [N, r], dropout D with mask/(1−p)):
    Y  = X·Ŵᵀ + σ·D(X)·Aᵀ·Bᵀ (+ bias)
    dA = σ·(dY·B)ᵀ·D(X),   dB = σ·dYᵀ·(D(X)·Aᵀ),   dX = dY·Ŵ + σ·D'(dY·B·A)

Under GPTQ act-order (``qw.perm``) the stored columns — and so the QA-LoRA groups — are the
inputs ``perm``: X is gathered before the product and dX scattered back after it.
"""
from __future__ import annotations

import torch

from .formats.quantized_weight import QuantizedWeight


def _acc_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def to_stored_order(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return x if qw.perm is None else x.index_select(-1, qw.perm)


def from_stored_order(dx: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return dx if qw.perm is None else dx.index_select(-1, torch.argsort(qw.perm))


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ [N, K] in the original input order."""
    return qw.dequantize(dtype)


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X·Ŵᵀ (+ bias) for X [..., K]."""
    acc = _acc_dtype(x)
    y = x.to(acc) @ qw.dequantize(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def quant_matmul_grad_input(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """dX = dY·Ŵ for dY [..., N]."""
    acc = _acc_dtype(dy)
    return (dy.to(acc) @ qw.dequantize(acc)).to(dy.dtype)


def pool_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """P(X): the mean of each group of ``group_size`` consecutive inputs, [..., K] -> [..., K/g]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size).mean(-1)


def expand_groups(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each of the G columns repeated g times, [..., G] -> [..., G·g] (the adjoint of g·P)."""
    return v.repeat_interleave(group_size, dim=-1)


def qalora_forward(x, qw, lora_a, lora_b, scaling, bias=None):
    """Y = X·Ŵᵀ + σ·P(X)·Aᵀ·Bᵀ (+ bias); the pooling runs over the stored column order."""
    acc = _acc_dtype(x, lora_a)
    pooled = pool_groups(to_stored_order(x, qw).to(acc), qw.group_size)
    y = quant_matmul(x.to(acc), qw, bias) + scaling * (pooled @ lora_a.to(acc).t()) @ lora_b.to(acc).t()
    return y.to(x.dtype)


def qalora_backward(dy, pooled, qw, lora_a, lora_b, scaling):
    """(dX, dA, dB) from dY and the saved P(X) only (see the module docstring)."""
    acc = _acc_dtype(dy, pooled)
    dy, pooled, a, b = dy.to(acc), pooled.to(acc), lora_a.to(acc), lora_b.to(acc)
    dy2, p2 = dy.reshape(-1, dy.shape[-1]), pooled.reshape(-1, pooled.shape[-1])
    u, v = p2 @ a.t(), dy2 @ b
    grad_b = scaling * dy2.t() @ u
    grad_a = scaling * v.t() @ p2
    dx_adapter = from_stored_order((scaling / qw.group_size) * expand_groups(v @ a, qw.group_size), qw)
    dx = quant_matmul_grad_input(dy2, qw) + dx_adapter
    return dx.reshape(*dy.shape[:-1], qw.in_features), grad_a, grad_b


def lora_forward(x, qw, lora_a, lora_b, scaling, bias=None, dropout_mask=None):
    """Y = X·Ŵᵀ + σ·D(X)·Aᵀ·Bᵀ (+ bias); ``dropout_mask`` already holds the 1/(1−p) factor."""
    acc = _acc_dtype(x, lora_a)
    xd = x.to(acc) if dropout_mask is None else x.to(acc) * dropout_mask.to(acc)
    y = quant_matmul(x.to(acc), qw, bias) + scaling * (xd @ lora_a.to(acc).t()) @ lora_b.to(acc).t()
    return y.to(x.dtype)


def lora_backward(dy, x, qw, lora_a, lora_b, scaling, dropout_mask=None):
    """(dX, dA, dB) of :func:`lora_forward`."""
    acc = _acc_dtype(dy, x)
    dy2 = dy.to(acc).reshape(-1, dy.shape[-1])
    x2 = x.to(acc).reshape(-1, x.shape[-1])
    m2 = None if dropout_mask is None else dropout_mask.to(acc).reshape(-1, x.shape[-1])
    xd = x2 if m2 is None else x2 * m2
    a, b = lora_a.to(acc), lora_b.to(acc)
    v = dy2 @ b
    grad_a = scaling * v.t() @ xd
    grad_b = scaling * dy2.t() @ (xd @ a.t())
    dxd = scaling * v @ a
    dx = quant_matmul_grad_input(dy2, qw) + (dxd if m2 is None else dxd * m2)
    return dx.reshape(*dy.shape[:-1], qw.in_features), grad_a, grad_b


def qalora_merge(qw: QuantizedWeight, lora_a, lora_b, scaling) -> QuantizedWeight:
    """Fold a QA-LoRA adapter into the per-group biases: b' = b + (σ/g)·(B·A). Codes unchanged."""
    if qw.fmt != "int":
        raise ValueError(f"QA-LoRA merges into INT biases; this weight is fmt={qw.fmt!r}")
    delta = (scaling / qw.group_size) * (lora_b.double() @ lora_a.double())  # [N, G]
    merged = qw.to(qw.device)
    merged.biases = (qw.biases.double() + delta.to(qw.biases.device)).to(qw.biases.dtype)
    return merged

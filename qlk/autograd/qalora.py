"""Autograd for QA-LoRA: a group-pooled LoRA adapter on a frozen INT-N group-quantized base.

The adapter sees P(X), the mean of each quantization group of g inputs, so its update is constant
within a group and folds exactly into the per-group biases at merge time
(:func:`qlk.reference.qalora_merge`). See ``docs/design.md``.
"""
from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from .. import backend, ops
from .._checks import check_dropout, check_scaling
from ..formats import QuantizedWeight
from ..reference import to_stored_order
from .lora import (
    _bias_grad, _bias_in, accumulate_dtype, autocast_off, check_adapter, compute_dtype, draw_seed, dropout_mask,
    wants_graph,
)  # fmt: skip


class QALoRAFunction(torch.autograd.Function):
    """QA-LoRA on a frozen quantized base.

    Forward, X [M, K] (leading dims flattened), g the quantization group size, G = K/g,
    A [r, G], B [N, r], σ the scaling, D dropout on the pooled input (as the official QA-LoRA:
    ``lora_B(lora_A(dropout(qa_pool(x))))``):
        P(X)[m, j] = (1/g)·Σ_{k ∈ group j} X[m, k]     groups in the *stored* column order
                                                        (``qw.perm`` under GPTQ act-order)
        Y = X·Ŵᵀ + σ·D(P(X))·Aᵀ·Bᵀ (+ b)

    Backward, with Pd = D(P(X)) [M, G], U = Pd·Aᵀ [M, r] and V = dY·B [M, r]:
        dB = σ·dYᵀ·U                          ∂Y/∂B = σ·U
        dA = σ·Vᵀ·Pd                          Y = … + σ·(Pd·Aᵀ)·Bᵀ
        dPd = σ·V·A [M, G]
        dX = dY·Ŵ + (1/g)·expand_g(D'(dPd))   P's adjoint repeats each group's value g times
           = dY·Ŵ + (σ/g)·expand_g(D'(V·A))   (scattered back through ``perm`` if any)
        db = Σ_m dY[m, :]                     (frozen in patched layers)

    Saved: Pd only (M·G values, g× fewer than the X that LoRA keeps), A and B (parameters, no
    new memory) and the dropout seed. Never X, never a dequantized weight: the packed weight is
    referenced from ``ctx``, and dY·Ŵ runs on it through :func:`qlk.ops.quant_matmul_grad_input`.
    Pd is kept in float32 (float64 for float64 inputs), U is recomputed in backward.

    On the Triton backend without dropout, both directions run fused (:mod:`qlk.kernels.qalora`):
    the adapter is folded into the group biases of one GEMM, b' = b + (σ/g)·B·A (the merge
    identity, per call), which also yields P(X) in the forward and dY·Ŵ + (σ/g)·expand_g(V·A)
    in the backward in one launch each (and V = dY·B in that backward launch, at every M).

    The work is done by :func:`qalora_forward_impl` / :func:`qalora_backward_impl`, which the
    ``qlk::qalora_linear`` custom op (:mod:`qlk.custom_ops`, used under ``torch.compile``) calls
    too: compiled and eager layers run the same kernels.
    """

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, qw: QuantizedWeight, lora_a, lora_b, scaling: float, bias=None, dropout: float = 0.0):
        y, pooled, seed, cd = _qalora_forward(x, qw, lora_a, lora_b, scaling, bias, dropout)
        ctx.save_for_backward(pooled, lora_a, lora_b)
        ctx.qw, ctx.scaling, ctx.dropout, ctx.seed = qw, scaling, dropout, seed
        ctx.x_dtype, ctx.x_shape, ctx.compute_dtype = x.dtype, x.shape, cd
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        pooled, a, b = ctx.saved_tensors
        with autocast_off(dy.device.type):
            dy2 = dy.reshape(-1, ctx.qw.out_features).to(ctx.compute_dtype)
            need = ctx.needs_input_grad  # x, qw, lora_a, lora_b, ...
            dx, da, db = qalora_backward_impl(dy2, pooled, a, b, ctx.qw, ctx.scaling, ctx.dropout, ctx.seed,
                                              need[0], need[2], need[3])
            if dx is not None:
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
            return dx, None, da, db, None, _bias_grad(ctx, 5, dy2), None


# ---- the one implementation (eager Function above, and the qlk::qalora_linear custom op) --------------
def _qalora_forward(x, qw: QuantizedWeight, lora_a, lora_b, scaling: float, bias, dropout: float):
    """(Y [..., N], Pd, dropout seed or None, compute dtype): :class:`QALoRAFunction`'s forward, and
    :func:`qalora_linear` without a graph."""
    cd = compute_dtype(x)
    with autocast_off(x.device.type):
        x2 = x.reshape(-1, qw.in_features).to(cd)
        y, pooled, seed = qalora_forward_impl(x2, qw, lora_a, lora_b, scaling, _bias_in(bias, cd), dropout)
    return y.reshape(*x.shape[:-1], qw.out_features), pooled, seed, cd


def qalora_forward_impl(x2, qw: QuantizedWeight, lora_a, lora_b, scaling: float, bias, dropout: float):
    """(Y [M, N], Pd [M, G], dropout seed or None) for X2 [M, K] in the compute dtype (autocast off,
    bias already in that dtype). Pd = D(P(X)) in float32 (float64 for float64 X): what backward needs.

    Used by :class:`QALoRAFunction` and by the ``qlk::qalora_linear`` custom op
    (:mod:`qlk.custom_ops`, the path under ``torch.compile``): one code path."""
    cd = x2.dtype
    acc = accumulate_dtype(cd)
    k, g = qw.in_features, qw.group_size
    if _fused(x2, qw, cd, dropout):
        from ..kernels import qalora_forward

        y, pooled = qalora_forward(x2, qw, lora_a, lora_b, scaling, bias)
        return y, pooled, None
    y = ops.quant_matmul(x2, qw, bias)
    xs = to_stored_order(x2, qw)
    pooled = xs.reshape(xs.shape[0], k // g, g).sum(-1, dtype=acc).div_(g)  # [M, G]
    seed = draw_seed() if dropout > 0 else None
    if seed is not None:
        pooled.mul_(dropout_mask(pooled.shape, dropout, seed, pooled.device, acc))
    u = pooled @ lora_a.to(acc).t()  # [M, r]
    y.addmm_(u.to(cd), lora_b.to(cd).t(), alpha=scaling)
    return y, pooled, seed


def qalora_backward_impl(dy2, pooled, a, b, qw: QuantizedWeight, scaling: float, dropout: float, seed,
                         needs_dx: bool, needs_da: bool, needs_db: bool):
    """(dX [M, K] in dY2's dtype, dA, dB), None where not needed, for dY2 [M, N] in the compute
    dtype and what :func:`qalora_forward_impl` returned (chain rule: :class:`QALoRAFunction`)."""
    cd, acc, g, s = dy2.dtype, pooled.dtype, qw.group_size, scaling
    a_acc = a.to(acc)
    dx = da = db = None
    fused = _fused(dy2, qw, cd, dropout if seed is not None else 0.0)
    if fused and needs_dx:
        from ..kernels import qalora_grad_input

        dx, v = qalora_grad_input(dy2, qw, a, b, s)  # dY·Ŵ + (σ/g)·expand_g(V·A), V = dY·B
        v = v.to(acc)
    else:
        v = (dy2 @ b.to(cd)).to(acc)  # [M, r]
    if needs_da:
        da = (v.t() @ pooled).mul_(s).to(a.dtype)
    if needs_db:
        u = (pooled @ a_acc.t()).to(cd)  # recomputed: M·G·r flops, no memory kept
        db = (dy2.t() @ u).to(acc).mul_(s).to(b.dtype)
    if needs_dx and not fused:
        dpool = (v @ a_acc).mul_(s / g)  # [M, G]
        if seed is not None:
            dpool.mul_(dropout_mask(dpool.shape, dropout, seed, dpool.device, acc))
        dx = ops.quant_matmul_grad_input(dy2, qw).contiguous()
        m, k = dx.shape
        if qw.perm is None:
            dx.view(m, k // g, g).add_(dpool.to(dx.dtype).unsqueeze(-1))
        else:  # stored column c is input perm[c]
            dx.index_add_(1, qw.perm, dpool.to(dx.dtype).repeat_interleave(g, dim=1))
    return dx, da, db


def _fused(x, qw: QuantizedWeight, cd: torch.dtype, dropout: float) -> bool:
    """The fused kernels serve INT weights on the Triton backend when there is no dropout (the
    folded term cannot carry a dropout mask on P(X))."""
    return (
        dropout == 0 and qw.fmt == "int" and cd != torch.float64
        and backend.resolve(x.device) == "triton"
    )  # fmt: skip


def qalora_linear(x, qw, lora_a, lora_b, scaling: float, bias=None, dropout: float = 0.0) -> torch.Tensor:
    """Differentiable QA-LoRA layer through :class:`QALoRAFunction`.

    ``lora_a`` is [r, in_features/group_size], ``lora_b`` [out_features, r]; ``dropout`` is the
    probability p applied to the pooled input (pass 0 in eval mode).
    """
    if qw.in_features % qw.group_size:
        raise ValueError(
            f"qalora_linear: in_features={qw.in_features} is not divisible by group_size={qw.group_size}"
        )
    check_adapter(x, qw, lora_a, lora_b, qw.in_features // qw.group_size, "qalora_linear")
    check_dropout(dropout)
    check_scaling(scaling)
    if not wants_graph(x, lora_a, lora_b, bias):
        return _qalora_forward(x, qw, lora_a, lora_b, float(scaling), bias, float(dropout))[0]
    return QALoRAFunction.apply(x, qw, lora_a, lora_b, float(scaling), bias, float(dropout))

"""Autograd for a frozen quantized linear layer, alone or with a standard LoRA adapter (QLoRA).

Shared pieces of :mod:`qlk.autograd` live here too: the compute dtype under autocast and the
dropout masks regenerated from a seed.

Dtypes. The product runs in the *compute dtype*: the autocast dtype when autocast is enabled on
the input's device (as ``nn.Linear`` would do), else the input's dtype. The Functions then run
with autocast disabled, so the reference path's float32 matmuls are not cast down behind their
back. Adapters keep their own dtype (fp32 master weights with bf16/fp16 activations) and their
gradients come back in it; the input gradient comes back in the input's dtype.
"""
from __future__ import annotations

import contextlib

import torch
from torch.amp import custom_bwd, custom_fwd

from .. import ops
from .._checks import check_activation, check_dropout, check_scaling
from ..formats import QuantizedWeight


# ---- shared helpers ------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's on x's device (float64 is never cast), else x's."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates the r-wide adapter products in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str):
    """A context that disables autocast for ``device_type`` (our ops pick their dtypes themselves):
    ``torch.autocast(enabled=False)`` only when autocast is on there (entering one costs microseconds
    a call, round 37: host time), else a no-op context."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return _NO_CONTEXT
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return _NO_CONTEXT


def wants_graph(*tensors) -> bool:
    """Whether autograd must record a layer op: grad mode on and some input requiring grad. When
    not (inference, ``torch.no_grad``, frozen inputs), the layer functions run their Function's
    forward without ``Function.apply`` (tens of microseconds of host time a call, round 37); the
    result is the same tensor, which would not require grad either way."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator, so ``torch.manual_seed`` and the RNG
    state that activation checkpointing saves and restores make the mask reproducible."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """keep/(1 − p) with keep ~ Bernoulli(1 − p), drawn from a generator seeded by ``seed``.

    The Functions store only the seed (8 bytes) and call this again in backward.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)
    return keep.div_(1.0 - p)


def check_adapter(x, qw, lora_a, lora_b, in_dim: int, what: str) -> None:
    check_activation(x, qw.in_features, qw.device)
    if lora_a.dim() != 2 or lora_a.shape[1] != in_dim:
        raise ValueError(f"{what}: lora_A has shape {tuple(lora_a.shape)}, expected (r, {in_dim})")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (qw.out_features, r):
        raise ValueError(f"{what}: lora_B has shape {tuple(lora_b.shape)}, expected ({qw.out_features}, {r})")
    for name, t in (("lora_A", lora_a), ("lora_B", lora_b)):
        if t.device != qw.device:
            raise ValueError(f"{what}: {name} is on {t.device} but the quantized weight is on {qw.device}")


def _bias_in(bias, dtype):
    return None if bias is None else bias.to(dtype)


def _bias_grad(ctx, index: int, dy2: torch.Tensor):
    if ctx.needs_input_grad[index]:
        return dy2.sum(0).to(ctx.bias_dtype)
    return None


# ---- frozen base alone ----------------------------------------------------------------------
class QuantLinearFunction(torch.autograd.Function):
    """Y = X·Ŵᵀ (+ b) for a frozen quantized Ŵ [N, K], X [..., K].

    Backward, by the chain rule on Y = X·Ŵᵀ + 1·bᵀ:
        dX = dY·Ŵ            (:func:`qlk.ops.quant_matmul_grad_input`, the same packed weight)
        db = Σ_m dY[m, :]    (only if the bias requires grad; patched layers keep it frozen)
    Nothing is saved for backward: the packed weight is referenced from ``ctx``.
    """

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None):
        ctx.qw, ctx.x_dtype, ctx.x_shape = qw, x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return quant_linear_forward(x, qw, bias)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dy: torch.Tensor):
        qw = ctx.qw
        dy2 = dy.reshape(-1, qw.out_features)
        dx = None
        with autocast_off(dy.device.type):
            if ctx.needs_input_grad[0]:
                dx = ops.quant_matmul_grad_input(dy2, qw).reshape(ctx.x_shape).to(ctx.x_dtype)
            return dx, None, _bias_grad(ctx, 2, dy2)


# ---- LoRA on a quantized base (QLoRA) -------------------------------------------------------
class LoRAFunction(torch.autograd.Function):
    """LoRA on a frozen quantized base (INT-N or NF4): the QLoRA layer.

    Forward, X [M, K] (leading dims flattened), A [r, K], B [N, r], σ the scaling, D dropout
    (D(X) = X ⊙ keep/(1 − p)):
        Y = X·Ŵᵀ + σ·D(X)·Aᵀ·Bᵀ (+ b)

    Backward, with V = dY·B [M, r] and U = D(X)·Aᵀ [M, r]:
        dB = σ·dYᵀ·U                     since ∂Y/∂B = σ·U
        dA = σ·Vᵀ·D(X)                   since Y = … + σ·(D(X)·Aᵀ)·Bᵀ
        dX = dY·Ŵ + σ·D'(V·A)            D' multiplies by the same keep/(1 − p)
        db = Σ_m dY[m, :]                (frozen in patched layers)

    Saved: X in the compute dtype (M·K values: LoRA needs it for dA), A and B (parameters, no new
    memory) and the dropout seed (the mask is regenerated, not stored). The packed weight is
    referenced from ``ctx``, never saved. The work is done by :func:`lora_forward_impl` /
    :func:`lora_backward_impl`, which the ``qlk::lora_linear`` custom op (``torch.compile``) calls too.
    """

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, qw: QuantizedWeight, lora_a, lora_b, scaling: float, bias=None, dropout: float = 0.0):
        y, x2, seed = _lora_forward(x, qw, lora_a, lora_b, scaling, bias, dropout)
        ctx.save_for_backward(x2, lora_a, lora_b)
        ctx.qw, ctx.scaling, ctx.dropout, ctx.seed = qw, scaling, dropout, seed
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, a, b = ctx.saved_tensors
        with autocast_off(dy.device.type):
            dy2 = dy.reshape(-1, ctx.qw.out_features).to(x2.dtype)
            need = ctx.needs_input_grad  # x, qw, lora_a, lora_b, ...
            dx, da, db = lora_backward_impl(dy2, x2, a, b, ctx.qw, ctx.scaling, ctx.dropout, ctx.seed,
                                            need[0], need[2], need[3])
            if dx is not None:
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
            return dx, None, da, db, None, _bias_grad(ctx, 5, dy2), None


# ---- the one implementation (eager Function above, and the qlk::lora_linear custom op) ----------------
def quant_linear_forward(x, qw: QuantizedWeight, bias=None) -> torch.Tensor:
    """Y [..., N] of :class:`QuantLinearFunction` (its forward, and :func:`quant_linear` without a
    graph): in the compute dtype, autocast off."""
    cd = compute_dtype(x)
    with autocast_off(x.device.type):
        x2 = x.reshape(-1, qw.in_features)
        y = ops.quant_matmul(x2 if x2.dtype == cd else x2.to(cd), qw, _bias_in(bias, cd))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], qw.out_features)


def _lora_forward(x, qw: QuantizedWeight, lora_a, lora_b, scaling: float, bias, dropout: float):
    """(Y [..., N], X2 [M, K] in the compute dtype, dropout seed or None): :class:`LoRAFunction`'s
    forward, and :func:`lora_linear` without a graph."""
    cd = compute_dtype(x)
    with autocast_off(x.device.type):
        x2 = x.reshape(-1, qw.in_features).to(cd)
        y, seed = lora_forward_impl(x2, qw, lora_a, lora_b, scaling, _bias_in(bias, cd), dropout)
    return y.reshape(*x.shape[:-1], qw.out_features), x2, seed


def lora_forward_impl(x2, qw: QuantizedWeight, lora_a, lora_b, scaling: float, bias, dropout: float):
    """(Y [M, N], dropout seed or None) for X2 [M, K] in the compute dtype (autocast off, bias
    already in that dtype). Used by :class:`LoRAFunction` and by the ``qlk::lora_linear`` custom op
    (:mod:`qlk.custom_ops`, the path under ``torch.compile``): one code path."""
    cd = x2.dtype
    y = ops.quant_matmul(x2, qw, bias)
    seed = draw_seed() if dropout > 0 else None
    xd = x2 if seed is None else x2 * dropout_mask(x2.shape, dropout, seed, x2.device, cd)
    u = xd @ lora_a.to(cd).t()  # [M, r]
    y.addmm_(u, lora_b.to(cd).t(), alpha=scaling)
    return y, seed


def lora_backward_impl(dy2, x2, a, b, qw: QuantizedWeight, scaling: float, dropout: float, seed,
                       needs_dx: bool, needs_da: bool, needs_db: bool):
    """(dX [M, K] in X2's dtype, dA, dB), None where not needed (chain rule: :class:`LoRAFunction`),
    for dY2 [M, N] and X2 [M, K] in the compute dtype."""
    cd, s = x2.dtype, scaling
    mask = None if seed is None else dropout_mask(x2.shape, dropout, seed, x2.device, cd)
    xd = x2 if mask is None else x2 * mask
    a_c, b_c = a.to(cd), b.to(cd)
    v = dy2 @ b_c  # [M, r]
    dx = da = db = None
    if needs_da:
        da = (v.t() @ xd).mul_(s).to(a.dtype)
    if needs_db:
        db = (dy2.t() @ (xd @ a_c.t())).mul_(s).to(b.dtype)
    if needs_dx:
        dx = ops.quant_matmul_grad_input(dy2, qw)
        if mask is None:
            dx = dx.addmm_(v, a_c, alpha=s)
        else:
            dx = dx.add_((v @ a_c).mul_(mask), alpha=s)
    return dx, da, db


# ---- functional entry points ----------------------------------------------------------------
def quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable Y = X·Ŵᵀ (+ bias) through :class:`QuantLinearFunction`."""
    check_activation(x, qw.in_features, qw.device)
    if not wants_graph(x, bias):
        return quant_linear_forward(x, qw, bias)
    return QuantLinearFunction.apply(x, qw, bias)


def lora_linear(x, qw, lora_a, lora_b, scaling: float, bias=None, dropout: float = 0.0) -> torch.Tensor:
    """Differentiable LoRA layer on a quantized base through :class:`LoRAFunction`.

    ``dropout`` is the probability p applied to the adapter's input (pass 0 in eval mode).
    """
    check_adapter(x, qw, lora_a, lora_b, qw.in_features, "lora_linear")
    check_dropout(dropout)
    check_scaling(scaling)
    if not wants_graph(x, lora_a, lora_b, bias):
        return _lora_forward(x, qw, lora_a, lora_b, float(scaling), bias, float(dropout))[0]
    return LoRAFunction.apply(x, qw, lora_a, lora_b, float(scaling), bias, float(dropout))

"""Autograd for the public ops :func:`qlk.quant_matmul` and :func:`qlk.quant_matmul_grad_input`.

Both ops are differentiable on every backend, as bitsandbytes' ``matmul_4bit`` is: the reference
path would be differentiable by itself (plain torch), the Triton kernels are not, so the public
ops route through these Functions whenever a gradient is wanted and give the same graph on both.

For Y = X·Ŵᵀ + 1·bᵀ (Ŵ [N, K] frozen, X [..., K]):
    dX = dY·Ŵ              (:func:`qlk.ops.quant_matmul_grad_input`, the same packed weight)
    db = Σ_m dY[m, :]
For dX = dY·Ŵ (the input-gradient op, linear in dY):
    d(dY) = G·Ŵᵀ           (:func:`qlk.ops.quant_matmul` of the incoming gradient G)
so double backward works too. Unlike the layer Functions (:mod:`qlk.autograd.lora`) nothing here
looks at autocast: the ops compute in their input's dtype, as documented.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .. import reference


# ---- the unchecked, non-differentiable implementations (what the Functions below run) --------------
def _quant_matmul(x, qw, bias, backend=None):
    if _backend.resolve(x.device, backend) == "triton":
        from ..kernels import quant_matmul as triton_quant_matmul

        return triton_quant_matmul(x, qw, bias)
    with torch.no_grad():
        return reference.quant_matmul(x, qw, bias)


def _quant_matmul_grad_input(dy, qw, backend=None):
    if _backend.resolve(dy.device, backend) == "triton":
        from ..kernels import quant_matmul_grad_input as triton_grad_input

        return triton_grad_input(dy, qw)
    with torch.no_grad():
        return reference.quant_matmul_grad_input(dy, qw)


class QuantMatmulFunction(torch.autograd.Function):
    """Y = X·Ŵᵀ (+ b) with dX = dY·Ŵ and db = Σ_m dY (nothing saved; Ŵ is referenced from ctx)."""

    @staticmethod
    def forward(ctx, x, qw, bias, backend):
        ctx.qw, ctx.backend = qw, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _quant_matmul(x, qw, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = quant_matmul_grad_input_differentiable(dy, ctx.qw, ctx.backend)
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, db, None


class QuantMatmulGradInputFunction(torch.autograd.Function):
    """dX = dY·Ŵ with d(dY) = G·Ŵᵀ."""

    @staticmethod
    def forward(ctx, dy, qw, backend):
        ctx.qw, ctx.backend = qw, backend
        return _quant_matmul_grad_input(dy, qw, backend)

    @staticmethod
    def backward(ctx, g):
        ddy = quant_matmul_differentiable(g, ctx.qw, None, ctx.backend) if ctx.needs_input_grad[0] else None
        return ddy, None, None


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def quant_matmul_differentiable(x, qw, bias, backend):
    """Y = X·Ŵᵀ (+ bias), through :class:`QuantMatmulFunction` when a gradient is wanted."""
    if _wants_grad(x, bias):
        return QuantMatmulFunction.apply(x, qw, bias, backend)
    return _quant_matmul(x, qw, bias, backend)


def quant_matmul_grad_input_differentiable(dy, qw, backend):
    """dX = dY·Ŵ, through :class:`QuantMatmulGradInputFunction` when a gradient is wanted."""
    if _wants_grad(dy):
        return QuantMatmulGradInputFunction.apply(dy, qw, backend)
    return _quant_matmul_grad_input(dy, qw, backend)

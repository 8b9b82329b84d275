"""``torch.library`` custom ops for ``torch.compile``: ``qlk::quant_matmul`` and
``qlk::quant_matmul_grad_input``.

A :class:`~qlk.QuantizedWeight` is a Python dataclass, which neither Dynamo nor the op schema can
carry; the ops take its tensors as tensors (``qweight``, ``scales``, ``biases``, ``absmax``,
``absmax_scale``, ``absmax_offset``, ``perm``; absent ones are ``None``) plus int/str attributes
(``fmt``, ``bits``, ``group_size``, ``out_features``, ``in_features``, ``weight_dtype``). Each op
has a fake (meta) implementation, so Dynamo/AOTAutograd/Inductor trace shapes without running a
kernel, and ``quant_matmul`` has its backward registered (``register_autograd``): dX = dY·Ŵ via
``quant_matmul_grad_input`` on the same packed tensors (whose own backward is ``quant_matmul``,
so double backward works too). The implementations call :func:`qlk.ops.quant_matmul` /
:func:`qlk.ops.quant_matmul_grad_input`: Triton kernels or the reference path, by backend.

:class:`qlk.QuantLinear` uses these ops only while ``torch.compiler.is_compiling()``
(``qlk.nn.linear._compiled_forward``); its eager path (the autograd Functions of
:mod:`qlk.autograd`) is unchanged. This module imports no layer: ``qlk.nn`` sits above it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .formats.quantized_weight import _DTYPES, QuantizedWeight

#: the QuantizedWeight tensors, in the ops' argument order
FIELDS = ("qweight", "scales", "biases", "absmax", "absmax_scale", "absmax_offset", "perm")


def _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size, n, k, wdtype):
    return QuantizedWeight(
        fmt=fmt, shape=(n, k), bits=bits, group_size=group_size, dtype=_DTYPES[wdtype], qweight=qweight,
        scales=scales, biases=biases, absmax=absmax, absmax_scale=absmax_scale, absmax_offset=absmax_offset,
        perm=perm,
    )  # fmt: skip


@torch.library.custom_op("qlk::quant_matmul", mutates_args=())
def quant_matmul(
    x: Tensor, qweight: Tensor, scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], perm: Optional[Tensor],
    bias: Optional[Tensor], fmt: str, bits: int, group_size: int, out_features: int, in_features: int,
    weight_dtype: str,
) -> Tensor:  # fmt: skip
    """Y = X·Ŵᵀ (+ bias), X [..., in_features] -> [..., out_features] in X's dtype."""
    from . import ops

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():  # the op's autograd is registered below; the eager op's Function must not nest
        return ops.quant_matmul(x, qw, bias)


@quant_matmul.register_fake
def _(x, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, bias, fmt, bits, group_size,
      out_features, in_features, weight_dtype):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("qlk::quant_matmul_grad_input", mutates_args=())
def quant_matmul_grad_input(
    dy: Tensor, qweight: Tensor, scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], perm: Optional[Tensor], fmt: str, bits: int,
    group_size: int, out_features: int, in_features: int, weight_dtype: str,
) -> Tensor:  # fmt: skip
    """dX = dY·Ŵ, dY [..., out_features] -> [..., in_features] in dY's dtype."""
    from . import ops

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():
        return ops.quant_matmul_grad_input(dy, qw)


@quant_matmul_grad_input.register_fake
def _(dy, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size, out_features,
      in_features, weight_dtype):  # fmt: skip
    return dy.new_empty((*dy.shape[:-1], in_features))


# ---- autograd -------------------------------------------------------------------------------------
# Only X (and the bias) are differentiable; the packed tensors are frozen, their grads are None.
def _mm_setup(ctx, inputs, output):
    ctx.packed = inputs[1:8]
    ctx.attrs = inputs[9:]
    ctx.bias_needs_grad = inputs[8] is not None and inputs[8].requires_grad
    ctx.bias_dtype = None if inputs[8] is None else inputs[8].dtype


def _mm_backward(ctx, dy):
    dx = quant_matmul_grad_input(dy, *ctx.packed, *ctx.attrs)
    db = None
    if ctx.bias_needs_grad:
        db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (dx,) + (None,) * 7 + (db,) + (None,) * 6


quant_matmul.register_autograd(_mm_backward, setup_context=_mm_setup)


def _gi_setup(ctx, inputs, output):
    ctx.packed = inputs[1:8]
    ctx.attrs = inputs[8:]


def _gi_backward(ctx, g):
    return (quant_matmul(g, *ctx.packed, None, *ctx.attrs),) + (None,) * 13


quant_matmul_grad_input.register_autograd(_gi_backward, setup_context=_gi_setup)


# ---- helpers ----------------------------------------------------------------------------------------
def unpack(qw: QuantizedWeight) -> tuple:
    """(tensors..., attrs...) of ``qw`` in the ops' argument order, bias excluded."""
    tensors = tuple(getattr(qw, f) for f in FIELDS)
    attrs = (qw.fmt, qw.bits, qw.group_size, qw.out_features, qw.in_features, str(qw.dtype).removeprefix("torch."))
    return tensors, attrs


def quant_linear(x: Tensor, qw: QuantizedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """Differentiable Y = X·Ŵᵀ (+ bias) through the custom op (traceable by torch.compile)."""
    tensors, attrs = unpack(qw)
    return torch.ops.qlk.quant_matmul(x, *tensors, bias, *attrs)

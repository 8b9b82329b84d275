"""``torch.library`` custom ops for ``torch.compile``: ``qlk::quant_matmul``,
``qlk::quant_matmul_grad_input``, and the adapter layers ``qlk::qalora_linear`` / ``qlk::lora_linear``
(with their backward ops ``qlk::qalora_linear_backward`` / ``qlk::lora_linear_backward``), and the
stacked mixture-of-experts projection ``qlk::grouped_experts_linear`` (+ ``_backward``).

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
(``qlk.nn.linear._compiled_forward``); eager it calls the autograd Functions of :mod:`qlk.autograd`.
The adapter ops and those Functions call the same ``*_forward_impl`` / ``*_backward_impl``, so a
compiled layer runs exactly the eager layer's kernels (QA-LoRA: the fused folded-bias kernels), with
no plain-torch re-implementation. This module imports no layer: ``qlk.nn`` sits above it.
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


# ---- the adapter layers: QA-LoRA and LoRA ---------------------------------------------------------
# One op per layer and direction, around the same implementation the eager autograd Functions run
# (qlk.autograd.qalora.qalora_forward_impl / qalora_backward_impl, qlk.autograd.lora.lora_*_impl): the
# compiled layer runs the fused kernels of the eager one. The forward op also returns what backward
# needs (QA-LoRA's Pd = D(P(X)), and the dropout seed as an int64 [1] tensor, -1 for none: the seed
# is drawn inside the op from torch's default CPU generator, exactly as eager draws it), and its
# autograd calls the backward op. The inputs arrive in the compute dtype with autocast off
# (qlk.nn.linear._compiled_forward casts them, as the Functions do).
#
# A new fused layer (e.g. the grouped expert ops) follows the same pattern: a *_forward_impl /
# *_backward_impl pair shared with its autograd.Function, a forward op returning every saved
# activation, a backward op taking needs_* flags (unneeded grads come back as empty [0] tensors,
# a custom op cannot return None), register_fake for both, register_autograd on the forward.
def _seed_tensor(seed, device) -> Tensor:
    return torch.tensor([-1 if seed is None else seed], dtype=torch.int64, device=device)


def _seed_of(seed: Tensor):
    value = int(seed.item())
    return None if value < 0 else value


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op("qlk::qalora_linear", mutates_args=())
def qalora_linear(
    x: Tensor, qweight: Tensor, scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], perm: Optional[Tensor], lora_a: Tensor,
    lora_b: Tensor, bias: Optional[Tensor], scaling: float, dropout: float, fmt: str, bits: int, group_size: int,
    out_features: int, in_features: int, weight_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(Y [..., N] in X's dtype, Pd [M, G] fp32 (fp64 for fp64 X), seed int64 [1]): the QA-LoRA layer's
    forward, X [..., in_features] in the compute dtype (:class:`qlk.autograd.QALoRAFunction`)."""
    from .autograd.qalora import qalora_forward_impl

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():
        y, pooled, seed = qalora_forward_impl(x.reshape(-1, in_features), qw, lora_a, lora_b, scaling, bias, dropout)
    return y.reshape(*x.shape[:-1], out_features), pooled, _seed_tensor(seed, x.device)


@qalora_linear.register_fake
def _(x, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, lora_a, lora_b, bias, scaling, dropout,
      fmt, bits, group_size, out_features, in_features, weight_dtype):  # fmt: skip
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = x.numel() // in_features
    return (x.new_empty((*x.shape[:-1], out_features)), x.new_empty((m, in_features // group_size), dtype=acc),
            x.new_empty((1,), dtype=torch.int64))  # fmt: skip


@torch.library.custom_op("qlk::qalora_linear_backward", mutates_args=())
def qalora_linear_backward(
    dy: Tensor, pooled: Tensor, seed: Tensor, lora_a: Tensor, lora_b: Tensor, qweight: Tensor,
    scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor], absmax_scale: Optional[Tensor],
    absmax_offset: Optional[Tensor], perm: Optional[Tensor], scaling: float, dropout: float, needs_dx: bool,
    needs_da: bool, needs_db: bool, fmt: str, bits: int, group_size: int, out_features: int, in_features: int,
    weight_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dX [..., in_features] in dY's dtype, dA, dB); an unneeded one is an empty [0] tensor."""
    from .autograd.qalora import qalora_backward_impl

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():
        dx, da, db = qalora_backward_impl(dy.reshape(-1, out_features), pooled, lora_a, lora_b, qw, scaling, dropout,
                                          _seed_of(seed), needs_dx, needs_da, needs_db)  # fmt: skip
    if dx is not None:
        dx = dx.reshape(*dy.shape[:-1], in_features)
    return _or_empty(dx, dy), _or_empty(da, lora_a), _or_empty(db, lora_b)


@qalora_linear_backward.register_fake
def _(dy, pooled, seed, lora_a, lora_b, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, scaling,
      dropout, needs_dx, needs_da, needs_db, fmt, bits, group_size, out_features, in_features, weight_dtype):  # fmt: skip
    return _adapter_grads_fake(dy, lora_a, lora_b, needs_dx, needs_da, needs_db, in_features)


def _adapter_grads_fake(dy, lora_a, lora_b, needs_dx, needs_da, needs_db, in_features):
    dx = dy.new_empty((*dy.shape[:-1], in_features) if needs_dx else (0,))
    da = lora_a.new_empty(lora_a.shape if needs_da else (0,))
    db = lora_b.new_empty(lora_b.shape if needs_db else (0,))
    return dx, da, db


def _adapter_setup(ctx, inputs, output, saved):
    """Shared setup_context of the adapter ops: inputs are (x, 7 packed tensors, lora_a, lora_b, bias,
    scaling, dropout, 6 attrs); ``saved`` the activation backward needs (x or Pd)."""
    ctx.saved = saved
    ctx.seed = output[-1]
    ctx.packed = inputs[1:8]
    ctx.lora = inputs[8:10]
    ctx.scaling, ctx.dropout = inputs[11], inputs[12]
    ctx.attrs = inputs[13:]
    bias = inputs[10]
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _adapter_backward(ctx, backward_op, dy):
    need = ctx.needs_input_grad
    dx, da, db = backward_op(dy, ctx.saved, ctx.seed, *ctx.lora, *ctx.packed, ctx.scaling, ctx.dropout,
                             need[0], need[8], need[9], *ctx.attrs)  # fmt: skip
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.bias_needs_grad else None
    return ((dx if need[0] else None,) + (None,) * 7 + (da if need[8] else None, db if need[9] else None, dbias)
            + (None,) * 8)  # fmt: skip


def _qalora_setup(ctx, inputs, output):
    _adapter_setup(ctx, inputs, output, output[1])


def _qalora_backward(ctx, dy, d_pooled, d_seed):
    return _adapter_backward(ctx, qalora_linear_backward, dy)


qalora_linear.register_autograd(_qalora_backward, setup_context=_qalora_setup)


@torch.library.custom_op("qlk::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor, qweight: Tensor, scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], perm: Optional[Tensor], lora_a: Tensor,
    lora_b: Tensor, bias: Optional[Tensor], scaling: float, dropout: float, fmt: str, bits: int, group_size: int,
    out_features: int, in_features: int, weight_dtype: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(Y [..., N] in X's dtype, seed int64 [1]): the LoRA (QLoRA) layer's forward, X in the compute
    dtype (:class:`qlk.autograd.LoRAFunction`)."""
    from .autograd.lora import lora_forward_impl

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():
        y, seed = lora_forward_impl(x.reshape(-1, in_features), qw, lora_a, lora_b, scaling, bias, dropout)
    return y.reshape(*x.shape[:-1], out_features), _seed_tensor(seed, x.device)


@lora_linear.register_fake
def _(x, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, lora_a, lora_b, bias, scaling, dropout,
      fmt, bits, group_size, out_features, in_features, weight_dtype):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("qlk::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor, x: Tensor, seed: Tensor, lora_a: Tensor, lora_b: Tensor, qweight: Tensor,
    scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor], absmax_scale: Optional[Tensor],
    absmax_offset: Optional[Tensor], perm: Optional[Tensor], scaling: float, dropout: float, needs_dx: bool,
    needs_da: bool, needs_db: bool, fmt: str, bits: int, group_size: int, out_features: int, in_features: int,
    weight_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dX [..., in_features] in X's dtype, dA, dB); an unneeded one is an empty [0] tensor."""
    from .autograd.lora import lora_backward_impl

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():
        dx, da, db = lora_backward_impl(dy.reshape(-1, out_features).to(x.dtype), x.reshape(-1, in_features),
                                        lora_a, lora_b, qw, scaling, dropout, _seed_of(seed), needs_dx, needs_da,
                                        needs_db)  # fmt: skip
    if dx is not None:
        dx = dx.reshape(*dy.shape[:-1], in_features)
    return _or_empty(dx, x), _or_empty(da, lora_a), _or_empty(db, lora_b)


@lora_linear_backward.register_fake
def _(dy, x, seed, lora_a, lora_b, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, scaling,
      dropout, needs_dx, needs_da, needs_db, fmt, bits, group_size, out_features, in_features, weight_dtype):  # fmt: skip
    return _adapter_grads_fake(x.new_empty((*dy.shape[:-1], out_features)), lora_a, lora_b, needs_dx, needs_da,
                               needs_db, in_features)  # fmt: skip


def _lora_setup(ctx, inputs, output):
    _adapter_setup(ctx, inputs, output, inputs[0])


def _lora_backward(ctx, dy, d_seed):
    return _adapter_backward(ctx, lora_linear_backward, dy)


lora_linear.register_autograd(_lora_backward, setup_context=_lora_setup)


# ---- grouped expert projections (mixture of experts) ----------------------------------------------
# The same pattern for qlk.nn.experts.QuantExpertProj: the ops wrap the implementation of
# qlk.autograd.experts.GroupedExpertsFunction (grouped_experts_forward_impl / _backward_impl), so a
# compiled MoE layer runs the grouped kernels (QA-LoRA: folded biases, P(X) pooled in the forward
# kernel). ``method`` is "" without adapter ("qalora" / "lora" else); ``out_features`` is the stacked
# E·N; rows of x are sorted by expert and delimited by ``offsets`` [E+1] (qlk.kernels.grouped_matmul);
# ``max_rows`` bounds every expert's rows (the token count; the forward's tile map), 0 when unknown.
def _method(method: str):
    return method or None


@torch.library.custom_op("qlk::grouped_experts_linear", mutates_args=())
def grouped_experts_linear(
    x: Tensor, offsets: Tensor, qweight: Tensor, scales: Optional[Tensor], biases: Optional[Tensor],
    absmax: Optional[Tensor], absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], perm: Optional[Tensor],
    bias: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], num_experts: int, scaling: float,
    method: str, dropout: float, fmt: str, bits: int, group_size: int, out_features: int, in_features: int,
    weight_dtype: str, max_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(Y [S, N] in X's dtype, Pd [S, K/g] (QA-LoRA; an empty [0] tensor otherwise), seed int64 [1]): the
    stacked expert projection's forward, X [S, in_features] in the compute dtype."""
    from .autograd.experts import grouped_experts_forward_impl

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    with torch.no_grad():
        y, saved, seed = grouped_experts_forward_impl(x, qw, offsets, num_experts, bias, lora_a, lora_b, scaling,
                                                      _method(method), dropout, max_rows or None)  # fmt: skip
    pooled = saved if method == "qalora" else x.new_empty((0,))
    return y, pooled, _seed_tensor(seed, x.device)


@grouped_experts_linear.register_fake
def _(x, offsets, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, bias, lora_a, lora_b,
      num_experts, scaling, method, dropout, fmt, bits, group_size, out_features, in_features, weight_dtype,
      max_rows):  # fmt: skip
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = x.new_empty((x.shape[0], in_features // group_size), dtype=acc) if method == "qalora" else \
        x.new_empty((0,))
    return x.new_empty((x.shape[0], out_features // num_experts)), pooled, x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("qlk::grouped_experts_linear_backward", mutates_args=())
def grouped_experts_linear_backward(
    dy: Tensor, saved: Tensor, seed: Tensor, offsets: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    qweight: Tensor, scales: Optional[Tensor], biases: Optional[Tensor], absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], perm: Optional[Tensor], num_experts: int,
    scaling: float, method: str, dropout: float, needs_dx: bool, needs_da: bool, needs_db: bool, needs_dbias: bool,
    fmt: str, bits: int, group_size: int, out_features: int, in_features: int, weight_dtype: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dX [S, in_features], dA, dB, dbias [E, N]), dX and dbias in dY's dtype; ``saved`` is Pd (QA-LoRA)
    or X (LoRA); an unneeded result is an empty [0] tensor."""
    from .autograd.experts import grouped_experts_backward_impl

    qw = _qw(qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm, fmt, bits, group_size,
             out_features, in_features, weight_dtype)  # fmt: skip
    m = _method(method)
    with torch.no_grad():
        dx, da, db, dbias = grouped_experts_backward_impl(
            dy, saved if m is not None else None, offsets, lora_a, lora_b, qw, num_experts, scaling, m, dropout,
            _seed_of(seed), needs_dx, needs_da and m is not None, needs_db and m is not None, needs_dbias)
    dx = None if dx is None else dx.to(dy.dtype)
    dbias = None if dbias is None else dbias.to(dy.dtype)
    return (_or_empty(dx, dy), _or_empty(da, dy if lora_a is None else lora_a),
            _or_empty(db, dy if lora_b is None else lora_b), _or_empty(dbias, dy))  # fmt: skip


@grouped_experts_linear_backward.register_fake
def _(dy, saved, seed, offsets, lora_a, lora_b, qweight, scales, biases, absmax, absmax_scale, absmax_offset, perm,
      num_experts, scaling, method, dropout, needs_dx, needs_da, needs_db, needs_dbias, fmt, bits, group_size,
      out_features, in_features, weight_dtype):  # fmt: skip
    adapter = bool(method)
    dx = dy.new_empty((dy.shape[0], in_features) if needs_dx else (0,))
    da = lora_a.new_empty(lora_a.shape) if needs_da and adapter else dy.new_empty((0,)) if lora_a is None else \
        lora_a.new_empty((0,))
    db = lora_b.new_empty(lora_b.shape) if needs_db and adapter else dy.new_empty((0,)) if lora_b is None else \
        lora_b.new_empty((0,))
    dbias = dy.new_empty((num_experts, out_features // num_experts) if needs_dbias else (0,))
    return dx, da, db, dbias


def _grouped_setup(ctx, inputs, output):
    # inputs: x, offsets, 7 packed tensors, bias, lora_a, lora_b, num_experts, scaling, method, dropout, 6 attrs,
    # max_rows
    method = inputs[14]
    ctx.saved = inputs[0] if method == "lora" else output[1]
    ctx.seed = output[2]
    ctx.offsets = inputs[1]
    ctx.packed = inputs[2:9]
    ctx.lora = inputs[10:12]
    ctx.num_experts, ctx.scaling, ctx.method, ctx.dropout = inputs[12:16]
    ctx.attrs = inputs[16:22]  # the 6 attrs (inputs[22], max_rows, sizes the forward's tile map only)


def _grouped_backward(ctx, dy, d_pooled, d_seed):
    need = ctx.needs_input_grad
    dx, da, db, dbias = grouped_experts_linear_backward(
        dy, ctx.saved, ctx.seed, ctx.offsets, *ctx.lora, *ctx.packed, ctx.num_experts, ctx.scaling, ctx.method,
        ctx.dropout, need[0], need[10], need[11], need[9], *ctx.attrs)  # fmt: skip
    return ((dx if need[0] else None,) + (None,) * 8 + (dbias if need[9] else None, da if need[10] else None,
                                                       db if need[11] else None) + (None,) * 11)  # fmt: skip


grouped_experts_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup)


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

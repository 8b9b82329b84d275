"""Public entry points: ``quantize`` and ``quant_matmul`` (+ its input gradient)."""
from __future__ import annotations

import torch

from . import backend as _backend
from ._checks import check_activation, check_bias, check_format, check_quantized_weight
from .autograd.matmul import quant_matmul_differentiable, quant_matmul_grad_input_differentiable
from .formats import QuantizedWeight, quantize_int, quantize_nf4


def quantize(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    fmt: str = "int",
    double_quant: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantize a dense weight [out, in].

    fmt="int": INT-``bits`` (2, 3, 4) min-max group quantization, one fp16 scale and bias per
        ``group_size`` (default 32) consecutive inputs of each output channel.
    fmt="nf4": bitsandbytes-compatible NF4, absmax per ``group_size`` (default 64) flattened
        elements, double-quantized when ``double_quant``.
    """
    check_format(fmt)
    if fmt == "nf4":
        if bits != 4:
            raise ValueError(f"fmt='nf4' is 4-bit; got bits={bits}")
        return quantize_nf4(weight, blocksize=64 if group_size is None else group_size, double_quant=double_quant)
    return quantize_int(weight, bits=bits, group_size=32 if group_size is None else group_size, scale_dtype=scale_dtype)


def quant_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """Y = X·Ŵᵀ (+ bias) for X [..., in] -> [..., out] in X's dtype, fp32 accumulation.

    Differentiable in ``x`` and ``bias`` on every backend (as bitsandbytes' ``matmul_4bit``):
    dX = dY·Ŵ through :func:`quant_matmul_grad_input`, db = Σ dY (:mod:`qlk.autograd.matmul`).
    The quantized weight is frozen (no gradient).
    """
    check_quantized_weight(qw)
    check_activation(x, qw.in_features, qw.device)
    check_bias(bias, qw.out_features, qw.device)
    _backend.resolve(x.device, backend)  # a bad backend name fails here, before any autograd graph
    return quant_matmul_differentiable(x, qw, bias, backend)


def quant_matmul_grad_input(dy: torch.Tensor, qw: QuantizedWeight, backend: str | None = None) -> torch.Tensor:
    """dX = dY·Ŵ for dY [..., out] -> [..., in]: the input gradient of :func:`quant_matmul`.

    Differentiable in ``dy`` on every backend (its gradient is :func:`quant_matmul` of the incoming one)."""
    check_quantized_weight(qw)
    check_activation(dy, qw.out_features, qw.device, what="dy")
    _backend.resolve(dy.device, backend)
    return quant_matmul_grad_input_differentiable(dy, qw, backend)


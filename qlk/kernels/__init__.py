"""qlk's Triton kernels (see docs/kernels.md for the design and the static measurements).

Public entry points (``qlk.ops`` calls the first two):

* :func:`quant_matmul` (x, qw, bias=None) -> X·Ŵᵀ (+ bias)
* :func:`quant_matmul_grad_input` (dy, qw) -> dY·Ŵ
* :func:`dequantize` (qw, dtype) -> dense Ŵ [N, K], original column order
* :func:`qalora_forward` (x, qw, lora_a, lora_b, scaling, bias=None) -> (Y, P(X)) (QA-LoRA, fused)
* :func:`qalora_grad_input` (dy, qw, lora_a, lora_b, scaling) -> (dX, V = dY·B)

and the launchers by name, for benchmarks and the static report (they only allocate, check and
launch: nothing reads a result back, nothing touches CUDA at import):
:func:`quant_matmul_forward`, :func:`quant_matmul_backward` (= grad input),
:func:`dequantize_forward`.

Weights the kernels cannot read as packed (NF4 whose blocks straddle rows, K % blocksize != 0)
fall back to the plain-torch reference in the public functions; the launchers raise instead. So do
bfloat16 tensors under the Triton interpreter, whose numpy emulation gets bf16 arithmetic wrong.
"""
from __future__ import annotations

import torch

from .. import reference as _reference
from ..formats.quantized_weight import QuantizedWeight
from .config import INTERPRETED
from .dequant import dequantize_forward
from .fused_matmul import SPLITK_MAX_M, SPLITN_MAX_M, quant_matmul_forward
from .fused_matmul import quant_matmul_grad_input as quant_matmul_backward
from .qalora import fold_biases, qalora_forward, qalora_grad_input
from .quant_tile import supports


def _reference_only(qw, dtype) -> bool:
    return supports(qw) is not None or dtype == torch.float64 or (INTERPRETED and dtype == torch.bfloat16)


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X·Ŵᵀ (+ bias) for x [..., K] -> [..., N] in x's dtype (fp32 accumulation)."""
    if _reference_only(qw, x.dtype):
        return _reference.quant_matmul(x, qw, bias)
    return quant_matmul_forward(x, qw, bias)


def quant_matmul_grad_input(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """dX = dY·Ŵ for dy [..., N] -> [..., K] in dy's dtype (fp32 accumulation)."""
    if _reference_only(qw, dy.dtype):
        return _reference.quant_matmul_grad_input(dy, qw)
    return quant_matmul_backward(dy, qw)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense Ŵ [N, K] in ``dtype``, original column order (one kernel, fp32 math, one cast)."""
    if _reference_only(qw, dtype):
        return qw.dequantize(dtype)
    return dequantize_forward(qw, dtype)


__all__ = [
    "quant_matmul", "quant_matmul_grad_input", "dequantize", "quant_matmul_forward", "quant_matmul_backward",
    "dequantize_forward", "SPLITK_MAX_M", "SPLITN_MAX_M", "qalora_forward", "qalora_grad_input", "fold_biases",
]  # fmt: skip

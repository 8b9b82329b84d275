"""qlk's nn layer: :class:`QuantLinear` (quantized frozen base + optional QA-LoRA/LoRA adapter)."""
from .linear import QuantLinear

__all__ = ["QuantLinear"]

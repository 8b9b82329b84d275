"""qlk: quantized LoRA kernels (Triton) for fine-tuning on NVIDIA GPUs.

Importing qlk touches no GPU: it works on CPU-only machines (reference path, or the Triton
interpreter with ``TRITON_INTERPRET=1``).
"""
from .backend import use_backend
from .formats import QuantizedWeight, from_bnb, from_bnb_state_dict, from_gptq, to_bnb_state_dict
from .ops import quant_matmul, quant_matmul_grad_input, quantize

__version__ = "0.1.0"

__all__ = [
    "QuantizedWeight", "quantize", "quant_matmul", "quant_matmul_grad_input", "from_bnb",
    "from_bnb_state_dict", "to_bnb_state_dict", "from_gptq", "use_backend", "__version__",
]  # fmt: skip

"""qlk: quantized LoRA kernels (Triton) for fine-tuning on NVIDIA GPUs.

Importing qlk touches no GPU: it works on CPU-only machines (reference path, or the Triton
interpreter with ``TRITON_INTERPRET=1``).
"""
from .backend import use_backend
from .formats import QuantizedWeight, from_bnb, from_bnb_state_dict, from_gptq, to_bnb_state_dict
from .io import load_adapter, load_quantized, save_adapter, save_quantized
from .nn import QuantLinear
from .ops import quant_matmul, quant_matmul_grad_input, quantize
from .patch import dequantize_model, merge_model, patch_model, trainable_parameters, unpatch

__version__ = "0.1.0"

__all__ = [
    "QuantizedWeight", "quantize", "quant_matmul", "quant_matmul_grad_input", "from_bnb",
    "from_bnb_state_dict", "to_bnb_state_dict", "from_gptq", "use_backend", "__version__", "QuantLinear",
    "patch_model", "merge_model", "dequantize_model", "unpatch", "trainable_parameters", "save_adapter",
    "load_adapter", "save_quantized", "load_quantized",
]  # fmt: skip


def __getattr__(name):
    # qlk.QlkConfig: imports (and registers with Transformers) the quantizer only when asked for
    if name in ("QlkConfig", "QlkHfQuantizer"):
        from .integrations import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module 'qlk' has no attribute {name!r}")

# plain peft.get_peft_model accepts qlk layers (installed when peft is imported; QLK_PEFT_DISPATCH=0: off)
from .integrations._peft_hook import install_when_peft_imports  # noqa: E402

install_when_peft_imports()

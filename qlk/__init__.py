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


def _register_with_transformers() -> None:
    """Make ``from_pretrained(path)`` of a model saved with ``quant_method="qlk"`` work after a plain
    ``import qlk``, in any process, without importing Transformers (2 s) for users who never do.

    If ``transformers.quantizers.auto`` is already imported, register now; otherwise a
    ``sys.meta_path`` hook registers right after that module is first executed. Without the
    registration Transformers would only warn about an unknown quantization type and build the
    model with randomly initialized dense layers.
    """
    import sys

    if "transformers.quantizers.auto" in sys.modules:
        _register_now()
        return
    import importlib.abc
    import importlib.util

    target = "transformers.quantizers.auto"

    class _RegisterQlkAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target_module=None):
            if fullname != target:
                return None
            sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_now()

            spec.loader.exec_module = exec_then_register
            return spec

    if not any(type(f).__name__ == "_RegisterQlkAfterImport" for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterQlkAfterImport())


def _register_now() -> None:
    try:
        from .integrations import transformers as _hf  # noqa: F401  (registers "qlk" on import)
    except ImportError as e:  # a Transformers without the quantizer API qlk needs: qlk itself still works
        import warnings

        warnings.warn(f"qlk: could not register the 'qlk' quantization method with Transformers ({e})", stacklevel=2)


_register_with_transformers()


def __getattr__(name):
    # qlk.QlkConfig: imports (and registers with Transformers) the quantizer only when asked for
    if name in ("QlkConfig", "QlkHfQuantizer"):
        from .integrations import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module 'qlk' has no attribute {name!r}")

# plain peft.get_peft_model accepts qlk layers (installed when peft is imported; QLK_PEFT_DISPATCH=0: off)
from .integrations._peft_hook import install_when_peft_imports  # noqa: E402

install_when_peft_imports()

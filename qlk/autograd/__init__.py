"""torch.autograd Functions of the qlk layers (each docstring writes its chain rule out).

* :class:`QALoRAFunction` / :func:`qalora_linear`: QA-LoRA (group-pooled adapter, INT-N base).
* :class:`LoRAFunction` / :func:`lora_linear`: LoRA on an INT-N or NF4 base (QLoRA).
* :class:`QuantLinearFunction` / :func:`quant_linear`: the frozen quantized base alone.
"""
from .lora import LoRAFunction, QuantLinearFunction, lora_linear, quant_linear
from .qalora import QALoRAFunction, qalora_linear

__all__ = [
    "QALoRAFunction", "LoRAFunction", "QuantLinearFunction", "qalora_linear", "lora_linear", "quant_linear",
]  # fmt: skip

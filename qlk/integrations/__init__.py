"""Integrations of qlk with the PyTorch / Hugging Face ecosystem (each imported lazily where it
needs an optional package):

* :mod:`qlk.integrations.distributed`: DDP / FSDP2 (``fully_shard``) — :func:`check_fsdp`,
  :func:`shard_model`.
* :mod:`qlk.integrations.transformers`: ``QlkConfig``, a Transformers quantization config +
  quantizer (``from_pretrained(..., quantization_config=QlkConfig(...))``).
* :mod:`qlk.integrations.peft`: plain ``peft.get_peft_model`` on a qlk-quantized model (registered
  at ``import qlk`` by :mod:`qlk.integrations._peft_hook`), and export of qlk LoRA / QA-LoRA
  adapters to PEFT's adapter format.
* :mod:`qlk.integrations.bnb_models`: what ``patch_model`` does with bitsandbytes-loaded layers.
* :mod:`qlk.custom_ops`: ``torch.library`` custom ops for ``torch.compile``.
"""
from .distributed import FSDPWrapError, check_fsdp, shard_model

__all__ = ["check_fsdp", "shard_model", "FSDPWrapError"]

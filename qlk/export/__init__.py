"""Export a merged qlk model to formats that serving engines read (``qlk export``).

``export_model(model_dir, fmt="gguf", output=PATH)`` reads a directory written by ``qlk finetune``
(``merged/``) or ``qlk quantize`` (config.json + tokenizer + ``model.qlk.safetensors``), a
``.safetensors`` file written by :func:`qlk.save_quantized` with config.json and the tokenizer
beside it, or a dense Hugging Face directory, and writes one file. Formats: ``"gguf"``
(:mod:`qlk.export.gguf`: llama.cpp, and vLLM's GGUF loader).
"""
from __future__ import annotations

from pathlib import Path

FORMATS = ("gguf",)


def export_model(model_dir, fmt: str = "gguf", output=None, **options) -> Path:
    """Write the model at ``model_dir`` as ``fmt`` to ``output`` and return the written path.

    ``output`` defaults to ``<model_dir>/model.gguf``. ``options`` go to the format's writer
    (GGUF: :func:`qlk.export.gguf.export_gguf`: ``fallback``, ``float_type``, ``tokenizer_pre``,
    ``verbose``). Raises ValueError naming the layer when a weight has no exact block type and
    no ``fallback`` was given.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an export format; allowed: {', '.join(map(repr, FORMATS))}")
    from .gguf import export_gguf

    return export_gguf(model_dir, output=output, **options).path


__all__ = ["export_model", "FORMATS"]

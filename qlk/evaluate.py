"""``qlk eval``: perplexity on a text file and greedy generations, for a base model, a base model
quantized on the fly, a base model plus a qlk adapter (patched), or a saved qlk / merged model.

Perplexity is :func:`qlk.lm.perplexity` (non-overlapping windows, each scored from its start), the
same function and wording ``qlk finetune``'s merge check uses.
"""
from __future__ import annotations

import json
from pathlib import Path

from ._checks import UsageError
from .lm import (  # noqa: F401 - default_text_path, read_text, perplexity: the eval API, kept importable here
    DEFAULT_PROMPTS, backend_line, default_text_path, describe_perplexity, generate, inference_model, memory_report,
    perplexity, pick_device, read_text,
)  # fmt: skip


def adapter_patch_config(path) -> dict:
    """The ``patch_config`` qlk.save_adapter stored in an adapter file's metadata."""
    from .io import KIND_ADAPTER, _read_header

    try:  # the loader's own header checks: a damaged or foreign file is bad input, not a traceback
        meta = _read_header(path, KIND_ADAPTER)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--adapter {e}") from None
    cfg = meta.get("patch_config")
    if not cfg:
        raise UsageError(f"--adapter {path}: no qlk patch configuration in its metadata (not a qlk adapter file?)")
    return cfg


def prepare_model(model_path=None, adapter=None, quantize_fmt=None, bits=4, group_size=None, device=None):
    """(model, tokenizer, description) for evaluation.

    adapter: a ``qlk.save_adapter`` file: the base is patched as the file says, then loaded.
    quantize_fmt: "int" / "nf4" to quantize the base on the fly (no adapter).
    """
    from .hf_models import load_model
    from .moe import quantized_modules  # qlk linear layers and MoE expert projections

    model, tok, desc = load_model(model_path)
    if adapter is not None:
        from .io import load_adapter
        from .patch import patch_model

        if quantized_modules(model):
            raise UsageError("--adapter: the model is already a qlk model; pass the base model it was trained from")
        pc = adapter_patch_config(adapter)
        kw = {k: pc[k] for k in ("bits", "group_size", "fmt", "method", "r", "alpha", "dropout", "use_rslora", "double_quant") if k in pc}
        try:
            patch_model(model, verbose=False, **kw)
            load_adapter(model, adapter)
        except ValueError as e:  # another base model, a damaged file: say so, no traceback
            raise UsageError(f"--adapter {adapter}: {e}") from None
        desc += f" + adapter {adapter} ({pc.get('method')} on {pc.get('fmt')}{pc.get('bits')} g{pc.get('group_size')})"
    elif quantize_fmt:
        from .patch import patch_model

        if quantized_modules(model):
            raise UsageError("--quantize: the model is already quantized by qlk")
        try:
            patch_model(model, bits=bits, group_size=group_size, fmt=quantize_fmt, method=None, verbose=False)
        except ValueError as e:
            raise UsageError(str(e)) from None
        g = group_size or (64 if quantize_fmt == "nf4" else 32)
        desc += f", quantized to {quantize_fmt}{bits} g{g} (round to nearest)"
    if device is not None:
        model.to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, desc


def run_eval(model_path=None, adapter=None, text=None, max_tokens=4096, window=512, prompts=None,
             max_new_tokens=40, quantize_fmt=None, bits=4, group_size=None, device=None, as_json=False) -> dict:  # fmt: skip
    dev = pick_device(device)
    text_path = Path(text) if text else default_text_path()
    body = read_text(text_path)
    model, tok, desc = prepare_model(model_path, adapter, quantize_fmt, bits, group_size, dev)
    mem = memory_report(model, dev)
    res = {"model": desc, "backend": backend_line(dev), "text": str(text_path), "memory": mem}
    if not as_json:
        print(f"model: {desc}")
        print(res["backend"])
        bpp = mem["bits_per_param_quantized"]
        print(f"weights: {mem['weights_bytes'] / 2**20:.1f} MiB" + (f" ({bpp:.3f} bits/param in quantized layers)" if bpp else ""))
    eval_model, how = inference_model(model, dev)
    res["perplexity"] = perplexity(eval_model, tok, body, max_tokens, window, dev, progress=not as_json)
    p = res["perplexity"]
    if not as_json:
        print(f"perplexity {describe_perplexity(p, text_path)}{how}: {p['ppl']:.4f}  [{p['seconds']:.0f}s]")
    prompts = list(DEFAULT_PROMPTS) if prompts is None else prompts
    if prompts and max_new_tokens > 0:
        res["generations"] = dict(zip(prompts, generate(eval_model, tok, prompts, max_new_tokens, dev)))
        if not as_json:
            for q, a in res["generations"].items():
                print(f"  > {q}\n    {a!r}")
    if as_json:
        print(json.dumps(res, indent=2, default=str))
    return res

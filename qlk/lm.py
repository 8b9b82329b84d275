"""What the ``qlk`` commands do with a causal LM, shared by ``qlk finetune`` and ``qlk eval``:
choose the device, say which backend runs, report memory, generate greedily, and measure
perplexity — one function and one wording for every command.

Perplexity: the text is tokenized once, truncated to its first ``max_tokens`` tokens and cut into
non-overlapping windows of ``window`` tokens; each window is scored from its own start (BOS
prepended, no context carried over) and

    perplexity = exp( Σ NLL(token) / scored tokens ).

The same text, token budget and window give the same number in every command, so
``qlk finetune``'s merge check and ``qlk eval --max-tokens 512 --window 512`` agree.
"""
from __future__ import annotations

import copy
import math
import resource
import time
from pathlib import Path

from ._checks import UsageError

DEFAULT_PROMPTS = (
    "What is the capital of Portugal?",
    "Why do we see lightning before we hear thunder?",
    "How can I keep my houseplants healthy?",
)
DEFAULT_TEXT_CANDIDATES = ("/usr/share/common-licenses/GPL-3",)


# ---- device, backend, memory -------------------------------------------------------------------
def pick_device(name: str | None, flag: str = "--device"):
    """``torch.device`` for ``name`` (default: cuda when available), refusing a device that isn't there."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                             "use --device cpu or leave --device out")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise UsageError(f"{flag} {name!r}: allowed: cpu, cuda, cuda:N")
    return device


def backend_line(device) -> str:
    from . import backend

    which = backend.resolve(device)
    if which == "triton":
        how = "Triton interpreter on CPU" if device.type == "cpu" else f"Triton kernels on {device}"
    else:
        how = f"plain-torch reference path on {device} (no GPU: each quantized matmul dequantizes then uses torch.matmul)"
    return f"backend: {which} — {how}"


def memory_report(model, device) -> dict:
    """Bytes of every parameter and buffer (each storage once), the quantized layers' bits per
    parameter (qlk linear layers and MoE expert projections together), and the process peak (RSS on
    CPU, max_memory_allocated on CUDA)."""
    import torch

    from .moe import quantized_counts

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    counts = quantized_counts(model)  # qlk linear layers and MoE expert projections
    qbytes, qparams = counts["quantized_bytes"], counts["quantized_params"]
    rep = {
        "weights_bytes": total,
        "quantized_layer_bytes": qbytes,
        "quantized_params": qparams,
        "quantized_linear_layers": counts["linear_layers"],
        "expert_projections": counts["expert_projections"],
        "expert_matrices": counts["expert_matrices"],
        "bits_per_param_quantized": (8.0 * qbytes / qparams) if qparams else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        rep["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return rep


def fmt_bytes(n) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---- prompts and generation --------------------------------------------------------------------
def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer, instruction: str) -> str:
    """The model's input for an instruction: its chat template when it has one, else a plain format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def inference_model(model, device):
    """The model to generate / evaluate with. On the reference path (no GPU) every forward of a qlk
    layer dequantizes its weight, which dominates token-by-token decoding; there we decode with a
    dense copy holding the same Ŵ (+ σ·B·A) values (``qlk.dequantize_model``), same math. Returns
    (model, note)."""
    from . import backend
    from .moe import quantized_modules
    from .patch import dequantize_model

    if not quantized_modules(model) or backend.resolve(device) == "triton":
        return model, ""
    dense = dequantize_model(copy.deepcopy(model), dtype=None)
    return dense, " (reference path: decoded with the same dequantized weights Ŵ held densely)"


def generate(model, tokenizer, prompts, max_new_tokens: int, device, progress: bool = False, desc="generate") -> list[str]:
    """Greedy continuations of ``prompts`` (chat template applied), one progress tick per prompt."""
    import torch

    outs = []
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    it = prompts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(prompts, desc=desc, unit="prompt", leave=False)
    for p in it:
        ids = torch.tensor([encode(tokenizer, prompt_text(tokenizer, p))], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip
        outs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outs


# ---- perplexity --------------------------------------------------------------------------------
def default_text_path() -> Path:
    """Real English text on the machine (Debian's GPL-3), else the short text shipped with qlk."""
    for c in DEFAULT_TEXT_CANDIDATES:
        if Path(c).is_file():
            return Path(c)
    return Path(__file__).parent / "data" / "fallback_text.txt"


def read_text(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--text {p}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"--text {p}: the file is empty")
    return text


def token_windows(tokenizer, text: str, max_tokens: int | None, window: int):
    ids = encode(tokenizer, text)
    if max_tokens:
        ids = ids[:max_tokens]
    bos = tokenizer.bos_token_id
    wins = []
    for i in range(0, len(ids), window):
        w = ids[i : i + window]
        if bos is not None:
            w = [bos] + w  # every window starts like a document; BOS itself is never scored
        if len(w) > 1:
            wins.append(w)
    return wins, len(ids)


def perplexity(model, tokenizer, text: str, max_tokens: int | None = 4096, window: int = 512, device=None,
               progress: bool = False) -> dict:  # fmt: skip
    """{"ppl", "nll", "tokens", "windows", "window", "text_tokens", "seconds"} of ``model`` on ``text``."""
    import torch

    device = device or next(model.parameters()).device
    wins, n = token_windows(tokenizer, text, max_tokens, window)
    if not wins:
        raise UsageError("the text has fewer than 2 tokens")
    model.eval()
    total, count = 0.0, 0
    t0 = time.time()
    it = wins
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(wins, desc="perplexity", unit="window", leave=False)
    with torch.no_grad():
        for w in it:
            ids = torch.tensor([w], device=device)
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += nll.item()
            count += len(w) - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(wins),
            "window": window, "text_tokens": n, "seconds": time.time() - t0}  # fmt: skip


def describe_perplexity(p: dict, text_name) -> str:
    """The one wording of a perplexity measurement: what was read and how it was cut."""
    return f"on {text_name} (first {p['tokens']} tokens, {p['windows']} window(s) of <= {p['window']})"

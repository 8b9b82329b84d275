"""``qlk finetune``: QA-LoRA / QLoRA fine-tuning of a causal LM with checkpoints, resume, merge and save.

Pipeline: load the model (offline) -> greedy generations *before* -> ``qlk.patch_model`` -> train
the adapters (AdamW, warmup + cosine LR, loss on response tokens only) with a checkpoint every
``save_every`` steps -> save the adapter -> merge (QA-LoRA: into the INT-N biases, the model stays
INT-N; QLoRA: into a dense model, explicitly) -> save the merged model -> generations *after*.

Determinism: the batch of step s is a pure function of (seed, s), the adapters are initialised
right after ``torch.manual_seed(seed)``, and a checkpoint holds the adapter, the AdamW state, the
step, the loss history and every RNG state. ``--resume`` therefore ends with the same adapter as an
uninterrupted run (bit-for-bit on CPU; on GPU up to the non-determinism of atomics in kernels).

Output directory::

    run_config.json        the arguments (resume refuses a different configuration)
    checkpoint.pt          latest checkpoint (atomic: temporary file + os.replace)
    adapter.safetensors    qlk.save_adapter
    loss.png               loss curve
    merged/                QA-LoRA: config + tokenizer + model.qlk.safetensors (INT-N, qlk.save_quantized)
                           QLoRA:   a dense Hugging Face model directory (NF4 can't hold the update)
    summary.json           timings, memory, bits per parameter, losses, generations
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PROMPTS = (
    "What is the capital of Portugal?",
    "Why do we see lightning before we hear thunder?",
    "How can I keep my houseplants healthy?",
)
CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "run_config.json"
OUTPUTS = (CHECKPOINT, RUN_CONFIG, "adapter.safetensors", "loss.png", "summary.json", "merged")
# arguments that must match for --resume to continue a run
RESUME_KEYS = (
    "method", "bits", "group_size", "fmt", "r", "alpha", "dropout", "lr", "steps", "batch_size", "max_length",
    "seed", "warmup_steps", "weight_decay", "data_sha256", "model",
)  # fmt: skip


class UsageError(ValueError):
    """Bad input from the user: the CLI prints the message and exits with status 2."""


# ---- data ----------------------------------------------------------------------------------------
def default_data_path() -> Path:
    return Path(__file__).parent / "data" / "answer_reason.jsonl"


def load_records(path) -> list[dict]:
    """Records of a JSONL file: ``{"instruction", "response"}`` (optional ``"input"``) or ``{"text"}``.

    Raises :class:`UsageError` naming the file and line of the first bad record.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--data {p}: no such file")
    if p.is_dir():
        raise UsageError(f"--data {p}: is a directory; expected a JSONL file")
    records = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--data {p}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise UsageError(f"--data {p}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
            if isinstance(rec.get("text"), str) and rec["text"].strip():
                records.append({"text": rec["text"]})
                continue
            ins, resp = rec.get("instruction", rec.get("prompt")), rec.get("response", rec.get("output"))
            if not (isinstance(ins, str) and isinstance(resp, str) and ins.strip() and resp.strip()):
                raise UsageError(
                    f"--data {p}, line {lineno}: expected non-empty string fields 'instruction' and 'response' "
                    f"(or 'text'); got keys {sorted(rec)}"
                )
            extra = rec.get("input")
            if isinstance(extra, str) and extra.strip():
                ins = f"{ins}\n\n{extra}"
            records.append({"instruction": ins, "response": resp})
    if not records:
        raise UsageError(f"--data {p}: no records (the file is empty or has only blank lines)")
    return records


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prompt_text(tokenizer, instruction: str) -> str:
    """The model's input for an instruction: its chat template when it has one, else a plain format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_records(records, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; prompt tokens get label -100, long texts are chunked."""
    eos = tokenizer.eos_token_id
    examples = []
    for rec in records:
        if "text" in rec:
            ids = _encode(tokenizer, rec["text"]) + ([eos] if eos is not None else [])
            for i in range(0, len(ids), max_length):
                chunk = ids[i : i + max_length]
                if len(chunk) > 1:
                    examples.append((chunk, list(chunk)))
            continue
        p = _encode(tokenizer, prompt_text(tokenizer, rec["instruction"]))
        r = _encode(tokenizer, rec["response"]) + ([eos] if eos is not None else [])
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        if any(lab != -100 for lab in labels[1:]):
            examples.append((ids, labels))
    return examples


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of (0-based) step ``step``: consecutive slices of per-epoch permutations
    seeded by (seed, epoch), so any step's batch is known without replaying earlier ones."""
    import torch

    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def collate(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


# ---- config ---------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    model: str | None = None
    data: str | None = None
    output_dir: str = "runs/qlk-finetune"
    method: str = "qalora"
    bits: int = 4
    group_size: int | None = None  # 32 for INT, 64 for NF4
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 2e-3
    steps: int = 20
    batch_size: int = 8
    max_length: int = 96
    warmup_steps: int = 2
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 5
    overwrite: bool = False
    resume: bool = False
    device: str | None = None
    prompts: list = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 32
    generate: bool = True
    progress: bool = True
    data_sha256: str = ""

    @property
    def fmt(self) -> str:
        return "nf4" if self.method == "qlora" else "int"

    def resolved_group_size(self) -> int:
        return self.group_size or (64 if self.fmt == "nf4" else 32)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["fmt"], d["group_size"] = self.fmt, self.resolved_group_size()
        return {k: d[k] for k in RESUME_KEYS}


def validate_config(cfg: FinetuneConfig) -> None:
    if cfg.method not in ("qalora", "qlora", "lora"):
        raise UsageError(f"--method {cfg.method!r}: allowed qalora, qlora, lora")
    if cfg.method == "qlora" and cfg.bits != 4:
        raise UsageError(f"--method qlora is LoRA on NF4, a 4-bit format; got --bits {cfg.bits}")
    if cfg.method != "qlora" and cfg.bits not in (2, 3, 4):
        raise UsageError(f"--bits {cfg.bits}: INT formats are 2, 3 or 4 bits")
    for name in ("steps", "batch_size", "max_length", "r", "save_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.max_length < 8:
        raise UsageError(f"--max-length {cfg.max_length} is too short (need at least 8 tokens)")
    if not cfg.lr > 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr}")
    if cfg.overwrite and cfg.resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the run in --output-dir")


def prepare_output_dir(cfg: FinetuneConfig) -> Path:
    """Refuse an existing non-empty directory unless --overwrite (delete qlk's own outputs there)
    or --resume (needs a checkpoint and the same configuration)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    busy = out.exists() and any(out.iterdir())
    if cfg.resume:
        if not (out / CHECKPOINT).is_file():
            raise UsageError(f"--resume: no checkpoint at {out / CHECKPOINT}; start the run without --resume")
        saved = json.loads((out / RUN_CONFIG).read_text()) if (out / RUN_CONFIG).is_file() else {}
        want = cfg.fingerprint()
        diff = {k: (saved.get(k), want[k]) for k in RESUME_KEYS if saved.get(k) != want[k]}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise UsageError(f"--resume: {out} was started with other settings ({lines}); pass the same ones")
        return out
    if busy:
        if not cfg.overwrite:
            raise UsageError(
                f"--output-dir {out} already exists and is not empty; pass --overwrite to replace its qlk outputs, "
                "--resume to continue its run, or choose another directory"
            )
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(cfg.fingerprint(), indent=2) + "\n")
    return out


# ---- checkpoints ---------------------------------------------------------------------------------
def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Every RNG the training touches, as tensors / tuples (loadable with ``weights_only=True``)."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: Path, model, optimizer, step: int, losses: list, tokens: int, elapsed: float) -> None:
    import torch

    state = {
        "step": step,
        "adapter": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "losses": list(losses),
        "tokens": tokens,
        "elapsed": elapsed,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, model, optimizer) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"--resume: cannot read checkpoint {path} ({type(e).__name__}: {e})") from None
    params = dict(model.named_parameters())
    missing = [n for n in state["adapter"] if n not in params]
    if missing:
        raise UsageError(f"--resume: checkpoint {path} has adapters the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, t in state["adapter"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


# ---- helpers --------------------------------------------------------------------------------------
def common_group_sizes(model, limit: int = 256) -> list[int]:
    """Multiples of 8 up to ``limit`` dividing the in_features of every linear layer but the head."""
    import math as _m

    from torch import nn

    ks = [m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    if not ks:
        return []
    g = 0
    for k in ks:
        g = _m.gcd(g, k)
    return [d for d in range(8, min(g, limit) + 1, 8) if g % d == 0]


def pick_device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_line(device) -> str:
    from . import backend

    which = backend.resolve(device)
    if which == "triton":
        how = "Triton interpreter on CPU" if device.type == "cpu" else f"Triton kernels on {device}"
    else:
        how = f"plain-torch reference path on {device} (no GPU: each quantized matmul dequantizes then uses torch.matmul)"
    return f"backend: {which} — {how}"


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Linear warmup for ``warmup_steps`` then cosine decay to 10% of ``lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def memory_report(model, device) -> dict:
    """Bytes of every parameter and buffer (each storage once), the quantized layers' bits per
    parameter, and the process peak (RSS on CPU, max_memory_allocated on CUDA)."""
    import torch

    from .patch import qlk_layers

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    layers = qlk_layers(model)
    qbytes = sum(m.qweight.nbytes for m in layers.values())
    qparams = sum(m.in_features * m.out_features for m in layers.values())
    rep = {
        "weights_bytes": total,
        "quantized_layer_bytes": qbytes,
        "quantized_params": qparams,
        "bits_per_param_quantized": (8.0 * qbytes / qparams) if qparams else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        rep["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return rep


def fmt_bytes(n) -> str:
    return f"{n / 2**20:.1f} MiB"


MERGE_CHECK_TOKENS = 512


def _merge_check_text():
    """(text, name): the English text the merged-vs-unmerged perplexity check reads."""
    from .evaluate import default_text_path, read_text

    path = default_text_path()
    return read_text(path), str(path)


def _merge_check_ppl(model, tok, text, device):
    from .evaluate import perplexity

    return perplexity(model, tok, text[0], max_tokens=MERGE_CHECK_TOKENS, window=256, device=device)


def inference_model(model, device):
    """The model to generate / evaluate with. On the reference path (no GPU) every forward of a qlk
    layer dequantizes its weight, which dominates token-by-token decoding; there we decode with a
    dense copy holding the same Ŵ (+ σ·B·A) values (``qlk.dequantize_model``), same math. Returns
    (model, note)."""
    from . import backend
    from .patch import dequantize_model, qlk_layers

    if not qlk_layers(model) or backend.resolve(device) == "triton":
        return model, ""
    dense = dequantize_model(copy.deepcopy(model), dtype=None)
    return dense, " (reference path: decoded with the same dequantized weights Ŵ held densely)"


def generate(model, tokenizer, prompts, max_new_tokens: int, device) -> list[str]:
    import torch

    outs = []
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for p in prompts:
        ids = torch.tensor([_encode(tokenizer, prompt_text(tokenizer, p))], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip
        outs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outs


def plot_losses(losses, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss per step")
    if len(losses) >= 4:
        ema, out = losses[0], []
        for v in losses:
            ema = 0.8 * ema + 0.2 * v
            out.append(ema)
        ax.plot(steps, out, lw=2, label="EMA (0.8)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _print(*a):
    print(*a, flush=True)


# ---- main ----------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured; returns the summary dict (also written to summary.json).

    On KeyboardInterrupt a checkpoint is written and :class:`KeyboardInterrupt` re-raised after
    saying where it is.
    """
    t_start = time.time()
    validate_config(cfg)
    data_path = Path(cfg.data) if cfg.data else default_data_path()
    records = load_records(data_path)
    cfg.data_sha256 = file_sha256(data_path)
    out = prepare_output_dir(cfg)

    import torch

    from .hf_models import load_model, save_qlk_dir
    from .io import save_adapter
    from .patch import merge_model, patch_model, qlk_layers

    device = pick_device(cfg.device)
    _print(f"qlk finetune: method={cfg.method} fmt={cfg.fmt}{cfg.bits} group_size={cfg.resolved_group_size()} "
           f"r={cfg.r} alpha={cfg.alpha} lr={cfg.lr} steps={cfg.steps} batch={cfg.batch_size} "
           f"max_length={cfg.max_length} seed={cfg.seed}")  # fmt: skip
    _print(backend_line(device))
    t0 = time.time()
    model, tok, desc = load_model(cfg.model)
    model.to(device)
    _print(f"model: {desc}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, loaded in {time.time() - t0:.1f}s")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples = tokenize_records(records, tok, cfg.max_length)
    if not examples:
        raise UsageError(f"--data {data_path}: no example has a response token within --max-length {cfg.max_length}")
    n_tok = sum(len(ids) for ids, _ in examples)
    _print(f"data: {data_path} — {len(records)} records, {len(examples)} examples, {n_tok} tokens "
           f"(mean {n_tok / len(examples):.0f}/example)")  # fmt: skip

    summary = {"config": asdict(cfg), "model": desc, "device": str(device), "backend": backend_line(device)}
    if cfg.generate and not cfg.resume:
        t0 = time.time()
        summary["before"] = generate(model, tok, cfg.prompts, cfg.max_new_tokens, device)
        summary["time_generate_before_s"] = time.time() - t0
        _print(f"generations before fine-tuning ({summary['time_generate_before_s']:.0f}s):")
        for p, g in zip(cfg.prompts, summary["before"]):
            _print(f"  > {p}\n    {g!r}")

    # ---- patch
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        patch_model(
            model, bits=cfg.bits, group_size=cfg.resolved_group_size(), method=cfg.method, r=cfg.r, alpha=cfg.alpha,
            dropout=cfg.dropout, fmt=cfg.fmt, verbose=False,
        )  # fmt: skip
    except ValueError as e:
        hint = ""
        if cfg.fmt == "int":
            ok = common_group_sizes(model)
            hint = f". Group sizes that divide every layer of this model: {ok}" if ok else ""
        raise UsageError(f"cannot patch the model with --group-size {cfg.resolved_group_size()}: {e}{hint}") from None
    summary["time_patch_s"] = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    mem = memory_report(model, device)
    _print(f"patched {len(qlk_layers(model))} layers in {summary['time_patch_s']:.1f}s: {n_train:,} trainable "
           f"adapter parameters; weights {fmt_bytes(mem['weights_bytes'])} "
           f"({mem['bits_per_param_quantized']:.3f} bits/param in the quantized layers)")  # fmt: skip
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start_step, losses, tokens_done, elapsed_before = 0, [], 0, 0.0
    ckpt_path = out / CHECKPOINT
    if cfg.resume:
        st = load_checkpoint(ckpt_path, model, optimizer)
        start_step, losses, tokens_done, elapsed_before = st["step"], st["losses"], st["tokens"], st["elapsed"]
        _print(f"resumed from {ckpt_path} at step {start_step}/{cfg.steps}")

    # ---- train
    model.train()
    pad = tok.pad_token_id
    step = start_step
    t_train = time.time()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="finetune", unit="step", dynamic_ncols=True,
                   file=sys.stdout)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < cfg.steps:
            ts = time.time()
            idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
            input_ids, mask, labels = (t.to(device) for t in collate([examples[i] for i in idx], pad))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {step + 1}; lower --lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            ntok = int(mask.sum())
            tokens_done += ntok
            dt = time.time() - ts
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{ntok / dt:.0f}", refresh=False)
                bar.update(1)
            else:
                _print(f"step {step}/{cfg.steps} loss {losses[-1]:.4f} {ntok / dt:.0f} tok/s")
            if step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(ckpt_path, model, optimizer, step, losses, tokens_done,
                                elapsed_before + time.time() - t_train)  # fmt: skip
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        save_checkpoint(ckpt_path, model, optimizer, step, losses, tokens_done, elapsed_before + time.time() - t_train)
        _print(f"\ninterrupted at step {step}/{cfg.steps}: checkpoint saved to {ckpt_path}\n"
               f"continue with the same command plus --resume")  # fmt: skip
        raise
    if bar is not None:
        bar.close()
    train_s = time.time() - t_train
    save_checkpoint(ckpt_path, model, optimizer, step, losses, tokens_done, elapsed_before + train_s)
    summary.update(
        losses=losses, steps=step, train_tokens=tokens_done, time_train_s=train_s + elapsed_before,
        tokens_per_s=tokens_done / max(train_s + elapsed_before, 1e-9),
    )  # fmt: skip
    mem = memory_report(model, device)
    summary["memory_training"] = mem
    _print(f"trained {step} steps, {tokens_done} tokens in {summary['time_train_s']:.0f}s "
           f"({summary['tokens_per_s']:.0f} tok/s); loss {losses[0]:.3f} -> {losses[-1]:.3f}")  # fmt: skip
    peak = f"peak RSS {fmt_bytes(mem['peak_rss_bytes'])}"
    if "cuda_max_memory_allocated" in mem:
        peak = f"CUDA max_memory_allocated {fmt_bytes(mem['cuda_max_memory_allocated'])}; " + peak
    _print(f"memory: weights {fmt_bytes(mem['weights_bytes'])} (quantized layers {fmt_bytes(mem['quantized_layer_bytes'])}, "
           f"{mem['bits_per_param_quantized']:.3f} bits/param); {peak}")  # fmt: skip

    # ---- save adapter, loss curve, merge
    save_adapter(model, out / "adapter.safetensors")
    _print(f"adapter saved: {out / 'adapter.safetensors'}")
    try:
        name = Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct"
        plot_losses(losses, out / "loss.png",
                    f"{name}: {cfg.method} on {cfg.fmt}{cfg.bits} g{cfg.resolved_group_size()}, r={cfg.r}, lr={cfg.lr:g}")
        _print(f"loss curve: {out / 'loss.png'}")
    except ImportError:
        _print("loss curve skipped: matplotlib is not installed (pip install matplotlib)")
    t0 = time.time()
    merged_dir = out / "merged"
    model.eval()
    ppl_text = _merge_check_text()
    ppl_before = _merge_check_ppl(model, tok, ppl_text, device)
    if cfg.method == "qalora":
        merge_model(model)
        save_qlk_dir(model, tok, merged_dir, {"method": "qalora-merged", "bits": cfg.bits,
                                              "group_size": cfg.resolved_group_size(), "source": desc})  # fmt: skip
        note = f"merged QA-LoRA into the INT{cfg.bits} biases (still INT{cfg.bits}, no adapter)"
    else:
        merge_model(model, dense_lora=True)
        model.save_pretrained(str(merged_dir), safe_serialization=True)
        tok.save_pretrained(str(merged_dir))
        note = "merged LoRA into dense weights (an NF4/INT base cannot hold σ·B·A exactly); quantize with `qlk quantize`"
    summary["time_merge_save_s"] = time.time() - t0
    summary["memory_merged"] = memory_report(model, device)
    _print(f"{note}: saved {merged_dir} in {summary['time_merge_save_s']:.1f}s")
    ppl_after = _merge_check_ppl(model, tok, ppl_text, device)
    summary["merge_check"] = {"text": ppl_text[1], "tokens": ppl_before["tokens"],
                              "ppl_unmerged": ppl_before["ppl"], "ppl_merged": ppl_after["ppl"]}  # fmt: skip
    _print(f"perplexity on {ppl_before['tokens']} tokens of {ppl_text[1]}: with adapter {ppl_before['ppl']:.4f}, "
           f"merged {ppl_after['ppl']:.4f} (relative difference "
           f"{abs(ppl_after['ppl'] - ppl_before['ppl']) / ppl_before['ppl']:.1e})")  # fmt: skip

    if cfg.generate:
        t0 = time.time()
        gen_model, how = inference_model(model, device)
        summary["after"] = generate(gen_model, tok, cfg.prompts, cfg.max_new_tokens, device)
        del gen_model
        summary["time_generate_after_s"] = time.time() - t0
        _print(f"generations after fine-tuning, merged model{how} ({summary['time_generate_after_s']:.0f}s):")
        for i, (p, g) in enumerate(zip(cfg.prompts, summary["after"])):
            _print(f"  > {p}")
            if "before" in summary:
                _print(f"    before: {summary['before'][i]!r}")
            _print(f"    after:  {g!r}")
    summary["time_total_s"] = time.time() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print(f"done in {summary['time_total_s']:.0f}s; summary: {out / 'summary.json'}")
    return summary

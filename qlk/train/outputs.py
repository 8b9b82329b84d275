"""The output directory of ``qlk finetune``: one run at a time, nothing of the user's touched, and
outputs replaced only once the new ones are complete.

Layout::

    .qlk-finetune.lock     held (fcntl.flock) while a run uses the directory; a dead run's lock frees itself
    run_config.json        the settings that must match for --resume
    checkpoints/           Trainer checkpoints (checkpoint-<step>/, complete ones carry COMPLETE)
    logs/                  TensorBoard event files (when tensorboard is installed)
    adapter.safetensors    qlk.save_adapter
    loss.png               loss curve (and eval perplexity)
    merged/                QA-LoRA: config + tokenizer + model.qlk.safetensors (INT-N); QLoRA/LoRA: dense HF model
    summary.json           timings, memory, bits per parameter, losses, eval perplexity, generations

Final outputs are written under ``.qlk-staging/`` and moved into place together at the end
(:meth:`OutputDir.publish`), so an interrupted or failed run leaves the previous outputs as they were.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .._checks import UsageError

LOCK = ".qlk-finetune.lock"
RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
STAGING = ".qlk-staging"
FINAL_OUTPUTS = ("adapter.safetensors", "loss.png", "merged", "model.gguf", "summary.json")
#: a run's state, replaced when a new run starts ("checkpoint.pt": the checkpoint of qlk before the Trainer)
RUN_STATE = (RUN_CONFIG, CHECKPOINTS, LOGS, STAGING, "checkpoint.pt")
#: everything qlk may create in --output-dir; --overwrite replaces these and nothing else
QLK_OUTPUTS = RUN_STATE + FINAL_OUTPUTS


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


class DirectoryLock:
    """An exclusive ``flock`` on ``<dir>/.qlk-finetune.lock``. The kernel drops it when the holder
    exits, however it exits (SIGKILL included), so a lock left by a dead run is simply taken over."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.fd = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"--output-dir {self.path.parent} is in use by another qlk finetune ({holder}); wait for it to "
                "finish, or choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self.fd = None


class OutputDir:
    """Prepare, lock and publish the output directory (rank 0 only under torchrun)."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = DirectoryLock(self.path)
        self.staging = self.path / STAGING
        self.checkpoints = self.path / CHECKPOINTS
        self.logs = self.path / LOGS

    def prepare(self, cfg) -> None:
        """Refuse an existing non-empty directory unless --overwrite (its qlk outputs get replaced) or
        --resume (needs a complete checkpoint and the same configuration). Takes the lock first."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output-dir {out}: exists and is not a directory")
        had_files = out.is_dir() and any(p.name != LOCK for p in out.iterdir())
        out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._check(cfg, had_files)
        except BaseException:
            self.lock.release()
            raise

    def _check(self, cfg, had_files: bool) -> None:
        from .trainer import latest_checkpoint

        out = self.path
        if cfg.resume:
            if latest_checkpoint(self.checkpoints) is None:
                raise UsageError(f"--resume: no complete checkpoint under {self.checkpoints}; start the run without --resume")
            saved = json.loads((out / RUN_CONFIG).read_text()) if (out / RUN_CONFIG).is_file() else {}
            want = cfg.fingerprint()
            diff = {k: (saved.get(k), want[k]) for k in want if saved.get(k) != want[k]}
            if diff:
                lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise UsageError(f"--resume: {out} was started with other settings ({lines}); pass the same ones")
            _remove(self.staging)
            return
        if had_files and not cfg.overwrite:
            raise UsageError(
                f"--output-dir {out} already exists and is not empty; pass --overwrite to replace its qlk outputs "
                "(other files stay), --resume to continue its run, or choose another directory"
            )
        # a new run: the previous run's checkpoints and settings go now, its final outputs only in publish()
        for name in RUN_STATE:
            _remove(out / name)
        (out / RUN_CONFIG).write_text(json.dumps(cfg.fingerprint(), indent=2) + "\n")

    def stage(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging

    def publish(self) -> None:
        """Move every staged output over the old one. Each move is an atomic rename; a directory
        (merged/) is swapped through a temporary name so no moment has half of one."""
        for name in FINAL_OUTPUTS:
            new = self.staging / name
            if not new.exists():
                continue
            old = self.path / name
            if new.is_dir() and old.exists():
                trash = self.path / f".{name}.old"
                _remove(trash)
                os.replace(old, trash)
                os.replace(new, old)
                _remove(trash)
            else:
                if old.is_dir():
                    _remove(old)
                os.replace(new, old)
        _remove(self.staging)

    def close(self) -> None:
        self.lock.release()

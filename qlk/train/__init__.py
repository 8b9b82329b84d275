"""``qlk finetune`` as a package, one concern per module, read top-down from the entry point:

* :func:`qlk.train.command.run` — the command: load, patch, ``Trainer.train``, merge, save (start here);
* :mod:`qlk.train.config` — :class:`FinetuneConfig`, its checks, what ``--resume`` must match;
* :mod:`qlk.train.data` — JSONL records, tokenization, the deterministic per-step sampler, collation;
* :mod:`qlk.train.trainer` — :class:`QlkTrainer` (adapter-only checkpoints), Ctrl-C and log callbacks;
* :mod:`qlk.train.outputs` — the output directory: lock, ``--overwrite``, outputs published at the end.
"""
from .command import run
from .config import FinetuneConfig

__all__ = ["FinetuneConfig", "run"]

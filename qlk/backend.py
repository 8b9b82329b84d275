"""Which implementation runs an op: the Triton kernels or the plain-torch reference.

``auto`` (the default) picks Triton for CUDA tensors, Triton-through-the-interpreter for CPU
tensors when ``TRITON_INTERPRET=1`` was set before qlk was imported, and the reference path
otherwise. Override per call (``backend=``), per block (``with qlk.use_backend("reference"):``)
or per process (``QLK_BACKEND=reference|triton|auto``).
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "reference")
# read once: Triton itself reads TRITON_INTERPRET when @triton.jit decorates, i.e. at import
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_default = os.environ.get("QLK_BACKEND", "auto")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}; allowed: {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with backend ``name``."""
    global _default
    previous, _default = _default, _check(name)
    try:
        yield
    finally:
        _default = previous


def resolve(device: torch.device, backend: str | None = None) -> str:
    """'triton' or 'reference' for tensors on ``device``."""
    name = _check(backend or _default)
    if name == "reference":
        return name
    runs_triton = device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)
    if name == "triton" and not runs_triton:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing qlk for CPU "
            f"tensors; got a tensor on {device}. Use backend='reference' on this device."
        )
    return "triton" if runs_triton else "reference"

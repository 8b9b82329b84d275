"""Test helpers that record what a launch did without changing what it does.

Two kernel orders, or two tile decoders, can compute the same product: a test that only compares
values cannot tell which ran. These wrap the launcher's kernel or the kernels' jitted helpers (the
Triton interpreter looks a nested ``@triton.jit`` function up in its module at call time) and
record each use, then call through to the real one.

Compiled kernels (a GPU run, ``qlk.kernels.config.INTERPRETED`` False) cannot be observed that way:
Triton compiles a kernel's jitted helpers from their source and refuses a global that is a plain
Python function ("NameError: Cannot access global variable ... from within @jit'ed function"), and
the failed compile leaks into later tests of the process. :func:`record_calls` therefore never
wraps a jitted function there (it skips the test, or returns None for a caller that still checks
its values); :func:`record_launches` (the launch's keyword arguments, constexprs included) works in
both modes.
"""
from __future__ import annotations

import pytest


def record_launches(monkeypatch, module, name: str) -> list[dict]:
    """Replace ``module.name``, a Triton kernel launched as ``kernel[grid](...)``, by one that appends
    each launch's keyword arguments to the returned list, then launches the real kernel."""
    seen, kernel = [], getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Spy())
    return seen


def compiled() -> bool:
    """Whether the kernels run compiled (a GPU), not under the Triton interpreter."""
    from qlk.kernels import config

    return not config.INTERPRETED


def _jitted(fn) -> bool:
    """A ``@triton.jit`` function (``JITFunction`` compiled, ``InterpretedFunction`` interpreted)."""
    from triton.runtime.jit import KernelInterface

    return isinstance(fn, KernelInterface)


def record_calls(monkeypatch, module, *names: str, when_compiled: str = "skip") -> list[str] | None:
    """Wrap the functions ``module.<name>`` so that each call appends its name to the returned list,
    then calls the real function.

    A jitted helper can only be wrapped under the interpreter (module docstring). With compiled
    kernels and any of ``names`` jitted, nothing is patched and, by ``when_compiled``: "skip" skips
    the test (pytest.skip, before anything is patched); "none" returns None, for a test that still
    checks its values on the GPU and leaves out only what the list would have shown (the caller must
    test ``is None``: a None list is never an empty one). Plain Python functions are wrapped in both
    modes."""
    if when_compiled not in ("skip", "none"):
        raise ValueError(f"when_compiled={when_compiled!r}; allowed: 'skip', 'none'")
    jitted = [name for name in names if _jitted(getattr(module, name))]
    if jitted and compiled():
        if when_compiled == "none":
            return None
        pytest.skip(f"compiled kernels: Triton cannot call a Python spy on the jitted {', '.join(jitted)} "
                    "(tests/spies.py); the interpreter run checks which helper ran")
    calls = []
    for name in names:
        def spy(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls

"""Test helpers that record what a launch did without changing what it does.

Two kernel orders, or two tile decoders, can compute the same product: a test that only compares
values cannot tell which ran. These wrap the launcher's kernel or the kernels' jitted helpers (the
Triton interpreter looks a nested ``@triton.jit`` function up in its module at call time) and
record each use, then call through to the real one.
"""
from __future__ import annotations


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


def record_calls(monkeypatch, module, *names: str) -> list[str]:
    """Wrap the functions ``module.<name>`` so that each call appends its name to the returned list,
    then calls the real function."""
    calls = []
    for name in names:
        def spy(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls

"""Make plain ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` accept qlk layers, without
importing peft (a slow import) when qlk is imported.

``import qlk`` calls :func:`install_when_peft_imports`: if peft is already imported, qlk's LoRA
dispatch is installed now (:func:`qlk.integrations.peft.install`); if it is installed but not
imported yet, a one-shot import hook installs it right after ``peft`` finishes importing; without
peft nothing happens. ``QLK_PEFT_DISPATCH=0`` in the environment turns it off.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings

ENV = "QLK_PEFT_DISPATCH"


def _install() -> None:
    own = sys.modules.get(__package__ + ".peft")
    if own is not None and not hasattr(own, "install"):
        # peft is being imported by qlk.integrations.peft itself, which is only half executed:
        # hand it this function, which it calls at its own end (no import back from it to here)
        own._after_import = _install
        return
    try:
        from .peft import install

        install()
    except Exception as e:  # never break `import peft` because of qlk
        warnings.warn(
            f"qlk could not register its LoRA layer with PEFT ({type(e).__name__}: {e}); plain peft.get_peft_model "
            "will not accept qlk layers. Use qlk.integrations.peft.get_peft_model(model, config) instead",
            stacklevel=2,
        )


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``peft`` is looked up, it hands back the spec the other finders
    give, with a loader that runs :func:`_install` once the package's module has executed. (A lookup
    that only asks whether peft is available, ``importlib.util.find_spec("peft")`` as Transformers
    does, executes nothing and so installs nothing; the finder stays until peft is really imported.)"""

    def __init__(self):
        self._looking = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._looking:
            return None
        self._looking = True  # the lookup below goes through sys.meta_path again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _install()

        loader.exec_module = exec_then_install
        return spec


def install_when_peft_imports() -> None:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "peft" in sys.modules:
        _install()
    elif not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path) and importlib.util.find_spec("peft"):
        sys.meta_path.insert(0, _AfterPeftImport())


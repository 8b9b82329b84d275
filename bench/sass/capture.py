"""Record the Triton launches of ordinary Python code, compiled for a GPU that is not there.

Inside :func:`capture`, the active Triton driver is replaced by :class:`TargetOnlyDriver`, which
reports an sm_90 or sm_80 device, and two methods are wrapped:

* ``JITFunction.run`` compiles as usual (``warmup=True``: Triton's own binder does the argument
  specialization, so a pointer divisible by 16 or an integer equal to 1 is specialized exactly
  as on the GPU), records a :class:`Launch` and returns without launching;
* ``Autotuner.run`` hands *every* config that survives the kernel's own pruning hooks (which read
  the fake driver's target, so sm_80 and sm_90 prune differently) to the jitted function, where
  a real autotuner would time them and keep one.

Tensors are CPU tensors of the real shapes; nothing reads or writes them, so the code under
capture sees garbage outputs. A launcher's host-side logic (dispatch on M, grid sizes, split
counts read from the device's SM count) runs unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import defaultdict

from .gpus import gpu


class TargetOnlyDriver:
    """The part of a Triton driver the compiler and launchers query, answering for ``arch``."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.gpu = gpu(arch)
        self.target = GPUTarget("cuda", self.gpu.arch, 32)
        props = dict(max_shared_mem=self.gpu.smem_per_cta, multiprocessor_count=self.gpu.sms,
                     max_num_regs=self.gpu.regs_per_sm, warpSize=32, sm_clock_rate=int(self.gpu.ghz * 1e6),
                     mem_clock_rate=2619000, mem_bus_width=5120)
        self.utils = type("TargetOnlyUtils", (), {"get_device_properties": staticmethod(lambda device=0: dict(props))})()

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("nothing can be timed under bench.sass.capture: there is no GPU")


@dataclasses.dataclass
class TensorArg:
    shape: tuple
    dtype: str
    nbytes: int  # bytes of the elements the view spans (numel x element size)
    data_ptr: int


@dataclasses.dataclass
class Launch:
    """One compiled launch: which kernel, for which target, with what arguments and grid."""

    kernel: str
    arch: int
    grid: tuple | None
    constexprs: dict
    scalars: dict  # integer / float runtime arguments by name
    tensors: dict  # name -> TensorArg
    num_warps: int
    num_stages: int
    cubin: bytes
    dynamic_smem: int
    cache_key: str  # Triton's hash of the compiled kernel
    source: str  # file that defines the kernel
    label: str = ""  # free text a caller may attach (e.g. the benchmark case)

    @property
    def ctas(self) -> int | None:
        return None if self.grid is None else math.prod(self.grid)


def _tensor_arg(v) -> TensorArg:
    return TensorArg(tuple(v.shape), str(v.dtype).replace("torch.", ""), v.numel() * v.element_size(), v.data_ptr())


def _record(fn, arch, kernel, args, kwargs, grid, label) -> Launch:
    bound = dict(zip((p.name for p in fn.params), args))
    bound.update({p.name: kwargs[p.name] for p in fn.params if p.name in kwargs})
    for p in fn.params:
        if p.name not in bound and p.has_default:
            bound[p.name] = p.default
    try:
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
    except Exception:  # noqa: BLE001 - a grid we cannot evaluate leaves the wave model out, nothing else
        g = None
    constexprs = {p.name: bound.get(p.name) for p in fn.params if p.is_constexpr}
    tensors = {n: _tensor_arg(v) for n, v in bound.items() if hasattr(v, "data_ptr") and hasattr(v, "element_size")}
    scalars = {n: v for n, v in bound.items()
               if n not in constexprs and isinstance(v, (int, float)) and not isinstance(v, bool)}
    md = kernel.metadata
    return Launch(fn.fn.__name__, arch, g, constexprs, scalars, tensors, md.num_warps, md.num_stages,
                  kernel.asm["cubin"], int(getattr(md, "shared", 0) or 0), str(getattr(md, "hash", "")),
                  os.path.abspath(fn.fn.__code__.co_filename), label)


@contextlib.contextmanager
def capture(arch: int = 90, label=None):
    """Compile and record, never run, every Triton launch made inside the block.

    ``label``: a callable returning the text to attach to each launch (called at launch time).
    Yields the list the :class:`Launch` records are appended to."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.sass.capture: unset TRITON_INTERPRET; under the interpreter Triton compiles nothing")
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    real_run, real_autotune = JITFunction.run, Autotuner.run
    previous_driver = driver._active
    saved_caches = {}  # JITFunction -> its per-device caches from before the capture

    def run(self, *args, grid, warmup, **kwargs):
        if self not in saved_caches:  # a binder built for another target must not be reused
            saved_caches[self] = self.device_caches
            self.device_caches = defaultdict(self.create_binder)
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None:
            launches.append(_record(self, arch, kernel, args, kwargs, grid, label() if label else ""))
        return kernel

    def autotune_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            for config in configs:
                self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
        finally:
            self.nargs = None

    driver.set_active(TargetOnlyDriver(arch))
    JITFunction.run, Autotuner.run = run, autotune_every_config
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = real_run, real_autotune
        driver._active = previous_driver
        for fn, caches in saved_caches.items():
            fn.device_caches = caches

"""The pure-Triton peers at the static report's shapes, launched on CPU tensors under bench.sass.capture.

* gemlite (PyPI ``gemlite``, Mobius Labs): W4A16 g128 asymmetric INT4 (``W ≈ q·s + z`` fma mode),
  bf16 activations. ``gemlite-auto`` is gemlite's own dispatch for the batch size (GEMM for
  M ≥ 64, GEMM_SPLITK for 5..63, GEMV_REVSPLITK for M ≤ 4) with the configs it ships for the
  GPU (h100.json / a100.json); ``gemlite-gemv`` forces its plain GEMV kernel at M = 1 (no
  shipped config: every autotune config compiles); ``gemlite-tuned`` is its GEMM at the largest M
  with the shipped configs hidden, so its whole "fast" autotune list compiles (the shipped
  H100 configs use num_stages=1).
* grouped-nf4-gemm (PyPI ``grouped-nf4-gemm``): NF4 forward (``gemm_4bit_grouped``: the
  M-tile prefill kernel, or its decode kernel when every group is one row, i.e. M = 1) and input
  gradient (``dgrad_4bit_grouped``), single expert. Its absmax is plain fp32 (it de-nests double
  quant on the host), its prefill default is the TF32 register-LUT loop; ``gnf4-bf16`` is its
  opt-in bf16-MMA prefill loop (``prefill_variant=3``) at the largest M.

Weights are random bytes of the peers' own layouts: nothing runs, values are never read.

Both packages ask the CUDA runtime about the device when imported (capability, name, SM count).
This module stubs those torch.cuda queries with the arch under capture (H100 for sm_90, A100
for sm_80) while it imports and launches the peers, and only here. gemlite reads the capability
once, at import: a process analyzes one arch (static_report.py runs one worker per arch).
A peer that cannot be imported or compiled is a case with the reason, never dropped.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench import sass  # noqa: E402

from launches import DTYPE, MS, QUICK_MS, QUICK_SHAPES, SHAPES, Case, _selected, activation, case_name  # noqa: E402

GEMLITE_GROUP = 128
NF4_BLOCK = 64
_DEVICES = {
    90: dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, total_memory=80 << 30),
    80: dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multi_processor_count=108, total_memory=80 << 30),
}


def declare_loops() -> None:
    """Main-loop trips per CTA of the peers' kernels that do not loop ``range(0, K, BLOCK_K)``
    (gemlite's GEMM and split-K GEMM do, and its GEMVs have no loop). grouped-nf4-gemm's decode
    kernel runs KBLOCKS_PER_SPLIT K blocks; its input gradient reduces over N."""
    sass.declare("_gemv_nf4_grouped_splitk", iterations=lambda L: int(L.scalars["KBLOCKS_PER_SPLIT"]))
    sass.declare("_dgrad_nf4_grouped", iterations=lambda L: sass.reduction_trips(L, "N", ("BLOCK_N",)))


declare_loops()


def _current_arch() -> int:
    """The arch bench.sass's target-only driver compiles for; a real driver's when one exists."""
    from triton.runtime import driver

    try:
        return int(driver.active.get_current_target().arch)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"no Triton target ({type(e).__name__}: {e}); run the peers under bench.sass.capture") from None


@contextlib.contextmanager
def cuda_stub(arch: int):
    """torch.cuda answers as one H100 (90) or A100 (80) would, for the peers' device queries."""
    d = _DEVICES[arch]
    props = types.SimpleNamespace(**d, multiprocessor_count=d["multi_processor_count"], is_integrated=False,
                                  L2_cache_size=50 << 20, warp_size=32)
    stubs = dict(
        get_device_capability=lambda device=None: (d["major"], d["minor"]),
        get_device_properties=lambda device=None: props,
        get_device_name=lambda device=None: d["name"],
        device_count=lambda: 0,  # the peers' per-GPU workspace loops allocate nothing
        current_device=lambda: 0,
        is_current_stream_capturing=lambda: False,
        empty_cache=lambda: None,
        synchronize=lambda device=None: None,
    )
    saved = {k: getattr(torch.cuda, k) for k in stubs}
    for k, v in stubs.items():
        setattr(torch.cuda, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)


# ---------------------------------------------------------------- gemlite
_GEMLITE = {}


def _gemlite():
    """(gemlite module, None) or (None, reason). Imported once, under the stub of the current arch."""
    arch = _current_arch()
    if "mod" not in _GEMLITE:
        try:
            with cuda_stub(arch):
                import gemlite
                from gemlite.triton_kernels import utils as gl_utils
            from gemlite.triton_kernels import gemv_kernels

            # its GEMV passes a per-GPU table indexed by tensor.device.index (None on CPU); only MX reads it
            gemv_kernels.fp4_mapping = {None: torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12],
                                                           dtype=torch.int8)}
            _GEMLITE.update(mod=gemlite, arch=arch, why=None)
            if gl_utils.GPU_COMPUTE_CAPABILITY != arch // 10:
                _GEMLITE.update(why=f"gemlite read capability {gl_utils.GPU_COMPUTE_CAPABILITY} at import")
        except Exception as e:  # noqa: BLE001
            _GEMLITE.update(mod=None, arch=arch, why=f"import gemlite failed: {type(e).__name__}: {e}")
    if _GEMLITE["arch"] != arch:
        return None, f"gemlite was imported for sm_{_GEMLITE['arch']}; analyze one arch per process"
    return _GEMLITE["mod"], _GEMLITE["why"]


@functools.lru_cache(maxsize=None)
def _gemlite_layer(n: int, k: int):
    gemlite, why = _gemlite()
    from gemlite import DType

    g = GEMLITE_GROUP
    layer = gemlite.GemLiteLinear(W_nbits=4, group_size=g, in_features=k, out_features=n,
                                  input_dtype=DType.BF16, output_dtype=DType.BF16)
    w_q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.ones(n, k // g, dtype=DTYPE)
    zeros = torch.full((n, k // g), 8.0, dtype=DTYPE)
    layer.pack(w_q, scales, zeros, bias=None, fma_mode=True)
    return layer


def _gemlite_run(m: int, k: int, n: int, matmul_type: str | None, shipped_configs: bool = True):
    """One gemlite forward. ``shipped_configs=False`` hides its per-GPU config cache for the call,
    so its autotuner's pruned "fast" config list compiles in full (the report shows the best)."""
    with cuda_stub(_current_arch()):
        layer = _gemlite_layer(n, k)
        x = activation(m, k)
        from gemlite import core

        saved = core.GEMLITE_TRITON_CONFIG_CACHE
        if not shipped_configs:
            core.GEMLITE_TRITON_CONFIG_CACHE = {}
        try:
            return layer.forward_manual(x, matmul_type) if matmul_type else layer.forward_auto_no_warmup(x)
        finally:
            core.GEMLITE_TRITON_CONFIG_CACHE = saved


def gemlite_cases(shapes, ms):
    try:
        import gemlite  # noqa: F401  (only to learn whether it is installed; imported for real under capture)
        missing = None
    except ImportError as e:
        missing = f"not available: {e}; pip install gemlite"
    except Exception:  # noqa: BLE001 - it needs the stub and the driver: checked again at launch
        missing = None
    for k, n in shapes:
        for m in ms:
            yield Case(case_name("gemlite-auto", "int4g128", k, n, m), "peer:gemlite", "fwd", "int4g128", k, n, m,
                       lambda m=m, k=k, n=n: _gemlite_run(m, k, n, None), missing)
            if m == 1:
                yield Case(case_name("gemlite-gemv", "int4g128", k, n, m), "peer:gemlite", "fwd", "int4g128", k, n,
                           m, lambda m=m, k=k, n=n: _gemlite_run(m, k, n, "GEMV"), missing)
            if m == max(ms):
                # its autotune list, not the shipped config: the anchor "best fast-autotune config"
                yield Case(case_name("gemlite-tuned", "int4g128", k, n, m), "peer:gemlite", "fwd", "int4g128", k,
                           n, m, lambda m=m, k=k, n=n: _gemlite_run(m, k, n, "GEMM", shipped_configs=False), missing)


# ---------------------------------------------------------------- grouped-nf4-gemm
@functools.lru_cache(maxsize=None)
def _nf4_weight(n: int, k: int):
    b = torch.empty(1, n, k // 2, dtype=torch.uint8)  # [E, N, K/2] bitsandbytes nibbles
    absmax = torch.empty(1, n, k // NF4_BLOCK, dtype=torch.float32)  # de-nested fp32 absmax
    return b, absmax


def _gnf4():
    os.environ.setdefault("GNF4_TRITON_PREBIND", "0")  # its prebound launch path would bypass Triton's run()
    import nf4_grouped

    return nf4_grouped


class _EnvView:
    """os.environ as grouped-nf4-gemm's module sees it during a launch: TRITON_INTERPRET reads "1"."""

    def get(self, key, default=None):
        return "1" if key == "TRITON_INTERPRET" else os.environ.get(key, default)

    def __getitem__(self, key):
        return "1" if key == "TRITON_INTERPRET" else os.environ[key]

    def __contains__(self, key):
        return key == "TRITON_INTERPRET" or key in os.environ


@contextlib.contextmanager
def _gnf4_cpu_guard(module):
    """grouped-nf4-gemm refuses CPU tensors unless TRITON_INTERPRET=1 (its interpreter tests). Only
    its own module is shown that value, for the call: Triton itself must not see it (it reads the
    variable while compiling), and the capture compiles each launch instead of running it."""
    real = module.os
    module.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    module.os.environ = _EnvView()
    try:
        yield
    finally:
        module.os = real


def _gnf4_run(op: str, m: int, k: int, n: int, variant=None):
    with cuda_stub(_current_arch()):
        g = _gnf4()
        # it plans decode split-K from the SM count, which it reads as 64 off CUDA: tell it the GPU's
        d = _DEVICES[_current_arch()]
        g._SM_CACHE["cpu"] = d["multi_processor_count"]
        g._CC_CACHE["cpu"] = (d["major"], d["minor"])
        b, absmax = _nf4_weight(n, k)
        with _gnf4_cpu_guard(g):
            if op == "fwd":
                return g.gemm_4bit_grouped(activation(m, k), b, absmax, [m], [0], prefill_variant=variant)
            return g.dgrad_4bit_grouped(activation(m, n), b, absmax, [m], [0])


def gnf4_cases(shapes, ms):
    try:
        os.environ.setdefault("GNF4_TRITON_PREBIND", "0")
        import nf4_grouped  # noqa: F401
        missing = None
    except ImportError as e:
        missing = f"not available: {e}; pip install grouped-nf4-gemm"
    except Exception as e:  # noqa: BLE001
        missing = f"not available: import nf4_grouped failed: {type(e).__name__}: {e}"
    for k, n in shapes:
        for m in ms:
            yield Case(case_name("gnf4-fwd", "nf4", k, n, m), "peer:grouped-nf4-gemm", "fwd", "nf4", k, n, m,
                       lambda m=m, k=k, n=n: _gnf4_run("fwd", m, k, n), missing)
            yield Case(case_name("gnf4-dgrad", "nf4", k, n, m), "peer:grouped-nf4-gemm", "dgrad", "nf4", k, n, m,
                       lambda m=m, k=k, n=n: _gnf4_run("dgrad", m, k, n), missing)
            if m == max(ms):  # its opt-in bf16-MMA prefill loop (variant 3) beside the default TF32 one
                yield Case(case_name("gnf4-bf16", "nf4", k, n, m), "peer:grouped-nf4-gemm", "fwd", "nf4", k, n, m,
                           lambda m=m, k=k, n=n: _gnf4_run("fwd", m, k, n, variant=3), missing)


def all_cases(quick: bool = False, patterns=()):
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if quick else (SHAPES, MS)
    out = list(gemlite_cases(shapes, ms)) + list(gnf4_cases(shapes, ms))
    return [c for c in out if _selected(c.name, patterns)]


if __name__ == "__main__":
    from launches import parse_args, run_case

    args = parse_args()
    for case in all_cases(args.quick, [p for p in args.cases.split(",") if p]):
        print(f"{case.name:40} {case.unavailable if args.list else (run_case(case) or 'launched')}", flush=True)

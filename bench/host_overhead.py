"""Host (CPU) time per launcher call, without running any kernel: what the launch decisions cost.

Runs :func:`qlk.kernels.fused_matmul.quant_matmul_forward` / ``quant_matmul_grad_input`` on a
4096x4096 layer with bf16 activations as on an sm_90 GPU with 132 SMs, on CPU tensors: the Triton
interpreter off (``qlk.kernels.config.INTERPRETED`` False, so the full candidate lists are scored),
``target_arch`` patched to 90 and ``num_sms`` to 132, and every Triton kernel the launchers index
(the fused forward / split-K / input-gradient kernels, NF4's absmax de-nesting, the dequantize
kernel) replaced by a stub whose ``kernel[grid](*args, **kwargs)`` does nothing. The dense GEMM of
the ``dequant`` path (``torch.matmul`` / ``torch.addmm`` into ``out``) is stubbed too while timing
(a CPU GEMM of 4096^3 would swamp the decisions). What remains: the launch decisions (path, tile,
flags), ``weight_args``, the output / workspace allocations and the workspace copies (here CPU
tensor ops; on a GPU each is a launch of its own), and argument building. Not measured here: the
Triton launcher's own cost per ``kernel[grid](...)`` (binding, specialization key, the driver
call), which a GPU run adds (bench/gpu_triage.py's ``host`` lines).

No GPU needed::

    env -u TRITON_INTERPRET PYTHONPATH=$PWD python bench/host_overhead.py            # the table
    env -u TRITON_INTERPRET PYTHONPATH=$PWD python bench/host_overhead.py --profile  # + cProfile top

Each row is the median of ``--calls`` timed calls (after 5 untimed ones), and the device launches of
one more call (round 37: every aten op that runs a GPU kernel, counted by a ``TorchDispatchMode``, the
dense GEMM included, plus every Triton launch). Options: ``--calls N``
(timed calls per row, default 200), ``--m 1,16,...``, ``--profile [ROWS]``
(cProfile of every row's timed calls, the top functions by cumulative time), ``--uncached``
(clear the launch caches before every call: the cost of a first call at a new shape), ``--finish``
(``fused_matmul.SPLITK_FINISH`` on; round 38: the grouped decode's too), ``--experts`` (round 38: the
grouped MoE forward of M tokens, top-2 over 8 experts), ``--moe-layer`` (round 39: a whole patched
experts module's call, the decode path beside the general one), ``--layer``
(round 37: the whole ``QuantLinear`` forward under ``torch.no_grad``, a decode step's view: the
layer's checks, its ``qweight`` view, the layer function, ``qlk.quant_matmul`` and the launcher, for
the base layer and a LoRA layer; CPU tensors, since autocast cannot be asked about ``meta``; the
LoRA rows include the adapter's two small CPU matmuls, which on a GPU are two launches).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench/host_overhead.py: run with the interpreter off (env -u TRITON_INTERPRET ...)")

import torch  # noqa: E402

import qlk  # noqa: E402
from qlk.kernels import config as cfg  # noqa: E402
from qlk.kernels import dequant as dq  # noqa: E402
from qlk.kernels import fused_matmul as fm  # noqa: E402
from qlk.kernels import heuristics as h  # noqa: E402
from qlk.kernels import nf4_tile  # noqa: E402

ARCH, SMS = 90, 132
N = K = 4096
MS = (1, 16, 64, 256, 4096)
FORMATS = {"int4g128": dict(bits=4, group_size=128, fmt="int"), "nf4": dict(bits=4, group_size=64, fmt="nf4")}


class _Stub:
    """A Triton kernel that launches nothing: ``stub[grid](*args, **kwargs)``; ``configs`` as the
    real kernel's (the M = 1 FMA gradient sizes its deterministic workspace from them)."""

    def __init__(self, real):
        self.configs = getattr(real, "configs", [])
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


KERNELS = ((fm, "_quant_matmul_fwd_kernel"), (fm, "_quant_matmul_splitk_kernel"),
           (fm, "_quant_matmul_grad_input_kernel"), (fm, "_quant_matmul_grad_input_splitn_kernel"),
           (fm, "_quant_matmul_grad_input_gemv_kernel"), (nf4_tile, "_nf4_denest_kernel"),
           (dq, "_dequantize_kernel"))


@contextlib.contextmanager
def sm90_without_kernels(kernels=KERNELS):
    """The launchers as on sm_90 / 132 SMs, ``kernels`` stubs (module docstring)."""
    assert not cfg.INTERPRETED and not fm.INTERPRETED, "the interpreter is on"
    saved = [(mod, name, getattr(mod, name)) for mod, name in kernels]
    saved += [(mod, name, getattr(mod, name)) for mod in (fm, cfg) for name in ("target_arch", "num_sms")]
    try:
        for mod, name in kernels:
            setattr(mod, name, _Stub(getattr(mod, name)))
        for mod in (fm, cfg):
            mod.target_arch = lambda: ARCH
            mod.num_sms = lambda device=None: SMS
        _clear_all()
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def no_dense_gemm():
    """``torch.matmul`` / ``torch.addmm`` with ``out=`` do nothing (the dequant path's dense GEMM)."""
    real = torch.matmul, torch.addmm
    torch.matmul = lambda a, b, out=None: out
    torch.addmm = lambda c, a, b, out=None: out
    try:
        yield
    finally:
        torch.matmul, torch.addmm = real


def _clear_all():
    clear = getattr(fm, "clear_launch_caches", None) or getattr(h, "clear_launch_caches", None)
    if clear is not None:
        clear()
    for fn in (h._choose_default, h.choose_path, h.choose_fused, h.choose_m1_grad):
        fn.cache_clear()


@contextlib.contextmanager
def jit_stub():
    """``--stub jit``: the kernels' own objects, ``JITFunction.run`` a no-op instead (so the
    ``triton.heuristics`` layers above each kernel run too, as on a GPU)."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run
    JITFunction.run = lambda self, *args, grid=None, warmup=False, **kwargs: None
    try:
        yield
    finally:
        JITFunction.run = real


#: aten ops that launch nothing on a GPU (allocation, views, metadata): not counted by :func:`launches_of`
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias", "as_strided", "t", "transpose",
              "slice", "select", "unsqueeze", "squeeze", "expand", "permute", "detach", "alias", "_unsafe_view",
              "lift_fresh", "unbind", "split", "numpy_T", "contiguous"}
_REAL_GEMMS = torch.matmul, torch.addmm


def launches_of(fn) -> int:
    """The device launches of one ``fn()``: every aten op that runs a kernel on a GPU (a
    ``TorchDispatchMode`` count, the dense GEMM of the dequantize path included) plus every Triton
    launch (``JITFunction.run`` or a stubbed kernel's call)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import JITFunction

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_KERNEL:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    stubs = [getattr(mod, name) for mod, name in KERNELS if isinstance(getattr(mod, name), _Stub)]
    before = sum(st.launches for st in stubs)
    jit_run, gemms = JITFunction.run, (torch.matmul, torch.addmm)

    def run(self, *args, **kwargs):
        count[0] += 1
        return jit_run(self, *args, **kwargs)

    JITFunction.run = run
    torch.matmul, torch.addmm = _REAL_GEMMS
    try:
        with Count():
            fn()
    finally:
        JITFunction.run = jit_run
        torch.matmul, torch.addmm = gemms
    return count[0] + sum(st.launches for st in stubs) - before


def measure(calls: int, ms, profile_rows: int = 0, uncached: bool = False, device: str = "cpu",
            stub: str = "kernel"):
    rows = []
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    stubbed = KERNELS if stub == "kernel" else ((fm, "_quant_matmul_grad_input_gemv_kernel"), (dq, "_dequantize_kernel"))
    with sm90_without_kernels(stubbed), no_dense_gemm(), (jit_stub() if stub == "jit" else contextlib.nullcontext()):
        for fmt_name, q in FORMATS.items():
            qw = qlk.quantize(w, **q).to(device)
            for m in ms:
                x = torch.randn(m, K, dtype=torch.bfloat16, device=device)
                dy = torch.randn(m, N, dtype=torch.bfloat16, device=device)
                for op, fn in (("fwd", lambda: fm.quant_matmul_forward(x, qw)),
                               ("grad", lambda: fm.quant_matmul_grad_input(dy, qw))):
                    mm = m
                    path = fm.choose_path(op, mm, qw, x.device, torch.bfloat16)
                    for _ in range(5):
                        fn()
                    prof = cProfile.Profile() if profile_rows else None
                    times = []
                    for _ in range(calls):
                        if uncached:
                            _clear_all()
                        t0 = time.perf_counter()
                        if prof is not None:
                            prof.enable()
                        fn()
                        if prof is not None:
                            prof.disable()
                        times.append(time.perf_counter() - t0)
                    best = statistics.median(times)  # the median call: robust to a shared machine's preemptions
                    launches = launches_of(fn)
                    rows.append((fmt_name, op, m, path, launches, best * 1e6))
                    print(f"{fmt_name:9s} {op:4s} M={m:<5d} {path:8s} {launches} launches {best * 1e6:8.1f} us/call",
                          flush=True)
                    if prof is not None:
                        s = io.StringIO()
                        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(profile_rows)
                        print(s.getvalue())
    return rows


def measure_layers(calls: int, ms):
    """``--layer``: µs per ``layer(x)`` under ``torch.no_grad`` (the launchers as in :func:`measure`,
    the backend forced to Triton for CPU tensors)."""
    from torch import nn

    from qlk import backend

    rows = []
    stubbed = ((fm, "_quant_matmul_grad_input_gemv_kernel"), (dq, "_dequantize_kernel"))
    real_resolve = backend.resolve
    backend.resolve = lambda device, name=None: "triton"
    try:
        with sm90_without_kernels(stubbed), no_dense_gemm(), jit_stub(), torch.no_grad():
            for fmt_name, q in FORMATS.items():
                kw = dict(fmt=q["fmt"], group_size=q["group_size"], **({"bits": q["bits"]} if q["fmt"] == "int" else {}))
                for method in (None, "lora"):
                    if method is not None:  # the adapter's CPU bf16 matmuls grow with M (not host work)
                        ms_here = [m for m in ms if m == 1]
                    else:
                        ms_here = ms
                    torch.manual_seed(0)
                    layer = qlk.nn.QuantLinear.from_dense(nn.Linear(K, N, bias=False), method=method, r=16, **kw)
                    layer = layer.to(torch.bfloat16).eval()
                    for m in ms_here:
                        x = torch.randn(m, K, dtype=torch.bfloat16)
                        for _ in range(5):
                            layer(x)
                        times = []
                        for _ in range(calls):
                            t0 = time.perf_counter()
                            layer(x)
                            times.append(time.perf_counter() - t0)
                        us = statistics.median(times) * 1e6
                        launches = launches_of(lambda: layer(x))
                        rows.append((fmt_name, f"layer {method or 'base'}", m, "no_grad", launches, us))
                        print(f"{fmt_name:9s} layer {method or 'base':5s} M={m:<5d} {launches} launches {us:8.1f} us/call",
                              flush=True)
    finally:
        backend.resolve = real_resolve
    return rows


def measure_experts(calls: int, tokens, device: str = "cpu"):
    """``--experts``: µs and device launches per grouped (MoE) forward of a decode step, the rows of
    ``tokens`` tokens routed top-2 over 8 experts of a 4096 -> 2048 stacked weight (the launcher
    :func:`qlk.kernels.grouped_matmul.grouped_matmul_forward` with its tile map, as on sm_90 with 132
    SMs; kernels stubbed as with ``--stub jit``). On ``meta`` tensors (``--device meta``), as the tile
    map is built on a GPU (one launch); CPU tensors take its torch twin (~20 ops)."""
    from qlk.kernels import grouped_matmul as gm

    experts, top_k, n = 8, 2, 2048
    rows = []
    torch.manual_seed(0)
    w = torch.randn(experts * n, K) * 0.02
    saved = [(gm, name, getattr(gm, name)) for name in ("target_arch", "num_sms")]
    try:
        gm.target_arch = lambda: ARCH
        gm.num_sms = lambda device=None: SMS
        with sm90_without_kernels(()), jit_stub():
            for fmt_name, q in FORMATS.items():
                qw = qlk.quantize(w, **q).to(device)
                bias = torch.randn(experts, n, dtype=torch.bfloat16, device=device)
                for t in tokens:
                    s = t * top_k
                    x = torch.randn(s, K, dtype=torch.bfloat16, device=device)
                    counts = torch.zeros(experts, dtype=torch.int64)
                    counts[torch.randperm(experts)[:top_k]] = t  # the tokens pick the same experts
                    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)

                    def fn():
                        gm._LAST_TILE_MAP[0] = None  # a decode step's offsets are new: no remembered map
                        return gm.grouped_matmul_forward(x, qw, offsets, experts, bias, max_rows_per_expert=t)
                    us, launches = _time_and_count(fn, calls)
                    rows.append((fmt_name, "experts fwd", s, "grouped", launches, us))
                    print(f"{fmt_name:9s} experts fwd S={s:<4d} {launches} launches {us:8.1f} us/call", flush=True)
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
    return rows


def _time_and_count(fn, calls: int):
    """(median host µs of ``calls`` timed calls after 5 untimed ones, device launches of one more)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, launches_of(fn)


def measure_moe_layer(calls: int, tokens, device: str = "meta"):
    """``--moe-layer`` (round 39): µs and device launches of a whole patched experts module's call
    under ``torch.no_grad`` (Mixtral's ``MixtralExperts``, 8 experts top-2, H = 256, I = 512: the
    launch count does not depend on the sizes), ``tokens`` tokens, on the Triton backend as on
    sm_90 with every kernel stubbed (``--stub jit``). Two rows a token count: ``decode`` (the
    one-launch routing with tokens, positions and (round 40) the projections' tile map, both grouped
    projections, the gate-up one reading the routed rows in place and forming Mixtral's gate
    silu(G)·U in its epilogue (round 40; before: the rows' gather, the tile map, the SiLU and the
    product), the combine kernel) and ``general`` (the same call through the training path's
    torch glue, as before round 39). On ``meta`` the routing is taken as on a GPU, and the
    projections' autocast query (which ``meta`` cannot answer) is skipped, as with autocast off."""
    from torch import nn
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from qlk import backend
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels import routing
    from qlk.nn import experts as ex

    experts, top_k = 8, 2
    rows = []
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=256, intermediate_size=512, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    dense = MixtralExperts(config)
    for p in dense.parameters():  # made with torch.empty
        nn.init.normal_(p, std=0.02)
    patched = qlk.patch_model(nn.ModuleDict({"experts": dense}), bits=4, group_size=128,
                              method=None, verbose=False)["experts"].to(torch.bfloat16).to(device)
    saved = [(gm, name, getattr(gm, name)) for name in ("target_arch", "num_sms")]
    from qlk.autograd import experts as autograd_experts

    saved += [(autograd_experts, "compute_dtype", autograd_experts.compute_dtype)]
    saved += [(backend, "resolve", backend.resolve), (ex, "_routes_in_one_launch", ex._routes_in_one_launch),
              (ex.QuantExperts, "_decodes_in_few_launches", ex.QuantExperts._decodes_in_few_launches)]
    decode_test = ex.QuantExperts._decodes_in_few_launches
    try:
        gm.target_arch = lambda: ARCH
        gm.num_sms = lambda device=None: SMS
        backend.resolve = lambda device, name=None: "triton"
        # autocast cannot be asked about meta tensors: the activations' dtype, as with autocast off
        autograd_experts.compute_dtype = lambda x: x.dtype
        ex._routes_in_one_launch = lambda ids, num_experts: routing.fits(ids.shape[0], num_experts)
        with sm90_without_kernels(()), jit_stub(), torch.no_grad():
            for t in tokens:
                hidden = torch.randn(t, 256, dtype=torch.bfloat16, device=device)
                ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(t)]).to(device)
                weights = torch.rand(t, top_k, dtype=torch.bfloat16, device=device)
                for path in ("decode", "general"):
                    ex.QuantExperts._decodes_in_few_launches = decode_test if path == "decode" else \
                        (lambda self, *args: False)
                    us, launches = _time_and_count(lambda: patched(hidden, ids, weights), calls)
                    rows.append(("int4g128", "experts layer", t, path, launches, us))
                    print(f"int4g128  experts layer T={t:<4d} {path:8s} {launches} launches {us:8.1f} us/call",
                          flush=True)
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--m", default=",".join(map(str, MS)))
    ap.add_argument("--profile", type=int, nargs="?", const=25, default=0)
    ap.add_argument("--uncached", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (default) or meta (allocations without memory: the "
                    "workspaces' zeroing and copies then cost their dispatch only, as a GPU's launches would)")
    ap.add_argument("--stub", choices=("kernel", "jit"), default="kernel",
                    help="kernel: the kernel objects replaced (default); jit: JITFunction.run a no-op, the "
                    "triton.heuristics layers above each kernel kept")
    ap.add_argument("--layer", action="store_true", help="the whole QuantLinear forward under torch.no_grad "
                    "(base and LoRA layers; CPU tensors, kernels stubbed as with --stub jit)")
    ap.add_argument("--finish", action="store_true", help="fused_matmul.SPLITK_FINISH on (the split-K decode "
                    "in one launch, round 37)")
    ap.add_argument("--experts", action="store_true", help="the grouped (MoE) forward at decode: M tokens "
                    "routed top-2 over 8 experts (round 38)")
    ap.add_argument("--moe-layer", action="store_true", help="a whole patched MixtralExperts call under "
                    "torch.no_grad at M tokens, on meta tensors: the decode path and the general one (round 39)")
    a = ap.parse_args()
    fm.SPLITK_FINISH = a.finish
    if a.experts or a.moe_layer:  # either or both
        rows = measure_experts(a.calls, [int(v) for v in a.m.split(",")], a.device) if a.experts else []
        if a.moe_layer:
            rows += measure_moe_layer(a.calls, [int(v) for v in a.m.split(",")], "meta")
    elif a.layer:
        rows = measure_layers(a.calls, [int(v) for v in a.m.split(",")])
    else:
        rows = measure(a.calls, [int(v) for v in a.m.split(",")], a.profile, a.uncached, a.device, a.stub)
    print("\n| format | op | M | path | device launches | host us/call |\n|---|---|---|---|---|---|")
    for fmt_name, op, m, path, launches, us in rows:
        print(f"| {fmt_name} | {op} | {m} | {path} | {launches} | {us:.1f} |")


if __name__ == "__main__":
    main()

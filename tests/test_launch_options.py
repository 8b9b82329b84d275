"""Launch options: every qlk kernel whose arithmetic relies on FMA contraction launches with
``enable_fp_fusion=True`` (:data:`qlk.kernels.config.FP_FUSION`, through ``@fma_kernel``), the
bit-exact kernels with ``False``; none is left to Triton's default (on in Triton 3.9, with a
warning, off from 3.10).

The static part reads each kernel's decorator chain; the launch part spies on the innermost
``run`` (JITFunction on a GPU, InterpretedFunction here) of real launches through the public
entry points, so a launcher that bypassed the decorator, or a layer that dropped the option, fails.
"""
from __future__ import annotations

import importlib
import os
import pkgutil

import pytest
import torch
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import KernelInterface

import qlk
import qlk.kernels
from qlk.kernels import config, dequant, qalora
from qlk.kernels import fused_matmul as fm

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"

#: module -> kernels that rely on FMA contraction (s·q + b, fp32 sums of products)
FMA = {
    "fused_matmul": {"_quant_matmul_fwd_kernel", "_quant_matmul_splitk_kernel", "_quant_matmul_grad_input_kernel",
                     "_quant_matmul_grad_input_splitn_kernel", "_quant_matmul_grad_input_gemv_kernel"},
    "grouped_matmul": {"_grouped_matmul_fwd_kernel", "_grouped_matmul_splitk_kernel",
                       "_grouped_matmul_grad_input_kernel"},
    "qalora": {"_fold_bias_kernel"},
    "moe_combine": {"_combine_kernel"},
}
#: kernels that must round s·q and + b separately (bit for bit with the reference / bitsandbytes)
EXACT = {"dequant": {"_dequantize_kernel"}, "nf4_tile": {"_nf4_denest_kernel"},
         "grouped_matmul": {"_tile_map_kernel"}, "routing": {"_route_kernel"}}  # the last two: integers only


def _layers(kernel):
    """The decorator chain, outermost first, ending with the JITFunction / InterpretedFunction."""
    out = [kernel]
    while isinstance(out[-1], (Autotuner, Heuristics)):
        out.append(out[-1].fn)
    return out


def _fp_fusion_layer(kernel):
    """What the kernel's Heuristics layers set enable_fp_fusion to (None: no layer sets it)."""
    for layer in _layers(kernel):
        if isinstance(layer, Heuristics) and "enable_fp_fusion" in layer.values:
            return layer.values["enable_fp_fusion"]({})
    return None


def test_every_kernel_declares_fp_fusion():
    """Each launchable kernel in qlk.kernels is either an FMA kernel (decorated) or a bit-exact one
    (not decorated: its launcher passes False); a new kernel must be put in one of the two lists."""
    assert config.FP_FUSION == {"enable_fp_fusion": True}
    seen = {}
    for info in pkgutil.iter_modules(qlk.kernels.__path__):
        mod = importlib.import_module(f"qlk.kernels.{info.name}")
        for name, obj in vars(mod).items():
            # launchable kernels are named *_kernel (device functions are JIT functions too)
            if isinstance(obj, KernelInterface) and name.endswith("_kernel") and _layers(obj)[-1].fn.__module__ == mod.__name__:
                seen.setdefault(info.name, set()).add(name)
    want = {m: FMA.get(m, set()) | EXACT.get(m, set()) for m in set(FMA) | set(EXACT)}
    assert seen == want, "a qlk kernel is in neither FMA nor EXACT (tests/test_launch_options.py): decide"
    for m, names in FMA.items():
        mod = importlib.import_module(f"qlk.kernels.{m}")
        for name in names:
            assert _fp_fusion_layer(getattr(mod, name)) is True, name
            assert isinstance(_layers(getattr(mod, name))[-2], Heuristics), f"{name}: @fma_kernel directly above @triton.jit"
    for m, names in EXACT.items():
        mod = importlib.import_module(f"qlk.kernels.{m}")
        for name in names:
            assert _fp_fusion_layer(getattr(mod, name)) is None, name


@pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
def test_launches_pass_fp_fusion(monkeypatch):
    """Real launches through the entry points: the innermost run() sees enable_fp_fusion=True for
    every FMA kernel (each GEMM path, split-K, split-N, the M = 1 FMA kernel, the QA-LoRA fold) and
    False for the standalone dequantize kernel."""
    seen = {}
    spied = [getattr(fm, n) for n in FMA["fused_matmul"]] + [qalora._fold_bias_kernel, dequant._dequantize_kernel]
    for kernel in spied:
        inner = _layers(kernel)[-1]
        real = inner.run

        def run(*args, _real=real, _name=inner.fn.__name__, **kwargs):
            seen.setdefault(_name, set()).add(kwargs.get("enable_fp_fusion"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(inner, "run", run)
    qw = qlk.quantize(torch.randn(72, 256), bits=4, group_size=32).to(DEVICE)
    a, b = torch.randn(4, 8, device=DEVICE), torch.randn(72, 4, device=DEVICE)
    for m in (1, 40):  # split-K / GEMM forward, M = 1 FMA kernel / GEMM input gradient
        fm.quant_matmul_forward(torch.randn(m, 256, device=DEVICE), qw, path="fused")
        fm.quant_matmul_grad_input(torch.randn(m, 72, device=DEVICE), qw, path="gemv" if m == 1 else "fused")
    qalora.qalora_grad_input(torch.randn(5, 72, device=DEVICE), qw, a, b, 2.0)  # the fold, then split-N
    qlk.kernels.dequantize_forward(qw, torch.float32)
    want = {n: {True} for n in FMA["fused_matmul"] | FMA["qalora"]}
    want["_dequantize_kernel"] = {False}
    assert seen == want


def test_row_alignment():
    """QN_ALIGN: the largest of 16, 8, 4, 2 dividing a packed row stride, else 1 (0 divides by all)."""
    cases = {4096: 16, 1792: 16, 360: 8, 72: 8, 120: 8, 36: 4, 20: 4, 90: 2, 6: 2, 45: 1, 9: 1, 1: 1, 0: 16}
    assert {s: config.row_alignment(s) for s in cases} == cases
    for s in range(1, 200):
        a = config.row_alignment(s)
        assert s % a == 0 and (a == 16 or s % (2 * a)), s


def test_every_kernel_that_reads_packed_rows_knows_their_alignment():
    """Every launchable kernel with a ``stride_qn`` argument has the ``@packed_rows_kernel`` layer, whose
    QN_ALIGN divides the stride it is given (the kernel rounds the stride down to a multiple of it:
    an overclaim would read the wrong rows), and the kernel's source applies it (``aligned_rows``)."""
    import inspect

    found = set()
    for info in pkgutil.iter_modules(qlk.kernels.__path__):
        mod = importlib.import_module(f"qlk.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if not (isinstance(obj, KernelInterface) and name.endswith("_kernel")):
                continue
            jit = _layers(obj)[-1]
            if jit.fn.__module__ != mod.__name__ or "stride_qn" not in inspect.signature(jit.fn).parameters:
                continue
            found.add(name)
            layers = [la for la in _layers(obj) if isinstance(la, Heuristics) and "QN_ALIGN" in la.values]
            assert len(layers) == 1, f"{name}: no @packed_rows_kernel"
            for stride in (360, 72, 36, 90, 45, 4096):
                assert layers[0].values["QN_ALIGN"]({"stride_qn": stride}) == config.row_alignment(stride)
            src = inspect.getsource(jit.fn)
            assert "stride_qn = aligned_rows(stride_qn, QN_ALIGN)" in src, name
    assert len(found) == 9, sorted(found)


def test_all_configs_patterns_pick_the_launches(monkeypatch):
    """``QLK_ALL_CONFIGS`` (the static report's compile mode, fused_matmul._tiles): off, the rules'
    pick alone; 1, every candidate, the pick last; shell patterns over the labels (round 20's
    ``--only-configs``), the matching candidates and the pick, in that order."""
    from qlk.kernels import heuristics

    monkeypatch.setattr(config, "INTERPRETED", False)  # the GPU candidate lists
    monkeypatch.setattr(fm, "target_arch", lambda: 90)
    monkeypatch.setattr(fm, "num_sms", lambda device: 132)
    heuristics._choose_default.cache_clear()
    meta = dict(BITS=4, IS_NF4=False, GROUP_SIZE=32)

    def labels(value):
        monkeypatch.setenv("QLK_ALL_CONFIGS", value)
        chosen, launched = fm._tiles("fwd", 3000, 4096, 4096, meta, "cpu")
        assert launched[-1] is chosen
        return [c.label for c in launched]

    try:
        pick = labels("0")
        assert len(pick) == 1 and pick[0] not in ("64x128x128 w4 s4", "128x128x64 w8 s4")
        every = labels("1")
        assert len(every) >= 4 and every[-1] == pick[0] and len(set(every)) == len(every)
        # a pattern no candidate matches launches the pick alone
        assert labels("999x*") == pick
        # round 25: the 64-row tiles are candidates at M = 3000 too (heuristics.CANDIDATE_M_RANGE)
        assert labels("64x128x128 w4 s4") == ["64x128x128 w4 s4"] + pick
        assert labels("128x128x64 w8 s4, 256x64*") == ["128x128x64 w8 s4", "256x64x64 w4 s3"] + pick
    finally:
        heuristics._choose_default.cache_clear()

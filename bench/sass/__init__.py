"""qlk's static analyzer: how a Triton kernel will use an H100 (sm_90) or A100 (sm_80), judged from
its machine code on a machine with no GPU. Nothing runs.

    python -m bench.sass SCRIPT [--arch 90,80] [--loop] [--json out.json]

compiles every Triton launch SCRIPT makes (on CPU tensors of the real shapes) exactly as the JIT
would on that GPU and prints, per launch, registers, spills, shared memory, CTAs per SM and their
limiter, grid and wave efficiency, the main loop's instruction mix, and estimated tensor-core and
DRAM fractions (optimistic..pessimistic). From Python::

    from bench import sass
    with sass.capture(arch=90) as launches:
        my_launcher(x, w)
    for report, launch in sass.analyze_all(launches):
        print(report.line())

The model and its limits: docs/static-analysis.md.
"""
from .capture import Launch, TargetOnlyDriver, capture
from .gpus import GPUS, Gpu, gpu
from .model import Report, analyze, analyze_all, analyze_cubin, config_label, constexpr, declare, reduction_trips, useful_bytes

__all__ = ["GPUS", "Gpu", "Launch", "Report", "TargetOnlyDriver", "analyze", "analyze_all", "analyze_cubin", "capture",
           "config_label", "constexpr", "declare", "gpu", "reduction_trips", "useful_bytes"]

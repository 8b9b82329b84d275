"""Compile the grouped (MoE) kernel launches of bench/launches_moe.py for sm_90 / sm_80 on a CPU-only
machine and read their machine code: registers, stack, spill instructions, shared memory, and
whether the MMAs are wgmma (HGMMA, sm_90) / mma.sync (HMMA). Nothing runs on a GPU.

    python bench/static_moe.py [--cases 'grouped-fwd/int4g32/*'] [--arch 90,80]   # one JSON list on stdout
    python bench/static_moe.py --layers other --tokens 400 --cases 'grouped-fwd/*/qwen2moe-down/*'

Uses bench.sass's capture and cubin reader (needs Triton's NVIDIA backend: ptxas, cuobjdump). It is
a machine-code check (spills, MMA kind), not a speed estimate: bench/moe_estimates.py estimates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_CASES = ("dense-grouped-*/*/T4096,dense-grouped-*/qwen3*/T16,grouped-fwd/int4g32/*/T4096,"
                 "grouped-fwd/int4g32/*/T16,grouped-fwd/int4g32/mixtral-down/T1,grouped-fwd/nf4dq/mixtral-down/T1,"
                 "grouped-dgrad/int4g32/*/T4096,grouped-dgrad/int4g32/*/T16,"
                 "grouped-fwd/nf4dq/mixtral-gate_up/T4096,grouped-fwd/nf4dq/mixtral-gate_up/T16,"
                 "grouped-dgrad/nf4dq/mixtral-gate_up/T4096,grouped-dgrad/nf4dq/mixtral-gate_up/T16,"
                 "grouped-fwd/int3g128/qwen3-down/T*6,grouped-fwd/int2g32/qwen3-down/T*6,"
                 "grouped-qalora/int4g32/*-down/T4096,grouped-qalora/int4g32/*-down/T16")


def compile_cases(patterns, archs) -> list[dict]:
    """One row per launch: registers, stack, spill instructions, shared memory and MMA counts
    (HGMMA = wgmma, HMMA = mma.sync) of its cubin, compiled under bench.sass's capture."""
    os.environ.pop("TRITON_INTERPRET", None)
    import launches
    import launches_moe
    from bench import sass
    from bench.sass import disasm

    rows = []
    for arch in archs:
        with sass.capture(arch, label=lambda: launches.CURRENT_CASE or "") as captured:
            for case in launches_moe.all_cases(patterns):
                status = launches_moe.run_case(case)
                if status:
                    rows.append(dict(case=case.name, arch=arch, failed=status))
        for report, launch in sass.analyze_all(captured):
            _, instrs = disasm.read_cubin(launch.cubin)
            rows.append(dict(kernel=report.kernel, arch=arch, case=launch.label, config=report.config,
                             regs=report.regs, stack=report.stack, spill_ops=report.spill_ops, smem=report.smem,
                             hgmma=sum(i.op == "HGMMA" for i in instrs), hmma=sum(i.op == "HMMA" for i in instrs)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--tokens", help="comma-separated token counts instead of bench/launches_moe.py TOKENS")
    ap.add_argument("--layers", choices=("issue", "other", "wide"), default="issue",
                    help="bench/launches_moe.py LAYERS, OTHER_LAYERS or WIDE_LAYERS")
    args = ap.parse_args()
    import launches_moe

    launches_moe.LAYERS = {"issue": launches_moe.LAYERS, "other": launches_moe.OTHER_LAYERS,
                           "wide": launches_moe.WIDE_LAYERS}[args.layers]
    if args.tokens:
        launches_moe.TOKENS = tuple(int(t) for t in args.tokens.split(",") if t)
    rows = compile_cases([p for p in args.cases.split(",") if p], [int(a) for a in args.arch.split(",")])
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

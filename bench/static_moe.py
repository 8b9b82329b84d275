"""Compile the grouped (MoE) kernel launches of bench/launches_moe.py for sm_90 / sm_80 on a CPU-only
machine and read their machine code: registers, stack, spill instructions, shared memory, and
whether the MMAs are wgmma (HGMMA, sm_90) / mma.sync (HMMA). Nothing runs on a GPU.

    python bench/static_moe.py [--cases 'grouped-fwd/int4g32/*'] [--arch 90,80]   # one JSON list on stdout

Uses the fake driver and cubin reader of tests/test_kernel_static.py (needs Triton's NVIDIA backend:
ptxas, cuobjdump). It is a machine-code check (spills, MMA kind), not a speed estimate.
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
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import launches_moe
    import qlk.kernels.grouped_matmul as gm
    from dense_grouped_matmul import _dense_grouped_kernel
    from test_kernel_static import _FakeDriver, _read_cubin

    rows, seen, current = [], {}, {}
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        k = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, current["arch"], current["case"])
        if key not in seen:
            r = _read_cubin(k.asm["cubin"])
            r.update(kernel=self.fn.__name__, arch=current["arch"], case=current["case"],
                     config=f"w{k.metadata.num_warps} s{k.metadata.num_stages} " + " ".join(
                         f"{n}={v}" for n, v in sorted(kwargs.items()) if n.startswith("BLOCK") or n == "POOL"),
                     smem=r["static_smem"] + int(k.metadata.shared or 0))
            seen[key] = r
            rows.append(r)
        return k

    JITFunction.run = run
    try:
        for arch in archs:
            driver.set_active(_FakeDriver(arch))
            for fn in (gm._grouped_matmul_fwd_kernel, gm._grouped_matmul_grad_input_kernel,
                       gm._grouped_matmul_splitk_kernel, _dense_grouped_kernel):
                inner = fn
                while not isinstance(inner, JITFunction):
                    inner = inner.fn
                inner.device_caches.clear()  # the binder holds the target it was built for
            current["arch"] = arch
            for case in launches_moe.all_cases(patterns):
                current["case"] = case.name
                status = launches_moe.run_case(case)
                if status:
                    rows.append(dict(case=case.name, arch=arch, failed=status))
    finally:
        JITFunction.run = orig_run
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--arch", default="90,80")
    args = ap.parse_args()
    rows = compile_cases([p for p in args.cases.split(",") if p], [int(a) for a in args.arch.split(",")])
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

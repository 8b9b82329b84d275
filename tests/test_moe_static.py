"""Machine code of the grouped (MoE) kernels, sm_90 and sm_80, compiled on CPU (bench/static_moe.py):
no spills, shared memory within a CTA's limit, wgmma (HGMMA) on sm_90. Slow (a minute or more of
ptxas on 2 cores): ``--runslow``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = {90: 232448, 80: 166912}


@pytest.mark.slow
def test_grouped_kernels_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cases = ("grouped-fwd/int4g32/qwen3-down/T4096,grouped-fwd/int4g32/qwen3-down/T16,grouped-dgrad/int4g32/qwen3-down/T*6,"
             "grouped-fwd/nf4dq/qwen3-down/T4096,grouped-qalora/int4g32/qwen3-down/T4096,"
             "grouped-fwd/int4g32/mixtral-down/T1")  # T1: the split-K decode kernel
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "static_moe.py"), "--cases", cases],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        if "No module named" in proc.stderr or "cuobjdump" in proc.stderr:
            pytest.skip("Triton's NVIDIA backend (ptxas/cuobjdump) is not available")
        raise AssertionError(proc.stderr[-4000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows and not [r for r in rows if "failed" in r]
    assert not [r for r in rows if r["stack"] or r["spill_ops"]]
    assert not [r for r in rows if r["smem"] > SMEM_LIMIT[r["arch"]]]
    # the GEMMs use wgmma; NF4-DQ at large M also launches the one-pass absmax de-nesting (no MMA)
    assert all(r["hgmma"] > 0 for r in rows if r["arch"] == 90 and r["kernel"] != "_nf4_denest_kernel")
    assert {r["kernel"] for r in rows} == {"_grouped_matmul_fwd_kernel", "_grouped_matmul_grad_input_kernel",
                                           "_grouped_matmul_splitk_kernel", "_nf4_denest_kernel"}

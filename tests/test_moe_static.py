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


# ---- the committed MoE reports (bench/moe_estimates.py; no compiling) ----------------------------------------
RESULTS = os.path.join(ROOT, "bench", "results")
#: issue 19's layers (make static-moe) and, since round 10, the out-of-sample ones: other MoE layers
#: (--layers other: OLMoE, Qwen1.5-MoE with 60 experts, gpt-oss-20b; since round 14 --layers wide:
#: DeepSeek-V2-Lite, Mixtral-8x22B, Llama-4-Scout, Phi-3.5-MoE) and other token counts (--tokens 512,64)
MOE_REPORTS = ("static-moe", "static-moe-other", "static-moe-t512-64", "static-moe-wide")
#: what the out-of-sample runs found under 0.9x at >= 256 tokens (case -> ratio; they get no worse),
#: docs/moe.md "Round 10". sm_80, 512 tokens: QA-LoRA's forward on Mixtral's down projection (128
#: rows an expert) keeps the 8-warp 256-weight-row tile, 128 working CTAs on 108 SMs; the tiles that
#: fill the SMs spill with the folded biases (64x128 w2 16-56 B; 128x128 w4 24 B for INT4 g128) or
#: are issue-bound (0.67-0.79x). Qwen3's down gradient at 512 tokens: 32 rows an expert, both kernels
#: at 0.12-0.14 of tensor peak (weight-read bound; the tensor metric is a poor judge there)
KNOWN_LOW_MOE = {
    ("static-moe-t512-64", 80): {
        "grouped-qalora/int2g32/mixtral-down/T512": 0.833, "grouped-qalora/int3g128/mixtral-down/T512": 0.833,
        "grouped-qalora/int4g128/mixtral-down/T512": 0.833, "grouped-qalora/int4g32/mixtral-down/T512": 0.833,
        "grouped-dgrad/int4g32/qwen3-down/T512": 0.89,
    },
}


def _moe_rows(stem: str, arch: int) -> list:
    import csv

    with open(os.path.join(RESULTS, f"{stem}-sm{arch}.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _moe_main(rows: list, case: str):
    """(optimistic, pessimistic) of a case's main kernel, its best config (bench/moe_estimates.py's
    metric: tensor-peak at >= 256 tokens, DRAM-peak below)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import moe_estimates

    keys = ("tensor_opt", "tensor_pess") if moe_estimates._training(case) else ("dram_opt", "dram_pess")
    op = case.split("/")[0]
    got = [(float(r[keys[0]]), float(r[keys[1]])) for r in rows
           if r["case"] == case and r["kernel"] == moe_estimates.MAIN.get(op) and r[keys[0]]]
    return max(got, key=sum) if got else None


@pytest.mark.parametrize("stem,arch", [(s, a) for s in MOE_REPORTS for a in (90, 80)])
def test_committed_moe_reports(stem, arch):
    """Every qlk grouped launch of the committed MoE reports compiled without spills, and at >= 256
    tokens (training) every grouped kernel is >= 0.9x the dense grouped baseline of the same run,
    optimistic (issue 19's target; below 256 tokens the decode tiles' bound is documented in
    docs/moe.md, not asserted), except the documented out-of-sample cases, which get no worse."""
    rows = _moe_rows(stem, arch)
    qlk_rows = [r for r in rows if r["case"].startswith("grouped")]
    assert qlk_rows, stem
    assert not [(r["case"], r["config"], r["stack"]) for r in qlk_rows if r["stack"] not in ("", "0")]
    training = sorted({r["case"] for r in qlk_rows if int(r["case"].rsplit("/T", 1)[1]) >= 256})
    assert training
    low = {}
    for case in training:
        op, _, layer_proj, tokens = case.split("/")
        base = "dense-grouped-dgrad" if op == "grouped-dgrad" else "dense-grouped-fwd"
        mine, dense = _moe_main(rows, case), _moe_main(rows, f"{base}/bf16/{layer_proj}/{tokens}")
        assert mine and dense, case
        if mine[0] < 0.9 * dense[0]:
            low[case] = round(mine[0] / dense[0], 3)
    known = KNOWN_LOW_MOE.get((stem, arch), {})
    assert set(low) <= set(known), {c: x for c, x in low.items() if c not in known}
    assert all(x >= known[c] - 0.005 for c, x in low.items()), low

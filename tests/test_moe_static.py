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
             "grouped-fwd/int4g32/mixtral-down/T1,"  # T1: the split-K decode kernel
             "grouped-fwd/int4g128/mixtral-down/T1,"  # round 27: spilled 16 B on sm_90 with LOOP_RUNS
             "grouped-qalora/int2g32/qwen3-down/T16,grouped-qalora/int4g32/qwen3-down/T16")  # folded: 2 / 4 warps
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
    # the GEMMs of a warpgroup or more use wgmma (the two-warp decode tiles of round 24 issue mma.sync);
    # NF4-DQ at large M also launches the one-pass absmax de-nesting (no MMA)
    assert all(r["hgmma"] > 0 for r in rows if r["arch"] == 90 and r["kernel"] != "_nf4_denest_kernel"
               and " w2 " not in f" {r['config']} ")
    assert {r["kernel"] for r in rows} == {"_grouped_matmul_fwd_kernel", "_grouped_matmul_grad_input_kernel",
                                           "_grouped_matmul_splitk_kernel", "_nf4_denest_kernel"}


# ---- the committed MoE reports (bench/moe_estimates.py; no compiling) ----------------------------------------
RESULTS = os.path.join(ROOT, "bench", "results")
#: issue 19's layers (make static-moe) and, since round 10, the out-of-sample ones: other MoE layers
#: (--layers other: OLMoE, Qwen1.5-MoE with 60 experts, gpt-oss-20b; since round 14 --layers wide:
#: DeepSeek-V2-Lite, Mixtral-8x22B, Llama-4-Scout, Phi-3.5-MoE) and other token counts (--tokens 512,64)
MOE_REPORTS = ("static-moe", "static-moe-other", "static-moe-t512-64", "static-moe-wide")
#: what the out-of-sample runs found under 0.9x at >= 256 tokens (case -> ratio; they get no worse),
#: docs/moe.md "Round 10". Empty since round 23: sm_80's QA-LoRA forward on Mixtral's down
#: projection at 512 tokens (0.83x on the 8-warp 256-column tile, 128 working CTAs on 108 SMs) takes
#: the 64-column tile by its waves (heuristics.grouped_folded_fwd_tile: 1.11x), and Qwen3's down
#: gradient at 512 tokens (0.89x) was the model's count: the slot loop's two tiles a program row
#: and the dense baseline's spare slots (bench/launches_moe.py: tiles_per_program, working_ctas)
KNOWN_LOW_MOE: dict = {}


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


def test_slot_loop_trips_count_every_tile_of_a_program_row():
    """Round 23: the MoE model's main-loop trips of a ``SLOT_LOOP`` launch count each program row's
    tiles under the cases' balanced routing (bench/launches_moe.py: S rows over E experts, the first
    S mod E one more): Qwen3 at 512 tokens, 4096 rows over 128 experts in 16-row tiles, 256 tiles on
    128 program rows: 2; one tile each at 64 tokens; a program per slot: 1; a remainder spreads
    rows (33 rows on 2 experts, 17 + 16: 2 + 1 tiles; on 2 program rows 2, on 1 row 3)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import launches_moe
    from bench.sass.capture import Launch, TensorArg

    def launch(rows, experts, programs, slot_loop, name="dy_ptr", block_m=16):
        return Launch("k", 80, (programs, 6, 2), {"SLOT_LOOP": slot_loop, "BLOCK_M": block_m},
                      {"NUM_EXPERTS": experts}, {name: TensorArg((rows, 2048), "bfloat16", 0, 1)}, 4, 4, b"", 0, "",
                      "")

    assert launches_moe.tiles_per_program(launch(4096, 128, 128, True)) == 2
    assert launches_moe.tiles_per_program(launch(512, 128, 128, True, "x_ptr")) == 1
    assert launches_moe.tiles_per_program(launch(4096, 128, 376, False)) == 1
    assert launches_moe.tiles_per_program(launch(33, 2, 2, True)) == 2
    assert launches_moe.tiles_per_program(launch(33, 2, 1, True)) == 3
    assert launches_moe.tiles_per_program(launch(4096, 128, 64, True)) == 4
    with pytest.raises(KeyError):
        launches_moe.tiles_per_program(launch(4096, 128, 128, True, "w_ptr"))
    # the CTAs that work: program rows past the tiles exit (Mixtral at 64 tokens: 15 slots, 8 tiles)
    per_slot = launch(128, 8, 15, False, "x_ptr")
    per_slot.grid = (15, 64)
    assert launches_moe.working_ctas(per_slot) == 8 * 64
    assert launches_moe.working_ctas(launch(4096, 128, 128, True)) == 128 * 6 * 2
    dense = Launch("_dense_grouped_kernel", 80, (15, 64), {"BLOCK_M": 16}, {},
                   {"x_ptr": TensorArg((128, 4096), "bfloat16", 0, 1), "w_ptr": TensorArg((8, 4096, 4096), "bfloat16", 0, 2)},
                   4, 3, b"", 0, "", "")
    assert launches_moe.working_ctas(dense) == 8 * 64
    # the declarations multiply every qlk grouped kernel's K (N) trips by it
    from bench.sass import model

    for kernel, name, length, block, split in (("_grouped_matmul_fwd_kernel", "x_ptr", "K", "BLOCK_K", 1),
                                               ("_grouped_matmul_splitk_kernel", "x_ptr", "K", "BLOCK_K", 2),
                                               ("_grouped_matmul_grad_input_kernel", "dy_ptr", "N", "BLOCK_N", 2)):
        one = launch(4096, 128, 128, True, name)
        one.kernel = kernel
        one.constexprs[block] = 128
        one.scalars[length] = 2048
        assert model._LOOP_TRIPS[kernel](one) == 2 * 16 // split, kernel
        assert model._WORKING_CTAS[kernel] is launches_moe.working_ctas
    assert model._WORKING_CTAS["_dense_grouped_kernel"] is launches_moe.working_ctas

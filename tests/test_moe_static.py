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


def _compile(env, args) -> list:
    """bench/static_moe.py's rows for ``args`` (skips where Triton's NVIDIA backend is missing)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "static_moe.py"), *args],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        if "No module named" in proc.stderr or "cuobjdump" in proc.stderr:
            pytest.skip("Triton's NVIDIA backend (ptxas/cuobjdump) is not available")
        raise AssertionError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_grouped_kernels_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cases = ("grouped-fwd/int4g32/qwen3-down/T4096,grouped-fwd/int4g32/qwen3-down/T16,grouped-dgrad/int4g32/qwen3-down/T*6,"
             "grouped-fwd/nf4dq/qwen3-down/T4096,grouped-qalora/int4g32/qwen3-down/T4096,"
             "grouped-fwd/int4g32/mixtral-down/T1,"  # T1: the split-K decode kernel
             "grouped-fwd/int4g128/mixtral-down/T1,"  # round 27: spilled 16 B on sm_90 with LOOP_RUNS
             "grouped-qalora/int2g32/qwen3-down/T16,grouped-qalora/int4g32/qwen3-down/T16")  # folded: 2 / 4 warps
    rows = _compile(env, ["--cases", cases])
    # round 30: the 32-row small-M tiles (S/E in (16, 32]) at Qwen1.5-MoE's K = 1408 down projection,
    # where the 32-row forward on two warps spilled up to 240 B (it runs on four), and the 64-row
    # tiles above the small-M bound (gpt-oss at 400 tokens: 50 rows an expert)
    rows += _compile(env, ["--layers", "other", "--tokens", "400", "--cases",
                           "grouped-fwd/int4g32/qwen2moe-down/*,grouped-qalora/int2g32/qwen2moe-down/*,"
                           "grouped-dgrad/int4g32/qwen2moe-down/*,grouped-fwd/int3g128/olmoe-down/*,"
                           "grouped-dgrad/int2g32/olmoe-down/*"])
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
#: DeepSeek-V2-Lite, Mixtral-8x22B, Llama-4-Scout, Phi-3.5-MoE) and other token counts (--tokens 512,64;
#: since round 30 --tokens 128,160,250, the issue's layers at 32, 40 and 62 rows an expert, and the other
#: layers at --tokens 400: 27-50 rows an expert; --tokens 300,384: Mixtral's 75 / 96 rows on 128-row tiles,
#: Qwen3's 19 / 24 on 32-row ones)
MOE_REPORTS = ("static-moe", "static-moe-other", "static-moe-t512-64", "static-moe-wide", "static-moe-t128-160-250",
               "static-moe-other-t400", "static-moe-t300-384", "static-moe-t4096-128-16-formats")
#: what the out-of-sample runs found under 0.9x at >= 256 tokens (case -> ratio; they get no worse),
#: docs/moe.md "Round 10". Empty since round 23: sm_80's QA-LoRA forward on Mixtral's down
#: projection at 512 tokens (0.83x on the 8-warp 256-column tile, 128 working CTAs on 108 SMs) takes
#: the 64-column tile by its waves (heuristics.grouped_folded_fwd_tile: 1.11x), and Qwen3's down
#: gradient at 512 tokens (0.89x) was the model's count: the slot loop's two tiles a program row
#: and the dense baseline's spare slots (bench/launches_moe.py: tiles_per_program, working_ctas)
KNOWN_LOW_MOE: dict = {}


#: Below 256 tokens (the DRAM metric), the cells of the committed reports under 0.9x the dense grouped
#: baseline (case -> ratio, optimistic; they may rise, not fall; a cell not listed must be >= 0.9x):
#: - the small-M INT2 / INT3 input gradients at 16 / 64 / 128 tokens: shared-memory-bound on the
#:   transposed tile (docs/kernels.md "Not reached / open");
#: - at 160 / 250 tokens (Mixtral: 40 / 62 rows an expert, round 30's 64-row tiles): sm_90's QA-LoRA
#:   INT3 forwards (0.84-0.87x, issue-bound on the decoder) and sm_80's Mixtral cells (0.45-0.88x: at 64
#:   padded rows mma.sync's tensor time exceeds the low-bit weight's DRAM time; the bf16 baseline's
#:   weight is 4-8x the bytes, so qlk is faster in time: docs/moe.md "Round 30").
KNOWN_LOW_SMALL: dict = {
    ('static-moe', 90): {
        'grouped-dgrad/int2g32/mixtral-down/T16': 0.871, 'grouped-dgrad/int2g32/mixtral-gate_up/T16': 0.866,
        'grouped-dgrad/int2g32/qwen3-down/T16': 0.869, 'grouped-dgrad/int2g32/qwen3-gate_up/T16': 0.866,
    },
    ('static-moe', 80): {
        'grouped-dgrad/int2g32/mixtral-down/T16': 0.881, 'grouped-dgrad/int2g32/qwen3-gate_up/T16': 0.83,
        'grouped-dgrad/int3g128/qwen3-gate_up/T16': 0.854,
    },
    ('static-moe-other', 90): {
        'grouped-dgrad/int2g32/gptoss-down/T16': 0.777, 'grouped-dgrad/int2g32/gptoss-gate_up/T16': 0.793,
        'grouped-dgrad/int2g32/olmoe-down/T16': 0.874, 'grouped-dgrad/int2g32/olmoe-gate_up/T16': 0.87,
        'grouped-dgrad/int2g32/qwen2moe-down/T16': 0.869, 'grouped-dgrad/int2g32/qwen2moe-gate_up/T16': 0.866,
    },
    ('static-moe-other', 80): {
        'grouped-dgrad/int2g32/gptoss-down/T16': 0.813, 'grouped-dgrad/int2g32/gptoss-gate_up/T16': 0.81,
        'grouped-dgrad/int2g32/olmoe-down/T16': 0.883, 'grouped-dgrad/int2g32/olmoe-gate_up/T16': 0.837,
        'grouped-dgrad/int2g32/qwen2moe-gate_up/T16': 0.828, 'grouped-dgrad/int3g128/olmoe-gate_up/T16': 0.856,
        'grouped-dgrad/int3g128/qwen2moe-gate_up/T16': 0.852,
    },
    ('static-moe-t512-64', 90): {
        'grouped-dgrad/int2g32/mixtral-gate_up/T64': 0.881, 'grouped-dgrad/int2g32/qwen3-down/T64': 0.893,
        'grouped-dgrad/int2g32/qwen3-gate_up/T64': 0.882,
    },
    ('static-moe-t512-64', 80): {
        'grouped-dgrad/int2g32/qwen3-gate_up/T64': 0.853, 'grouped-dgrad/int3g128/qwen3-gate_up/T64': 0.871,
    },
    ('static-moe-wide', 90): {
        'grouped-dgrad/int2g32/dsv2lite-down/T16': 0.872, 'grouped-dgrad/int2g32/dsv2lite-gate_up/T16': 0.866,
        'grouped-dgrad/int2g32/mixtral22b-down/T16': 0.865, 'grouped-dgrad/int2g32/mixtral22b-gate_up/T16': 0.865,
        'grouped-dgrad/int2g32/phimoe-down/T16': 0.867, 'grouped-dgrad/int2g32/phimoe-gate_up/T16': 0.864,
        'grouped-dgrad/int2g32/scout-down/T16': 0.862, 'grouped-dgrad/int2g32/scout-gate_up/T16': 0.862,
    },
    ('static-moe-wide', 80): {
        'grouped-dgrad/int2g32/dsv2lite-down/T16': 0.864, 'grouped-dgrad/int2g32/dsv2lite-gate_up/T16': 0.839,
        'grouped-dgrad/int2g32/mixtral22b-down/T16': 0.857, 'grouped-dgrad/int2g32/phimoe-down/T16': 0.883,
        'grouped-dgrad/int2g32/phimoe-gate_up/T16': 0.86, 'grouped-dgrad/int2g32/scout-down/T16': 0.842,
        'grouped-dgrad/int2g32/scout-gate_up/T16': 0.823, 'grouped-dgrad/int3g128/dsv2lite-down/T16': 0.884,
        'grouped-dgrad/int3g128/dsv2lite-gate_up/T16': 0.859, 'grouped-dgrad/int3g128/mixtral22b-down/T16': 0.877,
        'grouped-dgrad/int3g128/phimoe-gate_up/T16': 0.88, 'grouped-dgrad/int3g128/scout-down/T16': 0.867,
        'grouped-dgrad/int3g128/scout-gate_up/T16': 0.839,
    },
    ('static-moe-t128-160-250', 90): {
        'grouped-dgrad/int2g32/mixtral-down/T128': 0.893, 'grouped-dgrad/int2g32/mixtral-gate_up/T128': 0.854,
        'grouped-qalora/int3g128/mixtral-down/T160': 0.844, 'grouped-qalora/int3g128/mixtral-down/T250': 0.871,
        'grouped-qalora/int3g128/mixtral-gate_up/T160': 0.838, 'grouped-qalora/int3g128/mixtral-gate_up/T250': 0.862,
    },
    ('static-moe-t128-160-250', 80): {
        'grouped-dgrad/int2g32/mixtral-down/T128': 0.825, 'grouped-dgrad/int2g32/mixtral-down/T160': 0.531,
        'grouped-dgrad/int2g32/mixtral-down/T250': 0.55, 'grouped-dgrad/int2g32/mixtral-gate_up/T160': 0.527,
        'grouped-dgrad/int2g32/mixtral-gate_up/T250': 0.544, 'grouped-dgrad/int2g32/qwen3-gate_up/T128': 0.885,
        'grouped-dgrad/int3g128/mixtral-down/T128': 0.888, 'grouped-dgrad/int3g128/mixtral-down/T160': 0.49,
        'grouped-dgrad/int3g128/mixtral-down/T250': 0.506, 'grouped-dgrad/int3g128/mixtral-gate_up/T160': 0.487,
        'grouped-dgrad/int3g128/mixtral-gate_up/T250': 0.501, 'grouped-dgrad/int4g128/mixtral-down/T160': 0.738,
        'grouped-dgrad/int4g128/mixtral-down/T250': 0.757, 'grouped-dgrad/int4g128/mixtral-gate_up/T160': 0.735,
        'grouped-dgrad/int4g128/mixtral-gate_up/T250': 0.751, 'grouped-dgrad/int4g32/mixtral-down/T160': 0.863,
        'grouped-dgrad/int4g32/mixtral-down/T250': 0.881, 'grouped-dgrad/int4g32/mixtral-gate_up/T160': 0.859,
        'grouped-dgrad/int4g32/mixtral-gate_up/T250': 0.876, 'grouped-dgrad/nf4dq/mixtral-down/T160': 0.78,
        'grouped-dgrad/nf4dq/mixtral-down/T250': 0.799, 'grouped-dgrad/nf4dq/mixtral-gate_up/T160': 0.776,
        'grouped-dgrad/nf4dq/mixtral-gate_up/T250': 0.793, 'grouped-fwd/int2g32/mixtral-down/T160': 0.527,
        'grouped-fwd/int2g32/mixtral-down/T250': 0.545, 'grouped-fwd/int2g32/mixtral-gate_up/T160': 0.523,
        'grouped-fwd/int2g32/mixtral-gate_up/T250': 0.54, 'grouped-fwd/int3g128/mixtral-down/T160': 0.461,
        'grouped-fwd/int3g128/mixtral-down/T250': 0.476, 'grouped-fwd/int3g128/mixtral-gate_up/T160': 0.458,
        'grouped-fwd/int3g128/mixtral-gate_up/T250': 0.471, 'grouped-fwd/int4g128/mixtral-down/T160': 0.738,
        'grouped-fwd/int4g128/mixtral-down/T250': 0.757, 'grouped-fwd/int4g128/mixtral-gate_up/T160': 0.735,
        'grouped-fwd/int4g128/mixtral-gate_up/T250': 0.751, 'grouped-fwd/int4g32/mixtral-down/T160': 0.863,
        'grouped-fwd/int4g32/mixtral-down/T250': 0.881, 'grouped-fwd/int4g32/mixtral-gate_up/T160': 0.859,
        'grouped-fwd/int4g32/mixtral-gate_up/T250': 0.876, 'grouped-fwd/nf4dq/mixtral-down/T160': 0.661,
        'grouped-fwd/nf4dq/mixtral-down/T250': 0.677, 'grouped-fwd/nf4dq/mixtral-gate_up/T160': 0.658,
        'grouped-fwd/nf4dq/mixtral-gate_up/T250': 0.672, 'grouped-qalora/int2g32/mixtral-down/T160': 0.563,
        'grouped-qalora/int2g32/mixtral-down/T250': 0.581, 'grouped-qalora/int2g32/mixtral-gate_up/T160': 0.558,
        'grouped-qalora/int2g32/mixtral-gate_up/T250': 0.573, 'grouped-qalora/int3g128/mixtral-down/T160': 0.45,
        'grouped-qalora/int3g128/mixtral-down/T250': 0.464, 'grouped-qalora/int3g128/mixtral-gate_up/T160': 0.447,
        'grouped-qalora/int3g128/mixtral-gate_up/T250': 0.459, 'grouped-qalora/int4g128/mixtral-down/T160': 0.748,
        'grouped-qalora/int4g128/mixtral-down/T250': 0.766, 'grouped-qalora/int4g128/mixtral-gate_up/T160': 0.744,
        'grouped-qalora/int4g128/mixtral-gate_up/T250': 0.76,
    },
    # round 31, the other group sizes (bench/moe_estimates.py --formats int3g32,int3g64,int4g64,int2g64,
    # int2g128 at 4096 / 128 / 16 tokens): the small-M INT2 input gradients' class at g64 / g128 (fewer
    # scale bytes a weight, the same shared-memory-bound transposed tile: a lower DRAM fraction), and
    # INT2 g64 / g128 forwards at 32 rows an expert (sm_80 also QA-LoRA's INT2 g128 on the 64-deep
    # step its 128-deep tile spilled on, config.GROUPED_SMALL_FWD_SPILLS_SM80)
    ('static-moe-t4096-128-16-formats', 90): {
        'grouped-dgrad/int2g128/mixtral-down/T128': 0.689, 'grouped-dgrad/int2g128/mixtral-down/T16': 0.656,
        'grouped-dgrad/int2g128/mixtral-gate_up/T128': 0.65, 'grouped-dgrad/int2g128/mixtral-gate_up/T16': 0.651,
        'grouped-dgrad/int2g128/qwen3-down/T128': 0.711, 'grouped-dgrad/int2g128/qwen3-down/T16': 0.654,
        'grouped-dgrad/int2g128/qwen3-gate_up/T128': 0.687, 'grouped-dgrad/int2g128/qwen3-gate_up/T16': 0.651,
        'grouped-dgrad/int2g64/mixtral-down/T128': 0.757, 'grouped-dgrad/int2g64/mixtral-down/T16': 0.727,
        'grouped-dgrad/int2g64/mixtral-gate_up/T128': 0.718, 'grouped-dgrad/int2g64/mixtral-gate_up/T16': 0.722,
        'grouped-dgrad/int2g64/qwen3-down/T128': 0.783, 'grouped-dgrad/int2g64/qwen3-down/T16': 0.725,
        'grouped-dgrad/int2g64/qwen3-gate_up/T128': 0.759, 'grouped-dgrad/int2g64/qwen3-gate_up/T16': 0.722,
        'grouped-fwd/int2g128/mixtral-down/T128': 0.831, 'grouped-fwd/int2g128/mixtral-gate_up/T128': 0.825,
    },
    ('static-moe-t4096-128-16-formats', 80): {
        'grouped-dgrad/int2g128/mixtral-down/T128': 0.637, 'grouped-dgrad/int2g128/mixtral-down/T16': 0.663,
        'grouped-dgrad/int2g128/mixtral-gate_up/T128': 0.712, 'grouped-dgrad/int2g128/mixtral-gate_up/T16': 0.774,
        'grouped-dgrad/int2g128/qwen3-down/T128': 0.768, 'grouped-dgrad/int2g128/qwen3-down/T16': 0.691,
        'grouped-dgrad/int2g128/qwen3-gate_up/T128': 0.679, 'grouped-dgrad/int2g128/qwen3-gate_up/T16': 0.624,
        'grouped-dgrad/int2g64/mixtral-down/T128': 0.7, 'grouped-dgrad/int2g64/mixtral-down/T16': 0.736,
        'grouped-dgrad/int2g64/mixtral-gate_up/T128': 0.786, 'grouped-dgrad/int2g64/mixtral-gate_up/T16': 0.859,
        'grouped-dgrad/int2g64/qwen3-down/T128': 0.844, 'grouped-dgrad/int2g64/qwen3-down/T16': 0.767,
        'grouped-dgrad/int2g64/qwen3-gate_up/T128': 0.748, 'grouped-dgrad/int2g64/qwen3-gate_up/T16': 0.693,
        'grouped-fwd/int2g128/mixtral-down/T128': 0.8, 'grouped-fwd/int2g128/mixtral-gate_up/T128': 0.794,
        'grouped-fwd/int2g64/mixtral-down/T128': 0.883, 'grouped-fwd/int2g64/mixtral-gate_up/T128': 0.877,
        'grouped-qalora/int2g128/mixtral-down/T128': 0.762, 'grouped-qalora/int2g128/mixtral-gate_up/T128': 0.756,
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
    of_case = [r for r in rows if r["case"] == case and r[keys[0]] and r["kernel"] not in moe_estimates.SIDE]
    # no launch of the op's main kernel (the split-K decode forward at one token): the heaviest, as the report
    main = [r for r in of_case if r["kernel"] == moe_estimates.MAIN.get(op)] or of_case
    got = [(float(r[keys[0]]), float(r[keys[1]])) for r in main]
    return max(got, key=sum) if got else None


def _cells_under(rows: list, cases: list) -> dict:
    """case -> ratio (3 digits) of each of ``cases`` whose main kernel is under 0.9x the dense grouped
    baseline of the same layer and tokens in ``rows`` (optimistic, :func:`_moe_main`'s metric)."""
    low = {}
    for case in cases:
        op, _, layer_proj, tokens = case.split("/")
        base = "dense-grouped-dgrad" if op == "grouped-dgrad" else "dense-grouped-fwd"
        mine, dense = _moe_main(rows, case), _moe_main(rows, f"{base}/bf16/{layer_proj}/{tokens}")
        assert mine and dense, case
        if mine[0] < 0.9 * dense[0]:
            low[case] = round(mine[0] / dense[0], 3)
    return low


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
    assert training or stem == "static-moe-t128-160-250"  # that one is all below 256 tokens (the test below)
    low = _cells_under(rows, training)
    known = KNOWN_LOW_MOE.get((stem, arch), {})
    assert set(low) <= set(known), {c: x for c, x in low.items() if c not in known}
    assert all(x >= known[c] - 0.005 for c, x in low.items()), low


@pytest.mark.parametrize("stem,arch", [(s, a) for s in MOE_REPORTS for a in (90, 80)])
def test_committed_moe_reports_below_256_tokens(stem, arch):
    """Round 30: below 256 tokens too, every grouped kernel of the committed MoE reports is >= 0.9x the
    dense grouped baseline of the same run (optimistic, the DRAM metric), except the cells of
    ``KNOWN_LOW_SMALL``, which may not fall more than 0.005 below their recorded ratio."""
    rows = _moe_rows(stem, arch)
    low = _cells_under(rows, sorted({r["case"] for r in rows
                                     if r["case"].startswith("grouped") and int(r["case"].rsplit("/T", 1)[1]) < 256}))
    known = KNOWN_LOW_SMALL.get((stem, arch), {})
    assert set(low) <= set(known), {c: x for c, x in low.items() if c not in known}
    assert all(x >= known[c] - 0.005 for c, x in low.items()), {c: (x, known[c]) for c, x in low.items()}


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

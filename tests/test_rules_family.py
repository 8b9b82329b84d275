"""Round 3 of the config rules (qlk/kernels/heuristics.py) against the analyzer's own verdicts.

bench/results/static-family-sm{90,80}.csv hold the rules' sweep: every candidate tile of every qlk
matmul kernel compiled for sm_90 / sm_80 and estimated by the static analyzer (bench/sass) at the
16 Llama-family layer shapes (1B, 3B, 8B, 70B, GQA k/v included) x M in {1, 16, 64, 128, 333, 2048, 8192}
x 5 formats, with the split kernels next to the GEMMs at M = 64 / 128 and the FMA input gradient
at M = 1. Pure Python: the rules are re-run on the CSV rows (nothing compiles), so a change of
the rules that picks a slower tile or path than the analyzer's best fails here, and a change of
the kernels shows up once the sweep is regenerated (its command is in the markdown's header).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest

from qlk.kernels import heuristics as h
from qlk.kernels.config import _cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import static_report as sr  # noqa: E402

SWEEP = {arch: os.path.join(ROOT, "bench", "results", f"static-family-sm{arch}.csv") for arch in (90, 80)}
#: round 31: the same shapes and M values at the other formats (INT4 g64, INT3 g32 / g64, INT2 g64 /
#: g128, NF4 without double quant), whose INT rows CALIBRATION and RESIDENT are fitted on with the
#: family sweep (the mid-M tables stay the family sweep's)
FORMATS_SWEEP = {arch: os.path.join(ROOT, "bench", "results", f"static-family-formats-sm{arch}.csv")
                 for arch in (90, 80)}


def fit_rows():
    """The rows CALIBRATION and RESIDENT are fitted on (``static_report.fit_inputs``: the family sweep and
    the INT rows of the formats sweep), both archs."""
    return sr.fit_inputs([p for arch in (90, 80) for p in (SWEEP[arch], FORMATS_SWEEP[arch])])[0]

#: cases where the rules' pick is slower than the analyzer's best by more than the tolerance, each
#: with the reason (docs/kernels.md "Config rules, round 3"); empty means chosen == best everywhere
KNOWN_OFF = {
    90: {
        # split-K at M <= 16 and the split-or-GEMM choice at M = 128: the fitted efficiency is a median
        # over the shapes and the occupancy-aware split count (heuristics.occupancy_split) gives the
        # tiles other grids; round 24's two-warp 16x64x256 (now the usual pick, 1-5 % over the
        # four-warp one) is 1.1 % behind it on 8192->3072 INT4 g32, and 1.3 % ahead of the GEMM at
        # INT3 2048->2048, M = 128 (the round-8 split lines of each candidate decide there; round 33:
        # its one-slice launch picked right)
        "fwd/int4g32/8192->3072/M1": 0.987,
        "fwd/int4g32/8192->3072/M16": 0.987,
        # round 27's refit (32-bit row offsets: every tile's loop shorter, the split-K ones by 1-3 %):
        # INT3 3072->3072 and NF4 8192->28672 decode keep a split-K tile 1.1-2.1 % behind the other
        "fwd/int3g128/3072->3072/M1": 0.979,
        "fwd/nf4dq/8192->28672/M16": 0.989,
        # round 16: the 64x64x128 w4 input-gradient tile, best at M = 64 on 75 of 80 cases (2.9-4.5x
        # dense, up to 39 % over round 15's picks), is 5-7 % behind a split 128- or 32-row-step tile
        # on the 8192-wide dX (one fitted efficiency per tile; the split grids differ per shape);
        # INT2 / INT4 within 1 % since round 18's B-operand tile; NF4 on it 3-4 % behind 128x64x64 at 8192->8192
        # (0.966 -> 0.963 with round 19's words loaded ahead: both tiles gained, the 128-row one more);
        # round 20's 64x128x128 input-gradient tile closer (INT3 0.932 -> 0.973, NF4 0.963 -> 0.978), and
        # 3 % behind 128x64x64 / its 64-row-step sibling on two more INT3 layers at M = 64; round 21
        # (NF4's half2 lookup) picks NF4's 8192->8192 right and leaves 4096->14336 1.0 % behind
        # (64x64x128 against its 128-row-step sibling: the two tie in the rules where both are
        # DRAM-capped)
        # (round 27: NF4's 64x128x128 0.688 -> 0.743 with 32-bit row offsets; 8192->8192 at M = 64
        # goes to it, 1.5 % behind the 64x32x64 tile; INT3 4096->14336 at M = 64 is picked right)
        "dgrad/int3g128/8192->3072/M64": 0.973,
        "dgrad/nf4dq/4096->14336/M64": 0.986,
        "dgrad/nf4dq/8192->8192/M64": 0.985,
        "dgrad/int3g128/8192->2048/M64": 0.968,
        # round 20: the forward's DRAM cap (heuristics.fwd_dram_cap) lets the fit see the 64-row tiles'
        # own efficiency (INT4 64x128x128 0.76, not M = 64's DRAM-bound 0.46); on 8192->1024 at M = 333
        # (48 CTAs on 132 SMs, as many as 128x64x64's) the analyzer has it 4-10 % behind 128x64x64,
        # which one efficiency per tile does not see (at M = 64 NF4's two 64-row tiles, 2 % apart, tie
        # in the rules where both are DRAM-capped: round 25's tie-break takes the deeper K step, the best)
        "fwd/int4g32/8192->1024/M333": 0.896,
        "fwd/int4g128/8192->1024/M333": 0.955,
        # round 34 (split-N's slice count weighed at mid M): INT3 g128's 2048->512 input gradient at M = 64
        # keeps the GEMM's 128 CTAs, 5 % behind split-N's one slice of 128 (0.88 against 0.92 us in the
        # analyzer; the rules have the two within 1 %: the mid-M line is a median over tile counts)
        "dgrad/int3g128/2048->512/M64": 0.947,
    },
    80: {
        # split-K at M <= 16 (one tile: the one-tile score decides; at mid M round 8's per-candidate
        # SPLIT_MID_M lines do): the fitted efficiency is a median over the shapes and the
        # occupancy-aware split count gives the tiles other grids. Round 24: the two-warp 16x64x256
        # is the analyzer's best on most decode cases; the rules keep 16x64x128 w4 on these
        # INT2 / NF4 ones, 3.5-5 % behind it; at M = 64-128 the split is 1.5-3.7 % ahead of the GEMM
        "fwd/int2g32/2048->8192/M1": 0.965,
        "fwd/int2g32/4096->4096/M1": 0.964,
        "fwd/int2g32/8192->2048/M1": 0.963,
        "fwd/nf4dq/14336->4096/M1": 0.949,
        "fwd/nf4dq/14336->4096/M16": 0.952,
        "fwd/int4g32/8192->8192/M64": 0.956,
        # round 27 (every sm_80 loop shorter by 32-bit row offsets; INT3 3072->3072 at M = 128 now picked
        # right). Round 33: INT4 g128's 3072->8192 at M = 64 (the GEMM, 1.7 % behind the split) is
        # picked right; INT4 g32's 2048->8192 and 3072->8192 at M = 64 keep the GEMM 5 % behind the
        # one-slice split-K (the mid-M line is a median over the tile counts and shapes), and INT3
        # g128's 14336->4096 decode takes the four-warp 256-deep tile 2 % behind the two-warp one
        # (RESIDENT's refit: 4-5 resident CTAs, was 5)
        "fwd/int4g32/2048->8192/M64": 0.952,
        "fwd/int4g32/3072->8192/M64": 0.953,
        "fwd/int3g128/14336->4096/M1": 0.979,
        # (NF4's four went with round 21's half2 lookup and the split fit redone on it)
        # (the input gradient at M = 128 on 2048-4096-wide INT3 layers, 2-3 % off since round 9, went
        # with round 23's refit: GEMM_MID_M's INT3 factor 0.882 -> 0.878 takes the two-warp 64x64x128)
    },
}


@pytest.fixture(scope="module", params=(90, 80), ids=("sm90", "sm80"))
def sweep(request):
    arch = request.param
    res = sr.rules_check(sr.read_csv(SWEEP[arch]), arch)
    assert len(res) == 1120, f"{SWEEP[arch]}: {len(res)} cases"  # 16 shapes x 7 M x 5 formats x 2 ops
    return arch, res


def test_rules_pick_the_analyzers_best_kernel_and_tile(sweep):
    """Chosen == best within RULES_TOLERANCE (1 % of the estimated time: the estimates' printed
    resolution, well under the model's own error) at every case of the sweep."""
    arch, res = sweep
    res, stale = current(res)
    off = {r["case"]: (r["chosen"], r["best"], round(r["ratio"] or 0, 3)) for r in res
           if r["ratio"] is None or r["ratio"] < sr.RULES_TOLERANCE}
    known = {c: x for c, x in KNOWN_OFF[arch].items() if c not in stale}
    assert set(off) == set(known), {c: v for c, v in off.items() if c not in known}
    for case, ratio in known.items():  # the documented exceptions get no worse
        assert off[case][2] >= ratio - 0.002, (case, off[case])


def current(res):
    """(the cases, the names of stale ones = none): a row is stale when the rules now split the GEMM
    input gradient over N but the sweep has the unsplit launch's grid (bench/static_report.py marks
    it). The committed sweep was regenerated after the round-5 split, so a stale row means a rule
    changed a launch since: re-sweep (docs/measurements.md has the command)."""
    stale = {r["case"] for r in res if r["stale"]}
    assert not stale, f"the committed sweep predates the rules for {sorted(stale)[:5]}...: re-sweep"
    return res, stale


#: the dispatcher's documented misses: case -> (path taken, its x dense, the other path's x dense).
#: None since round 7 (the half2 forward tile made the fused INT3 forward the faster path where
#: round 6's sm_90 2048->512 M = 8192 miss was; round 6's forward K split removed the narrow INT3
#: M = 333 misses).
KNOWN_DISPATCH = {
    90: {},
    80: {},
}


def test_dispatcher_takes_the_faster_path(sweep):
    """At M > 16 the dispatcher's path (fused / dequantize + dense) is within the tolerance of the
    faster one by the analyzer's estimates, except the documented misses (which get no worse)."""
    arch, res = sweep
    res, stale = current(res)
    bad = {r["case"]: (r["path"], round(r["x_dense"], 3), round(r["x_best_path"], 3)) for r in res
           if r["x_dequant"] is not None and r["x_dense"] < r["x_best_path"] * sr.RULES_TOLERANCE}
    assert set(bad) == set(KNOWN_DISPATCH[arch]), {c: v for c, v in bad.items() if c not in KNOWN_DISPATCH[arch]}
    for case, (path, x, other) in KNOWN_DISPATCH[arch].items():
        assert bad[case][0] == path and bad[case][1] / bad[case][2] >= x / other - 0.005, (case, bad[case])


#: the cases of the in-sample sweep where qlk's chosen path is estimated under 0.9x the dense GEMM's
#: time (issue 17's floor): none since round 9 (round 8 left sm_80's INT3 forward 2048->2048 at
#: M = 333, 0.87x; the two-warp 64x128 tile took it to 1.0x against a dense baseline with that tile)
KNOWN_LOW = {90: {}, 80: {}}
#: out-of-sample sweeps (the rules were not fitted on them): static-extra = the same 16 shapes at M
#: in {32, 256, 1024, 4096}; static-other = layers of other model families (Qwen2.5, Mistral-Nemo,
#: Gemma-2, Phi-2; bench/launches.py OTHER_SHAPES) at M in {1, 7, 100, 500, 3000}; static-odd (round
#: 10) = the 16 shapes at M in {100, 500, 1500, 3000, 6000}, none a power of two (it found NF4's input
#: gradient on sm_80 never launching the two-warp tile the rules scored: 0.85x dense at M = 500)
OUT_OF_SAMPLE = {(stem, arch): os.path.join(ROOT, "bench", "results", f"static-{stem}-sm{arch}.csv")
                 for stem in ("extra", "other", "odd", "new", "oos", "oos2", "oos3", "oos4", "oos5", "oos6", "oos7", "oos8",
                              "midm", "smol", "family-formats", "formats", "narrow")
                 for arch in (90, 80)}
#: round 11's check at unswept shapes (static-new: 8 layers x 4 M x 5 formats x 2 ops = 320 cases) is
#: smaller than the others, and its 1536->256 layer's tile picks at M = 24 / 200 are 3.5-9 % off the
#: analyzer's best (documented in docs/kernels.md "Round 11"): 97 % there, 98 % elsewhere
OUT_OF_SAMPLE_MIN_CASES = {"new": 320, "midm": 160, "smol": 84, "formats": 300, "narrow": 310}
#: round 14's check (static-oos: Qwen2.5-0.5B/3B/32B, Phi-3-mini, Gemma-2-9B/27B layers at M 1, 5, 48,
#: 777, 4000): chosen = best 585 / 600 (sm_90) and 580 / 600 (sm_80) since round 15; most misses are 1-10 % (the
#: split-K depth at K = 896, 896->128's forward tiles at M >= 777), docs/kernels.md "Round 14"
#: round 15: the split-N kernel twice as fast (round 14) makes split-N against the GEMM a close call at
#: M = 24 on the 4096-7168-wide layers (2-4 % either way): 310 / 320 on sm_80
#: round 15's check (static-oos2: MiniLM 384/1536, Qwen3-0.6B 1024/3072/2048, Falcon-7B 4544/18176,
#: GPT-J 4096->16384, Qwen3-4B 2560/9728, Yi-34B 7168->20480, Llama-3.1-405B 16384->53248 at M 3, 12,
#: 40, 300, 1500; 580 cases, INT3 / INT4 g128 cannot run at K = 4544): 565 / 567 of 580, the misses
#: 2-8 % but one (split-K depth at M <= 12; the forward tile at M = 300, where sm_90's 64-row tile
#: and the 128-row ones are close)
#: round 16's check of the input gradient under M = 64 (static-midm: the 16 shapes at M 24 and 48, the
#: input gradient only, 160 cases; sm_90's 64x64x128 tile proposed from M = 17 on): 148 / 160 (sm_90,
#: the tile 1-9 % behind a 128-row one on the 8192-wide dX) and 153 / 160 (sm_80: split-N against the
#: GEMM on the narrow layers, as round 15's extra M = 32)
#: round 18 (sm_90's input gradient on the B-operand tile, CALIBRATION refitted): static-oos3 566 / 580,
#: the 14 misses 1-4 % (input gradients at M = 72-160 and 900 between 64-row, 128-row and split tiles
#: whose one fitted efficiency each meets per-shape grids; three forwards at M = 400-900)
#: round 19 (the B-operand tile's words loaded ahead, INT3 on it, the sm_90 input gradient refitted):
#: static-oos3 558 / 580 and static-other 585 / 600. The new misses are all 1-3.6 % (oos3: 13 INT2 /
#: INT4 / NF4 input gradients at M = 160-900; other: 8 at M = 100 and 3000). In each, the 64-row,
#: 128-row and split tiles' estimates lie within a few per cent of each other, and each tile has one
#: fitted efficiency to meet every shape's grid. Five earlier oos3 misses are now picked right. Every
#: pick gained or held its x dense but five (by 0.8-2.8 %, still 0.90-2.39x dense).
#: Round 20 (the forward's DRAM cap, heuristics.fwd_dram_cap, on both archs): sm_80's static-new
#: 310 -> 307 / 320 (1536->256 at M = 200: the forwards' 64-row tiles tie within 1-3 %; 0.8-3 % down,
#: still 2.97-3.06x dense) against oos 10 and oos2 5 picks up there.
#: Round 24 (every report re-run live on one tree: merges of earlier rounds had left rows of changed
#: launches; the two-warp split-K candidate): sm_90's static-oos2 562 / 580 (picks 1-8 % behind a
#: second tile: M = 40 input gradients and M = 300 forwards, the farthest INT3 384->1536 at M = 40)
#: and static-other 584 / 600 (1-7 %, the farthest the 3584->512 input gradients at M = 3000).
#: Round 25 (sm_90's 64-row tiles at every M from their least, equal scores to the deeper reduction
#: step): static-other 584 -> 592 / 600, back to the default share. static-smol (SmolLM2-135M/360M
#: layers at M 1, 100, 3000; 84 cases a report, too few for the default share): 81 / 84 (sm_90), 80 / 84
#: (sm_80), the misses split-K against the GEMM at M = 100 and a 1536-deep input gradient there.
#: static-oos4 (round 25's check of layers and M values no report had: BERT-base 768/3072, GPT-2-large
#: 1280/5120, OpenLLaMA-3B 3200/8640, a 2560/6912 MLP, a fused 4096->12288 QKV and 2048->6144 at M 2, 33,
#: 257, 1234, 5000, 16384): 571 / 576 (sm_90) and 573 / 576 (sm_80), 0 cases under 0.9x dense, 0 spills
#: static-oos5 (round 26: DeepSeek-V3's MLA projections 7168->1536, 1536->24576, 7168->576, 512->32768
#: and its 18432->7168, Command-R's 8192->22528, 5760->2880, 1024->2816, 640->2560, a 4096->512 GQA
#: projection at M 4, 17, 96, 129, 700, 2222, 7777): 640 / 700 (sm_90) and 670 / 700 (sm_80), most misses
#: 1-10 % at M = 17-129 where split-K / split-N meet the GEMM (the mid-M split model, as extra's and
#: smol's below), every one of them >= 1.77x dense; sm_80 0 under 0.9x, sm_90 4 (NF4, below)
#: round 26: sm_80's 128x64x64 input-gradient tile, picked for smol's NF4 576->1536 at M = 100 1.3 % behind
#: 64x64x128 w4 (6.7x dense), a fifth miss of 84 on sm_80
#: round 29 (split-N's rows at the fitted SPLIT_ROW_COST, a tile's rows M / T, the input-gradient GEMM
#: tiles' own mid-M factors GEMM_MID_TILE): every report's picks more than 10 % off 20 -> 9 (the worst
#: 0.76 -> 0.88), more than 5 % off 64 -> 41, within 1 % 14716 -> 14752 of 15020 (sm_80 extra 628 -> 633,
#: midm 149 -> 157, oos5 670 -> 682, oos6 702 -> 710; oos3 575 -> 570: five 72-row input gradients on
#: 2048-deep layers now take split-N, 1-6 % behind the GEMM)
OUT_OF_SAMPLE_BEST_SHARE = {"new": 0.959, "oos": 0.96, "oos2": 0.965, "midm": 0.92, "oos3": 0.96, "smol": 0.94,
                            "oos5": 0.91, "oos6": 0.965, "oos7": 0.955, "oos8": 0.975, "formats": 0.97,
                            "narrow": 0.95}
#: round 32's check (static-narrow: the N = 128-512 k/v projections of TinyLlama, Qwen2.5-0.5B / 1.5B /
#: 3B / 7B, Gemma-3-1B, SmolLM2-135M / 360M at M 24, 40, 56, 88, 120; 310 cases an arch): round 31's
#: tree had sm_90 16 and sm_80 15 input gradients under 0.9x (N = 256 at M = 40-56, 0.68-0.89x: the
#: split-N workspace's passes); with the one-slice launch storing dX itself (DIRECT), sm_80's 16x256x64
#: split-N tile and NF4 on the 256-row tiles: 0 on either arch, every path the faster one, 0 qlk
#: spills, chosen = best 297 (sm_90) and 295 (sm_80)
#: round 31's check of the other group sizes (bench/launches.py --formats; CALIBRATION and RESIDENT
#: fitted on static-family-formats' INT rows with the family sweep, :func:`fit_rows`): 0 under 0.9x
#: dense on either arch, every path the faster one, 0 qlk spills; chosen = best 1320 / 1344 on both
#: archs (static-family-formats) and 294 (sm_90) / 293 (sm_80) of 300 (static-formats, five of the
#: shapes at M 1, 9, 48, 333, 2048, 8192). Before the fit the rules took the bit width's entry, fitted
#: at one group size: sm_80's static-formats 281 / 300 with 7 picks 12-21 % off (INT2 g128's split-K
#: depth at M <= 16, 0.83-0.88)
#: round 34 (split-N's one slice weighed at mid M): sm_80's static-formats 293 -> 291 / 300, INT3 g32's
#: and NF4-without-double-quant's 4096->1024 input gradients at M = 48 keep the GEMM 2.6-6.5 % behind
#: the one-slice split-N (both picks unchanged, 1.33-1.37x dense)
#: round 30's check (static-oos8, never fitted on: LLaMA-30B's 6656->6656 / 6656<->17920, LLaMA-65B and
#: CodeLlama-34B's 8192<->22016, Llama-2-13B's 5120->5120, Llama-3.1-405B's 16384->1024 / 16384->16384 /
#: 53248->16384, TinyLlama's 2048->256 k/v projection, at M 8, 20, 56, 384, 1200, 8000; 600 cases an
#: arch): chosen = best 586 (sm_90) and 592 (sm_80), none more than 10 % off, every path the faster one,
#: 0 qlk spills; under 0.9x: sm_80 0, sm_90 5 (TinyLlama's k/v input gradient at M = 56, below)
#: round 29's check (static-oos7, swept after the round's rules were fitted, never fitted on: gpt-oss-20B's
#: attention 2880->4096, 4096->2880 and 2880->512, Qwen3-32B's 5120<->25600 and 5120->8192, Gemma-3-27B's
#: 5376<->21504 and 5376->4096, GLM-4-9B's 4096<->13696, MiniCPM's 2304->5760, at M 1, 7, 29, 113, 250,
#: 999, 3333; 784 cases an arch, K = 2880 has no group of 128): 0 under 0.9x on either arch (lowest above
#: M = 16: sm_90 0.935x, sm_80 0.963x), every path the faster one, 0 qlk spills; chosen = best 750 / 784
#: (sm_90; round 28's rules 751) and 772 / 784 (sm_80; round 28's rules 767)
#: round 28's check (static-oos6: Llama-3.2-3B / Phi-3 3072<->8192 and 3072->1024, Mistral-Nemo 5120<->14336
#: and 5120->1024, Gemma-2-9B's 3584->4096 / 3584->2048, StarCoder2-15B 6144<->24576, Llama's fused qkv
#: 4096->6144, Phi-2 2560->10240, at M 6, 21, 190, 555, 1900, 7000; 720 cases an arch): 0 under 0.9x on
#: either arch (lowest above M = 16: sm_90 0.91x, sm_80 0.96x), every path the faster one; chosen = best
#: 698 / 720 (sm_90: 13 of the 22 misses forwards at M = 190, the worst 6.6 % off) and 702 / 720 (sm_80:
#: 9 input gradients at M = 21, the worst 9.1 % off)
#: picks more than 10 % under the analyzer's best there (case -> share; they get no worse). Round 15
#: (split-N refitted to round 14's kernel, both split kernels charged their workspace passes): the
#: input gradient of a narrow layer at M = 24-48, sub-microsecond kernels where the rules' GEMM is
#: 12-33 % slower than split-N: 896->128 at M = 48 (sm_90) and 1536->256 at M = 24 (sm_90), where the
#: fp32 partial rows are most of split-N's bytes, which it moves at a higher DRAM fraction than the
#: weight-dominated shapes its efficiency is fitted on, and 4096->1024 at M = 32 (sm_80); INT3's
#: 256-wide split-N step over N = 896 at M = 1 (3.5 steps, the cut one decoded in full: sm_90).
#: Round 29 charged split-N's rows at their fitted cost (heuristics.SPLIT_ROW_COST) and gave each
#: input-gradient GEMM tile its mid-M factor (GEMM_MID_TILE): those narrow-layer input gradients and
#: sm_80's at M = 17-32 (extra, midm, smol, oos5: 0.77-0.88) are the analyzer's best now (the M = 1
#: one was since round 14's step)
KNOWN_OFF_OUT_OF_SAMPLE = {
    # round 20: the 64x128x128 forward on a 1536-wide layer at M = 200 (96 CTAs on 132 SMs), which the
    # analyzer has 11 % behind 256x64x64 (3.32x -> 3.07x dense)
    ("new", 90): {"fwd/int4g32/8960->1536/M200": 0.891},
    # static-smol, sm_80 at M = 100: NF4's 256-deep split-K tile on K = 576 (2.25 steps) against the
    # 128-deep one
    # Round 33: the 128-deep tile went to one slice (168 CTAs, no passes), the analyzer's best by 21 %;
    # the rules keep the 256-deep two-warp tile's three slices, 0.3 % ahead in their time (the
    # one-slice tile's 168 CTAs on 108 SMs at SM balance 0.78, where the analyzer sees them DRAM-bound
    # at several resident an SM); the pick 1.9x dense
    ("smol", 80): {"fwd/nf4dq/576->1536/M100": 0.789},
    # static-oos5 (round 26): sm_80 the 256-deep split-K tile against the 128-deep one on K = 640 (2.5
    # steps) at M = 17; sm_90 the split-N step on N = 576 at M = 4 and split-K against the GEMM at
    # M = 96 on K = 640. (Round 29's split-N model took sm_80's five input gradients on the 512-wide
    # reduction at M = 17 from 0.77-0.83 to the best, and the earlier rounds every other entry this
    # list had: sm_90's narrow-layer input gradients at M = 24 / 48, 0.70-0.81, are the best now.)
    # Round 33: the 256-deep split-K on K = 640 at M = 17 picked right; INT2's decode on 512->32768 at
    # M = 4 (one slice of 512 N tiles, DIRECT since this round) keeps the 128-deep tile 15 % behind the
    # two-warp 256-deep one, whose one-slice launch gained most (the decode efficiencies are medians
    # over the family's K >= 2048)
    ("oos5", 80): {"fwd/int2g32/512->32768/M4": 0.852},
    # static-oos7 (round 29): gpt-oss's 4096->2880 input gradient at M = 113, the rules' 128x64x64 GEMM
    # against the 64x32x64 one, which must outscore the others by GRAD_CANDIDATE_MARGIN (10 %, round 8)
    # and is 12 % faster here; the picks 3.0x and 3.1x dense
    ("oos7", 90): {"dgrad/int4g128/4096->2880/M113": 0.891, "dgrad/int2g32/4096->2880/M113": 0.893},
    # (round 32: NF4 on the 256-row split-N tile too, which it had been kept off, joins the class)
    ("oos5", 90): {"dgrad/int4g32/7168->576/M4": 0.891, "dgrad/int4g128/7168->576/M4": 0.892,
                   "dgrad/int3g128/7168->576/M4": 0.895, "dgrad/int2g32/7168->576/M4": 0.892,
                   "dgrad/nf4dq/7168->576/M4": 0.891,
                   "fwd/int4g32/7168->576/M700": 0.898, "fwd/nf4dq/512->32768/M4": 0.89},
    # round 31, the other group sizes (static-family-formats: the family sweep at INT4 g64, INT3 g32 /
    # g64, INT2 g64 / g128 and NF4 without double quant; static-formats: 5 of its shapes at M 1, 9, 48,
    # 333, 2048, 8192): split-K against the GEMM at M = 128 (the mid-M tables are the family sweep's,
    # fitted at the report's five formats), and NF4 without double quant's 4-warp 256-deep split-K tile
    # at M = 48 (the "nf4" class is fitted on double-quantized NF4)
    # Round 33 (one-slice split-K launches, the slice count weighed at mid M): sm_90's two moved to
    # INT3 g32 on 2048-4096-wide layers at M = 64-128, the GEMM kept where the one-slice split-K is
    # 12-20 % faster; sm_80's INT2 g128 8192->28672 at M = 128 takes the one-slice split-K, 17 %
    # behind the GEMM (its pooled INT2 line is fitted on g32); NF4 without double quant at M = 48 on
    # 4096->14336 joins its sibling. Every one of them 1.3x dense or more
    ("family-formats", 90): {"fwd/int3g32/2048->2048/M128": 0.805, "fwd/int3g32/4096->4096/M64": 0.878,
                             "fwd/int3g32/14336->4096/M64": 0.879},
    ("family-formats", 80): {"fwd/int3g32/8192->3072/M128": 0.869, "fwd/int2g128/8192->28672/M128": 0.83},
    ("formats", 80): {"fwd/nf4/14336->4096/M48": 0.873, "fwd/nf4/4096->14336/M48": 0.882},
    # round 32 (static-narrow): sm_80's 16x256x64 split-N tile on N = 320 (SmolLM2-360M's k/v) at M = 40,
    # two slices of one step each, the second 64 rows of 256: the kernel decodes the clamped step in
    # full, where the score's fill counts a cut step only below one block (short_reduction_fill); the
    # picks 1.48-1.58x dense (the two-warp 4-slice tile: 1.64-1.76x)
    ("narrow", 80): {"dgrad/int4g32/960->320/M40": 0.879, "dgrad/int2g32/960->320/M40": 0.865,
                     "dgrad/nf4dq/960->320/M40": 0.875},
}
#: what the out-of-sample sweeps found under 0.9x dense (case -> x dense; they get no worse) and the
#: dispatcher's misses there (case -> (path, its x dense, the faster path's)). sm_90 at M = 3000 on
#: Qwen2.5's 3584-wide layers (docs/kernels.md "Round 9", out-of-family check): 3584 = 28 x 128
#: columns and 3000 rows = 12 x 256 give every qlk tile 2.55 or 3.39 waves of the 132 SMs (SM
#: balance 0.85), while the dense baseline's 64-row tile runs 1316 CTAs at 2 per SM (4.98 waves,
#: 0.997); qlk's 64-row tiles are issue-bound there (half the MMA work per decoded weight)
#: Round 25: sm_90's 64-row tiles, now proposed at M = 3000, lift every INT case there over 0.9x (the
#: 3584->512 input gradients 0.852-0.854x -> 0.97-1.0x on 64x128x128's 1316 CTAs, the INT4 g32 forwards
#: 0.896x -> 0.989x); NF4's 64-row tiles are issue-bound on the lookup, so NF4 keeps its big tiles
#: Round 26: NF4's GEMMs read their absmax as activation-dtype pairs (forward 64x128x128 +2.3 %, input
#: gradient +1.2 % in the fit): every NF4 forward over 0.9x (other 3 -> 1, oos 3 -> 1, oos3 9 -> 4, oos5
#: 6 -> 4); left NF4's input gradients at 0.85-0.90x
KNOWN_LOW_OUT_OF_SAMPLE = {
    # Round 27 (32-bit row offsets; the input gradient's next words loaded after the decode): NF4's
    # 64x128x128 input gradient 612 -> 555 instructions an iteration, every NF4 input gradient over 0.9x
    # (3584->512 at M = 3000 0.852x -> 0.955x on the refitted 64-row tile; oos5's at M = 700 0.89x ->
    # 0.95-0.97x). The same offsets cost NF4's 64x128x128 forward 4 instructions on these shapes (560 ->
    # 564, its absmax index no longer hoisted as a 64-bit row base): five NF4 forwards at 0.8998x, were
    # 0.905-0.915x. Round 28 gave the de-nested absmax its 64-bit row base back (NF4 only: 564 -> 560):
    # those five at 0.91x, none left
    ("other", 90): {},
    # static-oos5 (round 26): NF4's input gradient at M = 700 (11 tiles of 64 rows, fill 0.99, against 6 of
    # 128, fill 0.91) was issue-bound on the lookup (568 instructions against 512 cycles); round 27 above
    ("oos5", 90): {},
    # (static-smol sm_80's 576->192 input gradients at M = 3000, 0.74-0.76x through round 25, are 1.03x
    # since round 26's 128x64x64 tile: 9 column tiles of 64 where the 128-column tiles left 4.5)
    # round 14 (static-oos): sm_90 at M = 777, the same wave quantization: 7 M tiles of 128 rows (the
    # last holds 9), 532 CTAs on 396 slots or 266 on 264, against the dense 64-row tile's 494 on 264
    # (1.87 waves). Round 15 lifted the 896->128 input gradient at M = 48 over 0.9x (sm_80 0.49-0.51x:
    # the refitted split-N kernel); round 17 the INT2/INT4 forwards at M = 777 (0.78-0.86x -> 0.93-0.98x);
    # round 18 the INT2 and most INT4 input gradients (37 -> 18); round 19 (INT3 on the B-operand tile,
    # its words loaded ahead) the rest but INT3 / NF4 on 4864->896 (INT4 there 0.864x -> 0.981x): 18 -> 8;
    # round 20 (64x128x128 tiles, forward and input gradient) every INT3 case: 8 -> 4, all NF4; round
    # 21 (NF4's half2 lookup) 4 -> 3, each up 7-8 % (0.815-0.829x -> 0.880-0.893x); round 26 the NF4
    # forwards over 0.9x; round 27 4864->896's input gradient 0.891x -> 0.955x, the forward back to 0.8998x,
    # round 28 the forward over again (0.91x)
    ("oos", 90): {},
    # static-oos8 (round 30): TinyLlama's 2048->256 input gradient at M = 56 on sm_90 was 0.68-0.78x (the
    # analyzer's best pick: split-N's one-slice launch paid its fp32 workspace's passes, 10 B a dX
    # element against 0.26 MB of INT4 weight; the GEMM tiles cover dX [56, 2048] with 16-32 CTAs).
    # Round 32's DIRECT store (one slice: dX itself, no workspace) and NF4 on the 256-row tile:
    # 1.23-1.37x, none left (static-narrow: the whole N = 128-512 class)
    ("oos8", 90): {},
}
# round 15's oos2: sm_90 at M = 300, the same class: 300 rows in 2 tiles of 256 (fill 0.59) or 3 of
# 128 (0.78) against the dense baseline's 64-row tile (5 tiles, 0.94). The forward's 64x128x64 tile
# (round 15) lifted Qwen3-0.6B's 1024->3072 forward 0.71x -> 1.01-1.19x, the input gradient's
# 64x64x128 tile (round 16, heuristics.CANDIDATE_M_RANGE) its 3072->1024 gradient 0.68x -> 0.94-1.04x
# and Qwen3-4B's 9728->2560 INT gradients 0.871x -> 0.886x; left: the wide layers, where a 128-row
# tile stays the best (0.86-0.90x: the 64-row tiles are issue- or smem-bound at 0.6-0.7 of peak);
# rounds 18-19 took every INT input gradient over 0.9x (25 -> 9 -> 6), round 20's 64x128x128 tiles
# the INT3 forwards and two NF4 cases (6 -> 2), round 21's NF4 half2 lookup the last two (16384->53248
# at M = 300: 0.882-0.893x -> 0.944-0.954x): none left
# round 16's check (static-oos3: Gemma-2-2B 2304/9216 and its 2304->2048, StableLM-2-1.6B 2048/5632,
# a DeepSeek-V2-Lite-like MLP 2048/10944, Mistral-Small-24B 5120/32768, a 6144/16384 MLP and Gemma-3-1B
# 1152->6912 at M 72, 160, 400, 640, 900): sm_80 0 under 0.9x; sm_90 52, the same two classes. At
# M = 400 (18 input gradients at 0.69-0.83x, 19 forwards at 0.79-0.88x): 400 rows fill 7 tiles of 64 (0.89)
# or 4 of 128 (0.78); the dense baseline's 64-row tile runs at 0.95..0.50 of peak where qlk's 64-row
# tiles are smem- or issue-bound at 0.70..0.40 (half a 128-row tile's MMA work per decoded weight). At
# M = 900 (15, 0.82-0.90x): wave quantization (5632->2048's gradient: 352 CTAs on 264 slots). Round 17 (the INT2/INT4
# 64-row forward tile in the lane-owned k order, its efficiency fitted on unsplit launches): 52 -> 38,
# the INT2/INT4 forwards at M = 400 over 0.9x; round 18 (the B-operand input gradient) 38 -> 33; round
# 19 (its words loaded ahead: the 64-row tile tensor-bound; INT3 on it) 33 -> 23, every INT2/INT4
# input gradient at M = 400 over 0.9x (2304->9216 INT4 0.869x -> 0.986x, INT3 0.758x -> 0.864x); left
# NF4's input gradient (its 64-row tile issue-bound on the table lookup), the INT3 / NF4 forwards,
# and the M = 900 waves; round 20 (64x128x128 tiles, forward and input gradient; the forward's DRAM
# cap) every INT case (23 -> 11, all NF4; NF4 9216->2304's forward at M = 400 0.839x -> 0.828x: the
# rules' 64x128x128 1.3 % behind the 256-row tile there); round 21 (NF4's half2 lookup) 11 -> 9, every
# one but one up 3-8 % (0.82-0.86x -> 0.88-0.89x). The exception, 10944->2048's input gradient at
# M = 400, 0.855x -> 0.827x: the refitted 64x128x128 (0.629 -> 0.68, in sample) now wins the rules'
# score there, 3.3 % behind the analyzer's 256x64x64 w8 (602 against 342 CTAs, one fitted
# efficiency per tile)
# Round 26 (NF4's paired absmax): every forward over 0.9x, 9 -> 4; round 27 (32-bit row offsets) the
# last four NF4 input gradients (10944->2048 at M = 400 0.846x -> 0.918x): none left
KNOWN_DISPATCH_OUT_OF_SAMPLE = {
    # static-oos5: the input gradient on a 576-wide K at M = 7777, dequantize + dense picked where the
    # fused GEMM is faster by the analyzer, every path ~0.95-0.99x dense: round 26 INT4 g128 (1-2 %);
    # round 27's faster fused tiles move the INT3 (4.8 %) and NF4 (3.3 %) cases there too while the
    # rules' mid-K fused model stays on the family's fit (INT4 g128 now within 1 %)
    ("oos5", 90): {"dgrad/int3g128/7168->576/M7777": ("dequant", 0.949),
                   "dgrad/nf4dq/7168->576/M7777": ("dequant", 0.952)},
}


def test_every_case_at_least_0_9x_dense(sweep):
    """Issue 17's floor: at every case of the sweep qlk's chosen kernel and path are estimated at
    >= 0.9x the dense bf16 GEMM's time (the documented exceptions get no worse)."""
    arch, res = sweep
    res, stale = current(res)
    low = {r["case"]: round(r["x_dense"], 3) for r in res if r["x_dense"] is not None and r["x_dense"] < 0.9}
    assert set(low) == set(KNOWN_LOW[arch]), low
    assert all(r["x_dense"] is not None for r in res)
    for case, x in KNOWN_LOW[arch].items():
        assert low[case] >= x - 0.005, (case, low[case])


@pytest.mark.parametrize("stem,arch", sorted(OUT_OF_SAMPLE), ids=[f"{s}-sm{a}" for s, a in sorted(OUT_OF_SAMPLE)])
def test_out_of_sample_sweeps(stem, arch):
    """The rules on sweeps they were not fitted on: no stale launch, every case >= 0.9x dense and the
    faster of fused / dequantize + dense everywhere above M = 16 (except the documented cases, which
    get no worse), and the analyzer's best config (within the tolerance) in at least 98 % of the
    cases, no pick more than 10 % under it."""
    path = OUT_OF_SAMPLE[stem, arch]
    res = sr.rules_check(sr.read_csv(path), arch)
    assert len(res) >= OUT_OF_SAMPLE_MIN_CASES.get(stem, 400), f"{path}: {len(res)} cases"
    assert not [r["case"] for r in res if r["stale"]], "re-sweep: docs/measurements.md has the command"
    low = {r["case"]: round(r["x_dense"] or 0, 3) for r in res if (r["x_dense"] or 0) < 0.9}
    known = KNOWN_LOW_OUT_OF_SAMPLE.get((stem, arch), {})
    assert set(low) <= set(known), {c: x for c, x in low.items() if c not in known}
    assert all(low.get(c, 1.0) >= x - 0.005 for c, x in known.items()), low
    wrong_path = {r["case"]: (r["path"], round(r["x_dense"], 3)) for r in res if r["x_dequant"] is not None
                  and r["x_dense"] < r["x_best_path"] * sr.RULES_TOLERANCE}
    known = KNOWN_DISPATCH_OUT_OF_SAMPLE.get((stem, arch), {})
    assert set(wrong_path) <= set(known), {c: v for c, v in wrong_path.items() if c not in known}
    assert all(wrong_path[c][1] >= known[c][1] - 0.005 for c in wrong_path), wrong_path
    off = {r["case"]: round(r["ratio"] or 0, 3) for r in res if r["ratio"] is None or r["ratio"] < sr.RULES_TOLERANCE}
    share = OUT_OF_SAMPLE_BEST_SHARE.get(stem, 0.98)
    known_off = KNOWN_OFF_OUT_OF_SAMPLE.get((stem, arch), {})
    assert len(off) <= (1 - share) * len(res) + 1e-9, off
    far = {c: x for c, x in off.items() if x < 0.9}
    assert set(far) <= set(known_off) and all(far[c] >= known_off[c] - 0.005 for c in far), far


def test_the_check_can_fail(sweep):
    """The comparison is not vacuous: a rule that always takes the first fitting candidate, or
    always the other path, disagrees with the analyzer somewhere."""
    arch, res = sweep
    first = [r for r in res if r["M"] >= 256 and r["best"].split()[1] != h.choose_config(
        r["rule_op"], r["M"], r["N"], r["K"], "int4", arch, configs=h.candidates(r["rule_op"])[:1]).label.split()[0]]
    assert first
    flipped = [r for r in res if r["x_dequant"] is not None and min(r["x_fused"], r["x_dequant"]) < 0.97 *
               r["x_best_path"]]
    assert flipped  # the two paths do differ: picking the wrong one would be seen


def test_resident_ctas_are_the_sweeps():
    """heuristics.RESIDENT (the split kernels' CTAs per SM, round 6) is what ``--fit-rules`` reads
    from the committed sweeps (:func:`fit_rows`): after a re-sweep, refit it with CALIBRATION."""
    assert sr.fit_resident(fit_rows()) == h.RESIDENT


def test_calibration_is_the_sweeps():
    """heuristics.CALIBRATION is what ``--fit-rules`` reads from the committed sweeps (:func:`fit_rows`;
    round 17: the GEMMs' efficiencies from unsplit launches only, the forward's as the input
    gradient's): a re-sweep, or a change of the fit, that was not followed by a refit fails here."""
    assert sr.fit_rules(fit_rows()) == h.CALIBRATION


def test_mid_m_tables_are_the_sweeps():
    """heuristics.SPLIT_MID_M and GEMM_MID_M (round 8: the split kernels' and the GEMMs' time at
    16 < M <= 128 against the rules' model) are what ``--fit-rules`` reads from the committed sweep
    with the current CALIBRATION: after a re-sweep or a CALIBRATION refit, refit them too."""
    rows = [r for arch in (90, 80) for r in sr.read_csv(SWEEP[arch])
            if r.get("M") is not None and h.SPLIT_ALWAYS_M < r["M"] <= h.SPLIT_MAX_M]
    assert sr.fit_split_mid(rows) == h.SPLIT_MID_M
    assert sr.fit_gemm_mid(rows) == h.GEMM_MID_M
    assert sr.fit_gemm_mid_tile(rows) == h.GEMM_MID_TILE


def test_gemm_mid_tile_factors_model_the_sweep_closer(device_lists):
    """Round 29: with each input-gradient tile's GEMM_MID_TILE factor the rules' GEMM time at M = 64 /
    128 is closer to the analyzer's than with its format's factor alone (rms log error), on every
    arch."""
    import statistics

    from bench.sass import gpu

    import launches

    rows = [r for arch in (90, 80) for r in sr.read_csv(SWEEP[arch])
            if r.get("M") is not None and h.SPLIT_ALWAYS_M < r["M"] <= h.SPLIT_MAX_M]

    def rms(table):
        saved, h.GEMM_MID_TILE = h.GEMM_MID_TILE, table
        try:
            logs = {}
            for r, fam, op, fmt, c, packed, t in sr._mid_m_rule_rows(rows, ("grad",), gpu, h, launches):
                logs.setdefault(fam, []).append(math.log(h.fused_time(c, r["M"], r["N"], r["K"], packed, fam, fmt) / t))
        finally:
            h.GEMM_MID_TILE = saved
        return {fam: statistics.fmean(x * x for x in v) ** 0.5 for fam, v in logs.items()}

    with_tiles, without = rms(h.GEMM_MID_TILE), rms({})
    assert set(with_tiles) == {90, 80}
    assert all(with_tiles[fam] < 0.9 * without[fam] for fam in with_tiles), (with_tiles, without)
    # sm_80's 64-row tiles are the ones a format's factor had too fast (the split-N picks they lost)
    assert all(f > 1.03 for label, f in h.GEMM_MID_TILE[80, "grad"].items() if label.startswith("64x"))


def test_split_row_cost_is_the_sweeps():
    """heuristics.SPLIT_ROW_COST (round 29: split-N's dY and partial rows against its weight bytes) is
    the cost of least error that ``--fit-rules`` finds, here among its neighbours on the fit's grid, and
    it models the analyzer's split-N times at M = 64 / 128 better than full cost does."""
    rows = [r for arch in (90, 80) for r in sr.read_csv(SWEEP[arch])
            if r.get("M") is not None and h.SPLIT_ALWAYS_M < r["M"] <= h.SPLIT_MAX_M]
    fitted = {arch: h.SPLIT_ROW_COST[arch, "splitn"] for arch in (90, 80)}
    near = {round(c + d, 2) for c in fitted.values() for d in (-0.02, 0.0, 0.02)}
    errors = sr.split_row_cost_errors(rows, tuple(sorted(near)) + (1.0,))  # one refit per cost
    for arch, cost in fitted.items():
        assert 0 < cost < 1
        by_cost = {c: e for e, c in errors[arch]}
        assert min((e, c) for c, e in by_cost.items() if abs(c - cost) <= 0.021)[1] == cost, by_cost
        assert by_cost[cost] < 0.5 * by_cost[1.0], by_cost


def test_split_count_leaves_no_slice_idle():
    for length in (64, 512, 1000, 4096, 14336, 28672):
        for block in (64, 128, 256):
            for base in (1, 3, 16, 224, 1792):
                for sms in (1, 108, 132):
                    split = h.split_count(length, block, base, sms)
                    steps = math.ceil(length / block)
                    per = math.ceil(steps / split)
                    assert 1 <= split <= steps and (split - 1) * per < steps  # the last slice has steps
                    assert split <= math.ceil(16 * sms / base)  # ≈ 16 CTAs per SM at most
                    assert h.split_busy(length, block, split) == steps / (split * per)


def test_ties_go_to_fewer_ctas_then_list_order():
    a = _cfg(90, 8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_M=8)
    b = _cfg(90, 8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_M=4)  # same tile: same score, same CTAs
    assert h.choose_config("fwd", 4096, 4096, 4096, arch=90, sms=132, configs=[a, b]).index == 0
    assert h.choose_config("fwd", 4096, 4096, 4096, arch=90, sms=132, configs=[b, a]).index == 0


def test_calibrated_candidates_use_the_fitted_efficiency(device_lists):
    """Every GPU candidate of config.py has a fitted entry per format it serves (a new tile without
    one is scored by the model until the sweep is rerun and refitted: --fit-rules; an input-gradient
    tile kept for some formats only, heuristics.GRAD_CANDIDATE_FORMATS, needs none for the others)."""
    for (fam, op, fmt), table in h.CALIBRATION.items():
        if op == "gemv":  # the FMA kernel's own autotuned list (config.gemv_grad_configs)
            tiles = {f"{bn}x{bk} w{w} s{st}" for bn, bk, w, st in h.GEMV_TILES}
            if (fam, fmt) == (80, "int4g128"):  # config.GEMV_PRUNE: that tile spills there, never run
                tiles.discard("64x128 w4 s3")
            assert set(table) == tiles
            continue
        for c in h.candidates(op):
            label = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
            if op == "grad" and not h.grad_candidate_allowed(label, fmt, fam):
                continue
            if c.qlk_arch == fam:
                assert h.calibrated(op, c, fmt, fam) is not None, (fam, op, fmt, c)
    c = _cfg(90, 8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_M=8)
    assert h.calibrated("fwd", c, "int4", 90) == h.CALIBRATION[(90, "fwd", "int4")]["256x128x64 w8 s3"]
    got = h.score_all("fwd", 8192, 8192, 8192, "int4", 90, 132, configs=[c])[0]
    assert got.tile_eff == h.CALIBRATION[(90, "fwd", "int4")]["256x128x64 w8 s3"]
    # an unknown tile falls back to the two-term model
    odd = _cfg(90, 8, 3, BLOCK_N=128, BLOCK_M=192, BLOCK_K=64, GROUP_M=8)
    assert h.calibrated("fwd", odd, "int4", 90) is None
    assert h.score_all("fwd", 8192, 8192, 8192, "int4", 90, 132, configs=[odd])[0].tile_eff == \
        pytest.approx(sum(h.gemm_tile_eff(128, 192, 8, 90)) / 2)


def test_fused_kernel_rule_weighs_split_against_gemm(device_lists):
    # a GQA k/v projection at M = 64: 8 GEMM tiles on 132 SMs; the split-K grid fills them
    c = h.choose_fused("fwd", 64, 512, 2048, arch=90)
    assert c.op == "splitk"
    # a 28672-wide MLP at M = 128: the GEMM (the split kernel would stream the weight 8 times)
    assert h.choose_fused("fwd", 128, 28672, 8192, arch=90).op == "fwd"
    for m in (1, 16):
        assert h.choose_fused("grad", m, 4096, 4096, arch=80).op == "splitn"
    for m in (129, 333):
        assert h.choose_fused("grad", m, 512, 2048, arch=80).op == "grad"
    p = h.choose_path("fwd", 64, 512, 2048, arch=90)
    assert p.fused.op == "splitk" and p.t_fused == pytest.approx(h.fused_time(p.fused, 64, 512, 2048, h.weight_bytes(
        512, 2048, 4, 128, False), 90, "int4g128"))
    # round 8: the split kernel's M tiles as per-tile + shared time (SPLIT_MID_M, per candidate), M = 16
    # one tile; a group size without lines takes the bit width's, a candidate without one their mean
    deep, shallow = "16x64x256 w4 s3", "16x64x128 w4 s4"
    lines = h.SPLIT_MID_M[(90, "splitk")]
    per_tile, shared = lines["int4g32"][deep]
    assert h.split_mid_tiles("splitk", 4, "int4g32", 90, deep) == pytest.approx(4 * per_tile + shared)
    assert h.split_mid_tiles("splitk", 1, "int4g32", 90, deep) == 1.0
    assert h.split_mid_tiles("splitk", 2, "int4g64", 90, deep) == pytest.approx(2 * lines["int4"][deep][0]
                                                                                + lines["int4"][deep][1])
    fitted = list(lines["int4g32"].values())  # every candidate with lines (round 24: three)
    mean = [sum(v[i] for v in fitted) / len(fitted) for i in (0, 1)]
    assert h.split_mid_tiles("splitk", 4, "int4g32", 90, "16x128x256 w8 s3") == pytest.approx(4 * mean[0] + mean[1])
    assert 0 < shared < per_tile < 1
    # at mid M the split kernel's tile is the one fused_time finds fastest (sm_80 INT2 3072->3072 at
    # M = 128: a 256-deep tile, since round 24 the two-warp one; at M = 16 the one-tile score picks
    # its tile among the three by another measure)
    c = h.choose_config("splitk", 128, 3072, 3072, "int2g32", 80)
    assert c.label in (deep, "16x64x256 w2 s3") and h.choose_config("splitk", 16, 3072, 3072, "int2g32", 80)
    packed = h.weight_bytes(3072, 3072, 2, 32, False)
    others = [o for o in h.score_all("splitk", 128, 3072, 3072, "int2g32", 80) if o.label != c.label]
    assert others and all(h.fused_time(c, 128, 3072, 3072, packed, 80, "int2g32")
                          < h.fused_time(o, 128, 3072, 3072, packed, 80, "int2g32") for o in others)


def test_split_kernels_are_charged_their_workspace_passes(device_lists):
    """Round 15: the split-K / split-N kernels accumulate into a zeroed fp32 workspace at every launch
    and the cast reads it back (10 B per output element), in the rules' time and in the report's
    judge alike; the dense baseline's small-M split is charged the same, its unsplit tiles nothing."""
    from bench.sass import gpu

    m, n, k = 40, 128, 896  # 3 M tiles of 13.3 rows (round 29: not 16)
    dram = h.ARCH[80].dram_bytes_per_s
    for op, out_cols in (("splitk", n), ("splitn", k)):
        chosen = h.choose_config(op, m, n, k, "int4g32", 80)
        packed = h.weight_bytes(n, k, 4, 32, False)
        tiles = math.ceil(m / chosen.block_m)
        rows = h.SPLIT_ROW_COST.get((80, op), 1.0) * m / tiles  # round 29: M / T rows a tile, at their cost
        assert h.split_kernel_passes_bytes(op, m, n, k) == 10 * m * out_cols
        assert h.split_kernel_passes_bytes(op, m, n, k, direct=True) == 0
        for split in (1, 3):  # a one-slice launch stores its output itself (16-bit rows, no passes):
            c = dataclasses.replace(chosen, split=split)  # split-N since round 32, split-K since round 33
            direct = split == 1
            assert h.split_direct(op, split) == direct
            assert h.split_row_bytes(op, n, k, direct) == 2 * (k + n - out_cols) + (2 if direct else 4) * out_cols
            kernel = h.split_mid_tiles(op, tiles, "int4g32", 80, c.label) * \
                (packed + rows * h.split_row_bytes(op, n, k, direct)) / (dram * c.score)
            assert h.fused_time(c, m, n, k, packed, 80, "int4g32") == pytest.approx(
                kernel + (0 if direct else 10 * m * out_cols) / dram)
    g = gpu(90)
    row = dict(M=m, N=n, K=k, grid_ctas=64, op="dgrad")
    charged = {
        ("_quant_matmul_grad_input_splitn_kernel", "16x64x128 w4 s4"): 10 * m * k,
        ("_quant_matmul_splitk_kernel", "16x64x256 w4 s3"): 10 * m * n,
        ("_quant_matmul_grad_input_gemv_kernel", "32x256 w4 s3"): 10 * m * k,
        ("_dense_matmul_kernel", "16x64x256 w4 s4 GROUP_M=1 SPLIT_K=4"): 10 * m * k,  # dX [M, K]
        ("_dense_matmul_kernel", "16x64x256 w4 s4 GROUP_M=1 SPLIT_K=1"): 0,
        ("_dense_matmul_kernel", "128x128x64 w4 s4 GROUP_M=8"): 0,
        ("_quant_matmul_grad_input_kernel", "64x128x128 w4 s4"): 0,  # 1 x 7 dX tiles, unsplit
    }
    for (kernel, cfg), nbytes in charged.items():
        r = dict(row, kernel=kernel, config=cfg, grid_ctas=7 if kernel == "_quant_matmul_grad_input_kernel" else 64)
        assert sr.split_passes_time(r, g) == pytest.approx(nbytes / g.dram_bytes_per_s), (kernel, cfg)
    # round 32: a split-N launch of one slice (7 K tiles x 3 M tiles, + 1 column of V programs with
    # QA-LoRA) stores dX directly: nothing outside the kernel; two slices are charged again
    for grid, nbytes in ((21, 0), (28, 0), (42, 10 * m * k)):
        r = dict(row, kernel="_quant_matmul_grad_input_splitn_kernel", config="16x64x128 w4 s4", grid_ctas=grid)
        assert sr.split_direct(r) == (nbytes == 0)
        assert sr.split_passes_time(r, g) == pytest.approx(nbytes / g.dram_bytes_per_s), grid
    # round 33: a split-K launch of one slice (2 N tiles x 3 M tiles) stores Y directly; two slices
    # are charged the [M, N] workspace's passes
    for grid, nbytes in ((6, 0), (12, 10 * m * n)):
        r = dict(row, op="fwd", kernel="_quant_matmul_splitk_kernel", config="16x64x256 w4 s3", grid_ctas=grid)
        assert sr.split_direct(r) == (nbytes == 0)
        assert sr.split_passes_time(r, g) == pytest.approx(nbytes / g.dram_bytes_per_s), grid
    fwd = dict(row, op="fwd", kernel="_dense_matmul_kernel", config="16x64x256 w4 s4 GROUP_M=1 SPLIT_K=2")
    assert sr.split_passes_time(fwd, g) == pytest.approx(10 * m * n / g.dram_bytes_per_s)  # Y [M, N]


#: (kernel, the rule's cap, the output tiles' extent (M rows aside) and block, split launches the
#: sweep must hold): the input gradient's dX [M, K] (round 6) and the forward's Y [M, N] (round 20)
DRAM_CAPS = {
    "grad_dram_cap": ("_quant_matmul_grad_input_kernel", lambda r, bn, bk: math.ceil(r["K"] / bk), 100),
    "fwd_dram_cap": ("_quant_matmul_fwd_kernel", lambda r, bn, bk: math.ceil(r["N"] / bn), 50),
}


@pytest.mark.parametrize("cap", DRAM_CAPS)
@pytest.mark.parametrize("arch", (90, 80))
def test_dram_cap_is_the_analyzers_roofline(arch, cap):
    """heuristics.grad_dram_cap / fwd_dram_cap against the analyzer: at every GEMM input-gradient /
    forward row of the sweep (split and unsplit launches, 5 formats), its tensor fraction / DRAM
    fraction is the roofline ratio r the rule computes from the shape, the tile and the split (the cap
    is the midpoint of the DRAM-bound range r .. r / (1 + r))."""
    import launches

    kernel, out_tiles, min_splits = DRAM_CAPS[cap]
    rows = [r for r in sr.read_csv(SWEEP[arch]) if r["kernel"] == kernel and r["status"] == "ok"]
    assert len(rows) >= 1000
    splits = 0
    for r in rows:
        bm, bn, bk = (int(x) for x in r["config"].split()[0].split("x"))
        split = r["grid_ctas"] // (out_tiles(r, bn, bk) * math.ceil(r["M"] / bm))
        splits += split > 1
        spec = launches.FORMATS[r["fmt"]]
        fmt = h.format_class(spec.get("bits", 4), spec.get("fmt") == "nf4", spec.get("group_size"))
        ratio = r["tensor_peak_opt"] / r["dram_peak_opt"]
        got = getattr(h, cap)(r["M"], r["N"], r["K"], fmt, bm, bn, bk, split, arch)
        assert got == pytest.approx((ratio + ratio / (1 + ratio)) / 2, rel=0.01), (r["case"], r["config"], split)
    assert splits >= min_splits  # the split launches' workspace is what the cap is for


@pytest.fixture
def device_lists(monkeypatch):
    """config.py's GPU candidate lists even under the interpreter (the rules' caches cleared around)."""
    from qlk.kernels import config

    def clear():
        h._choose_default.cache_clear()
        h.choose_path.cache_clear()
        h.choose_fused.cache_clear()

    clear()
    monkeypatch.setattr(config, "INTERPRETED", False)
    yield
    clear()


def test_committed_sweeps_have_no_spills():
    """Issue 17's "0 spills everywhere" on what is committed: no qlk launch of any committed static
    report or sweep (bench/results/static-*-sm*.csv: the main report, the family, extra, odd, other,
    SmolLM2 and QA-LoRA odd-M sweeps; the MoE reports in tests/test_moe_static.py) has a stack frame
    or LDL/STL. Every candidate the launchers list is compiled there, not only the chosen one."""
    import glob

    paths = [p for p in glob.glob(os.path.join(ROOT, "bench", "results", "static-*sm*.csv")) if "moe" not in p]
    assert len(paths) >= 14, paths
    bad = []
    for p in paths:
        for r in sr.read_csv(p):
            if r.get("group") == "qlk" and r.get("status") == "ok" and (r.get("stack") or r.get("spill_ops")):
                bad.append((os.path.basename(p), r["case"], r["kernel"], r["config"], r["stack"]))
    assert not bad, bad[:10]


#: committed reports whose tables are a historical record, not re-rendered with the rules of the
#: day (none since round 26 re-ran family6, round 2's "after" run, on the code of the day)
HISTORICAL_REPORTS: set = set()


def _tables(md_text: str) -> str:
    """A report's tables: everything from the summary's heading on (the header's run lines differ)."""
    return md_text[md_text.index("## Summary"):]


def test_committed_reports_are_what_their_csvs_and_the_rules_render(tmp_path):
    """Every committed static report's markdown tables (the summary and the per-shape table) are
    exactly what ``bench/static_report.py --render`` makes of its CSV with qlk's rules as they are
    now: a rules change, or a CSV re-swept in part, that was not re-rendered leaves the .md stale
    and fails here (fix: ``python bench/static_report.py --render bench/results/static-*-sm*.csv``)."""
    import glob
    import shutil

    paths = [p for p in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "static-*sm*.csv")))
             if "moe" not in p and os.path.basename(p) not in HISTORICAL_REPORTS]
    assert len(paths) >= 14, paths
    stale = []
    for p in paths:
        copy = tmp_path / os.path.basename(p)
        shutil.copy(p, copy)
        md = os.path.splitext(p)[0] + ".md"
        shutil.copy(md, os.path.splitext(copy)[0] + ".md")
        with open(md) as f:
            committed = _tables(f.read())
        with open(sr.render(str(copy))) as f:
            rendered = _tables(f.read())
        if rendered != committed:
            stale.append(os.path.basename(md))
    assert not stale, f"stale report tables (re-render them): {stale}"


def test_merge_replaces_the_partial_sweeps_cases(tmp_path):
    """``--merge`` (a partial re-sweep into a committed report): every case of the partial CSV replaces
    that case's rows where they were, the other cases stay byte for byte, a new case is appended, and
    a CSV of the other arch is refused."""
    import shutil

    into = tmp_path / "static-x-sm90.csv"
    shutil.copy(SWEEP[90], into)
    old = sr.read_csv(str(into))
    case = "dgrad/int4g32/4096->14336/M16"
    partial = [dict(r, dram_peak_opt=0.123) for r in old if r["case"] == case]
    partial.append(dict(partial[0], case="dgrad/int4g32/4096->14336/M17"))
    part = tmp_path / "partial-sm90.csv"
    sr.write_csv(str(part), partial)
    assert sr.merge(str(into), str(part)) == (1, 1)
    new = sr.read_csv(str(into))
    assert [r["case"] for r in new[:-1]] == [r["case"] for r in old]
    assert [r for r in new if r["case"] != case][:-1] == [r for r in old if r["case"] != case]
    assert {r["dram_peak_opt"] for r in new if r["case"] == case} == {0.123}
    assert new[-1]["case"].endswith("M17")
    # a partial run without the dense baselines: the ratios from the report's own baseline rows
    keep = {r["case"]: r for r in new if r["case"] == case and r["best"] and r["x_dense_fused"]}
    assert keep
    bare = [dict(r, x_dense_fused=None, x_dense=None, dispatch=None) for r in new if r["case"] == case]
    sr.write_csv(str(part), bare)
    assert sr.merge(str(into), str(part)) == (1, 0)
    again = {r["case"]: r for r in sr.read_csv(str(into)) if r["case"] == case and r["best"] and r["x_dense_fused"]}
    dense = next(r for r in new if r["case"] == "dense-dgrad/bf16/4096->14336/M16" and r["best"])
    g = __import__("bench.sass", fromlist=["gpu"]).gpu(90)
    t_dense = dense["useful_bytes"] / ((dense["dram_peak_opt"] + dense["dram_peak_pess"]) / 2 * g.dram_bytes_per_s)
    t_dense += sr.split_passes_time(dense, g)
    mine = again[case]
    t_mine = mine["useful_bytes"] / ((mine["dram_peak_opt"] + mine["dram_peak_pess"]) / 2 * g.dram_bytes_per_s)
    t_mine += sr.split_passes_time(mine, g)
    assert mine["x_dense_fused"] == pytest.approx(t_dense / t_mine, rel=1e-3) and mine["dispatch"] == "fused"
    other = tmp_path / "other-sm80.csv"
    shutil.copy(SWEEP[80], other)
    with pytest.raises(SystemExit, match="different archs"):
        sr.merge(str(into), str(other))


def test_summary_cells_show_what_the_dispatcher_runs():
    """The summary's qlk cell at a shape where the rules run the split-K kernel (16 < M <= 128) is that
    kernel's estimate and the per-shape table's time ratio, tagged, not the GEMM's (which does not
    run there: 0.35x dense at 2048->512 M = 64 on sm_90, where split-K is 3.89x)."""
    rows = sr.read_csv(SWEEP[90])
    res = {d["case"]: d for d in sr.rules_check(rows, 90)}
    d = res["fwd/int4g32/2048->512/M64"]
    assert d["chosen"].startswith("splitk ") and d["path"] == "fused"
    lines = sr._summary(rows, res)
    row = next(line for line in lines if line.startswith("| fwd | 2048→512 | 64 |"))
    cell = row.split(" | ")[5]  # op, K→N, M, metric, dense bf16, qlk int4g32
    hi, lo = d["estimate"]
    assert cell == f"{hi:.2f}..{lo:.2f} ({d['x_dense']:.2f}× splitk)", cell
    assert d["x_dense"] >= 0.9
    # without the rules' results the cell is the case's own kernel (the GEMM) as before
    plain = next(line for line in sr._summary(rows) if line.startswith("| fwd | 2048→512 | 64 |"))
    assert "splitk" not in plain

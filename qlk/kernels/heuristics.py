"""Which tile each kernel launches with, and whether a layer runs fused or dequantize-then-GEMM:
explicit rules from the shape, the format, the architecture and the SM count. No timing.

Why rules and not ``triton.autotune``: the autotuner times every candidate at the first call of
each shape and keeps the fastest of that one noisy measurement; with several candidates within a
few percent of each other it keeps a different one from run to run, and its pick cannot be
checked without a GPU. The rules below are pure functions (no CUDA, no driver), so the static
report (bench/static_report.py) can show the chosen config next to the analyzer's best one for
every case, and the tests can pin them down.

**Tile rule** (:func:`choose_config`). Each candidate of the op's list (:mod:`qlk.kernels.config`)
that is meant for this architecture and fits (shared memory of its pipelined buffers within the
CTA limit, accumulator ≤ 128 fp32 registers per thread; with QA-LoRA's pooling ≤ one column per
thread, with its fp32 biases ≤ 128 split-N rows) gets a score, the highest wins (ties: fewer
CTAs, then the earlier candidate in the list)::

    score = tile_eff × sm_balance × fill

* ``sm_balance = CTAs / (SMs · ⌈CTAs / SMs⌉)``: the share of the run the average SM is as busy as
  the busiest one (throughput is per SM, so CTAs resident together share it; a 64-CTA grid on
  132 SMs keeps the GPU 48 % busy whatever the tile). The static analyzer scales its estimates by
  the same factor (docs/static-analysis.md).
* ``fill = M·N / (M_padded·N_padded)``: the share of the computed tile area that is output (M = 333
  on 256-row tiles computes 512 rows).
* ``tile_eff`` (GEMMs): a two-term model of the main loop per K step. The MMA does R·C·BK
  multiply-adds (R: rows of the MMA's A operand, the weight tile: BLOCK_N forward, BLOCK_K input
  gradient; C = BLOCK_M); the dequantization costs R·BK·dup·d instructions, where ``dup`` is how
  many warps (sm_80, mma.sync: one warp per 64 weight rows, the rest share rows and dequantize
  them again) or warpgroups (sm_90, wgmma: 64 rows each) hold the same weight rows, and ``d`` the
  format's cost per element relative to INT4 (:data:`FORMAT_COST`). With overlap (optimistic)
  ``min(1, C / (c_opt·dup·d))``, without (pessimistic) ``1 / (1 + a + c_pess·dup·d / C)``;
  tile_eff is the midpoint. The constants (:data:`ARCH`) are fitted to the analyzer's INT4
  estimates of the round-1 tiles at a full-wave shape (4096→14336, M = 4096): sm_90 256×128 w8
  0.97..0.62 and 128×128 w8 0.90..0.47; sm_80 128×256 w8 0.97..0.49 and 128×128 w8 0.44..0.30.
  The input gradient's Ŵᵀ tile costs ``grad_cost`` times more on sm_90 (its transposition goes
  through shared memory; 256×64×128 w8 0.81..0.44), as much on sm_80 (128×32×128 w8 0.48..0.32).
  A one-warpgroup CTA on sm_90 pays ``a_single`` more (nothing overlaps its dequantization with
  another group's MMA: 256×64 w4 0.97..0.57 against 256×128 w8 0.97..0.62, round 2's candidates
  at the same shape). Equal scores: the bigger tile (fewer CTAs), then the earlier candidate.
  Refitted after the round-2 kernels (one static report, 4096→14336, M = 4096): NF4 + double quant
  forward 0.97..0.64 on sm_90 (the INT4 level: ``FORMAT_COST["nf4"]`` 2.9 → 1.0); the input
  gradient's pre-rounded transposed tile 256×64×128 w8 0.97..0.59 on sm_90 (``grad_cost`` 2.0 →
  1.1) and 256×32×128 w8 0.95..0.54 on sm_80 (1.0 → 0.7).
* split kernels (M ≤ 16, DRAM-bound): the split count is the launchers' rule (≈ 16 CTAs per SM,
  at most one slice per tile), ``tile_eff = e / (e + 4096)`` with e = BLOCK_N·BLOCK_K weight
  elements per step (longer steps amortize the loop's fixed cost and keep more bytes in flight:
  64×256 0.80 vs 64×128 0.67, the analyzer's 0.67 vs 0.57 at M = 1).

The rule is generic: any candidate list works (a new tile is scored by the same formulas). What it
cannot see (spills, a compiler's layout conversion) the static report shows: its ``chosen`` column
against the analyzer's ``best``.

**Round 3 (calibrated tile efficiency).** The two-term model ranks tiles of one shape right but
misjudges some pairs by up to 25 % (sm_90 input gradient 128×64×128 w8 against 256×64×64 w8: the
model has them equal, the analyzer 0.52 against 0.67 for INT3; sm_80 split-N 16×64 against
16×128). The analyzer's estimate of a candidate factors, to ±0.01 at every M > 16 and every shape
of the sweep, into a per-(arch, op, format, tile) constant × SM balance × fill, so
``tile_eff`` is now that constant where :data:`CALIBRATION` has it (fitted from the committed
sweep by ``bench/static_report.py --fit-rules``; the model stays the fallback for a tile without
an entry). Split kernels: ``fill`` is the busy share of the split, and :func:`split_count`
leaves no slice idle. Between 16 < M ≤ :data:`SPLIT_MAX_M` the split kernels are weighed against
the GEMMs (:func:`choose_fused`, by :func:`fused_time`), and at M = 1 the input gradient's FMA
kernel against split-N (:func:`choose_m1_grad`). The path rule's dequantize and dense terms are
fitted the same way (:data:`DEQUANT_EFF`, :data:`DENSE_SMALL_EFF`).

**Round 5.** The GEMM input gradient splits its reduction over N where its dX tiles leave SMs idle
(mid M, narrow K; :func:`grad_split`): the split is a launch parameter of the same candidate (its
label and calibration unchanged), its busy share joins ``fill``.

**Round 6.** The split kernels' count knows how many CTAs of the candidate an SM holds at once
(:data:`RESIDENT`, fitted from the sweep's occupancy): among the counts that leave no slice empty
and keep the SM balance × busy share of the ≈ 16-per-SM count, :func:`occupancy_split` takes the
one whose grid fills the resident slots in the closest to whole waves (sm_90 4096→14336: 16
slices instead of 8, slot wave 0.85 → 0.97; 14336→4096: 8 instead of 28, one wave).

**Round 6.** The forward GEMM splits its K loop the same way where its output tiles leave SMs idle
or fill the last wave badly (M > :data:`SPLIT_MAX_M`; :func:`fwd_split`, slices of whole groups and
K tiles, :func:`fwd_slices`). Its busy share and the share of the time left to the GEMM by the
launcher's workspace passes (:func:`fwd_split_share`, a DRAM roofline of what the analyzer does not
see) join ``fill``; a tile keeps its split only if that still beats its unsplit launch.

**Round 6** (the input gradient at mid M, docs/kernels.md "Input gradient, mid M waves (round 6)").
A GEMM input-gradient tile's efficiency is capped by its DRAM roofline (:func:`grad_dram_cap`: the
split's fp32 partials, which the unsplit fit does not see); :func:`grad_split` also proposes a
split when the dX tiles fill the SMs but leave a short last wave; and a split launch is charged
for its workspace's passes outside the kernel (:func:`grad_workspace_share`: zeroing and the cast
into dX) and must beat the unsplit launch of the same tile by :data:`GRAD_SPLIT_MARGIN`. Split
variants that spill (:func:`grad_split_spills`) are not proposed.

**Round 8** (16 < M ≤ 128, the split kernel against the GEMM). The split kernel's time over its
M tiles is ``per_tile · T + shared`` tiles' worth, per candidate (:data:`SPLIT_MID_M`,
:func:`split_mid_tiles`: the tiles after the first re-read the weight's slice through L2), and the
split kernels' tile there is the one of least such time; the GEMM's MAC time is scaled by
:data:`GEMM_MID_M` (the analyzer judges these launches by their DRAM time); both fitted from the
sweep by ``bench/static_report.py --fit-rules``. The grouped (MoE) input gradient's resident CTAs
are per kernel variant (:data:`GROUPED_RESIDENT`: slot loop or a program row per slot). Round 29: a
split kernel's M tile holds M / T rows, not 16, and split-N's dY and partial rows cost
:data:`SPLIT_ROW_COST` of a weight byte (fitted with the lines); each input-gradient GEMM tile
has its own mid-M factor (:data:`GEMM_MID_TILE`) on top of its format's. Rounds 32-33: a split
kernel's launch of one slice stores its output itself (:func:`split_direct`: no workspace, no
passes), and at 16 < M ≤ 128 a split candidate (split-K since round 33, split-N since round 34)
runs the occupancy count's slices or one slice, whichever :func:`fused_time` finds faster (the
passes a split costs against the SM balance it buys).

Also round 8 (docs/kernels.md "Round 8: the last mid-M input gradients under 0.9× dense"): an
input-gradient candidate may serve some formats only (:data:`GRAD_CANDIDATE_FORMATS`) and may
have to outscore the others by a margin to be chosen (:data:`GRAD_CANDIDATE_MARGIN`, ranking only).

**Round 14**: a split kernel's candidate whose reduction step is wider than the whole reduction
is scored at the share of the step that holds data (:func:`short_reduction_fill`).

**Path rule** (:func:`choose_path`): at M > 16, the fused kernel or dequantize (Ŵ written once
in the activation dtype, :mod:`qlk.kernels.dequant`) then a dense GEMM, whichever the static model
says is faster::

    t_fused   = MACs / (peak · score_fused)          (split kernels: ⌈M/16⌉ · packed / (DRAM · score))
    t_dequant = bytes(packed Ŵ + scales + Ŵ written) / (DRAM · e_deq · balance)
                + MACs / (peak · score_dense)        (M ≤ 64: the dense split-K tile's bytes / (DRAM · e · balance))

with score_* the tile rule's best score for the fused candidates and for the dense GEMM's tiles
(:data:`DENSE_TILES`, the bf16 Triton baseline's analyzer estimates standing in for cuBLAS).
At M ≤ 16 the fused split kernels always win (the dequantize path moves ≥ 8× the bytes: 2 B
written and 2 B read per weight against ≤ 0.5 B), so the rule is not consulted there.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

from . import config as _config

OPS = ("fwd", "grad", "splitk", "splitn")

#: dequantization cost per weight element relative to INT4, fitted like the constants below
#: (4096→14336, M = 4096, sm_90 forward: INT3 0.97..0.55; NF4 + double quant 0.97..0.64 since its
#: round-2 warp-shuffle lookup and launch-time de-nesting, 0.63..0.38 and a cost of 2.9 before)
FORMAT_COST = {"int2": 1.0, "int4": 1.0, "int3": 1.35, "int8": 1.0, "nf4": 1.0}


@dataclasses.dataclass(frozen=True)
class ArchModel:
    """Per-architecture constants of the tile model (module docstring) and the GPU's peak rates."""

    rows_per_mma_unit: int  # weight rows one warp (mma.sync) / one warpgroup (wgmma) covers
    warps_per_mma_unit: int  # 1: mma.sync; 4: a wgmma warpgroup
    c_opt: float
    c_pess: float
    a_pess: float
    a_single: float  # extra pessimistic cost of a CTA with one MMA unit (sm_90: one warpgroup)
    grad_cost: float  # the input gradient's dequantization cost relative to the forward's (Ŵᵀ as A)
    macs_per_s: float  # dense 16-bit tensor-core multiply-adds per second (datasheet)
    dram_bytes_per_s: float  # 90 % of the datasheet bandwidth


ARCH = {
    90: ArchModel(64, 4, c_opt=139.0, c_pess=127.0, a_pess=0.09, a_single=0.1, grad_cost=1.1, macs_per_s=989e12 / 2, dram_bytes_per_s=0.9 * 3.35e12),
    80: ArchModel(64, 1, c_opt=64.0, c_pess=70.0, a_pess=0.0, a_single=0.0, grad_cost=0.7, macs_per_s=312e12 / 2, dram_bytes_per_s=0.9 * 2.04e12),
}
DEFAULT_SMS = {90: 132, 80: 108}

#: the dense bf16 GEMM's tiles (bench/dense_matmul.py) as (BLOCK_M, BLOCK_N, warps) -> its
#: analyzer estimate at a full-wave shape, sm_90 / sm_80, divided by that shape's sm_balance
DENSE_TILES = {  # round 3: refitted to the rules' sweep (midpoints 0.85 / 0.82 / 0.77 and 0.79 / 0.78 / 0.67)
    90: {(128, 256, 8): (1.0, 0.70), (128, 128, 4): (1.0, 0.64), (64, 128, 4): (1.0, 0.54)},
    80: {(128, 256, 8): (1.0, 0.59), (128, 128, 4): (1.0, 0.57), (64, 128, 4): (0.88, 0.46),
         # round 10: round 9's two-warp tiles of the dense baseline (medians over the family sweep,
         # M >= 256: 1.0 / 0.53 both), which the path rule had not been told about
         (64, 128, 2): (1.0, 0.53), (128, 64, 2): (1.0, 0.53)},
}
#: share of the DRAM bandwidth the standalone dequantize kernel is assumed to reach (fallback for
#: a format without a :data:`DEQUANT_EFF` entry)
DEQUANT_DRAM_SHARE = 0.8

#: Round 3: the analyzer's own estimate of each candidate, fitted once from the rules' sweep
#: (``python bench/static_report.py --fit-rules bench/results/static-family-sm90.csv
#: bench/results/static-family-sm80.csv``; every candidate compiled at the 12 Llama-family layer
#: shapes x M in {1, 16, 64, 333, 2048, 8192} x INT4 g32/g128, INT3 g128, INT2 g32, NF4-DQ; since round
#: 31 also the INT rows of bench/results/static-family-formats-sm*.csv, the same shapes at INT4 g64,
#: INT3 g32/g64 and INT2 g64/g128, so every INT class of g32/g64/g128 has entries of its own and the
#: per-width entries, which other group sizes take, pool them):
#: (arch family, op, format class) -> {candidate label: efficiency}. GEMMs: the tensor fraction's
#: midpoint over the SM balance (the same at every M > 16 and every shape to ±0.01, except 2048→512
#: where short K loops lose ~5 %); split kernels: the DRAM fraction's midpoint over the SM balance
#: and over the busy share of the split (median over the shapes; ±25 %: the DRAM fraction also
#: depends on how many steps each slice runs). A candidate without an entry is scored by the
#: two-term model below, so a new tile still gets a sensible rank until the table is refitted.
CALIBRATION = {
    (80, 'fwd', 'int2'): {'128x128x32 w4 s4': 0.806, '128x128x32 w8 s4': 0.639, '128x256x32 w8 s3': 0.807, '128x64x32 w2 s4': 0.784, '64x128x32 w2 s4': 0.802, '64x128x32 w4 s4': 0.686},
    (80, 'fwd', 'int2g128'): {'128x128x32 w4 s4': 0.806, '128x128x32 w8 s4': 0.639, '128x256x32 w8 s3': 0.807, '128x64x32 w2 s4': 0.784, '64x128x32 w2 s4': 0.802, '64x128x32 w4 s4': 0.686},
    (80, 'fwd', 'int2g32'): {'128x128x32 w4 s4': 0.806, '128x128x32 w8 s4': 0.643, '128x256x32 w8 s3': 0.808, '128x64x32 w2 s4': 0.784, '64x128x32 w2 s4': 0.802, '64x128x32 w4 s4': 0.69},
    (80, 'fwd', 'int2g64'): {'128x128x32 w4 s4': 0.806, '128x128x32 w8 s4': 0.639, '128x256x32 w8 s3': 0.807, '128x64x32 w2 s4': 0.784, '64x128x32 w2 s4': 0.802, '64x128x32 w4 s4': 0.686},
    (80, 'fwd', 'int3'): {'128x128x32 w4 s4': 0.786, '128x128x32 w8 s4': 0.556, '128x256x32 w8 s3': 0.788, '128x64x32 w2 s4': 0.774, '64x128x32 w2 s4': 0.783, '64x128x32 w4 s4': 0.588},
    (80, 'fwd', 'int3g128'): {'128x128x32 w4 s4': 0.786, '128x128x32 w8 s4': 0.556, '128x256x32 w8 s3': 0.788, '128x64x32 w2 s4': 0.774, '64x128x32 w2 s4': 0.783, '64x128x32 w4 s4': 0.588},
    (80, 'fwd', 'int3g32'): {'128x128x32 w4 s4': 0.786, '128x128x32 w8 s4': 0.556, '128x256x32 w8 s3': 0.788, '128x64x32 w2 s4': 0.774, '64x128x32 w2 s4': 0.784, '64x128x32 w4 s4': 0.588},
    (80, 'fwd', 'int3g64'): {'128x128x32 w4 s4': 0.786, '128x128x32 w8 s4': 0.556, '128x256x32 w8 s3': 0.788, '128x64x32 w2 s4': 0.774, '64x128x32 w2 s4': 0.783, '64x128x32 w4 s4': 0.588},
    (80, 'fwd', 'int4'): {'128x128x32 w4 s4': 0.803, '128x128x32 w8 s4': 0.666, '128x256x32 w8 s3': 0.805, '128x64x32 w2 s4': 0.792, '64x128x32 w2 s4': 0.8, '64x128x32 w4 s4': 0.717},
    (80, 'fwd', 'int4g128'): {'128x128x32 w4 s4': 0.803, '128x128x32 w8 s4': 0.666, '128x256x32 w8 s3': 0.805, '128x64x32 w2 s4': 0.792, '64x128x32 w2 s4': 0.8, '64x128x32 w4 s4': 0.717},
    (80, 'fwd', 'int4g32'): {'128x128x32 w4 s4': 0.803, '128x128x32 w8 s4': 0.67, '128x256x32 w8 s3': 0.806, '128x64x32 w2 s4': 0.792, '64x128x32 w2 s4': 0.801, '64x128x32 w4 s4': 0.722},
    (80, 'fwd', 'int4g64'): {'128x128x32 w4 s4': 0.803, '128x128x32 w8 s4': 0.666, '128x256x32 w8 s3': 0.805, '128x64x32 w2 s4': 0.792, '64x128x32 w2 s4': 0.8, '64x128x32 w4 s4': 0.717},
    (80, 'fwd', 'nf4'): {'128x128x32 w4 s4': 0.786, '128x128x32 w8 s4': 0.68, '128x256x32 w8 s3': 0.796, '128x64x32 w2 s4': 0.767, '64x128x32 w2 s4': 0.779, '64x128x32 w4 s4': 0.68},
    (80, 'gemv', 'int2'): {'32x256 w4 s3': 0.194, '64x128 w4 s3': 0.169},
    (80, 'gemv', 'int2g128'): {'32x256 w4 s3': 0.194, '64x128 w4 s3': 0.152},
    (80, 'gemv', 'int2g32'): {'32x256 w4 s3': 0.198, '64x128 w4 s3': 0.198},
    (80, 'gemv', 'int2g64'): {'32x256 w4 s3': 0.169, '64x128 w4 s3': 0.169},
    (80, 'gemv', 'int3'): {'32x256 w4 s3': 0.214, '64x128 w4 s3': 0.191},
    (80, 'gemv', 'int3g128'): {'32x256 w4 s3': 0.226, '64x128 w4 s3': 0.182},
    (80, 'gemv', 'int3g32'): {'32x256 w4 s3': 0.214, '64x128 w4 s3': 0.214},
    (80, 'gemv', 'int3g64'): {'32x256 w4 s3': 0.191, '64x128 w4 s3': 0.191},
    (80, 'gemv', 'int4'): {'32x256 w4 s3': 0.309, '64x128 w4 s3': 0.302},
    (80, 'gemv', 'int4g128'): {'32x256 w4 s3': 0.343},
    (80, 'gemv', 'int4g32'): {'32x256 w4 s3': 0.311, '64x128 w4 s3': 0.31},
    (80, 'gemv', 'int4g64'): {'32x256 w4 s3': 0.285, '64x128 w4 s3': 0.284},
    (80, 'gemv', 'nf4'): {'32x256 w4 s3': 0.329, '64x128 w4 s3': 0.328},
    (80, 'grad', 'int2'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int2g128'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int2g32'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int2g64'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int3'): {'128x32x128 w4 s3': 0.69, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.631, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.659},
    (80, 'grad', 'int3g128'): {'128x32x128 w4 s3': 0.688, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.629, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.663},
    (80, 'grad', 'int3g32'): {'128x32x128 w4 s3': 0.69, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.631, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.653},
    (80, 'grad', 'int3g64'): {'128x32x128 w4 s3': 0.69, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.631, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.659},
    (80, 'grad', 'int4'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int4g128'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int4g32'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'int4g64'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'grad', 'nf4'): {'128x32x128 w4 s3': 0.782, '128x32x128 w8 s3': 0.722, '128x64x64 w4 s3': 0.668, '256x32x128 w8 s3': 0.792, '64x32x128 w4 s3': 0.657, '64x64x128 w2 s3': 0.765, '64x64x128 w4 s3': 0.668},
    (80, 'splitk', 'int2'): {'16x64x128 w4 s4': 0.673, '16x64x256 w2 s3': 0.781, '16x64x256 w4 s3': 0.752},
    (80, 'splitk', 'int2g128'): {'16x64x128 w4 s4': 0.633, '16x64x256 w2 s3': 0.769, '16x64x256 w4 s3': 0.701},
    (80, 'splitk', 'int2g32'): {'16x64x128 w4 s4': 0.753, '16x64x256 w2 s3': 0.79, '16x64x256 w4 s3': 0.77},
    (80, 'splitk', 'int2g64'): {'16x64x128 w4 s4': 0.655, '16x64x256 w2 s3': 0.776, '16x64x256 w4 s3': 0.75},
    (80, 'splitk', 'int3'): {'16x64x128 w4 s4': 0.745, '16x64x256 w2 s3': 0.781, '16x64x256 w4 s3': 0.765},
    (80, 'splitk', 'int3g128'): {'16x64x128 w4 s4': 0.701, '16x64x256 w2 s3': 0.77, '16x64x256 w4 s3': 0.752},
    (80, 'splitk', 'int3g32'): {'16x64x128 w4 s4': 0.767, '16x64x256 w2 s3': 0.795, '16x64x256 w4 s3': 0.778},
    (80, 'splitk', 'int3g64'): {'16x64x128 w4 s4': 0.739, '16x64x256 w2 s3': 0.778, '16x64x256 w4 s3': 0.763},
    (80, 'splitk', 'int4'): {'16x64x128 w4 s4': 0.804, '16x64x256 w2 s3': 0.836, '16x64x256 w4 s3': 0.808},
    (80, 'splitk', 'int4g128'): {'16x64x128 w4 s4': 0.801, '16x64x256 w2 s3': 0.831, '16x64x256 w4 s3': 0.803},
    (80, 'splitk', 'int4g32'): {'16x64x128 w4 s4': 0.808, '16x64x256 w2 s3': 0.839, '16x64x256 w4 s3': 0.811},
    (80, 'splitk', 'int4g64'): {'16x64x128 w4 s4': 0.8, '16x64x256 w2 s3': 0.834, '16x64x256 w4 s3': 0.808},
    (80, 'splitk', 'nf4'): {'16x64x128 w4 s4': 0.757, '16x64x256 w2 s3': 0.772, '16x64x256 w4 s3': 0.767},
    (80, 'splitn', 'int2'): {'16x128x128 w4 s3': 0.505, '16x256x64 w4 s3': 0.428, '16x64x128 w2 s3': 0.544, '16x64x128 w4 s4': 0.505},
    (80, 'splitn', 'int2g128'): {'16x128x128 w4 s3': 0.451, '16x256x64 w4 s3': 0.381, '16x64x128 w2 s3': 0.486, '16x64x128 w4 s4': 0.438},
    (80, 'splitn', 'int2g32'): {'16x128x128 w4 s3': 0.547, '16x256x64 w4 s3': 0.466, '16x64x128 w2 s3': 0.588, '16x64x128 w4 s4': 0.525},
    (80, 'splitn', 'int2g64'): {'16x128x128 w4 s3': 0.482, '16x256x64 w4 s3': 0.415, '16x64x128 w2 s3': 0.518},
    (80, 'splitn', 'int3'): {'16x128x128 w4 s3': 0.631, '16x256x64 w4 s3': 0.541, '16x64x128 w2 s3': 0.676, '16x64x128 w4 s4': 0.613},
    (80, 'splitn', 'int3g128'): {'16x128x128 w4 s3': 0.583, '16x256x64 w4 s3': 0.497, '16x64x128 w2 s3': 0.626, '16x64x128 w4 s4': 0.567},
    (80, 'splitn', 'int3g32'): {'16x128x128 w4 s3': 0.665, '16x256x64 w4 s3': 0.572, '16x64x128 w2 s3': 0.71, '16x64x128 w4 s4': 0.648},
    (80, 'splitn', 'int3g64'): {'16x128x128 w4 s3': 0.607, '16x256x64 w4 s3': 0.528, '16x64x128 w2 s3': 0.65, '16x64x128 w4 s4': 0.589},
    (80, 'splitn', 'int4'): {'16x128x128 w4 s3': 0.741, '16x256x64 w4 s3': 0.641, '16x64x128 w2 s3': 0.758, '16x64x128 w4 s4': 0.721},
    (80, 'splitn', 'int4g128'): {'16x128x128 w4 s3': 0.698, '16x256x64 w4 s3': 0.6, '16x64x128 w2 s3': 0.746, '16x64x128 w4 s4': 0.683},
    (80, 'splitn', 'int4g32'): {'16x128x128 w4 s3': 0.755, '16x256x64 w4 s3': 0.666, '16x64x128 w2 s3': 0.763, '16x64x128 w4 s4': 0.74},
    (80, 'splitn', 'int4g64'): {'16x128x128 w4 s3': 0.719, '16x256x64 w4 s3': 0.629, '16x64x128 w2 s3': 0.753, '16x64x128 w4 s4': 0.698},
    (80, 'splitn', 'nf4'): {'16x128x128 w4 s3': 0.671, '16x256x64 w4 s3': 0.579, '16x64x128 w2 s3': 0.716, '16x64x128 w4 s4': 0.649},
    (90, 'fwd', 'int2'): {'128x128x64 w8 s4': 0.786, '128x64x64 w4 s4': 0.779, '256x128x64 w8 s3': 0.854, '256x64x64 w4 s3': 0.806, '64x128x128 w4 s4': 0.768, '64x128x64 w4 s4': 0.754},
    (90, 'fwd', 'int2g128'): {'128x128x64 w8 s4': 0.786, '128x64x64 w4 s4': 0.779, '256x128x64 w8 s3': 0.854, '256x64x64 w4 s3': 0.806, '64x128x128 w4 s4': 0.771, '64x128x64 w4 s4': 0.754},
    (90, 'fwd', 'int2g32'): {'128x128x64 w8 s4': 0.777, '128x64x64 w4 s4': 0.771, '256x128x64 w8 s3': 0.844, '256x64x64 w4 s3': 0.799, '64x128x128 w4 s4': 0.766, '64x128x64 w4 s4': 0.754},
    (90, 'fwd', 'int2g64'): {'128x128x64 w8 s4': 0.787, '128x64x64 w4 s4': 0.781, '256x128x64 w8 s3': 0.854, '256x64x64 w4 s3': 0.806, '64x128x128 w4 s4': 0.768, '64x128x64 w4 s4': 0.755},
    (90, 'fwd', 'int3'): {'128x128x64 w8 s4': 0.768, '128x64x64 w4 s4': 0.762, '256x128x64 w8 s3': 0.843, '256x64x64 w4 s3': 0.799, '64x128x128 w4 s4': 0.726, '64x128x64 w4 s4': 0.573},
    (90, 'fwd', 'int3g128'): {'128x128x64 w8 s4': 0.768, '128x64x64 w4 s4': 0.762, '256x128x64 w8 s3': 0.843, '256x64x64 w4 s3': 0.799, '64x128x128 w4 s4': 0.731, '64x128x64 w4 s4': 0.571},
    (90, 'fwd', 'int3g32'): {'128x128x64 w8 s4': 0.762, '128x64x64 w4 s4': 0.758, '256x128x64 w8 s3': 0.835, '256x64x64 w4 s3': 0.792, '64x128x128 w4 s4': 0.717, '64x128x64 w4 s4': 0.573},
    (90, 'fwd', 'int3g64'): {'128x128x64 w8 s4': 0.769, '128x64x64 w4 s4': 0.763, '256x128x64 w8 s3': 0.844, '256x64x64 w4 s3': 0.799, '64x128x128 w4 s4': 0.726, '64x128x64 w4 s4': 0.574},
    (90, 'fwd', 'int4'): {'128x128x64 w8 s4': 0.78, '128x64x64 w4 s4': 0.76, '256x128x64 w8 s3': 0.835, '256x64x64 w4 s3': 0.792, '64x128x128 w4 s4': 0.766, '64x128x64 w4 s4': 0.752},
    (90, 'fwd', 'int4g128'): {'128x128x64 w8 s4': 0.781, '128x64x64 w4 s4': 0.76, '256x128x64 w8 s3': 0.835, '256x64x64 w4 s3': 0.792, '64x128x128 w4 s4': 0.769, '64x128x64 w4 s4': 0.752},
    (90, 'fwd', 'int4g32'): {'128x128x64 w8 s4': 0.776, '128x64x64 w4 s4': 0.75, '256x128x64 w8 s3': 0.827, '256x64x64 w4 s3': 0.786, '64x128x128 w4 s4': 0.762, '64x128x64 w4 s4': 0.743},
    (90, 'fwd', 'int4g64'): {'128x128x64 w8 s4': 0.782, '128x64x64 w4 s4': 0.76, '256x128x64 w8 s3': 0.835, '256x64x64 w4 s3': 0.792, '64x128x128 w4 s4': 0.766, '64x128x64 w4 s4': 0.754},
    (90, 'fwd', 'nf4'): {'128x128x64 w8 s4': 0.778, '128x64x64 w4 s4': 0.754, '256x128x64 w8 s3': 0.83, '256x64x64 w4 s3': 0.788, '64x128x128 w4 s4': 0.731, '64x128x64 w4 s4': 0.632},
    (90, 'gemv', 'int2'): {'32x256 w4 s3': 0.186, '64x128 w4 s3': 0.163},
    (90, 'gemv', 'int2g128'): {'32x256 w4 s3': 0.186, '64x128 w4 s3': 0.15},
    (90, 'gemv', 'int2g32'): {'32x256 w4 s3': 0.192, '64x128 w4 s3': 0.192},
    (90, 'gemv', 'int2g64'): {'32x256 w4 s3': 0.163, '64x128 w4 s3': 0.163},
    (90, 'gemv', 'int3'): {'32x256 w4 s3': 0.207, '64x128 w4 s3': 0.184},
    (90, 'gemv', 'int3g128'): {'32x256 w4 s3': 0.218, '64x128 w4 s3': 0.178},
    (90, 'gemv', 'int3g32'): {'32x256 w4 s3': 0.207, '64x128 w4 s3': 0.207},
    (90, 'gemv', 'int3g64'): {'32x256 w4 s3': 0.184, '64x128 w4 s3': 0.184},
    (90, 'gemv', 'int4'): {'32x256 w4 s3': 0.3, '64x128 w4 s3': 0.275},
    (90, 'gemv', 'int4g128'): {'32x256 w4 s3': 0.332, '64x128 w4 s3': 0.263},
    (90, 'gemv', 'int4g32'): {'32x256 w4 s3': 0.3, '64x128 w4 s3': 0.3},
    (90, 'gemv', 'int4g64'): {'32x256 w4 s3': 0.275, '64x128 w4 s3': 0.275},
    (90, 'gemv', 'nf4'): {'32x256 w4 s3': 0.317, '64x128 w4 s3': 0.317},
    (90, 'grad', 'int2'): {'128x128x64 w4 s4': 0.777, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.769, '64x32x64 w4 s4': 0.524, '64x64x128 w4 s4': 0.769},
    (90, 'grad', 'int2g128'): {'128x128x64 w4 s4': 0.777, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.773, '64x32x64 w4 s4': 0.524, '64x64x128 w4 s4': 0.769},
    (90, 'grad', 'int2g32'): {'128x128x64 w4 s4': 0.769, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.764, '64x32x64 w4 s4': 0.524, '64x64x128 w4 s4': 0.754},
    (90, 'grad', 'int2g64'): {'128x128x64 w4 s4': 0.777, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.769, '64x32x64 w4 s4': 0.524, '64x64x128 w4 s4': 0.769},
    (90, 'grad', 'int3'): {'128x128x64 w4 s4': 0.773, '128x64x128 w8 s4': 0.798, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.722, '64x128x128 w4 s4': 0.75, '64x32x64 w4 s4': 0.335, '64x64x128 w4 s4': 0.704},
    (90, 'grad', 'int3g128'): {'128x128x64 w4 s4': 0.773, '128x64x128 w8 s4': 0.798, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.722, '64x128x128 w4 s4': 0.754, '64x32x64 w4 s4': 0.335, '64x64x128 w4 s4': 0.704},
    (90, 'grad', 'int3g32'): {'128x128x64 w4 s4': 0.717, '128x64x128 w8 s4': 0.798, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.722, '64x128x128 w4 s4': 0.6, '64x32x64 w4 s4': 0.339, '64x64x128 w4 s4': 0.678},
    (90, 'grad', 'int3g64'): {'128x128x64 w4 s4': 0.773, '128x64x128 w8 s4': 0.798, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.722, '64x128x128 w4 s4': 0.75, '64x32x64 w4 s4': 0.335, '64x64x128 w4 s4': 0.704},
    (90, 'grad', 'int4'): {'128x128x64 w4 s4': 0.773, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.767, '64x32x64 w4 s4': 0.529, '64x64x128 w4 s4': 0.762},
    (90, 'grad', 'int4g128'): {'128x128x64 w4 s4': 0.773, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.771, '64x32x64 w4 s4': 0.529, '64x64x128 w4 s4': 0.765},
    (90, 'grad', 'int4g32'): {'128x128x64 w4 s4': 0.769, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.764, '64x32x64 w4 s4': 0.529, '64x64x128 w4 s4': 0.754},
    (90, 'grad', 'int4g64'): {'128x128x64 w4 s4': 0.773, '128x64x128 w8 s4': 0.811, '128x64x64 w4 s4': 0.769, '256x64x128 w8 s3': 0.85, '256x64x64 w8 s3': 0.788, '64x128x128 w4 s4': 0.767, '64x32x64 w4 s4': 0.529, '64x64x128 w4 s4': 0.762},
    (90, 'grad', 'nf4'): {'128x128x64 w4 s4': 0.77, '128x64x128 w8 s4': 0.789, '128x64x64 w4 s4': 0.758, '256x64x128 w8 s3': 0.846, '256x64x64 w8 s3': 0.783, '64x128x128 w4 s4': 0.743, '64x32x64 w4 s4': 0.425, '64x64x128 w4 s4': 0.67},
    (90, 'splitk', 'int2'): {'16x64x128 w4 s4': 0.693, '16x64x256 w2 s3': 0.771, '16x64x256 w4 s3': 0.757},
    (90, 'splitk', 'int2g128'): {'16x64x128 w4 s4': 0.652, '16x64x256 w2 s3': 0.76, '16x64x256 w4 s3': 0.714},
    (90, 'splitk', 'int2g32'): {'16x64x128 w4 s4': 0.755, '16x64x256 w2 s3': 0.787, '16x64x256 w4 s3': 0.772},
    (90, 'splitk', 'int2g64'): {'16x64x128 w4 s4': 0.674, '16x64x256 w2 s3': 0.77, '16x64x256 w4 s3': 0.755},
    (90, 'splitk', 'int3'): {'16x64x128 w4 s4': 0.739, '16x64x256 w2 s3': 0.776, '16x64x256 w4 s3': 0.766},
    (90, 'splitk', 'int3g128'): {'16x64x128 w4 s4': 0.7, '16x64x256 w2 s3': 0.767, '16x64x256 w4 s3': 0.755},
    (90, 'splitk', 'int3g32'): {'16x64x128 w4 s4': 0.763, '16x64x256 w2 s3': 0.792, '16x64x256 w4 s3': 0.778},
    (90, 'splitk', 'int3g64'): {'16x64x128 w4 s4': 0.732, '16x64x256 w2 s3': 0.775, '16x64x256 w4 s3': 0.764},
    (90, 'splitk', 'int4'): {'16x64x128 w4 s4': 0.808, '16x64x256 w2 s3': 0.834, '16x64x256 w4 s3': 0.823},
    (90, 'splitk', 'int4g128'): {'16x64x128 w4 s4': 0.804, '16x64x256 w2 s3': 0.829, '16x64x256 w4 s3': 0.815},
    (90, 'splitk', 'int4g32'): {'16x64x128 w4 s4': 0.817, '16x64x256 w2 s3': 0.839, '16x64x256 w4 s3': 0.828},
    (90, 'splitk', 'int4g64'): {'16x64x128 w4 s4': 0.804, '16x64x256 w2 s3': 0.832, '16x64x256 w4 s3': 0.821},
    (90, 'splitk', 'nf4'): {'16x64x128 w4 s4': 0.756, '16x64x256 w2 s3': 0.767, '16x64x256 w4 s3': 0.765},
    (90, 'splitn', 'int2'): {'16x128x64 w4 s3': 0.528, '16x256x64 w4 s3': 0.547},
    (90, 'splitn', 'int2g128'): {'16x128x64 w4 s3': 0.471, '16x256x64 w4 s3': 0.488},
    (90, 'splitn', 'int2g32'): {'16x128x64 w4 s3': 0.569, '16x256x64 w4 s3': 0.588},
    (90, 'splitn', 'int2g64'): {'16x128x64 w4 s3': 0.512, '16x256x64 w4 s3': 0.53},
    (90, 'splitn', 'int3'): {'16x128x64 w4 s3': 0.658, '16x256x64 w4 s3': 0.68},
    (90, 'splitn', 'int3g128'): {'16x128x64 w4 s3': 0.606, '16x256x64 w4 s3': 0.627},
    (90, 'splitn', 'int3g32'): {'16x128x64 w4 s3': 0.69, '16x256x64 w4 s3': 0.712},
    (90, 'splitn', 'int3g64'): {'16x128x64 w4 s3': 0.643, '16x256x64 w4 s3': 0.665},
    (90, 'splitn', 'int4'): {'16x128x64 w4 s3': 0.754, '16x256x64 w4 s3': 0.759},
    (90, 'splitn', 'int4g128'): {'16x128x64 w4 s3': 0.724, '16x256x64 w4 s3': 0.747},
    (90, 'splitn', 'int4g32'): {'16x128x64 w4 s3': 0.76, '16x256x64 w4 s3': 0.764},
    (90, 'splitn', 'int4g64'): {'16x128x64 w4 s3': 0.752, '16x256x64 w4 s3': 0.756},
    (90, 'splitn', 'nf4'): {'16x128x64 w4 s3': 0.696, '16x256x64 w4 s3': 0.717},
}
#: Round 6: CTAs of each split-kernel candidate one SM holds at once (registers, shared memory), the
#: (fewest, most) the analyzer's occupancy gave over the shapes of the same sweep (``--fit-rules``
#: prints it next to CALIBRATION): the split rule fills the resident slots in close to whole waves
#: with it (:func:`occupancy_split`). A candidate without an entry keeps the ≈ 16-per-SM count.
RESIDENT = {
    (80, 'splitk', 'int2'): {'16x64x128 w4 s4': (7, 8), '16x64x256 w2 s3': (5, 6), '16x64x256 w4 s3': (5, 6)},
    (80, 'splitk', 'int2g128'): {'16x64x128 w4 s4': (8, 8), '16x64x256 w2 s3': (6, 6), '16x64x256 w4 s3': (6, 6)},
    (80, 'splitk', 'int2g32'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (5, 5), '16x64x256 w4 s3': (5, 5)},
    (80, 'splitk', 'int2g64'): {'16x64x128 w4 s4': (8, 8), '16x64x256 w2 s3': (6, 6), '16x64x256 w4 s3': (5, 5)},
    (80, 'splitk', 'int3'): {'16x64x128 w4 s4': (6, 7), '16x64x256 w2 s3': (4, 5), '16x64x256 w4 s3': (4, 5)},
    (80, 'splitk', 'int3g128'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (5, 5), '16x64x256 w4 s3': (4, 5)},
    (80, 'splitk', 'int3g32'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (4, 4), '16x64x256 w4 s3': (4, 4)},
    (80, 'splitk', 'int3g64'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (5, 5), '16x64x256 w4 s3': (5, 5)},
    (80, 'splitk', 'int4'): {'16x64x128 w4 s4': (5, 6), '16x64x256 w2 s3': (4, 4), '16x64x256 w4 s3': (4, 4)},
    (80, 'splitk', 'int4g128'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (4, 4), '16x64x256 w4 s3': (4, 4)},
    (80, 'splitk', 'int4g32'): {'16x64x128 w4 s4': (5, 5), '16x64x256 w2 s3': (4, 4), '16x64x256 w4 s3': (4, 4)},
    (80, 'splitk', 'int4g64'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (4, 4), '16x64x256 w4 s3': (4, 4)},
    (80, 'splitk', 'nf4'): {'16x64x128 w4 s4': (5, 5), '16x64x256 w2 s3': (8, 8), '16x64x256 w4 s3': (4, 4)},
    (80, 'splitn', 'int2'): {'16x128x128 w4 s3': (3, 3), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (6, 6), '16x64x128 w4 s4': (6, 7)},
    (80, 'splitn', 'int2g128'): {'16x128x128 w4 s3': (3, 3), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (6, 6), '16x64x128 w4 s4': (7, 7)},
    (80, 'splitn', 'int2g32'): {'16x128x128 w4 s3': (3, 3), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (6, 6), '16x64x128 w4 s4': (6, 6)},
    (80, 'splitn', 'int2g64'): {'16x128x128 w4 s3': (3, 3), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (6, 6)},
    (80, 'splitn', 'int3'): {'16x128x128 w4 s3': (2, 3), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 6), '16x64x128 w4 s4': (5, 7)},
    (80, 'splitn', 'int3g128'): {'16x128x128 w4 s3': (3, 3), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (6, 6), '16x64x128 w4 s4': (6, 7)},
    (80, 'splitn', 'int3g32'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (5, 6)},
    (80, 'splitn', 'int3g64'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (6, 6)},
    (80, 'splitn', 'int4'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (5, 6)},
    (80, 'splitn', 'int4g128'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (6, 6)},
    (80, 'splitn', 'int4g32'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (5, 5)},
    (80, 'splitn', 'int4g64'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (6, 6)},
    (80, 'splitn', 'nf4'): {'16x128x128 w4 s3': (2, 2), '16x256x64 w4 s3': (2, 2), '16x64x128 w2 s3': (5, 5), '16x64x128 w4 s4': (5, 5)},
    (90, 'splitk', 'int2'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (7, 8), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int2g128'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (8, 8), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int2g32'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (7, 7), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int2g64'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (8, 8), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int3'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (5, 7), '16x64x256 w4 s3': (3, 4)},
    (90, 'splitk', 'int3g128'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (7, 7), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int3g32'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (5, 6), '16x64x256 w4 s3': (3, 3)},
    (90, 'splitk', 'int3g64'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (7, 7), '16x64x256 w4 s3': (3, 3)},
    (90, 'splitk', 'int4'): {'16x64x128 w4 s4': (6, 7), '16x64x256 w2 s3': (6, 6), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int4g128'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (6, 6), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int4g32'): {'16x64x128 w4 s4': (6, 6), '16x64x256 w2 s3': (6, 6), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'int4g64'): {'16x64x128 w4 s4': (7, 7), '16x64x256 w2 s3': (6, 6), '16x64x256 w4 s3': (4, 4)},
    (90, 'splitk', 'nf4'): {'16x64x128 w4 s4': (5, 5), '16x64x256 w2 s3': (8, 8), '16x64x256 w4 s3': (3, 3)},
    (90, 'splitn', 'int2'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (2, 3)},
    (90, 'splitn', 'int2g128'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int2g32'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (2, 3)},
    (90, 'splitn', 'int2g64'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int3'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int3g128'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int3g32'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int3g64'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int4'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (2, 3)},
    (90, 'splitn', 'int4g128'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'int4g32'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (2, 2)},
    (90, 'splitn', 'int4g64'): {'16x128x64 w4 s3': (5, 5), '16x256x64 w4 s3': (3, 3)},
    (90, 'splitn', 'nf4'): {'16x128x64 w4 s3': (4, 4), '16x256x64 w4 s3': (2, 2)},
}
#: the standalone dequantize kernel's DRAM fraction over the SM balance of its grid (same sweep)
DEQUANT_EFF = {90: {"int2": 0.81, "int3": 0.77, "int4": 0.83, "nf4": 0.86},
               80: {"int2": 0.82, "int3": 0.78, "int4": 0.84, "nf4": 0.87}}
#: the standalone dequantize kernel's tiles (BLOCK_N, BLOCK_K): its autotuner keeps the faster
DEQUANT_TILES = ((32, 256), (64, 256))
#: the dense baseline's small-M kernel (M ≤ 64: one 16x64x256 tile with a split-K, bench/dense_matmul.py)
#: as its DRAM fraction over the SM balance, fitted at M = 64
DENSE_SMALL_M, DENSE_SMALL_EFF = 64, {90: 0.68, 80: 0.55}


def arch_family(arch: int) -> int:
    """90 for Hopper and newer, 80 otherwise (also for an unknown arch, 0)."""
    return 90 if arch >= 90 else 80


def format_class(bits: int, is_nf4: bool, group_size: Optional[int] = None) -> str:
    """"nf4", "int<bits>", or with ``group_size`` "int<bits>g<group_size>" (the calibration has
    entries per group size where the sweep measured one, and per bit width for the others)."""
    if is_nf4:
        return "nf4"
    return f"int{bits}" + (f"g{group_size}" if group_size else "")


def base_format(fmt: str) -> str:
    """"int4g128" -> "int4" (the format class of :data:`FORMAT_COST`)."""
    return fmt.split("g")[0] if fmt.startswith("int") else fmt


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """One launch's tile (torchao-style config record): what the launcher passes to the kernel,
    and why (the score's factors)."""

    op: str
    block_n: int
    block_m: int
    block_k: int
    group_m: Optional[int]
    num_warps: int
    num_stages: int
    split: int  # slices of the reduction: split kernels; GEMMs at mid M (grad_split, fwd_split), else 1
    ctas: int
    sm_balance: float
    fill: float
    tile_eff: float
    score: float
    index: int  # position in the candidate list

    @property
    def meta(self) -> dict:
        """Keyword arguments of the kernel launch (block sizes, warps, stages)."""
        d = dict(BLOCK_N=self.block_n, BLOCK_M=self.block_m, BLOCK_K=self.block_k,
                 num_warps=self.num_warps, num_stages=self.num_stages)
        if self.group_m is not None:
            d["GROUP_M"] = self.group_m
        return d

    @property
    def label(self) -> str:
        """``BMxBNxBK wW sS`` as the static report writes configs."""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"


def candidates(op: str):
    """The op's candidate list from :mod:`qlk.kernels.config` (one config under the interpreter)."""
    return {"fwd": _config.gemm_configs, "grad": _config.grad_configs, "splitk": _config.splitk_configs,
            "splitn": _config.splitn_configs}[op]()


def sm_balance(ctas: int, sms: int) -> float:
    return ctas / (sms * math.ceil(ctas / sms))


def split_count(length: int, block: int, base_ctas: int, sms: int, ctas_per_sm: int = 16,
                resident=None) -> int:
    """Slices of a split reduction over ``length`` in ``block`` steps: ≈ ``ctas_per_sm`` CTAs per
    SM (a small last wave with 4-6 resident per SM), at most one slice per step, and no empty slice:
    the kernels give each slice ⌈steps / split⌉ steps, so 16 steps over 14 slices would leave 6 of
    them idle; the count is lowered to ⌈steps / ⌈steps / target⌉⌉ (8 there, same steps per slice).

    ``resident`` (round 6, the split kernels: CTAs of the candidate one SM holds at once, an int
    or the (fewest, most) the sweep saw, :data:`RESIDENT`): the count is instead picked among the
    no-empty-slice counts up to twice that target (:func:`occupancy_split`) so that the grid fills
    the SMs' resident slots in close to whole waves, never at a lower SM balance × busy share than
    the count above."""
    steps = math.ceil(length / block)
    target = max(1, min(steps, math.ceil(ctas_per_sm * sms / base_ctas)))
    split = math.ceil(steps / math.ceil(steps / target))
    if resident is None:
        return split
    return occupancy_split(length, block, base_ctas, sms, resident, split, 2 * ctas_per_sm)


def slot_wave(ctas: int, slots: int) -> float:
    """Share of the resident-CTA slots of all waves that hold a CTA: CTAs / (slots · ⌈CTAs / slots⌉),
    slots = SMs × CTAs resident per SM (the static report's ``wave`` column)."""
    return ctas / (slots * math.ceil(ctas / slots))


def occupancy_split(length: int, block: int, base_ctas: int, sms: int, resident, split: int,
                    ctas_per_sm: int = 32) -> int:
    """The occupancy-aware split count (round 6). Candidates: every count that leaves no slice empty
    (⌈steps / ⌈steps / t⌉⌉ for t up to ⌈ctas_per_sm · SMs / base⌉ and the steps) whose SM balance
    × busy share (what the analyzer's DRAM estimate scales by) is at least that of ``split`` (the
    ≈ 16-per-SM rule's count). Among them the highest (balance × busy) × slot wave
    (:func:`slot_wave`, slots = SMs × ``resident``; for a range (fewest, most) of resident CTAs the
    worst slot wave over it, so a compile that keeps one CTA more or less resident cannot turn a
    whole wave into half of one), to 0.01; ties: the higher balance × busy, then fewer slices (less
    partial-sum traffic, longer pipelined slices).

    Llama-3-8B on sm_90 (16x64x256, 4 resident per SM, 528 slots): 4096→14336 224 N tiles x 16
    K steps: 8 slices (1792 CTAs, 3.39 waves, slot wave 0.85) -> 16 (3584 CTAs, 0.97);
    14336→4096 64 x 56: 28 slices (0.85) -> 8 slices of 7 steps (512 CTAs, one wave, 0.97)."""
    steps = math.ceil(length / block)
    lo, hi = (resident, resident) if isinstance(resident, int) else resident
    slot_counts = [sms * max(r, 1) for r in range(lo, hi + 1)]
    cap = max(1, min(steps, math.ceil(ctas_per_sm * sms / base_ctas)))

    def busy_balance(s):
        return sm_balance(base_ctas * s, sms) * split_busy(length, block, s)

    floor = busy_balance(split) - 1e-9  # never below the ≈ 16-per-SM count (float noise only)
    options = {split} | {s for s in (math.ceil(steps / math.ceil(steps / t)) for t in range(1, cap + 1))
                         if busy_balance(s) >= floor}

    def worst_wave(s):
        return min(slot_wave(base_ctas * s, slots) for slots in slot_counts)

    return max(sorted(options), key=lambda s: (round(busy_balance(s) * worst_wave(s), 2),
                                               round(busy_balance(s), 2), -s))


def short_reduction_fill(length: int, block: int) -> float:
    """Share of a split kernel's one reduction step that holds data when the whole reduction is
    shorter than the step (``length`` / ``block``; else 1). That step decodes and multiplies its
    full width, masked, so a 256-wide step over N = 128 (the input gradient of Qwen2.5-0.5B's
    896→128 k/v projection) does a 128-wide step's work in twice its time: the static analyzer has
    16x128x64 at 1.8x the speed of 16x256x64 there (round 14). A reduction of several steps with a
    cut last one is left to the fitted efficiencies: the analyzer charges its cut step fully only
    where the loop is issue-bound, and in the sweeps (K = 576, 896, 2880) the deeper tile often
    stays the faster."""
    return length / block if length < block else 1.0


def split_busy(length: int, block: int, split: int) -> float:
    """Share of a split grid's slot-steps that hold a reduction step: steps / (split · ⌈steps / split⌉)."""
    steps = math.ceil(length / block)
    return steps / (split * math.ceil(steps / split))


#: fewest N tiles per slice of the GEMM input gradient's split (as the dense baseline keeps ≥ 4 K
#: steps per split): the analyzer sees neither the pipeline's prologue nor the fp32 partial tile each
#: slice adds (BLOCK_K × BLOCK_M × 4 B through L2 atomics, often more than its slice of the weight)
GRAD_SPLIT_MIN_STEPS = 4

#: GEMM input-gradient tiles whose split variant spills (the static report, round 5: sm_80's 8-warp
#: tiles sit at 255 registers unsplit; the fp32 partial's atomics push 256x32x128 to 0.8-1 KB of
#: stack, 128x32x128 to 8 B; round 8: 128x32x128 w4, 242-248 registers unsplit, 0.8-0.9 KB split,
#: every format; round 9: 64x64x128 w2, 255 registers unsplit, 40-224 B split, every format): they
#: are launched unsplit
GRAD_SPLIT_SPILLS = {80: frozenset({"256x32x128 w8 s3", "128x32x128 w8 s3", "128x32x128 w4 s3", "64x64x128 w2 s3"}),
                     90: frozenset()}
#: ... and those whose split variant spills only at an M that is not a multiple of 16 (Triton
#: specializes M % 16 == 0; round 6, static report at M = 333: sm_80 64x32x128 w4 at 255 registers,
#: 8 B of stack and 2 LDL/STL for INT3 and NF4, none for INT4 g32/g128 and INT2): per format class
GRAD_SPLIT_SPILLS_RAGGED_M = {80: {"64x32x128 w4 s3": frozenset({"int3", "nf4"}),
                                    # round 26 (family sweep, M = 333): INT2 g32 at 255 registers, 8 B of stack
                                    "128x64x64 w4 s3": frozenset({"int2"})}, 90: {}}
#: ... and those whose split variant spills with QA-LoRA's fp32 folded biases and its fused
#: V = dY·B programs at an M that is not a multiple of 16 (round 10, static report at M = 100 on
#: 4096->2880 and 2880->4096, sm_80: 64x64x128 w4 8-16 B of stack, 64x32x128 w4 8-16 B, every
#: format; unsplit 0, and split at M = 256 0, the main report)
GRAD_SPLIT_SPILLS_FP32_BIAS_RAGGED_M = {80: frozenset({"64x64x128 w4 s3", "64x32x128 w4 s3"}), 90: frozenset()}
#: GEMM input-gradient tiles that spill with QA-LoRA's fp32 folded biases and its fused V = dY·B
#: split or not (round 26, every report's QA-LoRA input gradients, sm_80 128x64x64 w4: 16 B of stack
#: at M = 24 .. 1500): left out of QA-LoRA's launches
GRAD_FP32_BIAS_SPILLS = {80: frozenset({"128x64x64 w4 s3"}), 90: frozenset()}


#: Round 8 (docs/kernels.md "Round 8: the last mid-M input gradients under 0.9x dense"): GEMM
#: input-gradient candidates kept for some format classes only (bit width; a candidate not listed
#: serves every format). The round-8 branch swept sm_90 128x128x64 w4 for NF4 only and kept it there;
#: the merge swept it for every format (INT 3072->3072 M = 1024: 0.87..0.46 -> 0.92..0.47 tensor-peak,
#: 0.89x -> 0.93x dense) and lifted the restriction, so no candidate is restricted now.
GRAD_CANDIDATE_FORMATS = {
    80: {},
    90: {},
}


#: Round 8: GEMM input-gradient candidates the rules take only where they win by this factor (their
#: score is divided by it, as a split launch's by :data:`GRAD_SPLIT_MARGIN`). sm_90 64x32x64 w4 is
#: the tile for a short reduction at M = 64 (2048→512: 16 steps of 32 rows split 4 ways, 128 CTAs,
#: where the 128-row tiles leave 64 CTAs half empty; the rules' score ×1.6); elsewhere at M = 64 its
#: fitted efficiency (a median over M = 64..2048) puts it 0.5-6 % above the 128-row tiles, which the
#: analyzer has 4-9 % ahead of it (the round-8 sweep).
GRAD_CANDIDATE_MARGIN = {80: {}, 90: {"64x32x64 w4 s4": 1.10}}


def candidate_margin(op: str, label: str, arch: int) -> float:
    """The factor by which candidate ``label`` of ``op`` must outscore the others to be chosen
    (:data:`GRAD_CANDIDATE_MARGIN`; 1 for every other candidate). Ranking only: the choice's
    ``score`` (and the dispatcher's time from it) stays the model's."""
    return GRAD_CANDIDATE_MARGIN.get(arch_family(arch), {}).get(label, 1.0) if op == "grad" else 1.0


#: GEMM candidates proposed only in a range of M: (op, label) -> (smallest M, largest M), per arch
#: family. Round 15: sm_90's one-warpgroup 64x128x64 forward tile decodes each weight for 64 rows of X,
#: half the MMA work of the 128-row tiles: at M = 3000 it is issue-bound at 0.73-0.85 optimistic
#: against the 256-row tile's 0.85 (round 9), but where the big tiles are mostly padding it wins
#: (M = 300 on 1024->3072: 0.76..0.41 at fill 0.94 against 256x128x64's 0.73..0.44 at 0.59). Proposed
#: for 64 <= M <= 1024: above, the sweeps had it slower; below, its fitted efficiency (a median over
#: M = 64..333) over-rates it against split-K by up to 27 % (M = 24 on 4096->11008, static-new).
#: Round 16: the input gradient's 64x64x128 w4 tile, the same trade on dXᵀ's columns (M = 300 on
#: 3072->1024: 0.67..0.39 at fill 0.94 against 128x64x128 w8's 0.55..0.28 at 0.78), from M = 17 (above
#: SPLIT_ALWAYS_M) on: at M = 24-48 on the family's shapes it is the analyzer's best in 188 of 240
#: input gradients, 26-28 % ahead of the 128-row tiles, and the rules with it pick the best in 221
#: Round 25: no upper bound. Above M = 1024 the 64-row tiles had never been compiled; swept at M = 1500-8192
#: on every report's shapes they are the analyzer's best where the big tiles leave SMs idle (576->192 at
#: M = 3000: 94 CTAs against 72, forward 0.82x -> 1.03x dense; 3584->512's input gradient 0.85x -> 0.99x)
#: and, 64x128x128, where its deeper K step beats the 128-row tiles by 1-10 % (3584->3584 at M = 3000);
#: on full grids the fitted efficiencies keep the 256-row tiles (docs/kernels.md "Round 25").
CANDIDATE_M_RANGE = {80: {}, 90: {("fwd", "64x128x64 w4 s4"): (64, math.inf), ("fwd", "64x128x128 w4 s4"): (64, math.inf),
                                  ("grad", "64x64x128 w4 s4"): (17, math.inf), ("grad", "64x128x128 w4 s4"): (17, math.inf)}}


#: Round 17: the forward GEMM tiles that decode INT2/INT4 in the lane-owned k order (X read in the
#: same permuted order, 8-byte runs instead of 16-byte vectors; docs/kernels.md "Round 17"), by arch
#: family: the tallest BLOCK_M that gains (None: every tile). In the stored order the four lanes of a
#: quad each pick one byte of every word (a PRMT and a shift per pair); lane-owned, LOP3 + 2 HFMA2.
#: sm_80: +1.4-8 % on every INT4 tile; sm_90: the 64-row tile +12-14 % (issue-bound before), while
#: the permuted X tile made the 256x64 tile smem-bound (-37 %) and cost 128x64 3-6 %.
FWD_LANE_ORDER_MAX_M = {80: None, 90: 64}


def fwd_lane_order(arch: int, block_m: int) -> bool:
    """Whether the forward GEMM tile with ``block_m`` rows of X decodes in the lane-owned k order on
    ``arch`` (:data:`FWD_LANE_ORDER_MAX_M`; the kernel still keeps the stored order for NF4, INT3
    on K tiles narrower than its 128-column quad of chunks, fp32 activations, QA-LoRA's pooling and
    a K tile that K cuts)."""
    tallest = FWD_LANE_ORDER_MAX_M[arch_family(arch)]
    return tallest is None or block_m <= tallest


#: The GEMM input gradient's tile orientation by arch family (round 18, docs/kernels.md "Round 18"):
#: True, dX = dY·Ŵ with the decoded Ŵ as the MMA's B operand, stored once to shared memory in 16-byte
#: rows (sm_90: wgmma reads B there; the 64-row tile's smem 348 -> 296 cycles an iteration, the
#: 128-row tile's 472 -> 376, issue 328 -> 264 and 450 -> 340, INT4 2304->9216 at M = 400);
#: False, dXᵀ = Ŵᵀ·dYᵀ with Ŵᵀ as the A operand (sm_80's mma.sync takes both operands from
#: registers: the B-operand tile there is 529 / 652 against 341 / 588).
GRAD_W_AS_B = {80: False, 90: True}


def grad_w_as_b(arch: int, bits: int = 4, block_n: int | None = None, block_k: int | None = None,
                num_warps: int | None = None) -> bool:
    """Whether the GEMM input gradient on ``arch`` takes Ŵ as the MMA's B operand (:data:`GRAD_W_AS_B`;
    the kernel applies it to INT2/3/4 and NF4 with fp16/bf16 dY, whole K tiles and groups of whole
    words / INT3 chunks).

    INT3 (round 19) decodes a 32-column chunk of 3 words per thread. A tile with fewer chunks than
    threads (block_n·block_k/32 < 32·num_warps: 256x64x64 w8, 64x32x64 w4) is then split between
    threads and stored element by element (256x64x64 w8: 82 STS an iteration, smem 536 -> 1152
    cycles), so those tiles keep Ŵᵀ. Without the tile (``block_n`` None) the arch's flag alone."""
    if not GRAD_W_AS_B[arch_family(arch)]:
        return False
    if bits == 3 and block_n is not None:
        return block_n * (block_k // 32) >= 32 * num_warps
    return True


def candidate_m_range(op: str, label: str, arch: int) -> tuple[float, float]:
    """The M range in which candidate ``label`` of ``op`` is proposed (:data:`CANDIDATE_M_RANGE`;
    every M for a candidate not listed)."""
    return CANDIDATE_M_RANGE.get(arch_family(arch), {}).get((op, label), (1, math.inf))


def grad_candidate_allowed(label: str, fmt: str, arch: int) -> bool:
    """Whether the GEMM input-gradient candidate ``label`` serves format class ``fmt`` on ``arch``
    (:data:`GRAD_CANDIDATE_FORMATS`; a candidate not listed there serves every format)."""
    allowed = GRAD_CANDIDATE_FORMATS.get(arch_family(arch), {}).get(label)
    return allowed is None or base_format(fmt) in allowed


def grad_split_spills(label: str, fmt: str, m: int, arch: int, fp32_bias: bool = False) -> bool:
    """Whether the split variant of the GEMM input-gradient tile ``label`` spills at this format
    and M (:data:`GRAD_SPLIT_SPILLS`, :data:`GRAD_SPLIT_SPILLS_RAGGED_M`), or with QA-LoRA's fp32
    folded biases at such an M (:data:`GRAD_SPLIT_SPILLS_FP32_BIAS_RAGGED_M`): such a tile runs unsplit."""
    fam = arch_family(arch)
    if label in GRAD_SPLIT_SPILLS.get(fam, ()):
        return True
    if m % 16 != 0 and fp32_bias and label in GRAD_SPLIT_SPILLS_FP32_BIAS_RAGGED_M.get(fam, ()):
        return True
    return m % 16 != 0 and base_format(fmt) in GRAD_SPLIT_SPILLS_RAGGED_M.get(fam, {}).get(label, ())


#: most slices of a wave split (round 6: dX tiles that fill the SMs but leave the last wave
#: short): enough to even out up to ~3 waves, few enough that the fp32 workspace stays one pass
GRAD_WAVE_MAX_SPLIT = 4


def grad_split(n: int, block_n: int, base_ctas: int, sms: int) -> int:
    """Slices of the GEMM input gradient's reduction over N (round 5): when its dX tiles leave SMs
    idle, :func:`split_count` aiming at one or two CTAs per SM (heavy GEMM CTAs, not the split
    kernels' 16), at most ⌊steps / GRAD_SPLIT_MIN_STEPS⌋ slices, whichever gives the better SM
    balance × busy share (equal: fewer slices, less workspace traffic). M = 64 on K = 2048,
    N = 2048: 16 dX tiles of 128x128 -> 8 slices of 4 N tiles on 132 SMs.

    Round 6, wave split: when the dX tiles fill the SMs but their last wave is short, the count
    (2 .. :data:`GRAD_WAVE_MAX_SPLIT`, same cap) with the best SM balance × busy share if that beats
    the unsplit balance, else 1 (M = 333 on K = 8192, 128x128 dX tiles: 192 CTAs on 132 SMs,
    balance 0.73 -> 2 slices, 384 CTAs, 0.97). This is a proposal: the tile score (:func:`_score`)
    weighs it against the unsplit launch, charging the workspace's own passes
    (:func:`grad_workspace_share`), which at large M cost more than the wave gains."""
    steps = math.ceil(n / block_n)
    cap = steps // GRAD_SPLIT_MIN_STEPS
    if cap < 2:
        return 1
    gain = lambda s: round(sm_balance(base_ctas * s, sms) * split_busy(n, block_n, s), 6)  # noqa: E731
    if base_ctas >= sms:
        options = {math.ceil(steps / math.ceil(steps / s)) for s in range(2, min(cap, GRAD_WAVE_MAX_SPLIT) + 1)}
        best = max(sorted(options), key=lambda s: (gain(s), -s), default=1)
        return best if best > 1 and gain(best) > gain(1) else 1
    options = {1}
    for per_sm in (1, 2):
        s = min(split_count(n, block_n, base_ctas, sms, per_sm), cap)
        options.add(math.ceil(steps / math.ceil(steps / s)))  # no empty slice (split_count's rule)
    return max(sorted(options), key=lambda s: (gain(s), -s))


#: bytes per dX element of the split launch's passes outside the GEMM kernel: the fp32 workspace
#: zeroed (4 B) and read back (4 B) by the cast into dX (2 B written)
GRAD_WORKSPACE_PASS_BYTES = 10


#: a split launch must be estimated this much faster than the unsplit one (round 6): the passes'
#: charge is a DRAM-rate estimate (small workspaces stay in L2 but cost two more launches), and at
#: M <= 128 the static report times launches by their DRAM fraction, where a split that the score
#: has 0-3 % ahead came out 3-4 % behind (sm_90 28672->8192 M = 128, 14336->4096 M = 64)
GRAD_SPLIT_MARGIN = 1.05


def grad_workspace_share(m: int, n: int, k: int, score: float, arch: int) -> float:
    """Share of a split input gradient's time spent in its GEMM kernel (round 6), the rest in the
    workspace's passes around it (zeroing, the cast into dX; the static analyzer compiles the GEMM
    only, so it does not see them): t_gemm / (t_gemm + t_ws) with t_gemm = M·N·K / (tensor peak ·
    ``score``) and t_ws = :data:`GRAD_WORKSPACE_PASS_BYTES` · M·K / DRAM bandwidth (atomics; the
    deterministic variant's [SPLIT, M, K] workspace costs more). Small where the split pays most
    (M = 64 on K = 2048: 0.43 µs of 2-3 µs), too large where a wave split gains 10-25 % of a long
    GEMM (M = 2048 on K = 3072: 21 µs against a 17-150 µs GEMM)."""
    a = ARCH[arch_family(arch)]
    t_gemm = m * n * k / (a.macs_per_s * score)
    t_ws = GRAD_WORKSPACE_PASS_BYTES * m * k / a.dram_bytes_per_s
    return t_gemm / (t_gemm + t_ws)


def grad_dram_cap(m: int, n: int, k: int, fmt: str, block_m: int, block_n: int, block_k: int, split: int,
                  arch: int) -> float:
    """The GEMM input gradient's tile efficiency where DRAM, not the tile, limits it (round 6): the
    midpoint of a DRAM-bound range, optimistic ``r`` and pessimistic ``r / (1 + r)`` (DRAM overlapping
    nothing), with the roofline ratio

        r = (padded MACs / tensor peak) / (useful bytes / DRAM bandwidth)

    padded MACs = ⌈M/BM⌉·BM · ⌈K/BK⌉·BK · split·⌈steps/split⌉·BN (steps = ⌈N/BN⌉), useful bytes =
    packed Ŵ (codes and 4 B a group: INT scale + bias, NF4's de-nested fp32 absmax) + dY (2·M·N) + dX
    (2·M·K) or, split, the fp32 workspace (4·M·K). The static analyzer spreads the same bytes over the
    same loop, so its tensor fraction / DRAM fraction equals ``r`` (the committed sweep: to 1 % in
    every input-gradient row, 1,600 on sm_90 and 1,200 on sm_80). It binds where the reduction per dX
    element is short against its 4-byte partial: split launches with 4 N tiles a slice (2048→512 at
    M = 333, NF4 128x64x128 w8: 0.54 against the tile's fitted 0.75): the split's workspace, not a
    per-split-count factor, is what the unsplit fit misses."""
    steps = math.ceil(n / block_n)
    macs = (math.ceil(m / block_m) * block_m * math.ceil(k / block_k) * block_k
            * split * math.ceil(steps / split) * block_n)
    moved = _gemm_packed_bytes(n, k, fmt) + 2 * m * n + (4 if split > 1 else 2) * m * k
    return _roofline_mid(macs, moved, arch)


def fwd_dram_cap(m: int, n: int, k: int, fmt: str, block_m: int, block_n: int, block_k: int, split: int,
                 arch: int) -> float:
    """The forward GEMM's tile efficiency where DRAM, not the tile, limits it (round 20): the
    input gradient's roofline (:func:`grad_dram_cap`) with the forward's operands,

        r = (padded MACs / tensor peak) / (useful bytes / DRAM bandwidth)

    padded MACs = ⌈M/BM⌉·BM · ⌈N/BN⌉·BN · K (split over K: slices · SLICE_K, :func:`fwd_slices`),
    useful bytes = packed Ŵ (codes and 4 B a group) + X (2·M·K) + Y (2·M·N) or, split, its fp32
    partials (sm_90's atomics 4·M·N, sm_80's slices 4·M·N·S). It binds where few rows of X meet each
    weight: sm_90's 64-row tiles at M = 64 (INT4 on 8192→8192: r ≈ 0.87, the cap 0.67 against the
    tile's 0.76). Without it the fit took those DRAM-bound rows into the tiles' median (INT4
    64x128x128 0.662 against 0.76 at M = 128-333) and the rules kept a tile 1-8 % slower there."""
    if split > 1:
        slice_k, slices = fwd_slices(k, block_k, format_group(fmt), split)
        depth, partials = slices * slice_k, 4 * m * n * (1 if arch_family(arch) == 90 else slices)
    else:
        depth, partials = k, 2 * m * n
    macs = math.ceil(m / block_m) * block_m * math.ceil(n / block_n) * block_n * depth
    return _roofline_mid(macs, _gemm_packed_bytes(n, k, fmt) + 2 * m * k + partials, arch)


def _gemm_packed_bytes(n: int, k: int, fmt: str) -> float:
    """Bytes of the packed Ŵ a fused GEMM reads: the codes and 4 B a group (INT scale and bias,
    bf16 each; NF4 the fp32 absmax the GEMM reads de-nested)."""
    base = base_format(fmt)
    is_nf4 = base == "nf4"
    bits = 4 if is_nf4 else int(base[3:] or 4)
    group = 64 if is_nf4 else int(fmt.split("g")[1]) if "g" in fmt else 128
    return n * k * bits / 8 + n * math.ceil(k / group) * 4


def _roofline_mid(macs: float, moved: float, arch: int) -> float:
    """The midpoint of a DRAM-bound launch's tensor fraction: optimistic r, pessimistic r / (1 + r)
    (DRAM overlapping nothing), r = (MACs / tensor peak) / (bytes / DRAM bandwidth)."""
    a = ARCH[arch_family(arch)]
    r = (macs / a.macs_per_s) / (moved / a.dram_bytes_per_s)
    return (r + r / (1 + r)) / 2


#: fewest K tiles per slice of the forward GEMM's split (round 6): the pipeline's prologue (2-3
#: stages) and the slice's fp32 partial tile (BLOCK_N × BLOCK_M × 4 B through L2) want a long loop
FWD_SPLIT_MIN_STEPS = 8
#: the forward splits only when that raises SM balance × busy share by at least this factor (then
#: :func:`fwd_split_share` charges the workspace passes): a grid of 2.9 waves (0.97 balance) stays
#: unsplit, one of 1.45 waves (0.73) or of 48 CTAs on 108 SMs (0.44) splits
FWD_SPLIT_GAIN = 1.15
#: most slices the forward's rule considers (the workspace [SPLIT, M, N] grows with it), and most
#: waves of CTAs a split grid may have (a grid of many waves loses little to its last one, and
#: every slice adds M·N·4 B of partials)
FWD_SPLIT_MAX, FWD_SPLIT_MAX_WAVES = 8, 4
#: forward GEMM tiles whose split variant spills (the static report, round 6), launched unsplit
FWD_SPLIT_SPILLS = {80: frozenset(), 90: frozenset()}
#: ... and those whose split variant spills only with QA-LoRA's in-GEMM pooling and fp32 folded
#: biases (round 9: 64x128x32 w2, 8 B of stack at 4096→1024 M = 333 on sm_80), launched unsplit there
FWD_SPLIT_SPILLS_POOL = {80: frozenset({"64x128x32 w2 s4"}), 90: frozenset()}
#: ... and those whose split variant spills for some formats only (round 21: sm_80's 64x128x32 w4
#: with NF4's half2 lookup, 128 registers and 8 B of stack at 2048→512 M = 333), launched unsplit there
FWD_SPLIT_SPILLS_FORMAT = {80: {"64x128x32 w4 s4": frozenset({"nf4"})}, 90: {}}
#: ... and forward tiles that spill with QA-LoRA's pooling split or not (round 20: sm_90's
#: 64x128x128 w4 at 255 registers, 8-128 B of stack for INT2 / INT4: the stored-order decode the
#: pooling keeps, 128 columns of it a step), not proposed with the pooling
FWD_POOL_SPILLS = {80: frozenset(), 90: frozenset({"64x128x128 w4 s4"})}
#: split-K (decode) tiles that spill with QA-LoRA's pooling and fp32 folded biases (round 31's
#: out-of-format check, bench/results/static-formats-sm80: sm_80's 16x64x256 w4 s3, 8 B of stack and
#: 2 LDL/STL for INT4 g64 at every shape; none at g32 / g128 or other widths), not proposed with the
#: pooling. It was never the pick there: 16x64x256 w2 s3 has the same depth, the same resident CTAs
#: and the higher fitted efficiency on every format, so the exclusion costs no shape anything
SPLITK_POOL_SPILLS = {80: frozenset({"16x64x256 w4 s3"}), 90: frozenset()}
#: tiles that fail for one format class (a bit width at one group size) only, not proposed for it:
#: (arch family, op) -> {label: format classes}. Round 31's sweep of the other group sizes
#: (bench/results/static-family-formats-sm80): sm_80's 16x64x128 w4 s4 input gradient split over N
#: spills (8 B of stack, 3 LDL/STL) for INT2 g64 at every shape and M (INT2 g32 / g128: none)
FORMAT_EXCLUDED_TILES = {(80, "splitn"): {"16x64x128 w4 s4": frozenset({"int2g64"})}}
#: NF4's group (absmax block) when the format class does not carry it (bitsandbytes' default)
NF4_BLOCK = 64


def format_group(fmt: str) -> int:
    """The group size a format class names ("int4g128" -> 128); NF4 and a class without one:
    :data:`NF4_BLOCK` (the launchers pass the real one to :func:`fwd_slices`)."""
    base = base_format(fmt)
    return int(fmt[len(base) + 1:]) if fmt.startswith("int") and len(fmt) > len(base) + 1 else NF4_BLOCK


def fwd_slices(k: int, block_k: int, group_size: int, split: int) -> tuple[int, int]:
    """(SLICE_K, slices) of the forward GEMM's split K: each slice spans ⌈units / split⌉ units of
    lcm(BLOCK_K, group size) columns (whole K tiles and whole groups, so QA-LoRA's pooling sums no
    group across two slices), the last one what is left; ``slices`` ≤ ``split`` (no empty slice).
    One source for the launcher and the rule."""
    unit = math.lcm(block_k, group_size)
    units = math.ceil(k / unit)
    slice_k = math.ceil(units / max(1, min(split, units))) * unit
    return slice_k, math.ceil(k / slice_k)


def split_loop_runs(length: int, block: int, split: int, slice_len: int = 0, whole: bool = False) -> bool:
    """Whether every program of a loop over [0, ``length``) in ``block`` steps, cut into ``split``
    slices as the kernels cut them, runs its loop at least once: the kernels' ``LOOP_RUNS``, which
    they pass to the compiler (``tl.assume``). Without it the loop keeps a zero-trip path that
    copies the zeroed accumulator, and ptxas serializes every wgmma of an sm_90 loop behind the
    previous one (C7515, "Potential Performance Loss"; round 25).

    Slice s spans [s·step, min(length, (s + 1)·step)) with step = ``slice_len`` (the forward GEMM's
    SLICE_K, :func:`fwd_slices`) or ⌈⌈length / block⌉ / split⌉·block (the split kernels' tl.cdiv
    arithmetic). ``whole``: the loop covers the slice's whole steps only, a cut last step running
    after it (the K loops where K is not a multiple of BLOCK_K): the last slice needs ≥ ``block``
    columns. The steps of a slice are whole ``block`` multiples, so only the last slice can fall
    short."""
    if min(length, block, split) < 1:
        return False
    step = slice_len or math.ceil(math.ceil(length / block) / split) * block
    last = (split - 1) * step
    return last < length and (not whole or length - last >= block)


def fwd_split_busy(k: int, block_k: int, slice_k: int, slices: int) -> float:
    """Share of the split forward's slot-steps that hold a K tile: K tiles / (slices · tiles per slice)
    (1 unsplit)."""
    if slices == 1:
        return 1.0
    return math.ceil(k / block_k) / (slices * (slice_k // block_k))


def fwd_split_bytes(m: int, n: int, split: int, arch: int) -> int:
    """DRAM bytes a split forward moves beyond the unsplit one (which writes Y once, as does the
    split's final cast), a roofline count of the launcher's passes that the static analyzer does not
    see (they are torch ops around the kernel): sm_90 (atomics,
    :func:`~qlk.kernels.fused_matmul._fwd_split_atomic`) the zeroed fp32 [M, N] workspace written,
    written back after the atomics, read by the cast:
    12·M·N; sm_80 (fixed-order sum) its S slices written and read back, their sum written and read:
    (8·S + 8)·M·N."""
    return (12 if arch_family(arch) == 90 else 8 * split + 8) * m * n


def fwd_split_share(m: int, n: int, k: int, split: int, score: float, arch: int) -> float:
    """Share of a split forward's time that is its GEMM: t / (t + t_ws), t = MACs / (peak · score),
    t_ws = :func:`fwd_split_bytes` / DRAM (1 unsplit). At M = 333 it is 0.5-0.9 (2048→2048 on
    sm_80, split 2: 16 µs of GEMM against 9 µs of workspace passes), so only a split that wins
    by more than that is taken."""
    if split == 1:
        return 1.0
    a = ARCH[arch_family(arch)]
    t = m * n * k / (a.macs_per_s * score)
    return t / (t + fwd_split_bytes(m, n, split, arch) / a.dram_bytes_per_s)


def fwd_split(k: int, block_k: int, group_size: int, base_ctas: int, sms: int) -> int:
    """Slices of the forward GEMM's K loop (round 6; grid axis 1, fp32 partials summed through the
    split workspace): at mid M the output tiles leave SMs idle (M = 333 on sm_80's 128x128 tile:
    3 × 16 = 48 CTAs on 108 SMs) or fill the last wave badly (3 × 64 = 192 CTAs on 132 SMs: 1.45
    waves). Wave-aware: every split up to :data:`FWD_SPLIT_MAX` that keeps ≥
    :data:`FWD_SPLIT_MIN_STEPS` K tiles per slice and ≤ :data:`FWD_SPLIT_MAX_WAVES` waves is scored
    by SM balance × busy share; the fewest slices within 2 % of the best win, and only if that beats
    the unsplit grid by :data:`FWD_SPLIT_GAIN` (else 1). Returns the number of slices
    :func:`fwd_slices` gives (the launch's grid axis 1). ``_score`` then charges the workspace
    passes (:func:`fwd_split_share`)."""
    steps = math.ceil(k / block_k)
    if steps < 2 * FWD_SPLIT_MIN_STEPS:
        return 1
    options = {}
    for s in range(1, FWD_SPLIT_MAX + 1):
        slice_k, slices = fwd_slices(k, block_k, group_size, s)
        if slices > 1 and (slice_k // block_k < FWD_SPLIT_MIN_STEPS or base_ctas * slices > FWD_SPLIT_MAX_WAVES * sms):
            break
        options[slices] = sm_balance(base_ctas * slices, sms) * fwd_split_busy(k, block_k, slice_k, slices)
    best = max(options.values())
    pick = min(s for s, v in options.items() if v >= 0.98 * best)
    return pick if options[pick] >= FWD_SPLIT_GAIN * options[1] else 1


#: Round 15: split-N tiles that spill in QA-LoRA's launch (``pool`` for split-N: the fused V = dY·B
#: programs) when the output's last K tile is cut (K % BLOCK_K != 0) and M > 1, per format class:
#: sm_80 16x64x128 w4 with INT2, 8 B of stack and 3 LDL/STL outside the main loop at K = 2880 and
#: 4544, M = 3 / 12 / 16 (bench/results/static-oos2-sm80.csv); none at M = 1 (Triton specializes
#: M = 1), at K = 4096 / 4608, or for INT4 g32 at K = 2880
SPLITN_SPILLS_WITH_V_RAGGED_K = {80: {"16x64x128 w4 s4": frozenset({"int2"})}, 90: {}}


def splitn_spills_with_v(label: str, fmt: str, m: int, k: int, block_k: int, arch: int) -> bool:
    """Whether split-N tile ``label`` spills in QA-LoRA's launch at this K
    (:data:`SPLITN_SPILLS_WITH_V_RAGGED_K`): such a tile is not proposed there."""
    fmts = SPLITN_SPILLS_WITH_V_RAGGED_K.get(arch_family(arch), {}).get(label, ())
    return m > 1 and k % block_k != 0 and base_format(fmt) in fmts


def _fits(c, arch: int, fp32_bias: bool, op: str, pool: bool = False, fmt: str = "int4", act_bytes: int = 2
          ) -> bool:
    k = c.kwargs
    if getattr(c, "qlk_arch", None) not in (None, arch_family(arch)):
        return False
    # round 35: what the launch's shared memory holds depends on the activations' dtype (fp32: 4 bytes a
    # value), the group size (not a power of two: a scale and bias gathered per element) and QA-LoRA's
    # fp32 biases / pooling (config._smem_estimate; the H200 refused 128x128x64 w4 s4 input gradients of
    # fp32 dY at 229-337 KB, config.SMEM_MEASURED)
    group = format_group(fmt) if fmt.startswith("int") else None
    if _config._smem_estimate(c, act_bytes, op, group, fp32_bias, pool) > \
            _config.SMEM_LIMIT.get(arch, _config.SMEM_LIMIT[arch_family(arch)]):
        return False
    rows = k["BLOCK_K"] if op in ("grad", "splitn") else k["BLOCK_N"]
    if rows * k["BLOCK_M"] > 128 * 32 * c.num_warps:  # fp32 accumulator registers per thread
        return False
    # QA-LoRA's in-GEMM pooling keeps a running sum per column: more than one column per thread
    # spills (sm_90 256x64x64 w4 with POOL: 80-168 B stack)
    if pool and op in ("fwd", "splitk") and k["BLOCK_M"] > 32 * c.num_warps:
        return False
    label = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
    if pool and op == "fwd" and label in FWD_POOL_SPILLS.get(arch_family(arch), ()):
        return False
    if pool and op == "splitk" and label in SPLITK_POOL_SPILLS.get(arch_family(arch), ()):
        return False
    # QA-LoRA's fp32 folded biases: the 256-row split-N tile spills with them (docs/kernels.md), and
    # so does round 9's two-warp GEMM input gradient (64x64x128 w2 with the fused V = dY·B: 24-64 B
    # of stack on sm_80, bench/results/static-sm80.csv)
    if op == "grad" and fp32_bias and c.num_warps < 4:
        return False
    if op == "grad" and fp32_bias and label in GRAD_FP32_BIAS_SPILLS.get(arch_family(arch), ()):
        return False
    return not (op == "splitn" and fp32_bias and k["BLOCK_N"] > 128)


def gemm_tile_eff(rows: int, cols: int, warps: int, arch: int, fmt: str = "int4", grad: bool = False
                  ) -> tuple[float, float]:
    """(optimistic, pessimistic) main-loop efficiency of a fused GEMM tile (module docstring)."""
    a = ARCH[arch_family(arch)]
    units = max(warps // a.warps_per_mma_unit, 1)
    dup = units / min(units, max(rows // a.rows_per_mma_unit, 1))
    d = FORMAT_COST.get(base_format(fmt), 1.0) * (a.grad_cost if grad else 1.0)
    a_pess = a.a_pess + (a.a_single if units == 1 else 0.0)
    return min(1.0, cols / (a.c_opt * dup * d)), 1.0 / (1.0 + a_pess + a.c_pess * dup * d / cols)


def calibrated(op: str, c, fmt: str, arch: int) -> Optional[float]:
    """The candidate's fitted efficiency (:data:`CALIBRATION`), or None when it has none."""
    kw = c.kwargs
    label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
    fam = arch_family(arch)
    got = CALIBRATION.get((fam, op, fmt), {}).get(label)
    return got if got is not None else CALIBRATION.get((fam, op, base_format(fmt)), {}).get(label)


def resident_ctas(op: str, c, fmt: str, arch: int) -> Optional[tuple[int, int]]:
    """(fewest, most) CTAs of split-kernel candidate ``c`` one SM holds at once (:data:`RESIDENT`, per
    format class, else per bit width), or None without an entry (the split count then ignores
    occupancy)."""
    kw = c.kwargs
    label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
    fam = arch_family(arch)
    got = RESIDENT.get((fam, op, fmt), {}).get(label)
    return got if got is not None else RESIDENT.get((fam, op, base_format(fmt)), {}).get(label)


def _score(op, c, m, n, k, fmt, arch, sms, pool=False, fp32_bias=False):
    kw = c.kwargs
    bn, bm, bk = kw["BLOCK_N"], kw["BLOCK_M"], kw["BLOCK_K"]
    fitted = calibrated(op, c, fmt, arch)
    if op == "fwd":
        tiles_m, tiles_o = math.ceil(m / bm), math.ceil(n / bn)
        label = f"{bm}x{bn}x{bk} w{c.num_warps} s{c.num_stages}"
        group = format_group(fmt)
        # above the split-K decode kernel's range only (M <= SPLIT_MAX_M: choose_fused weighs that
        # kernel against the GEMM; the split GEMM there is not measured yet)
        unsplit = (m <= SPLIT_MAX_M or label in FWD_SPLIT_SPILLS.get(arch_family(arch), ())
                   or (pool and label in FWD_SPLIT_SPILLS_POOL.get(arch_family(arch), ()))
                   or base_format(fmt) in FWD_SPLIT_SPILLS_FORMAT.get(arch_family(arch), {}).get(label, ()))
        split = 1 if unsplit else fwd_split(k, bk, group, tiles_m * tiles_o, sms)
        tile = fitted or sum(gemm_tile_eff(bn, bm, c.num_warps, arch, fmt)) / 2
        eff = min(tile, fwd_dram_cap(m, n, k, fmt, bm, bn, bk, 1, arch))
        fill = m * n / (tiles_m * bm * tiles_o * bn)
        if split > 1:  # the busy share of the slices and the workspace passes' share of the time join fill
            busy = fwd_split_busy(k, bk, *fwd_slices(k, bk, group, split))
            eff_split = min(tile, fwd_dram_cap(m, n, k, fmt, bm, bn, bk, split, arch))
            split_score = eff_split * sm_balance(tiles_m * tiles_o * split, sms) * fill * busy
            charged = busy * fwd_split_share(m, n, k, split, split_score, arch)
            if split_score * charged / busy > eff * sm_balance(tiles_m * tiles_o, sms) * fill:
                fill, eff = fill * charged, eff_split
            else:  # the passes eat the gain: unsplit
                split = 1
        ctas = tiles_m * tiles_o * split
    elif op == "grad":
        tiles_m, tiles_o = math.ceil(m / bm), math.ceil(k / bk)
        label = f"{bm}x{bn}x{bk} w{c.num_warps} s{c.num_stages}"
        split = 1 if grad_split_spills(label, fmt, m, arch, fp32_bias) else grad_split(n, bn, tiles_m * tiles_o, sms)
        tile = fitted or sum(gemm_tile_eff(bk, bm, c.num_warps, arch, fmt, grad=True)) / 2
        options = []  # the split launch against the unsplit one, the workspace's passes charged
        for s in sorted({1, split}):
            ctas = tiles_m * tiles_o * s
            fill = m * k / (tiles_m * bm * tiles_o * bk) * split_busy(n, bn, s)
            eff = min(tile, grad_dram_cap(m, n, k, fmt, bm, bn, bk, s, arch))
            if s > 1:
                eff *= grad_workspace_share(m, n, k, eff * sm_balance(ctas, sms) * fill, arch)
            margin = GRAD_SPLIT_MARGIN if s > 1 else 1.0
            options.append((round(eff * sm_balance(ctas, sms) * fill / margin, 6), -s, s, ctas, fill, eff))
        _, _, split, ctas, fill, eff = max(options)
    else:  # split kernels: the padding of BLOCK_M = 16 rows is the same for every candidate
        if op == "splitk":
            base, length, block = math.ceil(n / bn) * math.ceil(m / bm), k, bk
        else:
            base, length, block = math.ceil(k / bk) * math.ceil(m / bm), n, bn
        split = split_count(length, block, base, sms, resident=resident_ctas(op, c, fmt, arch))
        e = bn * bk
        eff = fitted or e / (e + 4096)

        def sliced(s, cut=False):
            ctas_, fill_ = base * s, split_busy(length, block, s) * short_reduction_fill(length, block)
            if cut:  # one slice decodes its cut last step in full: the share of its steps that holds data
                fill_ = split_busy(length, block, s) * length / (math.ceil(length / block) * block)
            bal_ = sm_balance(ctas_, sms)
            return KernelChoice(op, bn, bm, bk, kw.get("GROUP_M"), c.num_warps, c.num_stages, s, ctas_, bal_,
                                fill_, eff, eff * bal_ * fill_, -1)

        choice = sliced(split)
        if split > 1 and SPLIT_ALWAYS_M < m <= SPLIT_MAX_M:
            # round 33 (split-K; split-N since round 34): one slice stores its output itself
            # (split_direct), so the occupancy count's slices must buy more SM balance than their
            # workspace's passes cost: the faster of the two by fused_time (split-K 4096->1024 at M =
            # 128 on sm_90: 16 slices of 128 CTAs -> one, 13 % in the model; the passes were 65 % of
            # the INT4 weight's bytes; split-N's dX of 2048->512 at M = 64: two slices -> one of 128
            # CTAs). Its cut last step counted (K =
            # 384 on 256-deep steps: 0.75 holds data; counted for every launch it would move every
            # ragged reduction's scores, docs/kernels.md "Round 33")
            one = sliced(1, cut=True)
            packed = _gemm_packed_bytes(n, k, fmt)
            if fused_time(one, m, n, k, packed, arch, fmt) < fused_time(choice, m, n, k, packed, arch, fmt):
                choice = one
        return choice
    bal = sm_balance(ctas, sms)
    return KernelChoice(op, bn, bm, bk, kw.get("GROUP_M"), c.num_warps, c.num_stages, split, ctas, bal, fill,
                        eff, eff * bal * fill, -1)


def score_all(op: str, m: int, n: int, k: int, fmt: str = "int4", arch: int = 90, sms: Optional[int] = None,
              configs: Optional[Sequence] = None, fp32_bias: bool = False, pool: bool = False, act_bytes: int = 2
              ) -> list[KernelChoice]:
    """Every candidate that fits, scored (list order); empty if none fits."""
    if op not in OPS:
        raise ValueError(f"op={op!r}; allowed: {', '.join(OPS)}")
    if min(m, n, k) < 1:
        raise ValueError(f"M, N, K must be >= 1; got {m}, {n}, {k}")
    sms = sms or DEFAULT_SMS[arch_family(arch)]
    configs = candidates(op) if configs is None else configs
    out = []
    for i, c in enumerate(configs):
        kw = c.kwargs
        label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
        if op == "grad" and not grad_candidate_allowed(label, fmt, arch):
            continue
        lo, hi = candidate_m_range(op, label, arch)
        if not lo <= m <= hi:
            continue
        if op == "splitn" and pool and splitn_spills_with_v(label, fmt, m, k, kw["BLOCK_K"], arch):
            continue
        if fmt in FORMAT_EXCLUDED_TILES.get((arch_family(arch), op), {}).get(label, ()):
            continue
        if _fits(c, arch, fp32_bias, op, pool, fmt, act_bytes):
            out.append(dataclasses.replace(_score(op, c, m, n, k, fmt, arch, sms, pool, fp32_bias), index=i))
    return out


def choose_config(op: str, m: int, n: int, k: int, fmt: str = "int4", arch: int = 90, sms: Optional[int] = None,
                  configs: Optional[Sequence] = None, fp32_bias: bool = False, pool: bool = False,
                  act_bytes: int = 2) -> KernelChoice:
    """The tile ``op`` ("fwd", "grad", "splitk", "splitn") launches with at Y[M, N] = X[M, K]·Ŵᵀ
    (the gradient ops: the same M, N, K of the layer) on ``arch`` with ``sms`` SMs: the candidate
    with the highest score (module docstring), on ties the bigger tile (fewer CTAs), then the earlier one. If none fits, the first
    candidate (as the pruning of the autotuner did). ``fp32_bias`` / ``pool``: QA-LoRA's fp32
    folded biases / in-kernel pooling, for split-N its fused V = dY·B (tiles that spill with them
    are left out). ``act_bytes``: bytes of an activation value (fp32: 4; the shared-memory fit)."""
    if configs is None:
        return _choose_default(op, m, n, k, fmt, arch, sms, fp32_bias, pool, act_bytes)
    return _choose(op, m, n, k, fmt, arch, sms, configs, fp32_bias, pool, act_bytes)


def _choose(op, m, n, k, fmt, arch, sms, configs, fp32_bias, pool, act_bytes=2):
    scored = score_all(op, m, n, k, fmt, arch, sms, configs, fp32_bias, pool, act_bytes)
    if not scored:
        sms = sms or DEFAULT_SMS[arch_family(arch)]
        configs = candidates(op) if configs is None else configs
        return dataclasses.replace(_score(op, configs[0], m, n, k, fmt, arch, sms, pool, fp32_bias), index=0)
    if op in ("splitk", "splitn") and SPLIT_ALWAYS_M < m <= SPLIT_MAX_M:
        # round 8: several 16-row M tiles; each candidate's own line of time over tiles (SPLIT_MID_M),
        # so the one :func:`fused_time` finds fastest, which choose_fused weighs against the GEMM.
        # Round 32: that time itself, so a one-slice launch (no workspace, no passes: split_direct;
        # split-N since round 32, split-K since round 33) is weighed with what it saves; between
        # launches with a workspace the order is the line's alone, as before
        packed = _gemm_packed_bytes(n, k, fmt)
        times = [fused_time(s, m, n, k, packed, arch, fmt) for s in scored]
        fastest = min(times)
        return min(zip(times, scored), key=lambda ts: (round(ts[0] / fastest, 6), ts[1].ctas, ts[1].index))[1]
    # equal scores: the bigger tile (fewer CTAs; the analyzer ranks it first on sm_90, e.g. 256x128 w8
    # over 256x64 w4 at M = 4096), then the deeper reduction step (round 25: two tiles capped by DRAM
    # at one efficiency; the fewer iterations win, 64x128x128 over 64x128x64 by 10 % at 576->192
    # M = 3000), then list order
    return max(scored, key=lambda s: (round(s.score / candidate_margin(op, s.label, arch), 6), -s.ctas,
                                      reduction_step(op, s), -s.index))


def reduction_step(op: str, choice: "KernelChoice") -> int:
    """Columns of the reduction one iteration of ``choice``'s loop covers: K for the forward ops
    (``fwd``, ``splitk``), N for the input gradients (``grad``, ``splitn``)."""
    return choice.block_k if op in ("fwd", "splitk") else choice.block_n


@functools.lru_cache(maxsize=4096)
def _choose_default(op, m, n, k, fmt, arch, sms, fp32_bias, pool, act_bytes=2):
    return _choose(op, m, n, k, fmt, arch, sms, None, fp32_bias, pool, act_bytes)


# ------------------------------------------------------------------------------------- the path
@dataclasses.dataclass(frozen=True)
class PathChoice:
    """Fused kernel or dequantize + dense GEMM at one shape, with the static model's times (s)."""

    path: str  # "fused" or "dequant"
    t_fused: float
    t_dequant: float
    fused: Optional[KernelChoice]
    dense_score: float

    @property
    def speedup(self) -> float:
        """t_dequant / t_fused (> 1: fused is faster)."""
        return self.t_dequant / self.t_fused


def dense_score(m: int, n_out: int, arch: int, sms: Optional[int] = None, cap: float = 1.0) -> float:
    """Best score of the dense GEMM's tiles (:data:`DENSE_TILES`) for an [m, n_out] output, each
    tile's efficiency at most ``cap`` (:func:`dense_dram_cap`)."""
    fam = arch_family(arch)
    sms = sms or DEFAULT_SMS[fam]
    best = 0.0
    for (bm, bn, _warps), (opt, pess) in DENSE_TILES[fam].items():
        tm, tn = math.ceil(m / bm), math.ceil(n_out / bn)
        fill = m * n_out / (tm * bm * tn * bn)
        best = max(best, min((opt + pess) / 2, cap) * sm_balance(tm * tn, sms) * fill)
    return best


def dense_dram_cap(m: int, red: int, out_cols: int, arch: int, act_bytes: int = 2) -> float:
    """The dense GEMM's efficiency where DRAM limits it: :func:`grad_dram_cap`'s midpoint of the
    roofline ratio r (optimistic r, pessimistic r / (1 + r)) with its bytes, the 16-bit weight,
    input and output. Round 11: without it the path rule rated the dense GEMM compute-bound at a
    short reduction (the input gradient of a 1536→256 layer at M = 2500, 256 deep: both kernels
    DRAM-bound on dX, the fused one 1.05× dense) and took dequantize + dense (0.80×)."""
    a = ARCH[arch_family(arch)]
    moved = act_bytes * (red * out_cols + m * red + m * out_cols)
    r = (m * red * out_cols / a.macs_per_s) / (moved / a.dram_bytes_per_s)
    return (r + r / (1 + r)) / 2


def dense_split_k(m: int, out_cols: int, red: int, sms: int) -> int:
    """The dense baseline's split-K at M ≤ 64 (bench/dense_matmul.py's rule: powers of two until
    the 16x64 tiles cover every SM twice, keeping ≥ 4 K steps of 256 per split)."""
    tiles, split = math.ceil(m / 16) * math.ceil(out_cols / 64), 1
    while tiles * split < 2 * sms and math.ceil(red / 256) // (2 * split) >= 4:
        split *= 2
    return split


def weight_bytes(n: int, k: int, bits: int, group_size: int, is_nf4: bool) -> float:
    """Bytes of a packed weight: codes plus one 2-byte scale and bias per group (NF4: one absmax
    byte per block with double quant, about the same)."""
    codes = n * k * (4 if is_nf4 else bits) / 8
    return codes + n * math.ceil(k / max(group_size, 1)) * (1 if is_nf4 else 4)


#: the dequantize path must be estimated this much faster to be taken (it also allocates an N×K
#: buffer in the activation dtype; the model's dense term misses the short-loop and latency costs the
#: analyzer sees at some narrow shapes, e.g. 2048→512, where it is too kind to the dense GEMM)
DEQUANT_MARGIN = 1.0

#: the split kernels' range: always at M ≤ 16, weighed against the GEMM up to this M (above, a
#: 16-row tile re-reads the weight ≥ 8 times and the GEMM wins everywhere in the sweep)
SPLIT_ALWAYS_M, SPLIT_MAX_M = 16, 128


#: Round 8: the analyzer's time of the split kernels at 16 < M ≤ 128 in units of one 16-row M tile's
#: model time (:func:`split_tile_bytes` / (DRAM · score), the tile as at M = 16): ``per_tile · T +
#: shared`` for T = ⌈M/16⌉ tiles, per (arch, op), format class (per group size where the sweep has
#: one; the bit width's entry else) and candidate. The M tiles share the weight's slices through L2:
#: each adds ``per_tile`` (0.46-0.90 of a tile: its L2 re-read, its activations and partials, its
#: issue), and ``shared`` (0.1-0.3) is paid once; the deeper split-K tile adds less per M tile
#: (sm_80 INT2 16x64x256 0.70 against 16x64x128 0.78), so at mid M the split kernels' tile is
#: chosen by this time (:func:`_choose`), not by the one-tile score. Fitted by ``bench/static_report.py --fit-rules`` from the
#: sweep's M = 64 and 128 (T = 4, 8); out of sample, at M = 32 (T = 2) it is within 3 % of the
#: analyzer's median (sm_90 split-K INT4 g32 16x64x256: 0.601 a tile against 0.608). Round 3-7 had one factor
#: per bit width, a median over T = 4 and 8 of an older kernel (INT4 0.68 where the analyzer now
#: has 0.54 at T = 4 and 0.61 at T = 2), so at M = 32-128 the rule took the GEMM where the split
#: kernel is faster by up to 30 %.
SPLIT_MID_M = {
    (80, 'splitk'): {
        'int2': {'16x64x128 w4 s4': (0.767, 0.266), '16x64x256 w2 s3': (0.621, 0.249), '16x64x256 w4 s3': (0.698, 0.274)},
        'int3': {'16x64x128 w4 s4': (0.788, 0.254), '16x64x256 w2 s3': (0.69, 0.282), '16x64x256 w4 s3': (0.765, 0.287)},
        'int4': {'16x64x128 w4 s4': (0.531, 0.303), '16x64x256 w2 s3': (0.425, 0.291), '16x64x256 w4 s3': (0.522, 0.302)},
        'int4g128': {'16x64x128 w4 s4': (0.561, 0.28), '16x64x256 w2 s3': (0.452, 0.261), '16x64x256 w4 s3': (0.55, 0.275)},
        'int4g32': {'16x64x128 w4 s4': (0.529, 0.283), '16x64x256 w2 s3': (0.425, 0.265), '16x64x256 w4 s3': (0.521, 0.275)},
        'nf4': {'16x64x128 w4 s4': (0.742, 0.29), '16x64x256 w2 s3': (0.681, 0.285), '16x64x256 w4 s3': (0.697, 0.287)},
    },
    (80, 'splitn'): {
        'int2': {'16x128x128 w4 s3': (0.855, 0.225), '16x256x64 w4 s3': (0.872, 0.201), '16x64x128 w2 s3': (0.845, 0.245), '16x64x128 w4 s4': (0.861, 0.217)},
        'int3': {'16x128x128 w4 s3': (0.842, 0.243), '16x256x64 w4 s3': (0.859, 0.214), '16x64x128 w2 s3': (0.831, 0.262), '16x64x128 w4 s4': (0.843, 0.233)},
        'int4': {'16x128x128 w4 s3': (0.797, 0.261), '16x256x64 w4 s3': (0.817, 0.251), '16x64x128 w2 s3': (0.768, 0.275), '16x64x128 w4 s4': (0.81, 0.245)},
        'int4g128': {'16x128x128 w4 s3': (0.805, 0.289), '16x256x64 w4 s3': (0.823, 0.252), '16x64x128 w2 s3': (0.795, 0.302), '16x64x128 w4 s4': (0.809, 0.285)},
        'int4g32': {'16x128x128 w4 s3': (0.77, 0.308), '16x256x64 w4 s3': (0.803, 0.278), '16x64x128 w2 s3': (0.722, 0.304), '16x64x128 w4 s4': (0.79, 0.3)},
        'nf4': {'16x128x128 w4 s3': (0.812, 0.281), '16x256x64 w4 s3': (0.831, 0.245), '16x64x128 w2 s3': (0.802, 0.292), '16x64x128 w4 s4': (0.815, 0.271)},
    },
    (90, 'splitk'): {
        'int2': {'16x64x128 w4 s4': (0.759, 0.27), '16x64x256 w2 s3': (0.617, 0.275), '16x64x256 w4 s3': (0.686, 0.27)},
        'int3': {'16x64x128 w4 s4': (0.792, 0.265), '16x64x256 w2 s3': (0.704, 0.274), '16x64x256 w4 s3': (0.763, 0.274)},
        'int4': {'16x64x128 w4 s4': (0.51, 0.264), '16x64x256 w2 s3': (0.431, 0.266), '16x64x256 w4 s3': (0.473, 0.252)},
        'int4g128': {'16x64x128 w4 s4': (0.547, 0.282), '16x64x256 w2 s3': (0.46, 0.268), '16x64x256 w4 s3': (0.507, 0.275)},
        'int4g32': {'16x64x128 w4 s4': (0.499, 0.282), '16x64x256 w2 s3': (0.424, 0.272), '16x64x256 w4 s3': (0.458, 0.275)},
        'nf4': {'16x64x128 w4 s4': (0.748, 0.29), '16x64x256 w2 s3': (0.695, 0.281), '16x64x256 w4 s3': (0.704, 0.286)},
    },
    (90, 'splitn'): {
        'int2': {'16x128x64 w4 s3': (0.846, 0.239), '16x256x64 w4 s3': (0.84, 0.248)},
        'int3': {'16x128x64 w4 s3': (0.832, 0.254), '16x256x64 w4 s3': (0.828, 0.262)},
        'int4': {'16x128x64 w4 s3': (0.775, 0.286), '16x256x64 w4 s3': (0.762, 0.29)},
        'int4g128': {'16x128x64 w4 s3': (0.797, 0.294), '16x256x64 w4 s3': (0.793, 0.303)},
        'int4g32': {'16x128x64 w4 s3': (0.743, 0.306), '16x256x64 w4 s3': (0.721, 0.304)},
        'nf4': {'16x128x64 w4 s3': (0.805, 0.288), '16x256x64 w4 s3': (0.801, 0.293)},
    },
}
#: an arch, op or format without a fitted line: a flat share of the tiles' time
SPLIT_MID_DEFAULT = (0.85, 0.0)


#: Round 8: the analyzer's time of the GEMMs at 16 < M ≤ 128 over :func:`fused_time`'s MAC term
#: (the tile's fitted tensor efficiency, a median over every M > 16 that large M dominates), per
#: (arch, op) and format class: the median over the sweep's M = 64 and 128 rows of every candidate.
#: The analyzer judges these launches by their DRAM time, which their few CTAs overlap better than
#: the MAC term says (sm_80 0.86-0.94, sm_90 0.93-0.99). Fitted by ``bench/static_report.py
#: --fit-rules``; 1 for a format without an entry and outside that M range.
GEMM_MID_M = {
    (80, 'fwd'): {'int2': 0.909, 'int3': 0.898, 'int4': 0.949, 'int4g128': 0.939, 'int4g32': 0.955, 'nf4': 0.925},
    (80, 'grad'): {'int2': 0.881, 'int3': 0.885, 'int4': 0.917, 'int4g128': 0.91, 'int4g32': 0.923, 'nf4': 0.915},
    (90, 'fwd'): {'int2': 0.952, 'int3': 0.953, 'int4': 0.994, 'int4g128': 0.988, 'int4g32': 1.0, 'nf4': 0.987},
    (90, 'grad'): {'int2': 0.976, 'int3': 0.975, 'int4': 1.001, 'int4g128': 1.0, 'int4g32': 1.003, 'nf4': 1.001},
}


#: Round 29: each input-gradient GEMM tile's own factor at 16 < M ≤ 128, on top of its format's
#: :data:`GEMM_MID_M`, per (arch, "grad") and candidate label: the median over the sweep's M = 64 and
#: 128 rows of that tile of the analyzer's time over :func:`fused_time`'s. One factor per format had
#: left the 64-row tiles 4-6 % slow in the analyzer and the 128 / 256-row ones 3-8 % fast, the same on
#: the sweeps the rules were not fitted on (sm_80's 64x64x128 w4: 1.056 on the fit's sweep, 1.052 on
#: the others), so the rules took sm_80's 64-row GEMM where its two-warp split-N was 2-14 % faster.
#: Fitted by ``bench/static_report.py --fit-rules`` with GEMM_MID_M (to their common fixed point);
#: 1 for a tile without an entry. The forward's tiles have none: fitted the same way, they moved the
#: fit's own sweep 3 picks the wrong way (sm_80's 64x128x32 w2 against split-K at M = 128).
GEMM_MID_TILE = {
    (80, 'grad'): {'128x32x128 w4 s3': 1.005, '128x32x128 w8 s3': 0.971, '128x64x64 w4 s3': 0.991, '256x32x128 w8 s3': 0.958, '64x32x128 w4 s3': 1.057, '64x64x128 w2 s3': 1.056, '64x64x128 w4 s3': 1.054},
    (90, 'grad'): {'128x128x64 w4 s4': 0.997, '128x64x128 w8 s4': 1.021, '128x64x64 w4 s4': 0.995, '256x64x128 w8 s3': 1.001, '256x64x64 w8 s3': 0.925, '64x128x128 w4 s4': 1.0, '64x32x64 w4 s4': 1.043, '64x64x128 w4 s4': 1.0},
}


#: Round 29: what a row of M's dY and fp32 partials (:func:`split_row_bytes`) costs the split-N
#: input gradient at 16 < M ≤ 128 against the packed weight's bytes (:func:`fused_time`), per arch.
#: The analyzer finds these bytes cheaper than the weight's: they are streamed (the partials stored
#: once, the dY rows L2-resident across the weight's slices), where every weight byte is decoded.
#: Charged at full cost, split-N's time was up to 75 % high where the rows are a fifth or more of
#: the weight (narrow layers: 896→128 at M = 48 moves 4x the weight in partials), and the rules took
#: the GEMM where split-N was up to 24 % faster. Fitted with :data:`SPLIT_MID_M` by
#: ``bench/static_report.py --fit-rules`` (the cost of least rms log error of split-N's time against
#: the analyzer's at the sweep's M = 64 / 128: 0.003 at 0.3, 0.017 at full cost). The forward's
#: split-K is not given one (full cost): its fitted 0.4 moved no out-of-sample pick net and one
#: in-sample pick (28672→8192, M = 64) 8 % off.
SPLIT_ROW_COST = {(80, "splitn"): 0.28, (90, "splitn"): 0.3}


def split_mid_tiles(op: str, tiles: int, fmt: str, arch: int, label: Optional[str] = None) -> float:
    """The split kernel's time at ``tiles`` 16-row M tiles in units of one tile's model time:
    ``per_tile · tiles + shared`` (:data:`SPLIT_MID_M`, the candidate ``label``'s line; a candidate
    without one: the mean of its format's lines), ``tiles`` itself for one tile (M ≤ 16)."""
    if tiles <= 1:
        return float(tiles)
    table = SPLIT_MID_M.get((arch_family(arch), op), {})
    lines = table.get(fmt) or table.get(base_format(fmt)) or {}
    line = lines.get(label)
    if line is None:
        line = tuple(sum(x) / len(lines) for x in zip(*lines.values())) if lines else SPLIT_MID_DEFAULT
    per_tile, shared = line
    return per_tile * tiles + shared


def fused_time(c: KernelChoice, m: int, n: int, k: int, packed: float, arch: int, fmt: str = "int4") -> float:
    """Estimated seconds of the fused kernel ``c`` (module docstring): GEMMs MACs / (peak · score),
    at least the packed weight's DRAM time; split kernels

        t = units(T) · (packed + cost · (M / T) · row_bytes) / (DRAM · score) + passes / DRAM,

    T = ⌈M/16⌉ M tiles of M / T rows each on average, each reading the packed weight and its rows
    of activations and fp32 partials (:func:`split_tile_bytes`; ``cost``: split-N's
    :data:`SPLIT_ROW_COST`, 1 for split-K), ``units(T) = per_tile · T + shared``
    tiles' worth (round 8, :func:`split_mid_tiles`: the tiles share the weight's slices through L2),
    plus the workspace's passes (:func:`split_kernel_passes_bytes`, round 15; none for a one-slice
    split-N launch since round 32, which stores dX itself, or split-K launch since round 33, which
    stores Y: :func:`split_direct`). Round 29: a tile holds
    M / T rows, not 16; a 17-row M had been charged 32 rows of partials and a 4-row one 16, which
    made the split kernels up to 25 % slow in the rules on narrow layers, where the partials are a
    fifth or more of the weight."""
    fam = arch_family(arch)
    a = ARCH[fam]
    if c.op in ("splitk", "splitn"):
        tiles = math.ceil(m / c.block_m)
        units = split_mid_tiles(c.op, tiles, fmt, fam, c.label)
        rows = SPLIT_ROW_COST.get((fam, c.op), 1.0) * m / tiles
        direct = split_direct(c.op, c.split)
        kernel = units * split_tile_bytes(c.op, n, k, packed, rows, direct) / (a.dram_bytes_per_s * c.score)
        return kernel + split_kernel_passes_bytes(c.op, m, n, k, direct) / a.dram_bytes_per_s
    t = max(m * n * k / (a.macs_per_s * c.score), packed / a.dram_bytes_per_s)
    if SPLIT_ALWAYS_M < m <= SPLIT_MAX_M:
        table = GEMM_MID_M.get((fam, c.op), {})
        t *= table.get(fmt) or table.get(base_format(fmt)) or 1.0
        t *= GEMM_MID_TILE.get((fam, c.op), {}).get(c.label, 1.0)
    return t


def split_direct(op: str, split: int) -> bool:
    """Whether a split kernel's launch stores its output directly (``DIRECT``): one slice of the
    reduction, so no fp32 workspace and no passes around the kernel. The split-N input gradient
    since round 32, the split-K forward since round 33."""
    return op in ("splitn", "splitk") and split == 1


def split_kernel_passes_bytes(op: str, m: int, n: int, k: int, direct: bool = False) -> int:
    """Round 15: DRAM bytes of the split kernels' passes outside the kernel, which the analyzer does
    not compile: a launch accumulates into a zeroed fp32 workspace, [M, N] for the forward's split-K
    ("splitk"), [M, K] for the input gradient's split-N ("splitn"), which the cast then reads back
    into the output, :data:`GRAD_WORKSPACE_PASS_BYTES` per output element, as the split GEMMs are
    charged. Small next to the packed weight on wide layers (4096→14336 at M = 16: 2 %), it decides
    split-N against the GEMM at mid M on narrow ones (2048→512, M = 32: 0.66 MB of passes against
    0.5 MB of INT4 weight). ``direct`` (rounds 32-33, :func:`split_direct`): none."""
    if direct:
        return 0
    return GRAD_WORKSPACE_PASS_BYTES * m * (n if op == "splitk" else k)


def split_row_bytes(op: str, n: int, k: int, direct: bool = False) -> int:
    """What one row of M adds to a split kernel's useful bytes: its 16-bit input row (the reduction's
    length) and its fp32 partial output row (``direct``: its 16-bit output row)."""
    red, out = (k, n) if op == "splitk" else (n, k)
    return 2 * red + (2 if direct else 4) * out


def split_tile_bytes(op: str, n: int, k: int, packed: float, rows: float = 16, direct: bool = False) -> float:
    """What one M tile of ``rows`` rows of a split kernel moves, as the analyzer counts useful bytes
    (its DRAM fraction, which :data:`CALIBRATION` holds for the split kernels, is of these): the
    packed weight and :func:`split_row_bytes` a row."""
    return packed + rows * split_row_bytes(op, n, k, direct)


def _fused(op, m, n, k, fmt, fam, sms, packed, fp32_bias=False, pool=False):
    split_op = "splitk" if op == "fwd" else "splitn"
    options = []
    if m <= SPLIT_MAX_M:
        options.append(choose_config(split_op, m, n, k, fmt, fam, sms, fp32_bias=fp32_bias, pool=pool))
    if m > SPLIT_ALWAYS_M:
        options.append(choose_config(op, m, n, k, fmt, fam, sms, fp32_bias=fp32_bias, pool=pool))
    timed = [(fused_time(c, m, n, k, packed, fam, fmt), i, c) for i, c in enumerate(options)]
    t, _, c = min(timed, key=lambda x: (x[0], x[1]))  # equal times: the split kernel (listed first)
    return c, t


@functools.lru_cache(maxsize=4096)
def choose_fused(op: str, m: int, n: int, k: int, bits: int = 4, group_size: int = 128, is_nf4: bool = False,
                 arch: int = 90, sms: Optional[int] = None, fp32_bias: bool = False, pool: bool = False
                 ) -> KernelChoice:
    """The fused kernel for ``op`` "fwd" / "grad" at M rows, with its tile: the split kernel
    (``op`` "splitk" / "splitn" of the result) at M ≤ :data:`SPLIT_ALWAYS_M`; up to
    :data:`SPLIT_MAX_M` the split kernel or the GEMM, whichever :func:`fused_time` estimates
    faster (narrow layers at M = 64: 8-16 GEMM CTAs on 132 SMs against a split grid that fills
    them); the GEMM above."""
    if op not in ("fwd", "grad"):
        raise ValueError(f"op={op!r}; allowed: 'fwd', 'grad'")
    fam = arch_family(arch)
    sms = sms or DEFAULT_SMS[fam]
    packed = weight_bytes(n, k, bits, group_size, is_nf4)
    return _fused(op, m, n, k, format_class(bits, is_nf4, group_size), fam, sms, packed, fp32_bias, pool)[0]


@functools.lru_cache(maxsize=4096)  # called at every launch with path="auto": keep the host cost flat
def choose_path(op: str, m: int, n: int, k: int, bits: int = 4, group_size: int = 128, is_nf4: bool = False,
                arch: int = 90, sms: Optional[int] = None, act_bytes: int = 2) -> PathChoice:
    """``op`` "fwd" (Y = X·Ŵᵀ, output [M, N]) or "grad" (dX = dY·Ŵ, output [M, K]): "fused" or
    "dequant" by the static model (module docstring). M ≤ 16: always "fused"."""
    if op not in ("fwd", "grad"):
        raise ValueError(f"op={op!r}; allowed: 'fwd', 'grad'")
    fam = arch_family(arch)
    a = ARCH[fam]
    sms = sms or DEFAULT_SMS[fam]
    fmt = format_class(bits, is_nf4, group_size)
    macs = m * n * k
    packed = weight_bytes(n, k, bits, group_size, is_nf4)
    choice, t_fused = _fused(op, m, n, k, fmt, fam, sms, packed)
    out_cols = n if op == "fwd" else k
    red = k if op == "fwd" else n
    ds = dense_score(m, out_cols, fam, sms, cap=dense_dram_cap(m, red, out_cols, fam, act_bytes))
    deq_bal = max(sm_balance(math.ceil(n / bn_) * math.ceil(k / bk_), sms) for bn_, bk_ in DEQUANT_TILES)
    deq_eff = DEQUANT_EFF[fam].get(base_format(fmt), DEQUANT_DRAM_SHARE) * deq_bal
    t_deq = (packed + n * k * act_bytes) / (a.dram_bytes_per_s * deq_eff)
    if m <= DENSE_SMALL_M:  # the dense baseline's split-K tile: DRAM-bound, its grid's balance
        split = dense_split_k(m, out_cols, red, sms)
        bal = sm_balance(math.ceil(m / 16) * math.ceil(out_cols / 64) * split, sms)
        dense_bytes = act_bytes * (n * k + m * red + m * out_cols)
        t_dense = dense_bytes / (a.dram_bytes_per_s * DENSE_SMALL_EFF[fam] * bal)
    else:
        t_dense = max(macs / (a.macs_per_s * ds), n * k * act_bytes / a.dram_bytes_per_s)
    t_dequant = t_deq + t_dense
    path = "fused" if m <= SPLIT_ALWAYS_M or t_fused <= t_dequant * DEQUANT_MARGIN else "dequant"
    return PathChoice(path, t_fused, t_dequant, choice, ds)


#: the M = 1 FMA input-gradient kernel's tiles (BLOCK_N, BLOCK_K, warps, stages): config.gemv_grad_configs
GEMV_TILES = ((32, 256, 4, 3), (64, 128, 4, 3))


def gemv_score(n: int, k: int, fmt: str, arch: int, sms: int) -> float:
    """Best score of the M = 1 FMA kernel's tiles (its autotuner keeps the faster): fitted efficiency
    (:data:`CALIBRATION`, op "gemv") × SM balance × busy share of its split over N (the launcher's
    split: ⌈16·SMs / K tiles⌉ slices, at most one per N step). 0 without a fitted entry."""
    fam = arch_family(arch)
    table = CALIBRATION.get((fam, "gemv", fmt)) or CALIBRATION.get((fam, "gemv", base_format(fmt)), {})
    best = 0.0
    for bn, bk, w, st in GEMV_TILES:
        eff = table.get(f"{bn}x{bk} w{w} s{st}")
        if eff is None:
            continue
        base = math.ceil(k / bk)
        split = max(1, min(math.ceil(n / bn), math.ceil(16 * sms / base)))
        best = max(best, eff * sm_balance(base * split, sms) * split_busy(n, bn, split))
    return best


@functools.lru_cache(maxsize=1024)
def choose_m1_grad(n: int, k: int, fmt: str = "int4", arch: int = 90, sms: Optional[int] = None) -> str:
    """The input gradient's kernel at M = 1 (no QA-LoRA V): "splitn" (the split-N MMA kernel, 16-row
    tile) or "gemv" (FMAs on a [BLOCK_N, BLOCK_K] register tile): split-N, at every shape. Round 3's
    sweep compiled both at the 12 Llama-family shapes, 5 formats, sm_90 and sm_80: the analyzer
    estimates split-N faster in all 120 cases (NF4 by 2-5 %, INT2 on narrow layers by up to 30 %;
    :func:`gemv_score` with the fitted FMA efficiency would have picked the FMA kernel in 8 of them,
    wrongly, so it is not consulted). Until round 2 "auto" sent NF4 at M = 1 to the FMA kernel;
    ``path="gemv"`` still runs it."""
    return "splitn"


#: the launch decisions memoized per shape (keyed on every argument they read: op, M, N, K, format,
#: arch, SMs, ...): the launchers call them at every launch (round 35: host time). Bounded LRU caches;
#: they read this module's tables when first asked, so whoever changes a table (a test's monkeypatch)
#: calls :func:`clear_launch_caches` after (tests/conftest.py does before every test)
LAUNCH_CACHES = (_choose_default, choose_fused, choose_path, choose_m1_grad)


def clear_launch_caches() -> None:
    """Empty the launch-decision caches (:data:`LAUNCH_CACHES`) and the device facts
    (:func:`qlk.kernels.config.clear_device_caches`): the next launch decides again."""
    for fn in LAUNCH_CACHES:
        fn.cache_clear()
    _config.clear_device_caches()


# ------------------------------------------------------------------------------------------------
# Round 7: program rows of the small-M grouped (MoE) kernels (qlk.kernels.grouped_matmul)
# ------------------------------------------------------------------------------------------------
#: CTAs of the small-M grouped input gradient's tile one SM holds at once in its split-N launch (the
#: one this rule sizes), (fewest, most) over the split launches of bench/moe_estimates.py's run (the
#: analyzer's occupancy, as :data:`RESIDENT` for the dense split kernels), per format class as there
#: (an entry per bit width for the group sizes without one) and per kernel variant: "slot_loop"
#: (program rows < tile slots, ``SLOT_LOOP``: Mixtral at 16 tokens, 10 slots over 8 rows) and
#: "per_slot" (one program row per slot: Qwen3, 128 slots and experts). Fitted by
#: ``python bench/moe_estimates.py --fit-resident bench/results/static-moe-sm80.csv
#: bench/results/static-moe-sm90.csv``. Round 8 refit after round 7's half2 transposed tile, which
#: lowered the registers: sm_80 slot loop INT4 96 registers -> 5 (the table had 3-5), INT2 / INT3 /
#: NF4 128 -> 4, per slot 79-80 -> 6 (NF4 128 -> 4); sm_90 slot loop 206-255 -> 2, per slot 128 -> 4.
#: One range over both variants (sm_80 INT2 (4, 6), sm_90 (2, 4)) would size for occupancies neither
#: launch has: sm_90 Mixtral gate_up would split 4 ways at 2 resident. A tile, format or variant
#: without an entry is launched unsplit. Round 12 refit: sm_80 slot loop INT4 96 -> 128 registers
#: (5 -> 4 resident) once the sentinel tiles left the tile map; sm_90 runs the slot loop at every small
#: M (``grouped_matmul._grad_slot_loop``), so its per-slot entries are round 8's, unused there.
#: Round 21 refit: NF4's half2 lookup took sm_80's per-slot NF4 gradient to the INT formats' 80
#: registers (4 -> 6 resident). Round 23: sm_80's small-M tile on two warps (16x64x128 w2 s3, the dY
#: tile read from shared memory by half as many warps): 6 resident of either variant at the 168
#: registers the cap (:func:`register_cap`) gives them, 0 spills. Round 30: the 32-row small-M tiles
#: (16 < S/E <= 32, ``config.small_tile_rows``), slot loop, fitted from static-moe-t128-160-250 and
#: static-moe-t512-64 (the other entries kept as they were); sm_80's INT3 / NF4 entry is the split
#: launch's 4, not the unsplit one's 6: capped at 6's 168 registers the split launch spilled 88-120 B.
#: The split took sm_80's INT2 / INT3 input gradients at 128 tokens from 0.75-0.81x to 0.83-1.01x.
GROUPED_RESIDENT = {
    (80, 'grad', 'int2'): {'16x64x128 w2 s3': {'per_slot': (6, 6), 'slot_loop': (6, 6)},
                        '32x64x128 w2 s3': {'slot_loop': (4, 4)}},
    (80, 'grad', 'int3'): {'16x64x128 w2 s3': {'per_slot': (6, 6), 'slot_loop': (6, 6)},
                        '32x64x128 w2 s3': {'slot_loop': (4, 4)}},
    (80, 'grad', 'int4'): {'16x64x128 w2 s3': {'per_slot': (6, 6), 'slot_loop': (6, 6)},
                        '32x64x128 w2 s3': {'slot_loop': (4, 4)}},
    (80, 'grad', 'int4g128'): {'16x64x128 w2 s3': {'per_slot': (6, 6), 'slot_loop': (6, 6)},
                            '32x64x128 w2 s3': {'slot_loop': (4, 4)}},
    (80, 'grad', 'int4g32'): {'16x64x128 w2 s3': {'per_slot': (6, 6), 'slot_loop': (6, 6)},
                           '32x64x128 w2 s3': {'slot_loop': (4, 4)}},
    (80, 'grad', 'nf4'): {'16x64x128 w2 s3': {'per_slot': (6, 6), 'slot_loop': (6, 6)},
                       '32x64x128 w2 s3': {'slot_loop': (4, 4)}},
    (90, 'grad', 'int2'): {'16x128x128 w4 s3': {'per_slot': (4, 4), 'slot_loop': (2, 2)},
                        '32x128x128 w4 s3': {'slot_loop': (2, 2)}},
    (90, 'grad', 'int3'): {'16x128x128 w4 s3': {'per_slot': (4, 4), 'slot_loop': (2, 2)},
                        '32x128x128 w4 s3': {'slot_loop': (2, 2)}},
    (90, 'grad', 'int4'): {'16x128x128 w4 s3': {'per_slot': (4, 4), 'slot_loop': (2, 2)},
                        '32x128x128 w4 s3': {'slot_loop': (2, 2)}},
    (90, 'grad', 'int4g128'): {'16x128x128 w4 s3': {'per_slot': (4, 4), 'slot_loop': (2, 2)},
                            '32x128x128 w4 s3': {'slot_loop': (2, 2)}},
    (90, 'grad', 'int4g32'): {'16x128x128 w4 s3': {'per_slot': (4, 4), 'slot_loop': (2, 2)},
                           '32x128x128 w4 s3': {'slot_loop': (2, 2)}},
    (90, 'grad', 'nf4'): {'16x128x128 w4 s3': {'per_slot': (4, 4), 'slot_loop': (2, 2)},
                       '32x128x128 w4 s3': {'slot_loop': (2, 2)}},
}
#: at most this many waves of the resident slots (SMs × resident CTAs) from the split: each slice
#: adds its fp32 partial dX tile (BLOCK_K × BLOCK_M × 4 B of atomics) and its own prologue
GROUPED_SPLIT_WAVES = 4


def grouped_resident(direction: str, label: str, fmt: str, arch: int, slot_loop: bool = True
                     ) -> Optional[tuple[int, int]]:
    """(fewest, most) resident CTAs per SM of the grouped kernel's tile ``label`` for format class
    ``fmt`` (:func:`format_class`) on ``arch``, in its slot-loop variant (``slot_loop``: program rows
    < tile slots) or its program-per-slot one (:data:`GROUPED_RESIDENT`; the bit width's entry for a
    group size without its own), or None."""
    fam = arch_family(arch)
    variant = "slot_loop" if slot_loop else "per_slot"
    for f in (fmt, base_format(fmt)):
        got = GROUPED_RESIDENT.get((fam, direction, f), {}).get(label)
        if got is not None:
            return got.get(variant)
    return None


def register_cap(resident, num_warps: int) -> Optional[int]:
    """The registers a thread may hold so that ``resident`` = (fewest, most) CTAs of ``num_warps``
    warps fit on one SM (65536 registers, allocated in units of 8 a thread), or None (no table entry).

    Why: :data:`GROUPED_RESIDENT` is fitted from the registers ptxas gave the swept launches, and the
    grid is sized by it; ptxas' allocation of the same kernel can differ at another layer (row
    strides not multiples of 16 bytes: more 64-bit address math), e.g. 127 instead of 80 on sm_80's
    NF4 small-M gradient at K = 1408, 4 resident CTAs instead of the 6 the grid was sized for. The
    cap (``maxnreg``) keeps the fitted occupancy; the MoE reports check that it costs no spill."""
    if not resident:
        return None
    per_thread = 65536 // (resident[0] * 32 * num_warps)
    # no cap at ptxas' own limit: a maxnreg of 255 still changes its allocation (more registers)
    return per_thread - per_thread % 8 if per_thread < 255 else None


def grouped_programs(slots: int, num_experts: int, small: bool, cols: int = 1, length: int = 1, block: int = 1,
                     sms: int = 0, resident=None) -> tuple[int, int]:
    """(program rows, slices of the reduction) of a grouped launch over a tile map of ``slots`` tile
    slots: the grid is (program rows, ``cols`` column tiles, slices).

    Program rows. Large M: one per slot. Small M: at most one per expert, each running slots
    t, t + P, ... (the slot bound counts a spare tile per group; a balanced routing has E tiles, so
    program rows past E would only launch CTAs that exit). The CTAs that carry work are then at
    most P·cols, and no choice of P adds any: Mixtral's gate_up input gradient at 16 tokens has
    8 experts × 32 K tiles = 256 on sm_80's 108 SMs (6 resident each: 648 slots, 0.40 of one wave;
    SM balance 256 / (108·3) = 0.79).

    Slices (small M, the input gradient: ``length`` = N reduced in ``block`` steps, ``resident`` =
    :func:`grouped_resident`): the reduction over N is split so that P·cols·split CTAs fill the
    resident slots in close to whole waves, by the dense split kernels' rule
    (:func:`occupancy_split` against the unsplit launch, counts that leave no slice empty), at most
    ⌈:data:`GROUPED_SPLIT_WAVES` · resident · SMs / (P·cols)⌉ slices and at least
    :data:`GRAD_SPLIT_MIN_STEPS` N tiles a slice. Mixtral gate_up on sm_80: 5 slices of 90 N tiles, 1280 CTAs in 1.98 waves of
    648 slots (SM balance 0.99); on sm_90 (132 SMs × 2: 256 CTAs already 0.97 of a wave) 1.
    Without a resident count (an unfitted tile, the forward, the interpreter): 1."""
    if not small:
        return max(1, slots), 1
    programs = max(1, min(slots, num_experts))
    steps = math.ceil(length / block)
    if resident is None or sms <= 0 or steps < 2 * GRAD_SPLIT_MIN_STEPS:
        return programs, 1
    hi = resident if isinstance(resident, int) else resident[1]
    base = programs * cols
    split = occupancy_split(length, block, base, sms, resident, 1, GROUPED_SPLIT_WAVES * hi)
    most = steps // GRAD_SPLIT_MIN_STEPS
    if split > most:  # the largest no-empty-slice count with >= GRAD_SPLIT_MIN_STEPS tiles a slice
        split = math.ceil(steps / math.ceil(steps / most))
    return programs, split


# ------------------------------------------------------------------------------------------------
# Round 23: sm_80's QA-LoRA grouped forward at large M, chosen by its waves
# ------------------------------------------------------------------------------------------------
#: sm_80's folded (QA-LoRA: fp32 folded biases, pooling in the kernel) grouped forward at large M:
#: (tile, efficiency per bit width at an even grid). The 256-column tile on 8 warps is the dense
#: QA-LoRA GEMM's (the 4-warp 128x128x32 tile spills 8-32 B at INT3 g128 / INT4 g128 with the
#: folded biases); the 64-column tile on 4 warps holds 216-229 registers (two CTAs an SM) and
#: spills in no format. Efficiencies: the midpoint of the analyzer's optimistic and pessimistic
#: tensor-peak fractions divided by the grid's SM balance (:func:`sm_balance`), the median over
#: every MoE report's layer at 4096 and 512 tokens (bench/moe_estimates.py's layers, each tile
#: forced, round 23; spread ±0.005): 256 columns 0.807 INT4 (0.99..0.61 at an even grid), 0.788
#: INT3, 0.807 INT2; 64 columns 0.757 INT4 g32, 0.731 g128 (the entry of the other group sizes), 0.631 INT3
#: (issue-bound on its decoder), 0.766 INT2. The smaller tile loses 5-20 % on an even grid and wins
#: where the big tile's grid is short: Mixtral's down projection at 512 tokens has 8 M tiles × 16 N
#: tiles = 128 CTAs on 108 SMs (balance 0.59), the 64-column tile 512 (0.79).
GROUPED_FOLDED_FWD_SM80 = (
    (dict(BLOCK_N=256, BLOCK_M=128, BLOCK_K=32, num_warps=8, num_stages=3), {"int2": 0.807, "int3": 0.788, "int4": 0.807}),
    (dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=3),
     {"int2": 0.766, "int3": 0.631, "int4": 0.731, "int4g32": 0.757}),
)
#: the 64-column tile must score this much higher: twice the fit's spread, so that a grid the two
#: tiles fill about as evenly keeps the tile with the better pessimistic end (0.61 against 0.53)
GROUPED_FOLDED_FWD_MARGIN = 1.02


def grouped_folded_fwd_tile(m_tiles: int, n: int, fmt: str, sms: int) -> dict:
    """sm_80's tile for QA-LoRA's folded grouped forward at large M: the entry of
    :data:`GROUPED_FOLDED_FWD_SM80` with the highest ``efficiency(bits) × sm_balance(CTAs)``, CTAs =
    m_tiles · ⌈n / BLOCK_N⌉ (``m_tiles``: the tiles of 128 rows the routing fills, known on the host
    from S and E without a sync; both tiles have 128 rows, so the tile map is the same), the
    64-column tile only where its score is :data:`GROUPED_FOLDED_FWD_MARGIN` times the 256-column
    one's. ``fmt``: :func:`format_class` with the group size ("int4g32"); a class without an entry
    takes its bit width's, a bit width without one the entry's lowest efficiency."""
    def score(entry):
        cfg, eff = entry
        e = eff.get(fmt, eff.get(base_format(fmt), min(eff.values())))
        return e * sm_balance(max(1, m_tiles) * -(-n // cfg["BLOCK_N"]), max(1, sms))
    wide, narrow = GROUPED_FOLDED_FWD_SM80
    return dict((narrow if score(narrow) > GROUPED_FOLDED_FWD_MARGIN * score(wide) else wide)[0])

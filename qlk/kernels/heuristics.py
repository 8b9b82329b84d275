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

**Path rule** (:func:`choose_path`): at M > 16, the fused kernel or dequantize (Ŵ written once
in the activation dtype, :mod:`qlk.kernels.dequant`) then a dense GEMM, whichever the static model
says is faster::

    t_fused   = MACs / (peak · score_fused)
    t_dequant = bytes(packed Ŵ + scales + Ŵ written) / (DRAM · 0.8) + MACs / (peak · score_dense)

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
DENSE_TILES = {
    90: {(128, 256, 8): (1.0, 0.70), (128, 128, 4): (1.0, 0.64), (64, 128, 4): (1.0, 0.55)},
    80: {(128, 256, 8): (1.0, 0.59), (128, 128, 4): (1.0, 0.57), (64, 128, 4): (0.88, 0.47)},
}
#: share of the DRAM bandwidth the standalone dequantize kernel is assumed to reach
DEQUANT_DRAM_SHARE = 0.8


def arch_family(arch: int) -> int:
    """90 for Hopper and newer, 80 otherwise (also for an unknown arch, 0)."""
    return 90 if arch >= 90 else 80


def format_class(bits: int, is_nf4: bool) -> str:
    return "nf4" if is_nf4 else f"int{bits}"


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
    split: int  # slices of the split kernels' reduction; 1 for the GEMMs
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


def split_count(length: int, block: int, base_ctas: int, sms: int, ctas_per_sm: int = 16) -> int:
    """Slices of a split reduction over ``length`` in ``block`` steps: ≈ ``ctas_per_sm`` CTAs per
    SM (a small last wave with 4-6 resident per SM), at most one slice per step."""
    return max(1, min(math.ceil(length / block), math.ceil(ctas_per_sm * sms / base_ctas)))


def _fits(c, arch: int, fp32_bias: bool, op: str, pool: bool = False) -> bool:
    k = c.kwargs
    if getattr(c, "qlk_arch", None) not in (None, arch_family(arch)):
        return False
    if _config._smem_estimate(c) > _config.SMEM_LIMIT.get(arch, _config.SMEM_LIMIT[arch_family(arch)]):
        return False
    rows = k["BLOCK_K"] if op in ("grad", "splitn") else k["BLOCK_N"]
    if rows * k["BLOCK_M"] > 128 * 32 * c.num_warps:  # fp32 accumulator registers per thread
        return False
    # QA-LoRA's in-GEMM pooling keeps a running sum per column: more than one column per thread
    # spills (sm_90 256x64x64 w4 with POOL: 80-168 B stack)
    if pool and op in ("fwd", "splitk") and k["BLOCK_M"] > 32 * c.num_warps:
        return False
    # QA-LoRA's fp32 folded biases: the 256-row split-N tile spills with them (docs/kernels.md)
    return not (op == "splitn" and fp32_bias and k["BLOCK_N"] > 128)


def gemm_tile_eff(rows: int, cols: int, warps: int, arch: int, fmt: str = "int4", grad: bool = False
                  ) -> tuple[float, float]:
    """(optimistic, pessimistic) main-loop efficiency of a fused GEMM tile (module docstring)."""
    a = ARCH[arch_family(arch)]
    units = max(warps // a.warps_per_mma_unit, 1)
    dup = units / min(units, max(rows // a.rows_per_mma_unit, 1))
    d = FORMAT_COST.get(fmt, 1.0) * (a.grad_cost if grad else 1.0)
    a_pess = a.a_pess + (a.a_single if units == 1 else 0.0)
    return min(1.0, cols / (a.c_opt * dup * d)), 1.0 / (1.0 + a_pess + a.c_pess * dup * d / cols)


def _score(op, c, m, n, k, fmt, arch, sms):
    kw = c.kwargs
    bn, bm, bk = kw["BLOCK_N"], kw["BLOCK_M"], kw["BLOCK_K"]
    if op == "fwd":
        tiles_m, tiles_o = math.ceil(m / bm), math.ceil(n / bn)
        ctas, split = tiles_m * tiles_o, 1
        fill = m * n / (tiles_m * bm * tiles_o * bn)
        eff = sum(gemm_tile_eff(bn, bm, c.num_warps, arch, fmt)) / 2
    elif op == "grad":
        tiles_m, tiles_o = math.ceil(m / bm), math.ceil(k / bk)
        ctas, split = tiles_m * tiles_o, 1
        fill = m * k / (tiles_m * bm * tiles_o * bk)
        eff = sum(gemm_tile_eff(bk, bm, c.num_warps, arch, fmt, grad=True)) / 2
    else:  # split kernels: the padding of BLOCK_M = 16 rows is the same for every candidate
        if op == "splitk":
            base, length, block = math.ceil(n / bn) * math.ceil(m / bm), k, bk
        else:
            base, length, block = math.ceil(k / bk) * math.ceil(m / bm), n, bn
        split = split_count(length, block, base, sms)
        ctas, fill = base * split, 1.0
        e = bn * bk
        eff = e / (e + 4096)
    bal = sm_balance(ctas, sms)
    return KernelChoice(op, bn, bm, bk, kw.get("GROUP_M"), c.num_warps, c.num_stages, split, ctas, bal, fill,
                        eff, eff * bal * fill, -1)


def score_all(op: str, m: int, n: int, k: int, fmt: str = "int4", arch: int = 90, sms: Optional[int] = None,
              configs: Optional[Sequence] = None, fp32_bias: bool = False, pool: bool = False
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
        if _fits(c, arch, fp32_bias, op, pool):
            out.append(dataclasses.replace(_score(op, c, m, n, k, fmt, arch, sms), index=i))
    return out


def choose_config(op: str, m: int, n: int, k: int, fmt: str = "int4", arch: int = 90, sms: Optional[int] = None,
                  configs: Optional[Sequence] = None, fp32_bias: bool = False, pool: bool = False
                  ) -> KernelChoice:
    """The tile ``op`` ("fwd", "grad", "splitk", "splitn") launches with at Y[M, N] = X[M, K]·Ŵᵀ
    (the gradient ops: the same M, N, K of the layer) on ``arch`` with ``sms`` SMs: the candidate
    with the highest score (module docstring), on ties the bigger tile (fewer CTAs), then the earlier one. If none fits, the first
    candidate (as the pruning of the autotuner did). ``fp32_bias`` / ``pool``: QA-LoRA's fp32
    folded biases / in-kernel pooling (tiles that spill with them are left out)."""
    if configs is None:
        return _choose_default(op, m, n, k, fmt, arch, sms, fp32_bias, pool)
    return _choose(op, m, n, k, fmt, arch, sms, configs, fp32_bias, pool)


def _choose(op, m, n, k, fmt, arch, sms, configs, fp32_bias, pool):
    scored = score_all(op, m, n, k, fmt, arch, sms, configs, fp32_bias, pool)
    if not scored:
        sms = sms or DEFAULT_SMS[arch_family(arch)]
        configs = candidates(op) if configs is None else configs
        return dataclasses.replace(_score(op, configs[0], m, n, k, fmt, arch, sms), index=0)
    # equal scores: the bigger tile (fewer CTAs; the analyzer ranks it first on sm_90, e.g. 256x128 w8
    # over 256x64 w4 at M = 4096), then list order
    return max(scored, key=lambda s: (round(s.score, 6), -s.ctas, -s.index))


@functools.lru_cache(maxsize=4096)
def _choose_default(op, m, n, k, fmt, arch, sms, fp32_bias, pool):
    return _choose(op, m, n, k, fmt, arch, sms, None, fp32_bias, pool)


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


def dense_score(m: int, n_out: int, arch: int, sms: Optional[int] = None) -> float:
    """Best score of the dense GEMM's tiles (:data:`DENSE_TILES`) for an [m, n_out] output."""
    fam = arch_family(arch)
    sms = sms or DEFAULT_SMS[fam]
    best = 0.0
    for (bm, bn, _warps), (opt, pess) in DENSE_TILES[fam].items():
        tm, tn = math.ceil(m / bm), math.ceil(n_out / bn)
        fill = m * n_out / (tm * bm * tn * bn)
        best = max(best, (opt + pess) / 2 * sm_balance(tm * tn, sms) * fill)
    return best


def weight_bytes(n: int, k: int, bits: int, group_size: int, is_nf4: bool) -> float:
    """Bytes of a packed weight: codes plus one 2-byte scale and bias per group (NF4: one absmax
    byte per block with double quant, about the same)."""
    codes = n * k * (4 if is_nf4 else bits) / 8
    return codes + n * math.ceil(k / max(group_size, 1)) * (1 if is_nf4 else 4)


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
    fmt = format_class(bits, is_nf4)
    macs = m * n * k
    packed = weight_bytes(n, k, bits, group_size, is_nf4)
    if m <= 16:
        kind = "splitk" if op == "fwd" else "splitn"
        choice = choose_config(kind, m, n, k, fmt, fam, sms)
        t_fused = packed / (a.dram_bytes_per_s * choice.score)
    else:
        choice = choose_config(op, m, n, k, fmt, fam, sms)
        t_fused = max(macs / (a.macs_per_s * choice.score), packed / a.dram_bytes_per_s)
    out_cols = n if op == "fwd" else k
    ds = dense_score(m, out_cols, fam, sms)
    t_deq = (packed + n * k * act_bytes) / (a.dram_bytes_per_s * DEQUANT_DRAM_SHARE)
    t_dense = max(macs / (a.macs_per_s * ds), n * k * act_bytes / a.dram_bytes_per_s)
    t_dequant = t_deq + t_dense
    path = "fused" if m <= 16 or t_fused <= t_dequant else "dequant"
    return PathChoice(path, t_fused, t_dequant, choice, ds)

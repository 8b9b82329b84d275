"""The config rules and the fused-vs-dequantize dispatcher (qlk/kernels/heuristics.py).

The rules are pure functions of (op, M, N, K, format, arch, SMs, candidate list): tested on
explicit candidate lists, so they run the same with or without the interpreter. The launchers are
checked to pass the chosen tile to the kernel, and both paths of the dispatcher (fused kernel,
dequantize + dense GEMM) are checked against float64 oracles under the interpreter.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import oracles
import qlk
from qlk.kernels import fused_matmul as fm
from qlk.kernels import heuristics as h
from qlk.kernels.config import _cfg

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"

# a generic candidate list (not today's config.py): big, narrow, small tiles for sm_90 and sm_80
FWD = [
    _cfg(90, 8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_M=8),
    _cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
    _cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, GROUP_M=8),
    _cfg(80, 8, 3, BLOCK_N=256, BLOCK_M=128, BLOCK_K=32, GROUP_M=8),
    _cfg(80, 4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, GROUP_M=8),
]
SPLIT = [_cfg(None, 4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128), _cfg(None, 4, 3, BLOCK_N=64, BLOCK_M=16, BLOCK_K=256)]


def test_wave_balance_and_fill_are_the_documented_formulas():
    assert h.sm_balance(64, 132) == pytest.approx(64 / 132)
    assert h.sm_balance(264, 132) == 1.0 and h.sm_balance(133, 132) == pytest.approx(133 / 264)
    c = h.score_all("fwd", 333, 2048, 2048, arch=90, sms=132, configs=FWD[:1])[0]
    # 2 x 16 output tiles on 132 SMs: the K loop split 4 ways (heuristics.fwd_split, round 6); fill
    # holds the workspace passes' share of the time (heuristics.fwd_split_share)
    assert c.split == h.fwd_split(2048, 64, h.format_group("int4"), 2 * 16, 132) == 4
    share = h.fwd_split_share(333, 2048, 2048, 4, c.tile_eff * c.sm_balance * 333 / 512, 90)
    assert 0.5 < share < 0.9 and (c.ctas, c.fill) == (2 * 16 * 4, pytest.approx(333 / 512 * share))
    c = h.score_all("fwd", 4096, 2048, 2048, arch=90, sms=132, configs=FWD[:1])[0]
    assert (c.split, c.ctas, c.fill) == (1, 16 * 16, 1.0)
    assert c.score == pytest.approx(c.tile_eff * c.sm_balance * c.fill)


def test_big_shapes_take_the_big_tile_narrow_and_mid_shapes_a_smaller_one():
    big = h.choose_config("fwd", 8192, 14336, 4096, arch=90, sms=132, configs=FWD)
    assert (big.block_n, big.block_m, big.index) == (128, 256, 0)
    # GQA k/v projection: 128x256 tiles give 8x8 = 64 CTAs on 132 SMs (48 % busy): a smaller tile
    # (the big one with its K loop split would fill them too, but its workspace passes cost more)
    narrow = h.choose_config("fwd", 2048, 1024, 4096, arch=90, sms=132, configs=FWD)
    assert narrow.index != 0 and narrow.ctas >= 132 and narrow.sm_balance > 0.9
    mid = h.choose_config("fwd", 333, 2048, 2048, arch=90, sms=132, configs=FWD)
    assert mid.index != 0 and mid.score > h.score_all("fwd", 333, 2048, 2048, arch=90, sms=132, configs=FWD)[0].score


def test_only_the_targets_candidates_that_fit():
    for arch in (90, 80, 86, 0):
        c = h.choose_config("fwd", 4096, 4096, 4096, arch=arch, sms=100, configs=FWD)
        assert FWD[c.index].qlk_arch == h.arch_family(arch)
    too_big = _cfg(90, 4, 8, BLOCK_N=256, BLOCK_M=256, BLOCK_K=256, GROUP_M=8)  # smem and 512 acc regs/thread
    got = h.score_all("fwd", 4096, 4096, 4096, arch=90, sms=132, configs=[too_big] + FWD)
    assert got and all(s.index != 0 for s in got)
    # QA-LoRA's fp32 biases: no split-N tile over 128 rows
    wide = [_cfg(None, 4, 3, BLOCK_N=256, BLOCK_M=16, BLOCK_K=64), _cfg(None, 4, 3, BLOCK_N=128, BLOCK_M=16, BLOCK_K=64)]
    assert h.choose_config("splitn", 1, 4096, 4096, arch=90, sms=132, configs=wide, fp32_bias=True).index == 1
    # ... and no two-warp GEMM input gradient (round 9's 64x64x128 w2 spills with them and V = dY·B),
    # which plain dY·Ŵ takes at this shape
    two = [_cfg(80, 2, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
           _cfg(80, 4, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, GROUP_M=8)]
    assert h.choose_config("grad", 2048, 2048, 2048, arch=80, sms=108, configs=two).index == 0
    assert h.choose_config("grad", 2048, 2048, 2048, arch=80, sms=108, configs=two, fp32_bias=True).index == 1
    assert all(h.choose_config("grad", m, 14336, 4096, "int4g32", 80, 108, fp32_bias=True).num_warps >= 4
               for m in (256, 333, 4096))
    # QA-LoRA's pooled forward: the two-warp 64x128x32 tile runs unsplit (its split spills with the
    # pooling, heuristics.FWD_SPLIT_SPILLS_POOL), which plain X·Ŵᵀ splits at this shape
    w2 = [_cfg(80, 2, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, GROUP_M=8)]
    plain = h.choose_config("fwd", 333, 1024, 4096, "int4g128", 80, 108, configs=w2)
    pooled = h.choose_config("fwd", 333, 1024, 4096, "int4g128", 80, 108, configs=w2, fp32_bias=True, pool=True)
    assert (plain.split, pooled.split) == (2, 1)
    for m, n, k in ((333, 1024, 4096), (333, 2048, 2048), (256, 1024, 3072), (2048, 512, 2048)):
        c = h.choose_config("fwd", m, n, k, "int4g128", 80, 108, fp32_bias=True, pool=True)
        assert c.num_warps >= 4 or c.split == 1, (m, n, k, c)
    # NF4's half2 lookup: the four-warp 64x128x32 tile runs unsplit for NF4 (its split spills,
    # heuristics.FWD_SPLIT_SPILLS_FORMAT), which INT4 splits at the same shape
    w4 = [_cfg(80, 4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, GROUP_M=8)]
    assert h.choose_config("fwd", 333, 512, 2048, "int4g128", 80, 108, configs=w4).split > 1
    assert h.choose_config("fwd", 333, 512, 2048, "nf4", 80, 108, configs=w4).split == 1
    # QA-LoRA's pooling: at most one pooled column per thread (256 columns on 4 warps spill)
    narrow = [_cfg(90, 4, 3, BLOCK_N=64, BLOCK_M=256, BLOCK_K=64, GROUP_M=8), FWD[1]]
    assert h.choose_config("fwd", 2048, 1024, 4096, arch=90, sms=132, configs=narrow).index == 0
    assert h.choose_config("fwd", 2048, 1024, 4096, arch=90, sms=132, configs=narrow, pool=True).index == 1
    # nothing fits: the first candidate, as the autotuner's pruning did
    assert h.choose_config("fwd", 64, 64, 64, arch=90, sms=132, configs=[too_big]).index == 0


def test_choice_is_a_candidate_deterministic_and_its_meta_is_the_candidates(device_lists):
    for op in ("fwd", "grad", "splitk", "splitn"):
        for m, n, k in ((1, 512, 2048), (16, 14336, 4096), (333, 2048, 2048), (8192, 1024, 8192)):
            for arch in (90, 80):
                a = h.choose_config(op, m, n, k, "int4", arch, 132)
                assert a == h.choose_config(op, m, n, k, "int4", arch, 132)
                cand = h.candidates(op)[a.index]
                meta = dict(cand.kwargs, num_warps=cand.num_warps, num_stages=cand.num_stages)
                assert a.meta == meta


def test_split_kernels_follow_the_split_rule_and_prefer_long_steps():
    c = h.choose_config("splitk", 1, 14336, 4096, arch=90, sms=132, configs=SPLIT)
    assert c.block_k == 256  # 64x256 weight elements per step: e/(e+4096) = 0.8 vs 0.67
    base = math.ceil(14336 / 64)
    steps = 4096 // 256
    target = max(1, min(steps, math.ceil(16 * 132 / base)))  # 10 slices of ⌈16/10⌉ = 2 steps: 2 idle
    # round 3: no idle slice (the count without occupancy)
    assert h.split_count(4096, 256, base, 132) == math.ceil(steps / math.ceil(steps / target)) == 8
    # round 6: 4 CTAs of 16x64x256 resident per SM (RESIDENT): 8 slices fill 528 slots 3.39 times
    # (slot wave 0.85), 16 slices 6.79 times (0.97) at the same SM balance and busy share
    assert h.resident_ctas("splitk", SPLIT[1], "int4", 90) == (4, 4)
    assert c.split == 16 and h.slot_wave(c.ctas, 4 * 132) == pytest.approx(3584 / 3696)
    assert c.fill == h.split_busy(4096, 256, 16) == 1.0
    assert h.split_count(480, 64, 3, 1) == 4 and h.split_count(4096, 128, 4096, 132) == 1


#: the decode layers of the round-6 table (docs/kernels.md "Decode, round 5"): K -> N
_DECODE_SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672), (4096, 1024))


def _worst_wave(ctas, sms, resident):
    lo, hi = resident
    return min(h.slot_wave(ctas, sms * r) for r in range(lo, hi + 1))


@pytest.mark.parametrize("op", ["splitk", "splitn"])
def test_occupancy_split_fills_the_resident_slots(op, device_lists):
    """Round 6: with the candidates' resident CTAs per SM (RESIDENT) the split count leaves no
    slice empty, never lowers the SM balance x busy share of the ≈ 16-per-SM count (what the
    analyzer's DRAM estimate scales by), and its balance x busy x slot wave is at least that
    count's; on sm_90 4096->14336 (the issue's decode shape) the slot wave reaches 0.97 (0.85)."""
    for arch in (90, 80):
        sms = h.DEFAULT_SMS[arch]
        for k, n in _DECODE_SHAPES:
            for m in (1, 16):
                for fmt in ("int4g32", "int4g128", "int3g128", "int2g32", "nf4"):
                    for c in h.candidates(op):
                        resident = h.resident_ctas(op, c, fmt, arch)
                        if c.qlk_arch != arch or resident is None:
                            continue
                        kw = c.kwargs
                        if op == "splitk":
                            length, block, base = k, kw["BLOCK_K"], math.ceil(n / kw["BLOCK_N"])
                        else:
                            length, block, base = n, kw["BLOCK_N"], math.ceil(k / kw["BLOCK_K"])
                        old = h.split_count(length, block, base, sms)
                        new = h.split_count(length, block, base, sms, resident=resident)
                        steps = math.ceil(length / block)
                        assert 1 <= new <= steps and (new - 1) * math.ceil(steps / new) < steps  # no empty slice

                        def bb(s):
                            return h.sm_balance(base * s, sms) * h.split_busy(length, block, s)

                        assert bb(new) >= bb(old) - 1e-9, (arch, op, k, n, fmt, old, new)
                        assert bb(new) * _worst_wave(base * new, sms, resident) >= \
                            bb(old) * _worst_wave(base * old, sms, resident) - 0.005, (arch, op, k, n, fmt, old, new)
    if op == "splitk":
        for fmt in ("int4g32", "int4g128", "int3g128", "int2g32"):
            c = h.choose_config("splitk", 1, 14336, 4096, fmt, 90, 132)
            resident = h.resident_ctas("splitk", h.candidates("splitk")[c.index], fmt, 90)
            assert _worst_wave(c.ctas, 132, resident) >= 0.9, (fmt, c)


@pytest.mark.parametrize("fmt", ["int4g32", "int4g128", "int3", "int2"])
def test_short_reduction_takes_the_narrow_split_step(fmt, device_lists):
    """Round 14: the input gradient of a 896→128 layer (Qwen2.5-0.5B's k/v projection) reduces over
    N = 128. The sm_90 split-N candidates step 128 or 256 rows of N at a time; the 256-row step is
    half padding, and the static analyzer has it at 0.53-0.55 of the 128-row step's speed at M = 1
    and 5 (bench/results/static-oos-sm90). Its score counts only the share that holds data, so the
    rules take the 128-row step there, and a reduction at least a step long keeps its score."""
    assert h.short_reduction_fill(128, 256) == 0.5
    assert h.short_reduction_fill(192, 256) == 0.75
    assert h.short_reduction_fill(256, 256) == h.short_reduction_fill(576, 256) == 1.0
    for m in (1, 5, 16):
        assert h.choose_config("splitn", m, 128, 896, fmt, 90).label == "16x128x64 w4 s3", (fmt, m)
    wide = {c.label: c for c in h.score_all("splitn", 1, 1024, 896, fmt, 90)}
    narrow = {c.label: c for c in h.score_all("splitn", 1, 128, 896, fmt, 90)}
    assert narrow["16x256x64 w4 s3"].fill == pytest.approx(0.5 * wide["16x256x64 w4 s3"].fill / h.split_busy(
        1024, 256, wide["16x256x64 w4 s3"].split))


def test_split_count_without_occupancy_is_the_round3_rule():
    """A candidate without a RESIDENT entry (the interpreter's, a new tile) keeps the ≈ 16-per-SM
    count; with one the count may differ (4096->14336 on sm_90: 8 -> 16 slices)."""
    interp = _cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)
    assert h.resident_ctas("splitk", interp, "int4g32", 90) is None
    c = h.score_all("splitk", 1, 14336, 4096, "int4g32", 90, 132, configs=[interp])[0]
    assert c.split == h.split_count(4096, 64, math.ceil(14336 / 32), 132)
    assert h.split_count(4096, 256, 224, 132) == 8 and h.split_count(4096, 256, 224, 132, resident=4) == 16
    # a range of resident CTAs: the worst slot wave over it (NF4 split-N on sm_90 keeps 3 or 4 CTAs of
    # 16x128x64 by shape; 64 K tiles x 8 slices = 512 CTAs: 0.97 at 4, 0.65 at 3; 4 slices: 0.48 at 4)
    assert h.split_count(1024, 128, 64, 132, resident=(3, 4)) == 8
    assert h.slot_wave(1792, 528) == pytest.approx(1792 / 2112) and h.slot_wave(3584, 528) == pytest.approx(3584 / 3696)


def test_tile_model_reproduces_its_calibration_points():
    """sm_90 256x128 w8 (INT4, 4096->14336 M=4096) 0.97..0.62 / 0.97 wave; sm_80 128x256 w8 0.97..0.49."""
    opt, pess = h.gemm_tile_eff(128, 256, 8, 90)
    assert opt == 1.0 and pess == pytest.approx(0.62 / 0.97, abs=0.03)
    opt, pess = h.gemm_tile_eff(128, 128, 8, 90)
    assert opt == pytest.approx(0.90 / 0.97, abs=0.03) and pess == pytest.approx(0.47 / 0.97, abs=0.03)
    opt, pess = h.gemm_tile_eff(256, 128, 8, 80)
    assert opt == 1.0 and pess == pytest.approx(0.49 / 0.976, abs=0.03)
    opt, pess = h.gemm_tile_eff(64, 256, 4, 90)  # one warpgroup: 0.97..0.57
    assert opt == 1.0 and pess == pytest.approx(0.57 / 0.97, abs=0.03)
    # round 2: NF4 + double quant at the INT4 level (0.97..0.64), the sm_90 input gradient's
    # 256x64x128 w8 tile 0.97..0.59 (rows 128, cols 256), sm_80's 256x32x128 w8 0.95..0.54
    assert h.gemm_tile_eff(128, 256, 8, 90, "nf4") == h.gemm_tile_eff(128, 256, 8, 90)
    opt, pess = h.gemm_tile_eff(128, 256, 8, 90, grad=True)
    assert opt == 1.0 and pess == pytest.approx(0.59 / 0.97, abs=0.03)
    opt, pess = h.gemm_tile_eff(128, 256, 8, 80, grad=True)
    assert opt == 1.0 and pess == pytest.approx(0.54 / 0.95, abs=0.03)


@pytest.fixture
def device_lists(monkeypatch):
    """config.py's GPU candidate lists even under the interpreter (the rules' cache cleared around)."""
    from qlk.kernels import config

    h._choose_default.cache_clear()
    h.choose_path.cache_clear()
    monkeypatch.setattr(config, "INTERPRETED", False)
    yield
    h._choose_default.cache_clear()
    h.choose_path.cache_clear()


def test_dispatcher_rule(device_lists):
    with pytest.raises(ValueError, match="op="):
        h.choose_path("splitk", 16, 1024, 1024)
    with pytest.raises(ValueError, match="op="):
        h.choose_config("gemv", 16, 1024, 1024)
    for op in ("fwd", "grad"):
        for arch in (90, 80):
            assert h.choose_path(op, 1, 4096, 4096, arch=arch).path == "fused"
            assert h.choose_path(op, 16, 14336, 4096, is_nf4=True, arch=arch).path == "fused"
    # INT4 and NF4 at the training shape on sm_90: the fused GEMMs (no 2 B/weight round trip);
    # INT3 on sm_80 too since round 7 (the rebuilt half2 tile: 0.91..0.47 at M = 4096, was 0.72..0.41
    # and dequantize + dense). Since round 9's two-warp sm_80 tiles the 2-4-bit fused kernels are
    # estimated faster at the Llama-family shapes up to M = 16384 (round 8: NF4's GQA k/v forward at
    # M = 2048 and the INT3 input gradient on 2048-wide layers at M = 4096 took dequantize + dense);
    # INT8 at M = 65536 still does (the dequantize pass amortized, fused 1.07x its time)
    for op in ("fwd", "grad"):
        assert h.choose_path(op, 4096, 14336, 4096, bits=4, arch=90).path == "fused"
        assert h.choose_path(op, 4096, 14336, 4096, is_nf4=True, group_size=64, arch=90).path == "fused"
    assert h.choose_path("fwd", 4096, 14336, 4096, bits=3, arch=80).path == "fused"
    assert h.choose_path("fwd", 2048, 1024, 4096, is_nf4=True, group_size=64, arch=80).path == "fused"
    assert h.choose_path("grad", 4096, 2048, 2048, bits=3, group_size=128, arch=80).path == "fused"
    p = h.choose_path("fwd", 65536, 4096, 4096, bits=8, group_size=128, arch=80)
    assert p.path == "dequant" and p.t_dequant < p.t_fused
    # the rule is the comparison of the two estimated times
    for m in (17, 333, 2048, 8192):
        p = h.choose_path("grad", m, 1024, 4096, bits=3, arch=80)
        assert (p.path == "fused") == (p.t_fused <= p.t_dequant) and p.t_fused > 0 and p.t_dequant > 0


class _Spy:
    """Stands in for a kernel: records the launch's keyword arguments, then launches."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
def test_launchers_pass_the_chosen_tile(monkeypatch):
    qw = qlk.quantize(torch.randn(72, 256), bits=4, group_size=32).to(DEVICE)
    calls = []
    for name in ("_quant_matmul_fwd_kernel", "_quant_matmul_splitk_kernel", "_quant_matmul_grad_input_kernel",
                 "_quant_matmul_grad_input_splitn_kernel"):
        monkeypatch.setattr(fm, name, _Spy(getattr(fm, name), calls))
    monkeypatch.setattr(fm, "CHOICE_LOG", [])
    monkeypatch.setattr(fm, "num_sms", lambda device: 2)
    for m in (5, 40):
        fm.quant_matmul_forward(torch.randn(m, 256, device=DEVICE), qw, path="fused")
        fm.quant_matmul_grad_input(torch.randn(m, 72, device=DEVICE), qw, path="fused")
    assert [op for op, _ in fm.CHOICE_LOG] == ["splitk", "splitn", "fwd", "grad"]
    assert len(calls) == 4  # one launch each: no autotuning
    for (op, choice), (grid, kwargs) in zip(fm.CHOICE_LOG, calls):
        m = 5 if op.startswith("split") else 40
        want = h.choose_config(op, m, 72, 256, "int4", fm.target_arch(), 2)
        assert choice == want
        assert {k: kwargs[k] for k in want.meta} == want.meta
        if op.startswith("split"):
            assert grid[1] == want.split


class _Asked(Exception):
    pass


class _Stop:
    """Stands in for a kernel: records the launch's keyword arguments, then stops the call."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            raise _Asked

        return launch


@pytest.mark.parametrize("tile,bits,want", [
    (dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8), 3, False),  # 128 chunks for 256 threads
    (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4), 3, False),  # 64 for 128
    (dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, num_warps=8), 3, True),  # a chunk a thread
    (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4), 3, True),
    (dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8), 4, True),  # INT4: 16-byte rows of a word
    (dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8), 2, True)],
    ids=["int3-256x64x64w8", "int3-64x32x64w4", "int3-256x64x128w8", "int3-128x64x64w4", "int4-256x64x64w8",
         "int2-256x64x64w8"])
def test_int3_b_operand_tile_needs_a_chunk_per_thread(tile, bits, want, monkeypatch):
    """The GEMM input gradient's launch passes W_AS_B per tile on sm_90 (never on sm_80): INT3's
    B-operand tile decodes a 32-column chunk per thread, so a tile with fewer chunks than threads
    keeps the Ŵᵀ tile (tests/test_kernel_static.py checks why: the split chunk is stored element by
    element). INT2/INT4 take it on every tile. Nothing is launched."""
    qw = qlk.quantize(torch.randn(64, 256), bits=bits, group_size=128 if bits == 3 else 32)
    cfg = _cfg(None, tile.pop("num_warps"), 3, GROUP_M=8, **tile)
    real = h.candidates
    monkeypatch.setattr(h, "candidates", lambda op: [cfg] if op == "grad" else real(op))
    h._choose_default.cache_clear()
    calls = []
    monkeypatch.setattr(fm, "_quant_matmul_grad_input_kernel", _Stop(calls))
    try:
        for arch in (90, 80):
            monkeypatch.setattr(fm, "target_arch", lambda: arch)
            with pytest.raises(_Asked):
                fm.quant_matmul_grad_input(torch.randn(300, 64, dtype=torch.half), qw, path="gemm")
    finally:
        h._choose_default.cache_clear()
    assert [c["W_AS_B"] for c in calls] == [want, False]
    assert calls[0]["BLOCK_N"] == tile["BLOCK_N"] and calls[0]["BLOCK_K"] == tile["BLOCK_K"]


@pytest.mark.parametrize("fmt", ["int4g32", "int3g128", "int2g32", "nf4dq", "nf4"])
def test_grad_launchers_ask_the_rules_as_the_report_checks(monkeypatch, fmt):
    """The input-gradient launchers ask the rules with the arguments the static report's check
    (bench/static_report.py ``_rules_check``) and fit assume: the GEMM with fp32_bias only for
    QA-LoRA's fp32 folded biases, never for NF4 (whose bias argument is an fp32 placeholder: counted
    as biases it kept every NF4 input gradient off sm_80's two-warp tile, 0.85x dense at M = 500),
    split-N neither (round 32: it had kept NF4 off the 256-row split-N tiles, which compile without a
    spill for NF4, the one-slice tiles of narrow layers). Nothing is launched: the query is recorded
    and the launch stopped."""
    asked = []

    def tiles(op, m, n, k, meta, device, fp32_bias=False, pool=False, act_bytes=2):
        asked.append((op, fp32_bias))
        raise _Asked

    monkeypatch.setattr(fm, "_tiles", tiles)
    w = torch.randn(64, 256)
    if fmt.startswith("nf4"):
        qw = qlk.quantize(w, fmt="nf4", group_size=64, double_quant=fmt == "nf4dq")
    else:
        qw = qlk.quantize(w, bits=int(fmt[3]), group_size=int(fmt[5:]))
    for path, m in (("gemm", 40), ("splitn", 5)):
        with pytest.raises(_Asked):
            fm.quant_matmul_grad_input(torch.randn(m, 64), qw, path=path)
    assert asked == [("grad", False), ("splitn", False)]
    if not fmt.startswith("nf4"):  # QA-LoRA: fp32 folded biases on the GEMM path
        from qlk.kernels import qalora

        asked.clear()
        lora_a, lora_b = torch.randn(8, 256 // qw.group_size), torch.randn(64, 8)
        with pytest.raises(_Asked):
            qalora.qalora_grad_input(torch.randn(40, 64), qw, lora_a, lora_b, 0.5, path="gemm")
        assert asked == [("grad", True)]


@pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits,g,perm", [(4, 32, False), (3, 48, True)], ids=["int4g32", "int3g48-actorder"])
def test_dispatcher_paths_against_float64(bits, g, perm):
    n, k, m = 72, 192, 37
    gen = torch.Generator().manual_seed(bits * 100 + g)
    qw = qlk.quantize(torch.randn(n, k, generator=gen), bits=bits, group_size=g)
    w64 = oracles.int_dequant64(qw)
    p = torch.randperm(k, generator=gen) if perm else None
    if perm:
        qw.perm = p
    qw = qw.to(DEVICE)
    x, dy, bias = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((m, k), (m, n), (n,)))
    xs = x.cpu().double()[:, p] if perm else x.cpu().double()
    y_ref = xs @ w64.t() + bias.cpu().double()
    dx_ref = dy.cpu().double() @ w64
    if perm:
        dx_ref = dx_ref[:, torch.argsort(p)]
    for path in ("dequant", "gemm", "auto"):
        out = torch.full((m, n), float("nan"), device=DEVICE) if not perm else None
        y = fm.quant_matmul_forward(x, qw, bias, out=out, path=path)
        assert oracles.rel_err(y, y_ref) < 1e-5, path
        dx = fm.quant_matmul_grad_input(dy, qw, path=path)
        assert oracles.rel_err(dx, dx_ref) < 1e-5, path
    assert fm.choose_path("fwd", 16, qw, DEVICE) == "splitk" and fm.choose_path("grad", 3, qw, DEVICE) == "splitn"


def test_path_errors_name_what_is_allowed():
    qw = qlk.quantize(torch.randn(8, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="path='gemv'.*'dequant'"):
        fm.quant_matmul_forward(torch.randn(2, 64), qw, path="gemv")
    with pytest.raises(ValueError, match="path='splitk'.*'splitn'"):
        fm.quant_matmul_grad_input(torch.randn(2, 8), qw, path="splitk")


def test_gemv_prune_drops_the_spilling_tiles(monkeypatch):
    """The M = 1 FMA kernel's pruning: on sm_80, INT4 with g >= 128 keeps only 32x256 (64x128 spills
    there); on sm_90, INT3 / INT4 with g >= 128 at a K that 256 does not divide keep only 64x128
    (32x256 spills there); other formats and shapes keep both tiles."""
    from qlk.kernels import config

    configs = [config._cfg(None, 4, 3, BLOCK_N=32, BLOCK_K=256), config._cfg(None, 4, 3, BLOCK_N=64, BLOCK_K=128)]

    def kept(arch, **fmt):
        monkeypatch.setattr(config, "target_arch", lambda: arch)
        return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in config._prune_gemv(configs, {}, **fmt)]

    assert kept(80, BITS=4, GROUP_SIZE=128, IS_NF4=False) == [(32, 256)]
    assert kept(86, BITS=4, GROUP_SIZE=256, IS_NF4=False) == [(32, 256)]
    assert kept(80, BITS=4, GROUP_SIZE=32, IS_NF4=False) == [(32, 256), (64, 128)]
    assert kept(80, BITS=3, GROUP_SIZE=128, IS_NF4=False) == [(32, 256), (64, 128)]
    assert kept(80, BITS=4, GROUP_SIZE=64, IS_NF4=True) == [(32, 256), (64, 128)]
    assert kept(90, BITS=4, GROUP_SIZE=128, IS_NF4=False) == [(32, 256), (64, 128)]
    # sm_90, round 14: 32x256 spills at a K it does not divide for INT3 / INT4 with g >= 128
    assert kept(90, BITS=4, GROUP_SIZE=128, IS_NF4=False, K=896) == [(64, 128)]
    assert kept(90, BITS=3, GROUP_SIZE=128, IS_NF4=False, K=1408) == [(64, 128)]
    assert kept(90, BITS=4, GROUP_SIZE=128, IS_NF4=False, K=4096) == [(32, 256), (64, 128)]
    assert kept(90, BITS=3, GROUP_SIZE=128, IS_NF4=False, K=768) == [(32, 256), (64, 128)]  # 3 whole tiles
    assert kept(90, BITS=4, GROUP_SIZE=32, IS_NF4=False, K=896) == [(32, 256), (64, 128)]
    assert kept(90, BITS=2, GROUP_SIZE=128, IS_NF4=False, K=896) == [(32, 256), (64, 128)]
    assert kept(90, BITS=4, GROUP_SIZE=64, IS_NF4=True, K=896) == [(32, 256), (64, 128)]


def test_fwd_score_caps_64_row_tiles_by_their_dram_roofline():
    """Round 20: a forward GEMM tile's efficiency is at most its DRAM roofline (heuristics.fwd_dram_cap,
    the input gradient's rule with X, Y and the packed Ŵ). At M = 64 on 8192->8192 INT4 g32 the 64-row
    tiles meet each weight with 64 rows of X: r ≈ 0.59, the cap ≈ 0.48 (the analyzer: 0.46) under
    their fitted 0.76; at M = 1024 it does not bind. The split's fp32 partials count once on sm_90
    (atomics), once a slice on sm_80."""
    tile = _cfg(90, 4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)
    fitted = h.calibrated("fwd", tile, "int4g32", 90)
    assert fitted > 0.7
    low = h.score_all("fwd", 64, 8192, 8192, "int4g32", 90, 132, configs=[tile])[0]
    cap = h.fwd_dram_cap(64, 8192, 8192, "int4g32", 64, 128, 128, low.split, 90)
    assert low.tile_eff == pytest.approx(cap) and 0.44 < cap < 0.52 < fitted
    wide = h.score_all("fwd", 1024, 14336, 4096, "int4g32", 90, 132, configs=[tile])[0]
    assert wide.tile_eff == fitted
    def drop(arch):  # the split's cap over the unsplit one: its partials (once, or a slice each) cost more
        return (h.fwd_dram_cap(333, 1024, 8192, "int4g32", 128, 128, 64, 4, arch)
                / h.fwd_dram_cap(333, 1024, 8192, "int4g32", 128, 128, 64, 1, arch))

    assert drop(80) < drop(90) < 1


def test_pool_spill_tile_is_not_proposed_with_the_pooling():
    """Round 20: sm_90's 64x128x128 w4 forward spills with QA-LoRA's pooling (8-128 B of stack,
    INT2 / INT4: heuristics.FWD_POOL_SPILLS): the QA-LoRA forward does not get it, the plain one does."""
    def labels(pool):
        return {c.label for c in h.score_all("fwd", 333, 4096, 4096, "int4g32", 90, 132,
                                             configs=[c for c in _gpu_gemm_configs()], pool=pool)}

    assert "64x128x128 w4 s4" in labels(False) and "64x128x128 w4 s4" not in labels(True)
    assert "64x128x64 w4 s4" in labels(True)


def _gpu_gemm_configs():
    from qlk.kernels import config

    was = config.INTERPRETED
    config.INTERPRETED = False
    try:
        return config.gemm_configs()
    finally:
        config.INTERPRETED = was


def test_grad_score_caps_split_tiles_by_their_dram_roofline(monkeypatch):
    """Round 6: a GEMM input-gradient tile's efficiency is at most its DRAM roofline
    (heuristics.grad_dram_cap). At 2048->512, M = 333 on sm_90 (INT3; NF4 until round 18's B-operand
    tile raised its 256x64x64 fit) a split slice has 4 N tiles and its fp32 partial (M·K·4 B)
    outweighs the packed weight: the cap puts 128x64x128 w8 split 2 at 0.56 of the tensor peak, not
    its fitted 0.76, and its best is 256x64x64 w8 split 2 (the
    committed sweep); with the workspace's passes charged (zeroing, the cast: 2.3 µs against a
    ~2.5 µs GEMM) the unsplit 128x64x128 w8 wins. At a full-wave shape the cap does not bind."""
    tiles = [_cfg(90, 8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
             _cfg(90, 8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)]
    c = h.choose_config("grad", 333, 512, 2048, "int3g128", 90, 132, configs=tiles)
    assert (c.label, c.split) == ("128x64x128 w8 s4", 1)
    monkeypatch.setattr(h, "GRAD_WORKSPACE_PASS_BYTES", 0)  # the GEMM kernel alone, as the analyzer sees it
    c = h.choose_config("grad", 333, 512, 2048, "int3g128", 90, 132, configs=tiles)
    assert (c.label, c.split) == ("256x64x64 w8 s3", 2)
    narrow = h.score_all("grad", 333, 512, 2048, "int3g128", 90, 132, configs=tiles[:1])[0]
    assert narrow.split == 2 and narrow.tile_eff == pytest.approx(0.558, abs=0.005)
    # the workspace's 4 B per dX element against the unsplit store's 2 B
    assert h.grad_dram_cap(333, 512, 2048, "int3g128", 128, 64, 128, 2, 90) < \
        h.grad_dram_cap(333, 512, 2048, "int3g128", 128, 64, 128, 1, 90)
    for t in tiles:
        wide = h.score_all("grad", 4096, 14336, 4096, "int4g32", 90, 132, configs=[t])[0]
        assert wide.split == 1 and wide.tile_eff == h.calibrated("grad", t, "int4g32", 90)


def test_wave_split_when_the_last_wave_is_short_and_the_workspace_pays():
    """Round 6: grad_split also proposes a split when the dX tiles fill the SMs but leave the last
    wave short (M = 333 on K = 8192: 3 x 64 = 192 tiles of 128x128 on 132 SMs, balance 0.73 -> 2
    slices, 384 CTAs, 0.97); none when the grid is already balanced. The score takes it only where
    the gain outweighs the workspace's passes (grad_workspace_share: zeroing and the cast, which the
    GEMM kernel's estimate does not hold): NF4 8192->28672 M = 333 splits 128x64x128 w8, the
    3072-wide layers at M = 2048 do not (21 µs of passes against a 130-150 µs GEMM)."""
    assert h.grad_split(8192, 64, 192, 132) == 2
    assert h.grad_split(8192, 64, 264, 132) == 1  # two full waves
    assert h.grad_split(14336, 64, 16 * 32, 132) == 1  # 512 CTAs: 0.97 already, no split does better
    assert h.grad_split(4 * 64, 64, 192, 132) == 1  # 4 N tiles: no slice of 4 beside another
    for n, base in ((8192, 192), (3072, 144), (28672, 200), (1024, 133)):
        s = h.grad_split(n, 64, base, 132)
        assert 1 <= s <= h.GRAD_WAVE_MAX_SPLIT
        if s > 1:
            assert h.sm_balance(base * s, 132) * h.split_busy(n, 64, s) > h.sm_balance(base, 132)
    wide = _cfg(90, 8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)
    c = h.score_all("grad", 333, 28672, 8192, "nf4", 90, 132, configs=[wide])[0]
    assert (c.split, c.ctas) == (2, 384)
    t_gemm = 333 * 28672 * 8192 / (h.ARCH[90].macs_per_s * c.score / h.grad_workspace_share(333, 28672, 8192, c.score, 90))
    # the charge: score = GEMM-only score x t_gemm / (t_gemm + 10 B per dX element over DRAM)
    t_ws = 10 * 333 * 8192 / h.ARCH[90].dram_bytes_per_s
    assert h.grad_workspace_share(333, 28672, 8192, 0.5, 90) == pytest.approx(
        (333 * 28672 * 8192 / (h.ARCH[90].macs_per_s * 0.5)) / (333 * 28672 * 8192 / (h.ARCH[90].macs_per_s * 0.5) + t_ws))
    assert t_gemm > 0
    big = [_cfg(90, 8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
           _cfg(90, 8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)]
    assert h.grad_split(3072, 64, 8 * 24, 132) == 2  # 256x64x128: 192 CTAs, proposed ...
    for n in (1024, 3072, 8192):  # ... but with the passes charged the unsplit 256x64x64 (384 CTAs) is faster
        c = h.choose_config("grad", 2048, n, 3072, "int4g32", 90, 132, configs=big)
        assert (c.label, c.split) == ("256x64x64 w8 s3", 1)


def test_wave_split_is_declined_by_the_workspace_charge(monkeypatch):
    """Without the charge (the GEMM kernel alone, the analyzer's view) the M = 2048, K = 3072 input
    gradient would take 256x64x128 split 2 (0.79 of the tensor peak vs 0.70): the charge is what
    keeps it unsplit. And the split variants that spill are never proposed (sm_80)."""
    big = [_cfg(90, 8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
           _cfg(90, 8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)]
    monkeypatch.setattr(h, "GRAD_WORKSPACE_PASS_BYTES", 0)
    c = h.choose_config("grad", 2048, 3072, 3072, "int4g32", 90, 132, configs=big)
    assert (c.label, c.split) == ("256x64x128 w8 s3", 2)
    small = _cfg(80, 4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8)
    wide = _cfg(80, 8, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8)
    for fmt, m, spills in (("int3g128", 333, True), ("nf4", 333, True), ("int4g128", 333, False),
                           ("int2g32", 333, False), ("nf4", 128, False), ("int3g128", 64, False)):
        assert h.grad_split_spills("64x32x128 w4 s3", fmt, m, 80) == spills
        got = h.score_all("grad", m, 8192, 3072, fmt, 80, 108, configs=[small])[0]
        assert (got.split == 1) if spills else (got.split > 1), (fmt, m, got)  # 6 x 24 = 144 CTAs: short wave
        assert h.score_all("grad", m, 8192, 3072, fmt, 80, 108, configs=[wide])[0].split == 1


def test_grouped_program_rows_rule():
    """Round 7 (heuristics.grouped_programs): small M runs one program row per expert at most over
    the tile slots and splits the input gradient's reduction over N where the rows × K tiles leave
    the resident slots short of whole waves; large M one row per slot, never split; no resident
    count (unfitted tile, interpreter): no split."""
    rule = h.grouped_programs
    # Mixtral gate_up at 16 tokens: 10 slots (9 since round 12: no sentinel tiles), 8 experts, 32 K tiles
    # of 128, N = 28672 in 64-wide steps
    assert rule(10, 8, True, 32, 28672, 64, 108, (4, 4)) == (8, 5)  # sm_80: 1280 CTAs, 2.96 waves of 432
    assert rule(10, 8, True, 32, 28672, 128, 132, (2, 2)) == (8, 1)  # sm_90: 256 CTAs, 0.97 of 264 slots
    assert rule(10, 8, True, 32, 28672, 64, 108, None) == (8, 1)
    assert rule(40, 8, False, 32, 28672, 64, 108, (4, 4)) == (40, 1)
    assert rule(2, 8, True) == (2, 1) and rule(128, 128, True) == (128, 1)
    assert rule(10, 8, True, 32, 448, 64, 108, (4, 4)) == (8, 1)  # 7 N tiles: nothing worth splitting
    assert rule(10, 8, True, 32, 28672, 64, 108, (4, 5)) == (8, 8)  # 2048 CTAs: 0.95 of 4 or 5 waves
    # the table: per format class, the bit width's entry for other group sizes, none for other tiles;
    # per kernel variant (round 8): on sm_90 the slot loop holds fewer CTAs than a program row per
    # slot; sm_80's two-warp tile (round 23) holds 6 of either
    assert h.grouped_resident("grad", "16x64x128 w2 s3", "nf4", 80) == (6, 6)
    assert h.grouped_resident("grad", "16x64x128 w2 s3", "int4g64", 80) == h.GROUPED_RESIDENT[(80, "grad", "int4")][
        "16x64x128 w2 s3"]["slot_loop"]
    assert h.grouped_resident("grad", "16x128x128 w4 s3", "int3g128", 90) == (2, 2)
    assert h.grouped_resident("grad", "16x128x128 w4 s3", "int3g128", 90, slot_loop=False) == (4, 4)
    assert h.grouped_resident("grad", "16x64x128 w2 s3", "int2g32", 80) == (6, 6)
    assert h.grouped_resident("grad", "16x64x128 w2 s3", "int2g32", 80, slot_loop=False) == (6, 6)
    assert h.grouped_resident("grad", "16x64x128 w4 s4", "int2g32", 80) is None  # round 22's tile: gone
    assert h.grouped_resident("grad", "16x64x128 w2 s3", "int4g32", 90) is None
    assert h.grouped_resident("fwd", "16x64x256 w4 s3", "int4g32", 80) is None
    for slots, e, cols, n, bn, sms, res in [(10, 8, 32, 28672, 64, 108, (4, 4)), (10, 8, 112, 4096, 64, 108, (4, 4)),
                                            (10, 8, 112, 4096, 128, 132, (2, 2)), (128, 128, 6, 2048, 64, 108, (3, 5)),
                                            (3, 8, 16, 2048, 64, 108, (4, 4)), (2, 8, 32, 28672, 64, 108, 4)]:
        p, split = rule(slots, e, True, cols, n, bn, sms, res)
        steps = math.ceil(n / bn)
        per = math.ceil(steps / split)
        assert p == min(slots, e)
        assert split == 1 or (per >= h.GRAD_SPLIT_MIN_STEPS and (split - 1) * per < steps), (n, split)  # none empty
        lo, hi = (res, res) if isinstance(res, int) else res

        def gain(s, p=p, cols=cols, n=n, bn=bn, sms=sms, lo=lo, hi=hi):  # what the rule maximizes
            ctas = p * cols * s
            return (h.sm_balance(ctas, sms) * h.split_busy(n, bn, s)
                    * min(h.slot_wave(ctas, sms * r) for r in range(lo, hi + 1)))
        assert gain(split) >= gain(1) - 1e-9
        assert split <= max(1, math.ceil(h.GROUPED_SPLIT_WAVES * hi * sms / (p * cols)))


def test_grouped_grad_launcher_asks_the_rule(monkeypatch):
    """The grouped input gradient's launcher sizes its grid by grouped_programs with the target's
    SM count and the tile's and format's resident CTAs (none under the interpreter: unsplit)."""
    from types import SimpleNamespace

    from qlk.kernels import grouped_matmul as gm

    cfg = dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, num_warps=2, num_stages=3)
    nf4 = SimpleNamespace(bits=4, fmt="nf4", group_size=64)
    monkeypatch.setattr(gm, "INTERPRETED", False)
    monkeypatch.setattr(gm, "target_arch", lambda: 80)
    monkeypatch.setattr(gm, "num_sms", lambda device: 108)
    assert gm._grad_programs(10, 8, True, 32, 28672, cfg, nf4, "cpu") == (8, 5)  # Mixtral gate_up, 16 tokens
    # Qwen3 down at 16 tokens (128 slots, 128 experts: a program row per slot, 6 CTAs of it resident on
    # sm_80): 768 dX tiles -> 4 slices (3072 CTAs, 4.7 waves of 648 slots)
    int4 = SimpleNamespace(bits=4, fmt="int", group_size=32)
    assert h.grouped_resident("grad", "16x64x128 w2 s3", "int4g32", 80, slot_loop=False) == (6, 6)
    assert gm._grad_programs(128, 128, True, 6, 2048, cfg, int4, "cpu") == (128, 4)
    # the variant's own count (since round 23 sm_80's two variants hold the same 6: a table where they
    # differ, as sm_90's do, shows the per-slot launch reads the per-slot entry)
    monkeypatch.setitem(h.GROUPED_RESIDENT, (80, "grad", "int4g32"),
                        {"16x64x128 w2 s3": {"per_slot": (6, 6), "slot_loop": (3, 3)}})
    assert gm._grad_programs(128, 128, True, 6, 2048, cfg, int4, "cpu") == (128, 4)
    assert gm._grad_programs(10, 8, True, 32, 28672, cfg, int4, "cpu") == h.grouped_programs(
        10, 8, True, 32, 28672, 64, 108, (3, 3))  # the slot loop (8 program rows < 10 slots): its own
    assert h.grouped_programs(128, 128, True, 6, 2048, 64, 108, (5, 5)) == (128, 2)  # the slot loop's count
    assert gm._grad_programs(40, 8, False, 32, 28672, cfg, nf4, "cpu") == (40, 1)
    monkeypatch.setattr(gm, "target_arch", lambda: 90)  # no sm_90 entry for this tile: unsplit
    assert gm._grad_programs(10, 8, True, 32, 28672, cfg, nf4, "cpu") == (8, 1)
    # round 12: the variant, so the resident count, at small M: the slot loop on sm_90 even with a
    # program row per slot (Qwen3: 128 slots, 128 experts), the program count's on sm_80 and at large M
    assert gm._grad_slot_loop(128, 128, True) and gm._grad_slot_loop(8, 10, True)
    assert not gm._grad_slot_loop(40, 40, False)
    monkeypatch.setattr(gm, "target_arch", lambda: 80)
    assert not gm._grad_slot_loop(128, 128, True) and gm._grad_slot_loop(8, 10, True)
    monkeypatch.setattr(gm, "target_arch", lambda: 90)
    monkeypatch.setattr(gm, "INTERPRETED", True)
    monkeypatch.setattr(gm, "target_arch", lambda: 80)
    assert gm._grad_programs(10, 8, True, 32, 28672, cfg, nf4, "cpu") == (8, 1)


def test_register_cap_keeps_the_fitted_occupancy():
    """Round 22: the registers a thread may hold for (fewest, most) resident CTAs of 4 warps: 65536
    registers an SM, allocated in units of 8; none at ptxas' own limit (a maxnreg of 255 still moves
    its allocation) or without a table entry."""
    assert h.register_cap((6, 6), 4) == 80  # round 22's sm_80 per-slot small-M gradient
    assert h.register_cap((6, 6), 2) == 168  # round 23's two-warp tile
    assert h.register_cap((4, 6), 4) == 128  # the fewest bounds it
    assert h.register_cap((5, 5), 4) == 96  # 102 rounded down to the allocation unit
    assert h.register_cap((4, 4), 8) == 64
    assert h.register_cap((2, 2), 4) is None and h.register_cap(None, 4) is None
    for lo in range(1, 9):
        cap = h.register_cap((lo, lo), 4)
        if cap is not None:
            assert cap % 8 == 0 and lo * 128 * cap <= 65536 < lo * 128 * (cap + 8) + 128 * 8


def test_grouped_grad_launch_caps_registers(monkeypatch):
    """Round 22: the grouped input gradient launches with ``maxnreg`` = the registers of the resident
    CTAs its grid was sized for, per the kernel variant it runs (sm_80's two-warp tile since round
    23: 6 resident of either variant, 168 registers; round 22's four-warp tile had 80 and 128); no
    cap where GROUPED_RESIDENT has no entry (large M) or under the interpreter."""
    from qlk.formats.int_group import quantize_int
    from qlk.kernels import grouped_matmul as gm

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(gm, "_grouped_matmul_grad_input_kernel", Kernel())
    monkeypatch.setattr(gm, "INTERPRETED", False)
    monkeypatch.setattr(gm, "target_arch", lambda: 80)
    monkeypatch.setattr(gm, "num_sms", lambda device: 108)
    e, n, k = 4, 128, 256
    qw = quantize_int(torch.randn(e * n, k), bits=4, group_size=32)
    cfg = dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, num_warps=2, num_stages=3)
    offsets = torch.tensor([0, 1, 3, 3, 4])
    dy = torch.randn(4, n, dtype=torch.float16)
    for programs, slot_loop, cap in ((4, False, 168), (2, True, 168)):
        launches.clear()
        gm.grouped_matmul_grad_input(dy, qw, offsets, e, config=dict(cfg, PROGRAMS=programs))
        (grid, kwargs), = launches
        assert kwargs["SLOT_LOOP"] is slot_loop and kwargs.get("maxnreg") == cap, (programs, kwargs)
    launches.clear()
    gm.grouped_matmul_grad_input(torch.randn(600, n, dtype=torch.float16), qw, torch.tensor([0, 150, 300, 450, 600]),
                                 e, config=dict(BLOCK_N=32, BLOCK_M=256, BLOCK_K=128, num_warps=8, num_stages=3))
    assert "maxnreg" not in launches[0][1]
    monkeypatch.setattr(gm, "INTERPRETED", True)
    launches.clear()
    gm.grouped_matmul_grad_input(dy, qw, offsets, e, config=dict(cfg))
    assert "maxnreg" not in launches[0][1]


def test_grad_candidates_restricted_to_their_formats(monkeypatch):
    """Round 8: a GEMM input-gradient candidate listed in GRAD_CANDIDATE_FORMATS is ranked only for
    its format classes, an unlisted one for every format, and only on the arch it is listed for
    (the mechanism, with a table of this test's: since the merge's sweep no candidate is restricted)."""
    assert h.GRAD_CANDIDATE_FORMATS == {80: {}, 90: {}}
    monkeypatch.setattr(h, "GRAD_CANDIDATE_FORMATS", {80: {}, 90: {"128x128x64 w4 s4": frozenset({"nf4"})}})
    for fn in (h._choose_default, h.choose_path, h.choose_fused):
        fn.cache_clear()
    nf4_tile = _cfg(90, 4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    plain = _cfg(90, 4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    assert h.grad_candidate_allowed("128x128x64 w4 s4", "nf4", 90)
    assert not h.grad_candidate_allowed("128x128x64 w4 s4", "int4g32", 90)
    assert not h.grad_candidate_allowed("128x128x64 w4 s4", "int3", 90)
    assert h.grad_candidate_allowed("128x128x64 w4 s4", "int3", 80)
    assert h.grad_candidate_allowed("128x64x64 w4 s4", "int3", 90)
    for fmt in ("int2g32", "int3", "int4g32", "int4g128", "nf4"):
        labels = {c.label for c in h.score_all("grad", 333, 8192, 8192, fmt, 90, 132, configs=[nf4_tile, plain])}
        assert labels == {"128x64x64 w4 s4"} | ({"128x128x64 w4 s4"} if fmt == "nf4" else set())
    # only the input gradient is restricted
    assert len(h.score_all("fwd", 333, 8192, 8192, "int3", 90, 132, configs=[nf4_tile])) == 1
    monkeypatch.undo()
    for fn in (h._choose_default, h.choose_path, h.choose_fused):
        fn.cache_clear()


def test_grad_candidate_margin_ranks_but_does_not_rescore():
    """Round 8: sm_90 64x32x64 w4 must beat the others by GRAD_CANDIDATE_MARGIN (10 %) to be chosen:
    at 2048→512 M = 64 it does (x1.6, 16 steps of 32 rows split 4 ways: 128 CTAs against 64 half-empty
    128-row ones), at 2048→2048 M = 64 NF4's is 9 % ahead of 128x64x64 and the rules keep that (round
    27's refit, NF4 64x32x64 0.398 → 0.425, took 2048→8192, the example since round 19, past the
    margin; at 8192→8192, the one before, 128x64x64 is ahead outright). The chosen score is the
    model's, without the margin."""
    small = _cfg(90, 4, 4, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)
    mid = _cfg(90, 4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    assert h.candidate_margin("grad", "64x32x64 w4 s4", 90) == pytest.approx(1.10)
    assert h.candidate_margin("grad", "64x32x64 w4 s4", 80) == 1.0
    assert h.candidate_margin("fwd", "64x32x64 w4 s4", 90) == 1.0
    c = h.choose_config("grad", 64, 512, 2048, "int4g32", 90, 132, configs=[mid, small])
    assert (c.label, c.split, c.ctas) == ("64x32x64 w4 s4", 4, 128)
    assert c.score == pytest.approx(c.tile_eff * c.sm_balance * c.fill)
    scores = {s.label: s.score for s in h.score_all("grad", 64, 2048, 2048, "nf4", 90, 132, configs=[mid, small])}
    assert scores["128x64x64 w4 s4"] < scores["64x32x64 w4 s4"] < 1.10 * scores["128x64x64 w4 s4"]
    assert h.choose_config("grad", 64, 2048, 2048, "nf4", 90, 132, configs=[mid, small]).label == "128x64x64 w4 s4"


def test_round8_grad_picks(device_lists):
    """The round-8 picks at the cases they were added for (config.py's lists, docs/kernels.md
    "Round 8"), as round 9 changed them: sm_80 NF4 at M = 333 took 128x32x128 w4 (not the smem-bound
    8-warp tile) and INT3 on the 2048-wide layers 64x64x128 w4; since round 9 NF4 keeps 128x32x128 w4
    where its grid fills the SMs (8192→8192, 3072→1024) and both take the two-warp 64x64x128 tile
    elsewhere, which is never split either (both spill split); sm_90 NF4 8192→8192 M = 333
    128x128x64 w4, and the 2048→512 gradient at M = 64 the 64x32x64 tile split 4 ways."""
    # the round-8 lists: no two-warp tile (round 9), no sm_80 128x64x64 (round 26)
    without = [c for c in h.candidates("grad") if c.num_warps != 2 and not (
        getattr(c, "qlk_arch", None) == 80 and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) == (128, 64))]
    for n, k, now in ((8192, 8192, "128x32x128 w4 s3"), (1024, 3072, "128x32x128 w4 s3"),
                      (4096, 14336, "64x64x128 w2 s3")):
        c = h.choose_config("grad", 333, n, k, "nf4", 80, 108)
        assert (c.label, c.split) == (now, 1)
        c = h.choose_config("grad", 333, n, k, "nf4", 80, 108, configs=without)
        assert (c.label, c.split) == ("128x32x128 w4 s3", 1)
    assert h.grad_split_spills("128x32x128 w4 s3", "nf4", 2048, 80)
    assert h.grad_split_spills("64x64x128 w2 s3", "int4g32", 333, 80)
    assert h.choose_config("grad", 333, 2048, 2048, "int3", 80, 108).label == "64x64x128 w2 s3"
    assert h.choose_config("grad", 333, 2048, 2048, "int3", 80, 108, configs=without).label == "64x64x128 w4 s3"
    assert h.choose_config("grad", 333, 8192, 8192, "nf4", 90, 132).label == "128x128x64 w4 s4"
    for fmt in ("int4g32", "int4g128", "int3", "nf4"):
        c = h.choose_config("grad", 64, 512, 2048, fmt, 90, 132)
        assert (c.label, c.split, c.ctas) == ("64x32x64 w4 s4", 4, 128)


def test_qalora_grad_splits_that_spill_run_unsplit(device_lists):
    """Round 10: with QA-LoRA's fp32 folded biases (and its fused V programs) the split variants of
    sm_80's 64x64x128 / 64x32x128 w4 input-gradient tiles spill at an M that is not a multiple of 16
    (8-16 B at M = 100, the static report; 0 at M = 256), so the rules launch them unsplit there; the
    plain gradient keeps its split; sm_90 is unaffected."""
    for label in ("64x64x128 w4 s3", "64x32x128 w4 s3"):
        assert h.grad_split_spills(label, "int4g32", 100, 80, fp32_bias=True)
        assert not h.grad_split_spills(label, "int4g32", 256, 80, fp32_bias=True)
        assert not h.grad_split_spills(label, "int4g32", 100, 80)
    assert not h.grad_split_spills("64x64x128 w4 s3", "int4g32", 100, 90, fp32_bias=True)
    plain = h.score_all("grad", 100, 2880, 4096, "int3g128", 80, 108)
    folded = {c.label: c for c in h.score_all("grad", 100, 2880, 4096, "int3g128", 80, 108, fp32_bias=True)}
    assert any(c.split > 1 for c in plain if c.label in ("64x64x128 w4 s3", "64x32x128 w4 s3"))
    assert all(folded[c].split == 1 for c in ("64x64x128 w4 s3", "64x32x128 w4 s3") if c in folded)
    assert h.choose_config("grad", 100, 2880, 4096, "int3g128", 80, 108, fp32_bias=True).split == 1
    assert h.choose_config("grad", 256, 14336, 4096, "int4g32", 80, 108, fp32_bias=True).split > 1


def test_qalora_splitk_leaves_out_the_tile_that_spills_with_pooling(device_lists, monkeypatch):
    """Round 31 (the out-of-format check, bench/results/static-formats-sm80): sm_80's 16x64x256 w4 s3
    split-K tile spills 8 B with QA-LoRA's pooling at INT4 g64, so it is not proposed with the pooling
    on sm_80, for any format; the plain decode keeps it, sm_90 keeps it, and the QA-LoRA pick there is
    the deeper tile's two-warp twin, as before."""
    for fmt in ("int4g64", "int4g32", "int3g32", "int2g128"):
        for m, n, k in ((1, 8192, 2048), (9, 14336, 4096), (16, 1024, 4096)):
            folded = {c.label for c in h.score_all("splitk", m, n, k, fmt, 80, 108, fp32_bias=True, pool=True)}
            assert "16x64x256 w4 s3" not in folded and "16x64x256 w2 s3" in folded, (fmt, m, n, k)
            assert "16x64x256 w4 s3" in {c.label for c in h.score_all("splitk", m, n, k, fmt, 80, 108)}
            assert "16x64x256 w4 s3" in {c.label for c in h.score_all("splitk", m, n, k, fmt, 90, 132,
                                                                      fp32_bias=True, pool=True)}
    # it was never the pick: without the exclusion the rules choose the same tiles
    shapes = [(m, n, k) for m in (1, 5, 16) for n, k in ((8192, 2048), (1024, 4096), (14336, 4096), (4096, 14336))]
    picks = [h.choose_config("splitk", *s, "int4g64", 80, 108, fp32_bias=True, pool=True).label for s in shapes]
    monkeypatch.setitem(h.SPLITK_POOL_SPILLS, 80, frozenset())
    h._choose_default.cache_clear()
    assert picks == [h.choose_config("splitk", *s, "int4g64", 80, 108, fp32_bias=True, pool=True).label
                     for s in shapes]


def test_tiles_that_spill_for_one_format_class_are_left_out(device_lists):
    """Round 31 (bench/results/static-family-formats-sm80): sm_80's 16x64x128 w4 s4 split-N tile spills
    8 B for INT2 g64, so it is not proposed for that format class; the other group sizes and widths,
    and sm_90, keep their tiles."""
    for m, n, k in ((1, 2048, 2048), (16, 14336, 4096), (64, 512, 2048)):
        labels = {fmt: {c.label for c in h.score_all("splitn", m, n, k, fmt, 80, 108)}
                  for fmt in ("int2g64", "int2g32", "int2g128", "int4g64", "int3g64")}
        assert "16x64x128 w4 s4" not in labels["int2g64"] and "16x64x128 w2 s3" in labels["int2g64"]
        assert all("16x64x128 w4 s4" in v for f, v in labels.items() if f != "int2g64"), labels
        assert {c.label for c in h.score_all("splitn", m, n, k, "int2g64", 90, 132)} == \
            {c.label for c in h.score_all("splitn", m, n, k, "int2g32", 90, 132)}


def test_path_rule_knows_the_dense_two_warp_tiles(device_lists):
    """Round 10: the dense baseline's sm_80 two-warp tiles (round 9) are in the path rule's dense
    model. Without them it kept the fused kernel for SmolLM2's 576-wide input gradient at M = 3000,
    where dequantize + the dense GEMM is estimated 0.91x dense against the fused 0.67x
    (bench/results/static-smol-sm80.csv)."""
    assert {(64, 128, 2), (128, 64, 2)} <= set(h.DENSE_TILES[80])
    for bits, g, nf4 in ((4, 32, False), (2, 32, False), (4, 64, True)):
        assert h.choose_path("grad", 3000, 1536, 576, bits=bits, group_size=g, is_nf4=nf4, arch=80).path == "dequant"
    assert h.choose_path("grad", 2048, 4096, 4096, bits=4, group_size=32, arch=80).path == "fused"


def test_path_rule_caps_the_dense_gemm_at_its_dram_roofline(device_lists):
    """Round 11: the path rule's dense GEMM is DRAM-capped like the fused input gradient
    (``dense_dram_cap``: weight, input and output bytes). Without the cap it rated the dense GEMM
    compute-bound at a short reduction and sent the input gradient of a 1536->256 layer at M = 2500
    (256 deep: both kernels DRAM-bound on dX) to dequantize + dense, 0.80x dense against the fused
    kernel's 1.05x (bench/results/static-new-sm90.csv); the square layers keep their picks."""
    for bits, g, nf4 in ((4, 32, False), (3, 128, False), (2, 32, False), (4, 64, True)):
        for m in (2500, 8192):
            assert h.choose_path("grad", m, 256, 1536, bits=bits, group_size=g, is_nf4=nf4, arch=90).path == "fused"
    # the cap is the roofline midpoint: below 1 where the bytes dominate, near 1 for deep reductions
    assert h.dense_dram_cap(2500, 256, 1536, 90) < 0.6 < 0.95 < h.dense_dram_cap(4096, 4096, 4096, 90)
    assert h.dense_score(2500, 1536, 90, cap=0.5) < h.dense_score(2500, 1536, 90)
    assert h.choose_path("grad", 3000, 1536, 576, bits=4, group_size=32, arch=80).path == "dequant"


def test_qalora_splitn_leaves_out_the_tile_that_spills_with_v(device_lists):
    """Round 15 (bench/results/static-oos2-sm80.csv): sm_80's 16x64x128 split-N tile spills 8 B in
    QA-LoRA's launch (fused V = dY·B) for INT2 when the output's last K tile is cut (K = 2880, 4544)
    at M > 1: not proposed there (``pool``); kept without V, at a K it divides, at M = 1, for INT4
    and on sm_90."""
    tile = "16x64x128 w4 s4"

    def labels(k, fmt="int2g32", arch=80, pool=True, m=12):
        return {c.label for c in h.score_all("splitn", m, 4096, k, fmt, arch, pool=pool)}

    for k in (2880, 4544):
        assert tile not in labels(k) and labels(k), k
        assert tile in labels(k, pool=False)
        assert tile in labels(k, fmt="int4g32")
    assert tile in labels(4096) and tile in labels(4608) and tile in labels(2880, m=1)  # M = 1: specialized, 0 B
    assert h.choose_config("splitn", 12, 4096, 2880, "int2g32", 80, pool=True).label != tile
    assert labels(2880, arch=90) == labels(2880, arch=90, pool=False)


def test_64_row_tiles_are_proposed_from_their_least_m(device_lists):
    """sm_90's 64-row tiles (heuristics.CANDIDATE_M_RANGE): the forward's 64x128x64 w4 (round 15) and
    64x128x128 w4 (round 20) from M = 64, the input gradient's 64x64x128 w4 (round 16) and 64x128x128 w4
    (round 20) from M = 17, with no upper bound since round 25. They are taken where the 128/256-row
    tiles are mostly padding (M = 300 on Qwen3-0.6B's 1024->3072 and its 3072->1024 gradient; the
    gradient at M = 24-48 too) and, at large M, where the big tiles leave SMs idle (SmolLM2's 576->192
    at M = 3000: 94 CTAs of 64 rows against 72 of 128x64; the 3584->512 input gradient at M = 3000),
    not on a full grid (4096->4096 at M = 3000 keeps a 128/256-row tile: the fitted efficiencies are
    8 % apart); the forward tile not under M = 64 (its fitted efficiency over-rates it against
    split-K), the gradient's not at M <= 16 (split-N's alone); sm_80 has no such tile in that list."""
    # (64x128x64 was the pick at M = 64 on 4096->14336 until round 25: there it ties its 128-deep
    # sibling, DRAM-capped, and the tie goes to the deeper step, the analyzer's best on NF4)
    for op, tile, n, k, lo, pick in (("fwd", "64x128x64 w4 s4", 3072, 1024, 64, None),
                                     ("fwd", "64x128x128 w4 s4", 3072, 1024, 64, (300, 3072, 1024)),
                                     ("grad", "64x64x128 w4 s4", 1024, 3072, 17, (48, 1024, 3072)),
                                     ("grad", "64x128x128 w4 s4", 1024, 3072, 17, (300, 1024, 3072))):
        assert h.candidate_m_range(op, tile, 90) == (lo, math.inf)
        assert h.candidate_m_range(op, tile, 80) == (1, math.inf)

        def labels(m, arch=90):
            return {c.label for c in h.score_all(op, m, n, k, "int4g32", arch)}

        for m in (lo, 300, 1024, 1025, 3000, 8192):
            assert tile in labels(m), (op, m)
        assert tile not in labels(lo - 1) and labels(lo - 1), (op, lo - 1)
        assert pick is None or h.choose_config(op, *pick, "int4g32", 90).label == tile
        assert all(tile not in labels(m, 80) for m in (64, 300, 3000))
    assert h.choose_config("grad", 48, 8192, 2048, "int4g32", 90).label == "64x128x128 w4 s4"  # M = 24-48 too
    assert h.candidate_m_range("grad", "64x128x64 w4 s4", 90) == (1, math.inf)  # per op
    for fmt in ("int4g32", "int2g32", "int3g128", "nf4"):
        assert h.choose_config("fwd", 3000, 192, 576, fmt, 90).label == "64x128x128 w4 s4", fmt
        assert h.choose_config("fwd", 3000, 4096, 4096, fmt, 90).block_m >= 128, fmt
    for fmt in ("int4g32", "int2g32", "int3g128"):
        assert h.choose_config("grad", 3000, 512, 3584, fmt, 90).label == "64x128x128 w4 s4", fmt


def test_equal_scores_take_the_deeper_reduction_step(device_lists):
    """Round 25: of two tiles with one score (the same grid, both capped by DRAM), the one whose loop
    covers more of the reduction an iteration: fewer iterations of the per-step work that does not
    scale with the tile (576->192 at M = 3000: 64x128x128 over 64x128x64, 10 % ahead in the analyzer).
    The reduction is K for the forward ops, N for the input gradients."""
    scored = {c.label: c for c in h.score_all("fwd", 3000, 192, 576, "int4g32", 90)}
    deep, shallow = scored["64x128x128 w4 s4"], scored["64x128x64 w4 s4"]
    assert deep.score == shallow.score and deep.ctas == shallow.ctas and deep.index > shallow.index
    assert h.choose_config("fwd", 3000, 192, 576, "int4g32", 90).label == deep.label
    assert h.reduction_step("fwd", deep) == 128 and h.reduction_step("fwd", shallow) == 64
    assert h.reduction_step("splitk", deep) == 128
    grad = h.score_all("grad", 300, 1024, 3072, "int4g32", 90)[0]
    assert h.reduction_step("grad", grad) == grad.block_n == h.reduction_step("splitn", grad)


def test_grouped_folded_forward_tile_weighs_waves():
    """Round 23: sm_80's QA-LoRA grouped forward at large M keeps the 256-column tile unless its grid
    spreads over the SMs unevenly enough that the 64-column tile's better balance wins by the margin:
    Mixtral's down projection at 512 tokens (8 M tiles × 16 N tiles = 128 CTAs on 108 SMs, balance
    0.59; 512 CTAs of the 64-column tile, 0.79) takes it in every format; at 4096 tokens (64 M
    tiles: 1024 CTAs, 0.95) and on the gate_up projection (N = 28672) the 256-column tile stays."""
    narrow, wide = 64, 256
    for fmt in ("int2g32", "int3g128", "int4g128", "int4g32", "int4g64"):
        assert h.grouped_folded_fwd_tile(8, 4096, fmt, 108)["BLOCK_N"] == narrow, fmt
        assert h.grouped_folded_fwd_tile(64, 4096, fmt, 108)["BLOCK_N"] == wide, fmt
        assert h.grouped_folded_fwd_tile(8, 28672, fmt, 108)["BLOCK_N"] == wide, fmt
    # the scores by hand: efficiency × CTAs / (SMs · ⌈CTAs / SMs⌉), and the margin deciding
    def score(block_n, eff, m_tiles, n, sms):
        ctas = m_tiles * math.ceil(n / block_n)
        return eff * ctas / (sms * math.ceil(ctas / sms))
    (_, weff), (_, neff) = h.GROUPED_FOLDED_FWD_SM80
    for m_tiles, n, sms, fmt in ((8, 14336, 108, "int2"), (60, 2048, 108, "int4"), (32, 2880, 108, "int2"),
                                 (3, 5000, 132, "int3"), (1, 640, 108, "int4"), (200, 8192, 132, "int2"),
                                 (16, 5120, 108, "int4"), (8, 6144, 108, "int3"), (60, 2816, 108, "int4g32")):
        base = fmt[:4]
        sw = score(256, weff[base], m_tiles, n, sms)
        sn = score(64, neff.get(fmt, neff[base]), m_tiles, n, sms)
        want = narrow if sn > h.GROUPED_FOLDED_FWD_MARGIN * sw else wide
        assert h.grouped_folded_fwd_tile(m_tiles, n, fmt, sms)["BLOCK_N"] == want, (m_tiles, n, sms, fmt)
    # within the margin: Qwen2-MoE's gate_up at 512 tokens (60 tiles, N = 2816), INT4 g128: 0.807 ×
    # 0.873 against 0.731 × 0.978 (1.015 < 1.02): the 256-column tile; INT4 g32's 0.757 takes the 64
    assert h.grouped_folded_fwd_tile(60, 2816, "int4g128", 108)["BLOCK_N"] == wide
    assert score(64, neff["int4"], 60, 2816, 108) > score(256, weff["int4"], 60, 2816, 108)
    assert h.grouped_folded_fwd_tile(60, 2816, "int4g32", 108)["BLOCK_N"] == narrow
    cfg = h.grouped_folded_fwd_tile(8, 4096, "int4g32", 108)
    assert cfg == dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=3)
    cfg["BLOCK_N"] = 1  # a copy: the table is not changed through the returned dict
    assert h.GROUPED_FOLDED_FWD_SM80[1][0]["BLOCK_N"] == 64


def test_grouped_folded_forward_launch_passes_the_grid(monkeypatch):
    """Round 23: the grouped forward's launcher gives the tile rule the grid a balanced routing has
    (8 experts × 1 tile of 128 rows at 1024 rows, N = one expert's rows, the device's SMs): QA-LoRA
    (folded) on sm_80 at Mixtral's down shape runs the 64-column tile; the plain forward, sm_90 and
    a grid of full waves keep theirs."""
    from qlk.formats.int_group import quantize_int
    from qlk.kernels import config as qc
    from qlk.kernels import grouped_matmul as gm

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(gm, "_grouped_matmul_fwd_kernel", Kernel())
    monkeypatch.setattr(gm, "INTERPRETED", False)
    monkeypatch.setattr(qc, "INTERPRETED", False)
    monkeypatch.setattr(gm, "num_sms", lambda device: 108)
    e, n, k = 8, 4096, 64
    qw = quantize_int(torch.randn(e * n, k), bits=4, group_size=32)

    def block_n(rows, arch, pool):
        monkeypatch.setattr(gm, "target_arch", lambda: arch)
        monkeypatch.setattr(qc, "target_arch", lambda: arch)
        launches.clear()
        offsets = torch.arange(0, rows + 1, rows // e)
        gm.grouped_matmul_forward(torch.randn(rows, k, dtype=torch.float16), qw, offsets, e, pool=pool)
        (grid, kwargs), = launches
        return kwargs["BLOCK_N"]

    assert block_n(1024, 80, True) == 64
    assert block_n(1024, 80, False) == 128
    assert block_n(8192, 80, True) == 256
    assert block_n(1024, 90, True) == 128


def test_grouped_small_m_gradient_tile_has_its_fitted_occupancy(monkeypatch):
    """The small-M grouped input gradient's tile on each arch has a GROUPED_RESIDENT entry in every
    format class (without one the launcher neither splits the reduction nor caps the registers, both
    silently): sm_80's two-warp tile since round 23 (6 resident), sm_90's 16x128x128 on four warps."""
    from qlk.kernels import config as qc

    monkeypatch.setattr(qc, "INTERPRETED", False)
    for arch, label, resident in ((80, "16x64x128 w2 s3", (6, 6)), (90, "16x128x128 w4 s3", (2, 2))):
        monkeypatch.setattr(qc, "target_arch", lambda arch=arch: arch)
        cfg = qc.grouped_config("grad", True, 2.0, False, 4)
        got = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
        assert got == label, (arch, got)
        for fmt in ("int2", "int3", "int4", "int4g32", "int4g128", "nf4"):
            assert h.grouped_resident("grad", label, fmt, arch) == resident, (arch, fmt)


def test_grouped_tiles_by_rows_an_expert(monkeypatch):
    """Round 30: the small-M grouped tiles hold 16 rows up to 16 routed rows an expert and 32 above
    (to the small-M bound), forward (folded or not, every bit width) and input gradient, on both
    archs: one tile an expert at a balanced routing, so a program row's slot loop decodes its
    expert's weight once (Mixtral at 128 tokens, 32 rows an expert). QA-LoRA's folded input gradient
    keeps 16 rows (not swept at 32). The 32-row forward runs on four warps on sm_90 and 128 deep on
    sm_80. From the small-M bound to
    ``MID_TILE_ROWS`` rows an expert the large-M kernels take 64-row tiles on four warps (QA-LoRA's
    folded forward too, also on sm_80, where the grid rule then stays out; the folded input gradient
    keeps 128); the launcher's rule takes S / E."""
    from qlk.kernels import config as qc
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(qc, "INTERPRETED", False)
    assert qc.small_tile_rows(1.0) == qc.small_tile_rows(16.0) == 16
    assert qc.small_tile_rows(16.5) == qc.small_tile_rows(float(gm.SMALL_M_ROWS)) == 32
    for arch in (80, 90):
        monkeypatch.setattr(qc, "target_arch", lambda arch=arch: arch)
        for rows_per_expert, rows in ((2.0, 16), (16.0, 16), (17.0, 32), (32.0, 32)):
            for bits in (2, 3, 4):
                for folded in (False, True):
                    cfg = qc.grouped_config("fwd", True, rows_per_expert, folded, bits)
                    assert cfg["BLOCK_M"] == rows
                    # 32 rows 256 deep on two warps spill at K = 1408 (Qwen1.5-MoE's down projection: up to
                    # 240 B): sm_90 runs them on four warps, sm_80 (where four warps lose 0.1-0.3x) 128 deep
                    wide = rows == 32 and arch == 90
                    assert cfg["num_warps"] == (4 if wide or (folded and bits == 4) else 2), (arch, rows)
                    assert cfg["BLOCK_K"] == (128 if rows == 32 and arch == 80 else 256), (arch, rows)
                assert qc.grouped_config("grad", True, rows_per_expert, False, bits)["BLOCK_M"] == rows
                assert qc.grouped_config("grad", True, rows_per_expert, True, bits)["BLOCK_M"] == 16
            # round 31: sm_80's 32-row forward spills for INT4 g64 and QA-LoRA's INT2 g128 (only those):
            # 64 deep on four stages there; the other group sizes and sm_90 keep their tile
            for bits, g, folded in ((4, 64, False), (2, 128, True), (4, 32, False), (4, 64, True), (2, 128, False),
                                    (3, 32, False), (2, 64, True)):
                cfg = qc.grouped_config("fwd", True, rows_per_expert, folded, bits, g)
                spills = rows == 32 and arch == 80 and (bits, g, folded) in ((4, 64, False), (2, 128, True))
                assert (cfg["BLOCK_K"], cfg["num_stages"]) == ((64, 4) if spills else (qc.grouped_config(
                    "fwd", True, rows_per_expert, folded, bits)["BLOCK_K"], 3)), (arch, rows, bits, g, folded)
        # above the small-M bound: 64-row tiles to MID_TILE_ROWS rows an expert, then 128
        for direction in ("fwd", "grad"):
            mid = qc.grouped_config(direction, False, 33.0, False, 4)
            assert mid["BLOCK_M"] == qc.MID_TILE_ROWS == 64
            assert qc.grouped_config(direction, False, 64.0, False, 4)["BLOCK_M"] == 64
            assert qc.grouped_config(direction, False, 65.0, False, 4)["BLOCK_M"] == 128
        assert qc.grouped_config("grad", False, 40.0, True, 4)["BLOCK_M"] == 128  # folded: not swept at 64
        assert qc.grouped_config("fwd", False, 40.0, True, 4)["BLOCK_M"] == 64
        # sm_90's INT3 forward steps 128 deep there (64 deep its decoder is issue-bound); QA-LoRA's 64
        assert qc.grouped_config("fwd", False, 40.0, False, 3)["BLOCK_K"] == (128 if arch == 90 else 32)
        assert qc.grouped_config("fwd", False, 40.0, True, 3)["BLOCK_K"] == (64 if arch == 90 else 32)
        assert qc.grouped_config("fwd", False, 40.0, False, 4)["BLOCK_K"] == (64 if arch == 90 else 32)
        # sm_80's input gradient there on two warps (the dY tile's shared-memory reads halve)
        assert qc.grouped_config("grad", False, 40.0, False, 2)["num_warps"] == (4 if arch == 90 else 2)
        # sm_80's folded forward: the 64-row tile stays; above MID_TILE_ROWS the grid rule picks a 128-row one
        qw = qlk.quantize(torch.randn(8 * 64, 256), bits=4, group_size=32)
        assert gm.tiles_for("fwd", 320, 8, qw, folded=True, device=torch.device("cpu"))["BLOCK_M"] == 64
        big = gm.tiles_for("fwd", 1024, 8, qw, folded=True, device=torch.device("cpu"))
        assert big["BLOCK_M"] == 128 and (arch == 90 or big["num_warps"] in (4, 8))
        monkeypatch.setattr(gm, "INTERPRETED", False)
        monkeypatch.setattr(gm, "target_arch", lambda arch=arch: arch)
        assert gm.tiles_for("fwd", 256, 8)["BLOCK_M"] == 32  # Mixtral at 128 tokens, top-2
        assert gm.tiles_for("grad", 128, 8)["BLOCK_M"] == 16  # at 64 tokens
        assert gm.tiles_for("fwd", 4096, 128)["BLOCK_M"] == 32  # Qwen3 at 512 tokens, top-8


def test_grouped_small_m_forward_runs_on_two_warps_but_folded_int4(monkeypatch):
    """Round 24: the small-M grouped forward (and its split-K launch) takes the 16x64x256 tile on two
    warps on both archs, for every format and for QA-LoRA's folded INT2 / INT3; QA-LoRA's folded
    INT4 keeps four (its fp32 biases spill on two warps at some shapes). Large M is unchanged."""
    from qlk.kernels import config as qc

    monkeypatch.setattr(qc, "INTERPRETED", False)
    for arch in (80, 90):
        monkeypatch.setattr(qc, "target_arch", lambda arch=arch: arch)
        for bits in (2, 3, 4):
            for folded in (False, True):
                cfg = qc.grouped_config("fwd", True, 2.0, folded, bits)
                assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]) == (16, 64, 256, 3)
                assert cfg["num_warps"] == (4 if folded and bits == 4 else 2), (arch, bits, folded)
        assert qc.grouped_config("fwd", False, 512.0, False, 4)["num_warps"] >= 4


def _kernel_slices(length, block, split, slice_len=0):
    """The [lo, hi) ranges the kernels' programs loop over: slice_len columns each (the forward GEMM's
    SLICE_K) or ⌈⌈length / block⌉ / split⌉ blocks each (tl.cdiv, as the split kernels compute them)."""
    step = slice_len or -(-(-(-length // block)) // split) * block
    return [(s * step, min(length, (s + 1) * step)) for s in range(split)]


def test_split_loop_runs_is_the_kernels_arithmetic():
    """Round 25: LOOP_RUNS (heuristics.split_loop_runs) is true exactly when every program's loop runs at
    least once, by the ranges the kernels compute: every slice non-empty, and where the loop covers
    whole steps only (``whole``: K not a multiple of BLOCK_K; the cut tile runs after the loop) every
    slice holding a whole step. A wrong True is a false ``tl.assume`` on the GPU."""
    import random

    rng = random.Random(25)
    cases = [(32, 64, 1, 0), (64, 64, 1, 0), (72, 64, 2, 0), (72, 64, 1, 0), (2880, 128, 8, 0), (10 * 64, 64, 8, 0),
             (9 * 64, 64, 4, 0), (4096, 128, 3, 1408), (4160, 128, 3, 1408), (4300, 128, 4, 1152)]
    cases += [(rng.randint(1, 5000), rng.choice((16, 32, 64, 128, 256)), rng.randint(1, 40), 0) for _ in range(400)]
    for length, block, split, slice_len in cases:
        if slice_len:  # the forward GEMM's slices: whole blocks, as many as cover the length
            split = -(-length // slice_len)
        for whole in (False, True):
            ranges = _kernel_slices(length, block, split, slice_len)
            if whole:
                runs = all((min(hi, length // block * block) - lo) > 0 for lo, hi in ranges)
            else:
                runs = all(hi > lo for lo, hi in ranges)
            assert h.split_loop_runs(length, block, split, slice_len, whole) == runs, (length, block, split,
                                                                                     slice_len, whole)
    # the cases that must be False: K under one tile, a last slice holding only the cut tile, empty slices
    assert not h.split_loop_runs(32, 64, 1, whole=True)
    assert not h.split_loop_runs(72, 64, 2, whole=True) and h.split_loop_runs(72, 64, 2)
    assert not h.split_loop_runs(10 * 64, 64, 8)  # 2 blocks a slice: slices 5-7 start past the end
    assert h.split_loop_runs(10 * 64, 64, 5) and not h.split_loop_runs(0, 64, 1)


def test_sm80_128x64x64_grad_tile(device_lists):
    """Round 26: sm_80's 128x64x64 w4 input-gradient tile (64 columns of dX, 128 rows of dY, 64-row
    steps). It is the rules' pick on SmolLM2's 576->192 at M = 3000 (9 column tiles of 64 where 128
    leaves 4.5), fused again (it was dequantize + dense); it never runs with QA-LoRA's fp32 folded
    biases (16 B of stack split or not, every report's QA-LoRA gradient), and INT2 runs it unsplit
    at an M that is not a multiple of 16 (8 B of stack split at M = 333)."""
    for fmt in ("int4g32", "int2", "nf4"):
        c = h.choose_config("grad", 3000, 192, 576, fmt, 80, 108)
        assert c.label == "128x64x64 w4 s3", (fmt, c.label)
        assert h.choose_path("grad", 3000, 192, 576, bits=2 if fmt == "int2" else 4, group_size=32 if fmt != "nf4"
                             else 64, is_nf4=fmt == "nf4", arch=80, sms=108).path == "fused"
    folded = {c.label for c in h.score_all("grad", 3000, 192, 576, "int4g32", 80, 108, fp32_bias=True)}
    assert folded and "128x64x64 w4 s3" not in folded
    assert all(h.choose_config("grad", m, n, k, "int4g32", 80, 108, fp32_bias=True).label != "128x64x64 w4 s3"
               for m, n, k in ((3000, 192, 576), (333, 2048, 2048), (100, 4096, 2880)))
    assert h.grad_split_spills("128x64x64 w4 s3", "int2", 333, 80)
    assert not h.grad_split_spills("128x64x64 w4 s3", "int2", 336, 80)
    assert not h.grad_split_spills("128x64x64 w4 s3", "int4g32", 333, 80)


@pytest.mark.parametrize("arch", [90, 80])
def test_narrow_layers_take_the_one_slice_split_n(device_lists, arch):
    """Round 32: a narrow layer's input gradient at mid M (N = 256 rows of Ŵ: the k/v projections of
    TinyLlama, Qwen2.5-1.5B/3B, Gemma-3-1B) runs split-N with one slice, which stores dX itself:
    the 256-row tile covers N in one step (sm_80: round 32's 16x256x64; NF4 on both archs since
    round 32). With the workspace's passes (10 B a dX element) it had been 0.68-0.89x dense
    (static-narrow, static-oos8). The rules see the saving: the same launch charged as if it had a
    workspace is slower by those passes and the fp32 partials. Round 34: any tile may run one slice at
    mid M (test_mid_m_split_weighs_its_slices_against_one), and sm_80 takes the two-warp 64-row step
    over N = 256 in one slice of 64 CTAs at M = 56 (1.19-1.33x dense in the analyzer, 1.20-1.27x
    faster than round 33's 16x256x64)."""
    import dataclasses

    formats = {"int4g32": (4, 32, False), "int4g128": (4, 128, False), "int3g128": (3, 128, False),
               "int2g32": (2, 32, False), "nf4": (4, 64, True)}
    dram = h.ARCH[arch].dram_bytes_per_s
    for fmt, (bits, g, nf4) in formats.items():
        for k in (2048, 1536):
            for m in (40, 56):
                c = h.choose_fused("grad", m, 256, k, bits, g, nf4, arch)
                assert c.op == "splitn" and c.split == 1, (fmt, k, m, c)
                assert c.block_n == 256 or (arch, m) == (80, 56), (fmt, k, m, c)
                assert h.split_direct(c.op, c.split)
                assert h.choose_config("splitn", m, 256, k, fmt, arch) == c
                # the same tile's time if it kept a workspace: the passes (10 B a dX element) and
                # fp32 partial rows (4 B, not 2) on top
                packed = h.weight_bytes(256, k, bits, g, nf4)
                direct = h.fused_time(c, m, 256, k, packed, arch, fmt)
                kept = h.fused_time(dataclasses.replace(c, split=2), m, 256, k, packed, arch, fmt)
                assert kept - direct > 10 * m * k / dram


@pytest.mark.parametrize("op", ["splitk", "splitn"])
@pytest.mark.parametrize("arch", [90, 80])
def test_mid_m_split_weighs_its_slices_against_one(device_lists, arch, op):
    """A one-slice split launch stores its output itself (no workspace, no passes: split-N's dX
    since round 32, split-K's Y since round 33), so at 16 < M <= 128 each candidate's slice count is
    the occupancy rule's (split_count) or one, whichever fused_time finds faster (split-K since
    round 33, split-N since round 34); at M <= 16 (decode: the passes are small next to the weight)
    it stays the occupancy rule's; a one-slice launch is charged the cut last step it decodes in
    full. Several layers take one slice where the rule would split (the passes, 10 B an output
    element, outweigh the balance the slices buy: split-K on sm_90 4096->1024 at M = 128 runs 128
    one-slice CTAs, on sm_80 2048->8192 at M = 96 768; split-N's dX of 2048->512 at M = 64 one
    slice of 128 CTAs on sm_90, not two of 256)."""
    import dataclasses

    sms = h.DEFAULT_SMS[arch]
    took_one = 0
    for k, n in ((4096, 1024), (2048, 8192), (4096, 14336), (8192, 28672), (8192, 1024), (384, 1536), (2880, 4096),
                 (2048, 512), (1536, 320)):
        for m in (1, 16, 17, 24, 48, 96, 128):
            for fmt in ("int4g32", "int4g128", "int3g128", "int2g32", "nf4"):
                packed = h._gemm_packed_bytes(n, k, fmt)
                for c in h.score_all(op, m, n, k, fmt, arch):
                    cfg = h.candidates(op)[c.index]
                    if op == "splitk":  # the reduction, its step and the output tiles each slice repeats
                        length, block, base = k, c.block_k, math.ceil(n / c.block_n) * math.ceil(m / c.block_m)
                    else:
                        length, block, base = n, c.block_n, math.ceil(k / c.block_k) * math.ceil(m / c.block_m)
                    occupancy = h.split_count(length, block, base, sms, resident=h.resident_ctas(op, cfg, fmt, arch))
                    assert c.split in (1, occupancy) and c.ctas == base * c.split, (k, n, m, fmt, c)
                    if m <= h.SPLIT_ALWAYS_M or occupancy == 1:
                        assert c.split == occupancy, (k, n, m, fmt, c)
                        continue
                    other = 1 if c.split == occupancy else occupancy
                    fill = h.split_busy(length, block, other) * (  # one slice decodes its cut last step in full
                        length / (math.ceil(length / block) * block) if other == 1
                        else h.short_reduction_fill(length, block))
                    bal = h.sm_balance(base * other, sms)
                    alt = dataclasses.replace(c, split=other, ctas=base * other, sm_balance=bal, fill=fill,
                                              score=c.tile_eff * bal * fill)
                    t, t_alt = (h.fused_time(x, m, n, k, packed, arch, fmt) for x in (c, alt))
                    assert t <= t_alt, (k, n, m, fmt, c.label, c.split, t, t_alt)
                    took_one += c.split == 1
    assert took_one >= 20, took_one
    if op == "splitk":
        m, n, k = {90: (128, 1024, 4096), 80: (96, 8192, 2048)}[arch]
        pick = h.choose_config("splitk", m, n, k, "int4g128", arch)
        assert pick.split == 1 and pick.ctas == n // 64 * math.ceil(m / 16), pick
        # a one-slice launch over K = 384 on 256-deep steps decodes 512 columns: the 128-deep tile's
        # three exact steps in three slices stay faster (Qwen3-0.6B-like 384->1536 NF4 at M = 40; without
        # the cut step counted the 256-deep one-slice launch was picked, 0.79x of the best on sm_90)
        assert h.choose_config("splitk", 40, 1536, 384, "nf4", arch).block_k == 128
    elif arch == 90:
        pick = h.choose_config("splitn", 64, 512, 2048, "int4g128", arch)
        assert pick.split == 1 and pick.ctas == 2048 // pick.block_k * 4, pick


# ------------------------------------------------------------------ round 35: launch caches (host time)
_SWEEP_FORMATS = (("int4g128", 4, 128, False), ("nf4", 4, 64, True), ("int2g64", 2, 64, False), ("int3g64", 3, 64, False))


def test_cached_launch_decisions_equal_uncached_ones():
    """The memoized rules (heuristics.LAUNCH_CACHES) answer what the rules compute afresh, for a sweep
    of op, M (exact: the choices depend on it), N, K, format, arch and SM count; asked twice (the
    second answer from the cache)."""
    from qlk.kernels import config

    h.clear_launch_caches()
    for arch, sms in ((90, 132), (80, 108)):
        for fmt, bits, g, nf4 in _SWEEP_FORMATS:
            for n, k in ((4096, 4096), (1280, 1536), (14336, 4096)):
                for m in (1, 2, 15, 16, 17, 33, 64, 100, 256, 1000, 4096):
                    for op in h.OPS:
                        for fp32_bias, pool in ((False, False), (True, op == "splitn")):
                            fresh = h._choose(op, m, n, k, fmt, arch, sms, None, fp32_bias, pool)
                            for _ in range(2):
                                assert h.choose_config(op, m, n, k, fmt, arch, sms, fp32_bias=fp32_bias,
                                                       pool=pool) == fresh, (op, m, n, k, fmt, arch)
                    for op in ("fwd", "grad"):
                        fused = h.choose_fused.__wrapped__(op, m, n, k, bits, g, nf4, arch, sms)
                        path = h.choose_path.__wrapped__(op, m, n, k, bits, g, nf4, arch, sms, 2)
                        for _ in range(2):
                            assert h.choose_fused(op, m, n, k, bits, g, nf4, arch, sms) == fused
                            assert h.choose_path(op, m, n, k, bits, g, nf4, arch, sms, 2) == path
                m1 = h.choose_m1_grad.__wrapped__(n, k, fmt, arch, sms)
                assert h.choose_m1_grad(n, k, fmt, arch, sms) == m1 == h.choose_m1_grad(n, k, fmt, arch, sms)
    assert config._DEVICE_FACTS is not None


def test_launcher_decisions_equal_uncached_ones(monkeypatch):
    """The launchers' own decisions (fm.choose_path, fm.fused_kernel, fm._tiles) with the caches warm
    equal those made after clear_launch_caches(), at sm_90 and sm_80 (fm.target_arch / num_sms
    patched, as the tests do); CHOICE_LOG records every call's choice, cached or not."""
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    monkeypatch.setattr(fm, "INTERPRETED", False)  # the static model's path choice, not the interpreter's
    for arch, sms in ((90, 132), (80, 108)):
        monkeypatch.setattr(fm, "target_arch", lambda arch=arch: arch)
        monkeypatch.setattr(fm, "num_sms", lambda device, sms=sms: sms)
        for fmt, bits, g, nf4 in _SWEEP_FORMATS[:2]:
            qw = qlk.quantize(torch.randn(256, 512), bits=bits, group_size=g, fmt="nf4" if nf4 else "int")
            meta = fm.weight_args(qw)[1]
            for m in (1, 16, 17, 64, 300, 4096):
                for op in ("fwd", "grad"):
                    h.clear_launch_caches()
                    fresh = (fm.choose_path(op, m, qw, "cpu", torch.bfloat16), fm.fused_kernel(op, m, qw, "cpu"),
                             fm._tiles(op, m, 256, 512, meta, "cpu"))
                    for _ in range(2):
                        assert (fm.choose_path(op, m, qw, "cpu", torch.bfloat16), fm.fused_kernel(op, m, qw, "cpu"),
                                fm._tiles(op, m, 256, 512, meta, "cpu")) == fresh, (op, m, arch, fmt)
                    assert log[-3:] == [(op, fresh[2][0])] * 3  # one entry per launch decision


def test_launch_caches_are_bounded_and_cleared():
    from qlk.kernels import config

    for fn in h.LAUNCH_CACHES:
        assert fn.cache_info().maxsize is not None and fn.cache_info().maxsize <= 4096, fn
    h.clear_launch_caches()
    limit = h.choose_m1_grad.cache_info().maxsize
    for n in range(limit + 50):  # more shapes than the cache holds: it stays at its size
        h.choose_m1_grad(64 + n, 128, "int4", 90, 132)
    assert h.choose_m1_grad.cache_info().currsize == limit
    for i in range(config._DEVICE_FACTS_MAX + 10):
        config._remember(("test", i), lambda i=i: i)
        assert len(config._DEVICE_FACTS) <= config._DEVICE_FACTS_MAX
    assert config._remember(("test", "x"), lambda: 7) == 7 and config._remember(("test", "x"), lambda: 8) == 7
    h.clear_launch_caches()
    assert not config._DEVICE_FACTS
    assert all(fn.cache_info().currsize == 0 for fn in h.LAUNCH_CACHES)


def test_a_table_patched_before_the_first_launch_is_read(monkeypatch):
    """The autouse fixture (tests/conftest.py) empties the caches before each test: a table patched
    at a test's start is what the rules read; one patched after needs clear_launch_caches()."""
    before = h.choose_config("fwd", 300, 4096, 4096, "int4g128", 90, 132)
    other = [c for c in h.score_all("fwd", 300, 4096, 4096, "int4g128", 90, 132) if c.label != before.label]
    only = [h.candidates("fwd")[other[0].index]] if other else [_cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=32,
                                                                       GROUP_M=8)]
    real = h.candidates
    monkeypatch.setattr(h, "candidates", lambda op: only if op == "fwd" else real(op))
    assert h.choose_config("fwd", 300, 4096, 4096, "int4g128", 90, 132) == before  # cached
    h.clear_launch_caches()
    after = h.choose_config("fwd", 300, 4096, 4096, "int4g128", 90, 132)
    assert after.label != before.label and after.block_m == only[0].kwargs["BLOCK_M"]


class _FakeDriver:
    def __init__(self, arch, sms):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.asked = 0
        outer = self

        class _Utils:
            @staticmethod
            def get_device_properties(device=0):
                outer.asked += 1
                return {"multiprocessor_count": sms}

        self.utils = _Utils()

    def get_current_target(self):
        self.asked += 1
        return self.target

    def get_current_device(self):
        return 0


def test_device_facts_follow_the_active_driver():
    """config.target_arch / num_sms are asked once per active driver (the static tools swap it: one
    TargetOnlyDriver per arch), not once per process."""
    from triton.runtime import driver

    from qlk.kernels import config

    saved = dict(vars(driver))
    try:
        a, b = _FakeDriver(80, 108), _FakeDriver(90, 132)
        driver.set_active(a)
        assert (config.target_arch(), config.num_sms(torch.device("cpu"))) == (80, 108)
        assert (config.target_arch(), config.num_sms(torch.device("cpu"))) == (80, 108)
        assert a.asked == 2  # once each
        driver.set_active(b)
        assert (config.target_arch(), config.num_sms(torch.device("cpu"))) == (90, 132)
        driver.set_active(a)
        assert config.target_arch() == 80 and a.asked == 2
    finally:
        vars(driver).clear()
        vars(driver).update(saved)
        config.clear_device_caches()


def test_light_heuristics_layers_pass_what_triton_heuristics_would():
    """config.packed_rows_kernel / fma_kernel (round 35: no dict of every argument per value) set
    QN_ALIGN and the fusion option as a ``triton.heuristics`` layer of the same values does."""
    from triton.runtime.autotuner import Heuristics

    from qlk.kernels import config

    class Fn:
        arg_names = ["a", "stride_qn", "b"]

        def __init__(self):
            self.got = None

        def run(self, *args, **kwargs):
            self.got = (args, kwargs)

    for stride in (0, 1, 6, 72, 360, 4096):
        inner = Fn()
        layer = config.packed_rows_kernel(inner)
        assert isinstance(layer, Heuristics)
        layer.run(1, stride, 2, grid=(1,))
        assert inner.got == ((1, stride, 2), {"grid": (1,), "QN_ALIGN": config.row_alignment(stride)})
        layer.run(1, b=2, stride_qn=stride)
        assert inner.got[1]["QN_ALIGN"] == config.row_alignment(stride)
        assert layer.values["QN_ALIGN"]({"stride_qn": stride}) == config.row_alignment(stride)
    inner = Fn()
    layer = config.fma_kernel(inner)
    assert isinstance(layer, Heuristics)
    layer.run(1, 2, 3, num_warps=4)
    assert inner.got == ((1, 2, 3), dict(num_warps=4, **config.FP_FUSION))
    assert {k: v({}) for k, v in layer.values.items()} == config.FP_FUSION

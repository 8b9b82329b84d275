"""Candidate tile configurations, per architecture, and the device facts the launchers need.

Nothing here touches CUDA at import time: the config lists hold candidates for every architecture
(``qlk_arch``: 90, 80 or None for any). The matmul launchers do not autotune: at each launch
:func:`qlk.kernels.heuristics.choose_config` keeps the candidates of the current target that fit and
picks one by explicit rules (wave balance, tile fill, a main-loop model); the static report compiles
every candidate (``QLK_ALL_CONFIGS=1``) to show the pick next to the analyzer's best. The standalone
dequantize kernel still autotunes (``PRUNE``). Under the Triton interpreter (``TRITON_INTERPRET=1``)
each kernel gets exactly one small config: the interpreter cannot autotune (it has no driver) and
runs a config's tile sizes only as numpy array shapes.
"""
from __future__ import annotations

import os

import triton
from triton.runtime.autotuner import Heuristics

from .. import backend

INTERPRETED = backend.TRITON_INTERPRETED or os.environ.get("TRITON_INTERPRET", "0") == "1"

#: shared memory a CTA may use, by compute capability major*10+minor (what pruning checks)
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: streaming multiprocessors, for split-K sizing when no device can be asked (interpreter)
DEFAULT_SMS = 132


#: device facts (:func:`target_arch`, :func:`num_sms`) already asked, by (what, active Triton driver,
#: device index): the launchers ask at every launch, and the driver / torch answer in microseconds
#: each (round 35). The driver is part of the key because the static tools swap it
#: (bench/sass/capture.py's TargetOnlyDriver, one per arch). Bounded; :func:`clear_device_caches`
#: (and ``qlk.kernels.heuristics.clear_launch_caches``) empties it
_DEVICE_FACTS: dict = {}
_DEVICE_FACTS_MAX = 64


def clear_device_caches() -> None:
    """Forget every :func:`target_arch` / :func:`num_sms` answer (they are asked again)."""
    _DEVICE_FACTS.clear()


def _remember(key, compute):
    try:
        return _DEVICE_FACTS[key]
    except KeyError:
        pass
    value = compute()
    if len(_DEVICE_FACTS) >= _DEVICE_FACTS_MAX:
        _DEVICE_FACTS.clear()
    _DEVICE_FACTS[key] = value
    return value


def _active_driver():
    """The active Triton driver object, or None while none is (no GPU: creating the default fails,
    and would fail again at every ask). Triton >= 3.2 keeps it in ``driver._active`` (None until first
    use, ``set_active`` replaces it), older ones in ``driver.active`` (a lazy proxy)."""
    from triton.runtime import driver

    state = vars(driver)
    if "_active" not in state:
        return state.get("active")
    if state["_active"] is None:
        if _DEVICE_FACTS.get("no driver"):
            return None
        try:
            driver.active  # noqa: B018 - creates the default driver
        except Exception:  # no driver (CPU, interpreter): not asked again until clear_device_caches()
            _remember("no driver", lambda: True)
            return None
    return state["_active"]


def _driver_device(active) -> int:
    try:
        return int(active.get_current_device())
    except Exception:
        return 0


def _ask_arch(active) -> int:
    try:
        t = active.get_current_target()
        return int(t.arch) if isinstance(t.arch, int) else 0
    except Exception:  # no driver (CPU, interpreter)
        return 0


def target_arch() -> int:
    """Compute capability of the active Triton target as an int (90 for H100); 0 when unknown.
    Asked once per active driver and current device (:data:`_DEVICE_FACTS`)."""
    active = _active_driver()
    if active is None:
        return 0
    return _remember(("arch", active, _driver_device(active)), lambda: _ask_arch(active))


def _ask_driver_sms(active) -> int:
    try:
        return int(active.utils.get_device_properties(0)["multiprocessor_count"])
    except Exception:
        return DEFAULT_SMS


def num_sms(device) -> int:
    """SM count of ``device``: asks torch for CUDA tensors, the Triton driver otherwise (the static
    analysis tool provides one), else :data:`DEFAULT_SMS`. Asked once per CUDA device index / active
    driver (:data:`_DEVICE_FACTS`)."""
    import torch

    if getattr(device, "type", None) == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _remember(("sms", "cuda", index),
                         lambda: torch.cuda.get_device_properties(index).multi_processor_count)
    active = _active_driver()
    if active is None:
        return DEFAULT_SMS
    return _remember(("sms", active, 0), lambda: _ask_driver_sms(active))


def _cfg(arch, num_warps, num_stages, **kw):
    c = triton.Config(kw, num_warps=num_warps, num_stages=num_stages)
    c.qlk_arch = arch  # which target the candidate is meant for (None: any)
    return c


def _smem_estimate(c: triton.Config, a_bytes=2, op=None, group_size=None, fp32_bias=False, pool=False) -> int:
    """Bytes of shared memory a candidate takes. Without ``op`` (the dequantize kernel's pruning): (stages-1)
    copies of the activation tile plus the packed weight tile (upper bound: 4 bytes per code word column).

    With ``op`` ("fwd", "grad", "splitk", "splitn"; the rules' fit, :func:`qlk.kernels.heuristics._fits`),
    an upper bound of what the compiled kernels take (round 35, :data:`SMEM_MEASURED`): (stages-1) buffers
    of the activation tile (X [BLOCK_M, BLOCK_K] forward, dY [BLOCK_M, BLOCK_N] input gradient) at
    ``a_bytes`` a value (fp32 activations: 4; their "ieee" dots take every operand from shared memory)
    and of the packed words (4 bits a code), plus the decoded weight tile once (the MMA operand); a
    group size that is not a power of two gathers a scale and a bias per weight element: with QA-LoRA's
    fp32 folded biases (``fp32_bias``) both pipelined, 6 bytes an element a stage, else about 4 bytes an
    element once; QA-LoRA's in-GEMM pooling (``pool``, forward ops) reads the X tile once more."""
    k = c.kwargs
    bm, bn = k.get("BLOCK_M", 16), k.get("BLOCK_N", 64)
    bk = k.get("BLOCK_K", 64)
    if op is None:
        per_stage = bm * bk * a_bytes + bn * bk // 2 + bn * bk * a_bytes // 4
        return max(c.num_stages - 1, 1) * per_stage
    odd = bool(group_size) and group_size & (group_size - 1) != 0
    act = bm * (bn if op in ("grad", "splitn") else bk) * a_bytes
    per_stage = act + bn * bk // 2 + (6 * bn * bk if odd and fp32_bias else 0)
    once = bn * bk * a_bytes + (4 * bn * bk if odd and not fp32_bias else 0)
    if pool and op in ("fwd", "splitk"):
        once += bm * bk * a_bytes
    return max(c.num_stages - 1, 1) * per_stage + once


#: Round 35: shared memory of compiled launches (bytes, sm_90, triton 3.6 and 3.9 alike where both were
#: compiled; bench/results/gpu-NVIDIA-H200-20261204: the launches over the H200's 232448 failed to load),
#: (op, tile, format, activations, QA-LoRA fp32 folded biases / pooling) -> bytes. The rules' estimate
#: (:func:`_smem_estimate` with ``op``) is at least each of them (tests/test_smem_fit.py compiles the picks).
SMEM_MEASURED = {
    ("grad", "128x128x64 w4 s4", "int4g32", "fp32", ""): 229376,
    ("grad", "128x128x64 w4 s4", "int4g96", "fp32", ""): 241664,  # test_int_paths[int4g96k576-gemm-M40]
    ("grad", "128x128x64 w4 s4", "int3g48", "fp32", ""): 238592,  # int3g48k528 / int3g16k784
    ("grad", "128x128x64 w4 s4", "int2g8", "fp32", ""): 235520,  # int2g8k520
    ("grad", "128x128x64 w4 s4", "int3g48", "fp32", "fp32 bias"): 336896,  # test_qalora_paths[int3g48k528-gemm-M40]
    ("grad", "128x128x64 w4 s4", "int4g96", "bf16", ""): 61440,
    ("grad", "128x128x64 w4 s4", "int3g48", "bf16", ""): 58368,
    ("grad", "256x64x128 w8 s3", "int4g32", "fp32", ""): 163840,
    ("grad", "256x64x128 w8 s3", "int3g48", "fp32", ""): 169984,
    ("grad", "256x64x128 w8 s3", "int3g48", "bf16", "fp32 bias"): 104448,
    ("fwd", "64x128x128 w4 s4", "int3g48", "fp16", "fp32 bias"): 313344,  # test_qalora_odd_group_bias_batch_dims[40]
    ("fwd", "64x128x128 w4 s4", "int3g48", "bf16", ""): 116736,
    ("fwd", "256x128x64 w8 s3", "int3g48", "fp32", "fp32 bias"): 235520,
    ("fwd", "128x128x64 w8 s4", "int3g48", "fp32", "fp32 bias"): 238592,
    ("fwd", "256x128x64 w8 s3", "int4g32", "fp32", ""): 172032,
    ("fwd", "128x64x64 w4 s4", "int4g96", "fp32", ""): 120832,
    ("fwd", "128x64x64 w4 s4", "int4g32", "bf16", "pool"): 73472,
    ("splitk", "16x64x256 w2 s3", "int3g48", "fp32", "fp32 bias"): 241664,  # test_qalora_paths[int3g48k528-split-atomic-M5]
    ("splitk", "16x64x256 w4 s3", "int3g48", "bf16", "fp32 bias"): 192512,
    ("splitn", "16x256x64 w4 s3", "int3g48", "fp32", "fp32 bias"): 241664,
}


def _prune(configs, named_args, **kwargs):
    if len(configs) <= 1:
        return configs
    arch = target_arch()
    limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[80])
    family = 90 if arch >= 90 else 80
    kept = [c for c in configs if getattr(c, "qlk_arch", None) in (None, family) and _smem_estimate(c) <= limit]
    return kept or configs[:1]


PRUNE = {"early_config_prune": _prune}


def _prune_gemv(configs, named_args, **kwargs):
    """:data:`PRUNE`, and two tiles ptxas spills:
    - on sm_80, no 64x128 tile for INT4 with groups of 128 or more (16 B stack, 8 LDL/STL); the static
      analyzer ranks it below 32x256 at every Llama-family shape (docs/kernels.md "QA-LoRA, round 4");
      it stays for the other formats, where it is the best tile on the wide-K layers;
    - on sm_90, no 32x256 tile for INT3 / INT4 with groups of 128 or more where K is not a multiple of
      256 (the masked last K tile: 255 registers, 16 B stack, 7-9 LDL/STL at K = 896, round 14's
      out-of-sample check); 64x128 divides every such K (K is a multiple of the group)."""
    kept = _prune(configs, named_args, **kwargs)
    args = {**named_args, **kwargs}
    int_g128 = (args.get("BITS") in (3, 4) and not args.get("IS_NF4") and (args.get("GROUP_SIZE") or 0) >= 128)
    if target_arch() // 10 == 8 and int_g128 and args.get("BITS") == 4:
        kept = [c for c in kept if c.kwargs.get("BLOCK_N") != 64] or kept
    if target_arch() // 10 == 9 and int_g128 and (args.get("K") or 0) % 256:
        kept = [c for c in kept if c.kwargs.get("BLOCK_K") != 256] or kept
    return kept


#: the M = 1 FMA input gradient's autotune pruning (:func:`_prune_gemv`)
GEMV_PRUNE = {"early_config_prune": _prune_gemv}

#: Triton launch options of every qlk kernel whose arithmetic relies on FMA contraction (s·q + b
#: as one FFMA / HFMA2 in the dequantizing loops, the fp32 sums of products): Triton 3.9 warns that
#: fp fusion will be off by default from 3.10, so these launches ask for it. ``enable_fp_fusion`` is
#: a launch option of the CUDA backend in every Triton qlk supports (3.6 of the GPU image .. 3.9);
#: the interpreter ignores launch options. The bit-exact kernels (``_dequantize_kernel``,
#: ``_nf4_denest_kernel``) launch with ``enable_fp_fusion=False`` instead.
FP_FUSION = {"enable_fp_fusion": True}


def row_alignment(stride: int) -> int:
    """The largest of 16, 8, 4, 2 that divides ``stride`` (a packed weight's row stride in 32-bit
    words; 0 counts as divisible), else 1: :func:`packed_rows_kernel`'s ``QN_ALIGN``."""
    for d in (16, 8, 4, 2):
        if stride % d == 0:
            return d
    return 1


class _ConstHeuristics(Heuristics):
    """A ``triton.heuristics`` layer whose values do not depend on the arguments (:func:`fma_kernel`):
    the same kwargs, without building the arguments' dict per value (Triton's ``Heuristics.run`` zips
    every argument name into a new dict for each value: ~40 arguments, microseconds a launch)."""

    def __init__(self, fn, values: dict):
        super().__init__(fn, fn.arg_names, {name: (lambda _args, value=value: value) for name, value in values.items()})
        self._consts = dict(values)

    def run(self, *args, **kwargs):
        kwargs.update(self._consts)
        return self.fn.run(*args, **kwargs)


class _QnAlignHeuristics(Heuristics):
    """:func:`packed_rows_kernel`'s layer: ``QN_ALIGN`` from ``stride_qn`` alone, read from its place
    in the arguments (no dict of all of them; Triton's ``Heuristics.run`` would build one)."""

    def __init__(self, fn):
        super().__init__(fn, fn.arg_names, {"QN_ALIGN": lambda args: row_alignment(int(args["stride_qn"]))})
        self._at = list(fn.arg_names).index("stride_qn")

    def run(self, *args, **kwargs):
        stride = args[self._at] if self._at < len(args) else kwargs["stride_qn"]
        kwargs["QN_ALIGN"] = row_alignment(int(stride))
        return self.fn.run(*args, **kwargs)


class _ReadsHeuristics(Heuristics):
    """:func:`heuristics_reading`'s layer: the values computed from a dict of the few arguments they
    read (by position or keyword), each value added to it for the next, as ``triton.heuristics``
    chains them; Triton's own layer builds a dict of all ~40 arguments for every value (round 37:
    host time)."""

    def __init__(self, fn, values: dict, reads: tuple):
        super().__init__(fn, fn.arg_names, dict(values))
        names = list(fn.arg_names)
        self._reads = tuple((name, names.index(name) if name in names else len(names)) for name in reads)
        # the qlk layers below (packed_rows_kernel, fma_kernel) run here in one step, in their order
        # (each layer's pass of ~40 arguments costs a microsecond or more); ``fn`` stays the next layer
        self._inner, self._qn_at, self._consts = fn, None, {}
        while isinstance(self._inner, (_QnAlignHeuristics, _ConstHeuristics)):
            if isinstance(self._inner, _QnAlignHeuristics):
                self._qn_at = self._inner._at
            else:
                self._consts.update(self._inner._consts)
            self._inner = self._inner.fn

    def run(self, *args, **kwargs):
        known = {}
        for name, at in self._reads:
            if at < len(args):
                known[name] = args[at]
            elif name in kwargs:
                known[name] = kwargs[name]
        for name, heur in self.values.items():
            known[name] = kwargs[name] = heur(known)
        if self._qn_at is not None:
            at = self._qn_at
            kwargs["QN_ALIGN"] = row_alignment(int(args[at] if at < len(args) else kwargs["stride_qn"]))
        kwargs.update(self._consts)
        return self._inner.run(*args, **kwargs)


def heuristics_reading(reads: tuple, values: dict):
    """``triton.heuristics(values)`` for values that read only the arguments named in ``reads``
    (a value reading any other raises KeyError at the first launch, which the tests run)."""
    return lambda kernel: _ReadsHeuristics(kernel, values, tuple(reads))


#: ``EVEN_K``: every K tile whole (no masked columns); the forward / decode / dequantize kernels
even_k_kernel = heuristics_reading(("K", "BLOCK_K"), {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host integers: ``triton.cdiv`` unwraps constexprs first (microseconds a call)."""
    return -(-a // b)


def packed_rows_kernel(kernel):
    """Decorator, above ``@fma_kernel`` (or ``@triton.jit``): every launch passes ``QN_ALIGN`` =
    :func:`row_alignment` of its ``stride_qn``, and the kernel starts with
    ``stride_qn = quant_tile.aligned_rows(stride_qn, QN_ALIGN)``.

    Why: Triton specializes an integer argument on divisibility by 16 and knows nothing otherwise,
    so a packed row of 360 words (NF4 / INT4 at K = 2880, gpt-oss) or 72 (INT4 at K = 576, SmolLM2)
    made every word load scalar: cp.async of 4 B and an LDS a word, where 16 B loads were legal
    (360 = 8·45). INT3 reads its 3-word plane sets one word at a time either way. sm_90 gpt-oss NF4 grouped forward at 16 tokens: 232 → 168
    registers, loop 772 → 692 instructions (docs/kernels.md "Round 13"). A ``triton.heuristics``
    layer (``values["QN_ALIGN"]``) that reads the one argument it needs (round 35: host time)."""
    return _QnAlignHeuristics(kernel)


def fma_kernel(kernel):
    """Decorator, directly above ``@triton.jit``: every launch passes :data:`FP_FUSION`
    (a ``triton.heuristics`` layer, so the launchers, the autotuner above it and the static
    analyzer's capture all see the option; its values are constants, set without the arguments'
    dict: round 35, host time)."""
    return _ConstHeuristics(kernel, FP_FUSION)


def gemm_configs():
    """Large-M fused dequant GEMM (forward; weight as the MMA A operand: tile [BLOCK_N, BLOCK_M]).

    sm_90: 128x256x64, 8 warps (two warpgroups of m64n256k16 wgmma on 64 weight rows each).
    sm_80: 256x128x32: Triton spreads mma.sync warps over both tile dims and every warp that
    shares weight rows dequantizes them again, so the tile is tall (256 rows) to keep that
    duplication at 2x (docs/kernels.md).
    Narrow N / mid M (round 2): one-warpgroup (sm_90) and 4-warp (sm_80) tiles with 64 or 128
    weight rows, for grids of >= one CTA per SM where the big tiles leave SMs idle."""
    if INTERPRETED:
        return [_cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=64, BLOCK_K=64, GROUP_M=4)]
    return [
        _cfg(90, 8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_M=8),
        _cfg(90, 8, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        _cfg(90, 4, 3, BLOCK_N=64, BLOCK_M=256, BLOCK_K=64, GROUP_M=8),
        _cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        # round 15: one warpgroup on 64 rows of X, for M whose 128/256-row tiles are mostly padding
        # (M = 300: 5 tiles of 64 fill 0.94, 2 of 256 fill 0.59); proposed at 64 <= M <= 1024
        # (heuristics.CANDIDATE_M_RANGE; round 25: at every M >= 64, where the analyzer has it best on grids
        # the big tiles leave short, e.g. 576->192 at M = 3000)
        _cfg(90, 4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP_M=8),
        # round 20: the same 64 rows of X on 128-column K steps: half the loop iterations, so the
        # per-step work that does not scale with the tile (X's address math, scale loads, barriers)
        # weighs half as much, and INT3's 128-column quad of chunks fits a step, so it decodes in
        # the lane-owned order too (27648->5120 M = 777: INT3 0.85..0.44 -> 0.96..0.49 of peak)
        _cfg(90, 4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
        _cfg(80, 8, 3, BLOCK_N=256, BLOCK_M=128, BLOCK_K=32, GROUP_M=8),
        _cfg(80, 8, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=32, GROUP_M=8),
        _cfg(80, 4, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=32, GROUP_M=8),
        _cfg(80, 4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, GROUP_M=8),
        # round 9 (docs/kernels.md "Round 9"): two warps on a 64x128 / 128x64 tile, 64x64 per warp.
        # The 4-warp 64x128 tile gives each warp 32 columns of X for 64 rows of Ŵ, so every weight is
        # dequantized for half the MMA work of the 128x128 tile (INT3 issue-bound); two warps keep
        # the 128x128 tile's ratio, and 4 CTAs per SM fill mid-M grids without a K split
        _cfg(80, 2, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, GROUP_M=8),
        _cfg(80, 2, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=32, GROUP_M=8),
    ]


def grad_configs():
    """Large-M input gradient dX = dY·Ŵ: tile dXᵀ [BLOCK_K, BLOCK_M], reduction over BLOCK_N rows.

    The dequantized Ŵᵀ tile changes layout through shared memory once per iteration (bf16,
    :mod:`qlk.kernels.quant_tile_t`), a cost per weight element: the wide BLOCK_M tiles spread it
    over more MMA work (sm_80: 256 columns of dX per CTA, docs/kernels.md "Input gradient, round 2").
    sm_90 128x64x64 w4: mid M (256 tokens), twice the CTAs of BLOCK_K = 128 on 132 SMs.
    Round 8: two 4-warp sm_80 tiles, an NF4 sm_90 tile with 128-row N steps and a 64x32x64 sm_90
    tile for M = 64 on short reductions (docs/kernels.md "Round 8"). Round 18: on sm_90 the INT2/INT4
    (round 19: INT3) tiles compute dX [BLOCK_M, BLOCK_K] = dY·Ŵ with Ŵ as wgmma's B operand instead (stored once to
    shared memory, no round trip; heuristics.GRAD_W_AS_B), the same block sizes."""
    if INTERPRETED:
        return [_cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=64, BLOCK_K=64, GROUP_M=4)]
    return [
        _cfg(90, 8, 3, BLOCK_N=64, BLOCK_M=256, BLOCK_K=128, GROUP_M=8),
        _cfg(90, 8, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=128, GROUP_M=8),
        # round 2, mid M / narrow K: 64 rows of Ŵᵀ (the 256-column w4 tile spills)
        _cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        _cfg(90, 8, 3, BLOCK_N=64, BLOCK_M=256, BLOCK_K=64, GROUP_M=8),
        _cfg(80, 8, 3, BLOCK_N=32, BLOCK_M=128, BLOCK_K=128, GROUP_M=8),
        _cfg(80, 8, 3, BLOCK_N=32, BLOCK_M=256, BLOCK_K=128, GROUP_M=8),
        _cfg(80, 4, 3, BLOCK_N=32, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
        # round 8 (docs/kernels.md "Round 8"): 4 warps on a 128x128 dXᵀ tile, 64x64 per warp: fewer
        # LDSM per MMA than the 8-warp tile (NF4 at M = 333: smem-bound -> tensor-bound); its split
        # variant spills (heuristics.GRAD_SPLIT_SPILLS), so it runs unsplit
        _cfg(80, 4, 3, BLOCK_N=32, BLOCK_M=128, BLOCK_K=128, GROUP_M=8),
        # 64 rows of N an iteration (the narrow layers and M = 64-128; INT3 2048-wide at M = 333)
        _cfg(80, 4, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
        # round 9 (docs/kernels.md "Round 9"): two warps on the 64x64x128 tile, 64x64 of dXᵀ per warp,
        # four CTAs per SM: mid-M grids filled without a split, the MMA work per decoded weight of the
        # 128x128 tiles (the dense baseline has the same two-warp tile)
        _cfg(80, 2, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
        # round 26: 64 columns of dX on a 64-row reduction step, 128 rows of dY: a K that is an odd
        # number of 64-column tiles (SmolLM2's 576: 9 tiles, against 4.5 of 128) and short
        # reductions (576->192 at M = 3000: 0.74x -> 1.03x dense, DRAM-bound like the dense tile)
        _cfg(80, 4, 3, BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        # 128 rows of N an iteration (NF4 at M = 333 wide K; INT at M = 1024 on 3072-wide K)
        _cfg(90, 4, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_M=8),
        # M = 64 on a short reduction (2048->512): 64-column tiles, 32-row steps split 4 ways; taken only
        # where it wins by heuristics.GRAD_CANDIDATE_MARGIN
        _cfg(90, 4, 4, BLOCK_N=32, BLOCK_M=64, BLOCK_K=64, GROUP_M=8),
        # round 16: one warpgroup on 64 columns of dXᵀ (64 rows of dY), for M whose 128/256-row tiles
        # are mostly padding (M = 300: 5 tiles of 64 fill 0.94, 3 of 128 fill 0.78; M = 48: 0.75 and
        # 0.38); proposed at M >= 17 (heuristics.CANDIDATE_M_RANGE; up to 1024 before round 25). Of six 64-row tiles compiled at M = 128 / 300 /
        # 777 / 3000 (64x64x64, 64x128x64 and 64x64x128 w4; 64x64x128, 64x128x128 and 64x64x256 w8) it is
        # the one the analyzer ranks first where big tiles are mostly padding (docs/kernels.md "Round 16")
        # round 20: the same 64 columns of dXᵀ on 128-row N steps (Ŵ as wgmma's B operand): half the
        # iterations, so the per-step work that does not scale with the tile weighs half as much
        # (2304->9216 M = 400: INT3 0.82..0.44 -> 0.94..0.47 of peak, NF4 0.71..0.41 -> 0.77..0.43);
        # listed before the 64-row-step tile, which it ties where both are DRAM-capped (M <= 64)
        _cfg(90, 4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
        _cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, GROUP_M=8),
    ]


def splitk_configs():
    """Small-M (decode) split-K forward: tile [BLOCK_N, BLOCK_M=16], K split over the grid."""
    if INTERPRETED:
        return [_cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)]
    return [
        _cfg(90, 4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128),
        _cfg(90, 4, 3, BLOCK_N=64, BLOCK_M=16, BLOCK_K=256),
        # 16x128x256 w8 (estimated +0.03..0.04 at M <= 16 on sm_90, docs/kernels.md "Decode, round 3")
        # waits until the rules' calibration (heuristics.CALIBRATION, fitted from the family sweep)
        # has measured it: without an entry the rules would pick it on an uncalibrated guess
        _cfg(80, 4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128),
        _cfg(80, 4, 3, BLOCK_N=64, BLOCK_M=16, BLOCK_K=256),
        # round 24: two warps read the X tile from shared memory half as often (the grouped
        # forward's small-M tile; 4096->14336 at M = 1, pessimistic +0.03..0.05 on both archs)
        _cfg(90, 2, 3, BLOCK_N=64, BLOCK_M=16, BLOCK_K=256),
        _cfg(80, 2, 3, BLOCK_N=64, BLOCK_M=16, BLOCK_K=256),
    ]


def splitn_configs():
    """Small-M input gradient, split over N: tile dXᵀ [BLOCK_K, BLOCK_M=16], N split over the grid.
    sm_90: the two best of seven candidates by dram-peak on *useful* bytes (docs/kernels.md: some
    tiles make the compiler reload scales per element, which the static model counts as DRAM bytes)."""
    if INTERPRETED:
        return [_cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)]
    return [
        _cfg(90, 4, 3, BLOCK_N=256, BLOCK_M=16, BLOCK_K=64),  # best of 7 on every INT format
        _cfg(90, 4, 3, BLOCK_N=128, BLOCK_M=16, BLOCK_K=64),  # second (fewer rows per CTA)
        _cfg(80, 4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128),
        _cfg(80, 4, 3, BLOCK_N=128, BLOCK_M=16, BLOCK_K=128),
        # round 23: two warps read the dY tile from shared memory half as often (the grouped
        # gradient's sm_80 tile; INT2 / INT3 / NF4 +6-11 % at M = 16 on 4096->14336)
        _cfg(80, 2, 3, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128),
        # round 32: 256 rows of N a step, 64 columns of dX: narrow layers (N <= 256) in one slice,
        # which stores dX directly (no workspace), on twice the CTAs of a 128-column tile
        # (2048->256 at M = 40-56: 1.1-1.7 us -> 0.8 us, docs/kernels.md "Round 32")
        _cfg(80, 4, 3, BLOCK_N=256, BLOCK_M=16, BLOCK_K=64),
    ]


def gemv_grad_configs():
    """Input gradient at M = 1 by FMAs (``_quant_matmul_grad_input_gemv_kernel``): acc [BLOCK_N, BLOCK_K]
    in registers, N split over the grid. sm_80 INT4 g ≥ 128 leaves out 64x128 (:data:`GEMV_PRUNE`)."""
    if INTERPRETED:
        return [_cfg(None, 4, 1, BLOCK_N=16, BLOCK_K=64)]
    return [
        _cfg(None, 4, 3, BLOCK_N=32, BLOCK_K=256),
        _cfg(None, 4, 3, BLOCK_N=64, BLOCK_K=128),
    ]


def dequant_configs():
    if INTERPRETED:
        return [_cfg(None, 4, 1, BLOCK_N=32, BLOCK_K=64)]
    return [
        _cfg(None, 4, 1, BLOCK_N=32, BLOCK_K=256),
        _cfg(None, 8, 1, BLOCK_N=64, BLOCK_K=256),
    ]


#: The small-M grouped tiles' rows: 16 while the average expert holds at most 16 routed rows, 32 from
#: there to the small-M bound (``grouped_matmul.SMALL_M_ROWS``). Why (round 30, bench/moe_estimates.py
#: at 128 tokens, Mixtral's layers: 32 rows an expert): a program row per expert runs its expert's
#: tiles one after another (the slot loop), so two 16-row tiles decode the expert's weight twice in
#: one CTA. Cells under 0.9x the dense grouped baseline (DRAM metric) at 128 tokens, every format:
#: sm_90 26 -> 2, sm_80 27 -> 5 (the INT2 / INT3 small-M input gradients of the 16-token class).
SMALL_TILE_ROWS = (16, 32)


#: Above the small-M bound and up to this many routed rows an expert (S/E), the large-M kernels run
#: 64-row tiles (four warps; sm_80's input gradient two), not 128-row ones on eight. Why (round 30,
#: bench/moe_estimates.py at 160 and 250 tokens, Mixtral's layers: 40 and 62 rows an expert): a
#: 128-row tile pads an expert of 40 rows 3.2x, and below 256 tokens the work is the weight's bytes.
#: Cells under 0.9x the dense grouped baseline there: sm_90 52 of 112 -> 4 (QA-LoRA's INT3 forward at
#: 0.84-0.87x; the plain one steps 128 deep, 0.83x -> 1.00x); sm_80 56 -> 52, every cell up (lowest
#: 0.25x -> 0.45x; at 64 padded rows mma.sync's tensor time exceeds a low-bit weight's DRAM time:
#: docs/moe.md "Round 30"). QA-LoRA's folded forward too (on sm_80 no longer by the 128-row tile rule,
#: :func:`qlk.kernels.heuristics.grouped_folded_fwd_tile`); its input gradient keeps 128 rows.
MID_TILE_ROWS = 64


def small_tile_rows(rows_per_expert: float) -> int:
    """BLOCK_M of the small-M grouped tiles for S/E = ``rows_per_expert`` (:data:`SMALL_TILE_ROWS`)."""
    short, tall = SMALL_TILE_ROWS
    return short if rows_per_expert <= short else tall


#: (bits, group size, folded) whose sm_80 32-row small-M forward (32x64x128 on two warps) spills: round
#: 31's check of the other group sizes (bench/results/static-moe-t4096-128-16-formats-sm80: INT4 g64
#: 24 B, QA-LoRA's folded INT2 g128 16 B, Mixtral at 128 tokens). They take a 64-deep step on four stages, which
#: compiles without spills for every format (the 64-deep tile everywhere would cost the report's
#: formats up to 0.2x: INT3 g128 0.79x, QA-LoRA INT4 g128 0.79x at 128 tokens)
GROUPED_SMALL_FWD_SPILLS_SM80 = frozenset({(4, 64, False), (2, 128, True)})


def grouped_config(direction: str, small_m: bool, rows_per_expert: float = 0.0, folded: bool = False,
                   bits: int = 4, group_size: int | None = None) -> dict:
    """Tile sizes, warps and stages of the grouped (mixture-of-experts) kernels of
    :mod:`qlk.kernels.grouped_matmul`, for ``direction`` "fwd" or "grad" on the current target.

    Not autotuned: the launcher builds its tile map (which M tile belongs to which expert) for one
    BLOCK_M before the launch, from what the host knows without a sync: S routed rows over E
    experts, ``rows_per_expert`` = S/E. Large M takes the dense GEMM's best sm_90 tiles (forward:
    weight as the MMA A operand; input gradient: dXᵀ tiles, reduction over N), with 256-row tiles
    once the average expert fills one (Mixtral- and Qwen3-MoE-sized batches), 128-row tiles
    below and 64-row ones on four warps up to :data:`MID_TILE_ROWS` rows an expert, so a lightly
    loaded expert does not pad to 256 or 128. Small M (decode, or a few rows per
    expert) uses 16-row tiles, so an expert with one token wastes at most 15 rows (32-row tiles above 16
    rows an expert: :func:`small_tile_rows`), and the dense
    decode kernels' K depth (forward) / N depth (input gradient); the forward's on two warps (four
    for QA-LoRA's folded INT4), sm_80's input gradient too.

    Register limits, read from the machine code (bench/moe_estimates.py's CSV, 0 spills in all):
    ``folded`` (QA-LoRA's fp32 folded biases and in-kernel pooling) with INT3 spills in the
    256-row sm_90 forward tile, which then stays 128-row; on sm_80 the forward runs 128×128 tiles
    on 4 warps (two CTAs per SM); folded, the dense QA-LoRA GEMM's 256-weight-row tile on 8 warps
    (the 4-warp tile spills), and the large-M input gradient the dense gradient's 256-column tile.
    The grouped launcher weighs that sm_80 folded forward tile against a 64-column one by the grid's
    balance (:func:`qlk.kernels.grouped_matmul.tiles_for`)."""
    if INTERPRETED:
        return dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    hopper = target_arch() >= 90
    full = rows_per_expert >= 256
    mid = not small_m and 0 < rows_per_expert <= MID_TILE_ROWS
    if direction == "fwd":
        if small_m:
            # two warps (round 24, analyzer sweep of the MoE layers at 1 and 16 tokens, both archs):
            # DRAM-peak pessimistic +0.01..+0.07 for INT, NF4 within 0.002; sm_80's INT3 at K = 1408
            # no longer issue-bound (0.88 -> 0.99 optimistic). QA-LoRA's folded INT4 keeps four: its
            # fp32 biases spill 16 B on two warps at some shapes of both archs
            rows = small_tile_rows(rows_per_expert)
            if rows > 16 and not hopper:
                deep = (bits, group_size, folded) not in GROUPED_SMALL_FWD_SPILLS_SM80
                return dict(BLOCK_N=64, BLOCK_M=rows, BLOCK_K=128 if deep else 64,
                            num_warps=4 if folded and bits == 4 else 2, num_stages=3 if deep else 4)
            warps = 4 if (folded and bits == 4) or rows > 16 else 2
            return dict(BLOCK_N=64, BLOCK_M=rows, BLOCK_K=256, num_warps=warps, num_stages=3)
        if mid:
            if hopper and bits == 3 and not folded:  # INT3's decoder: issue-bound 64 deep (0.83x -> 1.00x)
                return dict(BLOCK_N=128, BLOCK_M=MID_TILE_ROWS, BLOCK_K=128, num_warps=4, num_stages=3)
            return dict(BLOCK_N=128, BLOCK_M=MID_TILE_ROWS, BLOCK_K=64 if hopper else 32, num_warps=4, num_stages=4)
        if hopper:
            if full and not (folded and bits == 3):
                return dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, num_warps=8, num_stages=3)
            return dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=4)
        if folded:  # the dense QA-LoRA GEMM's sm_80 tile: 256 weight rows over 8 warps (the 4-warp tile spills)
            return dict(BLOCK_N=256, BLOCK_M=128, BLOCK_K=32, num_warps=8, num_stages=3)
        return dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=4)
    if small_m:
        if hopper:
            if bits < 16 and not folded:
                # quantized weights (round 3, analyzer sweep at 16 tokens): a deeper dX tile spreads
                # the per-iteration work that does not scale with it (dY tile, address math) over
                # more weights; 128 rows of N per step (256 spills in grouped_matmul's slot loop).
                # sm_80 keeps its tile: 256 columns left Mixtral's gate_up gradient 128 CTAs on 108 SMs
                return dict(BLOCK_N=128, BLOCK_M=small_tile_rows(rows_per_expert), BLOCK_K=128, num_warps=4,
                            num_stages=3)
            # QA-LoRA's folded biases and the unquantized tile keep 16 rows (not swept at 32)
            return dict(BLOCK_N=256, BLOCK_M=16, BLOCK_K=64, num_warps=4, num_stages=3)
        # sm_80: two warps (round 23): each warp reads the whole dY tile from shared memory for its
        # rows of dXᵀ, so two warps halve that traffic (the loop is shared-memory-bound for INT2/INT3)
        return dict(BLOCK_N=64, BLOCK_M=small_tile_rows(rows_per_expert) if not folded else 16, BLOCK_K=128,
                    num_warps=2, num_stages=3)
    if mid and not folded:  # QA-LoRA's input gradient (fp32 folded biases): not compiled at 64 rows yet
        # sm_80 on two warps: the dY tile's shared-memory reads halve (as round 23's small-M tile; Mixtral
        # at 160 tokens INT4 g32 0.74x -> 0.86x, NF4 0.67x -> 0.78x, INT2 0.45x -> 0.53x)
        return dict(BLOCK_N=64 if hopper else 32, BLOCK_M=MID_TILE_ROWS, BLOCK_K=128, num_warps=4 if hopper else 2,
                    num_stages=4 if hopper else 3)
    if hopper:
        if full and not folded:  # QA-LoRA's input gradient (fp32 folded biases): not compiled at 256 rows yet
            return dict(BLOCK_N=64, BLOCK_M=256, BLOCK_K=128, num_warps=8, num_stages=3)
        return dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=128, num_warps=8, num_stages=4)
    if full and not folded:  # the dense gradient's wide sm_80 tile: the Ŵᵀ layout change spread over 256 columns
        return dict(BLOCK_N=32, BLOCK_M=256, BLOCK_K=128, num_warps=8, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_M=128, BLOCK_K=128, num_warps=8, num_stages=3)


def grouped_split_k(rows: int, num_experts: int, n: int, k: int, cfg: dict, sms: int) -> int:
    """K slices per tile of the small-M grouped forward: 1 (no split) while the tiles of the active
    experts fill two waves of the GPU, else enough slices to fill them, each at least 4 K tiles.

    Counted without a device sync: at most min(S, E) experts are active and each takes
    ⌈rows per expert / BLOCK_M⌉ tiles; CTAs = tiles × ⌈N / BLOCK_N⌉ against 2 × SMs slots
    (decode tiles hold two CTAs per SM). Mixtral's down projection at one token: 2 experts × 64
    N tiles = 128 CTAs on 132 SMs -> 3 slices of its 56 K tiles."""
    active = max(1, min(rows, num_experts))
    tiles = active * -(-max(1, rows // active) // cfg["BLOCK_M"])
    ctas = tiles * -(-n // cfg["BLOCK_N"])
    slots = 2 * sms
    if ctas >= slots:
        return 1
    k_tiles = -(-k // cfg["BLOCK_K"])
    return max(1, min(-(-slots // ctas), k_tiles // 4))

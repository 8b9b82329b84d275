"""Fused dequantize + matmul: Y = X·Ŵᵀ (+ bias) and its input gradient dX = dY·Ŵ.

Ŵ [N, K] is never materialized: each kernel dequantizes [BLOCK_N, BLOCK_K] tiles of the packed
weight in registers inside its K (or N) loop and feeds them to ``tl.dot`` with fp32 accumulation.
The forward and the input gradient read the same packed buffer (no repack, no transposed copy).
Both forward kernels decode INT weights with fp16/bf16 activations straight into the activation
dtype with packed half2 math (:func:`qlk.kernels.decode_tile._decode_int_tile`, round 7 for the
large-M GEMM: ŵ = round_act(s·(q − m) + c), so Y does not depend on which forward kernel M picks);
NF4 with fp16/bf16 activations by the half2 lookup (round 21,
:func:`qlk.kernels.decode_tile._decode_nf4_tile`: ŵ = round_act(NF4_act[q]·absmax_act), the table
and the absmax rounded to the activation dtype first); fp32 activations take the fp32 tile of
:func:`qlk.kernels.quant_tile._dequant_tile`.

Kernels (one launcher picks by shape, ``path=`` forces one; each launches with the tile that
:mod:`qlk.kernels.heuristics` chooses by explicit rules, no autotuning; at M > 16 ``path="auto"``
may instead dequantize Ŵ and run a dense GEMM when the static model estimates that faster):

``_quant_matmul_fwd_kernel``  large M (training; compute-bound). Each program computes the
    transposed tile Yᵀ[n0:n0+BN, m0:m0+BM] = Ŵ[BN, K]·Xᵀ[K, BM]: the weight is the A operand of the
    MMA, so on Hopper the dequantized tile goes from registers straight into wgmma (which reads B
    only from shared memory; a dequantized B would make a round trip through it; the measurements
    of that weight-as-B variant, since removed, are in docs/kernels.md). At mid M, where its output
    tiles leave SMs idle or fill the last wave badly, the rules split its K loop over a second grid
    axis (``SPLIT_K``; slices of whole groups, partials through the split workspace;
    :func:`qlk.kernels.heuristics.fwd_split`).
``_quant_matmul_splitk_kernel``  small M (decode, M <= ``SPLITK_MAX_M``; memory-bound). The K
    loop is split over a second grid axis so that many CTAs stream the weight (about 16 per SM,
    the count that fills the SMs' resident slots in close to whole waves: heuristics.split_count);
    partial sums are added with fp32 atomics (default; order-dependent rounding, i.e. not bit-reproducible
    run to run) or, with ``deterministic=True``, written to a workspace [SPLIT, M, N] and summed in a
    fixed order.
``_quant_matmul_grad_input_kernel``  dX = dY·Ŵ, tile dXᵀ[k0:k0+BK, m0:m0+BM] = Ŵᵀ[BK, N]·dYᵀ[N, BM]
    (Ŵᵀ as the A operand again); the reduction runs over N. With QA-LoRA's ``WITH_V``, one extra
    program per M tile computes V = dY·B instead (no weight tile). Its tile comes from
    :func:`qlk.kernels.quant_tile_t._dequant_tile_t`: dequantized and rounded to the activation dtype
    on the packed shape, so the layout change to the MMA operand moves 16-bit values. At mid M on
    narrow K (too few dX tiles for the SMs) the rules split its N loop over a second grid axis
    (``SPLIT_N``; partials through the split-N workspace; :func:`qlk.kernels.heuristics.grad_split`).
``_quant_matmul_grad_input_splitn_kernel``  dX at small M (M <= ``SPLITN_MAX_M``): the reduction over
    N is split over a second grid axis (≈ 16 CTAs per SM), partials added with fp32 atomics or,
    ``deterministic=True``, through a workspace [SPLIT, M, K] summed in a fixed order; a launch of one
    slice stores dX itself (``DIRECT``, round 32: no workspace, no passes around it). Its tile is the
    GEMM gradient's: :func:`qlk.kernels.quant_tile_t._dequant_tile_t`, half2 arithmetic for the INT
    formats (round 14; it was the forward's fp32 tile transposed: the int32 codes moved through shared
    memory, about half the speed, docs/kernels.md "Round 14").
``_quant_matmul_grad_input_gemv_kernel``  dX at M = 1 with FMAs instead of an MMA (same split over N):
    no transpose of the dequantized tile through shared memory. ``path="gemv"`` runs it; "auto"
    asks :func:`qlk.kernels.heuristics.choose_m1_grad` (round 3: split-N at every shape, the
    analyzer estimating it faster for every format since the round-2 split-N work).

QA-LoRA (:mod:`qlk.kernels.qalora`) reuses the forward kernels with ``POOL=True``: the programs of
the first N tile also write P(X) (group means of X) from the X tiles they load.

Act-order (``qw.perm``): X is gathered into the stored column order, x[..., perm], before the
forward, and dX is scattered back, dx[..., argsort(perm)], after the input gradient.

Precision: fp16/bf16 operands with fp32 accumulation; the dequantized tile is in the activation
dtype: INT ŵ = round_act(s_a·(q − m) + c_a), NF4 ŵ = round_act(NF4_a[q]·absmax_a) (subscript a:
rounded to the activation dtype first), so a weight may differ from bitsandbytes'
dequantize-then-matmul (fp32 product, one rounding) by up to about one unit in its last place (bf16:
2^-8 relative; docs/kernels.md "Round 21"); the M = 1 NF4 input gradient (FMAs, no MMA) and the
dequantize-then-dense path keep the fp32 product. fp32 activations use exact fp32 products
(``input_precision="ieee"``, no TF32). Output in the activation dtype.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from ..formats.quantized_weight import QuantizedWeight
from . import heuristics
from .config import (GEMV_PRUNE, INTERPRETED, cdiv, even_k_kernel, fma_kernel, gemv_grad_configs, heuristics_reading,
                     num_sms, packed_rows_kernel, target_arch)
from .decode_tile import (_decode_int3_tile_rows, _decode_int_tile, _decode_int_tile_lanes, _decode_int_tile_rows,
                          _decode_nf4_tile,
                          _decode_nf4_tile_rows, _lane_x_tile, _row_tile_stored_order, _row_tile_words)
from .quant_tile import _dequant_tile, aligned_rows, weight_args
from .quant_tile_t import _dequant_tile_t, _int3_planes_t, _words_t

#: M at or below which the forward uses the split-K decode kernel
SPLITK_MAX_M = 16
#: M at or below which the input gradient uses the split-N kernel
SPLITN_MAX_M = 16
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _swizzle(pid, num_a, num_b, GROUP: tl.constexpr):
    """(pid_a, pid_b) visiting GROUP rows of a at a time, so their shared b tiles stay in L2."""
    width = GROUP * num_b
    group_id = pid // width
    first = group_id * GROUP
    rows = tl.minimum(num_a - first, GROUP)
    pid_a = first + (pid % width) % rows
    pid_b = (pid % width) // rows
    return pid_a, pid_b


def shift_last_k(args) -> bool:
    """Whether an input-gradient launch moves its last K tile back to end at K (``SHIFT_K``).

    In the input gradients K is an output dimension: a ragged last dX tile (K % BLOCK_K != 0, e.g.
    K = 2880 or 576 against 128-column tiles) made the whole launch compile the masked decoder
    (``EVEN_K`` false: masked word, scale and bias loads and zeroed columns in every program), whose
    extra registers spilled on sm_80 (64x64x128 w2: 72-160 B) and in the grouped sm_90 gradient (24 B).
    Shifted, the last tile covers K − BLOCK_K .. K, every tile is whole (``EVEN_K``), and the store
    keeps only the columns from the tile's own start (:func:`_grad_k_tile`): nothing is written twice,
    so split-N's atomics add each column once. Needs K > BLOCK_K and a start on a whole group and a
    whole packed unit (32 columns covers INT2/3/4 words, INT3 planes and NF4 bytes)."""
    k, bk, g = args["K"], args["BLOCK_K"], args["GROUP_SIZE"]
    return k % bk != 0 and k > bk and (k - bk) % math.lcm(32, g) == 0


#: the input-gradient kernels' K-tile heuristics (:func:`shift_last_k`)
GRAD_K_HEURISTICS = {"SHIFT_K": shift_last_k,
                     "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0 or shift_last_k(a)}


@triton.jit
def _grad_k_tile(pid_k, K, BLOCK_K: tl.constexpr, SHIFT_K: tl.constexpr):
    """(k0, offs_k, keep) of an input gradient's K tile ``pid_k``: with SHIFT_K the last tile starts at
    K − BLOCK_K, and ``keep`` (the store's column mask) drops the columns before pid_k·BLOCK_K, which
    the previous tile stores (:func:`shift_last_k`)."""
    k_first = pid_k * BLOCK_K
    if SHIFT_K:
        k0 = tl.minimum(k_first, K - BLOCK_K)
    else:
        k0 = k_first
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return k0, offs_k, (offs_k >= k_first) & (offs_k < K)


@triton.jit
def _pool_tile(p_ptr, xt, p_run, offs_m, k0, M, K, stride_pm,
               GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """QA-LoRA pooling of one Xᵀ tile [BLOCK_K, BLOCK_M] (columns k0 .. k0+BLOCK_K, zero past K):
    P[m, j] = (1/g)·Σ_{k in group j} X[m, k] (fp32 sums), stored for the groups the tile completes.
    GROUP_SIZE (a power of two) <= BLOCK_K: BLOCK_K/g whole groups per tile, stored at once;
    larger groups are summed in ``p_run`` ([BLOCK_M]) over g/BLOCK_K tiles. Returns p_run."""
    G = K // GROUP_SIZE
    mask_m = offs_m < M
    if GROUP_SIZE <= BLOCK_K:
        NSEG: tl.constexpr = BLOCK_K // GROUP_SIZE
        seg = tl.sum(tl.reshape(xt.to(tl.float32), (NSEG, GROUP_SIZE, BLOCK_M)), axis=1) * (1.0 / GROUP_SIZE)
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NSEG)
        ptrs = p_ptr + offs_m[None, :].to(tl.int64) * stride_pm + offs_g[:, None]
        tl.store(ptrs, seg, mask=mask_m[None, :] & (offs_g[:, None] < G))
    else:
        p_run += tl.sum(xt.to(tl.float32), axis=0)
        done = (k0 + BLOCK_K) % GROUP_SIZE == 0
        tl.store(p_ptr + offs_m.to(tl.int64) * stride_pm + k0 // GROUP_SIZE, p_run * (1.0 / GROUP_SIZE),
                 mask=mask_m & done)
        p_run = tl.where(done, 0.0, p_run)
    return p_run


@triton.jit
def _whole_k_end(k_end, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Where a K loop over k_start .. k_end (k_start a multiple of BLOCK_K) stops running whole tiles:
    k_end itself when every tile is whole (EVEN_K), else the start of the tile K cuts. The loops run
    their tiles below it unmasked and the cut tile, if the range holds it, once after the loop with
    the masks (round 12: before, a K that is not a multiple of BLOCK_K, e.g. gpt-oss's 2880 or
    Qwen2-MoE's 1408, masked every tile of every program)."""
    if EVEN_K:
        return k_end
    else:
        return tl.minimum(k_end, (K // BLOCK_K) * BLOCK_K)


@triton.jit
def _weight_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
                 rows_w, k0, K, ACT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PACKED_DEQUANT: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 CLAMP_GROUPS: tl.constexpr = False, ABSMAX_PAIRED: tl.constexpr = False):
    """Ŵ[rows_w, k0 .. k0+BLOCK_K] [BLOCK_N, BLOCK_K] in the stored k order, for activations of dtype
    ACT: INT weights with fp16/bf16 decoded straight into ACT (the half2 tile,
    :func:`qlk.kernels.decode_tile._decode_int_tile`), NF4 with fp16/bf16 by the half2 lookup
    (:func:`qlk.kernels.decode_tile._decode_nf4_tile`; absmax blocks of whole words), else (fp32) the
    fp32 ``_dequant_tile``. ABSMAX_PAIRED: NF4's absmax buffer holds ACT pairs (``weight_args(pair_act=...)``;
    the launcher pairs only for fp16/bf16 activations and blocks of whole words, the NF4 half2 tile's case)."""
    tl.static_assert(not ABSMAX_PAIRED or (IS_NF4 and (ACT == tl.float16 or ACT == tl.bfloat16)
                                          and GROUP_SIZE % 8 == 0))
    if IS_NF4 and (ACT == tl.float16 or ACT == tl.bfloat16) and GROUP_SIZE % 8 == 0:
        w = _decode_nf4_tile(qw_ptr, s_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn,
                             stride_sg, rows_w, k0, K, ACT, GROUP_SIZE, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K,
                             CLAMP_GROUPS, ABSMAX_PAIRED)
    elif ACT == tl.float16 or ACT == tl.bfloat16:
        w = _decode_int_tile(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, rows_w, k0, K,
                             ACT, BITS, GROUP_SIZE, PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_K)
    else:
        w = _dequant_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                          stride_qn, stride_sn, stride_sg, rows_w, k0, K,
                          BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def _fwd_step(acc, p_run, x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
              stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k0, K, stride_xk, stride_pm,
              BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, POOL: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_DEQUANT: tl.constexpr,
              LANE_ORDER: tl.constexpr, CLAMP_GROUPS: tl.constexpr = False, ABSMAX_PAIRED: tl.constexpr = False):
    """One K tile k0 of :func:`_fwd_loop` (EVEN_K: the tile lies inside K, no masks): (acc, p_run).
    LANE_ORDER: INT2/INT4 half2 tiles whose BLOCK_K spans whole lane units are decoded in the
    lane-owned k order and X is read in the same order (round 17; round 20: INT3 where BLOCK_K spans
    its quad of 3-word chunks, 128 columns: sm_90's 64x128x128 tile); POOL and a cut tile keep the
    stored order (the pooling sums X's stored columns)."""
    ACT: tl.constexpr = x_rows.dtype.element_ty
    # NF4's 128-deep step as two 64-deep dots, each right after its half's lookup (round 28): the
    # second half's A operand is then decoded into the registers the wgmma reads, where one dot had
    # it decoded before the previous step's wgmma freed them and copied after (32 IMAD.MOV; sm_90
    # 64x128x128: 560 -> 528 instructions, 254 -> 181 registers). Its price: the first dot is waited
    # for before the second half's lookup (one wgmma wait a step, which the other resident CTA's
    # lookup covers). The INT tiles keep one dot: their loops have no such copies
    HALVES_DOT: tl.constexpr = IS_NF4 and BLOCK_K == 128
    HALF_INT: tl.constexpr = (not IS_NF4) and (ACT == tl.float16 or ACT == tl.bfloat16)
    LANES: tl.constexpr = LANE_ORDER and HALF_INT and EVEN_K and (not POOL) and \
        (((BITS == 2 or BITS == 4) and BLOCK_K % (128 // BITS) == 0) or (BITS == 3 and BLOCK_K % 128 == 0))
    if LANES:
        w = _decode_int_tile_lanes(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, rows_w, k0, K,
                                   ACT, BITS, GROUP_SIZE, PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_K)
        xt = _lane_x_tile(x_rows, tl.full((BLOCK_M,), 1, tl.int1), k0, K, stride_xk, BITS, EVEN_K, BLOCK_K, BLOCK_M)
    elif HALVES_DOT and EVEN_K and (not POOL):
        HALF_K: tl.constexpr = BLOCK_K // 2
        w = _weight_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn,
                         stride_sg, rows_w, k0, K, ACT, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT,
                         PACKED_DEQUANT, EVEN_K, BLOCK_N, HALF_K, CLAMP_GROUPS, ABSMAX_PAIRED)
        offs_k = k0 + tl.arange(0, HALF_K)
        xt = tl.load(x_rows[None, :] + offs_k[:, None] * stride_xk)
        acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
        w = _weight_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn,
                         stride_sg, rows_w, k0 + HALF_K, K, ACT, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT,
                         PACKED_DEQUANT, EVEN_K, BLOCK_N, HALF_K, CLAMP_GROUPS, ABSMAX_PAIRED)
        xt = tl.load(x_rows[None, :] + (offs_k[:, None] + HALF_K) * stride_xk)
    else:
        w = _weight_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn,
                         stride_sg, rows_w, k0, K, ACT, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT,
                         PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_K, CLAMP_GROUPS, ABSMAX_PAIRED)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt_ptrs = x_rows[None, :] + offs_k[:, None] * stride_xk
        if EVEN_K:
            xt = tl.load(xt_ptrs)
        else:
            xt = tl.load(xt_ptrs, mask=offs_k[:, None] < K, other=0.0)
    acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
    if POOL:
        p_run = _pool_tile(p_ptr, xt, p_run, offs_m, k0, M, K, stride_pm, GROUP_SIZE, BLOCK_M, BLOCK_K)
    return acc, p_run


@triton.jit
def _fwd_loop(x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
              stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k_lo, k_hi, K, stride_xk, stride_pm,
              BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, POOL: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_DEQUANT: tl.constexpr,
              LANE_ORDER: tl.constexpr, CLAMP_GROUPS: tl.constexpr = False, ABSMAX_PAIRED: tl.constexpr = False):
    """The forward GEMM's K loop over k_lo .. k_hi (0 .. K unsplit): acc = Ŵ[rows_w, k range]·Xᵀ
    [BLOCK_N, BLOCK_M], plus P(X) of rows offs_m when POOL (a split's slices hold whole groups, so
    the running sum of a group larger than BLOCK_K starts and ends in one slice). Whole tiles run
    unmasked; a tile that K cuts runs once after them (:func:`_whole_k_end`).

    INT weights with fp16/bf16 activations: the decode loop's half2 tile in the stored k order
    (:func:`qlk.kernels.decode_tile._decode_int_tile`; inline asm when PACKED_DEQUANT, its Triton
    twin under the interpreter): per pair of weights 2 SHF, PRMT, LOP3, 2 HFMA2 instead of the fp32
    tile's ~12, which made tiles of 64-128 rows issue-bound at mid M (docs/kernels.md "Forward GEMM,
    half2 tile (round 7)"). X keeps its stored order, so its tile loads stay 16-byte vectors, except
    where LANE_ORDER (round 17, :func:`qlk.kernels.heuristics.fwd_lane_order`): INT2/INT4 whole K
    tiles then take the decode loop's lane-owned tile (LOP3 + 2 HFMA2 a pair) and X is read in the
    same permuted order, 8-byte runs stored to shared memory 16 bits at a time, which only the tiles
    where the decode dominates gain from. NF4 and fp32 activations: the fp32 ``_dequant_tile``.
    ABSMAX_PAIRED: NF4's de-nested absmax as ACT pairs (:func:`_weight_tile`)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    p_run = tl.zeros((BLOCK_M,), dtype=tl.float32)  # POOL, GROUP_SIZE > BLOCK_K: running group sum
    k_whole = _whole_k_end(k_hi, K, EVEN_K, BLOCK_K)
    for k0 in range(k_lo, k_whole, BLOCK_K):
        acc, p_run = _fwd_step(acc, p_run, x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr,
                               lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k0, K,
                               stride_xk, stride_pm, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, POOL,
                               True, BLOCK_N, BLOCK_M, BLOCK_K, PACKED_DEQUANT, LANE_ORDER, CLAMP_GROUPS,
                               ABSMAX_PAIRED)
    if not EVEN_K:
        if k_whole < k_hi:
            acc, p_run = _fwd_step(acc, p_run, x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr,
                                   lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k_whole,
                                   K, stride_xk, stride_pm, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION,
                                   POOL, False, BLOCK_N, BLOCK_M, BLOCK_K, PACKED_DEQUANT, LANE_ORDER, CLAMP_GROUPS,
                                   ABSMAX_PAIRED)
    return acc


@triton.jit
def _decode_step(acc, x_rows, mask_m, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                 stride_qn, stride_sn, stride_sg, rows_w, k0, K, stride_xk,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 PACKED_DEQUANT: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, CLAMP_GROUPS: tl.constexpr = False):
    """One K tile k0 of :func:`_decode_loop` (EVEN_K: the tile lies inside K, no masks): acc. A cut
    tile (not EVEN_K) is decoded in the stored k order: its masks on the lane-owned order's permuted
    X tile made the sm_80 decode kernels spill (INT2 / INT4 g32 at 128 registers)."""
    ACT: tl.constexpr = x_rows.dtype.element_ty
    HALF_INT: tl.constexpr = (not IS_NF4) and (ACT == tl.float16 or ACT == tl.bfloat16)
    # the lane-owned k order (decode_tile._decode_int_tile_lanes; X read in the same order)
    LANES: tl.constexpr = HALF_INT and EVEN_K and (((BITS == 2 or BITS == 4) and BLOCK_K % (128 // BITS) == 0)
                                                   or (BITS == 3 and BLOCK_K % 128 == 0))
    if LANES:
        w = _decode_int_tile_lanes(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, rows_w, k0, K,
                                   ACT, BITS, GROUP_SIZE, PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_K)
        xt = _lane_x_tile(x_rows, mask_m, k0, K, stride_xk, BITS, EVEN_K, BLOCK_K, BLOCK_M)
    else:
        w = _weight_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn,
                         stride_sg, rows_w, k0, K, ACT, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, PACKED_DEQUANT,
                         EVEN_K, BLOCK_N, BLOCK_K, CLAMP_GROUPS)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows[None, :] + offs_k[:, None] * stride_xk,
                     mask=mask_m[None, :] & (offs_k[:, None] < K), other=0.0)
    return tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)


@triton.jit
def _decode_loop(x_rows, mask_m, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                 stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k_start, k_end, K, stride_xk, stride_pm,
                 pool_here, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr, POOL: tl.constexpr,
                 PACKED_DEQUANT: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, CLAMP_GROUPS: tl.constexpr = False):
    """The small-M (decode) K loop over k_start .. k_end: acc = Ŵ[rows_w, k range]·Xᵀ [BLOCK_N, BLOCK_M].

    One loop for the dense split-K kernel and the grouped small-M kernels
    (:mod:`qlk.kernels.grouped_matmul`). INT weights with fp16/bf16 activations are decoded straight
    into the activation dtype (half2 inline asm when PACKED_DEQUANT, its Triton twin under the
    interpreter): in the lane-owned k order of :func:`qlk.kernels.decode_tile._decode_int_tile_lanes`
    (X read in the same permuted order, :func:`~qlk.kernels.decode_tile._lane_x_tile`) when BLOCK_K
    spans whole lane units (INT4 32, INT2 64, INT3 128 columns), else in the stored order
    (:func:`qlk.kernels.decode_tile._decode_int_tile`); NF4 and fp32 activations use the fp32
    ``_dequant_tile``. M is tiny here: padding rows of the tile are masked to 0 (``mask_m``)
    rather than clamped, so no x row is read BLOCK_M/M times over.

    POOL: where ``pool_here`` (the first N tile), also P(X) of rows offs_m < M, in a second pass over
    the same K range after the MMA loop (round 11: before, inside it, every program's loop carried
    the pooling); a group larger than BLOCK_K is summed over its tiles (``p_run``), so that needs one
    slice starting at k_start = 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    p_run = tl.zeros((BLOCK_M,), dtype=tl.float32)  # POOL, GROUP_SIZE > BLOCK_K: running group sum
    k_whole = _whole_k_end(k_end, K, EVEN_K, BLOCK_K)  # whole tiles unmasked, a cut one once after them
    for k0 in range(k_start, k_whole, BLOCK_K):
        acc = _decode_step(acc, x_rows, mask_m, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                           stride_qn, stride_sn, stride_sg, rows_w, k0, K, stride_xk, BITS, GROUP_SIZE, IS_NF4,
                           DOUBLE_QUANT, DOT_PRECISION, PACKED_DEQUANT, True, BLOCK_N, BLOCK_M, BLOCK_K, CLAMP_GROUPS)
    if not EVEN_K:
        if k_whole < k_end:
            acc = _decode_step(acc, x_rows, mask_m, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr,
                               dyn_ptr, stride_qn, stride_sn, stride_sg, rows_w, k_whole, K, stride_xk, BITS,
                               GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, PACKED_DEQUANT, False,
                               BLOCK_N, BLOCK_M, BLOCK_K, CLAMP_GROUPS)
    if POOL:
        # round 11: P(X) in a pass of its own (first N tile only; X in the stored order, M <= 16 rows,
        # cache-resident), so that the MMA loop every program runs is the plain forward's
        if pool_here:
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_rows[None, :] + offs_k[:, None] * stride_xk,
                             mask=mask_m[None, :] & (offs_k[:, None] < K), other=0.0)
                p_run = _pool_tile(p_ptr, xt, p_run, offs_m, k0, M, K, stride_pm, GROUP_SIZE, BLOCK_M, BLOCK_K)
    return acc


@even_k_kernel
@packed_rows_kernel
@fma_kernel
@triton.jit
def _quant_matmul_fwd_kernel(
    y_ptr,  # [M, N] output, activation dtype
    x_ptr,  # [M, K] activations (any strides)
    bias_ptr,  # [N] or dummy
    p_ptr,  # POOL: [M, K/GROUP_SIZE] fp32 group means of x (QA-LoRA's P(X)), else dummy
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # packed weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_pm,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, POOL: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = False, ATOMIC: tl.constexpr = True, SLICE_K=0, PACKED_DEQUANT: tl.constexpr = False,
    QN_ALIGN: tl.constexpr = 1, LANE_ORDER: tl.constexpr = False, LOOP_RUNS: tl.constexpr = False,
    ABSMAX_PAIRED: tl.constexpr = False,
):
    """Y[m, n] = Σ_k X[m, k]·Ŵ[n, k] (+ bias[n]), one [BLOCK_N, BLOCK_M] tile per program.

    ABSMAX_PAIRED (``weight_args(pair_act=...)``, round 26): NF4's de-nested absmax buffer holds each
    value rounded to the activation dtype in both halves of an int32, the half2 lookup's operand as
    loaded (no F2F and IMAD per block and iteration: 569 -> 553 instructions on sm_90's 64x128x128).

    LANE_ORDER (:func:`qlk.kernels.heuristics.fwd_lane_order`): INT2/INT4 whole K tiles are decoded
    in the lane-owned k order, X read in the same permuted order (:func:`_fwd_step`).

    SPLIT_K (mid M: too few output tiles for the SMs, or a badly filled last wave): the K loop is
    split over grid axis 1, program (tile, s) summing k in [s·SLICE_K, (s+1)·SLICE_K) ∩ [0, K)
    (SLICE_K: whole groups and whole K tiles, :func:`qlk.kernels.heuristics.fwd_slices`);
    ``y_ptr`` is then the fp32 workspace ([M, N] row-major, ATOMIC: partials added; else
    [SPLIT, M, N], slice s stored, summed in a fixed order), cast to Y by the launcher; slice 0
    adds the bias. ATOMIC only where its epilogue compiles without spills (:func:`_fwd_split_atomic`). The
    dequantizing loop is the same; without SPLIT_K the kernel is the unsplit one
    (docs/kernels.md "Forward, split K at mid M (round 6)").

    LOOP_RUNS (the launcher's :func:`qlk.kernels.heuristics.split_loop_runs`): every program's loop
    over whole K tiles runs at least once, told to the compiler (``tl.assume``; the interpreter
    checks it). Without it the loop keeps a zero-trip path that copies the zeroed accumulator,
    and ptxas serializes every wgmma of the loop behind the previous one (C7515; round 25).

    POOL (QA-LoRA, GROUP_SIZE a power of two): the programs of the first N tile also write
    P[m, j] = mean of X[m, k] over group j from the X tiles they load anyway (the other programs
    skip that branch; the low-rank term itself is folded into the group biases by the caller).
    Split: each slice's first-N-tile programs pool the groups of their slice."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if SPLIT_K:  # this program's slice of K (whole groups, whole K tiles)
        k_lo = tl.program_id(1) * SLICE_K
        k_hi = tl.minimum(K, k_lo + SLICE_K)
    else:
        k_lo = 0
        k_hi = K
    if LOOP_RUNS:
        tl.assume(_whole_k_end(k_hi, K, EVEN_K, BLOCK_K) > k_lo)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # rows past the edge are clamped, not masked: they compute garbage that is never stored, and
    # the loop keeps no row predicates
    rows_w = tl.minimum(offs_n, N - 1)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm
    if POOL and pid_n == 0:
        # a second copy of the K loop, with the pooling, for the first N tile only: the loop the
        # other programs run stays exactly the plain kernel's
        acc = _fwd_loop(x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                        stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k_lo, k_hi, K, stride_xk, stride_pm,
                        BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, True, EVEN_K,
                        BLOCK_N, BLOCK_M, BLOCK_K, PACKED_DEQUANT, LANE_ORDER, False, ABSMAX_PAIRED)
    else:
        acc = _fwd_loop(x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                        stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k_lo, k_hi, K, stride_xk, stride_pm,
                        BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, False, EVEN_K,
                        BLOCK_N, BLOCK_M, BLOCK_K, PACKED_DEQUANT, LANE_ORDER, False, ABSMAX_PAIRED)
    acc = tl.trans(acc)
    if SPLIT_K:
        # the fp32 partial of Y's tile, in Y's layout (N contiguous, as the unsplit store); the bias
        # once, by slice 0
        if HAS_BIAS:
            n_bias = tl.where(tl.program_id(1) == 0, N, 0)  # the other slices load none
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < n_bias, other=0.0).to(tl.float32)[None, :]
        ws_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        ws_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + ws_offs, acc, mask=ws_mask, sem="relaxed")
        else:
            tl.store(y_ptr + tl.program_id(1).to(tl.int64) * M * N + ws_offs, acc, mask=ws_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@even_k_kernel
@packed_rows_kernel
@fma_kernel
@triton.jit
def _quant_matmul_splitk_kernel(
    ws_ptr,  # fp32 partial sums: [M, N] (ATOMIC) or [SPLIT, M, N], zero-initialized; DIRECT: Y [M, N]
    x_ptr,  # [M, K] activations (any strides)
    bias_ptr,  # HAS_BIAS (DIRECT or FINISH): [N]; else dummy (the launcher adds the bias to the workspace's sum)
    p_ptr,  # POOL: [M, K/GROUP_SIZE] fp32 group means of x, else dummy
    y_ptr,  # FINISH: Y [M, N] (stride_ym, stride_yn); else dummy
    count_ptr,  # FINISH: int32 [tiles], the slices added into each output tile so far (zero between launches)
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # packed weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_pm, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, POOL: tl.constexpr, PACKED_DEQUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    QN_ALIGN: tl.constexpr = 1, LOOP_RUNS: tl.constexpr = False,
    DIRECT: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, FINISH: tl.constexpr = False,
):
    """Partial Yᵀ over one K slice: program (n, s, m) sums k in slice s of ⌈K/BLOCK_K / SPLIT⌉ tiles.

    The K loop is :func:`_decode_loop` (INT codes decoded straight into the activation dtype in
    the lane-owned k order where BLOCK_K allows; NF4 and fp32 activations through ``_dequant_tile``).

    POOL: the programs of the first N tile also write P(X) for the groups of their slice (slices
    are whole K tiles, so with GROUP_SIZE <= BLOCK_K no group straddles two slices).

    DIRECT (round 33; one slice, grid axis 1 of size 1): a program's sum over all of K is Yᵀ's tile
    itself, Y[m, n] = Σ_k X[m, k]·Ŵ[n, k] (+ bias[n], HAS_BIAS), stored in Y's dtype at
    (stride_ym, stride_yn) with no workspace to zero, add into and cast back: the same fp32 sum
    and bias, rounded once, as the launcher's cast of the workspace (10 B a Y element outside the
    kernel; at mid M on a one-slice launch a quarter of what the launch moves, docs/kernels.md
    "Round 33").

    FINISH (round 37, with ATOMIC; :data:`SPLITK_FINISH`): the last slice to add into an output tile
    finishes it: Y = Σ_s partial_s (+ bias) cast to Y's dtype, and the tile's workspace and count
    set back to zero for the next launch (:func:`_finish_split_tile`). The launch then needs no
    zeroed workspace before it and no cast after it: one kernel instead of three."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1))
    k_start = pid_s * tiles * BLOCK_K
    k_end = tl.minimum(K, k_start + tiles * BLOCK_K)
    if LOOP_RUNS:  # every slice holds a whole K tile (as the forward GEMM's LOOP_RUNS)
        tl.assume(_whole_k_end(k_end, K, EVEN_K, BLOCK_K) > k_start)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows_w = tl.minimum(offs_n, N - 1)
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    if POOL:
        tl.static_assert(GROUP_SIZE <= BLOCK_K)
    acc = _decode_loop(x_rows, mask_m, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                       stride_qn, stride_sn, stride_sg, rows_w, offs_m, M, k_start, k_end, K, stride_xk, stride_pm,
                       pid_n == 0, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, POOL, PACKED_DEQUANT,
                       EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K)
    mask = (offs_n[:, None] < N) & mask_m[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn
        tl.store(ws_ptr + y_offs, acc.to(ws_ptr.dtype.element_ty), mask=mask)
    else:
        offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        if ATOMIC:
            tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
            if FINISH:
                y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn
                _finish_split_tile(ws_ptr + offs, y_ptr + y_offs, bias_ptr + offs_n, offs_n < N, mask,
                                   count_ptr + pid_m * tl.num_programs(0) + pid_n, tl.num_programs(1), HAS_BIAS)
        else:
            tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + offs, acc, mask=mask)


@triton.jit
def _finish_split_tile(ws_ptrs, y_ptrs, bias_ptrs, bias_mask, mask, count_ptr, slices, HAS_BIAS: tl.constexpr):
    """FINISH of the split-K decode: after this program's fp32 adds into its output tile, count the
    slice in; the last of the ``slices`` programs to arrive reads the tile's sum, adds the bias, stores
    Y in its dtype and leaves the tile's workspace and count at zero.

    The ordering is CUTLASS's semaphore's: a CTA barrier after every thread's adds, then one
    acquire-release atomic on the count (a scalar atomic: one thread performs it and the CTA reads its
    result after a barrier), so a program that sees ``slices − 1`` sees every other program's adds;
    its loads go to L2 (``.cg``), where the atomics were performed."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == slices - 1:
        total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
        tl.store(ws_ptrs, tl.zeros_like(total), mask=mask)
        tl.store(count_ptr, 0)


@triton.jit
def _w_as_b_acc(dy_rows, qw_ptr, s_ptr, b_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, row_w0, k0, n_lo, n_hi,
                N, K, stride_dyn, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HALF2_ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, WORDS_AHEAD: tl.constexpr = False, ABSMAX_PAIRED: tl.constexpr = False,
                W_AS_A: tl.constexpr = False):
    """fp32 dX tile [BLOCK_M, BLOCK_K] (columns k0 .. k0 + BLOCK_K in the stored order) = Σ over n in
    n_lo .. n_hi of dY[rows, n]·Ŵ[row_w0 + n, k] (round 18, sm_90): Ŵ [BLOCK_N, BLOCK_K] from
    :func:`_decode_int_tile_rows` as the MMA's B operand, which wgmma reads from shared memory (stored
    there once, 16-byte rows; INT3: :func:`_decode_int3_tile_rows`, NF4: :func:`_decode_nf4_tile_rows`), dY [BLOCK_M, BLOCK_N] as A; the product
    relabelled into the stored column order (:func:`_row_tile_stored_order`). ``dy_rows``: [BLOCK_M] row pointers (clamped rows);
    ``row_w0``: the first weight row (the grouped kernel's expert e·N).

    WORDS_AHEAD (round 19): the next N tile's packed words are loaded into registers during this one
    (:func:`_row_tile_words`), not staged through shared memory by the pipeliner: the 64-row tile
    was shared-memory-bound (INT4 2304→9216, M = 400: 296 cycles an iteration against 256 of tensor
    work), and the words' cp.async + LDS were a fifth of it. They are loaded after this tile's decode
    (round 27), into the registers the decoded words free: loaded before it, both tiles' words were
    live at once and the loop ended copying one set into the other (NF4 64x128x128: 16 IMAD.MOV,
    571 → 555 instructions).

    W_AS_A (round 36, :data:`GRAD_W_AS_A`): the same sum as the transposed product,
    dXᵀ[k, m] = Σ_n Ŵᵀ[k, n]·dYᵀ[n, m], with Ŵᵀ as the MMA's first operand. wgmma takes that
    operand from registers (sm_90: STS + a transposing LDSM, then HGMMA with a register A), so no MMA
    reads the shared-memory buffer the next step's tile is stored into, and the loop keeps one
    MMA group in flight across steps (``WARPGROUP.DEPBAR.LE gsb0, 0x1``). As the B operand, the
    tile is read by the MMAs from shared memory, and every step waits for all of them (``0x0``)
    before that buffer is reused: the next step's decode never overlaps this step's MMAs
    (bench/sass disasm.drained_wgmma; docs/kernels.md "Round 36"). One transpose of the fp32 sum
    after the loop."""
    ACT: tl.constexpr = dy_rows.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_t = 0
    if W_AS_A:
        acc_t = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    words, words1, words2 = 0, 0, 0
    if WORDS_AHEAD:
        words, words1, words2 = _row_tile_words(qw_ptr, stride_qn, row_w0 + tl.minimum(n_lo + tl.arange(0, BLOCK_N),
                                                                                        N - 1),
                                                k0, BITS, IS_NF4, BLOCK_K)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # clamped weight rows are finite and meet dY columns masked to 0: they add exactly 0
        rows_w = row_w0 + tl.minimum(offs_n, N - 1)
        if IS_NF4:
            w = _decode_nf4_tile_rows(qw_ptr, s_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, rows_w, k0, K, ACT,
                                      GROUP_SIZE, BLOCK_N, BLOCK_K, words, WORDS_AHEAD, ABSMAX_PAIRED)
        elif BITS == 3:
            w = _decode_int3_tile_rows(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, rows_w, k0, K, ACT,
                                       GROUP_SIZE, HALF2_ASM, BLOCK_N, BLOCK_K, words, words1, words2, WORDS_AHEAD)
        else:
            w = _decode_int_tile_rows(qw_ptr, s_ptr, b_ptr, stride_qn, stride_sn, stride_sg, rows_w, k0, K, ACT, BITS,
                                      GROUP_SIZE, HALF2_ASM, BLOCK_N, BLOCK_K, words, WORDS_AHEAD)
        if WORDS_AHEAD:  # the next tile's words (past n_hi: the clamped last rows, in bounds and unused)
            words, words1, words2 = _row_tile_words(qw_ptr, stride_qn, row_w0 + tl.minimum(offs_n + BLOCK_N, N - 1),
                                                    k0, BITS, IS_NF4, BLOCK_K)
        dy = tl.load(dy_rows[:, None] + offs_n[None, :] * stride_dyn, mask=offs_n[None, :] < N, other=0.0)
        if W_AS_A:
            acc_t = tl.dot(tl.trans(w), tl.trans(dy), acc_t, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    if W_AS_A:
        acc = tl.trans(acc_t)
    return _row_tile_stored_order(acc, BITS, IS_NF4, BLOCK_M, BLOCK_K)


@triton.jit
def _grad_tile_w_as_b(dx_ptr, dy_rows, qw_ptr, s_ptr, b_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, offs_m,
                      pid_k, k0, n_lo, n_hi, M, N, K, stride_dyn, stride_dxm, stride_dxk,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      SPLIT_N: tl.constexpr, ATOMIC: tl.constexpr, HALF2_ASM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      WORDS_AHEAD: tl.constexpr, ABSMAX_PAIRED: tl.constexpr = False, W_AS_A: tl.constexpr = False):
    """The W_AS_B tile of :func:`_quant_matmul_grad_input_kernel` (:func:`_w_as_b_acc`), stored (SPLIT_N:
    added to / stored in the fp32 workspace) where its columns lie in this K tile's own range
    (SHIFT_K's last tile starts earlier)."""
    acc = _w_as_b_acc(dy_rows, qw_ptr, s_ptr, b_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, 0, k0, n_lo, n_hi,
                      N, K, stride_dyn, BITS, GROUP_SIZE, IS_NF4, DOT_PRECISION, HALF2_ASM, BLOCK_N, BLOCK_M, BLOCK_K,
                      WORDS_AHEAD, ABSMAX_PAIRED, W_AS_A)
    cols = k0 + tl.arange(0, BLOCK_K)
    keep = (cols >= pid_k * BLOCK_K) & (cols < K)
    mask = (offs_m[:, None] < M) & keep[None, :]
    if SPLIT_N:
        ws_offs = offs_m[:, None].to(tl.int64) * K + cols[None, :]
        if ATOMIC:
            tl.atomic_add(dx_ptr + ws_offs, acc, mask=mask, sem="relaxed")
        else:
            tl.store(dx_ptr + tl.program_id(1).to(tl.int64) * M * K + ws_offs, acc, mask=mask)
    else:
        dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + cols[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@heuristics_reading(("K", "BLOCK_K", "GROUP_SIZE"), GRAD_K_HEURISTICS)
@packed_rows_kernel
@fma_kernel
@triton.jit
def _quant_matmul_grad_input_kernel(
    dx_ptr,  # [M, K] output, activation dtype
    dy_ptr,  # [M, N] upstream gradient (any strides)
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # packed weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    M, N, K, M_BUCKET,
    stride_dym, stride_dyn, stride_dxm, stride_dxk,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INT2_HALVES: tl.constexpr = False, WORDS_AHEAD: tl.constexpr = False, WORDS_ASM: tl.constexpr = False,
    v_ptr=None,  # WITH_V: fp32 V = dY·B [M, R] (row stride R), every element written
    lb_ptr=None,  # WITH_V: QA-LoRA's lora_b [N, R] (any strides)
    R=0, stride_lbn=0, stride_lbr=0,
    WITH_V: tl.constexpr = False, R_PAD: tl.constexpr = 16,
    SPLIT_N: tl.constexpr = False, ATOMIC: tl.constexpr = True,
    HALF2: tl.constexpr = False, HALF2_ASM: tl.constexpr = False, SHIFT_K: tl.constexpr = False,
    QN_ALIGN: tl.constexpr = 1, W_AS_B: tl.constexpr = False, LOOP_RUNS: tl.constexpr = False,
    ABSMAX_PAIRED: tl.constexpr = False, W_AS_A: tl.constexpr = False,
):
    """dX[m, k] = Σ_n dY[m, n]·Ŵ[n, k], one dXᵀ [BLOCK_K, BLOCK_M] tile per program, N in BLOCK_N steps.
    A ragged last K tile is moved back to end at K (SHIFT_K, :func:`shift_last_k`).

    ABSMAX_PAIRED (round 26): NF4's de-nested absmax as dY-dtype pairs (``weight_args(pair_act=...)``),
    both tiles below.

    SPLIT_N (mid M, narrow K: too few dX tiles for the SMs): the reduction over N is split over grid
    axis 1, program (tile, s) summing n in slice s of ⌈N/BLOCK_N / SPLIT⌉ tiles; ``dx_ptr`` is then
    the fp32 workspace ([M, K] row-major, ATOMIC: partials added; else [SPLIT, M, K], slice s
    stored), cast to dX by the launcher (docs/kernels.md "Input gradient, split N at mid M (round 5)").
    The dequantizing loop is the same; without SPLIT_N the kernel is the unsplit one.

    WORDS_AHEAD: the packed words (INT3: bit planes) of the next N tile are loaded into registers
    during this one (WORDS_ASM: by inline PTX the pipeliner leaves alone, in the layout the unpacking
    wants; also the INT scales and biases), instead of cp.async into shared memory and back
    (docs/kernels.md "Input gradient, round 4").

    HALF2 (INT formats, fp16/bf16 dY): Ŵᵀ decoded in half2 arithmetic (quant_tile_t._pair_half2;
    HALF2_ASM: its inline PTX, else the interpreter's twin), s and c rounded to dY's dtype first
    (docs/kernels.md "Input gradient, half2 transposed decoder (round 7)").

    W_AS_B (sm_90, round 18; fp16/bf16 dY, whole K tiles, BLOCK_M ≥ 64 (wgmma's rows of dY); INT2/INT4
    with groups of whole words (a power of two, a word's codes or more), INT3 with groups of whole
    32-column chunks (round 19; the launch keeps it off tiles with fewer chunks than threads; round
    31: a group of one chunk, g32, only on 64-row N steps: with 128 Triton 3.9's sm_90 pipeline
    stops in TritonGPUOptimizeDotOperands, "Illegal shared layout"), NF4
    with a plain or de-nested absmax): the tile is
    dX [BLOCK_M, BLOCK_K] = dY·Ŵ with Ŵ as the MMA's B operand, decoded by
    :func:`qlk.kernels.decode_tile._decode_int_tile_rows` (INT3: ``_decode_int3_tile_rows``) into 16-byte rows that wgmma reads from
    shared memory (no STS + LDSM round trip of Ŵᵀ), the product relabelled to the stored column
    order before the store. Otherwise
    (other formats, a cut K tile) the kernel is the Ŵᵀ one below; the launch decides per arch
    (:func:`qlk.kernels.heuristics.grad_w_as_b`).

    WITH_V (QA-LoRA): ⌈M/BM⌉ more programs after the ⌈M/BM⌉·⌈K/BK⌉ dX tiles, one per M tile, write
    V[m0:m0+BM, :] = Σ_n dY[m0:m0+BM, n]·B[n, :] (B rounded to dY's dtype, fp32 sums; the low-rank
    term of dX itself is folded into the group biases by the caller). They load dY and B only and
    return early: the dequantizing loop below is the plain kernel's."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    if WITH_V:
        v_tile = tl.program_id(0) - tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
        if v_tile >= 0:
            if SPLIT_N:  # V is not split: slice 0's program computes it over all of N, the others have none
                if tl.program_id(1) > 0:
                    return
            _v_program(v_ptr, dy_ptr, lb_ptr, v_tile, M, N, R, stride_dym, stride_dyn, stride_lbn, stride_lbr,
                       DOT_PRECISION, R_PAD, BLOCK_N, BLOCK_M)
            return
    pid_m, pid_k = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    k0, offs_k, keep_k = _grad_k_tile(pid_k, K, BLOCK_K, SHIFT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dy_rows = dy_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_dym
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    INT3: tl.constexpr = BITS == 3 and not IS_NF4
    rows_first = tl.arange(0, BLOCK_N)
    if SPLIT_N:  # this program's slice of N tiles
        slice_tiles = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
        n_lo = tl.program_id(1) * slice_tiles * BLOCK_N
        n_hi = tl.minimum(N, n_lo + slice_tiles * BLOCK_N)
        rows_first += n_lo
    else:
        n_lo = 0
        n_hi = N
    if LOOP_RUNS:  # no empty slice of N (as the forward's LOOP_RUNS)
        tl.assume(n_hi > n_lo)
    # the B-operand tile where it applies (docstring), else the Ŵᵀ one below
    ACT16: tl.constexpr = dy_ptr.dtype.element_ty == tl.float16 or dy_ptr.dtype.element_ty == tl.bfloat16
    ROWS: tl.constexpr = W_AS_B and ACT16 and EVEN_K and BLOCK_M >= 64 and (GROUP_SIZE & (GROUP_SIZE - 1)) == 0 and \
        (((BITS == 2 or BITS == 4) and not IS_NF4 and GROUP_SIZE % (32 // BITS) == 0) or
         (BITS == 3 and not IS_NF4 and GROUP_SIZE % 32 == 0 and (GROUP_SIZE > 32 or BLOCK_N <= 64)) or
         (IS_NF4 and not DOUBLE_QUANT))
    if ROWS:
        _grad_tile_w_as_b(dx_ptr, dy_rows, qw_ptr, s_ptr, b_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, offs_m,
                          pid_k, k0, n_lo, n_hi, M, N, K, stride_dyn, stride_dxm, stride_dxk, BITS, GROUP_SIZE, IS_NF4,
                          DOT_PRECISION, SPLIT_N, ATOMIC, HALF2_ASM, BLOCK_N, BLOCK_M, BLOCK_K, WORDS_AHEAD,
                          ABSMAX_PAIRED, W_AS_A)
        return
    words, words1, words2 = 0, 0, 0  # the N tile's packed words (INT3: its three bit planes)
    if WORDS_AHEAD:
        if INT3:
            words, words1, words2 = _int3_planes_t(qw_ptr, stride_qn, tl.minimum(rows_first, N - 1),
                                                   k0, K, EVEN_K, BLOCK_K, True, WORDS_ASM)
        else:
            words = _words_t(qw_ptr, stride_qn, tl.minimum(rows_first, N - 1), k0, K,
                             BITS, IS_NF4, EVEN_K, BLOCK_K, True, WORDS_ASM)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        next0, next1, next2 = words, words1, words2
        if WORDS_AHEAD:
            # the next tile's words (past the last tile: the last row again, never used)
            rows_next = tl.minimum(offs_n + BLOCK_N, N - 1)
            if INT3:
                next0, next1, next2 = _int3_planes_t(qw_ptr, stride_qn, rows_next, k0, K, EVEN_K, BLOCK_K, True,
                                                     WORDS_ASM)
            else:
                next0 = _words_t(qw_ptr, stride_qn, rows_next, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_K, True, WORDS_ASM)
        # clamped weight rows are finite and meet dY columns masked to 0: they add exactly 0
        wt = _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                             stride_qn, stride_sn, stride_sg, tl.minimum(offs_n, N - 1), k0, K,
                             BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K,
                             dy_ptr.dtype.element_ty, INT2_HALVES, words, words1, words2, WORDS_AHEAD,
                             WORDS_ASM, HALF2, HALF2_ASM, ABSMAX_PAIRED)
        words, words1, words2 = next0, next1, next2
        dyt = tl.load(dy_rows[None, :] + offs_n[:, None] * stride_dyn, mask=offs_n[:, None] < N, other=0.0)
        acc = tl.dot(wt, dyt, acc, input_precision=DOT_PRECISION)
    if SPLIT_N:
        # fp32 partial of dXᵀ's tile, in the accumulator's own layout (as split-N adds it): the
        # workspace is [M, K] row-major, slice s at s·M·K (deterministic)
        ws_mask = keep_k[:, None] & (offs_m[None, :] < M)
        ws_offs = offs_m[None, :].to(tl.int64) * K + offs_k[:, None]
        if ATOMIC:
            tl.atomic_add(dx_ptr + ws_offs, acc, mask=ws_mask, sem="relaxed")
        else:
            tl.store(dx_ptr + tl.program_id(1).to(tl.int64) * M * K + ws_offs, acc, mask=ws_mask)
    else:
        acc = tl.trans(acc)
        dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & keep_k[None, :])


@triton.jit
def _splitn_v_loop(dy_rows, lb_ptr, stride_dyn, stride_lbn, stride_lbr, mask_m, n_start, n_end, N, R,
                   DOT_PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Vᵀ [R_PAD, BLOCK_M] = Σ_{n in n_start .. n_end} Bᵀ[:, n]·dYᵀ[n, :] (B rounded to dY's dtype, as the
    autograd's dY·B is; fp32 sums). No weight tile: few registers, whatever the weight format.
    QA-LoRA's V programs of both input-gradient kernels (split-N: one N slice; GEMM: all of N)."""
    vacc = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
    offs_r = tl.arange(0, R_PAD)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n[:, None] < N
        dyt = tl.load(dy_rows[None, :] + offs_n[:, None] * stride_dyn, mask=mask_m[None, :] & mask_n, other=0.0)
        bt = tl.load(lb_ptr + offs_n[:, None].to(tl.int64) * stride_lbn + offs_r[None, :] * stride_lbr,
                     mask=mask_n & (offs_r[None, :] < R), other=0.0)
        vacc = tl.dot(tl.trans(bt.to(dyt.dtype)), dyt, vacc, input_precision=DOT_PRECISION)
    return vacc


@triton.jit
def _v_program(v_ptr, dy_ptr, lb_ptr, pid_m, M, N, R, stride_dym, stride_dyn, stride_lbn, stride_lbr,
               DOT_PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The large-M input gradient's V programs: V[m0:m0+BM, :] = dY[m0:m0+BM, :]·B over all of N,
    stored (fp32, [M, R] row-major) for M tile ``pid_m``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64) * stride_dym
    vacc = _splitn_v_loop(dy_rows, lb_ptr, stride_dyn, stride_lbn, stride_lbr, mask_m, 0, N, N, R,
                          DOT_PRECISION, R_PAD, BLOCK_N, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    tl.store(v_ptr + offs_m[None, :].to(tl.int64) * R + offs_r[:, None], vacc,
             mask=(offs_r[:, None] < R) & mask_m[None, :])


@heuristics_reading(("K", "BLOCK_K", "GROUP_SIZE"), GRAD_K_HEURISTICS)
@packed_rows_kernel
@fma_kernel
@triton.jit
def _quant_matmul_grad_input_splitn_kernel(
    ws_ptr,  # fp32 partial sums: [M, K] (ATOMIC) or [SPLIT, M, K], zero-initialized; DIRECT: dX [M, K]
    dy_ptr,  # [M, N] upstream gradient (any strides)
    v_ptr,  # WITH_V: fp32 V = dY·B, [M, R] (ATOMIC) or [SPLIT, M, R], zero-initialized; else dummy
    lb_ptr,  # WITH_V: QA-LoRA's lora_b [N, R] (any strides); else dummy
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # packed weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    M, N, K, M_BUCKET, R,
    stride_dym, stride_dyn, stride_lbn, stride_lbr, stride_dxm, stride_dxk,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    WITH_V: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SHIFT_K: tl.constexpr = False,
    QN_ALIGN: tl.constexpr = 1, HALF2: tl.constexpr = False, HALF2_ASM: tl.constexpr = False,
    LOOP_RUNS: tl.constexpr = False, DIRECT: tl.constexpr = False,
):
    """Small-M input gradient, the reduction over N split across the grid: program (k, s, m) adds
    dXᵀ[k0:k0+BK, m0:m0+BM] = Σ_{n in slice s} Ŵᵀ[BK, BN]·dYᵀ[BN, BM] (slices of ⌈N/BN / SPLIT⌉ tiles).

    WITH_V (QA-LoRA): one extra column of programs (k = ⌈K/BK⌉, one per slice and M tile) adds
    V[m, :] = Σ_{n in slice s} dY[m, n]·B[n, :] instead (the low-rank term of dX itself is folded
    into the group biases by the caller). Not fused into the dequantizing loop: B's tile there
    made the 256-row tile spill.

    Ŵᵀ comes from :func:`qlk.kernels.quant_tile_t._dequant_tile_t` in dY's dtype (HALF2: the INT
    formats' half2 arithmetic, s and c rounded to dY's dtype first, as the GEMM gradient; HALF2_ASM:
    its inline PTX, else the interpreter's twin).

    DIRECT (round 32; one slice, grid axis 1 of size 1): a program's sum over all of N is dX's tile
    itself, stored in dY's dtype at (stride_dxm, stride_dxk), with no workspace to zero, add into and
    cast back (10 B a dX element outside the kernel, against the tile's 2 B: on narrow layers, N ≤ the
    tile's BLOCK_N, those passes were most of the launch's time, docs/kernels.md "Round 32"). V's
    programs keep their fp32 workspace (M·R values)."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    tiles = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
    n_start = pid_s * tiles * BLOCK_N
    n_end = tl.minimum(N, n_start + tiles * BLOCK_N)
    if LOOP_RUNS:  # no empty slice of N (as the forward's LOOP_RUNS)
        tl.assume(n_end > n_start)
    k0, offs_k, keep_k = _grad_k_tile(pid_k, K, BLOCK_K, SHIFT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64) * stride_dym
    if WITH_V and pid_k == tl.cdiv(K, BLOCK_K):
        # the extra column of programs: V over this slice, no weight tile (its own registers: the
        # dequantizing loop below stays exactly the plain kernel's)
        vacc = _splitn_v_loop(dy_rows, lb_ptr, stride_dyn, stride_lbn, stride_lbr, mask_m, n_start, n_end, N, R,
                              DOT_PRECISION, R_PAD, BLOCK_N, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        v_mask = (offs_r[:, None] < R) & mask_m[None, :]
        v_offs = offs_m[None, :].to(tl.int64) * R + offs_r[:, None]
        if ATOMIC:
            tl.atomic_add(v_ptr + v_offs, vacc, mask=v_mask, sem="relaxed")
        else:
            tl.store(v_ptr + pid_s.to(tl.int64) * M * R + v_offs, vacc, mask=v_mask)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            # clamped weight rows meet dY columns masked to 0: they add exactly 0
            wt = _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                                 stride_qn, stride_sn, stride_sg, tl.minimum(offs_n, N - 1), k0, K,
                                 BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K,
                                 dy_ptr.dtype.element_ty, HALF2=HALF2, HALF2_ASM=HALF2_ASM)
            dyt = tl.load(dy_rows[None, :] + offs_n[:, None] * stride_dyn,
                          mask=mask_m[None, :] & (offs_n[:, None] < N), other=0.0)
            acc = tl.dot(wt, dyt, acc, input_precision=DOT_PRECISION)
        mask = keep_k[:, None] & mask_m[None, :]
        if DIRECT:
            dx_offs = offs_m[None, :].to(tl.int64) * stride_dxm + offs_k[:, None] * stride_dxk
            tl.store(ws_ptr + dx_offs, acc.to(ws_ptr.dtype.element_ty), mask=mask)
        else:
            offs = offs_m[None, :].to(tl.int64) * K + offs_k[:, None]
            if ATOMIC:
                tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
            else:
                tl.store(ws_ptr + pid_s.to(tl.int64) * M * K + offs, acc, mask=mask)


@triton.autotune(configs=gemv_grad_configs(), key=["N", "K", "BITS", "GROUP_SIZE", "IS_NF4", "ATOMIC"],
                 prune_configs_by=GEMV_PRUNE, reset_to_zero=["ws_ptr"])
@even_k_kernel
@packed_rows_kernel
@fma_kernel
@triton.jit
def _quant_matmul_grad_input_gemv_kernel(
    ws_ptr,  # fp32 partial sums: [K] (ATOMIC) or [SPLIT, K], zero-initialized
    dy_ptr,  # [1, N] upstream gradient (any stride)
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # packed weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    N, K, stride_dyn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QN_ALIGN: tl.constexpr = 1,
):
    """Input gradient at M = 1, the reduction over N split across the grid as in the split-N kernel:
    program (k, s) adds dX[k0:k0+BK] = Σ_{n in slice s} dY[n]·Ŵ[n, k0:k0+BK] with FMAs, not an MMA.

    Why: the MMA wants Ŵᵀ as its A operand, pairs along N, while the packed words give pairs along
    K, so the MMA kernel transposes every dequantized tile through shared memory. Here each thread
    keeps its own part of the tile: acc[BN, BK] += Ŵ ⊙ dY[:, None] in registers (one FFMA per
    element, Ŵ not rounded to dY's dtype), and the rows are summed across threads once, after the
    loop. Dispatched for NF4 only (docs/kernels.md: INT tiles still go through shared memory here)."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
    n_start = pid_s * tiles * BLOCK_N
    n_stop = tl.minimum(N, n_start + tiles * BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # clamped weight rows meet dY entries masked to 0: they add exactly 0
        w = _dequant_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                          stride_qn, stride_sn, stride_sg, tl.minimum(offs_n, N - 1), k0, K,
                          BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K)
        dy = tl.load(dy_ptr + offs_n * stride_dyn, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += w * dy[:, None]
    part = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(ws_ptr + offs_k, part, mask=offs_k < K, sem="relaxed")
    else:
        tl.store(ws_ptr + pid_s.to(tl.int64) * K + offs_k, part, mask=offs_k < K)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
#: a list to record every launch's tile choice in, as (op, KernelChoice), or None (the static
#: report and the tests set it; nothing else reads it)
CHOICE_LOG: list | None = None


def _all_configs() -> tuple[str, ...]:
    """``QLK_ALL_CONFIGS=1``: launch every candidate that fits, the chosen one last (the static
    report compiles them all to put the rules' pick next to the analyzer's best). A comma-separated
    list of shell patterns instead of 1: only the candidates whose label matches one, and the chosen
    one (``bench/static_report.py --only-configs``: a new tile added to committed sweeps whose other
    tiles' code did not change). Returns the patterns, () when off."""
    return _config_patterns(os.environ.get("QLK_ALL_CONFIGS", "0"))


@functools.lru_cache(maxsize=64)
def _config_patterns(value: str) -> tuple[str, ...]:
    """:func:`_all_configs` of the variable's value (parsed once per value: asked at every launch)."""
    value = value.strip()
    if value in ("", "0"):
        return ()
    return ("*",) if value == "1" else tuple(p.strip() for p in value.split(",") if p.strip())


#: (op, format class, tile label, arch) of tiles that could not be built or loaded on this machine
#: (a Triton version that rejects the code, a tile over the SM's shared memory): never chosen again
_FAILED_TILES: set = set()
#: tiles one call tries before it gives up on the fused kernel (each failure costs one compile)
_TILE_TRIES = 4


class _TileFailed(Exception):
    """A tiled launch failed to build or load; its key is in :data:`_FAILED_TILES`."""

    def __init__(self, key, cause):
        super().__init__(f"{key}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''}")
        self.key, self.cause = key, cause


class _NoTileLeft(Exception):
    """Every candidate tile of ``op`` for this format failed to build or load on this machine."""


def _build_failure(e: BaseException) -> bool:
    """Whether ``e`` says the kernel could not be built or loaded here (a compiler error, too much
    shared memory, a ptxas failure), as opposed to bad input or a fault while it ran."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    if isinstance(e, (CompilationError, OutOfResources)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("PassManager::run failed", "ptxas", "PTXAS"))


@contextlib.contextmanager
def _tile_guard(op, meta, c):
    """Around one tiled launch: a build or load failure marks the tile failed (:data:`_FAILED_TILES`)
    and becomes :class:`_TileFailed`, which :func:`_with_tile_fallback` retries."""
    try:
        yield
    except Exception as e:
        if not _build_failure(e):
            raise
        key = (op, heuristics.format_class(meta["BITS"], meta["IS_NF4"], meta.get("GROUP_SIZE")), c.label, target_arch())
        _FAILED_TILES.add(key)
        raise _TileFailed(key, e) from e


_WARNED: set = set()


def _warn_once(key, text):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(text, RuntimeWarning, stacklevel=4)


def _with_tile_fallback(run, what: str, can_dequant: bool):
    """``run(path_override)`` with the chosen tiles; a tile that fails to build or load (this
    Triton's compiler rejects it, or it needs more shared memory than the SM has) is marked and the
    next best tile by the same rules is launched instead. After :data:`_TILE_TRIES` failures in one
    call, or once no candidate is left: dequantize + dense GEMM where ``can_dequant`` (path "auto"
    without replaced weight arguments), else a RuntimeError that says what to do. Each failed tile
    warns once per process."""
    last = None
    for _ in range(_TILE_TRIES):
        try:
            return run(None)
        except _TileFailed as f:
            last = f
            op, fmt, label, arch = f.key
            _warn_once(f.key, f"qlk: the {op} kernel's {label} tile for {fmt} could not be built or loaded on this "
                              f"GPU (sm_{arch}, triton {triton.__version__}): {f}. qlk launches the next best tile "
                              "instead; please report this with your Triton version.")
        except _NoTileLeft:
            break
    if can_dequant:
        _warn_once((what, "dequant"), f"qlk: no fused {what} kernel could be built on this GPU (triton "
                                      f"{triton.__version__}; last failure: {last}); using dequantize + dense GEMM.")
        return run("dequant")
    raise RuntimeError(f"qlk: no fused {what} kernel tile could be built or loaded on this GPU (triton "
                       f"{triton.__version__}); last failure: {last}. Use path='dequant' (or path='auto' "
                       "without QA-LoRA's folded biases), or another Triton version.") from (last.cause if last else None)


def _tiles(op, m, n, k, meta, device, fp32_bias=False, pool=False, act_bytes=2):
    """(the rules' choice, the choices to launch) for ``op`` at the layer shape (M, N, K) on the
    current target: :func:`qlk.kernels.heuristics.choose_config`, no timing. ``act_bytes``: the
    activations' element size (fp32 tiles take twice the shared memory)."""
    arch, sms = target_arch(), num_sms(device)
    fmt = heuristics.format_class(meta["BITS"], meta["IS_NF4"], meta.get("GROUP_SIZE"))
    chosen = heuristics.choose_config(op, m, n, k, fmt, arch, sms, fp32_bias=fp32_bias, pool=pool, act_bytes=act_bytes)
    if _FAILED_TILES and (op, fmt, chosen.label, arch) in _FAILED_TILES:
        left = [c for c in heuristics.score_all(op, m, n, k, fmt, arch, sms, fp32_bias=fp32_bias, pool=pool,
                                                   act_bytes=act_bytes)
                if (op, fmt, c.label, arch) not in _FAILED_TILES]
        if not left:
            raise _NoTileLeft(op, fmt)
        chosen = max(left, key=lambda c: c.score)  # the next best by the same rules
    if CHOICE_LOG is not None:
        CHOICE_LOG.append((op, chosen))
    patterns = _all_configs()
    if not patterns:
        return chosen, [chosen]
    every = heuristics.score_all(op, m, n, k, fmt, arch, sms, fp32_bias=fp32_bias, pool=pool,
                                 act_bytes=act_bytes)
    return chosen, [c for c in every if c.index != chosen.index
                    and any(fnmatch.fnmatchcase(c.label, p) for p in patterns)] + [chosen]


def _bucket(m: int) -> int:
    """The kernels' M_BUCKET argument: M rounded up to a power of two (the autotune key of
    round 1; unused in the kernel bodies, kept so that their signatures stay put)."""
    return 1 << max(m - 1, 0).bit_length()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _as_2d(t: torch.Tensor, last: int, what: str) -> torch.Tensor:
    if t.dtype not in _ACT_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}; the kernels take float16, bfloat16 or float32")
    if t.dim() == 0 or t.shape[-1] != last:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; its last dim must be {last}")
    return t.reshape(-1, last)  # a view whenever the leading dims merge; the kernels take any strides


def _check_out(out, shape, dtype, device, what="out"):
    if out.shape != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"{what} must be {list(shape)} {dtype} on {device}; got {list(out.shape)} {out.dtype} "
                         f"on {out.device}")
    if torch._debug_has_internal_overlap(out) != 0:  # 0: no overlap; 1: overlap; 2: too hard to tell
        raise ValueError(f"{what} (strides {tuple(out.stride())}) may overlap itself (e.g. an expand()): the "
                         "kernel would race on aliased rows; pass a contiguous tensor")


#: On a GPU, path "auto" above M = 16 runs the fused GEMM only where this is True and the static
#: model picks it; else it dequantizes and runs the dense GEMM. False since the first GPU
#: measurements (H200, triton 3.6, torch 2.11, 2026-12-04; bench/results/gpu-NVIDIA-H200-20261204/,
#: docs/measurements.md "Round 35"): on two Llama-3-8B layers at M = 1024 and 4096, INT4 g32/g128 and
#: NF4, dequantize + cuBLAS ran at 0.21-0.95x dense bf16 cuBLAS and the fused GEMM at 0.16-0.74x
#: (forward) and 0.16-0.51x (input gradient): the fused GEMM was faster in 1 of 24 cases. Three
#: fused forward tiles also returned NaN or wrong rows on that machine (gpu_triage). The static
#: model overrated the fused GEMM; until it is measured faster and correct on a GPU, M > 16
#: dequantizes (path="fused" / "gemm" still run it; the static report still compares both).
FUSED_GEMM_AUTO = False

#: sm_90's GEMM input gradient, where its Ŵ tile is the MMA's B operand (``W_AS_B``): compute the
#: transposed product instead, Ŵᵀ as wgmma's register operand (``W_AS_A`` of :func:`_w_as_b_acc`).
#: Round 36: the B-operand loop waits for all its MMAs every step, and an H200 ran it at 1.7-2.2x
#: its pessimistic estimate (the forward, whose dequantized tile is the register operand, at
#: 1.1-1.4x). W_AS_A keeps one MMA group in flight, with no loop waiting for all of them, at 0 B of
#: spills. The analyzer does not charge the wait, so it rates W_AS_A 0-21 % lower (an STS + LDSM
#: transpose a step). Not measured on a GPU yet: off by default; ``QLK_GRAD_W_AS_A=1`` turns it on,
#: and bench/gpu_calibrate.py times both.
GRAD_W_AS_A = os.environ.get("QLK_GRAD_W_AS_A", "0") == "1"

#: The split-K decode forward (M ≤ SPLITK_MAX_M, fp32 atomics: not ``deterministic``) finishes in the
#: kernel (``FINISH`` of :func:`_quant_matmul_splitk_kernel`, round 37): the last slice of each output
#: tile sums, biases and casts it into Y and clears its workspace, so a decode call is one launch
#: instead of three (workspace zeroing, the kernel, the cast), in a workspace kept per stream. Its
#: cross-CTA ordering (a barrier, then an acquire-release count) cannot be checked by the
#: interpreter, which runs programs one at a time: off until a GPU has run tests/test_kernel_paths.py's
#: FINISH tests (``make gpu-check``); ``QLK_SPLITK_FINISH=1`` turns it on. The grouped (MoE) split-K
#: decode (:mod:`qlk.kernels.grouped_matmul`) follows the same flag (round 38).
SPLITK_FINISH = os.environ.get("QLK_SPLITK_FINISH", "0") == "1"


def choose_path(op: str, m: int, qw: QuantizedWeight, device, act_dtype=torch.bfloat16) -> str:
    """What ``path="auto"`` runs for ``op`` "fwd" / "grad" at M rows: "splitk" / "splitn" at
    M <= 16, else "dequant" (dequantize, then a dense GEMM), or with :data:`FUSED_GEMM_AUTO` "gemm"
    (the fused kernel) or "dequant" by the static model of :func:`qlk.kernels.heuristics.choose_path`.
    Under the Triton interpreter (no GPU to model) always the fused kernels."""
    if m <= (SPLITK_MAX_M if op == "fwd" else SPLITN_MAX_M):
        return "splitk" if op == "fwd" else "splitn"
    if INTERPRETED:
        return "gemm"
    if not FUSED_GEMM_AUTO:
        return "dequant"
    n, k = qw.shape
    nf4 = qw.fmt == "nf4"
    pick = heuristics.choose_path(op, m, n, k, bits=4 if nf4 else qw.bits, group_size=qw.group_size, is_nf4=nf4,
                                  arch=target_arch(), sms=num_sms(device),
                                  act_bytes=act_dtype.itemsize)
    if pick.path == "dequant":
        return "dequant"
    return pick.fused.op if pick.fused.op in ("splitk", "splitn") else "gemm"


def fused_kernel(op: str, m: int, qw: QuantizedWeight, device) -> str:
    """What ``path="fused"`` runs for ``op`` "fwd" / "grad": "splitk" / "splitn" at M <= 16, the
    split kernel or "gemm" by :func:`qlk.kernels.heuristics.choose_fused` up to its SPLIT_MAX_M
    (under the Triton interpreter: "gemm" above 16), "gemm" above."""
    if m <= (SPLITK_MAX_M if op == "fwd" else SPLITN_MAX_M):
        return "splitk" if op == "fwd" else "splitn"
    if INTERPRETED or m > heuristics.SPLIT_MAX_M:
        return "gemm"
    n, k = qw.shape
    nf4 = qw.fmt == "nf4"
    c = heuristics.choose_fused(op, m, n, k, bits=4 if nf4 else qw.bits, group_size=qw.group_size, is_nf4=nf4,
                                arch=target_arch(), sms=num_sms(device))
    return c.op if c.op in ("splitk", "splitn") else "gemm"


def _m1_grad_kernel(qw: QuantizedWeight, device) -> str:
    """"splitn" or "gemv": the M = 1 input gradient's kernel, :func:`qlk.kernels.heuristics.choose_m1_grad`."""
    n, k = qw.shape
    nf4 = qw.fmt == "nf4"
    return heuristics.choose_m1_grad(n, k, heuristics.format_class(4 if nf4 else qw.bits, nf4, qw.group_size), target_arch(),
                                     num_sms(device))


def _dequantized(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ [N, K] in ``dtype``, stored column order (act-order: x is already gathered, dX scattered after)."""
    from .dequant import dequantize_forward

    return dequantize_forward(qw, dtype, stored_order=True)


_FWD_PATHS = ("auto", "gemm", "splitk", "dequant", "fused")
_GRAD_PATHS = ("auto", "gemm", "splitn", "gemv", "dequant", "fused")


def quant_matmul_forward(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                         out: torch.Tensor | None = None, path: str = "auto", deterministic: bool = False
                         ) -> torch.Tensor:
    """Y = X·Ŵᵀ (+ bias): x [..., K] (fp16/bf16/fp32, any strides) -> y [..., N] in x's dtype.

    path: "auto" (:func:`choose_path`: split-K when M = x.numel()/K <= SPLITK_MAX_M, else the fused
    GEMM or dequantize + dense GEMM by the static model), "fused" (split-K or the fused GEMM by M,
    never the dequantize path), "gemm", "splitk", "dequant" (Ŵ dequantized into a transient
    [N, K] buffer in x's dtype, then ``torch.matmul``).
    deterministic: split-K sums partials in a fixed order (workspace) instead of fp32 atomics.
    out: optional preallocated [M, N] (2-D, any strides) output.
    Leading dims of x are flattened with ``reshape`` (a copy only if they cannot be merged); a
    permuted weight (act-order) gathers x's columns first (a contiguous copy)."""
    return _forward(x, qw, bias, out, path, deterministic)[0]


def _forward(x, qw, bias, out, path, deterministic, wargs=None, pool=False):
    """(y [..., N], P(X) [M, G] fp32 or None). ``wargs``: weight_args(qw) with replaced tensors
    (QA-LoRA's folded biases: always a fused kernel); ``pool``: also compute P(X) over the stored
    column order. A tile that cannot be built here is replaced (:func:`_with_tile_fallback`)."""
    return _with_tile_fallback(
        lambda override: _forward_once(x, qw, bias, out, override or path, deterministic, wargs, pool),
        "forward", can_dequant=path == "auto" and wargs is None)


def _forward_once(x, qw, bias, out, path, deterministic, wargs=None, pool=False):
    n, k = qw.shape
    lead = x.shape[:-1]
    x2 = _as_2d(x, k, "x")
    if qw.perm is not None:
        x2 = x2.index_select(1, qw.perm)
    m = x2.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be [{n}] on {x.device}; got {list(bias.shape)} on {bias.device}")
    if out is not None:
        _check_out(out, (m, n), x.dtype, x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if path not in _FWD_PATHS:
        raise ValueError(f"path={path!r}; allowed: {', '.join(map(repr, _FWD_PATHS))}")
    if wargs is not None and path == "dequant":
        raise ValueError("path='dequant' is not available with replaced weight arguments (QA-LoRA's folded "
                         "biases); use 'auto', 'gemm' or 'splitk'")
    g = qw.group_size
    pooled = _pool_buffer((m, k // g), x.device) if pool else None
    if m == 0:
        return out.reshape(*lead, n), pooled
    if path == "fused":
        path = fused_kernel("fwd", m, qw, x.device) if wargs is None else ("splitk" if m <= SPLITK_MAX_M else "gemm")
    elif path == "auto":
        path = choose_path("fwd", m, qw, x.device, x.dtype) if wargs is None else \
            ("splitk" if m <= SPLITK_MAX_M else "gemm")
    pow2 = g & (g - 1) == 0
    if path == "dequant":
        fused = False
        w = _dequantized(qw, x.dtype).t()
        if bias is not None:
            torch.addmm(bias.to(x.dtype), x2, w, out=out)
        else:
            torch.matmul(x2, w, out=out)
    else:
        # NF4 double quant: absmax de-nested once per call for the GEMM, in the loop for decode
        # the GEMM's NF4 absmax de-nested into activation-dtype pairs (round 26; the K loop loads them as is)
        args, meta = wargs if wargs is not None else weight_args(qw, denest_absmax=path == "gemm",
                                                                 pair_act=x.dtype if path == "gemm" else None)
        if path == "splitk":
            _, launches = _tiles("splitk", m, n, k, meta, x.device, _folded_fp32_biases(args, meta), pool=pool and pow2,
                                  act_bytes=x2.element_size())
            # in-kernel pooling needs whole groups per K tile
            fused = pool and pow2 and g <= min(c.block_k for c in launches)
            _splitk_forward(x2, qw, bias, out, deterministic, args, meta, pooled if fused else None, launches)
        else:
            fused = pool and pow2
            bias_arg = bias if bias is not None else args[3]
            _, launches = _tiles("fwd", m, n, k, meta, x.device, _folded_fp32_biases(args, meta), pool=fused,
                                  act_bytes=x2.element_size())
            # mid M: the rules split the K loop (grid axis 1) to fill the SMs; partials in an fp32
            # workspace, summed and cast below (split 1: Y stored directly)
            ws, split = None, 1
            fixed_order = deterministic or not _fwd_split_atomic()
            arch = target_arch()
            for c in launches:
                slice_k, split = heuristics.fwd_slices(k, c.block_k, g, c.split)
                if split > 1:  # a zeroed workspace per launch (QLK_ALL_CONFIGS runs several)
                    ws = _split_workspace(split, m, n, fixed_order, x.device)
                dst, extra = (out, {}) if split == 1 else \
                    (ws, dict(SPLIT_K=True, ATOMIC=not fixed_order, SLICE_K=slice_k))
                with _tile_guard("fwd", meta, c):
                    _quant_matmul_fwd_kernel[(cdiv(m, c.block_m) * cdiv(n, c.block_n), split)](
                        dst, x2, bias_arg, pooled if fused else args[3], *args, m, n, k, _bucket(m),
                        x2.stride(0), x2.stride(1), dst.stride(-2), dst.stride(-1), pooled.stride(0) if fused else 0,
                        HAS_BIAS=bias is not None, DOT_PRECISION=_precision(x.dtype), POOL=fused,
                        PACKED_DEQUANT=not INTERPRETED, LANE_ORDER=heuristics.fwd_lane_order(arch, c.block_m),
                        LOOP_RUNS=_loop_runs(k, c.block_k, split, slice_k if split > 1 else 0, whole=k % c.block_k != 0),
                        **meta, **c.meta, **extra)
            if split > 1:  # the chosen launch (the last) wrote the workspace
                _split_finish(out, ws, fixed_order)
    if pool and not fused:  # group size not a power of two (or larger than the split-K tile)
        torch.mean(x2.reshape(m, k // g, g), dim=-1, dtype=torch.float32, out=pooled)
    return out.reshape(*lead, n), pooled


def _loop_runs(length: int, block: int, split: int, slice_len: int = 0, whole: bool = False) -> bool:
    """The kernels' LOOP_RUNS for a launch (:func:`qlk.kernels.heuristics.split_loop_runs`) on the
    active target: told on sm_90, whose wgmma loops ptxas serializes without it (C7515), and under
    the interpreter (target 0), which checks every ``tl.assume``; not on sm_80, whose mma.sync loops
    gain nothing and where one tile spills with it (NF4's 128x128x32 w8 forward: 16 B)."""
    arch = target_arch()
    return (arch == 0 or arch >= 90) and heuristics.split_loop_runs(length, block, split, slice_len, whole)


def _decode_loop_runs(meta: dict, k: int, block_k: int, split: int, direct: bool = False) -> bool:
    """:func:`_loop_runs` for the split-K decode loops (dense and grouped), except INT3: its
    two-warp 16x64x256 tile spills 8 B with the assumption (QA-LoRA's pooled decode, the grouped
    split-K), and its decode loops were not serialized without it (round 25's scans; NF4's were).
    ``direct`` (the dense split-K's one-slice launch, round 33): told on sm_80 too, where without it
    ptxas carried one epilogue index through the stack across the loop's zero-trip path (8 B: INT2
    g32 on 16x64x256 w2, INT4 g64 on 16x64x128 w4 at M = 64-128; 0 B with it, the same estimates)."""
    if meta["BITS"] == 3 and not meta["IS_NF4"]:
        return False
    whole = k % block_k != 0
    if direct:  # every arch
        return heuristics.split_loop_runs(k, block_k, split, whole=whole)
    return _loop_runs(k, block_k, split, whole=whole)


def _fwd_split_atomic() -> bool:
    """Whether the split forward GEMM adds its fp32 partials with atomics (not ``deterministic``):
    on sm_90; on sm_80 its slices store into [SPLIT, M, N] and are summed in a fixed order
    always, because the atomics' epilogue spills there (a 4-warp 128x128 tile holds 128 fp32
    values per thread: 528-880 B of stack, docs/kernels.md "Forward, split K at mid M (round 6)").
    The tests replace this function to run both epilogues under the interpreter."""
    return heuristics.arch_family(target_arch()) == 90


def _pool_buffer(shape, device) -> torch.Tensor:
    """P(X) [M, G] fp32, every element written by the forward (tests poison it with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _v_buffer(shape, device) -> torch.Tensor:
    """QA-LoRA's V = dY·B [M, r] fp32, every element written (by the GEMM launch's V programs, or
    copied from the split-N workspace); the tests replace this function to poison it with NaN."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _r_pad(r: int) -> int:
    """The rank padded to the V tile's width: a power of two, ≥ 16 (the MMA's smallest)."""
    return max(16, 1 << (max(r, 1) - 1).bit_length())  # triton.next_power_of_2, without its host cost


def _workspace(shape, device) -> torch.Tensor:
    """The fp32 reduction workspace of split-K / split-N, zero-filled: [M, ·] is the atomics'
    accumulator; [SPLIT, M, ·] must be zero only in the slices a smaller config's grid leaves
    unwritten (``QLK_ALL_CONFIGS``: several configs into one workspace). The tests replace this
    function to poison [SPLIT, M, ·] with NaN (one config: every slice must be written)."""
    return torch.zeros(shape, dtype=torch.float32, device=device)


#: FINISH launches' workspaces by (device, stream): (fp32 sums, int32 counts), zeroed when made and
#: left at zero by every launch (each output tile's last slice clears it), grown when a launch needs
#: more. One per stream, so that launches on two streams never share one; the oldest is dropped past
#: :data:`_FINISH_STREAMS` (freed in its stream's order by the caching allocator).
_FINISH_BUFFERS: dict = {}
_FINISH_STREAMS = 16


def _finish_workspace(size: int, tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [size], int32 [tiles]) zero-filled views of the current stream's FINISH workspace."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    ws, counts = _FINISH_BUFFERS.get(key, (None, None))
    if ws is None or ws.numel() < size:
        ws = torch.zeros(size, dtype=torch.float32, device=device)
    if counts is None or counts.numel() < tiles:
        counts = torch.zeros(tiles, dtype=torch.int32, device=device)
    _FINISH_BUFFERS[key] = ws, counts
    if len(_FINISH_BUFFERS) > _FINISH_STREAMS:
        del _FINISH_BUFFERS[next(iter(_FINISH_BUFFERS))]
    return ws[:size], counts[:tiles]


def _splitk_forward(x2, qw, bias, out, deterministic, args, meta, pooled, launches):
    """Split-K forward into ``out`` with each of ``launches`` (KernelChoice; one unless
    QLK_ALL_CONFIGS)."""
    m, k = x2.shape
    n = qw.shape[0]
    dummy = args[3]
    ws = None
    finish = SPLITK_FINISH and not deterministic
    for c in launches:
        # one slice: Y (+ bias) stored directly (DIRECT); FINISH: the kernel sums, biases and casts
        # into Y itself, in a workspace it leaves at zero; else a zeroed workspace per launch
        # (QLK_ALL_CONFIGS runs several), summed, biased and cast below
        direct = c.split == 1
        grid = (cdiv(n, c.block_n), c.split, cdiv(m, c.block_m))
        counts = dummy
        if finish and not direct:
            ws, counts = _finish_workspace(m * n, grid[0] * grid[2], x2.device)
        elif not direct:
            ws = _split_workspace(c.split, m, n, deterministic, x2.device)
        dst = out if direct else ws
        in_kernel_bias = (direct or finish) and bias is not None
        with _tile_guard("splitk", meta, c):
            _quant_matmul_splitk_kernel[grid](
                dst, x2, bias if in_kernel_bias else dummy, pooled if pooled is not None else dummy,
                out if finish and not direct else dummy, counts,
                *args, m, n, k, _bucket(m), x2.stride(0), x2.stride(1), pooled.stride(0) if pooled is not None else 0,
                out.stride(0), out.stride(1),
                ATOMIC=not deterministic, DOT_PRECISION=_precision(x2.dtype), POOL=pooled is not None,
                PACKED_DEQUANT=not INTERPRETED, LOOP_RUNS=_decode_loop_runs(meta, k, c.block_k, c.split, direct),
                DIRECT=direct, HAS_BIAS=in_kernel_bias, FINISH=finish and not direct, **meta, **c.meta)
    if launches[-1].split > 1 and not finish:  # the chosen launch (the last) wrote the workspace
        y = ws.sum(0) if deterministic else ws
        if bias is not None:
            y = y + bias.to(torch.float32)
        out.copy_(y)


def quant_matmul_grad_input(dy: torch.Tensor, qw: QuantizedWeight, out: torch.Tensor | None = None,
                            path: str = "auto", deterministic: bool = False) -> torch.Tensor:
    """dX = dY·Ŵ: dy [..., N] (fp16/bf16/fp32, any strides) -> dx [..., K] in dy's dtype.

    Reads the same packed weight as the forward. With act-order the result is scattered back to
    the original column order (a copy). out: optional preallocated [M, K] (2-D) output, only
    without act-order. path: "auto" (:func:`choose_path`: split-N when M <= SPLITN_MAX_M (at M = 1
    the FMA kernel where heuristics.choose_m1_grad says so), else split-N, the fused GEMM or
    dequantize + dense GEMM by the static model), "fused" (the fused kernel the rules pick:
    :func:`fused_kernel`), "gemm", "splitn", "gemv" (the FMA kernel, M = 1 only),
    "dequant"; deterministic: the split kernels sum partials in a fixed order (workspace) instead of
    atomics."""
    return _grad_input(dy, qw, out, path, deterministic)


def _grad_words_ahead() -> bool:
    """The GEMM input gradient loads the next N tile's packed words into registers (WORDS_AHEAD), by
    inline PTX on a GPU (docs/kernels.md "Input gradient, round 4": estimated faster on sm_90 and
    sm_80); the interpreter runs the same loop with ``tl.load``. False: the words through cp.async
    and shared memory (the round-3 loop; the tests run both by replacing this function)."""
    return True


def _grad_half2(qw, dtype) -> bool:
    """Whether the GEMM input gradients (this module's and the grouped one) decode Ŵᵀ in half2
    arithmetic (HALF2): INT formats with fp16/bf16 dY, on sm_90 and sm_80 alike (no estimate got
    worse on either, for any candidate tile: docs/kernels.md "Input gradient, half2 transposed
    decoder (round 7)")."""
    return qw.fmt == "int" and dtype in (torch.float16, torch.bfloat16)


def _grad_input(dy, qw, out, path, deterministic, wargs=None, lora_b=None):
    """dX [..., K]; with ``lora_b`` (QA-LoRA's B [N, r]) the pair (dX, V = dY·B [M, r] fp32), V
    computed by the same launch (split-N: its extra column of programs; GEMM: one extra program
    per M tile).
    ``wargs``: weight_args(qw) with replaced tensors (QA-LoRA's folded biases). A tile that cannot
    be built here is replaced (:func:`_with_tile_fallback`)."""
    return _with_tile_fallback(
        lambda override: _grad_input_once(dy, qw, out, override or path, deterministic, wargs, lora_b),
        "input-gradient", can_dequant=path == "auto" and wargs is None and lora_b is None)


def _grad_input_once(dy, qw, out, path, deterministic, wargs=None, lora_b=None):
    n, k = qw.shape
    lead = dy.shape[:-1]
    dy2 = _as_2d(dy, n, "dy")
    m = dy2.shape[0]
    if out is not None:
        if qw.perm is not None:
            raise ValueError("out= is not supported with an act-order permutation (the result is scattered)")
        _check_out(out, (m, k), dy.dtype, dy.device)
    else:
        out = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if path not in _GRAD_PATHS:
        raise ValueError(f"path={path!r}; allowed: {', '.join(map(repr, _GRAD_PATHS))} ('gemv': M = 1)")
    if path == "gemv" and (m != 1 or lora_b is not None):
        raise ValueError(f"path='gemv' is the M = 1 kernel without V; got M = {m}" + (" and lora_b" if lora_b is not None else ""))
    if wargs is not None and path == "dequant":
        raise ValueError("path='dequant' is not available with replaced weight arguments (QA-LoRA's folded "
                         "biases); use 'auto', 'gemm' or 'splitn'")
    if path in ("auto", "fused") and m > 0:
        if wargs is not None:
            path = "splitn" if m <= SPLITN_MAX_M else "gemm"
        elif path == "fused":
            path = fused_kernel("grad", m, qw, dy.device)
        else:
            path = choose_path("grad", m, qw, dy.device, dy.dtype)
        if path == "splitn" and m == 1 and lora_b is None and _m1_grad_kernel(qw, dy.device) == "gemv":
            path = "gemv"  # M = 1: the FMA kernel where the rules estimate it faster (heuristics.choose_m1_grad)
    v = None
    if lora_b is not None:
        v = _v_buffer((m, lora_b.shape[1]), dy.device)
    if m > 0 and path == "dequant":
        torch.matmul(dy2, _dequantized(qw, dy.dtype), out=out)
    elif m > 0:
        # the GEMM's NF4 absmax de-nested into dY-dtype pairs (round 26, as the forward's)
        args, meta = wargs if wargs is not None else weight_args(qw, denest_absmax=path == "gemm",
                                                                 pair_act=dy.dtype if path == "gemm" else None)
        if path == "gemv":
            _gemv_grad_input(dy2, qw, out, deterministic, args, meta)
        elif path == "splitn":
            # NF4's fp32 placeholder is not a bias (round 32: its 256-row split-N tiles compile without
            # a spill, and were kept off them by it)
            _splitn_grad_input(dy2, qw, out, deterministic, args, meta, _folded_fp32_biases(args, meta), lora_b, v)
        else:
            _, launches = _tiles("grad", m, n, k, meta, dy.device, _folded_fp32_biases(args, meta),
                                  act_bytes=dy2.element_size())
            # INT2 unpacked per half word on sm_80 (quant_tile_t; docs/kernels.md "Input gradient, round 3")
            int2_halves = heuristics.arch_family(target_arch()) == 80
            # with V: one more program per M tile, after the dX tiles, for V = dY·B
            v_args = {} if lora_b is None else dict(
                v_ptr=v, lb_ptr=lora_b, R=lora_b.shape[1], stride_lbn=lora_b.stride(0),
                stride_lbr=lora_b.stride(1), WITH_V=True, R_PAD=_r_pad(lora_b.shape[1]))
            ahead = _grad_words_ahead()
            half2 = _grad_half2(qw, dy.dtype)
            # mid M on narrow K: the rules split the reduction over N (grid axis 1) to fill the SMs;
            # partials in an fp32 workspace, summed and cast below (split 1: dX stored directly)
            ws = None
            for c in launches:
                tiles = cdiv(m, c.block_m) * (cdiv(k, c.block_k) + (lora_b is not None))
                if c.split > 1:  # a zeroed workspace per launch (QLK_ALL_CONFIGS runs several)
                    ws = _split_workspace(c.split, m, k, deterministic, dy.device)
                dst, split = (out, {}) if c.split == 1 else (ws, dict(SPLIT_N=True, ATOMIC=not deterministic))
                with _tile_guard("grad", meta, c):
                    _quant_matmul_grad_input_kernel[(tiles, c.split)](
                        dst, dy2, *args, m, n, k, _bucket(m),
                        dy2.stride(0), dy2.stride(1), dst.stride(-2), dst.stride(-1),
                        DOT_PRECISION=_precision(dy.dtype), INT2_HALVES=int2_halves,
                        WORDS_AHEAD=ahead, WORDS_ASM=ahead and not INTERPRETED, HALF2=half2,
                        HALF2_ASM=half2 and not INTERPRETED,
                        W_AS_B=heuristics.grad_w_as_b(target_arch(), qw.bits, c.block_n, c.block_k, c.num_warps),
                        W_AS_A=GRAD_W_AS_A, LOOP_RUNS=_loop_runs(n, c.block_n, c.split),
                        **meta, **c.meta, **v_args, **split)
            if ws is not None and launches[-1].split > 1:  # the chosen launch (the last) wrote the workspace
                _split_finish(out, ws, deterministic)
    if qw.perm is not None:
        out = out.index_select(1, torch.argsort(qw.perm))
    dx = out.reshape(*lead, k)
    return dx if lora_b is None else (dx, v)


def _folded_fp32_biases(args, meta) -> bool:
    """Whether the GEMM input gradient reads fp32 group biases (QA-LoRA's folded biases, passed in
    ``wargs``): the rules keep those off the two-warp tile, which spills with them
    (:func:`qlk.kernels.heuristics._fits`). NF4 has no biases: its bias argument is the fp32
    placeholder, and counting that as fp32 biases kept every NF4 input gradient off sm_80's
    64x64x128 w2 tile (0.85x dense at M = 500; docs/kernels.md "Round 10")."""
    return not meta["IS_NF4"] and getattr(args[2], "dtype", None) == torch.float32


def _split_workspace(split, m, cols, deterministic, device) -> torch.Tensor:
    """The split GEMMs' workspace (input gradients' split N: cols = K; the forward's split K:
    cols = N): [M, cols] for the atomics, [SPLIT, M, cols] deterministic."""
    return _workspace((split, m, cols) if deterministic else (m, cols), device)


def _split_finish(out, ws, deterministic):
    """dX / Y from the split workspace: the slices summed in a fixed order (deterministic) or the
    atomics' sums, cast to ``out``'s dtype."""
    out.copy_(ws.sum(0) if deterministic else ws)


def _splitn_grad_input(dy2, qw, out, deterministic, args, meta, fp32_bias=False, lora_b=None, v=None):
    """dX = dY·Ŵ into ``out`` [M, K]; with ``lora_b`` [N, r] also V = dY·B into ``v`` [M, r] fp32."""
    m, n = dy2.shape
    k = qw.shape[1]
    with_v = lora_b is not None
    _, launches = _tiles("splitn", m, n, k, meta, dy2.device, fp32_bias, pool=with_v, act_bytes=dy2.element_size())
    r = lora_b.shape[1] if with_v else 0
    max_split = max(c.split for c in launches)
    v_ws = (_workspace((max_split, m, r) if deterministic else (m, r), dy2.device)) if with_v else None
    dummy = args[3]
    half2 = _grad_half2(qw, dy2.dtype)
    ws = None
    for c in launches:
        # one slice: dX stored directly (DIRECT); else a zeroed workspace per launch (QLK_ALL_CONFIGS
        # runs several), summed and cast below
        direct = c.split == 1
        if not direct:
            ws = _split_workspace(c.split, m, k, deterministic, dy2.device)
        dst = out if direct else ws
        # with V: one more column of programs, k = ⌈K/BLOCK_K⌉, for V = dY·B
        grid = (cdiv(k, c.block_k) + with_v, c.split, cdiv(m, c.block_m))
        with _tile_guard("splitn", meta, c):
            _quant_matmul_grad_input_splitn_kernel[grid](
                dst, dy2, v_ws if with_v else dummy, lora_b if with_v else dummy, *args, m, n, k, _bucket(m), r,
                dy2.stride(0), dy2.stride(1), lora_b.stride(0) if with_v else 0, lora_b.stride(1) if with_v else 0,
                out.stride(0), out.stride(1),
                ATOMIC=not deterministic, DOT_PRECISION=_precision(dy2.dtype),
                WITH_V=with_v, R_PAD=_r_pad(r), HALF2=half2, HALF2_ASM=half2 and not INTERPRETED,
                LOOP_RUNS=_loop_runs(n, c.block_n, c.split), DIRECT=direct, **meta, **c.meta)
    if launches[-1].split > 1:  # the chosen launch (the last) wrote the workspace
        _split_finish(out, ws, deterministic)
    if with_v:
        v.copy_(v_ws.sum(0) if deterministic else v_ws)


def _gemv_grad_input(dy2, qw, out, deterministic, args, meta):
    """M = 1: dX = dY·Ŵ into ``out`` [1, K] by the FMA kernel (same split rule as split-N)."""
    n, k = qw.shape
    sms = num_sms(dy2.device)

    def split_of(meta_):
        return max(1, min(cdiv(n, meta_["BLOCK_N"]), cdiv(16 * sms, cdiv(k, meta_["BLOCK_K"]))))

    def grid(meta_):
        return (cdiv(k, meta_["BLOCK_K"]), split_of(meta_))

    if deterministic:
        max_split = max(split_of(c.kwargs) for c in _quant_matmul_grad_input_gemv_kernel.configs)
        ws = _workspace((max_split, 1, k), dy2.device)
    else:
        ws = _workspace((1, k), dy2.device)
    _quant_matmul_grad_input_gemv_kernel[grid](ws, dy2, *args, n, k, dy2.stride(1), ATOMIC=not deterministic, **meta)
    out.copy_(ws.sum(dim=0) if deterministic else ws)

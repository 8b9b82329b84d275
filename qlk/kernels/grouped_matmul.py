"""Grouped fused dequantize + matmul for mixture-of-experts layers: the experts' GEMMs in one launch.

Layout. The E experts of one projection are one stacked :class:`~qlk.formats.QuantizedWeight`
Ŵ [E·N, K] (expert e owns rows e·N .. e·N+N−1; any qlk format, quantized as one weight, so the
packing, the IO and the tile decoder :func:`qlk.kernels.quant_tile._dequant_tile` are the dense
layer's). The S = T·top_k routed rows of X are sorted by expert; ``offsets`` [E+1] (int32/int64,
offsets[0] = 0, non-decreasing, offsets[E] <= S) delimits them: rows offsets[e] .. offsets[e+1]−1
go to expert e. Rows from offsets[E] on (expert-parallel sentinels) belong to no expert and come
out 0. An expert with no row, and S = 0, are ordinary inputs.

Math, for a row s of expert e (n < N, k < K):

    forward         Y[s, n]  = Σ_k X[s, k]·Ŵ[e·N + n, k] (+ bias[e, n])
    input gradient  dX[s, k] = Σ_n dY[s, n]·Ŵ[e·N + n, k]

(the chain rule of Y_e = X_e·Ŵ_eᵀ + 1·b_eᵀ per expert; the experts share nothing).

Kernels (no Python loop over experts: one launch per projection and direction):

``_grouped_matmul_fwd_kernel``  program (t, j): M tile t of the concatenated per-expert tile list,
    N tile j. Tiles never straddle two experts: expert e has ⌈count_e / BLOCK_M⌉ tiles; the tile
    map (expert, first row) is built on the device by :func:`_tile_map` with a few torch ops and
    no host sync, over an upper bound of min(S, ⌊(S + (BLOCK_M−1)·min(E, S)) / BLOCK_M⌋) tile
    slots, and of min(E, S)·⌈R / BLOCK_M⌉ when the caller bounds every expert's rows by R
    (``max_rows_per_expert``: the token count under top-k routing; slots past the last tile do
    nothing). Small M launches one program row per expert at
    most, each running slots t, t + P, ... (``SLOT_LOOP``; :func:`_programs`), so a balanced routing
    launches no program without a tile.
    The K loop is the dense forward's (:func:`qlk.kernels.fused_matmul._fwd_loop`: weight as the
    MMA A operand, fp32 accumulation) on weight rows e·N + n; with small-M tiles (``DECODE``) it is
    the dense decode kernel's (:func:`_decode_loop`: INT codes decoded straight into the activation
    dtype by :func:`qlk.kernels.decode_tile._decode_int_tile`, packed half2 inline asm on the GPU,
    its Triton twin under the interpreter; padding rows masked; the same function as the dense
    split-K kernel's, :func:`qlk.kernels.fused_matmul._decode_loop`). ``POOL`` also writes QA-LoRA's P(X)
    from the X tiles of the first N tile (the fused QA-LoRA path, biases folded per expert).
``_grouped_matmul_splitk_kernel``  small-M forward with K split: program (t, j, s) adds the partial
    product of K slice s (:func:`_decode_loop`) into an fp32 workspace (atomics), then the launcher adds each row's
    expert bias and casts; with ``fused_matmul.SPLITK_FINISH`` (``FINISH``, round 38) each output tile's
    last slice does both in the kernel, as the dense decode's. Used when the active experts' tiles fill less than two waves of the
    GPU (:func:`qlk.kernels.config.grouped_split_k`: decode of the few experts a token picks, e.g.
    Mixtral's down projection at one token: 128 CTAs on 132 SMs -> 3 slices).
``_grouped_matmul_grad_input_kernel``  program (t, j, s): dXᵀ tile [BLOCK_K, BLOCK_M] of M tile t,
    K tile j, reduction over the expert's N rows (slice s of them with ``SPLIT_N``: fp32 partials
    added into a workspace by atomics, cast by the launcher); Ŵᵀ comes from the dense gradient's
    :func:`qlk.kernels.quant_tile_t._dequant_tile_t` (rounded to dY's dtype on the packed shape),
    its packed words loaded one N tile ahead into registers as the dense GEMM gradient does
    (``WORDS_AHEAD``). Program rows and slices: :func:`qlk.kernels.heuristics.grouped_programs`
    (small M: the reduction is split where the experts' dX tiles fill the SMs' resident CTA slots
    short of whole waves, e.g. Mixtral's gate_up at 16 tokens on sm_80: 5 slices).

NF4 with double quantization: the large-M launches de-nest absmax once per call
(``weight_args(qw, denest_absmax=True)``, the dense GEMM's rule); decode tiles de-nest in the loop.

The tail rows (>= offsets[E]) get no tile: each program row stores zeros in a strided share of
them after its tiles (:func:`_zero_tail_rows`; the split launches' zeroed workspaces hold them
already, and FINISH's programs store them before their K slice), so no output is memset first and no tile slot is spent on them. Tiles are chosen per call from S and E (:func:`qlk.kernels.config.grouped_config`):
256-row tiles once the average expert fills one, 128-row below; small M (decode, or many experts
with a few rows each: S/E <= ``SMALL_M_ROWS``) uses 16-row tiles, so an expert with one token
reads its weight once and wastes at most 15 MMA rows, not 255; 32-row ones above 16 rows an expert,
and from there to 64 rows an expert the large-M kernels run 64-row tiles
(:data:`qlk.kernels.config.SMALL_TILE_ROWS`, :data:`qlk.kernels.config.MID_TILE_ROWS`).

Reference (:func:`grouped_matmul_reference`, :func:`grouped_grad_input_reference`): per expert,
the dequantized slice Ŵ_e (:func:`expert_weight`) and a torch matmul, fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from .._checks import check_grouped, check_row_token
from ..formats.nf4 import nf4_absmax
from ..formats.quantized_weight import QuantizedWeight
from . import fused_matmul as _fm
from . import heuristics
from .config import (INTERPRETED, MID_TILE_ROWS, cdiv, even_k_kernel, fma_kernel, grouped_config, grouped_split_k,
                     heuristics_reading, num_sms, packed_rows_kernel, target_arch)
from .fused_matmul import (GRAD_K_HEURISTICS, _as_2d, _decode_loop, _decode_loop_runs, _finish_split_tile, _fwd_loop,
                           _grad_half2, _grad_k_tile, _loop_runs, _precision, _w_as_b_acc, _whole_k_end)
from .quant_tile import _dequant_tile, aligned_rows, supports, weight_args
from .quant_tile_t import _dequant_tile_t, _int3_planes_t, _words_t

#: average routed rows per expert (S / E) at or below which the small-M tiles (16 or 32 rows) are used
SMALL_M_ROWS = 32


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _zero_tail_rows(out_ptr, bounds_ptr, NUM_EXPERTS, pid_t, programs, offs_c, mask_c, stride_r, stride_c,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Zeros in columns ``offs_c`` of the rows past offsets[E] (expert-parallel sentinels, routed to no
    expert; they have no tile in the map): program row ``pid_t`` of ``programs`` stores row blocks
    pid_t, pid_t + programs, ... of them (no block at all without sentinels)."""
    lo = tl.load(bounds_ptr + NUM_EXPERTS).to(tl.int32)
    hi = tl.load(bounds_ptr + NUM_EXPERTS + 1).to(tl.int32)
    zeros = tl.zeros((BLOCK_M, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for r0 in range(lo + pid_t * BLOCK_M, hi, programs * BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_r + offs_c[None, :] * stride_c
        tl.store(ptrs, zeros, mask=(offs_m[:, None] < hi) & mask_c[None, :])


@triton.jit
def _x_rows(x_ptr, token_ptr, rows, valid, stride_xm, GATHER: tl.constexpr):
    """Pointers to the X rows that sorted rows ``rows`` read: row s itself, or with GATHER row
    token[s] of the un-gathered X [T, K] (the routed token of sorted row s: the experts' decode reads
    the hidden states in place, round 40, instead of a gathered copy). Rows not ``valid`` (a decode
    tile's padding, which may lie past S) read token 0; their X loads are masked."""
    if GATHER:
        rows = tl.load(token_ptr + rows, mask=valid, other=0)
    return x_ptr + rows.to(tl.int64) * stride_xm


@triton.jit
def _fwd_tile(t, pid_n, y_ptr, x_ptr, token_ptr, bias_ptr, p_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
              qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
              N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ym, stride_yn, stride_be, stride_pm,
              BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
              HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, POOL: tl.constexpr, DECODE: tl.constexpr,
              PACKED_DEQUANT: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LANE_ORDER: tl.constexpr,
              GATHER: tl.constexpr, GATE_UP: tl.constexpr):
    """Tile slot t, N tile pid_n of :func:`_grouped_matmul_fwd_kernel` (nothing for a slot past the last tile)."""
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        if GATE_UP:
            offs_n = _gate_up_cols(pid_n, N // 2, BLOCK_N)
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # the expert's weight rows; rows past N are clamped (computed, never stored)
        rows_w = e * N + tl.minimum(offs_n, N - 1)
        if DECODE:
            x_rows = _x_rows(x_ptr, token_ptr, offs_m, offs_m < row_end, stride_xm, GATHER)
            if POOL and pid_n == 0:
                acc = _decode_loop(x_rows, offs_m < row_end, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr,
                                   am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg, rows_w,
                                   offs_m, row_end, 0, K, K, stride_xk, stride_pm, True,
                                   BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, True, PACKED_DEQUANT,
                                   EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, True)
            else:
                acc = _decode_loop(x_rows, offs_m < row_end, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr,
                                   am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg, rows_w,
                                   offs_m, row_end, 0, K, K, stride_xk, stride_pm, False,
                                   BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, False, PACKED_DEQUANT,
                                   EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, True)
        elif POOL and pid_n == 0:
            x_rows = _x_rows(x_ptr, token_ptr, tl.minimum(offs_m, row_end - 1), offs_m >= 0, stride_xm, GATHER)
            acc = _fwd_loop(x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                            stride_qn, stride_sn, stride_sg, rows_w, offs_m, row_end, 0, K, K, stride_xk, stride_pm,
                            BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, True, EVEN_K,
                            BLOCK_N, BLOCK_M, BLOCK_K, PACKED_DEQUANT, False, True)
        else:
            x_rows = _x_rows(x_ptr, token_ptr, tl.minimum(offs_m, row_end - 1), offs_m >= 0, stride_xm, GATHER)
            acc = _fwd_loop(x_rows, p_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                            stride_qn, stride_sn, stride_sg, rows_w, offs_m, row_end, 0, K, K, stride_xk, stride_pm,
                            BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, False, EVEN_K,
                            BLOCK_N, BLOCK_M, BLOCK_K, PACKED_DEQUANT, LANE_ORDER, True)
        acc = tl.trans(acc)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e.to(tl.int64) * stride_be + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if GATE_UP:
            HALF: tl.constexpr = BLOCK_N // 2
            gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            out = _silu_times(gate.to(y_ptr.dtype.element_ty), up.to(y_ptr.dtype.element_ty))
            offs_o = pid_n * HALF + tl.arange(0, HALF)
            y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_o[None, :] * stride_yn
            tl.store(y_ptrs, out, mask=(offs_m[:, None] < row_end) & (offs_o[None, :] < N // 2))
        else:
            # the [BLOCK_M, BLOCK_N] pointers are built after the K loop, not kept live through it
            y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
            y_mask = (offs_m[:, None] < row_end) & (offs_n[None, :] < N)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _gate_up_cols(pid_n, HALF_N, BLOCK_N: tl.constexpr):
    """GATE_UP's weight columns of N tile pid_n: output columns c = pid_n·BLOCK_N/2 + j (j <
    BLOCK_N/2) as the gate's rows c, then the up half's rows HALF_N + c, so that one tile holds both
    operands of each output column. Columns c >= HALF_N of a ragged last tile are computed, never
    stored (their up rows past N are clamped with the plain tile's rows)."""
    HALF: tl.constexpr = BLOCK_N // 2
    j = tl.arange(0, BLOCK_N)
    return pid_n * HALF + j % HALF + (j // HALF) * HALF_N


@triton.jit
def _silu_times(gate, up):
    """silu(gate)·up elementwise, rounded as the experts module's own ``act_fn(gate) * up`` rounds it
    from the rounded gate-up output (transformers' default gate with SiLU): silu in fp32, rounded to
    the dtype, then the product in fp32, rounded."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@even_k_kernel
@packed_rows_kernel
@fma_kernel
@triton.jit
def _grouped_matmul_fwd_kernel(
    y_ptr,  # [S, N] output, activation dtype
    x_ptr,  # [S, K] routed rows sorted by expert (any strides); GATHER: [T, K], the tokens un-gathered
    token_ptr,  # GATHER: int32/int64 [S], sorted row s's row of X; else dummy
    bias_ptr,  # [E, N] per-expert bias or dummy
    p_ptr,  # POOL: [S, K/GROUP_SIZE] fp32 group means of x, else dummy
    tile_expert_ptr, tile_row_ptr, bounds_ptr,  # tile map (_tile_map), bounds [E+2] = offsets[:E+1] ++ [S]
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # stacked weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    N, K, NUM_EXPERTS, NUM_SLOTS,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_be, stride_pm,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, POOL: tl.constexpr, DECODE: tl.constexpr,
    PACKED_DEQUANT: tl.constexpr, SLOT_LOOP: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    QN_ALIGN: tl.constexpr = 1, LANE_ORDER: tl.constexpr = False, LOOP_RUNS: tl.constexpr = False,
    GATHER: tl.constexpr = False, GATE_UP: tl.constexpr = False,
):
    """Y[s, n] = Σ_k X[s, k]·Ŵ[e·N + n, k] (+ bias[e, n]) for the rows s of M tile t (all of expert e);
    with GATHER X[token[s], k] (:func:`_x_rows`). GATE_UP (round 40, the experts' gate-up
    projection, N = 2I): Y [S, I], Y[s, c] = silu(Z[s, c])·Z[s, I + c] of Z = that product, each N
    tile computing the gate rows c and the up rows I + c of its BLOCK_N/2 output columns
    (:func:`_gate_up_cols`, :func:`_silu_times`): the gate-up output is never stored.

    DECODE (small M): the K loop of :func:`_decode_loop` (packed half2 INT decoding, masked
    padding rows); else the dense GEMM's :func:`qlk.kernels.fused_matmul._fwd_loop`, LANE_ORDER as
    there (:func:`qlk.kernels.heuristics.fwd_lane_order`, the dense GEMM's rule: INT2/INT4 whole K
    tiles in the lane-owned k order, X read in the same order; never with the pooling).
    SLOT_LOOP: program row t runs tile slots t, t + P, ... < NUM_SLOTS (P = grid rows; :func:`_programs`).
    LOOP_RUNS: K holds a whole K tile, told to the compiler (the dense kernels' LOOP_RUNS)."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    if LOOP_RUNS:
        tl.assume(_whole_k_end(K, K, EVEN_K, BLOCK_K) > 0)
    # first: its registers are dead before the K loop
    if GATE_UP:  # Y is [S, N/2]
        offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        _zero_tail_rows(y_ptr, bounds_ptr, NUM_EXPERTS, pid_t, tl.num_programs(0), offs_o, offs_o < N // 2,
                        stride_ym, stride_yn, BLOCK_M, BLOCK_N // 2)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _zero_tail_rows(y_ptr, bounds_ptr, NUM_EXPERTS, pid_t, tl.num_programs(0), offs_n, offs_n < N, stride_ym,
                        stride_yn, BLOCK_M, BLOCK_N)
    if SLOT_LOOP:
        for t in range(pid_t, NUM_SLOTS, tl.num_programs(0)):
            _fwd_tile(t, pid_n, y_ptr, x_ptr, token_ptr, bias_ptr, p_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
                      qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                      stride_qn, stride_sn, stride_sg,
                      N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ym, stride_yn, stride_be, stride_pm,
                      BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, HAS_BIAS, DOT_PRECISION, POOL, DECODE, PACKED_DEQUANT,
                      EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, LANE_ORDER, GATHER, GATE_UP)
    else:
        _fwd_tile(pid_t, pid_n, y_ptr, x_ptr, token_ptr, bias_ptr, p_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
                  qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
                  N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ym, stride_yn, stride_be, stride_pm,
                  BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, HAS_BIAS, DOT_PRECISION, POOL, DECODE, PACKED_DEQUANT,
                  EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, LANE_ORDER, GATHER, GATE_UP)


@triton.jit
def _splitk_tile(t, pid_n, pid_s, ws_ptr, x_ptr, token_ptr, y_ptr, bias_ptr, count_ptr, tile_expert_ptr,
                 tile_row_ptr, bounds_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                 stride_qn, stride_sn, stride_sg,
                 N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ym, stride_yn, stride_be,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, PACKED_DEQUANT: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 FINISH: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr):
    """Tile slot t, N tile pid_n, K slice pid_s of :func:`_grouped_matmul_splitk_kernel`."""
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(2))
        k_start = pid_s * tiles * BLOCK_K
        k_end = tl.minimum(K, k_start + tiles * BLOCK_K)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_w = e * N + tl.minimum(offs_n, N - 1)
        # a decode tile is mostly padding: padding rows are masked to 0, not clamped (no x row is
        # read BLOCK_M times over)
        x_rows = _x_rows(x_ptr, token_ptr, offs_m, mask_m, stride_xm, GATHER)
        acc = _decode_loop(x_rows, mask_m, ws_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr,
                           dyn_ptr, stride_qn, stride_sn, stride_sg, rows_w, offs_m, row_end, k_start, k_end, K,
                           stride_xk, 0, False, BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, False,
                           PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K)
        mask = (offs_n[:, None] < N) & mask_m[None, :]
        ws_ptrs = ws_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        if FINISH:  # the dense decode's finish; the bias is expert e's, the count the slot's
            _finish_split_tile(ws_ptrs, y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn,
                               bias_ptr + e.to(tl.int64) * stride_be + offs_n, offs_n < N, mask,
                               count_ptr + t * tl.num_programs(1) + pid_n, tl.num_programs(2), HAS_BIAS)


@even_k_kernel
@packed_rows_kernel
@fma_kernel
@triton.jit
def _grouped_matmul_splitk_kernel(
    ws_ptr,  # [S, N] fp32 partial sums, zero-initialized (atomic adds; FINISH: left at zero)
    x_ptr,  # [S, K] routed rows sorted by expert (any strides); GATHER: [T, K], the tokens un-gathered
    token_ptr,  # GATHER: int32/int64 [S], sorted row s's row of X; else dummy
    y_ptr,  # FINISH: Y [S, N] (stride_ym, stride_yn); else dummy
    bias_ptr,  # FINISH and HAS_BIAS: [E, N] per-expert bias (stride_be); else dummy
    count_ptr,  # FINISH: int32 [NUM_SLOTS · N tiles], slices added into each output tile so far (zero between launches)
    tile_expert_ptr, tile_row_ptr, bounds_ptr,  # tile map (_tile_map)
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # stacked weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    N, K, NUM_EXPERTS, NUM_SLOTS,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_be,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PACKED_DEQUANT: tl.constexpr, SLOT_LOOP: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    QN_ALIGN: tl.constexpr = 1, LOOP_RUNS: tl.constexpr = False,
    FINISH: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, GATHER: tl.constexpr = False,
):
    """Small-M split-K: program (t, j, s) adds Σ_{k in slice s} X[m, k]·Ŵ[e·N + n, k] for the rows m
    of M tile t (expert e), N tile j, into ws. A slice is ⌈⌈K/BLOCK_K⌉ / SPLIT⌉ whole K tiles
    (SPLIT = grid axis 2). Sentinel rows (past offsets[E]) have no tile: ws's zeros. LOOP_RUNS: every
    slice holds a whole K tile (the dense kernels' LOOP_RUNS). GATHER: X[token[m], k] (:func:`_x_rows`).

    FINISH (round 38; :data:`qlk.kernels.fused_matmul.SPLITK_FINISH`): the dense decode's finish
    (:func:`qlk.kernels.fused_matmul._finish_split_tile`) per (tile slot, N tile): its last slice
    stores Y = Σ_s partial_s (+ bias[e]) in Y's dtype and leaves the workspace and count at zero, and
    the programs store the sentinel rows' zeros (:func:`_zero_tail_rows`, shared over the grid's
    rows and slices): one launch, no workspace zeroed before it, no bias pass or cast after it."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if FINISH:  # first: its registers are dead before the K loop
        offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _zero_tail_rows(y_ptr, bounds_ptr, NUM_EXPERTS, pid_t * tl.num_programs(2) + pid_s,
                        tl.num_programs(0) * tl.num_programs(2), offs_c, offs_c < N, stride_ym, stride_yn,
                        BLOCK_M, BLOCK_N)
    if LOOP_RUNS:  # _splitk_tile's slice of K
        slice_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(2))
        k_start = pid_s * slice_tiles * BLOCK_K
        tl.assume(_whole_k_end(tl.minimum(K, k_start + slice_tiles * BLOCK_K), K, EVEN_K, BLOCK_K) > k_start)
    if SLOT_LOOP:
        for t in range(pid_t, NUM_SLOTS, tl.num_programs(0)):
            _splitk_tile(t, pid_n, pid_s, ws_ptr, x_ptr, token_ptr, y_ptr, bias_ptr, count_ptr, tile_expert_ptr,
                         tile_row_ptr, bounds_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                         stride_qn, stride_sn, stride_sg,
                         N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ym, stride_yn, stride_be,
                         BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION,
                         PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, FINISH, HAS_BIAS, GATHER)
    else:
        _splitk_tile(pid_t, pid_n, pid_s, ws_ptr, x_ptr, token_ptr, y_ptr, bias_ptr, count_ptr, tile_expert_ptr,
                     tile_row_ptr, bounds_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                     stride_qn, stride_sn, stride_sg,
                     N, K, NUM_EXPERTS, stride_xm, stride_xk, stride_ym, stride_yn, stride_be,
                     BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION,
                     PACKED_DEQUANT, EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, FINISH, HAS_BIAS, GATHER)


@triton.jit
def _grad_tile(t, pid_k, pid_s, dx_ptr, dy_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
               qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
               N, K, NUM_EXPERTS, stride_dym, stride_dyn, stride_dxm, stride_dxk,
               BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, SPLIT_N: tl.constexpr, INT2_HALVES: tl.constexpr,
               WORDS_AHEAD: tl.constexpr, WORDS_ASM: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               HALF2: tl.constexpr, HALF2_ASM: tl.constexpr, SHIFT_K: tl.constexpr, W_AS_B: tl.constexpr,
               W_AS_A: tl.constexpr = False):
    """Tile slot t, K tile pid_k (N slice pid_s with SPLIT_N) of :func:`_grouped_matmul_grad_input_kernel`:
    the dense gradient's B-operand tile where W_AS_B applies (its conditions: fp16/bf16 dY, whole K
    tiles, BLOCK_M ≥ 64; INT2/INT4 with groups of whole words, INT3 of whole 32-column chunks (g32 on 64-row N steps only, the dense kernel's note), NF4
    with a plain or de-nested absmax),
    else the Ŵᵀ tile (:func:`_grad_tile_t`). W_AS_A: the B-operand tile as the transposed product
    (:data:`qlk.kernels.fused_matmul.GRAD_W_AS_A`, round 36)."""
    ACT16: tl.constexpr = dy_ptr.dtype.element_ty == tl.float16 or dy_ptr.dtype.element_ty == tl.bfloat16
    ROWS: tl.constexpr = W_AS_B and ACT16 and EVEN_K and BLOCK_M >= 64 and (GROUP_SIZE & (GROUP_SIZE - 1)) == 0 and \
        (((BITS == 2 or BITS == 4) and not IS_NF4 and GROUP_SIZE % (32 // BITS) == 0) or
         (BITS == 3 and not IS_NF4 and GROUP_SIZE % 32 == 0 and (GROUP_SIZE > 32 or BLOCK_N <= 64)) or
         (IS_NF4 and not DOUBLE_QUANT))
    if ROWS:
        e = tl.load(tile_expert_ptr + t)
        if e >= 0:
            row0 = tl.load(tile_row_ptr + t)
            row_end = tl.load(bounds_ptr + e + 1).to(tl.int32)
            k0, _, _ = _grad_k_tile(pid_k, K, BLOCK_K, SHIFT_K)
            offs_m = row0 + tl.arange(0, BLOCK_M)
            n_lo, n_hi = _n_slice(pid_s, N, SPLIT_N, BLOCK_N)
            dy_rows = dy_ptr + tl.minimum(offs_m, row_end - 1).to(tl.int64) * stride_dym
            acc = _w_as_b_acc(dy_rows, qw_ptr, s_ptr, b_ptr, lut_ptr, stride_qn, stride_sn, stride_sg, e * N, k0, n_lo,
                              n_hi, N, K, stride_dyn, BITS, GROUP_SIZE, IS_NF4, DOT_PRECISION, HALF2_ASM, BLOCK_N,
                              BLOCK_M, BLOCK_K, WORDS_AHEAD, W_AS_A=W_AS_A)
            cols = k0 + tl.arange(0, BLOCK_K)
            dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + cols[None, :] * stride_dxk
            dx_mask = (offs_m[:, None] < row_end) & ((cols >= pid_k * BLOCK_K) & (cols < K))[None, :]
            if SPLIT_N:  # fp32 partial sums of the slices
                tl.atomic_add(dx_ptrs, acc, mask=dx_mask, sem="relaxed")
            else:
                tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)
    else:
        _grad_tile_t(t, pid_k, pid_s, dx_ptr, dy_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
                     qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn,
                     stride_sg, N, K, NUM_EXPERTS, stride_dym, stride_dyn, stride_dxm, stride_dxk,
                     BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, SPLIT_N, INT2_HALVES, WORDS_AHEAD,
                     WORDS_ASM, EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, HALF2, HALF2_ASM, SHIFT_K)


@triton.jit
def _n_slice(pid_s, N, SPLIT_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_lo, n_hi): with SPLIT_N, slice pid_s's ⌈⌈N/BLOCK_N⌉ / SPLIT⌉ whole N tiles (SPLIT = grid axis 2),
    else 0 .. N."""
    if SPLIT_N:
        slice_tiles = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(2))
        n_lo = pid_s * slice_tiles * BLOCK_N
        n_hi = tl.minimum(N, n_lo + slice_tiles * BLOCK_N)
    else:
        n_lo = 0
        n_hi = N
    return n_lo, n_hi


@triton.jit
def _grad_tile_t(t, pid_k, pid_s, dx_ptr, dy_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
                 qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
                 N, K, NUM_EXPERTS, stride_dym, stride_dyn, stride_dxm, stride_dxk,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SPLIT_N: tl.constexpr, INT2_HALVES: tl.constexpr,
                 WORDS_AHEAD: tl.constexpr, WORDS_ASM: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 HALF2: tl.constexpr, HALF2_ASM: tl.constexpr, SHIFT_K: tl.constexpr):
    """:func:`_grad_tile` with Ŵᵀ as the MMA's A operand (quant_tile_t's transposed tile)."""
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        k0, offs_k, keep_k = _grad_k_tile(pid_k, K, BLOCK_K, SHIFT_K)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        n_lo, n_hi = _n_slice(pid_s, N, SPLIT_N, BLOCK_N)  # this program's N tiles
        INT3: tl.constexpr = BITS == 3 and not IS_NF4
        dy_rows = dy_ptr + tl.minimum(offs_m, row_end - 1).to(tl.int64) * stride_dym
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        words, words1, words2 = 0, 0, 0  # WORDS_AHEAD: this N tile's packed words (INT3: its bit planes)
        if WORDS_AHEAD:
            rows_first = e * N + tl.minimum(n_lo + tl.arange(0, BLOCK_N), N - 1)
            if INT3:
                words, words1, words2 = _int3_planes_t(qw_ptr, stride_qn, rows_first, k0, K, EVEN_K, BLOCK_K,
                                                       True, WORDS_ASM)
            else:
                words = _words_t(qw_ptr, stride_qn, rows_first, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_K, True,
                                 WORDS_ASM)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            next0, next1, next2 = words, words1, words2
            if WORDS_AHEAD:
                # the next N tile's words, as the dense GEMM gradient loads them (past the expert's
                # last tile: its last row again, never used)
                rows_next = e * N + tl.minimum(offs_n + BLOCK_N, N - 1)
                if INT3:
                    next0, next1, next2 = _int3_planes_t(qw_ptr, stride_qn, rows_next, k0, K, EVEN_K, BLOCK_K,
                                                         True, WORDS_ASM)
                else:
                    next0 = _words_t(qw_ptr, stride_qn, rows_next, k0, K, BITS, IS_NF4, EVEN_K, BLOCK_K, True,
                                     WORDS_ASM)
            # clamped weight rows are finite and meet dY columns masked to 0: they add exactly 0
            # Ŵᵀ rounded to dY's dtype on the packed shape (the dense gradient's tile): the layout
            # change to the MMA operand moves 16-bit values, not int32 codes
            wt = _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                                 stride_qn, stride_sn, stride_sg, e * N + tl.minimum(offs_n, N - 1), k0, K,
                                 BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K,
                                 dy_ptr.dtype.element_ty, INT2_HALVES, words, words1, words2, WORDS_AHEAD,
                                 WORDS_ASM, HALF2, HALF2_ASM)
            words, words1, words2 = next0, next1, next2
            dyt = tl.load(dy_rows[None, :] + offs_n[:, None] * stride_dyn, mask=offs_n[:, None] < N, other=0.0)
            acc = tl.dot(wt, dyt, acc, input_precision=DOT_PRECISION)
        # the [BLOCK_K, BLOCK_M] pointers are built after the N loop, not kept live through it
        dx_ptrs = dx_ptr + offs_m[None, :].to(tl.int64) * stride_dxm + offs_k[:, None] * stride_dxk
        dx_mask = (offs_m[None, :] < row_end) & keep_k[:, None]
        if SPLIT_N:  # fp32 partial sums of the slices, added in the accumulator's layout
            tl.atomic_add(dx_ptrs, acc, mask=dx_mask, sem="relaxed")
        else:
            tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@heuristics_reading(("K", "BLOCK_K", "GROUP_SIZE"), GRAD_K_HEURISTICS)
@packed_rows_kernel
@fma_kernel
@triton.jit
def _grouped_matmul_grad_input_kernel(
    dx_ptr,  # [S, K] output, activation dtype (SPLIT_N: fp32 workspace, zeroed, atomic adds)
    dy_ptr,  # [S, N] upstream gradient, rows sorted by expert (any strides)
    tile_expert_ptr, tile_row_ptr, bounds_ptr,
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # stacked weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    N, K, NUM_EXPERTS, NUM_SLOTS,
    stride_dym, stride_dyn, stride_dxm, stride_dxk,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SLOT_LOOP: tl.constexpr, SPLIT_N: tl.constexpr, INT2_HALVES: tl.constexpr,
    WORDS_AHEAD: tl.constexpr, WORDS_ASM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HALF2: tl.constexpr = False, HALF2_ASM: tl.constexpr = False, SHIFT_K: tl.constexpr = False,
    QN_ALIGN: tl.constexpr = 1, W_AS_B: tl.constexpr = False, W_AS_A: tl.constexpr = False,
):
    """dX[s, k] = Σ_n dY[s, n]·Ŵ[e·N + n, k]: tile dXᵀ[k0:k0+BK, rows of M tile t] = Ŵ_eᵀ·dYᵀ, or with
    W_AS_B (sm_90, round 18: :func:`_grad_tile`) dX[rows, k0:k0+BK] = dY·Ŵ_e with Ŵ_e as the B operand.
    A ragged last K tile is moved back to end at K (SHIFT_K, :func:`qlk.kernels.fused_matmul.shift_last_k`).

    SPLIT_N (small M, round 7): program (t, j, s) sums n in slice s of the expert's N tiles and adds
    its fp32 partial into the workspace ``dx_ptr`` (atomics; the launcher casts it to dX).
    WORDS_AHEAD (round 7, the dense GEMM gradient's loop): the next N tile's packed words are loaded
    into registers during this one (WORDS_ASM: by inline PTX, never under the interpreter);
    INT2_HALVES: INT2 unpacked per half word (sm_80, as the dense GEMM gradient).
    HALF2 (INT formats, fp16/bf16 dY): Ŵᵀ decoded in half2 arithmetic (quant_tile_t._pair_half2;
    HALF2_ASM: its inline PTX, else the interpreter's twin), s and c rounded to dY's dtype first."""
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    if not SPLIT_N:  # first (its registers are dead before the N loop); split: the zeroed workspace holds them
        _, offs_k, keep_k = _grad_k_tile(pid_k, K, BLOCK_K, SHIFT_K)
        _zero_tail_rows(dx_ptr, bounds_ptr, NUM_EXPERTS, pid_t, tl.num_programs(0), offs_k, keep_k, stride_dxm,
                        stride_dxk, BLOCK_M, BLOCK_K)
    if SLOT_LOOP:
        for t in range(pid_t, NUM_SLOTS, tl.num_programs(0)):
            _grad_tile(t, pid_k, pid_s, dx_ptr, dy_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
                       qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                       stride_qn, stride_sn, stride_sg,
                       N, K, NUM_EXPERTS, stride_dym, stride_dyn, stride_dxm, stride_dxk,
                       BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, SPLIT_N, INT2_HALVES, WORDS_AHEAD,
                       WORDS_ASM, EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, HALF2, HALF2_ASM, SHIFT_K, W_AS_B, W_AS_A)
    else:
        _grad_tile(pid_t, pid_k, pid_s, dx_ptr, dy_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr,
                   qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr, stride_qn, stride_sn, stride_sg,
                   N, K, NUM_EXPERTS, stride_dym, stride_dyn, stride_dxm, stride_dxk,
                   BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, DOT_PRECISION, SPLIT_N, INT2_HALVES, WORDS_AHEAD,
                   WORDS_ASM, EVEN_K, BLOCK_N, BLOCK_M, BLOCK_K, HALF2, HALF2_ASM, SHIFT_K, W_AS_B, W_AS_A)


@triton.jit
def _tile_map_kernel(offsets_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr, ok_ptr, NUM_EXPERTS, ROWS, NUM_SLOTS,
                     MAX_ROWS, BLOCK_M: tl.constexpr, EXPERTS_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
                     CHECK: tl.constexpr):
    """:func:`_tile_map` in one program: expert e has tiles_e = ⌈(offsets[e+1] − offsets[e]) / BLOCK_M⌉,
    ends = cumsum(tiles); slot t belongs to expert g = #{e : ends[e] <= t} (searchsorted, right) when
    g < E, as its tile t − (ends[g] − tiles_g), first row offsets[g] + (t − ends[g] + tiles_g)·BLOCK_M;
    else −1. bounds = offsets ++ [ROWS] (int64). CHECK: ok = max_e count_e <= MAX_ROWS."""
    offs_e = tl.arange(0, EXPERTS_POW2)
    real = offs_e < NUM_EXPERTS
    lo = tl.load(offsets_ptr + offs_e, mask=real, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + offs_e + 1, mask=real, other=0).to(tl.int32)
    routed = tl.load(offsets_ptr + NUM_EXPERTS).to(tl.int64)
    _store_tile_map(lo, hi, offs_e, real, routed, tile_expert_ptr, tile_row_ptr, bounds_ptr, ok_ptr, NUM_EXPERTS,
                    ROWS, NUM_SLOTS, MAX_ROWS, BLOCK_M, BLOCK_T, CHECK)


@triton.jit
def _store_tile_map(lo, hi, offs_e, real, routed, tile_expert_ptr, tile_row_ptr, bounds_ptr, ok_ptr, NUM_EXPERTS,
                    ROWS, NUM_SLOTS, MAX_ROWS, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, CHECK: tl.constexpr):
    """:func:`_tile_map_kernel`'s map from expert e's rows lo[e] .. hi[e] (int32, ``real`` where e <
    E) and the routed rows' count ``routed`` = offsets[E]: in registers here, so that the routing
    kernel that computed the offsets writes the map in its own launch (round 40,
    :func:`qlk.kernels.routing.route_pairs`)."""
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    firsts = ends - tiles
    one = tl.arange(0, 1)
    tl.store(bounds_ptr + offs_e, lo.to(tl.int64), mask=real)
    tl.store(bounds_ptr + NUM_EXPERTS + one, tl.zeros([1], dtype=tl.int64) + routed)
    tl.store(bounds_ptr + NUM_EXPERTS + 1 + one, tl.zeros([1], dtype=tl.int64) + ROWS)
    if CHECK:
        busiest = tl.max(tl.where(real, hi - lo, 0), 0)
        tl.store(ok_ptr + one, tl.zeros([1], dtype=tl.int32) + (busiest <= MAX_ROWS).to(tl.int32))
    for t0 in range(0, NUM_SLOTS, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        group = tl.sum(((ends[None, :] <= t[:, None]) & real[None, :]).to(tl.int32), 1)
        pick = offs_e[None, :] == tl.minimum(group, NUM_EXPERTS - 1)[:, None]
        first = tl.sum(tl.where(pick, firsts[None, :], 0), 1)
        row0 = tl.sum(tl.where(pick, lo[None, :], 0), 1)
        tl.store(tile_expert_ptr + t, tl.where(group < NUM_EXPERTS, group, -1), mask=t < NUM_SLOTS)
        tl.store(tile_row_ptr + t, row0 + (t - first) * BLOCK_M, mask=t < NUM_SLOTS)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
#: round 39: the last tile map built, (weakref to its offsets, key, map): a MoE layer's two projections
#: (and the input gradients of a step) route the same offsets, and the second asks for the same map
_LAST_TILE_MAP: list = [None]


def _tile_map(offsets: torch.Tensor, rows: int, block_m: int, max_rows: int | None = None):
    """:func:`_build_tile_map`'s map, remembered from the last call: the same ``offsets`` object,
    unchanged since (its version counter: any in-place write, through any view, makes a new map), the
    same ``rows``, ``block_m`` and ``max_rows``, and on CUDA the same current stream get the same
    tensors back without a launch (the kernels only read them). Inference tensors keep no version
    counter: their map is built every call."""
    if offsets.is_inference():
        return _build_tile_map(offsets, rows, block_m, max_rows)
    stream = torch.cuda.current_stream(offsets.device).cuda_stream if offsets.is_cuda else None
    key = (offsets._version, rows, block_m, max_rows, stream)
    last = _LAST_TILE_MAP[0]
    if last is not None and last[0]() is offsets and last[1] == key:
        return last[2]
    built = _build_tile_map(offsets, rows, block_m, max_rows)
    _LAST_TILE_MAP[0] = (weakref.ref(offsets), key, built)
    return built


def remember_tile_map(offsets: torch.Tensor, rows: int, block_m: int, max_rows: int | None, built) -> None:
    """Make ``built`` (tile_expert, tile_row, bounds), written elsewhere (the routing launch, round 40),
    the map :func:`_tile_map` returns for these arguments while ``offsets`` stays unchanged."""
    if offsets.is_inference():
        return
    stream = torch.cuda.current_stream(offsets.device).cuda_stream if offsets.is_cuda else None
    _LAST_TILE_MAP[0] = (weakref.ref(offsets), (offsets._version, rows, block_m, max_rows, stream), built)


def tile_map_slots(num_experts: int, rows: int, block_m: int, max_rows: int | None = None) -> tuple[int, bool]:
    """(slots, check) of :func:`_build_tile_map`'s map: its tile-slot bound (host values, no sync) and
    whether ``max_rows`` shortens it (then every expert's rows are checked against it on the device)."""
    groups = min(num_experts, rows)
    upper = min(rows, (rows + (block_m - 1) * groups) // block_m)
    # checked only where it shortens the map (elsewhere a wrong bound changes nothing)
    check = max_rows is not None and groups * -(-max_rows // block_m) < upper
    if check:
        upper = groups * -(-max_rows // block_m)
    return max(1, upper), check


def tile_map_block_t(experts_pow2: int) -> int:
    """The slots a tile-map program assigns per step (its [slots, experts] comparison stays ~4096)."""
    return max(16, min(256, 4096 // experts_pow2))


def _build_tile_map(offsets: torch.Tensor, rows: int, block_m: int, max_rows: int | None = None):
    """(tile_expert int32 [T], tile_row int32 [T], bounds [E+2]) for an upper bound T of the tile count
    known on the host (S, E, BLOCK_M and, when the caller knows it, ``max_rows``).

    Group e < E holds rows bounds[e] .. bounds[e+1]; the rows past offsets[E] (bounds[E] .. S,
    expert-parallel sentinels) get no tile: the kernels store their zeros (:func:`_zero_tail_rows`).
    tile_expert is −1 for the slots past the last tile. Device ops only (no host sync).

    The bound: at most min(E, S) experts hold rows, and Σ_e ⌈c_e / BLOCK_M⌉ <= (S + (BLOCK_M−1)·min(E, S))
    / BLOCK_M, and <= S (a tile holds a row): at one token the grid is the tiles that exist. With
    ``max_rows`` (no expert holds more rows: the token count T under top-k routing, where a token
    picks an expert once) also <= min(E, S)·⌈max_rows / BLOCK_M⌉: at T <= BLOCK_M one slot per expert,
    so Mixtral at 16 tokens (S = 32 rows on 8 experts) launches the 8 tiles a balanced routing has,
    not 9. An expert with more rows than ``max_rows`` would lose rows silently, so that is checked
    on the device where the bound shortens the map (``torch._assert_async``: no host sync; on CUDA a
    device-side assert).

    Built by one launch of :func:`_tile_map_kernel` (round 38; for CPU tensors without the interpreter,
    by :func:`_tile_map_torch`, the same map in ~20 torch ops, each a launch of its own on a GPU: a
    decode step's grouped projection was 32 device launches, 26 of them the map and the bias pass)."""
    e = offsets.shape[0] - 1
    upper, check = tile_map_slots(e, rows, block_m, max_rows)
    if offsets.device.type == "cpu" and not INTERPRETED:  # (meta: bench/host_overhead.py's launch counts)
        return _tile_map_torch(offsets, rows, block_m, upper, max_rows if check else None)
    tile_expert = torch.empty(upper, dtype=torch.int32, device=offsets.device)
    tile_row = torch.empty(upper, dtype=torch.int32, device=offsets.device)
    bounds = torch.empty(e + 2, dtype=torch.int64, device=offsets.device)
    ok = torch.empty(1, dtype=torch.int32, device=offsets.device) if check else tile_row
    experts_pow2 = triton.next_power_of_2(max(e, 1))
    _tile_map_kernel[(1,)](offsets.contiguous(), tile_expert, tile_row, bounds, ok, e, rows, upper, max_rows if check else 0,
                           BLOCK_M=block_m, EXPERTS_POW2=experts_pow2,
                           BLOCK_T=tile_map_block_t(experts_pow2), CHECK=check, num_warps=4,
                           enable_fp_fusion=False)  # integers only: nothing to fuse
    if check:
        torch._assert_async(ok, _OVER_THE_ROW_BOUND.format(max_rows))
    return tile_expert, tile_row, bounds


_OVER_THE_ROW_BOUND = ("qlk grouped matmul: an expert holds more rows than max_rows_per_expert={}; "
                       "pass the true bound (the token count under top-k routing) or None")


def _tile_map_torch(offsets: torch.Tensor, rows: int, block_m: int, upper: int, max_rows: int | None):
    """:func:`_tile_map`'s map of ``upper`` slots in torch ops (CPU tensors without the interpreter);
    ``max_rows``: the bound to check, or None."""
    e = offsets.shape[0] - 1
    bounds = torch.cat([offsets.to(torch.int64), offsets.new_full((1,), rows, dtype=torch.int64)])
    counts = bounds[1:e + 1] - bounds[:e]  # [E], the sentinel tail left out
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    if max_rows is not None:
        torch._assert_async(counts.max() <= max_rows, _OVER_THE_ROW_BOUND.format(max_rows))
    t = torch.arange(upper, device=offsets.device)
    group = torch.searchsorted(ends, t, right=True)  # E past the last tile
    valid = group < e
    g = group.clamp(max=e - 1)
    first_tile = ends[g] - tiles[g]
    tile_row = bounds[g] + (t - first_tile) * block_m
    tile_expert = torch.where(valid, g, -1)
    return tile_expert.to(torch.int32), tile_row.to(torch.int32), bounds


def _programs(slots: int, num_experts: int, small: bool) -> int:
    """Program rows (grid axis 0) for a tile map of ``slots`` tile slots (host values, no sync).

    Small M: at most one per expert, each running slots t, t + P, ... (``SLOT_LOOP``). The slot
    bound counts one spare tile per expert whose rows might straddle a tile edge, so at a few rows
    per expert it exceeds the tiles a balanced routing has (Mixtral at 16 tokens: 9 slots, 8 tiles;
    the forward's row bound, the token count, makes it 8); a program per slot then launches CTAs
    that only exit. With P = E,
    a balanced routing gives every program one tile and the spare slots cost a load each; a skewed
    one runs at most ⌈slots / E⌉ tiles in a program. Large M: one program per slot (the slack is a
    few slots against hundreds of tiles). The rule is :func:`qlk.kernels.heuristics.grouped_programs`
    (which also sizes the input gradient's split over N)."""
    return heuristics.grouped_programs(slots, num_experts, small)[0]


def _output(shape, dtype, device) -> torch.Tensor:
    """The launchers' output buffer: every element is written by a kernel (the tests replace this
    function to poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _small(rows: int, num_experts: int) -> bool:
    return rows <= SMALL_M_ROWS * num_experts


def tiles_for(direction: str, rows: int, num_experts: int, qw: QuantizedWeight | None = None,
              folded: bool = False, device=None) -> dict:
    """:func:`grouped_config` for S = ``rows`` routed rows over ``num_experts`` (host values, no sync);
    ``folded``: QA-LoRA's fp32 folded biases (and pooling), which take registers. With ``device``,
    sm_80's folded forward at large M (above :data:`qlk.kernels.config.MID_TILE_ROWS` rows an
    expert) is chosen by the grid's SM balance (:func:`qlk.kernels.heuristics.grouped_folded_fwd_tile`)
    from the grid a balanced routing gives: min(S, E) experts of ⌈S / min(S, E) / 128⌉ tiles of 128
    rows, N = one expert's rows."""
    small = _small(rows, num_experts)
    cfg = grouped_config(direction, small, rows / max(num_experts, 1), folded, qw.bits if qw is not None else 16,
                         qw.group_size if qw is not None else None)
    # the 64-row tiles of 32 < S/E <= MID_TILE_ROWS keep their tile: the rule weighs 128-row ones
    if (folded and direction == "fwd" and not small and device is not None and qw is not None and rows > 0
            and cfg["BLOCK_M"] > MID_TILE_ROWS
            and not INTERPRETED and heuristics.arch_family(target_arch()) == 80):
        active = min(rows, num_experts)
        per_expert = -(-rows // active)
        cfg = heuristics.grouped_folded_fwd_tile(active * -(-per_expert // cfg["BLOCK_M"]),
                                                 qw.out_features // num_experts,
                                                 heuristics.format_class(qw.bits, qw.fmt == "nf4", qw.group_size),
                                                 num_sms(device))
    return cfg


def grouped_matmul_forward(x: torch.Tensor, qw: QuantizedWeight, offsets: torch.Tensor, num_experts: int,
                           bias: torch.Tensor | None = None, *, wargs=None, pool: bool = False,
                           config: dict | None = None, max_rows_per_expert: int | None = None,
                           row_token: torch.Tensor | None = None, gate_up: bool = False):
    """(Y [S, N], P(X) [S, G] fp32 or None) on the grouped kernel; see the module docstring.

    x [S, K] fp16/bf16/fp32 sorted by expert; qw stacked [E·N, K]; bias [E, N] or None.
    ``row_token``: int [S]: sorted row s is row ``row_token[s]`` of x, which is then the tokens
    un-gathered, [T, K] (the kernels read it in place: no gathered copy of X; round 40).
    ``gate_up``: this is a gate-up projection (N = 2I, the gate's rows first); Y is silu(G)·U
    [S, I] (:func:`gated_output`), formed in the kernel's epilogue (round 40; the split-K path
    forms it with torch ops after).
    ``wargs``: weight_args(qw) with replaced tensors (QA-LoRA's folded biases); ``pool``: also
    P(X). ``config``: tile sizes / warps / stages to use instead of :func:`grouped_config`'s.
    ``max_rows_per_expert``: a bound on any expert's row count known to the caller (the token count
    under top-k routing), which tightens the tile map (:func:`_tile_map`; checked on the device)."""
    n = check_grouped(qw, offsets, num_experts, "grouped_matmul_forward")
    k = qw.in_features
    x2 = _as_2d(x, k, "x")
    s = x2.shape[0]
    if gate_up and n % 2:
        raise ValueError(f"grouped_matmul_forward: gate_up needs an even number of rows per expert, got {n}")
    if row_token is not None:
        check_row_token(row_token, x2, "grouped_matmul_forward")
        s = row_token.shape[0]
    if bias is not None and (bias.shape != (num_experts, n) or bias.device != x.device):
        raise ValueError(f"bias must be [{num_experts}, {n}] on {x.device}; got {list(bias.shape)} on {bias.device}")
    out = _output((s, n // 2 if gate_up else n), x.dtype, x.device)
    g = qw.group_size
    pooled = torch.zeros((s, k // g), dtype=torch.float32, device=x.device) if pool else None
    if s == 0:
        return out, pooled
    cfg = dict(config or tiles_for("fwd", s, num_experts, qw, folded=wargs is not None or pool, device=x.device))
    small = _small(s, num_experts)
    # the decode K loop where it decodes into the activation dtype (INT, fp16/bf16); NF4 and fp32
    # keep the GEMM loop (clamped rows: no row predicates in the loop)
    decode = cfg.pop("DECODE", small and qw.fmt == "int" and x.dtype in (torch.float16, torch.bfloat16))
    split = cfg.pop("SPLIT_K", None)
    programs = cfg.pop("PROGRAMS", None)  # grid rows over the tile slots (tests force a slot loop)
    if split is None:  # the interpreter takes the split path only when a test asks for it
        split = grouped_split_k(s, num_experts, n, k, cfg, num_sms(x.device)) if small and not INTERPRETED else 1
    # NF4 double quant: absmax de-nested once per call for large M (the dense GEMM's rule), in the
    # K loop for small M, where a second launch and pass would cost more
    args, meta = wargs if wargs is not None else weight_args(qw, denest_absmax=not small)
    if split > 1:
        if gate_up:  # the gate needs the finished sums: after the split's reduction
            y, pooled = _forward_split_k(x2, qw, offsets, num_experts, bias, args, meta, cfg, split, pool,
                                         _output((s, n), x.dtype, x.device), programs, max_rows_per_expert, row_token)
            return out.copy_(gated_output(y)), pooled
        return _forward_split_k(x2, qw, offsets, num_experts, bias, args, meta, cfg, split, pool, out,
                                programs, max_rows_per_expert, row_token)
    fused = pool and g & (g - 1) == 0
    tile_expert, tile_row, bounds = _tile_map(offsets, s, cfg["BLOCK_M"], max_rows_per_expert)
    slots = tile_expert.shape[0]
    # pooling keeps a program per slot: its second copy of the K loop inside the slot loop would
    # make the slot loop the kernel's heaviest loop (and the registers of both copies live across it)
    programs = min(slots, programs or _programs(slots, num_experts, small and not fused))
    grid = (programs, cdiv(n // 2, cfg["BLOCK_N"] // 2) if gate_up else cdiv(n, cfg["BLOCK_N"]))
    _grouped_matmul_fwd_kernel[grid](
        out, x2, args[3] if row_token is None else row_token, bias if bias is not None else args[3],
        pooled if fused else args[3],
        tile_expert, tile_row, bounds, *args, n, k, num_experts, slots,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
        pooled.stride(0) if fused else 0,
        HAS_BIAS=bias is not None, DOT_PRECISION=_precision(x.dtype), POOL=fused, DECODE=decode,
        PACKED_DEQUANT=not INTERPRETED, SLOT_LOOP=programs < slots,
        LANE_ORDER=not decode and heuristics.fwd_lane_order(target_arch(), cfg["BLOCK_M"]),
        LOOP_RUNS=_loop_runs(k, cfg["BLOCK_K"], 1, whole=k % cfg["BLOCK_K"] != 0), GATHER=row_token is not None,
        GATE_UP=gate_up, **meta, **cfg)
    if pool and not fused:  # a group size that is not a power of two
        torch.mean(_gathered(x2, row_token).reshape(s, k // g, g), dim=-1, dtype=torch.float32, out=pooled)
    return out, pooled


def gated_output(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(G)·U of a gate-up output [G | U] (last dim 2I -> I), as transformers' default gate with
    SiLU forms it (``act_fn(gate) * up``, each op rounded to the dtype): what ``gate_up=True`` gives."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _gathered(x2: torch.Tensor, row_token: torch.Tensor | None) -> torch.Tensor:
    """The sorted rows X[row_token] (x2 itself without a gather index): for the torch-side pooling."""
    return x2 if row_token is None else x2.index_select(0, row_token)


def _split_k_loop_runs(meta: dict, cfg: dict, k: int, split: int) -> bool:
    """The grouped split-K's LOOP_RUNS: the dense decode's (:func:`_decode_loop_runs`), but not for a
    two-warp tile of INT groups of 128 or more. Since round 27's 32-bit row offsets INT4 g128's
    16x64x256 w2 spills 16 B on sm_90 with the assumption (96 registers; 127 and none without it),
    and a two-warp tile issues mma.sync, which ptxas does not serialize: the assumption buys it nothing."""
    if cfg.get("num_warps", 4) < 4 and not meta["IS_NF4"] and meta["GROUP_SIZE"] >= 128:
        return False
    return _decode_loop_runs(meta, k, cfg["BLOCK_K"], split)


def _forward_split_k(x2, qw, offsets, num_experts, bias, args, meta, cfg, split, pool, out, programs=None,
                     max_rows=None, row_token=None):
    """The small-M forward with K split over ``split`` programs per tile (fp32 atomic partial sums),
    then the bias of each row's expert and the cast into ``out``; P(X) by torch (pooling is per whole
    group). With :data:`qlk.kernels.fused_matmul.SPLITK_FINISH` the kernel finishes Y itself (FINISH),
    in the stream's kept workspace, which it leaves at zero. ``row_token``: as
    :func:`grouped_matmul_forward`'s (x2 is then [T, K])."""
    s, k = out.shape[0], qw.in_features
    n = qw.out_features // num_experts
    tile_expert, tile_row, bounds = _tile_map(offsets, s, cfg["BLOCK_M"], max_rows)
    slots = tile_expert.shape[0]
    programs = min(slots, programs or _programs(slots, num_experts, True))
    grid = (programs, cdiv(n, cfg["BLOCK_N"]), split)
    finish = _fm.SPLITK_FINISH
    dummy = args[3]
    if finish:
        ws, counts = _fm._finish_workspace(s * n, slots * grid[1], x2.device)
    else:
        ws, counts = torch.zeros((s, n), dtype=torch.float32, device=x2.device), dummy
    in_kernel_bias = finish and bias is not None
    _grouped_matmul_splitk_kernel[grid](
        ws, x2, dummy if row_token is None else row_token, out if finish else dummy,
        bias if in_kernel_bias else dummy, counts,
        tile_expert, tile_row, bounds, *args, n, k, num_experts, slots, x2.stride(0), x2.stride(1),
        out.stride(0), out.stride(1), bias.stride(0) if in_kernel_bias else 0,
        DOT_PRECISION=_precision(x2.dtype), PACKED_DEQUANT=not INTERPRETED, SLOT_LOOP=programs < slots,
        LOOP_RUNS=_split_k_loop_runs(meta, cfg, k, split), FINISH=finish, HAS_BIAS=in_kernel_bias,
        GATHER=row_token is not None, **meta, **cfg)
    if not finish:
        if bias is not None:  # row s belongs to expert searchsorted(offsets[1:], s); sentinel rows (= E) add 0
            expert = torch.searchsorted(offsets[1:].to(torch.int64), torch.arange(s, device=x2.device), right=True)
            padded = torch.cat([bias.to(torch.float32), bias.new_zeros((1, n), dtype=torch.float32)])
            ws += padded[expert]
        out.copy_(ws)
    pooled = None
    if pool:
        g = qw.group_size
        pooled = torch.mean(_gathered(x2, row_token).reshape(s, k // g, g), dim=-1, dtype=torch.float32)
    return out, pooled


def _grad_int2_halves(block_m: int) -> bool:
    """INT2 unpacked per half word in the input gradient's transposed tile (quant_tile_t's
    INT2_HALVES) on sm_80 with tiles of more than 16 rows, as the dense-layer GEMM does
    (docs/kernels.md "Input gradient, round 3"): estimated 0.90 -> 0.99 tensor-peak at T = 4096 on
    Mixtral's layers; the 16-row small-M tile estimates 4 % better with whole words (round 7)."""
    return heuristics.arch_family(target_arch()) == 80 and block_m > 16


def grouped_matmul_grad_input(dy: torch.Tensor, qw: QuantizedWeight, offsets: torch.Tensor, num_experts: int,
                              *, wargs=None, config: dict | None = None) -> torch.Tensor:
    """dX [S, K] = dY·Ŵ_e per row's expert, in dy's dtype; rows past offsets[E] are 0.

    No row bound here (the forward's ``max_rows_per_expert``): small M runs a slot loop of one
    program row per expert, where a spare slot costs a load, not a CTA; the bound would only turn
    it into a program per slot, whose loop the analyzer estimates lower on sm_90 (Mixtral at 16
    tokens, INT3 0.84 -> 0.79, NF4 0.96 -> 0.92 of DRAM peak; docs/moe.md "Round 12")."""
    n = check_grouped(qw, offsets, num_experts, "grouped_matmul_grad_input")
    k = qw.in_features
    dy2 = _as_2d(dy, n, "dy")
    s = dy2.shape[0]
    out = _output((s, k), dy.dtype, dy.device)
    if s == 0:
        return out
    cfg = dict(config or tiles_for("grad", s, num_experts, qw, folded=wargs is not None))
    small = _small(s, num_experts)
    programs = cfg.pop("PROGRAMS", None)  # tests force a slot loop, a split and the words-ahead loop
    split = cfg.pop("SPLIT_N", None)
    # the dense GEMM gradient's loop (round 7): the next N tile's words loaded ahead into registers
    # (estimated faster at both M regimes, docs/moe.md "Round 7"); INT2 unpacked per half word on
    # sm_80 at large M, as the dense GEMM gradient
    ahead = cfg.pop("WORDS_AHEAD", _fm._grad_words_ahead())
    int2_halves = _grad_int2_halves(cfg["BLOCK_M"])
    args, meta = wargs if wargs is not None else weight_args(qw, denest_absmax=not small)
    tile_expert, tile_row, bounds = _tile_map(offsets, s, cfg["BLOCK_M"])
    slots = tile_expert.shape[0]
    cols = cdiv(k, cfg["BLOCK_K"])
    rule_programs, rule_split = _grad_programs(slots, num_experts, small, cols, n, cfg, qw, dy.device)
    programs = min(slots, programs or rule_programs)
    slot_loop = _grad_slot_loop(programs, slots, small)
    # the registers of the occupancy the rule sized the grid for (only where GROUPED_RESIDENT has the tile)
    max_registers = heuristics.register_cap(_grad_resident(cfg, qw, slot_loop), cfg.get("num_warps", 4))
    split = rule_split if split is None else split
    half2 = _grad_half2(qw, dy.dtype)
    # split N (small M on few SMs' worth of tiles): fp32 partials added into a zeroed workspace
    dst = torch.zeros((s, k), dtype=torch.float32, device=dy.device) if split > 1 else out
    _grouped_matmul_grad_input_kernel[(programs, cols, split)](
        dst, dy2, tile_expert, tile_row, bounds, *args, n, k, num_experts, slots,
        dy2.stride(0), dy2.stride(1), dst.stride(0), dst.stride(1),
        DOT_PRECISION=_precision(dy.dtype), SLOT_LOOP=slot_loop, SPLIT_N=split > 1,
        INT2_HALVES=int2_halves, WORDS_AHEAD=ahead, WORDS_ASM=ahead and not INTERPRETED, HALF2=half2,
        HALF2_ASM=half2 and not INTERPRETED,
        W_AS_B=heuristics.grad_w_as_b(target_arch(), qw.bits, cfg["BLOCK_N"], cfg["BLOCK_K"], cfg.get("num_warps", 4)),
        W_AS_A=_fm.GRAD_W_AS_A, **meta, **cfg, **({"maxnreg": max_registers} if max_registers else {}))
    if split > 1:
        out.copy_(dst)
    return out


def _grad_slot_loop(programs: int, slots: int, small: bool) -> bool:
    """The input gradient's ``SLOT_LOOP`` variant: where program rows < tile slots, and at small M on
    sm_90 always (a program then runs its one slot in the loop). sm_90 compiles the slot loop's N
    loop tighter (INT3 / NF4 at 16 tokens, e.g. Qwen3: 0.80 -> 0.85 and 0.90 -> 0.94 of DRAM peak;
    docs/moe.md "Round 12"); on sm_80 the program per slot holds more CTAs (Qwen3 down INT2 / INT3
    0.73 -> 0.70 with the loop), so it keeps the variant the program count gives."""
    return programs < slots or (small and heuristics.arch_family(target_arch()) == 90)


def _grad_resident(cfg, qw, slot_loop: bool):
    """(fewest, most) resident CTAs per SM of the input gradient's tile and kernel variant (``slot_loop``
    or a program row per slot: their registers, so their occupancy, differ) on the target, from
    :data:`qlk.kernels.heuristics.GROUPED_RESIDENT`; None under the interpreter or without an entry."""
    if INTERPRETED:
        return None
    label = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg.get('num_warps', 4)} s{cfg.get('num_stages', 3)}"
    fmt = heuristics.format_class(qw.bits, qw.fmt == "nf4", qw.group_size)
    return heuristics.grouped_resident("grad", label, fmt, target_arch(), slot_loop)


def _grad_programs(slots, num_experts, small, cols, n, cfg, qw, device):
    """(program rows, N slices) of the input gradient: :func:`qlk.kernels.heuristics.grouped_programs`
    with the target's SM count and :func:`_grad_resident` of the kernel variant the rule's program rows
    give (none under the interpreter: unsplit)."""
    slot_loop = _grad_slot_loop(heuristics.grouped_programs(slots, num_experts, small)[0], slots, small)
    return heuristics.grouped_programs(slots, num_experts, small, cols, n, cfg["BLOCK_N"], num_sms(device),
                                       _grad_resident(cfg, qw, slot_loop))


# ------------------------------------------------------------------------------------------------
# reference (the CPU fallback and the tests' oracle) and dispatch
# ------------------------------------------------------------------------------------------------
def expert_weight(qw: QuantizedWeight, expert: int, num_experts: int, absmax: torch.Tensor | None = None
                  ) -> QuantizedWeight:
    """Expert ``expert``'s [N, K] slice of a stacked weight [E·N, K], as a QuantizedWeight (views).

    INT: rows e·N .. e·N+N−1 of codes, scales and biases. NF4 (blocks inside one expert: the
    blocksize divides N·K): its bytes and absmax blocks; a double-quantized absmax is de-nested
    first (``absmax``: ``nf4_absmax(qw)``, to de-nest once for all experts) — the same fp32 values
    the stacked dequantization uses."""
    n = qw.out_features // num_experts
    k = qw.in_features
    if qw.fmt == "int":
        rows = slice(expert * n, (expert + 1) * n)
        return QuantizedWeight(fmt="int", shape=(n, k), bits=qw.bits, group_size=qw.group_size, dtype=qw.dtype,
                               qweight=qw.qweight[rows], scales=qw.scales[rows], biases=qw.biases[rows])
    if (n * k) % qw.group_size or (n * k) % 2:
        raise ValueError(f"NF4 blocks of {qw.group_size} straddle experts of {n}x{k} weights")
    absmax = nf4_absmax(qw) if absmax is None else absmax
    per = n * k // qw.group_size
    return QuantizedWeight(fmt="nf4", shape=(n, k), bits=4, group_size=qw.group_size, dtype=qw.dtype,
                           qweight=qw.qweight[expert * n * k // 2:(expert + 1) * n * k // 2],
                           absmax=absmax[expert * per:(expert + 1) * per])


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped_matmul_reference(x, qw, offsets, num_experts, bias=None):
    """Y_e = X_e·Ŵ_eᵀ (+ b_e) per expert (fp32, fp64 for fp64 x), zeros past offsets[E]."""
    acc = _acc(x.dtype)
    n = qw.out_features // num_experts
    y = torch.zeros(x.shape[0], n, dtype=acc, device=x.device)
    bounds = offsets.tolist()
    absmax = nf4_absmax(qw) if qw.fmt == "nf4" else None
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = x[lo:hi].to(acc) @ expert_weight(qw, e, num_experts, absmax).dequantize(acc).t()
            if bias is not None:
                y[lo:hi] += bias[e].to(acc)
    return y.to(x.dtype)


def grouped_grad_input_reference(dy, qw, offsets, num_experts):
    """dX_e = dY_e·Ŵ_e per expert, zeros past offsets[E]."""
    acc = _acc(dy.dtype)
    dx = torch.zeros(dy.shape[0], qw.in_features, dtype=acc, device=dy.device)
    bounds = offsets.tolist()
    absmax = nf4_absmax(qw) if qw.fmt == "nf4" else None
    for e in range(num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            dx[lo:hi] = dy[lo:hi].to(acc) @ expert_weight(qw, e, num_experts, absmax).dequantize(acc)
    return dx.to(dy.dtype)


def kernel_ok(qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the grouped kernels serve ``qw`` for activations of ``dtype`` (else: the reference)."""
    return (supports(qw) is None and dtype != torch.float64 and not (INTERPRETED and dtype == torch.bfloat16))

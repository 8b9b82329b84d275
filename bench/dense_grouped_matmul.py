"""Dense bf16 grouped-GEMM baseline for the MoE static and GPU benchmarks: Y_e = X_e·W_eᵀ per expert.

The same launch structure as qlk's grouped kernels (:mod:`qlk.kernels.grouped_matmul`: rows sorted
by expert, the same device-side tile map, the same tiles from ``grouped_config``), with a dense
[E, N, K] weight loaded by ``tl.load`` instead of dequantized: what the grouped dequant-GEMM has to
get close to. ``dgrad=True`` computes dX_e = dY_e·W_e (tile dXᵀ, reduction over N). Not part of
qlk; nothing in qlk imports it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlk.kernels.grouped_matmul import _tile_map, tiles_for


@triton.jit
def _dense_grouped_kernel(
    y_ptr, x_ptr, w_ptr,  # y [S, OUT], x [S, IN], w [E, N, K] (forward: OUT=N, IN=K; dgrad: OUT=K, IN=N)
    tile_expert_ptr, tile_row_ptr, bounds_ptr,
    N, K, stride_we, stride_wn, stride_wk, stride_xm, stride_ym,
    DGRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + pid_t)
        row_end = tl.load(bounds_ptr + e + 1).to(tl.int32)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        rows = tl.minimum(offs_m, row_end - 1).to(tl.int64)
        w_e = w_ptr + e.to(tl.int64) * stride_we
        if DGRAD:  # dXᵀ[k tile, m] = Σ_n W[n, k]ᵀ·dY[m, n]ᵀ
            offs_k = pid_o * BLOCK_K + tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                w = tl.load(w_e + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
                dyt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_n[:, None], mask=offs_n[:, None] < N,
                              other=0.0)
                acc = tl.dot(tl.trans(w), dyt, acc)
            tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_k[:, None],
                     acc.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < row_end) & (offs_k[:, None] < K))
        else:  # Yᵀ[n tile, m] = Σ_k W[n, k]·X[m, k]ᵀ (weight as the A operand, as qlk's)
            offs_n = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_e + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
                xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None], mask=offs_k[:, None] < K, other=0.0)
                acc = tl.dot(w, xt, acc)
            tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None],
                     acc.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < row_end) & (offs_n[:, None] < N))


def dense_grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, dgrad: bool = False,
                         max_rows: int | None = None):
    """x [S, K] (dgrad: dY [S, N]) sorted by expert, w [E, N, K], offsets [E+1] -> [S, N] (dgrad: [S, K]);
    ``max_rows``: qlk's bound on an expert's rows (the tile map's). Rows past offsets[E] are left
    unwritten (the benchmarks route none there)."""
    e, n, k = w.shape
    s = x.shape[0]
    out = torch.empty(s, k if dgrad else n, dtype=x.dtype, device=x.device)
    cfg = dict(tiles_for("grad" if dgrad else "fwd", s, e))
    tile_expert, tile_row, bounds = _tile_map(offsets, s, cfg["BLOCK_M"], max_rows)
    grid = (tile_expert.shape[0], triton.cdiv(k if dgrad else n, cfg["BLOCK_K" if dgrad else "BLOCK_N"]))
    _dense_grouped_kernel[grid](out, x, w, tile_expert, tile_row, bounds, n, k, w.stride(0), w.stride(1), w.stride(2),
                                x.stride(0), out.stride(0), DGRAD=dgrad, **cfg)
    return out

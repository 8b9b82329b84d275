"""Dense bf16 baseline for the static and GPU benchmarks: Y = X·Wᵀ in plain Triton.

A tiled matmul with fp32 accumulation. Training shapes (M > 64) take the autotuned tiles that suit
sm_90 (wgmma, 128×256×64, 8 warps, 3 stages) and sm_80; decode shapes (M ≤ 64) take one narrow
tile (16×64×256) and split K until the grid covers the GPU twice, fp32 partials summed on the host
side. It is what a fused dequant-GEMM has to get close to: same tiles, same tl.dot, nothing to
dequantize. Not part of qlk; nothing in qlk imports it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: decode (M ≤ DECODE_M) tile: narrow in N for more CTAs, long in K for 16-byte loads
DECODE_M = 64
DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)


@triton.jit
def _dense_matmul_kernel(
    x_ptr,  # [M, K] bf16/fp16 (any strides)
    w_ptr,  # [N, K] same dtype (any strides: a Linear weight, or its transpose for dY·W)
    y_ptr,  # [M, N] in x's dtype, or [SPLIT_K, M, N] fp32 partials when SPLIT_K > 1
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share the same W column-tiles in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    # this program's K range: whole BLOCK_K steps, the last split may be short
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # Wᵀ tile [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_left = k_hi - k
        x = tl.load(x_ptrs, mask=tl.arange(0, BLOCK_K)[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        y_ptrs = y_ptr + pid_k.to(tl.int64) * M * N + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc, mask=mask)


def _configs():
    c = triton.Config
    return [
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # two warps, 64x64 each, four CTAs per SM on sm_80 (the 64-deep K step spills with two
        # warps): the same mid-M tile as qlk's round-9 forward candidates, so that "x dense" compares
        # like with like (docs/kernels.md "Round 9")
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=2, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=2, num_stages=4),
    ]


_dense_matmul_tuned = triton.autotune(configs=_configs(), key=["M", "N", "K"])(_dense_matmul_kernel)


def _sm_count(device) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(getattr(device, "index", None) or 0)
        return int(props["multiprocessor_count"])
    except Exception:  # noqa: BLE001 - no GPU: plan for an H100
        return 132


def _split_k(m: int, n: int, k: int, device) -> int:
    """Powers of two until the grid covers every SM twice, keeping ≥ 4 K steps per split."""
    bm, bn, bk = DECODE_CONFIG["BLOCK_M"], DECODE_CONFIG["BLOCK_N"], DECODE_CONFIG["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split < 2 * _sm_count(device) and triton.cdiv(k, bk) // (2 * split) >= 4:
        split *= 2
    return split


def dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Y = X·Wᵀ for X [..., K] and W [N, K] (bf16 or fp16, any strides), fp32 accumulation, Y in X's dtype."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features, w has shape {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x and w must both be bf16 or fp16; got {x.dtype} and {w.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    strides = (x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1))
    if m > DECODE_M:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)

        _dense_matmul_tuned[grid](x2, w, y, m, n, k, *strides, SPLIT_K=1)
        return y.reshape(*x.shape[:-1], n)
    cfg = dict(DECODE_CONFIG)
    split = _split_k(m, n, k, x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _dense_matmul_kernel[grid](x2, w, out, m, n, k, *strides, SPLIT_K=split, **cfg)
    if split > 1:
        y.copy_(out.sum(0))
    return y.reshape(*x.shape[:-1], n)

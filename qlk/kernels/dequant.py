"""Standalone dequantization: Ŵ [N, K] = dense weight, from any qlk format.

Math (one source of truth, :func:`qlk.kernels.quant_tile._dequant_tile`):
INT-b  ŵ[n, k] = s[n, k//g]·q[n, k] + b[n, k//g];   NF4  ŵ[n, k] = NF4[q[n, k]]·absmax[(n·K + k)//g],
computed in fp32 and cast once to ``dtype`` (as bitsandbytes and ``QuantizedWeight.dequantize`` do).
It launches with ``enable_fp_fusion=False`` so that the fp32 result equals the reference bit for bit
(s·q + b rounded twice, not once by an FMA); the kernel is memory-bound, the FMA buys nothing.

Used for the "dequantize + cuBLAS" baseline and wherever a dense copy is wanted.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.quantized_weight import QuantizedWeight
from .config import PRUNE, cdiv, dequant_configs, even_k_kernel, packed_rows_kernel
from .quant_tile import _dequant_tile, aligned_rows, weight_args


@triton.autotune(configs=dequant_configs(), key=["N", "K", "BITS", "GROUP_SIZE", "IS_NF4"], prune_configs_by=PRUNE)
@even_k_kernel
@packed_rows_kernel
@triton.jit
def _dequantize_kernel(
    out_ptr,  # [N, K] output, row stride stride_on, unit column stride
    qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,  # packed weight (weight_args)
    stride_qn, stride_sn, stride_sg,
    N, K, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QN_ALIGN: tl.constexpr = 1,
):
    stride_qn = aligned_rows(stride_qn, QN_ALIGN)  # packed rows: aligned loads
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    w = _dequant_tile(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                      stride_qn, stride_sn, stride_sg, tl.minimum(offs_n, N - 1), k0, K,
                      BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize_forward(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                       stored_order: bool = False) -> torch.Tensor:
    """Ŵ [N, K] in ``dtype`` (fp16, bf16 or fp32), original column order unless ``stored_order``.

    ``out`` (optional): a preallocated [N, K] tensor of ``dtype`` with unit column stride
    (only when the weight has no act-order permutation, or with ``stored_order=True``)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dequantize: dtype {dtype} not supported; allowed: float16, bfloat16, float32")
    n, k = qw.shape
    permuted = qw.perm is not None and not stored_order
    if out is None or permuted:
        if out is not None:
            raise ValueError("dequantize: out= is not supported with an act-order permutation; omit it")
        out = torch.empty((n, k), dtype=dtype, device=qw.device)
    if out.shape != (n, k) or out.dtype != dtype or out.stride(1) != 1 or out.device != qw.device:
        raise ValueError(f"dequantize: out must be [{n}, {k}] {dtype} on {qw.device} with unit column stride")
    args, meta = weight_args(qw)

    def grid(m):
        return (cdiv(n, m["BLOCK_N"]), cdiv(k, m["BLOCK_K"]))

    _dequantize_kernel[grid](out, *args, n, k, out.stride(0), **meta, enable_fp_fusion=False)
    if permuted:
        out = out.index_select(1, torch.argsort(qw.perm))
    return out

"""The weighted sum that ends a mixture-of-experts layer, in one launch (round 39).

After the experts' second grouped GEMM, ``out`` [S, H] holds one row per routed pair in expert order
(rows at or past ``offsets[E]`` are the pairs of no expert: sentinels >= E, dropped ids < 0). With
``position[s]`` the row of pair s = t·k + i (:func:`qlk.kernels.routing.route_pairs`) and the router's
``weights`` [T, k]:

    Y[t] = Σ_i  w[t, i] · out[position[t·k + i]]      over the pairs with position < offsets[E]

summed in fp32 and rounded once to Y's dtype. A pair of no expert adds nothing, whatever its weight
(NaN or inf included: its weight is never multiplied in). The torch ops this replaces (the weights'
gather and cast, the mask, the product, the scatter back to token order and the sum over k: about
eight launches, :meth:`qlk.nn.experts.QuantExperts.forward`) round the product and the sum to
``out``'s dtype; this rounds once. One program per (token, H tile); no autograd (the experts' decode
forward, under ``torch.no_grad`` or with nothing requiring grad).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import cdiv, fma_kernel

BLOCK_H = 256


@fma_kernel  # an fp32 sum of products
@triton.jit
def _combine_kernel(out_ptr, position_ptr, weights_ptr, offsets_ptr, y_ptr, H, NUM_EXPERTS, TOP_K,
                    stride_om, stride_wt, stride_wk, stride_yt, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    routed = tl.load(offsets_ptr + NUM_EXPERTS)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(TOP_K):
        row = tl.load(position_ptr + t * TOP_K + i)
        has_expert = row < routed
        w = tl.load(weights_ptr + t.to(tl.int64) * stride_wt + i * stride_wk).to(tl.float32)
        live = offs_h < tl.where(has_expert, H, 0)  # no load of a row of no expert
        o = tl.load(out_ptr + row * stride_om + offs_h, mask=live, other=0.0).to(tl.float32)
        acc += tl.where(has_expert, w, 0.0) * o
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + offs_h, acc.to(y_ptr.dtype.element_ty), mask=in_h)


def combine(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Y [T, H] of the module docstring: ``out`` [S, H] (rows in expert order, unit stride along H),
    ``position`` [S] int64, ``weights`` [T, k] (any float dtype and strides), ``offsets`` [E+1] int64;
    Y in ``dtype`` (default ``out``'s)."""
    if out.dim() != 2 or out.stride(1) != 1:
        raise ValueError(f"combine: out must be [S, H] with unit stride along H, got {list(out.shape)} "
                         f"strides {out.stride()}")
    if weights.dim() != 2 or weights.shape[0] * weights.shape[1] != out.shape[0]:
        raise ValueError(f"combine: weights {list(weights.shape)} are not [T, k] of the {out.shape[0]} rows")
    if position.shape != (out.shape[0],) or position.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError(f"combine: position must be [{out.shape[0]}] int64 and offsets int64, got "
                         f"{position.dtype} {list(position.shape)} and {offsets.dtype}")
    devices = {t.device for t in (out, position, weights, offsets)}
    if len(devices) != 1:
        raise ValueError(f"combine: tensors on several devices {sorted(map(str, devices))}")
    tokens, top_k = weights.shape
    h = out.shape[1]
    y = torch.empty(tokens, h, dtype=dtype or out.dtype, device=out.device)
    if tokens and h:
        _combine_kernel[(tokens, cdiv(h, BLOCK_H))](
            out, position.contiguous(), weights, offsets, y, h, offsets.shape[0] - 1, top_k,
            out.stride(0), weights.stride(0), weights.stride(1), y.stride(0), BLOCK_H=BLOCK_H, num_warps=4)
    return y

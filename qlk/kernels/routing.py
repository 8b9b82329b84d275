"""Routing of a mixture-of-experts layer's token-expert pairs in one launch (round 38).

For the S = T·k pairs of a top-k routing, ``ids`` [S] (expert of each pair; ids outside 0 .. E−1,
the expert-parallel sentinels and dropped slots, belong to no expert), :func:`route_rows` returns

    key[s]     = ids[s] if 0 <= ids[s] < E else E
    order      = the stable sort of the pairs by key:  position of pair s
                 pos[s] = #{j : key[j] < key[s]} + #{j < s : key[j] == key[s]},   order[pos[s]] = s
    offsets[e] = #{s : key[s] < e}   for e = 0 .. E      (offsets[0] = 0, offsets[E] = the routed rows)

exactly what :func:`qlk.nn.experts.route`'s torch ops give (a stable ``torch.sort`` of the keys, a
scatter-add of the counts and their prefix sum, the reference): ~10 launches there, one here. It is
one program holding the pairs' [S, S] comparison, so it is used for decode-sized routings only
(:func:`fits`, :data:`MAX_ELEMENTS`); larger ones keep the torch ops.

:func:`route_pairs` (round 39, the experts' decode forward) writes in the same launch what that
forward needs beside them, so neither costs a launch of its own:

    token[pos[s]] = s // k        the token of sorted row j (the rows' gather: X[token])
    position[s]   = pos[s]        where pair s = (t, i), s = t·k + i, landed (the weighted sum's read)

and, given the projections' BLOCK_M (round 40), their tile map
(:func:`qlk.kernels.grouped_matmul._tile_map`, from the offsets still in registers), remembered for
the projections, which then launch no map of their own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouped_matmul as gm
from .grouped_matmul import _store_tile_map

#: the largest [pairs, pairs] and [experts + 1, pairs] comparison (power-of-two padded) one program
#: forms; above it the torch ops route (one token of Qwen3-30B-A3B: 8 pairs x 129 experts -> 8 x 256)
MAX_ELEMENTS = 32768


@triton.jit
def _route_kernel(ids_ptr, order_ptr, offsets_ptr, token_ptr, position_ptr, S, NUM_EXPERTS, TOP_K,
                  tile_expert_ptr, tile_row_ptr, bounds_ptr, NUM_SLOTS,
                  BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, PAIRS: tl.constexpr,
                  TILE_MAP: tl.constexpr = False, BLOCK_M: tl.constexpr = 16, BLOCK_T: tl.constexpr = 16):
    """order [S] int64 and offsets [E+1] int64 of the module docstring, in one program; with PAIRS
    also token [S] and position [S] (int64); with TILE_MAP also the tile map of the S routed rows in
    BLOCK_M-row tiles over NUM_SLOTS slots (:func:`qlk.kernels.grouped_matmul._store_tile_map`)."""
    s = tl.arange(0, BLOCK_S)
    raw = tl.load(ids_ptr + s, mask=s < S, other=0)
    key = tl.where((raw >= 0) & (raw < NUM_EXPERTS), raw, NUM_EXPERTS).to(tl.int32)
    key = tl.where(s < S, key, NUM_EXPERTS + 1)  # padding pairs after every real one
    ahead = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (s[None, :] < s[:, None]))
    pos = tl.sum(ahead.to(tl.int32), 1)
    tl.store(order_ptr + pos, s.to(tl.int64), mask=s < S)
    if PAIRS:
        tl.store(token_ptr + pos, (s // TOP_K).to(tl.int64), mask=s < S)
        tl.store(position_ptr + s, pos.to(tl.int64), mask=s < S)
    e = tl.arange(0, BLOCK_E)
    below = tl.sum((key[None, :] < e[:, None]).to(tl.int32), 1)
    tl.store(offsets_ptr + e, below.to(tl.int64), mask=e <= NUM_EXPERTS)
    if TILE_MAP:  # expert e's rows are below[e] .. below[e + 1]: the next count, not a shift of registers
        upto = tl.sum((key[None, :] <= e[:, None]).to(tl.int32), 1)
        routed = tl.sum((key < NUM_EXPERTS).to(tl.int64), 0)
        real = e < NUM_EXPERTS
        _store_tile_map(tl.where(real, below, 0), tl.where(real, upto, 0), e, real, routed, tile_expert_ptr,
                        tile_row_ptr, bounds_ptr, bounds_ptr, NUM_EXPERTS, S, NUM_SLOTS, 0, BLOCK_M, BLOCK_T, False)


def fits(pairs: int, num_experts: int) -> bool:
    """Whether :func:`route_rows` routes ``pairs`` pairs over ``num_experts`` in one program."""
    block_s = triton.next_power_of_2(max(pairs, 1))
    return max(block_s, triton.next_power_of_2(num_experts + 1)) * block_s <= MAX_ELEMENTS


def route_rows(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [S] int64, offsets [E+1] int64) of the module docstring for the expert ids [S] (any
    integer dtype, any stride), in one launch; ``fits(S, num_experts)`` must hold."""
    return _route(ids, num_experts, None)


def route_pairs(ids: torch.Tensor, num_experts: int, top_k: int, block_m: int | None = None):
    """(order, offsets, token, position), each int64, of the module docstring for the expert ids [S]
    of a top-``top_k`` routing (S = T·k, pair s = (s // k, s % k)), in one launch; ``fits(S,
    num_experts)`` must hold. ``block_m``: also the grouped kernels' tile map of the S rows in tiles
    of ``block_m`` rows with the row bound T (a token picks an expert once), remembered for them
    (:func:`qlk.kernels.grouped_matmul.remember_tile_map`; where that bound would need its device
    check, the kernels build and check the map themselves)."""
    if top_k < 1 or ids.shape[0] % top_k:
        raise ValueError(f"route_pairs: {ids.shape[0]} pairs are not tokens of top_k={top_k}")
    return _route(ids, num_experts, top_k, block_m)


def _route(ids: torch.Tensor, num_experts: int, top_k: int | None, block_m: int | None = None):
    pairs = ids.shape[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"route_rows: ids must be a 1-D integer tensor, got {ids.dtype} {list(ids.shape)}")
    if not fits(pairs, num_experts):
        raise ValueError(f"route_rows: {pairs} pairs over {num_experts} experts exceed one program "
                         f"(MAX_ELEMENTS={MAX_ELEMENTS}); route them with the torch ops")
    order = torch.empty(pairs, dtype=torch.int64, device=ids.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=ids.device)
    token, position = (torch.empty_like(order), torch.empty_like(order)) if top_k else (order, order)
    block_s = triton.next_power_of_2(max(pairs, 1))
    block_e = triton.next_power_of_2(num_experts + 1)
    slots, check = gm.tile_map_slots(num_experts, pairs, block_m, pairs // top_k) if block_m and pairs else (1, True)
    tile_map = None if check else (torch.empty(slots, dtype=torch.int32, device=ids.device),
                                   torch.empty(slots, dtype=torch.int32, device=ids.device),
                                   torch.empty(num_experts + 2, dtype=torch.int64, device=ids.device))
    _route_kernel[(1,)](ids.contiguous(), order, offsets, token, position, pairs, num_experts, top_k or 1,
                        *(tile_map or (order, order, order)), slots,
                        BLOCK_S=block_s, BLOCK_E=block_e, PAIRS=bool(top_k), TILE_MAP=tile_map is not None,
                        BLOCK_M=block_m or 16, BLOCK_T=gm.tile_map_block_t(block_e),
                        num_warps=4, enable_fp_fusion=False)  # integers only: nothing to fuse
    if tile_map is not None:
        gm.remember_tile_map(offsets, pairs, block_m, pairs // top_k, tile_map)
    return (order, offsets, token, position) if top_k else (order, offsets)

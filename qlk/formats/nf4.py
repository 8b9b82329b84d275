"""NF4 with double-quantized absmax, bit-compatible with bitsandbytes 0.50 (QLoRA).

The weight [out, in] is flattened row-major and cut into blocks of ``blocksize`` elements:

    absmax[i] = max |w| over block i                      (fp32)
    q         = nearest NF4 code of w / absmax[i]         (by midpoints, an exact tie takes the lower code)
    packed    = two codes per byte, the even element in the HIGH nibble; an odd count pads code 7 (0.0)
    ŵ         = NF4[q] · absmax[i]                        (fp32, cast once to the weight dtype)

Double quantization (``double_quant=True``) stores absmax itself in 8 bits:

    offset     = mean(absmax)
    absmax2[j] = max |absmax − offset| over nested block j (256 absmax values)
    qa         = nearest code of (absmax − offset)/absmax2[j] in the signed dynamic 8-bit map
    absmax     ≈ DYN[qa] · absmax2[j] + offset            (fp32)

Bits per parameter: 4 + 8/blocksize + 32/(256·blocksize) (4.127 at block 64); the two code tables
are constants of the format and not stored per weight.
"""
from __future__ import annotations

import functools

import torch

from .._checks import check_weight
from .quantized_weight import QuantizedWeight

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@functools.lru_cache(maxsize=None)
def _nf4_table_cached(device: str) -> torch.Tensor:
    return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)


def nf4_table(device="cpu") -> torch.Tensor:
    """The 16 NF4 values (fp32) on ``device``."""
    return _nf4_table_cached(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _dynamic_map_cached(device: str) -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    data = []
    for i in range(7):
        items = 2**i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def dynamic_map(device="cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted fp32 values) on ``device``."""
    return _dynamic_map_cached(str(torch.device(device)))


def _blockwise_absmax_codes(flat: torch.Tensor, table: torch.Tensor, blocksize: int):
    """Blockwise absmax scaling + nearest code by midpoints, as bitsandbytes' CPU path does it."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:  # the ragged last block divides instead of multiplying by the reciprocal
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    midpoints = (table[:-1] + table[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True), absmax


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cached(device: str) -> torch.Tensor:
    # 65536 bins over [-1, 1], each holding the code nearest its bin value by midpoints
    table = dynamic_map(device)
    midpoints = 0.5 * (table[:-1] + table[1:])
    bins = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535.0
    return torch.searchsorted(midpoints, bins, right=False)


def _nested_absmax_codes(values: torch.Tensor):
    """8-bit blockwise quantization of (absmax − offset) exactly as bitsandbytes 0.50's CPU kernel:
    x·(1/absmax) in fp32, rounded onto a 65536-bin grid of [-1, 1], then a lookup table of the
    nearest dynamic-map code per bin. The grid makes it differ from exact nearest-by-midpoint for
    values within half a bin (1.5e-5) of a midpoint, so it is written out rather than idealized.
    A block whose absmax is 0 gets code 0, as there."""
    n = values.numel()
    idx_block = torch.arange(n, device=values.device) // NESTED_BLOCKSIZE
    absmax2 = torch.zeros(-(-n // NESTED_BLOCKSIZE), device=values.device)
    absmax2 = absmax2.scatter_reduce(0, idx_block, values.abs(), "amax", include_self=False)
    live = absmax2[idx_block] > 0
    safe = torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))
    inv = 1.0 / safe
    # 1/absmax overflows fp32 for a subnormal absmax (|w| < 1.2e-38), where bitsandbytes computes
    # inf·0 = NaN bins; qlk divides there instead
    scaled = torch.where(torch.isfinite(inv)[idx_block], values * inv[idx_block], values / safe[idx_block])
    normed = torch.where(live, torch.clamp(scaled, -1.0, 1.0), 0.0)
    bins = ((normed + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_lut_cached(str(values.device))[bins]
    return torch.where(live, codes, torch.zeros_like(codes)), absmax2


def _blockwise_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * absmax[i // blocksize] for a flat tensor (the last block may be ragged)."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * absmax[-1]])


@functools.lru_cache(maxsize=None)
def _nf4_byte_table_cached(device: str) -> torch.Tensor:
    # byte -> (NF4[high nibble], NF4[low nibble]): one gather per two codes
    table = nf4_table(device)
    byte = torch.arange(256, device=device)
    return torch.stack([table[byte >> 4], table[byte & 15]], dim=-1)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to NF4 exactly as ``bitsandbytes.functional.quantize_4bit``."""
    check_weight(weight)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize (group_size) {blocksize} is not supported; allowed: {BLOCKSIZES}")
    flat = weight.detach().reshape(-1).to(torch.float32)
    q, absmax = _blockwise_absmax_codes(flat, nf4_table(flat.device), blocksize)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 7)])
    q8 = q.to(torch.uint8)
    packed = (q8[::2] << 4) | q8[1::2]
    qw = QuantizedWeight(
        fmt="nf4", shape=tuple(weight.shape), bits=4, group_size=blocksize, qweight=packed, dtype=weight.dtype
    )
    if double_quant:
        offset = absmax.mean()
        qa, absmax2 = _nested_absmax_codes(absmax - offset)
        qw.absmax, qw.absmax_scale, qw.absmax_offset = qa.to(torch.uint8), absmax2, offset.reshape(1)
    else:
        qw.absmax = absmax
    return qw


def nf4_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The per-block fp32 absmax, de-nested when double-quantized."""
    if qw.absmax_scale is None:
        return qw.absmax
    table = dynamic_map(qw.absmax.device)
    nested = _blockwise_scale(table[qw.absmax.to(torch.int64)], qw.absmax_scale, NESTED_BLOCKSIZE)
    return nested + qw.absmax_offset


def dequantize_nf4(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4[q]·absmax in fp32 (float64 when asked), then one cast, as bitsandbytes does."""
    n_el = qw.shape[0] * qw.shape[1]
    vals = _nf4_byte_table_cached(str(qw.qweight.device))[qw.qweight.to(torch.int64)].view(-1)[:n_el]
    absmax = nf4_absmax(qw)
    if dtype == torch.float64:
        vals, absmax = vals.double(), absmax.double()
    return _blockwise_scale(vals, absmax, qw.group_size).reshape(qw.shape).to(dtype)

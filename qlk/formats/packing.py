"""qlk's packed layout for INT2/3/4 codes: one source of truth for packers, kernels and tests.

Codes of a weight W [N, K] are packed **along K**, row by row, into int32 words, so that both the
forward product X·Ŵᵀ and the input gradient dY·Ŵ read the same buffer [N, words_per_row]:

* INT4: 8 codes per word, code of column ``8w + i`` at bits ``4i .. 4i+3`` (lowest first). This is
  GPTQ's order along K, so a GPTQ ``qweight`` [K/8, N] is this layout transposed.
* INT2: 16 codes per word, column ``16w + i`` at bits ``2i .. 2i+1``.
* INT3: bit planes, 32 codes in 3 words (exactly 3 bits per code). In chunk ``c`` (columns
  ``32c .. 32c+31``) word ``3c + h`` (h = 0, 1) holds the low two bits of column ``32c + 16h + i`` at
  bits ``2i``; word ``3c + 2`` holds the high bit of column ``32c + i`` at bit ``i``. Unlike
  GPTQ's continuous 3-bit stream, no code straddles two words, so a kernel unpacks each word with
  shifts and masks only.

Rows whose K is not a multiple of the chunk (8, 16 or 32 columns) are padded with code 0; kernels
mask the padded columns out.
"""
from __future__ import annotations

import torch

#: columns per chunk and int32 words per chunk, by bit width
CHUNK = {2: (16, 1), 3: (32, 3), 4: (8, 1)}


def words_per_row(in_features: int, bits: int) -> int:
    cols, words = CHUNK[bits]
    return -(-in_features // cols) * words


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    # int64 holding an unsigned 32-bit pattern -> the same bits as int32 (two's complement)
    return torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)


def _or_shifted(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] (n * bits <= 32) -> int64 [...] with code i at bit offset bits*i.

    One column at a time: the int64 temporaries stay at 1/n of the codes' size, which is what
    keeps quantizing a large layer (or loading a model through QlkConfig) near the packed size."""
    out = codes[..., 0].to(torch.int64)
    for i in range(1, codes.shape[-1]):
        out |= codes[..., i].to(torch.int64) << (bits * i)
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [N, K] (0 <= code < 2**bits) into int32 words [N, words_per_row(K)]."""
    if bits not in CHUNK:
        raise ValueError(f"bits={bits} has no packed layout; allowed: {sorted(CHUNK)}")
    n, k = codes.shape
    cols, _ = CHUNK[bits]
    pad = (-k) % cols
    small = torch.uint8 if codes.dtype == torch.uint8 else torch.int32
    c = torch.nn.functional.pad(codes.to(small), (0, pad)).reshape(n, -1, cols)
    if bits == 3:
        low = _or_shifted((c & 3).reshape(n, -1, 2, 16), 2)  # [N, C, 2]
        high = _or_shifted(c >> 2, 1).unsqueeze(-1)  # [N, C, 1]
        words = torch.cat([low, high], dim=-1)
    else:
        words = _or_shifted(c, bits)
    return _to_int32(words.reshape(n, -1)).contiguous()


def unpack_codes(words: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [N, W] -> codes [N, in_features] (``dtype``).

    Works on the int32 words directly (an arithmetic shift followed by the mask yields the same
    bits as a logical one), which is what the reference path's speed depends on."""
    if bits not in CHUNK:
        raise ValueError(f"bits={bits} has no packed layout; allowed: {sorted(CHUNK)}")
    n = words.shape[0]
    w = words.to(torch.int32)
    if bits == 3:
        w = w.reshape(n, -1, 3)
        sh2 = torch.arange(16, device=w.device, dtype=torch.int32) * 2
        low = (w[..., :2, None] >> sh2) & 3  # [N, C, 2, 16]
        high = (w[..., 2:3] >> torch.arange(32, device=w.device, dtype=torch.int32)) & 1  # [N, C, 32]
        codes = low.reshape(n, -1, 32) | (high << 2)
    else:
        per = 32 // bits
        sh = torch.arange(per, device=w.device, dtype=torch.int32) * bits
        codes = (w[..., None] >> sh) & ((1 << bits) - 1)
    return codes.reshape(n, -1)[:, :in_features].to(dtype)

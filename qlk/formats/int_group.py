"""INT2/3/4 asymmetric min-max group quantization (the QA-LoRA base format).

For output channel n and group j of ``g`` consecutive input channels (k in [j·g, (j+1)·g)):

    lo, hi = min, max of W[n, group j]
    s      = (hi − lo) / (2^bits − 1)                  stored in ``scale_dtype`` (fp16 by default)
    z      = round(−lo / s)                             integer zero point (0 is exactly representable)
    c      = s·(m − z),  m = 2^(bits−1)                 the value of the middle code, stored as the
                                                        group's float bias in ``scale_dtype``
    q      = clamp(round((w − c) / s) + m, 0, 2^bits − 1)   packed by :mod:`qlk.formats.packing`
    ŵ      = s·(q − m) + c                              one FMA per weight: the kernels fold −m into
                                                        the constant of their int→float conversion

Why c and not the bias of code 0 (b = −s·z, design.md's form): c is the group's centre, b its
minimum. Rounded to fp16, c carries |c|·2^-11 of error and b |b|·2^-11 ≈ 7.5·s·2^-11, so c keeps the
base closer to the weights and, above all, keeps the QA-LoRA merge (c' = c + (σ/g)·(B·A)) close to
exact in fp16: measured on SmolLM2-135M, merged-vs-unmerged logits differ by 3e-4 relative with c
against 3e-3..1e-2 with b (docs/formats.md). Same bits, same FMA.

With the stored (rounded) s and c, ``|w − ŵ| ≤ s/2`` plus the rounding of s and c. A constant group
(hi == lo, or s underflowing the scale dtype) gets s = 0 and c = the group's value, so no division
by zero and an exact result up to the scale dtype. Float biases are what make the QA-LoRA merge
exact: adding a per-group constant to the weight is adding it to c.
"""
from __future__ import annotations

import torch

from .._checks import check_group_size, check_int_bits, check_weight
from .packing import pack_codes, unpack_codes
from .quantized_weight import QuantizedWeight

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _scales_and_biases(w, lo, hi, bits, scale_dtype, shape):
    """(s in fp32, c in scale_dtype, live) of every group, or a ValueError when ``scale_dtype``
    cannot hold them: an overflow, or groups whose step flushes to zero although their values are
    not (nearly) constant. ``w`` [n, G, g] in any float dtype; only flushed groups are read."""
    maxq, mid = (1 << bits) - 1, 1 << (bits - 1)
    s = ((hi - lo) / maxq).to(scale_dtype).to(torch.float32)
    live = s > 0
    safe_s = torch.where(live, s, torch.ones_like(s))
    z = torch.round(-lo / safe_s)
    b = torch.where(live, s * (mid - z), (lo + hi) / 2).to(scale_dtype)
    if not (torch.isfinite(b).all() and torch.isfinite(s.to(scale_dtype)).all()):
        top = torch.maximum(lo.abs(), hi.abs()).max().item()
        raise ValueError(
            f"weight of shape {shape}: its magnitude (max |w| = {top:.3g}) overflows scale_dtype={scale_dtype}; "
            "pass scale_dtype=torch.float32"
        )
    # a group whose step flushed to zero in scale_dtype is stored as its midpoint b: fine when the
    # group is (nearly) constant, silently wrong when its values do not survive in scale_dtype at all
    dead = ~live
    if dead.any():  # only the dead groups are looked at (no weight-sized temporary otherwise)
        dead_err = (w[dead].to(torch.float32) - b.to(torch.float32)[dead][:, None]).abs().amax(-1)
        lost = dead_err > 2.0**-8 * torch.maximum(lo.abs(), hi.abs())[dead]
        if lost.any():
            top = torch.maximum(lo.abs(), hi.abs()).max().item()
            raise ValueError(
                f"weight of shape {shape}: {int(lost.sum())} group(s) have magnitudes (max {top:.3g}) below "
                f"what scale_dtype={scale_dtype} represents (they would dequantize to ~0); pass "
                "scale_dtype=torch.float32"
            )
    return s, b, live


def check_int_quantizable(weight: torch.Tensor, bits: int, group_size: int, scale_dtype=torch.float16) -> None:
    """The ValueError :func:`quantize_int` would raise for ``scale_dtype`` (overflow, flushed
    groups), found from the group ranges alone: no quantization work, no weight-sized temporary.
    :func:`qlk.patch_model` runs it on every layer before converting any."""
    n, k = weight.shape
    w = weight.detach().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1).to(torch.float32), w.amax(-1).to(torch.float32)
    _scales_and_biases(w, lo, hi, bits, scale_dtype, tuple(weight.shape))


def quantize_int(
    weight: torch.Tensor, bits: int = 4, group_size: int = 32, scale_dtype: torch.dtype = torch.float16
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to INT-``bits`` with one (scale, bias) per ``group_size`` inputs."""
    check_weight(weight)
    check_int_bits(bits)
    n, k = weight.shape
    check_group_size(k, group_size, what=f"weight of shape {tuple(weight.shape)}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype={scale_dtype} is not supported; allowed: {SCALE_DTYPES}")
    maxq, mid = (1 << bits) - 1, 1 << (bits - 1)
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    s, b, live = _scales_and_biases(w, lo, hi, bits, scale_dtype, tuple(weight.shape))
    safe_s = torch.where(live, s, torch.ones_like(s))
    dead = ~live
    # in place on one fp32 temporary: quantizing a layer costs ~5 bytes per weight beyond its input
    q = w - b.to(torch.float32)[..., None]
    q.div_(safe_s[..., None]).round_().add_(mid).clamp_(0, maxq)
    q.masked_fill_(dead[..., None], mid)
    _warn_subnormal_scales(w, q, s, b, (hi - lo) / maxq, mid, scale_dtype, tuple(weight.shape))
    q = q.to(torch.uint8).reshape(n, k)
    del w
    return QuantizedWeight(
        fmt="int",
        shape=(n, k),
        bits=bits,
        group_size=group_size,
        qweight=pack_codes(q, bits).to(weight.device),
        scales=s.to(scale_dtype).contiguous(),
        biases=b.contiguous(),
        dtype=weight.dtype,
    )


#: a group whose error exceeds this many half steps (s/2 of its exact, unrounded scale) is reported
SUBNORMAL_TOLERANCE = 1.25


def _warn_subnormal_scales(w, q, s, b, s_exact, mid, scale_dtype, shape) -> None:
    """Warn when groups whose stored scale is subnormal in ``scale_dtype`` miss the half-step bound.

    A subnormal scale keeps few significant bits (fp16 below 6.1e-5 has an absolute step of
    2^-24), so s·(q − m) can be off by several half steps although nothing overflowed or flushed
    to zero. Only those groups are measured (no weight-sized temporary otherwise). It is a warning,
    not an error: the absolute error stays below ~(2^(bits−1))·2^-25, tiny next to the layer's
    other groups, the situation GPTQ-style fp16 scales accept silently; ``scale_dtype=torch.float32``
    removes it.
    """
    sub = (s > 0) & (s < torch.finfo(scale_dtype).tiny)
    if not sub.any():
        return
    w_hat = (q[sub] - mid) * s[sub][:, None] + b.to(torch.float32)[sub][:, None]
    ratio = (w[sub] - w_hat).abs().amax(-1) / (s_exact[sub] / 2)
    bad = ratio > SUBNORMAL_TOLERANCE
    if bad.any():
        import warnings

        warnings.warn(
            f"weight of shape {shape}: {int(bad.sum())} of {s.numel()} group(s) have scales below "
            f"{scale_dtype}'s normal range ({torch.finfo(scale_dtype).tiny:.3g}): their error is up to "
            f"{ratio.max().item():.2f}x the half-step bound s/2; pass scale_dtype=torch.float32 to keep them exact",
            SubnormalScaleWarning,
            stacklevel=4,
        )


class SubnormalScaleWarning(UserWarning):
    """Some quantization groups' scales are subnormal in the scale dtype (precision lost)."""


def dequantize_int(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = s·(q − 2^(bits−1)) + c in float32 (float64 when asked), columns in the stored order."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, k = qw.shape
    groups = k // qw.group_size
    q = unpack_codes(qw.qweight, qw.bits, k, dtype=acc).view(n, groups, qw.group_size)
    s = qw.scales.to(acc)[..., None]
    c = qw.biases.to(acc)[..., None]
    return ((q - (1 << (qw.bits - 1))).mul_(s).add_(c)).view(n, k).to(dtype)

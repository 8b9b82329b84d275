"""One place for input validation, so every public entry point fails the same way.

Each helper raises ``ValueError``/``TypeError`` whose message says what was given and what is
allowed, prefixed by the name of the argument or layer so a user can find it.
"""
from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_INT_BITS = (2, 3, 4)
SUPPORTED_FORMATS = ("int", "nf4")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class UsageError(ValueError):
    """Bad input to a ``qlk`` command (a flag, a file): the CLI prints the message and exits with status 2."""


def _is_int(v) -> bool:
    """A Python/NumPy integer, not a bool (``True`` is an int to Python, never a bit width to us)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_format(fmt: str) -> None:
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; allowed: {', '.join(map(repr, SUPPORTED_FORMATS))}")


def check_int_bits(bits: int) -> None:
    if not _is_int(bits) or bits not in SUPPORTED_INT_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported for fmt='int'; allowed: {SUPPORTED_INT_BITS} "
            "(use fmt='nf4' for the QLoRA 4-bit normal-float format)"
        )


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_rank(r, name: str = "r") -> None:
    """The adapter rank: a positive integer."""
    if not _is_int(r) or r <= 0:
        raise ValueError(f"{name}={r!r} must be a positive integer (the adapter rank, e.g. 8, 16, 64)")


def check_alpha(alpha, name: str = "alpha") -> None:
    """The adapter's alpha (scaling alpha/r): a positive, finite number (NaN/Inf would make every
    output NaN at the first step)."""
    if not _is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name}={alpha!r} must be a positive, finite number (scaling = alpha/r; e.g. 16)")


def check_dropout(dropout, name: str = "dropout") -> None:
    """A dropout probability in [0, 1) (1 would drop everything and divide by zero)."""
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:  # NaN fails both comparisons
        raise ValueError(f"{name}={dropout!r} must be a probability in [0, 1) (e.g. 0.05; 0 disables it)")


def check_scaling(scaling, name: str = "scaling") -> None:
    """The adapter's output scale σ: a finite number (0 and negative values are allowed here)."""
    if not _is_real(scaling) or not math.isfinite(scaling):
        raise ValueError(f"{name}={scaling!r} must be a finite number (σ = alpha/r)")


def check_adapter_hyperparameters(r, alpha, dropout, use_rslora=False, what: str = "") -> None:
    """r, alpha, dropout (and use_rslora) of an adapter, before anything that depends on them."""
    prefix = f"{what}: " if what else ""
    try:
        check_rank(r)
        check_alpha(alpha)
        check_dropout(dropout)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora={use_rslora!r} must be True or False")
    except ValueError as e:
        raise ValueError(prefix + str(e)) from None


def divisors_multiple_of_8(n: int) -> list[int]:
    return [d for d in range(8, n + 1, 8) if n % d == 0]


def check_group_size(in_features: int, group_size: int, what: str = "weight") -> None:
    if not _is_int(group_size) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive integer (e.g. 32, 64, 128)")
    if group_size % 8 != 0:
        raise ValueError(f"group_size={group_size} must be a multiple of 8 (e.g. 32, 64, 128)")
    if in_features % group_size != 0:
        ok = [d for d in divisors_multiple_of_8(in_features) if d <= 256]
        hint = f"group sizes that divide it: {ok}" if ok else "no multiple of 8 up to 256 divides it"
        raise ValueError(
            f"{what}: in_features={in_features} is not divisible by group_size={group_size}; {hint}"
        )


def check_weight(weight: torch.Tensor, what: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{what} has dtype {weight.dtype}; allowed: {_dtype_names(WEIGHT_DTYPES)}")
    if weight.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(weight.shape)})")
    if weight.device.type == "meta":
        raise ValueError(f"{what} is on the meta device (it has no values); load real weights first")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s); quantization needs finite weights")


def check_tensor(t, name: str, dtype=None, shape=None, ndim=None, device=None, finite: bool = True) -> None:
    """Shape/dtype check for imported tensors: ``shape`` entries of ``None`` are wildcards.

    ``device``: the device ``t`` must be on (None: any). ``finite``: a floating-point ``t`` must
    hold no NaN/Inf (stored scales, biases, absmax: a NaN there silently poisons every output);
    meta tensors have no values and are not checked.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(
            f"{name} is on {t.device}, expected {torch.device(device)} (all tensors of a weight on one device)"
        )
    if finite:
        check_finite(t, name)


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError if a floating-point (non-meta) ``t`` holds NaN/Inf, saying how many."""
    if t.is_floating_point() and t.device.type != "meta" and t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s) of {t.numel()}; it must be finite")


def check_quantized_weight(qw, what: str = "qw") -> None:
    """TypeError unless ``qw`` is a qlk ``QuantizedWeight``; ValueError if its tensors are on
    different devices (e.g. scales left behind by a manual ``.to()``). The type is recognized by its
    class mark, not an import: this module is imported by ``qlk.formats`` and imports none of qlk."""
    if getattr(type(qw), "__qlk_quantized_weight__", False) is not True:
        hint = " (quantize a dense weight first: qw = qlk.quantize(w))" if isinstance(qw, torch.Tensor) else ""
        raise TypeError(f"{what} must be a qlk.QuantizedWeight, got {type(qw).__name__}{hint}")
    memo = qw.launch_memo()  # the same tensor objects: the same devices (round 37: host time)
    if memo.get("devices_agree"):
        return
    devices = {name: t.device for name, t in qw.tensors().items()}
    memo["devices_agree"] = len(set(devices.values())) <= 1
    if not memo["devices_agree"]:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{what}: its tensors are on different devices ({listing}); move it with qw.to(device)")


def check_bias(bias, out_features: int, device: torch.device, what: str = "bias") -> None:
    """``bias`` is None or a floating-point [out_features] tensor on ``device``."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"{what} has dtype {bias.dtype}; allowed: {_dtype_names(ACTIVATION_DTYPES)}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{what} has shape {tuple(bias.shape)}, expected ({out_features},)")
    if bias.device != device:
        raise ValueError(f"{what} is on {bias.device} but the quantized weight is on {device}; move it")


def check_activation(
    x: torch.Tensor, in_features: int, device: torch.device, what: str = "x", dim_name: str | None = None
) -> None:
    """``x`` [..., in_features] in an activation dtype on ``device``. ``dim_name`` names the last
    dim in messages (default: ``out_features`` for ``dy``, the input gradient's operand, else
    ``in_features``)."""
    dim_name = dim_name or ("out_features" if what.startswith("dy") else "in_features")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; allowed: float16, bfloat16, float32 (float64 on the reference path)"
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; its last dim must be {dim_name}={in_features}")
    if x.device != device:
        raise ValueError(
            f"{what} is on {x.device} but the quantized weight is on {device}; move one of them "
            f"(e.g. qw = qw.to({str(x.device)!r}))"
        )


def check_grouped(qw, offsets: torch.Tensor, num_experts: int, what: str) -> int:
    """N (rows per expert) of a stacked expert weight [E·N, K] after checking it and the routing
    ``offsets`` [E+1] (mixture-of-experts ops); raises naming them."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise ValueError(f"{what}: num_experts={num_experts!r} must be a positive integer")
    if qw.out_features % num_experts:
        raise ValueError(f"{what}: the stacked weight has {qw.out_features} rows, not a multiple of "
                         f"num_experts={num_experts}")
    if qw.perm is not None:
        raise ValueError(f"{what}: stacked expert weights have no act-order permutation")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: offsets must be an int32/int64 tensor [num_experts + 1]; got "
                        f"{getattr(offsets, 'dtype', type(offsets).__name__)}")
    if offsets.shape != (num_experts + 1,):
        raise ValueError(f"{what}: offsets has shape {list(offsets.shape)}, expected [{num_experts + 1}]")
    if offsets.device != qw.device:
        raise ValueError(f"{what}: offsets is on {offsets.device}, the weight on {qw.device}")
    return qw.out_features // num_experts


def check_row_token(row_token, x: torch.Tensor, what: str) -> None:
    """Checks a gather index (sorted row s reads row ``row_token[s]`` of ``x`` [T, K]): a 1-D int32/int64
    tensor on x's device, whose values index x's rows. They come from the routing
    (:func:`qlk.kernels.routing.route_pairs`); on a GPU they are not read here (that would be a host
    sync on every decode call), on the CPU they are."""
    if not isinstance(row_token, torch.Tensor) or row_token.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: row_token must be an int32/int64 tensor [rows] (each sorted row's token); got "
                        f"{getattr(row_token, 'dtype', type(row_token).__name__)}")
    if row_token.dim() != 1:
        raise ValueError(f"{what}: row_token has shape {list(row_token.shape)}, expected [rows]")
    if row_token.device != x.device:
        raise ValueError(f"{what}: row_token is on {row_token.device}, x on {x.device}")
    if row_token.device.type == "cpu" and row_token.numel():
        lo, hi = int(row_token.min()), int(row_token.max())
        if lo < 0 or hi >= x.shape[0]:
            raise ValueError(f"{what}: row_token holds rows {lo} .. {hi}; x has {x.shape[0]} rows")

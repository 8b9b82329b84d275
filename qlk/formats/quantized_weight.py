"""`QuantizedWeight`: the packed weight of one linear layer, in any qlk format.

It is a plain container (no autograd, no module): packed codes plus the per-group or per-block
state, and the two operations every format has — ``dequantize`` and a state-dict form.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Optional

import torch

#: bump when the packed layout of any format changes; loaders refuse other versions by name
LAYOUT_VERSION = 1
CONFIG_KEY = "qlk_config"

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_TENSOR_FIELDS = ("qweight", "scales", "biases", "absmax", "absmax_scale", "absmax_offset", "perm")


@dataclass
class QuantizedWeight:
    """Packed weight Ŵ ≈ W [out_features, in_features].

    fmt="int" (INT2/3/4, :mod:`qlk.formats.int_group`):
        qweight int32 [out, words_per_row] (layout: :mod:`qlk.formats.packing`),
        scales, biases [out, in/group_size] (fp16 by default): ŵ = s·(q − 2^(bits−1)) + c, the
        bias c being the value of the middle code (:mod:`qlk.formats.int_group` says why).
    fmt="nf4" (:mod:`qlk.formats.nf4`, bitsandbytes bytes):
        qweight uint8 [ceil(out·in/2)], absmax fp32 [blocks] or, double-quantized, uint8 codes
        with absmax_scale fp32 [ceil(blocks/256)] and absmax_offset fp32 [1]; group_size = blocksize.
    perm (optional, int64 [in]): the stored columns are input channels ``perm`` (GPTQ act-order):
        y = x[..., perm] @ Ŵ_storedᵀ.  ``dequantize`` returns the original column order.
    dtype: the dtype of the weight that was quantized (what bitsandbytes dequantizes to).
    """

    #: how :func:`qlk._checks.check_quantized_weight` recognizes the type without importing this
    #: package (``_checks`` sits below ``formats``: importing back would make an import cycle)
    __qlk_quantized_weight__ = True

    fmt: str
    shape: tuple
    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: Optional[torch.Tensor] = None
    biases: Optional[torch.Tensor] = None
    absmax: Optional[torch.Tensor] = None
    absmax_scale: Optional[torch.Tensor] = None
    absmax_offset: Optional[torch.Tensor] = None
    perm: Optional[torch.Tensor] = None
    dtype: torch.dtype = torch.float16

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    # ---- geometry -------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def tensors(self) -> dict:
        return {name: getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes stored for this weight (codes + all per-group/per-block state)."""
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if name != "perm")

    @property
    def bits_per_param(self) -> float:
        """All stored bits (codes, scales, biases, absmax state) over out·in.

        The input permutation of GPTQ act-order imports is not counted (it is per layer, not per
        weight); neither are the fixed NF4 and dynamic-map tables, constants of the format.
        """
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    # ---- math -----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ [out, in] in ``dtype`` (computed in fp32, or fp64 when ``dtype`` is float64)."""
        if self.fmt == "int":
            from .int_group import dequantize_int

            w = dequantize_int(self, dtype)
        elif self.fmt == "nf4":
            from .nf4 import dequantize_nf4

            w = dequantize_nf4(self, dtype)
        else:
            raise ValueError(f"unknown fmt {self.fmt!r}")
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w

    def to(self, *args, **kwargs) -> "QuantizedWeight":
        """A copy on another device; codes and per-group state keep their dtypes.

        Takes torch's ``Tensor.to`` forms (``to(device)``, ``to(device=..., non_blocking=...)``,
        ``to(other_tensor)``: its device) parsed as torch parses them. A dtype (``to(torch.float16)``,
        ``to("cuda", torch.float16)``, ``dtype=``) is a TypeError: the packed codes are integers and
        the scales' dtype is part of the format, so there is nothing a cast could mean without
        changing the quantized values (``dequantize(dtype)`` gives Ŵ in any dtype). A module cast
        such as ``model.half()`` is different: :class:`qlk.QuantLinear` moves its buffers and keeps
        their dtypes, as torch's own quantized modules and bitsandbytes' layers do.
        """
        other = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("other")
        if isinstance(other, torch.Tensor):  # to(tensor): torch would take its device and dtype; we take the device
            device, non_blocking = other.device, bool(args[1] if len(args) > 1 else kwargs.get("non_blocking", False))
        else:
            try:
                device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"QuantizedWeight.to(): {e}") from None
            if dtype is not None:
                raise TypeError(
                    f"QuantizedWeight.to() moves devices only; got dtype={dtype}. The packed codes and the "
                    "scales keep the dtypes the format fixes (use qw.dequantize(dtype) for a dense weight in "
                    "another dtype)"
                )
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        out = QuantizedWeight(**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in moved}, **moved)
        return out

    def cuda(self, device=None) -> "QuantizedWeight":
        return self.to(device if device is not None else "cuda")

    def cpu(self) -> "QuantizedWeight":
        return self.to("cpu")

    # ---- serialization --------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "layout_version": LAYOUT_VERSION,
            "fmt": self.fmt,
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def state_dict(self, prefix: str = "") -> dict:
        """Tensors only (the config travels as a uint8 JSON tensor), so it round-trips through
        ``safetensors.torch.save_file`` and ``torch.save`` alike."""
        sd = {prefix + name: t.contiguous() for name, t in self.tensors().items()}
        sd[prefix + CONFIG_KEY] = torch.frombuffer(bytearray(json.dumps(self.config()).encode()), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", source: str = "state dict") -> "QuantizedWeight":
        key = prefix + CONFIG_KEY
        if key not in sd:
            raise ValueError(f"{source}: no '{key}' entry; this is not a qlk QuantizedWeight state dict")
        try:
            cfg = json.loads(bytes(sd[key].cpu().tolist()).decode())
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raise ValueError(f"{source}: '{key}' is not valid qlk config JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: '{key}' holds {type(cfg).__name__}, not a qlk config object")
        version = cfg.get("layout_version")
        if version != LAYOUT_VERSION:
            raise ValueError(
                f"{source}: written with qlk packed-layout version {version}, this qlk reads version "
                f"{LAYOUT_VERSION}; re-quantize the model or use the qlk release that wrote it"
            )
        missing = [k for k in ("fmt", "shape", "bits", "group_size", "dtype") if k not in cfg]
        if missing:
            raise ValueError(f"{source}: '{key}' lacks {missing}; the file is truncated or not written by qlk")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"{source}: dtype={cfg['dtype']!r} in '{key}'; allowed: {sorted(_DTYPES)}")
        shape = cfg["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise ValueError(f"{source}: shape={shape!r} in '{key}'; expected [out_features, in_features]")
        tensors = {name: sd[prefix + name] for name in _TENSOR_FIELDS if prefix + name in sd}
        if "qweight" not in tensors:
            raise ValueError(f"{source}: missing '{prefix}qweight'")
        qw = cls(
            fmt=cfg["fmt"], shape=tuple(cfg["shape"]), bits=cfg["bits"], group_size=cfg["group_size"],
            dtype=_DTYPES[cfg["dtype"]], **tensors,
        )  # fmt: skip
        validate(qw, source)
        return qw

    # ---- launch memo (host time) -------------------------------------------------------------
    def launch_memo(self) -> dict:
        """A dict the kernel launchers keep derived facts of this weight in (whether the kernels read
        it, their argument tuples), so that repeated calls with the same object skip recomputing
        them (round 37: host time). It holds while the fields are what they were when it was made:
        the same tensor objects (in-place writes keep it, a reassigned field empties it) and the same
        format fields. Not a field: not compared, copied, pickled or saved. What goes in must
        depend on nothing else (no tensor data, no device state)."""
        current = (self.fmt, self.bits, self.group_size, self.shape)
        memo = self.__dict__.get("_launch_memo")
        if memo is not None and memo["_format"] == current:
            q, s, b, a, a_scale, a_offset, perm = memo["_tensors"]  # the order of _TENSOR_FIELDS
            if (self.qweight is q and self.scales is s and self.biases is b and self.absmax is a
                    and self.absmax_scale is a_scale and self.absmax_offset is a_offset and self.perm is perm):
                return memo
        memo = {"_format": current, "_tensors": tuple(getattr(self, name) for name in _TENSOR_FIELDS)}
        self.__dict__["_launch_memo"] = memo
        return memo

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_launch_memo", None)
        return state

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        perm = ", act_order" if self.perm is not None else ""
        return (
            f"QuantizedWeight(fmt={self.fmt!r}, bits={self.bits}, group_size={self.group_size}, "
            f"shape={self.shape}{dq}{perm}, bits_per_param={self.bits_per_param:.3f}, device={self.device})"
        )


def validate(qw: QuantizedWeight, source: str = "QuantizedWeight") -> None:
    """Check that the tensors agree with the declared format and shape; raise naming the field."""
    from .._checks import check_tensor
    from .packing import words_per_row

    from .._checks import check_format, check_group_size, check_int_bits

    n, k = qw.shape
    check_format(qw.fmt)
    device = qw.qweight.device if isinstance(qw.qweight, torch.Tensor) else None
    if qw.fmt == "int":
        check_int_bits(qw.bits)
        check_group_size(k, qw.group_size, what=f"{source} of shape {qw.shape}")
        g = k // qw.group_size
        check_tensor(qw.qweight, f"{source}.qweight", torch.int32, (n, words_per_row(k, qw.bits)))
        float_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        check_tensor(qw.scales, f"{source}.scales", float_dtypes, (n, g), device=device)
        check_tensor(qw.biases, f"{source}.biases", float_dtypes, (n, g), device=device)
    elif qw.fmt == "nf4":
        from .nf4 import BLOCKSIZES

        if qw.bits != 4 or qw.group_size not in BLOCKSIZES:
            raise ValueError(f"{source}: NF4 needs bits=4 and a blocksize in {BLOCKSIZES}; got bits={qw.bits}, "
                             f"group_size={qw.group_size}")
        blocks = -(-n * k // qw.group_size)
        check_tensor(qw.qweight, f"{source}.qweight", torch.uint8, ((n * k + 1) // 2,))
        if qw.absmax_scale is None:
            check_tensor(qw.absmax, f"{source}.absmax", torch.float32, (blocks,), device=device)
        else:
            check_tensor(qw.absmax, f"{source}.absmax", torch.uint8, (blocks,), device=device)
            check_tensor(qw.absmax_scale, f"{source}.absmax_scale", torch.float32, (-(-blocks // 256),), device=device)
            check_tensor(qw.absmax_offset, f"{source}.absmax_offset", torch.float32, (1,), device=device)
    if qw.perm is not None:
        check_tensor(qw.perm, f"{source}.perm", torch.int64, (k,), device=device)
        if qw.perm.device.type != "meta" and not torch.equal(torch.sort(qw.perm).values, torch.arange(k, device=qw.perm.device)):
            raise ValueError(f"{source}.perm is not a permutation of range({k})")

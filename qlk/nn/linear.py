"""`QuantLinear`: the one qlk layer — a frozen quantized weight, an optional frozen bias and an
optional adapter (QA-LoRA or LoRA) trained on top.

The packed tensors of the :class:`~qlk.formats.QuantizedWeight` are registered as buffers
(``weight_packed``, ``weight_scales``, ``weight_biases``, ``weight_absmax``, ...), so
``.to(device)``, ``state_dict()`` and ``load_state_dict()`` work as for any module; the
:attr:`QuantLinear.qweight` property rebuilds the ``QuantizedWeight`` view over them. A dtype
cast of the module (``model.half()``, ``model.to(torch.bfloat16)``) moves these buffers but never
changes their dtypes, which the format fixes. Adapters (``lora_A``, ``lora_B``) are ordinary
parameters, fp32 by default whatever the activations' dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import reference
from .._checks import (
    check_adapter_hyperparameters, check_bias, check_finite, check_format, check_group_size, check_int_bits, check_quantized_weight,
)  # fmt: skip
from ..autograd import lora_linear, qalora_linear, quant_linear
from ..formats import QuantizedWeight, words_per_row
from ..formats.nf4 import NESTED_BLOCKSIZE
from ..formats.quantized_weight import validate

METHODS = ("qalora", "lora")
#: QuantizedWeight field -> buffer name
BUFFERS = {
    "qweight": "weight_packed", "scales": "weight_scales", "biases": "weight_biases", "absmax": "weight_absmax",
    "absmax_scale": "weight_absmax_scale", "absmax_offset": "weight_absmax_offset", "perm": "weight_perm",
}  # fmt: skip


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, [in, out]."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an ``nn.Linear`` or a ``Conv1D`` (a view, not a copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def adapter_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """σ = alpha / r, or alpha / √r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class PackedWeightModule(nn.Module):
    """A module holding a packed quantized weight as the buffers of :data:`BUFFERS` (its
    ``qweight`` property assembles the :class:`QuantizedWeight`): ``.to(dtype)`` / ``.half()``
    move those buffers but never cast them, since codes, scales and absmax have format-fixed dtypes."""

    def _packed_shape(self) -> tuple[int, int]:
        """(rows, in_features) of the whole packed weight (stacked experts: E·N rows)."""
        raise NotImplementedError

    def _set_qweight(self, qw: QuantizedWeight) -> None:
        if qw.shape != self._packed_shape():
            raise ValueError(f"new weight has shape {qw.shape}, layer is {self._packed_shape()}")
        self.fmt, self.bits, self.group_size, self.weight_dtype = qw.fmt, qw.bits, qw.group_size, qw.dtype
        tensors = qw.tensors()
        for field, name in BUFFERS.items():
            if field in tensors:
                self.register_buffer(name, tensors[field])
            elif name in self._buffers:
                del self._buffers[name]

    @property
    def qweight(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` view over this module's buffers (no copy). The same object
        while the buffers and the format are unchanged, so the launchers' memo
        (``QuantizedWeight.launch_memo``) carries from one forward to the next (round 37: host
        time); a new one once a buffer is replaced (``.to()``, ``_set_qweight``, assignment) or a
        field of the returned object was reassigned."""
        view = self.__dict__.get("_qweight_view")
        if view is not None and self._view_current(view):
            return view
        tensors = {field: self._buffers[name] for field, name in BUFFERS.items() if name in self._buffers}
        view = QuantizedWeight(fmt=self.fmt, shape=self._packed_shape(), bits=self.bits, group_size=self.group_size,
                               dtype=self.weight_dtype, **tensors)  # fmt: skip
        self.__dict__["_qweight_view"] = view
        return view

    def _view_current(self, view: QuantizedWeight) -> bool:
        buffers = self._buffers
        return (view.fmt == self.fmt and view.bits == self.bits and view.group_size == self.group_size
                and view.dtype == self.weight_dtype and view.shape == self._packed_shape()
                and all(getattr(view, field) is buffers.get(name) for field, name in BUFFERS.items()))

    @property
    def bits_per_param(self) -> float:
        return self.qweight.bits_per_param

    def _apply(self, fn, recurse=True):
        packed = {name: self._buffers.pop(name) for name in BUFFERS.values() if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in packed.items():
                moved = fn(t)
                if moved.dtype != t.dtype:
                    moved = t.to(moved.device)
                self._buffers[name] = moved
        return self


class QuantLinear(PackedWeightModule):
    """Y = X·Ŵᵀ (+ bias) (+ adapter), Ŵ quantized and frozen.

    method=None: the quantized base alone (inference, or a merged QA-LoRA layer).
    method="qalora": Y += σ·D(P(X))·Aᵀ·Bᵀ with P the mean over each quantization group;
        A [r, in/group_size]. INT base only (its adapter merges into the per-group biases).
    method="lora": Y += σ·D(X)·Aᵀ·Bᵀ, A [r, in]; INT or NF4 base (QLoRA on NF4).
    σ = alpha/r (alpha/√r with ``use_rslora``), D dropout with probability ``dropout`` in training.
    Adapters start as PEFT's: A ~ kaiming_uniform(a=√5), B = 0, so a fresh adapter changes nothing.
    ``kind`` remembers whether the layer came from an ``nn.Linear`` or a GPT-2 ``Conv1D`` so
    :meth:`to_dense` gives the same kind back.
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        method: str | None = None,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        kind: str = "linear",
    ):
        super().__init__()
        check_quantized_weight(qweight, "QuantLinear.qweight")
        validate(qweight, "QuantLinear.qweight")
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.kind = kind
        self._set_qweight(qweight)
        if bias is not None:
            check_bias(bias, self.out_features, qweight.device, "QuantLinear bias")
            check_finite(bias, "QuantLinear bias")  # a frozen NaN bias would poison every output
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.method = None
        self.remove_adapter()  # sets the adapter attributes to "none"
        if method is not None:
            self.add_adapter(method, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, dtype=adapter_dtype)

    # ---- the quantized weight ------------------------------------------------------------------
    def _packed_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # ---- adapter ---------------------------------------------------------------------------------
    def add_adapter(
        self, method: str, r: int = 16, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        """Attach a fresh adapter (A kaiming-uniform, B zeros): the layer's output is unchanged."""
        if self.method is not None:
            raise ValueError(f"this layer already has a {self.method!r} adapter")
        check_adapter_args(method, r, alpha, dropout, self.fmt)
        if method == "qalora":
            check_group_size(self.in_features, self.group_size, what="QA-LoRA layer")
            a_cols = self.in_features // self.group_size
        else:
            a_cols = self.in_features
        device = self.weight_packed.device
        self.lora_A = nn.Parameter(torch.empty(r, a_cols, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.method, self.r, self.lora_alpha, self.use_rslora = method, r, float(alpha), use_rslora
        self.dropout, self.scaling = float(dropout), adapter_scaling(r, alpha, use_rslora)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """PEFT's init: A ~ kaiming_uniform(a=√5), B = 0."""
        if self.method is None:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def remove_adapter(self) -> None:
        if self.method is not None:
            del self.lora_A, self.lora_B
        self.method, self.r, self.lora_alpha, self.use_rslora = None, 0, 0.0, False
        self.dropout = self.scaling = 0.0

    def adapter_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The adapter as a dense update ΔW [out, in] (zeros without one), in the input order.

        LoRA: σ·B·A. QA-LoRA: (σ/g)·(B·A)[n, j(k)] — constant within each stored group.
        """
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if self.method is None:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.weight_packed.device)
        ba = self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)
        if self.method == "lora":
            return (self.scaling * ba).to(dtype)
        delta = (self.scaling / self.group_size) * reference.expand_groups(ba, self.group_size)
        return reference.from_stored_order(delta, self.qweight).to(dtype)

    @torch.no_grad()
    def merge_adapter_(self) -> None:
        """Fold a QA-LoRA adapter into the per-group biases (exact; codes, bits and format unchanged)
        and drop it. LoRA cannot merge into a quantized weight: see :meth:`to_dense`."""
        if self.method is None:
            return
        if self.method != "qalora":
            raise ValueError(
                f"a {self.method!r} adapter on a {self.fmt!r} base cannot merge exactly into the quantized weight "
                "(σ·B·A varies inside a quantization group); use to_dense() for a dense layer with Ŵ + σ·B·A"
            )
        self._set_qweight(reference.qalora_merge(self.qweight, self.lora_A, self.lora_B, self.scaling))
        self.remove_adapter()

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense ``nn.Linear`` (or ``Conv1D``, as the layer came from) with weight Ŵ + ΔW_adapter.

        ``dtype`` defaults to the dtype of the weight that was quantized.
        """
        dtype = dtype or self.weight_dtype
        w = self.qweight.dequantize(torch.float32) + self.adapter_delta(torch.float32)
        device = self.weight_packed.device
        has_bias = self.bias is not None
        if self.kind == "conv1d":
            dense = _conv1d_class()(self.out_features, self.in_features)
            dense.to(device=device, dtype=dtype)
            dense.weight.copy_(w.t())
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=device, dtype=dtype)
            dense.weight.copy_(w)
        if has_bias:
            dense.bias.copy_(self.bias)
        elif self.kind == "conv1d":
            nn.init.zeros_(dense.bias)
        dense.requires_grad_(False)
        return dense

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # torch.compile: the qlk:: custom ops (qlk/custom_ops.py)
            return _compiled_forward(self, x)
        qw = self.qweight
        if self.method is None:
            return quant_linear(x, qw, self.bias)
        p = self.dropout if self.training else 0.0
        fn = qalora_linear if self.method == "qalora" else lora_linear
        return fn(x, qw, self.lora_A, self.lora_B, self.scaling, self.bias, p)

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={self.fmt!r}, bits={self.bits}, group_size={self.group_size}, method={self.method!r}"
        )
        if self.method is not None:
            s += f", r={self.r}, alpha={self.lora_alpha:g}"
            if self.use_rslora:
                s += ", rslora=True"
            if self.dropout:
                s += f", dropout={self.dropout:g}"
        return s

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        bits: int = 4,
        group_size: int | None = None,
        fmt: str = "int",
        double_quant: bool = True,
        method: str | None = "qalora",
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype = torch.float16,
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` or GPT-2 ``Conv1D`` (on its own device) into a QuantLinear."""
        from ..ops import quantize

        conv = is_conv1d(module)
        if not (conv or isinstance(module, nn.Linear)):
            raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")
        w = dense_weight(module).detach()
        if type(w).__name__ == "DTensor":  # qlk.integrations.distributed explains the order
            raise ValueError(
                f"cannot quantize a sharded weight (a DTensor, placements {getattr(w, 'placements', '?')}): "
                "torch.distributed fully_shard / tensor parallelism ran before qlk.patch_model. Patch the "
                "unsharded model first, then fully_shard it (see qlk.integrations.check_fsdp)"
            )
        w = w.contiguous() if conv else w
        qw = quantize(w, bits=bits, group_size=group_size, fmt=fmt, double_quant=double_quant, scale_dtype=scale_dtype)
        return cls(
            qw, bias=module.bias, method=method, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            adapter_dtype=adapter_dtype, kind="conv1d" if conv else "linear",
        )  # fmt: skip

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 32,
        fmt: str = "int",
        double_quant: bool = True,
        bias: bool = False,
        weight_dtype: torch.dtype = torch.float16,
        scale_dtype: torch.dtype = torch.float16,
        act_order: bool = False,
        device=None,
        **adapter_kwargs,
    ) -> "QuantLinear":
        """A layer with uninitialized packed tensors of the right shapes, to load a state dict into
        (no quantization work)."""
        return cls(
            empty_qweight(out_features, in_features, bits, group_size, fmt, double_quant, weight_dtype, scale_dtype,
                          act_order, device),
            bias=torch.zeros(out_features, dtype=weight_dtype, device=device) if bias else None,
            **adapter_kwargs,
        )  # fmt: skip


def _compiled_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """:meth:`QuantLinear.forward` under ``torch.compile``: the ``qlk::`` custom ops
    (qlk/custom_ops.py), which run the eager autograd Functions' own implementation (QA-LoRA: the
    fused folded-bias kernels) behind an op Dynamo traces without a graph break. The compute-dtype
    cast happens here, in the graph, so autograd casts dX back to x's dtype as eager does."""
    from .. import custom_ops  # registers torch.ops.qlk.*
    from ..autograd.lora import compute_dtype

    tensors = tuple(layer._buffers.get(BUFFERS[f]) for f in custom_ops.FIELDS)
    attrs = (layer.fmt, layer.bits, layer.group_size, layer.out_features, layer.in_features,
             str(layer.weight_dtype).removeprefix("torch."))  # fmt: skip
    cd = compute_dtype(x)
    x_c = x.to(cd)
    bias = None if layer.bias is None else layer.bias.to(cd)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if layer.method is None:
            return torch.ops.qlk.quant_matmul(x_c, *tensors, bias, *attrs)
        p = layer.dropout if layer.training else 0.0
        op = torch.ops.qlk.qalora_linear if layer.method == "qalora" else torch.ops.qlk.lora_linear
        return op(x_c, *tensors, layer.lora_A, layer.lora_B, bias, float(layer.scaling), float(p), *attrs)[0]


def check_adapter_args(method, r, alpha, dropout, fmt: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {METHODS} (or None for no adapter)")
    check_adapter_hyperparameters(r, alpha, dropout)
    if method == "qalora" and fmt != "int":
        raise ValueError(
            f"method='qalora' needs fmt='int' (its adapter merges into the INT per-group biases); got fmt={fmt!r}. "
            "Use method='lora' (QLoRA) on an NF4 base"
        )


def empty_qweight(n, k, bits, group_size, fmt, double_quant, weight_dtype, scale_dtype, act_order, device):
    """A QuantizedWeight of uninitialized tensors with the shapes and dtypes the format asks for."""
    check_format(fmt)
    kw = dict(device=device)
    if fmt == "int":
        check_int_bits(bits)
        check_group_size(k, group_size)
        g = k // group_size
        qw = QuantizedWeight(
            fmt="int", shape=(n, k), bits=bits, group_size=group_size, dtype=weight_dtype,
            qweight=torch.zeros(n, words_per_row(k, bits), dtype=torch.int32, **kw),
            scales=torch.zeros(n, g, dtype=scale_dtype, **kw), biases=torch.zeros(n, g, dtype=scale_dtype, **kw),
        )  # fmt: skip
    else:
        blocks = -(-n * k // group_size)
        qw = QuantizedWeight(
            fmt="nf4", shape=(n, k), bits=4, group_size=group_size, dtype=weight_dtype,
            qweight=torch.zeros((n * k + 1) // 2, dtype=torch.uint8, **kw),
        )  # fmt: skip
        if double_quant:
            qw.absmax = torch.zeros(blocks, dtype=torch.uint8, **kw)
            qw.absmax_scale = torch.zeros(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, **kw)
            qw.absmax_offset = torch.zeros(1, dtype=torch.float32, **kw)
        else:
            qw.absmax = torch.zeros(blocks, dtype=torch.float32, **kw)
    if act_order:
        qw.perm = torch.arange(k, dtype=torch.int64, **kw)
    return qw

"""Mixture-of-experts layers: quantized stacked experts with per-expert (or shared) adapters.

In Transformers 5 the experts of a MoE block are one module holding 3-D parameters, e.g.
``MixtralExperts``: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``. Every such class
built with ``transformers.integrations.moe.use_experts_implementation`` (Mixtral, Qwen2/3-MoE,
OLMoE, gpt-oss, DeepSeek-V3, ... 60+ models) describes its layout in attributes the decorator
sets: ``has_gate`` (``gate_up_proj`` vs ``up_proj``), ``is_transposed`` (weights [E, in, out] as
gpt-oss, else [E, out, in]), ``has_bias`` (``<proj>_bias`` [E, out]) and ``has_post_expert_norm``.
:func:`expert_spec` recognises a module by that structure, not by class name, so a new model built
the same way is patched without new code. Anything else holding 3-D weights is reported by
:func:`qlk.moe.unhandled_weights`, never silently left dense.

:class:`QuantExperts` replaces such a module. It keeps the model's routing (the router, top-k and
weights are computed outside, as before) and the model's own gating: its forward is the
decorator's grouped contract,

    for each routed pair (t, i), e = top_k_index[t, i]:
        h   = X[t]·Ŵ_gate_up,eᵀ (+ b)          one grouped GEMM over the rows sorted by expert
        a   = gate(h)                          the experts module's own ``_apply_gate`` (or act_fn)
        o   = a·Ŵ_down,eᵀ (+ b)                a second grouped GEMM
        Y[t] += top_k_weights[t, i]·o          (pairs routed to e >= E, expert-parallel sentinels, add 0)

with each projection a :class:`QuantExpertProj`: one :class:`~qlk.formats.QuantizedWeight` for all
experts, [E·N, K] (expert e = rows e·N ..), so every format, the kernels' tile decoder and the IO
are the dense layer's.

At decode (no autograd graph, the Triton backend, a routing that fits one program) the glue around
the two grouped GEMMs is two launches: the routing also writes each sorted row's token and each
pair's row (:func:`qlk.kernels.routing.route_pairs`), and the weighted sum back to token order is one
kernel (:func:`qlk.kernels.moe_combine.combine`); training keeps the torch glue and its autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import backend
from .._checks import check_group_size
from ..autograd.experts import grouped_experts_linear
from ..formats import QuantizedWeight
from ..formats.quantized_weight import validate
from .linear import BUFFERS, METHODS, PackedWeightModule, adapter_scaling, check_adapter_args, empty_qweight


@dataclass
class ExpertSpec:
    """How a Transformers experts module stores its weights (see the module docstring)."""

    num_experts: int
    projections: tuple  # parameter names, in call order: ("gate_up_proj", "down_proj") or ("up_proj", "down_proj")
    transposed: bool  # weights stored [E, in, out]
    has_bias: bool


def expert_spec(module: nn.Module) -> ExpertSpec | None:
    """The layout of ``module`` if it is a Transformers experts module qlk can quantize, else None."""
    params = dict(module.named_parameters(recurse=False))
    if not any(p.dim() == 3 for p in params.values()):
        return None
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias", "num_experts")):
        return None  # not the use_experts_implementation contract: reported by qlk.moe.unhandled_weights
    e = module.num_experts
    projections = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    expected = set(projections) | ({f"{p}_bias" for p in projections} if module.has_bias else set())
    if set(params) != expected or not isinstance(e, int):
        return None
    for p in projections:
        w = params[p]
        if w.dim() != 3 or w.shape[0] != e:
            return None
        if module.has_bias:
            out = w.shape[2] if module.is_transposed else w.shape[1]
            if tuple(params[f"{p}_bias"].shape) != (e, out):
                return None
    if module.has_gate and not callable(getattr(type(module), "_apply_gate", None)):
        return None
    if not module.has_gate and not callable(getattr(module, "act_fn", None)):
        return None
    if getattr(module, "has_post_expert_norm", False) and not hasattr(module, "post_expert_norm"):
        return None
    return ExpertSpec(e, projections, bool(module.is_transposed), bool(module.has_bias))


def stacked_dense(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, out, in] (or [E, in, out] when ``transposed``) -> the stacked [E·out, in] that is quantized."""
    if transposed:
        weight = weight.transpose(1, 2)
    e, n, k = weight.shape
    return weight.reshape(e * n, k).contiguous()


class QuantExpertProj(PackedWeightModule):
    """One projection of E experts: Y_e = X_e·Ŵ_eᵀ (+ b_e) (+ adapter_e) on rows sorted by expert.

    Ŵ is one stacked QuantizedWeight [E·N, K] (buffers ``weight_packed``, ``weight_scales``, ...,
    as :class:`~qlk.QuantLinear`), ``bias`` [E, N] or None (frozen). Adapters:
    method="qalora": Y_e += σ·P(X_e)·A_eᵀ·B_eᵀ, A [E, r, K/g] (INT base; merges into the biases);
    method="lora":   Y_e += σ·D(X_e)·A_eᵀ·B_eᵀ, A [E, r, K]; B [E, N, r]. ``shared_adapter``: one
    A [1, r, ·], B [1, N, r] for every expert. σ = alpha/r (alpha/√r with rsLoRA).
    ``transposed``: the model stores this weight as [E, K, N] (gpt-oss); only :meth:`dense_weight`
    cares."""

    def __init__(self, qweight: QuantizedWeight, num_experts: int, bias: torch.Tensor | None = None,
                 transposed: bool = False, method: str | None = None, r: int = 16, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False, adapter_dtype: torch.dtype = torch.float32,
                 shared_adapter: bool = False):
        super().__init__()
        validate(qweight, "QuantExpertProj.qweight")
        if qweight.out_features % num_experts:
            raise ValueError(f"stacked weight of {qweight.out_features} rows is not {num_experts} experts")
        if qweight.perm is not None:
            raise ValueError("stacked expert weights carry no act-order permutation")
        self.num_experts = num_experts
        self.out_features, self.in_features = qweight.out_features // num_experts, qweight.in_features
        self.transposed = transposed
        self._set_qweight(qweight)
        if bias is not None:
            if tuple(bias.shape) != (num_experts, self.out_features):
                raise ValueError(f"expert bias has shape {list(bias.shape)}, expected [{num_experts}, {self.out_features}]")
            self.bias = nn.Parameter(bias.detach().to(qweight.device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.method = None
        self.remove_adapter()
        if method is not None:
            self.add_adapter(method, r, alpha, dropout, use_rslora, adapter_dtype, shared_adapter)

    # ---- the quantized weight ------------------------------------------------------------------
    def _packed_shape(self) -> tuple[int, int]:
        """The stacked [E·N, K] weight: expert e's rows are e·N .. e·N + N − 1."""
        return (self.num_experts * self.out_features, self.in_features)

    # ---- adapter ---------------------------------------------------------------------------------
    def add_adapter(self, method: str, r: int = 16, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, dtype: torch.dtype = torch.float32, shared: bool = False) -> None:
        """Fresh adapters (A kaiming-uniform per expert, B zeros): the output is unchanged."""
        if self.method is not None:
            raise ValueError(f"these experts already have a {self.method!r} adapter")
        check_adapter_args(method, r, alpha, dropout, self.fmt)
        if method == "qalora":
            check_group_size(self.in_features, self.group_size, what="QA-LoRA experts")
        cols = self.in_features // self.group_size if method == "qalora" else self.in_features
        ea = 1 if shared else self.num_experts
        device = self.weight_packed.device
        self.lora_A = nn.Parameter(torch.empty(ea, r, cols, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(ea, self.out_features, r, device=device, dtype=dtype))
        self.method, self.r, self.lora_alpha, self.use_rslora = method, r, float(alpha), use_rslora
        self.dropout, self.scaling, self.shared_adapter = float(dropout), adapter_scaling(r, alpha, use_rslora), shared
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """PEFT's init per expert: A ~ kaiming_uniform(a=√5) (fan-in = A's columns), B = 0."""
        if self.method is None:
            return
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.lora_A.shape[-1])  # kaiming_uniform(a=√5) on [r, cols]
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def remove_adapter(self) -> None:
        if self.method is not None:
            del self.lora_A, self.lora_B
        self.method, self.r, self.lora_alpha, self.use_rslora, self.shared_adapter = None, 0, 0.0, False, False
        self.dropout = self.scaling = 0.0

    def adapter_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW [E, N, K] of the adapters (zeros without): σ·B_e·A_e, or (σ/g)·expand_g(B_e·A_e)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        shape = (self.num_experts, self.out_features, self.in_features)
        if self.method is None:
            return torch.zeros(shape, dtype=dtype, device=self.weight_packed.device)
        ba = torch.matmul(self.lora_B.detach().to(acc), self.lora_A.detach().to(acc))
        if self.method == "qalora":
            ba = ba.repeat_interleave(self.group_size, dim=-1) / self.group_size
        return (self.scaling * ba).expand(shape).to(dtype)

    @torch.no_grad()
    def merge_adapter_(self) -> None:
        """Fold QA-LoRA adapters into every expert's group biases, b'_e = b_e + (σ/g)·B_e·A_e (exact;
        codes, format and bits unchanged), and drop them."""
        if self.method is None:
            return
        if self.method != "qalora":
            raise ValueError(f"a {self.method!r} adapter cannot merge exactly into a quantized ({self.fmt}) weight")
        qw = self.qweight
        delta = (self.scaling / self.group_size) * torch.matmul(self.lora_B.double(), self.lora_A.double())
        e, n = self.num_experts, self.out_features
        biases = qw.biases.double().reshape(e, n, -1) + delta.to(qw.biases.device)
        qw.biases = biases.reshape(e * n, -1).to(qw.biases.dtype)
        self._set_qweight(qw)
        self.remove_adapter()

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ + ΔW in the model's own layout ([E, N, K], or [E, K, N] when transposed)."""
        dtype = dtype or self.weight_dtype
        w = self.qweight.dequantize(torch.float32).reshape(self.num_experts, self.out_features, self.in_features)
        w = w + self.adapter_delta(torch.float32)
        return (w.transpose(1, 2) if self.transposed else w).contiguous().to(dtype)

    def expert(self, e: int) -> QuantizedWeight:
        """Expert ``e``'s [N, K] QuantizedWeight (views; NF4 absmax de-nested)."""
        from ..kernels.grouped_matmul import expert_weight

        return expert_weight(self.qweight, e, self.num_experts)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_rows: int | None = None,
                row_token: torch.Tensor | None = None, gate_up: bool = False) -> torch.Tensor:
        """x [S, K] rows sorted by expert, offsets [E+1] -> [S, N]. ``max_rows``: a bound on every
        expert's rows (the token count under top-k routing) or None: the kernels launch fewer spare
        tiles with it (checked on the device). ``row_token`` (int [S]) or None: sorted row s is row
        ``row_token[s]`` of x, then the tokens un-gathered [T, K]; ``gate_up``: -> silu(G)·U [S, N/2]
        of the output [G | U] (:func:`grouped_experts_linear`)."""
        if torch.compiler.is_compiling():
            if row_token is not None:
                x = x.index_select(0, row_token)
            y = self._compiled_forward(x, offsets, max_rows)
            if gate_up:
                gate, up = y.chunk(2, dim=-1)
                y = nn.functional.silu(gate) * up
            return y
        p = self.dropout if self.training else 0.0
        a = self.lora_A if self.method is not None else None
        b = self.lora_B if self.method is not None else None
        return grouped_experts_linear(x, self.qweight, offsets, self.num_experts, self.bias, a, b, self.scaling,
                                      self.method, p, max_rows, row_token, gate_up)

    def folds_adapter(self) -> bool:
        """Whether the grouped kernels run this projection with its QA-LoRA adapter folded into the
        group biases (INT weights, no dropout drawn: :func:`qlk.autograd.experts._fused`), which picks
        their tiles (:func:`qlk.kernels.grouped_matmul.tiles_for`'s ``folded``)."""
        return (self.method == "qalora" and self.qweight.fmt == "int"
                and not (self.training and self.dropout > 0))

    def _compiled_forward(self, x: torch.Tensor, offsets: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
        """:meth:`forward` under ``torch.compile``: the ``qlk::grouped_experts_linear`` op
        (qlk/custom_ops.py), which runs the eager Function's implementation (the grouped kernels) behind
        an op Dynamo traces without a graph break; the compute-dtype casts happen in the graph."""
        from .. import custom_ops  # registers torch.ops.qlk.*
        from ..autograd.lora import compute_dtype

        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"QuantExpertProj: x has shape {list(x.shape)}, expected [rows, {self.in_features}]")
        tensors = tuple(self._buffers.get(BUFFERS[f]) for f in custom_ops.FIELDS)
        attrs = (self.fmt, self.bits, self.group_size, self.num_experts * self.out_features, self.in_features,
                 str(self.weight_dtype).removeprefix("torch."))
        cd = compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(cd)
        a = self.lora_A if self.method is not None else None
        b = self.lora_B if self.method is not None else None
        p = self.dropout if self.training else 0.0
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, _, _ = torch.ops.qlk.grouped_experts_linear(x.to(cd), offsets, *tensors, bias, a, b, self.num_experts,
                                                           float(self.scaling), self.method or "", float(p), *attrs,
                                                           max_rows or 0)
        return y

    def extra_repr(self) -> str:
        s = (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, fmt={self.fmt!r}, bits={self.bits}, group_size={self.group_size}, "
             f"method={self.method!r}")
        if self.method is not None:
            s += f", r={self.r}, alpha={self.lora_alpha:g}" + (", shared_adapter=True" if self.shared_adapter else "")
        return s

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, bits: int = 4,
                   group_size: int | None = None, fmt: str = "int", double_quant: bool = True,
                   scale_dtype: torch.dtype = torch.float16, **adapter_kwargs) -> "QuantExpertProj":
        """Quantize a 3-D expert weight (on its device) as one stacked [E·N, K] weight."""
        from ..ops import quantize

        e = weight.shape[0]
        qw = quantize(stacked_dense(weight.detach(), transposed), bits=bits, group_size=group_size, fmt=fmt,
                      double_quant=double_quant, scale_dtype=scale_dtype)
        return cls(qw, e, bias=bias, transposed=transposed, **adapter_kwargs)

    @classmethod
    def empty(cls, num_experts: int, in_features: int, out_features: int, bits: int = 4, group_size: int = 32,
              fmt: str = "int", double_quant: bool = True, bias: bool = False,
              weight_dtype: torch.dtype = torch.float16, scale_dtype: torch.dtype = torch.float16,
              transposed: bool = False, device=None, **adapter_kwargs) -> "QuantExpertProj":
        """Uninitialized packed tensors of the right shapes, to load a state dict into."""
        qw = empty_qweight(num_experts * out_features, in_features, bits, group_size, fmt, double_quant,
                           weight_dtype, scale_dtype, False, device)
        b = torch.zeros(num_experts, out_features, dtype=weight_dtype, device=device) if bias else None
        return cls(qw, num_experts, bias=b, transposed=transposed, **adapter_kwargs)


def route(top_k_index: torch.Tensor, num_experts: int):
    """(order [S], offsets [E+1]) for the S = T·k routed pairs: pair order[j] is the j-th row when
    sorted by expert (stable); ids outside 0 .. E−1 (expert-parallel sentinels >= E, dropped slots
    < 0) sort last and belong to no expert. Device ops only. On the Triton backend a decode-sized
    routing is one launch (:func:`qlk.kernels.routing.route_rows`, round 38; the same result)."""
    ids = top_k_index.reshape(-1)
    if _routes_in_one_launch(ids, num_experts):
        from ..kernels import routing

        return routing.route_rows(ids, num_experts)
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(torch.int64)
    _, order = torch.sort(key, stable=True)
    # a scatter-add, not bincount: its output shape is known without reading the ids (torch.compile)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device).scatter_add_(
        0, key, torch.ones_like(key))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts[:num_experts], 0)
    return order, offsets


def _routes_in_one_launch(ids: torch.Tensor, num_experts: int) -> bool:
    """Whether :func:`route` takes the one-launch kernel: the Triton backend for ``ids``'s device, not
    under torch.compile (which traces the torch ops), and a routing that fits one program."""
    if torch.compiler.is_compiling():
        return False
    if not (ids.is_cuda or (ids.device.type == "cpu" and backend.TRITON_INTERPRETED)):
        return False
    if backend.resolve(ids.device) != "triton":
        return False
    from ..kernels import routing

    return routing.fits(ids.shape[0], num_experts)


class QuantExperts(nn.Module):
    """Drop-in for a Transformers experts module: same call, quantized stacked weights; see the module
    docstring for the math. Its projections are :class:`QuantExpertProj` children named as the
    original parameters (``gate_up_proj`` / ``up_proj``, ``down_proj``); the original module's
    sub-modules (``act_fn``, ``post_expert_norm``) are registered under their own names, and the
    original module (stripped of its 3-D weights) is kept, unregistered, for its gating function
    and for :meth:`to_dense`."""

    def __init__(self, original: nn.Module, spec: ExpertSpec, projections: dict):
        super().__init__()
        self.num_experts = spec.num_experts
        self.has_gate = spec.projections[0] == "gate_up_proj"
        self.has_post_expert_norm = bool(getattr(original, "has_post_expert_norm", False))
        self.spec = spec
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, proj in projections.items():
            self.add_module(name, proj)
        object.__setattr__(self, "_original", original)  # not a child: no state, not moved, not saved

    @property
    def projections(self) -> dict:
        return {name: getattr(self, name) for name in self.spec.projections}

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.has_gate:
            return type(self._original)._apply_gate(self._original, h)
        return self._original.act_fn(h)

    def _gate_is_silu_times_up(self) -> bool:
        """Whether the module's gate is transformers' default one, ``act_fn(gate) * up`` on the halves
        of the gate-up output, with SiLU as act_fn (Mixtral, Qwen2/3-MoE, OLMoE): the gate-up
        projection's kernel can then form silu(G)·U in its epilogue (``gate_up``; round 40). Any other
        gate (gpt-oss's clamped one, another activation, a patched forward) stays the model's own."""
        if not self.has_gate:
            return False
        try:
            from transformers.activations import SiLUActivation
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:
            return False
        act = getattr(self._original, "act_fn", None)
        return (type(self._original)._apply_gate is _default_apply_gate and "forward" not in vars(act)
                and getattr(type(act), "forward", None) in (SiLUActivation.forward, nn.SiLU.forward))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self._decodes_in_few_launches(hidden_states, top_k_index, top_k_weights):
            return self._decode_forward(hidden_states, top_k_index, top_k_weights)
        t, h = hidden_states.shape
        k = top_k_index.shape[-1]
        order, offsets = route(top_k_index, self.num_experts)
        x = hidden_states[order // k]
        first, down = (getattr(self, n) for n in self.spec.projections)
        # a token picks an expert at most once (top-k): no expert holds more than t rows
        out = down(self._activate(first(x, offsets, t)), offsets, t)
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        # rows past offsets[E] are the pairs of no expert (sentinels >= E, dropped ids < 0): they add
        # nothing, whatever weight the router gave them (NaN or inf included; 0·NaN would be NaN)
        routed = torch.arange(out.shape[0], device=out.device).unsqueeze(-1) < offsets[-1]
        out = torch.where(routed, out * weights, torch.zeros((), dtype=out.dtype, device=out.device))
        unsorted = torch.empty_like(out).index_copy_(0, order, out)
        return unsorted.view(t, k, h).sum(dim=1).to(hidden_states.dtype)

    def _decodes_in_few_launches(self, hidden_states, top_k_index, top_k_weights) -> bool:
        """Whether :meth:`forward` takes :meth:`_decode_forward`: a routing :func:`route` does in one
        launch (the Triton backend, not compiling, decode-sized), no autograd graph to record, and
        activations the fp32 combine does not round (fp64 keeps the general forward's fp64 sums)."""
        if hidden_states.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
        if not _routes_in_one_launch(top_k_index.reshape(-1), self.num_experts):
            return False
        return not (torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad
                                                 or any(p.requires_grad for p in self.parameters())))

    def _decode_forward(self, hidden_states, top_k_index, top_k_weights):
        """:meth:`forward`'s result with the glue around the two grouped GEMMs in two launches (round
        39): the routing also writes each sorted row's token and each pair's row
        (:func:`qlk.kernels.routing.route_pairs`), so the first projection's kernel reads each sorted
        row's token from the hidden states in place (``row_token``, round 40; LoRA's unfused
        adapter gathers the rows with one ``index_select``), its epilogue forms silu(G)·U where the
        gate is the default SiLU one (``gate_up``, round 40: :meth:`_gate_is_silu_times_up`; the
        model's own gate otherwise), and the weighted sum back to token order is one kernel
        (:func:`qlk.kernels.moe_combine.combine`, fp32 sums, rounded once) instead of ~10 torch ops."""
        from ..kernels import grouped_matmul, moe_combine, routing

        t = hidden_states.shape[0]
        first, down = (getattr(self, n) for n in self.spec.projections)
        pairs = top_k_index.numel()
        # the projections' tile map written by the routing launch (round 40); the BLOCK_M their launcher
        # picks (a wrong one only costs the map's own launch)
        block_m = grouped_matmul.tiles_for("fwd", pairs, self.num_experts, first.qweight,
                                           folded=first.folds_adapter(), device=hidden_states.device)["BLOCK_M"]
        _, offsets, token, position = routing.route_pairs(top_k_index.reshape(-1), self.num_experts,
                                                          top_k_index.shape[-1], block_m)
        gate_up = self._gate_is_silu_times_up()
        h = first(hidden_states, offsets, t, row_token=token, gate_up=gate_up)
        out = down(h if gate_up else self._activate(h), offsets, t)
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        return moe_combine.combine(out.contiguous(), position, top_k_weights, offsets, hidden_states.dtype)

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The original experts module holding Ŵ + ΔW (and the biases) as 3-D parameters again."""
        orig = self._original
        for name, proj in self.projections.items():
            w = proj.dense_weight(dtype)
            setattr(orig, name, nn.Parameter(w, requires_grad=False))
            if proj.bias is not None:
                setattr(orig, f"{name}_bias", nn.Parameter(proj.bias.detach().to(w.dtype), requires_grad=False))
        for name, child in self.named_children():
            if name not in self.spec.projections:
                setattr(orig, name, child)
        return orig

    @classmethod
    def from_experts(cls, module: nn.Module, spec: ExpertSpec, bits: int = 4, group_size: int | None = None,
                     fmt: str = "int", double_quant: bool = True, **adapter_kwargs) -> "QuantExperts":
        """Quantize every expert of ``module`` (projection by projection, releasing each dense weight)."""
        projections = {}
        for name in spec.projections:
            bias = getattr(module, f"{name}_bias") if spec.has_bias else None
            projections[name] = QuantExpertProj.from_dense(
                getattr(module, name), bias, spec.transposed, bits=bits, group_size=group_size, fmt=fmt,
                double_quant=double_quant, **adapter_kwargs)
            module._parameters.pop(name, None)
            if spec.has_bias:
                module._parameters.pop(f"{name}_bias", None)
        return cls(module, spec, projections)

    @classmethod
    def empty(cls, module: nn.Module, spec: ExpertSpec, layers: dict, device=None) -> "QuantExperts":
        """Uninitialized quantized experts for ``module`` as ``layers`` ({projection: kwargs of
        :meth:`QuantExpertProj.empty`}) says; ``module``'s 3-D weights are dropped."""
        projections = {}
        for name in spec.projections:
            projections[name] = QuantExpertProj.empty(device=device, **layers[name])
            module._parameters.pop(name, None)
            module._parameters.pop(f"{name}_bias", None)
        return cls(module, spec, projections)


def dims(module: nn.Module, spec: ExpertSpec, name: str) -> tuple[int, int]:
    """(in, out) of projection ``name`` of an experts module as the model stores it."""
    w = getattr(module, name)
    return (w.shape[1], w.shape[2]) if spec.transposed else (w.shape[2], w.shape[1])


__all__ = ["ExpertSpec", "expert_spec", "QuantExpertProj", "QuantExperts", "route", "stacked_dense", "dims", "METHODS"]

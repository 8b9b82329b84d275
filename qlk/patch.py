"""Patch any Hugging Face (or plain torch) model in place: its linear layers become qlk layers.

    model = qlk.patch_model(model, bits=4, group_size=32)      # QA-LoRA on INT4 g32
    ... train (only the adapters require grad) ...
    qlk.merge_model(model)                                     # still INT4, no adapter left

Every target layer is validated before any is modified, so a failed call leaves the model as it
was. Layers are then quantized one at a time on their own device, and each dense weight is
released right after, so the peak memory stays near the model's own.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ._checks import check_adapter_hyperparameters, check_format, check_int_bits, divisors_multiple_of_8
from .formats.int_group import SCALE_DTYPES as INT_SCALE_DTYPES
from .formats.int_group import SubnormalScaleWarning, check_int_quantizable
from .formats.nf4 import BLOCKSIZES as NF4_BLOCKSIZES
from .nn.linear import QuantLinear, check_adapter_args, dense_weight, is_conv1d

logger = logging.getLogger("qlk")

PATCH_METHODS = ("qalora", "lora", "qlora", None)
DEFAULT_GROUP_SIZE = {"int": 32, "nf4": 64}


# ---- helpers -----------------------------------------------------------------------------------
def qlk_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """{qualified name: QuantLinear} of every qlk layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _is_dense_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _in_out(module: nn.Module) -> tuple[int, int]:
    n, k = dense_weight(module).shape
    return k, n


def _output_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module called ``name`` is, under *every* name that reaches that module
    (a module shared by two parents is replaced once, so all its names see the same new layer)."""
    old = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    for m in model.modules():
        for key, sub in m._modules.items():
            if sub is old:
                m._modules[key] = new


def _linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every nn.Linear / Conv1D under every name that reaches it (a shared module
    appears once per name)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if _is_dense_linear(m)}


def _inside_attention(model: nn.Module) -> set[str]:
    """Names of the linear layers owned by an ``nn.MultiheadAttention``: it reads ``out_proj.weight``
    (a NonDynamicallyQuantizableLinear) directly and its in-projection is a bare parameter, so
    replacing the module breaks it. torch's own quantization leaves these alone; so does qlk."""
    owned = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.MultiheadAttention):
            owned.update(f"{name}.{sub}" if name else sub for sub, _ in m.named_modules(remove_duplicate=False) if sub)
    return owned


def _some_names(names, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def select_targets(model: nn.Module, target_modules=None) -> list[str]:
    """Names of the linear layers (``nn.Linear``, GPT-2 ``Conv1D``) that :func:`patch_model` replaces.

    ``target_modules=None``: all of them except the output head (``get_output_embeddings()`` or a
    layer named ``lm_head``). A list: layers whose name equals an entry or ends with ``.entry``
    (``["q_proj", "v_proj"]``). A string: a regular expression the full name must match.
    Never selected: the projections of an ``nn.MultiheadAttention`` (it reads their weights
    directly; torch's quantization leaves them alone too). A module reachable by several names is
    returned once (:func:`patch_model` replaces it under all of them).
    """
    all_linears = _linear_names(model)
    attention = _inside_attention(model)
    linears = [n for n in all_linears if n not in attention]
    if target_modules is None:
        head = _output_head(model)
        targets = [n for n in linears if not (head is not None and all_linears[n] is head) and n.rpartition(".")[2] != "lm_head"]
        if not targets:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear / Conv1D layer to patch besides its output head"
                + (f" (and the nn.MultiheadAttention projections, which qlk leaves alone: {_some_names(sorted(attention), 4)})"
                   if attention else "")
            )
        return _first_names(targets, all_linears)
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
    elif not (isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        raise TypeError(
            f"target_modules must be None, a list of names/suffixes or a regex string; got {target_modules!r}"
        )
    targets = [n for n in linears if _matches(n, target_modules)]
    if not targets:
        suffixes = sorted({n.rpartition(".")[2] for n in linears})
        inside = [n for n in sorted(attention) if _matches(n, target_modules)]
        note = (f" ({_some_names(inside, 4)} belong to an nn.MultiheadAttention, which qlk leaves unpatched as "
                "torch's quantization does)") if inside else ""  # fmt: skip
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear/Conv1D layer of {type(model).__name__}{note}. "
            f"Layer name suffixes available: {_some_names(suffixes)}; e.g. full names: {_some_names(linears, 4)}"
        )
    return _first_names(targets, all_linears)


def _first_names(targets: list[str], all_linears: dict) -> list[str]:
    """One name per module (the first that matched): a shared module is patched once."""
    seen, out = set(), []
    for n in targets:
        if id(all_linears[n]) not in seen:
            seen.add(id(all_linears[n]))
            out.append(n)
    return out


def _skipped_attention(model: nn.Module, target_modules) -> list[str]:
    """The nn.MultiheadAttention projections the targeting rule would have picked (to report them)."""
    inside = sorted(n for n in _inside_attention(model) if _is_dense_linear(model.get_submodule(n)))
    if target_modules is None:
        return inside
    if isinstance(target_modules, str) or isinstance(target_modules, (list, tuple, set)):
        return [n for n in inside if _matches(n, target_modules)]
    return []


@dataclass
class TrainableSummary:
    """What :func:`trainable_parameters` counts. Quantized weights count as their out·in values."""

    trainable: int
    total: int
    quantized: int
    qlk_layers: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f} "
            f"|| quantized weights: {self.quantized:,} in {self.qlk_layers} qlk layers"
        )


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Trainable vs all parameters of ``model`` (quantized weights counted as their out·in values)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense = sum(p.numel() for p in model.parameters())
    layers = qlk_layers(model)
    quantized = sum(m.in_features * m.out_features for m in layers.values())
    from . import moe

    projections = moe.expert_projections(model)
    quantized += moe.quantized_count(model)
    return TrainableSummary(trainable, dense + quantized, quantized, len(layers) + len(projections))


# ---- patch -------------------------------------------------------------------------------------
def _resolve_method_fmt(method, fmt, bits, group_size):
    if method not in PATCH_METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {PATCH_METHODS}")
    if fmt is None:
        fmt = "nf4" if method == "qlora" else "int"
    check_format(fmt)
    if method == "qlora":
        if fmt != "nf4":
            raise ValueError(
                f"method='qlora' is LoRA on an NF4 base; got fmt={fmt!r}. Use method='lora' for LoRA on an INT base"
            )
        method = "lora"
    if fmt == "int":
        check_int_bits(bits)
    elif bits != 4:
        raise ValueError(f"fmt='nf4' is 4-bit; got bits={bits}")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE[fmt]
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive integer")
    if fmt == "int" and group_size % 8:
        raise ValueError(f"group_size={group_size} must be a multiple of 8 for fmt='int' (e.g. 32, 64, 128)")
    if fmt == "nf4" and group_size not in NF4_BLOCKSIZES:
        raise ValueError(f"group_size={group_size} is not an NF4 block size; allowed: {NF4_BLOCKSIZES}")
    return method, fmt, group_size


def _incompatibility(name, module, fmt, group_size, bits=4, scale_dtype=torch.float16) -> tuple[bool, str] | None:
    """(skippable, why) if layer ``name`` can't be patched, else None. Only a group size that
    doesn't divide in_features is skippable (``skip_incompatible``)."""
    w = dense_weight(module)
    if w.device.type == "meta":
        return False, f"layer '{name}': its weight is on the meta device (load real weights first)"
    k, _ = _in_out(module)
    if fmt == "int" and k % group_size:
        return True, f"layer '{name}': in_features={k} is not divisible by group_size={group_size}"
    if not torch.isfinite(w).all():
        return False, f"layer '{name}': its weight has NaN/Inf values; quantization needs finite weights"
    if module.bias is not None and not torch.isfinite(module.bias).all():
        return False, f"layer '{name}': its bias has NaN/Inf values (it would poison every output)"
    if fmt == "int":
        try:  # overflow / flushed fp16 scales: found now, so no layer is converted before the error
            check_int_quantizable(w, bits, group_size, scale_dtype)
        except ValueError as e:
            return False, f"layer '{name}': {e}"
    return None


def _group_size_hint(model: nn.Module, targets: list[str]) -> str:
    """The INT group sizes (multiples of 8, up to 256) that divide the in_features of *every* target,
    and how to leave the others dense instead."""
    widths = sorted({_in_out(model.get_submodule(n))[0] for n in targets})
    fit = [d for d in range(8, 257, 8) if all(k % d == 0 for k in widths)]
    sizes = (f"group sizes that divide every target layer's in_features {widths}: {fit}" if fit else
             f"no multiple of 8 up to 256 divides every target layer's in_features {widths}")  # fmt: skip
    return (f". {sizes}; or leave the layers that do not fit dense: skip_incompatible=True (Python) / "
            "--skip-incompatible (qlk quantize, qlk finetune)")


def patch_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = None,
    method: str | None = "qalora",
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules=None,
    fmt: str | None = None,
    use_rslora: bool = False,
    skip_incompatible: bool = False,
    double_quant: bool = True,
    adapter_dtype: torch.dtype = torch.float32,
    verbose: bool = True,
    requantize: bool = False,
    shared_expert_adapter: bool = False,
    progress: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> nn.Module:
    """Quantize the linear layers of ``model`` in place and attach trainable adapters.

    bits, fmt: INT-``bits`` (2, 3, 4) group quantization (fmt="int") or NF4 (fmt="nf4", 4-bit,
        double-quantized absmax when ``double_quant``). fmt=None: "nf4" for method="qlora", else "int".
    group_size: inputs per (scale, bias) group for INT (default 32; must divide each layer's
        in_features), NF4 block size (default 64).
    method: "qalora" (QA-LoRA, INT base: merges exactly into the INT weight), "lora" (LoRA on an
        INT or NF4 base), "qlora" (LoRA on NF4: the QLoRA recipe), or None (quantize only).
    r, alpha, use_rslora, dropout: adapter rank, scaling alpha/r (alpha/√r with rsLoRA), dropout.
    target_modules: None (every nn.Linear / GPT-2 Conv1D but the output head), a list of names or
        name suffixes, or a regex string matched against full names.
    skip_incompatible: skip (with a warning) layers whose in_features group_size doesn't divide,
        instead of raising.
    shared_expert_adapter: MoE experts get one adapter shared by all experts of a projection
        instead of one per expert.

    Mixture-of-experts models (Transformers experts modules with stacked 3-D weights, recognised
    by structure: :mod:`qlk.nn.experts`): every expert is quantized too, with an adapter per
    expert; the routing stays the model's. Any weight-bearing module qlk does not understand is
    named, with its size, in a warning.

    requantize: bitsandbytes-loaded models (``BitsAndBytesConfig``). Their NF4 ``Linear4bit`` layers
        become qlk layers as they are (bit-exact, block size and double quantization kept) for
        method="qlora"/"lora"/None. Layers that no qlk format holds exactly (FP4, 8-bit; NF4 under
        method="qalora", another fmt or group_size) raise a ValueError naming them, unless
        ``requantize=True``: then they are dequantized and quantized again with these arguments
        (a second rounding). See :mod:`qlk.integrations.bnb_models`.
    scale_dtype: dtype of the INT scales and biases (float16; float32 for weights whose magnitudes
        overflow or underflow float16 — the error says when).

    All parameters but the adapters are frozen. Returns ``model``; prints the trainable-parameter
    summary when ``verbose`` (see :func:`trainable_parameters`); a progress bar over the layers when
    ``progress``.
    """
    if method is not None:  # before the group-size checks: a bad alpha must not get a group-size hint
        check_adapter_hyperparameters(r, alpha, dropout, use_rslora)
    from .integrations import bnb_models

    fmt_given, group_size_given = fmt, group_size
    method, fmt, group_size = _resolve_method_fmt(method, fmt, bits, group_size)
    if method is not None:
        check_adapter_args(method, r, alpha, dropout, fmt)
    from . import moe

    already = {**qlk_layers(model), **moe.quant_experts(model)}
    if already:
        raise ValueError(
            f"{type(model).__name__} is already patched by qlk ({len(already)} qlk layers, e.g. "
            f"'{next(iter(already))}'); patch a fresh model, or qlk.dequantize_model(model) first"
        )
    experts = moe.select_experts(model, target_modules)  # MoE experts with stacked 3-D weights (qlk/moe.py)
    try:
        targets = select_targets(model, target_modules)
    except ValueError:
        if not experts:
            raise
        targets = []
    attention_skipped = _skipped_attention(model, target_modules)
    if fmt == "int" and scale_dtype not in INT_SCALE_DTYPES:
        raise TypeError(f"scale_dtype={scale_dtype} is not supported; allowed: {INT_SCALE_DTYPES}")
    bnb_plan, found = bnb_models.plan_bnb_conversion(
        model, targets, method, fmt, bits, group_size, fmt_given, group_size_given, requantize
    )
    dense = [n for n in targets if n not in bnb_plan]
    found.update({n: _incompatibility(n, model.get_submodule(n), fmt, group_size, bits, scale_dtype) for n in dense})
    found.update({name: moe.incompatibility(name, model.get_submodule(name), spec, fmt, group_size)
                  for name, spec in experts.items()})
    found = {name: v for name, v in found.items() if v is not None}
    problems = {name: why for name, (_, why) in found.items()}
    hard = [name for name, (skippable, _) in found.items() if not skippable]
    if hard or (problems and not skip_incompatible):
        msgs = list(problems.values())
        more = "" if hard else _group_size_hint(model, targets)
        shown = "; ".join(msgs[:5]) + ("; ..." if len(msgs) > 5 else "")
        raise ValueError(f"cannot patch {len(msgs)} layer(s): {shown}{more}")
    if problems:
        warnings.warn(
            f"qlk.patch_model: skipping {len(problems)} layer(s) left dense: " + "; ".join(problems.values()),
            stacklevel=2,
        )
        targets = [n for n in targets if n not in problems]
        experts = {n: s for n, s in experts.items() if n not in problems}
        if not targets and not experts:
            raise ValueError("qlk.patch_model: every target layer is incompatible with group_size; nothing to patch")

    if attention_skipped:
        warnings.warn(
            f"qlk.patch_model: leaving {len(attention_skipped)} nn.MultiheadAttention projection(s) dense "
            f"({_some_names(attention_skipped, 4)}): the attention reads their weight directly, so they cannot "
            "be replaced (torch.ao.quantization skips them too)",
            stacklevel=2,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    imprecise = []
    if progress:
        from tqdm.auto import tqdm

        targets = tqdm(targets, desc="patch_model", unit="layer", leave=False)
    for name in targets:
        old = model.get_submodule(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if name in bnb_plan:
                new = bnb_models.convert_bnb_layer(
                    old, how=bnb_plan[name], bits=bits, group_size=group_size, fmt=fmt, double_quant=double_quant,
                    method=method, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype,
                )  # fmt: skip
            else:
                new = QuantLinear.from_dense(
                    old, bits=bits, group_size=group_size, fmt=fmt, double_quant=double_quant, method=method, r=r,
                    alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype,
                    scale_dtype=scale_dtype,
                )  # fmt: skip
        for w in caught:
            if issubclass(w.category, SubnormalScaleWarning):
                imprecise.append(f"'{name}' ({str(w.message).partition(': ')[2].partition(';')[0]})")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        new.train(old.training)
        _set_submodule(model, name, new)
        old._parameters["weight"] = None  # release the dense weight now, even if something still holds `old`
        del old, new
    moe.patch_experts(model, experts, bits=bits, group_size=group_size, fmt=fmt, double_quant=double_quant,
                      method=method, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                      adapter_dtype=adapter_dtype, shared_adapter=shared_expert_adapter)
    left = moe.unhandled_weights(model)
    if left:
        warnings.warn(
            f"qlk.patch_model: {len(left)} weight-bearing module(s) are left dense, neither quantized nor a linear "
            f"layer, embedding or router ({sum(c for _, _, c in left):,} parameters): "
            + _some_names(f"{n} {'/'.join('x'.join(map(str, s)) for s in shapes)} ({c:,})" for n, shapes, c in left),
            stacklevel=2,
        )
    if imprecise:
        warnings.warn(
            f"qlk.patch_model: {len(imprecise)} layer(s) have groups whose {scale_dtype} scales are subnormal and miss "
            f"the half-step error bound: {'; '.join(imprecise[:6])}{'; ...' if len(imprecise) > 6 else ''}",
            SubnormalScaleWarning,
            stacklevel=2,
        )
    model.qlk_config = dict(
        bits=bits, group_size=group_size, fmt=fmt, method=method, r=r, alpha=alpha, dropout=dropout,
        use_rslora=use_rslora, double_quant=double_quant, skip_incompatible=skip_incompatible,
        target_modules=sorted(target_modules) if isinstance(target_modules, (set, tuple)) else target_modules,
        skipped=sorted(problems) + attention_skipped, shared_expert_adapter=shared_expert_adapter,
        **({"scale_dtype": str(scale_dtype).removeprefix("torch.")} if scale_dtype != torch.float16 else {}),
    )  # fmt: skip
    if bnb_plan:
        model.qlk_config["from_bitsandbytes"] = dict(sorted(bnb_plan.items()))
        bnb_models.adopt_qlk_quantizer(model)
    summary = trainable_parameters(model)
    logger.info("qlk.patch_model: %s", summary)
    if verbose:
        print(summary)
    return model


# ---- merge / dequantize --------------------------------------------------------------------------
def _require_patched(model, what):
    from . import moe

    layers = qlk_layers(model)
    if not layers and not moe.quant_experts(model):
        raise ValueError(f"qlk.{what}: {type(model).__name__} has no qlk layer; call qlk.patch_model first")
    return layers


def merge_model(model: nn.Module, dense_lora: bool = False) -> nn.Module:
    """Fold the adapters into the model, in place; returns ``model``.

    QA-LoRA layers: b' = b + (σ/g)·B·A into the per-group biases (exact); the layer stays INT-N with
    the same codes and bits per parameter, and loses its adapter.
    LoRA layers (INT or NF4 base): σ·B·A is not constant within a quantization group, so it can't
    merge exactly into the quantized weight. ``dense_lora=True`` replaces each by a dense
    ``nn.Linear`` (``Conv1D`` for GPT-2) with Ŵ + σ·B·A in the original weight dtype; otherwise a
    ValueError is raised before anything is changed.
    """
    from . import moe

    layers = _require_patched(model, "merge_model")
    lora = [n for n, m in layers.items() if m.method == "lora"] + moe.lora_experts(model)
    if lora and not dense_lora:
        raise ValueError(
            f"{len(lora)} layer(s) carry LoRA adapters (e.g. '{lora[0]}'), which cannot merge exactly into a "
            "quantized (NF4/INT) weight: σ·B·A varies inside a quantization group. Pass dense_lora=True to "
            "replace them by dense layers with Ŵ + σ·B·A (more memory), or train with method='qalora', whose "
            "adapter merges exactly into the INT weight"
        )
    for name, m in layers.items():
        if m.method == "qalora":
            m.merge_adapter_()
        elif m.method == "lora":
            _set_submodule(model, name, m.to_dense())
    moe.merge_experts(model, dense_lora)
    if isinstance(getattr(model, "qlk_config", None), dict):  # saved files (and qlk inspect) say so
        model.qlk_config = {**model.qlk_config, "merged": True}
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every qlk layer by a dense ``nn.Linear`` (``Conv1D`` where it came from one) holding
    Ŵ plus its adapter's ΔW, in place; returns ``model``. The outputs stay the same up to the
    rounding of ``dtype`` (default: each layer's original weight dtype). The new weights are frozen."""
    from . import moe

    layers = _require_patched(model, "dequantize_model")
    for name, m in layers.items():
        _set_submodule(model, name, m.to_dense(dtype))
    moe.dequantize_experts(model, dtype)
    if hasattr(model, "qlk_config"):
        del model.qlk_config
    return model


#: ``unpatch`` is :func:`dequantize_model`
unpatch = dequantize_model

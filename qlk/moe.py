"""Mixture-of-experts support of :func:`qlk.patch_model` and the IO: finding, quantizing, merging,
saving and reporting the stacked experts of Transformers MoE models (:mod:`qlk.nn.experts`).

* :func:`find_experts` — every experts module qlk understands ({name: ExpertSpec}), by structure.
* :func:`unhandled_weights` — every weight-bearing module that is none of: a linear layer, an
  embedding, a qlk layer, understood experts or their router. ``patch_model`` warns with their
  names and sizes, so a model never comes out partly dense in silence.
* :func:`memory_bytes` — the bytes a MoE model's weights take per format, computed from the
  formats' bits (docs/moe.md).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .nn.experts import QuantExpertProj, QuantExperts, dims, expert_spec
from .nn.linear import QuantLinear, is_conv1d

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- finding -------------------------------------------------------------------------------------
def find_experts(model: nn.Module) -> dict:
    """{name: ExpertSpec} of the (dense) Transformers experts modules of ``model``."""
    return {name: spec for name, m in model.named_modules() if (spec := expert_spec(m)) is not None}


def quant_experts(model: nn.Module) -> dict:
    """{name: QuantExperts} of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}


def expert_projections(model: nn.Module) -> dict:
    """{qualified name: QuantExpertProj} of ``model`` (e.g. 'model.layers.0.mlp.experts.down_proj')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantExpertProj)}


def quantized_modules(model: nn.Module) -> dict:
    """{qualified name: QuantLinear or QuantExpertProj}: every module of ``model`` holding a qlk
    quantized weight (a model that has any is a qlk model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExpertProj))}


def quantized_counts(model: nn.Module) -> dict:
    """Counts for summaries: ``linear_layers`` (QuantLinear), ``expert_projections`` (QuantExpertProj),
    ``expert_matrices`` (Σ num_experts over the projections), ``quantized_params`` (out·in of each
    linear layer + E·N·K of each projection) and ``quantized_bytes`` (their packed weights, scales,
    biases and absmax state)."""
    linear = [m for m in model.modules() if isinstance(m, QuantLinear)]
    projs = list(expert_projections(model).values())
    return {
        "linear_layers": len(linear), "expert_projections": len(projs),
        "expert_matrices": sum(p.num_experts for p in projs),
        "quantized_params": sum(m.in_features * m.out_features for m in linear) + quantized_count(model),
        "quantized_bytes": sum(m.qweight.nbytes for m in linear) + sum(p.qweight.nbytes for p in projs),
    }  # fmt: skip


def describe_quantized(model: nn.Module) -> str:
    """'8 layers' or '8 layers + 4 expert projections (16 expert matrices)' for the CLI's summaries."""
    c = quantized_counts(model)
    text = f"{c['linear_layers']} layers"
    if c["expert_projections"]:
        text += f" + {c['expert_projections']} expert projections ({c['expert_matrices']} expert matrices)"
    return text


def select_experts(model: nn.Module, target_modules=None) -> dict:
    """The experts modules ``patch_model`` quantizes: all with target_modules=None, else those whose
    name, or the names of all their projections, match (as for linear layers: an entry equal to the
    name or a suffix after a dot, or a regex over the full name). The projections of one experts
    module are quantized together: naming only some of them is an error that says so."""
    found = find_experts(model)
    if target_modules is None:
        return found
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error:
            return {}  # select_targets names the bad expression
    elif not (isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        return {}  # select_targets says what is allowed

    def hit(name):
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in target_modules)

    out = {}
    for n, s in found.items():
        # the usual per-projection lists (q_proj, ..., gate_proj, up_proj, down_proj) name the fused
        # gate_up_proj through its two halves
        projs = [hit(f"{n}.{p}") or (p == "gate_up_proj" and hit(f"{n}.gate_proj") and hit(f"{n}.up_proj"))
                 for p in s.projections]
        if hit(n) or all(projs):
            out[n] = s
        elif any(projs):
            named = [p for p, h in zip(s.projections, projs) if h]
            raise ValueError(
                f"target_modules={target_modules!r} names {named} of the experts '{n}' but not all of its projections "
                f"{list(s.projections)}; qlk quantizes an experts module as a whole: name the module "
                f"('{n.rpartition('.')[2]}') or all of {list(s.projections)}")
    return out


def _is_router(name: str, module: nn.Module, experts: dict) -> bool:
    """A router: a sibling (or sibling's child) of an experts module whose 2-D weight is [E, hidden]."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    parent = name.rpartition(".")[0]
    for ename, num_experts in experts.items():
        eparent = ename.rpartition(".")[0]
        if (parent == eparent or parent.rpartition(".")[0] == eparent) and w.shape[0] == num_experts:
            return True
    return False


def unhandled_weights(model: nn.Module) -> list[tuple[str, tuple, int]]:
    """[(module name, shapes, parameter count)] of every module holding a parameter of 2 or more
    dimensions that qlk neither quantized nor knows to be dense by design (linear layers, whose
    selection ``target_modules`` decides; embeddings; routers of understood experts)."""
    experts = {n: m.num_experts for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    experts.update({n: s.num_experts for n, s in find_experts(model).items()})
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExpertProj, QuantExperts, nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            continue
        if is_conv1d(m):
            continue
        own = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        if not own or _is_router(name, m, experts):
            continue
        out.append((name, tuple(tuple(p.shape) for p in own), sum(p.numel() for p in own)))
    return out


def incompatibility(name: str, module: nn.Module, spec, fmt: str, group_size: int):
    """(skippable, why) if experts ``name`` cannot be quantized with these settings, else None."""
    for proj in spec.projections:
        w = getattr(module, proj)
        if w.device.type == "meta":
            return False, f"experts '{name}': {proj} is on the meta device (load real weights first)"
        k, _ = dims(module, spec, proj)
        if k % group_size or (fmt == "nf4" and k % 8):
            what = "group_size" if fmt == "int" else "the NF4 blocksize"
            return True, f"experts '{name}.{proj}': in_features={k} is not divisible by {what}={group_size}"
        if not torch.isfinite(w).all():
            return False, f"experts '{name}.{proj}': its weight has NaN/Inf values; quantization needs finite weights"
    return None


# ---- patch / merge / dequantize ----------------------------------------------------------------
def patch_experts(model: nn.Module, targets: dict, bits: int, group_size: int, fmt: str, double_quant: bool,
                  **adapter_kwargs) -> None:
    """Replace each experts module of ``targets`` ({name: spec}) by a QuantExperts, in place."""
    for name, spec in targets.items():
        old = model.get_submodule(name)
        new = QuantExperts.from_experts(old, spec, bits=bits, group_size=group_size, fmt=fmt,
                                        double_quant=double_quant, **adapter_kwargs)
        new.train(old.training)
        _set(model, name, new)


def _set(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def merge_experts(model: nn.Module, dense_lora: bool = False) -> None:
    """QA-LoRA experts: fold into every expert's biases (stays INT-N). LoRA experts: only with
    ``dense_lora`` (the experts module becomes dense again with Ŵ + ΔW)."""
    for name, m in quant_experts(model).items():
        methods = {p.method for p in m.projections.values()}
        if "lora" in methods:
            _set(model, name, m.to_dense())
        else:
            for p in m.projections.values():
                p.merge_adapter_()


def lora_experts(model: nn.Module) -> list[str]:
    return [n for n, m in quant_experts(model).items() if any(p.method == "lora" for p in m.projections.values())]


def dequantize_experts(model: nn.Module, dtype=None) -> None:
    for name, m in quant_experts(model).items():
        _set(model, name, m.to_dense(dtype))


def quantized_count(model: nn.Module) -> int:
    """Weights held quantized in expert projections (E·N·K each)."""
    return sum(p.num_experts * p.out_features * p.in_features for p in expert_projections(model).values())


# ---- IO metadata -----------------------------------------------------------------------------------
def proj_meta(p: QuantExpertProj) -> dict:
    meta = {
        "num_experts": p.num_experts, "in_features": p.in_features, "out_features": p.out_features,
        "fmt": p.fmt, "bits": p.bits, "group_size": p.group_size, "weight_dtype": _dtype_name(p.weight_dtype),
        "double_quant": "weight_absmax_scale" in p._buffers, "bias": p.bias is not None,
        "scale_dtype": _dtype_name(p.weight_scales.dtype) if p.fmt == "int" else None,
        "transposed": p.transposed, "method": p.method,
    }  # fmt: skip
    if p.method is not None:
        meta.update(r=p.r, alpha=p.lora_alpha, use_rslora=p.use_rslora, dropout=p.dropout,
                    shared_adapter=p.shared_adapter, adapter_dtype=_dtype_name(p.lora_A.dtype))
    return meta


def experts_meta(model: nn.Module, adapters_only: bool = False) -> dict:
    """{experts module name: {projection: proj_meta}} for the file header (only the projections
    with an adapter when ``adapters_only``)."""
    out = {}
    for n, m in quant_experts(model).items():
        projs = {p: proj_meta(q) for p, q in m.projections.items() if q.method is not None or not adapters_only}
        if projs:
            out[n] = projs
    return out


def _empty_kwargs(meta: dict) -> dict:
    kw = dict(num_experts=meta["num_experts"], in_features=meta["in_features"], out_features=meta["out_features"],
              bits=meta["bits"], group_size=meta["group_size"], fmt=meta["fmt"],
              double_quant=meta.get("double_quant", True), bias=meta["bias"],
              weight_dtype=_DTYPES[meta["weight_dtype"]], scale_dtype=_DTYPES[meta.get("scale_dtype") or "float16"],
              transposed=meta.get("transposed", False))
    if meta.get("method"):
        kw.update(method=meta["method"], r=meta["r"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0),
                  use_rslora=meta.get("use_rslora", False), shared_adapter=meta.get("shared_adapter", False),
                  adapter_dtype=_DTYPES[meta["adapter_dtype"]])
    return kw


def build_experts(model: nn.Module, saved: dict, source: str, device) -> dict:
    """Validate, then build empty QuantExperts for ``saved`` (experts_meta of a file) in ``model``
    (unpatched); returns {name: new module} without installing them."""
    specs = {}
    for name, projs in saved.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: saved for another model: experts '{name}' do not exist in "
                             f"{type(model).__name__}") from None
        spec = expert_spec(module)
        if spec is None or set(spec.projections) != set(projs):
            raise ValueError(f"{source}: '{name}' is a {type(module).__name__} here, not experts with projections "
                             f"{sorted(projs)}")
        for p, meta in projs.items():
            k, n = dims(module, spec, p)
            if (meta.get("num_experts"), meta.get("in_features"), meta.get("out_features")) != (spec.num_experts, k, n):
                raise ValueError(f"{source}: saved for another shape: experts '{name}.{p}' are "
                                 f"{meta.get('num_experts')}x[{meta.get('out_features')}, {meta.get('in_features')}] "
                                 f"in the file, {spec.num_experts}x[{n}, {k}] in this model")
        specs[name] = (module, spec)
    built = {}
    for name, (module, spec) in specs.items():
        try:
            layers = {p: _empty_kwargs(meta) for p, meta in saved[name].items()}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: bad qlk metadata for experts '{name}': {e}") from None
        built[name] = (module, spec, layers)
    return {name: QuantExperts.empty(module, spec, layers, device) for name, (module, spec, layers) in built.items()}


def install(model: nn.Module, built: dict) -> None:
    for name, new in built.items():
        new.train(new._original.training)
        _set(model, name, new)


# ---- memory of a real model, from the formats' bits -----------------------------------------------------
def format_bits(fmt: str, bits: int, group_size: int, double_quant: bool = True,
                scale_bits: int = 16) -> float:
    """Stored bits per weight of a format, from its definition (docs/formats.md):
    INT-b: b + 2·scale_bits/g (an fp16 scale and bias per group); NF4: 4 + 32/g (fp32 absmax per
    block), double-quantized 4 + 8/g + 32/(256·g) (uint8 code + fp32 scale per 256 blocks; plus one
    fp32 offset per tensor, not counted)."""
    if fmt == "int":
        return bits + 2 * scale_bits / group_size
    if double_quant:
        return 4 + 8 / group_size + 32 / (256 * group_size)
    return 4 + 32 / group_size


def memory_bytes(expert_params: int, other_linear_params: int, dense_params: int, fmt: str, bits: int,
                 group_size: int, double_quant: bool = True, dense_bits: int = 16) -> float:
    """Bytes of a patched model: experts and linear layers quantized, the rest (embeddings, norms,
    routers, head) in ``dense_bits``."""
    quantized = (expert_params + other_linear_params) * format_bits(fmt, bits, group_size, double_quant)
    return (quantized + dense_params * dense_bits) / 8


# ---- adapters IO ------------------------------------------------------------------------------------
def adapter_projections(model: nn.Module) -> dict:
    """{qualified name: QuantExpertProj} of the expert projections that carry an adapter."""
    return {n: p for n, p in expert_projections(model).items() if p.method is not None}


_ADAPTER_KEYS = ("method", "num_experts", "in_features", "out_features", "group_size", "r", "alpha", "use_rslora",
                 "shared_adapter")


def check_adapter_experts(model: nn.Module, saved: dict, source: str) -> dict:
    """The expert projections an adapter file (experts_meta ``saved``) loads into, after checking
    that the model's experts carry the same adapters; raises naming the difference."""
    have = {}
    for name, m in quant_experts(model).items():
        for p, proj in m.projections.items():
            if proj.method is not None:
                have[f"{name}.{p}"] = proj
    want = {f"{n}.{p}": meta for n, projs in saved.items() for p, meta in projs.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(
            f"{source}: expert adapters were saved for other experts: in the file but not adapter experts of this "
            f"model: {missing[:6] or 'none'}; adapter experts of this model not in the file: {extra[:6] or 'none'}")
    for name, proj in have.items():
        mine = proj_meta(proj)
        for key in _ADAPTER_KEYS:
            if want[name].get(key) != mine.get(key):
                raise ValueError(f"{source}: experts '{name}' were saved with {key}={want[name].get(key)!r}, this model "
                                 f"has {key}={mine.get(key)!r}; patch the model the same way")
    return have

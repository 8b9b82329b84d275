"""PEFT interop.

1. Plain PEFT on a qlk-quantized model (``qlk.patch_model(model, method=None)``, or a model loaded
   with :class:`qlk.QlkConfig`)::

       model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

   works unchanged, as on a bitsandbytes model: ``import qlk`` registers qlk's LoRA dispatch with
   PEFT (:func:`install`, done when peft is imported; see :mod:`qlk.integrations._peft_hook`). It
   sends each :class:`~qlk.QuantLinear` to :class:`QlkLoraLayer`, whose forward runs qlk's fused
   LoRA autograd (:func:`qlk.autograd.lora_linear`: the quantized base matmul and its transposed
   backward on the packed weight) for a single active adapter, and base + Σ adapters otherwise.
   ``merge_and_unload()`` gives dense layers holding Ŵ + σ·B·A (exact; see :meth:`QlkLoraLayer.merge`).
   :func:`get_peft_model` here (``cfg._register_custom_module({qlk.QuantLinear: QlkLoraLayer})``,
   PEFT's own custom-module API) does the same per config, without the global registration.

2. :func:`export_peft_adapter`: the adapters of a model trained with qlk (``method="lora"`` or
   ``"qalora"``) in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable
   with ``PeftModel.from_pretrained`` on the dense (or bitsandbytes) base model.
   * LoRA: exported as is (A [r, in], B [out, r], same alpha, rsLoRA, dropout).
   * QA-LoRA: A [r, in/g] acts on group means; it is expanded to the dense LoRA form
     A_full[:, k] = A[:, j(k)] / g (in input order, through the GPTQ act-order permutation if any),
     which gives exactly the same ΔW = σ·B·A_full. What does not carry over: the pooled-input
     structure (PEFT trains A_full as a free [r, in] matrix, so further training in PEFT leaves the
     group-constant subspace and the adapter no longer merges exactly into INT biases), the g× smaller
     saved activation, and QA-LoRA dropout (applied to P(X) in qlk; PEFT applies it to X).
     The file is g× larger in A. For inference on an INT model use :func:`qlk.merge_model` instead.
   * MoE experts (:class:`qlk.nn.QuantExperts`): PEFT adapts the 3-D expert parameters with
     ``LoraConfig(target_parameters=[...])`` (``lora.ParamWrapper``: W_e + σ·B_e·A_e per expert, the
     same ΔW as qlk's per-expert adapters); :func:`_expert_tensors` writes qlk's A [E, r, ·],
     B [E, N, r] in its layout. PEFT refuses ``lora_dropout`` on parameters, so a model with
     expert adapters exports only with dropout 0 (the export says so otherwise).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..autograd import lora_linear
from ..nn.experts import QuantExpertProj
from ..nn.linear import QuantLinear, is_conv1d

try:
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as e:  # pragma: no cover
    raise ImportError("qlk.integrations.peft needs peft (pip install peft)") from e


class QlkLoraLayer(nn.Module, LoraLayer):
    """PEFT LoRA layer on a qlk :class:`~qlk.QuantLinear` base (which must carry no qlk adapter)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1,
                 **kwargs):  # fmt: skip
        super().__init__()
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if isinstance(base, QuantLinear) and base.method is not None:
            raise ValueError(
                f"this QuantLinear already carries a qlk {base.method!r} adapter; PEFT adapters go on a quantize-only "
                "layer: qlk.patch_model(model, method=None)"
            )
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module):
        # PEFT's generic lookup warns "Unsupported layer type" for any layer it does not know by name
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config=None, **kwargs):
        if config is not None and (getattr(config, "use_dora", False) or getattr(config, "alora_invocation_tokens", None)):
            raise ValueError("qlk's PEFT layer supports plain LoRA (no DoRA / aLoRA variants)")
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # the adapters move to the packed weight's device and keep their own (fp32) dtype, as qlk's own layers
        base = self.get_base_layer()
        device = device or (base.weight_packed if isinstance(base, QuantLinear) else base.weight).device
        for name in self.adapter_layer_names:
            layer = getattr(self, name, None)
            if isinstance(layer, nn.ModuleDict) and adapter_name in layer:
                layer[adapter_name].to(device)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Merge adapters into the base, as ``merge_and_unload`` does: the quantized base is replaced by a
        dense layer (``nn.Linear``, or ``Conv1D`` where it came from one) in the dtype of the weight that
        was quantized, holding Ŵ + Σ σ·B·A computed in fp32 and rounded once. Exact up to that rounding:
        σ·B·A varies inside a quantization group, so it has no exact quantized form (bitsandbytes'
        PEFT layer requantizes to 4-bit instead, and warns of the rounding). ``unmerge`` restores the
        quantized base as it was. For a low-bit merged model train QA-LoRA (``qlk.patch_model(model,
        method="qalora")``) and use :func:`qlk.merge_model`, or quantize the merged model again.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if any(self.lora_bias.get(a, False) for a in adapter_names):
            raise ValueError("qlk's PEFT layer merges adapters without a LoRA bias (lora_bias=False) only")
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            w = base.qweight.dequantize(torch.float32)
        else:  # merged already: the dense layer of an earlier merge
            w = (base.weight.t() if is_conv1d(base) else base.weight).float()
        for a in adapter_names:
            w = w + self.scaling[a] * (self.lora_B[a].weight.float() @ self.lora_A[a].weight.float())
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem to be broken")
        with torch.no_grad():
            if isinstance(base, QuantLinear):
                object.__setattr__(self, "_qlk_quantized_base", base)  # not a submodule: not saved, not moved
                dense = base.to_dense()
                self.base_layer = dense
            else:
                dense = base
            dense.weight.copy_(w.t() if is_conv1d(dense) else w)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the quantized base a :meth:`merge` replaced (as it was, bit for bit)."""
        quantized = self.__dict__.pop("_qlk_quantized_base", None)
        if quantized is not None:
            self.base_layer = quantized
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if adapter_names is not None:
            raise ValueError("qlk's PEFT layer does not support mixed-batch adapter_names")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1 and not self.lora_bias.get(active[0], False):
            a = active[0]
            drop = self.lora_dropout[a]
            p = drop.p if isinstance(drop, nn.Dropout) and self.training else 0.0
            # qlk's fused LoRA autograd: base dequant-GEMM + adapter in one Function, dX on the packed weight
            return lora_linear(x, base.qweight, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a],
                               base.bias, p)  # fmt: skip
        result = self.base_layer(x, *args, **kwargs)
        for a in active:
            lora_A, lora_B = self.lora_A[a], self.lora_B[a]
            xa = self.lora_dropout[a](x.to(lora_A.weight.dtype))
            result = result + (lora_B(lora_A(xa)) * self.scaling[a]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "qlk." + super().__repr__()


_INSTALLED = False


def install() -> None:
    """Register qlk's LoRA dispatch with PEFT, process-wide (``import qlk`` does it; idempotent).

    PEFT 0.21 offers no global registry for LoRA layer types: its dispatchers are a fixed list inside
    ``LoraModel._create_new_module``, and the one extension point, ``LoraConfig._register_custom_module``,
    is per config (and lost when ``PeftModel.from_pretrained`` rebuilds the config from JSON). So two
    PEFT functions are wrapped; both change nothing for modules that are not qlk layers:

    * ``LoraModel._create_new_module``: a target whose base is a :class:`~qlk.QuantLinear` becomes a
      :class:`QlkLoraLayer` (unless the config registered its own custom module for it).
    * ``tuners_utils._maybe_include_all_linear_layers``: ``target_modules="all-linear"`` also selects
      the qlk layers (PEFT looks for ``nn.Linear``/``Conv1D`` and bitsandbytes layers only); the
      output head is left out as PEFT does.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    from peft.tuners import tuners_utils
    from peft.tuners.lora import model as lora_model

    create_new_module = lora_model.LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        if isinstance(base, QuantLinear) and not any(isinstance(base, cls) for cls in custom):
            return QlkLoraLayer(target, adapter_name, config=lora_config, **kwargs)
        return create_new_module(lora_config, adapter_name, target, **kwargs)

    include_all_linear = tuners_utils._maybe_include_all_linear_layers

    def _maybe_include_all_linear_layers(peft_config, model):
        wanted = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(wanted, str) and wanted.lower() == "all-linear"
        peft_config = include_all_linear(peft_config, model)
        if all_linear:
            peft_config.target_modules = set(peft_config.target_modules) | _qlk_linear_names(model)
        return peft_config

    _create_new_module.__wrapped__ = create_new_module
    _maybe_include_all_linear_layers.__wrapped__ = include_all_linear
    lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    _INSTALLED = True


def _qlk_linear_names(model: nn.Module) -> set:
    """Names of the qlk layers "all-linear" adds: not the output head, none inside a PEFT layer."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    tuner = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return {
        name for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and m is not head and not any(name.startswith(t + ".") for t in tuner)
    }  # fmt: skip


def register(config):
    """Register :class:`QlkLoraLayer` for :class:`~qlk.QuantLinear` on a ``peft.LoraConfig``; returns it."""
    config._register_custom_module({QuantLinear: QlkLoraLayer})
    return config


def get_peft_model(model: nn.Module, config, **kwargs):
    """``peft.get_peft_model`` with qlk layers mapped to :class:`QlkLoraLayer`."""
    import peft

    return peft.get_peft_model(model, register(config), **kwargs)


def peft_state_dict(model: nn.Module) -> tuple[dict, dict]:
    """({PEFT key: tensor}, LoraConfig kwargs) of the qlk adapters of ``model`` (see the module doc)."""
    tensors, layers = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or m.method is None:
            continue
        a, b = m.lora_A.detach(), m.lora_B.detach()
        if m.method == "qalora":
            from ..reference import expand_groups, from_stored_order

            a = from_stored_order(expand_groups(a, m.group_size) / m.group_size, m.qweight)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = b.contiguous().clone()
        layers[name] = m
    experts, target_parameters = _expert_tensors(model, tensors)
    if not layers and not experts:
        raise ValueError(f"{type(model).__name__} has no qlk adapter to export (patch_model with method='lora'/'qalora')")
    first = next(iter({**layers, **experts}.values()))
    for n, m in {**layers, **experts}.items():
        if (m.r, m.lora_alpha, m.use_rslora, m.dropout) != (first.r, first.lora_alpha, first.use_rslora, first.dropout):
            raise ValueError(f"layer '{n}' has a different r/alpha/rsLoRA/dropout than the others; not exportable "
                             "as one LoraConfig")  # fmt: skip
    kinds = {m.kind for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError("mixed nn.Linear / Conv1D adapters: PEFT's fan_in_fan_out is per config")
    if experts and kinds == {"conv1d"}:
        raise ValueError("Conv1D layers (fan_in_fan_out) and MoE expert adapters: PEFT's target_parameters refuses "
                         "fan_in_fan_out, and it is one setting per LoraConfig; not exportable as one PEFT adapter")
    if experts and first.dropout:
        raise ValueError(f"the adapters were trained with dropout={first.dropout}; PEFT's adapters on expert parameters "
                         "(target_parameters) refuse lora_dropout != 0, and it is one setting per LoraConfig. Set "
                         "every adapter's dropout to 0 (it changes nothing at inference: for m in model.modules(): "
                         "if hasattr(m, 'dropout') and getattr(m, 'method', None): m.dropout = 0.0) and export again")
    cfg = dict(
        r=first.r, lora_alpha=first.lora_alpha, use_rslora=first.use_rslora, lora_dropout=first.dropout, bias="none",
        fan_in_fan_out=kinds == {"conv1d"},
        # exact module names, so layers patch_model skipped (or did not target) are not adapted by PEFT
        target_modules=sorted(layers) or None,
    )  # fmt: skip
    if target_parameters:
        cfg["target_parameters"] = target_parameters
    return tensors, cfg


def _expert_tensors(model: nn.Module, tensors: dict) -> tuple[dict, list]:
    """Add the qlk expert adapters of ``model`` to ``tensors`` in the layout of PEFT's
    ``lora.ParamWrapper`` (``LoraConfig(target_parameters=[...])`` on the 3-D expert parameters);
    returns ({projection name: QuantExpertProj}, target_parameters).

    PEFT keeps one ``lora_A`` [r·E, in] (row e·r + j is A_e[j]) and one ``lora_B`` [out, r·E]
    (column j·E + e is B_e[:, j]) per parameter and applies W_e + σ·B_e·A_e. Several parameters of
    one module are wrapped one inside the other in the order the module registers them, the first
    innermost: its keys carry one ``base_layer.`` per wrapper around it. Per-expert A_e, B_e map
    exactly; a shared adapter is copied to every expert (the same ΔW; further training in PEFT
    unties the copies); QA-LoRA's A_e [r, in/g] is expanded as for dense layers, A_e[:, j(k)] / g."""
    from ..moe import quant_experts
    from ..reference import expand_groups

    experts, target_parameters = {}, []
    for name, qe in quant_experts(model).items():
        adapted = [p for p in qe.spec.projections if qe.projections[p].method is not None]
        if not adapted:
            continue
        # spec.projections is the call order (gate_up_proj / up_proj, then down_proj), which is also the
        # order every Transformers experts class registers them (test_moe.py checks the keys by loading)
        for depth, pname in enumerate(adapted):
            m = qe.projections[pname]
            e, r = m.num_experts, m.r
            a, b = m.lora_A.detach(), m.lora_B.detach()  # [E or 1, r, cols], [E or 1, N, r]
            if m.method == "qalora":
                a = expand_groups(a, m.group_size) / m.group_size
            a, b = a.expand(e, -1, -1), b.expand(e, -1, -1)
            key = f"base_model.model.{name}." + "base_layer." * (len(adapted) - 1 - depth)
            tensors[f"{key}lora_A.weight"] = a.reshape(e * r, a.shape[-1]).contiguous().clone()
            tensors[f"{key}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous().clone()
            experts[f"{name}.{pname}"] = m
            target_parameters.append(f"{name}.{pname}")
    return experts, sorted(target_parameters)


def export_peft_adapter(model: nn.Module, path, base_model_name_or_path: str | None = None,
                        task_type: str | None = "CAUSAL_LM") -> str:  # fmt: skip
    """Write the qlk adapters of ``model`` as a PEFT LoRA adapter directory at ``path``.

    Load it with ``peft.PeftModel.from_pretrained(dense_model, path)``. Returns ``path``.
    """
    import peft
    from safetensors.torch import save_file

    tensors, cfg = peft_state_dict(model)
    os.makedirs(path, exist_ok=True)
    config = peft.LoraConfig(task_type=task_type, base_model_name_or_path=base_model_name_or_path, **cfg)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    methods = sorted({m.method for m in model.modules()
                      if isinstance(m, (QuantLinear, QuantExpertProj)) and m.method})  # fmt: skip
    with open(os.path.join(path, "qlk_export.json"), "w") as f:
        json.dump({"qlk_methods": methods, "note": "QA-LoRA A expanded to A_full[:, k] = A[:, j(k)] / g"}, f)
    return str(path)


# set by qlk.integrations._peft_hook when peft's import (above) asked for the install while this
# module was still executing: done now that install() exists
_pending_install = globals().pop("_after_import", None)
if _pending_install is not None:
    _pending_install()

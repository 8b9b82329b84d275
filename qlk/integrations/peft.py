"""PEFT interop.

1. ``get_peft_model`` on a qlk-quantized model (``qlk.patch_model(model, method=None)``, or a model
   loaded with :class:`qlk.QlkConfig`): PEFT's custom-module mapping sends each
   :class:`~qlk.QuantLinear` to :class:`QlkLoraLayer`, whose forward runs qlk's fused LoRA autograd
   (:func:`qlk.autograd.lora_linear`: the quantized base matmul and its transposed backward on the
   packed weight) for a single active adapter, and falls back to base + Σ adapters otherwise::

       from qlk.integrations.peft import get_peft_model
       model = get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

   (or register yourself: ``cfg._register_custom_module({qlk.QuantLinear: QlkLoraLayer})``).

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
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..autograd import lora_linear
from ..nn.linear import QuantLinear

try:
    from peft.tuners.lora.layer import LoraLayer
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

    def resolve_lora_variant(self, *, config=None, **kwargs):
        if config is not None and (getattr(config, "use_dora", False) or getattr(config, "alora_invocation_tokens", None)):
            raise ValueError("qlk's PEFT layer supports plain LoRA (no DoRA / aLoRA variants)")
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # the adapters move to the packed weight's device and keep their own (fp32) dtype, as qlk's own layers
        device = device or self.get_base_layer().weight_packed.device
        for name in self.adapter_layer_names:
            layer = getattr(self, name, None)
            if isinstance(layer, nn.ModuleDict) and adapter_name in layer:
                layer[adapter_name].to(device)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "a LoRA adapter cannot merge exactly into a quantized (INT/NF4) weight; use qlk.dequantize_model on "
            "the base first, or export_peft_adapter + a dense base"
        )

    def unmerge(self) -> None:
        return

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if self.disable_adapters or adapter_names is not None:
            if adapter_names is not None:
                raise ValueError("qlk's PEFT layer does not support mixed-batch adapter_names")
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
    if not layers:
        raise ValueError(f"{type(model).__name__} has no qlk adapter to export (patch_model with method='lora'/'qalora')")
    first = next(iter(layers.values()))
    for n, m in layers.items():
        if (m.r, m.lora_alpha, m.use_rslora, m.dropout) != (first.r, first.lora_alpha, first.use_rslora, first.dropout):
            raise ValueError(f"layer '{n}' has a different r/alpha/rsLoRA/dropout than the others; not exportable "
                             "as one LoraConfig")  # fmt: skip
    kinds = {m.kind for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError("mixed nn.Linear / Conv1D adapters: PEFT's fan_in_fan_out is per config")
    cfg = dict(
        r=first.r, lora_alpha=first.lora_alpha, use_rslora=first.use_rslora, lora_dropout=first.dropout,
        target_modules=sorted({n.rpartition(".")[2] for n in layers}), bias="none",
        fan_in_fan_out=kinds == {"conv1d"},
    )  # fmt: skip
    # exact module names, so layers patch_model skipped (or did not target) are not adapted by PEFT
    cfg["target_modules"] = sorted(layers)
    return tensors, cfg


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
    methods = sorted({m.method for m in model.modules() if isinstance(m, QuantLinear) and m.method})
    with open(os.path.join(path, "qlk_export.json"), "w") as f:
        json.dump({"qlk_methods": methods, "note": "QA-LoRA A expanded to A_full[:, k] = A[:, j(k)] / g"}, f)
    return str(path)

"""Models loaded through bitsandbytes (``BitsAndBytesConfig``): what :func:`qlk.patch_model` does
with their quantized layers.

bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` subclass ``nn.Linear`` but hold packed codes in
``weight`` (uint8 [(n·k+1)/2, 1] for 4-bit, int8 [n, k] for 8-bit), so they must not be taken for
dense layers. Per layer and per format:

* **NF4** (``bnb_4bit_quant_type="nf4"``, with or without double quantization): qlk stores NF4 in
  bitsandbytes' own bytes, so the layer becomes a :class:`~qlk.QuantLinear` by relabelling
  (:func:`qlk.from_bnb`): no requantization, Ŵ identical bit for bit, the block size and double
  quantization kept. Works for method="qlora"/"lora" (LoRA on the NF4 base) and None.
* **FP4** (``bnb_4bit_quant_type="fp4"``): its 16 codes are ±{0, 1, 32, 48, 64, 96, 128, 192}/192 of
  the block absmax — neither the NF4 table nor a uniform INT grid, and as INT it needs 9 bits; qlk
  holds INT2/3/4 and NF4 only, so no qlk format holds it exactly.
* **INT8** (``load_in_8bit``, LLM.int8: Ŵ = C·s_row/127, C ∈ [-127, 127]): 255 levels per row; qlk's
  widest INT format has 16 per group, so no exact form either.
* QA-LoRA (method="qalora") needs an INT base: NF4 → INT is a requantization.

Whatever is not exact raises a ``ValueError`` naming the layers, unless the caller asks for
``requantize=True``: then each such layer is dequantized by bitsandbytes and quantized again with
patch_model's ``fmt``/``bits``/``group_size``. That adds a second rounding on top of
bitsandbytes' (‖Ŵ_qlk − W‖ ≤ ‖Ŵ_qlk − Ŵ_bnb‖ + ‖Ŵ_bnb − W‖ with W the original weight, which is
gone); quantizing the original dense checkpoint instead (load it without ``BitsAndBytesConfig``)
avoids it.
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from .._checks import check_bool
from ..formats.bnb import from_bnb
from ..nn.linear import QuantLinear


def _bnb_classes():
    if "bitsandbytes" not in sys.modules:  # no bitsandbytes layer can exist; do not import it
        return None
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def bnb_kind(module: nn.Module) -> str | None:
    """"nf4", "fp4", "int8" for a bitsandbytes layer holding quantized codes, else None (a dense
    layer, or a bitsandbytes layer whose weight is not quantized yet, which is dense)."""
    classes = _bnb_classes()
    if classes is None or not isinstance(module, classes):
        return None
    w = module.weight
    if isinstance(module, classes[0]):
        state = getattr(w, "quant_state", None)
        if state is None or not getattr(w, "bnb_quantized", True):
            return None  # not quantized yet (bitsandbytes quantizes when the weight moves to its device)
        return str(state.quant_type)
    return "int8" if w.dtype == torch.int8 else None


def bnb_layers(model: nn.Module) -> dict[str, str]:
    """{name: "nf4"|"fp4"|"int8"} of the quantized bitsandbytes layers of ``model``."""
    if _bnb_classes() is None:
        return {}
    return {name: kind for name, m in model.named_modules() if (kind := bnb_kind(m)) is not None}


def _names(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(f"'{n}'" for n in names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _why_not_exact(kind: str, layer: nn.Module, method, fmt_given, group_size_given) -> str | None:
    """None if the layer converts bit-exactly under these patch_model arguments, else the reason's key."""
    if kind != "nf4":
        return kind
    if method == "qalora":
        return "qalora"
    if fmt_given not in (None, "nf4"):
        return "fmt"
    if group_size_given is not None and group_size_given != int(layer.weight.quant_state.blocksize):
        return "group_size"
    return None


def plan_bnb_conversion(model, targets, method, fmt, bits, group_size, fmt_given, group_size_given,
                        requantize: bool) -> tuple[dict[str, str], dict[str, tuple[bool, str]]]:  # fmt: skip
    """Decide, before anything is modified, how each bitsandbytes target of :func:`qlk.patch_model`
    converts: ({name: "exact"|"requantize"}, {name: (skippable, why)} of requantized layers whose
    in_features ``group_size`` does not divide). A layer converts exactly when it is NF4 and the
    call asks for no other format (method not "qalora", fmt and group_size not given or equal to the
    layer's); the others are requantized when ``requantize``, else a ``ValueError`` names them.
    ``method``/``fmt``/``group_size`` are patch_model's resolved values, ``fmt_given`` and
    ``group_size_given`` what the caller passed (None: not given).
    """
    check_bool(requantize, "requantize")
    repacked = [name for name in targets if bnb_kind(model.get_submodule(name)) in ("nf4", "fp4")
                and getattr(model.get_submodule(name).weight.quant_state, "packing_format_for_cpu", False)]
    if repacked:
        raise ValueError(
            f"qlk.patch_model: {len(repacked)} bitsandbytes 4-bit layer(s) ({_names(repacked)}) were repacked by "
            "bitsandbytes for its CPU kernel (a forward in eval mode without grad on a CPU with AVX512-BF16 "
            "reorders the codes and stores absmax de-nested in bf16): the original NF4 bytes and scales are "
            "gone, so they cannot be converted exactly. Load the model again and call qlk.patch_model before "
            "running it on the CPU (or run bitsandbytes in train mode), or load it without BitsAndBytesConfig "
            "so qlk quantizes the original weights. Nothing was modified.")
    plan, blocked, problems = {}, {}, {}
    for name in targets:
        layer = model.get_submodule(name)
        kind = bnb_kind(layer)
        if kind is None:
            continue
        why = _why_not_exact(kind, layer, method, fmt_given, group_size_given)
        if why is None:
            plan[name] = "exact"
        elif requantize:
            plan[name] = "requantize"
            if fmt == "int" and layer.in_features % group_size:
                problems[name] = (True, f"layer '{name}': in_features={layer.in_features} is not divisible by "
                                        f"group_size={group_size}")  # fmt: skip
        else:
            blocked.setdefault(why, []).append(name)
    if blocked:
        target = f"INT{bits} g{group_size}" if fmt == "int" else f"NF4 g{group_size}"
        again = f"pass requantize=True to dequantize them and quantize again to {target} (a second rounding)"
        dense = ("or load the model without BitsAndBytesConfig so qlk quantizes the original weights "
                 "(qlk.patch_model, or from_pretrained(..., quantization_config=qlk.QlkConfig(...)))")  # fmt: skip
        reasons = {
            "fp4": "are bitsandbytes FP4, which no qlk format holds exactly (its codes are neither NF4 nor a "
                   f"uniform INT grid). Load with bnb_4bit_quant_type='nf4', or {again}, {dense}",
            "int8": f"are bitsandbytes 8-bit, which no qlk format holds exactly (qlk's are 2-4 bit). {again[0].upper()}"
                    f"{again[1:]}, {dense}",
            "qalora": "are bitsandbytes NF4, and method='qalora' needs an INT base. Use method='qlora' (LoRA on "
                      f"the NF4 weights as they are, bit-exact) or method=None, or {again}, {dense}",
            "fmt": f"are bitsandbytes NF4, taken as they are (bit-exact), but fmt={fmt_given!r} was asked for. Pass "
                   f"fmt=None (or 'nf4'), or {again}",
            "group_size": f"are bitsandbytes NF4 with another block size than group_size={group_size_given}, taken as "
                          f"they are (bit-exact). Pass group_size=None, or {again}",
        }  # fmt: skip
        msgs = [f"{len(names)} layer(s) ({_names(names)}) {reasons[why]}" for why, names in blocked.items()]
        raise ValueError("qlk.patch_model: " + "; ".join(msgs))
    if "requantize" in plan.values():
        n = sum(v == "requantize" for v in plan.values())
        warnings.warn(
            f"qlk.patch_model(requantize=True): {n} bitsandbytes layer(s) are dequantized and quantized again: a "
            "second rounding on top of bitsandbytes' (quantizing the original dense checkpoint avoids it)",
            stacklevel=3,
        )
    return plan, problems


def _dequantize(layer: nn.Module, kind: str) -> torch.Tensor:
    """Ŵ [out, in] of a bitsandbytes layer, computed by bitsandbytes itself."""
    import bitsandbytes.functional as bnbF

    w = layer.weight
    if kind == "int8":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(layer, "state", None), "SCB", None)
        if scb is None:
            raise ValueError("a bitsandbytes 8-bit layer without its row scales (SCB) cannot be dequantized")
        return w.data.float() * (scb.float().reshape(-1, 1) / 127.0)
    if kind == "nf4":  # qlk's own dequantizer of bitsandbytes' bytes: bit-exact to bitsandbytes, on any device
        packed = w.data if w.data.dtype == torch.uint8 else w.data.contiguous().reshape(-1).view(torch.uint8)
        return from_bnb(packed, w.quant_state).dequantize(torch.float32)
    if w.data.device.type == "cpu":
        # bitsandbytes' AVX512 CPU kernel blocks each row on its own (its quantizer blocks the flat
        # weight): wrong when in_features is not a multiple of the block size. Its portable path is not.
        try:
            from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
            from bitsandbytes.backends.utils import _get_4bit_code
        except ImportError:  # another bitsandbytes layout: its public dequantizer
            return bnbF.dequantize_4bit(w.data, w.quant_state)
        qs = w.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = (bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
        packed = w.data if w.data.dtype == torch.uint8 else w.data.view(torch.uint8)
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, _get_4bit_code(qs.quant_type, packed.device),
                                        qs.blocksize, qs.shape, qs.dtype)
    return bnbF.dequantize_4bit(w.data, w.quant_state)


@torch.no_grad()
def convert_bnb_layer(layer: nn.Module, how: str, *, bits: int, group_size: int, fmt: str, double_quant: bool,
                      method, r, alpha, dropout, use_rslora, adapter_dtype) -> QuantLinear:  # fmt: skip
    """The :class:`~qlk.QuantLinear` for one bitsandbytes layer: ``how="exact"`` relabels NF4 bytes
    (no copy, no rounding); ``how="requantize"`` dequantizes and quantizes with the given format."""
    adapter = dict(method=method, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype)
    kind = bnb_kind(layer)
    if how == "exact":
        packed = layer.weight.data
        if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage=bf16/... : the same bytes, another dtype
            packed = packed.contiguous().reshape(-1).view(torch.uint8)
        qw = from_bnb(packed, layer.weight.quant_state)
        return QuantLinear(qw, bias=layer.bias, **adapter)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    dense.weight = nn.Parameter(_dequantize(layer, kind), requires_grad=False)
    dense.bias = layer.bias
    return QuantLinear.from_dense(
        dense, bits=bits, group_size=group_size, fmt=fmt, double_quant=double_quant, **adapter
    )


def adopt_qlk_quantizer(model: nn.Module) -> bool:
    """After :func:`qlk.patch_model` converted a Transformers model's bitsandbytes layers: make qlk its
    quantizer (``model.hf_quantizer``, ``config.quantization_config``), so ``save_pretrained`` writes a
    qlk checkpoint that ``from_pretrained`` loads back (after ``import qlk``) with the same bytes.

    Done only when no quantized bitsandbytes layer is left and all qlk layers share one format (one
    :class:`~qlk.QlkConfig` describes them); returns whether it was done. Otherwise the model keeps
    bitsandbytes' config, and a ``save_pretrained`` would write a checkpoint neither loader reads:
    save with :func:`qlk.save_quantized` instead."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    quant_method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if config is None or quant_method != "bitsandbytes":
        return False
    if bnb_layers(model):
        return False
    from ..patch import qlk_layers
    from .transformers import QlkConfig, QlkHfQuantizer

    layers = qlk_layers(model)
    shared = {
        (m.fmt, m.bits, m.group_size, m.qweight.double_quant, str(m.weight_scales.dtype) if m.fmt == "int" else "",
         m.method, m.r, m.lora_alpha, m.dropout, m.use_rslora)
        for m in layers.values()
    }  # fmt: skip
    if len(shared) != 1:
        return False
    fmt, bits, group_size, double_quant, scale_dtype, method, r, alpha, dropout, use_rslora = shared.pop()
    specs = {
        name: {"kind": m.kind, "weight_dtype": str(m.weight_dtype).removeprefix("torch."), "bias": m.bias is not None}
        for name, m in layers.items()
    }  # fmt: skip
    cfg = QlkConfig(
        bits=bits, group_size=group_size, fmt=fmt, double_quant=double_quant, method=method, r=r or 16,
        alpha=alpha or 16, dropout=dropout, use_rslora=use_rslora, quantized_modules=specs,
        scale_dtype=scale_dtype.removeprefix("torch.") or "float16",
    )  # fmt: skip
    qlk_quantizer = QlkHfQuantizer(cfg, pre_quantized=True)
    qlk_quantizer.specs = specs
    model.hf_quantizer = qlk_quantizer
    config.quantization_config = cfg
    model.quantization_method = cfg.quant_method
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    return True

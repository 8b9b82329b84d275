"""qlk as a Transformers quantization backend (``quant_method="qlk"``).

    import qlk
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qlk.QlkConfig(bits=4, group_size=32))
    model.save_pretrained("out")                     # packed tensors + quantization_config in config.json
    model = AutoModelForCausalLM.from_pretrained("out")   # after `import qlk` (registers "qlk")

Importing this module (``qlk.QlkConfig`` does it) registers :class:`QlkConfig` and
:class:`QlkHfQuantizer` with ``transformers.quantizers.auto``.

Quantize-on-load: before the weights load, each target ``nn.Linear``/``Conv1D`` of the meta
skeleton becomes a :class:`~qlk.QuantLinear` with meta packed buffers plus a placeholder meta
``weight``; Transformers' loader hands each checkpoint weight of such a layer to
:class:`QlkQuantize` (``get_quantize_ops``), which quantizes that one tensor on its device, writes
the packed buffers and drops the placeholder. So the dense weights are never all resident: the peak
is about the quantized model plus one dense layer (plus whatever the loader keeps in flight).
Loading a saved qlk model (``pre_quantized``) builds empty qlk layers, as the saved config lists
them, and loads the packed tensors as they are (their dtypes are kept).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer,
)  # fmt: skip
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._checks import SUPPORTED_FORMATS, SUPPORTED_INT_BITS, check_adapter_hyperparameters
from ..formats.nf4 import BLOCKSIZES as NF4_BLOCKSIZES
from ..formats.quantized_weight import validate
from ..io import check_loaded_finite
from ..nn.linear import BUFFERS, QuantLinear, dense_weight, is_conv1d

logger = logging.getLogger("qlk")
QUANT_METHOD = "qlk"
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QlkConfig(QuantizationConfigMixin):
    """Quantization config of qlk for ``from_pretrained(..., quantization_config=QlkConfig(...))``.

    bits: 2, 3, 4 (fmt="int") or 4 (fmt="nf4"). group_size: inputs per scale/bias group (INT,
    default 32) or NF4 block size (default 64). double_quant: NF4 double quantization.
    method / r / alpha / dropout / use_rslora: attach fresh adapters after loading ("qalora",
    "lora" or None = quantize only). modules_to_not_convert: names (or name suffixes) left dense;
    default: the output head. skip_incompatible: leave INT layers whose in_features group_size does
    not divide dense (default True; False raises). quantized_modules: filled in when a model is
    quantized (the layers that are qlk layers), so a saved model loads back with the same ones;
    quantized_experts the same for mixture-of-experts modules (stacked 3-D expert weights, which
    are quantized on load too: each arrives as one tensor and becomes a stacked qlk weight).
    """

    def __init__(
        self, bits: int = 4, group_size: int | None = None, fmt: str = "int", double_quant: bool = True,
        method: str | None = None, r: int = 16, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
        modules_to_not_convert: list | None = None, skip_incompatible: bool = True,
        scale_dtype: str = "float16", quantized_modules: dict | None = None, quantized_experts: dict | None = None,
        **kwargs,
    ):  # fmt: skip
        self.quant_method = QUANT_METHOD
        self.bits, self.fmt, self.double_quant = bits, fmt, double_quant
        self.group_size = group_size if group_size is not None else (64 if fmt == "nf4" else 32)
        self.method, self.r, self.alpha, self.dropout, self.use_rslora = method, r, alpha, dropout, use_rslora
        self.modules_to_not_convert = modules_to_not_convert
        self.skip_incompatible, self.scale_dtype = skip_incompatible, scale_dtype
        self.quantized_modules = quantized_modules
        self.quantized_experts = quantized_experts  # MoE experts modules (qlk.moe.experts_meta), filled in likewise
        self.post_init()

    def post_init(self):
        if self.fmt not in SUPPORTED_FORMATS:
            raise ValueError(f"QlkConfig: fmt={self.fmt!r} is not supported; allowed: {SUPPORTED_FORMATS}")
        if self.fmt == "int":
            if self.bits not in SUPPORTED_INT_BITS or isinstance(self.bits, bool):
                raise ValueError(
                    f"QlkConfig: bits={self.bits!r} is not supported for fmt='int'; allowed: {SUPPORTED_INT_BITS} "
                    "(8-bit: use bitsandbytes; NF4: fmt='nf4')"
                )
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
                raise ValueError(f"QlkConfig: group_size={self.group_size!r} must be a positive multiple of 8")
        else:
            if self.bits != 4:
                raise ValueError(f"QlkConfig: fmt='nf4' is 4-bit; got bits={self.bits}")
            if self.group_size not in NF4_BLOCKSIZES:
                raise ValueError(f"QlkConfig: NF4 group_size={self.group_size} not in {NF4_BLOCKSIZES}")
        if self.method not in (None, "qalora", "lora"):
            raise ValueError(f"QlkConfig: method={self.method!r}; allowed: None, 'qalora', 'lora'")
        if self.method == "qalora" and self.fmt != "int":
            raise ValueError("QlkConfig: method='qalora' needs fmt='int'")
        if self.method is not None:
            check_adapter_hyperparameters(self.r, self.alpha, self.dropout, self.use_rslora, what="QlkConfig")
        if self.scale_dtype not in _DTYPE_NAMES:
            raise ValueError(f"QlkConfig: scale_dtype={self.scale_dtype!r}; allowed: {sorted(_DTYPE_NAMES)}")


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


class QlkHfQuantizer(HfQuantizer):
    """Transformers quantizer for :class:`QlkConfig` (quantize on load, save, load pre-quantized)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.specs = {}  # module name -> dict(kind, weight_dtype) of the layers converted
        self.expert_specs = {}  # MoE experts module name -> ExpertSpec (quantized on load)
        self.pending_experts = {}  # name -> {projection: QuantExpertProj} quantized so far

    def validate_environment(self, *args, **kwargs):
        return

    def update_dtype(self, dtype):
        return dtype

    # -- which layers -------------------------------------------------------------------------
    def _targets(self, model, dtype):
        cfg = self.quantization_config
        if self.pre_quantized and cfg.quantized_modules is not None:
            return dict(cfg.quantized_modules)
        skip = self.get_modules_to_not_convert(model, cfg.modules_to_not_convert, model._keep_in_fp32_modules)
        targets, incompatible = {}, []
        for name, m in model.named_modules():
            if not (isinstance(m, nn.Linear) or is_conv1d(m)) or _skipped(name, skip):
                continue
            n, k = dense_weight(m).shape
            if cfg.fmt == "int" and k % cfg.group_size:
                incompatible.append(f"{name} (in_features={k})")
                continue
            wd = m.weight.dtype if m.weight.is_floating_point() else (dtype or torch.float32)
            targets[name] = {"kind": "conv1d" if is_conv1d(m) else "linear", "weight_dtype": str(wd)[6:],
                             "bias": m.bias is not None}  # fmt: skip
        if incompatible:
            msg = f"group_size={cfg.group_size} does not divide in_features of {len(incompatible)} layer(s): " + \
                  ", ".join(incompatible[:5])  # fmt: skip
            if not cfg.skip_incompatible:
                raise ValueError(f"QlkConfig: {msg}; pass skip_incompatible=True to leave them dense")
            logger.warning("qlk: leaving dense: %s", msg)
        return targets

    def _expert_targets(self, model):
        from .. import moe

        cfg = self.quantization_config
        skip = self.get_modules_to_not_convert(model, cfg.modules_to_not_convert, model._keep_in_fp32_modules)
        targets, incompatible = {}, []
        for name, spec in moe.find_experts(model).items():
            if _skipped(name, skip):
                continue
            ks = [moe.dims(model.get_submodule(name), spec, p)[0] for p in spec.projections]
            if any(k % cfg.group_size or k % 8 for k in ks):
                incompatible.append(f"{name} (in_features={ks})")
                continue
            targets[name] = spec
        if incompatible:
            msg = f"group_size={cfg.group_size} does not divide the experts of: " + ", ".join(incompatible[:5])
            if not cfg.skip_incompatible:
                raise ValueError(f"QlkConfig: {msg}; pass skip_incompatible=True to leave them dense")
            logger.warning("qlk: leaving dense: %s", msg)
        return targets

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        from .. import moe

        cfg = self.quantization_config
        if self.pre_quantized:
            if cfg.quantized_experts:
                moe.install(model, moe.build_experts(model, cfg.quantized_experts, "QlkConfig", "meta"))
        else:
            self.expert_specs = self._expert_targets(model)
        self.specs = self._targets(model, dtype)
        for name, spec in self.specs.items():
            old = model.get_submodule(name)
            n, k = dense_weight(old).shape
            new = QuantLinear.empty(
                k, n, bits=cfg.bits, group_size=cfg.group_size, fmt=cfg.fmt, double_quant=cfg.double_quant,
                bias=spec["bias"], weight_dtype=_DTYPE_NAMES[spec["weight_dtype"]],
                scale_dtype=_DTYPE_NAMES[cfg.scale_dtype], device="meta",
            )  # fmt: skip
            new.kind = spec["kind"]
            if spec["bias"]:
                new.bias = nn.Parameter(torch.empty(n, device="meta", dtype=old.bias.dtype), requires_grad=False)
            if not self.pre_quantized:  # the checkpoint's dense weight loads into this, then QlkQuantize
                new.weight = nn.Parameter(torch.empty_like(old.weight, device="meta"), requires_grad=False)
            if self.pre_quantized and cfg.method is not None:
                new.add_adapter(cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        model.config.quantization_config = cfg

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor = param_name.rpartition(".")
        if not self.pre_quantized and module_name in self.expert_specs:
            return tensor in self.expert_specs[module_name].projections
        return not self.pre_quantized and tensor == "weight" and module_name in self.specs

    def get_quantize_ops(self):
        return QlkQuantize(self)

    def get_new_dtype(self, converter, param, dtype):
        names = " ".join(getattr(converter, "_original_target_patterns", None) or [str(converter)])
        if any(b in names for b in BUFFERS.values()):
            return None  # packed tensors keep their stored dtypes
        return super().get_new_dtype(converter, param, dtype)

    def _install_experts(self, model):
        from .. import moe
        from ..nn.experts import QuantExperts

        cfg = self.quantization_config
        for name, spec in self.expert_specs.items():
            module = model.get_submodule(name)
            projections = self.pending_experts.get(name, {})
            if set(projections) != set(spec.projections):
                raise RuntimeError(f"qlk: experts '{name}' were not quantized during loading (got {sorted(projections)})")
            for pname, proj in projections.items():
                if spec.has_bias:
                    proj.bias = nn.Parameter(getattr(module, f"{pname}_bias").detach(), requires_grad=False)
                    module._parameters.pop(f"{pname}_bias")
                module._parameters.pop(pname, None)
                if cfg.method is not None:
                    proj.add_adapter(cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                     use_rslora=cfg.use_rslora)
            moe.install(model, {name: QuantExperts(module, spec, projections)})
        self.pending_experts = {}
        if self.expert_specs or cfg.quantized_experts:
            _keep_stacked_experts_on_save(model)
            cfg.quantized_experts = moe.experts_meta(model)
            for experts in cfg.quantized_experts.values():  # the saved adapters load as the config says
                for meta in experts.values():
                    meta.update(method=None)
                    for key in ("r", "alpha", "use_rslora", "dropout", "shared_adapter", "adapter_dtype"):
                        meta.pop(key, None)

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        self._install_experts(model)
        for name in self.specs:
            m = model.get_submodule(name)
            m._parameters.pop("weight", None)  # the dense placeholder: only the packed buffers remain
            if m.weight_packed.device.type == "meta":
                raise RuntimeError(f"qlk: layer '{name}' was not quantized during loading (its weight never arrived)")
            absent = [k for k, t in m.state_dict().items() if t.device.type == "meta"]
            if absent:  # never run on tensors that were not in the checkpoint (random or empty values)
                raise ValueError(f"qlk: layer '{name}': {absent} missing from the checkpoint (truncated or foreign?)")
            if self.pre_quantized:  # the same checks as qlk.load_quantized: packed invariants, no NaN/Inf
                where = getattr(model.config, "_name_or_path", None) or "the checkpoint"
                validate(m.qweight, f"{where}: layer '{name}'")
                check_loaded_finite(where, {f"{name}.{k}": t for k, t in m.state_dict().items()})
            if not self.pre_quantized and cfg.method is not None:
                m.add_adapter(cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora)
        cfg.quantized_modules = dict(self.specs)
        model.config.quantization_config = cfg
        if cfg.method is not None:
            for n, p in model.named_parameters():
                p.requires_grad_(n.endswith(("lora_A", "lora_B")))
        model.qlk_config = dict(bits=cfg.bits, group_size=cfg.group_size, fmt=cfg.fmt, method=cfg.method, r=cfg.r,
                                alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                                double_quant=cfg.double_quant)  # fmt: skip
        return model

    def get_state_dict_and_metadata(self, model):
        # save_pretrained: layers that became dense since loading (PEFT merge_and_unload, qlk.merge_model with
        # dense_lora=True) are saved, and must load back, as dense layers
        cfg = self.quantization_config
        if cfg.quantized_modules is not None:
            modules = dict(model.named_modules())
            cfg.quantized_modules = {
                n: spec for n, spec in cfg.quantized_modules.items() if isinstance(modules.get(n), QuantLinear)
            }
        return None, {}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        from ..patch import dequantize_model

        return dequantize_model(model, dtype)


class QlkQuantize:
    """The per-weight quantize op Transformers runs as each target weight loads."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def __repr__(self):
        return "QlkQuantize"

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        from ..ops import quantize

        cfg = self.hf_quantizer.quantization_config
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            name = full_layer_name or param_name
            module_name = name.rpartition(".")[0]
            m = model.get_submodule(module_name)
            if module_name in self.hf_quantizer.expert_specs:  # MoE: a stacked 3-D expert weight
                result.update(self._quantize_experts(name, module_name, value, cfg))
                continue
            w = value.t().contiguous() if m.kind == "conv1d" else value
            if not torch.isfinite(w).all():
                raise ValueError(f"qlk: weight of '{module_name}' has NaN/Inf values; cannot quantize")
            qw = quantize(w, bits=cfg.bits, group_size=cfg.group_size, fmt=cfg.fmt, double_quant=cfg.double_quant,
                          scale_dtype=_DTYPE_NAMES[cfg.scale_dtype])  # fmt: skip
            qw.dtype = _DTYPE_NAMES[self.hf_quantizer.specs[module_name]["weight_dtype"]]
            m.weight_dtype = qw.dtype
            for field, t in qw.tensors().items():  # the loader sets these buffers (set_param_for_module)
                result[f"{module_name}.{BUFFERS[field]}"] = t
            # the placeholder gets an empty tensor (so the loader neither reports it missing nor allocates
            # and initializes a dense weight for it); _process_model_after_weight_loading removes it
            result[f"{module_name}.weight"] = torch.empty(0, dtype=value.dtype, device=value.device)
            m._is_hf_initialized = True
            del value, w
        return result

    def _quantize_experts(self, name, module_name, value, cfg):
        """A stacked 3-D expert weight -> a QuantExpertProj kept until the experts module is swapped."""
        from ..nn.experts import QuantExpertProj

        spec = self.hf_quantizer.expert_specs[module_name]
        pname = name.rpartition(".")[2]
        if not torch.isfinite(value).all():
            raise ValueError(f"qlk: experts weight '{name}' has NaN/Inf values; cannot quantize")
        proj = QuantExpertProj.from_dense(value, None, spec.transposed, bits=cfg.bits, group_size=cfg.group_size,
                                          fmt=cfg.fmt, double_quant=cfg.double_quant,
                                          scale_dtype=_DTYPE_NAMES[cfg.scale_dtype])
        self.hf_quantizer.pending_experts.setdefault(module_name, {})[pname] = proj
        # the dense placeholder gets an empty tensor; _process_model_after_weight_loading swaps the module
        return {name: torch.empty(0, dtype=value.dtype, device=value.device)}


def _keep_stacked_experts_on_save(model):
    """save_pretrained reverts the loader's weight conversions (e.g. Mixtral's per-expert w1/w3 merged
    into gate_up_proj) by splitting tensors; qlk's packed experts have their own layout (NF4 bytes
    and absmax state are flat), so they are saved stacked, as loaded: drop the merge converters,
    keep plain renamings."""
    try:
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    model._weight_conversions = [c for c in conversions if not isinstance(c, WeightConverter)]


def _ensure_conversion_ops_base():
    # Transformers' loader may check isinstance(op, ConversionOps); make QlkQuantize one when it exists.
    try:
        from transformers.core_model_loading import ConversionOps
    except ImportError:
        return
    global QlkQuantize
    if not issubclass(QlkQuantize, ConversionOps):
        QlkQuantize = type("QlkQuantize", (QlkQuantize, ConversionOps), {})


_ensure_conversion_ops_base()

if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(QlkConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(QlkHfQuantizer)

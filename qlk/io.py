"""Save and load qlk models and adapters as safetensors files.

* :func:`save_adapter` / :func:`load_adapter`: the adapters only (``<layer>.lora_A``,
  ``<layer>.lora_B``), a few MB, onto a model patched the same way.
* :func:`save_quantized` / :func:`load_quantized`: the whole patched model: every qlk layer's
  packed tensors (``<layer>.weight_packed``, ``weight_scales``, ...), its bias and adapter, and
  every other parameter and buffer of the model. ``load_quantized`` takes an *unpatched* model of
  the same architecture (e.g. built from its config), builds empty qlk layers as the file says
  (no quantization work) and loads the tensors.

The file's safetensors header carries the metadata under the key ``"qlk"`` (JSON): kind, qlk
version, packed-layout version and, per qlk layer, format, bits, group size, shape, method, r,
alpha. Writes are atomic: a temporary file in the same directory, then ``os.replace``.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from ._checks import check_finite
from .formats import LAYOUT_VERSION
from .formats.quantized_weight import validate
from .nn.linear import BUFFERS, QuantLinear
from .patch import _in_out, _is_dense_linear, _set_submodule, qlk_layers

META_KEY = "qlk"
KIND_ADAPTER = "qlk.adapter"
KIND_QUANTIZED = "qlk.quantized_model"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _version() -> str:
    import qlk  # late: qlk/__init__ may import this module

    return getattr(qlk, "__version__", "unknown")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_meta(m: QuantLinear) -> dict:
    meta = {
        "fmt": m.fmt, "bits": m.bits, "group_size": m.group_size, "shape": [m.out_features, m.in_features],
        "weight_dtype": _dtype_name(m.weight_dtype), "kind": m.kind, "bias": m.bias is not None,
        "double_quant": "weight_absmax_scale" in m._buffers, "act_order": "weight_perm" in m._buffers,
        "scale_dtype": _dtype_name(m.weight_scales.dtype) if m.fmt == "int" else None,
        "method": m.method,
    }  # fmt: skip
    if m.method is not None:
        meta.update(r=m.r, alpha=m.lora_alpha, use_rslora=m.use_rslora, dropout=m.dropout,
                    adapter_dtype=_dtype_name(m.lora_A.dtype))  # fmt: skip
    return meta


def _header(kind: str, layers: dict, model: nn.Module) -> dict:
    meta = {
        "kind": kind, "qlk_version": _version(), "layout_version": LAYOUT_VERSION,
        "model_class": type(model).__name__, "layers": layers,
        "patch_config": getattr(model, "qlk_config", None),
    }  # fmt: skip
    from . import moe

    experts = moe.experts_meta(model, adapters_only=kind == KIND_ADAPTER)
    if experts:
        meta["experts"] = experts
    return {META_KEY: json.dumps(meta)}


def current_umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere by setting and restoring it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / directory: 0o666 / 0o777 minus the
    umask. ``tempfile.mkstemp`` / ``mkdtemp`` create 0o600 / 0o700, which would leave the final
    output unreadable to a serving process or another user; qlk's atomic writes chmod to this."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _atomic_write(path, write) -> None:
    """``write(tmp_path)`` then ``os.replace(tmp_path, path)``; the temporary file is removed on error,
    so ``path`` is either its previous content or the complete new one. The new file gets the
    umask-derived mode a plain ``open()`` would give (or keeps the mode of the file it replaces)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory or "."):
        raise FileNotFoundError(f"cannot write {path}: the directory {directory!r} does not exist (create it first)")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = default_mode()
        os.chmod(tmp, mode)  # after write(): safetensors itself creates its file 0o600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_LAYER_KEYS = ("fmt", "bits", "group_size", "shape", "bias")


def parse_meta(path: str, raw: str) -> dict:
    """The ``qlk`` metadata JSON of a file, checked for the structure qlk writes; a ValueError that
    names what is damaged otherwise (never a KeyError / AttributeError from deep inside)."""

    def damaged(what):
        return ValueError(f"{path}: its qlk metadata is damaged ({what}); the file was not written (completely) "
                          "by qlk, or was edited")  # fmt: skip

    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise damaged(f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise damaged(f"a JSON {type(meta).__name__}, not an object")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise damaged(f"'layers' is a {type(layers).__name__}, not an object")
    for name, m in layers.items():
        if not isinstance(m, dict):
            raise damaged(f"layer '{name}' is a {type(m).__name__}, not an object")
        required = _LAYER_KEYS if meta.get("kind") == KIND_QUANTIZED else ("shape",)  # adapters: older writers
        lacking = [k for k in required if k not in m]
        if lacking:
            raise damaged(f"layer '{name}' lacks {lacking}")
        shape = m["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v > 0 for v in shape)):
            raise damaged(f"layer '{name}' has shape {shape!r}")
        if m.get("method") and not all(isinstance(m.get(k), (int, float)) for k in ("r", "alpha")):
            raise damaged(f"layer '{name}' has method {m['method']!r} but no numeric r / alpha")
    pc = meta.get("patch_config")
    if pc is not None and not isinstance(pc, dict):
        raise damaged(f"'patch_config' is a {type(pc).__name__}, not an object")
    return meta


def _read_header(path, kind: str) -> dict:
    """The qlk metadata of ``path``; a ValueError naming the file for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if META_KEY not in header:
        raise ValueError(
            f"{path}: a safetensors file without qlk metadata (header keys: {sorted(header)[:8]}); "
            f"it was not written by qlk.{'save_adapter' if kind == KIND_ADAPTER else 'save_quantized'}"
        )
    meta = parse_meta(path, header[META_KEY])
    if meta.get("kind") != kind:
        other = {KIND_ADAPTER: "qlk.load_adapter", KIND_QUANTIZED: "qlk.load_quantized"}.get(meta.get("kind"))
        hint = f"; load it with {other}" if other else ""
        raise ValueError(f"{path}: holds {meta.get('kind')!r}, expected {kind!r}{hint}")
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(
            f"{path}: written with qlk packed-layout version {meta.get('layout_version')} (qlk "
            f"{meta.get('qlk_version')}), this qlk reads version {LAYOUT_VERSION}"
        )
    meta["_keys"] = keys
    return meta


def _describe(meta_layer: dict) -> str:
    s = f"{meta_layer.get('fmt')}{meta_layer.get('bits')} g{meta_layer.get('group_size')} shape {tuple(meta_layer['shape'])}"
    if meta_layer.get("method"):
        s += f", {meta_layer['method']} r={meta_layer['r']}"
    return s


def check_loaded_finite(path, tensors: dict) -> None:
    """The one finiteness check of every load path (load_adapter, load_quantized, the Transformers
    loader): a NaN/Inf in a loaded adapter, bias, scale or any other float tensor is a ValueError
    naming the file and the tensor, before anything is copied into the model."""
    for key, t in tensors.items():
        check_finite(t, f"{path}: tensor '{key}'")


def _base_of(spec: dict) -> str | None:
    if spec.get("fmt") is None or spec.get("bits") is None:
        return None  # a file that does not say (older writers): nothing to compare
    if spec["fmt"] == "nf4":
        return f"nf4 g{spec.get('group_size')}"
    return f"{spec['fmt']}{spec['bits']} g{spec.get('group_size')}"


def _warn_other_base(path, saved: dict, layers: dict) -> None:
    """Warn (naming both) when an adapter trained on one base format / bit width is loaded onto
    another: it loads, but the base it corrects is not the one it was trained against."""
    pairs = {}
    for name, m in layers.items():
        if name not in saved:  # MoE expert projections: their base is checked by moe.check_adapter_experts
            continue
        was, now = _base_of(saved[name]), _base_of(_layer_meta(m))
        if was is not None and was != now:
            pairs.setdefault((was, now), []).append(name)
    for (was, now), names in pairs.items():
        warnings.warn(
            f"{path}: adapter trained on a {was} base, loaded onto a {now} base ({len(names)} layer(s), e.g. "
            f"'{names[0]}'); it corrects the quantization error of the base it was trained on, so expect "
            "different (usually worse) outputs than after training",
            stacklevel=3,
        )


# ---- adapters ------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path) -> None:
    """Write the adapters (lora_A, lora_B of every qlk layer that has one) to ``path``."""
    from . import moe

    layers = {n: m for n, m in qlk_layers(model).items() if m.method is not None}
    projections = moe.adapter_projections(model)
    if not layers and not projections:
        raise ValueError(f"{type(model).__name__} has no qlk adapter to save (patch it with a method first)")
    tensors = {}
    for name, p in projections.items():  # MoE experts: lora_A [E, r, .], lora_B [E, N, r]
        tensors[f"{name}.lora_A"] = p.lora_A.detach().contiguous()
        tensors[f"{name}.lora_B"] = p.lora_B.detach().contiguous()
    for name, m in layers.items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
    header = _header(KIND_ADAPTER, {n: _layer_meta(m) for n, m in layers.items()}, model)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into ``model``, patched the same way (same layers,
    method, r, alpha, group size, shapes). Checks everything before copying anything."""
    path = os.fspath(path)
    meta = _read_header(path, KIND_ADAPTER)
    from . import moe

    layers = {n: m for n, m in qlk_layers(model).items() if m.method is not None}
    saved = meta["layers"]
    projections = moe.check_adapter_experts(model, meta.get("experts") or {}, path)
    if not layers and not projections:
        example = _describe(next(iter(saved.values()))) if saved else "MoE experts"
        raise ValueError(
            f"{path}: {type(model).__name__} has no qlk adapter layer to load into; patch it first as the file "
            f"says (e.g. {example}), or use qlk.load_quantized for a whole model"
        )
    missing, extra = sorted(set(saved) - set(layers)), sorted(set(layers) - set(saved))
    if missing or extra:
        raise ValueError(
            f"{path}: adapters were saved for other layers: in the file but not adapter layers of this model: "
            f"{missing[:6] or 'none'}; adapter layers of this model not in the file: {extra[:6] or 'none'}"
        )
    for name, m in layers.items():
        want, have = saved[name], _layer_meta(m)
        for key in ("method", "shape", "group_size", "r", "alpha", "use_rslora"):
            if want.get(key) != have.get(key):
                raise ValueError(
                    f"{path}: layer '{name}' was saved with {key}={want.get(key)!r} ({_describe(want)}), this model "
                    f"has {key}={have.get(key)!r} ({_describe(have)}); patch the model the same way"
                )
    tensors = {}
    layers = {**layers, **projections}
    try:
        with safe_open(path, framework="pt") as f:
            for name in layers:
                for p in ("lora_A", "lora_B"):
                    tensors[f"{name}.{p}"] = f.get_tensor(f"{name}.{p}")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read its tensors (truncated or corrupt?): {e}") from None
    except KeyError as e:  # safetensors raises SafetensorError for missing keys in recent versions
        raise ValueError(f"{path}: missing tensor {e}") from None
    for name, m in layers.items():
        for p in ("lora_A", "lora_B"):
            t, param = tensors[f"{name}.{p}"], getattr(m, p)
            if t.shape != param.shape:
                raise ValueError(
                    f"{path}: '{name}.{p}' has shape {tuple(t.shape)}, the model's is {tuple(param.shape)}"
                )
    check_loaded_finite(path, tensors)
    _warn_other_base(path, saved, layers)
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model


# ---- whole quantized model -----------------------------------------------------------------------
def save_quantized(model: nn.Module, path) -> None:
    """Write the whole patched model (packed weights, biases, adapters, all other tensors) to ``path``."""
    from . import moe

    layers = qlk_layers(model)
    if not layers and not moe.quant_experts(model):
        raise ValueError(f"{type(model).__name__} has no qlk layer; patch it (qlk.patch_model) before save_quantized")
    header = _header(KIND_QUANTIZED, {n: _layer_meta(m) for n, m in layers.items()}, model)
    _atomic_write(path, lambda tmp: save_model(model, tmp, metadata=header))


def _build_layer(name: str, spec: dict, module: nn.Module, path: str, device) -> QuantLinear:
    try:
        n, k = spec["shape"]
        kw = {}
        if spec.get("method"):
            kw = dict(
                method=spec["method"], r=spec["r"], alpha=spec["alpha"], dropout=spec.get("dropout", 0.0),
                use_rslora=spec.get("use_rslora", False), adapter_dtype=_DTYPES[spec["adapter_dtype"]],
            )  # fmt: skip
        layer = QuantLinear.empty(
            k, n, bits=spec["bits"], group_size=spec["group_size"], fmt=spec["fmt"],
            double_quant=spec.get("double_quant", True), bias=spec["bias"],
            weight_dtype=_DTYPES[spec["weight_dtype"]], scale_dtype=_DTYPES[spec.get("scale_dtype") or "float16"],
            act_order=spec.get("act_order", False), device=device, kind=spec.get("kind", "linear"), **kw,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad qlk metadata for layer '{name}': {e}") from None
    if module.bias is not None and layer.bias is not None:
        layer.bias = nn.Parameter(torch.empty_like(module.bias, device=device), requires_grad=False)
    return layer


_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "I32": torch.int32,
    "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool,
}  # fmt: skip


def _check_layer_tensors(path: str, layers: dict) -> None:
    """Every tensor of the empty qlk layers is in the file with the same shape and dtype."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for name, layer in layers.items():
                for key, t in layer.state_dict().items():
                    full = f"{name}.{key}"
                    if full not in keys:
                        raise ValueError(f"{path}: missing tensor '{full}' (truncated or foreign file?)")
                    sl = f.get_slice(full)
                    shape, dtype = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if shape != tuple(t.shape) or (dtype is not None and dtype != t.dtype and key in BUFFERS.values()):
                        raise ValueError(
                            f"{path}: tensor '{full}' is {sl.get_dtype()} {list(shape)}, expected {t.dtype} "
                            f"{list(t.shape)} for a {layer.fmt}{layer.bits} g{layer.group_size} layer"
                        )
    except SafetensorError as e:
        raise ValueError(f"{path}: cannot read its tensors (truncated or corrupt?): {e}") from None


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _expected_other_tensors(model: nn.Module, new_layers: dict) -> dict:
    """{state-dict key: tensor} of the model's tensors outside the layers to be replaced, as they
    will be after the swap (tied parameters appear under each of their names)."""
    prefixes = tuple(n + "." for n in new_layers)
    replaced = {id(model.get_submodule(n)) for n in new_layers}
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in replaced or (mod_name + ".").startswith(prefixes):
            continue
        for kind in (mod._parameters, mod._buffers):
            for key, t in kind.items():
                if t is None or (kind is mod._buffers and key in mod._non_persistent_buffers_set):
                    continue
                out[f"{mod_name}.{key}" if mod_name else key] = t
    return out


def _read_all(path: str, file_keys: set, new_layers: dict, others: dict, device) -> dict:
    """Fill the new (not yet attached) layers from ``path`` and return the other tensors it holds,
    after checking that the file's names and shapes are exactly what the patched model will hold
    (tied tensors: any one of their names)."""
    layer_keys = {f"{n}.{k}" for n, layer in new_layers.items() for k in layer.state_dict()}
    missing = set()
    groups = {}
    for key, t in others.items():
        groups.setdefault(_storage_key(t) or key, []).append(key)
    for names in groups.values():
        if not any(n in file_keys for n in names):
            missing.update(names)
    unexpected = file_keys - layer_keys - set(others)
    if missing or unexpected:
        raise ValueError(
            f"{path}: saved for another model: missing in the file: {sorted(missing)[:6] or 'none'}; in the file "
            f"but not in the model: {sorted(unexpected)[:6] or 'none'}"
        )
    other_tensors = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f, torch.no_grad():
            for name, layer in new_layers.items():  # straight into the new (not yet attached) layers
                for key, t in layer.state_dict(keep_vars=True).items():
                    loaded = f.get_tensor(f"{name}.{key}")
                    check_loaded_finite(path, {f"{name}.{key}": loaded})
                    t.copy_(loaded)
                    del loaded
        with safe_open(path, framework="pt") as f:
            for key in sorted(set(others) & file_keys):
                target = others[key]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(target.shape):
                    raise ValueError(
                        f"{path}: its tensors do not fit this model: '{key}' is {list(shape)} in the file, "
                        f"{list(target.shape)} in the model"
                    )
                other_tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read its tensors (truncated or corrupt?): {e}") from None
    return other_tensors


def load_quantized(model: nn.Module, path, device=None) -> nn.Module:
    """Patch an unpatched ``model`` (same architecture as the saved one, e.g. built from its config)
    as ``path`` says, without quantizing its weights, and load every tensor from ``path``.

    Returns ``model``: its qlk layers hold the saved packed weights and adapters; everything but
    the adapters is frozen, as after :func:`qlk.patch_model`. ``device`` defaults to the device of
    the model's first parameter.

    Transactional: every check (metadata, names, shapes, dtypes, NaN/Inf, packed-format
    invariants) and every read of the file happens before the model is modified, so on any error
    the model is exactly as before and a retry with the right file works.
    """
    path = os.fspath(path)
    meta = _read_header(path, KIND_QUANTIZED)
    from . import moe

    if qlk_layers(model) or moe.quant_experts(model):
        raise ValueError(f"load_quantized takes an unpatched model; {type(model).__name__} already has qlk layers")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    saved = meta["layers"]
    # validate every layer before touching the model
    for name, spec in saved.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: saved for another model: layer '{name}' does not exist in {type(model).__name__} "
                f"(file written from a {meta.get('model_class')})"
            ) from None
        if not _is_dense_linear(module):
            raise ValueError(f"{path}: layer '{name}' is a {type(module).__name__} here, not a linear layer")
        k, n = _in_out(module)
        if [n, k] != list(spec["shape"]):
            raise ValueError(
                f"{path}: saved for another shape: layer '{name}' is [out, in] = {spec['shape']} in the file, "
                f"[{n}, {k}] in this model"
            )
        if bool(spec["bias"]) != (module.bias is not None):
            raise ValueError(f"{path}: layer '{name}' has bias={spec['bias']} in the file, not in this model")
    new_layers = {n: _build_layer(n, spec, model.get_submodule(n), path, device) for n, spec in saved.items()}
    new_experts = moe.build_experts(model, meta.get("experts") or {}, path, device)  # MoE experts (qlk/moe.py)
    expert_projs = {f"{n}.{p}": q for n, m in new_experts.items() for p, q in m.projections.items()}
    _check_layer_tensors(path, {**new_layers, **expert_projs})
    # Everything is read and checked before the model changes: on any error it is exactly as before
    # (its dense weights included), so a retry with the right file works. The cost: the file's
    # tensors and the model's dense weights are resident together for the duration of the call.
    replaced = {**new_layers, **new_experts}
    others = _expected_other_tensors(model, replaced)
    other_tensors = _read_all(path, meta["_keys"], replaced, others, device)
    check_loaded_finite(path, other_tensors)
    for name, layer in {**new_layers, **expert_projs}.items():
        validate(layer.qweight, f"{path}: layer '{name}'")
    # commit: nothing below reads the file or can fail on its content
    for p in model.parameters():
        p.requires_grad_(False)
    for name, new in new_layers.items():
        old = model.get_submodule(name)
        new.train(old.training)
        _set_submodule(model, name, new)
        old._parameters["weight"] = None
        del old
    del new_layers
    moe.install(model, new_experts)
    with torch.no_grad():
        for key, t in other_tensors.items():
            others[key].copy_(t)
    model.qlk_config = meta.get("patch_config")
    return model

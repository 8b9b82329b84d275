"""save/load of adapters and whole quantized models (safetensors), and their error messages."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from qlk.io import load_adapter, load_quantized, save_adapter, save_quantized
from qlk.nn import QuantLinear
from qlk.patch import merge_model, patch_model, qlk_layers

from test_patch import batch, logits, perturb_adapters, tiny_model  # noqa: E402


def patched(arch="llama", seed=0, **kw):
    kw.setdefault("verbose", False)
    model = patch_model(tiny_model(arch, seed=seed), **kw)
    perturb_adapters(model)
    return model


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", dict(bits=4, group_size=32)),
        ("gpt2", dict(bits=3, group_size=32, r=4)),  # Conv1D, tied head
        ("opt", dict(method="qlora", r=4)),  # NF4 + double quant, LoRA
        ("bert", dict(bits=2, group_size=64, method="lora", fmt="int", use_rslora=True)),
    ],
)
def test_save_load_quantized_round_trip_exact(arch, kw, tmp_path):
    model = patched(arch, **kw)
    b = batch()
    want = logits(model, b)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    fresh = tiny_model(arch, seed=123)  # other random weights: everything must come from the file
    load_quantized(fresh, path)
    assert torch.equal(logits(fresh, b), want)
    layers = qlk_layers(fresh)
    assert layers.keys() == qlk_layers(model).keys()
    for name, m in layers.items():
        src = qlk_layers(model)[name]
        assert (m.fmt, m.bits, m.group_size, m.method, m.r, m.scaling) == (
            src.fmt, src.bits, src.group_size, src.method, src.r, src.scaling)  # fmt: skip
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert not [p for p in os.listdir(tmp_path) if p != "model.safetensors"]  # no temp file left


def test_load_quantized_does_not_quantize(tmp_path, monkeypatch):
    model = patched("qwen2")
    save_quantized(model, tmp_path / "m.safetensors")
    import qlk.ops

    def boom(*a, **k):
        raise AssertionError("load_quantized must not quantize")

    monkeypatch.setattr(qlk.ops, "quantize", boom)
    fresh = load_quantized(tiny_model("qwen2", seed=9), tmp_path / "m.safetensors")
    assert torch.equal(logits(fresh, batch()), logits(model, batch()))


def test_merged_model_round_trip(tmp_path):
    model = patched("mistral")
    merge_model(model)
    want = logits(model, batch())
    save_quantized(model, tmp_path / "merged.safetensors")
    fresh = load_quantized(tiny_model("mistral", seed=4), tmp_path / "merged.safetensors")
    assert all(m.method is None for m in qlk_layers(fresh).values())
    assert torch.equal(logits(fresh, batch()), want)


def test_metadata_in_header(tmp_path):
    from safetensors import safe_open

    model = patched("llama", bits=3, group_size=64, r=8, alpha=32)
    save_quantized(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["qlk"])
    assert meta["kind"] == "qlk.quantized_model" and meta["layout_version"] == 1 and meta["qlk_version"]
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert (layer["fmt"], layer["bits"], layer["group_size"], layer["method"], layer["r"], layer["alpha"]) == (
        "int", 3, 64, "qalora", 8, 32.0)  # fmt: skip


def test_adapter_round_trip(tmp_path):
    model = patched("llama", r=4)
    want = logits(model, batch())
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    assert os.path.getsize(path) < 64 * 1024
    other = patch_model(tiny_model("llama"), r=4, verbose=False)  # same base, fresh adapters
    assert not torch.equal(logits(other, batch()), want)
    load_adapter(other, path)
    assert torch.equal(logits(other, batch()), want)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = patched("llama", r=4)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    before = path.read_bytes()
    import qlk.io

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(qlk.io, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


# ---- bad files ---------------------------------------------------------------------------------
def test_adapter_for_other_shape_method_or_group(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(patched("llama", r=4, group_size=32), path)
    with pytest.raises(ValueError, match=r"a\.safetensors.*group_size=32.*group_size=64"):
        load_adapter(patch_model(tiny_model("llama"), r=4, group_size=64, verbose=False), path)
    with pytest.raises(ValueError, match=r"a\.safetensors.*method='qalora'.*method='lora'"):
        load_adapter(patch_model(tiny_model("llama"), r=4, method="lora", verbose=False), path)
    with pytest.raises(ValueError, match=r"a\.safetensors.*r=4.*r=8"):
        load_adapter(patch_model(tiny_model("llama"), r=8, verbose=False), path)
    with pytest.raises(ValueError, match=r"a\.safetensors.*shape"):
        load_adapter(patch_model(tiny_model("llama", intermediate_size=256), r=4, verbose=False), path)
    with pytest.raises(ValueError, match=r"a\.safetensors.*other layers"):
        load_adapter(patch_model(tiny_model("llama"), r=4, target_modules=["q_proj"], verbose=False), path)
    with pytest.raises(ValueError, match="no qlk adapter layer.*patch it first"):
        load_adapter(tiny_model("llama"), path)


def test_quantized_for_other_shape_or_model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_quantized(patched("llama"), path)
    with pytest.raises(ValueError, match=r"m\.safetensors.*another shape.*mlp.gate_proj.*\[128, 64\].*\[256, 64\]"):
        load_quantized(tiny_model("llama", intermediate_size=256), path)
    with pytest.raises(ValueError, match=r"m\.safetensors.*another model.*does not exist"):
        load_quantized(tiny_model("gpt2"), path)
    with pytest.raises(ValueError, match="unpatched model"):
        load_quantized(patched("llama"), path)
    with pytest.raises(ValueError, match=r"holds 'qlk.quantized_model'.*load_quantized"):
        load_adapter(patched("llama"), path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_quantized(patched("llama"), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 4):
        path.write_bytes(data[:cut])
        model = tiny_model("llama")
        with pytest.raises(ValueError, match=r"m\.safetensors.*(truncated|corrupt)"):
            load_quantized(model, path)
        assert not qlk_layers(model)  # nothing was patched


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"foreign\.safetensors.*without qlk metadata"):
        load_quantized(tiny_model("llama"), path)
    with pytest.raises(ValueError, match=r"foreign\.safetensors.*without qlk metadata"):
        load_adapter(patched("llama"), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a readable safetensors"):
        load_quantized(tiny_model("llama"), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_quantized(tiny_model("llama"), tmp_path / "missing.safetensors")


def test_other_layout_version(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    save_quantized(patched("llama"), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["qlk"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["layout_version"] = 99
    save_file(tensors, str(path), metadata={"qlk": json.dumps(meta)})
    with pytest.raises(ValueError, match="packed-layout version 99"):
        load_quantized(tiny_model("llama"), path)


def test_tampered_tensor_shape(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    save_quantized(patched("llama"), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.up_proj.weight_scales"
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, str(path), metadata=meta)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"m\.safetensors.*weight_scales"):
        load_quantized(model, path)
    assert not qlk_layers(model) and isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_save_needs_patched_model(tmp_path):
    with pytest.raises(ValueError, match="patch"):
        save_quantized(tiny_model("llama"), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no qlk adapter"):
        save_adapter(tiny_model("llama"), tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)
    assert QuantLinear  # the layer class is what load_quantized builds

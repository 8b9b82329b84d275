"""No silent wrong result, no lost data: faults injected into saves and loads, and the library-side
cases of issue 14 that are behaviours rather than one-line rejections (those are rows of
tests/test_bad_input.py's catalogue).

Every test here was checked to fail without its fix.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import qlk
from qlk.io import load_adapter, load_quantized, save_adapter, save_quantized
from qlk.patch import patch_model, qlk_layers

REPO = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: module types at every name, every tensor."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules(remove_duplicate=False)],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


def rewrite(src, dst, change_tensors=None, change_meta=None):
    """Copy a safetensors file, editing tensors and/or the qlk metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        q = json.loads(meta["qlk"])
        change_meta(q)
        meta["qlk"] = json.dumps(q)
    save_file(tensors, dst, metadata=meta)
    return dst


# ---- load_quantized / load_adapter: validate everything first ------------------------------------
def test_load_quantized_failure_leaves_model_exactly_as_before_and_retry_works(tmp_path, monkeypatch):
    good = tmp_path / "m.safetensors"
    src = patch_model(mlp(), verbose=False, method="lora", r=4)
    save_quantized(src, good)

    def nan_bias(t):
        t["2.bias"] = torch.full_like(t["2.bias"], float("nan"))

    def wrong_dense_shape(t):  # a non-qlk tensor that does not fit (read last by the old code)
        t["0.bias"] = torch.zeros(31)

    bad_files = [rewrite(good, tmp_path / "nan.safetensors", nan_bias),
                 rewrite(good, tmp_path / "shape.safetensors", wrong_dense_shape)]  # fmt: skip
    model = mlp(seed=1)
    before = snapshot(model)
    for bad in bad_files:
        with pytest.raises(ValueError) as e:
            load_quantized(model, bad)
        assert str(bad) in str(e.value)
        assert_unchanged(model, before)

    # a read that fails at every point in turn (an I/O error on the n-th tensor read)
    from safetensors import safe_open as real_safe_open

    reads = {"n": 0, "fail_at": None}

    class Flaky:
        def __init__(self, *a, **kw):
            self.f = real_safe_open(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            reads["n"] += 1
            if reads["n"] == reads["fail_at"]:
                raise OSError(f"injected read error at read {reads['n']}")
            return self.f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr("qlk.io.safe_open", Flaky)
    load_quantized(mlp(seed=2), good)  # count the reads of a whole load
    total, reads["n"] = reads["n"], 0
    assert total >= 8
    for fail_at in range(1, total + 1):
        reads.update(n=0, fail_at=fail_at)
        with pytest.raises(ValueError, match=f"injected read error at read {fail_at}"):
            load_quantized(model, good)
        assert_unchanged(model, before)
    monkeypatch.undo()

    load_quantized(model, good)  # the retry works: nothing was half-converted
    x = torch.randn(5, 64)
    torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def test_one_finiteness_check_for_every_load_path(tmp_path):
    model = patch_model(mlp(), verbose=False, method="lora", r=4)
    with torch.no_grad():
        qlk_layers(model)["0"].lora_B.normal_()
    save_adapter(model, tmp_path / "a.safetensors")
    save_quantized(model, tmp_path / "m.safetensors")

    def poison(key):
        def change(t):
            t[key] = t[key].clone()
            t[key].view(-1)[0] = float("inf")

        return change

    bad_adapter = rewrite(tmp_path / "a.safetensors", tmp_path / "a-inf.safetensors", poison("0.lora_A"))
    target = patch_model(mlp(), verbose=False, method="lora", r=4)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"tensor '0.lora_A' contains 1 NaN/Inf"):
        load_adapter(target, bad_adapter)
    assert_unchanged(target, before)
    for key in ("0.lora_B", "0.bias", "2.weight_scales"):  # adapter, dense bias of a qlk layer, packed state
        bad = rewrite(tmp_path / "m.safetensors", tmp_path / f"m-{key}.safetensors", poison(key))
        with pytest.raises(ValueError, match=f"'{key}'.*NaN/Inf"):
            load_quantized(mlp(), bad)


def test_adapter_for_another_base_format_warns_naming_both(tmp_path):
    save_adapter(patch_model(mlp(), verbose=False, method="lora", r=4, bits=4), tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"trained on a int4 g32 base, loaded onto a int2 g32 base"):
        load_adapter(patch_model(mlp(), verbose=False, method="lora", r=4, bits=2), tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"int4 g32 base, loaded onto a nf4 g32 base"):
        load_adapter(patch_model(mlp(), verbose=False, method="qlora", r=4, group_size=32), tmp_path / "a.safetensors")

    def drop_format(q):  # a file from a writer that did not record the base
        for spec in q["layers"].values():
            del spec["fmt"], spec["bits"]

    old = rewrite(tmp_path / "a.safetensors", tmp_path / "old.safetensors", change_meta=drop_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(patch_model(mlp(), verbose=False, method="lora", r=4, bits=2), old)
        load_adapter(patch_model(mlp(), verbose=False, method="lora", r=4, bits=4), tmp_path / "a.safetensors")


# ---- atomic writes: interrupted saves keep the previous file; file modes -------------------------
def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_quantized(patch_model(mlp(0), verbose=False), path)
    old = path.read_bytes()
    import safetensors.torch as st

    real = st.save_model

    def half_then_interrupt(model, filename, metadata=None):
        real(model, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr("qlk.io.save_model", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(patch_model(mlp(1), verbose=False), path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_save_keeps_previous_file(tmp_path):
    """A writer SIGKILLed in the middle of save_quantized (a forked child: no second interpreter to
    start) leaves the previous file as it was and loadable."""
    path = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    model = patch_model(nn.Sequential(nn.Linear(64, 32)), verbose=False)
    save_quantized(model, path)
    old = path.read_bytes()
    other = patch_model(nn.Sequential(nn.Linear(64, 32)), verbose=False)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: start writing, say so, then hang until killed
        try:
            import qlk.io

            def slow(model, filename, metadata=None):
                with open(filename, "wb") as f:
                    f.write(b"partial")
                os.write(write_end, b"w")
                time.sleep(60)

            qlk.io.save_model = slow
            save_quantized(other, path)
        finally:
            os._exit(1)
    try:
        assert os.read(read_end, 1) == b"w"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    assert path.read_bytes() == old
    fresh = load_quantized(nn.Sequential(nn.Linear(64, 32)), path)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_saved_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        model = patch_model(mlp(), verbose=False)
        save_quantized(model, tmp_path / "m.safetensors")
        save_adapter(model, tmp_path / "a.safetensors")
        from qlk.hf_models import save_qlk_dir

        hf = tiny_hf_model()
        patch_model(hf, verbose=False, method=None)
        save_qlk_dir(hf, None, tmp_path / "dir")
    finally:
        os.umask(old)
    for f in ("m.safetensors", "a.safetensors", "dir/model.qlk.safetensors", "dir/config.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o640, f
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o750
    os.chmod(tmp_path / "m.safetensors", 0o604)  # replacing a file keeps its mode, as open("w") would
    save_quantized(model, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o604


def tiny_hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_save_qlk_dir_keeps_user_files_and_old_outputs_until_complete(tmp_path, monkeypatch):
    from qlk import hf_models

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = patch_model(tiny_hf_model(0), verbose=False, method=None)
    hf_models.save_qlk_dir(first, None, out, {"n": 1})
    (out / "model.safetensors").write_text("a user's file that happens to look like a model")
    old = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full (injected)")

    monkeypatch.setattr("qlk.io.save_quantized", fail)
    with pytest.raises(OSError, match="injected"):
        hf_models.save_qlk_dir(patch_model(tiny_hf_model(1), verbose=False, method=None), None, out, {"n": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    monkeypatch.undo()

    hf_models.save_qlk_dir(patch_model(tiny_hf_model(1), verbose=False, method=None, bits=2), None, out, {"n": 2})
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    info = json.loads((out / "qlk_model.json").read_text())
    assert info["n"] == 2 and "model.qlk.safetensors" in info["files"] and "notes.txt" not in info["files"]
    from transformers import AutoConfig, AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    load_quantized(fresh, out / "model.qlk.safetensors")
    assert {m.bits for m in qlk_layers(fresh).values()} == {2}


# ---- Transformers: a saved qlk model reloads in a fresh process after `import qlk` ---------------
FRESH_LOAD = r"""
import sys, warnings, torch
import qlk                      # nothing else: no QlkConfig touched
import transformers
with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.arange(10)[None]
torch.save(m(ids).logits.detach(), sys.argv[2])
print(type(m.model.layers[0].mlp.up_proj).__name__)
"""


def test_saved_qlk_model_reloads_in_a_fresh_process(tmp_path):
    from qlk.integrations.transformers import QlkConfig

    tiny_hf_model().save_pretrained(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QlkConfig(bits=4))
    q.save_pretrained(tmp_path / "q")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path / "q"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "QuantLinear"
    with torch.no_grad():
        want = q(torch.arange(10)[None]).logits
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)


# ---- ops: differentiable on every backend, empty batches -------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quant_matmul_is_differentiable_on_every_backend(backend):
    qw = qlk.quantize(torch.randn(48, 64), bits=4, group_size=32)
    w = qw.dequantize(torch.float64)
    x = torch.randn(2, 3, 64, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    y = qlk.quant_matmul(x, qw, b, backend=backend)
    assert y.grad_fn is not None
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), g.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    dy = torch.randn(3, 48, requires_grad=True)
    dx = qlk.quant_matmul_grad_input(dy, qw, backend=backend)
    assert dx.grad_fn is not None
    gx = torch.randn_like(dx)
    dx.backward(gx)
    torch.testing.assert_close(dy.grad.double(), gx.double() @ w.t(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert qlk.quant_matmul(x, qw, b, backend=backend).grad_fn is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_empty_batch_every_op(backend, fmt):
    from qlk.autograd import lora_linear, qalora_linear, quant_linear

    qw = qlk.quantize(torch.randn(48, 64), fmt=fmt, group_size=32)
    with qlk.use_backend(backend):
        for lead in [(0,), (2, 0)]:
            assert qlk.quant_matmul(torch.randn(*lead, 64), qw).shape == (*lead, 48)
            assert qlk.quant_matmul_grad_input(torch.randn(*lead, 48), qw).shape == (*lead, 64)
            calls = [lambda x: quant_linear(x, qw, torch.zeros(48)),
                     lambda x: lora_linear(x, qw, a_l, b_l, 2.0, dropout=0.1)]  # fmt: skip
            a_l = torch.randn(4, 64, requires_grad=True)
            b_l = torch.randn(48, 4, requires_grad=True)
            if fmt == "int":
                a_q = torch.randn(4, 2, requires_grad=True)
                calls += [lambda x: qalora_linear(x, qw, a_q, b_l, 2.0),  # fused on triton
                          lambda x: qalora_linear(x, qw, a_q, b_l, 2.0, dropout=0.1)]  # fmt: skip
            for call in calls:
                x = torch.randn(*lead, 64, requires_grad=True)
                y = call(x)
                assert y.shape == (*lead, 48)
                y.sum().backward()
                assert x.grad.shape == x.shape
            assert not a_l.grad.abs().any() and not b_l.grad.abs().any()


# ---- QuantizedWeight.to ---------------------------------------------------------------------------
def test_quantized_weight_to_never_casts_codes():
    qw = qlk.quantize(torch.randn(8, 32))
    for args, kw in [((torch.float16,), {}), (("cpu", torch.float16), {}), ((), {"dtype": torch.bfloat16})]:
        with pytest.raises(TypeError, match="moves devices only"):
            qw.to(*args, **kw)
    for args, kw in [(("meta",), {}), ((), {"device": "meta"}), ((torch.zeros(1, device="meta"),), {})]:
        moved = qw.to(*args, **kw)
        assert moved.device.type == "meta" and moved.qweight.dtype == torch.int32
        assert moved.scales.dtype == torch.float16


# ---- patch_model: attention, shared modules, scales -------------------------------------------------
class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(self.att(x, x, x)[0])


def test_multihead_attention_left_alone_and_reported():
    torch.manual_seed(0)
    model = WithAttention()
    with pytest.warns(UserWarning, match=r"leaving 1 nn.MultiheadAttention projection.*att.out_proj"):
        patch_model(model, verbose=False)
    assert type(model.att.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert isinstance(model.fc, qlk.QuantLinear) and "att.out_proj" in model.qlk_config["skipped"]
    model(torch.randn(2, 5, 64)).sum().backward()  # attention still works, gradients flow to the adapter
    with pytest.raises(ValueError, match="MultiheadAttention"):
        patch_model(WithAttention(), verbose=False, target_modules=["out_proj"])


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(64, 64))
        self.b = nn.Sequential(self.a[0])  # one nn.Linear, two names

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("targets", [None, ["b.0"]])
def test_shared_linear_patched_once_under_every_name(targets, tmp_path):
    torch.manual_seed(0)
    model = patch_model(Shared(), verbose=False, target_modules=targets, method="lora", r=4)
    assert isinstance(model.a[0], qlk.QuantLinear) and model.a[0] is model.b[0]
    assert len(qlk_layers(model)) == 1
    save_quantized(model, tmp_path / "m.safetensors")
    fresh = load_quantized(Shared(), tmp_path / "m.safetensors")
    assert fresh.a[0] is fresh.b[0] and isinstance(fresh.a[0], qlk.QuantLinear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    qlk.dequantize_model(model)
    assert model.a[0] is model.b[0] and isinstance(model.a[0], nn.Linear)


def test_partly_subnormal_fp16_scales_warn_and_the_half_step_bound_holds_otherwise():
    torch.manual_seed(0)
    for scale, warns in [(1e-3, False), (1e-4, False), (1e-6, True)]:
        w = torch.randn(64, 128)
        w[:, :64] *= scale  # half of the groups small
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qw = qlk.quantize(w)
        got = [c for c in caught if "half-step bound" in str(c.message)]
        assert bool(got) == warns, (scale, [str(c.message) for c in caught])
        g = w.view(64, 4, 32)
        half_step = ((g.amax(-1) - g.amin(-1)) / 15 / 2)[..., None]
        ratio = ((qw.dequantize() - w).view(64, 4, 32).abs() / half_step).amax()
        assert (ratio > 1.25) == warns, ratio
        assert qlk.quantize(w, scale_dtype=torch.float32).dequantize().sub(w).view(64, 4, 32).abs().div(
            half_step).amax() <= 1.0 + 1e-3  # fp32 scales keep the bound
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(w)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) have groups whose torch.float16 scales are subnormal.*'0'"):
        patch_model(model, verbose=False)


def test_patch_model_refuses_unrepresentable_scales_before_converting_any_layer():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(128, 64))
    with torch.no_grad():
        model[1].weight.mul_(1e-7)  # flushes in fp16: found before layer '0' is converted
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '1'.*scale_dtype=torch.float32"):
        patch_model(model, verbose=False)
    assert_unchanged(model, before)
    patch_model(model, verbose=False, scale_dtype=torch.float32)
    assert qlk_layers(model)["1"].weight_scales.dtype == torch.float32


# ---- CLI: quantize --overwrite / --skip-incompatible, inspect, eval ---------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    from test_cli import byte_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_quantize_overwrite_skip_incompatible_inspect(hf_dir, tmp_path, capsys):
    from qlk.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["quantize", "--model", str(hf_dir), "--output-dir", str(out), "--group-size", "64", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "[64, 96]: [8, 16, 32]" in err and "--skip-incompatible" in err  # sizes that fit the whole model
    assert main(["quantize", "--model", str(hf_dir), "--output-dir", str(out), "--group-size", "64", "--overwrite",
                 "--skip-incompatible"]) == 0  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "double_quant" not in shown and "no adapter (quantized only)" in shown and "left dense: 1" in shown
    assert "int4 g64" in shown

    merged = patch_model(tiny_hf_model(), verbose=False, method="qalora", r=4)
    qlk.merge_model(merged)
    save_quantized(merged, tmp_path / "merged.safetensors")
    assert main(["inspect", str(tmp_path / "merged.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "method=qalora" not in shown and "merged (qalora adapters folded" in shown

    damaged = rewrite(tmp_path / "merged.safetensors", tmp_path / "damaged.safetensors",
                      change_meta=lambda q: q.update(layers=[1, 2]))  # fmt: skip
    assert main(["inspect", str(damaged)]) == 2
    assert "its qlk metadata is damaged ('layers' is a list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(out), "--max-tokens", "-5"])
    assert e.value.code == 2 and "--max-tokens: -5 must be 0 or more" in capsys.readouterr().err


def test_save_qlk_dir_interrupted_while_installing_leaves_whole_files(tmp_path, monkeypatch):
    """Killed between two of the per-file renames into an existing directory: every file is the
    old or the new one, complete; the user's files stay."""
    from qlk import hf_models

    old_model = patch_model(tiny_hf_model(0), verbose=False, method=None)
    new_model = patch_model(tiny_hf_model(1), verbose=False, method=None, bits=2)
    hf_models.save_qlk_dir(new_model, None, tmp_path / "reference", {"n": 2})
    new = {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}
    real_replace = os.replace
    for fail_at in range(1, len(new) + 2):  # the model file's own atomic write, then each install
        out = tmp_path / f"out{fail_at}"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        hf_models.save_qlk_dir(old_model, None, out, {"n": 1})
        old = {p.name: p.read_bytes() for p in out.iterdir()}
        calls = {"n": 0}

        def flaky_replace(src, dst):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr("qlk.hf_models.os.replace", flaky_replace)
        with pytest.raises(KeyboardInterrupt):
            hf_models.save_qlk_dir(new_model, None, out, {"n": 2})
        monkeypatch.undo()
        now = {p.name: p.read_bytes() for p in out.iterdir()}
        assert now["notes.txt"] == b"mine" and now.keys() == old.keys()
        for name, data in now.items():
            assert data in (old[name], new.get(name)), (fail_at, name)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

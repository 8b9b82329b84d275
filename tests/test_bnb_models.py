"""qlk.patch_model on a model loaded through bitsandbytes (BitsAndBytesConfig), on CPU.

NF4 layers become qlk layers as they are: the bytes, Ŵ (against bitsandbytes' own dequantizer) and
the logits must match the bitsandbytes model. FP4 / 8-bit / QA-LoRA need requantize=True.
"""
import copy
import warnings

import pytest
import torch

import qlk
from qlk.patch import qlk_layers

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
VOCAB = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama (biased projections, ragged MLP width) saved as a dense checkpoint."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def bnb_portable_cpu(monkeypatch):
    """bitsandbytes' reference numerics on any CPU. On one with AVX512 (torch's capability), its CPU
    NF4 dequantizer runs a C kernel that blocks each row on its own, unlike the flat blocks bitsandbytes
    quantized with (and its CUDA and portable paths dequantize with), so a layer whose in_features is
    not a multiple of the block size (96 here) comes out wrong, and so does its CPU GEMM; with
    AVX512-BF16 an eval forward without grad also repacks each layer for its CPU kernel, a reshape
    that fails at that width. The reference here is bitsandbytes' own portable dequantizer (the
    logits: a dense twin holding its Ŵ, ``dense_twin``), and no repack."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        assert quant_state is not None and out is None, "the tests pass a QuantState"
        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = (F.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
        a = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        code = _get_4bit_code(quant_state.quant_type, A.device)
        w = _dequantize_4bit_compute(a.reshape(-1), absmax, code, quant_state.blocksize, quant_state.shape,
                                     quant_state.dtype)
        return w.t() if A.shape[0] == 1 else w

    monkeypatch.setattr(F, "dequantize_4bit", dequantize_4bit)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


def load_bnb(path, **kw):
    kw = kw or dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    cfg = transformers.BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **kw)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg).eval()


def dense_twin(model, state):
    """A copy of ``model`` whose 4-bit layers are nn.Linear holding bitsandbytes' Ŵ (``bnb_state``):
    the reference logits (bitsandbytes' own CPU GEMM blocks rows like its AVX512 dequantizer,
    ``bnb_portable_cpu``)."""
    twin = copy.deepcopy(model)
    for name, (_, w) in state.items():
        old = twin.get_submodule(name)
        new = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight.data.copy_(w)
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data.float())
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent), leaf, new)
    return twin


def batch(seed=0, b=2, t=17):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def bnb_state(model):
    """{name: (bytes, bitsandbytes' own dequantized Ŵ)} of the 4-bit layers, copied."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            out[name] = (w.data.clone(), bnb.functional.dequantize_4bit(w.data, w.quant_state).float())
    return out


def test_layers_repacked_by_bitsandbytes_for_its_cpu_kernel_are_refused(checkpoint):
    """A Linear4bit that bitsandbytes repacked for its CPU kernel (``quant_state.packing_format_for_cpu``,
    its codes reordered, absmax de-nested to bf16) no longer holds the NF4 bytes: patch_model names
    it and says what to do, before modifying anything."""
    model = load_bnb(checkpoint, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    before = bnb_state(model)
    name = sorted(before)[0]
    model.get_submodule(name).weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match=r"repacked by bitsandbytes for its CPU kernel.*Nothing was modified") as e:
        qlk.patch_model(model, method="qlora", verbose=False)
    assert name in str(e.value)
    assert not qlk_layers(model) and len(bnb_state(model)) == 14
    w = model.get_submodule(name).weight
    with pytest.raises(ValueError, match="repacked by bitsandbytes for its CPU kernel"):
        qlk.from_bnb(w.data, w.quant_state)


@pytest.mark.parametrize("method,storage", [("qlora", None), (None, torch.bfloat16)])
def test_nf4_layers_convert_bit_exact(checkpoint, tmp_path, method, storage):
    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=method == "qlora")
    if storage is not None:  # packed bytes stored in a bf16 tensor (bnb_4bit_quant_storage, used with FSDP)
        kw["bnb_4bit_quant_storage"] = storage
    model = load_bnb(checkpoint, **kw)
    before = bnb_state(model)
    assert len(before) == 14
    x = batch()["input_ids"]
    with torch.no_grad():
        ref = dense_twin(model, before)(x).logits
    qlk.patch_model(model, method=method, verbose=False)
    layers = qlk_layers(model)
    assert sorted(layers) == sorted(before) and model.qlk_config["from_bitsandbytes"] == {n: "exact" for n in before}
    for name, (packed, w_bnb) in before.items():
        m = layers[name]
        assert (m.fmt, m.group_size, m.qweight.double_quant) == ("nf4", 64, method == "qlora")
        assert torch.equal(m.weight_packed, packed.reshape(-1).view(torch.uint8))
        assert torch.equal(m.qweight.dequantize(torch.float32), w_bnb)  # against bitsandbytes' dequantizer
        assert m.bias is not None and (m.method == ("lora" if method else None))
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # same Ŵ; only the matmul order differs

    # qlk is now the model's quantizer: save_pretrained writes a qlk checkpoint that loads back as it was
    assert model.config.quantization_config.quant_method == "qlk"
    model.save_pretrained(tmp_path / "converted")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    for name, m in qlk_layers(again).items():
        assert torch.equal(m.weight_packed, layers[name].weight_packed) and m.method == layers[name].method
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out, rtol=0, atol=0)

    if method is None:  # then the user's PEFT code, unchanged: qlk's LoRA layer on the NF4 bytes
        peft = pytest.importorskip("peft")
        from qlk.integrations.peft import QlkLoraLayer

        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
        assert sum(isinstance(m, QlkLoraLayer) for m in pm.modules()) == 14
        loss = pm(**batch(t=9)).loss
        loss.backward()
        grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]
        assert len(grads) == 14 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_qlora_on_bnb_model_trains_and_merges(checkpoint):
    model = qlk.patch_model(load_bnb(checkpoint), method="qlora", r=4, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch(t=9)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(batch(1)["input_ids"]).logits
    qlk.merge_model(model, dense_lora=True)  # LoRA on NF4: dense Ŵ + σ·B·A
    assert not qlk_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(batch(1)["input_ids"]).logits, trained, rtol=0, atol=1e-4)


def test_requantize_to_int_for_qalora(checkpoint):
    model = load_bnb(checkpoint)
    before = bnb_state(model)
    wanted = r"14 layer\(s\).*bitsandbytes NF4.*method='qalora' needs an INT base.*requantize=True"
    with pytest.raises(ValueError, match=wanted):
        qlk.patch_model(model, verbose=False)
    assert not qlk_layers(model) and len(bnb_state(model)) == 14  # nothing was modified
    with pytest.warns(UserWarning, match="dequantized and quantized again"):
        qlk.patch_model(model, bits=3, group_size=32, requantize=True, verbose=False)
    for name, m in qlk_layers(model).items():
        assert (m.fmt, m.bits, m.method) == ("int", 3, "qalora")
        expect = qlk.quantize(before[name][1], bits=3, group_size=32)  # INT3 of bitsandbytes' Ŵ
        assert torch.equal(m.weight_packed, expect.qweight) and torch.equal(m.weight_scales, expect.scales)
    with torch.no_grad():
        assert torch.isfinite(model(batch()["input_ids"]).logits).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_fp4_requantizes_from_bitsandbytes_flat_blocks(checkpoint, double_quant, monkeypatch):
    """FP4 layers (ragged in_features 96, not a multiple of the block size 64) requantized: qlk
    dequantizes them with bitsandbytes' flat blocks (its portable path, not its public CPU
    dequantizer, whose AVX512 kernel blocks rows) and quantizes that Ŵ to INT4."""
    model = load_bnb(checkpoint, load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=double_quant)
    before = bnb_state(model)

    def native(*a, **k):
        raise AssertionError("bitsandbytes' CPU dequantizer (AVX512: rows blocked) called")

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qlk.patch_model(model, bits=4, group_size=32, method=None, requantize=True, verbose=False)
    layers = qlk_layers(model)
    assert sorted(layers) == sorted(before) and any(m.in_features % 64 for m in layers.values())
    for name, m in layers.items():
        expect = qlk.quantize(before[name][1], bits=4, group_size=32)
        assert torch.equal(m.weight_packed, expect.qweight) and torch.equal(m.weight_scales, expect.scales), name


@pytest.mark.parametrize(
    "kw,patch_kw,match",
    [
        (None, dict(method="lora", fmt="int"), r"fmt='int' was asked for.*fmt=None"),
        (None, dict(method="qlora", group_size=128), r"another block size than group_size=128.*group_size=None"),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), dict(method="qlora"),
         r"14 layer\(s\) \('model.layers.0.mlp.down_proj'.*bitsandbytes FP4.*bnb_4bit_quant_type='nf4'.*requantize=True"),
        (dict(load_in_8bit=True), dict(method=None), r"14 layer\(s\).*bitsandbytes 8-bit.*requantize=True"),
    ],
)  # fmt: skip
def test_inexact_layers_are_named(checkpoint, kw, patch_kw, match):
    model = load_bnb(checkpoint, **(kw or {}))
    with pytest.raises(ValueError, match=match):
        qlk.patch_model(model, verbose=False, **patch_kw)
    assert not qlk_layers(model)


def test_int8_requantizes_when_asked(checkpoint):
    model = load_bnb(checkpoint, load_in_8bit=True)
    w = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            w[name] = bnb.functional.int8_vectorwise_dequant(m.weight.data, m.weight.SCB).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qlk.patch_model(model, method=None, requantize=True, verbose=False)
    layers = qlk_layers(model)
    assert sorted(layers) == sorted(w)
    for name, m in layers.items():
        assert torch.equal(m.weight_packed, qlk.quantize(w[name], bits=4, group_size=32).qweight)

"""patch_model / merge_model / dequantize_model on tiny random Hugging Face models (no download)."""
import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from qlk.nn import QuantLinear  # noqa: E402
from qlk.patch import (  # noqa: E402
    dequantize_model, merge_model, patch_model, qlk_layers, select_targets, trainable_parameters,
)  # fmt: skip

VOCAB = 128
TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(arch: str):
    T = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **TOKENS)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "phi":
        return T.PhiConfig(hidden_size=64, intermediate_size=128, partial_rotary_factor=0.5, **common)
    if arch == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **common)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **TOKENS)
    if arch == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, pad_token_id=2)  # fmt: skip
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt", "phi", "bert"]


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = _config(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cls = transformers.BertForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    return (cls.from_config(cfg) if arch != "bert" else cls(cfg)).eval()


def batch(seed=0, b=2, t=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def dequantized_reference(model, patched):
    """Deep copy of the unpatched ``model`` whose target weights are the patched layers' Ŵ."""
    ref = copy.deepcopy(model)
    for name, layer in qlk_layers(patched).items():
        sub = ref.get_submodule(name)
        w = layer.qweight.dequantize(torch.float32).to(sub.weight.dtype)
        with torch.no_grad():
            sub.weight.copy_(w.t() if layer.kind == "conv1d" else w)
    return ref


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"]).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def total_bits(model):
    return sum(m.qweight.nbytes for m in qlk_layers(model).values())


def perturb_adapters(model, std=0.05, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in qlk_layers(model).values():
            if m.method is not None:
                m.lora_B.normal_(0, std)


# ---- every architecture ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_matches_dequantized_reference_and_trains(arch):
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    n_linear = sum(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in model.modules())
    patch_model(model, bits=4, group_size=32, r=8, alpha=16, verbose=False)
    layers = qlk_layers(model)
    assert len(layers) == n_linear - 1  # all but the output head
    head = model.get_output_embeddings()
    assert not isinstance(head, QuantLinear)
    b = batch()
    ref = dequantized_reference(original, model)
    torch.testing.assert_close(logits(model, b), logits(ref, b), rtol=1e-4, atol=1e-4)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(layers)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses

    # QA-LoRA merge: exact up to fp16 bias rounding, still INT4 with the same bytes
    model.eval()
    before, nbytes = logits(model, b), total_bits(model)
    merge_model(model)
    assert all(m.method is None and m.bits == 4 for m in qlk_layers(model).values())
    assert total_bits(model) == nbytes
    assert not any(p.requires_grad for p in model.parameters())
    assert rel(logits(model, b), before) < 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_grads(arch, use_reentrant):
    model = patch_model(tiny_model(arch), r=4, verbose=False)
    perturb_adapters(model)
    model.train()
    b = batch()

    def grads():
        model.zero_grad()
        torch.manual_seed(0)  # GPT-2 and BERT have dropout on
        model(**b).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_three_steps(arch, tmp_path):
    model = patch_model(tiny_model(arch), r=4, dropout=0.05, verbose=False)
    data = [{k: v[0] for k, v in batch(seed=i, b=1).items()} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, gradient_checkpointing=True,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    out = trainer.train()
    assert out.global_step == 3
    assert any(m.lora_B.abs().sum() > 0 for m in qlk_layers(model).values())


# ---- formats, methods, targeting -------------------------------------------------------------------
def test_qlora_recipe_nf4():
    model = tiny_model("llama")
    patch_model(model, method="qlora", r=4, verbose=False)
    layers = qlk_layers(model)
    assert all(m.fmt == "nf4" and m.method == "lora" and m.group_size == 64 for m in layers.values())
    assert all(m.weight_absmax.dtype == torch.uint8 for m in layers.values())  # double quant
    perturb_adapters(model)
    b = batch()
    before = logits(model, b)
    with pytest.raises(ValueError, match="cannot merge exactly.*dense_lora=True"):
        merge_model(model)
    assert all(m.method == "lora" for m in qlk_layers(model).values())  # nothing changed
    merge_model(model, dense_lora=True)
    assert not qlk_layers(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert rel(logits(model, b), before) < 1e-5


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bits_qalora_merge(bits):
    model = patch_model(tiny_model("qwen2"), bits=bits, group_size=32, verbose=False)
    perturb_adapters(model)
    b = batch()
    before, nbytes = logits(model, b), total_bits(model)
    merge_model(model)
    assert total_bits(model) == nbytes and rel(logits(model, b), before) < 1e-3


def test_lora_on_int_and_rslora():
    model = patch_model(tiny_model("mistral"), method="lora", fmt="int", r=4, alpha=8, use_rslora=True, verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.method == "lora" and layer.fmt == "int" and layer.scaling == pytest.approx(4.0)


def test_target_modules_list_and_regex():
    model = patch_model(tiny_model("llama"), target_modules=["q_proj", "v_proj"], verbose=False)
    names = set(qlk_layers(model))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    model = patch_model(tiny_model("llama"), target_modules=r".*\.mlp\.(up|down)_proj", verbose=False)
    assert {n.rpartition(".")[2] for n in qlk_layers(model)} == {"up_proj", "down_proj"}
    assert len(select_targets(tiny_model("gpt2"))) == 8


def test_trainable_parameters_summary(capsys):
    model = patch_model(tiny_model("llama"), r=8)
    out = capsys.readouterr().out
    assert "trainable params" in out
    s = trainable_parameters(model)
    assert s.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64  # q, k, v (2 kv heads of 16), o
    mlp = 3 * 64 * 128
    assert s.qlk_layers == 14 and s.quantized == 2 * (attn + mlp)
    assert 0 < s.percent < 100 and "trainable%" in str(s)


def test_dequantize_model_restores_dense_layers():
    model = patch_model(tiny_model("gpt2"), verbose=False)
    perturb_adapters(model)
    b = batch()
    before = logits(model, b)
    dequantize_model(model)
    assert not qlk_layers(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert rel(logits(model, b), before) < 1e-5


def test_patch_on_bf16_model():
    model = tiny_model("llama").to(torch.bfloat16)
    patch_model(model, r=4, verbose=False)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.lora_A.dtype == torch.float32 and layer.weight_dtype == torch.bfloat16
    model.train()
    loss = model(**batch()).loss
    loss.backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


def test_dense_weights_are_released():
    model = tiny_model("llama")
    alive = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    patch_model(model, verbose=False)
    gc.collect()
    assert alive() is None


# ---- errors: clear, and nothing half-patched ------------------------------------------------------
def _assert_untouched(model):
    assert not qlk_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_group_size_not_dividing_names_layer_and_divisors():
    model = tiny_model("llama", intermediate_size=96)  # down_proj: in_features 96
    with pytest.raises(ValueError) as e:
        patch_model(model, group_size=64, verbose=False)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "in_features=96" in msg
    # only the sizes that fit the WHOLE model (48 and 96 would fail on the 64-wide layers)
    assert "[64, 96]: [8, 16, 32]" in msg, msg
    assert "skip_incompatible=True (Python)" in msg and "--skip-incompatible" in msg
    _assert_untouched(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        patch_model(model, group_size=64, skip_incompatible=True, verbose=False)
    assert any("down_proj" in str(x.message) for x in w)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_target_modules_matching_nothing_lists_names():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matched no.*q_proj"):
        patch_model(model, target_modules=["query"], verbose=False)
    with pytest.raises(ValueError, match="matched no"):
        patch_model(model, target_modules=r"nothing\..*", verbose=False)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        patch_model(model, target_modules="(", verbose=False)
    _assert_untouched(model)


def test_patching_twice_raises():
    model = patch_model(tiny_model("llama"), verbose=False)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, verbose=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits=5 is not supported"),
        (dict(bits=8), "bits=8"),
        (dict(fmt="fp4"), "fmt='fp4' is not supported"),
        (dict(fmt="nf4", bits=3, method="lora"), "4-bit"),
        (dict(method="dora"), "method='dora' is not supported"),
        (dict(method="qalora", fmt="nf4"), "method='qalora' needs fmt='int'"),
        (dict(method="qlora", fmt="int"), "method='qlora' is LoRA on an NF4 base"),
        (dict(group_size=12), "multiple of 8"),
        (dict(fmt="nf4", method="lora", group_size=48), "NF4 block size"),
        (dict(r=0), "r=0"),
        (dict(dropout=1.5), "dropout"),
        (dict(target_modules=3), "target_modules"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        patch_model(model, verbose=False, **kwargs)
    _assert_untouched(model)


def test_nan_weight_rejected_before_any_change():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.*NaN"):
        patch_model(model, verbose=False)
    _assert_untouched(model)


def test_merge_and_dequantize_need_patched_model():
    with pytest.raises(ValueError, match="patch_model first"):
        merge_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="patch_model first"):
        dequantize_model(tiny_model("llama"))


# ---- against PEFT -------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft_on_the_dequantized_model(use_rslora):
    """method="lora" = PEFT's LoRA on a model whose weights are Ŵ: same logits, same adapter grads."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    patch_model(model, method="lora", r=4, alpha=8, use_rslora=use_rslora, verbose=False)
    perturb_adapters(model)
    ref = dequantized_reference(original, model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, lora_dropout=0.0, target_modules=targets)
    ref = peft.get_peft_model(ref, cfg)
    ours = qlk_layers(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if hasattr(m, "lora_A") and name.removeprefix("base_model.model.") in ours:
                q = ours[name.removeprefix("base_model.model.")]
                m.lora_A["default"].weight.copy_(q.lora_A)
                m.lora_B["default"].weight.copy_(q.lora_B)
    b = batch()
    model.train(), ref.train()
    loss, loss_ref = model(**b).loss, ref(**b).loss
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    loss_ref.backward()
    # PEFT: base_model.model.<layer>.lora_A.default.weight; qlk: <layer>.lora_A
    grads_ref = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
                 for n, p in ref.named_parameters() if p.requires_grad}  # fmt: skip
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == grads_ref.keys()
    for n in ours:
        torch.testing.assert_close(ours[n], grads_ref[n], rtol=1e-4, atol=1e-6)

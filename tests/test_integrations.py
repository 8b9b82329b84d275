"""qlk integrations: torch.compile custom ops, the Transformers quantizer, PEFT interop, TRL."""
import copy
import os

import pytest
import torch
from torch import nn

import qlk
from qlk import custom_ops
from qlk.patch import qlk_layers

transformers = pytest.importorskip("transformers")
VOCAB = 128


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def batch(seed=0, b=2, t=16):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def dequantized_reference(model, patched):
    ref = copy.deepcopy(model)
    for name, layer in qlk_layers(patched).items():
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(layer.qweight.dequantize(torch.float32))
    return ref


# ---- torch.compile ---------------------------------------------------------------------------------
def test_custom_ops_opcheck():
    qw = qlk.quantize(torch.randn(48, 64), bits=4, group_size=32)
    tensors, attrs = custom_ops.unpack(qw)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.qlk.quant_matmul.default, (x, *tensors, torch.randn(48, requires_grad=True), *attrs))
    dy = torch.randn(3, 48, requires_grad=True)
    torch.library.opcheck(torch.ops.qlk.quant_matmul_grad_input.default, (dy, *tensors, *attrs))


@pytest.mark.parametrize("method,backend", [("qalora", "inductor"), ("lora", "aot_eager"), (None, "aot_eager")])
def test_quantlinear_compiles_fullgraph(method, backend):
    torch.manual_seed(0)
    layer = qlk.QuantLinear.from_dense(nn.Linear(64, 48), bits=4, group_size=32, method=method, r=4)
    if method:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 5, 64, requires_grad=True)
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def run(fn):
        x.grad = None
        layer.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in trainable]

    eager = run(layer)
    graphs = []

    def recording(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    run(torch.compile(layer, fullgraph=True, backend=recording))
    op = {"qalora": "qlk.qalora_linear", "lora": "qlk.lora_linear", None: "qlk.quant_matmul"}[method]
    assert len(graphs) == 1 and op in graphs[0]  # one graph, the layer's op in it (tests/test_compile.py: more)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True, backend=backend))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)
    for g, e in zip(compiled[2], eager[2]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert eager[0].requires_grad is False and not torch.compiler.is_compiling()


# ---- Transformers quantizer ------------------------------------------------------------------------
def test_from_pretrained_quantizes_on_load_and_round_trips(tmp_path):
    from qlk.integrations.transformers import QlkConfig

    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    ref = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, method=None, verbose=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=QlkConfig(bits=4, group_size=32))
    layers = qlk_layers(model)
    assert len(layers) == 14 and not isinstance(model.lm_head, qlk.QuantLinear)
    assert all("weight" not in m._parameters for m in layers.values())
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(b["input_ids"]).logits, ref(b["input_ids"]).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert len(qlk_layers(loaded)) == 14
    for name, m in qlk_layers(loaded).items():
        for buf in ("weight_packed", "weight_scales", "weight_biases"):
            assert torch.equal(getattr(m, buf), getattr(layers[name], buf))
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert size < 0.6 * sum(f.stat().st_size for f in (tmp_path / "dense").glob("*.safetensors"))


def test_from_pretrained_with_adapters_trains(tmp_path):
    from qlk.integrations.transformers import QlkConfig

    tiny_llama().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=QlkConfig(bits=3, group_size=32, method="qalora", r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 28 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    model.train()
    model(**batch()).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=8), "bits=8 is not supported"), (dict(fmt="fp8"), "fmt='fp8'"),
    (dict(fmt="nf4", bits=3), "4-bit"), (dict(group_size=12), "multiple of 8"),
    (dict(fmt="nf4", method="qalora"), "needs fmt='int'"),
])  # fmt: skip
def test_qlk_config_errors(kwargs, match):
    from qlk.integrations.transformers import QlkConfig

    with pytest.raises(ValueError, match=match):
        QlkConfig(**kwargs)


# ---- PEFT ------------------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_get_peft_model_on_qlk_model_uses_qlk_layers():
    peft = pytest.importorskip("peft")
    from qlk.integrations.peft import QlkLoraLayer, get_peft_model

    base = tiny_llama()
    model = qlk.patch_model(copy.deepcopy(base), method=None, verbose=False)
    ref = dequantized_reference(base, model)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    ours = get_peft_model(model, peft.LoraConfig(**cfg))
    ref = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    layers = [m for m in ours.modules() if isinstance(m, QlkLoraLayer)]
    assert len(layers) == 14
    torch.manual_seed(1)
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
                ref_params[n].copy_(p)
    ours.train(), ref.train()
    b = batch()
    loss, loss_ref = ours(**b).loss, ref(**b).loss
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss.backward(), loss_ref.backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert g.keys() == g_ref.keys() and len(g) == 28
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "qalora"])
def test_export_peft_adapter_loads_on_dense_model(tmp_path, method):
    peft = pytest.importorskip("peft")
    from qlk.integrations.peft import export_peft_adapter

    base = tiny_llama()
    model = qlk.patch_model(copy.deepcopy(base), method=method, r=4, alpha=8, verbose=False)
    torch.manual_seed(2)
    with torch.no_grad():
        for m in qlk_layers(model).values():
            m.lora_B.normal_(0, 0.05)
    export_peft_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    dense = peft.PeftModel.from_pretrained(dequantized_reference(base, model), tmp_path / "adapter")
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=b["input_ids"]).logits, model(input_ids=b["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


# ---- TRL ---------------------------------------------------------------------------------------------
def test_trl_sft_trainer_few_steps(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = qlk.patch_model(tiny_llama(), r=4, verbose=False)
    rows = [{"input_ids": batch(seed=i, b=1)["input_ids"][0].tolist()} for i in range(8)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )  # fmt: skip
    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")), bos_token="t0", eos_token="t1",
        pad_token="t2", unk_token="t3",
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             data_collator=collate, processing_class=tok)  # fmt: skip
    out = trainer.train()
    assert out.global_step == 3
    assert any(m.lora_B.abs().sum() > 0 for m in qlk_layers(model).values())

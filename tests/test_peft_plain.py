"""Plain PEFT on a qlk model: the code a user runs on a bitsandbytes model, unchanged
(peft.get_peft_model, training, save_pretrained, PeftModel.from_pretrained, merge_and_unload)."""
import os
import subprocess
import sys

import pytest
import torch

import qlk
from qlk.patch import qlk_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from qlk.integrations.peft import QlkLoraLayer  # noqa: E402

VOCAB = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def load_qlk(path):
    config = qlk.QlkConfig(bits=4, group_size=32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def batch(seed=0, b=2, t=9):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def test_plain_peft_train_save_load_merge(checkpoint, tmp_path):
    # --- what a QLoRA user writes, with QlkConfig in place of BitsAndBytesConfig
    model = peft.prepare_model_for_kbit_training(load_qlk(checkpoint), use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, config)
    wrapped = {n: m for n, m in pm.named_modules() if isinstance(m, QlkLoraLayer)}
    assert len(wrapped) == 14 and all(isinstance(m.get_base_layer(), qlk.QuantLinear) for m in wrapped.values())
    assert not isinstance(pm.base_model.model.lm_head, QlkLoraLayer)  # the head is left out, as PEFT does
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(2):
        loss = pm(**batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    pm.eval()
    x = batch(1)["input_ids"]
    with torch.no_grad():
        trained = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "adapter")

    # --- reload on a fresh qlk model: the same layers, the same logits
    again = peft.PeftModel.from_pretrained(load_qlk(checkpoint), tmp_path / "adapter")
    assert sum(isinstance(m, QlkLoraLayer) for m in again.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, trained, rtol=0, atol=0)

    # --- independent reference: PEFT's own LoRA layers on a dense model holding qlk's Ŵ
    dense_base = qlk.dequantize_model(load_qlk(checkpoint), torch.float32)
    dense = peft.PeftModel.from_pretrained(dense_base, tmp_path / "adapter")
    assert not qlk_layers(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=x).logits, trained, rtol=0, atol=1e-5)

    # --- merge_adapter / unmerge_adapter: the quantized base comes back as it was
    layer = next(iter(m for m in again.modules() if isinstance(m, QlkLoraLayer)))
    base = layer.get_base_layer()
    again.merge_adapter()
    assert isinstance(layer.get_base_layer(), torch.nn.Linear) and layer.merged
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, trained, rtol=0, atol=1e-5)
    again.unmerge_adapter()
    assert layer.get_base_layer() is base and not layer.merged

    # --- merge_and_unload: dense Ŵ + σ·B·A (float64 reference from the documented formula)
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    expect = base.qweight.dequantize(torch.float64) + layer.scaling["default"] * (b @ a)
    name = next(n for n, m in again.base_model.model.named_modules() if m is layer)
    merged = again.merge_and_unload()
    assert not any(isinstance(m, QlkLoraLayer) for m in merged.modules())
    new = merged.get_submodule(name)
    assert type(new) is torch.nn.Linear and not new.weight.requires_grad
    torch.testing.assert_close(new.weight.double(), expect, rtol=0, atol=1e-6)
    with torch.no_grad():
        merged_logits = merged(input_ids=x).logits
    torch.testing.assert_close(merged_logits, trained, rtol=0, atol=1e-5)

    # --- the merged model saves and loads back, its merged layers dense
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(reloaded.get_submodule(name)) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, merged_logits, rtol=0, atol=0)


IMPORT_ORDER_SCRIPT = """
import importlib.util, os, sys, torch
first = os.environ["IMPORT_FIRST"]
__import__(first)
if first in ("qlk", "peft"):
    assert {"qlk": "peft", "peft": "qlk"}[first] not in sys.modules
assert importlib.util.find_spec("peft")  # an availability check (Transformers' is_peft_available) imports nothing
import qlk, peft
net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
qlk.patch_model(net, method=None, verbose=False)
try:
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
except ValueError as e:
    print("refused:", e)
else:
    print("wrapped:", type(pm.base_model.model[0]).__name__)
"""


@pytest.mark.parametrize(
    "first,dispatch,expect",
    [("qlk", "1", "wrapped: QlkLoraLayer"),
     pytest.param("peft", "1", "wrapped: QlkLoraLayer", marks=pytest.mark.slow),
     # qlk.integrations.peft imports peft while it is itself half executed: the install waits for its end
     ("qlk.integrations.peft", "1", "wrapped: QlkLoraLayer"),
     pytest.param("qlk", "0", "refused: Target module QuantLinear", marks=pytest.mark.slow)],
)  # fmt: skip
def test_fresh_process_import_order(first, dispatch, expect):
    """A fresh process: qlk imported before peft (the import hook installs the dispatch when peft
    loads), after it (installed at once), or qlk.integrations.peft first (which imports peft midway);
    QLK_PEFT_DISPATCH=0 leaves PEFT alone."""
    env = dict(os.environ, PYTHONPATH=ROOT, QLK_PEFT_DISPATCH=dispatch, IMPORT_FIRST=first)
    out = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "could not register" not in out.stderr, out.stderr[-2000:]

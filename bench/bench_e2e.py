"""End-to-end training step: tokens/s and peak GPU memory of a Llama-architecture model.

    python bench/bench_e2e.py --quick --out bench/results/x/e2e.csv

The model is built from a config (no download, random weights, bf16); ``--model 1b`` is
TinyLlama-1.1B's geometry (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocab 32000).
Every variant adapts the same layers (all seven projections of every block; never lm_head) with
the same r and alpha, no dropout, no gradient checkpointing, AdamW on the adapters only:

=============  ===============================================================================
provider       model
=============  ===============================================================================
bf16_lora      PEFT LoRA on the bf16 model
hf_peft_bnb    Transformers ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
               quant, bf16 compute))`` from a checkpoint saved to a temporary folder, + PEFT LoRA
               (``prepare_model_for_kbit_training`` is not called: it upcasts norms to fp32 and
               turns on checkpointing, which the other variants don't do)
qlk_qalora     ``qlk.patch_model(model, bits=4, group_size=32, method="qalora")`` (INT4 g32)
qlk_qlora      ``qlk.patch_model(model, method="qlora", fmt="nf4")`` (NF4+DQ, blocksize 64)
=============  ===============================================================================

A step is forward with labels (cross-entropy), backward, optimizer step, zero_grad. After warm-up
steps, each timed step is bracketed by CUDA events; tokens/s = tokens per step / step time
(median, p20, p80 over the steps). ``peak_mem_gib`` is ``torch.cuda.max_memory_allocated`` over
the timed steps (weights, adapters, optimizer state, activations), ``model_mem_gib`` what the
model held before the first step. The loss of every step must be finite, or the row says
``wrong``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from common import Budget, Stats, short_reason  # noqa: E402

#: in the order they run (the quick budget may stop the last ones)
PROVIDERS = ["qlk_qalora", "hf_peft_bnb", "qlk_qlora", "bf16_lora"]
BASELINE = "hf_peft_bnb"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
QUICK = dict(batch=2, seq=1024, warmup=2, steps=6, budget_s=60)


def llama_config(name: str, seq: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_dense(cfg, device, seed: int = 0):
    """The bf16 model with random weights (the same for every variant: same seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def _peft(model, r, alpha):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def build(provider: str, cfg, device, r: int, alpha: float, tmp: str):
    if provider == "bf16_lora":
        return _peft(build_dense(cfg, device), r, alpha)
    if provider == "hf_peft_bnb":
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        path = os.path.join(tmp, "dense")
        if not os.path.exists(os.path.join(path, "config.json")):
            dense = build_dense(cfg, device)
            dense.save_pretrained(path)
            del dense
            _free()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": _device_map_target(device)})  # fmt: skip
        return _peft(model, r, alpha)
    if provider in ("qlk_qalora", "qlk_qlora"):
        import qlk

        patch_model = getattr(qlk, "patch_model", None)
        if patch_model is None:
            from qlk.patch import patch_model
        model = build_dense(cfg, device)
        if provider == "qlk_qalora":
            return patch_model(model, bits=4, group_size=32, method="qalora", fmt="int", r=r, alpha=alpha, verbose=False)
        return patch_model(model, bits=4, group_size=64, method="qlora", fmt="nf4", r=r, alpha=alpha, verbose=False)
    raise ValueError(f"unknown provider {provider!r}")


def _device_map_target(device):
    d = torch.device(device)
    return (d.index or 0) if d.type == "cuda" else d.type


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_steps(model, vocab: int, batch: int, seq: int, warmup: int, steps: int, device) -> tuple[list, list]:
    """(step times in ms, losses). Inputs rotate through a few random batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameter: the adapters were not attached")
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = [torch.randint(0, vocab, (batch, seq), device=device) for _ in range(3)]
    model.train()
    cuda = torch.device(device).type == "cuda"
    times, losses = [], []
    for i in range(warmup + steps):
        ids = batches[i % len(batches)]
        if cuda:
            if i == warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
            losses.append(float(loss.detach()))
    return times, losses


def run(args, writer: common.ResultWriter, device: str = "cuda") -> dict:
    budget = Budget(args.budget_s)
    cfg = llama_config(args.model, args.seq)
    cuda = torch.device(device).type == "cuda"
    tokens = args.batch * args.seq
    shape = f"llama-{args.model} {args.batch}x{args.seq}"
    results = {}
    with tempfile.TemporaryDirectory(prefix="qlk-e2e-") as tmp:
        for p in args.providers:
            fmt = {"bf16_lora": "bf16", "hf_peft_bnb": "nf4", "qlk_qalora": "int4g32", "qlk_qlora": "nf4"}.get(p, "")
            keys = dict(op="train_step", shape=shape, fmt=fmt, M=tokens, dtype="bfloat16")
            if p not in PROVIDERS:
                writer.status(p, f"unavailable: unknown provider (known: {', '.join(PROVIDERS)})", **keys)
                continue
            if budget.spent():
                budget.report_once(writer, p)
                break
            model = None
            try:
                _free()
                before = torch.cuda.memory_allocated() if cuda else 0
                model = build(p, cfg, device, args.r, args.alpha, tmp)
                model_mem = (torch.cuda.memory_allocated() - before) if cuda else 0
                trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
                times, losses = train_steps(model, cfg.vocab_size, args.batch, args.seq, args.warmup, args.steps, device)
                peak = torch.cuda.max_memory_allocated() if cuda else 0
            except Exception as e:  # noqa: BLE001 - reported as a row
                writer.status(p, f"unavailable: {short_reason(e)}", **keys)
                print(f"[bench_e2e] {p}: failed: {short_reason(e, 400)}", flush=True)
                del model
                _free()
                continue
            finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
            status = "ok" if finite else f"wrong: non-finite loss {losses}"
            t = common.quantiles(times)
            t = Stats(t.p50, t.p20, t.p80, "cuda-events" if cuda else "cpu-wallclock")
            writer.row(provider=p, metric="step_ms", value=t, unit="ms", status=status, **keys)
            writer.row(provider=p, metric="tokens_per_s", value=t.scaled(tokens * 1e3), unit="tok/s", status=status, **keys)
            writer.row(provider=p, metric="trainable_params", value=float(trainable), status=status, **keys)
            writer.row(provider=p, metric="loss", value=losses[-1], status=status, note="last timed step", **keys)
            if cuda:
                writer.row(provider=p, metric="model_mem_gib", value=model_mem / 2**30, unit="GiB", status=status, **keys)
                writer.row(provider=p, metric="peak_mem_gib", value=peak / 2**30, unit="GiB", status=status, **keys)
            print(f"[bench_e2e] {p:12s} {tokens * 1e3 / t.p50:10.0f} tok/s  peak {peak / 2**30:6.2f} GiB  "
                  f"loss {losses[-1]:.3f}", flush=True)  # fmt: skip
            if status == "ok":
                results[(p, "train_step", shape, fmt, tokens, "bfloat16")] = t
            del model
            _free()
    common.speedup_rows(writer, results, BASELINE)
    return results


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"fits one 10-minute call: {QUICK}")
    ap.add_argument("--model", default="1b", choices=list(MODELS))
    ap.add_argument("--providers", help=f"comma list of {PROVIDERS} (default: all)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; quick 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 6)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    q = QUICK if a.quick else {}
    a.providers = common.parse_list(a.providers) or PROVIDERS
    a.batch = a.batch or q.get("batch", 4)
    a.seq = a.seq or q.get("seq", 1024)
    a.warmup = a.warmup if a.warmup is not None else q.get("warmup", 3)
    a.steps = a.steps or q.get("steps", 10)
    a.budget_s = a.budget_s if a.budget_s is not None else q.get("budget_s")
    if a.out is None:
        a.out = common.default_out("e2e")
    return a


def main(argv=None) -> int:
    return common.run_benchmark("e2e", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())

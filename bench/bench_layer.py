"""Layer microbenchmark: one training step of a single adapted linear layer.

    python bench/bench_layer.py --quick --out bench/results/x/layer.csv

A step is ``y = layer(x); y.backward(dy)`` with x requiring grad (a layer inside a network needs
dX) and the adapter's A and B receiving their gradients; the frozen base gets none. Variants
(``--providers``; each one named gets a row, ``unavailable: <reason>`` if it cannot run):

================  =================================================================  ==========
provider          layer                                                               format
================  =================================================================  ==========
qlk_qalora        ``qlk.patch_model(method="qalora", fmt="int")`` (QA-LoRA)          --qalora-formats
qlk_qlora         ``qlk.patch_model(method="qlora", fmt="nf4")`` (LoRA on NF4+DQ)    nf4
peft_bnb_nf4      PEFT LoRA on ``bitsandbytes.nn.Linear4bit`` (NF4+DQ, bf16 compute)  nf4
peft_bf16         PEFT LoRA on a bf16 ``nn.Linear``                                   bf16
================  =================================================================  ==========

Same r, alpha (no dropout), bf16 activations, fp32 adapters (qlk's default; PEFT upcasts adapters
of a bf16 base to fp32 too). Metrics: step time (median, p20, p80), TFLOP/s counting the base
layer's forward and dX (4·M·N·K), ``weight_mem_gib`` (memory the layer holds) and
``peak_mem_gib`` (the step's peak allocation above what was allocated before the layer was
built: the layer, its saved activations, gradients and workspace), and every provider's
``speedup_vs_peft_bnb_nf4``. Before timing, dX of each layer is compared with float32 math on its
own dequantized weight (the adapters start at B = 0, so they add nothing to the output).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from bench_kernels import FORMATS, SHAPES, parse_shape, shape_label  # noqa: E402
from common import Budget, Rotating, measure, randn, rel_err, short_reason  # noqa: E402

PROVIDERS = ["qlk_qalora", "qlk_qlora", "peft_bnb_nf4", "peft_bf16"]
BASELINE = "peft_bnb_nf4"
MS = [1024, 4096, 8192]
QUICK = dict(shapes=["8b-qo", "8b-gateup"], ms=[4096], warmup_ms=10, rep_ms=40, budget_s=60)
TOL = 2e-2


class Holder(nn.Module):
    """The layer under test as ``proj``, so that patchers find it by name."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _dense(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return lin


def build(provider: str, w: torch.Tensor, fmt_name: str, r: int, alpha: float):
    """-> (module, reference dequantized weight [N, K] float32). Only the adapters require grad."""
    if provider in ("qlk_qalora", "qlk_qlora"):
        import qlk

        patch_model = getattr(qlk, "patch_model", None)
        if patch_model is None:  # not exported yet: the module itself
            from qlk.patch import patch_model
        fmt, bits, g = FORMATS[fmt_name]
        method = "qalora" if provider == "qlk_qalora" else "qlora"
        model = patch_model(Holder(_dense(w)), bits=bits, group_size=g, method=method, fmt=fmt, r=r, alpha=alpha,
                                verbose=False)  # fmt: skip
        layer = model.proj
        if not hasattr(layer, "qweight"):
            raise RuntimeError(f"qlk.patch_model left {type(layer).__name__} in place of the Linear")
        import qlk.kernels as K

        why = K.supports(layer.qweight) if hasattr(K, "supports") else None
        if why is not None and w.is_cuda:
            raise RuntimeError(f"qlk kernels fall back to the torch reference for this weight ({why})")
        return model, layer.qweight.dequantize(torch.float32)
    if provider in ("peft_bnb_nf4", "peft_bf16"):
        from peft import LoraConfig, inject_adapter_in_model

        if provider == "peft_bnb_nf4":
            import bitsandbytes as bnb
            import bitsandbytes.functional as BF

            base = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                     compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
            base.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4",
                                            compress_statistics=True, blocksize=64)  # fmt: skip
            base = base.to(w.device)
            ref = BF.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        else:
            base = _dense(w)
            ref = w.float()
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], bias="none")
        model = inject_adapter_in_model(cfg, Holder(base))
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        if not any(p.requires_grad for p in model.parameters()):
            raise RuntimeError("PEFT attached no trainable adapter")
        return model, ref
    raise ValueError(f"unknown provider {provider!r}")


def _mem() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def run(args, writer: common.ResultWriter, device: str = "cuda") -> dict:
    budget = Budget(args.budget_s)
    times = {}
    cuda = device == "cuda"
    for shape in args.shapes:
        k, n = parse_shape(shape)
        label = shape_label(k, n)
        w = randn(n, k, std=0.02, device=device)
        variants = []
        for p in args.providers:
            if p == "qlk_qalora":
                variants += [(p, f) for f in args.qalora_formats]
            elif p in ("qlk_qlora", "peft_bnb_nf4"):
                variants.append((p, "nf4"))
            elif p == "peft_bf16":
                variants.append((p, "bf16"))
            else:
                writer.status(p, f"unavailable: unknown provider (known: {', '.join(PROVIDERS)})")
        for p, fmt_name in variants:
            for m in args.ms:
                keys = dict(op="step", shape=label, fmt=fmt_name, M=m, dtype="bfloat16")
                if budget.spent():
                    budget.report_once(writer, f"{p} {label} M={m}")
                    break
                t = _one(p, fmt_name, w, m, k, n, args, writer, keys, device)
                if t is not None:
                    times[(p, "step", label, fmt_name, m, "bfloat16")] = t
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        del w
    # every provider against PEFT on bnb NF4, whatever the format
    common.speedup_rows(writer, times, BASELINE)
    return times


def _one(p, fmt_name, w, m, k, n, args, writer, keys, device):
    cuda = device == "cuda"
    try:
        rot = Rotating(lambda: (randn(m, k, device=device).requires_grad_(True), randn(m, n, device=device)),
                       Rotating.count_for(2 * m * (k + n), max_count=4))  # fmt: skip
        before = _mem()
        model, ref = build(p, w, fmt_name, args.r, args.alpha)
        gc.collect()
        weight_mem = _mem() - before
        adapters = [q for q in model.parameters() if q.requires_grad]
        # correctness: dX and Y of a fresh input against float32 math on the layer's own Ŵ
        x = randn(16, k, device=device).requires_grad_(True)
        dy = randn(16, n, device=device)
        y = model(x)
        y.backward(dy)
        err = max(rel_err(y.detach(), x.detach().float() @ ref.t()), rel_err(x.grad, dy.float() @ ref))
        grads_ok = all(q.grad is not None for q in adapters)
        del x, dy, y, ref
        status = "ok" if err <= TOL and grads_ok else f"wrong: rel_err={err:.3g}, adapter grads {'set' if grads_ok else 'missing'}"
        writer.row(provider=p, metric="rel_err", value=err, status=status, note="Y and dX at M=16 vs float32", **keys)

        def step():
            x, dy = rot()
            model(x).backward(dy)

        grad_to_none = [x for x, _ in rot.items] + adapters
        for q in grad_to_none:
            q.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        t = measure(step, args.warmup_ms, args.rep_ms, grad_to_none=grad_to_none, device=device)
        writer.timing(p, t, flops=4.0 * m * n * k, status=status, note=f"r={args.r} alpha={args.alpha}", **keys)
        if cuda:
            writer.row(provider=p, metric="weight_mem_gib", value=weight_mem / 2**30, unit="GiB", status=status, **keys)
            writer.row(provider=p, metric="peak_mem_gib", value=peak / 2**30, unit="GiB", status=status, **keys)
        print(f"[bench_layer] {p:13s} {keys['shape']:12s} {fmt_name:8s} M={m:<5d} {t.p50:8.3f} ms", flush=True)
        return t if status == "ok" else None
    except Exception as e:  # noqa: BLE001 - reported as a row
        writer.status(p, f"unavailable: {short_reason(e)}", **keys)
        print(f"[bench_layer] {p} {keys}: failed: {short_reason(e, 400)}", flush=True)
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"fits one 10-minute call: {QUICK}")
    ap.add_argument("--shapes", help=f"comma list of {list(SHAPES)} or K->N (default: all)")
    ap.add_argument("--ms", help=f"comma list of M = tokens per step (default {MS})")
    ap.add_argument("--providers", help=f"comma list of {PROVIDERS} (default: all)")
    ap.add_argument("--qalora-formats", default="int4g32", help="INT formats of qlk_qalora (default int4g32)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    q = QUICK if a.quick else {}
    a.shapes = common.parse_list(a.shapes) or q.get("shapes") or list(SHAPES)
    a.ms = common.parse_list(a.ms, int) or q.get("ms") or MS
    a.providers = common.parse_list(a.providers) or PROVIDERS
    a.qalora_formats = common.parse_list(a.qalora_formats)
    bad = [f for f in a.qalora_formats if FORMATS.get(f, ("?",))[0] != "int"]
    if bad:
        ap.error(f"--qalora-formats takes INT formats of {list(FORMATS)}; got {bad}")
    a.warmup_ms = a.warmup_ms if a.warmup_ms is not None else q.get("warmup_ms", 25)
    a.rep_ms = a.rep_ms if a.rep_ms is not None else q.get("rep_ms", 100)
    a.budget_s = a.budget_s if a.budget_s is not None else q.get("budget_s")
    if a.out is None:
        a.out = common.default_out("layer")
    return a


def main(argv=None) -> int:
    return common.run_benchmark("layer", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())

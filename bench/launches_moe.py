"""The grouped (mixture-of-experts) kernel launches, once per case, on CPU tensors: static-report input.

Like bench/launches.py (same Case / flags / output; run it under the static analyzer, which
compiles each launch for sm_90 / sm_80 and runs nothing; tensors hold garbage):

    TRITON_INTERPRET= python <analyzer> bench/launches_moe.py --arch 90
    python bench/launches_moe.py --list

Layers (E experts, top-k routing, T tokens -> S = T·k routed rows, spread evenly over the experts):

    mixtral   Mixtral-8x7B-like:   H = 4096, I = 14336, E = 8,   top-2
    qwen3     Qwen3-30B-A3B-like:  H = 2048, I = 768,   E = 128, top-8

Projections: ``gate_up`` (K = H -> N = 2I) and ``down`` (K = I -> N = H); T ∈ {4096, 16}.

Cases:
    dense-grouped-fwd, dense-grouped-dgrad   bench/dense_grouped_matmul.py, bf16 (the baseline)
    grouped-fwd, grouped-dgrad               qlk.kernels.grouped_matmul per format
    grouped-qalora                           the fused QA-LoRA forward (folded biases, pooled P(X)), INT

Names: ``<op>/<fmt>/<layer>-<proj>/T<tokens>``, e.g. ``grouped-fwd/int4g32/mixtral-gate_up/T4096``.
"""
from __future__ import annotations

import functools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from launches import Case, _selected, parse_args, run_case  # noqa: E402

DTYPE = torch.bfloat16
#: name -> (hidden H, expert intermediate I, experts E, top-k)
LAYERS = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}
TOKENS = (4096, 16)
#: format label -> (fmt, bits, group_size)
FORMATS = {"int4g32": ("int", 4, 32), "int4g128": ("int", 4, 128), "int3g128": ("int", 3, 128),
           "int2g32": ("int", 2, 32), "nf4dq": ("nf4", 4, 64)}
QALORA_RANK = 16


def projections(layer):
    h, i, e, k = LAYERS[layer]
    return {"gate_up": (h, 2 * i), "down": (i, h)}


@functools.lru_cache(maxsize=None)
def stacked_weight(fmt_label: str, e: int, n: int, k: int):
    """An uninitialized stacked [E·N, K] QuantizedWeight of the format's shapes and dtypes (nothing runs)."""
    from qlk.nn.linear import empty_qweight

    fmt, bits, g = FORMATS[fmt_label]
    return empty_qweight(e * n, k, bits, g, fmt, True, DTYPE, DTYPE, False, "cpu")


def balanced_offsets(rows: int, e: int) -> torch.Tensor:
    counts = torch.full((e,), rows // e, dtype=torch.int64)
    counts[: rows % e] += 1
    off = torch.zeros(e + 1, dtype=torch.int64)
    off[1:] = counts.cumsum(0)
    return off


def case_name(op, fmt, layer, proj, tokens):
    return f"{op}/{fmt}/{layer}-{proj}/T{tokens}"


def all_cases(patterns=()):
    from dense_grouped_matmul import dense_grouped_matmul
    from qlk.autograd.experts import folded_weight_args
    from qlk.kernels.grouped_matmul import grouped_matmul_forward, grouped_matmul_grad_input

    out = []
    for layer, (h, i, e, topk) in LAYERS.items():
        for proj, (k, n) in projections(layer).items():
            for t in TOKENS:
                s = t * topk
                off = balanced_offsets(s, e)

                def dense(dgrad, s=s, e=e, n=n, k=k, off=off):
                    x = torch.empty(s, n if dgrad else k, dtype=DTYPE)
                    return dense_grouped_matmul(x, torch.empty(e, n, k, dtype=DTYPE), off, dgrad=dgrad)

                for dgrad in (False, True):
                    op = "dense-grouped-" + ("dgrad" if dgrad else "fwd")
                    out.append(Case(case_name(op, "bf16", layer, proj, t), "dense", op, "bf16", k, n, s,
                                    lambda d=dgrad, f=dense: f(d)))
                for fmt in FORMATS:
                    def fwd(fmt=fmt, s=s, e=e, n=n, k=k, off=off):
                        return grouped_matmul_forward(torch.empty(s, k, dtype=DTYPE), stacked_weight(fmt, e, n, k),
                                                      off, e)

                    def dgrad(fmt=fmt, s=s, e=e, n=n, k=k, off=off):
                        return grouped_matmul_grad_input(torch.empty(s, n, dtype=DTYPE),
                                                         stacked_weight(fmt, e, n, k), off, e)

                    def qalora(fmt=fmt, s=s, e=e, n=n, k=k, off=off):
                        qw = stacked_weight(fmt, e, n, k)
                        a = torch.zeros(e, QALORA_RANK, k // qw.group_size, dtype=DTYPE)
                        b = torch.zeros(e, n, QALORA_RANK, dtype=DTYPE)
                        wargs = folded_weight_args(qw, a, b, 2.0, e)
                        return grouped_matmul_forward(torch.empty(s, k, dtype=DTYPE), qw, off, e, wargs=wargs,
                                                      pool=True)

                    out.append(Case(case_name("grouped-fwd", fmt, layer, proj, t), "qlk", "fwd", fmt, k, n, s, fwd))
                    out.append(Case(case_name("grouped-dgrad", fmt, layer, proj, t), "qlk", "dgrad", fmt, k, n, s,
                                    dgrad))
                    if FORMATS[fmt][0] == "int":
                        out.append(Case(case_name("grouped-qalora", fmt, layer, proj, t), "qlk", "qalora", fmt, k, n,
                                        s, qalora))
    return [c for c in out if _selected(c.name, patterns)]


def main(argv=None) -> int:
    args = parse_args(argv)
    patterns = [p for p in args.cases.split(",") if p]
    cases = all_cases(patterns)
    if not cases:
        print(f"no case matches --cases {args.cases!r}", file=sys.stderr)
        return 2
    for case in cases:
        if args.list:
            print(f"{case.name:48} {case.unavailable or 'available'}")
            continue
        print(f"{case.name:48} {run_case(case) or 'launched'}", flush=True)
    return 0


if __name__ == "__main__":
    rc = main()  # no sys.exit on success (see bench/launches.py)
    if rc:
        sys.exit(rc)

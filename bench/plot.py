"""Charts and the summary table from the benchmarks' CSVs (matplotlib, Agg: no display needed).

    python bench/plot.py RESULTS/kernels.csv RESULTS/layer.csv RESULTS/e2e.csv --outdir RESULTS --summary RESULTS/summary.md

For each kernel op it writes ``speedup_<op>.png``: one panel per shape, speedup over cuBLAS bf16
(t_cublas / t, median, with the p20..p80 band) against M on a log axis, one line per
(provider, format). The summary is the Markdown of :func:`common.summary_markdown`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def speedup_charts(rows: list[dict], outdir: str) -> list[str]:
    """One PNG per op of the kernel benchmark; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = [r for r in rows if r["bench"] == "kernels" and r["metric"] == "speedup_vs_cublas" and r["status"] == "ok"]
    written = []
    for op in sorted({r["op"] for r in sp}):
        sub = [r for r in sp if r["op"] == op]
        shapes = sorted({r["shape"] for r in sub}, key=lambda s: [int(v) for v in s.split("->")] if "->" in s else [0])
        cols = min(3, len(shapes))
        nrows = math.ceil(len(shapes) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
        for ax, shape in zip(axes.flat, shapes, strict=False):
            lines = sorted({(r["provider"], r["fmt"]) for r in sub if r["shape"] == shape})
            for prov, fmt in lines:
                pts = sorted((int(r["M"]), float(r["p50"]), _f(r["p20"]), _f(r["p80"])) for r in sub
                             if r["shape"] == shape and r["provider"] == prov and r["fmt"] == fmt)  # fmt: skip
                ms = [p[0] for p in pts]
                (ln,) = ax.plot(ms, [p[1] for p in pts], marker="o", ms=3, label=f"{prov} {fmt}")
                if all(p[2] is not None and p[3] is not None for p in pts):
                    ax.fill_between(ms, [p[2] for p in pts], [p[3] for p in pts], color=ln.get_color(), alpha=0.15)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op}  K->N = {shape}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speedup vs cuBLAS bf16")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(shapes):]:
            ax.axis("off")
        gpu = sub[0]["gpu"] if sub else ""
        fig.suptitle(f"qlk kernels vs cuBLAS bf16 — {gpu} — {sub[0]['timestamp'] if sub else ''}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(outdir, f"speedup_{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+", help="CSV files written by the bench_*.py scripts")
    ap.add_argument("--outdir", default=None, help="where the PNGs go (default: the first CSV's folder)")
    ap.add_argument("--summary", default=None, help="write the Markdown summary here too")
    ap.add_argument("--no-charts", action="store_true")
    a = ap.parse_args(argv)
    rows = common.read_csv(*a.csv)
    if not rows:
        print(f"plot.py: no rows in {a.csv}", file=sys.stderr)
        return 1
    outdir = a.outdir or os.path.dirname(os.path.abspath(a.csv[0]))
    os.makedirs(outdir, exist_ok=True)
    if not a.no_charts:
        for p in speedup_charts(rows, outdir):
            print(f"plot.py: wrote {p}")
    md = common.summary_markdown(rows)
    if a.summary:
        with open(a.summary, "w") as fh:
            fh.write(md)
        print(f"plot.py: wrote {a.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

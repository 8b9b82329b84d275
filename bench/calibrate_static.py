"""Measured over estimated: join a GPU calibration CSV (bench/gpu_calibrate.py) with a static report
of the same cases (bench/static_report.py, the same case names and config labels) and print, per
launch, the measured time next to the analyzer's optimistic..pessimistic time, then per kernel the
spread of measured / pessimistic, and per case the measured "x dense" (best fused tile over the best
dense Triton config) next to the estimated one. No GPU, no compile::

    python bench/calibrate_static.py calibrate.csv /tmp/cal/static-sm90.csv [--dram-tbps 4.8]

Estimated time of a static row, as the report's (``static_report._time``) but at each end of the
range: MACs of the padded tiles over (fraction x tensor rate) for M >= 256 (training shapes), useful
bytes over (fraction x DRAM bandwidth) below, plus a split launch's workspace passes. The analyzer's
GPU is an H100 SXM (3.35 TB/s); ``--dram-tbps`` sets the DRAM bandwidth of the GPU that was measured
(H200: 4.8) for the DRAM-bound rows. A ratio measured / pessimistic over 1 means the launch ran
slower than even the analyzer's no-overlap end: the model misses something there.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def read_gpu_csv(path: str) -> list:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("K", "N", "M", "arch", "split"):
                r[k] = int(r[k]) if r.get(k) not in (None, "") else None
            for k in ("time_us", "p20_us", "p80_us"):
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            rows.append(r)
    return rows


def tile_of(config: str) -> str:
    """'256x128x64 w8 s3 GROUP_M=8' -> '256x128x64 w8 s3' (what gpu_calibrate labels a launch)."""
    return " ".join(config.split()[:3])


def estimate_us(r, g, end: str):
    """Estimated µs of static row ``r`` at ``end`` ('opt' or 'pess') of its range."""
    import static_report as sr

    tensor = r.get("tensor_peak_opt") is not None and (r["M"] or 0) >= 256 and r["kernel"] != "_dequantize_kernel"
    frac = r.get(f"tensor_peak_{end}" if tensor else f"dram_peak_{end}")
    if not frac:
        return None
    if tensor:
        t = sr._work(r) / (frac * g.tensor_macs_per_clk * g.sms * g.ghz * 1e9)
    elif r.get("useful_bytes"):
        t = r["useful_bytes"] / (frac * g.dram_bytes_per_s)
    else:
        return None
    return (t + sr.split_passes_time(r, g)) * 1e6


def join(gpu_rows, static_rows, g) -> list:
    """One dict per measured launch that the static report has (case, tile): measured and estimated µs."""
    import static_report as sr

    # the main kernel of a case: helper launches (NF4's absmax de-nesting, the dequantize kernel) are
    # in the measured op's time, not rows of their own
    main_kernels = set(sr._CHOICE_KERNEL.values()) | {"_dense_matmul_kernel"}
    index = {}
    for r in static_rows:
        if r.get("status") == "ok" and r.get("config") and r["kernel"] in main_kernels:
            index.setdefault((r["case"], tile_of(r["config"])), r)
    out = []
    for m in gpu_rows:
        if m["group"] == "cublas" or m.get("time_us") is None:
            continue
        s = index.get((m["case"], m["config"]))
        if s is None:
            continue
        opt, pess = estimate_us(s, g, "opt"), estimate_us(s, g, "pess")
        out.append(dict(case=m["case"], group=m["group"], kernel=s["kernel"], config=m["config"], M=m["M"],
                        chosen=m.get("chosen") == "True", status=m["status"], measured=m["time_us"], opt=opt,
                        pess=pess, ratio=m["time_us"] / pess if pess else None))
    return out


def x_dense(joined, gpu_rows) -> list:
    """Per case: best measured fused tile over best measured dense config, and the same from the estimates."""
    by_case = {}
    for j in joined:
        by_case.setdefault(j["case"], []).append(j)
    out = []
    for case, js in sorted(by_case.items()):
        if js[0]["group"] != "qlk":
            continue
        op, _fmt, rest = case.split("/", 2)
        dense = [j for j in joined if j["group"] == "dense" and j["case"] == f"dense-{op}/bf16/{rest}"]
        cublas = [m for m in gpu_rows if m["group"] == "cublas" and m["case"] == f"dense-{op}/bf16/{rest}"]
        ok = [j for j in js if j["status"] == "ok"]
        if not ok or not dense:
            continue
        mid = lambda j: (j["opt"] + j["pess"]) / 2  # noqa: E731
        chosen = [j for j in js if j["chosen"]]
        out.append(dict(case=case,
                        measured=min(d["measured"] for d in dense) / min(j["measured"] for j in ok),
                        estimated=min(mid(d) for d in dense) / min(mid(j) for j in ok),
                        chosen_vs_best=(min(j["measured"] for j in ok) / chosen[0]["measured"]) if chosen else None,
                        cublas=(cublas[0]["time_us"] / min(j["measured"] for j in ok)) if cublas else None))
    return out


#: gpu_calibrate's variant suffixes -> (the default's name, the variant's name) in :func:`variant_pairs`
VARIANTS = {" W_AS_A": ("B", "W_AS_A"), " FINISH": ("3 launches", "FINISH")}


def variant_pairs(gpu_rows) -> dict:
    """(case, tile) -> {default: µs, variant: µs} for the tiles gpu_calibrate timed both ways: the
    input gradient with Ŵ as the MMA's B operand ("B") and as the transposed product ("W_AS_A",
    config ending in " W_AS_A"); the split-K decode in three launches and finished in the kernel
    ("FINISH", config ending in " FINISH")."""
    variants = {}
    for m in gpu_rows:
        if m["group"] == "qlk" and m.get("time_us") is not None and m["status"] == "ok":
            suffix = next((s for s in VARIANTS if m["config"].endswith(s)), None)
            tile = m["config"][:-len(suffix)] if suffix else m["config"]
            variants.setdefault((m["case"], tile), {})[VARIANTS[suffix][1] if suffix else "default"] = m["time_us"]
    out = {}
    for key, v in variants.items():
        for default, name in VARIANTS.values():
            if name in v and "default" in v:
                out[key] = {default: v["default"], name: v[name]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gpu_csv")
    ap.add_argument("static_csv", nargs="+")
    ap.add_argument("--dram-tbps", type=float, default=None, help="the measured GPU's DRAM bandwidth, TB/s")
    ap.add_argument("--launches", action="store_true", help="also print every joined launch")
    ap.add_argument("--arch", type=int, default=None, help="the analyzer's GPU (default: the CSV's, else 90)")
    a = ap.parse_args(argv)

    import static_report as sr
    from bench.sass import gpu

    gpu_rows = read_gpu_csv(a.gpu_csv)
    static_rows = [r for p in a.static_csv for r in sr.read_csv(p)]
    arch = a.arch or next((r["arch"] for r in gpu_rows if r["arch"] in (80, 90)), 90)
    g = gpu(arch)
    if a.dram_tbps:
        g = dataclasses.replace(g, dram_bytes_per_s=0.9 * a.dram_tbps * 1e12)
    joined = join(gpu_rows, static_rows, g)
    print(f"{len(joined)} of {len(gpu_rows)} measured launches found in the static report(s)\n")
    if a.launches:
        print("| case | config | chosen | measured µs | estimated µs (opt..pess) | measured / pess |")
        print("|---|---|---|---|---|---|")
        for j in joined:
            print(f"| {j['case']} | {j['config']} | {'yes' if j['chosen'] else ''} | {j['measured']:.1f} | "
                  f"{j['opt']:.1f}..{j['pess']:.1f} | {j['ratio']:.2f} |")
        print()
    print("| kernel | M | launches | measured / pessimistic: median (min..max) |")
    print("|---|---|---|---|")
    groups = {}
    for j in joined:
        if j["ratio"] is not None and j["status"] == "ok":
            groups.setdefault((j["kernel"], "M >= 256" if j["M"] >= 256 else "M < 256"), []).append(j["ratio"])
    for (kernel, mc), rs in sorted(groups.items()):
        print(f"| {kernel} | {mc} | {len(rs)} | {statistics.median(rs):.2f} ({min(rs):.2f}..{max(rs):.2f}) |")
    print("\n| case | x dense measured | x dense estimated | rules' pick / best tile (measured) | x cuBLAS measured |")
    print("|---|---|---|---|---|")
    for d in x_dense(joined, gpu_rows):
        f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {d['case']} | {f(d['measured'])} | {f(d['estimated'])} | {f(d['chosen_vs_best'])} | {f(d['cublas'])} |")
    pairs = variant_pairs(gpu_rows)
    if pairs:
        print("\n| case | config | default µs | variant µs | default / variant |")
        print("|---|---|---|---|---|")
        for (case, config), v in sorted(pairs.items()):
            (d_name, d_us), (v_name, v_us) = v.items()
            print(f"| {case} | {config} | {d_us:.1f} ({d_name}) | {v_us:.1f} ({v_name}) | {d_us / v_us:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

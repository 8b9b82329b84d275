"""Static report: every qlk kernel, the dense baseline and the Triton peers, compiled for sm_90 and
sm_80 and judged from their machine code by qlk's static analyzer (bench/sass). Nothing runs.

    make static-report                       # = python bench/static_report.py
    python bench/static_report.py --arch 90 --quick --cases 'dense-*' --out /tmp/r

Writes ``bench/results/static-sm<arch>.md`` and ``.csv``: one row per kernel × case (the markdown
shows the best config of a kernel with several candidates, the CSV every config), with resources,
occupancy, wave efficiency and the analyzer's tensor and DRAM fractions (optimistic..pessimistic,
times wave efficiency; the model is docs/static-analysis.md), and prints the summary table. For
qlk's matmul kernels also the config qlk's rules choose (``chosen``, ``chosen_config``, next to
``best_config``), and per fwd/dgrad case ``x_dense`` (the dense bf16 GEMM's estimated time at the
same shape over qlk's; fused kernel, dequantize + dense, and the path qlk's dispatcher picks).
``--family``: the Llama-family shapes 1B..70B at M in 1..8192 (opt-in, long); ``--ms`` other M values
(the rules' sweep, ``bench/results/static-family-sm*.md``: ``--family --ms 1,16,64,128,333,2048,8192
--cases 'fwd*,dgrad*' --stem static-family``, about 9 minutes on 2 cores with a warm Triton cache).
``--check-rules CSV`` re-runs qlk's rules on a report CSV (nothing compiles): chosen vs best,
dispatch vs the faster path, the cases under 0.9x dense; ``--fit-rules CSV...`` prints the rules'
calibration fitted to such CSVs (qlk.kernels.heuristics.CALIBRATION). Each arch is
analyzed in its own worker process (gemlite reads the GPU at import), the two in parallel;
Triton's on-disk cache makes a re-run much faster than the first.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CSV_FIELDS = [
    "arch", "group", "case", "op", "fmt", "K", "N", "M", "kernel", "config", "num_warps", "num_stages",
    "regs", "stack", "spill_ops", "smem_bytes", "ctas_per_sm", "limiter", "grid_ctas", "wave_eff",
    "tensor_peak_opt", "tensor_peak_pess", "dram_peak_opt", "dram_peak_pess", "bound", "best", "iterations",
    "useful_bytes", "mix", "notes",
    "status", "chosen", "chosen_config", "best_config", "fill", "x_dense_fused", "x_dense_dequant", "dispatch",
    "x_dense", "dispatch_agrees", "chosen_vs_best", "work",
]  # fmt: skip


# ---------------------------------------------------------------- rows
def _r(x):
    return None if x is None else round(float(x), 4)


def report_row(report, launch, case) -> dict:
    """One CSV/markdown row from a bench.sass Report of one launch of ``case`` (fractions already
    include wave efficiency)."""
    return {
        "arch": report.arch, "group": case.group, "case": case.name, "op": case.op, "fmt": case.fmt,
        "K": case.k, "N": case.n, "M": case.m, "kernel": report.kernel, "config": report.config,
        "num_warps": report.num_warps, "num_stages": report.num_stages, "regs": report.regs,
        "stack": report.stack, "spill_ops": report.spill_ops, "smem_bytes": report.smem,
        "ctas_per_sm": report.ctas_per_sm, "limiter": report.limiter, "grid_ctas": report.ctas,
        "wave_eff": _r(report.wave_eff),
        "tensor_peak_opt": _r(report.tensor_opt), "tensor_peak_pess": _r(report.tensor_pess),
        "dram_peak_opt": _r(report.dram_opt), "dram_peak_pess": _r(report.dram_pess),
        "bound": report.bound, "best": False, "iterations": report.iterations, "useful_bytes": report.useful_bytes,
        "mix": ";".join(f"{k}={v}" for k, v in sorted(report.mix.items(), key=lambda kv: -kv[1])),
        "notes": "; ".join(report.notes), "status": "ok", "chosen": None, "fill": _r(fill(report.config, case, report.kernel)),
        "work": report.macs_per_iter * (report.iterations or 1) * (report.ctas or 1) or (report.useful_bytes or 0),
    }  # fmt: skip


def _work(r) -> float:
    """A row's work as the live run counted it (``work``: the MACs its MMA instructions issue, the
    instruction's own padding included, e.g. 16 token rows in a 64-row wgmma; else its useful bytes).
    Rows of reports written before round 24 lack the column: their padded output tiles' MACs,
    M·N·K / fill, which misses the instruction's padding (a quarter of a family report's dense
    ratios came out up to 7 % off when a merge re-marked them) or useful bytes."""
    if r.get("work") is not None:
        return r["work"]
    if r.get("tensor_peak_opt") is not None and r.get("M"):
        return r["M"] * r["N"] * r["K"] / (r.get("fill") or 1.0)
    return r.get("useful_bytes") or 0


def status_row(arch: int, case, status: str) -> dict:
    row = {f: None for f in CSV_FIELDS}
    row.update(arch=arch, group=case.group, case=case.name, op=case.op, fmt=case.fmt, K=case.k, N=case.n, M=case.m,
               status=status, best=False)
    return row


_TILE = re.compile(r"(\d+)x(\d+)x(\d+)")


def fill(config: str, case, kernel: str) -> float:
    """Share of the computed output tiles that is output: M·W / (M_padded·W_padded), W the output
    width (N forward, K input gradient). The analyzer counts padded MMA work as work; the rules
    (qlk.kernels.heuristics) and the ranking of configs do not. 1 for split kernels and peers."""
    t = _TILE.match(config or "")
    if t is None or case.m is None or kernel not in _OUTPUT:
        return 1.0
    bm, bn, bk = (int(x) for x in t.groups())
    width, block = _OUTPUT[kernel](case, bn, bk)
    return case.m * width / (math.ceil(case.m / bm) * bm * math.ceil(width / block) * block)


#: kernel -> (case, BLOCK_N, BLOCK_K) -> (output width, its block)
_OUTPUT = {
    "_quant_matmul_fwd_kernel": lambda c, bn, bk: (c.n, bn),
    "_quant_matmul_grad_input_kernel": lambda c, bn, bk: (c.k, bk),
    "_dense_matmul_kernel": lambda c, bn, bk: (c.k if c.op == "dgrad" else c.n, bn),  # dY·W: the launch's N is K
}


def metric(row):
    """What a row is judged by: tensor-peak for training shapes (M ≥ 256) of MMA kernels, else dram-peak."""
    m = row.get("M")
    if row.get("tensor_peak_opt") is not None and (m is None or m >= 256):
        return (row["tensor_peak_opt"], row["tensor_peak_pess"])
    if row.get("dram_peak_opt") is not None:
        return (row["dram_peak_opt"], row["dram_peak_pess"])
    return (-1.0, -1.0)


def mark_best(rows) -> None:
    """Per (case, kernel): flag the config whose range has the highest midpoint (times its fill:
    padded rows are not work), then the highest optimistic end (the optimistic end alone favours
    configs that lean on perfect overlap). Where qlk's rules chose a config (``chosen``), each
    row of the group also gets ``chosen_config`` and ``best_config``."""
    groups = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["case"], r["kernel"]), []).append(r)
    for rs in groups.values():
        best = max(rs, key=lambda r: (rank(r), metric(r)[0]))
        best["best"] = True
        chosen = [r for r in rs if r.get("chosen")]
        for r in rs:
            r["best_config"] = best["config"]
            if chosen:
                r["chosen_config"] = chosen[0]["config"]
                # the chosen config's ranking value as a share of the best's (1: the same config)
                r["chosen_vs_best"] = _r(rank(chosen[0]) / rank(best)) if rank(best) > 0 else None


def rank(r) -> float:
    """What configs are ranked by: the midpoint of :func:`metric`, times the tile fill where that is
    the tensor fraction (which counts padded MMA work as work). The DRAM fraction (M < 256) is useful
    bytes over the run's cycles, which already hold the padded work: no second factor there."""
    hi, lo = metric(r)
    tensor = r.get("tensor_peak_opt") is not None and hi == r["tensor_peak_opt"]
    return round((hi + lo) / 2 * ((r.get("fill") or 1.0) if tensor else 1.0), 4)


#: the rules' op name -> the kernel it launches
_CHOICE_KERNEL = {"fwd": "_quant_matmul_fwd_kernel", "grad": "_quant_matmul_grad_input_kernel",
                  "splitk": "_quant_matmul_splitk_kernel", "splitn": "_quant_matmul_grad_input_splitn_kernel"}


def mark_chosen(rows, choices) -> None:
    """Flag the rows of the configs qlk's rules chose (``choices``: fused_matmul.CHOICE_LOG of
    the case, (op, KernelChoice)); rows of kernels without rules get None."""
    for r in rows:
        if r["kernel"] in _CHOICE_KERNEL.values():
            r["chosen"] = any(_CHOICE_KERNEL[op] == r["kernel"] and (r["config"] + " ").startswith(c.label + " ")
                              for op, c in choices)


def _time(r, arch: int):
    """Estimated run time (s) of a row: work over the midpoint of the fraction the row is judged by
    (:func:`metric`): padded MACs over the tensor rate for training shapes (the fraction is of the
    MMA work the tiles do, padding included: the time is the same), useful bytes over the DRAM
    bandwidth otherwise (and for kernels without MMA, e.g. the dequantize kernel); plus the
    launch's workspace passes outside the kernel (:func:`split_passes_time`, round 15)."""
    from bench.sass import gpu

    if not r:
        return None
    g = gpu(arch)
    hi, lo = metric(r)
    mid = (hi + lo) / 2
    if mid <= 0:
        return None
    if r.get("tensor_peak_opt") is not None and hi == r["tensor_peak_opt"] and _work(r):
        return _work(r) / (mid * g.tensor_macs_per_clk * g.sms * g.ghz * 1e9) + split_passes_time(r, g)
    if r.get("useful_bytes"):
        return r["useful_bytes"] / (mid * g.dram_bytes_per_s) + split_passes_time(r, g)
    return None


def mark_dense_ratio(rows, arch: int) -> None:
    """On each qlk fwd/dgrad case's main row (the best config of its largest kernel): estimated
    time of the dense bf16 GEMM at the same shape (same run) over that of the fused kernel
    (``x_dense_fused``) and of dequantize + the dense GEMM (``x_dense_dequant``; :func:`_time`), the path qlk's
    dispatcher picks (``dispatch``, qlk.kernels.heuristics.choose_path) and its ratio (``x_dense``)."""
    try:
        from qlk.kernels import heuristics
    except Exception:  # noqa: BLE001 - no qlk: no ratios
        return
    import launches

    main = {}
    for r in rows:
        if r["status"] == "ok" and r["best"]:
            cur = main.get(r["case"])
            if cur is None or _work(r) > _work(cur):
                main[r["case"]] = r
    for name, r in main.items():
        if r["group"] != "qlk" or r["op"] not in ("fwd", "dgrad"):
            continue
        dense = main.get(launches.case_name(f"dense-{r['op']}", "bf16", r["K"], r["N"], r["M"]))
        deq = main.get(launches.case_name("dequant", r["fmt"], r["K"], r["N"], None))
        t_fused, t_dense, t_deq = _time(r, arch), _time(dense, arch), _time(deq, arch)
        if t_fused is None or t_dense is None:
            continue
        r["x_dense_fused"] = _r(t_dense / t_fused)
        if t_deq is not None:
            r["x_dense_dequant"] = _r(t_dense / (t_dense + t_deq))
        spec = launches.FORMATS[r["fmt"]]
        nf4 = spec.get("fmt") == "nf4"
        pick = heuristics.choose_path("fwd" if r["op"] == "fwd" else "grad", r["M"], r["N"], r["K"],
                                      bits=spec.get("bits", 4), group_size=spec.get("group_size", 64),
                                      is_nf4=nf4, arch=arch)
        r["dispatch"] = pick.path
        r["x_dense"] = r["x_dense_fused"] if pick.path == "fused" else r.get("x_dense_dequant")
        if r.get("x_dense_dequant") is not None:  # did the dispatcher pick the path the analyzer estimates faster?
            r["dispatch_agrees"] = (r["x_dense_fused"] >= r["x_dense_dequant"]) == (pick.path == "fused")


def analyze_case(launches, case) -> list:
    from bench import sass

    return [report_row(rep, L, case) for rep, L in sass.analyze_all(launches)]


# ---------------------------------------------------------------- the rules against a committed CSV
#: the analyzer's resolution when comparing configs: two ranking values within 1 % of each other
#: are a tie (the estimates are printed to two decimals; near 1.0 that is 1 %, and the model's
#: own error is larger: docs/static-analysis.md)
RULES_TOLERANCE = 0.99

#: the 2-D kernels of the rules (op -> kernel) and which of them a report case runs, by M
_RULE_OPS = {"_quant_matmul_fwd_kernel": "fwd", "_quant_matmul_grad_input_kernel": "grad",
             "_quant_matmul_splitk_kernel": "splitk", "_quant_matmul_grad_input_splitn_kernel": "splitn"}


def read_csv(path: str) -> list:
    """Rows of a static report CSV with numbers as numbers ("" -> None)."""
    ints = {"arch", "K", "N", "M", "num_warps", "num_stages", "regs", "stack", "spill_ops", "smem_bytes",
            "ctas_per_sm", "grid_ctas", "iterations", "useful_bytes"}
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                elif k in ints:
                    row[k] = int(v)
                elif v in ("True", "False"):
                    row[k] = v == "True"
                else:
                    try:
                        row[k] = float(v) if k not in ("case", "kernel", "config", "fmt", "op", "group") else v
                    except ValueError:
                        row[k] = v
            out.append(row)
    return out


def rules_check(rows, arch: int, sms=None) -> list:
    """Per qlk fwd/dgrad case of a report's rows (every candidate compiled): the config qlk's rules
    pick *now* (qlk.kernels.heuristics.choose_config on the device candidate lists) against the
    analyzer's best, and the dispatcher's path against the faster one. One dict per case:
    case, op (rules' op), chosen, best, ratio (chosen's ranking value / best's, :func:`rank`),
    x_fused (dense time / fused time with the chosen config), x_dequant, path, x_dense (of the
    path picked), x_best_path (of the faster path)."""
    from bench.sass import gpu
    from qlk.kernels import config, heuristics

    import launches

    g = gpu(arch)
    sms = sms or g.sms
    def clear():  # the rules cache their picks, made with whichever candidate lists were active
        for fn in (heuristics._choose_default, heuristics.choose_path, heuristics.choose_fused):
            fn.cache_clear()

    was = config.INTERPRETED
    config.INTERPRETED = False  # the GPU candidate lists, also when the tests run under the interpreter
    clear()
    try:
        return _rules_check(rows, arch, sms, g, heuristics, launches)
    finally:
        config.INTERPRETED = was
        clear()


def _est_time(r, g):
    """Seconds of one row: useful MACs / (rank × tensor rate) at M ≥ 256 (rank holds the fill),
    useful bytes / (midpoint of the DRAM fraction × bandwidth) otherwise; a split GEMM input
    gradient plus its workspace's passes (:func:`split_passes_time`)."""
    if r is None:
        return None
    hi, lo = metric(r)
    if (hi + lo) <= 0:
        return None
    if r.get("tensor_peak_opt") is not None and (r["M"] or 0) >= 256 and r["kernel"] != "_dequantize_kernel":
        t = r["M"] * r["N"] * r["K"] / (rank(r) * g.tensor_macs_per_clk * g.sms * g.ghz * 1e9)
    else:
        t = r["useful_bytes"] / ((hi + lo) / 2 * g.dram_bytes_per_s)
    return t + split_passes_time(r, g)


def split_of(r, kernel: str) -> int:
    """Slices of a split GEMM row (grid axis 1: grid CTAs over its output tiles): the input
    gradient's N reduction (``_quant_matmul_grad_input_kernel``, dX tiles BLOCK_M x BLOCK_K of
    [M, K]) or the forward's K loop (``_quant_matmul_fwd_kernel``, Y tiles BLOCK_M x BLOCK_N of
    [M, N]); 1 for any other kernel."""
    tile = _TILE.match(r.get("config") or "")
    if r.get("kernel") != kernel or not r.get("grid_ctas") or not tile:
        return 1
    block_m, block_n, block_k = (int(x) for x in tile.groups())
    cols, block = (r["K"], block_k) if kernel == "_quant_matmul_grad_input_kernel" else (r["N"], block_n)
    return max(1, r["grid_ctas"] // (math.ceil(cols / block) * math.ceil(r["M"] / block_m)))


#: the split kernels (every launch accumulates into an fp32 workspace) -> the rules' op
_SPLIT_KERNEL_OPS = {"_quant_matmul_splitk_kernel": "splitk", "_quant_matmul_grad_input_splitn_kernel": "splitn",
                     "_quant_matmul_grad_input_gemv_kernel": "splitn"}


def dense_split(r) -> int:
    """K slices of a dense baseline row (its small-M launch's SPLIT_K; 1 for the large-M tiles)."""
    split = re.search(r"SPLIT_K=(\d+)", r.get("config") or "")
    return int(split.group(1)) if split else 1


def split_direct(r) -> bool:
    """Whether a split kernel's row is a one-slice launch, which stores its output directly (DIRECT:
    no workspace, no passes), from its grid: split-N (round 32) ⌈K/BLOCK_K⌉ (+ 1 with QA-LoRA's V)
    × 1 × ⌈M/BLOCK_M⌉, split-K (round 33) ⌈N/BLOCK_N⌉ × 1 × ⌈M/BLOCK_M⌉."""
    tile = _TILE.match(r.get("config") or "")
    kernel = r.get("kernel")
    if kernel not in ("_quant_matmul_grad_input_splitn_kernel", "_quant_matmul_splitk_kernel") \
            or not r.get("grid_ctas") or not tile:
        return False
    block_m, block_n, block_k = (int(x) for x in tile.groups())
    outer = math.ceil(r["K"] / block_k) if kernel == "_quant_matmul_grad_input_splitn_kernel" else \
        math.ceil(r["N"] / block_n)
    return r["grid_ctas"] // (outer * math.ceil(r["M"] / block_m)) == 1


def split_passes_time(r, g) -> float:
    """Round 6: seconds of a split launch's work outside its kernel, which the analyzer does not
    compile, at the DRAM bandwidth (0 unsplit), the same count the rules charge: the input
    gradient's fp32 [M, K] workspace zeroed and read back by the cast into dX
    (qlk.kernels.heuristics.GRAD_WORKSPACE_PASS_BYTES per dX element); the forward's
    (qlk.kernels.heuristics.fwd_split_bytes: atomics on sm_90, a fixed-order sum on sm_80).
    Round 15: the split-K / split-N / FMA kernels' workspace at every launch
    (qlk.kernels.heuristics.split_kernel_passes_bytes), and the dense baseline's split at small M
    charged the same per output element."""
    from qlk.kernels import heuristics

    kernel = r.get("kernel")
    if kernel in _SPLIT_KERNEL_OPS:  # a launch with a workspace runs its passes (round 15; rounds 32-33: not DIRECT)
        return heuristics.split_kernel_passes_bytes(_SPLIT_KERNEL_OPS[kernel], r["M"], r["N"], r["K"],
                                                    split_direct(r)) / g.dram_bytes_per_s
    if kernel == "_dense_matmul_kernel" and dense_split(r) > 1:
        # the baseline sums its [SPLIT, M, N] partials on the host ((4·SPLIT + 10) B per output
        # element); it is charged only what qlk's atomics cost, in its favour
        out_cols = r["K"] if r.get("op") == "dgrad" else r["N"]
        return heuristics.GRAD_WORKSPACE_PASS_BYTES * r["M"] * out_cols / g.dram_bytes_per_s
    grad, fwd = split_of(r, "_quant_matmul_grad_input_kernel"), split_of(r, "_quant_matmul_fwd_kernel")
    if grad > 1:
        return heuristics.GRAD_WORKSPACE_PASS_BYTES * r["M"] * r["K"] / g.dram_bytes_per_s
    if fwd > 1:
        return heuristics.fwd_split_bytes(r["M"], r["N"], fwd, r["arch"]) / g.dram_bytes_per_s
    return 0.0


def _rules_check(rows, arch, sms, g, heuristics, launches):
    by_case = {}
    for r in rows:
        if r.get("status") == "ok":
            by_case.setdefault(r["case"], []).append(r)
    kernel_op = {**_RULE_OPS, "_quant_matmul_grad_input_gemv_kernel": "gemv"}
    out = []
    for name, rs in by_case.items():
        r0 = rs[0]
        if r0["group"] != "qlk" or r0["op"] not in ("fwd", "dgrad"):
            continue
        m, n, k = r0["M"], r0["N"], r0["K"]
        spec = launches.FORMATS[r0["fmt"]]
        nf4 = spec.get("fmt") == "nf4"
        bits, gsize = spec.get("bits", 4), spec.get("group_size", 64)
        fmt = heuristics.format_class(bits, nf4, gsize)
        rule_op = "fwd" if r0["op"] == "fwd" else "grad"
        # every kernel the rules choose between at this shape: the case's own, the split kernels'
        # cases at 16 < M <= 128, the FMA kernel's at M = 1
        alts = [f"{r0['op']}-splitk" if r0["op"] == "fwd" else "dgrad-splitn", "dgrad-gemv"]
        pool = [r for r in rs if r["kernel"] in kernel_op]
        for alt in alts:
            pool += [r for r in by_case.get(launches.case_name(alt, r0["fmt"], k, n, m), ())
                     if r["kernel"] in kernel_op]
        if not pool:
            continue
        timed = [(r, _est_time(r, g)) for r in pool]
        timed = [(r, t) for r, t in timed if t]
        best, t_best = min(timed, key=lambda rt: rt[1])
        pick = heuristics.choose_fused(rule_op, m, n, k, bits=bits, group_size=gsize, is_nf4=nf4, arch=arch,
                                       sms=sms) if m > heuristics.SPLIT_ALWAYS_M else None
        if pick is None:
            split_op = "splitk" if rule_op == "fwd" else "splitn"
            pick = heuristics.choose_config(split_op, m, n, k, fmt, arch, sms)
            if split_op == "splitn" and m == 1 and heuristics.choose_m1_grad(n, k, fmt, arch, sms) == "gemv":
                pick = "gemv"
        if pick == "gemv":  # its own autotuner picks the config: the faster of its two
            mine = [(r, t) for r, t in timed if kernel_op[r["kernel"]] == "gemv"]
            chosen = min(mine, key=lambda rt: rt[1]) if mine else (None, None)
            label = "gemv"
        else:
            chosen = next(((r, t) for r, t in timed if kernel_op[r["kernel"]] == pick.op
                           and (r["config"] + " ").startswith(pick.label + " ")), (None, None))
            label = f"{pick.op} {pick.label}"
        c_row, t_chosen = chosen
        # a launch whose grid the rules changed since the sweep compiled it: the GEMM input gradient
        # split over N (round 5), the forward over K and the split kernels' occupancy-aware count
        # (round 6), either way (a split the rules no longer make too)
        stale = (pick != "gemv" and c_row is not None and c_row.get("grid_ctas") not in (None, "", pick.ctas))
        dense = by_case.get(launches.case_name(f"dense-{r0['op']}", "bf16", k, n, m))
        dense = max(dense, key=rank) if dense else None
        deq = by_case.get(launches.case_name("dequant", r0["fmt"], k, n, None))
        deq = max((r for r in deq if r["kernel"] == "_dequantize_kernel"), key=rank) if deq else None
        t_dense, t_deq = _est_time(dense, g), _est_time(deq, g)
        small = m <= heuristics.SPLIT_ALWAYS_M
        path = "fused" if small else heuristics.choose_path(rule_op, m, n, k, bits=bits, group_size=gsize,
                                                             is_nf4=nf4, arch=arch, sms=sms).path
        x_fused = t_dense / t_chosen if t_dense and t_chosen else None
        x_deq = t_dense / (t_dense + t_deq) if t_dense and t_deq and not small else None
        x_dense = x_fused if path == "fused" else x_deq
        out.append(dict(case=name, op=r0["op"], rule_op=rule_op, fmt=r0["fmt"], K=k, N=n, M=m,
                        kernel=c_row["kernel"] if c_row else None, chosen=label if c_row is None else
                        f"{kernel_op[c_row['kernel']]} {c_row['config']}",
                        best=f"{kernel_op[best['kernel']]} {best['config']}",
                        ratio=t_best / t_chosen if t_chosen else None, stale=stale,
                        estimate=metric(c_row) if c_row else None,
                        x_fused=x_fused, x_dequant=x_deq, path=path, x_dense=x_dense,
                        x_best_path=max(x for x in (x_fused, x_deq) if x is not None) if x_fused else None))
    return out


def fit_gemm_mid_tile(rows) -> dict:
    """Round 29: each input-gradient GEMM tile's factor at 16 < M ≤ 128
    (qlk.kernels.heuristics.GEMM_MID_TILE) from a report's rows with every candidate compiled: per
    arch family and candidate label, the median over its rows of the analyzer's time over the
    rules' with the format's GEMM_MID_M and no tile factor. Rows whose grid is not the rules' are
    left out."""
    import statistics

    from bench.sass import gpu

    from qlk.kernels import config, heuristics

    import launches

    was, table = config.INTERPRETED, heuristics.GEMM_MID_TILE
    config.INTERPRETED, heuristics.GEMM_MID_TILE = False, {}
    try:
        acc = {}
        for r, fam, op, fmt, c, packed, t in _mid_m_rule_rows(rows, ("grad",), gpu, heuristics, launches):
            ratio = t / heuristics.fused_time(c, r["M"], r["N"], r["K"], packed, fam, fmt)
            acc.setdefault((fam, op), {}).setdefault(c.label, []).append(ratio)
    finally:
        config.INTERPRETED, heuristics.GEMM_MID_TILE = was, table
        _clear_rule_caches(heuristics)
    return {key: {label: round(statistics.median(v), 3) for label, v in sorted(labels.items())}
            for key, labels in sorted(acc.items())}


def fit_rules(rows) -> dict:
    """The rules' calibration (qlk.kernels.heuristics.CALIBRATION) from a report's rows with every
    candidate compiled: per (arch, op, format class) and candidate label, the analyzer's estimate
    midpoint over the SM balance (the part of it that does not depend on the grid), the median over
    the cases. GEMMs (fwd, grad): the tensor fraction of unsplit launches the analyzer does not find
    DRAM-bound (their DRAM roofline is the rules' cap, per shape) only (the split over N or
    K is a launch parameter the rules weigh by its SM balance, busy share and workspace passes); split kernels (splitk, splitn) and the M = 1
    FMA input gradient (gemv): the DRAM fraction at M <= 16, also over the share of their grid that
    holds reduction steps (uneven slices leave CTAs idle)."""
    import statistics

    from bench.sass import gpu

    from qlk.kernels import heuristics

    import launches

    acc = {}
    ops = {**_RULE_OPS, "_quant_matmul_grad_input_gemv_kernel": "gemv"}
    for r in rows:
        if r.get("status") != "ok" or r.get("group") != "qlk" or r.get("kernel") not in ops:
            continue
        op = ops[r["kernel"]]
        if op in ("splitk", "splitn") and r["M"] != 16 or op == "gemv" and r["M"] != 1:
            continue  # the split kernels as one 16-row tile (the same work at M = 1), the FMA kernel at M = 1
        g = gpu(r["arch"])
        spec = launches.FORMATS[r["fmt"]]
        fmt = heuristics.format_class(spec.get("bits", 4), spec.get("fmt") == "nf4", spec.get("group_size"))
        bal = heuristics.sm_balance(r["grid_ctas"], g.sms)
        if op in ("fwd", "grad"):
            if r["tensor_peak_opt"] is None:
                continue
            # split launches (grad round 5, fwd round 6) carry their workspace traffic and idle slices,
            # which the rules charge on top of the tile's efficiency: fit the tile unsplit (round 17:
            # the forward too; its split rows held the 64-row tile's median at 0.64 against 0.73 unsplit)
            block_m, block_n, block_k = (int(x) for x in _TILE.match(r["config"]).groups())
            if op == "grad" and r["grid_ctas"] > math.ceil(r["K"] / block_k) * math.ceil(r["M"] / block_m):
                continue
            if op == "fwd" and r["grid_ctas"] > math.ceil(r["N"] / block_n) * math.ceil(r["M"] / block_m):
                continue
            # round 20: a DRAM-bound launch measures the roofline (heuristics.fwd_dram_cap /
            # grad_dram_cap, which the rules apply per shape), not the tile: sm_90's 64-row forward
            # tiles at M = 64 held the INT4 64x128x128 median at 0.662 against 0.76 above
            if r["bound"] == "dram":
                continue
            label = " ".join(r["config"].split()[:3])
            eff = (r["tensor_peak_opt"] + r["tensor_peak_pess"]) / 2 / bal
        else:
            if op == "gemv":  # "-x<BLOCK_N>x<BLOCK_K> wW sS"; grid (K tiles, split over N)
                bn, bk = (int(x) for x in re.match(r"-x(\d+)x(\d+)", r["config"]).groups())
                label = f"{bn}x{bk} " + " ".join(r["config"].split()[1:3])
                length, block, base = r["N"], bn, math.ceil(r["K"] / bk)
            else:
                bm, bn, bk = (int(x) for x in _TILE.match(r["config"]).groups())
                label = " ".join(r["config"].split()[:3])
                if op == "splitk":
                    length, block, base = r["K"], bk, math.ceil(r["N"] / bn) * math.ceil(r["M"] / bm)
                else:
                    length, block, base = r["N"], bn, math.ceil(r["K"] / bk) * math.ceil(r["M"] / bm)
            split = max(r["grid_ctas"] // base, 1)
            eff = (r["dram_peak_opt"] + r["dram_peak_pess"]) / 2 / bal / heuristics.split_busy(length, block, split)
        for f in {fmt, heuristics.base_format(fmt)}:  # per group size, and pooled per bit width
            acc.setdefault((arch_family(r["arch"]), op, f), {}).setdefault(label, []).append(eff)
    out = {key: {lab: round(statistics.median(v), 3) for lab, v in sorted(per.items())}
           for key, per in sorted(acc.items())}
    # a bit width measured at one group size only: its per-width entry is that one, drop the copy
    for (fam, op, f) in list(out):
        same = [k for k in out if k[:2] == (fam, op) and k[2] != f and heuristics.base_format(k[2]) == f]
        if len(same) == 1 and out[same[0]] == out[(fam, op, f)]:
            del out[same[0]]
    return out


def _mid_m_rule_rows(rows, ops, g_of, heuristics, launches):
    """The rows of qlk kernels ``ops`` at 16 < M ≤ 128 whose grid is the one the rules launch now,
    with what the mid-M fits need: (row, arch family, rules' op, format class, candidate (the rules'
    KernelChoice), packed weight bytes, the analyzer's time). The caller sets the GPU candidate
    lists (``config.INTERPRETED = False``)."""
    for r in rows:
        op = _RULE_OPS.get(r.get("kernel"))
        if r.get("status") != "ok" or r.get("group") != "qlk" or op not in ops:
            continue
        m = r["M"]
        if not heuristics.SPLIT_ALWAYS_M < m <= heuristics.SPLIT_MAX_M:
            continue
        g = g_of(r["arch"])
        fam = arch_family(r["arch"])
        spec = launches.FORMATS[r["fmt"]]
        nf4 = spec.get("fmt") == "nf4"
        bits, gsize = spec.get("bits", 4), spec.get("group_size", 64)
        fmt = heuristics.format_class(bits, nf4, gsize)
        label = " ".join(r["config"].split()[:3])
        scored = [c for c in heuristics.score_all(op, m, r["N"], r["K"], fmt, fam, g.sms)
                  if c.label == label and c.ctas == r["grid_ctas"]]
        t = _est_time(r, g)
        if scored and t:
            yield r, fam, op, fmt, scored[0], heuristics.weight_bytes(r["N"], r["K"], bits, gsize, nf4), t


def _drop_group_size_copies(out: dict, heuristics) -> dict:
    """A bit width measured at one group size only: its per-width entry is that one; drop the copy."""
    base = heuristics.base_format
    for fmts in out.values():
        for f in [f for f in fmts if f.startswith("int") and "g" in f]:
            if sum(base(x) == base(f) and x != base(f) for x in fmts) == 1 and fmts[f] == fmts.get(base(f)):
                del fmts[f]
    return out


def _clear_rule_caches(heuristics) -> None:
    for fn in (heuristics._choose_default, heuristics.choose_path, heuristics.choose_fused):
        fn.cache_clear()


def fit_split_mid(rows) -> dict:
    """Round 8: the split kernels' time at 16 < M ≤ 128 (qlk.kernels.heuristics.SPLIT_MID_M) from a
    report's rows with every candidate compiled: per (arch family, op) and format class (per group
    size, and pooled per bit width) and candidate, for each count T of 16-row M tiles the sweep has
    (M = 64: 4, M = 128: 8) the median over the shapes of the analyzer's time (less the workspace's
    passes) over one tile's model time, split_tile_bytes of M / T rows / (DRAM · the rule's score
    of that candidate); then the line
    ``per_tile · T + shared`` through those medians (least squares): (per_tile, shared). Rows whose
    grid is not the one the rules launch now (a changed split count) are left out."""
    import statistics

    from bench.sass import gpu

    from qlk.kernels import config, heuristics

    import launches

    was = config.INTERPRETED
    config.INTERPRETED = False  # the GPU candidate lists
    try:
        acc = {}
        for r, fam, op, fmt, c, packed, t in _mid_m_rule_rows(rows, ("splitk", "splitn"), gpu, heuristics, launches):
            tiles = math.ceil(r["M"] / c.block_m)
            rows = heuristics.SPLIT_ROW_COST.get((fam, op), 1.0) * r["M"] / tiles
            model = tiles * heuristics.split_tile_bytes(op, r["N"], r["K"], packed, rows, split_direct(r)) / (
                heuristics.ARCH[fam].dram_bytes_per_s * c.score)
            t -= split_passes_time(r, gpu(r["arch"]))  # the kernel's own time: the line models the kernel
            for f in {fmt, heuristics.base_format(fmt)}:
                acc.setdefault((fam, op), {}).setdefault(f, {}).setdefault(c.label, {}).setdefault(tiles, []).append(
                    t / model)
    finally:
        config.INTERPRETED = was
        _clear_rule_caches(heuristics)
    out = {}
    for key, fmts in sorted(acc.items()):
        for f, labels in sorted(fmts.items()):
            for label, per in sorted(labels.items()):
                pts = [(t, statistics.median(v)) for t, v in sorted(per.items())]
                if len(pts) < 2:  # one tile count: no shared part to tell apart
                    out.setdefault(key, {}).setdefault(f, {})[label] = (round(pts[0][1], 3), 0.0)
                    continue
                # least squares of time / tile time = per_tile · tiles + shared over the tile counts
                xs, ys = [t for t, _ in pts], [t * v for t, v in pts]
                mx, my = statistics.fmean(xs), statistics.fmean(ys)
                per_tile = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                out.setdefault(key, {}).setdefault(f, {})[label] = (round(per_tile, 3), round(my - per_tile * mx, 3))
    return _drop_group_size_copies(out, heuristics)


def fit_split_row_cost(rows, costs=tuple(c / 100 for c in range(10, 102, 2))) -> dict:
    """Round 29: qlk.kernels.heuristics.SPLIT_ROW_COST from a report's rows with every candidate
    compiled: per arch family, the cost in ``costs`` of a row of the split-N input gradient whose
    model has the least error (:func:`split_row_cost_errors`)."""
    return {(fam, "splitn"): min(v)[1] for fam, v in split_row_cost_errors(rows, costs).items()}


def split_row_cost_errors(rows, costs) -> dict:
    """Per arch family, (rms log error, cost) for each cost in ``costs`` of a row of the split-N
    input gradient (qlk.kernels.heuristics.SPLIT_ROW_COST): the error of heuristics.fused_time, with
    :func:`fit_split_mid` refitted at that cost to its fixed point, against the analyzer's time over
    the rows at 16 < M ≤ 128."""
    import statistics

    from bench.sass import gpu

    from qlk.kernels import config, heuristics

    import launches

    saved = config.INTERPRETED, heuristics.SPLIT_ROW_COST, heuristics.SPLIT_MID_M
    errors = {}
    try:
        for cost in costs:
            heuristics.SPLIT_ROW_COST = {(fam, "splitn"): cost for fam in heuristics.DEFAULT_SMS}
            for _ in range(4):
                _clear_rule_caches(heuristics)
                fitted = fit_split_mid(rows)
                if fitted == heuristics.SPLIT_MID_M:
                    break
                heuristics.SPLIT_MID_M = fitted
            _clear_rule_caches(heuristics)
            config.INTERPRETED = False
            logs = {}
            for r, fam, op, fmt, c, packed, t in _mid_m_rule_rows(rows, ("splitn",), gpu, heuristics, launches):
                logs.setdefault((fam, op), []).append(math.log(heuristics.fused_time(c, r["M"], r["N"], r["K"], packed,
                                                                                     fam, fmt) / t))
            for key, v in logs.items():
                errors.setdefault(key, []).append((round(statistics.fmean(x * x for x in v) ** 0.5, 5), cost))
    finally:
        config.INTERPRETED, heuristics.SPLIT_ROW_COST, heuristics.SPLIT_MID_M = saved
        _clear_rule_caches(heuristics)
    return {fam: v for (fam, _), v in sorted(errors.items())}


def fit_gemm_mid(rows) -> dict:
    """Round 8: the GEMMs' time at 16 < M ≤ 128 (qlk.kernels.heuristics.GEMM_MID_M) from a report's
    rows with every candidate compiled: per (arch family, op) and format class (per group size, and
    pooled per bit width), the median over the shapes, M values and candidates of the analyzer's
    time over the rules' (heuristics.fused_time without the factor: MACs at the tile's fitted
    tensor efficiency, a median over every M > 16, times the tile's GEMM_MID_TILE). Rows whose grid
    is not the rules' are left out."""
    import statistics

    from bench.sass import gpu

    from qlk.kernels import config, heuristics

    import launches

    was, table = config.INTERPRETED, heuristics.GEMM_MID_M
    config.INTERPRETED, heuristics.GEMM_MID_M = False, {}  # the GPU candidate lists; the unfactored time
    try:
        acc = {}
        for r, fam, op, fmt, c, packed, t in _mid_m_rule_rows(rows, ("fwd", "grad"), gpu, heuristics, launches):
            ratio = t / heuristics.fused_time(c, r["M"], r["N"], r["K"], packed, fam, fmt)
            for f in {fmt, heuristics.base_format(fmt)}:
                acc.setdefault((fam, op), {}).setdefault(f, []).append(ratio)
    finally:
        config.INTERPRETED, heuristics.GEMM_MID_M = was, table
        _clear_rule_caches(heuristics)
    out = {key: {f: round(statistics.median(v), 3) for f, v in sorted(fmts.items())} for key, fmts in sorted(acc.items())}
    return _drop_group_size_copies(out, heuristics)


def fit_inputs(paths) -> tuple[list, list]:
    """(tile rows, mid-M rows) of the rules' sweeps for ``--fit-rules``. The tile tables (CALIBRATION,
    RESIDENT) take every row of the family sweep and the INT rows of a ``*-formats-*`` sweep (round
    31: the same shapes at the other group sizes, which give INT4 g64, INT3 g32 / g64 and INT2 g64 /
    g128 entries of their own); its NF4-without-double-quant rows stay out, since the rules' one
    "nf4" class is fitted on double-quantized NF4. The mid-M tables (SPLIT_MID_M, GEMM_MID_M,
    GEMM_MID_TILE, SPLIT_ROW_COST) take the family sweep's rows only."""
    tile_rows, mid_rows = [], []
    for path in paths:
        rows = read_csv(path)
        if "-formats-" in os.path.basename(path):
            tile_rows += [r for r in rows if r["group"] != "qlk" or r["fmt"].startswith("int")]
        else:
            tile_rows += rows
            mid_rows += rows
    return tile_rows, mid_rows


def fit_resident(rows) -> dict:
    """The split kernels' resident CTAs per SM (qlk.kernels.heuristics.RESIDENT) from a report's rows
    with every candidate compiled: per (arch family, op, format class) and candidate label, the
    (fewest, most) the analyzer's occupancy gave over the shapes (a compile may take a few
    registers more at one shape: the split rule then takes the worst slot wave over the range)."""
    from qlk.kernels import heuristics

    import launches

    out = {}
    for r in rows:
        op = _RULE_OPS.get(r.get("kernel"))
        if r.get("status") != "ok" or r.get("group") != "qlk" or op not in ("splitk", "splitn") or not r.get("ctas_per_sm"):
            continue
        spec = launches.FORMATS[r["fmt"]]
        fmt = heuristics.format_class(spec.get("bits", 4), spec.get("fmt") == "nf4", spec.get("group_size"))
        label = " ".join(r["config"].split()[:3])
        for f in {fmt, heuristics.base_format(fmt)}:
            per = out.setdefault((arch_family(r["arch"]), op, f), {})
            got = int(r["ctas_per_sm"])
            lo, hi = per.get(label, (got, got))
            per[label] = (min(lo, got), max(hi, got))
    # a bit width measured at one group size only: its per-width entry is that one, drop the copy
    for (fam, op, f) in list(out):
        same = [k for k in out if k[:2] == (fam, op) and k[2] != f and heuristics.base_format(k[2]) == f]
        if len(same) == 1 and out[same[0]] == out[(fam, op, f)]:
            del out[same[0]]
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def rules_summary(res, tol: float = RULES_TOLERANCE) -> dict:
    """Counts and lists of :func:`rules_check`'s result: chosen == best (within ``tol``), dispatch
    agreement (the path picked within ``tol`` of the faster one), and the cases under 0.9x dense."""
    off = [r for r in res if r["ratio"] is None or r["ratio"] < tol]
    dis = [r for r in res if r["x_dequant"] is not None and r["x_dense"] is not None
           and r["x_dense"] < r["x_best_path"] * tol]
    low = [r for r in res if r["x_dense"] is None or r["x_dense"] < 0.9]
    return dict(cases=len(res), off=off, disagree=dis, low=low)


def print_rules_check(paths) -> int:
    """``--check-rules``: the summary per CSV (arch read from its rows)."""
    import statistics

    for path in paths:
        rows = read_csv(path)
        arch = rows[0]["arch"]
        res = rules_check(rows, arch)
        s = rules_summary(res)
        print(f"{path}: sm_{arch}, {s['cases']} cases; chosen = best (within {RULES_TOLERANCE}) in "
              f"{s['cases'] - len(s['off'])}; dispatch = faster path in "
              f"{sum(r['x_dequant'] is not None for r in res) - len(s['disagree'])} of "
              f"{sum(r['x_dequant'] is not None for r in res)}; < 0.9x dense: {len(s['low'])}")
        for r in sorted(s["off"], key=lambda r: r["ratio"] or 0):
            print(f"  chosen != best  {r['case']:40} {r['chosen']} vs {r['best']} ({r['ratio'] or 0:.3f})")
        for r in s["disagree"]:
            print(f"  dispatch        {r['case']:40} {r['path']}: fused {r['x_fused']:.2f}x, dequant {r['x_dequant']:.2f}x")
        per = {}
        for r in res:
            per.setdefault((r["op"], r["fmt"]), []).append(r["x_dense"] or 0.0)
        for (op, fmt), xs in sorted(per.items()):
            print(f"  {op:5} {fmt:8} x dense min {min(xs):.2f} median {statistics.median(xs):.2f} ({len(xs)} cases)")
        for r in sorted(s["low"], key=lambda r: (r["op"], r["M"], r["fmt"], r["K"], r["N"])):
            print(f"  < 0.9x          {r['case']:40} {r['path']:7} {r['x_dense'] or 0:.2f} "
                  f"(fused {r['x_fused'] or 0:.2f}, dequant {r['x_dequant'] or 0:.2f}) {r['chosen']}")
    return 0


def arch_family(arch: int) -> int:
    return 90 if arch >= 90 else 80


# ---------------------------------------------------------------- worker: one arch, in-process
def collect(arch: int, cases, log=None, only_configs: str = "") -> list:
    """Launch every case under one capture for ``arch``; rows for each launch, or a status row.
    ``only_configs``: qlk's launchers compile only the candidates matching these patterns and
    their pick (:func:`qlk.kernels.fused_matmul._all_configs`), else every candidate."""
    from bench import sass
    from launches import run_case

    try:
        from qlk.kernels import fused_matmul
    except Exception:  # noqa: BLE001 - the qlk cases report the import failure themselves
        fused_matmul = None
    rows = []
    previous = os.environ.get("QLK_ALL_CONFIGS")
    os.environ["QLK_ALL_CONFIGS"] = only_configs or "1"  # qlk's launchers compile every candidate, the rules' pick last
    try:
        rows = _collect(arch, cases, log, sass, run_case, fused_matmul)
    finally:
        if previous is None:
            os.environ.pop("QLK_ALL_CONFIGS", None)
        else:
            os.environ["QLK_ALL_CONFIGS"] = previous
    mark_best(rows)
    mark_dense_ratio(rows, arch)
    return rows


def _collect(arch, cases, log, sass, run_case, fused_matmul) -> list:
    rows = []
    with sass.capture(arch=arch) as launches:
        for case in cases:
            t0, start = time.time(), len(launches)
            if fused_matmul is not None:
                fused_matmul.CHOICE_LOG = []
            status = run_case(case)
            choices = fused_matmul.CHOICE_LOG if fused_matmul is not None else []
            if fused_matmul is not None:
                fused_matmul.CHOICE_LOG = None
            mine = launches[start:]
            if status is None and not mine:
                status = "failed: the launcher returned without launching a Triton kernel"
            try:
                got = analyze_case(mine, case) if mine else []
            except Exception as e:  # noqa: BLE001
                got, status = [], f"failed: analysis: {type(e).__name__}: {e}"
            mark_chosen(got, choices)
            rows += got if got else [status_row(arch, case, status)]
            if status and got:  # launched something, then raised
                for r in got:
                    r["status"] = f"partial: {status}"
            if log:
                log(f"sm_{arch} {case.name:44} {len(mine):3} launches {time.time() - t0:6.1f}s  {status or 'ok'}")
    return rows


def select_cases(quick: bool, patterns, include=("dense", "qlk", "peers"), family: bool = False, ms=None,
                 shapes=None, formats=None):
    import launches

    out = launches.all_cases(quick, patterns, include_qlk="qlk" in include, include_dense="dense" in include,
                             family=family, ms=ms, shapes=shapes, formats=formats)
    # the "x dense" ratios need the dense GEMM and the dequantize kernel at each qlk case's shape
    names = {c.name for c in out}
    want = set()
    for c in out:
        if c.group == "qlk" and c.op in ("fwd", "dgrad"):
            want.add(launches.case_name(f"dense-{c.op}", "bf16", c.k, c.n, c.m))
            want.add(launches.case_name("dequant", c.fmt, c.k, c.n, None))
    if want - names:
        extra = [c for c in launches.all_cases(quick, sorted(want - names), family=family, ms=ms, shapes=shapes,
                                               formats=formats)
                 if c.name not in names]
        out = [c for c in extra if c.group == "dense"] + out + [c for c in extra if c.group != "dense"]
    if "peers" in include and not family and not shapes and not formats:
        import peers_static

        out += peers_static.all_cases(quick, patterns)
    return out


def worker(args) -> int:
    arch = int(args.arch)
    import launches

    cases = select_cases(args.quick, _patterns(args.cases), family=args.family, ms=launches._ms(args.ms),
                         shapes=launches._shapes(args.shapes), formats=launches._formats(args.formats))
    rows = collect(arch, cases, log=lambda s: print(s, file=sys.stderr, flush=True), only_configs=args.only_configs)
    with open(args.worker_out, "w") as f:
        json.dump(rows, f)
    return 0


# ---------------------------------------------------------------- the files
def _rng(lo, hi):
    return "" if hi is None else f"{hi:.2f}..{lo:.2f}"


def _mb(row):
    return "" if row["smem_bytes"] is None else f"{row['smem_bytes'] / 1024:.0f}K"


def _shape(row):
    return f"{row['K']}→{row['N']}"


def write_csv(path: str, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def _summary(rows, dispatched=None) -> list:
    """Best estimate of each case's main kernel, dense | qlk formats | peers side by side.

    ``dispatched``: :func:`rules_check`'s results by case. Where given, a qlk fwd/dgrad cell shows
    what qlk's dispatcher runs at that shape (the split kernel at 16 < M ≤ 128 where the rules pick
    it, dequantize + dense where the path is "dequant"), with the per-shape table's time ratio, so a
    cell never shows the GEMM's estimate at a shape where the GEMM does not run."""
    dispatched = dispatched or {}
    main = {}
    for r in rows:
        if r["status"] != "ok" or not r["best"]:
            continue
        cur = main.get(r["case"])
        if cur is None or _work(r) > _work(cur):
            main[r["case"]] = r
    cols = [("dense bf16", lambda r: r["group"] == "dense")]
    import launches

    # the report's five formats, then any other the rows hold (--formats), in the order they appear
    extra = [f for f in dict.fromkeys(r["fmt"] for r in main.values() if r["group"] == "qlk")
             if f not in launches.FORMATS]
    for fmt in list(launches.FORMATS) + extra:
        cols.append((f"qlk {fmt}", lambda r, fmt=fmt: r["group"] == "qlk" and r["fmt"] == fmt and r["op"] in ("fwd", "dgrad")))
    cols += [
        ("gemlite int4g128", lambda r: r["case"].startswith("gemlite-auto/")),
        ("gemlite tuned", lambda r: r["case"].startswith("gemlite-tuned/")),
        ("grouped-nf4-gemm", lambda r: r["case"].startswith(("gnf4-fwd/", "gnf4-dgrad/"))),
        ("gnf4 bf16", lambda r: r["case"].startswith("gnf4-bf16/")),
    ]
    keys = sorted({(r["op"], r["K"], r["N"], r["M"]) for r in main.values() if r["op"] in ("fwd", "dgrad")},
                  key=lambda t: (t[0] != "fwd", t[1], t[2], -(t[3] or 0)))
    lines = ["| op | K→N | M | metric | " + " | ".join(c for c, _ in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    by_shape = {}
    for r in main.values():
        by_shape.setdefault((r["op"], r["K"], r["N"], r["M"]), []).append(r)
    for op, k, n, m in keys:
        cells = []
        for _, pred in cols:
            hit = [r for r in by_shape[(op, k, n, m)] if pred(r)]
            if not hit:
                cells.append("")
                continue
            r = hit[0]
            d = dispatched.get(r["case"]) if r["group"] == "qlk" else None
            if d is not None and d.get("estimate") and d.get("x_dense") is not None:
                hi, lo = d["estimate"]
                kind = d["chosen"].split()[0]
                # at M <= 16 the case's own launch is the split (decode) kernel: no tag
                tag = " deq" if d["path"] == "dequant" else f" {kind}" if kind == "gemv" or (
                    kind in ("splitk", "splitn") and (r["M"] or 0) > 16) else ""
                ratio = f" ({d['x_dense']:.2f}×{tag})"
            else:
                hi, lo = metric(r)
                ratio = f" ({r['x_dense']:.2f}×{'' if r.get('dispatch') != 'dequant' else ' deq'})" \
                    if r.get("x_dense") is not None else ""
            cells.append((f"{hi:.2f}..{lo:.2f}" if hi >= 0 else "?") + ratio)
        what = "tensor-peak" if m >= 256 else "dram-peak"
        lines.append(f"| {op} | {k}→{n} | {m} | {what} | " + " | ".join(cells) + " |")
    return lines


_GROUPS = {"dense": 0, "qlk": 1}
_OPS = {"fwd": 0, "dgrad": 1, "decode": 2, "qalora": 3, "dequant": 4}


def _dispatched(rows, arch) -> list:
    """:func:`rules_check` of a report's rows, [] where qlk's rules cannot be run (no qlk)."""
    try:
        return rules_check([r for r in rows if r.get("status") == "ok"], arch)
    except Exception:  # noqa: BLE001 - no qlk: no table
        return []


def _rules_table(rows, arch, res=None) -> list:
    """One line per qlk fwd/dgrad case (:func:`rules_check`): the kernel and tile qlk's rules pick,
    the analyzer's best of every kernel and tile it could have run, both paths' ratio to dense."""
    res = _dispatched(rows, arch) if res is None else res
    if not res:
        return []
    f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    s = rules_summary(res)
    agree = len(res) - len(s["off"])
    with_path = [r for r in res if r["x_dequant"] is not None]
    out = [f"Chosen = best (within {RULES_TOLERANCE:.2f} of the best estimated time) in {agree} of {len(res)} "
           f"cases; the dispatcher's path within {RULES_TOLERANCE:.2f} of the faster one in "
           f"{len(with_path) - len(s['disagree'])} of {len(with_path)} (M > 16); under 0.9x dense: {len(s['low'])}.", "",
           "| case | chosen (kernel, tile) | estimate | best | fused × dense | dequant × dense | path | × dense |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(res, key=lambda r: (r["op"] != "fwd", list(FMT_ORDER).index(r["fmt"]) if r["fmt"] in FMT_ORDER
                                        else 9, r["K"], r["N"], r["M"])):
        est = r["estimate"]
        same = "✓" if r["ratio"] is not None and r["ratio"] >= RULES_TOLERANCE else \
            f"{r['best']} (chosen at {r['ratio']:.2f})" if r["ratio"] is not None else r["best"]
        flag = " (the other path is estimated faster)" if r in s["disagree"] else ""
        out.append(f"| {r['case']} | {r['chosen']} | {f'{est[0]:.2f}..{est[1]:.2f}' if est else ''} | {same} | "
                   f"{f(r['x_fused'])} | {f(r['x_dequant'])} | {r['path']}{flag} | **{f(r['x_dense'])}** |")
    return out


FMT_ORDER = ("int4g32", "int4g128", "int3g128", "int2g32", "nf4dq")


def _row_order(r):
    """dense, qlk, peers; forward before gradient; format; shape; large M first."""
    import launches

    fmts = list(launches.FORMATS)
    return (_GROUPS.get(r["group"], 2), r["group"], r["case"].split("/")[0] if r["group"].startswith("peer") else "",
            _OPS.get(r["op"], 9), fmts.index(r["fmt"]) if r["fmt"] in fmts else 9, r["fmt"], r["K"], r["N"],
            -(r["M"] or 0),
            r["kernel"] or "")


def write_markdown(path: str, arch: int, rows, meta: dict) -> None:
    gpu = {90: "H100 SXM (sm_90, 132 SMs)", 80: "A100 SXM (sm_80, 108 SMs)"}[arch]
    out = io.StringIO()
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"# Static report, sm_{arch}: qlk kernels, dense baseline and Triton peers")
    p()
    p(f"**Estimated from sm_{arch} machine code, not measured.** Every launch was compiled for {gpu} by "
      "Triton on a machine with no GPU and judged from its SASS by qlk's static analyzer, `bench/sass` "
      "(a model: docs/static-analysis.md says what it sees, what it misses and how it was calibrated). "
      "Nothing ran.")
    p()
    p(f"- command: `{meta['command']}`")
    p(f"- date: {meta['date']}; triton {meta['triton']}; torch {meta['torch']}; qlk commit {meta['commit']}")
    p(f"- peers: {meta['peers']}")
    p("- cases: Llama-3-8B layer shapes K→N, M tokens; weights from `qlk.quantize` of random bf16 "
      "(peers: random bytes of their layouts); activations bf16")
    p("- case names `<op>/<format>/<K>-><N>/M<m>`: `dense-*` bench/dense_matmul.py (bf16; split-K tile at M ≤ 64); "
      "`fwd`, `dgrad`, `dequant`, `qalora` qlk.kernels (at M ≤ 16 `fwd` is qlk's decode path); "
      "`gemlite-auto` gemlite's own dispatch with the configs it ships for this GPU, `gemlite-gemv` its plain GEMV, "
      "`gemlite-tuned` its GEMM with every fast-autotune config (shipped configs hidden); `gnf4-fwd`/`gnf4-dgrad` "
      "grouped-nf4-gemm single expert (default TF32 loop), `gnf4-bf16` its opt-in bf16-MMA prefill")
    p("- tensor-peak: fraction of the tensor cores' peak the main loop can reach; read it at M ≥ 256. "
      "dram-peak: fraction of DRAM bandwidth spent on useful bytes (each operand of the launch read or written "
      "once; L1/L2 re-reads and table gathers are not DRAM traffic); read it at M ≤ 16. "
      "Both are optimistic..pessimistic (the bottleneck overlapping everything / its own term overlapping "
      "nothing), times wave efficiency.")
    p("- a kernel with several candidate configs compiles every one (qlk's launchers under `QLK_ALL_CONFIGS=1`, "
      "the dense baseline and peers through their autotuners); the table shows the config whose estimate "
      "range times tile fill has the highest midpoint, and for qlk the config its rules choose "
      "(qlk.kernels.heuristics; a GPU's autotuner, for the others, may pick another); the CSV has them all "
      "(`best`, `chosen` columns).")
    if meta.get("rendered"):
        p(f"- {meta['rendered']}")
    p()
    res = _dispatched(rows, arch)
    p("## Summary: best estimate of each case's main kernel")
    p()
    if res:
        p("qlk's cells show the kernel its dispatcher runs at that shape, with the time ratio of the next "
          "table (`splitk` / `splitn`: the split kernel the rules pick at 16 < M ≤ 128, `deq`: dequantize + "
          "dense); the other cells the best config of the case's own kernel.")
        p()
    for line in _summary(rows, {d["case"]: d for d in res}):
        p(line)
    p()
    lines = _rules_table(rows, arch, res)
    if lines:
        p("## qlk against dense at each shape: chosen vs best config, fused vs dequantize + dense")
        p()
        p("Estimated, not measured. `× dense`: the dense bf16 GEMM's estimated time at the same shape (same run) "
          "over qlk's (time = padded MACs / midpoint of the tensor fraction at M ≥ 256, useful bytes / midpoint "
          "of the DRAM fraction below; both hold tile padding and SM balance); `fused` the fused kernel qlk's "
          "rules pick, `dequant` dequantize + the same dense GEMM; `path` what qlk's dispatcher runs "
          "(qlk.kernels.heuristics.choose_path; docs/kernels.md, rounds 2 and 3). `chosen`: the kernel and tile "
          "qlk's rules launch (`fwd`/`grad` the GEMMs, `splitk`/`splitn` the split kernels, also weighed at "
          "16 < M ≤ 128, `gemv` the M = 1 FMA input gradient); `best`: the analyzer's fastest of every kernel and "
          "tile compiled for the case (✓: the chosen one, or within 1 % of its time; else the best and the "
          "chosen one's time as a share of it). Re-check a CSV against the rules as they are now: "
          "`python bench/static_report.py --check-rules <csv>`.")
        p()
        for line in lines:
            p(line)
        p()
    p("## Kernels × cases")
    p()
    p("| kernel | case | config | regs | stack | smem | CTAs/SM | grid | wave | tensor-peak | dram-peak | bound | notes |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    shown = sorted((r for r in rows if r["status"] != "ok" or r["best"]), key=_row_order)
    configs_of = {}
    for x in rows:
        configs_of[(x["case"], x["kernel"])] = configs_of.get((x["case"], x["kernel"]), 0) + 1
    missing = {}
    for r in shown:
        if r["status"] and r["status"].startswith("not available"):
            missing.setdefault((r["group"], r["case"].split("/")[0], r["status"]), []).append(r["case"])
            continue
        if r["status"] != "ok" and not (r["status"] or "").startswith("partial"):
            p(f"| — | {r['case']} | {r['status']} |  |  |  |  |  |  |  |  |  |  |")
            continue
        n_cfg = configs_of[(r["case"], r["kernel"])]
        cfg = r["config"] + (f" (best of {n_cfg})" if n_cfg > 1 else "")
        if r.get("chosen_config") and r["chosen_config"] != r["config"]:
            cfg += f"; qlk's rules chose {r['chosen_config']}"
        notes = "; ".join(n for n in (r["notes"] or "").split("; ") if n and not n.startswith("grid "))
        if r["status"] != "ok":
            notes = f"{r['status']}; {notes}"
        p(f"| {r['kernel']} | {r['case']} | {cfg} | {r['regs']} | {r['stack']} | {_mb(r)} | "
          f"{r['ctas_per_sm']} ({r['limiter']}) | {r['grid_ctas'] if r['grid_ctas'] is not None else '-'} | "
          f"{'' if r['wave_eff'] is None else format(r['wave_eff'], '.2f')} | "
          f"{_rng(r['tensor_peak_pess'], r['tensor_peak_opt'])} | {_rng(r['dram_peak_pess'], r['dram_peak_opt'])} | "
          f"{r['bound']} | {notes} |")
    if missing:
        p()
        p("## Not available")
        p()
        for (group, op, status), names in sorted(missing.items()):
            p(f"- {group} `{op}` ({len(names)} cases, e.g. `{names[0]}`): {status}")
    with open(path, "w") as f:
        f.write(out.getvalue())


def _meta(argv) -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "qlk"], capture_output=True,
                               text=True).stdout.strip()
        commit = (commit or "?") + (" + uncommitted changes in qlk/" if dirty else "")
    except OSError:
        commit = "?"
    peers = []
    for dist in ("gemlite", "grouped-nf4-gemm"):
        try:
            from importlib.metadata import version

            peers.append(f"{dist} {version(dist)}")
        except Exception:  # noqa: BLE001
            peers.append(f"{dist} not installed")
    cmd = "python bench/static_report.py" + ("" if not argv else " " + shlex.join(argv))
    return dict(command=cmd, date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                triton=triton.__version__, torch=torch.__version__, commit=commit, peers=", ".join(peers))


_META_LINE = re.compile(r"^- date: (?P<date>.*?); triton (?P<triton>\S+); torch (?P<torch>\S+); qlk commit (?P<commit>.*)$")


def render(csv_path: str) -> str:
    """Rewrite the report .md next to ``csv_path`` from the CSV's rows: the compile run's header lines
    (command, date, versions, commit) are kept from the old .md, and a line says when and with which
    rules the tables were rendered. Returns the .md's path."""
    rows = read_csv(csv_path)
    if not rows:
        raise SystemExit(f"static_report: {csv_path} has no rows")
    md = os.path.splitext(csv_path)[0] + ".md"
    meta = dict(command="?", date="?", triton="?", torch="?", commit="?", peers="?")
    if os.path.exists(md):
        with open(md) as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("- command: `"):
                    meta["command"] = line[len("- command: `"):].rstrip("`")
                elif line.startswith("- peers: "):
                    meta["peers"] = line[len("- peers: "):]
                elif _META_LINE.match(line):
                    meta.update(_META_LINE.match(line).groupdict())
    now = _meta([])
    meta["rendered"] = (f"tables rendered {now['date']} from this CSV (`python bench/static_report.py --render "
                        f"{os.path.relpath(csv_path, ROOT)}`) with qlk's rules at commit {now['commit']}; "
                        "the estimates are the CSV's, compiled at the date above")
    write_markdown(md, int(rows[0]["arch"]), rows, meta)
    return md


def merge(into_csv: str, partial_csv: str) -> tuple[int, int]:
    """``--merge``: every case of ``partial_csv`` replaces that case's rows in ``into_csv``, in place
    (its derived columns, best / chosen / the ratios to the dense baseline, are the partial run's, which
    compiled the same dense baselines, or, where it compiled none, from the report's); cases the report
    lacks are appended. Both of one arch. Returns (cases replaced, cases added)."""
    old, new = read_csv(into_csv), read_csv(partial_csv)
    if {r["arch"] for r in old} != {r["arch"] for r in new}:
        raise SystemExit(f"static_report: {into_csv} and {partial_csv} are of different archs")
    by_case = {}
    for r in new:
        by_case.setdefault(r["case"], []).append(r)
    rows, done = [], set()
    for r in old:
        case = r["case"]
        if case not in by_case:
            rows.append(r)
        elif case not in done:
            rows += by_case[case]
            done.add(case)
    rows += [r for case, rs in by_case.items() if case not in done for r in rs]
    # a partial run without the dense baselines (cases 'dgrad/*' only): its rows' ratios to dense
    # from the report's baselines (useful bytes over the DRAM midpoint, as the CSV holds no MAC count)
    bare = {r["case"] for r in new if r.get("best") and r.get("group") == "qlk" and r.get("op") in ("fwd", "dgrad")
            and r.get("x_dense_fused") is None}
    if bare:
        mark_dense_ratio([r for r in rows if r["case"] in bare or r.get("op") not in ("fwd", "dgrad")
                          or r.get("group") != "qlk"], int(new[0]["arch"]))
    write_csv(into_csv, rows)
    return len(done), len(by_case) - len(done)


def merge_configs(into_csv: str, partial_csv: str) -> tuple[int, int]:
    """``--merge-configs``: a partial run under ``--only-configs`` (a new tile compiled for cases
    the report has, with the rules' pick of each case) merged row by row, in place: each of its rows
    replaces the report's row of the same (case, kernel, config) or is added to the case. The
    report's other rows stay: valid only where their tiles' code did not change (then their machine
    code, and so their estimates, are the same). In the cases touched the rules' flags (``chosen``)
    are the partial run's (the rules' pick is always launched), and best, the dense ratios and the
    dispatch are marked again over the merged rows. Returns (rows replaced, rows added)."""
    old, new = read_csv(into_csv), read_csv(partial_csv)
    if {r["arch"] for r in old} != {r["arch"] for r in new}:
        raise SystemExit(f"static_report: {into_csv} and {partial_csv} are of different archs")
    known = {r["case"] for r in old}
    strays = sorted({r["case"] for r in new} - known)
    if strays:
        raise SystemExit(f"static_report: {partial_csv} has cases {into_csv} lacks ({strays[:3]}...): "
                         "--merge-configs adds tiles to a report's cases, not cases (use --merge)")
    key = lambda r: (r["case"], r["kernel"], r["config"])  # noqa: E731
    by_key = {key(r): r for r in new if r["status"] == "ok"}
    touched = {r["case"] for r in by_key.values()}
    olds = {key(r) for r in old}
    extra = {}  # case -> its new rows, placed after the case's last row
    for k, r in by_key.items():
        if k not in olds:
            extra.setdefault(r["case"], []).append(r)
    last = {r["case"]: i for i, r in enumerate(old)}
    rows, replaced, added = [], 0, sum(map(len, extra.values()))
    for i, r in enumerate(old):
        if key(r) in by_key:
            rows.append(by_key[key(r)])
            replaced += 1
        else:
            if r["case"] in touched and r.get("chosen") is not None:
                r["chosen"] = False  # the partial run holds the rules' pick of the case
            rows.append(r)
        if last[r["case"]] == i:
            rows += extra.get(r["case"], [])
    remark_cases(rows, touched, int(new[0]["arch"]))
    write_csv(into_csv, rows)
    return replaced, added


def remark_cases(rows, touched, arch: int) -> None:
    """Mark best, the dense ratios and the dispatch again on the qlk cases ``touched`` of a report's
    rows (read from its CSV) after rows of theirs were replaced, added or dropped."""
    for r in rows:
        if r["case"] in touched:
            r["best"] = False
            for col in ("best_config", "chosen_config", "chosen_vs_best", "x_dense_fused", "x_dense_dequant",
                        "dispatch", "x_dense", "dispatch_agrees"):
                r[col] = None
    mark_best([r for r in rows if r["case"] in touched])
    mark_dense_ratio([r for r in rows if r["case"] in touched or r["group"] != "qlk" or r["op"] not in ("fwd", "dgrad")
                      or r["case"].startswith("dequant/")], arch)


def _patterns(s: str):
    return [p for p in (s or "").split(",") if p]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated: 90, 80")
    ap.add_argument("--quick", action="store_true", help="M=4096 and M=1 on 4096->14336 only")
    ap.add_argument("--cases", default="", help="comma-separated shell patterns over case names")
    ap.add_argument("--family", action="store_true",
                    help="Llama-family shapes 1B..70B (GQA k/v included), M in 1, 16, 333, 2048, 8192 (long; --ms for others)")
    ap.add_argument("--ms", default="", help="comma-separated M values instead of the set's own "
                    "(the rules' sweep: --family --ms 1,16,64,333,2048,8192 --cases 'fwd/*,dgrad/*')")
    ap.add_argument("--shapes", default="", help="comma-separated K->N shapes instead of the set's own; 'other': "
                    "layers of model families the rules were not fitted on (the out-of-family check: --shapes "
                    "other --ms 7,100,500,3000 --cases 'fwd*,dgrad*' --stem static-other)")
    ap.add_argument("--formats", default="", help="comma-separated format labels instead of the report's five: "
                    "int<2|3|4>g<group> (e.g. int3g32, int4g64), nf4dq, nf4 (the out-of-format check)")
    ap.add_argument("--stem", default="static", help="file names <stem>-sm<arch>.md/.csv (the rules' sweep: "
                    "static-family)")
    ap.add_argument("--out", default=RESULTS, help="folder for static-sm<arch>.md/.csv")
    ap.add_argument("--jobs", type=int, default=2, help="arch workers run in parallel")
    ap.add_argument("--fit-rules", nargs="+", metavar="CSV",
                    help="print qlk.kernels.heuristics.CALIBRATION fitted to these report CSVs (every candidate "
                    "compiled, e.g. the rules' sweep) and exit; compiles nothing")
    ap.add_argument("--check-rules", nargs="+", metavar="CSV",
                    help="compare qlk's rules (as they are now) with these report CSVs: chosen vs best config, "
                    "dispatch vs the faster path; compiles nothing")
    ap.add_argument("--render", nargs="+", metavar="CSV",
                    help="rewrite the .md next to each report CSV from its rows (the summary and the per-shape "
                    "table with qlk's rules as they are now; the estimates stay the CSV's); compiles nothing")
    ap.add_argument("--merge", nargs=2, metavar=("INTO_CSV", "PARTIAL_CSV"),
                    help="replace INTO_CSV's rows of every case PARTIAL_CSV has (a partial re-sweep of the same "
                    "arch, its dense baselines included) and re-render INTO_CSV's .md; compiles nothing")
    ap.add_argument("--only-configs", default="",
                    help="comma-separated shell patterns over qlk config labels (e.g. '64x128x128 w4 s4'): compile "
                    "only those candidates and the rules' pick of each case, for --merge-configs")
    ap.add_argument("--merge-configs", nargs=2, metavar=("INTO_CSV", "PARTIAL_CSV"),
                    help="add (or replace) PARTIAL_CSV's rows, config by config, in INTO_CSV's cases (a run with "
                    "--only-configs: a new tile whose neighbours' code did not change), mark best and the dense "
                    "ratios again and re-render INTO_CSV's .md; compiles nothing")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_out:
        return worker(args)
    if args.fit_rules:
        import pprint

        tile_rows, rows = fit_inputs(args.fit_rules)
        print("CALIBRATION = ", end="")
        pprint.pprint(fit_rules(tile_rows), width=120, sort_dicts=True)
        print("RESIDENT = ", end="")
        pprint.pprint(fit_resident(tile_rows), width=120, sort_dicts=True)
        print("SPLIT_ROW_COST = ", end="")
        pprint.pprint(fit_split_row_cost(rows), width=120, sort_dicts=True)
        print("SPLIT_MID_M = ", end="")
        pprint.pprint(fit_split_mid(rows), width=120, sort_dicts=True)
        print("GEMM_MID_TILE = ", end="")
        pprint.pprint(fit_gemm_mid_tile(rows), width=120, sort_dicts=True)
        print("GEMM_MID_M = ", end="")
        pprint.pprint(fit_gemm_mid(rows), width=120, sort_dicts=True)
        return 0
    if args.check_rules:
        return print_rules_check(args.check_rules)
    if args.merge:
        into, partial = args.merge
        replaced, added = merge(into, partial)
        print(f"static_report: {into}: {replaced} cases re-swept, {added} added; wrote {os.path.relpath(render(into))}")
        return 0
    if args.merge_configs:
        into, partial = args.merge_configs
        replaced, added = merge_configs(into, partial)
        print(f"static_report: {into}: {replaced} rows re-swept, {added} added; wrote {os.path.relpath(render(into))}")
        return 0
    if args.render:
        for path in args.render:
            print(f"static_report: wrote {os.path.relpath(render(path))}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("static_report: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",") if a]
    if any(a not in (80, 90) for a in archs):
        print(f"static_report: --arch takes 90 and/or 80, got {args.arch}", file=sys.stderr)
        return 2
    import launches

    launches._formats(args.formats)  # a bad label stops here, before the workers compile anything
    os.makedirs(args.out, exist_ok=True)
    meta = _meta(argv)
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="qlk-static-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs, pending = {}, list(archs)
    rc = 0
    while pending or procs:
        while pending and len(procs) < max(args.jobs, 1):
            arch = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--arch", str(arch), "--cases", args.cases,
                   "--worker-out", os.path.join(tmp, f"sm{arch}.json")] + (["--quick"] if args.quick else []) \
                + (["--family"] if args.family else []) + (["--ms", args.ms] if args.ms else []) \
                + (["--shapes", args.shapes] if args.shapes else []) \
                + (["--formats", args.formats] if args.formats else []) \
                + (["--only-configs", args.only_configs] if args.only_configs else [])
            procs[arch] = subprocess.Popen(cmd, env=env, cwd=ROOT)
        for arch, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            del procs[arch]
            if proc.returncode:
                print(f"static_report: the sm_{arch} worker failed (exit {proc.returncode})", file=sys.stderr)
                rc = 1
                continue
            with open(os.path.join(tmp, f"sm{arch}.json")) as f:
                rows = json.load(f)
            md, cs = (os.path.join(args.out, f"{args.stem}-sm{arch}.{ext}") for ext in ("md", "csv"))
            write_markdown(md, arch, rows, meta)
            write_csv(cs, rows)
            print(f"\nsm_{arch}: best estimate of each case's main kernel (estimated, not measured)\n")
            print("\n".join(_summary(rows)))
            problems = [r for r in rows if r["status"] == "ok" and (r["stack"] or r["spill_ops"])]
            for r in problems:
                print(f"SPILLS sm_{arch} {r['kernel']} {r['config']}: stack {r['stack']} B, {r['spill_ops']} LDL/STL")
            print(f"static_report: wrote {os.path.relpath(md)} and {os.path.relpath(cs)} "
                  f"({sum(r['status'] == 'ok' for r in rows)} launches analyzed, {time.time() - t0:.0f}s)")
        time.sleep(0.5)
    return rc


if __name__ == "__main__":
    sys.exit(main())

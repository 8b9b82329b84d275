"""GPU calibration of the static analyzer: the measured GPU time of every candidate tile of qlk's
fused kernels, of every config of the dense Triton baseline and of cuBLAS, at the cases of the
static report (same case names, same config labels), with no host time in the numbers.

Why: round 35's H200 run measured the fused GEMMs at 0.16-0.74x cuBLAS where the analyzer said
~1x the dense Triton baseline. That run timed the rules' pick only, through ``do_bench`` (host
time included at small M), and never ran the dense Triton baseline, so it could not say whether
the analyzer's fused model, its dense model, or the launch overhead was off. This script measures
what the analyzer estimates, launch by launch; ``bench/calibrate_static.py`` joins its CSV with a
static report of the same cases and prints measured over estimated, per kernel and tile.

Timing: each call is captured ``--calls`` times into one CUDA graph, each preceded by a write of
``--flush-mb`` MB (L2 cleared, as ``triton.testing.do_bench`` does); the same graph without the
calls times the flushes alone; time per call = (t_graph - t_flush) / calls, the median of
``--reps`` replays. A split launch's workspace zeroing and sum are in its time (they are in the
op's). Two flags are timed both ways, the variant's rows labelled with a suffix: sm_90's GEMM input
gradient as the transposed product (``GRAD_W_AS_A``, " W_AS_A") and the split-K decode finished in
the kernel (``SPLITK_FINISH``, " FINISH": one launch, its kept workspace made on the capture
stream's first call, one memset node a graph). Each qlk launch is forced to one candidate (``fused_matmul._tiles`` patched, as
bench/gpu_triage.py does) and its output checked against float64 math (rel_err in the CSV: a
wrong tile is timed but flagged).

On a GPU machine (one call of the lent machine; ``--budget-s`` stops it in time, rows kept)::

    python3 bench/gpu_calibrate.py --out calibrate.csv --budget-s 240

then on any machine (static compiles, no GPU)::

    python bench/static_report.py --arch 90 --shapes '4096->14336,4096->4096' --ms 1,16,1024,4096 \\
        --formats int4g128,int4g32,nf4dq --cases 'fwd*,dgrad*,dense*' --out /tmp/cal
    python bench/calibrate_static.py calibrate.csv /tmp/cal/static-sm90.csv

No GPU (the plumbing, under the Triton interpreter, wall-clock timing; the smoke test runs it)::

    TRITON_INTERPRET=1 python bench/gpu_calibrate.py --device cpu --shapes '256->128' --ms 17 \\
        --formats int4g32 --out /tmp/cal.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

#: (K, N): Llama-3-8B's gate/up and q/o layers (the round-35 GPU run's two); ``--full`` adds its
#: down projection and a GQA k/v projection. Largest M first: a run stopped by its budget keeps the
#: GPU-bound training shapes, which the refit needs most.
SHAPES = [(4096, 14336), (4096, 4096)]
FULL_SHAPES = SHAPES + [(14336, 4096), (4096, 1024)]
MS = [4096, 1024, 1]
FULL_MS = [4096, 1024, 256, 16, 1]
FORMATS = ["int4g128", "int4g32", "nf4dq"]
#: the static report's op -> (qlk launcher, path at M <= 16, path above)
OPS = {"fwd": ("quant_matmul_forward", "splitk", "gemm"), "dgrad": ("quant_matmul_grad_input", "splitn", "gemm")}
#: the rules' op name of each path (heuristics.score_all)
RULES_OP = {("fwd", "splitk"): "splitk", ("fwd", "gemm"): "fwd", ("dgrad", "splitn"): "splitn",
            ("dgrad", "gemm"): "grad"}
FIELDS = ["arch", "gpu", "case", "group", "op", "fmt", "K", "N", "M", "path", "config", "chosen", "split",
          "time_us", "p20_us", "p80_us", "rel_err", "status", "versions"]


class Timer:
    """Per-call time of ``fn`` without host time (CUDA graphs) on a GPU; wall clock on CPU."""

    def __init__(self, device, calls: int, reps: int, flush_mb: int):
        import torch

        self.torch, self.device, self.calls, self.reps = torch, device, calls, reps
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(flush_mb * 2**20 // 4, dtype=torch.int32, device=device) if self.cuda else None

    def _graph_time(self, fn) -> list:
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture wants
            for _ in range(2):
                self.flush.zero_()
                fn and fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.calls):
                self.flush.zero_()
                fn and fn()
        out = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / self.calls)  # µs per call
        return out

    def __call__(self, fn) -> tuple:
        """(median, p20, p80) µs per call."""
        if self.cuda:
            flush = statistics.median(self._graph_time(None))
            ts = sorted(t - flush for t in self._graph_time(fn))
        else:
            fn()
            ts = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e6)
            ts.sort()
        q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
        return statistics.median(ts), q(0.2), q(0.8)


def _versions() -> str:
    import torch
    import triton

    return f"torch={torch.__version__};triton={triton.__version__}"


def qlk_rows(fm, h, launches, timer, dev, arch, sms, k, n, m, fmt, op, dtype):
    """One row per candidate tile of the path qlk runs for ``op`` at M (forced, timed, checked)."""
    import torch

    fn_name, small_path, large_path = OPS[op]
    path = small_path if m <= 16 else large_path
    qw = launches.quantized_weight(fmt, n, k).to(dev)
    w64 = qw.dequantize(torch.float32).double()
    fmtc = h.format_class(qw.bits, qw.fmt == "nf4", qw.group_size)
    rules_op = RULES_OP[(op, path)]
    cands = h.score_all(rules_op, m, n, k, fmtc, arch, sms)
    chosen = h.choose_config(rules_op, m, n, k, fmtc, arch, sms)
    x = torch.randn(m, k if op == "fwd" else n, device=dev, dtype=dtype)
    ref = x.double() @ (w64.t() if op == "fwd" else w64)
    out = torch.empty(m, n if op == "fwd" else k, device=dev, dtype=dtype)
    launcher = getattr(fm, fn_name)
    real_tiles = fm._tiles
    # timed both ways, the flag's row with its config ending in the suffix: sm_90's input gradient
    # (fused_matmul.GRAD_W_AS_A, round 36: the tile as the MMA's B operand, the default, and the
    # transposed product) and the split-K decode (SPLITK_FINISH, round 37: three launches, the
    # default, or one that finishes Y in the kernel)
    flag, suffix = None, ""
    if op == "dgrad" and path == "gemm" and arch == 90:
        flag, suffix = "GRAD_W_AS_A", " W_AS_A"
    elif op == "fwd" and path == "splitk":
        flag, suffix = "SPLITK_FINISH", " FINISH"
    real_flag = getattr(fm, flag) if flag else None
    variants = (False, True) if flag else (None,)
    rows = []
    try:
        for c, on in ((c, v) for c in cands for v in variants):
            fm._tiles = lambda *a, _c=c, **kw: (_c, [_c])
            if flag:
                setattr(fm, flag, on)
            h.clear_launch_caches()
            row = dict(group="qlk", op=op, fmt=fmt, K=k, N=n, M=m, path=path,
                       config=c.label + (suffix if on else ""),
                       chosen=c.index == chosen.index and on == real_flag, split=c.split,
                       case=launches.case_name(op, fmt, k, n, m))
            try:
                call = lambda: launcher(x, qw, out=out, path=path)  # noqa: E731
                out.fill_(float("nan"))
                call()
                if timer is None:  # the compile phase: built and run once, into Triton's cache
                    continue
                err = ((out.double() - ref).norm() / ref.norm()).item()
                row["rel_err"] = f"{err:.3g}" if err == err else "inf"
                row["time_us"], row["p20_us"], row["p80_us"] = timer(call)
                row["status"] = "ok" if err == err and err < 2e-2 else "wrong"
            except Exception as e:  # noqa: BLE001 - a tile that fails is a row, not the end of the run
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    finally:
        fm._tiles = real_tiles
        if flag:
            setattr(fm, flag, real_flag)
        h.clear_launch_caches()
    return rows


def dense_rows(launches, timer, dev, k, n, m, op, dtype):
    """The dense Triton baseline at every config the static report compiles (bench/dense_matmul.py:
    its autotune list above DECODE_M, its one split-K decode tile at or below), and cuBLAS."""
    import torch
    import triton

    import dense_matmul as dm

    x = torch.randn(m, k if op == "fwd" else n, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype)
    wt = w if op == "fwd" else w.t()  # dX = dY·W: W read through its transpose, as the static case does
    nn, kk = wt.shape
    case = launches.case_name(f"dense-{op}", "bf16", k, n, m)
    rows = []
    if m > dm.DECODE_M:
        configs = [(dict(c.kwargs), c.num_warps, c.num_stages, 1) for c in dm._configs()]
    else:
        d = dict(dm.DECODE_CONFIG)
        warps, stages = d.pop("num_warps"), d.pop("num_stages")
        configs = [(d, warps, stages, dm._split_k(m, nn, kk, dev))]
    y = torch.empty(m, nn, device=dev, dtype=dtype)
    for kw, warps, stages, split in configs:
        label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{warps} s{stages}"
        out = y if split == 1 else torch.empty(split, m, nn, device=dev, dtype=torch.float32)
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(nn, kw["BLOCK_N"]), split)
        strides = (x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), y.stride(0), y.stride(1))  # as dense_matmul

        def call(out=out, grid=grid, kw=kw, warps=warps, stages=stages, split=split, strides=strides):
            dm._dense_matmul_kernel[grid](x, wt, out, m, nn, kk, *strides, SPLIT_K=split, num_warps=warps,
                                          num_stages=stages, **kw)
            if split > 1:
                y.copy_(out.sum(0))

        row = dict(group="dense", op=op, fmt="bf16", K=k, N=n, M=m, path="triton", config=label, chosen="",
                   split=split, case=case)
        try:
            row["time_us"], row["p20_us"], row["p80_us"] = timer(call)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    row = dict(group="cublas", op=op, fmt="bf16", K=k, N=n, M=m, path="torch.matmul", config="", chosen="",
               split=1, case=case)
    row["time_us"], row["p20_us"], row["p80_us"] = timer(lambda: torch.matmul(x, wt.t(), out=y))
    row["status"] = "ok"
    return rows + [row]


def _warm(job):
    """Compile phase, one worker process per (K, N, M, op, format): every candidate built and run
    once, so that the timing phase (one process, the GPU to itself) loads them from Triton's cache."""
    k, n, m, op, fmt, device = job
    import torch

    import launches
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import heuristics as h

    dev = torch.device(device)
    launches.DTYPE = torch.bfloat16
    try:
        qlk_rows(fm, h, launches, None, dev, fm.target_arch(), fm.num_sms(dev), k, n, m, fmt, op, torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - the timing phase reports it as a row
        return f"{job}: {type(e).__name__}: {e}"
    return None


def _shapes(s, full=False):
    return [tuple(int(v) for v in p.split("->")) for p in s.split(",")] if s else (FULL_SHAPES if full else SHAPES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CSV to write (rewritten after every case: a stopped run keeps its rows)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="", help="comma-separated K->N (default: %s)" % SHAPES)
    ap.add_argument("--ms", default="", help="comma-separated M values (default: %s; --full: %s)" % (MS, FULL_MS))
    ap.add_argument("--full", action="store_true", help="the longer shape and M lists")
    ap.add_argument("--formats", default=",".join(FORMATS), help="bench/launches.py labels (int4g32, nf4dq, ...)")
    ap.add_argument("--ops", default="fwd,dgrad")
    ap.add_argument("--calls", type=int, default=10, help="calls captured per CUDA graph")
    ap.add_argument("--reps", type=int, default=10, help="graph replays (CPU: timed calls)")
    ap.add_argument("--flush-mb", type=int, default=256, help="bytes written before each call (L2 cleared)")
    ap.add_argument("--jobs", type=int, default=0,
                    help="compile every candidate first in this many processes (0: compile while timing)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting cases after this long")
    a = ap.parse_args(argv)

    import torch

    import launches
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import heuristics as h

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's bf16 is wrong
    launches.DTYPE = dtype
    arch, sms = fm.target_arch(), fm.num_sms(dev)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    timer = Timer(dev, a.calls, a.reps, a.flush_mb)
    versions, t0, rows = _versions(), time.time(), []
    ms = [int(m) for m in a.ms.split(",")] if a.ms else (FULL_MS if a.full else MS)
    cases = [(k, n, m, op) for m in ms for (k, n) in _shapes(a.shapes, a.full) for op in a.ops.split(",")]
    if a.jobs:
        import multiprocessing as mp

        jobs = [(k, n, m, op, fmt, a.device) for k, n, m, op in cases for fmt in a.formats.split(",")]
        deadline = t0 + a.budget_s / 2  # what is not compiled by then compiles while it is timed
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            results = pool.imap_unordered(_warm, jobs)
            for _ in jobs:
                try:
                    why = results.next(timeout=max(1.0, deadline - time.time()))
                except mp.TimeoutError:
                    print("gpu_calibrate: compile phase stopped at half the budget", flush=True)
                    break
                if why:
                    print(f"gpu_calibrate: compile phase: {why}", flush=True)
        print(f"gpu_calibrate: compile phase {time.time() - t0:.0f} s", flush=True)
    done = 0
    for k, n, m, op in cases:
        if time.time() - t0 > a.budget_s:
            break
        got = dense_rows(launches, timer, dev, k, n, m, op, dtype)
        for fmt in a.formats.split(","):
            got += qlk_rows(fm, h, launches, timer, dev, arch, sms, k, n, m, fmt, op, dtype)
        for r in got:
            r.update(arch=arch, gpu=gpu, versions=versions)
            print(f"{r['case']:36} {r['config']:22} {r.get('time_us', float('nan')):10.1f} us  {r['status']}", flush=True)
        rows += got
        done += 1
        with open(a.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=FIELDS)
            wr.writeheader()
            wr.writerows(rows)
    print(f"gpu_calibrate: {done} of {len(cases)} cases, {len(rows)} rows, {time.time() - t0:.0f} s -> {a.out}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())

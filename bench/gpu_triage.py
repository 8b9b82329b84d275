"""GPU triage: every candidate tile of every fused op, checked alone against float64, with the
inline-asm dequantization on (as shipped) and off (the Triton twins the interpreter runs); then the
host time of one launch. Run on a GPU machine (one call of the lent machine, about 3 minutes):

    python3 bench/gpu_triage.py --out triage.json --jobs 10

For each (format, shape, op, M, candidate, asm on/off, dtype) the output is poisoned with NaN, the
launch forced to that one candidate (``fused_matmul._tiles`` patched), and
rel_err = ‖out − X·Ŵᵀ‖ / ‖X·Ŵᵀ‖ (or dY·Ŵ) computed against float64 math on Ŵ. A wrong launch prints
one ``WRONG`` line at once; the JSON holds every row. Exit status 1 when any launch was wrong.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FORMATS = {"int4g128": ("int", 4, 128), "int4g32": ("int", 4, 32), "int3g64": ("int", 3, 64),
           "int2g32": ("int", 2, 32), "nf4": ("nf4", 4, 64)}
#: (K, N) -> the M values per op: the bench's wrong layer (Llama-3-8B gate/up), and a small one with
#: ragged tiles (N = 1280 is no multiple of 256, K = 1536 of 1024)
SHAPES = {(4096, 14336): {"fwd": [64, 1024], "splitk": [1, 16], "grad": [64, 1024], "splitn": [1, 16]},
          (1536, 1280): {"fwd": [333], "splitk": [7], "grad": [333], "splitn": [7]}}
PATHS = {"fwd": "gemm", "splitk": "splitk", "grad": "gemm", "splitn": "splitn"}
TOL = 2e-2
DTYPES = None  # set in the worker: bf16 (what training runs)


def _run_job(job):
    fmt_name, k, n, op = job
    import torch

    import qlk
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import heuristics as h

    global DTYPES
    DTYPES = DTYPES or (torch.bfloat16,)

    fmt, bits, gs = FORMATS[fmt_name]
    torch.manual_seed(hash(job) % 2**31)
    dev = torch.device(os.environ.get("TRIAGE_DEVICE", "cuda"))
    w = torch.randn(n, k, device=dev) * 0.02
    qw = qlk.quantize(w, bits=bits, group_size=gs, fmt=fmt)
    w64 = qw.dequantize(torch.float32).double()
    fmtc = h.format_class(bits, fmt == "nf4", gs)
    arch, sms = fm.target_arch(), fm.num_sms(dev)
    path, ms = PATHS[op], SHAPES[(k, n)][op]
    rows = []
    real_tiles, real_interp = fm._tiles, fm.INTERPRETED
    try:
        for m in ms:
            cands = h.score_all(op, m, n, k, fmtc, arch, sms)
            chosen = h.choose_config(op, m, n, k, fmtc, arch, sms)
            for c in cands:
                for asm in (True, False):
                    for dtype in DTYPES:
                        fm._tiles = lambda *a, _c=c, **kw: (_c, [_c])
                        fm.INTERPRETED = not asm
                        row = dict(fmt=fmt_name, k=k, n=n, op=op, m=m, tile=c.label, split=c.split, asm=asm,
                                   dtype=str(dtype).replace("torch.", ""), chosen=c.index == chosen.index)
                        try:
                            if op in ("fwd", "splitk"):
                                x = torch.randn(m, k, device=dev, dtype=dtype)
                                out = torch.full((m, n), float("nan"), device=dev, dtype=dtype)
                                fm.quant_matmul_forward(x, qw, out=out, path=path)
                                ref = x.double() @ w64.t()
                            else:
                                x = torch.randn(m, n, device=dev, dtype=dtype)
                                out = torch.full((m, k), float("nan"), device=dev, dtype=dtype)
                                fm.quant_matmul_grad_input(x, qw, out=out, path=path)
                                ref = x.double() @ w64
                            if dev.type == "cuda":
                                torch.cuda.synchronize()
                            err = ((out.double() - ref).norm() / ref.norm()).item()
                            row["rel_err"] = err if err == err else float("inf")
                            row["nan"] = int(torch.isnan(out).sum().item())
                        except Exception as e:  # noqa: BLE001 - reported as a row
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        bad = "error" in row or row.get("rel_err", 1) > TOL
                        row["ok"] = not bad
                        if bad:
                            print("WRONG", json.dumps(row), flush=True)
                        rows.append(row)
    finally:
        fm._tiles, fm.INTERPRETED = real_tiles, real_interp
    return rows


def _host_time():
    """Host microseconds of one launch (the GPU work is tiny): what a decode step pays per layer."""
    import torch

    import qlk
    from qlk.kernels import fused_matmul as fm

    dev = torch.device("cuda")
    out = {}
    for fmt_name in ("int4g128", "nf4"):
        fmt, bits, gs = FORMATS[fmt_name]
        qw = qlk.quantize(torch.randn(4096, 4096, device=dev) * 0.02, bits=bits, group_size=gs, fmt=fmt)
        for m in (1, 16, 256):
            x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
            for what, fn in (("fwd", lambda: fm.quant_matmul_forward(x, qw)),
                             ("grad", lambda: fm.quant_matmul_grad_input(x, qw))):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(50):
                    fn()
                host = (time.perf_counter() - t0) / 50
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / 50
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                g.replay()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(50):
                    g.replay()
                torch.cuda.synchronize()
                graph = (time.perf_counter() - t0) / 50
                key = f"{fmt_name} {what} M={m}"
                out[key] = dict(host_us=host * 1e6, wall_us=wall * 1e6, graph_us=graph * 1e6)
                print(f"host {key}: host {host*1e6:.1f} us/call, wall {wall*1e6:.1f}, graph replay {graph*1e6:.1f}",
                      flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop waiting for jobs after this long")
    ap.add_argument("--host-only", action="store_true", help="only the host time per launch")
    a = ap.parse_args()
    if a.host_only:
        with open(a.out, "w") as f:
            json.dump(dict(rows=[], host=_host_time()), f)
        return
    jobs = [(f, k, n, op) for (k, n) in SHAPES for f in a.formats.split(",") for op in PATHS]
    t0 = time.time()
    rows, done = [], 0
    pool = mp.get_context("spawn").Pool(a.jobs)
    pending = [pool.apply_async(_run_job, (j,)) for j in jobs]
    for p in pending:
        left = a.budget_s - (time.time() - t0)
        try:
            rows += p.get(timeout=max(left, 0.1))
            done += 1
        except mp.TimeoutError:
            break
    pool.terminate()
    print(f"triage: {done} of {len(jobs)} jobs finished", flush=True)
    bad = [r for r in rows if not r["ok"]]
    print(f"triage: {len(rows)} launches, {len(bad)} wrong, {time.time() - t0:.0f} s", flush=True)
    summary = {}
    for r in bad:
        key = (r["op"], r["fmt"], r["tile"], "asm" if r["asm"] else "twin")
        summary[" ".join(key)] = summary.get(" ".join(key), 0) + 1
    for key, count in sorted(summary.items()):
        print(f"  wrong: {key}: {count}")
    try:
        host = _host_time()
    except Exception as e:  # noqa: BLE001
        host = {"error": f"{type(e).__name__}: {e}"}
    with open(a.out, "w") as f:
        json.dump(dict(rows=rows, host=host), f)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

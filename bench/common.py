"""Shared harness of the qlk benchmarks: timing, ceilings, long-format CSV, environment, summary.

Every benchmark script (``bench_kernels.py``, ``bench_layer.py``, ``bench_e2e.py``) writes rows of
one long-format CSV schema, :data:`FIELDS`::

    bench, provider, op, shape, fmt, M, dtype, metric, p50, p20, p80, unit, status, note,
    gpu, versions, timestamp

* ``metric`` is ``time_ms``, ``tflops``, ``gbps``, ``frac_tensor_peak``, ``frac_bw_peak``,
  ``speedup_vs_<provider>``, ``rel_err``, ``tokens_per_s``, ``peak_mem_gib`` … One row per
  metric: adding a metric never changes the columns.
* ``p50/p20/p80`` are quantiles of the metric itself. For a rate derived from a time (TFLOP/s,
  GB/s) ``p20`` is the rate at the p80 time (the slower runs), so ``p20 <= p50 <= p80`` always.
* ``status`` is ``ok``, or ``unavailable: <reason>`` (import or run failed: the provider stays in
  the table), ``n/a: <reason>`` (the provider has no such format or op), ``wrong: <reason>``
  (the output did not match the reference, timing kept for the record), ``skipped: <reason>``.

Timing (:func:`measure`) on CUDA is ``triton.testing.do_bench``: one untimed call (compilation,
autotuning), an estimate, warm-up, then CUDA-event timings with the L2 cache cleared before each
call; the median and the 20th/80th percentiles are kept. Inputs rotate through several buffers
(:class:`Rotating`) so that consecutive calls never see the same activations.

Nothing in this module touches a GPU at import; the CPU path of :func:`measure` (wall clock) is
there for the smoke test only and says so in its result.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata as _md
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

FIELDS = [
    "bench", "provider", "op", "shape", "fmt", "M", "dtype", "metric", "p50", "p20", "p80", "unit",
    "status", "note", "gpu", "versions", "timestamp",
]  # fmt: skip

#: packages whose versions go into every row (read from metadata: nothing is imported)
VERSIONED = ("qlk", "torch", "triton", "bitsandbytes", "peft", "transformers", "gemlite", "gptq-triton")

#: quantiles asked from do_bench, in the CSV's column order
QUANTILES = (0.5, 0.2, 0.8)


class NoGPUError(RuntimeError):
    """A GPU benchmark was started on a machine without CUDA."""


def require_cuda(what: str) -> torch.device:
    """The CUDA device, or a loud exit: GPU numbers are never faked on a CPU."""
    if not torch.cuda.is_available():
        raise NoGPUError(
            f"{what} measures GPU kernels and needs CUDA; torch {torch.__version__} sees no CUDA device here. "
            "Run it on a GPU machine (bench/gpu_check.sh); the CPU smoke test is tests/test_bench_smoke.py."
        )
    return torch.device("cuda")


# ---- environment -------------------------------------------------------------------------------
def package_version(name: str) -> str:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return "absent"


def capture_env() -> dict:
    """GPU name and properties, CUDA/driver, Python and package versions. Safe without a GPU."""
    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch_cuda": str(torch.version.cuda),
        "packages": {name: package_version(name) for name in VERSIONED},
        "qlk_git": _git_commit(),
    }
    if env["packages"]["qlk"] == "absent":  # run from a checkout that is not pip-installed
        try:
            import qlk

            env["packages"]["qlk"] = f"{qlk.__version__}+src"
        except Exception:  # noqa: BLE001 - the benchmarks report qlk's own failures
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        )
    else:
        env["gpu"] = "none (cpu)"
    return env


def _git_commit() -> str:
    """Short commit of this checkout, '+dirty' when it has uncommitted changes ('' outside git)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if head and dirty else "")


def versions_string(env: dict) -> str:
    pk = env["packages"]
    s = ";".join(f"{k}={v}" for k, v in pk.items() if v != "absent") + f";cuda={env['torch_cuda']}"
    return s + (f";git={env['qlk_git']}" if env.get("qlk_git") else "")


def l2_bytes() -> int:
    if torch.cuda.is_available():
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    return 32 * 2**20


# ---- timing ------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Quantiles of one measurement (milliseconds for times)."""

    p50: float
    p20: float
    p80: float
    timer: str = "cuda-events"

    def scaled(self, numerator: float) -> "Stats":
        """``numerator / time`` as a rate: the quantiles swap (the slow p80 time is the p20 rate)."""
        return Stats(numerator / self.p50, numerator / self.p80, numerator / self.p20, self.timer)


def _quantile(sorted_xs, q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def quantiles(samples) -> Stats:
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("no samples")
    return Stats(*(_quantile(xs, q) for q in QUANTILES), timer="cpu-wallclock")


def measure(fn, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None, device: str | None = None) -> Stats:
    """Time ``fn()`` (no arguments; rotate inputs inside it with :class:`Rotating`).

    CUDA: ``triton.testing.do_bench`` (median, p20, p80 of CUDA-event times, L2 cleared before each
    call). CPU: a wall-clock loop, for the smoke test only (``Stats.timer`` says which).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        import triton.testing

        qs = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        return Stats(*(float(q) for q in qs))
    fn()  # untimed first call, as do_bench does
    samples, t_end = [], time.perf_counter() + rep_ms / 1e3
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end and len(samples) >= 5:
            break
    return quantiles(samples)


class Rotating:
    """Cycle through ``count`` independently drawn inputs so that no call finds the previous
    call's activations in L2. ``make()`` draws one input (a tensor or a tuple of tensors)."""

    def __init__(self, make, count: int):
        if count < 1:
            raise ValueError("count must be >= 1")
        self.items = [make() for _ in range(count)]
        self.i = -1

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]

    @staticmethod
    def count_for(nbytes_each: int, l2: int | None = None, max_count: int = 8) -> int:
        """Enough buffers to span twice the L2, between 2 and ``max_count``."""
        l2 = l2 if l2 is not None else l2_bytes()
        return max(2, min(max_count, math.ceil(2 * l2 / max(1, nbytes_each))))


def randn(*shape, dtype=torch.bfloat16, device="cuda", std: float = 1.0) -> torch.Tensor:
    """Gaussian data (never zeros: zeros hide unwritten outputs and run faster)."""
    x = torch.randn(*shape, device=device, dtype=dtype)
    return x.mul_(std) if std != 1.0 else x


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or Inf anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


# ---- ceilings ----------------------------------------------------------------------------------
def _time_copy(n: int, warmup_ms: float, rep_ms: float) -> Stats:
    src = randn(n)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), warmup_ms, rep_ms)


def _time_matmul(size: int, warmup_ms: float, rep_ms: float) -> Stats:
    a, b = randn(size, size), randn(size, size)
    return measure(lambda: torch.matmul(a, b), warmup_ms, rep_ms)


def measure_ceilings(warmup_ms: float = 25, rep_ms: float = 100, copy_gib: float = 1.0, mm_size: int = 8192) -> dict:
    """Measured in the same run as the kernels: DRAM copy GB/s (bytes read + written) and the
    bf16 tensor rate of cuBLAS (``mm_size``³, random data)."""
    n = int(copy_gib * 2**30) // 2
    copy = _time_copy(n, warmup_ms, rep_ms).scaled(2 * n * 2 / 1e6)  # bytes / ms / 1e6 = GB/s
    mm = _time_matmul(mm_size, warmup_ms, rep_ms).scaled(2 * mm_size**3 / 1e9)  # flop / ms / 1e9 = TFLOP/s
    torch.cuda.empty_cache()
    return {"copy_gbps": copy, "matmul_tflops": mm, "copy_gib": copy_gib, "mm_size": mm_size}


# ---- CSV ---------------------------------------------------------------------------------------
class ResultWriter:
    """Appends long-format rows to ``path`` (header written once), flushing every row so that a
    run killed at its time limit keeps what it measured. Also keeps the rows in ``self.rows``."""

    def __init__(self, path: str | None, bench: str, env: dict | None = None):
        self.bench = bench
        self.env = env if env is not None else capture_env()
        self.rows: list[dict] = []
        self.wrong: list[dict] = []  # rows whose status says the result did not match its reference
        self._fh = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            self._fh = open(path, "a", newline="")
            self._csv = csv.DictWriter(self._fh, fieldnames=FIELDS)
            if new:
                self._csv.writeheader()

    def row(self, *, provider, op="", shape="", fmt="", M="", dtype="", metric="status", value=None,
            unit="", status="ok", note="") -> dict:  # fmt: skip
        if isinstance(value, Stats):
            p50, p20, p80 = value.p50, value.p20, value.p80
            if value.timer != "cuda-events":
                note = (note + "; " if note else "") + f"timer={value.timer}"
        elif value is None:
            p50 = p20 = p80 = ""
        else:
            p50, p20, p80 = value, "", ""
        r = {
            "bench": self.bench, "provider": provider, "op": op, "shape": shape, "fmt": fmt, "M": M,
            "dtype": dtype, "metric": metric, "p50": _fmt(p50), "p20": _fmt(p20), "p80": _fmt(p80),
            "unit": unit, "status": status, "note": note, "gpu": self.env.get("gpu", ""),
            "versions": versions_string(self.env), "timestamp": self.env["timestamp"],
        }  # fmt: skip
        self.rows.append(r)
        if str(status).startswith("wrong"):
            self.wrong.append(r)
        if self._fh:
            self._csv.writerow(r)
            self._fh.flush()
        return r

    def status(self, provider: str, status: str, **keys) -> dict:
        """A row that only says why there is no number (unavailable / n/a / skipped)."""
        return self.row(provider=provider, metric="status", status=status, **keys)

    def timing(self, provider: str, t: Stats, *, flops: float = 0, nbytes: float = 0, ceilings: dict | None = None,
               status="ok", note="", **keys) -> None:  # fmt: skip
        """time_ms plus, where known, TFLOP/s, effective GB/s and fractions of the measured ceilings."""
        self.row(provider=provider, metric="time_ms", value=t, unit="ms", status=status, note=note, **keys)
        rates = (  # amount per ms -> unit, the fraction's metric and the ceiling it is measured against
            (flops / 1e9, "tflops", "TFLOP/s", "frac_tensor_peak", "matmul_tflops"),
            (nbytes / 1e6, "gbps", "GB/s", "frac_bw_peak", "copy_gbps"),
        )
        for per_ms, metric, unit, frac_metric, ceiling in rates:
            if not per_ms:
                continue
            rate = t.scaled(per_ms)
            self.row(provider=provider, metric=metric, value=rate, unit=unit, status=status, **keys)
            if ceilings:
                self.row(provider=provider, metric=frac_metric, value=_frac(rate, ceilings[ceiling].p50),
                         status=status, **keys)  # fmt: skip

    def ceilings(self, c: dict) -> None:
        self.row(provider="ceiling", op="copy", shape=f"{c['copy_gib']}GiB", dtype="bf16", metric="gbps",
                 value=c["copy_gbps"], unit="GB/s", note="device-to-device copy, bytes read + written")  # fmt: skip
        n = c["mm_size"]
        self.row(provider="ceiling", op="matmul", shape=f"{n}x{n}x{n}", dtype="bf16", metric="tflops",
                 value=c["matmul_tflops"], unit="TFLOP/s", note="torch.matmul (cuBLAS), random data")  # fmt: skip

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


def _frac(s: Stats, peak: float) -> Stats:
    return Stats(s.p50 / peak, s.p20 / peak, s.p80 / peak, s.timer)


def _fmt(v) -> str:
    if v == "" or v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_csv(*paths: str) -> list[dict]:
    rows = []
    for p in paths:
        if p and os.path.exists(p):
            with open(p, newline="") as fh:
                rows.extend(csv.DictReader(fh))
    return rows


def speedup_rows(writer: ResultWriter, times: dict, baseline: str, peers_of=None) -> None:
    """Ratio rows from ``times[(provider, op, shape, fmt, M, dtype)] = Stats``.

    Every provider gets ``speedup_vs_<baseline>`` (t_baseline / t, >1 = faster), against the
    baseline's time for the same (op, shape, M) whatever its format. ``peers_of(provider)`` names
    the providers a provider is also compared with, in the same format.
    """
    base = {(op, shape, M): t for (p, op, shape, fmt, M, dt), t in times.items() if p == baseline}
    for (p, op, shape, fmt, M, dt), t in times.items():
        if p == baseline:
            continue
        keys = dict(op=op, shape=shape, fmt=fmt, M=M, dtype=dt)
        b = base.get((op, shape, M))
        if b is not None:
            writer.row(provider=p, metric=f"speedup_vs_{baseline}", value=_ratio(b, t), unit="x", **keys)
        for q in peers_of(p) if peers_of else ():
            tq = times.get((q, op, shape, fmt, M, dt)) or next(
                (v for (pp, o, s, f, m, _), v in times.items() if (pp, o, s, f, m) == (q, op, shape, fmt, M)), None
            )
            if tq is not None:
                writer.row(provider=p, metric=f"speedup_vs_{q}", value=_ratio(tq, t), unit="x", **keys)


def _ratio(base: Stats, t: Stats) -> Stats:
    """base.p50 / t at each quantile of t (the ratio's spread is the measured one's)."""
    return Stats(base.p50 / t.p50, base.p50 / t.p80, base.p50 / t.p20, t.timer)


# ---- budget ------------------------------------------------------------------------------------
class Budget:
    """A wall-clock budget: benchmarks stop starting new measurements once it is spent, and say so
    in a ``skipped`` row, so a run fits one call of the GPU machine."""

    def __init__(self, seconds: float | None):
        self.deadline = None if not seconds else time.monotonic() + seconds
        self.reported = False

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def report_once(self, writer: ResultWriter, what: str) -> None:
        if not self.reported:
            writer.status("harness", f"skipped: time budget spent before {what}; rerun with a subset or more --budget-s")
            self.reported = True


def short_reason(e: BaseException, limit: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def parse_list(s: str | None, cast=str) -> list | None:
    return None if s is None else [cast(v.strip()) for v in s.split(",") if v.strip()]


# ---- summary -----------------------------------------------------------------------------------
def _num(r: dict, key: str = "p50"):
    try:
        return float(r[key])
    except (KeyError, ValueError):
        return None


def summary_markdown(rows: list[dict]) -> str:
    """Markdown tables from long-format rows of any of the three benchmarks."""
    out = []
    if rows:
        r0 = rows[0]
        out.append(f"GPU: {r0['gpu']} — {r0['versions']} — {r0['timestamp']}\n")
    ceil = [r for r in rows if r["provider"] == "ceiling" and r["status"] == "ok"]
    if ceil:
        out.append("Ceilings measured in this run: " + ", ".join(
            f"{r['op']} {float(r['p50']):.0f} {r['unit']}" for r in ceil[:2]) + "\n")  # fmt: skip
    for bench, fn in (("kernels", _kernel_tables), ("layer", _layer_table), ("e2e", _e2e_table)):
        sub = [r for r in rows if r["bench"] == bench]
        if sub:
            out.append(fn(sub))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        seen, lines = set(), []
        for r in bad:
            key = (r["bench"], r["provider"], r["fmt"], r["op"], r["status"])
            if key not in seen:
                seen.add(key)
                what = " ".join(x for x in (r["fmt"], r["op"]) if x)
                lines.append(f"- {r['bench']}/{r['provider']}{(' ' + what) if what else ''}: {r['status']}")
        out.append("### Not measured, and why\n" + "\n".join(lines[:60]) + "\n")
    return "\n".join(out) if out else "no rows\n"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _kernel_tables(rows: list[dict]) -> str:
    """Per op: rows (shape, fmt, M), columns: cuBLAS µs, then each provider's speedup vs cuBLAS."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]
    base = {(r["op"], r["shape"], r["M"]): _num(r) for r in ok if r["provider"] == "cublas" and r["metric"] == "time_ms"}
    sp = [r for r in ok if r["metric"] == "speedup_vs_cublas"]
    for op in sorted({r["op"] for r in sp}):
        sub = [r for r in sp if r["op"] == op]
        provs = sorted({r["provider"] for r in sub})
        keys = sorted({(r["shape"], r["fmt"], int(r["M"])) for r in sub}, key=lambda k: (_shape_key(k[0]), k[1], k[2]))
        cell = {(r["shape"], r["fmt"], int(r["M"]), r["provider"]): _num(r) for r in sub}
        body = []
        for s, f, m in keys:
            b = base.get((op, s, str(m)))
            body.append([s, f, str(m), f"{b * 1e3:.1f}" if b else "—"] +
                        [f"{cell[(s, f, m, p)]:.2f}" if (s, f, m, p) in cell else "—" for p in provs])  # fmt: skip
        out.append(f"### Kernels, op `{op}`: speedup vs cuBLAS bf16 (t_cublas / t, median; >1 is faster)\n")
        out.append(_table(["shape (K->N)", "format", "M", "cuBLAS µs"] + provs, body))
    return "\n".join(out)


def _shape_key(shape: str):
    try:
        return tuple(int(v) for v in shape.split("->"))
    except ValueError:
        return (0, 0)


def _layer_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    t = {(r["shape"], int(r["M"]), r["provider"], r["fmt"]): r for r in ok if r["metric"] == "time_ms"}
    mem = {(r["shape"], int(r["M"]), r["provider"], r["fmt"]): r for r in ok if r["metric"] == "peak_mem_gib"}
    provs = sorted({(k[2], k[3]) for k in t})
    keys = sorted({(k[0], k[1]) for k in t}, key=lambda k: (_shape_key(k[0]), k[1]))
    body = []
    for s, m in keys:
        ref = t.get((s, m, "peft_bnb_nf4", "nf4"))
        row = [s, str(m)]
        for p, f in provs:
            r = t.get((s, m, p, f))
            if r is None:
                row.append("—")
                continue
            txt = f"{float(r['p50']):.3f}"
            if ref is not None:
                txt += f" ({float(ref['p50']) / float(r['p50']):.2f}×)"
            mm = mem.get((s, m, p, f))
            if mm is not None:
                txt += f", {float(mm['p50']):.2f} GiB"
            row.append(txt)
        body.append(row)
    head = "### Layer step (fwd + bwd, adapter grads): ms (speedup vs PEFT-LoRA on bnb Linear4bit), peak memory\n"
    return head + _table(["shape (K->N)", "M"] + [f"{p} {f}" for p, f in provs], body)


def _e2e_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    by = {}
    for r in ok:
        by.setdefault((r["provider"], r["fmt"], r["shape"]), {})[r["metric"]] = r
    ref = next((v for (p, f, s), v in by.items() if p == "hf_peft_bnb"), None)
    body = []
    for (p, f, s), v in sorted(by.items()):
        tps = v.get("tokens_per_s")
        mem = v.get("peak_mem_gib")
        rel = ""
        if tps and ref and ref.get("tokens_per_s"):
            rel = f"{float(tps['p50']) / float(ref['tokens_per_s']['p50']):.2f}×"
        body.append([p, f, s, f"{float(tps['p50']):.0f}" if tps else "—", rel, f"{float(mem['p50']):.2f}" if mem else "—"])
    head = "### Training step, Llama-architecture model from a config (random weights)\n"
    return head + _table(["provider", "format", "model / tokens", "tokens/s", "vs HF+PEFT+bnb", "peak GiB"], body)


# ---- the shared entry of the GPU benchmark scripts ----------------------------------------------
def default_out(kind: str) -> str:
    """bench/results/<kind>-<timestamp>.csv"""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "results", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.csv")


def run_benchmark(kind: str, args, run) -> int:
    """Needs CUDA; seeds, opens the CSV writer at ``args.out``, runs ``run(args, writer)`` and always
    closes the file (rows measured before a failure or a time limit are kept). Returns 1 (the
    script's exit status) when any row was written with a ``wrong: ...`` status — a result that
    did not match its float64 reference — else 0."""
    script = f"bench_{kind}.py"
    require_cuda(script)
    torch.manual_seed(0)
    writer = ResultWriter(args.out, kind)
    print(f"[bench_{kind}] {writer.env['gpu']}; writing {args.out}", flush=True)
    t0 = time.monotonic()
    try:
        run(args, writer)
    finally:
        writer.close()
    print(f"[bench_{kind}] done in {time.monotonic() - t0:.0f} s: {args.out}", flush=True)
    if writer.wrong:
        for r in writer.wrong:
            print(f"[bench_{kind}] WRONG RESULT: {r['provider']} {r['op']} {r['shape']} {r['fmt']} M={r['M']}: "
                  f"{r['status']}", file=sys.stderr, flush=True)
        print(f"[bench_{kind}] {len(writer.wrong)} result(s) did not match the float64 reference", file=sys.stderr)
        return 1
    return 0

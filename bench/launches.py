"""Every qlk kernel launcher, once per benchmark case, on CPU tensors: the input of the static report.

Run it under qlk's static analyzer (bench/sass), which compiles each launch for sm_90 / sm_80 and
runs nothing; outputs hold garbage, so nothing here reads an output:

    TRITON_INTERPRET= python -m bench.sass bench/launches.py --arch 90,80 -- --quick --cases 'dense-*'
    python bench/launches.py --list                 # the cases, and which are available

(flags after ``--`` go to this script; $QLK_LAUNCHES_ARGS is read too.) For the report files,
bench/static_report.py runs these cases, the peers' and the analyzer together.

This file also tells the analyzer what it cannot read from machine code: how many times one CTA
runs each qlk kernel's main loop (:func:`declare_loops`).

Cases (Llama-3-8B layer shapes K→N: 4096→4096, 4096→14336, 14336→4096; M ∈ {1, 16, 256, 4096}):

    dense-fwd, dense-dgrad   bench/dense_matmul.py (bf16 X·Wᵀ and dY·W), the baseline
    fwd, dgrad               qlk.kernels.quant_matmul_forward / quant_matmul_backward (path="fused") per format
                             (INT4 g32, INT4 g128, INT3 g128, INT2 g32, NF4 + double quant);
                             at M ≤ 16 the forward is the decode path (qlk dispatches by M)
    decode                   only if qlk.kernels grows a separate decode entry point
    qalora                   qlk.kernels.qalora_forward (QA-LoRA: folded biases + in-GEMM pooling), INT formats
    qalora-dgrad             qlk.kernels.qalora_grad_input (dY·Ŵ on the folded biases + V = dY·B)
    dequant                  qlk.kernels.dequantize (no M)
    fwd-splitk, dgrad-splitn 16 < M <= 128: the split kernels (path="splitk" / "splitn") next to the GEMMs
    dgrad-gemv               M = 1 only: quant_matmul_backward(path="gemv"), the FMA kernel, next to the
                             split-N MMA kernel of ``dgrad`` (which of the two "auto" runs: qlk.kernels.heuristics)

A launcher qlk does not have (yet) becomes a case with ``unavailable = "not available: ..."``; a
launcher that raises is recorded as ``failed: ...``. Neither stops the run. Names:
``<op>/<fmt>/<K>-><N>/M<m>``, e.g. ``fwd/int4g128/4096->14336/M4096``; ``--cases`` takes
comma-separated shell patterns over them (``'dense-*,fwd/int4*'``).
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import os
import re
import shlex
import sys
import traceback
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from bench import sass  # noqa: E402

#: K (in_features) -> N (out_features) of Llama-3-8B's linear layers
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
MS = (1, 16, 256, 4096)
QUICK_SHAPES = ((4096, 14336),)
QUICK_MS = (4096, 1)
#: ``--family``: K→N of every Llama-family linear layer from 1B to 70B, GQA k/v projections included
#: (Llama-3.2-1B: hidden 2048, kv 512, MLP 8192; Llama-3.2-3B: 3072, kv 1024, MLP 8192;
#: Llama-3-8B: 4096, kv 1024, MLP 14336; Llama-3-70B:
#: 8192, kv 1024, MLP 28672), and M from one token to a long-sequence batch. Opt-in: compiling all of
#: it takes long (about 1,700 cases per arch, qalora and dequant included).
FAMILY_SHAPES = (
    (2048, 2048), (2048, 512), (2048, 8192), (8192, 2048),
    (3072, 3072), (3072, 1024), (3072, 8192), (8192, 3072),
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096),
    (8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192),
)
FAMILY_MS = (1, 16, 333, 2048, 8192)
#: ``--shapes other``: layers of model families the rules were not fitted on (K→N; Qwen2.5-7B: hidden
#: 3584, kv 512, MLP 18944; Mistral-Nemo-12B: 5120, q 4096, kv 1024, MLP 14336; Gemma-2-2B: 2304,
#: MLP 9216; Phi-2: 2560, MLP 10240), for the out-of-family check (bench/results/static-other-sm*)
OTHER_SHAPES = (
    (3584, 3584), (3584, 512), (3584, 18944), (18944, 3584),
    (5120, 4096), (5120, 1024), (5120, 14336), (14336, 5120),
    (2304, 9216), (9216, 2304), (2560, 10240), (10240, 2560),
)
#: the rules' sweep (bench/results/static-family-sm*.md): ``--family --ms 1,16,64,333,2048,8192 --cases 'fwd/*,dgrad/*'``
FAMILY_SWEEP_MS = (1, 16, 64, 333, 2048, 8192)
#: ``fwd-splitk`` / ``dgrad-splitn`` cases (the split kernels at 16 < M <= this, where the dispatcher
#: weighs them against the GEMMs)
SPLIT_ALT_MAX_M = 128
DTYPE = torch.bfloat16

def format_spec(label: str) -> dict:
    """Keyword arguments of qlk.quantize for a format label: ``int<bits>g<group>`` (e.g. int3g32),
    ``nf4dq`` (NF4, double-quantized absmax) or ``nf4`` (NF4, fp32 absmax)."""
    m = re.fullmatch(r"int([234])g(\d+)", label)
    if m:
        return dict(bits=int(m.group(1)), group_size=int(m.group(2)))
    if label in ("nf4dq", "nf4"):
        return dict(fmt="nf4", double_quant=label == "nf4dq")
    raise KeyError(f"format {label!r}: expected int<2|3|4>g<group> (e.g. int4g64), nf4dq or nf4")


class _Formats(dict):
    """label -> qlk.quantize keyword arguments; a label not listed (``--formats int3g32``, or a CSV
    written with one) is parsed, not stored, so reports of other formats render too and the listed
    five stay the ones every report's tables are laid out by."""

    def __missing__(self, label):
        return format_spec(label)


#: format label -> keyword arguments of qlk.quantize (the committed reports' formats)
FORMATS = _Formats({
    "int4g32": dict(bits=4, group_size=32),
    "int4g128": dict(bits=4, group_size=128),
    "int3g128": dict(bits=3, group_size=128),
    "int2g32": dict(bits=2, group_size=32),
    "nf4dq": dict(fmt="nf4", double_quant=True),
})


def is_qalora_format(label: str) -> bool:
    """QA-LoRA runs on the INT formats."""
    return FORMATS[label].get("fmt", "int") == "int"
QALORA_RANK = 16

#: candidate entry points in qlk.kernels, first found wins (the module is still being written)
DECODE_NAMES = ("quant_matmul_decode", "quant_gemv", "quant_matvec", "decode_matmul", "gemv")
QALORA_NAMES = ("qalora_forward",)  # qlk.kernels.qalora_forward(x, qw, lora_a, lora_b, scaling, bias=None)
QALORA_GRAD_NAMES = ("qalora_grad_input",)  # (dy, qw, lora_a, lora_b, scaling) -> (dx, v)

#: the case being launched right now (read by a report that captures the whole script at once)
CURRENT_CASE: Optional[str] = None


@dataclasses.dataclass
class Case:
    """One launch of one launcher at one shape. ``run()`` launches (under a capture, compiles)."""

    name: str
    group: str  # "dense", "qlk" or "peer:<name>"
    op: str
    fmt: str
    k: int
    n: int
    m: Optional[int]
    launch: Optional[Callable[[], object]] = None
    unavailable: Optional[str] = None  # "not available: <reason>" when there is nothing to launch

    def run(self) -> None:
        global CURRENT_CASE
        if self.unavailable:
            raise RuntimeError(self.unavailable)
        CURRENT_CASE = self.name
        try:
            self.launch()
        finally:
            CURRENT_CASE = None


def declare_loops() -> None:
    """Main-loop trips per CTA of the qlk kernels whose loop is not ``range(0, K, BLOCK_K)``: the
    split kernels divide their reduction over grid axis 1, the input gradients reduce over N."""
    split = lambda L: L.grid[1] if L.grid and len(L.grid) > 1 else 1  # noqa: E731
    sass.declare("_quant_matmul_splitk_kernel", iterations=lambda L: sass.reduction_trips(L, "K", ("BLOCK_K",), split(L)))
    # the forward GEMM: split over K on grid axis 1 at mid M (round 6; slices of SLICE_K columns, whole
    # groups, so not always ⌈K tiles / split⌉; split 1: all of K)
    sass.declare("_quant_matmul_fwd_kernel",
                 iterations=lambda L: sass.reduction_trips(L, "SLICE_K" if split(L) > 1 else "K", ("BLOCK_K",)))
    # the GEMM input gradient: split over N on grid axis 1 at mid M (round 5; split 1: all of N)
    sass.declare("_quant_matmul_grad_input_kernel",
                 iterations=lambda L: sass.reduction_trips(L, "N", ("BLOCK_N",), split(L)))
    sass.declare("_quant_matmul_grad_input_splitn_kernel",
                 iterations=lambda L: sass.reduction_trips(L, "N", ("BLOCK_N",), split(L)))
    sass.declare("_quant_matmul_grad_input_gemv_kernel",
                 iterations=lambda L: sass.reduction_trips(L, "N", ("BLOCK_N",), split(L)))
    sass.declare("_fold_bias_kernel", iterations=lambda L: int(L.scalars["R"]))


declare_loops()


def case_name(op: str, fmt: str, k: int, n: int, m: Optional[int]) -> str:
    return f"{op}/{fmt}/{k}->{n}" + ("" if m is None else f"/M{m}")


# ---------------------------------------------------------------- inputs (cached per shape / format)
@functools.lru_cache(maxsize=None)
def dense_weight(n: int, k: int) -> torch.Tensor:
    return torch.empty(n, k, dtype=DTYPE)  # values never read: nothing runs


@functools.lru_cache(maxsize=None)
def _random_weight(n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 100003 + k)
    return (torch.randn(n, k, generator=g) * 0.02).to(DTYPE)


@functools.lru_cache(maxsize=None)
def quantized_weight(fmt: str, n: int, k: int):
    """qlk.quantize of a random [n, k] weight (some seconds on CPU for 14336×4096; cached)."""
    import qlk

    return qlk.quantize(_random_weight(n, k), **FORMATS[fmt])


def activation(m: int, k: int) -> torch.Tensor:
    return torch.empty(m, k, dtype=DTYPE)


def _selected(name: str, patterns) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------- the cases
def dense_cases(shapes, ms):
    from dense_matmul import dense_matmul

    for k, n in shapes:
        for m in ms:
            yield Case(case_name("dense-fwd", "bf16", k, n, m), "dense", "fwd", "bf16", k, n, m,
                       lambda m=m, k=k, n=n: dense_matmul(activation(m, k), dense_weight(n, k)))
            # dX = dY·W: W [N, K] read through its transpose, no copy
            yield Case(case_name("dense-dgrad", "bf16", k, n, m), "dense", "dgrad", "bf16", k, n, m,
                       lambda m=m, k=k, n=n: dense_matmul(activation(m, n), dense_weight(n, k).t()))


def _qlk_kernels():
    """(module, None) or (None, reason)."""
    try:
        import qlk.kernels as kernels
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        return None, f"import qlk.kernels failed: {type(e).__name__}: {e}"
    return kernels, None


def _entry(kernels, names):
    """(function, None) or (None, 'not available: ...') for the first of ``names`` in qlk.kernels."""
    if kernels is None:
        return None, None
    for name in names:
        fn = getattr(kernels, name, None)
        if callable(fn):
            return fn, None
    return None, f"not available: qlk.kernels has none of {', '.join(names)}"


def qlk_cases(shapes, ms, formats):
    kernels, why = _qlk_kernels()
    missing = f"not available: {why}" if why else None
    # the fused kernels whatever qlk's dispatcher would pick (its dequantize path is a dequant case
    # plus a dense one; the report puts the dispatcher's pick next to both)
    fwd, why_fwd = _entry(kernels, ("quant_matmul_forward",))
    dgrad, why_dgrad = _entry(kernels, ("quant_matmul_backward",))
    gemv = functools.partial(dgrad, path="gemv") if dgrad else None
    splitk = functools.partial(fwd, path="splitk") if fwd else None
    splitn = functools.partial(dgrad, path="splitn") if dgrad else None
    # M <= 16 "fused" (the split kernels; NF4 at M = 1 maybe the FMA kernel), above the GEMM: the split
    # kernels' cases at 16 < M <= SPLIT_ALT_MAX_M sit next to it
    fwd = _by_m(functools.partial(fwd, path="fused"), functools.partial(fwd, path="gemm")) if fwd else None
    dgrad = _by_m(functools.partial(dgrad, path="fused"), functools.partial(dgrad, path="gemm")) if dgrad else None
    dequant, why_deq = _entry(kernels, ("dequantize",))
    decode, _ = _entry(kernels, DECODE_NAMES)
    qalora, why_qalora = _entry(kernels, QALORA_NAMES)
    qalora_grad, why_qalora_grad = _entry(kernels, QALORA_GRAD_NAMES)

    for fmt in formats:
        for k, n in shapes:
            for m in ms:
                yield Case(case_name("fwd", fmt, k, n, m), "qlk", "fwd", fmt, k, n, m,
                           lambda m=m, k=k, n=n, fmt=fmt: fwd(activation(m, k), quantized_weight(fmt, n, k)),
                           missing or why_fwd)
                yield Case(case_name("dgrad", fmt, k, n, m), "qlk", "dgrad", fmt, k, n, m,
                           lambda m=m, k=k, n=n, fmt=fmt: dgrad(activation(m, n), quantized_weight(fmt, n, k)),
                           missing or why_dgrad)
                if 16 < m <= SPLIT_ALT_MAX_M:  # the split kernels past their default range, next to the GEMMs
                    yield Case(case_name("fwd-splitk", fmt, k, n, m), "qlk", "fwd-splitk", fmt, k, n, m,
                               lambda m=m, k=k, n=n, fmt=fmt: splitk(activation(m, k), quantized_weight(fmt, n, k)),
                               missing or why_fwd)
                    yield Case(case_name("dgrad-splitn", fmt, k, n, m), "qlk", "dgrad-splitn", fmt, k, n, m,
                               lambda m=m, k=k, n=n, fmt=fmt: splitn(activation(m, n), quantized_weight(fmt, n, k)),
                               missing or why_dgrad)
                if m == 1 and gemv is not None:  # the M = 1 input gradient's other kernel (FMAs, no MMA)
                    yield Case(case_name("dgrad-gemv", fmt, k, n, m), "qlk", "dgrad-gemv", fmt, k, n, m,
                               lambda m=m, k=k, n=n, fmt=fmt: gemv(activation(m, n), quantized_weight(fmt, n, k)),
                               missing)
                if m <= 16 and decode is not None:  # else fwd at small M is the decode path (split-K)
                    yield Case(case_name("decode", fmt, k, n, m), "qlk", "decode", fmt, k, n, m,
                               lambda m=m, k=k, n=n, fmt=fmt: decode(activation(m, k), quantized_weight(fmt, n, k)),
                               missing)
                if is_qalora_format(fmt):
                    yield Case(case_name("qalora", fmt, k, n, m), "qlk", "qalora", fmt, k, n, m,
                               lambda m=m, k=k, n=n, fmt=fmt: _run_qalora(qalora, m, k, n, fmt),
                               missing or why_qalora)
                    yield Case(case_name("qalora-dgrad", fmt, k, n, m), "qlk", "qalora-dgrad", fmt, k, n, m,
                               lambda m=m, k=k, n=n, fmt=fmt: _run_qalora(qalora_grad, m, n, n, fmt, k=k),
                               missing or why_qalora_grad)
            yield Case(case_name("dequant", fmt, k, n, None), "qlk", "dequant", fmt, k, n, None,
                       lambda k=k, n=n, fmt=fmt: dequant(quantized_weight(fmt, n, k), DTYPE),
                       missing or why_deq)


def _by_m(small, large):
    """``small`` for activations of ≤ 16 rows, ``large`` above."""
    return lambda a, qw: (small if a.shape[0] <= 16 else large)(a, qw)


def _run_qalora(fn, m, width, n, fmt, k=None):
    """Y = X·Ŵᵀ + σ·P(X)·Aᵀ·Bᵀ with A [r, K/g], B [N, r] (docs/design.md), or its input gradient (then
    the activation is dY [m, N]); signature as qlk's entry points. ``width``: the activation's last dim."""
    k = width if k is None else k
    qw = quantized_weight(fmt, n, k)
    g = qw.group_size
    a = torch.empty(QALORA_RANK, k // g, dtype=DTYPE)
    b = torch.empty(n, QALORA_RANK, dtype=DTYPE)
    # "fused": the fused QA-LoRA kernels whatever the dispatcher would pick (on a GPU, path "auto" runs
    # dequantize + dense GEMMs above M = 16 since round 35, fused_matmul.FUSED_GEMM_AUTO)
    return fn(activation(m, width), qw, a, b, 2.0, path="fused")


def all_cases(quick: bool = False, patterns=(), include_qlk: bool = True, include_dense: bool = True,
              family: bool = False, ms=None, shapes=None, formats=None):
    """The selected cases, in report order: dense baseline, then qlk. ``family``: the Llama-family
    shapes and Ms (:data:`FAMILY_SHAPES`, :data:`FAMILY_MS`) instead of Llama-3-8B's. ``ms``: these
    M values instead (e.g. :data:`FAMILY_SWEEP_MS`). ``shapes``: these (K, N) instead of the set's
    (the out-of-family check: layers of other model families, :data:`OTHER_SHAPES`). ``formats``: these
    format labels (:func:`format_spec`) instead of :data:`FORMATS`."""
    shapes_, ms_ = (QUICK_SHAPES, QUICK_MS) if quick else (FAMILY_SHAPES, FAMILY_MS) if family else (SHAPES, MS)
    shapes = shapes_ if not shapes else tuple(shapes)
    ms = ms_ if not ms else tuple(ms)
    out = []
    if include_dense:
        out += dense_cases(shapes, ms)
    if include_qlk:
        out += qlk_cases(shapes, ms, tuple(formats) if formats else tuple(FORMATS))
    return [c for c in out if _selected(c.name, patterns)]


def _ms(s: str):
    """``--ms`` "1,16,64" -> (1, 16, 64); empty -> None (the set's own)."""
    return tuple(int(x) for x in s.split(",") if x.strip()) or None


def _formats(s: str):
    """``--formats`` "int3g32,nf4" -> ("int3g32", "nf4"), each checked (:func:`format_spec`); empty ->
    None (:data:`FORMATS`)."""
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    for label in out:
        try:
            FORMATS[label]
        except KeyError as e:
            raise SystemExit(f"--formats: {e.args[0]}") from None
    return out or None


def _shapes(s: str):
    """``--shapes`` "3584->18944,5120->1024" (or "other": :data:`OTHER_SHAPES`) -> ((K, N), ...);
    empty -> None (the set's own)."""
    if s.strip() == "other":
        return OTHER_SHAPES
    out = []
    for part in (x.strip() for x in s.split(",") if x.strip()):
        k, sep, n = part.partition("->")
        if not sep or not k.isdigit() or not n.isdigit():
            raise SystemExit(f"--shapes: {part!r} is not K->N (e.g. 3584->18944)")
        out.append((int(k), int(n)))
    return tuple(out) or None


def run_case(case: Case) -> Optional[str]:
    """Launch one case. None when it launched; else 'not available: ...' or 'failed: ...'."""
    if case.unavailable:
        return case.unavailable
    try:
        case.run()
    except Exception as e:  # noqa: BLE001 - reported per case, the run goes on
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
        msg = " ".join(str(e).split())[:300]
        return f"failed: {type(e).__name__}: {msg}{where}"
    return None


def parse_args(argv=None):
    """Flags from the command line, then from $QLK_LAUNCHES_ARGS (for runners that pass a script no arguments)."""
    if argv is None:
        argv = sys.argv[1:] + shlex.split(os.environ.get("QLK_LAUNCHES_ARGS", ""))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="M=4096 and M=1 on 4096->14336 only")
    ap.add_argument("--cases", default="", help="comma-separated shell patterns over case names")
    ap.add_argument("--family", action="store_true", help="Llama-family shapes 1B..70B and M in 1..8192")
    ap.add_argument("--ms", default="", help="comma-separated M values instead of the set's own")
    ap.add_argument("--shapes", default="", help="comma-separated K->N shapes instead of the set's own "
                    "('other': layers of other model families)")
    ap.add_argument("--list", action="store_true", help="print the cases and their availability, launch nothing")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    patterns = [p for p in args.cases.split(",") if p]
    cases = all_cases(args.quick, patterns, family=args.family, ms=_ms(args.ms), shapes=_shapes(args.shapes))
    if not cases:
        print(f"no case matches --cases {args.cases!r}", file=sys.stderr)
        return 2
    for case in cases:
        if args.list:
            print(f"{case.name:40} {case.unavailable or 'available'}")
            continue
        status = run_case(case)
        print(f"{case.name:40} {status or 'launched'}", flush=True)
    return 0


if __name__ == "__main__":
    # no sys.exit on success: under an analyzer that runs this file with runpy, SystemExit ends it early
    rc = main()
    if rc:
        sys.exit(rc)

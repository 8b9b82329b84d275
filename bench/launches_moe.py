"""The grouped (mixture-of-experts) kernel launches, once per case, on CPU tensors: static-report input.

Like bench/launches.py (same Case / flags / output; run it under the static analyzer, which
compiles each launch for sm_90 / sm_80 and runs nothing; tensors hold garbage):

    TRITON_INTERPRET= python <analyzer> bench/launches_moe.py --arch 90
    python bench/launches_moe.py --list

Layers (E experts, top-k routing, T tokens -> S = T·k routed rows, spread evenly over the experts):

    mixtral   Mixtral-8x7B-like:   H = 4096, I = 14336, E = 8,   top-2
    qwen3     Qwen3-30B-A3B-like:  H = 2048, I = 768,   E = 128, top-8

Projections: ``gate_up`` (K = H -> N = 2I) and ``down`` (K = I -> N = H); T ∈ {4096, 16, 1}.

Cases:
    dense-grouped-fwd, dense-grouped-dgrad   bench/dense_grouped_matmul.py, bf16 (the baseline)
    grouped-fwd, grouped-dgrad               qlk.kernels.grouped_matmul per format
    grouped-qalora                           the fused QA-LoRA forward (folded biases, pooled P(X)), INT
    gnf4-fwd, gnf4-dgrad                     grouped-nf4-gemm (PyPI, bench/peers_static.py) on the same
                                             experts: bitsandbytes NF4 [E, N, K/2], fp32 absmax de-nested

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

from bench import sass  # noqa: E402


def balanced_tiles(launch) -> int:
    """Tiles of ``BLOCK_M`` rows a grouped launch's tile map holds under the cases' balanced routing
    (:func:`balanced_offsets`: S rows over E experts, the first S mod E one row more). S: the rows of
    X (dY); E: qlk's ``NUM_EXPERTS``, the dense baseline's stacked weight [E, N, K]."""
    rows_arg = launch.tensors.get("x_ptr") or launch.tensors.get("dy_ptr")
    experts = launch.scalars.get("NUM_EXPERTS")
    if experts is None and "w_ptr" in launch.tensors and len(launch.tensors["w_ptr"].shape) == 3:
        experts = launch.tensors["w_ptr"].shape[0]
    block_m = sass.constexpr(launch, "BLOCK_M")
    if rows_arg is None or not experts or not block_m:
        raise KeyError(f"{launch.kernel}: grouped launch without rows, experts or BLOCK_M")
    q, r = divmod(rows_arg.shape[0], experts)
    return r * -(-(q + 1) // block_m) + (experts - r) * -(-q // block_m)


def working_ctas(launch) -> int:
    """CTAs of a grouped launch that hold a tile: program rows past the tiles (the tile map's spare
    slots, sized on the host from a bound) exit after one load. Mixtral at 64 tokens (128 rows, 16
    an expert, 16-row tiles): 15 slots, 8 tiles, so the program-per-slot QA-LoRA forward's 960 CTAs
    are 512 that work. Before round 23 the model counted all of them, spreading the useful bytes and
    the grid's balance over CTAs that do nothing."""
    if not launch.grid:
        return 0
    rest = 1
    for d in launch.grid[1:]:
        rest *= d
    return min(launch.grid[0], balanced_tiles(launch)) * rest


def tiles_per_program(launch) -> int:
    """Tiles the busiest program row of a qlk grouped launch runs: 1 for a program per slot; with
    ``SLOT_LOOP`` program row t runs slots t, t + P, ... (P = grid rows), so under the cases'
    balanced routing (:func:`balanced_offsets`: S rows over E experts, the first S mod E one row
    more), whose tiles fill slots 0 .. tiles−1, ⌈tiles / P⌉. Qwen3 at 512 tokens: 4096 rows, 32 an
    expert, 256 tiles of 16 over 128 program rows: 2 (the spare slots cost a load each, not counted).
    Without it the model's DRAM bytes per iteration were those of one tile spread over two, so the
    slot-loop launches looked DRAM-bound at twice their traffic (before round 23)."""
    if not sass.constexpr(launch, "SLOT_LOOP") or not launch.grid:
        return 1
    return max(1, -(-balanced_tiles(launch) // launch.grid[0]))


def declare_loops() -> None:
    """Main-loop trips per CTA of the grouped kernels whose loop is not range(0, K, BLOCK_K): the
    input gradients reduce over N (qlk's and the dense baseline's DGRAD variant), the small-M split-K
    forward runs its K slice (grid axis 2); qlk's slot-loop launches run their K (N) loop once per
    tile of the program row (:func:`tiles_per_program`)."""
    sass.declare("_grouped_matmul_grad_input_kernel", iterations=lambda L: tiles_per_program(L) * sass.reduction_trips(
        L, "N", ("BLOCK_N",), L.grid[2] if L.grid and len(L.grid) > 2 else 1), working_ctas=working_ctas)
    sass.declare("_grouped_matmul_splitk_kernel", iterations=lambda L: tiles_per_program(L) * sass.reduction_trips(
        L, "K", ("BLOCK_K",), L.grid[2] if L.grid else 1), working_ctas=working_ctas)
    sass.declare("_grouped_matmul_fwd_kernel",
                 iterations=lambda L: tiles_per_program(L) * sass.reduction_trips(L, "K", ("BLOCK_K",)),
                 working_ctas=working_ctas)
    sass.declare("_dense_grouped_kernel", iterations=lambda L: (
        sass.reduction_trips(L, "N", ("BLOCK_N",)) if sass.constexpr(L, "DGRAD") else
        sass.reduction_trips(L, "K", ("BLOCK_K",))), working_ctas=working_ctas)


declare_loops()

DTYPE = torch.bfloat16
#: name -> (hidden H, expert intermediate I, experts E, top-k)
LAYERS = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}
#: the out-of-sample check (``bench/moe_estimates.py --layers other``): MoE layers the kernels and
#: their rules were not tuned on: OLMoE-1B-7B, Qwen1.5-MoE-A2.7B (60 experts: not a power of two)
#: and gpt-oss-20b (K = 2880: no 128-column groups, those formats are skipped)
OTHER_LAYERS = {"olmoe": (2048, 1024, 64, 8), "qwen2moe": (2048, 1408, 60, 4), "gptoss": (2880, 2880, 32, 4)}
#: the second out-of-sample check (``--layers wide``): DeepSeek-V2-Lite's routed experts (64, top-6),
#: Mixtral-8x22B (H = 6144), Llama-4-Scout (16 experts, top-1) and Phi-3.5-MoE (I = 6400 = 50 · 128)
WIDE_LAYERS = {"dsv2lite": (2048, 1408, 64, 6), "mixtral22b": (6144, 16384, 8, 2), "scout": (5120, 8192, 16, 1),
               "phimoe": (4096, 6400, 16, 2)}
TOKENS = (4096, 16, 1)  # the 4096 and 16, and one token (the split-K decode path)
#: format label -> (fmt, bits, group_size)
FORMATS = {"int4g32": ("int", 4, 32), "int4g128": ("int", 4, 128), "int3g128": ("int", 3, 128),
           "int2g32": ("int", 2, 32), "nf4dq": ("nf4", 4, 64)}


def use_formats(labels) -> None:
    """``bench/moe_estimates.py --formats``: these labels (``int<bits>g<group>``, ``nf4dq``, ``nf4``) instead of
    :data:`FORMATS`, the out-of-format check."""
    import re

    out = {}
    for label in labels:
        m = re.fullmatch(r"int([234])g(\d+)", label)
        if m:
            out[label] = ("int", int(m.group(1)), int(m.group(2)))
        elif label in ("nf4dq", "nf4"):  # NF4 with / without double-quantized absmax
            out[label] = ("nf4", 4, 64)
        else:
            raise SystemExit(f"--formats: format {label!r}: expected int<2|3|4>g<group> (e.g. int3g32), nf4dq or nf4")
    FORMATS.clear()
    FORMATS.update(out)
QALORA_RANK = 16


def projections(layer):
    h, i, e, k = LAYERS[layer]
    return {"gate_up": (h, 2 * i), "down": (i, h)}


@functools.lru_cache(maxsize=None)
def stacked_weight(fmt_label: str, e: int, n: int, k: int):
    """An uninitialized stacked [E·N, K] QuantizedWeight of the format's shapes and dtypes (nothing runs)."""
    from qlk.nn.linear import empty_qweight

    fmt, bits, g = FORMATS[fmt_label]
    return empty_qweight(e * n, k, bits, g, fmt, fmt_label != "nf4", DTYPE, DTYPE, False, "cpu")  # "nf4": no double quant


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

                # the forwards are told the token count bounds an expert's rows, as QuantExperts does
                # (the input gradient takes no bound): the baseline gets qlk's tile map
                def dense(dgrad, s=s, e=e, n=n, k=k, off=off, t=t):
                    x = torch.empty(s, n if dgrad else k, dtype=DTYPE)
                    return dense_grouped_matmul(x, torch.empty(e, n, k, dtype=DTYPE), off, dgrad=dgrad,
                                                max_rows=None if dgrad else t)

                for dgrad in (False, True):
                    op = "dense-grouped-" + ("dgrad" if dgrad else "fwd")
                    out.append(Case(case_name(op, "bf16", layer, proj, t), "dense", op, "bf16", k, n, s,
                                    lambda d=dgrad, f=dense: f(d)))
                for fmt in FORMATS:
                    if k % FORMATS[fmt][2]:
                        continue  # K has no whole groups of this size: the format cannot hold the layer
                    def fwd(fmt=fmt, s=s, e=e, n=n, k=k, off=off, t=t):
                        return grouped_matmul_forward(torch.empty(s, k, dtype=DTYPE), stacked_weight(fmt, e, n, k),
                                                      off, e, max_rows_per_expert=t)

                    def dgrad(fmt=fmt, s=s, e=e, n=n, k=k, off=off):
                        return grouped_matmul_grad_input(torch.empty(s, n, dtype=DTYPE),
                                                         stacked_weight(fmt, e, n, k), off, e)

                    def qalora(fmt=fmt, s=s, e=e, n=n, k=k, off=off, t=t):
                        qw = stacked_weight(fmt, e, n, k)
                        a = torch.zeros(e, QALORA_RANK, k // qw.group_size, dtype=DTYPE)
                        b = torch.zeros(e, n, QALORA_RANK, dtype=DTYPE)
                        wargs = folded_weight_args(qw, a, b, 2.0, e)
                        return grouped_matmul_forward(torch.empty(s, k, dtype=DTYPE), qw, off, e, wargs=wargs,
                                                      pool=True, max_rows_per_expert=t)

                    out.append(Case(case_name("grouped-fwd", fmt, layer, proj, t), "qlk", "fwd", fmt, k, n, s, fwd))
                    out.append(Case(case_name("grouped-dgrad", fmt, layer, proj, t), "qlk", "dgrad", fmt, k, n, s,
                                    dgrad))
                    if FORMATS[fmt][0] == "int":
                        out.append(Case(case_name("grouped-qalora", fmt, layer, proj, t), "qlk", "qalora", fmt, k, n,
                                        s, qalora))
    out += list(gnf4_cases())
    return [c for c in out if _selected(c.name, patterns)]


@functools.lru_cache(maxsize=None)
def _gnf4_weight(e: int, n: int, k: int):
    from peers_static import NF4_BLOCK

    return torch.empty(e, n, k // 2, dtype=torch.uint8), torch.empty(e, n, k // NF4_BLOCK, dtype=torch.float32)


def _gnf4_grouped_run(op: str, s: int, e: int, k: int, n: int):
    """grouped-nf4-gemm's own launcher on all E experts, S rows spread evenly (as qlk's cases)."""
    import peers_static as ps

    with ps.cuda_stub(ps._current_arch()):
        g = ps._gnf4()
        d = ps._DEVICES[ps._current_arch()]
        g._SM_CACHE["cpu"] = d["multi_processor_count"]
        g._CC_CACHE["cpu"] = (d["major"], d["minor"])
        b, absmax = _gnf4_weight(e, n, k)
        sizes = balanced_offsets(s, e).diff().tolist()
        with ps._gnf4_cpu_guard(g):
            if op == "fwd":
                return g.gemm_4bit_grouped(torch.empty(s, k, dtype=DTYPE), b, absmax, sizes, list(range(e)))
            return g.dgrad_4bit_grouped(torch.empty(s, n, dtype=DTYPE), b, absmax, sizes, list(range(e)))


def gnf4_cases():
    try:
        os.environ.setdefault("GNF4_TRITON_PREBIND", "0")
        import nf4_grouped  # noqa: F401
        missing = None
    except Exception as e:  # noqa: BLE001
        missing = f"not available: {type(e).__name__}: {e}; pip install grouped-nf4-gemm"
    for layer, (h, i, e, topk) in LAYERS.items():
        for proj, (k, n) in projections(layer).items():
            for t in TOKENS:
                s = t * topk
                for op in ("fwd", "dgrad"):
                    yield Case(case_name(f"gnf4-{op}", "nf4", layer, proj, t), "peer:grouped-nf4-gemm", op, "nf4", k, n,
                               s, lambda op=op, s=s, e=e, k=k, n=n: _gnf4_grouped_run(op, s, e, k, n), missing)


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

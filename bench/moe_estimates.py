"""Static speed estimates of the grouped (MoE) kernels against the dense grouped baseline and
grouped-nf4-gemm, sm_90 and sm_80: the MoE part of the static report (docs/moe.md).

    env -u TRITON_INTERPRET python bench/moe_estimates.py --arch 90,80 --out bench/results   # make static-moe
    env -u TRITON_INTERPRET python bench/moe_estimates.py --arch 90 --cases 'dense-*,grouped-fwd/int4g32/*'
    python bench/moe_estimates.py --fit-resident bench/results/static-moe-sm80.csv bench/results/static-moe-sm90.csv

Compiles every case of bench/launches_moe.py (Mixtral-8x7B-like and Qwen3-30B-A3B-like layers,
4096 and 16 tokens; qlk's grouped kernels, the dense bf16 grouped baseline of
bench/dense_grouped_matmul.py and grouped-nf4-gemm on the same experts) under ``bench.sass``
and writes ``static-moe-sm<arch>.md`` (a summary table: each case's estimate and its ratio to the
dense baseline of the same run) and ``.csv`` (every launch). **Estimates from machine code, not
measurements** (docs/static-analysis.md). At 256 tokens or more the metric is the tensor-peak fraction,
below it the DRAM fraction on useful bytes; both optimistic..pessimistic × the SM balance of the CTAs that hold a tile.
`--layers other` (OLMoE, Qwen1.5-MoE, gpt-oss-20b), `--layers wide` (DeepSeek-V2-Lite, Mixtral-8x22B,
Llama-4-Scout, Phi-3.5-MoE) and `--tokens 512,64` are the out-of-sample checks
(`static-moe-other-sm<arch>`, `static-moe-wide-sm<arch>`, `static-moe-t512-64-sm<arch>`).
``--fit-resident CSV...`` prints qlk.kernels.heuristics.GROUPED_RESIDENT fitted to such CSVs (compiles
nothing).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: the kernel that carries each op's work (QA-LoRA's bias fold is a small side launch)
MAIN = {"dense-grouped-fwd": "_dense_grouped_kernel", "dense-grouped-dgrad": "_dense_grouped_kernel",
        "grouped-fwd": "_grouped_matmul_fwd_kernel", "grouped-qalora": "_grouped_matmul_fwd_kernel",
        "grouped-dgrad": "_grouped_matmul_grad_input_kernel"}
#: launches that carry no op's work: the tile map (round 38, one small program), never a case's estimate
SIDE = {"_tile_map_kernel"}
#: every case at 4096 and 16 tokens; at one token the forwards (the split-K decode path)
DEFAULT_CASES = "*/T4096,*/T16,dense-grouped-fwd/*/T1,grouped-fwd/*/T1,gnf4-fwd/*/T1"
FIELDS = ("case", "kernel", "config", "regs", "stack", "spill_ops", "smem", "ctas_per_sm", "limiter", "ctas",
          "wave_eff", "bound", "tensor_opt", "tensor_pess", "dram_opt", "dram_pess", "notes")


def capture_reports(arch: int, patterns) -> tuple[list, dict]:
    """[(case, Report)] of every launch of the selected cases, and {case: failure}."""
    os.environ.pop("TRITON_INTERPRET", None)
    import launches
    import launches_moe
    from bench import sass

    failed = {}
    with sass.capture(arch, label=lambda: launches.CURRENT_CASE or "") as captured:
        for case in launches_moe.all_cases(patterns):
            status = launches_moe.run_case(case)
            if status:
                failed[case.name] = status
    return [(launch.label, report) for report, launch in sass.analyze_all(captured)], failed


def _main_report(case: str, reports):
    op = case.split("/")[0]
    mine = [r for c, r in reports if c == case and r.kernel not in SIDE]
    if op in MAIN:
        mine = [r for r in mine if r.kernel == MAIN[op]] or mine
    if not mine:
        return None

    def mid(r):
        vals = [v for v in (r.tensor_opt, r.tensor_pess) if v is not None] if _training(case) else \
            [v for v in (r.dram_opt, r.dram_pess) if v is not None]
        return sum(vals) / len(vals) if vals else -1
    return max(mine, key=mid)  # several launches (grouped-nf4-gemm's split-K pieces): the heaviest


def _training(case: str) -> bool:
    """Whether a case is judged by the tensor-peak fraction (T >= 256 tokens) or the DRAM one."""
    return int(case.rsplit("/T", 1)[1]) >= 256


def _metric(case: str, r):
    if r is None:
        return None
    return (r.tensor_opt, r.tensor_pess) if _training(case) else (r.dram_opt, r.dram_pess)


def _fmt(v, base=None, gnf4=None):
    if v is None or v[0] is None:
        return "-"
    text = f"{v[0]:.2f}..{v[1]:.2f}"
    ratios = []
    for ref, tag in ((base, ""), (gnf4, " gnf4")):
        if ref is not None and ref[0]:
            ratios.append(f"{v[0] / ref[0]:.2f}×/{v[1] / ref[1]:.2f}×{tag}")
    return text + (f" ({'; '.join(ratios)})" if ratios else "")


def summary(reports, failed) -> list[str]:
    import launches_moe

    cases = sorted({c for c, _ in reports} | set(failed))
    get = {c: _metric(c, _main_report(c, reports)) for c in cases}
    head = ("layer", "tokens", "metric", "dense fwd", "int4g32 fwd", "int3g128 fwd", "int2g32 fwd", "nf4dq fwd",
            "gnf4 fwd", "QA-LoRA int4g32 fwd", "dense dgrad", "int4g32 dgrad", "nf4dq dgrad", "gnf4 dgrad")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in launches_moe.LAYERS:
        for proj, (k, n) in launches_moe.projections(layer).items():
            for t in launches_moe.TOKENS:
                name = lambda op, fmt: launches_moe.case_name(op, fmt, layer, proj, t)  # noqa: E731
                dense_f, dense_d = get.get(name("dense-grouped-fwd", "bf16")), get.get(name("dense-grouped-dgrad", "bf16"))
                gnf4_f, gnf4_d = get.get(name("gnf4-fwd", "nf4")), get.get(name("gnf4-dgrad", "nf4"))
                row = [f"{layer} {proj} {k}→{n}", str(t), "tensor" if t >= 256 else "dram", _fmt(dense_f)]
                for fmt in ("int4g32", "int3g128", "int2g32"):
                    row.append(_fmt(get.get(name("grouped-fwd", fmt)), dense_f))
                row += [_fmt(get.get(name("grouped-fwd", "nf4dq")), dense_f, gnf4_f), _fmt(gnf4_f, dense_f),
                        _fmt(get.get(name("grouped-qalora", "int4g32")), dense_f), _fmt(dense_d),
                        _fmt(get.get(name("grouped-dgrad", "int4g32")), dense_d),
                        _fmt(get.get(name("grouped-dgrad", "nf4dq")), dense_d, gnf4_d), _fmt(gnf4_d, dense_d)]
                lines.append("| " + " | ".join(row) + " |")
    return lines


def write(arch: int, reports, failed, out_dir: str, command: str, stem: str = "static-moe") -> str:
    import launches_moe

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{stem}-sm{arch}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("arch",) + FIELDS)
        for case, r in sorted(reports, key=lambda cr: (cr[0], cr[1].kernel)):
            w.writerow([arch, case] + [("; ".join(r.notes) if fld == "notes" else getattr(r, fld))
                                       for fld in FIELDS[1:]])
        for case, why in sorted(failed.items()):
            w.writerow([arch, case, "", why])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    import triton

    lines = [
        f"# Static MoE report, sm_{arch}: qlk's grouped kernels, the dense grouped baseline, grouped-nf4-gemm",
        "",
        f"**Estimated from sm_{arch} machine code, not measured** (bench/sass, docs/static-analysis.md). "
        "Nothing ran.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; triton {triton.__version__}; "
        f"qlk commit {commit} (plus the working tree)",
        "- layers (bench/launches_moe.py, name: H, I, E, top-k): "
        + "; ".join(f"{name}: {h}, {i}, {e}, top-{k}" for name, (h, i, e, k) in launches_moe.LAYERS.items())
        + "; T tokens -> T·top-k routed rows spread evenly over the experts; bf16 activations",
        "- metric: at T >= 256 tokens the tensor-peak fraction, below it the DRAM fraction on useful bytes; "
        "optimistic..pessimistic × the SM balance of the CTAs that hold a tile (a tile map's spare slots exit "
        "at once and are not counted; a slot-loop program row runs all its tiles: bench/launches_moe.py, "
        "round 23). (a×/b×) divides by the dense grouped bf16 baseline "
        "of the same run (same tile map and tiles), `gnf4` by grouped-nf4-gemm's estimate on the same experts.",
        "- the target of issue 19: every qlk grouped kernel ≥ 0.9× the dense baseline, and above grouped-nf4-gemm.",
        "",
    ] + summary(reports, failed) + [""]
    if failed:
        lines += ["Cases that did not compile:", ""] + [f"- `{c}`: {why}" for c, why in sorted(failed.items())] + [""]
    lines += ["Every launch (config, registers, occupancy, bound): the CSV next to this file.", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    return stem + ".md"


def fit_grouped_resident(rows) -> dict:
    """qlk.kernels.heuristics.GROUPED_RESIDENT from report rows (:func:`read_csv`): the small-M grouped
    input gradient's resident CTAs per SM (the analyzer's ``ctas_per_sm``), (fewest, most) per
    (arch family, "grad", format class) and tile, for each kernel variant the split rule sizes:
    "slot_loop" (program rows < tile slots: ``SLOT_LOOP``, Mixtral at 16 tokens) and "per_slot" (a
    program row per slot, Qwen3). The variants differ by 40-80 registers (sm_90 INT4 g32: 210 against
    128), so one range over both would make the rule size for occupancies neither launch has. Only
    split launches (grid > program rows × K tiles: ``SPLIT_N``, whose fp32 atomics cost registers too,
    NF4 on sm_80 128 against 80) count, unless a variant has no split launch of that format in the
    rows; then its unsplit launches stand in (re-run and refit: the refitted rule may split them).
    Per bit width too (the entry for group sizes the run did not compile)."""
    import math

    import launches_moe
    from qlk.kernels import heuristics
    from qlk.kernels.grouped_matmul import _small, _tile_map

    seen = {}  # (fam, fmt, label, variant) -> {"split": [...], "unsplit": [...]}
    for r in rows:
        if r.get("kernel") != MAIN["grouped-dgrad"] or not r.get("ctas_per_sm") or not r.get("ctas"):
            continue
        op, fmt, layer_proj, tokens = r["case"].split("/")
        layer, proj = layer_proj.split("-")
        _, _, experts, topk = launches_moe.LAYERS[layer]
        k, _n = launches_moe.projections(layer)[proj]
        rows_routed = int(tokens[1:]) * topk
        if not _small(rows_routed, experts):
            continue
        block_m, _, block_k = (int(x) for x in r["config"].split()[0].split("x"))
        offsets = launches_moe.balanced_offsets(rows_routed, experts)
        slots = _tile_map(offsets, rows_routed, block_m)[0].shape[0]
        programs = heuristics.grouped_programs(slots, experts, True)[0]
        base = programs * math.ceil(k / block_k)
        kind, bits, group = launches_moe.FORMATS[fmt]
        fc = heuristics.format_class(bits, kind == "nf4", group)
        label = " ".join(r["config"].split()[:3])
        # the launcher's rule (grouped_matmul._grad_slot_loop): small M on sm_90 always runs the slot loop
        slot_loop = programs < slots or heuristics.arch_family(int(r["arch"])) == 90
        variant = "slot_loop" if slot_loop else "per_slot"
        split = "split" if int(r["ctas"]) > base else "unsplit"
        for f in {fc, heuristics.base_format(fc)}:
            key = (heuristics.arch_family(int(r["arch"])), f, label, variant)
            seen.setdefault(key, {"split": [], "unsplit": []})[split].append(int(r["ctas_per_sm"]))
    out = {}
    for (fam, f, label, variant), got in sorted(seen.items()):
        vals = got["split"] or got["unsplit"]
        out.setdefault((fam, "grad", f), {}).setdefault(label, {})[variant] = (min(vals), max(vals))
    # a bit width compiled at one group size only: its per-width entry is that one, drop the copy
    for (fam, op, f) in list(out):
        same = [key for key in out if key[:2] == (fam, op) and key[2] != f and heuristics.base_format(key[2]) == f]
        if len(same) == 1 and out[same[0]] == out[(fam, op, f)]:
            del out[same[0]]
    return out


def read_csv(path: str) -> list:
    """Rows of a static-moe CSV as dicts of strings (what :func:`fit_grouped_resident` reads)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated fnmatch patterns of case names")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tokens", help="comma-separated token counts instead of bench/launches_moe.py TOKENS "
                                     "(the out-of-sample check: e.g. 512,64); pair with --cases '*'")
    ap.add_argument("--layers", choices=("issue", "other", "wide"), default="issue",
                    help="issue 19's Mixtral / Qwen3-MoE layers, or an out-of-sample set (bench/launches_moe.py "
                         "OTHER_LAYERS / WIDE_LAYERS; writes static-moe-other-sm<arch> / static-moe-wide-sm<arch>)")
    ap.add_argument("--formats", help="comma-separated format labels instead of the five (int<2|3|4>g<group>, "
                                      "nf4dq, nf4; the out-of-format check: writes <stem>-formats-sm<arch>)")
    ap.add_argument("--fit-resident", nargs="+", metavar="CSV",
                    help="print qlk.kernels.heuristics.GROUPED_RESIDENT fitted to these static-moe CSVs and exit")
    args = ap.parse_args(argv)
    if args.fit_resident:
        import pprint

        print("GROUPED_RESIDENT = ", end="")
        pprint.pprint(fit_grouped_resident([r for p in args.fit_resident for r in read_csv(p)]), width=120)
        return 0
    patterns = [p for p in args.cases.split(",") if p]
    stem = "static-moe"
    import launches_moe

    if args.layers == "other":
        launches_moe.LAYERS, stem = launches_moe.OTHER_LAYERS, "static-moe-other"
    elif args.layers == "wide":
        launches_moe.LAYERS, stem = launches_moe.WIDE_LAYERS, "static-moe-wide"
    if args.tokens:
        launches_moe.TOKENS = tuple(int(t) for t in args.tokens.split(",") if t)
        stem += "-t" + "-".join(str(t) for t in launches_moe.TOKENS)
    if args.formats:
        launches_moe.use_formats([f for f in args.formats.split(",") if f])
        stem += "-formats"
    command = "python bench/moe_estimates.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for arch in (int(a) for a in args.arch.split(",") if a):
        reports, failed = capture_reports(arch, patterns)
        path = write(arch, reports, failed, args.out, command, stem)
        print(open(path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m bench.sass SCRIPT [--arch 90,80] [--loop] [--json out.json]: see bench/sass/__init__.py."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import sys

from . import analyze_all, capture, disasm


def loop_listing(launch) -> str:
    """The main loop's SASS, one instruction a line."""
    from .model import _main_loop

    _, instrs = disasm.read_cubin(launch.cubin)
    body, _ = _main_loop(instrs)
    return "\n".join(f"    {i.addr:05x}  {i.op}{i.mods} {i.args}" for i in body)


def table(reports) -> str:
    """A fixed-width table: what a kernel author acts on (spills, occupancy limiter, bound, estimates)."""
    head = ("kernel", "arch", "config", "regs", "spill", "smem", "CTA/SM", "grid", "wave", "bound", "tensor", "dram")
    rows = []
    for r in reports:
        rng = lambda hi, lo: "-" if hi is None else f"{hi:.2f}..{lo:.2f}"  # noqa: E731
        rows.append((r.kernel[:36], f"sm_{r.arch}", r.config[:44], str(r.regs),
                     f"{r.stack}B/{r.spill_ops}" if (r.stack or r.spill_ops) else "0",
                     f"{r.smem // 1024}K", f"{r.ctas_per_sm} {r.limiter}", str(r.ctas or "-"),
                     "-" if r.wave_eff is None else f"{r.wave_eff:.2f}", r.bound,
                     rng(r.tensor_opt, r.tensor_pess), rng(r.dram_opt, r.dram_pess)))
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split(":")[0],
                                 epilog="python -m bench.sass bench/launches.py --arch 90,80 -- --quick")
    ap.add_argument("script", help="Python file whose Triton launches to compile (run as __main__); "
                                   "arguments for it go after --")
    ap.add_argument("--arch", default="90", help="comma-separated: 90 (H100), 80 (A100); default 90")
    ap.add_argument("--loop", action="store_true", help="also print each main loop's SASS")
    ap.add_argument("--mix", action="store_true", help="also print each main loop's instruction mix")
    ap.add_argument("--json", help="write every report here")
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench.sass: unset TRITON_INTERPRET (the interpreter compiles nothing): TRITON_INTERPRET= python -m "
              "bench.sass ...", file=sys.stderr)
        return 2
    if not os.path.exists(args.script):
        print(f"bench.sass: script {args.script!r} does not exist", file=sys.stderr)
        return 2
    reports = []
    for arch in (int(a) for a in args.arch.split(",") if a):
        with capture(arch) as launches:
            sys.argv = [args.script, *script_args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
            try:
                runpy.run_path(args.script, run_name="__main__")
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
        pairs = analyze_all(launches)
        print(table([r for r, _ in pairs]))
        for r, L in pairs:
            if args.mix or args.loop:
                print(f"\n{r.kernel} sm_{r.arch} {r.config}: loop {r.loop_instrs} instructions, "
                      f"cycles/iteration {r.cycles}; notes: {'; '.join(r.notes) or '-'}")
                print("    mix: " + ", ".join(f"{k} {v}" for k, v in sorted(r.mix.items(), key=lambda kv: -kv[1])))
            if args.loop:
                print(loop_listing(L))
        reports += [r for r, _ in pairs]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

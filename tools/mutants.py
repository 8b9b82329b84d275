"""``make mutants``: inject each one-line bug of tools/mutants_catalogue.py and check a test catches it.

    python tools/mutants.py                       # every mutant, report on stdout
    python tools/mutants.py --out bench/results/mutants.txt
    python tools/mutants.py --only splitk-floor-tiles,mid-code-sign --list

For each mutant: the text ``old`` must occur exactly once in its file (else the mutant no longer
applies: an error, never a silent pass); it is replaced by ``new`` in a *copy* of the tree (a
temporary directory: the working tree is never written, so Ctrl-C or a crash cannot leave a bug
behind), and the mutant's tests run there with ``pytest -x`` (PYTHONPATH = the copy, Triton
interpreted). pytest exit 1 (a test failed) = killed; 0 = **survived**; anything else (collection
error, interrupt, timeout) = error. A baseline run of every listed test on the unmutated copy comes
first (``--skip-baseline`` to omit it), so that a test failing for another reason is not counted as
a kill. Exit status: 0 when every mutant was killed, 1 when one survived or errored.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from mutants_catalogue import MUTANTS  # noqa: E402

COPY = ("qlk", "tests", "bench", "setup.py", "requirements-test.txt")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")  # bench/results: the rules' tests read the committed sweep


def apply(text: str, m: dict) -> str:
    """``text`` with the mutant applied; ValueError unless ``old`` occurs exactly once."""
    count = text.count(m["old"])
    if count != 1:
        raise ValueError(f"mutant {m['id']}: {m['old']!r} occurs {count} times in {m['file']} (must be exactly once)")
    if m["new"] == m["old"]:
        raise ValueError(f"mutant {m['id']}: new == old")
    return text.replace(m["old"], m["new"])


def check_catalogue(mutants, root=ROOT) -> list[str]:
    """Problems with the catalogue: duplicate ids, a mutant that does not apply, a missing test file."""
    problems, seen = [], set()
    for m in mutants:
        if m["id"] in seen:
            problems.append(f"duplicate id {m['id']}")
        seen.add(m["id"])
        try:
            with open(os.path.join(root, m["file"]), encoding="utf-8") as f:
                apply(f.read(), m)
        except (OSError, ValueError) as e:
            problems.append(str(e))
        for t in m["tests"]:
            if t.startswith("tests/") and not os.path.exists(os.path.join(root, t.split("::")[0])):
                problems.append(f"mutant {m['id']}: no test file {t}")
    return problems


def pytest(copy: str, args: list[str], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=copy, TRITON_INTERPRET="1", QLK_BACKEND="reference", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = str(e.stdout or "") + "\nTIMEOUT", 124
    return rc, time.monotonic() - t0, out


def failed_test(out: str) -> str:
    for line in out.splitlines():
        if line.startswith("FAILED "):
            return line.split()[1].split("::", 1)[-1][:70]
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma list of mutant ids")
    ap.add_argument("--list", action="store_true", help="list the catalogue and check it applies; run nothing")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the tests on the unmutated copy first")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--tests", help="run these pytest arguments (space-separated) for every mutant instead of "
                                    "the catalogue's, e.g. to see what an older test set misses")
    ap.add_argument("--out", help="also write the report to this file")
    a = ap.parse_args(argv)
    mutants = MUTANTS
    if a.only:
        want = set(a.only.split(","))
        unknown = want - {m["id"] for m in MUTANTS}
        if unknown:
            ap.error(f"unknown mutant id(s) {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m["id"] in want]
    if a.tests:
        mutants = [dict(m, tests=a.tests.split()) for m in mutants]
    problems = check_catalogue(mutants)
    if a.list or problems:
        for m in mutants:
            print(f"{m['id']:34s} {m['cls']:22s} {m['file']}")
        for p in problems:
            print("ERROR:", p)
        return 1 if problems else 0

    lines = []

    def report(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qlk-mutants-") as copy:
        for name in COPY:
            src = os.path.join(ROOT, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(copy, name), ignore=IGNORE)
            elif os.path.exists(src):
                shutil.copy2(src, os.path.join(copy, name))
        if not a.skip_baseline:
            files = sorted({t for m in mutants for t in m["tests"] if t.startswith("tests/")})
            rc, secs, out = pytest(copy, files, a.timeout * 2)
            if rc != 0:
                print(out[-4000:])
                print(f"mutants: the unmutated tests fail (pytest exit {rc}): fix them first", file=sys.stderr)
                return 1
            report(f"baseline: {' '.join(files)} pass on the unmutated tree ({secs:.0f} s)")
        report(f"{'mutant':34s} {'class':22s} {'result':9s} {'time':>6s}  caught by")
        bad = 0
        for m in mutants:
            path = os.path.join(copy, m["file"])
            with open(path, encoding="utf-8") as f:
                original = f.read()
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(apply(original, m))
                rc, secs, out = pytest(copy, m["tests"], a.timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original)
            result = {1: "killed", 0: "SURVIVED"}.get(rc, f"ERROR({rc})")
            bad += result != "killed"
            report(f"{m['id']:34s} {m['cls']:22s} {result:9s} {secs:5.0f}s  {failed_test(out)}")
            if result.startswith("ERROR"):
                report("    " + out.strip().splitlines()[-1][:200] if out.strip() else "    (no output)")
    killed = len(mutants) - bad
    report(f"\n{killed}/{len(mutants)} killed, {bad} survived or errored, {time.monotonic() - t_start:.0f} s "
           f"({sys.platform}, {os.cpu_count()} CPUs, python {sys.version.split()[0]})")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("# make mutants (tools/mutants.py): one-line bugs of tools/mutants_catalogue.py\n")
            f.write("\n".join(lines) + "\n")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

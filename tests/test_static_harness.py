"""CPU test of the static-report harness (bench/launches.py, bench/static_report.py).

It compiles the dense baseline's quick cases for sm_90 through ``gpu_static.capture`` (the shared
analyzer, not part of qlk) and checks the report rows: what the analyzer must see in a plain
bf16 wgmma matmul (registers, no spills, HGMMA in the main loop, near the tensor peak at
M = 4096, a grid that fills the GPU at M = 1) and the row and file formats. A change to the
harness that mislabels cases, loses a config or breaks the dense kernel fails here.

The compile runs in a child process without TRITON_INTERPRET (under the interpreter Triton
compiles nothing), so the test works whatever the surrounding suite sets.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TOOLS = os.environ.get("GPU_STATIC_DIR") or os.path.normpath(os.path.join(ROOT, "..", "shared", "tools"))

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(TOOLS, "gpu_static.py")),
    reason=f"static analyzer not found: {os.path.join(TOOLS, 'gpu_static.py')} (shared tools, not part of qlk; "
    "set GPU_STATIC_DIR to its folder)",
)

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {bench!r})
    import static_report, launches
    gs = static_report.load_analyzer()
    cases = launches.all_cases(quick=True, patterns=["dense-fwd/*"], include_qlk=False)
    rows = static_report.collect(gs, 90, cases)
    static_report.write_csv({csv!r}, rows)
    meta = dict(command="pytest", date="today", triton="?", torch="?", commit="?", peers="-")
    static_report.write_markdown({md!r}, 90, rows, meta)
    json.dump([{{k: v for k, v in r.items() if k != "_work"}} for r in rows], open({out!r}, "w"))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    paths = {k: str(d / f"r.{k}") for k in ("json", "csv", "md")}
    code = _CHILD.format(bench=BENCH, csv=paths["csv"], md=paths["md"], out=paths["json"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPU_STATIC_DIR"] = TOOLS
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(paths["json"]) as f:
        rows = json.load(f)
    return rows, paths


def test_quick_dense_cases_are_the_expected_ones(report):
    rows, _ = report
    assert {r["case"] for r in rows} == {"dense-fwd/bf16/4096->14336/M4096", "dense-fwd/bf16/4096->14336/M1"}
    assert all(r["status"] == "ok" and r["kernel"] == "_dense_matmul_kernel" and r["arch"] == 90 for r in rows)
    # M = 4096 compiles every autotune config; M = 1 takes the one split-K decode tile
    big = [r for r in rows if r["M"] == 4096]
    assert len(big) == 3 and sum(r["best"] for r in big) == 1
    assert len([r for r in rows if r["M"] == 1]) == 1


def test_rows_hold_resources_and_estimates(report):
    rows, _ = report
    for r in rows:
        assert r["regs"] > 0 and r["stack"] == 0 and r["spill_ops"] == 0, r
        assert re.fullmatch(r"\d+x\d+x\d+ w\d+ s\d+( \w+=\d+)*", r["config"]), r["config"]
        assert r["smem_bytes"] > 0 and r["ctas_per_sm"] >= 1 and r["grid_ctas"] > 0
        assert 0 < r["wave_eff"] <= 1
        assert 0 <= r["tensor_peak_pess"] <= r["tensor_peak_opt"] <= 1
        assert 0 <= r["dram_peak_pess"] <= r["dram_peak_opt"] <= 1


def test_dense_kernel_is_what_the_anchors_say(report):
    rows, _ = report
    best = next(r for r in rows if r["M"] == 4096 and r["best"])
    assert "tensor:HGMMA" in best["mix"], best["mix"]  # wgmma on sm_90
    assert best["config"].startswith("128x256x64 w8 s3")
    assert best["tensor_peak_opt"] >= 0.9 and best["bound"] == "tensor"  # anchors.md: 0.97..0.68
    decode = next(r for r in rows if r["M"] == 1)
    assert decode["grid_ctas"] >= 132 and decode["dram_peak_opt"] >= 0.8  # split-K fills the SMs


def test_csv_and_markdown_files(report):
    import importlib.util

    _, paths = report
    spec = importlib.util.spec_from_file_location("static_report", os.path.join(BENCH, "static_report.py"))
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == sr.CSV_FIELDS and len(got) == 4
    md = open(paths["md"]).read()
    assert "Estimated from sm_90 machine code, not measured." in md
    table = [ln for ln in md.splitlines() if ln.startswith("| _dense_matmul_kernel |")]
    assert len(table) == 2  # one row per kernel × case in the markdown
    assert all(ln.count("|") == 14 for ln in table)

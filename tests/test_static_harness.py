"""CPU tests of qlk's static analyzer (bench/sass) and the report harness (bench/launches.py,
bench/static_report.py).

The analyzer's own arithmetic (occupancy, wave efficiency, useful bytes, trip counts) is checked
on hand-made inputs. Then the dense baseline's quick cases are compiled for sm_90 through
``bench.sass.capture`` and the report rows are checked against what the model must see in a plain
bf16 wgmma matmul (registers, no spills, HGMMA in the main loop, near the tensor peak at M = 4096,
a split-K grid that fills the GPU at M = 1), and the row and file formats. A change that
mislabels cases, loses a config or breaks the dense kernel fails here.

Compiling runs in a child process without TRITON_INTERPRET (under the interpreter Triton compiles
nothing, and tests/conftest.py sets it for this process).
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
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------ the model's arithmetic
def test_occupancy_names_the_limiter():
    from bench.sass import gpu
    from bench.sass.model import occupancy

    h100 = gpu(90)
    assert occupancy(h100, regs=255, smem=0, warps=8) == (1, "regs")  # 8 warps x 8192 registers fill the SM
    assert occupancy(h100, regs=64, smem=150_000, warps=4) == (1, "smem")
    assert occupancy(h100, regs=24, smem=0, warps=16) == (4, "warps")  # 64 warps per SM
    assert occupancy(h100, regs=16, smem=1024, warps=1)[1] == "ctas"
    assert occupancy(h100, regs=16, smem=0, warps=1) == (32, "ctas")


def test_wave_efficiency_and_sm_balance():
    from bench.sass import gpu
    from bench.sass.model import sm_balance, wave_efficiency

    h100 = gpu(90)
    assert wave_efficiency(h100, 132, 1) == 1.0
    assert wave_efficiency(h100, 133, 1) == pytest.approx(133 / 264)
    assert wave_efficiency(h100, 64, 1) == pytest.approx(64 / 132)  # a grid smaller than the GPU
    assert wave_efficiency(h100, 264, 2) == 1.0
    # 1024 CTAs, 16 resident per SM: one partly filled wave of slots, but every SM gets 7 or 8 CTAs
    assert wave_efficiency(h100, 1024, 16) == pytest.approx(1024 / 2112)
    assert sm_balance(h100, 1024) == pytest.approx(1024 / (132 * 8))
    assert sm_balance(h100, 64) == wave_efficiency(h100, 64, 1)


def _launch(**kw):
    from bench.sass import Launch
    from bench.sass.capture import TensorArg

    base = dict(kernel="k", arch=90, grid=(10, 1, 1), constexprs={}, scalars={}, tensors={}, num_warps=4,
                num_stages=3, cubin=b"", dynamic_smem=0, cache_key="", source="")
    base.update(kw)
    base["tensors"] = {n: TensorArg(*t) for n, t in base["tensors"].items()}
    return Launch(**base)


def test_useful_bytes_counts_each_operand_once():
    from bench import sass

    L = _launch(tensors={"x": ((16, 64), "bfloat16", 2048, 1000), "w": ((64, 64), "int8", 4096, 9000),
                         "w_again": ((64, 64), "int8", 4096, 9000), "lut": ((16,), "float32", 64, 20000)})
    assert sass.useful_bytes(L) == 2048 + 4096 + 64  # the same buffer passed twice counts once


def test_trip_counts_default_and_declared():
    from bench import sass
    from bench.sass.model import default_iterations

    L = _launch(kernel="_t", scalars={"K": 4096, "N": 1000}, constexprs={"BLOCK_K": 64, "SPLIT_K": 4, "BLOCK_N": 128})
    assert default_iterations(L) == 16  # 4096 / 64 / 4
    assert sass.reduction_trips(L, "N", ("BLOCK_N",), split=3) == 3  # ceil(ceil(1000/128) / 3)
    with pytest.raises(KeyError):
        default_iterations(_launch(scalars={"N": 5}, constexprs={"BLOCK_N": 4}))


def test_launches_declare_the_qlk_loops():
    import bench.launches  # noqa: F401 - declares on import
    from bench.sass import model

    for name in ("_quant_matmul_splitk_kernel", "_quant_matmul_grad_input_kernel",
                 "_quant_matmul_grad_input_splitn_kernel", "_fold_bias_kernel"):
        assert name in model._LOOP_TRIPS, name
    L = _launch(kernel="_quant_matmul_splitk_kernel", grid=(224, 8, 1), scalars={"K": 4096}, constexprs={"BLOCK_K": 128})
    assert model._LOOP_TRIPS[L.kernel](L) == 4  # 32 K tiles over 8 slices


def test_format_labels_of_the_out_of_format_check():
    """``--formats``: any INT bit width and group size and NF4 with or without double quant get cases
    (QA-LoRA only for INT), a label read back from a CSV resolves, a bad one stops with what to write."""
    sys.path.insert(0, BENCH)
    import launches

    assert launches.format_spec("int3g32") == dict(bits=3, group_size=32)
    assert launches.format_spec("nf4") == dict(fmt="nf4", double_quant=False)
    assert launches.FORMATS["int2g128"] == dict(bits=2, group_size=128)  # parsed, not stored:
    assert "int2g128" not in launches.FORMATS and len(launches.FORMATS) == 5  # the tables' layout stays
    names = {c.name for c in launches.all_cases(patterns=["fwd/*", "qalora/*"], shapes=[(2048, 512)], ms=[9],
                                               formats=launches._formats("int3g64,nf4"))}
    assert names == {"fwd/int3g64/2048->512/M9", "qalora/int3g64/2048->512/M9", "fwd/nf4/2048->512/M9"}
    for bad in ("int5g32", "int4", "nf8"):
        with pytest.raises(SystemExit, match=re.escape(f"format {bad!r}: expected int<2|3|4>g<group>")):
            launches._formats(f"int4g32,{bad}")


def test_sass_parser_reads_widths_and_mma_shapes():
    from bench.sass import disasm

    text = """
        /*0100*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0110*/              @!P0 LDGSTS.E.BYPASS.LTC128B.128 [R9], desc[UR4][R6.64] ;
        /*0120*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0130*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0140*/                   LDSM.16.M88.4 R20, [R3] ;
        /*0150*/                   LDG.E.U8 R5, desc[UR4][R2.64] ;
        /*0160*/               @P1 BRA 0x100 ;
    """
    ins = disasm.parse_sass(text)
    assert [i.op for i in ins] == ["LDG", "LDGSTS", "HGMMA", "HMMA", "LDSM", "LDG", "BRA"]
    assert disasm.access_bytes(ins[0]) == 16 and disasm.access_bytes(ins[1]) == 16 and disasm.access_bytes(ins[5]) == 1
    assert disasm.mma_shape(ins[2]) == (64 * 128 * 16, "wgmma")
    assert disasm.mma_shape(ins[3]) == (16 * 8 * 16, "mma_sync")
    assert disasm.shared_bytes(ins[4]) == 512
    assert disasm.backward_branches(ins) == [(0x100, 0x160)]
    assert ins[1].predicated and not ins[0].predicated


# ------------------------------------------------------------------------ compiled dense baseline
_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {bench!r})
    import static_report, launches
    cases = launches.all_cases(quick=True, patterns=["dense-fwd/*"], include_qlk=False)
    rows = static_report.collect(90, cases)
    static_report.write_csv({csv!r}, rows)
    meta = dict(command="pytest", date="today", triton="?", torch="?", commit="?", peers="-")
    static_report.write_markdown({md!r}, 90, rows, meta)
    json.dump(rows, open({out!r}, "w"))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    paths = {k: str(d / f"r.{k}") for k in ("json", "csv", "md")}
    code = _CHILD.format(bench=BENCH, csv=paths["csv"], md=paths["md"], out=paths["json"])
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(paths["json"]) as f:
        rows = json.load(f)
    return rows, paths


def test_serialized_wgmma_is_counted():
    """Round 25: a loop whose every wgmma waits for none in flight before the next (ptxas's C7515
    serialization: each HGMMA with its own gsb0 and ``WARPGROUP.DEPBAR.LE gsb0, 0x0``) against a
    pipelined one (HGMMAs back to back, one wait for all but the newest group)."""
    from bench.sass import disasm

    serialized = disasm.parse_sass("""
        /*0100*/                   WARPGROUP.ARRIVE ;
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R56, R108, gdesc[UR12], R56, gsb0 ;
        /*0120*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0130*/                   WARPGROUP.ARRIVE ;
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R56, R112, gdesc[UR16], R56, gsb0 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0160*/                   HGMMA.64x64x16.F32.BF16 R24, R116, gdesc[UR16], R24, gsb0 ;
        /*0170*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """)
    pipelined = disasm.parse_sass("""
        /*0100*/                   WARPGROUP.ARRIVE ;
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R56, R108, gdesc[UR12], R56 ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R56, R112, gdesc[UR16], R56 ;
        /*0130*/                   HGMMA.64x64x16.F32.BF16 R24, R116, gdesc[UR16], R24, gsb0 ;
        /*0140*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0150*/                   HGMMA.64x64x16.F32.BF16 R24, R120, gdesc[UR20], R24, gsb0 ;
        /*0160*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """)
    assert disasm.serialized_wgmma(serialized) == (3, 3)
    assert disasm.serialized_wgmma(pipelined) == (1, 4)  # one wait for all, at the end


def test_drained_wgmma_is_seen():
    """Round 36: a loop that waits for all its wgmmas before it ends (the sm_90 input gradient's: its
    dequantized tile stored to shared memory each step, then ``WARPGROUP.DEPBAR.LE gsb0, 0x0``)
    against the forward's, which leaves one group in flight (``0x1``) across the iteration boundary;
    a loop without wgmma is neither."""
    from bench.sass import disasm

    drained = disasm.parse_sass("""
        /*0100*/                   STS.128 [R180+UR6+0x18000], R8 ;
        /*0110*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0120*/                   WARPGROUP.ARRIVE ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8].tnspB, R88 ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16].tnspB, R24, gsb0 ;
        /*0150*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0160*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0170*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0180*/                   LDGSTS.E.BYPASS.128 [R187], desc[UR24][R4.64], P1 ;
    """)
    in_flight = disasm.parse_sass("""
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0110*/                   WARPGROUP.ARRIVE ;
        /*0120*/                   HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR8], R24, gsb0 ;
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0140*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0150*/                   LDGSTS.E.BYPASS.128 [R193], desc[UR10][R4.64], !P2 ;
    """)
    no_mma = disasm.parse_sass("""
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0110*/                   FFMA R4, R5, R6, R4 ;
    """)
    assert disasm.drained_wgmma(drained)
    assert not disasm.drained_wgmma(in_flight)
    assert not disasm.drained_wgmma(no_mma)


def test_quick_dense_cases_are_the_expected_ones(report):
    rows, _ = report
    assert {r["case"] for r in rows} == {"dense-fwd/bf16/4096->14336/M4096", "dense-fwd/bf16/4096->14336/M1"}
    assert all(r["status"] == "ok" and r["kernel"] == "_dense_matmul_kernel" and r["arch"] == 90 for r in rows)
    # M = 4096 compiles every autotune config (bench/dense_matmul.py: three 4/8-warp tiles and, since
    # round 9, two 2-warp ones); M = 1 takes the one split-K decode tile
    big = [r for r in rows if r["M"] == 4096]
    assert len(big) == 5 and sum(r["best"] for r in big) == 1
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
        assert r["iterations"] >= 1


def test_useful_bytes_of_the_dense_matmul(report):
    """X, W and Y once: M·K + N·K bf16 in, M·N out (bf16, or fp32 split-K partials)."""
    rows, _ = report
    m, k, n = 4096, 4096, 14336
    big = next(r for r in rows if r["M"] == m and r["best"])
    assert big["useful_bytes"] == 2 * (m * k + n * k + m * n)
    assert big["iterations"] == k // 64
    decode = next(r for r in rows if r["M"] == 1)
    split = decode["grid_ctas"] // (n // 64)
    assert decode["useful_bytes"] == 2 * (k + n * k) + 4 * split * n


def test_dense_kernel_is_what_the_calibration_says(report):
    rows, _ = report
    best = next(r for r in rows if r["M"] == 4096 and r["best"])
    assert "tensor:HGMMA" in best["mix"], best["mix"]  # wgmma on sm_90
    assert best["config"].startswith("128x256x64 w8 s3")
    assert best["tensor_peak_opt"] >= 0.9 and best["bound"] == "tensor"  # docs/static-analysis.md: 0.97..0.68
    decode = next(r for r in rows if r["M"] == 1)
    assert decode["grid_ctas"] >= 132 and decode["dram_peak_opt"] >= 0.8  # split-K fills the SMs
    assert decode["bound"] == "dram"


def test_csv_and_markdown_files(report):
    import importlib.util

    _, paths = report
    spec = importlib.util.spec_from_file_location("static_report", os.path.join(BENCH, "static_report.py"))
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == sr.CSV_FIELDS and len(got) == 6
    # the work the live run counted, for a later merge's dense ratios (round 24)
    assert all(float(r["work"]) > 0 for r in got if r["status"] == "ok"), [r["work"] for r in got]
    md = open(paths["md"]).read()
    assert "Estimated from sm_90 machine code, not measured." in md
    table = [ln for ln in md.splitlines() if ln.startswith("| _dense_matmul_kernel |")]
    assert len(table) == 2  # one row per kernel × case in the markdown
    assert all(ln.count("|") == 14 for ln in table)


_CLI_SCRIPT = textwrap.dedent(
    """
    import torch, triton, triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    x = torch.empty(1 << 20)
    _scale_kernel[(x.numel() // 1024,)](x, torch.empty_like(x), x.numel(), BLOCK=1024)
    """
)


def test_cli_prints_a_table_for_any_script(tmp_path):
    """python -m bench.sass SCRIPT: a loop-free streaming kernel is DRAM-bound, reads 4 MB + writes 4 MB."""
    script = tmp_path / "scale.py"
    script.write_text(_CLI_SCRIPT)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.sass", str(script), "--arch", "90,80", "--json", str(out)],
                          env=_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("_scale_kernel") == 2 and "sm_80" in proc.stdout and "sm_90" in proc.stdout
    reports = json.loads(out.read_text())
    for r in reports:
        assert r["useful_bytes"] == 8 << 20 and r["ctas"] == 1024 and r["iterations"] == 1
        assert r["tensor_opt"] is None and r["dram_opt"] > 0.5 and r["bound"] == "dram", r


_SPILL_SCRIPT = textwrap.dedent(
    """
    import torch, triton, triton.language as tl

    @triton.jit
    def _hoard_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        keep = tl.load(x_ptr + offs)
        for i in range(0, n, BLOCK):
            acc += tl.load(x_ptr + i + offs) * keep
        tl.store(y_ptr + offs, acc + keep)

    x = torch.empty(1 << 16)
    # 4096 live fp32 values per warp in 32 registers per thread cannot fit: the compiler spills
    _hoard_kernel[(1,)](x, torch.empty(4096), x.numel(), BLOCK=4096, num_warps=1, maxnreg=32)
    """
)


def test_spills_are_seen(tmp_path):
    """The guard's no-spill check can fail: a kernel squeezed into 32 registers reports its stack."""
    script = tmp_path / "hoard.py"
    script.write_text(_SPILL_SCRIPT)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.sass", str(script), "--json", str(out)],
                          env=_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["regs"] <= 32 and r["stack"] > 0 and r["spill_ops"] > 0, r
    assert any(n.startswith("spills:") for n in r["notes"])


def test_cli_refuses_the_interpreter(tmp_path):
    env = _child_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "bench.sass", str(tmp_path / "x.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr


def test_chosen_best_fill_and_dense_ratio_on_hand_made_rows():
    """The report's round-2 columns: fill from the config, chosen vs best (best ranked by midpoint ×
    fill), and x dense as a time ratio (work over the judged fraction, same arch)."""
    sys.path.insert(0, BENCH)
    import launches
    import static_report as sr
    from qlk.kernels.heuristics import KernelChoice

    def row(case, kernel, config, opt, pess, work=None, ub=None, **kw):
        base = dict(arch=90, group=case.group, case=case.name, op=case.op, fmt=case.fmt, K=case.k, N=case.n,
                    M=case.m, kernel=kernel, config=config, status="ok", best=False, chosen=None,
                    tensor_peak_opt=opt if work else None, tensor_peak_pess=pess if work else None,
                    dram_peak_opt=kw.get("dram", (opt, pess))[0], dram_peak_pess=kw.get("dram", (opt, pess))[1],
                    useful_bytes=ub or 1, work=work or 0)
        base["fill"] = sr.fill(config, case, kernel)
        return base

    q = launches.Case("fwd/int4g32/2048->2048/M333", "qlk", "fwd", "int4g32", 2048, 2048, 333)
    d = launches.Case("dense-fwd/bf16/2048->2048/M333", "dense", "fwd", "bf16", 2048, 2048, 333)
    dq = launches.Case("dequant/int4g32/2048->2048", "qlk", "dequant", "int4g32", 2048, 2048, None)
    assert sr.fill("256x128x64 w8 s3", q, "_quant_matmul_fwd_kernel") == pytest.approx(333 / 512)
    assert sr.fill("64x128x64 w4 s4", d, "_dense_matmul_kernel") == pytest.approx(333 / 384)
    macs = 333 * 2048 * 2048
    big = row(q, "_quant_matmul_fwd_kernel", "256x128x64 w8 s3 GROUP_M=8", 0.5, 0.3, work=macs * 512 / 333)
    small = row(q, "_quant_matmul_fwd_kernel", "64x128x128 w4 s4 GROUP_M=8", 0.45, 0.3, work=macs * 384 / 333)
    dense = row(d, "_dense_matmul_kernel", "64x128x64 w4 s4", 0.6, 0.4, work=macs * 384 / 333)
    deq = row(dq, "_dequantize_kernel", "-x32x256 w4 s1", 0.8, 0.6, ub=2048 * 2048 * 2.6)
    rows = [big, small, dense, deq]
    sr.mark_chosen(rows, [("fwd", KernelChoice("fwd", 128, 64, 128, 8, 4, 4, 1, 96, 0.7, 0.9, 0.7, 0.4, 3))])
    assert (big["chosen"], small["chosen"], dense["chosen"]) == (False, True, None)
    sr.mark_best(rows)
    # 0.4 x 0.65 < 0.375 x 0.87: the padded 256-row tile loses although its raw estimate is higher
    assert small["best"] and not big["best"] and small["chosen_config"] == small["best_config"] == small["config"]
    sr.mark_dense_ratio(rows, 90)
    # same padded work (384 rows): time ratio = ratio of the tensor midpoints
    assert small["x_dense_fused"] == pytest.approx(0.375 / 0.5, abs=1e-3)
    assert 0 < small["x_dense_dequant"] < 1 and small["dispatch"] in ("fused", "dequant")
    assert small["x_dense"] == (small["x_dense_fused"] if small["dispatch"] == "fused" else small["x_dense_dequant"])
    assert any("✓" in line for line in sr._rules_table(rows, 90))


def test_merge_configs_adds_a_tile_to_committed_cases(tmp_path):
    """``--merge-configs`` (round 20): a partial run's rows join the report's cases config by config,
    replacing a row of the same config and adding new ones; in the cases it touched the rules' flags
    are the partial run's, best and the dense ratio are marked again; other cases keep every column;
    a case the report lacks is refused."""
    sys.path.insert(0, BENCH)
    import launches
    import static_report as sr

    def row(case, kernel, config, opt, pess, chosen=None, best=False):
        r = {f: None for f in sr.CSV_FIELDS}
        r.update(arch=90, group=case.group, case=case.name, op=case.op, fmt=case.fmt, K=case.k, N=case.n, M=case.m,
                 kernel=kernel, config=config, status="ok", best=best, chosen=chosen, tensor_peak_opt=opt,
                 tensor_peak_pess=pess, dram_peak_opt=0.1, dram_peak_pess=0.1, useful_bytes=1000)
        r["fill"] = sr.fill(config, case, kernel)
        return r

    q = launches.Case("fwd/int3g128/2048->2048/M400", "qlk", "fwd", "int3g128", 2048, 2048, 400)
    q2 = launches.Case("fwd/int3g128/2048->2048/M640", "qlk", "fwd", "int3g128", 2048, 2048, 640)
    d = launches.Case("dense-fwd/bf16/2048->2048/M400", "dense", "fwd", "bf16", 2048, 2048, 400)
    fk, old_tile, new_tile = "_quant_matmul_fwd_kernel", "128x64x64 w4 s4 GROUP_M=8", "64x128x128 w4 s4 GROUP_M=8"
    report = [row(d, "_dense_matmul_kernel", "64x128x64 w4 s4", 0.9, 0.5, best=True),
              row(q, fk, "256x128x64 w8 s3 GROUP_M=8", 0.9, 0.6, chosen=True, best=True),  # the old pick and best
              row(q, fk, old_tile, 0.85, 0.44, chosen=False),
              row(q2, fk, old_tile, 0.8, 0.4, chosen=True, best=True)]
    report[2]["x_dense"] = report[3]["x_dense"] = 0.5
    partial = [row(q, fk, old_tile, 0.85, 0.44, chosen=False), row(q, fk, new_tile, 0.96, 0.49, chosen=True)]
    into, part = str(tmp_path / "r-sm90.csv"), str(tmp_path / "p-sm90.csv")
    sr.write_csv(into, report)
    sr.write_csv(part, partial)
    assert sr.merge_configs(into, part) == (1, 1)
    merged = sr.read_csv(into)
    assert [r["config"] for r in merged] == [r["config"] for r in report] [:3] + [new_tile, old_tile]
    new, old = merged[3], merged[2]
    assert new["best"] and new["chosen"] and not old["best"] and old["chosen"] is False
    assert merged[1]["chosen"] is False and not merged[1]["best"]
    assert old["best_config"] == new_tile == old["chosen_config"]
    # same padded work (448 of 400 rows for both tiles): the time ratio is the midpoints' ratio
    assert new["x_dense_fused"] == pytest.approx((0.96 + 0.49) / 2 / 0.7, abs=2e-3)
    assert merged[4]["x_dense"] == 0.5 and merged[4]["chosen"] and merged[4]["best"]  # a case not touched
    stray = launches.Case("fwd/int3g128/2048->2048/M999", "qlk", "fwd", "int3g128", 2048, 2048, 999)
    sr.write_csv(part, [row(stray, fk, new_tile, 0.9, 0.5, chosen=True)])
    with pytest.raises(SystemExit, match="lacks"):
        sr.merge_configs(into, part)


def test_a_merge_marks_the_dense_ratio_as_the_live_run_did(tmp_path):
    """Round 24: the report's ``work`` column holds the work a live run counted (the MMA
    instructions' MACs, their own padding included), so ``--merge`` / ``--merge-configs`` re-mark a
    case's dense ratio from it and get the live run's number. Before, a re-mark recomputed the work
    as M·N·K / fill, which misses the instruction's padding: 260 of 1120 ratios of a family report
    moved, up to 7 %."""
    sys.path.insert(0, BENCH)
    import launches
    import static_report as sr

    m, k, n = 333, 2048, 2048
    q = launches.Case(f"fwd/int4g32/{k}->{n}/M{m}", "qlk", "fwd", "int4g32", k, n, m)
    d = launches.Case(f"dense-fwd/bf16/{k}->{n}/M{m}", "dense", "fwd", "bf16", k, n, m)

    def row(case, kernel, config, opt, pess, work):
        r = {f: None for f in sr.CSV_FIELDS}
        r.update(arch=90, group=case.group, case=case.name, op=case.op, fmt=case.fmt, K=case.k, N=case.n, M=case.m,
                 kernel=kernel, config=config, status="ok", best=False, chosen=None, tensor_peak_opt=opt,
                 tensor_peak_pess=pess, dram_peak_opt=0.1, dram_peak_pess=0.1, useful_bytes=1000, work=work)
        r["fill"] = sr.fill(config, case, kernel)
        return r

    macs = m * n * k
    # the dense tile's instructions do 9 % more than its padded output tile (e.g. a ragged K step)
    dense = row(d, "_dense_matmul_kernel", "64x128x64 w4 s4", 0.8, 0.6, macs * 384 / 333 * 1.09)
    fused = row(q, "_quant_matmul_fwd_kernel", "64x128x128 w4 s4 GROUP_M=8", 0.7, 0.5, macs * 384 / 333)
    rows = [dense, fused]
    sr.mark_best(rows)
    sr.mark_dense_ratio(rows, 90)
    live = fused["x_dense_fused"]
    assert live == pytest.approx(1.09 * 0.6 / 0.7, abs=2e-3)
    path = str(tmp_path / "r-sm90.csv")
    sr.write_csv(path, rows)
    again = sr.read_csv(path)
    assert again[0]["work"] == pytest.approx(dense["work"])
    sr.remark_cases(again, {q.name}, 90)
    assert again[1]["x_dense_fused"] == live
    # a report written before the column: the padded output tiles' MACs (the dense row's 9 % unseen)
    for r in again:
        r["work"] = None
    sr.remark_cases(again, {q.name}, 90)
    assert again[1]["x_dense_fused"] == pytest.approx(0.6 / 0.7, abs=2e-3)

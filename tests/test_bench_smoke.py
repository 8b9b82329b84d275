"""CPU smoke test of the benchmark harness (bench/): it checks the harness, never speed.

CSV writer and statistics, the ratio rows, provider-unavailable reporting, the operand
conversions for the peer kernels, the charts and summary from a synthetic CSV, the loud failure
of the GPU scripts on a CPU, and the reference quant_matmul timed with pytest-benchmark.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import bench_kernels as bk  # noqa: E402
import common  # noqa: E402

import qlk  # noqa: E402


def test_quantiles_and_rates():
    s = common.quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.p50, s.p20, s.p80) == (3.0, 1.8, 4.2)
    rate = s.scaled(12.0)  # slow times are low rates: p20 of the rate comes from p80 of the time
    assert rate.p50 == pytest.approx(4.0) and rate.p20 == pytest.approx(12 / 4.2) and rate.p80 == pytest.approx(12 / 1.8)
    assert rate.p20 <= rate.p50 <= rate.p80
    with pytest.raises(ValueError):
        common.quantiles([])


def test_measure_cpu_timer_and_rotation():
    seen = []
    rot = common.Rotating(lambda: torch.randn(4), count=3)
    t = common.measure(lambda: seen.append(rot()), warmup_ms=0, rep_ms=1, device="cpu")
    assert t.timer == "cpu-wallclock" and 0 < t.p20 <= t.p50 <= t.p80
    assert len({id(x) for x in seen}) == 3  # every buffer used, in turn
    assert common.Rotating.count_for(1, l2=100) == 8 and common.Rotating.count_for(10**9, l2=100) == 2


def test_csv_rows_round_trip(tmp_path):
    path = str(tmp_path / "k.csv")
    w = common.ResultWriter(path, "kernels")
    ceil = {"copy_gbps": common.Stats(3000.0, 2900.0, 3100.0), "matmul_tflops": common.Stats(800.0, 790.0, 810.0),
            "copy_gib": 1.0, "mm_size": 8192}  # fmt: skip
    w.ceilings(ceil)
    t = common.Stats(2.0, 1.9, 2.2)
    w.timing("qlk", t, flops=1.6e12, nbytes=4e9, ceilings=ceil, op="fwd", shape="4096->4096", fmt="int4g32", M=8192,
             dtype="bfloat16")  # fmt: skip
    w.status("gemlite", "unavailable: ImportError: no module", op="fwd")
    w.close()
    rows = common.read_csv(path)
    assert list(rows[0]) == common.FIELDS
    by = {r["metric"]: r for r in rows if r["provider"] == "qlk"}
    assert set(by) == {"time_ms", "tflops", "frac_tensor_peak", "gbps", "frac_bw_peak"}
    assert float(by["tflops"]["p50"]) == pytest.approx(800.0)  # 1.6e12 flop in 2 ms
    assert float(by["frac_tensor_peak"]["p50"]) == pytest.approx(1.0)
    assert float(by["gbps"]["p50"]) == pytest.approx(2000.0) and float(by["frac_bw_peak"]["p20"]) == pytest.approx(4e9 / 2.2e6 / 3000)
    assert rows[-1]["status"].startswith("unavailable:") and rows[-1]["p50"] == ""
    assert all(r["gpu"] and r["timestamp"] and "torch=" in r["versions"] for r in rows)


def test_speedup_rows():
    w = common.ResultWriter(None, "kernels")
    times = {
        ("cublas", "fwd", "s", "bf16", 1, "bfloat16"): common.Stats(4.0, 4.0, 4.0),
        ("qlk", "fwd", "s", "int4g32", 1, "bfloat16"): common.Stats(1.0, 0.8, 1.25),
        ("tinygemm", "fwd", "s", "int4g32", 1, "bfloat16"): common.Stats(2.0, 2.0, 2.0),
    }
    common.speedup_rows(w, times, "cublas", peers_of=lambda p: ["tinygemm"] if p == "qlk" else [])
    got = {(r["provider"], r["metric"]): r for r in w.rows}
    assert float(got[("qlk", "speedup_vs_cublas")]["p50"]) == 4.0
    assert float(got[("qlk", "speedup_vs_cublas")]["p20"]) == pytest.approx(3.2)  # from the slow p80 time
    assert float(got[("qlk", "speedup_vs_tinygemm")]["p50"]) == 2.0
    assert float(got[("tinygemm", "speedup_vs_cublas")]["p50"]) == 2.0
    assert ("cublas", "speedup_vs_cublas") not in got


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (2, 32)])
def test_peer_operands_match_qlk(bits, group):
    w = torch.randn(64, 256) * 0.02
    qw = qlk.quantize(w, bits=bits, group_size=group)
    ref = qw.dequantize(torch.float32)
    # gemlite and GPTQ take integer zeros: equal to s*q + b up to the fp16 rounding of b = -s*z
    codes, s, z = bk.gemlite_operands(qw, torch.float32)
    assert torch.allclose(bk.gemlite_dequantize(codes, s, z, group), ref, atol=2e-4)
    if bits == 4:
        packed, sz = bk.tinygemm_operands(qw, torch.float32)
        assert packed.dtype == torch.uint8 and packed.shape == (64, 128) and sz.shape == (256 // group, 64, 2)
        assert torch.allclose(bk.tinygemm_dequantize(packed, sz, group), ref, atol=1e-6)
        qweight, scales, qzeros = bk.gptq_v1_operands(qw)
        assert qweight.shape == (32, 64) and qzeros.shape == (256 // group, 8)
        assert torch.allclose(bk.gptq_v1_dequantize(qweight, scales, qzeros, group), ref, atol=2e-4)


def test_unavailable_providers_are_reported(tmp_path):
    """Providers that cannot import, cannot build, or do not exist each leave a row with a reason."""
    args = bk.parse_args(["--shapes", "64->128", "--ms", "2", "--formats", "int4g32", "--ops", "fwd",
                          "--providers", "cublas,tinygemm,exllamav2,no_such_kernel", "--warmup-ms", "0", "--rep-ms", "1",
                          "--out", str(tmp_path / "k.csv")])  # fmt: skip
    w = common.ResultWriter(args.out, "kernels")
    bk.run(args, w, device="cpu")
    w.close()
    rows = common.read_csv(args.out)
    status = {r["provider"]: r["status"] for r in rows if r["metric"] == "status"}
    assert status["exllamav2"].startswith("unavailable:")
    assert status["no_such_kernel"].startswith("unavailable: unknown provider")
    if not torch.cuda.is_available():  # torch's int4 tinygemm packing has no CPU kernel
        assert status["tinygemm"].startswith("unavailable:")
    cub = [r for r in rows if r["provider"] == "cublas" and r["metric"] == "time_ms"]
    assert cub and cub[0]["status"] == "ok" and float(cub[0]["p50"]) > 0 and "cpu-wallclock" in cub[0]["note"]
    err = [r for r in rows if r["provider"] == "cublas" and r["metric"] == "rel_err"]
    assert err and float(err[0]["p50"]) < 1e-2


def _synthetic_kernel_csv(path):
    w = common.ResultWriter(path, "kernels")
    for shape in ("4096->4096", "4096->14336"):
        times = {}
        for m in (1, 16, 256, 4096):
            base = common.Stats(0.01 + m * 1e-4, 0.0099 + m * 1e-4, 0.0102 + m * 1e-4)
            times[("cublas", "fwd", shape, "bf16", m, "bfloat16")] = base
            for prov, f in (("qlk", 2.5 if m < 64 else 0.9), ("bnb_dequant", 0.6)):
                t = common.Stats(base.p50 / f, base.p20 / f, base.p80 / f)
                times[(prov, "fwd", shape, "nf4", m, "bfloat16")] = t
        for (p, op, s, fmt, m, dt), t in times.items():
            w.timing(p, t, flops=2.0 * m * 4096 * 4096, op=op, shape=s, fmt=fmt, M=m, dtype=dt)
        common.speedup_rows(w, times, "cublas", peers_of=lambda p: ["bnb_dequant"] if p == "qlk" else [])
    w.status("gemlite", "unavailable: ImportError: synthetic")
    w.close()


def test_plot_and_summary_from_synthetic_csv(tmp_path):
    import plot

    path = str(tmp_path / "kernels.csv")
    _synthetic_kernel_csv(path)
    md_path = str(tmp_path / "summary.md")
    charts = pytest.importorskip("matplotlib") is not None
    assert plot.main([path, "--outdir", str(tmp_path), "--summary", md_path] + ([] if charts else ["--no-charts"])) == 0
    md = open(md_path).read()
    assert "speedup vs cuBLAS" in md and "| 4096->14336 | nf4 | 4096 |" in md
    assert "gemlite: unavailable: ImportError: synthetic" in md
    png = tmp_path / "speedup_fwd.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure")
@pytest.mark.parametrize("script", ["bench_kernels.py", "bench_layer.py", "bench_e2e.py"])
def test_gpu_scripts_fail_loudly_without_cuda(script, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick", "--out", str(tmp_path / "x.csv")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "needs CUDA" in r.stderr
    assert not (tmp_path / "x.csv").exists()


def test_shell_scripts_parse():
    for name in ("gpu_check.sh", "prepare_wheels.sh"):
        subprocess.run(["bash", "-n", os.path.join(BENCH, name)], check=True)


def test_reference_quant_matmul_timed(request):
    """The reference path of quant_matmul on a tiny shape, through pytest-benchmark's fixture."""
    pytest.importorskip("pytest_benchmark")
    benchmark = request.getfixturevalue("benchmark")
    qw = qlk.quantize(torch.randn(96, 128) * 0.02, bits=4, group_size=32)
    x = torch.randn(8, 128)
    y = benchmark.pedantic(qlk.quant_matmul, args=(x, qw), kwargs={"backend": "reference"}, rounds=5, iterations=1)
    assert common.rel_err(y, x @ qw.dequantize(torch.float32).t()) < 1e-5


def test_layer_and_e2e_harness_run_on_cpu(tmp_path):
    """The layer and end-to-end harnesses drive qlk.patch_model and PEFT as the GPU run will (on the
    CPU, qlk takes its reference path): an API mismatch shows up here, not in a GPU call."""
    pytest.importorskip("peft")
    import bench_e2e
    import bench_layer

    args = bench_layer.parse_args(["--shapes", "64->128", "--ms", "8", "--providers", "qlk_qalora,peft_bf16",
                                   "--warmup-ms", "0", "--rep-ms", "1", "--out", str(tmp_path / "layer.csv")])  # fmt: skip
    w = common.ResultWriter(args.out, "layer")
    bench_layer.run(args, w, device="cpu")
    w.close()
    args = bench_e2e.parse_args(["--model", "tiny", "--batch", "1", "--seq", "16", "--warmup", "0", "--steps", "1",
                                 "--providers", "qlk_qalora,bf16_lora", "--out", str(tmp_path / "e2e.csv")])  # fmt: skip
    w = common.ResultWriter(args.out, "e2e")
    bench_e2e.run(args, w, device="cpu")
    w.close()
    rows = common.read_csv(str(tmp_path / "layer.csv"), str(tmp_path / "e2e.csv"))
    bad = [(r["provider"], r["status"]) for r in rows if r["status"] != "ok"]
    assert not bad
    timed = {(r["bench"], r["provider"]) for r in rows if r["metric"] in ("time_ms", "tokens_per_s")}
    assert timed == {("layer", "qlk_qalora"), ("layer", "peft_bf16"), ("e2e", "qlk_qalora"), ("e2e", "bf16_lora")}
    md = common.summary_markdown(rows)
    assert "Layer step" in md and "Training step" in md


@pytest.mark.parametrize("wrong_at", [None, 2, 5])
def test_kernel_bench_checks_every_m_and_fails_on_a_wrong_result(tmp_path, monkeypatch, wrong_at):
    """bench_kernels checks each op at every timed M against float64 math and the script exits 1
    when one result is wrong: a provider that is wrong only at M = 5 (say, a split-K path that
    only that M takes) is caught, not hidden behind a correct M = 16 check."""
    import torch.nn.functional as F

    def build(self, case):
        w = case.w

        def fwd(x, dy):
            y = F.linear(x, w)
            return y * 1.5 if x.shape[0] == wrong_at else y

        return {"fwd": fwd}, w.float()

    monkeypatch.setattr(bk.Cublas, "build", build)
    monkeypatch.setattr(common, "require_cuda", lambda what: torch.device("cpu"))
    args = bk.parse_args(["--shapes", "64->96", "--ms", "2,5", "--formats", "int4g32", "--ops", "fwd",
                          "--providers", "cublas", "--warmup-ms", "0", "--rep-ms", "1",
                          "--out", str(tmp_path / "k.csv")])  # fmt: skip
    rc = common.run_benchmark("kernels", args, lambda a, w: bk.run(a, w, device="cpu"))
    rows = common.read_csv(args.out)
    checks = {int(r["M"]): r["status"] for r in rows if r["metric"] == "rel_err"}
    timings = {int(r["M"]): r["status"] for r in rows if r["metric"] == "time_ms"}
    assert set(checks) == set(timings) == {2, 5}
    for m in (2, 5):
        assert checks[m].startswith("wrong") == (m == wrong_at) and timings[m] == checks[m]
    assert rc == (0 if wrong_at is None else 1)


def test_gpu_calibrate_dry_run_and_join(tmp_path):
    """bench/gpu_calibrate.py on CPU (the interpreter, wall clock): a row per candidate and per dense
    config, each checked against float64 (a wrong tile would say so); then bench/calibrate_static.py
    joins such rows with static rows of the same case and tile: measured / pessimistic is the
    measured time over the pessimistic estimate, and "x dense" is best dense over best fused."""
    import calibrate_static as cs
    import gpu_calibrate as gc

    out = tmp_path / "cal.csv"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(BENCH, "gpu_calibrate.py"), "--device", "cpu", "--shapes", "128->80",
                    "--ms", "17", "--formats", "int4g32,nf4dq", "--reps", "1", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=600)
    rows = cs.read_gpu_csv(str(out))
    assert {r["group"] for r in rows} == {"dense", "cublas", "qlk"}
    qlk_rows = [r for r in rows if r["group"] == "qlk"]
    assert {r["case"] for r in qlk_rows} == {"fwd/int4g32/128->80/M17", "fwd/nf4dq/128->80/M17",
                                             "dgrad/int4g32/128->80/M17", "dgrad/nf4dq/128->80/M17"}
    assert all(r["status"] == "ok" and float(r["rel_err"]) < 2e-2 and r["time_us"] > 0 for r in qlk_rows)

    # the join, on rows made up for it: a fused tile twice its pessimistic estimate, dense at its own
    from bench.sass import gpu

    def static(case, group, kernel, config, opt, pess):
        return dict(case=case, group=group, kernel=kernel, config=config, status="ok", M=4096, N=4096, K=4096,
                    op="fwd", arch=90, tensor_peak_opt=opt, tensor_peak_pess=pess, dram_peak_opt=0.1,
                    dram_peak_pess=0.1, iterations=64, grid_ctas=1, useful_bytes=1, fill=1.0,
                    work=4096 ** 3, chosen=None)

    srows = [static("fwd/int4g32/4096->4096/M4096", "qlk", "_quant_matmul_fwd_kernel", "256x128x64 w8 s3 GROUP_M=8", 0.9, 0.6),
             static("dense-fwd/bf16/4096->4096/M4096", "dense", "_dense_matmul_kernel", "128x256x64 w8 s3 GROUP_M=8", 0.9, 0.6)]
    g = gpu(90)
    pess = cs.estimate_us(srows[0], g, "pess")
    assert pess == pytest.approx(4096 ** 3 / (0.6 * g.tensor_macs_per_clk * g.sms * g.ghz * 1e9) * 1e6)
    grows = [dict(case=srows[0]["case"], group="qlk", config="256x128x64 w8 s3", M=4096, chosen="True", status="ok",
                  time_us=2 * pess),
             dict(case=srows[1]["case"], group="dense", config="128x256x64 w8 s3", M=4096, chosen="", status="ok",
                  time_us=pess),
             dict(case=srows[1]["case"], group="cublas", config="", M=4096, chosen="", status="ok", time_us=pess / 2)]
    joined = cs.join(grows, srows, g)
    assert [round(j["ratio"], 6) for j in joined] == [2.0, 1.0]
    (d,) = cs.x_dense(joined, grows)
    assert d["measured"] == pytest.approx(0.5) and d["estimated"] == pytest.approx(1.0)
    assert d["cublas"] == pytest.approx(0.25) and d["chosen_vs_best"] == pytest.approx(1.0)


def test_gpu_calibrate_flags_a_wrong_tile(monkeypatch):
    """A launch whose output is wrong is timed but marked "wrong" (its rel_err against float64 in the
    row): a fast wrong tile must not pass for a fast tile."""
    import gpu_calibrate as gc
    import launches

    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import heuristics as h

    def zeros(x, qw, out=None, path="auto"):
        out.zero_()
        return out

    monkeypatch.setattr(fm, "quant_matmul_forward", zeros)
    monkeypatch.setattr(launches, "DTYPE", torch.float32)
    dev = torch.device("cpu")
    timer = gc.Timer(dev, calls=1, reps=1, flush_mb=1)
    rows = gc.qlk_rows(fm, h, launches, timer, dev, fm.target_arch(), fm.num_sms(dev), 128, 80, 17, "int4g32",
                       "fwd", torch.float32)
    assert rows and all(r["status"] == "wrong" and float(r["rel_err"]) == pytest.approx(1.0) for r in rows), rows


@pytest.mark.parametrize("op,m,launcher,flag,suffix,names", [
    ("dgrad", 333, "quant_matmul_grad_input", "GRAD_W_AS_A", " W_AS_A", ("B", "W_AS_A")),
    ("fwd", 5, "quant_matmul_forward", "SPLITK_FINISH", " FINISH", ("3 launches", "FINISH")),
])
def test_gpu_calibrate_times_both_variants(op, m, launcher, flag, suffix, names, monkeypatch):
    """Two flags are timed both ways: on sm_90 the GEMM input gradient with Ŵ as the B operand and as
    the transposed product (fused_matmul.GRAD_W_AS_A, " W_AS_A" rows), and the split-K decode forward
    in three launches and finished in the kernel (SPLITK_FINISH, " FINISH" rows, round 37). The flag
    is set during each launch and restored after; the rules' pick is the default's row;
    calibrate_static pairs the two rows of a tile, and its static join sees the default only."""
    import calibrate_static as cs
    import gpu_calibrate as gc
    import launches

    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import heuristics as h

    flags = []

    def product(a, qw, out=None, path="auto"):
        flags.append(getattr(fm, flag))
        w = qw.dequantize(torch.float32)
        out.copy_(a @ (w if op == "dgrad" else w.t()))
        return out

    monkeypatch.setattr(fm, launcher, product)
    monkeypatch.setattr(launches, "DTYPE", torch.float32)
    dev = torch.device("cpu")
    rows = gc.qlk_rows(fm, h, launches, gc.Timer(dev, calls=1, reps=1, flush_mb=1), dev, 90, 132, 128, 80, m,
                       "int4g32", op, torch.float32)
    assert getattr(fm, flag) is False
    labels = [r["config"] for r in rows]
    assert len(labels) >= 2 and labels[1::2] == [c + suffix for c in labels[0::2]]
    half = len(flags) // 2  # each variant: the checked call, then the timed ones
    assert sorted(flags) == [False] * half + [True] * half and flags[0] is False and flags[-1] is True, flags
    assert all(r["status"] == "ok" for r in rows) and sum(r["chosen"] for r in rows) == 1
    assert not any(r["chosen"] for r in rows[1::2])
    for r in rows:
        r["time_us"] = 2.0 if r["config"].endswith(suffix) else 3.0
    pairs = cs.variant_pairs(rows)
    assert pairs == {(r["case"], r["config"]): {names[0]: 3.0, names[1]: 2.0} for r in rows[0::2]}
    assert cs.tile_of(rows[1]["config"]) == rows[0]["config"]


@pytest.mark.parametrize("finish", [False, True])
def test_host_overhead_counts_the_grouped_decode_launches(finish):
    """``--experts`` (round 38): the grouped forward at one token (split-K) is the tile map's one
    launch and the kernel with ``--finish``; without it also the workspace's zeroing, the per-row
    expert bias pass and the cast (11). ``--moe-layer`` (round 39, in the same run): a whole
    MixtralExperts call at one token is 4 launches on the decode path (the routing, which also writes
    both projections' tile map, and two kernels, the gate-up one reading the hidden states in place
    and forming silu(G)·U in its epilogue (round 40: no gather, tile map, SiLU or product launches),
    the combine), 16 through the general glue."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, os.path.join(BENCH, "host_overhead.py"), "--experts", "--device", "meta",
                        "--m", "1", "--calls", "3", *(["--finish"] if finish else ["--moe-layer"])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| int4g128", "| nf4"))]
    grouped = [row for row in rows if "| experts fwd | 2 |" in row]
    assert len(grouped) == 2, r.stdout
    assert [int(row.split("|")[-3]) for row in grouped] == [2 if finish else 11] * 2, rows
    layer = {row.split("|")[4].strip(): int(row.split("|")[-3]) for row in rows if "| experts layer | 1 |" in row}
    assert layer == ({} if finish else {"decode": 4, "general": 16}), rows


@pytest.mark.parametrize("mode", [["--device", "meta", "--stub", "jit"], ["--layer"],
                                  ["--device", "meta", "--stub", "jit", "--finish"]])
def test_host_overhead_runs(mode):
    """bench/host_overhead.py (the interpreter off, kernels stubbed): every row printed, a number each;
    the decode forward's device launches: the workspace's zeroing, the kernel and the cast, or with
    ``--finish`` (fused_matmul.SPLITK_FINISH) the kernel alone."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, os.path.join(BENCH, "host_overhead.py"), "--m", "1,64", "--calls", "3", *mode],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| int4g128") or line.startswith("| nf4")]
    assert len(rows) == (6 if mode == ["--layer"] else 8), r.stdout
    assert all(float(row.split("|")[-2]) > 0 for row in rows)
    decode = [row for row in rows if "| fwd | 1 | splitk |" in row or "| layer base | 1 |" in row]
    assert len(decode) == 2 and all(int(row.split("|")[-3]) == (1 if "--finish" in mode else 3) for row in decode), rows

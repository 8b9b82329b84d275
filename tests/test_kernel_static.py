"""Static checks of the machine code of every qlk kernel, no GPU needed: the regression guard of
the static report.

A representative subset of the report's cases (bench/launches.py, the report's main shape
4096→14336 at M = 4096 and M = 1) is compiled for sm_90 (H100) and sm_80 (A100) with every candidate
config, exactly as the JIT would specialize it (bench/sass: a driver that only reports the
target; nothing runs), and read by qlk's static analyzer:

* every qlk kernel compiles for both archs;
* no spills: stack frame 0 and no LDL/STL;
* shared memory within what a CTA may use (227 KB sm_90, 163 KB sm_80);
* the large-M fused GEMM (forward and input gradient) uses wgmma (HGMMA) on sm_90, mma.sync on sm_80;
* no sm_90 main loop has its wgmmas serialized (each waiting for the previous one: ptxas's C7515,
  which a zero-trip path of the loop caused in 22 % of the launches before round 25's LOOP_RUNS);
* no estimate falls more than ``TOLERANCE`` below the committed report
  (bench/results/static-sm<arch>.csv) for the same case and kernel: a change that slows a kernel's
  main loop, spills or shrinks its grid fails here until the report is regenerated
  (``make static-report``) and the loss is accepted in review.

The compilation runs in a subprocess (this file as a script) because the test process runs the
Triton interpreter (tests/conftest.py), under which ``@triton.jit`` builds nothing to compile.
Any failure in it, an import that breaks included, fails the tests; they skip only when Triton's
NVIDIA backend tools (ptxas, cuobjdump) are not installed at all.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
SMEM_LIMIT = {90: 232448, 80: 166912}
TOLERANCE = 0.05
#: the cases compiled, per arch (shell patterns over bench/launches.py case names)
CASES = {
    90: ["fwd/int4g32/4096->14336/*", "dgrad/int4g32/4096->14336/*", "fwd/nf4dq/4096->14336/*",
         "dgrad/nf4dq/4096->14336/M4096", "dgrad/nf4dq/4096->14336/M1", "dgrad-gemv/nf4dq/4096->14336/M1",
         "fwd/int3g128/4096->14336/M4096", "dgrad/int3g128/4096->14336/M4096",
         "fwd/int3g128/4096->14336/M1", "fwd/int2g32/4096->14336/M1",
         # round 20: M = 256 compiles the 64x128x128 tiles, INT3's lane-owned forward asm among them
         "fwd/int3g128/4096->14336/M256", "dgrad/int3g128/4096->14336/M256",
         # (round 25: M = 4096 too, QA-LoRA's pooled GEMM forward, whose wgmmas were serialized)
         "qalora/int4g32/4096->14336/*",
         "dequant/int4g32/*"],
    # (round 25: NF4's forward at M = 4096 for the no-spill check: its 128x128x32 w8 tile spilled
    # 16 B with LOOP_RUNS, which sm_80's launches do not pass)
    80: ["fwd/int4g32/4096->14336/*", "dgrad/int4g32/4096->14336/*", "dgrad/nf4dq/4096->14336/M1",
         "fwd/nf4dq/4096->14336/M4096",
         "dgrad/int2g32/4096->14336/M4096", "dgrad-gemv/nf4dq/4096->14336/M1",
         "qalora/int4g32/4096->14336/M1",
         "dequant/int4g32/*"],
}
#: round 10, compiled for the no-spill and shared-memory checks only (not in the committed report): a K
#: ragged for the input gradients' 128-column tiles (gpt-oss's 2880; SmolLM2's 576 runs the same code,
#: the last K tile shifted back, fused_matmul.shift_last_k), where sm_80's 64x64x128 w2 gradient
#: spilled 72-160 B and split-N 8 B, and QA-LoRA's gradient at an M its rules would split (M = 100),
#: where the split 64x64x128 / 64x32x128 w4 tiles spilled 8-16 B: per arch, ((K, N), ...), Ms, cases
GUARD_ONLY = {
    80: (((2880, 4096),), (16, 100, 3000),
         ["dgrad/int4g32/*", "dgrad/nf4dq/*", "dgrad-splitn/nf4dq/*", "qalora-dgrad/int4g32/*"]),
    # round 25: the ragged K's forward GEMM (its cut last K tile after the loop) and split-K / split-N
    # at M = 16, every candidate, for the wgmma check (and spills)
    90: (((2880, 4096),), (16, 3000), ["fwd/int4g32/*", "fwd/nf4dq/*", "dgrad/int2g32/*"]),
}
#: round 31, the other group sizes (bench/launches.py --formats), compiled for the no-spill check and
#: for compiling at all: sm_90's INT3 g32 input gradient on the B-operand tile failed in Triton's
#: pipeline ("Illegal shared layout") at every M >= 64, and sm_80's INT2 g64 split-N 16x64x128 w4 s4
#: spilled 8 B; per arch, (((K, N), ...), Ms, cases, formats)
GUARD_FORMATS = {
    90: (((2048, 2048),), (64,), ["dgrad/int3g32/*", "dgrad/int3g64/*"], ("int3g32", "int3g64")),
    80: (((2048, 2048),), (16,), ["dgrad/int2g64/*"], ("int2g64",)),
}
#: round 33, the dense split-K forward's one-slice launch (DIRECT: Y stored by the kernel) on sm_80,
#: where its epilogue index went through an 8 B stack slot across the loop's zero-trip path until
#: the launch told the compiler the loop runs (INT4 g64's 16x64x128 w4 at 4096->14336, M = 128:
#: one slice of 8 K tiles); same layout as GUARD_FORMATS
GUARD_DIRECT = {
    80: (((4096, 14336),), (128,), ["fwd-splitk/int4g64/*"], ("int4g64",)),
}
#: round 36, compiled with fused_matmul.GRAD_W_AS_A (the input gradient as the transposed product,
#: off by default): the rules' pick only, marked ``w_as_a``; same layout as GUARD_FORMATS
GUARD_W_AS_A = {
    90: (((4096, 14336),), (4096,), ["dgrad/int4g32/*", "dgrad/nf4dq/*", "dgrad/int3g128/*"],
         ("int4g32", "nf4dq", "int3g128")),
}
KERNELS = ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel", "_quant_matmul_splitk_kernel",
           "_quant_matmul_grad_input_splitn_kernel", "_quant_matmul_grad_input_gemv_kernel", "_dequantize_kernel",
           "_fold_bias_kernel")
#: launch-side helpers of a case (one pass over ~1/64 of the weight before the GEMM): compiled and
#: checked for spills and shared memory like the rest, but not judged by the report's estimates
HELPER_KERNELS = ("_nf4_denest_kernel",)


def _nvidia_tools_missing() -> bool:
    try:
        import triton
    except ImportError:
        return True
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


def compile_rows(extra_env=None, timeout=900) -> list:
    """Run this file as a script; its rows, or AssertionError with the child's stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"static compile failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rows():
    if _nvidia_tools_missing():
        pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    return compile_rows()


def test_every_kernel_compiled(rows):
    got = {(r["kernel"], r["arch"]) for r in rows}
    for arch in (90, 80):
        for name in KERNELS:
            assert (name, arch) in got, (name, arch)
    assert all(r["status"] == "ok" for r in rows), [(r["case"], r["status"]) for r in rows if r["status"] != "ok"]
    # the guard-only launches: the ragged-K GEMM and split-N gradients, QA-LoRA's unsplit at M = 100
    guard = {(r["kernel"], r["config"].split()[0]) for r in rows if r.get("guard_only")}
    assert ("_quant_matmul_grad_input_kernel", "64x64x128") in guard, guard
    assert ("_quant_matmul_grad_input_splitn_kernel", "16x128x128") in guard, guard
    # round 31: every format's input gradient compiles (INT3 g32 on sm_90 did not)
    formats = {(r["arch"], r["case"].split("/")[1]) for r in rows if r.get("guard_only")}
    assert {(90, "int3g32"), (90, "int3g64"), (80, "int2g64")} <= formats, formats
    # round 33: a one-slice split-K forward (DIRECT) among them
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import static_report

    direct = [r for r in rows if r.get("guard_only") and r["kernel"] == "_quant_matmul_splitk_kernel"
              and static_report.split_direct(r)]
    assert any(r["arch"] == 80 for r in direct), [(r["config"], r["grid_ctas"]) for r in rows if r.get("guard_only")]


def test_no_spills(rows):
    bad = [r for r in rows if r["stack"] or r["spill_ops"]]
    assert not bad, [(r["kernel"], r["arch"], r["config"], r["stack"], r["spill_ops"]) for r in bad]


def test_shared_memory_fits(rows):
    bad = [r for r in rows if r["smem_bytes"] > SMEM_LIMIT[r["arch"]]]
    assert not bad, [(r["kernel"], r["arch"], r["config"], r["smem_bytes"]) for r in bad]


def test_gemm_uses_the_tensor_cores(rows):
    for r in rows:
        if r["kernel"] in ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel"):
            want = "tensor:HGMMA" if r["arch"] == 90 else "tensor:HMMA"
            assert want in r["mix"], (r["kernel"], r["arch"], r["config"], r["fmt"], r["mix"])


def test_grad_tile_leaves_in_whole_rows(rows):
    """sm_90's input gradient stores its decoded tile to shared memory in 16-byte rows (round 18's
    B-operand tile) or 8 transposed stores (the Ŵᵀ tile): at most 16 STS an iteration. INT3's
    B-operand tile gives each thread a whole 32-column chunk; on a tile with fewer chunks than
    threads the chunk is split and stored element by element (256x64x64 w8: 82 STS, smem-bound at
    twice its cycles), which ``heuristics.grad_w_as_b`` must keep on Ŵᵀ. INT3's 64x128x128 tile
    (round 20; compiled here since round 25 made it a candidate at M = 4096) stores its rows in 16
    STS.128 and two 16-bit values a thread shares with its neighbours: 18."""
    grads = [r for r in rows if r["arch"] == 90 and r["kernel"] == "_quant_matmul_grad_input_kernel"
             and not r.get("guard_only")]  # (the guard's INT2 128x128x64 w4: 64 STS, as in every report)
    assert any(r["fmt"] == "int3g128" and r["config"].startswith("256x64x64") for r in grads)
    for r in grads:
        mix = dict(kv.split("=") for kv in r["mix"].split(";") if "=" in kv)
        assert int(mix.get("smem:STS", 0)) <= 18, (r["case"], r["config"], r["mix"])


def test_nf4_codes_looked_up_by_shuffle(rows):
    """The compiled NF4 kernels take the inline-PTX warp-shuffle lookup (qlk/kernels/nf4_tile.py),
    not the interpreter's byte-table twin: no SHFL, and gathers the pipeliner turns into LDGSTS.64
    (16 per iteration of the 256-row tiles). 8-byte copies also carry packed words whose row stride
    is a multiple of 8 words but not 16 (K = 2880: 360 words; round 13's QN_ALIGN), at most one per
    16 codes a thread decodes, i.e. per 8 SHFL of the lookup (two codes a shuffle); more than that
    is a table gather."""
    nf4 = [r for r in rows if r["fmt"] == "nf4dq" and r["kernel"] in KERNELS]
    assert nf4
    for r in nf4:
        mix = dict(kv.split("=") for kv in r["mix"].split(";") if "=" in kv)
        assert "shfl" in mix and int(mix.get("gload:LDGSTS.64", 0)) <= max(2, int(mix["shfl"]) // 8), \
            (r["case"], r["arch"], r["config"], r["mix"])


HALF2_NF4_KERNELS = ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel", "_quant_matmul_splitk_kernel",
                     "_quant_matmul_grad_input_splitn_kernel")


def test_nf4_pairs_scaled_in_half2(rows):
    """Round 21: the compiled NF4 MMA kernels (bf16 activations) scale each looked-up pair with one
    HFMA2 (``nf4_tile.pair_half_asm``): one half2 op per two shuffles, and no per-weight FMUL (the
    fp32 product: two FMUL a pair) beyond the few of the loop's bookkeeping."""
    nf4 = [r for r in rows if r["fmt"] == "nf4dq" and r["kernel"] in HALF2_NF4_KERNELS]
    assert {r["kernel"] for r in nf4} >= {"_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel"}
    for r in nf4:
        mix = dict(kv.split("=") for kv in r["mix"].split(";") if "=" in kv)
        shfl = int(mix["shfl"])
        assert 2 * int(mix.get("fp16x2", 0)) >= shfl and int(mix.get("fp32", 0)) < shfl // 4, \
            (r["case"], r["arch"], r["config"], r["mix"])


def test_nf4_gemms_load_their_absmax_paired(rows):
    """Round 26: the NF4 forward and input-gradient GEMMs (bf16 activations, de-nested absmax) read each
    block's scale as an int32 bf16 pair (``weight_args(pair_act=...)``) instead of converting the fp32
    absmax in their loops: no F2F in the loop (sm_90's 64x128x128 forward: 8 F2F and 8 IMAD an
    iteration before, its input gradient 4 and 4)."""
    nf4 = [r for r in rows if r["fmt"] == "nf4dq"
           and r["kernel"] in ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel")]
    assert {(r["arch"], r["kernel"]) for r in nf4} == {(a, k) for a in (80, 90) for k in (
        "_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel")}
    for r in nf4:
        assert "cvt:F2F" not in r["mix"], (r["case"], r["arch"], r["config"], r["mix"])


def test_nf4_transposed_tile_reaches_the_mma_by_ldmatrix(rows):
    """Round 22: sm_80's NF4 input gradients with the transposed tile (split N at small M) load the
    absmax codes by inline PTX (``nf4_tile._absmax_nc``). A ``tl.load`` of the uint8 codes behind the
    MMA operand made Triton size it for 8-bit data (kWidth 4): the Ŵᵀ and dY fragments then left
    shared memory by LDS.64 and took a register move each (115-188 IMAD an iteration against 64-128
    SHFL of the lookup); now by LDSM, with fewer IMAD than SHFL."""
    nf4 = [r for r in rows if r["arch"] == 80 and r["fmt"] == "nf4dq"
           and r["kernel"] == "_quant_matmul_grad_input_splitn_kernel"]
    assert nf4
    for r in nf4:
        mix = dict(kv.split("=") for kv in r["mix"].split(";") if "=" in kv)
        assert int(mix.get("smem:LDSM", 0)) > 0 and int(mix.get("imad", 0)) <= int(mix["shfl"]), \
            (r["case"], r["config"], r["mix"])


def _committed(arch: int) -> dict:
    """(case, kernel) -> the committed report's best row."""
    path = os.path.join(RESULTS, f"static-sm{arch}.csv")
    with open(path) as f:
        return {(r["case"], r["kernel"]): r for r in csv.DictReader(f) if r["best"] == "True" and r["status"] == "ok"}


def _metric(r) -> tuple[str, str]:
    """The estimate a case is judged by: tensor fraction at large M, DRAM fraction at decode."""
    if r["M"] is None or r["M"] <= 16:
        return "dram_peak_opt", "dram_peak_pess"
    return "tensor_peak_opt", "tensor_peak_pess"


def test_no_serialized_wgmma(rows):
    """Round 25: every sm_90 launch compiled issues its main loop's wgmmas back to back (the
    analyzer's count of wgmmas followed by a wait for none in flight, bench/sass
    disasm.serialized_wgmma). A loop with a zero-trip path (its zeroed accumulator copied on the
    path that skips it) made ptxas serialize them (C7515) in 182 of 814 launches on 4096->14336 and
    2880->2880: the kernels now tell the compiler that the loop runs (LOOP_RUNS)."""
    wgmma = [r for r in rows if r["arch"] == 90 and "tensor:HGMMA" in r["mix"]]
    assert len(wgmma) >= 50, len(wgmma)
    bad = [(r["case"], r["kernel"], r["config"]) for r in wgmma if "wgmma serialized" in r["notes"]]
    assert not bad, bad


def test_drained_wgmma_loops_are_the_known_ones(rows):
    """Round 36: a main loop that waits for all its wgmmas each step (bench/sass
    disasm.drained_wgmma: its dequantized tile stored to shared memory as the MMA's operand) keeps the
    MMAs from overlapping the next step's work, which the estimates do not charge and an H200 showed
    (the input gradient at 1.7-2.2x its pessimistic time). The rules' forward picks (GEMM and
    split-K) must not drain; the input-gradient GEMM's picks all do (docs/kernels.md "Round 36"):
    a change that fixes that fails here so that the docs and the analyzer's note are updated with it."""
    picks = [r for r in rows if r["arch"] == 90 and r.get("chosen") and "tensor:HGMMA" in r["mix"] and not r.get("w_as_a")]
    drained = {(r["kernel"], r["case"]) for r in picks if "wgmma drained" in r["notes"]}
    forward = [k for k in drained if k[0] in ("_quant_matmul_fwd_kernel", "_quant_matmul_splitk_kernel")]
    assert not forward, forward
    grad = [r for r in picks if r["kernel"] == "_quant_matmul_grad_input_kernel"]
    assert grad and all((r["kernel"], r["case"]) in drained for r in grad), \
        [(r["case"], r["config"]) for r in grad if (r["kernel"], r["case"]) not in drained]


def test_grad_w_as_a_keeps_mmas_in_flight(rows):
    """Round 36: the input gradient computed as the transposed product (fused_matmul.GRAD_W_AS_A),
    at the rules' picks on sm_90 for INT4, INT3 and NF4 at M = 4096 (the other formats and M = 256:
    docs/kernels.md "Round 36", by static_report): Ŵᵀ reaches wgmma as
    its register operand (an HGMMA with a register A), and no loop waits for all its MMAs
    (disasm.drained_wgmma); the no-spill and shared-memory checks above cover these launches too."""
    w_as_a = [r for r in rows if r.get("w_as_a") and r["kernel"] == "_quant_matmul_grad_input_kernel"]
    assert {r["fmt"] for r in w_as_a} == {"int4g32", "nf4dq", "int3g128"}, w_as_a
    assert all(r.get("chosen") for r in w_as_a)
    drained = [(r["case"], r["config"]) for r in w_as_a if "wgmma drained" in r["notes"]]
    assert not drained, drained
    assert all("tensor:HGMMA" in r["mix"] for r in w_as_a)


def test_estimates_hold_against_the_committed_report(rows):
    compared, worse = 0, []
    for arch in (90, 80):
        committed = _committed(arch)
        for r in rows:
            if r["arch"] != arch or not r["best"] or r["kernel"] in HELPER_KERNELS or r.get("guard_only"):
                continue
            old = committed.get((r["case"], r["kernel"]))
            assert old is not None, f"{r['case']} {r['kernel']} sm_{arch} is not in the committed report: regenerate it"
            for key in _metric(r):
                if old[key] in ("", None) or r[key] is None:
                    continue
                compared += 1
                if r[key] < float(old[key]) - TOLERANCE:
                    worse.append(f"sm_{arch} {r['case']} {r['kernel']} {key}: {r[key]:.2f} < committed {old[key]}")
    assert compared >= 20, compared
    assert not worse, "estimates fell below the committed report (make static-report, then review):\n" + "\n".join(worse)


def _compiled_loops(archs: str, shapes: str, ms: str, cases: str) -> list:
    """(kernel arch config, its main loop's SASS lines) of every launch of bench/launches.py's
    ``cases`` at ``shapes`` and ``ms``, compiled for ``archs`` by ``python -m bench.sass --loop``, in
    launch order (skips where Triton's NVIDIA tools are missing)."""
    if _nvidia_tools_missing():
        pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.sass", "bench/launches.py", "--arch", archs, "--loop", "--",
                           "--shapes", shapes, "--ms", ms, "--cases", cases],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loops = []
    for line in proc.stdout.splitlines():
        if " instructions, cycles/iteration" in line:
            loops.append((line.split(": loop")[0], []))
        elif loops and line.startswith("    "):
            loops[-1][1].append(line)
    return loops


def test_input_gradient_loops_form_32_bit_row_offsets():
    """Round 27: the input gradient's N loop forms each weight row's offset in 32 bits (row · row
    stride, ``quant_tile.INDEX_LIMIT`` guarding the size): a 64-bit product is an IMAD.WIDE.U32 and two
    IMAD a row and iteration (sm_90 NF4 64x128x128 at 10944→2048, M = 400: 612 → 571 instructions; INT4
    g32 502 → 440). And sm_90's B-operand loop loads the next tile's words after this tile's decode,
    into the registers it frees: no copy of one set into the other at the loop's end (NF4: 16
    IMAD.MOV, 571 → 555). Compiles the rules' picks there, both archs, and reads their loops' SASS."""
    loops = _compiled_loops("90,80", "10944->2048", "400", "dgrad/nf4dq*,dgrad/int4g32*")
    grads = [(k, body) for k, body in loops if k.startswith("_quant_matmul_grad_input_kernel")]
    assert sorted(k.split()[1] for k, _ in grads) == ["sm_80", "sm_80", "sm_90", "sm_90"], [k for k, _ in loops]
    for k, body in grads:
        assert len(body) > 100 and not [i for i in body if "IMAD.WIDE.U32" in i], (k, [i for i in body if "IMAD" in i])
        if "sm_90" in k:
            assert sum("IMAD.MOV" in i for i in body) <= 4, (k, [i for i in body if "IMAD" in i])


def test_nf4_forward_loop_hoists_its_absmax_row_base():
    """Round 28: the de-nested absmax of NF4's forward is indexed from a 64-bit row base
    (``quant_tile._group_params``), which the compiler hoists out of the K loop; a 32-bit row · stride
    product (round 27) left the loop to sign-extend each offset into the pointer, two .SX32 LEAs
    and 4 instructions an iteration more (sm_90 64x128x128 at 896→4864, M = 777: 560 against 564,
    0.8998x → 0.91x dense; with the halves below 528 against 532). And its 128-deep step runs as two 64-deep dots, each after its half's
    lookup: one dot had the second half decoded before the previous step's wgmma freed its operand
    registers, then copied them (32 IMAD.MOV; 560 → 528 with the halves). Compiles the rules' pick
    there and reads its loop's SASS."""
    loops = _compiled_loops("90", "896->4864", "777", "fwd/nf4dq*")
    fwd = [body for k, body in loops if k.startswith("_quant_matmul_fwd_kernel sm_90 64x128x128")]
    assert fwd, [k for k, _ in loops]
    body = fwd[0]
    # the two left sign-extend the cp.async addresses of the step's second half (32-bit: four)
    assert len(body) > 100 and sum(".SX32" in i for i in body) <= 2, [i for i in body if "LEA" in i]
    assert sum("IMAD.MOV" in i for i in body) <= 4, [i for i in body if "IMAD" in i]


_FINISH_CHILD = """
import json, sys, torch
from bench.sass import capture, disasm
import qlk
from qlk.kernels import fused_matmul as fm, grouped_matmul as gm, moe_combine, routing
fm.SPLITK_FINISH = True
out = {}
for arch in (90, 80):
    qw = qlk.quantize(torch.randn(1024, 4096) * 0.02, bits=4, group_size=128)
    experts = qlk.quantize(torch.randn(8 * 1024, 4096) * 0.02, bits=4, group_size=128)
    offsets = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2])
    cfg = dict(gm.tiles_for("fwd", 2, 8, experts), SPLIT_K=4)
    with capture(arch) as launches:
        fm.quant_matmul_forward(torch.randn(1, 4096, dtype=torch.bfloat16), qw,
                                torch.randn(1024, dtype=torch.bfloat16), path="splitk")
        gm.grouped_matmul_forward(torch.randn(2, 4096, dtype=torch.bfloat16), experts, offsets, 8,
                                  torch.randn(8, 1024, dtype=torch.bfloat16), config=cfg)
        # round 40: the experts' decode reads the hidden states in place (GATHER), split or not, and
        # the gate-up projection forms silu(G)·U in its epilogue (GATE_UP, one slice)
        for split in (4, 1):
            gm.grouped_matmul_forward(torch.randn(1, 4096, dtype=torch.bfloat16), experts, offsets, 8,
                                      config=dict(cfg, SPLIT_K=split), row_token=torch.tensor([0, 0]))
        gm.grouped_matmul_forward(torch.randn(1, 4096, dtype=torch.bfloat16), experts, offsets, 8,
                                  config=dict(cfg, SPLIT_K=1), row_token=torch.tensor([0, 0]), gate_up=True)
    dense, grouped, *in_place = launches
    for launch in in_place:
        res, _ = disasm.read_cubin(launch.cubin)
        how = "+gather" + ("+gate_up" if launch.constexprs.get("GATE_UP") else "")
        out[f"{launch.kernel}{how} sm_{arch}"] = dict(stack=res.stack, gather=launch.constexprs["GATHER"],
                                                      decode=launch.constexprs.get("DECODE", True))
    gm.INTERPRETED = True  # the tile map's kernel for CPU tensors (round 38); the grouped launch above kept its path
    with capture(arch) as side:
        gm._tile_map(torch.tensor([0, 3, 3, 40, 41]), 50, 16, 40)
        routing.route_rows(torch.randint(0, 130, (16,)), 128)
        _, offsets, _, position = routing.route_pairs(torch.randint(-1, 130, (16,)), 128, 2)
        routing.route_pairs(torch.randint(-1, 10, (16,)), 8, 2, 16)  # round 40: with the tile map
        moe_combine.combine(torch.randn(16, 4096, dtype=torch.bfloat16), position,
                            torch.rand(8, 2, dtype=torch.bfloat16), offsets)
    gm.INTERPRETED = False
    for launch in side:
        res, _ = disasm.read_cubin(launch.cubin)
        pairs = "+pairs" if launch.constexprs.get("PAIRS") else ""
        pairs += "+tile_map" if launch.constexprs.get("TILE_MAP") else ""
        out[f"{launch.kernel}{pairs} sm_{arch}"] = dict(stack=res.stack)
    for name, launch, slices in (("dense", dense, dense.grid[1]), ("grouped", grouped, grouped.grid[2])):
        res, instrs = disasm.read_cubin(launch.cubin)
        out[f"{name} sm_{arch}"] = dict(finish=launch.constexprs["FINISH"], split=slices, stack=res.stack,
                                        ops=[i.op + i.mods for i in instrs])
print(json.dumps(out))
"""


def test_splitk_finish_orders_its_count():
    """Round 37's FINISH (the split-K decode finished by each output tile's last slice,
    ``fused_matmul.SPLITK_FINISH``): what the interpreter cannot check, read in the machine code of
    the launch, sm_90 and sm_80: after the slice's fp32 reductions into the workspace, a CTA barrier,
    then a GPU-scope fence (the count's release), the count's atomic, an L1 invalidation (its acquire)
    and a barrier before the finishing loads: CUTLASS's semaphore order. And no stack. The same for
    the grouped (MoE) split-K decode's FINISH (round 38), whose count is per tile slot: one count atomic
    inside the slot's branch. Round 38's one-program launches (the grouped tile map, the MoE routing)
    and round 39's (the routing with tokens and positions, the experts' combine) compile for both
    archs without stack, as do round 40's grouped decode kernels that read the routed rows in place
    (GATHER: the split-K one and the one-slice one, that one also with the gate-up epilogue) and the
    routing kernel that also writes the tile map."""
    if _nvidia_tools_missing():
        pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _FINISH_CHILD], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    small = {name: found.pop(name) for name in [n for n in found if n.startswith("_")]}
    # round 38's one-program launches (the tile map, the routing) and round 39's (the routing with
    # tokens and positions, the experts' weighted sum) compile for both archs, without stack
    kernels = ("_combine_kernel", "_grouped_matmul_fwd_kernel+gather", "_grouped_matmul_fwd_kernel+gather+gate_up",
               "_grouped_matmul_splitk_kernel+gather", "_route_kernel", "_route_kernel+pairs",
               "_route_kernel+pairs+tile_map", "_tile_map_kernel")
    assert sorted(small) == [f"{k} sm_{a}" for k in kernels for a in (80, 90)], small
    assert all(r["stack"] == 0 for r in small.values()), small
    assert all(r["gather"] and r["decode"] for n, r in small.items() if "+gather" in n), small
    assert sorted(found) == ["dense sm_80", "dense sm_90", "grouped sm_80", "grouped sm_90"], sorted(found)
    for arch, r in found.items():
        ops = r["ops"]
        assert r["finish"] and r["split"] > 1 and r["stack"] == 0, (arch, r["split"], r["stack"])
        adds = [n for n, op in enumerate(ops) if op.startswith(("RED", "ATOMG")) and ".F32" in op]
        count = [n for n, op in enumerate(ops) if op.startswith("ATOMG") and ".F32" not in op]
        assert adds and len(count) == 1, (arch, [op for op in ops if op.startswith(("RED", "ATOM"))])
        between = ops[max(adds) + 1:count[0]]
        assert "BAR.SYNC.DEFER_BLOCKING" in between, (arch, between)
        fence = max(n for n, op in enumerate(between) if op.startswith("MEMBAR"))
        assert between[fence] == "MEMBAR.ALL.GPU" and fence > between.index("BAR.SYNC.DEFER_BLOCKING"), (arch, between)
        assert ops[count[0]].endswith(".STRONG.GPU"), (arch, ops[count[0]])
        after = ops[count[0] + 1:]
        assert after[0] == "CCTL.IVALL", (arch, after[:4])
        loads = [n for n, op in enumerate(after) if op.startswith("LDG")]
        assert loads and "BAR.SYNC.DEFER_BLOCKING" in after[:min(loads)], (arch, after[:min(loads) + 1])


def test_a_broken_import_fails_rather_than_skips(tmp_path):
    """A qlk that cannot be imported in the child is an error of the guard, not a reason to skip."""
    fake = tmp_path / "qlk"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated breakage')\n")
    with pytest.raises(AssertionError, match="simulated breakage|not available"):
        compile_rows({"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=300)


# ------------------------------------------------------------------------------------------------
# the compiling side (runs without TRITON_INTERPRET)
# ------------------------------------------------------------------------------------------------
def _compile_all() -> list:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import launches
    import static_report

    out = []
    for arch, patterns in CASES.items():
        cases = launches.all_cases(quick=True, patterns=patterns, include_dense=False)
        rows = static_report.collect(arch, cases, log=lambda s: print(s, file=sys.stderr, flush=True))
        bad = [(r["case"], r["status"]) for r in rows if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"cases did not compile: {bad}")
        out += rows
    guards = [(arch, (*g, None)) for arch, g in GUARD_ONLY.items()] + list(GUARD_FORMATS.items()) + \
        list(GUARD_DIRECT.items())
    for arch, (shapes, ms, patterns, formats) in guards:
        cases = launches.all_cases(patterns=patterns, include_dense=False, shapes=shapes, ms=ms, formats=formats)
        rows = static_report.collect(arch, cases, log=lambda s: print(s, file=sys.stderr, flush=True))
        bad = [(r["case"], r["status"]) for r in rows if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"cases did not compile: {bad}")
        out += [{**r, "guard_only": True} for r in rows]
    from qlk.kernels import fused_matmul

    fused_matmul.GRAD_W_AS_A = True
    for arch, (shapes, ms, patterns, formats) in GUARD_W_AS_A.items():
        cases = launches.all_cases(patterns=patterns, include_dense=False, shapes=shapes, ms=ms, formats=formats)
        rows = static_report.collect(arch, cases, log=lambda s: print(s, file=sys.stderr, flush=True),
                                     only_configs="the rules' pick only")
        bad = [(r["case"], r["status"]) for r in rows if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"cases did not compile: {bad}")
        out += [{**r, "guard_only": True, "w_as_a": True} for r in rows]
    fused_matmul.GRAD_W_AS_A = False
    return out


if __name__ == "__main__":
    print(json.dumps(_compile_all()))

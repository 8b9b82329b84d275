"""Round 35: the tiles the rules choose fit the SM's shared memory (config.SMEM_LIMIT) once compiled.

On an H200 (triton 3.6) launches the rules chose failed to load ("out of resource: shared memory,
Required: 235520 .. 336896, Hardware limit: 232448"; bench/results/gpu-NVIDIA-H200-20261204): the fit
rule (heuristics._fits, config._smem_estimate) counted bf16 X tiles only, while fp32 activations, the
input gradient's dY [BLOCK_M, BLOCK_N] tile, a group size that is not a power of two (a scale and a
bias gathered per element) and QA-LoRA's fp32 folded biases take up to 4.5x that. The static report's
cases (power-of-two groups, bf16) never reached those launches.

Here, without a GPU and with the interpreter off (a subprocess: this file as a script, as
tests/test_kernel_static.py), the rules' picks at a few (op, M) points, odd and power-of-two groups,
with and without QA-LoRA's fp32 biases / pooling, fp32 and half activations, are compiled for sm_90
with the installed Triton, and each launch's compiled shared memory must be <= SMEM_LIMIT[90]. Under
the rule before round 35 the first three cases took 241664, 313344 and 241664 bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_kernel_static import _nvidia_tools_missing  # noqa: E402 - the static tests' own check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (name, entry, (bits, group, K, N), M, activation dtype, SMs): the H200's failures first
CASES = [
    ("grad int4g96 fp32 M40", "grad", (4, 96, 576, 72), 40, "float32", 132),  # test_int_paths[int4g96k576-gemm-M40]
    ("qalora fwd int3g48 fp16 M80", "qalora", (3, 48, 96, 45), 80, "float16", 132),  # ..._odd_group_bias_batch_dims[40]
    ("qalora splitk int3g48 fp32 M5", "qalora-splitk", (3, 48, 528, 72), 5, "float32", 1),  # test_qalora_paths[..M5]
    ("grad int4g32 bf16 M40", "grad", (4, 32, 512, 72), 40, "bfloat16", 132),  # power of two: unchanged pick
    ("qalora fwd int4g32 bf16 M40 pool", "qalora", (4, 32, 512, 72), 40, "bfloat16", 132),
]
KERNELS = ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel", "_quant_matmul_splitk_kernel",
           "_quant_matmul_grad_input_splitn_kernel")


def test_estimate_bounds_the_measured_launches():
    """config.SMEM_MEASURED (compiled bytes, sm_90, triton 3.6 / 3.9) never exceeds the rules' estimate."""
    from qlk.kernels import config, heuristics

    for (op, label, fmt, act, extra), got in config.SMEM_MEASURED.items():
        # (the test process runs the interpreter, whose candidate lists hold one small tile: built from the label)
        tile, warps, stages = label.split()
        bm, bn, bk = map(int, tile.split("x"))
        c = config._cfg(90, int(warps[1:]), int(stages[1:]), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        est = config._smem_estimate(c, 4 if act == "fp32" else 2, op, heuristics.format_group(fmt),
                                    "fp32 bias" in extra, "pool" in extra)
        assert est >= got, (op, label, fmt, act, extra, est, got)
        over = got > config.SMEM_LIMIT[90]
        assert not over or not heuristics._fits(c, 90, "fp32 bias" in extra, op, "pool" in extra, fmt,
                                                4 if act == "fp32" else 2), (op, label, fmt, act, extra, got)


@pytest.fixture(scope="module")
def rows():
    if _nvidia_tools_missing():
        pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"static compile failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_chosen_tiles_fit_shared_memory(rows):
    from qlk.kernels import config

    assert {r["case"] for r in rows} == {c[0] for c in CASES}, rows
    bad = [r for r in rows if r["smem"] > config.SMEM_LIMIT[90]]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------
# the compiling side (runs without TRITON_INTERPRET)
# ------------------------------------------------------------------------------------------------
def _compile() -> list:
    sys.path.insert(0, ROOT)
    import torch

    import qlk
    from bench import sass
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import qalora_forward, quant_matmul_backward

    out = []
    with sass.capture(arch=90) as launches:
        for name, entry, (bits, g, k, n), m, dtype, sms in CASES:
            fm.num_sms = lambda device, sms=sms: sms
            dt = getattr(torch, dtype)
            qw = qlk.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(k)), bits=bits, group_size=g)
            start = len(launches)
            if entry == "grad":
                quant_matmul_backward(torch.empty(m, n, dtype=dt), qw, path="gemm")
            else:
                a, b = torch.empty(4, k // g, dtype=dt), torch.empty(n, 4, dtype=dt)
                qalora_forward(torch.empty(m, k, dtype=dt), qw, a, b, 1.5, torch.empty(n, dtype=dt),
                               path="splitk" if entry == "qalora-splitk" else "gemm")
            for launch in launches[start:]:
                if launch.kernel in KERNELS:
                    c = launch.constexprs
                    out.append(dict(case=name, kernel=launch.kernel, smem=launch.dynamic_smem,
                                    tile=f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{launch.num_warps} "
                                         f"s{launch.num_stages}"))
            print(out[-1], file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(_compile()))

"""The GPU run tests compiled kernels, never the interpreter.

``make gpu-check`` (bench/gpu_check.sh) runs pytest with ``TRITON_INTERPRET=0``, and
tests/conftest.py defaults to 0 when CUDA is available. If anything still turned the interpreter on
with a GPU present, every kernel test would pass on numpy emulation and the bf16 CUDA tests would
skip: this test fails instead.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _innermost(fn):
    """The JITFunction / InterpretedFunction under the Autotuner / Heuristics layers (a JITFunction's
    own ``.fn`` is the Python function: the walk stops at it)."""
    from triton.runtime.jit import JITFunction

    while hasattr(fn, "fn") and not isinstance(fn, JITFunction) and type(fn).__name__ != "InterpretedFunction":
        fn = fn.fn
    return fn


def test_kernels_are_compiled_when_cuda_is_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA here: the Triton interpreter is the only way to run the kernels on this machine")
    from qlk import backend
    from qlk.kernels import dequant, fused_matmul, qalora

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", (
        "CUDA is available but TRITON_INTERPRET=1: the kernel tests would run in the interpreter; "
        "run them with TRITON_INTERPRET=0 (make gpu-check does)"
    )
    assert not backend.TRITON_INTERPRETED
    for kernel in (fused_matmul._quant_matmul_fwd_kernel, fused_matmul._quant_matmul_splitk_kernel,
                   fused_matmul._quant_matmul_grad_input_kernel, fused_matmul._quant_matmul_grad_input_splitn_kernel,
                   dequant._dequantize_kernel, qalora._fold_bias_kernel):  # fmt: skip
        assert type(_innermost(kernel)).__name__ == "JITFunction", kernel


def test_conftest_default_follows_cuda():
    """Unset, TRITON_INTERPRET defaults to 0 with CUDA and 1 without (an explicit value is kept)."""
    code = "import os, torch; print(os.environ['TRITON_INTERPRET'], torch.cuda.is_available())"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, 'tests'); import conftest; exec({code!r})"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == (["0", "True"] if out[1] == "True" else ["1", "False"])
    env["TRITON_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, 'tests'); import conftest; exec({code!r})"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0"


def test_gpu_check_runs_pytest_without_the_interpreter():
    with open(os.path.join(ROOT, "bench", "gpu_check.sh"), encoding="utf-8") as f:
        script = f.read()
    assert "export TRITON_INTERPRET=0" in script
    assert script.index("export TRITON_INTERPRET=0") < script.index("-m pytest")

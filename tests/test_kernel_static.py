"""Static checks of the machine code of every qlk kernel, no GPU needed.

Each kernel is compiled for sm_90 (H100) and sm_80 (A100) with both of that architecture's
autotune configs, exactly as the JIT would specialize it for Llama-8B-sized bf16 tensors (a fake
driver reports the target; nothing runs). The cubins are read with cuobjdump:

* no spills: stack frame 0 and no LDL/STL;
* shared memory within what a CTA may use (227 KB sm_90, 163 KB sm_80);
* the large-M fused GEMM (forward and input gradient) uses wgmma (HGMMA) on sm_90.

The compilation runs in a subprocess (this file as a script) because the test process runs the
Triton interpreter (tests/conftest.py), under which ``@triton.jit`` builds nothing to compile.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SMEM_LIMIT = {90: 232448, 80: 166912}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        if "No module named" in proc.stderr or not os.path.exists(_cuobjdump()):
            pytest.skip("Triton's NVIDIA backend (ptxas/cuobjdump) is not available")
        raise AssertionError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiled(reports):
    kernels = {(r["kernel"], r["arch"]) for r in reports}
    for arch in (90, 80):
        for name in ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel", "_quant_matmul_splitk_kernel",
                     "_quant_matmul_grad_input_splitn_kernel", "_dequantize_kernel", "_fold_bias_kernel"):
            assert (name, arch) in kernels, (name, arch)
    assert all(r["configs_compiled"] >= 1 for r in reports)


def test_no_spills(reports):
    bad = [r for r in reports if r["stack"] or r["spill_ops"]]
    assert not bad, [(r["kernel"], r["arch"], r["config"], r["stack"], r["spill_ops"]) for r in bad]


def test_shared_memory_fits(reports):
    bad = [r for r in reports if r["smem"] > SMEM_LIMIT[r["arch"]]]
    assert not bad, [(r["kernel"], r["arch"], r["config"], r["smem"]) for r in bad]


def test_gemm_uses_wgmma_on_hopper(reports):
    for r in reports:
        if r["arch"] == 90 and r["kernel"] in ("_quant_matmul_fwd_kernel", "_quant_matmul_grad_input_kernel"):
            assert r["hgmma"] > 0, (r["kernel"], r["config"], r["fmt"])
        if r["arch"] == 80 and r["kernel"] == "_quant_matmul_fwd_kernel":
            assert r["hmma"] > 0, (r["kernel"], r["config"])


# ------------------------------------------------------------------------------------------------
# the compiling side (runs without TRITON_INTERPRET)
# ------------------------------------------------------------------------------------------------
class _FakeDriver:
    """Just enough of a CUDA driver for the JIT to specialize and compile for ``arch``."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        props = dict(max_shared_mem=SMEM_LIMIT[arch], multiprocessor_count=132 if arch == 90 else 108,
                     max_num_regs=65536, warpSize=32)
        self.utils = type("U", (), {"get_device_properties": staticmethod(lambda device=0: dict(props))})()

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _read_cubin(cubin: bytes) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)
    regs, stack, shared = (int(x) for x in m.groups())
    return dict(regs=regs, stack=stack, static_smem=shared, spill_ops=len(re.findall(r"\b(LDL|STL)\b", sass)),
                hgmma=len(re.findall(r"\bHGMMA\b", sass)), hmma=len(re.findall(r"\bHMMA\b", sass)))


def _compile_all() -> list[dict]:
    import torch
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    import qlk
    from qlk.formats import QuantizedWeight
    from qlk.formats.packing import words_per_row
    from qlk.kernels import dequantize_forward, qalora_forward, quant_matmul_backward
    from qlk.kernels import quant_matmul_forward

    def fake_weight(fmt, bits, g, n, k):
        if fmt == "int":
            return QuantizedWeight("int", (n, k), bits, g, torch.zeros(n, words_per_row(k, bits), dtype=torch.int32),
                                   scales=torch.zeros(n, k // g, dtype=torch.bfloat16),
                                   biases=torch.zeros(n, k // g, dtype=torch.bfloat16))
        blocks = n * k // g
        return QuantizedWeight("nf4", (n, k), 4, g, torch.zeros(n * k // 2, dtype=torch.uint8),
                               absmax=torch.zeros(blocks, dtype=torch.uint8),
                               absmax_scale=torch.zeros(-(-blocks // 256)), absmax_offset=torch.zeros(1))

    out = {}
    orig_run = JITFunction.run
    orig_auto = Autotuner.run
    current = {}

    def run(self, *args, grid, warmup, **kwargs):
        k = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, current["arch"], current["fmt"], k.metadata.num_warps, k.metadata.num_stages,
               tuple(sorted((n, v) for n, v in kwargs.items() if n.startswith("BLOCK") or n == "POOL")))
        if key not in out:
            r = _read_cubin(k.asm["cubin"])
            r.update(kernel=self.fn.__name__, arch=current["arch"], fmt=current["fmt"],
                     config=f"w{k.metadata.num_warps} s{k.metadata.num_stages} " + " ".join(
                         f"{n}={v}" for n, v in key[-1]), smem=r["static_smem"] + int(k.metadata.shared or 0),
                     configs_compiled=1)
            out[key] = r
        return k

    def auto_run(self, *args, **kwargs):  # compile every config of the current architecture
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
        self.nargs = None

    JITFunction.run, Autotuner.run = run, auto_run
    try:
        for arch in (90, 80):
            driver.set_active(_FakeDriver(arch))
            for fn in (qlk.kernels.fused_matmul._quant_matmul_fwd_kernel,
                       qlk.kernels.fused_matmul._quant_matmul_grad_input_kernel,
                       qlk.kernels.fused_matmul._quant_matmul_splitk_kernel,
                       qlk.kernels.fused_matmul._quant_matmul_grad_input_splitn_kernel,
                       qlk.kernels.qalora._fold_bias_kernel,
                       qlk.kernels.dequant._dequantize_kernel):
                inner = fn
                while not isinstance(inner, JITFunction):
                    inner = inner.fn
                inner.device_caches.clear()  # the binder holds the target it was built for
            current["arch"] = arch
            n, k, m = 14336, 4096, 4096
            formats = [("int", 4, 32), ("int", 3, 64), ("nf4", 4, 64)] if arch == 90 else [("int", 4, 32)]
            for fmt in formats:
                current["fmt"] = "%s%dg%d" % fmt
                qw = fake_weight(*fmt, n, k)
                x = torch.empty(m, k, dtype=torch.bfloat16)
                quant_matmul_forward(x, qw, path="gemm")
                if fmt == ("int", 4, 32):
                    quant_matmul_backward(torch.empty(m, n, dtype=torch.bfloat16), qw)
                    quant_matmul_backward(torch.empty(1, n, dtype=torch.bfloat16), qw)  # split-N
                    quant_matmul_forward(torch.empty(1, k, dtype=torch.bfloat16), qw)
                    dequantize_forward(qw, torch.bfloat16)
                    # QA-LoRA: folded biases + the GEMM / split-K with in-kernel pooling
                    a = torch.empty(16, k // 32, dtype=torch.bfloat16)
                    b = torch.empty(n, 16, dtype=torch.bfloat16)
                    qalora_forward(x, qw, a, b, 2.0)
                    qalora_forward(torch.empty(1, k, dtype=torch.bfloat16), qw, a, b, 2.0)
    finally:
        JITFunction.run, Autotuner.run = orig_run, orig_auto
    assert Heuristics  # imported for the wrapper chain above
    return list(out.values())


if __name__ == "__main__":
    print(json.dumps(_compile_all()))

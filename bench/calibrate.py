"""Calibration launches for qlk's static analyzer: kernels whose speed on a GPU is published.

    TRITON_INTERPRET= python -m bench.sass bench/calibrate.py --arch 90 [--json out.json]

Cases, all 8192×8192 weights unless noted (docs/static-analysis.md holds the table of the
analyzer's estimates next to the published measurements):

    tutorial   the Triton tutorial's matmul in its H100 configuration (fp16, 128×256×64 tiles,
               8 warps, 3 stages, grouped ordering), 4096³; the kernel below is written in the
               tutorial's form
    dense      bench/dense_matmul.py (bf16) at M = 4096 and its split-K decode tile at M = 1
    gemlite    W4A16 g128 (``pip install gemlite``): M = 1024 with every config of its "fast"
               autotune list, M = 1 through its own dispatch (GEMV_REVSPLITK)

A case whose package is missing is skipped with a line on stderr. gemlite binds itself to the
first arch it is imported under: run one arch per process. Flags after ``--``:
``--cases tutorial,dense,gemlite``.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _tutorial_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                            stride_cn, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                            BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """C = A·B, fp16 in and out, fp32 accumulation: the tutorial's loop (masked K tail, pointer bumps)."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_SIZE_M), tl.cdiv(N, BLOCK_SIZE_N)
    band = GROUP_SIZE_M * tiles_n  # programs of one band of GROUP_SIZE_M row tiles
    first = (pid // band) * GROUP_SIZE_M
    rows_in_band = min(tiles_m - first, GROUP_SIZE_M)
    pid_m = first + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band
    rm = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
    rn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
    rk = tl.arange(0, BLOCK_SIZE_K)
    a = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        left = K - step * BLOCK_SIZE_K
        acc = tl.dot(tl.load(a, mask=rk[None, :] < left, other=0.0), tl.load(b, mask=rk[:, None] < left, other=0.0), acc)
        a += BLOCK_SIZE_K * stride_ak
        b += BLOCK_SIZE_K * stride_bk
    cm = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    tl.store(c_ptr + cm[:, None] * stride_cm + cn[None, :] * stride_cn, acc.to(tl.float16),
             mask=(cm[:, None] < M) & (cn[None, :] < N))


def tutorial_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype)
    bm, bn = 128, 256
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _tutorial_matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                                  c.stride(1), BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=64, GROUP_SIZE_M=8,
                                  num_warps=8, num_stages=3)
    return c


def run_tutorial():
    tutorial_matmul(torch.empty(4096, 4096, dtype=torch.float16), torch.empty(4096, 4096, dtype=torch.float16))


def run_dense():
    from dense_matmul import dense_matmul

    w = torch.empty(8192, 8192, dtype=torch.bfloat16)
    for m in (4096, 1):
        dense_matmul(torch.empty(m, 8192, dtype=torch.bfloat16), w)


def run_gemlite():
    import peers_static

    peers_static._gemlite_run(1024, 8192, 8192, "GEMM", shipped_configs=False)
    peers_static._gemlite_run(1, 8192, 8192, None)


CASES = {"tutorial": run_tutorial, "dense": run_dense, "gemlite": run_gemlite}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    for name in args.cases.split(","):
        try:
            CASES[name]()
            print(f"calibrate: {name} launched", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - a missing peer package, or a peer bound to another arch
            print(f"calibrate: {name} skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()

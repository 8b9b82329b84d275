"""qlk.kernels.qalora_forward / qalora_grad_input against qlk.reference.qalora_forward /
qalora_backward in float64 (Triton interpreter on CPU, or CUDA).

The adapter is scaled so that its term is a sizeable part of Y and dX (checked), so a kernel that
dropped or mis-scaled it would fail. Errors are ||out − ref|| / ||ref||: < 1e-3 fp16, < 1e-5 fp32.
"""
from __future__ import annotations

import os

import pytest
import torch

import qlk
from qlk import reference as R
from qlk.kernels import fold_biases, qalora_forward, qalora_grad_input

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
TOL = {torch.float16: 1e-3, torch.float32: 1e-5, torch.bfloat16: 8e-3}
N, K, RANK, SCALING = 73, 128, 8, 2.0  # odd N

_CACHE = {}


def make(bits, g, n=N, k=K, perm=False, rank=RANK, seed=0):
    key = (bits, g, n, k, perm, rank, seed)
    if key not in _CACHE:
        gen = torch.Generator().manual_seed(seed)
        qw = qlk.quantize(torch.randn(n, k, generator=gen), bits=bits, group_size=g)
        if perm:
            qw.perm = torch.randperm(k, generator=gen)
        a = torch.randn(rank, k // g, generator=gen)
        b = torch.randn(n, rank, generator=gen) * (g / 16)  # adapter term ≈ 1/3 of the base output
        _CACHE[key] = (qw.to(DEVICE), a.to(DEVICE), b.to(DEVICE))
    return _CACHE[key]


def randn(*shape, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def check(qw, a, b, x, dy, tol, bias=None, **kw):
    """Forward (y, pooled) and grad input (dx, v) vs float64, outputs NaN-poisoned where possible."""
    m = x.reshape(-1, qw.in_features).shape[0]
    g = qw.group_size
    y, pooled = qalora_forward(x, qw, a, b, SCALING, bias, out=nan_like((m, qw.out_features), x.dtype), **kw)
    y_ref = R.qalora_forward(x.double(), qw, a.double(), b.double(), SCALING,
                             None if bias is None else bias.double())
    p_ref = R.pool_groups(R.to_stored_order(x.double(), qw), g)
    base = R.quant_matmul(x.double(), qw, None if bias is None else bias.double())
    assert rel_err(base, y_ref) > 0.05, "the adapter term is too small to be tested"
    assert y.dtype == x.dtype and y.shape == y_ref.shape and not y.isnan().any()
    assert pooled.dtype == torch.float32 and pooled.shape == p_ref.shape and not pooled.isnan().any()
    assert rel_err(y, y_ref) < tol
    assert rel_err(pooled, p_ref) < 1e-6

    dx_out = None if qw.perm is not None else nan_like((m, qw.in_features), dy.dtype)
    dx, v = qalora_grad_input(dy, qw, a, b, SCALING, out=dx_out, **{k: v for k, v in kw.items() if k == "deterministic"})
    dx_ref, _, _ = R.qalora_backward(dy.double(), p_ref, qw, a.double(), b.double(), SCALING)
    assert dx.dtype == dy.dtype and dx.shape == dx_ref.shape and not dx.isnan().any()
    assert rel_err(dx, dx_ref) < tol
    assert rel_err(R.quant_matmul_grad_input(dy.double(), qw), dx_ref) > 0.05
    v_ref = dy.double().reshape(m, -1) @ b.double()
    assert v.shape == (*dy.shape[:-1], a.shape[0]) and rel_err(v.reshape(m, -1), v_ref) < tol


# bits × g × M, the dtype alternating (fp16 / fp32) so every (bits, g) and every M meets both
CASES = [(bits, g, m, (torch.float16, torch.float32)[(i + j) % 2])
         for i, (bits, g) in enumerate((b, g) for b in (2, 3, 4) for g in (32, 64, 128))
         for j, m in enumerate((1, 7, 64, 333))]


@pytest.mark.parametrize("bits,g,m,dtype", CASES,
                         ids=[f"int{b}g{g}-M{m}-{'fp16' if d == torch.float16 else 'fp32'}" for b, g, m, d in CASES])
def test_qalora_matches_reference(bits, g, m, dtype):
    """M = 1, 7: split-K forward + split-N grad input; 64, 333: the GEMMs (333: ragged M tiles).
    g = 32, 64 pool within a K tile, g = 128 over several tiles (or in torch on the split-K path)."""
    qw, a, b = make(bits, g)
    check(qw, a, b, randn(m, K, dtype=dtype), randn(m, N, dtype=dtype, seed=2), TOL[dtype])


@pytest.mark.parametrize("m", [3, 70])
@pytest.mark.parametrize("g", [32, 128])
def test_qalora_act_order(m, g):
    """GPTQ act-order: pooling over the stored (permuted) column order, dX scattered back."""
    qw, a, b = make(4, g, perm=True)
    check(qw, a, b, randn(m, K), randn(m, N, seed=2), 1e-5)


@pytest.mark.parametrize("m", [5, 40])
def test_qalora_odd_group_bias_batch_dims(m):
    """A group size that is not a power of two (torch pooling, per-element scale gather), a bias,
    and x with batch dims as a non-contiguous view."""
    qw, a, b = make(3, 48, n=45, k=96)
    x = randn(2, 96, m, dtype=torch.float16).transpose(1, 2)  # [2, m, 96], non-contiguous
    bias = randn(45, dtype=torch.float16, seed=4)
    check(qw, a, b, x, randn(2, m, 45, dtype=torch.float16, seed=2), 1e-3, bias=bias)


def test_qalora_deterministic_small_m():
    qw, a, b = make(4, 32)
    x, dy = randn(4, K), randn(4, N, seed=2)
    check(qw, a, b, x, dy, 1e-5, deterministic=True)
    y1, p1 = qalora_forward(x, qw, a, b, SCALING, deterministic=True)
    y2, p2 = qalora_forward(x, qw, a, b, SCALING, deterministic=True)
    d1, _ = qalora_grad_input(dy, qw, a, b, SCALING, deterministic=True)
    d2, _ = qalora_grad_input(dy, qw, a, b, SCALING, deterministic=True)
    assert torch.equal(y1, y2) and torch.equal(p1, p2) and torch.equal(d1, d2)


def test_fold_biases_and_merge():
    """The folded biases are the exact QA-LoRA merge (reference.qalora_merge) in fp32."""
    qw, a, b = make(4, 64)
    folded = fold_biases(qw, a, b, SCALING)
    merged = R.qalora_merge(qw, a, b, SCALING)
    assert folded.dtype == torch.float32 and folded.shape == qw.biases.shape
    assert torch.allclose(folded.double(), merged.biases.double(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("det", [False, True])
def test_qalora_grad_v_fused_wide_rank(det):
    """V = dY·B from the split-N launch's extra column of programs at r = 20 (padded to 32 lanes),
    fp16 dY, three M rows: V and dX against float64."""
    qw, a, b = make(4, 32, rank=20)
    dy = randn(3, N, dtype=torch.float16, seed=8)
    dx, v = qalora_grad_input(dy, qw, a, b, SCALING, path="splitn", deterministic=det)
    v_ref = dy.double() @ b.to(torch.float16).double()  # B rounded to dY's dtype, sums exact
    assert v.dtype == torch.float32 and v.shape == (3, 20) and rel_err(v, v_ref) < 1e-6
    p_dummy = torch.zeros(3, K // 32, dtype=torch.float64, device=DEVICE)
    dx_ref, _, _ = R.qalora_backward(dy.double(), p_dummy, qw, a.double(), b.double(), SCALING)
    assert rel_err(dx, dx_ref) < 1e-3


def test_fold_biases_in_the_activation_dtype():
    """The kernels fold into the activation dtype (16-bit b' for fp16/bf16: the plain kernels'
    register footprint); the sum is fp32, rounded once."""
    qw, a, b = make(4, 64)
    exact = R.qalora_merge(qw, a, b, SCALING).biases.double()
    # (the interpreter truncates to bf16 instead of rounding: bf16 on a GPU only, like the bf16 kernels)
    for dtype in (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16):
        folded = fold_biases(qw, a, b, SCALING, dtype=dtype)
        assert folded.dtype == dtype and folded.shape == qw.biases.shape
        assert rel_err(folded, exact) < (4e-4 if dtype == torch.float16 else 3e-3)
        ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(2.0 ** -14)
        assert ((folded.double() - exact).abs() <= ulp).all()  # rounded once, to the nearest
    with pytest.raises(TypeError):
        fold_biases(qw, a, b, SCALING, dtype=torch.float64)


def test_qalora_fallbacks_and_errors():
    """NF4 and float64 go through the reference; wrong adapter shapes raise."""
    gen = torch.Generator().manual_seed(3)
    nf4 = qlk.quantize(torch.randn(N, K, generator=gen), fmt="nf4", group_size=64).to(DEVICE)
    a, b = randn(4, K // 64, seed=5), randn(N, 4, seed=6)
    x = randn(3, K, dtype=torch.float64)
    y, p = qalora_forward(x, nf4, a, b, SCALING)
    assert rel_err(y, R.qalora_forward(x, nf4, a.double(), b.double(), SCALING)) < 1e-12
    assert p.dtype == torch.float64 and p.shape == (3, K // 64)
    qw, a, b = make(4, 32)
    with pytest.raises(ValueError):
        qalora_forward(randn(3, K), qw, a[:, :-1], b, SCALING)
    with pytest.raises(ValueError):
        qalora_grad_input(randn(3, N), qw, a, b[:, :-1], SCALING)
    y, p = qalora_forward(randn(0, K), qw, a, b, SCALING)
    assert y.shape == (0, N) and p.shape == (0, K // 32)


@pytest.mark.skipif(not CUDA or INTERPRETED, reason="bf16 is only meaningful on a GPU")
@pytest.mark.parametrize("m", [1, 16, 333, 1024])
def test_qalora_bf16_cuda(m):
    qw, a, b = make(4, 32, n=1000, k=512)
    check(qw, a, b, randn(m, 512, dtype=torch.bfloat16), randn(m, 1000, dtype=torch.bfloat16, seed=2), 8e-3)


@pytest.mark.parametrize("perm", [False, True], ids=["stored-order", "act-order"])
def test_qalora_dense_route_above_the_split_rows(monkeypatch, perm):
    """Round 35: on a GPU, path "auto" above M = 16 runs QA-LoRA as dequantize + dense GEMM plus the
    adapter's small products (the fused GEMM measured slower there, fused_matmul.FUSED_GEMM_AUTO):
    the same function, the fused launchers never called; at M <= 16 the split kernels still run."""
    from qlk.kernels import qalora as qa

    monkeypatch.setattr(qa, "INTERPRETED", False)  # what a GPU sees; the dequantize kernel still interprets here
    qw, a, b = make(4, 32, perm=perm)

    def fused(*args, **kwargs):
        raise AssertionError("the fused QA-LoRA launch ran above the split rows")

    real_forward, real_grad = qa._forward, qa._grad_input
    monkeypatch.setattr(qa, "_forward", fused)
    monkeypatch.setattr(qa, "_grad_input", fused)
    x = randn(2, 20, K, dtype=torch.float16)  # M = 40 over batch dims
    check(qw, a, b, x, randn(2, 20, N, dtype=torch.float16, seed=2), 1e-3, bias=randn(N, dtype=torch.float16, seed=4))
    monkeypatch.setattr(qa, "_forward", real_forward)
    monkeypatch.setattr(qa, "_grad_input", real_grad)
    assert not qa._dense_route("auto", 16, 16) and not qa._dense_route("gemm", 40, 16)
    monkeypatch.setattr(qa._fm, "FUSED_GEMM_AUTO", True)
    assert not qa._dense_route("auto", 40, 16)

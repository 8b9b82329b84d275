"""The autograd Functions (reference path): gradcheck, the reference oracle, saved memory, dtypes."""
import os
import subprocess
import sys

import pytest
import torch

import qlk
from qlk import reference as R
from qlk.autograd import (
    LoRAFunction, QALoRAFunction, lora_linear, qalora_linear, quant_linear,
)  # fmt: skip
from qlk.autograd.lora import draw_seed, dropout_mask

K, N, G8, RANK = 32, 12, 8, 3  # small shapes for float64 gradcheck


def make_qw(n=N, k=K, g=G8, fmt="int", bits=4, perm=False, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    qw = qlk.quantize(w, bits=bits, group_size=g, fmt=fmt)
    if perm:
        qw.perm = torch.randperm(k, generator=gen)
    return qw


def make_inputs(qw, r=RANK, qalora=True, dtype=torch.float64, lead=(2, 3), seed=1):
    gen = torch.Generator().manual_seed(seed)
    k, n = qw.in_features, qw.out_features
    x = torch.randn(*lead, k, generator=gen, dtype=dtype).requires_grad_()
    a = torch.randn(r, k // qw.group_size if qalora else k, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(n, r, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(n, generator=gen, dtype=dtype).requires_grad_()
    return x, a, b, bias


def seeded(fn, seed=123):
    """fn with the global RNG reset before each call, so a dropout mask repeats across calls."""

    def wrapped(*args):
        torch.manual_seed(seed)
        return fn(*args)

    return wrapped


# ---- gradcheck --------------------------------------------------------------------------------
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qalora_gradcheck(perm, dropout):
    qw = make_qw(perm=perm)
    x, a, b, bias = make_inputs(qw)
    f = seeded(lambda x, a, b, bias: qalora_linear(x, qw, a, b, 0.7, bias, dropout))
    assert torch.autograd.gradcheck(f, (x, a, b, bias))


@pytest.mark.parametrize("fmt", ["int", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_gradcheck(fmt, dropout):
    qw = make_qw(fmt=fmt, g=32 if fmt == "nf4" else G8)
    x, a, b, bias = make_inputs(qw, qalora=False)
    f = seeded(lambda x, a, b, bias: lora_linear(x, qw, a, b, 0.7, bias, dropout))
    assert torch.autograd.gradcheck(f, (x, a, b, bias))


def test_quant_linear_gradcheck():
    qw = make_qw(perm=True)
    x, _, _, bias = make_inputs(qw)
    assert torch.autograd.gradcheck(lambda x, bias: quant_linear(x, qw, bias), (x, bias))


# ---- against the reference oracle ---------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qalora_matches_reference(dtype, tol, perm, bits):
    qw = make_qw(n=48, k=128, g=32, bits=bits, perm=perm, dtype=dtype)
    x, a, b, bias = make_inputs(qw, r=4, dtype=dtype, lead=(3, 5))
    y = QALoRAFunction.apply(x, qw, a, b, 1.5, bias, 0.0)
    y_ref = R.qalora_forward(x, qw, a, b, 1.5, bias)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    dy = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, b), dy)
    pooled = R.pool_groups(R.to_stored_order(x.detach(), qw), qw.group_size)
    dx_ref, da_ref, db_ref = R.qalora_backward(dy, pooled, qw, a.detach(), b.detach(), 1.5)
    for got, want in ((dx, dx_ref), (da, da_ref), (db, db_ref)):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("fmt", ["int", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_matches_reference(dtype, tol, fmt, dropout):
    qw = make_qw(n=48, k=128, g=32 if fmt == "int" else 64, fmt=fmt, dtype=dtype)
    x, a, b, bias = make_inputs(qw, r=4, qalora=False, dtype=dtype, lead=(3, 5))
    torch.manual_seed(7)
    mask = None
    if dropout:
        mask = dropout_mask((15, 128), dropout, draw_seed(), x.device, dtype).reshape(x.shape)
    torch.manual_seed(7)
    y = LoRAFunction.apply(x, qw, a, b, 0.5, bias, dropout)
    torch.testing.assert_close(y, R.lora_forward(x, qw, a, b, 0.5, bias, mask), rtol=tol, atol=tol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), dy)
    want = R.lora_backward(dy, x.detach(), qw, a.detach(), b.detach(), 0.5, mask)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=tol, atol=tol * 10)


def test_dropout_is_off_at_zero_and_changes_between_calls():
    qw = make_qw(dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, dtype=torch.float32)
    y1 = qalora_linear(x, qw, a, b, 1.0, dropout=0.5)
    y2 = qalora_linear(x, qw, a, b, 1.0, dropout=0.5)
    assert not torch.equal(y1, y2)
    assert torch.equal(qalora_linear(x, qw, a, b, 1.0), qalora_linear(x, qw, a, b, 1.0))


# ---- what QA-LoRA saves for backward ------------------------------------------------------------
def _saved_elements(fn, exclude):
    """Elements of every tensor autograd saves while running fn(), except those in ``exclude``."""
    ptrs = {t.data_ptr() for t in exclude}
    saved = []

    def pack(t):
        if t.data_ptr() not in ptrs:
            saved.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("perm", [False, True])
def test_qalora_saves_only_pooled_input(perm):
    m, k, n, g, r = 64, 256, 96, 32, 8
    qw = make_qw(n=n, k=k, g=g, perm=perm, dtype=torch.float32)
    x = torch.randn(4, m // 4, k, requires_grad=True)
    a = torch.randn(r, k // g, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    bias = torch.randn(n)
    params = [a, b, bias] + list(qw.tensors().values())
    y, saved = _saved_elements(lambda: qalora_linear(x, qw, a, b, 2.0, bias, dropout=0.1), params)
    total = sum(numel for _, numel in saved)
    assert total <= m * k // g + 4 * m * r, saved
    assert all(numel < m * k for _, numel in saved), "X (or anything as large) was saved"
    y.sum().backward()  # and backward still works from what was saved
    assert a.grad is not None and x.grad is not None


def test_lora_saves_x_but_no_weight():
    qw = make_qw(n=96, k=256, g=32, dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, r=8, qalora=False, dtype=torch.float32, lead=(64,))
    params = [a, b] + list(qw.tensors().values())
    _, saved = _saved_elements(lambda: lora_linear(x, qw, a, b, 2.0, dropout=0.1), params)
    assert sum(n for _, n in saved) == 64 * 256  # X only; the dropout mask is regenerated from a seed


def test_frozen_weight_is_not_in_save_for_backward():
    qw = make_qw(dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, dtype=torch.float32)
    y = qalora_linear(x, qw, a, b, 1.0)
    packed = {t.data_ptr() for t in qw.tensors().values()}
    assert not any(t.data_ptr() in packed for t in y.grad_fn.saved_tensors)


# ---- dtypes, autocast, accumulation, shapes --------------------------------------------------------
@pytest.mark.parametrize("method", ["qalora", "lora"])
def test_autocast_bf16_with_fp32_adapters(method):
    qw = make_qw(n=64, k=128, g=32, dtype=torch.float32)
    x, a, b, bias = make_inputs(qw, r=4, qalora=method == "qalora", dtype=torch.float32, lead=(4, 8))
    fn = qalora_linear if method == "qalora" else lora_linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, qw, a, b, 2.0, bias.detach())
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y32 = fn(x2, qw, a2, b2, 2.0, bias.detach())
    y32.square().sum().backward()
    for got, want in ((y.float(), y32), (x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        assert ((got - want).norm() / want.norm()) < 2e-2


def test_bf16_activations_fp32_adapters_no_autocast():
    qw = make_qw(n=64, k=128, g=32, dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, r=4, dtype=torch.float32)
    xb = x.detach().bfloat16().requires_grad_()
    y = qalora_linear(xb, qw, a, b, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32


@pytest.mark.parametrize("fn,qalora", [(qalora_linear, True), (lora_linear, False)])
def test_grads_accumulate_over_two_calls(fn, qalora):
    qw = make_qw(dtype=torch.float64)
    x1, a, b, _ = make_inputs(qw, qalora=qalora)
    x2 = torch.randn_like(x1)
    (fn(x1, qw, a, b, 0.5) + fn(x2, qw, a, b, 0.5)).sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    fn(x1, qw, a, b, 0.5).sum().backward()
    fn(x2, qw, a, b, 0.5).sum().backward()  # accumulates into .grad
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)


def test_input_without_grad_and_frozen_adapter():
    qw = make_qw(dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, dtype=torch.float32)
    x.requires_grad_(False)
    a.requires_grad_(False)
    qalora_linear(x, qw, a, b, 1.0).sum().backward()
    assert b.grad is not None and a.grad is None and x.grad is None


@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 4)])
def test_any_leading_shape(lead):
    qw = make_qw(dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, dtype=torch.float32, lead=lead)
    y = qalora_linear(x, qw, a, b, 1.0)
    assert y.shape == (*lead, N)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_bad_inputs_raise():
    qw = make_qw(dtype=torch.float32)
    x, a, b, _ = make_inputs(qw, dtype=torch.float32)
    with pytest.raises(ValueError, match="in_features=32"):
        qalora_linear(torch.randn(3, 33), qw, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_A has shape \(3, 32\), expected \(r, 4\)"):
        qalora_linear(x, qw, torch.randn(3, 32), b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, qw, torch.randn(3, 32), torch.randn(N + 1, 3), 1.0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, qw, torch.randn(3, 32), b, 1.0, dropout=1.0)


# ---- Triton interpreter (only once the kernels exist) -----------------------------------------------
_INTERP = """
import torch, qlk
from qlk import reference as R
from qlk.autograd import qalora_linear
import qlk.kernels as K
calls = []
for name in ("qalora_forward", "qalora_grad_input"):  # count the fused kernels' launches
    def spy(*a, _f=getattr(K, name), _n=name, **k):
        calls.append(_n)
        return _f(*a, **k)
    setattr(K, name, spy)
torch.manual_seed(0)
qw = qlk.quantize(torch.randn(64, 128), bits=4, group_size=32)
x = torch.randn(16, 128, requires_grad=True)
a = torch.randn(4, 4, requires_grad=True); b = torch.randn(64, 4, requires_grad=True)
y = qalora_linear(x, qw, a, b, 2.0)
torch.testing.assert_close(y, R.qalora_forward(x, qw, a, b, 2.0), rtol=1e-3, atol=1e-3)
dy = torch.randn_like(y)
got = torch.autograd.grad(y, (x, a, b), dy)
want = R.qalora_backward(dy, R.pool_groups(x.detach(), 32), qw, a.detach(), b.detach(), 2.0)
for g_, w_ in zip(got, want):
    torch.testing.assert_close(g_, w_, rtol=1e-3, atol=1e-3)
assert calls == ["qalora_forward", "qalora_grad_input"], calls  # no dropout: the fused path ran
y = qalora_linear(x, qw, a, b, 2.0, dropout=0.1)  # dropout: the unfused path (mask on P(X))
torch.autograd.grad(y.sum(), (x, a, b))
assert calls == ["qalora_forward", "qalora_grad_input"], calls
print("ok")
"""


def _kernels_ready() -> bool:
    try:
        from qlk import kernels
    except ImportError:
        return False
    return hasattr(kernels, "quant_matmul") and hasattr(kernels, "quant_matmul_grad_input")


@pytest.mark.skipif(not _kernels_ready(), reason="qlk.kernels has no quant_matmul yet")
def test_qalora_function_through_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", QLK_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _INTERP], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]

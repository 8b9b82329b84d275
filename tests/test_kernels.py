"""qlk.kernels against the float64 reference (``qw.dequantize(torch.float64)``).

Runs on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and on GPU
as is. Shapes are small because the interpreter executes every program instance in numpy.
Errors are ||y − ref|| / ||ref||: < 1e-3 for fp16, < 1e-5 for fp32; bf16 only on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

import qlk
from qlk.kernels import (
    SPLITK_MAX_M, SPLITN_MAX_M, dequantize, dequantize_forward, quant_matmul, quant_matmul_backward, quant_matmul_forward,
    quant_matmul_grad_input,
)  # fmt: skip

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
TOL = {torch.float16: 1e-3, torch.float32: 1e-5, torch.bfloat16: 8e-3}

# (fmt, bits, group_size, double_quant)
FORMATS = [("int", b, g, False) for b in (2, 3, 4) for g in (32, 64, 128)] + [("nf4", 4, 64, True), ("nf4", 4, 64, False)]


def fmt_id(f):
    return f"nf4{'-dq' if f[3] else ''}" if f[0] == "nf4" else f"int{f[1]}g{f[2]}"


_CACHE = {}


def make_qw(fmt, bits, g, dq, n=73, k=128, seed=0) -> qlk.QuantizedWeight:
    key = (fmt, bits, g, dq, n, k, seed)
    if key not in _CACHE:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=gen)
        _CACHE[key] = qlk.quantize(w, bits=bits, group_size=g, fmt=fmt, double_quant=dq).to(DEVICE)
    return _CACHE[key]


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def randn(*shape, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("f", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 7, 64, 333])
def test_forward_and_grad_input(f, dtype, m):
    """Y = X·Ŵᵀ and dX = dY·Ŵ for every format, written into NaN-poisoned outputs. M = 1 and 7 go
    through the split-K decode kernel and the split-N input gradient, 64 and 333 through the GEMMs
    (M = 333: several M tiles and a ragged edge)."""
    qw = make_qw(*f)
    n, k = qw.shape
    w64 = qw.dequantize(torch.float64)
    x, dy = randn(m, k, dtype=dtype), randn(m, n, dtype=dtype, seed=2)

    y = quant_matmul_forward(x, qw, out=nan_like((m, n), dtype))
    assert y.dtype == dtype and y.shape == (m, n)
    assert not y.isnan().any()
    assert rel_err(y, x.double() @ w64.t()) < TOL[dtype]

    dx = quant_matmul_backward(dy, qw, out=nan_like((m, k), dtype))
    assert dx.dtype == dtype and dx.shape == (m, k)
    assert not dx.isnan().any()
    assert rel_err(dx, dy.double() @ w64) < TOL[dtype]


@pytest.mark.parametrize("path", ["gemm", "splitk"])
@pytest.mark.parametrize("m", [1, 40])
def test_forced_paths(path, m):
    """Each path at a shape the dispatcher would not give it."""
    qw = make_qw("int", 4, 32, False)
    x = randn(m, qw.in_features, dtype=torch.float16)
    y = quant_matmul_forward(x, qw, out=nan_like((m, qw.out_features), torch.float16), path=path)
    assert rel_err(y, x.double() @ qw.dequantize(torch.float64).t()) < 1e-3


@pytest.mark.parametrize("path", ["gemm", "splitn"])
@pytest.mark.parametrize("m", [1, 40])
def test_forced_grad_paths(path, m):
    """The input gradient's GEMM and split-N kernels, each at a shape the dispatcher would not give it."""
    qw = make_qw("int", 4, 32, False)
    dy = randn(m, qw.out_features, dtype=torch.float16)
    dx = quant_matmul_backward(dy, qw, out=nan_like((m, qw.in_features), torch.float16), path=path)
    assert rel_err(dx, dy.double() @ qw.dequantize(torch.float64)) < 1e-3


def test_dispatch_threshold():
    assert SPLITK_MAX_M == 16 and SPLITN_MAX_M == 16


@pytest.mark.parametrize("f", [("int", 3, 64, False), ("nf4", 4, 64, True)], ids=fmt_id)
def test_splitn_deterministic(f):
    """Split-N with a workspace: bit-identical run to run, equal to the atomic one up to sum order."""
    qw = make_qw(*f)
    dy = randn(6, qw.out_features)
    ref = dy.double() @ qw.dequantize(torch.float64)
    d1 = quant_matmul_backward(dy, qw, deterministic=True)
    d2 = quant_matmul_backward(dy, qw, deterministic=True)
    assert torch.equal(d1, d2)
    assert rel_err(d1, ref) < 1e-5 and rel_err(quant_matmul_backward(dy, qw), ref) < 1e-5


@pytest.mark.parametrize("f", [("int", 4, 32, False), ("nf4", 4, 64, True)], ids=fmt_id)
def test_splitk_deterministic(f):
    """The workspace reduction gives the same result as the atomic one (up to fp32 sum order) and
    is bit-identical run to run."""
    qw = make_qw(*f)
    x = randn(5, qw.in_features)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    y1 = quant_matmul_forward(x, qw, deterministic=True)
    y2 = quant_matmul_forward(x, qw, deterministic=True)
    ya = quant_matmul_forward(x, qw, deterministic=False)
    assert torch.equal(y1, y2)
    assert rel_err(y1, ref) < 1e-5 and rel_err(ya, ref) < 1e-5


def test_batch_dims_noncontiguous_bias():
    """x [2, 3, K] as a transposed (non-contiguous) view, a bias, fp16."""
    qw = make_qw("int", 3, 32, False)
    n, k = qw.shape
    base = randn(2, k, 3, dtype=torch.float16)
    x = base.transpose(1, 2)  # [2, 3, K], stride(-1) = 3
    assert not x.is_contiguous()
    bias = randn(n, dtype=torch.float16, seed=3)
    y = quant_matmul(x, qw, bias)
    ref = x.double() @ qw.dequantize(torch.float64).t() + bias.double()
    assert y.shape == (2, 3, n) and rel_err(y, ref) < 1e-3
    dy = randn(4, 3, n, dtype=torch.float32).transpose(0, 1)  # [3, 4, N], non-contiguous
    dx = quant_matmul_grad_input(dy, qw)
    assert dx.shape == (3, 4, k) and rel_err(dx, dy.double() @ qw.dequantize(torch.float64)) < 1e-5


@pytest.mark.parametrize("m", [3, 80])
def test_bias_both_paths(m):
    qw = make_qw("nf4", 4, 64, True)
    x = randn(m, qw.in_features)
    bias = randn(qw.out_features, seed=4)
    y = quant_matmul_forward(x, qw, bias, out=nan_like((m, qw.out_features), torch.float32))
    assert rel_err(y, x.double() @ qw.dequantize(torch.float64).t() + bias.double()) < 1e-5


@pytest.mark.parametrize("m", [2, 70])
def test_act_order_perm(m):
    """GPTQ act-order: columns stored in ``perm`` order; x gathered, dX scattered back."""
    qw = make_qw("int", 4, 32, False)
    gen = torch.Generator().manual_seed(5)
    qw = qw.to(DEVICE)
    qw.perm = torch.randperm(qw.in_features, generator=gen).to(DEVICE)
    w64 = qw.dequantize(torch.float64)  # original column order
    x, dy = randn(m, qw.in_features), randn(m, qw.out_features, seed=6)
    assert rel_err(quant_matmul(x, qw), x.double() @ w64.t()) < 1e-5
    assert rel_err(quant_matmul_grad_input(dy, qw), dy.double() @ w64) < 1e-5
    assert torch.equal(dequantize(qw, torch.float32), qw.dequantize(torch.float32))


@pytest.mark.parametrize("bits,g,k", [(2, 32, 96), (4, 96, 192), (3, 48, 96), (4, 8, 64)])
def test_ragged_k_and_odd_groups(bits, g, k):
    """K not a multiple of the K tile (masked tail), group sizes that are not powers of two
    (per-element scale gather), and groups smaller than a packed word's chunk."""
    qw = make_qw("int", bits, g, False, n=45, k=k)
    w64 = qw.dequantize(torch.float64)
    for m in (3, 50):
        x, dy = randn(m, k), randn(m, 45, seed=7)
        assert rel_err(quant_matmul_forward(x, qw), x.double() @ w64.t()) < 1e-5
        assert rel_err(quant_matmul_backward(dy, qw), dy.double() @ w64) < 1e-5
    assert torch.equal(dequantize_forward(qw, torch.float32), qw.dequantize(torch.float32))


@pytest.mark.parametrize("k", [32, 96])
def test_loop_runs_is_told_only_where_every_program_loops(monkeypatch, k):
    """Round 25: the launchers tell the kernels that every program's loop runs at least once
    (LOOP_RUNS, a ``tl.assume`` that keeps ptxas from serializing sm_90's wgmmas) only where it does.
    The interpreter checks every assumption: K = 32 (under one 64-column K tile: the forward's
    whole-tile loop never runs, the cut tile runs alone) and K = 96 at M = 1 (split-K: the last slice
    holds only the cut tile) run right with the launchers' flags, which are false there, and fail
    with the flag forced true.

    Compiled (a GPU) nothing checks a ``tl.assume`` at run time (a false one is undefined behaviour),
    the rules pick among the full candidate lists (64- to 256-column K tiles), and "auto" may take
    the dequantize path or a one-slice split-K launch that asks heuristics.split_loop_runs itself:
    there the forward runs the split-K kernel at M = 1 and the GEMM at M = 50 (the paths "auto" takes
    under the interpreter), and the flag each launch was given is checked against the loop it runs:
    one slice, whose loop over whole BLOCK_K tiles runs only where K holds one; at K = 32 and 96 some
    launch has a K tile wider than K, so a flag told true there fails."""
    import spies
    from qlk.kernels import fused_matmul as fm

    compiled = spies.compiled()
    qw = make_qw("int", 4, 32, False, n=45, k=k)
    w64 = qw.dequantize(torch.float64)
    real, told = fm._loop_runs, []

    def spy(*args, **kwargs):
        told.append((args, real(*args, **kwargs)))
        return told[-1][1]

    monkeypatch.setattr(fm, "_loop_runs", spy)
    if compiled:
        gemm = spies.record_launches(monkeypatch, fm, "_quant_matmul_fwd_kernel")
        decode = spies.record_launches(monkeypatch, fm, "_quant_matmul_splitk_kernel")
    for m in (1, 50):
        x, dy = randn(m, k), randn(m, 45, seed=7)
        path = ("splitk" if m <= SPLITK_MAX_M else "gemm") if compiled else "auto"
        assert rel_err(quant_matmul_forward(x, qw, path=path), x.double() @ w64.t()) < 1e-5
        assert rel_err(quant_matmul_backward(dy, qw), dy.double() @ w64) < 1e-5
    if compiled:
        assert len(gemm) == 1 and len(decode) == 1, (gemm, decode)
        assert not gemm[0].get("SPLIT_K", False) and decode[0]["DIRECT"]  # one slice each
        launches = gemm + decode
        for kw in launches:  # told only where the one slice's whole-tile loop runs
            assert not kw["LOOP_RUNS"] or k >= kw["BLOCK_K"], (k, kw["BLOCK_K"], kw["LOOP_RUNS"])
        assert any(k < kw["BLOCK_K"] for kw in launches), [kw["BLOCK_K"] for kw in launches]
        assert True in [runs for _, runs in told], told  # the N loops run
        return
    forward_k = [runs for (length, *_), runs in told if length == k]
    assert False in forward_k and True in [runs for _, runs in told], told  # the N loops run
    monkeypatch.setattr(fm, "_loop_runs", lambda *args, **kwargs: True)
    with pytest.raises(Exception, match="Assume failed"):
        quant_matmul_forward(randn(50 if k == 32 else 1, k), qw)


@pytest.mark.parametrize("f", FORMATS + [("nf4", 4, 128, True), ("nf4", 4, 32, False)], ids=fmt_id)
def test_dequantize_exact(f):
    """The standalone dequant kernel equals QuantizedWeight.dequantize bit for bit (fp32, and the
    single cast to fp16)."""
    qw = make_qw(*f)
    assert torch.equal(dequantize_forward(qw, torch.float32), qw.dequantize(torch.float32))
    assert torch.equal(dequantize(qw, torch.float16), qw.dequantize(torch.float16))


def test_dequantize_out_and_errors():
    qw = make_qw("int", 4, 64, False)
    out = nan_like(qw.shape, torch.float32)
    assert dequantize_forward(qw, torch.float32, out=out) is out
    assert torch.equal(out, qw.dequantize(torch.float32))
    with pytest.raises(TypeError):
        dequantize_forward(qw, torch.int32)
    with pytest.raises(ValueError):
        quant_matmul_forward(randn(3, 5), qw)
    with pytest.raises(ValueError):
        quant_matmul_forward(randn(3, qw.in_features), qw, path="nope")


def test_m_zero():
    qw = make_qw("int", 4, 32, False)
    assert quant_matmul(randn(0, qw.in_features), qw).shape == (0, qw.out_features)
    assert quant_matmul_grad_input(randn(2, 0, qw.out_features), qw).shape == (2, 0, qw.in_features)


def test_public_ops_use_triton():
    """qlk.quant_matmul(backend='triton') reaches these kernels and agrees with the reference."""
    qw = make_qw("int", 2, 64, False)
    x = randn(9, qw.in_features)
    y = qlk.quant_matmul(x, qw, backend="triton")
    assert torch.allclose(y, qlk.quant_matmul(x, qw, backend="reference"), rtol=1e-5, atol=1e-5)


def test_nf4_rows_straddling_blocks_fall_back():
    """NF4 whose blocks straddle rows (K % blocksize != 0) is read by the reference path."""
    gen = torch.Generator().manual_seed(8)
    qw = qlk.quantize(torch.randn(10, 48, generator=gen), fmt="nf4", bits=4, group_size=64).to(DEVICE)
    x = randn(3, 48)
    assert rel_err(quant_matmul(x, qw), x.double() @ qw.dequantize(torch.float64).t()) < 1e-5
    with pytest.raises(ValueError):
        quant_matmul_forward(x, qw)


@pytest.mark.skipif(not CUDA or INTERPRETED, reason="bf16 is only meaningful on a GPU (the interpreter computes bf16 wrongly)")
@pytest.mark.parametrize("f", [("int", 4, 32, False), ("int", 3, 64, False), ("nf4", 4, 64, True)], ids=fmt_id)
@pytest.mark.parametrize("m", [1, 16, 333, 1024])
def test_bf16_cuda(f, m):
    qw = make_qw(*f, n=1000, k=512)
    w64 = qw.dequantize(torch.float64)
    x, dy = randn(m, 512, dtype=torch.bfloat16), randn(m, 1000, dtype=torch.bfloat16)
    assert rel_err(quant_matmul(x, qw), x.double() @ w64.t()) < TOL[torch.bfloat16]
    assert rel_err(quant_matmul_grad_input(dy, qw), dy.double() @ w64) < TOL[torch.bfloat16]


@pytest.mark.parametrize("f", [("int", 4, 32, False), ("int", 3, 64, False), ("nf4", 4, 64, True)], ids=fmt_id)
def test_weights_past_32_bit_offsets_run_the_reference(f, monkeypatch):
    """The kernels address a weight's buffers with 32-bit row offsets (round 27): a weight whose
    buffers reach past ``INDEX_LIMIT`` goes to the torch reference (right, slower), never to a
    kernel whose offsets would wrap. The limit is lowered here to this small weight's reach."""
    from qlk.kernels import quant_tile

    qw = make_qw(*f)
    reach = max(quant_tile._index_reaches(qw).values())
    monkeypatch.setattr(quant_tile, "INDEX_LIMIT", reach)
    assert quant_tile.supports(qw) is None  # at the limit: still the kernels'
    monkeypatch.setattr(quant_tile, "INDEX_LIMIT", reach - 1)
    assert "32-bit offsets" in quant_tile.supports(qw)
    with pytest.raises(ValueError, match="32-bit offsets"):
        quant_matmul_forward(randn(3, qw.in_features), qw)
    w = qw.dequantize(torch.float64)
    x, dy = randn(17, qw.in_features), randn(17, qw.out_features)
    assert rel_err(quant_matmul(x, qw), x.double() @ w.t()) < 1e-5
    assert rel_err(quant_matmul_grad_input(dy, qw), dy.double() @ w) < 1e-5
    assert rel_err(dequantize(qw), w) < 1e-6


@pytest.mark.parametrize("f", [("int", 4, 32, False), ("int", 2, 64, False), ("int", 3, 32, False),
                               ("nf4", 4, 64, True), ("nf4", 4, 32, False)], ids=fmt_id)
def test_index_reach_is_each_buffers_last_element(f, monkeypatch):
    """Without the slack rows, each buffer's reach is the offset of its last element as the kernels
    index it (NF4's bytes as int32 words, its absmax per block), counted from numel, not from the
    formula: so a buffer the formula undercounts cannot slip under the limit."""
    from qlk.kernels import quant_tile

    qw = make_qw(*f, n=40, k=192 if f[2] != 128 else 256)
    if qw.fmt == "int":
        last = {"qweight": qw.qweight.numel() - 1, "scales": qw.scales.numel() - 1, "biases": qw.biases.numel() - 1}
        row = {"qweight": qw.qweight.stride(0), "scales": qw.scales.stride(0), "biases": qw.biases.stride(0)}
    else:
        last = {"qweight": qw.qweight.numel() // 4 - 1, "absmax": qw.absmax.numel() - 1}
        row = {"qweight": qw.in_features // 8, "absmax": qw.in_features // qw.group_size}
    # the slack: rows a tile may form an offset for past the last one (the widest tile's 256 and more)
    assert quant_tile.INDEX_SLACK_ROWS >= 256
    assert quant_tile._index_reaches(qw) == {b: last[b] + quant_tile.INDEX_SLACK_ROWS * row[b] for b in last}
    monkeypatch.setattr(quant_tile, "INDEX_SLACK_ROWS", 0)
    assert quant_tile._index_reaches(qw) == last


def test_every_buffer_counts_toward_the_offset_limit(monkeypatch):
    """A scale view whose rows lie far apart (a column slice of a wider tensor) reaches further than
    the packed words: the limit applies to it too."""
    from qlk.kernels import quant_tile

    qw = make_qw("int", 4, 32, False)
    wide_s = torch.zeros(qw.out_features, qw.scales.shape[1] * 64, dtype=qw.scales.dtype, device=DEVICE)
    wide_b = torch.zeros_like(wide_s)
    wide_s[:, ::64], wide_b[:, ::64] = qw.scales, qw.biases
    sliced = qlk.QuantizedWeight(fmt="int", shape=qw.shape, bits=4, group_size=32, dtype=qw.dtype,
                                 qweight=qw.qweight, scales=wide_s[:, ::64], biases=wide_b[:, ::64])
    reach = quant_tile._index_reaches(sliced)
    assert reach["scales"] > reach["qweight"]
    monkeypatch.setattr(quant_tile, "INDEX_LIMIT", reach["qweight"])
    assert quant_tile.supports(qw) is None
    assert "scales" in quant_tile.supports(sliced)
    x = randn(5, qw.in_features)
    assert rel_err(quant_matmul(x, sliced), x.double() @ qw.dequantize(torch.float64).t()) < 1e-5

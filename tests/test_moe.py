"""Mixture-of-experts: quantized stacked experts, per-expert adapters, grouped kernels.

Oracles are independent of the code under test: the grouped kernels against a float64 per-expert
product written from the INT format's documented math (ŵ = s·(q − 2^(b−1)) + c from the unpacked
codes) or NF4's float64 dequantization (checked against bitsandbytes in test_formats.py); patched
models against the Transformers model's own eager forward holding the dequantized experts; the
adapters' gradients against torch autograd on the float64 per-expert formulas.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import qlk
import spies
from qlk.autograd.experts import grouped_experts_linear
from qlk.formats import unpack_codes
from qlk.kernels.grouped_matmul import grouped_matmul_forward, grouped_matmul_grad_input
from qlk.nn.experts import QuantExpertProj, QuantExperts, route

transformers = pytest.importorskip("transformers")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs Triton")
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"

# (fmt, bits, group_size, double_quant)
FORMATS = [("int", 4, 32, False), ("int", 3, 64, False), ("int", 2, 128, False), ("nf4", 4, 64, True),
           pytest.param(("int", 4, 128, False), marks=pytest.mark.slow),
           pytest.param(("int", 2, 32, False), marks=pytest.mark.slow),
           pytest.param(("nf4", 4, 64, False), marks=pytest.mark.slow)]


def fmt_id(f):
    f = getattr(f, "values", [f])[0] if not isinstance(f, tuple) else f
    return f"nf4{'-dq' if f[3] else ''}" if f[0] == "nf4" else f"int{f[1]}g{f[2]}"


def oracle_weight(qw: qlk.QuantizedWeight) -> torch.Tensor:
    """float64 Ŵ [rows, K] from the documented math: INT ŵ = s·(q − 2^(b−1)) + c per group."""
    if qw.fmt == "nf4":
        return qw.dequantize(torch.float64)
    n, k = qw.shape
    q = unpack_codes(qw.qweight, qw.bits, k).double()
    g = qw.group_size
    s = qw.scales.double().repeat_interleave(g, 1)
    c = qw.biases.double().repeat_interleave(g, 1)
    return s * (q - 2 ** (qw.bits - 1)) + c


def offsets_of(counts):
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(counts).cumsum(0)
    return off


def per_expert(rows, offsets, fn):
    """float64 result of fn(e, rows_e) per expert, zeros past offsets[E]."""
    out = None
    for e in range(len(offsets) - 1):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        y = fn(e, rows[lo:hi].double())
        out = torch.zeros(rows.shape[0], y.shape[1], dtype=torch.float64) if out is None else out
        out[lo:hi] = y
    return out


# ---- grouped kernels (interpreter) -----------------------------------------------------------------------
# experts with 0, 1, odd and many rows (40 rows: 3 tiles of 16), then 2 rows routed to no expert
COUNTS = [0, 1, 17, 0, 3, 40]


@needs_kernels
def test_stacked_experts_past_32_bit_offsets_run_the_reference(monkeypatch):
    """Stacked experts index their words with 32-bit row offsets (e·N + n rows) like a dense layer:
    a stack past the limit (lowered here to this one's reach) is served by the per-expert reference,
    with the same result, and the grouped kernels are not launched."""
    from qlk.autograd import experts
    from qlk.kernels import grouped_matmul, quant_tile

    e_count, n, k = len(COUNTS), 24, 64
    gen = torch.Generator().manual_seed(5)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=32)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    x, dy = torch.randn(int(off[-1]), k, generator=gen), torch.randn(int(off[-1]), n, generator=gen)
    with qlk.use_backend("triton"):
        assert experts._use_kernels(x.device, qw, x.dtype)  # under the limit: the kernels
        monkeypatch.setattr(quant_tile, "INDEX_LIMIT", max(quant_tile._index_reaches(qw).values()) - 1)
        assert not experts._use_kernels(x.device, qw, x.dtype)
        launched = spies.record_calls(monkeypatch, grouped_matmul, "grouped_matmul_forward",
                                      "grouped_matmul_grad_input")
        y = experts.grouped_base(x, qw, off, e_count)
        dx = experts.grouped_base_grad(dy, qw, off, e_count)
    assert launched == []
    y_ref = per_expert(x, off, lambda e, xe: xe @ w[e].t())
    dx_ref = per_expert(dy, off, lambda e, de: de @ w[e])
    assert ((y.double() - y_ref).norm() / y_ref.norm()) < 1e-5
    assert ((dx.double() - dx_ref).norm() / dx_ref.norm()) < 1e-5


@needs_kernels
@pytest.mark.parametrize("f", FORMATS, ids=fmt_id)
def test_grouped_kernels_match_per_expert_oracle(f):
    """Forward (+ per-expert bias) and input gradient of every format; N = 40 (two N tiles, the
    second ragged), K = 128 (four K tiles of 32, a g128 group spans four), fp32."""
    fmt, bits, g, dq = f
    e_count, n, k = len(COUNTS), 40, 128
    gen = torch.Generator().manual_seed(3)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    rows = int(off[-1]) + 2
    x, dy = torch.randn(rows, k, generator=gen), torch.randn(rows, n, generator=gen)
    bias = torch.randn(e_count, n, generator=gen)
    y, _ = grouped_matmul_forward(x, qw, off, e_count, bias)
    dx = grouped_matmul_grad_input(dy, qw, off, e_count)
    y_ref = per_expert(x, off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    dx_ref = per_expert(dy, off, lambda e, de: de @ w[e])
    assert not y.isnan().any() and not dx.isnan().any()
    assert torch.equal(y[-2:], torch.zeros(2, n)) and torch.equal(dx[-2:], torch.zeros(2, k))
    assert ((y.double() - y_ref).norm() / y_ref.norm()) < 1e-5
    assert ((dx.double() - dx_ref).norm() / dx_ref.norm()) < 1e-5


@needs_kernels
@pytest.mark.parametrize("f", [("int", 4, 32, False), ("nf4", 4, 64, True), ("int", 2, 64, False),
                               ("int", 3, 32, False)], ids=fmt_id)
def test_grouped_kernels_rows_not_a_multiple_of_16_words(f):
    """K = 192: packed rows of 24 (INT4, NF4), 12 (INT2) and 18 (INT3) words, strides Triton does not
    specialize (not multiples of 16), so the kernels run with QN_ALIGN 8, 4 and 2
    (config.packed_rows_kernel); fp16 through the half2 decoders, experts with 0, 1, odd and many rows,
    NaN-poisoned rows past offsets[E], float64 per-expert oracle."""
    from qlk.kernels.config import row_alignment

    fmt, bits, g, dq = f
    e_count, n, k = len(COUNTS), 24, 192
    gen = torch.Generator().manual_seed(11)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    words = k // 8 if fmt == "nf4" else (3 * k // 32 if bits == 3 else k // (32 // bits))
    assert row_alignment(words) in (2, 4, 8)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    rows = int(off[-1]) + 2
    x = torch.randn(rows, k, generator=gen).half()
    dy = torch.randn(rows, n, generator=gen).half()
    x[-2:], dy[-2:] = float("nan"), float("nan")
    y, _ = grouped_matmul_forward(x, qw, off, e_count)
    dx = grouped_matmul_grad_input(dy, qw, off, e_count)
    y_ref = per_expert(x.float(), off, lambda e, xe: xe @ w[e].t())
    dx_ref = per_expert(dy.float(), off, lambda e, de: de @ w[e])
    assert torch.equal(y[-2:].float(), torch.zeros(2, n)) and torch.equal(dx[-2:].float(), torch.zeros(2, k))
    assert ((y.double() - y_ref).norm() / y_ref.norm()) < 2e-3
    assert ((dx.double() - dx_ref).norm() / dx_ref.norm()) < 2e-3


@needs_kernels
def test_grouped_kernels_other_tilings_fp16_pool_and_empty():
    """A 32-row tile with 64-wide K tiles (two g32 groups per tile), fp16, QA-LoRA pooling in the
    kernel; zero rows; every row routed to no expert."""
    e_count, n, k, g = len(COUNTS), 24, 128, 32
    gen = torch.Generator().manual_seed(4)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    rows = int(off[-1]) + 1
    x = torch.randn(rows, k, generator=gen).half()
    cfg = dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=1)
    y, pooled = grouped_matmul_forward(x, qw, off, e_count, pool=True, config=cfg)
    y_ref = per_expert(x, off, lambda e, xe: xe @ w[e].t())
    assert ((y.double() - y_ref).norm() / y_ref.norm()) < 1e-3
    routed = int(off[-1])  # P(X) of the routed rows (the adapters never read the others)
    torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                               rtol=1e-3, atol=1e-3)
    dx = grouped_matmul_grad_input(torch.ones(rows, n, dtype=torch.half), qw, off, e_count, config=cfg)
    dx_ref = per_expert(torch.ones(rows, n), off, lambda e, de: de @ w[e])
    assert ((dx.double() - dx_ref).norm() / dx_ref.norm()) < 1e-3
    y0, _ = grouped_matmul_forward(torch.zeros(0, k), qw, offsets_of([0] * e_count), e_count)
    assert y0.shape == (0, n)
    y_none, _ = grouped_matmul_forward(torch.randn(5, k), qw, offsets_of([0] * e_count), e_count)
    assert torch.equal(y_none, torch.zeros(5, n))


@needs_kernels
@pytest.mark.parametrize("bits,g", [(4, 32), (3, 64), (2, 16)])
def test_grouped_qalora_forward_on_the_64_column_tile(bits, g, monkeypatch):
    """Round 23's sm_80 QA-LoRA tile (heuristics.GROUPED_FOLDED_FWD_SM80's second entry: 128 rows,
    64 columns, 64-deep K) with the pooling in the kernel: two 128-row tiles in one expert, a ragged
    third N tile, one to four groups per K tile, the K loop over three tiles; NaN-poisoned output."""
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels.heuristics import GROUPED_FOLDED_FWD_SM80

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    counts, n, k = [0, 131, 5, 100], 136, 192
    gen = torch.Generator().manual_seed(bits * 100 + g)
    qw = qlk.quantize(torch.randn(len(counts) * n, k, generator=gen), bits=bits, group_size=g)
    w = oracle_weight(qw).reshape(len(counts), n, k)
    off = offsets_of(counts)
    x = torch.randn(int(off[-1]), k, generator=gen).half()
    cfg = dict(GROUPED_FOLDED_FWD_SM80[1][0], num_stages=1)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (128, 64, 64)
    y, pooled = grouped_matmul_forward(x, qw, off, len(counts), pool=True, config=cfg)
    y_ref = per_expert(x, off, lambda e, xe: xe @ w[e].t())
    assert not y.isnan().any()
    assert ((y.double() - y_ref).norm() / y_ref.norm()) < 2e-3
    torch.testing.assert_close(pooled, x.float().reshape(-1, k // g, g).mean(-1), rtol=1e-3, atol=1e-3)


# experts with 0, 1, odd and many rows, S/E > 32 (the large-M rules: GEMM K loop, NF4 absmax de-nested once)
COUNTS_LARGE = [0, 1, 17, 113]


@needs_kernels
@pytest.mark.parametrize("f", FORMATS[:4], ids=fmt_id)
def test_grouped_round2_paths_fp16_nan_poisoned(f, monkeypatch):
    """fp16 activations through both forward K loops on the same rows: DECODE (the small-M loop:
    INT decoded into fp16 by decode_tile's twin, padding rows masked) and the GEMM loop (NF4 with
    absmax de-nested once per call, S/E > 32), QA-LoRA pooling in both (INT); the input gradient on
    the transposed fp16 tile of quant_tile_t (NF4 de-nested). Outputs start as NaN; the rows past
    offsets[E] hold NaN in X / dY and must come out 0. N = 24 (ragged second N tile), K = 128
    (four K tiles of 32: a g64/g128 group spans several, pooled across tiles). NF4 has no DECODE
    variant here (its decode loop is the fp32 tile of the tests above)."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    fmt, bits, g, dq = f
    e_count, n, k = len(COUNTS_LARGE), 24, 128
    gen = torch.Generator().manual_seed(31)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS_LARGE)
    routed = int(off[-1])
    assert routed + 2 > 32 * e_count  # not the small-M rules
    x, dy = torch.randn(routed + 2, k, generator=gen).half(), torch.randn(routed + 2, n, generator=gen).half()
    x[routed:], dy[routed:] = float("nan"), float("nan")
    bias = torch.randn(e_count, n, generator=gen).half()
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    pool = fmt == "int"
    for decode in (True, False) if fmt == "int" else (False,):
        cfg = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1, DECODE=decode)
        y, pooled = grouped_matmul_forward(x, qw, off, e_count, bias, pool=pool, config=cfg)
        assert torch.equal(y[routed:], torch.zeros(2, n, dtype=torch.half)), decode
        assert not y.isnan().any(), decode
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, decode
        if pool:
            torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                       rtol=1e-3, atol=1e-3)
    dx = grouped_matmul_grad_input(dy, qw, off, e_count)
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w[e])
    assert torch.equal(dx[routed:], torch.zeros(2, k, dtype=torch.half)) and not dx.isnan().any()
    assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 2e-3


@needs_kernels
@pytest.mark.parametrize("halves", [False, True], ids=["int2-words", "int2-halves"])
def test_grouped_grad_input_half2_int2_unpackings(halves, monkeypatch):
    """The grouped input gradient's two INT2 unpackings (sm_90: 16-column chunks; sm_80: half words)
    under the half2 decoder (fp16 dY): g16 (a group of one 16-column chunk, two half words), K = 96
    over three K tiles of 32, experts with 0, 1, 17 and 40 rows, NaN-poisoned output, against float64."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_grad_int2_halves", lambda block_m: halves)
    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    counts, n, k = [0, 1, 17, 40], 24, 96
    gen = torch.Generator().manual_seed(47)
    qw = qlk.quantize(torch.randn(len(counts) * n, k, generator=gen), bits=2, group_size=16)
    w = oracle_weight(qw).reshape(len(counts), n, k)
    off = offsets_of(counts)
    dy = torch.randn(int(off[-1]), n, generator=gen).half()
    dx = grouped_matmul_grad_input(dy, qw, off, len(counts),
                                   config=dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1))
    ref = per_expert(dy, off, lambda e, de: de @ w[e].half().double())
    assert not dx.isnan().any()
    assert ((dx.double() - ref).norm() / ref.norm()) < 5e-4


# ---- adapters per expert: autograd against float64 per-expert formulas ------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("method,shared", [("qalora", False), ("qalora", True), ("lora", False)])
def test_expert_adapters_gradients(method, shared, backend):
    """Y, dX, dA, dB of one stacked projection with per-expert (or shared) adapters against torch
    autograd on Y_e = X_e·Ŵ_eᵀ + b_e + σ·In_e·A_eᵀ·B_eᵀ in float64 (In = P(X) for QA-LoRA, X for LoRA).
    On the Triton backend QA-LoRA runs fused (biases folded per expert, P(X) pooled in the kernel)."""
    e_count, n, k, g, r = 4, 24, 64, 32, 3
    counts = [5, 0, 1, 7]
    gen = torch.Generator().manual_seed(5)
    proj = QuantExpertProj.from_dense(torch.randn(e_count, n, k, generator=gen), torch.randn(e_count, n, generator=gen),
                                      False, bits=4, group_size=g, method=method, r=r, alpha=6,
                                      shared_adapter=shared)
    with torch.no_grad():
        proj.lora_B.normal_(generator=gen)
    proj.bias.requires_grad_(True)
    off = offsets_of(counts)
    x = torch.randn(sum(counts), k, generator=gen, requires_grad=True)
    dy = torch.randn(sum(counts), n, generator=gen)
    with qlk.use_backend(backend):
        y = proj(x, off)
        y.backward(dy)
    w = oracle_weight(proj.qweight).reshape(e_count, n, k)
    a64 = proj.lora_A.detach().double().requires_grad_(True)
    b64 = proj.lora_B.detach().double().requires_grad_(True)
    bias64 = proj.bias.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    outs = []
    for e in range(e_count):
        xe = x64[int(off[e]):int(off[e + 1])]
        inp = xe.reshape(xe.shape[0], k // g, g).mean(-1) if method == "qalora" else xe
        ae, be = (a64[0], b64[0]) if shared else (a64[e], b64[e])
        outs.append(xe @ w[e].t() + bias64[e] + proj.scaling * inp @ ae.t() @ be.t())
    y64 = torch.cat(outs)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.lora_A.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.lora_B.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.bias.grad.double(), bias64.grad, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_route_in_one_launch_is_the_torch_ops(monkeypatch):
    """Round 38: a decode-sized routing on the Triton backend is one launch
    (``qlk.kernels.routing.route_rows``) with exactly the torch ops' result: the stable sort by expert,
    ids >= E (expert-parallel sentinels) and < 0 (dropped slots) last and in no expert's rows; int64
    and int32 ids, a strided top-k view, 1 to 128 pairs over 1 to 255 experts. Past one program's
    size (:func:`qlk.kernels.routing.fits`) the torch ops route, as they do under the reference backend."""
    from qlk.kernels import routing
    from qlk.nn import experts as ex

    launches = spies.record_launches(monkeypatch, routing, "_route_kernel")
    gen = torch.Generator().manual_seed(38)
    cases = [(1, 1, 1), (1, 2, 8), (3, 2, 4), (16, 2, 8), (8, 8, 128), (16, 8, 60), (5, 3, 255), (64, 2, 8),
             (1, 8, 128)]
    for n_case, (t, k, e) in enumerate(cases):
        ids = torch.randint(-2, e + 3, (k, t), generator=gen).t()  # [T, k], a strided view
        if n_case % 2:
            ids = ids.int()
        before = len(launches)
        with qlk.backend.use_backend("triton"):
            order, offsets = ex.route(ids.to(DEVICE), e)
        assert len(launches) == before + 1, (t, k, e)
        with qlk.backend.use_backend("reference"):
            want_order, want_offsets = ex.route(ids, e)
        assert len(launches) == before + 1
        order, offsets = order.cpu(), offsets.cpu()
        assert order.dtype == offsets.dtype == torch.int64
        assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets), (t, k, e)
        flat = ids.reshape(-1).long()
        valid = (flat >= 0) & (flat < e)
        assert int(offsets[0]) == 0 and int(offsets[-1]) == int(valid.sum())
        assert torch.equal(flat[order[:int(offsets[-1])]], flat[valid].sort(stable=True).values)
    assert not routing.fits(256, 128) and routing.fits(128, 8)
    before = len(launches)
    with qlk.backend.use_backend("triton"):
        order, offsets = ex.route(torch.randint(0, 128, (32, 8), generator=gen).to(DEVICE), 128)
    assert len(launches) == before and int(offsets[-1]) == 256


@needs_kernels
def test_route_pairs_writes_each_rows_token_and_each_pairs_row(monkeypatch):
    """Round 39: :func:`qlk.kernels.routing.route_pairs` is :func:`route_rows` plus, from the same
    launch, token = order // k and position = the inverse of order (pair s = t·k + i sits in row
    position[s]); sentinels, negative ids, int32 ids and a strided view as in the routing test.
    Round 40: given a BLOCK_M, the same launch writes the grouped kernels' tile map with the token
    count as the row bound, remembered so that ``_tile_map`` launches nothing and returns the map
    ``_build_tile_map`` builds (tiles of 1, 2 and 16 rows; where the bound would need its device
    check, no map is written and ``_tile_map`` builds and checks one)."""
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels import routing

    launches = spies.record_launches(monkeypatch, routing, "_route_kernel")
    tile_maps = spies.record_launches(monkeypatch, gm, "_tile_map_kernel")
    gen = torch.Generator().manual_seed(39)
    for n_case, (t, k, e) in enumerate([(1, 1, 1), (1, 2, 8), (3, 3, 4), (16, 2, 8), (7, 8, 128), (5, 3, 255)]):
        ids = torch.randint(-2, e + 3, (k, t), generator=gen).t()
        if n_case % 2:
            ids = ids.int()
        flat = ids.reshape(-1).to(DEVICE)
        order, offsets, token, position = (v.cpu() for v in routing.route_pairs(flat, e, k))
        want_order, want_offsets = route(ids, e)
        assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets), (t, k, e)
        assert token.dtype == position.dtype == torch.int64
        assert torch.equal(token, want_order // k), (t, k, e)
        assert torch.equal(order[position], torch.arange(t * k)), (t, k, e)
        for block_m in (1, 2, 16):  # round 40: the projections' tile map from the same launch, remembered
            gm._LAST_TILE_MAP[0] = None
            launches.clear()
            _, offsets, _, _ = routing.route_pairs(flat, e, k, block_m)
            slots, check = gm.tile_map_slots(e, t * k, block_m, t)
            assert launches[-1]["TILE_MAP"] != check, (t, k, e, block_m)
            want = gm._build_tile_map(offsets, t * k, block_m, t)
            maps = len(tile_maps)
            got = gm._tile_map(offsets, t * k, block_m, t)
            assert len(tile_maps) == maps + check, (t, k, e, block_m)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (t, k, e, block_m, got, want)
    with pytest.raises(ValueError, match="top_k=3"):
        routing.route_pairs(torch.zeros(4, dtype=torch.int64, device=DEVICE), 8, 3)


@needs_kernels
def test_tile_map_remembered_for_the_same_unchanged_offsets(monkeypatch):
    """Round 39: a second ``_tile_map`` of the same offsets object, unchanged, with the same arguments
    is the same tensors without a launch; an in-place write to the offsets (through a view too), another
    BLOCK_M, row count or row bound, an equal but other tensor, or inference tensors build it again,
    and each rebuilt map is the right one."""
    from qlk.kernels import grouped_matmul as gm

    spy = spies.record_launches(monkeypatch, gm, "_tile_map_kernel")
    off = offsets_of([3, 0, 20, 5]).to(DEVICE)
    first = gm._tile_map(off, 30, 16, 20)
    assert gm._tile_map(off, 30, 16, 20) is first and len(spy) == 1
    assert gm._tile_map(off.clone(), 30, 16, 20) is not first and len(spy) == 2  # never read to compare
    for args in ((30, 8, 20), (30, 16, None), (31, 16, 20)):
        remembered = gm._tile_map(off, 30, 16, 20)
        assert gm._tile_map(off, 30, 16, 20) is remembered and gm._tile_map(off, *args) is not remembered, args
    assert len(spy) == 8
    again = gm._tile_map(off, 30, 16, 20)
    off[1:].view(-1)[1:2] += 7  # through a view of a view: expert 1 takes 7 of expert 2's rows
    rebuilt = gm._tile_map(off, 30, 16, 20)
    assert rebuilt is not again and len(spy) == 10
    want = [(0, 0), (1, 3), (2, 10), (3, 23)]
    assert [(int(e), int(r)) for e, r in zip(*rebuilt[:2]) if e >= 0] == want
    with torch.inference_mode():
        frozen = offsets_of([3, 0, 20, 5]).to(DEVICE)
        assert gm._tile_map(frozen, 30, 16) is not gm._tile_map(frozen, 30, 16)
    assert len(spy) == 12


def _combine64(out, position, weights, offsets):
    """float64 Y[t] = Σ_i w[t, i]·out[position[t·k + i]] over the pairs with a row below offsets[E]."""
    t, k = weights.shape
    y = torch.zeros(t, out.shape[1], dtype=torch.float64)
    for s in range(t * k):
        if int(position[s]) < int(offsets[-1]):
            y[s // k] += float(weights[s // k, s % k]) * out[int(position[s])].double()
    return y


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_combine_is_the_weighted_sum_of_each_tokens_rows(dtype):
    """Round 39: :func:`qlk.kernels.moe_combine.combine` against float64, H = 300 (two H tiles, the
    second ragged), 7 tokens top-3 over 4 experts with sentinels and dropped ids: the rows past
    offsets[E] are NaN and the weights of those pairs NaN / inf, and none of it reaches Y; strided
    [T, k] weights (a transposed view) in another dtype; Y in the hidden states' dtype, NaN-free."""
    from qlk.kernels import moe_combine, routing

    gen = torch.Generator().manual_seed(40)
    t, k, e, h = 7, 3, 4, 300
    ids = torch.randint(-1, e + 2, (t, k), generator=gen)
    ids[0] = torch.tensor([0, 5, -1])
    order, offsets, _, position = routing.route_pairs(ids.reshape(-1).to(DEVICE), e, k)
    routed = int(offsets[-1])
    assert 0 < routed < t * k
    out = torch.randn(t * k, h, generator=gen).to(dtype)
    out[routed:] = float("nan")
    weights = torch.rand(k, t, generator=gen, dtype=torch.float64).t()  # strided
    no_expert = (ids < 0) | (ids >= e)
    weights[no_expert] = torch.tensor([float("nan"), float("inf")]).repeat(t * k)[:int(no_expert.sum())].double()
    y = moe_combine.combine(out.to(DEVICE), position, weights.to(DEVICE), offsets, dtype)
    want = _combine64(out, position.cpu(), weights, offsets.cpu())
    assert y.dtype == dtype and y.shape == (t, h) and y.isfinite().all()
    assert (y.cpu().double() - want).norm() / want.norm() < (1e-6 if dtype == torch.float32 else 1e-3)
    empty = moe_combine.combine(out[:0].to(DEVICE), position[:0], weights[:0].to(DEVICE), offsets)
    assert empty.shape == (0, h)
    with pytest.raises(ValueError, match="weights"):
        moe_combine.combine(out.to(DEVICE), position, weights[:, :2].to(DEVICE), offsets)


@needs_kernels
@pytest.mark.parametrize("family,f", [("mixtral", ("int", 4, 32, False)), ("gpt_oss", ("nf4", 4, 64, True))],
                         ids=lambda v: v if isinstance(v, str) else fmt_id(v))
def test_experts_decode_forward_is_the_general_forward(family, f, monkeypatch):
    """Round 39: under ``torch.no_grad`` on the Triton backend a decode-sized experts call takes
    ``_decode_forward`` (one routing launch that also writes tokens and positions, the combine kernel)
    (both projections on one tile map, which since round 40 the routing launch writes) and gives what
    the general forward gives: Mixtral's gated,
    bias-free experts and gpt-oss's
    transposed, biased ones; sentinels, dropped ids and their NaN / inf weights; 1 and 5 tokens.
    Round 40: Mixtral's gate-up projection (fused QA-LoRA) reads each row's token in place (GATHER)
    and forms silu(G)·U in its epilogue (GATE_UP; transformers' default gate with SiLU); gpt-oss's
    LoRA gathers its rows for the adapter and its own clamped gate stays the model's. With grad enabled and the
    adapters (QA-LoRA on INT, LoRA on NF4) requiring grad, or with fp64 activations, the general
    forward runs."""
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels import moe_combine, routing

    fmt, bits, g, dq = f
    patched = qlk.patch_model(tiny(family), bits=bits, group_size=g, fmt=fmt, double_quant=dq, r=4,
                              method="qalora" if fmt == "int" else "lora", verbose=False).to(DEVICE)
    q = next(m for m in patched.modules() if isinstance(m, QuantExperts))
    for proj in q.projections.values():
        with torch.no_grad():
            proj.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    routes = spies.record_launches(monkeypatch, routing, "_route_kernel")
    combines = spies.record_launches(monkeypatch, moe_combine, "_combine_kernel")
    tile_maps = spies.record_launches(monkeypatch, gm, "_tile_map_kernel")
    projections = spies.record_launches(monkeypatch, gm, "_grouped_matmul_fwd_kernel")
    assert q._gate_is_silu_times_up() == (family == "mixtral")
    gen = torch.Generator().manual_seed(41)
    for t in (1, 5):
        h = torch.randn(t, 64, generator=gen).to(DEVICE)
        idx = torch.randint(0, q.num_experts, (t, 2), generator=gen)
        idx[0, 1] = q.num_experts + 1 if t == 1 else -1
        w = torch.rand(t, 2, generator=gen)
        w[0, 1] = float("nan")
        idx, w = idx.to(DEVICE), w.to(DEVICE)
        with qlk.use_backend("triton"), torch.no_grad():
            maps = len(tile_maps)
            projections.clear()
            got = q(h, idx, w)
            assert len(combines) == 1 and routes[-1]["PAIRS"], (len(combines), routes)
            # gpt-oss's LoRA (unfused) gathers its rows with one index_select for the adapter's X·Aᵀ too
            mixtral = family == "mixtral"
            assert [(kw["GATHER"], kw["GATE_UP"]) for kw in projections] == [(mixtral, mixtral), (False, False)]
            # both projections read one tile map, written by the routing launch (round 40)
            assert len(tile_maps) == maps and routes[-1]["TILE_MAP"], routes[-1]
            with monkeypatch.context() as mp:
                mp.setattr(QuantExperts, "_decodes_in_few_launches", lambda self, *a: False)
                want = q(h, idx, w)
        combines.clear()
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    with qlk.use_backend("triton"):
        y = q(h, idx, w)
    assert not combines and y.requires_grad
    torch.testing.assert_close(y.detach(), want, rtol=2e-5, atol=2e-5)
    with qlk.use_backend("triton"), torch.no_grad():  # fp64 activations keep the fp64 sums
        assert q(h.double(), idx, w.double()).dtype == torch.float64 and not combines


@needs_kernels
def test_experts_decode_forms_the_silu_gate_only_for_the_default_silu_gate(monkeypatch):
    """The gate-up epilogue (round 40) stands in for the model's gate only where that gate is
    transformers' default ``act_fn(gate) * up`` with SiLU as act_fn (``ACT2FN["silu"]`` or
    ``nn.SiLU``). With GELU, a SiLU module whose forward was replaced on the instance, or an experts
    class with a gate of its own (SiLU on the other half), the model's own gate runs (no GATE_UP
    launch) and the decode forward still gives the general forward's result; base weights without
    adapters (the grouped kernel with the gather and the epilogue)."""
    from transformers.activations import ACT2FN

    from qlk.kernels import grouped_matmul as gm

    patched = qlk.patch_model(tiny("mixtral"), bits=4, group_size=32, method=None, verbose=False).to(DEVICE)
    q = next(m for m in patched.modules() if isinstance(m, QuantExperts))
    projections = spies.record_launches(monkeypatch, gm, "_grouped_matmul_fwd_kernel")
    gen = torch.Generator().manual_seed(42)
    h = torch.randn(3, 64, generator=gen).to(DEVICE)
    idx = torch.randint(0, q.num_experts, (3, 2), generator=gen).to(DEVICE)
    w = torch.rand(3, 2, generator=gen).to(DEVICE)
    replaced = ACT2FN["silu"]
    replaced.forward = lambda x: torch.nn.functional.silu(x) * 1.5
    default = type(q._original)

    class OwnGate(default):
        def _apply_gate(self, gate_up):
            up, gate = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up

    for act, cls, fused in ((ACT2FN["silu"], default, True), (nn.SiLU(), default, True),
                            (ACT2FN["gelu"], default, False), (replaced, default, False),
                            (ACT2FN["silu"], OwnGate, False)):
        q._original.act_fn = act
        q._original.__class__ = cls
        assert q._gate_is_silu_times_up() == fused, act
        with qlk.use_backend("triton"), torch.no_grad():
            projections.clear()
            got = q(h, idx, w)
            assert [(kw["GATHER"], kw["GATE_UP"]) for kw in projections] == [(True, fused), (False, False)], act
            with monkeypatch.context() as mp:
                mp.setattr(QuantExperts, "_decodes_in_few_launches", lambda self, *a: False)
                want = q(h, idx, w)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_routing_sentinels_and_merge_keeps_int():
    """route(): stable sort with sentinels (ids >= E) last; merged QA-LoRA experts keep codes, bits
    and format, and compute what the adapter did."""
    order, off = route(torch.tensor([[2, 0], [4, 2], [0, 1]]), 4)
    assert off.tolist() == [0, 2, 3, 5, 5] and order.tolist() == [1, 4, 5, 0, 3, 2]
    gen = torch.Generator().manual_seed(6)
    proj = QuantExpertProj.from_dense(torch.randn(3, 16, 64, generator=gen), None, False, bits=3, group_size=32,
                                      method="qalora", r=2)
    with torch.no_grad():
        proj.lora_B.normal_(generator=gen)
    off = offsets_of([4, 0, 3])
    x = torch.randn(7, 64, generator=gen)
    with torch.no_grad():
        before = proj(x, off)
        codes = proj.weight_packed.clone()
        proj.merge_adapter_()
        after = proj(x, off)
    assert proj.method is None and proj.fmt == "int" and proj.bits == 3 and torch.equal(proj.weight_packed, codes)
    torch.testing.assert_close(after, before, rtol=1e-2, atol=2e-2)  # fp16 biases after the merge


# ---- models -------------------------------------------------------------------------------------------------
COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=96, max_position_embeddings=64)


def tiny(family):
    cfg = {
        "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=5, num_experts_per_tok=2),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2,
                                                         moe_intermediate_size=64, head_dim=16),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2,
                                                         moe_intermediate_size=64, shared_expert_intermediate_size=64),
        "olmoe": lambda: transformers.OlmoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2),
        "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                     layer_types=["full_attention"] * 2),
    }[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def dense_with_dequantized_experts(dense, patched):
    """The dense model with every expert weight replaced by its float64 oracle dequantization, in
    the model's own layout (the model's own eager forward runs it)."""
    ref = copy.deepcopy(dense)
    for name, m in patched.named_modules():
        if isinstance(m, QuantExperts):
            target = ref.get_submodule(name)
            for pname, proj in m.projections.items():
                w = oracle_weight(proj.qweight).float().reshape(proj.num_experts, proj.out_features, proj.in_features)
                getattr(target, pname).data.copy_(w.transpose(1, 2) if proj.transposed else w)
        elif isinstance(m, qlk.QuantLinear):
            ref.get_submodule(name).weight.data.copy_(m.qweight.dequantize(torch.float32))
    return ref


@pytest.mark.parametrize("family,f", [
    ("mixtral", ("int", 4, 32, False)), ("qwen3_moe", ("nf4", 4, 64, True)), ("qwen2_moe", ("int", 3, 64, False)),
    ("olmoe", ("int", 2, 32, False)), ("gpt_oss", ("int", 4, 64, False)),
], ids=lambda v: v if isinstance(v, str) else fmt_id(v))
def test_patched_moe_logits_match_dense_with_dequantized_experts(family, f):
    fmt, bits, g, dq = f
    dense = tiny(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense in silence, and nothing to warn about here
        patched = qlk.patch_model(copy.deepcopy(dense), bits=bits, group_size=g, fmt=fmt, double_quant=dq,
                                  method=None, verbose=False)
    experts = [m for m in patched.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2
    assert not any(p.dim() == 3 for p in patched.parameters())  # no dense expert weight left
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = patched(ids).logits
        want = dense_with_dequantized_experts(dense, patched)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the grouped kernels are covered above; this runs a whole model through the interpreter
@needs_kernels
def test_patched_mixtral_on_the_grouped_kernels():
    dense = tiny("mixtral")
    patched = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, method=None, verbose=False)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), qlk.use_backend("triton"):
        got = patched(ids).logits
    with torch.no_grad():
        want = dense_with_dequantized_experts(dense, patched)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Opaque(nn.Module):
    """A weight-bearing module qlk does not understand (3-D weight, no experts contract)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Parameter(torch.randn(3, 8, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) + x @ self.blocks.sum(0)


def test_unknown_weights_are_named_with_their_size():
    with pytest.warns(UserWarning, match=r"blocks|3x8x8.*192") as record:
        qlk.patch_model(_Opaque(), bits=4, group_size=8, method=None, verbose=False)
    msg = str(record[0].message)
    assert "left dense" in msg and "3x8x8" in msg and "(192)" in msg


def test_train_merge_save_reload_cpu(tmp_path):
    """Main-job path on a tiny Mixtral through the Python API: QA-LoRA per expert trains, merges into
    INT4 (experts stay INT4), and reloads from save_quantized / save_adapter to the same logits."""
    dense = tiny("mixtral")
    model = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, r=4, verbose=False).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts.gate_up_proj.lora_A" in n for n in names)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    qlk.save_adapter(model, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        before = model(ids).logits
    fresh = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, r=4, verbose=False).eval()
    qlk.load_adapter(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before)
    qlk.merge_model(model)
    for m in model.modules():
        if isinstance(m, QuantExpertProj):
            assert m.method is None and m.fmt == "int" and m.bits == 4
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, before, rtol=2e-2, atol=2e-2)  # fp16 group biases after the merge
    qlk.save_quantized(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    reloaded = qlk.load_quantized(transformers.AutoModelForCausalLM.from_config(dense.config).eval(),
                                  tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged)
    with pytest.raises(ValueError, match="expert"):
        wrong = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, r=8, verbose=False)
        qlk.load_adapter(wrong, tmp_path / "adapter.safetensors")


def test_qlk_config_quantizes_experts_on_load_and_round_trips(tmp_path):
    """from_pretrained(quantization_config=QlkConfig(...)) quantizes each stacked expert weight as it
    arrives (the same bytes as patch_model), save_pretrained keeps them stacked (NF4 double-quant
    state included) and they load back; method='lora' attaches trainable adapters per expert."""
    from qlk.integrations.transformers import QlkConfig

    dense = tiny("mixtral")
    dense.save_pretrained(tmp_path / "dense")
    ref = qlk.patch_model(copy.deepcopy(dense), bits=4, fmt="nf4", group_size=64, method=None, verbose=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=QlkConfig(bits=4, fmt="nf4", group_size=64, method="lora", r=2))
    assert not any(p.dim() == 3 for n, p in model.named_parameters() if "lora_" not in n)
    projs = {n: m for n, m in model.named_modules() if isinstance(m, QuantExpertProj)}
    ref_projs = {n: m for n, m in ref.named_modules() if isinstance(m, QuantExpertProj)}
    assert set(projs) == set(ref_projs) and len(projs) == 4
    for n, p in projs.items():
        assert p.method == "lora" and p.lora_A.requires_grad and p.lora_A.shape == (5, 2, p.in_features)
        for buf in ("weight_packed", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset"):
            assert torch.equal(getattr(p, buf), getattr(ref_projs[n], buf))
    model.save_pretrained(tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,bits,g,dq", [("int", 4, 32, False), ("int", 3, 128, False), ("int", 2, 64, False),
                                           ("nf4", 4, 64, True), ("nf4", 4, 64, False)])
def test_memory_table_bits_are_the_formats_stored_bits(fmt, bits, g, dq):
    """docs/moe.md's memory table (qlk.moe.format_bits) equals what a QuantizedWeight stores."""
    from qlk.moe import format_bits

    qw = qlk.quantize(torch.randn(128, 512), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    offset = 32 / qw.qweight.numel() / 2 if dq else 0.0  # NF4 DQ: one fp32 offset per tensor, not per weight
    assert format_bits(fmt, bits, g, dq) == pytest.approx(qw.bits_per_param - offset, rel=1e-12)


class _NewExperts(nn.Module):
    """A new model's experts, written to the Transformers experts contract only (no qlk code for it):
    transposed [E, in, out] weights with biases and an up-projection without gate."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.has_gate, self.has_bias, self.is_transposed = 4, False, True, True
        gen = torch.Generator().manual_seed(11)
        self.up_proj = nn.Parameter(torch.randn(4, 64, 32, generator=gen))
        self.up_proj_bias = nn.Parameter(torch.randn(4, 32, generator=gen))
        self.down_proj = nn.Parameter(torch.randn(4, 32, 64, generator=gen))
        self.down_proj_bias = nn.Parameter(torch.randn(4, 64, generator=gen))
        self.act_fn = nn.GELU()

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for i, e in enumerate(top_k_index[t].tolist()):
                if 0 <= e < self.num_experts:
                    h = self.act_fn(hidden[t] @ self.up_proj[e] + self.up_proj_bias[e])
                    out[t] += top_k_weights[t, i] * (h @ self.down_proj[e] + self.down_proj_bias[e])
        return out


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_new_experts_class_by_structure_zero_tokens_and_sentinels(backend, monkeypatch):
    """An experts class qlk has never seen is patched by structure; its own forward on the
    dequantized weights is the oracle. Zero tokens, ids >= E (expert-parallel sentinels) and ids < 0
    (dropped slots) work, and those pairs add nothing even where the router's weight is NaN or inf.
    The kernels' forwards are told the token count bounds every expert's rows (top-k)."""
    from qlk.kernels import grouped_matmul as gm

    bounds = []
    tile_map = gm._tile_map
    monkeypatch.setattr(gm, "_tile_map", lambda off, rows, bm, max_rows=None: bounds.append(max_rows)
                        or tile_map(off, rows, bm, max_rows))
    dense = nn.ModuleDict({"experts": _NewExperts()})
    patched = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, method=None, verbose=False)
    q = patched["experts"]
    assert isinstance(q, QuantExperts)
    ref = dense_with_dequantized_experts(dense, patched)["experts"]
    idx = torch.tensor([[0, 1], [1, 4], [3, 0], [2, 2], [4, 4], [-1, 3], [2, -7]])
    w = torch.rand(7, 2, generator=torch.Generator().manual_seed(12))
    w[(idx < 0) | (idx >= 4)] = torch.tensor([float("nan"), float("inf"), float("nan"), -float("inf"), float("nan")])
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(13))
    want = ref(h, idx, w)
    for decode in ([True, False] if backend == "triton" else [False]):  # round 39's decode path, the general one
        bounds.clear()
        with monkeypatch.context() as mp, torch.no_grad(), qlk.use_backend(backend):
            if not decode:
                mp.setattr(QuantExperts, "_decodes_in_few_launches", lambda self, *args: False)
            got = q(h, idx, w)
            assert got.isfinite().all(), decode
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert bounds == ([7, 7] if backend == "triton" else []), bounds  # both projections, 7 tokens
            empty = q(torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
        assert empty.shape == (0, 64)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_expert_qalora_saves_only_the_pooled_input(backend):
    """What autograd keeps for one QA-LoRA expert projection: P(X) of the routed rows (S·K/g) and
    the routing offsets — never X (S·K), never a dequantized weight."""
    e_count, n, k, g, r, rows = 3, 32, 128, 32, 4, 24
    proj = QuantExpertProj.from_dense(torch.randn(e_count, n, k), None, False, bits=4, group_size=g,
                                      method="qalora", r=r)
    off = offsets_of([10, 0, 14])
    x = torch.randn(rows, k, requires_grad=True)
    keep = {t.data_ptr() for t in [proj.lora_A, proj.lora_B, off] + list(proj.qweight.tensors().values())}
    saved = []

    def pack(t):
        if t.data_ptr() not in keep:
            saved.append(t.numel())
        return t

    with qlk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = proj(x, off)
    assert sum(saved) <= rows * k // g, saved
    with qlk.use_backend(backend):
        y.sum().backward()
    assert x.grad is not None and proj.lora_A.grad is not None


def test_target_modules_name_experts_as_a_whole():
    """Experts are selected by their module name, all their projections, or the usual per-projection
    list (gate_proj + up_proj name the fused gate_up_proj); experts left out are warned about."""
    from qlk.moe import select_experts

    class Gated(nn.Module):
        num_experts, has_gate, has_bias, is_transposed = 2, True, False, False

        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Parameter(torch.zeros(2, 8, 8)), nn.Parameter(torch.zeros(2, 8, 4))

        def _apply_gate(self, h):
            return h

    model = nn.ModuleDict({"experts": Gated()})
    for targets in (["experts"], ["gate_up_proj", "down_proj"], ["gate_proj", "up_proj", "down_proj", "q_proj"],
                    r".*experts", None):
        assert list(select_experts(model, targets)) == ["experts"], targets
    assert select_experts(model, ["q_proj"]) == {}
    with pytest.raises(ValueError, match="not all of its projections"):
        select_experts(model, ["up_proj", "down_proj"])
    with pytest.warns(UserWarning, match=r"left dense.*experts 4x64x32"):
        qlk.patch_model(nn.ModuleDict({"experts": _NewExperts(), "proj": nn.Linear(64, 64)}), bits=4, group_size=32,
                        target_modules=["proj"], verbose=False)


# ---- PEFT export and the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("family,method,shared", [("mixtral", "lora", False), ("gpt_oss", "qalora", True)])
def test_export_peft_expert_adapters_load_on_the_dense_model(tmp_path, family, method, shared):
    """qlk's per-expert (or shared) adapters exported for PEFT's target_parameters: PeftModel on the
    dense model holding the dequantized experts gives qlk's logits; without the adapter it does not."""
    peft = pytest.importorskip("peft")
    from qlk.integrations.peft import export_peft_adapter

    dense = tiny(family)
    model = qlk.patch_model(copy.deepcopy(dense), bits=4, group_size=32, method=method, r=4, alpha=8,
                            shared_expert_adapter=shared, verbose=False).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "method", None):
                m.lora_B.normal_(0, 0.05)  # B = 0 at init: make every expert's ΔW non-zero and different
    export_peft_adapter(model, tmp_path / "adapter")
    ref = dense_with_dequantized_experts(dense, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing or unexpected key is a PEFT warning
        loaded = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)
        with loaded.disable_adapter():
            assert (loaded(ids).logits - want).abs().max() > 1e-2
    for m in model.modules():
        if getattr(m, "method", None):
            m.dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        export_peft_adapter(model, tmp_path / "again")


@pytest.fixture
def tiny_moe_dir(tmp_path):
    from test_cli import byte_tokenizer

    tok = byte_tokenizer()
    cfg = transformers.MixtralConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                     num_local_experts=4, num_experts_per_tok=2, **{**COMMON, "vocab_size": len(tok)})
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"instruction": f"What is {i}+{i}?", "response": f"Answer: {2 * i}."} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    return tmp_path


def test_finetune_cli_on_a_local_moe_checkpoint(tiny_moe_dir, capsys, monkeypatch):
    """`qlk finetune --model <tiny Mixtral dir>`: trains QA-LoRA on every expert, merges (the
    experts stay INT4), and the merged directory reloads to the adapter's logits; the summaries
    count the expert weights (none left dense in silence)."""
    import json

    from qlk.cli import main
    from qlk.hf_models import load_model
    from qlk.moe import expert_projections

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QLK_CACHE_DIR", "off")
    out = tiny_moe_dir / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*left dense.*")
        assert main(["finetune", "--model", str(tiny_moe_dir / "model"), "--data", str(tiny_moe_dir / "d.jsonl"),
                     "--output-dir", str(out), "--steps", "2", "--batch-size", "2", "--max-length", "64",
                     "--save-every", "2", "--no-progress", "--no-generate", "--eval-fraction", "0"]) == 0
    log = capsys.readouterr().out
    assert "8 layers + 4 expert projections (16 expert matrices)" in log, log
    summary = json.loads((out / "summary.json").read_text())
    mem = summary["memory_training"]
    assert mem["expert_projections"] == 4 and mem["expert_matrices"] == 16
    # 4 experts x (128x64 + 64x64) x 2 layers + 8 attention layers, at INT4 g32 (4 + 32/32 bits)
    assert mem["quantized_params"] == 2 * 4 * (128 * 64 + 64 * 64) + 2 * (2 * 64 * 64 + 2 * 32 * 64)
    assert mem["bits_per_param_quantized"] == pytest.approx(5.0)
    trained = {n: p.lora_B.abs().sum().item() for n, p in expert_projections(
        qlk.load_adapter(qlk.patch_model(load_model(tiny_moe_dir / "model")[0], bits=4, group_size=32, r=16, alpha=32,
                                         verbose=False), out / "adapter.safetensors")).items()}  # fmt: skip
    assert len(trained) == 4 and all(v > 0 for v in trained.values())
    merged, _, _ = load_model(out / "merged")
    projs = expert_projections(merged)
    assert len(projs) == 4 and all(p.method is None and p.fmt == "int" and p.bits == 4 for p in projs.values())
    base = qlk.patch_model(load_model(tiny_moe_dir / "model")[0], bits=4, group_size=32, r=16, alpha=32, verbose=False)
    qlk.load_adapter(base, out / "adapter.safetensors")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, base.eval()(input_ids=ids).logits, atol=2e-3, rtol=2e-3)
    assert main(["inspect", str(out / "merged")]) == 0
    assert "8 qlk layers + 4 expert projections (16 expert matrices)" in capsys.readouterr().out


@needs_kernels
@pytest.mark.parametrize("f,split", [(("int", 4, 32, False), 3), (("nf4", 4, 64, True), 2)],
                         ids=["int4g32-split3", "nf4-dq-split2"])
def test_grouped_split_k_decode_path(f, split):
    """The small-M split-K forward (fp32 atomic partial sums over K slices, then bias and cast):
    16-row tiles, experts with 0, 1, odd and many rows (3 tiles), K = 128 in 4 tiles of 32 over
    ``split`` slices (3 slices of 2 tiles: the last is empty), a ragged second N tile; the rows
    past offsets[E] hold NaN and must come out 0; P(X) of the routed rows."""
    fmt, bits, g, dq = f
    e_count, n, k = len(COUNTS), 40, 128
    gen = torch.Generator().manual_seed(21)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    routed = int(off[-1])
    x = torch.randn(routed + 2, k, generator=gen)
    x[routed:] = float("nan")  # sentinel rows: never read
    bias = torch.randn(e_count, n, generator=gen)
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=split)
    y, pooled = grouped_matmul_forward(x, qw, off, e_count, bias, pool=fmt == "int", config=cfg)
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    assert torch.equal(y[routed:], torch.zeros(2, n))
    assert not y.isnan().any()
    assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 1e-5
    if fmt == "int":
        torch.testing.assert_close(pooled[:routed], x[:routed].reshape(routed, k // g, g).mean(-1))
    y1, _ = grouped_matmul_forward(x[:routed], qw, off, e_count, config=cfg)  # no bias, no sentinel rows
    y1_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t())
    assert ((y1.double() - y1_ref).norm() / y1_ref.norm()) < 1e-5


@needs_kernels
@pytest.mark.parametrize("f,split,programs", [(("int", 4, 32, False), 3, None), (("int", 3, 16, False), 2, 2),
                                              (("nf4", 4, 64, True), 2, None)],
                         ids=["int4g32-split3", "int3g16-split2-slot-loop", "nf4-dq-split2"])
def test_grouped_split_k_finish_in_the_kernel(f, split, programs, monkeypatch):
    """FINISH of the grouped split-K decode (``fused_matmul.SPLITK_FINISH``, round 38): each
    (tile slot, N tile)'s last K slice stores Y (+ its expert's bias) into the NaN-poisoned output and
    the programs store the sentinel rows' zeros (35 rows: 3 row blocks, shared over program rows and
    slices), in one launch: no workspace made, the kept workspace and counts back at zero after the
    call, so a second call (other rows, no bias, no sentinels) into the same buffers is right too.
    Experts with 0, 1, odd and many rows (3 tiles), K = 128 in 4 tiles of 32 over ``split`` slices
    (3: the last is empty), a ragged second N tile; a slot loop of 2 program rows; float64 oracle.
    On a GPU (its tensors on CUDA) each call repeats 20 times (the slices run concurrently)."""
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(fm, "SPLITK_FINISH", True)
    monkeypatch.setattr(fm, "_FINISH_BUFFERS", {})
    made = []
    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: made.append(
        torch.full(shape, float("nan"), dtype=dtype, device=device)) or made[-1])
    launches = spies.record_launches(monkeypatch, gm, "_grouped_matmul_splitk_kernel")
    fmt, bits, g, dq = f
    e_count, n, k, tail = len(COUNTS), 40, 128, 35
    gen = torch.Generator().manual_seed(38 + bits)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    routed = int(off[-1])
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=split)
    if programs:
        cfg["PROGRAMS"] = programs
    for call, (rows, biased) in enumerate([(routed + tail, True)] * (1 if INTERPRETED else 20) + [(routed, False)]):
        x = torch.randn(rows, k, generator=gen).half()
        x[routed:] = float("nan")  # sentinel rows: never read
        bias = torch.randn(e_count, n, generator=gen).half() * 4 if biased else None
        with monkeypatch.context() as during:  # the fp32 [S, N] workspace the unfinished launch zeroes
            zeroed, real_zeros = [], torch.zeros
            during.setattr(gm.torch, "zeros", lambda *a, **kw: zeroed.append(a) or real_zeros(*a, **kw))
            y, pooled = gm.grouped_matmul_forward(x.to(DEVICE), qw.to(DEVICE), off.to(DEVICE), e_count,
                                                  None if bias is None else bias.to(DEVICE), pool=fmt == "int",
                                                  config=cfg)
        y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + (bias[e].double() if biased else 0))
        assert launches[-1]["FINISH"] and launches[-1]["HAS_BIAS"] == biased, call
        assert y is made[-1] and ((rows, n),) not in zeroed, (call, zeroed)
        y, pooled = y.cpu(), (pooled.cpu() if pooled is not None else None)
        assert torch.equal(y[routed:], torch.zeros(rows - routed, n, dtype=torch.half)) and not y.isnan().any(), call
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, call
        if fmt == "int":
            torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                       rtol=1e-3, atol=1e-3)
        (ws, counts), = fm._FINISH_BUFFERS.values()
        assert ws.numel() >= rows * n and not ws.any() and not counts.any(), call


def _one_forward_path(monkeypatch, path: str, extra: dict, finish: bool) -> list[dict]:
    """Set up one grouped-forward path of the round-40 tests: FINISH on or off (a fresh kept
    workspace), the lane-owned order where the path's name says "lane", NaN-poisoned outputs; the
    launches of the kernel the path runs (split-K where the config sets SPLIT_K) are recorded."""
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels import heuristics

    monkeypatch.setattr(fm, "SPLITK_FINISH", finish)
    monkeypatch.setattr(fm, "_FINISH_BUFFERS", {})
    monkeypatch.setattr(heuristics, "fwd_lane_order", lambda arch, block_m: "lane" in path)
    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    kernel = "_grouped_matmul_splitk_kernel" if "SPLIT_K" in extra else "_grouped_matmul_fwd_kernel"
    return spies.record_launches(monkeypatch, gm, kernel)


# each X read of the grouped forward, with the rows gathered (GATHER) or gated (GATED) as the kernel
# loads them (round 40): (format, K, dtype, config, FINISH)
X_READ_PATHS = {
    "int4g32-decode-pool": (("int", 4, 32, False), 128, torch.float16, dict(BLOCK_M=16, BLOCK_K=32), False),
    "int4g32-decode-k-cut": (("int", 4, 32, False), 160, torch.float16, dict(BLOCK_M=16, BLOCK_K=64), False),
    "int2g64-gemm-fp32-pool-slot-loop": (("int", 2, 64, False), 128, torch.float32,
                                         dict(BLOCK_M=32, BLOCK_K=64, PROGRAMS=2), False),
    "int2g32-gemm-k-cut": (("int", 2, 32, False), 160, torch.float16, dict(BLOCK_M=16, BLOCK_K=64, DECODE=False),
                           False),
    "nf4-dq-gemm-halves": (("nf4", 4, 64, True), 256, torch.float16, dict(BLOCK_M=16, BLOCK_K=128), False),
    "int4g48-lane-order-torch-pool": (("int", 4, 48, False), 192, torch.float16,
                                      dict(BLOCK_M=16, BLOCK_K=64, DECODE=False), False),
    "int3g16-split2-torch-pool": (("int", 3, 16, False), 128, torch.float16, dict(BLOCK_M=16, BLOCK_K=32, SPLIT_K=2),
                                  False),
    "int4g32-split3-finish": (("int", 4, 32, False), 128, torch.float16, dict(BLOCK_M=16, BLOCK_K=32, SPLIT_K=3),
                              True),
}


@needs_kernels
@pytest.mark.parametrize("path", list(X_READ_PATHS))
def test_grouped_forward_reads_each_rows_token_in_place(path, monkeypatch):
    """``row_token`` (round 40, the experts' decode forward): sorted row s is row token[s] of the
    un-gathered X [T, K], read in place by the kernel (GATHER) on each of the forward's X reads: the
    decode loop with QA-LoRA pooling (whole lane-order tiles, then a tile K cuts), the GEMM loop
    (fp32, a slot loop; a cut tile; NF4's two-dot step; the lane-owned k order with a group size
    that pools in torch), the split-K decode (pooling in torch, the bias added after) and its
    FINISH. Tokens are drawn at random (repeats, rows in any order), the X rows no routed row reads
    and the sentinel rows' tokens hold NaN, the output starts as NaN; experts with 0, 1, odd and
    many rows; float64 oracle on X[token]."""
    from qlk.kernels import grouped_matmul as gm

    f, k, dtype, extra, finish = X_READ_PATHS[path]
    fmt, bits, g, dq = f
    launches = _one_forward_path(monkeypatch, path, extra, finish)
    e_count, n, tokens = len(COUNTS), 40, 24
    gen = torch.Generator().manual_seed(400 + bits * 10 + g + k)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, n, k)
    if dtype == torch.float16:
        w = w.half().double()  # the half2 decode rounds ŵ to fp16 once
    off = offsets_of(COUNTS)
    routed = int(off[-1])
    x = torch.randn(tokens + 2, k, generator=gen).to(dtype)
    x[tokens:] = float("nan")  # no routed row's token: never read
    token = torch.cat([torch.randint(0, tokens, (routed,), generator=gen), torch.tensor([tokens, tokens + 1])])
    bias = torch.randn(e_count, n, generator=gen).to(dtype)
    cfg = dict(BLOCK_N=32, num_warps=4, num_stages=1, **extra)
    y, pooled = gm.grouped_matmul_forward(x.to(DEVICE), qw.to(DEVICE), off.to(DEVICE), e_count, bias.to(DEVICE),
                                          pool=fmt == "int", config=cfg, row_token=token.to(DEVICE))
    assert [(kw["GATHER"], kw.get("FINISH", False)) for kw in launches] == [(True, finish)]
    y = y.cpu()
    gathered = x[token[:routed]]
    y_ref = per_expert(gathered, off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    assert y.shape == (routed + 2, n) and torch.equal(y[routed:], torch.zeros(2, n, dtype=dtype))
    assert not y.isnan().any()
    assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < (1e-5 if dtype == torch.float32 else 2e-3)
    if fmt == "int":
        torch.testing.assert_close(pooled.cpu()[:routed], gathered.float().reshape(routed, k // g, g).mean(-1),
                                   rtol=1e-3, atol=1e-3)


# the gate-up epilogue (round 40) on each of the forward's paths: (format, dtype, config, FINISH)
GATE_UP_PATHS = {
    "int4g32-decode-pool-bias": (("int", 4, 32, False), torch.float16, dict(BLOCK_M=16, BLOCK_K=32), False),
    "int2g64-gemm-fp32-slot-loop": (("int", 2, 64, False), torch.float32, dict(BLOCK_M=32, BLOCK_K=64, PROGRAMS=2),
                                    False),
    "nf4-dq-gemm": (("nf4", 4, 64, True), torch.float16, dict(BLOCK_M=16, BLOCK_K=64), False),
    "int3g32-lane-order": (("int", 3, 32, False), torch.float16, dict(BLOCK_M=16, BLOCK_K=128, DECODE=False), False),
    "int4g32-split2-gate-after": (("int", 4, 32, False), torch.float16, dict(BLOCK_M=16, BLOCK_K=32, SPLIT_K=2),
                                  False),
}


@needs_kernels
@pytest.mark.parametrize("path", list(GATE_UP_PATHS))
def test_grouped_gate_up_forward_gives_silu_of_gate_times_up(path, monkeypatch):
    """``gate_up`` (round 40, the experts' gate-up projection at decode): Y = silu(G)·U [S, I] of
    the product [G | U] [S, 2I], formed in the forward kernel's epilogue (each N tile computes the
    gate rows c and the up rows I + c of its BLOCK_N/2 output columns): the decode loop with
    QA-LoRA pooling and a per-expert bias on both halves, the GEMM loop (fp32, a slot loop; NF4;
    INT3 in the lane-owned order); the split-K decode forms it after its reduction. I = 40 is two
    and a half 16-column output tiles (the last one's columns past I clamped, never stored), the
    sentinel rows hold NaN and come out 0, the output starts as NaN; float64 oracle on silu(G)·U as
    torch forms it from the rounded product (the model's own ``act_fn(gate) * up``)."""
    from qlk.kernels import grouped_matmul as gm

    f, dtype, extra, finish = GATE_UP_PATHS[path]
    fmt, bits, g, dq = f
    launches = _one_forward_path(monkeypatch, path, extra, finish)
    e_count, inter, k = len(COUNTS), 40, 128
    gen = torch.Generator().manual_seed(600 + bits * 10 + g)
    qw = qlk.quantize(torch.randn(e_count * 2 * inter, k, generator=gen) / 4, bits=bits, group_size=g, fmt=fmt,
                      double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, 2 * inter, k)
    off = offsets_of(COUNTS)
    routed = int(off[-1])
    x = torch.randn(routed + 2, k, generator=gen).to(dtype)
    x[routed:] = float("nan")  # sentinel rows: never read
    bias = (torch.randn(e_count, 2 * inter, generator=gen) * 2).to(dtype) if "bias" in path else None
    cfg = dict(BLOCK_N=32, num_warps=4, num_stages=1, **extra)
    y, pooled = gm.grouped_matmul_forward(x.to(DEVICE), qw.to(DEVICE), off.to(DEVICE), e_count,
                                          None if bias is None else bias.to(DEVICE), pool=fmt == "int", config=cfg,
                                          gate_up=True)
    assert [kw.get("GATE_UP", False) for kw in launches] == ["SPLIT_K" not in extra]
    y = y.cpu()
    z = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + (0 if bias is None else bias[e].double()))
    want = gm.gated_output(z.to(dtype)).double()  # the product rounded, then the model's gate
    assert y.shape == (routed + 2, inter) and torch.equal(y[routed:], torch.zeros(2, inter, dtype=dtype))
    assert not y.isnan().any()
    assert ((y[:routed].double() - want).norm() / want.norm()) < (1e-5 if dtype == torch.float32 else 3e-3)
    if fmt == "int":
        torch.testing.assert_close(pooled.cpu()[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                   rtol=1e-3, atol=1e-3)
    qw_odd = qlk.quantize(torch.randn(e_count * 3, k, generator=gen), bits=4, group_size=32)
    with pytest.raises(ValueError, match="gate_up needs an even number of rows per expert, got 3"):
        gm.grouped_matmul_forward(x.to(DEVICE), qw_odd.to(DEVICE), off.to(DEVICE), e_count, gate_up=True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_expert_projection_row_token_is_the_gathered_rows(backend):
    """:func:`grouped_experts_linear` with ``row_token`` gives what it gives on X[row_token], for the
    base GEMM, fused QA-LoRA and unfused LoRA; without a graph (the kernel reads X in place) and with
    one (X gathered first: dX of each token is the sum over its rows, and the adapters' grads match).
    With ``gate_up`` too it gives silu(G)·U of that result (the kernel's epilogue without a graph,
    torch ops after the adapter's term or with a graph; the gradients through the gate match).
    Bad gather indices are errors that say what is wrong."""
    e_count, n, k, g, tokens = 3, 16, 64, 32, 5
    gen = torch.Generator().manual_seed(40)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=g)
    off = offsets_of([3, 0, 6])  # 9 sorted rows, the last routed to no expert
    token = torch.tensor([4, 0, 2, 1, 3, 0, 4, 2, 1])
    x = torch.randn(tokens, k, generator=gen)
    for method, a_cols in ((None, 0), ("qalora", k // g), ("lora", k)):
        a = torch.randn(e_count, 4, a_cols, generator=gen) if method else None
        b = torch.randn(e_count, n, 4, generator=gen) if method else None
        with qlk.use_backend(backend):
            with torch.no_grad():
                got = grouped_experts_linear(x, qw, off, e_count, None, a, b, 0.5, method, row_token=token)
                want = grouped_experts_linear(x[token], qw, off, e_count, None, a, b, 0.5, method)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            with torch.no_grad():
                gated = grouped_experts_linear(x, qw, off, e_count, None, a, b, 0.5, method, row_token=token,
                                               gate_up=True)
            gate, up = want.chunk(2, dim=-1)
            torch.testing.assert_close(gated, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
            for gate_up in (False, True):
                leaves = [t.clone().requires_grad_() for t in (x, a, b) if t is not None]
                grouped_experts_linear(leaves[0], qw, off, e_count, None, *(leaves[1:] or [None, None]), 0.5,
                                       method, row_token=token, gate_up=gate_up).square().sum().backward()
                refs = [t.clone().requires_grad_() for t in (x, a, b) if t is not None]
                y = grouped_experts_linear(refs[0][token], qw, off, e_count, None, *(refs[1:] or [None, None]), 0.5,
                                           method)
                if gate_up:
                    gate, up = y.chunk(2, dim=-1)
                    y = torch.nn.functional.silu(gate) * up
                y.square().sum().backward()
                for leaf, ref in zip(leaves, refs):
                    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="row_token must be an int32/int64"):
        grouped_experts_linear(x, qw, off, e_count, row_token=token.float())
    with pytest.raises(ValueError, match=r"row_token has shape \[1, 9\]"):
        grouped_experts_linear(x, qw, off, e_count, row_token=token[None])
    with pytest.raises(ValueError, match="row_token holds rows 0 .. 5; x has 5 rows"):
        grouped_experts_linear(x, qw, off, e_count, row_token=torch.where(token == 4, 5, token))
    with pytest.raises(ValueError, match="row_token holds rows -1 .. 4"):
        grouped_experts_linear(x, qw, off, e_count, row_token=torch.where(token == 0, -1, token))


@needs_kernels
@pytest.mark.parametrize("programs", [1, 4])
def test_grouped_slot_loop_fewer_programs_than_tiles(programs, monkeypatch):
    """Small M with fewer program rows than tile slots (``SLOT_LOOP``: program t runs slots t, t + P,
    ...): the fp16 decode forward with QA-LoRA pooling, the split-K forward (2 slices) and the input
    gradient, on experts with 0, 1, odd and many rows (3 tiles) plus 35 sentinel rows (NaN in X / dY,
    0 out: 3 row blocks of 16, stored by program rows 0, 1, 2 with P = 4 and all by one with P = 1);
    11 slots for 7 tiles, so a program meets real and spare slots. Outputs start as NaN. The default
    launch (P = E = 6 < 11 slots) is covered by the tests above."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    e_count, n, k, g = len(COUNTS), 40, 128, 32
    gen = torch.Generator().manual_seed(41)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    routed, tail = int(off[-1]), 35
    assert gm._tile_map(off, routed + tail, 16)[0].shape[0] == 11
    x, dy = torch.randn(routed + tail, k, generator=gen).half(), torch.randn(routed + tail, n, generator=gen).half()
    x[routed:], dy[routed:] = float("nan"), float("nan")
    bias = torch.randn(e_count, n, generator=gen).half()
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1, PROGRAMS=programs)
    for split in (1, 2):
        y, pooled = grouped_matmul_forward(x, qw, off, e_count, bias, pool=True, config=dict(cfg, SPLIT_K=split))
        assert torch.equal(y[routed:], torch.zeros(tail, n, dtype=torch.half)) and not y.isnan().any(), split
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, split
        torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                   rtol=1e-3, atol=1e-3)
    dx = grouped_matmul_grad_input(dy, qw, off, e_count, config=cfg)
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w[e])
    assert torch.equal(dx[routed:], torch.zeros(tail, k, dtype=torch.half)) and not dx.isnan().any()
    assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 2e-3


@needs_kernels
@pytest.mark.parametrize("bits,g", [(4, 32), (3, 16), (2, 64)], ids=["int4g32", "int3g16", "int2g64"])
def test_grouped_small_m_32_row_tiles(bits, g, monkeypatch):
    """Round 30: between 16 and 32 routed rows an expert the small-M launches take 32-row tiles
    (:func:`qlk.kernels.config.small_tile_rows`). Here at S/E = 27: experts with 0, 1, 20, 33, 70 and
    40 rows (one, two and three tiles of 32) plus 5 sentinel rows (NaN in, 0 out), NaN-poisoned
    outputs: the fp16 decode forward with QA-LoRA pooling, its split-K launch (2 slices) and the GEMM
    forward loop, with a program per expert and in a slot loop of 2 program rows; the input gradient
    unsplit and split over N (2 slices), words loaded ahead; float64 per-expert oracle."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    counts, n, k, tail = [0, 1, 20, 33, 70, 40], 40, 128, 5
    e_count = len(counts)
    gen = torch.Generator().manual_seed(301)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(counts)
    routed = int(off[-1])
    assert 16 < routed / e_count <= gm.SMALL_M_ROWS and gm._small(routed + tail, e_count)
    x, dy = torch.randn(routed + tail, k, generator=gen).half(), torch.randn(routed + tail, n, generator=gen).half()
    x[routed:], dy[routed:] = float("nan"), float("nan")
    bias = torch.randn(e_count, n, generator=gen).half()
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w[e])
    cfg = dict(BLOCK_N=32, BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)
    # INT4 takes every launch; INT3 and INT2 each kernel once (the slot loop is the same code for
    # every format), which keeps INT3's interpreter time in the suite's budget
    forward = [dict(DECODE=True, PROGRAMS=2), dict(SPLIT_K=2), dict(DECODE=False, PROGRAMS=2)]
    grad = [dict(SPLIT_N=2, WORDS_AHEAD=True), dict(PROGRAMS=2)]
    if bits == 4:
        forward += [dict(DECODE=True), dict(SPLIT_K=2, PROGRAMS=2)]
        grad += [dict(PROGRAMS=2, SPLIT_N=2)]
    for extra in forward:
        y, pooled = grouped_matmul_forward(x, qw, off, e_count, bias, pool=True, config=dict(cfg, **extra))
        assert torch.equal(y[routed:], torch.zeros(tail, n, dtype=torch.half)) and not y.isnan().any(), extra
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, extra
        torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                   rtol=1e-3, atol=1e-3)
    for extra in grad:
        dx = grouped_matmul_grad_input(dy, qw, off, e_count, config=dict(cfg, **extra))
        assert torch.equal(dx[routed:], torch.zeros(tail, k, dtype=torch.half)) and not dx.isnan().any(), extra
        assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 2e-3, extra


@needs_kernels
@pytest.mark.parametrize("bits,g", [(2, 128), (4, 64)], ids=["int2g128", "int4g64"])
def test_grouped_qalora_forward_64_deep_32_row_tile(bits, g, monkeypatch):
    """Round 31: sm_80's 32-row small-M forward steps 64 deep for INT4 g64 and QA-LoRA's INT2 g128 (the
    128-deep tile spills there, config.GROUPED_SMALL_FWD_SPILLS_SM80): a group over two K steps (g128)
    or one (g64), QA-LoRA's fp32 folded biases and in-kernel pooling, experts of 0, 1, 20, 33 and 70
    rows, sentinel rows (NaN in, 0 out), NaN-poisoned output; against Y_e = X_e·Ŵ_eᵀ + σ·P(X_e)·A_eᵀ·B_eᵀ
    in float64, per program and in a slot loop."""
    from qlk.autograd.experts import folded_weight_args
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    counts, n, k, r, sigma, tail = [0, 1, 20, 33, 70], 24, 256, 4, 2.0, 3
    e_count = len(counts)
    gen = torch.Generator().manual_seed(310 + g)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    a = (torch.randn(e_count, r, k // g, generator=gen) * 0.5).half()
    b = (torch.randn(e_count, n, r, generator=gen) * 0.5).half()
    off = offsets_of(counts)
    routed = int(off[-1])
    x = torch.randn(routed + tail, k, generator=gen).half()
    x[routed:] = float("nan")

    def ref(e, xe):
        pooled = xe.reshape(xe.shape[0], k // g, g).mean(-1)
        return xe @ w[e].t() + sigma * pooled @ a[e].double().t() @ b[e].double().t()

    y_ref = per_expert(x[:routed], off, ref)
    cfg = dict(BLOCK_N=64, BLOCK_M=32, BLOCK_K=64, num_warps=2, num_stages=1)
    for extra in (dict(DECODE=True), dict(DECODE=True, PROGRAMS=2)):
        y, pooled = grouped_matmul_forward(x, qw, off, e_count, wargs=folded_weight_args(qw, a, b, sigma, e_count),
                                           pool=True, config=dict(cfg, **extra))
        assert torch.equal(y[routed:], torch.zeros(tail, n, dtype=torch.half)) and not y.isnan().any(), extra
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, extra
        torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                   rtol=1e-3, atol=1e-3)


@needs_kernels
def test_grouped_large_m_64_row_tiles_at_mid_rows(monkeypatch):
    """Round 30: above the small-M bound, to ``MID_TILE_ROWS`` rows an expert, the large-M kernels
    run 64-row tiles. Here INT4 g32 at S/E = 44: experts with 0, 1, 40, 65, 130 and 30 rows (one,
    two and three tiles of 64, a one-row remainder) plus 3 sentinel rows (NaN in, 0 out), outputs
    NaN-poisoned: the GEMM forward with bias and QA-LoRA pooling and the input gradient (program per
    slot, as the rule launches; and split over N) against the float64 per-expert oracle."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    counts, n, k, g, tail = [0, 1, 40, 65, 130, 30], 40, 64, 32, 3
    e_count = len(counts)
    gen = torch.Generator().manual_seed(302)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(counts)
    routed = int(off[-1])
    assert gm.SMALL_M_ROWS < routed / e_count <= 64 and not gm._small(routed + tail, e_count)
    x, dy = torch.randn(routed + tail, k, generator=gen).half(), torch.randn(routed + tail, n, generator=gen).half()
    x[routed:], dy[routed:] = float("nan"), float("nan")
    bias = torch.randn(e_count, n, generator=gen).half()
    cfg = dict(BLOCK_N=32, BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=1)
    y, pooled = grouped_matmul_forward(x, qw, off, e_count, bias, pool=True, config=cfg)
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    assert torch.equal(y[routed:], torch.zeros(tail, n, dtype=torch.half)) and not y.isnan().any()
    assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3
    torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                               rtol=1e-3, atol=1e-3)
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w[e])
    for extra in ({}, dict(SPLIT_N=2)):
        dx = grouped_matmul_grad_input(dy, qw, off, e_count, config=dict(cfg, **extra))
        assert torch.equal(dx[routed:], torch.zeros(tail, k, dtype=torch.half)) and not dx.isnan().any(), extra
        assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 2e-3, extra


@needs_kernels
def test_grouped_kernels_with_a_row_bound_per_expert(monkeypatch):
    """``max_rows_per_expert`` (the token count under top-k routing) shortens the forward's tile map
    to one slot per expert where it is <= BLOCK_M: 5 experts of 4 rows + 3 sentinel rows (NaN in, 0
    out) launch 5 tile slots, not 6. The decode forward with pooling and the split-K forward against
    the float64 oracle, outputs starting as NaN; a bound an expert exceeds raises (checked on the
    device), it never drops rows."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    slots = []
    tile_map = gm._tile_map
    monkeypatch.setattr(gm, "_tile_map", lambda *a: slots.append(tile_map(*a)[0].shape[0]) or tile_map(*a))
    counts, tail = [4, 4, 4, 4, 4], 3
    e_count, n, k, g = len(counts), 40, 64, 32
    gen = torch.Generator().manual_seed(97)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(counts)
    routed = int(off[-1])
    x = torch.randn(routed + tail, k, generator=gen).half()
    x[routed:] = float("nan")
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t())
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    for split in (1, 2):
        y, pooled = grouped_matmul_forward(x, qw, off, e_count, pool=True, config=dict(cfg, SPLIT_K=split),
                                           max_rows_per_expert=4)
        assert slots[-1] == 5, slots
        assert torch.equal(y[routed:], torch.zeros(tail, n, dtype=torch.half)) and not y.isnan().any(), split
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, split
        torch.testing.assert_close(pooled[:routed], x[:routed].float().reshape(routed, k // g, g).mean(-1),
                                   rtol=1e-3, atol=1e-3)
    grouped_matmul_forward(x, qw, off, e_count, config=cfg)
    assert slots[-1] == 6  # without the bound
    with pytest.raises(RuntimeError, match="max_rows_per_expert"):
        grouped_matmul_forward(x, qw, off, e_count, config=cfg, max_rows_per_expert=3)


@needs_kernels
@pytest.mark.parametrize("f,launches", [
    (("int", 4, 32, False), [(2, True), (4, False), (1, True)]),
    (("int", 3, 64, False), [(2, True)]),
    (("nf4", 4, 64, True), [(2, True)])], ids=["int4g32", "int3g64", "nf4-dq"])
def test_grouped_grad_split_n_and_words_ahead(f, launches, monkeypatch):
    """Round 7: the input gradient with its reduction over N split (fp32 atomic partials, cast by the
    launcher) and the words-ahead loop (the next N tile's packed words loaded during this one, rows
    of the tile's own expert), inside a slot loop of 2 program rows over 10 slots (5 slots a
    program: real, sentinel and spare ones). N = 96 in 3 tiles of 32: 2 slices (2 tiles, 1 tile), 4
    slices (the last empty); experts with 0, 1, odd and many rows (3 tiles), 2 sentinel rows of
    NaN in dY that must come out 0; the output starts as NaN; float64 per-expert oracle."""
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    fmt, bits, g, dq = f
    e_count, n, k = len(COUNTS), 96, 64
    gen = torch.Generator().manual_seed(71)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g, fmt=fmt, double_quant=dq)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS)
    routed = int(off[-1])
    dy = torch.randn(routed + 2, n, generator=gen).half()
    dy[routed:] = float("nan")
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w[e])
    for split, ahead in launches:
        cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1, PROGRAMS=2, SPLIT_N=split,
                   WORDS_AHEAD=ahead)
        dx = grouped_matmul_grad_input(dy, qw, off, e_count, config=cfg)
        assert dx.dtype == torch.half and not dx.isnan().any(), (split, ahead)
        assert torch.equal(dx[routed:], torch.zeros(2, k, dtype=torch.half)), (split, ahead)
        assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 2e-3, (split, ahead)


# expert 0 with rows (every list above starts with an empty expert), an empty expert between two
# that are not, an expert of 1 row last; 23 routed rows + 2 sentinel rows
@needs_kernels
@pytest.mark.parametrize("lanes", [True, False], ids=["lane-owned", "stored"])
@pytest.mark.parametrize("bits,k,g", [(4, 192, 32), (4, 256, 128), (4, 192, 48), (4, 160, 32),
                                      (2, 192, 32), (2, 256, 128), (2, 160, 32)],
                         ids=["int4-g32", "int4-g128-over-tiles", "int4-g48", "int4-k-cut",
                              "int2-g32", "int2-g128-over-tiles", "int2-k-cut"])
def test_grouped_forward_lane_order(bits, k, g, lanes, monkeypatch):
    """The grouped GEMM forward loop (DECODE off) in the lane-owned k order (round 18, the dense
    GEMM's rule :func:`heuristics.fwd_lane_order`) and in the stored order: fp16 INT4 / INT2 on
    64-column K tiles, groups inside a tile (g32: two, INT2's lane span is the whole tile), over two
    tiles (g128), not a power of two (g48: the per-element scale gather) and a K that cuts the last
    tile (K = 160: two lane-owned tiles, then the cut one in the stored order); N = 40 (a ragged
    second N tile), experts with 0, 1, odd and many rows, the 113-row one over 8 tile slots, run by
    3 program rows (the slot loop). The launch's LANE_ORDER is the rule's. Outputs start as NaN,
    sentinel rows hold NaN in X and come out 0; float64 oracle on the fp16-rounded Ŵ (the half2
    decode rounds ŵ once to fp16, in either order); which tile decoder ran is checked too."""
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels import heuristics

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    monkeypatch.setattr(heuristics, "fwd_lane_order", lambda arch, block_m: lanes)
    seen = spies.record_launches(monkeypatch, gm, "_grouped_matmul_fwd_kernel")
    # which tile decoder ran: interpreter only (None on compiled kernels, tests/spies.py; the values still checked)
    decoded_lanes = spies.record_calls(monkeypatch, fm, "_decode_int_tile_lanes", when_compiled="none")
    e_count, n = len(COUNTS_LARGE), 40
    gen = torch.Generator().manual_seed(1900 + bits * 100 + g + k)
    groups = k // g
    w = (torch.randn(e_count * n, groups, g, generator=gen) * torch.exp(torch.randn(e_count * n, groups, 1, generator=gen))
         + torch.randn(e_count * n, groups, 1, generator=gen)).reshape(e_count * n, k)
    qw = qlk.quantize(w, bits=bits, group_size=g)
    w_half = oracle_weight(qw).half().double().reshape(e_count, n, k)
    off = offsets_of(COUNTS_LARGE)
    routed = int(off[-1])
    x = torch.randn(routed + 2, k, generator=gen).half()
    x[routed:] = float("nan")
    bias = torch.randn(e_count, n, generator=gen).half()
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w_half[e].t() + bias[e].double())
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=64, num_warps=4, num_stages=1, DECODE=False, PROGRAMS=3)
    y, _ = grouped_matmul_forward(x, qw, off, e_count, bias, config=cfg)
    assert [kw["LANE_ORDER"] for kw in seen] == [lanes]
    assert decoded_lanes is None or bool(decoded_lanes) == lanes
    assert torch.equal(y[routed:], torch.zeros(2, n, dtype=torch.half)) and not y.isnan().any()
    assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 4e-4


@needs_kernels
@pytest.mark.parametrize("fmt,bits,k,g,split,rows,ahead", [
    ("int", 4, 192, 32, 1, True, False), ("int", 2, 192, 32, 2, True, True), ("int", 4, 160, 32, 2, True, True),
    ("nf4", 4, 192, 64, 2, True, True), ("int", 3, 192, 64, 1, True, True), ("int", 3, 160, 32, 2, True, False),
    ("int", 3, 192, 16, 1, False, True)],
    ids=["int4g32", "int2g32-split-ahead", "int4-k160-shifted-split-ahead", "nf4dq-split-ahead", "int3g64-ahead",
         "int3g32-k160-shifted-split", "int3g16-transposed"])
def test_grouped_grad_input_w_as_b(fmt, bits, k, g, split, rows, ahead, monkeypatch, block_n=32, w_as_a=False):
    """The grouped input gradient with Ŵ as the MMA's B operand (round 18, the dense gradient's
    fused_matmul._w_as_b_acc on the expert's rows e·N + n) at a 64-row tile: experts with 0, 1, 17
    and 113 rows (the 113-row one over two tiles, a ragged second), N = 40 (a ragged second N tile;
    split in 2 slices with atomics), whole K tiles, SHIFT_K's last tile (K = 160: columns 96 .. 160,
    the first 32 the tile before's), NF4 with double quant (absmax de-nested once a call), INT3 of
    whole 32-column chunks (round 19), and INT3 g16, which keeps the Ŵᵀ tile (which one ran is checked);
    the words loaded one N tile ahead (round 19) or in the same iteration.
    fp16, NaN-poisoned output, sentinel rows NaN in dY and 0 out, float64 on the fp16-rounded Ŵ."""
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import grouped_matmul as gm
    from qlk.kernels import heuristics

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    monkeypatch.setattr(heuristics, "grad_w_as_b", lambda arch, *tile: True)
    monkeypatch.setattr(fm, "GRAD_W_AS_A", w_as_a)
    seen = []
    real_kernel = gm._grouped_matmul_grad_input_kernel

    class Spy:  # the launch's W_AS_A flag
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs.get("W_AS_A"))
                return real_kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gm, "_grouped_matmul_grad_input_kernel", Spy())
    # which decoder ran: interpreter only (None on compiled kernels, tests/spies.py; the values still checked)
    ran = spies.record_calls(monkeypatch, fm, "_decode_int_tile_rows", "_decode_int3_tile_rows",
                             "_decode_nf4_tile_rows", when_compiled="none")
    e_count, n = len(COUNTS_LARGE), 40
    gen = torch.Generator().manual_seed(2100 + bits * 10 + k + split)
    qw = qlk.quantize(torch.randn(e_count * n, k // g, g, generator=gen).mul(torch.exp(torch.randn(
        e_count * n, k // g, 1, generator=gen))).reshape(e_count * n, k), bits=bits, group_size=g, fmt=fmt,
        double_quant=fmt == "nf4")
    w_half = oracle_weight(qw).half().double().reshape(e_count, n, k)
    off = offsets_of(COUNTS_LARGE)
    routed = int(off[-1])
    dy = torch.randn(routed + 2, n, generator=gen).half()
    dy[routed:] = float("nan")
    cfg = dict(BLOCK_N=block_n, BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=1, SPLIT_N=split, WORDS_AHEAD=ahead)
    dx = grouped_matmul_grad_input(dy, qw, off, e_count, config=cfg)
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w_half[e])
    assert ran is None or bool(ran) == rows
    assert seen == [w_as_a]
    assert torch.equal(dx[routed:], torch.zeros(2, k, dtype=torch.half)) and not dx.isnan().any()
    assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 1e-3


@needs_kernels
@pytest.mark.parametrize("fmt,bits,k,g,split,ahead", [
    ("int", 4, 192, 32, 1, False), ("int", 2, 192, 32, 2, True), ("int", 4, 160, 32, 2, True),
    ("nf4", 4, 192, 64, 2, True), ("int", 3, 160, 32, 2, False)],
    ids=["int4g32", "int2g32-split-ahead", "int4-k160-shifted-split-ahead", "nf4dq-split-ahead",
         "int3g32-k160-shifted-split"])
def test_grouped_grad_input_w_as_a(fmt, bits, k, g, split, ahead, monkeypatch):
    """Round 36: the grouped B-operand tile as the transposed product (fused_matmul.GRAD_W_AS_A);
    the same experts, tiles and checks as test_grouped_grad_input_w_as_b."""
    test_grouped_grad_input_w_as_b(fmt, bits, k, g, split, True, ahead, monkeypatch, w_as_a=True)


@needs_kernels
@pytest.mark.parametrize("g,rows", [(32, False), (64, True)], ids=["int3g32-transposed", "int3g64"])
def test_grouped_grad_input_w_as_b_128_row_steps(g, rows, monkeypatch):
    """Round 31: on 128-row N steps INT3 g32 keeps the transposed tile in the grouped gradient too (its
    B-operand tile does not compile there for sm_90), g64 takes the B-operand tile; same checks."""
    test_grouped_grad_input_w_as_b("int", 3, 192, g, 1, rows, False, monkeypatch, block_n=128)


COUNTS_FIRST = [5, 17, 0, 1]


@needs_kernels
@pytest.mark.parametrize("bits,k,g,block_k", [(4, 80, 16, 32), (3, 80, 16, 32), (4, 160, 32, 64), (2, 160, 32, 64)],
                         ids=["int4-k80", "int3-k80", "int4-k160-shifted", "int2-k160-shifted"])
def test_grouped_ragged_k_and_first_expert(bits, k, g, block_k, monkeypatch):
    """The grouped kernels where the tile map's first tile is expert 0's and K is ragged: K = 80 in
    K tiles of 32, the last half used (EVEN_K false; INT3: a half-used 3-word chunk, INT4: a
    half-used lane span), g16 (two groups a tile); K = 160 in K tiles of 64, where the input
    gradient moves its last tile back to 96 .. 160 (fused_matmul.shift_last_k; a double atomic add
    of columns 96 .. 128 in the split would show). fp16 through the small-M decode forward (1 and
    2 K slices: the split-K kernel and its bias pass) and the input gradient (unsplit, plain loop;
    split N in 2 with the words-ahead loop), N = 40 (a ragged second N tile = 2 N slices of 1 tile).
    Sentinel rows hold NaN in X / dY and must come out 0; outputs start as NaN; float64 oracle."""
    from qlk.kernels import fused_matmul as fm
    from qlk.kernels import grouped_matmul as gm

    monkeypatch.setattr(gm, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                device=device))
    assert fm.shift_last_k(dict(K=k, BLOCK_K=block_k, GROUP_SIZE=g)) == (k == 160)
    e_count, n = len(COUNTS_FIRST), 40
    gen = torch.Generator().manual_seed(83 + bits + k)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=bits, group_size=g)
    w = oracle_weight(qw).reshape(e_count, n, k)
    off = offsets_of(COUNTS_FIRST)
    routed = int(off[-1])
    x, dy = torch.randn(routed + 2, k, generator=gen).half(), torch.randn(routed + 2, n, generator=gen).half()
    x[routed:], dy[routed:] = float("nan"), float("nan")
    bias = torch.randn(e_count, n, generator=gen).half()
    y_ref = per_expert(x[:routed], off, lambda e, xe: xe @ w[e].t() + bias[e].double())
    dx_ref = per_expert(dy[:routed], off, lambda e, de: de @ w[e])
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=block_k, num_warps=4, num_stages=1)
    for split in (1, 2):
        y, _ = grouped_matmul_forward(x, qw, off, e_count, bias, config=dict(cfg, SPLIT_K=split))
        assert torch.equal(y[routed:], torch.zeros(2, n, dtype=torch.half)) and not y.isnan().any(), split
        assert ((y[:routed].double() - y_ref).norm() / y_ref.norm()) < 2e-3, split
    for split, ahead in ((1, False), (2, True)):
        dx = grouped_matmul_grad_input(dy, qw, off, e_count, config=dict(cfg, SPLIT_N=split, WORDS_AHEAD=ahead))
        assert torch.equal(dx[routed:], torch.zeros(2, k, dtype=torch.half)) and not dx.isnan().any(), split
        assert ((dx[:routed].double() - dx_ref).norm() / dx_ref.norm()) < 2e-3, split


def test_grouped_small_m_programs_per_expert():
    """Small M launches at most one program row per expert over the tile slots (the spare slots
    of the bound cost a load, not a CTA); large M one per slot."""
    from qlk.kernels.grouped_matmul import _programs, _tile_map

    mixtral = offsets_of([4] * 8)  # 16 tokens, top-2, 8 experts
    slots = _tile_map(mixtral, 32, 16)[0].shape[0]
    assert slots == 9 and _programs(slots, 8, small=True) == 8
    # the token count bounds each expert's rows: one slot per expert, the 8 tiles of a balanced routing
    assert _tile_map(mixtral, 32, 16, max_rows=16)[0].shape[0] == 8
    assert _programs(2, 8, small=True) == 2  # one token: the tiles that exist
    assert _programs(128, 128, small=True) == 128
    assert _programs(40, 8, small=False) == 40


def test_grouped_split_k_count():
    """Split only when the active experts' tiles fill fewer than two waves; slices of >= 4 K tiles."""
    from qlk.kernels.config import grouped_split_k

    cfg = dict(BLOCK_N=64, BLOCK_M=16, BLOCK_K=256)
    assert grouped_split_k(2, 8, 4096, 14336, cfg, 132) == 3  # Mixtral down, 1 token: 128 CTAs, 56 K tiles
    assert grouped_split_k(32, 8, 4096, 14336, cfg, 132) == 1  # 16 tokens: 512 CTAs
    assert grouped_split_k(2, 8, 28672, 4096, cfg, 132) == 1  # gate_up: 896 CTAs
    assert grouped_split_k(8, 128, 2048, 768, cfg, 132) == 1  # 3 K tiles: nothing to split
    assert grouped_split_k(1, 8, 1024, 8192, cfg, 108) == 8  # 16 CTAs on an A100: 32 K tiles / 4


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_tile_map_covers_every_row_once_within_its_bound(impl, monkeypatch):
    """The device-side tile map against a Python enumeration: every row of every expert in exactly
    one tile of its own expert, tiles in expert order, the rest -1, and no tile for the sentinel
    rows past offsets[E] (the kernels zero those); the bound on the tile count is tight at one token
    (no spare programs) and, given each expert's row bound R (``max_rows``: the true maximum, or
    more), holds within min(E, S)·⌈R / BLOCK_M⌉, one slot per expert where R <= BLOCK_M and every
    expert holds rows. An expert over the bound it was given is an error, not lost rows. bounds is
    offsets ++ [S] (int64). Both builders: the one-launch kernel (round 38; int32 and int64 offsets,
    up to 300 experts: several slot blocks and a 512-wide expert vector) and the torch ops of CPU
    tensors without the interpreter."""
    from qlk.kernels import grouped_matmul as gm

    _tile_map = gm._tile_map
    device = "cpu"
    if impl == "torch":
        monkeypatch.setattr(gm, "INTERPRETED", False)
    elif not INTERPRETED:
        if not torch.cuda.is_available():
            pytest.skip("the tile map kernel needs the interpreter or a GPU")
        device = "cuda"
    spy = spies.record_launches(monkeypatch, gm, "_tile_map_kernel")
    gen = torch.Generator().manual_seed(5)
    cases = [([0, 1, 17, 0, 3, 40], 2, 16), ([1, 0, 0, 1], 0, 16), ([0] * 8, 3, 16), ([5], 0, 4),
             ([300, 0, 257, 1], 9, 256), ([0, 0, 2, 0, 0, 0, 0, 0], 0, 16),
             ([1, 1, 1, 1], 1, 16), ([17, 9, 1], 1, 8),  # the bound is exact: every expert one row past a tile
             ([4] * 8, 0, 16), ([3, 16, 1, 9], 5, 16), ([33, 0, 2], 0, 16)]
    cases += [(torch.randint(0, 40, (7,), generator=gen).tolist(), int(torch.randint(0, 5, (1,), generator=gen)), 8)
              for _ in range(20)]
    cases += [(torch.randint(0, 3, (300,), generator=gen).tolist(), 2, 16)]  # 300 experts, ~300 slots
    for n_case, (counts, tail, bm) in enumerate(cases):
        off = offsets_of(counts)
        off = (off.int() if n_case % 2 else off).to(device)
        rows = int(off[-1]) + tail
        if rows == 0:
            continue
        _, _, bounds = _tile_map(off, rows, bm)
        assert bounds.dtype == torch.int64 and bounds.tolist() == off.tolist() + [rows], counts
        strided = torch.repeat_interleave(off, 2)[::2]  # a view with stride 2
        assert all(torch.equal(a, b) for a, b in zip(_tile_map(strided, rows, bm), _tile_map(off, rows, bm))), counts
        off = off.cpu()
        want = []
        for g, (lo, hi) in enumerate(zip(off.tolist(), off.tolist()[1:])):
            want += [(g, r) for r in range(lo, hi, bm)]
        busiest = max(counts)
        for cap in (None, busiest, busiest + 3 * bm):
            te, tr, _ = (t.cpu() for t in _tile_map(off.to(device), rows, bm, cap))
            got = [(int(e), int(r)) for e, r in zip(te, tr) if e >= 0]
            assert got == want, (counts, tail, bm, cap)
            assert all(int(e) == -1 for e in te[len(want):])
            if cap is not None:
                assert te.shape[0] <= max(1, min(len(counts), rows) * -(-cap // bm)), (counts, cap)
            if rows <= len(counts) and cap is None:  # one token: no spare programs
                assert te.shape[0] == rows, (counts, tail)
        if 0 < busiest <= bm and min(counts) > 0:
            assert _tile_map(off, rows, bm, busiest)[0].shape[0] == len(want)  # one slot per expert
        if busiest:  # a bound under the busiest expert: an error where it would shorten the map, else unused
            uncapped = _tile_map(off, rows, bm)[0].shape[0]
            if min(len(counts), rows) * -(-(busiest - 1) // bm) < uncapped:
                with pytest.raises(RuntimeError, match="max_rows_per_expert"):
                    _tile_map(off, rows, bm, busiest - 1)  # CPU offsets: checked at once
            else:
                assert _tile_map(off, rows, bm, busiest - 1)[0].shape[0] == uncapped
    assert (len(spy) > 0) == (impl == "kernel"), len(spy)

"""Autograd for the stacked expert projections of a mixture-of-experts layer (:mod:`qlk.nn.experts`).

Rows are the S = T·top_k routed copies of the tokens, sorted by expert; ``offsets`` [E+1] delimits
expert e's rows (:mod:`qlk.kernels.grouped_matmul`). Per expert e, with Ŵ_e its quantized weight
[N, K], A_e/B_e its adapter (or one A/B shared by every expert), σ the scaling:

    base     Y_e = X_e·Ŵ_eᵀ (+ b_e)                          dX_e = dY_e·Ŵ_e
    LoRA     Y_e += σ·D(X_e)·A_eᵀ·B_eᵀ,  A_e [r, K]
             V_e = dY_e·B_e:  dA_e = σ·V_eᵀ·D(X_e),  dB_e = σ·dY_eᵀ·(D(X_e)·A_eᵀ),  dX_e += σ·D'(V_e·A_e)
    QA-LoRA  Y_e += σ·D(P(X_e))·A_eᵀ·B_eᵀ,  A_e [r, K/g], P the mean of each quantization group
             dA_e = σ·V_eᵀ·Pd_e,  dB_e = σ·dY_eᵀ·(Pd_e·A_eᵀ),  dX_e += (σ/g)·expand_g(D'(V_e·A_e))
    shared adapter: the same formulas with A_e = A, B_e = B (dA, dB summed over every expert's rows)

These are the dense layer's formulas (:mod:`qlk.autograd.lora`, :mod:`qlk.autograd.qalora`) applied
to each expert's rows. Saved for backward: QA-LoRA keeps only Pd, the pooled input of each routed
row (S·K/g values); LoRA keeps X (S·K); the base keeps nothing. The packed weight is referenced.

On the Triton backend the base GEMMs are the grouped kernels (one launch per direction, no loop
over experts), and QA-LoRA without dropout runs fused: the adapter is folded into each expert's
group biases, b'_e = b_e + (σ/g)·B_e·A_e (the merge identity), so the grouped forward yields Y and
P(X) in one launch and the grouped input gradient dY·Ŵ' = dY·Ŵ + (σ/g)·expand_g(V·A) in one more.
The r-wide adapter products run as batched matmuls over experts padded to the busiest expert's
row count (one host sync for that count).
"""
from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from .. import backend
from .._checks import check_grouped, check_row_token
from ..formats import QuantizedWeight
from .lora import accumulate_dtype, autocast_off, compute_dtype, draw_seed, dropout_mask, wants_graph


def _gm():
    """qlk.kernels.grouped_matmul, imported on first use (importing qlk does not import Triton)."""
    from ..kernels import grouped_matmul

    return grouped_matmul


class Segments:
    """The rows of each expert, for batched per-expert products: row s is expert ``expert[s]``
    (E for rows past offsets[E]) at position ``pos[s]`` of its group."""

    def __init__(self, offsets: torch.Tensor, rows: int):
        self.num_experts = offsets.shape[0] - 1
        self.rows = rows
        bounds = torch.cat([offsets.to(torch.int64), offsets.new_full((1,), rows, dtype=torch.int64)])
        idx = torch.arange(rows, device=offsets.device)
        self.expert = torch.searchsorted(bounds[1:-1], idx, right=True)  # E for the tail
        self.pos = idx - bounds[self.expert]
        counts = bounds[1:] - bounds[:-1]
        self.width = int(counts.max()) if rows else 0  # the one host sync
        self.valid = (self.expert < self.num_experts).unsqueeze(-1)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[S, D] -> [E, W, D] (W = the largest group; zeros where an expert has fewer rows)."""
        out = rows.new_zeros(self.num_experts + 1, self.width, rows.shape[-1])
        out[self.expert, self.pos] = rows
        return out[: self.num_experts]

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[E, W, D] -> [S, D], rows past offsets[E] zero."""
        ext = torch.cat([padded, padded.new_zeros(1, *padded.shape[1:])])
        return ext[self.expert, self.pos]

    def sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[S, D] -> [E, D]: the sum of each expert's rows."""
        out = rows.new_zeros(self.num_experts + 1, rows.shape[-1])
        out.index_add_(0, self.expert, rows)
        return out[: self.num_experts]


def _low_rank(inp, lora_a, lora_b, seg: Segments, acc):
    """(T [S, N], U [S, r]) with U_e = inp_e·A_eᵀ and T_e = U_e·B_eᵀ per expert (or shared A, B)."""
    a, b = lora_a.to(acc), lora_b.to(acc)
    if a.shape[0] == 1:
        u = (inp @ a[0].t()) * seg.valid
        return u @ b[0].t(), u
    u = torch.bmm(seg.pad(inp), a.transpose(1, 2))  # [E, W, r]
    return seg.unpad(torch.bmm(u, b.transpose(1, 2))), seg.unpad(u)


def _adapter_grads(dy, inp, u, lora_a, lora_b, seg: Segments, scaling, acc, need_a, need_b):
    """(V [S, r], dA, dB): V_e = dY_e·B_e, dA_e = σ·V_eᵀ·inp_e, dB_e = σ·dY_eᵀ·U_e."""
    b = lora_b.to(acc)
    da = db = None
    if lora_a.shape[0] == 1:
        v = (dy @ b[0]) * seg.valid
        if need_a:
            da = (scaling * (v.t() @ inp)).unsqueeze(0)
        if need_b:
            db = (scaling * (dy.t() @ u)).unsqueeze(0)
        return v, da, db
    dyp = seg.pad(dy)
    vp = torch.bmm(dyp, b)  # [E, W, r]
    if need_a:
        da = scaling * torch.bmm(vp.transpose(1, 2), seg.pad(inp))
    if need_b:
        db = scaling * torch.bmm(dyp.transpose(1, 2), seg.pad(u))
    return seg.unpad(vp), da, db


def _times_a(v, lora_a, seg: Segments, acc):
    """V_e·A_e per expert: [S, r] -> [S, D]."""
    a = lora_a.to(acc)
    if a.shape[0] == 1:
        return (v @ a[0]) * seg.valid
    return seg.unpad(torch.bmm(seg.pad(v), a))


def _use_kernels(device, qw: QuantizedWeight, dtype) -> bool:
    return backend.resolve(device) == "triton" and _gm().kernel_ok(qw, dtype)


def grouped_base(x, qw, offsets, num_experts, bias=None, max_rows=None, row_token=None, gate_up=False):
    """Y = X·Ŵ_eᵀ (+ b_e) per row's expert: the grouped kernel or the reference. ``max_rows``: a bound
    on every expert's rows (the token count), for the kernels' tile map; ``row_token``: sorted row s
    is row row_token[s] of x (read in place by the kernels, gathered for the reference);
    ``gate_up``: Y = silu(G)·U of the product [G | U] (the kernels' epilogue, torch ops for the
    reference)."""
    if _use_kernels(x.device, qw, x.dtype):
        return _gm().grouped_matmul_forward(x, qw, offsets, num_experts, bias, max_rows_per_expert=max_rows,
                                            row_token=row_token, gate_up=gate_up)[0]
    y = _gm().grouped_matmul_reference(_rows(x, row_token), qw, offsets, num_experts, bias)
    return _silu_gate(y) if gate_up else y


def _silu_gate(y):
    """silu(G)·U of [G | U] (transformers' default gate with SiLU, ``act_fn(gate) * up``; the math of
    :func:`qlk.kernels.grouped_matmul.gated_output`, written here too so that the reference backend
    does not import the kernels)."""
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _rows(x, row_token):
    """The sorted rows x[row_token] (x itself without a gather index)."""
    return x if row_token is None else x.index_select(0, row_token)


def grouped_base_grad(dy, qw, offsets, num_experts):
    """dX = dY·Ŵ_e per row's expert."""
    if _use_kernels(dy.device, qw, dy.dtype):
        return _gm().grouped_matmul_grad_input(dy, qw, offsets, num_experts)
    return _gm().grouped_grad_input_reference(dy, qw, offsets, num_experts)


def folded_weight_args(qw: QuantizedWeight, lora_a, lora_b, scaling: float, num_experts: int):
    """weight_args(qw) with the group biases b'_e = b_e + (σ/g)·B_e·A_e (fp32 [E·N, G])."""
    args, meta = _gm().weight_args(qw)
    scales = args[1].contiguous()
    n = qw.out_features // num_experts
    delta = torch.matmul(lora_b.float(), lora_a.float()) * (scaling / qw.group_size)  # [Ea, N, G]
    folded = (qw.biases.float().reshape(num_experts, n, -1) + delta).reshape(qw.out_features, -1).contiguous()
    return (args[0], scales, folded) + args[3:7] + (args[7], scales.stride(0), scales.stride(1)), meta


def _fused(method, seed, qw: QuantizedWeight, device, cd) -> bool:
    """Whether QA-LoRA runs fused (adapter folded into the group biases): INT, no dropout, kernels."""
    return method == "qalora" and seed is None and qw.fmt == "int" and _use_kernels(device, qw, cd)


def grouped_experts_forward_impl(x2, qw, offsets, num_experts, bias, lora_a, lora_b, scaling, method, dropout,
                                 max_rows=None, row_token=None, gate_up=False):
    """(Y [S, N] in x2's dtype, saved, seed): the forward of :class:`GroupedExpertsFunction` on x2 in the
    compute dtype with autocast off. ``saved``: QA-LoRA's Pd [S, K/g] (accumulation dtype), LoRA's x2,
    None without adapter; ``seed``: the dropout seed or None; ``max_rows``: a bound on every expert's
    rows or None (:func:`qlk.kernels.grouped_matmul.grouped_matmul_forward`'s ``max_rows_per_expert``);
    ``row_token``: sorted row s is row row_token[s] of x2 (the tokens un-gathered; read in place by
    the grouped kernel where the base GEMM or fused QA-LoRA is all there is, gathered otherwise) or
    None; ``gate_up``: Y = silu(G)·U of the product [G | U] (formed in the grouped kernel's epilogue
    on the same paths, by torch ops after the adapter's term otherwise; no graph: the experts'
    decode). Shared by the Function and the ``qlk::grouped_experts_linear`` op (qlk/custom_ops.py),
    so compiled and eager run the same kernels."""
    cd = x2.dtype
    acc = accumulate_dtype(cd)
    g = qw.group_size
    seed = draw_seed() if method is not None and dropout > 0 else None
    saved = None
    if _fused(method, seed, qw, x2.device, cd):
        wargs = folded_weight_args(qw, lora_a, lora_b, scaling, num_experts)
        y, pooled = _gm().grouped_matmul_forward(x2, qw, offsets, num_experts, bias, wargs=wargs, pool=True,
                                                 max_rows_per_expert=max_rows, row_token=row_token, gate_up=gate_up)
        saved = pooled.to(acc)
    elif method is None:
        y = grouped_base(x2, qw, offsets, num_experts, bias, max_rows, row_token, gate_up)
    else:
        x2 = _rows(x2, row_token)
        y = grouped_base(x2, qw, offsets, num_experts, bias, max_rows)
        if method is not None:
            seg = Segments(offsets, x2.shape[0])
            inp = x2.to(acc)
            if method == "qalora":
                inp = inp.reshape(inp.shape[0], qw.in_features // g, g).mean(-1)  # P(X) [S, G]
            if seed is not None:
                inp = inp * dropout_mask(inp.shape, dropout, seed, inp.device, acc)
            term, _ = _low_rank(inp, lora_a, lora_b, seg, acc)
            y = (y.to(acc) + scaling * term).to(cd)
            # QA-LoRA keeps P(X) only; LoRA keeps X (in the compute dtype, like the dense layer)
            saved = inp if method == "qalora" else x2
            if gate_up:
                y = _silu_gate(y)
    return y, saved, seed


def grouped_experts_backward_impl(dy2, saved, offsets, lora_a, lora_b, qw, num_experts, scaling, method, dropout,
                                  seed, needs_dx, needs_da, needs_db, needs_dbias):
    """(dX, dA, dB, dbias) of :func:`grouped_experts_forward_impl` (None where not needed), dy2 in the
    compute dtype; dX in dy2's dtype or (unfused adapters) the accumulation dtype, dbias in the
    accumulation dtype: the caller casts each once."""
    cd = dy2.dtype
    acc = accumulate_dtype(cd)
    e, s = num_experts, scaling
    dx = dbias = da = db = None
    seg = Segments(offsets, dy2.shape[0]) if method is not None or needs_dbias else None
    if method is None:
        if needs_dx:
            dx = grouped_base_grad(dy2, qw, offsets, e)
    else:
        inp = saved.to(acc)
        if method == "lora" and seed is not None:
            inp = inp * dropout_mask(inp.shape, dropout, seed, inp.device, acc)
        dy_acc = dy2.to(acc)
        _, u = _low_rank(inp, lora_a, lora_b, seg, acc)
        v, da, db = _adapter_grads(dy_acc, inp, u, lora_a, lora_b, seg, s, acc, needs_da, needs_db)
        if needs_dx:
            if _fused(method, seed, qw, dy2.device, cd):
                wargs = folded_weight_args(qw, lora_a, lora_b, s, e)
                dx = _gm().grouped_matmul_grad_input(dy2, qw, offsets, e, wargs=wargs)
            else:
                extra = _times_a(v, lora_a, seg, acc) * s
                if seed is not None:
                    extra = extra * dropout_mask(extra.shape, dropout, seed, extra.device, acc)
                if method == "qalora":
                    extra = (extra / qw.group_size).repeat_interleave(qw.group_size, dim=-1)
                dx = grouped_base_grad(dy2, qw, offsets, e).to(acc) + extra
        da = None if da is None else da.to(lora_a.dtype)
        db = None if db is None else db.to(lora_b.dtype)
    if needs_dbias:
        dbias = seg.sum_rows(dy2.to(acc))
    return dx, da, db, dbias


def _grouped_experts_forward(x, qw, offsets, num_experts, bias, lora_a, lora_b, scaling, method, dropout, max_rows,
                             row_token=None, gate_up=False):
    """(Y, what backward needs, dropout seed or None, compute dtype): :class:`GroupedExpertsFunction`'s
    forward, and :func:`grouped_experts_linear` without a graph (only there with ``row_token`` or
    ``gate_up``)."""
    cd = compute_dtype(x)
    with autocast_off(x.device.type):
        y, saved, seed = grouped_experts_forward_impl(x.to(cd), qw, offsets, num_experts,
                                                      None if bias is None else bias.to(cd), lora_a, lora_b,
                                                      scaling, method, dropout, max_rows, row_token, gate_up)
    return y, saved, seed, cd


class GroupedExpertsFunction(torch.autograd.Function):
    """One stacked expert projection (base, LoRA or QA-LoRA per expert); see the module docstring."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, qw, offsets, num_experts, bias, lora_a, lora_b, scaling, method, dropout, max_rows):
        y, saved, seed, cd = _grouped_experts_forward(x, qw, offsets, num_experts, bias, lora_a, lora_b, scaling,
                                                      method, dropout, max_rows)
        ctx.save_for_backward(saved, lora_a, lora_b, offsets)
        ctx.qw, ctx.num_experts, ctx.scaling, ctx.method, ctx.dropout, ctx.seed = qw, num_experts, scaling, method, dropout, seed
        ctx.compute_dtype, ctx.x_dtype = cd, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        saved, a, b, offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        with autocast_off(dy.device.type):
            dx, da, db, dbias = grouped_experts_backward_impl(
                dy.to(ctx.compute_dtype), saved, offsets, a, b, ctx.qw, ctx.num_experts, ctx.scaling, ctx.method,
                ctx.dropout, ctx.seed, need[0], need[5] if ctx.method else False, need[6] if ctx.method else False,
                need[4])
        dx = None if dx is None else dx.to(ctx.x_dtype)
        dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dx, None, None, None, dbias, da, db, None, None, None, None


def grouped_experts_linear(x, qw, offsets, num_experts, bias=None, lora_a=None, lora_b=None, scaling=1.0,
                           method=None, dropout=0.0, max_rows=None, row_token=None, gate_up=False):
    """Differentiable stacked expert projection through :class:`GroupedExpertsFunction`.

    x [S, K] sorted by expert; qw stacked [E·N, K]; offsets [E+1]; bias [E, N] or None;
    lora_a [E or 1, r, K (LoRA) or K/g (QA-LoRA)], lora_b [E or 1, N, r]. ``max_rows``: a bound on
    every expert's row count (the token count T of top-k routing, where a token picks an expert at
    most once) or None; the kernels launch fewer spare tiles with it and check it on the device.
    ``row_token`` (int [S], or None): sorted row s is row ``row_token[s]`` of x, which is then the
    tokens un-gathered [T, K]; without an autograd graph the grouped kernel reads x in place (the
    experts' decode forward, round 40), with one x is gathered first (index_select's backward scatters dX).
    ``gate_up``: the projection is a gate-up one (N = 2I, the gate's rows first) and the result is
    silu(G)·U [S, I] (transformers' default gate with SiLU, ``act_fn(gate) * up``): formed in the
    grouped kernel's epilogue without a graph (round 40), by torch ops on Y with one."""
    n = check_grouped(qw, offsets, num_experts, "grouped_experts_linear")
    if gate_up and n % 2:
        raise ValueError(f"grouped_experts_linear: gate_up needs an even number of rows per expert, got {n}")
    if x.dim() != 2 or x.shape[1] != qw.in_features:
        raise ValueError(f"grouped_experts_linear: x has shape {list(x.shape)}, expected [rows, {qw.in_features}]")
    if row_token is not None:
        check_row_token(row_token, x, "grouped_experts_linear")
    if method is not None:
        ea = lora_a.shape[0]
        if ea not in (1, num_experts) or lora_b.shape[0] != ea or lora_b.shape[1] != n:
            raise ValueError(f"grouped_experts_linear: lora_A {list(lora_a.shape)} / lora_B {list(lora_b.shape)} "
                             f"do not fit {num_experts} experts of [{n}, {qw.in_features}]")
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0):
        raise ValueError(f"grouped_experts_linear: max_rows must be a non-negative int or None, got {max_rows!r}")
    if not wants_graph(x, bias, lora_a, lora_b):
        return _grouped_experts_forward(x, qw, offsets, num_experts, bias, lora_a, lora_b, float(scaling), method,
                                        float(dropout), max_rows, row_token, bool(gate_up))[0]
    if row_token is not None:
        x = x.index_select(0, row_token)
    y = GroupedExpertsFunction.apply(x, qw, offsets, num_experts, bias, lora_a, lora_b, float(scaling), method,
                                     float(dropout), max_rows)
    return _silu_gate(y) if gate_up else y

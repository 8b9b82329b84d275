"""torch.compile of the qlk layers: one code path with eager.

Under ``torch.compile`` :class:`qlk.QuantLinear` calls the ``qlk::`` custom ops (qlk/custom_ops.py),
which run the implementation the eager autograd Functions run (QA-LoRA: the fused folded-bias kernels,
here through the Triton interpreter). Checked: Dynamo traces the layer in one graph (fullgraph=True)
whose forward calls the layer's op and whose backward (AOTAutograd) calls its backward op, with no
torch re-implementation of the adapter around them (no mm / mean / sum in the forward graph); the
compiled layer's output and gradients equal eager's, with and without dropout (the dropout seed is
drawn inside the op from the same generator eager uses); the ops pass ``torch.library.opcheck``.
"""
from __future__ import annotations

import os

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import qlk
from qlk import custom_ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
K, N, R = 128, 80, 4  # QA-LoRA g = 32: G = 4 groups; the interpreter's split kernels use 2+ tiles


def layer_for(method, dropout=0.0, act_order=False, bias=False):
    torch.manual_seed(0)
    layer = qlk.QuantLinear.from_dense(nn.Linear(K, N, bias=bias), bits=4, group_size=32, method=method, r=R,
                                       dropout=dropout)  # fmt: skip
    if act_order:
        layer.weight_perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    if method:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)  # the adapter term is a sizeable part of Y and dX
    return layer


def run(fn, layer, x, seed=0):
    """(Y, dX, grads of the trainable parameters) of sum(Y²) with torch's RNG at ``seed``."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    torch.manual_seed(seed)
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in layer.parameters() if p.requires_grad]


def recording_backend(graphs):
    """An AOTAutograd backend that keeps the forward and backward graphs' code."""

    def compiler(kind):
        def compile_(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm.code)
            return make_boxed_func(gm.forward)

        return compile_

    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))


OPS = {"qalora": "qlk.qalora_linear", "lora": "qlk.lora_linear"}


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs the Triton kernels")
@pytest.mark.parametrize("method,m,dropout,act_order", [
    ("qalora", 5, 0.0, False),  # split-K forward + split-N grad (V fused)
    ("qalora", 40, 0.0, True),  # the GEMMs, act-order
    ("lora", 5, 0.3, False),  # dropout: the seed drawn inside the op
])  # fmt: skip
def test_compiled_layer_runs_the_eager_kernels(method, m, dropout, act_order):
    layer = layer_for(method, dropout=dropout, act_order=act_order).train()
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    graphs = {}
    with qlk.use_backend("triton"):
        eager = run(layer, layer, x)
        torch._dynamo.reset()
        compiled = run(torch.compile(layer, fullgraph=True, backend=recording_backend(graphs)), layer, x)
    fw, bw = graphs["fw"], graphs["bw"]
    assert len(fw) == 1 and len(bw) == 1
    op = OPS[method]
    assert f"{op}.default" in fw[0] and f"{op}_backward.default" in bw[0]
    for torch_math in ("aten.mm", "aten.addmm", "aten.mean", "aten.sum", "aten.matmul", "aten.bmm"):
        assert torch_math not in fw[0], f"the compiled forward re-implements the layer with {torch_math}"
    assert "aten.mm" not in bw[0] and "aten.mean" not in bw[0]
    for c, e in zip((compiled[0], compiled[1], *compiled[2]), (eager[0], eager[1], *eager[2])):
        assert c.shape == e.shape and c.dtype == e.dtype
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
    if dropout:  # the mask is real: a different seed gives a different Y
        other = run(layer, layer, x, seed=1)
        assert not torch.allclose(other[0], eager[0])


def test_compiled_layer_only_needed_grads_and_bias():
    """x without grad (the first layer), a trainable bias, batch dims: dX is not computed (the
    backward op returns an empty tensor for it), the bias gets Σ dY."""
    layer = layer_for("qalora", bias=True)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(3))
    graphs = {}
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend(graphs))
    y = compiled(x)
    y.square().sum().backward()
    grads_c = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.bias)]
    layer.zero_grad()
    y_e = layer(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y, y_e, rtol=1e-6, atol=1e-6)
    for c, e in zip(grads_c, (layer.lora_A.grad, layer.lora_B.grad, layer.bias.grad)):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert "True, True, True" not in graphs["bw"][0] and "False, True, True" in graphs["bw"][0]


@pytest.mark.parametrize("method", ["qalora", "lora"])
def test_adapter_ops_opcheck(method):
    """Schema, fake (meta) implementations and registered autograd of the adapter ops."""
    layer = layer_for(method, bias=True)
    tensors, attrs = custom_ops.unpack(layer.qweight)
    x = torch.randn(2, 3, K, requires_grad=True)
    a, b = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
    op = getattr(torch.ops.qlk, f"{method}_linear").default
    torch.library.opcheck(op, (x, *tensors, a, b, layer.bias, 2.0, 0.0, *attrs))
    y, *saved = op(x, *tensors, a, b, layer.bias, 2.0, 0.0, *attrs)
    dy = torch.randn_like(y)
    backward = getattr(torch.ops.qlk, f"{method}_linear_backward").default
    activation = saved[0].detach() if method == "qalora" else x.detach()  # no double backward: no grads in
    torch.library.opcheck(backward, (dy, activation, saved[-1], a.detach(), b.detach(), *tensors, 2.0, 0.0, True,
                                     False, True, *attrs))  # fmt: skip


# ---- mixture of experts: the grouped expert ops ----------------------------------------------------
def tiny_moe_experts(method, dropout=0.0):
    """The experts of a tiny Mixtral's first layer (5 experts, top-2, H = I = 64), quantized INT4 g32
    with a per-expert adapter whose B is non-zero (the adapter term is a sizeable part of Y and dX)."""
    transformers = pytest.importorskip("transformers")
    from qlk.nn.experts import QuantExperts

    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=32, num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = qlk.patch_model(transformers.AutoModelForCausalLM.from_config(cfg), bits=4, group_size=32,
                            method=method, r=R, dropout=dropout, verbose=False)  # fmt: skip
    experts = next(m for m in model.modules() if isinstance(m, QuantExperts))
    with torch.no_grad():
        for proj in experts.projections.values():
            proj.lora_B.normal_(0, 0.5)
    return experts.train()


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs the Triton kernels")
@pytest.mark.parametrize("method,dropout", [("qalora", 0.0), ("lora", 0.3)])
def test_compiled_moe_experts_run_the_grouped_ops(method, dropout):
    """A compiled QuantExperts (routing, both stacked projections, the gate, the weighted sum) is one
    graph (fullgraph=True) whose forward calls ``qlk::grouped_experts_linear`` once per projection and
    whose backward calls its backward op, with no torch re-implementation of the adapters; output and
    gradients (X, every expert's A and B) equal eager's. Routing: expert 1 gets no token, expert 0
    one, the others several (5 tokens × top-2)."""
    experts = tiny_moe_experts(method, dropout)
    top_k = torch.tensor([[0, 2], [2, 3], [4, 2], [3, 4], [2, 4]])
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))

    def fn(h):
        return experts(h, top_k, weights)

    graphs = {}
    with qlk.use_backend("triton"):
        eager = run(fn, experts, x)
        torch._dynamo.reset()
        compiled = run(torch.compile(fn, fullgraph=True, backend=recording_backend(graphs)), experts, x)
    fw, bw = graphs["fw"], graphs["bw"]
    assert len(fw) == 1 and len(bw) == 1
    assert fw[0].count("qlk.grouped_experts_linear.default") == 2
    assert bw[0].count("qlk.grouped_experts_linear_backward.default") == 2
    for torch_math in ("aten.mm", "aten.addmm", "aten.mean", "aten.matmul", "aten.bmm"):
        assert torch_math not in fw[0], f"the compiled forward re-implements the experts with {torch_math}"
    assert "aten.bmm" not in bw[0] and "aten.mean" not in bw[0]
    assert len(compiled[2]) == 4  # A and B of both projections
    for c, e in zip((compiled[0], compiled[1], *compiled[2]), (eager[0], eager[1], *eager[2])):
        assert c.shape == e.shape and c.dtype == e.dtype
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["qalora", ""])
def test_grouped_expert_ops_opcheck(method):
    """Schema, fake (meta) implementations and registered autograd of the grouped expert ops (with a
    trainable per-expert bias; an expert without rows)."""
    from qlk.nn.experts import QuantExpertProj

    torch.manual_seed(0)
    proj = QuantExpertProj.from_dense(torch.randn(3, 16, K), torch.randn(3, 16), False, bits=4, group_size=32,
                                      method=method or None, r=R)  # fmt: skip
    tensors, attrs = custom_ops.unpack(proj.qweight)
    offsets = torch.tensor([0, 2, 2, 5])
    x = torch.randn(6, K, requires_grad=True)
    bias = proj.bias.detach().clone().requires_grad_(True)
    lora = (proj.lora_A.detach().clone().requires_grad_(True),
            proj.lora_B.detach().clone().requires_grad_(True)) if method else (None, None)  # fmt: skip
    op = torch.ops.qlk.grouped_experts_linear.default
    args = (x, offsets, *tensors, bias, *lora, 3, 2.0, method, 0.0, *attrs, 3)
    torch.library.opcheck(op, args)
    y, saved, seed = op(*args)
    backward = torch.ops.qlk.grouped_experts_linear_backward.default
    torch.library.opcheck(backward, (torch.randn_like(y), saved.detach(), seed, offsets,
                                     *(t.detach() if t is not None else None for t in lora), *tensors, 3, 2.0, method,
                                     0.0, True, bool(method), bool(method), True, *attrs))  # fmt: skip

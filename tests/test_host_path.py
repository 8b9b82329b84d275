"""The host side of a call (round 37): what is remembered between calls, and the inference path.

A decode step runs each layer's launcher once per token, with 15-40 µs of GPU work a launch; the
host work around it (checks, launch decisions, kernel arguments, ``Function.apply``) was 100-200 µs
a layer here. Three things now skip repeated work, and each must stay exactly as correct as the work
it skips:

* ``QuantizedWeight.launch_memo()``: ``supports``, the device check and ``weight_args`` remembered
  per weight object, valid while its fields are the same tensor objects. In-place writes (a merge,
  ``load_state_dict``) must show in the next call; a reassigned field must empty the memo; copies
  (non-contiguous codes, misaligned NF4 bytes, NF4's de-nested absmax) are never remembered.
* ``PackedWeightModule.qweight``: the same view object while the buffers are unchanged.
* ``quant_linear`` / ``lora_linear`` / ``qalora_linear`` without ``Function.apply`` when no graph is
  wanted: the same values, dtypes and shapes as through the Function.
* The kernels' ``triton.heuristics`` layers read only the arguments they need
  (``config.heuristics_reading``): the same constexprs as Triton's own layer.
"""
import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

import qlk
from qlk import reference as R
from qlk.autograd import lora as L
from qlk.autograd import qalora as QA
from qlk.nn import QuantLinear


def _int_weight(n=64, k=256, bits=4, group_size=32, seed=0):
    torch.manual_seed(seed)
    return qlk.quantize(torch.randn(n, k) * 0.05, bits=bits, group_size=group_size)


def _nf4_weight(n=64, k=256, double_quant=False, seed=0):
    torch.manual_seed(seed)
    return qlk.quantize(torch.randn(n, k) * 0.05, fmt="nf4", group_size=64, double_quant=double_quant)


def _kernel_forward(x, qw, path="auto"):
    from qlk.kernels import fused_matmul

    return fused_matmul.quant_matmul_forward(x, qw, path=path)


def _want(x, qw):
    return (x.double() @ qw.dequantize(torch.float64).t()).float()


# ---- the memo on a QuantizedWeight -----------------------------------------------------------
def test_memo_is_kept_while_the_fields_are_the_same_tensors():
    qw = _int_weight()
    memo = qw.launch_memo()
    memo["probe"] = 1
    assert qw.launch_memo() is memo
    qw.scales.mul_(1.0)  # in place: the same tensor
    assert qw.launch_memo() is memo
    for field in ("qweight", "scales", "biases"):
        setattr(qw, field, getattr(qw, field).clone())
        fresh = qw.launch_memo()
        assert fresh is not memo and "probe" not in fresh, field
        memo = fresh
        memo["probe"] = 1
    qw.group_size = 64
    assert "probe" not in qw.launch_memo()


def test_memo_is_not_copied_or_pickled():
    qw = _int_weight()
    from qlk.kernels import quant_tile

    quant_tile.weight_args(qw)
    assert len(qw.launch_memo()) > 2
    for other in (copy.deepcopy(qw), copy.copy(qw), pickle.loads(pickle.dumps(qw))):
        assert "_launch_memo" not in other.__dict__
        torch.testing.assert_close(other.dequantize(), qw.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_in_place_writes_after_a_call_show_in_the_next(fmt):
    """The kernels read the weight's own tensors: an in-place write between two calls (a merge, a
    ``load_state_dict`` into the buffers) must change the next result."""
    qw = _int_weight() if fmt == "int" else _nf4_weight()
    x = torch.randn(5, 256)
    torch.testing.assert_close(_kernel_forward(x, qw), _want(x, qw), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        if fmt == "int":
            qw.scales.mul_(2)
            qw.biases.add_(0.01)
        else:
            qw.absmax.mul_(3)
    y = _kernel_forward(x, qw)
    torch.testing.assert_close(y, _want(x, qw), rtol=1e-4, atol=1e-4)


def test_reassigned_fields_after_a_call_are_read():
    qw = _int_weight()
    x = torch.randn(3, 256)
    _kernel_forward(x, qw)
    qw.biases = qw.biases + 0.02
    qw.scales = qw.scales * 0.5
    torch.testing.assert_close(_kernel_forward(x, qw), _want(x, qw), rtol=1e-4, atol=1e-4)


def test_copies_are_not_remembered():
    from qlk.kernels import quant_tile

    qw = _int_weight()
    qw.qweight = qw.qweight.t().contiguous().t()  # column-major codes: weight_args copies them
    args, _ = quant_tile.weight_args(qw)
    assert args[0] is not qw.qweight
    assert not any(isinstance(key, tuple) and key[0] == "weight_args" for key in qw.launch_memo())

    nf4 = _nf4_weight()
    raw = torch.empty(nf4.qweight.numel() + 1, dtype=torch.uint8)
    raw[1:] = nf4.qweight
    nf4.qweight = raw[1:]  # bytes that do not start on a 4-byte boundary: viewed as words after a copy
    quant_tile.weight_args(nf4)
    assert not any(isinstance(key, tuple) and key[0] == "weight_args" for key in nf4.launch_memo())
    x = torch.randn(2, 256)
    torch.testing.assert_close(_kernel_forward(x, nf4), _want(x, nf4), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        nf4.qweight.bitwise_xor_(0x11)  # a write to the original bytes shows in the next (copied) call
    torch.testing.assert_close(_kernel_forward(x, nf4), _want(x, nf4), rtol=1e-4, atol=1e-4)


def test_denested_absmax_is_computed_each_call():
    """The GEMMs' de-nested absmax is computed from the codes' values: never remembered."""
    qw = _nf4_weight(double_quant=True)
    x = torch.randn(40, 256)
    torch.testing.assert_close(_kernel_forward(x, qw, path="gemm"), _want(x, qw), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        qw.absmax.copy_(qw.absmax.flip(0))
    torch.testing.assert_close(_kernel_forward(x, qw, path="gemm"), _want(x, qw), rtol=1e-4, atol=1e-4)


def test_device_check_still_fails_after_a_good_call():
    qw = _int_weight()
    qlk.quant_matmul(torch.randn(2, 256), qw)
    qw.scales = qw.scales.to("meta")
    with pytest.raises(ValueError, match="different devices"):
        qlk.quant_matmul(torch.randn(2, 256), qw)


# ---- the layer's view -------------------------------------------------------------------------
def test_layer_view_is_reused_until_a_buffer_changes():
    layer = QuantLinear.from_dense(nn.Linear(256, 64), bits=4, group_size=32, method="lora", r=4)
    view = layer.qweight
    assert layer.qweight is view
    layer.weight_scales = layer.weight_scales.clone()  # a buffer reassigned
    assert layer.qweight is not view and layer.qweight.scales is layer.weight_scales
    view = layer.qweight
    view.biases = view.biases.clone()  # a field of the returned view reassigned: not the layer's
    assert layer.qweight is not view and layer.qweight.biases is layer.weight_biases
    view = layer.qweight
    layer.to("meta")  # new buffers (a dtype change keeps the packed ones: they are never cast)
    assert layer.qweight is not view
    assert layer.qweight.qweight is layer.weight_packed


@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_layer_load_state_dict_after_a_forward(fmt):
    """load_state_dict copies into the buffers in place: the next forward reads the new weight."""
    kw = dict(bits=4, group_size=32) if fmt == "int" else dict(fmt="nf4", group_size=64)
    torch.manual_seed(0)
    a = QuantLinear.from_dense(nn.Linear(256, 64), method=None, **kw)
    b = QuantLinear.from_dense(nn.Linear(256, 64), method=None, **kw)
    x = torch.randn(3, 256)
    with qlk.use_backend("triton"):
        a(x)
        a.load_state_dict(b.state_dict())
        got = a(x)
    want = _want(x, b.qweight) + b.bias
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- inference without Function.apply ----------------------------------------------------------
def _layers():
    torch.manual_seed(0)
    out = []
    for method, fmt in ((None, "int"), ("lora", "int"), ("lora", "nf4"), ("qalora", "int")):
        kw = dict(bits=4, group_size=32) if fmt == "int" else dict(fmt="nf4", group_size=64)
        layer = QuantLinear.from_dense(nn.Linear(256, 64), method=method, **kw, **({"r": 4} if method else {}))
        if method is not None:
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.05)
        out.append(layer)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("autocast", [False, True])
def test_no_grad_is_the_function_forward(backend, autocast):
    """Without a graph the layer functions run their Function's forward directly: the same values,
    dtype and shape as through ``Function.apply``, and no graph."""
    for layer in _layers():
        layer.eval()
        x = torch.randn(2, 3, 256)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        if autocast and backend == "triton":
            continue  # bf16 under the Triton interpreter computes garbage (tests/conftest.py)
        with qlk.use_backend(backend), ctx:
            with_graph = layer(x.clone().requires_grad_())
            with torch.no_grad():
                without = layer(x)
            frozen = layer(x) if layer.method is None else None  # grad mode, nothing requires grad
        assert with_graph.requires_grad and not without.requires_grad
        assert without.dtype == with_graph.dtype and without.shape == with_graph.shape == (2, 3, 64)
        assert torch.equal(without, with_graph.detach()), layer.method
        if frozen is not None:
            assert not frozen.requires_grad and torch.equal(frozen, without)


@pytest.mark.parametrize("grad", [False, True])
def test_autocast_computes_in_the_autocast_dtype(grad):
    """Under autocast the layers compute in its dtype, with or without a graph: the same result as
    the input cast to it by hand (reference backend: bf16 under the interpreter is garbage)."""
    for layer in _layers():
        layer.eval()
        x = torch.randn(4, 256, requires_grad=grad)
        with torch.set_grad_enabled(grad), qlk.use_backend("reference"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = layer(x)
            by_hand = layer(x.to(torch.bfloat16))
        assert auto.dtype == torch.bfloat16, layer.method
        assert torch.equal(auto, by_hand), layer.method


def test_no_grad_does_not_build_a_graph(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Function.apply under no_grad")

    for fn in (L.QuantLinearFunction, L.LoRAFunction, QA.QALoRAFunction):
        monkeypatch.setattr(fn, "apply", refuse)
    for layer in _layers():
        with torch.no_grad():
            layer(torch.randn(3, 256))
    with pytest.raises(AssertionError, match="Function.apply"):
        _layers()[1](torch.randn(3, 256, requires_grad=True))


def test_training_still_gets_gradients():
    for layer in _layers():
        if layer.method is None:
            continue
        layer.train()
        x = torch.randn(4, 256, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert x.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0


def test_no_grad_keeps_the_input_checks():
    layer = _layers()[1]
    with torch.no_grad(), pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 255))
    with torch.no_grad(), pytest.raises(TypeError, match="dtype"):
        layer(torch.randint(0, 3, (3, 256)))


def test_reference_layer_under_no_grad_matches_the_math():
    layer = _layers()[3]  # QA-LoRA
    x = torch.randn(5, 256)
    with torch.no_grad():
        got = layer(x)
    want = R.qalora_forward(x, layer.qweight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the kernels' heuristics layers -----------------------------------------------------------
def _reads_layers():
    from qlk.kernels import config, dequant, fused_matmul, grouped_matmul

    found = {}
    for mod in (fused_matmul, grouped_matmul, dequant):
        for name, obj in vars(mod).items():
            layer = obj
            for _ in range(6):  # autotuner -> heuristics layers -> JITFunction
                if isinstance(layer, config._ReadsHeuristics):
                    found[f"{mod.__name__}.{name}"] = layer
                    break
                layer = getattr(layer, "fn", None)
    return found


def test_every_heuristics_layer_is_found():
    names = set(_reads_layers())
    assert len(names) >= 8, names  # fwd, splitk, grad, splitn, gemv, dequant, grouped fwd / splitk / grad
    assert any("gemv" in n for n in names) and any("_dequantize_kernel" in n for n in names)


@pytest.mark.parametrize("k,block_k,group_size,stride_qn", [
    (256, 64, 32, 32), (288, 128, 32, 36), (2880, 128, 64, 360), (576, 128, 128, 72), (96, 128, 32, 12),
    (4096, 256, 32, 513), (160, 64, 32, 20)])
def test_heuristics_layers_set_what_tritons_would(k, block_k, group_size, stride_qn, monkeypatch):
    """Each layer's constexprs equal Triton's ``Heuristics`` semantics (every value computed from the
    dict of all arguments and the kwargs so far), plus the flattened ``QN_ALIGN`` and fp-fusion layers."""
    from qlk.kernels import config

    for name, layer in _reads_layers().items():
        seen = []
        monkeypatch.setattr(layer._inner, "run", lambda *a, _seen=seen, **kw: _seen.append((a, kw)))
        names = list(layer.arg_names)
        params = list(inspect.signature(layer._inner.fn).parameters.values())
        positional = next(i for i, p in enumerate(params) if "constexpr" in str(p.annotation))  # as launched
        assert names.index("K") < positional, name
        args = [5] * positional
        args[names.index("K")] = k
        if "stride_qn" in names:
            args[names.index("stride_qn")] = stride_qn
        kwargs = dict(BLOCK_K=block_k, GROUP_SIZE=group_size)
        layer.run(*args, **kwargs)
        got = seen[-1][1]
        want = dict(kwargs)
        for value, heur in layer.values.items():
            want[value] = heur({**dict(zip(names, args)), **want})
        for value in layer.values:
            assert got[value] == want[value], (name, value)
        if layer._qn_at is not None:
            assert got["QN_ALIGN"] == config.row_alignment(stride_qn), name
        for key, value in layer._consts.items():
            assert got[key] == value, name
        assert seen[-1][0] == tuple(args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method", [None, "lora", "qalora"])
def test_experts_no_grad_is_the_function_forward(backend, method, monkeypatch):
    """The stacked-expert op without a graph: the Function's forward, the same values, no graph."""
    from qlk.autograd import experts

    e_count, n, k, g, r = 4, 24, 64, 32, 4
    gen = torch.Generator().manual_seed(3)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen) * 0.05, bits=4, group_size=g)
    offsets = torch.tensor([0, 3, 3, 8, 10])
    x = torch.randn(10, k, generator=gen)
    a = b = None
    if method is not None:
        a = torch.randn(e_count, r, k if method == "lora" else k // g, generator=gen) * 0.1
        b = torch.randn(e_count, n, r, generator=gen) * 0.1
    with qlk.use_backend(backend):
        with_graph = experts.grouped_experts_linear(x.clone().requires_grad_(), qw, offsets, e_count, None, a, b,
                                                    0.5, method)
        monkeypatch.setattr(experts.GroupedExpertsFunction, "apply", None)  # not called without a graph
        with torch.no_grad():
            without = experts.grouped_experts_linear(x, qw, offsets, e_count, None, a, b, 0.5, method)
    assert with_graph.requires_grad and not without.requires_grad
    assert torch.equal(without, with_graph.detach())

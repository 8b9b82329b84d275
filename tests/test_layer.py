"""QuantLinear: construction, fresh adapter, repr, state dict, .to, autocast, checkpointing, merge."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import qlk
from qlk import reference as R
from qlk.nn import QuantLinear


def dense(k=128, n=64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def trained(layer: QuantLinear, seed=1) -> QuantLinear:
    """Give the adapter non-zero B, as after some training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("method,fmt", [("qalora", "int"), ("lora", "int"), ("lora", "nf4"), (None, "int")])
def test_fresh_adapter_changes_nothing(method, fmt):
    lin = dense()
    layer = QuantLinear.from_dense(lin, bits=4, group_size=32 if fmt == "int" else 64, fmt=fmt, method=method)
    x = torch.randn(3, 5, 128)
    base = qlk.quant_matmul(x, layer.qweight, lin.bias.detach())
    torch.testing.assert_close(layer(x), base, rtol=1e-6, atol=1e-6)
    if method is not None:
        assert (layer.lora_B == 0).all() and layer.lora_A.abs().sum() > 0
        bound = 1 / layer.lora_A.shape[1] ** 0.5  # kaiming_uniform(a=√5) on fan_in columns
        assert layer.lora_A.abs().max() <= bound
        assert layer.lora_A.dtype == torch.float32
    assert not layer.bias.requires_grad


def test_shapes_and_scaling():
    layer = QuantLinear.from_dense(dense(), bits=3, group_size=32, method="qalora", r=8, alpha=32)
    assert layer.lora_A.shape == (8, 4) and layer.lora_B.shape == (64, 8) and layer.scaling == 4.0
    layer = QuantLinear.from_dense(dense(), bits=4, group_size=32, method="lora", r=16, alpha=32, use_rslora=True)
    assert layer.lora_A.shape == (16, 128) and layer.scaling == pytest.approx(32 / 4)


def test_forward_matches_reference():
    layer = trained(QuantLinear.from_dense(dense(), bits=4, group_size=32, method="qalora", r=4))
    x = torch.randn(6, 128)
    want = R.qalora_forward(x, layer.qweight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_repr_shows_format_and_adapter():
    layer = QuantLinear.from_dense(dense(), bits=3, group_size=64, method="qalora", r=8, alpha=16)
    s = repr(layer)
    for part in ("fmt='int'", "bits=3", "group_size=64", "method='qalora'", "r=8", "alpha=16"):
        assert part in s, s
    s = repr(QuantLinear.from_dense(dense(), fmt="nf4", method="lora", r=4))
    assert "fmt='nf4'" in s and "group_size=64" in s and "method='lora'" in s


@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_state_dict_round_trip(fmt):
    src = trained(QuantLinear.from_dense(dense(), fmt=fmt, method="lora" if fmt == "nf4" else "qalora", r=4))
    sd = src.state_dict()
    assert "weight_packed" in sd and "lora_A" in sd and "bias" in sd
    dst = QuantLinear.empty(128, 64, fmt=fmt, group_size=src.group_size, bias=True, weight_dtype=torch.float32,
                            method=src.method, r=4)  # fmt: skip
    dst.load_state_dict(sd)
    x = torch.randn(4, 128)
    assert torch.equal(dst(x), src(x))
    assert dst.qweight.bits_per_param == src.qweight.bits_per_param


def test_to_keeps_packed_dtypes():
    layer = QuantLinear.from_dense(dense(), method="lora", r=4)
    dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.weight_scales.dtype == torch.float16 and layer.weight_packed.dtype == torch.int32
    assert layer.lora_A.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    layer.to("cpu").float()
    assert {k: v.dtype for k, v in layer.state_dict().items()} == dtypes
    nf = QuantLinear.from_dense(dense(), fmt="nf4", method="lora").half()
    assert nf.weight_absmax_scale.dtype == torch.float32 and nf.weight_absmax.dtype == torch.uint8
    assert nf(torch.randn(2, 128).half()).dtype == torch.float16


@pytest.mark.parametrize("method", ["qalora", "lora"])
def test_autocast_bf16(method):
    layer = trained(QuantLinear.from_dense(dense(), method=method, r=4))
    x = torch.randn(2, 8, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).mean().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    y32 = layer(x)
    assert ((y.float() - y32).norm() / y32.norm()) < 1e-2


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("method,dropout", [("qalora", 0.0), ("qalora", 0.2), ("lora", 0.2)])
def test_gradient_checkpointing(use_reentrant, method, dropout):
    layer = trained(QuantLinear.from_dense(dense(), method=method, r=4, dropout=dropout)).train()
    net = nn.Sequential(layer, nn.GELU())
    x = torch.randn(2, 8, 128, requires_grad=True)

    def grads(ckpt):
        for p in (layer.lora_A, layer.lora_B, x):
            p.grad = None
        torch.manual_seed(3)
        y = checkpoint(net, x, use_reentrant=use_reentrant) if ckpt else net(x)
        y.pow(2).sum().backward()
        return [t.grad.clone() for t in (layer.lora_A, layer.lora_B, x)]

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    layer = trained(QuantLinear.from_dense(dense(), method="qalora", r=4, dropout=0.5))
    x = torch.randn(4, 128)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_conv1d_layer():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(64, 128)  # nf=out, nx=in: weight [in, out]
    nn.init.normal_(conv.weight, std=0.02)
    nn.init.normal_(conv.bias, std=0.02)
    layer = QuantLinear.from_dense(conv, method="qalora")
    assert (layer.in_features, layer.out_features, layer.kind) == (128, 64, "conv1d")
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ layer.qweight.dequantize().t() + conv.bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.qweight.dequantize(), conv.weight.t(), rtol=0, atol=0.01)
    back = trained(layer).to_dense(torch.float32)
    assert isinstance(back, Conv1D) and back.weight.shape == (128, 64)
    torch.testing.assert_close(back(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("perm", [False, True])
def test_merge_qalora_layer_exact_and_same_bits(perm):
    layer = QuantLinear.from_dense(dense(bias=False), bits=4, group_size=32, method="qalora", r=4)
    if perm:
        qw = layer.qweight
        qw.perm = torch.randperm(128)
        layer._set_qweight(qw)
    trained(layer)
    x = torch.randn(16, 128)
    before, bpp = layer(x), layer.bits_per_param
    layer.merge_adapter_()
    assert layer.method is None and not any(p.requires_grad for p in layer.parameters())
    assert "lora_A" not in layer.state_dict() and layer.bits_per_param == bpp
    rel = (layer(x) - before).norm() / before.norm()
    assert rel < 1e-3


def test_lora_layer_cannot_merge_into_quantized():
    layer = trained(QuantLinear.from_dense(dense(), fmt="nf4", method="lora", r=4))
    with pytest.raises(ValueError, match="cannot merge exactly.*to_dense"):
        layer.merge_adapter_()
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer.to_dense(torch.float32)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="method='qalora' needs fmt='int'"):
        QuantLinear.from_dense(dense(), fmt="nf4", method="qalora")
    with pytest.raises(ValueError, match="r=0"):
        QuantLinear.from_dense(dense(), method="lora", r=0)
    with pytest.raises(ValueError, match="method='dora'"):
        QuantLinear.from_dense(dense(), method="dora")
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_dense(nn.Conv2d(3, 3, 1))


def test_deepcopy_and_parameters():
    layer = QuantLinear.from_dense(dense(), method="qalora", r=4)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"}
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 128)
    assert torch.equal(clone(x), layer(x))

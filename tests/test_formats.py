"""Formats against independent oracles: float64 math, bitsandbytes' own CPU code, the GPTQ spec."""
import io
import json

import pytest
import torch

import qlk
from qlk.formats import pack_codes, unpack_codes, words_per_row
from qlk.formats.nf4 import NF4_TABLE

GROUPS = (32, 64, 128)


def weights(n, k, seed, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "outliers":
        idx = torch.randint(0, n * k, (max(1, n * k // 200),), generator=g)
        w.view(-1)[idx] *= 50
    elif kind == "tiny":
        w = w * 1e-4
    elif kind == "shifted":  # groups that do not straddle zero
        w = w.abs() + 3.0
    return w


# ---------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [8, 40, 64, 96, 136])
def test_pack_unpack_roundtrip_every_code(bits, k):
    if k % 8:
        pytest.skip("in_features are multiples of 8")
    n = 1 << bits  # every code appears in every column
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % n
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n, words_per_row(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_layout_matches_the_documented_bit_positions(bits):
    # independent bit-by-bit construction of the layout written in packing.py's docstring
    k = 64
    codes = torch.randint(0, 1 << bits, (3, k), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits).to(torch.int64) & 0xFFFFFFFF
    for r in range(3):
        for c in range(k):
            q = int(codes[r, c])
            if bits == 3:
                chunk, i = divmod(c, 32)
                half, j = divmod(i, 16)
                low = (int(packed[r, 3 * chunk + half]) >> (2 * j)) & 3
                high = (int(packed[r, 3 * chunk + 2]) >> i) & 1
                assert low | (high << 2) == q
            else:
                per = 32 // bits
                assert (int(packed[r, c // per]) >> (bits * (c % per))) & ((1 << bits) - 1) == q


def test_int3_is_at_most_3_2_bits_per_code():
    assert words_per_row(4096, 3) * 32 / 4096 == 3.0


# ---------------------------------------------------------------------------------- INT group
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("kind", ["normal", "outliers", "tiny", "shifted"])
def test_int_error_within_half_a_step(bits, group_size, kind):
    n, k = 37, 256
    w = weights(n, k, seed=bits * 1000 + group_size, kind=kind)
    qw = qlk.quantize(w, bits=bits, group_size=group_size)
    err = (qw.dequantize(torch.float64) - w.double()).abs()
    s = qw.scales.double().repeat_interleave(group_size, 1)
    # half a step, plus what the fp16 rounding of the stored bias and of s (over 2^bits steps) can
    # add at the clamped ends of the range: ulp/2 = 2^-11 relative, doubled for margin
    b = qw.biases.double().abs().repeat_interleave(group_size, 1)
    slack = 2.0**-10 * (b + s * (1 << bits))
    assert torch.all(err <= s / 2 + slack + 1e-12), (err - s / 2).max()
    # and the quantizer is not trivially lossy: codes use the whole range
    codes = unpack_codes(qw.qweight, bits, k)
    assert codes.max() == (1 << bits) - 1 and codes.min() == 0


def test_int_constant_group_is_exact_no_division_by_zero():
    w = torch.randn(4, 64)
    w[1, :32] = 0.3125  # fp16-representable constant group
    w[2, 32:] = 0.0
    w[3] = -2.5  # a whole constant row
    qw = qlk.quantize(w, bits=4, group_size=32)
    d = qw.dequantize()
    assert torch.isfinite(d).all()
    assert torch.equal(d[1, :32], w[1, :32]) and torch.equal(d[2, 32:], w[2, 32:]) and torch.equal(d[3], w[3])


def test_int_fp32_scales_for_huge_weights():
    w = torch.randn(8, 64) * 1e6
    with pytest.raises(ValueError, match="scale_dtype=torch.float32"):
        qlk.quantize(w, bits=4, group_size=32)
    qw = qlk.quantize(w, bits=4, group_size=32, scale_dtype=torch.float32)
    s = qw.scales.repeat_interleave(32, 1)
    assert torch.all((qw.dequantize() - w).abs() <= s / 2 * (1 + 1e-5))


@pytest.mark.parametrize(
    "bits,group_size,fmt,expected",
    [(4, 32, "int", 5.0), (4, 128, "int", 4.25), (3, 128, "int", 3.25), (2, 32, "int", 3.0), (3, 64, "int", 3.5)],
)
def test_bits_per_param_int(bits, group_size, fmt, expected):
    qw = qlk.quantize(torch.randn(64, 512), bits=bits, group_size=group_size, fmt=fmt)
    assert qw.bits_per_param == pytest.approx(expected)  # codes + fp16 scale + fp16 bias


def test_bits_per_param_nf4_double_quant():
    qw = qlk.quantize(torch.randn(1024, 1024), fmt="nf4", group_size=64, double_quant=True)
    # 4 (codes) + 8/64 (absmax codes) + 32/(64·256) (nested fp32 absmax) + one fp32 offset
    assert qw.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 1024**2)
    assert round(qw.bits_per_param, 3) == 4.127
    plain = qlk.quantize(torch.randn(1024, 1024), fmt="nf4", group_size=64, double_quant=False)
    assert plain.bits_per_param == pytest.approx(4.5)


# ---------------------------------------------------------------------------------- NF4 vs bnb
def bnbf():
    """``bitsandbytes.functional``, imported by each test that uses it: without bitsandbytes those
    tests skip alone, and the rest of this file (the INT formats included) still runs."""
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("shape", [(64, 128), (7, 9), (33, 65), (300, 96)])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_byte_for_byte_with_bitsandbytes(shape, blocksize, dtype):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + blocksize)) * 0.05).to(dtype)
    packed, state = bnbf().quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    qw = qlk.quantize(w, fmt="nf4", group_size=blocksize, double_quant=True)
    assert torch.equal(qw.qweight, packed.reshape(-1))
    assert torch.equal(qw.absmax, state.absmax)
    assert torch.equal(qw.absmax_scale, state.state2.absmax)
    assert torch.equal(qw.absmax_offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(qw.dequantize(dtype), bnb_dequantize_4bit(packed, state))


def bnb_dequantize_4bit(packed, state):
    """bitsandbytes' dequantize_4bit; when in_features is even but not a multiple of the blocksize,
    its CPU C kernel treats blocks per row while its quantizer (and the CUDA kernels) use blocks of
    the flattened weight (its error against the weight grows 5x): compare there with bitsandbytes'
    own flat-block implementation, the one its CPU backend falls back on for odd shapes."""
    n, k = state.shape
    if k % 2 == 1 or k % state.blocksize == 0:
        out = bnbf().dequantize_4bit(packed, state)
    else:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        absmax = bnbf().dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = _get_4bit_code("nf4", packed.device)
        out = _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)
    assert out.dtype == state.dtype
    return out


@pytest.mark.parametrize("shape", [(48, 64), (5, 13)])
def test_nf4_without_double_quant_matches_bitsandbytes(shape):
    w = torch.randn(*shape)
    packed, state = bnbf().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    qw = qlk.quantize(w, fmt="nf4", group_size=64, double_quant=False)
    assert torch.equal(qw.qweight, packed.reshape(-1)) and torch.equal(qw.absmax, state.absmax)
    assert torch.equal(qw.dequantize(), bnbf().dequantize_4bit(packed, state))


def test_nf4_exact_midpoint_takes_lower_code():
    mid = (NF4_TABLE[8] + NF4_TABLE[9]) / 2
    w = torch.tensor([[1.0, mid, -1.0, 0.0] + [0.0] * 60])
    qw = qlk.quantize(w, fmt="nf4", group_size=64, double_quant=False)
    packed, _ = bnbf().quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(qw.qweight, packed.reshape(-1))


def test_from_bnb_linear4bit_state_dict_and_back():
    bnb = pytest.importorskip("bitsandbytes")

    lin = torch.nn.Linear(128, 48, bias=False)
    q = bnb.nn.Linear4bit(128, 48, bias=False, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q.weight.data, q.weight.quant_state = bnbf().quantize_4bit(lin.weight.data, quant_type="nf4", compress_statistics=True)
    sd = q.state_dict()
    qw = qlk.from_bnb_state_dict(sd)
    ref = bnbf().dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.equal(qw.dequantize(torch.float32), ref.float())
    qw2 = qlk.from_bnb(q.weight.data, q.weight.quant_state)
    assert torch.equal(qw2.qweight, qw.qweight) and torch.equal(qw2.absmax, qw.absmax)
    # export: bitsandbytes reads qlk's state dict back
    out = qlk.to_bnb_state_dict(qw)
    state = bnbf().QuantState.from_dict({k[len("weight.") :]: v for k, v in out.items() if k != "weight"}, "cpu")
    assert torch.equal(bnbf().dequantize_4bit(out["weight"], state), ref)


def test_from_bnb_refuses_fp4():
    packed, state = bnbf().quantize_4bit(torch.randn(16, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        qlk.from_bnb(packed, state)


# ---------------------------------------------------------------------------------- GPTQ
def _stream_pack(values, bits):
    """Independent bit-stream packer (python ints), per column: value i at bit offset bits*i."""
    count, cols = values.shape
    nwords = count * bits // 32
    out = torch.zeros(nwords, cols, dtype=torch.int64)
    for c in range(cols):
        acc = 0
        for i in range(count):
            acc |= int(values[i, c]) << (bits * i)
        for wd in range(nwords):
            out[wd, c] = (acc >> (32 * wd)) & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _v2_to_v1_as_gptqmodel_writes(qzeros_v2, zeros, bits):
    """A v1 qzeros as GPTQModel's v2 -> v1 export writes it (python ints, independent of qlk): 2/4-bit
    subtract 1 from every field as one 32-bit word (a zero of 0 borrows from the next field);
    3-bit: each field minus 1 modulo 8, repacked."""
    if bits == 3:
        return _stream_pack(((zeros - 1) & 7).t().contiguous(), bits).t().contiguous()
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    out = torch.empty_like(qzeros_v2, dtype=torch.int64)
    for idx, word in enumerate(qzeros_v2.flatten().tolist()):
        out.view(-1)[idx] = ((word & 0xFFFFFFFF) - ones) & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_import_matches_spec(bits, act_order, fmt):
    k, n, group = 128, 64, 32
    gen = torch.Generator().manual_seed(bits * 10 + act_order)
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (k, n), generator=gen)
    zeros = torch.randint(0, maxq + 1, (k // group, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    zeros[0, :4] = 0  # a zero point of 0: what v1 cannot store as z − 1 without wrapping
    zero_true = zeros
    qweight = _stream_pack(q, bits)
    qzeros = _stream_pack(zeros.t().contiguous(), bits).t().contiguous()
    if fmt == "gptq":
        qzeros = _v2_to_v1_as_gptqmodel_writes(qzeros, zeros, bits)
    qw = qlk.from_gptq(qweight, qzeros, scales, g_idx=g_idx.int(), bits=bits, group_size=group, checkpoint_format=fmt)
    ref = torch.empty(n, k, dtype=torch.float64)
    for kk in range(k):
        gi = int(g_idx[kk])
        ref[:, kk] = scales[gi].double() * (q[kk].double() - zero_true[gi].double())
    d = qw.dequantize(torch.float64)
    # the bias −s·z is stored in fp16: one rounding of at most |s·z|·2^-11
    tol = (scales.double() * zero_true.double()).abs().max() * 2.0**-10
    assert (d - ref).abs().max() <= tol
    assert (qw.perm is not None) == act_order
    x = torch.randn(3, k, dtype=torch.float64)
    assert torch.allclose(qlk.quant_matmul(x, qw), x @ d.t())


def test_gptq_shape_mismatch_is_explained():
    qweight = torch.zeros(16, 64, dtype=torch.int32)  # 4-bit -> K = 128
    scales = torch.ones(2, 64, dtype=torch.float16)  # says 2 groups: group_size 64, not 32
    qzeros = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="scales has shape"):
        qlk.from_gptq(qweight, qzeros, scales, bits=4, group_size=32)
    with pytest.raises(ValueError, match="qzeros"):
        qlk.from_gptq(qweight, torch.zeros(2, 7, dtype=torch.int32), scales, bits=4, group_size=64)
    with pytest.raises(TypeError, match="qweight"):
        qlk.from_gptq(qweight.float(), qzeros, scales, bits=4, group_size=64)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(bits=5), ValueError, "bits=5"),
        (dict(bits=4, group_size=48), ValueError, "not divisible by group_size=48"),
        (dict(bits=4, group_size=12), ValueError, "multiple of 8"),
        (dict(fmt="fp8"), ValueError, "fmt='fp8'"),
        (dict(fmt="nf4", bits=3), ValueError, "4-bit"),
        (dict(fmt="nf4", group_size=48), ValueError, "blocksize"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        qlk.quantize(torch.randn(16, 160), **kwargs)


def test_group_size_error_suggests_divisors():
    with pytest.raises(ValueError, match=r"group sizes that divide it: \[8, 16, 24, 32, 48, 64, 72, 96, 144, 192\]"):
        qlk.quantize(torch.randn(4, 576), bits=4, group_size=128)


@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_bad_weights(fmt):
    with pytest.raises(ValueError, match="2-D"):
        qlk.quantize(torch.randn(4, 4, 64), fmt=fmt)
    with pytest.raises(TypeError, match="floating-point"):
        qlk.quantize(torch.ones(4, 64, dtype=torch.int64), fmt=fmt)
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 64)
        w[2, 5] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            qlk.quantize(w, fmt=fmt)


def test_quant_matmul_bad_input():
    qw = qlk.quantize(torch.randn(16, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="in_features=64"):
        qlk.quant_matmul(torch.randn(3, 32), qw)
    with pytest.raises(TypeError, match="dtype"):
        qlk.quant_matmul(torch.ones(3, 64, dtype=torch.int32), qw)
    with pytest.raises(ValueError, match="bias"):
        qlk.quant_matmul(torch.randn(3, 64), qw, bias=torch.zeros(15))
    with pytest.raises(ValueError, match="backend"):
        qlk.quant_matmul(torch.randn(3, 64), qw, backend="cuda")


# ---------------------------------------------------------------------------------- serialization
@pytest.mark.parametrize("fmt,bits", [("int", 2), ("int", 3), ("int", 4), ("nf4", 4)])
def test_state_dict_roundtrip_through_safetensors(tmp_path, fmt, bits):
    from safetensors.torch import load_file, save_file

    qw = qlk.quantize(torch.randn(24, 128), bits=bits, fmt=fmt, group_size=32 if fmt == "int" else 64)
    save_file(qw.state_dict(prefix="layer."), tmp_path / "w.safetensors")
    back = qlk.QuantizedWeight.from_state_dict(load_file(tmp_path / "w.safetensors"), prefix="layer.")
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.bits_per_param == qw.bits_per_param
    buf = io.BytesIO()
    torch.save(qw.state_dict(), buf)
    buf.seek(0)
    assert torch.equal(qlk.QuantizedWeight.from_state_dict(torch.load(buf)).qweight, qw.qweight)


def test_state_dict_refuses_other_layout_version_and_foreign_dicts():
    sd = qlk.quantize(torch.randn(8, 64)).state_dict()
    cfg = json.loads(bytes(sd["qlk_config"].tolist()))
    cfg["layout_version"] = 99
    sd["qlk_config"] = torch.tensor(list(json.dumps(cfg).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="version 99"):
        qlk.QuantizedWeight.from_state_dict(sd)
    with pytest.raises(ValueError, match="not a qlk"):
        qlk.QuantizedWeight.from_state_dict({"weight": torch.zeros(3)})
    sd = qlk.quantize(torch.randn(8, 64)).state_dict()
    sd["scales"] = sd["scales"][:, :1]
    with pytest.raises(ValueError, match="scales"):
        qlk.QuantizedWeight.from_state_dict(sd)


def test_to_device_keeps_dtypes():
    qw = qlk.quantize(torch.randn(8, 64), fmt="nf4")
    moved = qw.to("cpu")
    assert moved is not qw and moved.qweight.dtype == torch.uint8 and moved.absmax.dtype == torch.uint8
    meta = qw.to("meta")
    assert meta.device.type == "meta" and meta.shape == qw.shape


def test_import_touches_no_gpu():
    import subprocess
    import sys

    code = (
        "import torch; torch.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError('cuda query'));"
        "torch.cuda.device_count = torch.cuda.is_available; import qlk, qlk.formats, qlk.reference; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr

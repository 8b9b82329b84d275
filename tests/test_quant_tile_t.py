"""The transposed tile of the input gradient, :func:`qlk.kernels.quant_tile_t._dequant_tile_t`, tile by
tile against the float64 oracle of the documented formats (tests/oracles.py).

A small kernel writes Ŵᵀ [K, N] from [BLOCK_N = 16, BLOCK_K = 64] tiles: several row tiles, several
column tiles (the k0 offsets), groups smaller and larger than the tile, every packed layout (INT4,
INT3 bit planes, INT2, NF4 with and without double quant), a ragged K (the masked path), the fallback
(group size not a power of two / smaller than a chunk) and the three output dtypes. The output is
NaN-poisoned first. Ŵ computed in fp32 equals the oracle exactly (test_kernel_paths checks qlk's
dequantize against it), so the tile rounded once to fp16/bf16 must equal the oracle rounded once.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

import qlk
from qlk.kernels.quant_tile import weight_args
from qlk.kernels.quant_tile_t import _dequant_tile_t

import oracles

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
N = 40  # two full row tiles of 16 and a clamped ragged one


@triton.jit
def _tile_t_kernel(out_ptr, qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                   stride_qn, stride_sn, stride_sg, N, K,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT2_HALVES: tl.constexpr,
                   HALF2: tl.constexpr = False):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    wt = _dequant_tile_t(qw_ptr, s_ptr, b_ptr, am_scale_ptr, am_offset_ptr, lut_ptr, dyn_ptr,
                         stride_qn, stride_sn, stride_sg, tl.minimum(offs_n, N - 1), k0, K,
                         BITS, GROUP_SIZE, IS_NF4, DOUBLE_QUANT, EVEN_K, BLOCK_N, BLOCK_K,
                         out_ptr.dtype.element_ty, INT2_HALVES, HALF2=HALF2)
    # the whole tile, its columns past K included (the contract: exactly 0 there unless EVEN_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], wt, mask=offs_n[None, :] < N)


def tile_t(qw, dtype, block_k=64, int2_halves=False, half2=False, past_k=False):
    """Ŵᵀ [K, N] by the tiles of ``_dequant_tile_t``; ``past_k``: also the last tile's columns past K
    ([⌈K/block_k⌉·block_k, N])."""
    n, k = qw.shape
    args, meta = weight_args(qw)
    out = torch.full((triton.cdiv(k, block_k) * block_k, n), float("nan"), dtype=dtype, device=DEVICE)
    _tile_t_kernel[(triton.cdiv(n, 16), triton.cdiv(k, block_k))](
        out, *args, n, k, EVEN_K=k % block_k == 0, BLOCK_N=16, BLOCK_K=block_k, INT2_HALVES=int2_halves,
        HALF2=half2, **meta)
    return out if past_k else out[:k]


def rounded(w64, dtype):
    """The oracle rounded once to ``dtype`` (to nearest even; the Triton interpreter rounds fp32 to
    bf16 toward zero, which a GPU does not: that is what it is compared with there)."""
    w32 = w64.float()
    if dtype == torch.bfloat16 and INTERPRETED:
        w32 = (w32.view(torch.int32) & -65536).view(torch.float32)
    return w32.to(dtype)


def weight(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * torch.logspace(-1, 1, n)[:, None]


# (bits, group_size, in_features): g < tile, g > tile, INT3 planes, ragged K, fallbacks (g=48, g=8 < INT2 chunk)
# every case in fp16 (a rounding after the fp32 math), two in bf16 and fp32 each
INT_CASES = [(4, 32, 256), (4, 128, 256), (3, 32, 224), (2, 64, 320), (4, 16, 208), (3, 48, 240), (2, 8, 128)]
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
INT_RUNS = [(c, F16) for c in INT_CASES] + [(INT_CASES[0], BF16), (INT_CASES[2], BF16),
                                             (INT_CASES[3], F32), (INT_CASES[5], F32)]


@pytest.mark.parametrize("case,dtype", INT_RUNS, ids=lambda c: str(c).replace("torch.", "").replace(" ", ""))
def test_int_tile_t(case, dtype):
    bits, g, k = case
    qw = qlk.quantize(weight(N, k, seed=bits * 100 + g + k), bits=bits, group_size=g).to(DEVICE)
    ref = rounded(oracles.int_dequant64(qw), dtype).t()
    assert torch.equal(tile_t(qw, dtype).cpu(), ref)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["s-fp32", "s-bf16"])
@pytest.mark.parametrize("bits,magnitude", [(4, 2.0**-122), (3, 2.0**-123), (2, 2.0**-127)])
def test_int_tile_t_tiny_scales(bits, magnitude, scale_dtype):
    """Scales near fp32's normal range limit (bf16 has the same exponents): the codes come out of
    the words as 2^e·(q − MID) (quant_tile_t._scaled_code). s·2^-e is exact for every bf16 scale
    (a multiple of 2^-133, e <= 8), not for a tiny fp32 one: those must unscale the codes instead
    (the fuzz test's INT2 g8 case). fp32 scales: s·(q − MID) is not exact in fp32 and the
    interpreter does not fuse the FMA, so the tile is within 2 roundings of the oracle (losing
    bits of s·2^-e costs up to 2^-16 relative); bf16 (fp32 products exact): equal. Not bf16
    scales below 2^-126: the interpreter converts bf16 subnormals to fp32 wrongly."""
    if scale_dtype == torch.bfloat16 and magnitude < 2.0**-124:
        pytest.skip("bf16 subnormal scales: the interpreter's bf16 -> fp32 conversion is wrong there")
    k, g = 256, 32
    w = (torch.randn(N, k, generator=torch.Generator().manual_seed(bits)) * magnitude).float()
    qw = qlk.quantize(w, bits=bits, group_size=g, scale_dtype=scale_dtype)
    assert qw.scales.float().abs().min() < 2.0**-118  # s·2^-e (e up to 8) leaves the normal range
    ref = oracles.int_dequant64(qw).t()
    out = tile_t(qw.to(DEVICE), torch.float32).cpu()
    if scale_dtype == torch.bfloat16:
        assert torch.equal(out, ref.float())
    else:
        assert ((out.double() - ref).abs() <= 2.0**-22 * (ref.abs() + magnitude)).all()


# INT2 unpacked per half word (the sm_80 variant; 8-column chunks, so g = 8 takes it too)
@pytest.mark.parametrize("case,dtype", [((2, 64, 320), F16), ((2, 8, 128), BF16), ((2, 16, 208), F16)],
                         ids=lambda c: str(c).replace("torch.", "").replace(" ", ""))
def test_int2_half_word_tile_t(case, dtype):
    bits, g, k = case
    qw = qlk.quantize(weight(N, k, seed=7 * g + k), bits=bits, group_size=g).to(DEVICE)
    ref = rounded(oracles.int_dequant64(qw), dtype).t()
    assert torch.equal(tile_t(qw, dtype, int2_halves=True).cpu(), ref)


@pytest.mark.parametrize("block,dq,k,dtype", [(64, True, 256, BF16), (32, False, 224, F16), (32, False, 224, BF16),
                                              (64, True, 256, torch.float32)],
                         ids=["b64dq-bf16", "b32k224-fp16", "b32k224-bf16", "b64dq-fp32"])
def test_nf4_tile_t(block, dq, k, dtype):
    """NF4 against bitsandbytes' own dequantize_4bit, fp16/bf16 (round 21's half2 lookup) bit for bit
    against ``oracles.nf4_dequant_act`` (table and absmax rounded to the dtype, then the product)
    and within two units in the last place of bitsandbytes' fp32 value. fp32: without double quant
    the fp32 product is bitsandbytes' exactly; with it the absmax is rebuilt in fp32 (two
    roundings), so the tile is within one rounding."""
    pytest.importorskip("bitsandbytes")
    qw, ref64 = oracles.bnb_weight(weight(N, k, seed=block + k), blocksize=block, double_quant=dq)
    full = tile_t(qw.to(DEVICE), dtype, past_k=True).cpu()
    assert torch.equal(full[k:], torch.zeros_like(full[k:]))  # a ragged K (224): the columns past it are 0
    out = full[:k].t()
    if dtype in (F16, BF16):
        assert torch.equal(out.double(), oracles.nf4_dequant_act(qw, dtype))
        assert ((out.double() - ref64).abs() <= 2 * torch.finfo(dtype).eps * ref64.abs()).all()
    elif not dq:
        assert torch.equal(out, rounded(ref64, dtype))
    else:
        ulp = 2e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert ((out.double() - ref64).abs() <= ulp * ref64.abs()).all()


@pytest.mark.parametrize("arch", [90, 80])
def test_int2_grad_input_both_unpackings(arch, monkeypatch):
    """The input-gradient GEMM with the launcher's INT2 unpacking of each target (sm_90: 16-column
    chunks, sm_80: half words), fp32 dX = dY·Ŵ against the float64 oracle: ragged M = 17, 3 N tiles
    (the last one ragged), 5 K tiles (the last one ragged), 4 groups per tile, NaN-poisoned out."""
    from qlk.kernels import fused_matmul as fm

    monkeypatch.setattr(fm, "target_arch", lambda: arch)
    m, n, k = 17, 72, 304
    qw = qlk.quantize(weight(n, k, seed=arch), bits=2, group_size=16).to(DEVICE)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(arch)).to(DEVICE)
    out = torch.full((m, k), float("nan"), device=DEVICE)
    fm.quant_matmul_grad_input(dy, qw, out=out, path="gemm")
    ref = dy.double().cpu() @ oracles.int_dequant64(qw)
    assert torch.allclose(out.double().cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# the half2 decoder (round 7, quant_tile_t._pair_half2; the twin here, the asm's bit-level semantics in
# tests/test_quant_tile_t_asm.py): every packed layout, groups smaller and larger than the tile, a
# ragged K (masked words), INT2 in both unpackings, the fallbacks. The scales and biases are stored
# in fp16, so ŵ = s·(q − m) + c rounded once equals the oracle rounded once.
HALF2_RUNS = [(4, 32, 256, False), (4, 128, 256, False), (3, 32, 224, False), (3, 128, 384, False),
              (2, 64, 320, False), (2, 16, 208, True), (2, 8, 128, True), (4, 16, 208, False), (3, 48, 240, False)]


@pytest.mark.parametrize("case", HALF2_RUNS, ids=lambda c: "int{}g{}k{}{}".format(*c[:3], "-halves" if c[3] else ""))
def test_half2_tile_t(case):
    bits, g, k, halves = case
    qw = qlk.quantize(weight(N, k, seed=bits * 31 + g + k), bits=bits, group_size=g).to(DEVICE)
    assert qw.scales.dtype == F16 and qw.biases.dtype == F16
    ref = rounded(oracles.int_dequant64(qw), F16).t()
    assert torch.equal(tile_t(qw, F16, int2_halves=halves, half2=True).cpu(), ref)

"""The kernels' inline-asm branches run under the interpreter on an emulated PTX (tests/asm_emulator.py).

The interpreter otherwise takes each asm block's Triton twin, so what only the asm branch does was
left to a GPU: which asm constant a dtype and bit width select, the operand list and its order, the
pairing of pack=2 elements, the selectors and packed (s, s) / (c, c) registers the kernel builds for
the asm, the ``ld.global.nc`` pointers of the words-ahead loop. Here the launchers are told they are
not interpreted (``PACKED_DEQUANT``, ``HALF2_ASM``, ``WORDS_ASM`` on) and the interpreter executes
the PTX text with a vectorized numpy model, itself checked against the exact Fraction model of
tests/test_decode_tile.py. fp16 only (the interpreter's bf16 arithmetic is not IEEE; the bf16 asm
is checked bit for bit by the exact model).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import asm_emulator
import oracles
import qlk
import test_decode_tile as exact
from qlk.kernels import decode_tile, quant_tile_t
from qlk.kernels import fused_matmul as fm
from qlk.kernels import grouped_matmul as gm
from qlk.kernels import quant_matmul_backward, quant_matmul_forward

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="emulates asm inside the Triton interpreter")
N = 72


def _asm_blocks():
    for act in ("fp16", "bf16"):
        for bits in (2, 3, 4):
            yield f"packed_asm({bits},{act})", decode_tile.packed_asm(bits, act), 5
            yield f"pair_asm_t({bits},{act})", quant_tile_t.pair_asm_t(bits, act), 5
        yield f"pair_asm_t_nibbles({act})", quant_tile_t.pair_asm_t_nibbles(act), 8
        for bits in (2, 4):
            yield f"packed_asm_halves({bits},{act})", decode_tile.packed_asm_halves(bits, act), 3
        for p in (0, 2, 4):
            yield f"packed_asm_int3_halves({act},{p})", decode_tile.packed_asm_int3_halves(act, p), 4
    yield "int3_code_word_asm", decode_tile.int3_code_word_asm(), 6


@pytest.mark.parametrize("name,asm,n_in", [pytest.param(*b, id=b[0]) for b in _asm_blocks()])
def test_emulator_equals_the_exact_model(name, asm, n_in):
    """The vectorized model against the Fraction model on random operands (selectors drawn from the
    valid ones, 16-bit floats from normal values of both signs)."""
    rng = np.random.default_rng(len(name) * 7 + n_in)
    cases = 64
    fmt = "bf16" if "bf16" in name else "f16"
    high = rng.integers(0, 2, size=cases)  # pair_asm_t_nibbles: one nibble position a case, for its 3 operands
    ops = []
    for i in range(n_in):
        if "int3_code_word" in name and i == 3:
            v = [sum(int(x) << (4 * k) for k, x in enumerate(rng.integers(0, 8, size=4))) for _ in range(cases)]
        elif "int3_code_word" in name and i >= 4:
            v = rng.integers(0, 32, size=cases).tolist()
        elif "nibbles" in name and i in (3, 4, 5):  # the (mask, (u, u), (−n, −n)) of a low or high nibble
            v = [quant_tile_t.nibble_consts("bf16" if "bf16" in name else "fp16", bool(h))[i - 3] for h in high]
        elif ("packed_asm(" in name and i == 2) or ("pair_asm_t" in name and i == 2):
            j = rng.integers(0, 4, size=(cases, 2))
            v = [int(a | (4 + a) << 8 | (b | (4 + b) << 8) << 16) for a, b in j]
        elif i >= n_in - 2 and "int3_code_word" not in name:  # (s, s) / (c, c): 16-bit floats
            x = rng.choice(exact.SCALES + exact.BIASES, size=(cases, 2))
            v = [h0 | (h1 << 16) for h0, h1 in zip(exact.half_bits(x[:, 0].tolist(), fmt),
                                                   exact.half_bits(x[:, 1].tolist(), fmt))]
        else:
            v = rng.integers(0, 1 << 32, size=cases, dtype=np.uint64).tolist()
        ops.append([int(t) for t in v])
    got = asm_emulator.run_ptx(asm, {f"${i + 1}": np.array(ops[i], dtype=np.uint64) for i in range(n_in)})["$0"]
    for c in range(cases):
        ref = exact.run_ptx(asm, {f"${i + 1}": ops[i][c] for i in range(n_in)})
        assert int(got[c]) == ref, (name, c, [hex(o[c]) for o in ops])


@pytest.fixture
def asm_on(monkeypatch):
    """The launchers pass the asm flags (as on a GPU); the interpreter runs the asm on the model."""
    asm_emulator.emulate_inline_asm(monkeypatch)
    monkeypatch.setattr(fm, "INTERPRETED", False)
    monkeypatch.setattr(gm, "INTERPRETED", False)
    monkeypatch.setattr(fm, "num_sms", lambda device: 1)  # split-K: several tiles a slice


def _weight(bits, g, k, seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    groups = k // g
    w = (torch.randn(n, groups, g, generator=gen) * torch.exp(torch.randn(n, groups, 1, generator=gen))
         + torch.randn(n, groups, 1, generator=gen)).reshape(n, k)
    qw = qlk.quantize(w, bits=bits, group_size=g)
    return qw, oracles.int_dequant64(qw).half().double(), gen


# (bits, g, K, split-K BLOCK_K): the decode loop's lane-owned asm for INT4 / INT2 (g8 splits INT2
# words, K = 520 a partial word), the INT3 stored-order rebuild + byte asm (g48, K mod 32 = 16),
# the INT3 lane-owned asm (BLOCK_K = 128: 4 chunks a tile; K = 544 a partial chunk)
DECODE_CASES = [(4, 32, 384, 64), (2, 8, 520, 64), (3, 48, 528, 64), (3, 32, 544, 128)]


@needs_interpreter
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"int{c[0]}g{c[1]}k{c[2]}-bk{c[3]}")
def test_forward_asm_splitk_and_gemm(case, asm_on, monkeypatch):
    """fp16 through the split-K decode kernel (M = 5, atomics) and the GEMM (M = 40) in the stored
    order (the byte asm, every bit width) and, round 17, in the lane-owned order (INT2/INT4: the halves
    asm with X permuted), the asm branches emulated, against float64 on Ŵ rounded to fp16."""
    from qlk.kernels import config, heuristics

    bits, g, k, block_k = case
    if block_k != 64:  # the interpreter's one split-K candidate with another BLOCK_K
        monkeypatch.setattr(config, "splitk_configs",
                            lambda: [config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=block_k)])
        heuristics._choose_default.cache_clear()
        assert decode_tile.lane_order_ok(bits, block_k)
    qw, w_half, gen = _weight(bits, g, k, seed=300 + bits + g + k)
    try:
        for m, path, lanes in ((5, "splitk", None), (40, "gemm", False), (40, "gemm", True)):
            if lanes is not None:
                monkeypatch.setattr(heuristics, "fwd_lane_order", lambda arch, block_m, lanes=lanes: lanes)
            x = torch.randn(m, k, generator=gen).half()
            bias = torch.randn(N, generator=gen).half()
            y = quant_matmul_forward(x, qw, bias, out=torch.full((m, N), float("nan"), dtype=torch.half), path=path)
            ref = x.double() @ w_half.t() + bias.double()
            assert not y.isnan().any(), (path, lanes)
            assert oracles.rel_err(y, ref) < 1e-3, (path, lanes)
    finally:
        heuristics._choose_default.cache_clear()


@needs_interpreter
@pytest.mark.parametrize("case,arch", [((4, 32, 256), 90), ((3, 32, 416), 90), ((2, 64, 320), 80), ((2, 16, 272), 80)],
                         ids=["int4g32-sm90", "int3g32k416-sm90", "int2g64-sm80-halves", "int2g16k272-sm80-ahead"])
def test_grad_input_half2_asm(case, arch, asm_on, monkeypatch):
    """The GEMM input gradient with fp16 dY: the half2 decoder's asm (``pair_asm_t``, the scale
    pairs), the words of the next N tile loaded ahead by ``ld.global.nc`` (sm_90) and INT2 per half
    word (sm_80), emulated; M = 17, 3 N tiles, ragged K where given, NaN-poisoned dX."""
    monkeypatch.setattr(fm, "target_arch", lambda: arch)
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: arch == 90 or k % 64 != 0)
    bits, g, k = case
    qw, w_half, gen = _weight(bits, g, k, seed=500 + bits + g + k)
    dy = torch.randn(17, N, generator=gen).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((17, k), float("nan"), dtype=torch.half), path="gemm")
    ref = dy.double() @ w_half
    assert not dx.isnan().any()
    assert oracles.rel_err(dx, ref) < 5e-4


@needs_interpreter
def test_grouped_asm(asm_on):
    """The grouped kernels' asm branches: the decode forward (INT4 lane-owned asm), the split-K
    forward, the input gradient (half2 asm, words ahead by ld.global.nc, split N); expert 0 with
    rows, an empty expert, K = 80 ragged, sentinel rows of NaN that come out 0."""
    counts, n, k, g = [5, 17, 0, 1], 40, 80, 16
    e_count = len(counts)
    gen = torch.Generator().manual_seed(91)
    qw = qlk.quantize(torch.randn(e_count * n, k, generator=gen), bits=4, group_size=g)
    w = oracles.int_dequant64(qw).half().double().reshape(e_count, n, k)
    off = torch.tensor([0] + counts).cumsum(0)
    routed = int(off[-1])
    x, dy = torch.randn(routed + 2, k, generator=gen).half(), torch.randn(routed + 2, n, generator=gen).half()
    x[routed:], dy[routed:] = float("nan"), float("nan")
    y_ref = torch.zeros(routed, n, dtype=torch.float64)
    dx_ref = torch.zeros(routed, k, dtype=torch.float64)
    for e in range(e_count):
        lo, hi = int(off[e]), int(off[e + 1])
        y_ref[lo:hi] = x[lo:hi].double() @ w[e].t()
        dx_ref[lo:hi] = dy[lo:hi].double() @ w[e]
    cfg = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    for split in (1, 2):
        y, _ = gm.grouped_matmul_forward(x, qw, off, e_count, config=dict(cfg, SPLIT_K=split))
        assert torch.equal(y[routed:], torch.zeros(2, n, dtype=torch.half)) and not y.isnan().any()
        assert oracles.rel_err(y[:routed], y_ref) < 1e-3, split
    dx = gm.grouped_matmul_grad_input(dy, qw, off, e_count, config=dict(cfg, SPLIT_N=2, WORDS_AHEAD=True))
    assert torch.equal(dx[routed:], torch.zeros(2, k, dtype=torch.half)) and not dx.isnan().any()
    assert oracles.rel_err(dx[:routed], dx_ref) < 1e-3



def _exact_bits(s_vals, c_vals, q, mid, act):
    """The 16-bit patterns of s·(q − mid) + c rounded once (s, c already in the act dtype)."""
    v = np.asarray(s_vals, dtype=np.float64) * (np.asarray(q, dtype=np.float64) - mid) + np.asarray(c_vals, np.float64)
    return asm_emulator._f64_to_half_bits(v, "f16" if act == torch.float16 else "bf16")


@needs_interpreter
@pytest.mark.parametrize("bits,g,ahead", [(3, 32, True), (3, 128, False), (4, 32, True), (2, 64, False)],
                         ids=["int3g32-ahead", "int3g128", "int4g32-ahead", "int2g64"])
def test_grad_input_w_as_b_asm(bits, g, ahead, asm_on, monkeypatch):
    """sm_90's B-operand input gradient (rounds 18-19) with fp16 dY at its 64x64x128 w4 tile, the asm
    emulated: the half2 asm on joined word shifts (INT2/INT4) and, for INT3, the per-pair shifts of
    INT3_LANE_PLAN with the asm at each pair's code position, its pack=2 pairs split from the joined
    32-bit words; the words loaded one N tile ahead or in the same iteration. M = 17, 2 N tiles (the
    second ragged), 3 K tiles, NaN-poisoned dX; which decoder ran is checked."""
    import spies
    from qlk.kernels import config, heuristics

    monkeypatch.setattr(fm, "target_arch", lambda: 90)
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: ahead)
    tile = config._cfg(None, 4, 1, GROUP_M=2, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [tile] if op == "grad" else real(op))
    heuristics._choose_default.cache_clear()
    ran = spies.record_calls(monkeypatch, fm, "_decode_int_tile_rows", "_decode_int3_tile_rows")
    try:
        qw, w_half, gen = _weight(bits, g, 384, seed=700 + bits + g)
        dy = torch.randn(17, N, generator=gen).half()
        dx = quant_matmul_backward(dy, qw, out=torch.full((17, 384), float("nan"), dtype=torch.half), path="gemm")
    finally:
        heuristics._choose_default.cache_clear()
    assert ran and set(ran) == {"_decode_int3_tile_rows" if bits == 3 else "_decode_int_tile_rows"}
    assert not dx.isnan().any()
    assert oracles.rel_err(dx, dy.double() @ w_half) < 5e-4


@needs_interpreter
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asm_wrappers_pick_their_asm(bits, act, asm_on):
    """Each asm wrapper with PACKED / ASM on (the branch a GPU runs), both activation dtypes (the
    interpreter cannot run a bf16 GEMM, so the bf16 branches are checked here, elementwise):
    ``_byte_codes_to_weights`` (decode, every code pair at every byte), ``_half_codes_to_weights`` /
    ``_int3_halves_to_weights`` (lane-owned), ``_pair_half2`` with ``_half2_pair``'s packing
    (transposed decoder); the result against s·(q − m) + c rounded once."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(w_ptr, w2_ptr, sel_ptr, s_ptr, c_ptr, out_ptr, BITS: tl.constexpr, WHICH: tl.constexpr,
               BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        s = tl.load(s_ptr + offs)
        c = tl.load(c_ptr + offs)
        if WHICH == 0:
            w = decode_tile._byte_codes_to_weights(tl.load(w_ptr + offs), tl.load(sel_ptr + offs).to(tl.int16), s, c,
                                                   BITS, True)
            tl.store(out_ptr + offs, w)
        elif WHICH == 1:
            if BITS == 3:
                w = decode_tile._int3_halves_to_weights(tl.load(w_ptr + offs).to(tl.int16),
                                                        tl.load(w2_ptr + offs).to(tl.int16), tl.load(sel_ptr + offs),
                                                        s, c, True)
            else:
                w = decode_tile._half_codes_to_weights(tl.load(w_ptr + offs).to(tl.int16), s, c, BITS, True)
            tl.store(out_ptr + offs, w)
        else:  # the transposed decoder: element e of the pair from a (e = 0) / b (e = 1), one S per pair
            pair = tl.reshape(offs, (BLOCK // 2, 2))
            a, b = tl.split(tl.load(w_ptr + pair))
            sel, _ = tl.split(tl.load(sel_ptr + pair))
            s1, _ = tl.split(tl.load(s_ptr + pair))
            c1, _ = tl.split(tl.load(c_ptr + pair))
            r = quant_tile_t._pair_half2(a, b, sel, quant_tile_t._half2_pair(s1, s_ptr.dtype.element_ty, True),
                                         quant_tile_t._half2_pair(c1, s_ptr.dtype.element_ty, True),
                                         s_ptr.dtype.element_ty, BITS, True)
            lo = r.to(tl.int16).to(s_ptr.dtype.element_ty, bitcast=True)
            hi = (r >> 16).to(tl.int16).to(s_ptr.dtype.element_ty, bitcast=True)
            tl.store(out_ptr + tl.reshape(pair, (BLOCK,)), tl.reshape(tl.join(lo, hi), (BLOCK,)))

    fmt = "f16" if act == torch.float16 else "bf16"
    mid = 1 << (bits - 1)
    rng = np.random.default_rng(bits * 10 + (act == torch.float16))
    signed = lambda vs: [v - (1 << 32) if v >= 1 << 31 else v for v in vs]  # noqa: E731
    words, sels, codes, s_vals, c_vals = [], [], [], [], []
    for q0, q1, w0, w1, s0, s1, i in exact._grid(bits):
        words += [w0, w1]
        sels += [s0, s1]
        codes += [q0, q1]
        s_vals += [exact.SCALES[i]] * 2
        c_vals += [exact.BIASES[(i + q0) % len(exact.BIASES)]] * 2
    n = len(words)
    block = 1 << (n - 1).bit_length()
    pad = block - n
    s_t = torch.tensor(s_vals + [1.0] * pad).to(act)
    c_t = torch.tensor(c_vals + [0.0] * pad).to(act)
    want = _exact_bits(s_t[:n].double().numpy(), c_t[:n].double().numpy(), codes, mid, act)

    def run(which, w, w2, sel):
        out = torch.full((block,), float("nan"), dtype=act)
        kernel[(1,)](torch.tensor(signed(w) + [0] * pad, dtype=torch.int32),
                     torch.tensor(signed(w2) + [0] * pad, dtype=torch.int32),
                     torch.tensor(sel + [0] * pad, dtype=torch.int32), s_t, c_t, out, BITS=bits, WHICH=which,
                     BLOCK=block)
        return out[:n].view(torch.int16).numpy().astype(np.uint16).astype(np.uint64)

    assert np.array_equal(run(0, words, words, sels), want), "decode byte asm"
    # lane-owned: the code at the bottom of a 16-bit half (INT3: at bit p of INT3_LANE_PLAN's 0, 2, 4,
    # per pair: low bits in one half, the high bit at p + 2 of the other), random bits elsewhere
    noise = rng.integers(0, 1 << 16, size=n).tolist()
    pos = [2 * ((e // 2) % 3) for e in range(n)] if bits == 3 else sels
    if bits == 3:
        lo = [(x & ~(3 << p) & 0xFFFF) | ((q & 3) << p) for x, q, p in zip(noise, codes, pos)]
        hi = [(x & ~(4 << p) & 0xFFFF) | ((q & 4) << p) for x, q, p in zip(noise[::-1], codes, pos)]
    else:
        lo = hi = [(x & ~((1 << bits) - 1) & 0xFFFF) | q for x, q in zip(noise, codes)]
    to16 = lambda vs: [v - (1 << 16) if v >= 1 << 15 else v for v in vs]  # noqa: E731
    assert np.array_equal(run(1, to16(lo), to16(hi), pos), want), "lane-owned asm"
    # transposed: pair (a, b) with one selector j | (4 + j) << 8 for both, per pair the even element's
    # word and scale; every pair of the grid keeps one s and c per pair already
    pair_sel = []
    a_b = []
    for e in range(0, n, 2):
        j = exact._selector(sels[e] & 3) & 0xFF
        wa = words[e] & ~(((1 << bits) - 1) << (8 * j)) & 0xFFFFFFFF | (codes[e] << (8 * j))
        wb = words[e + 1] & ~(((1 << bits) - 1) << (8 * j)) & 0xFFFFFFFF | (codes[e + 1] << (8 * j))
        a_b += [wa, wb]
        pair_sel += [j | ((4 + j) << 8)] * 2
    assert np.array_equal(run(2, a_b, a_b, pair_sel), want), "transposed pair asm"

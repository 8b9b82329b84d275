"""Every kernel path at shapes where it is not degenerate, against independent float64 oracles.

tests/test_kernels.py runs each kernel at shapes where the paths real layers take collapse: one
tile per split slice, one nested absmax block, no partial packed word, one group per row. Here
(the interpreter's tiles are BLOCK_N = 32, BLOCK_M = 64 (GEMMs) / 16 (split), BLOCK_K = 64):

* **several tiles per split slice.** The split rule (``heuristics.split_count``: about 16 CTAs
  per SM, at most one slice per tile) is told the smallest SM count that still splits (1 or 2), so
  every slice adds 2..6 tiles, and some trailing slices are empty (N = 72: 3 N tiles, K = 480..784:
  8..13 K tiles; :func:`use_split` asserts it). Both reductions: fp32 atomics (M = 5) and the
  deterministic workspace (M = 17, two M tiles).
* **every output and workspace poisoned with NaN**: ``out=`` tensors, the deterministic workspace
  [SPLIT, M, ·] and the P(X) buffer (through the launchers' ``_workspace`` / ``_pool_buffer``),
  so work a program skips reads back as NaN, not as a plausible 0.
* **NF4 double quant with > 256 blocks**: 72 rows × 9 or 15 blocks = 648 / 1080 blocks, nested
  indices 0..4, rows straddling two nested blocks; rows of different magnitude so every nested
  scale differs.
  The NF4 weights are quantized by bitsandbytes itself and checked against its ``dequantize_4bit``.
* **groups**: g = 8 .. 256 with ≥ 2 groups per row, g < BLOCK_K (several groups per tile),
  g = BLOCK_K, g > BLOCK_K (one group over 2 and 4 tiles), g not a power of two (48, 96); each
  group has its own magnitude and offset, so reading a neighbour's scale or bias is a large error.
* **partial packed words**: INT3 with K = 528, 784 (K mod 32 = 16: the last 3-word chunk is half
  used) and INT2 with K = 520 (K mod 16 = 8), which also leave a ragged last K tile.
* **split GEMMs at mid M**: the input gradient's N loop (round 5) and the forward's K loop (round 6)
  split over the grid into 3 slices of several tiles, with small tiles forced and the rules'
  minimum slice length lowered; the forward's slices hold several whole groups (or one group over
  4 K tiles), both epilogues (fp32 atomics; the fixed-order sum of sm_80 and ``deterministic``).
* **QA-LoRA**: Y, P(X), dX, V through the fused kernels on each path, and dA, dB through the autograd
  function, against the paper's formula (tests/oracles.py), not against qlk.reference.

The oracles (tests/oracles.py) read the codes bit by bit from the documented layouts.

On a GPU (compiled kernels, ``COMPILED``) the rules choose among the full candidate lists, whose
tiles are 2-8x deeper than the interpreter's: at N = 72 split-N has one step, so no SM count makes
the rules split it. :func:`use_split` then moves those launches onto a split tile
(:func:`_forced_split`), which the same checks (NaN workspace, float64 oracle, launched_split)
cover; the tile-count assertions stay the interpreter's. Which jitted decoder ran cannot be spied
on there (tests/spies.py): those tests check the launch's flags instead and keep their values.
"""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oracles
import spies
import qlk
from qlk import reference
from qlk.autograd.qalora import qalora_linear
from qlk.kernels import dequantize_forward, qalora_forward, qalora_grad_input, quant_matmul_backward, quant_matmul_forward
from qlk.kernels import fused_matmul as fm
from qlk.kernels import heuristics

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
# compiled kernels (a GPU run): the full candidate lists, the asm flags on, no Python spies on jitted
# helpers (tests/spies.py); the interpreter (CI) has one candidate per kernel
COMPILED = spies.compiled()
N = 72  # 2 full N tiles of 32 and a ragged one of 8
TOL = 1e-5  # fp32 activations, exact fp32 products (ieee)
SIGMA = 1.5

# (bits, group_size, in_features): see the module docstring for what each one reaches
INT_CASES = [
    (4, 32, 512), (4, 128, 512), (3, 256, 512), (2, 64, 512), (4, 96, 576),
    (3, 48, 528), (3, 16, 784), (2, 8, 520),
]  # fmt: skip
# (blocksize, double_quant, in_features)
NF4_CASES = [(64, True, 576), (128, False, 512), (32, True, 480)]


def int_id(c):
    return f"int{c[0]}g{c[1]}k{c[2]}"


def nf4_id(c):
    return f"nf4b{c[0]}{'dq' if c[1] else ''}k{c[2]}"


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def real_paths(monkeypatch):
    """Few SMs for the split rule, NaN in every buffer a kernel must overwrite, the deterministic
    workspace too: one config launches (qlk.kernels.heuristics' choice, no autotuning), so every
    slice must be written (only QLK_ALL_CONFIGS, the static report's compile-only mode, launches
    several configs into one workspace)."""
    _SMS[0] = 132  # (use_split lowers it; the GEMM input gradient splits its N reduction below ~base-grid SMs)
    monkeypatch.setattr(fm, "num_sms", lambda device: _SMS[0])
    monkeypatch.setattr(fm, "CHOICE_LOG", [])  # what the rules launched (launched_split)
    _FORCE_SPLIT.clear()
    if COMPILED:  # use_split's split launches where the GPU's rules run one slice (_forced_split)
        monkeypatch.setattr(fm, "_tiles", _forcing_tiles(fm._tiles))

    def workspace(shape, device):
        if len(shape) == 3:
            return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        return torch.zeros(shape, dtype=torch.float32, device=device)  # the atomics' accumulator

    monkeypatch.setattr(fm, "_workspace", workspace)
    monkeypatch.setattr(fm, "_pool_buffer", lambda shape, device: torch.full(shape, float("nan"), device=device))
    monkeypatch.setattr(fm, "_v_buffer", lambda shape, device: torch.full(shape, float("nan"), device=device))


def nan(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def grouped_weight(n, k, g, seed):
    """W whose groups differ in magnitude (×0.1 .. ×10) and offset, rows too: reading the wrong
    group's scale or bias, or the wrong row's, changes the result by tens of percent."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // g
    mag = torch.exp(torch.randn(n, groups, 1, generator=gen) * 1.2)
    offset = torch.randn(n, groups, 1, generator=gen) * 2.0
    w = torch.randn(n, groups, g, generator=gen) * mag + offset
    return w.reshape(n, k)


_INT, _NF4 = {}, {}


def int_weight(bits, g, k):
    """(qw on DEVICE, float64 oracle Ŵ from the documented layout)."""
    key = (bits, g, k)
    if key not in _INT:
        qw = qlk.quantize(grouped_weight(N, k, g, seed=bits * 1000 + g + k), bits=bits, group_size=g)
        _INT[key] = (qw.to(DEVICE), oracles.int_dequant64(qw))
    return _INT[key]


def nf4_weight(block, dq, k):
    """(qw imported from bitsandbytes on DEVICE, float64 Ŵ by bitsandbytes' own dequantize_4bit);
    rows 2 decades apart so the nested (per 256 blocks) absmax scales all differ."""
    pytest.importorskip("bitsandbytes")
    key = (block, dq, k)
    if key not in _NF4:
        gen = torch.Generator().manual_seed(block + k)
        w = torch.randn(N, k, generator=gen) * torch.logspace(-1, 1, N)[torch.randperm(N, generator=gen)][:, None]
        qw, ref = oracles.bnb_weight(w, blocksize=block, double_quant=dq)
        _NF4[key] = (qw.to(DEVICE), ref)
    return _NF4[key]


_SMS = [132]  # what the patched num_sms answers
_FORCE_SPLIT = set()  # compiled runs: the split ops use_split moves onto a split launch (_forcing_tiles)


def use_split(kind, m, n, k, qw=None, pool=False):
    """Tell the split rule the smallest SM count at which ``kind`` ("splitk" / "splitn") still
    splits, and check (one config: the interpreter) that its slices then hold >= 2 tiles each.
    The rule as documented: split = min(tiles, ⌈16·SMs / base grid⌉). At 16 < M <= 128 the rules
    may run one slice instead (rounds 33-34: it stores its output itself, no workspace), so with
    the weight ``qw`` the SM count is the smallest at which the rules' own choice splits (for
    QA-LoRA's split-N with ``pool``, with and without its fp32 folded biases); the tests check the
    launch with :func:`launched_split`.

    Compiled (a GPU: every candidate of the target, target_arch() 90 / 80): the rules choose among
    the full lists, and at these shapes often never split: split-N's sm_90 tiles take 128-256 rows
    of N a step, so N = 72 is one step, and split-K at M = 17 on K = 512 keeps one slice at every SM
    count. With ``qw`` the SM count is still the smallest at which the rules' own choice splits,
    where one exists (at any M, the rules' own formula, not the interpreter's one-tile arithmetic);
    every ``kind`` launch the rules leave at one slice is then moved onto a split one
    (:func:`_forced_split`), so the split path (workspace or atomics, NaN-poisoned) still runs and
    :func:`launched_split` still sees >= 2 slices. Under the interpreter nothing is forced."""
    if kind == "gemm":
        return
    if COMPILED and kind in ("splitk", "splitn"):
        _FORCE_SPLIT.add(kind)
        if qw is None:  # 132 SMs (the H200's); _forced_split picks the split launch
            _SMS[0] = 132
            return
    if qw is not None and kind in ("splitk", "splitn") and (m > heuristics.SPLIT_ALWAYS_M or COMPILED):
        fmt = heuristics.format_class(qw.bits, qw.fmt == "nf4", qw.group_size)

        def choices(sms):
            return [heuristics.choose_config(kind, m, n, k, fmt, fm.target_arch(), sms, fp32_bias=f, pool=pool)
                    for f in ((False, True) if pool else (False,))]

        for sms in range(1, 257):
            picks = choices(sms)
            if all(c.split >= 2 and _slice_tiles(kind, n, k, c) >= 2 for c in picks):
                break
        else:
            if COMPILED:  # the GPU's 128-256-deep steps: the fewest SMs at which the rules split at all,
                # else none (the launch is forced at 132 SMs)
                sms = next((s for s in range(1, 257) if all(c.split >= 2 for c in choices(s))), None)
                if sms is None:
                    _SMS[0] = 132
                    return
                picks = choices(sms)
        _SMS[0] = sms
        assert all(c.split >= 2 for c in picks), (kind, m, n, k, fmt, picks)
        return
    if kind == "gemv":  # still autotuned (its own config list): one config under the interpreter, each one compiled
        configs = [c.kwargs for c in fm._quant_matmul_grad_input_gemv_kernel.configs]
    else:
        configs = [heuristics.candidates(kind)[0].kwargs]  # the one candidate under the interpreter
    for sms in range(1, 65):
        slices = []
        for c in configs:
            if kind == "splitk":
                tiles, base = math.ceil(k / c["BLOCK_K"]), math.ceil(n / c["BLOCK_N"]) * math.ceil(m / c["BLOCK_M"])
            elif kind == "gemv":  # M = 1, no M tiles
                tiles, base = math.ceil(n / c["BLOCK_N"]), math.ceil(k / c["BLOCK_K"])
            else:
                tiles, base = math.ceil(n / c["BLOCK_N"]), math.ceil(k / c["BLOCK_K"]) * math.ceil(m / c["BLOCK_M"])
            slices.append((tiles, max(1, min(tiles, math.ceil(16 * sms / base)))))
        if all(split >= 2 for _, split in slices):
            break
    _SMS[0] = sms
    if INTERPRETED:
        for tiles, split in slices:
            assert math.ceil(tiles / split) >= 2, (kind, m, n, k, sms, split, tiles)


def _forced_split(op, m, n, k, fmt, arch, sms, fp32_bias=False, pool=False, act_bytes=2):
    """A split launch of ``op`` ("splitk" / "splitn") where the rules chose one slice (compiled runs,
    :func:`use_split`): the best-scoring candidate (heuristics.score_all, the same QA-LoRA
    exclusions) whose split count is >= 2 at ``sms``, else the rules' own tile with its reduction
    cut into max(2, ⌈steps / 2⌉) slices (2+ steps a slice where there are 4+; split-N's one 128- or
    256-row step at N = 72 gets a second, empty slice, which the kernels' tl.cdiv slicing and
    LOOP_RUNS = False allow)."""
    scored = heuristics.score_all(op, m, n, k, fmt, arch, sms, fp32_bias=fp32_bias, pool=pool, act_bytes=act_bytes)
    split = [c for c in scored if c.split >= 2]
    if split:
        return max(split, key=lambda c: (c.score, -c.index))
    c = heuristics.choose_config(op, m, n, k, fmt, arch, sms, fp32_bias=fp32_bias, pool=pool, act_bytes=act_bytes)
    steps = math.ceil(k / c.block_k) if op == "splitk" else math.ceil(n / c.block_n)
    s = max(2, math.ceil(steps / 2))
    return dataclasses.replace(c, split=s, ctas=c.ctas // c.split * s)


def _forcing_tiles(real):
    """``fm._tiles`` for compiled runs: an op use_split named (_FORCE_SPLIT) that the rules launch
    with one slice launches :func:`_forced_split` instead, and fm.CHOICE_LOG records that launch."""
    def tiles(op, m, n, k, meta, device, fp32_bias=False, pool=False, act_bytes=2):
        chosen, launches = real(op, m, n, k, meta, device, fp32_bias, pool=pool, act_bytes=act_bytes)
        if op not in _FORCE_SPLIT or chosen.split >= 2:
            return chosen, launches
        fmt = heuristics.format_class(meta["BITS"], meta["IS_NF4"], meta.get("GROUP_SIZE"))
        forced = _forced_split(op, m, n, k, fmt, fm.target_arch(), fm.num_sms(device), fp32_bias, pool, act_bytes)
        log = fm.CHOICE_LOG
        if log and log[-1] == (op, chosen):
            log[-1] = (op, forced)
        return forced, launches[:-1] + [forced]

    return tiles


def _slice_tiles(kind, n, k, c):
    """Reduction steps one slice of the split launch ``c`` runs (the last slice may run fewer)."""
    steps = math.ceil(k / c.block_k) if kind == "splitk" else math.ceil(n / c.block_n)
    return math.ceil(steps / c.split)


def launched_split(kind):
    """The slice count of the last ``kind`` launch the rules chose in this test (fm.CHOICE_LOG)."""
    return [c for op, c in fm.CHOICE_LOG if op == kind][-1].split


def check_base(qw, w64, m, fwd_path, grad_path, deterministic):
    n, k = qw.shape
    x, dy = randn(m, k, seed=m + k), randn(m, n, seed=m + n + 1)
    bias = randn(n, seed=7)
    use_split(fwd_path, m, n, k, qw)
    y = quant_matmul_forward(x, qw, bias, out=nan(m, n), path=fwd_path, deterministic=deterministic)
    assert oracles.rel_err(y, x.cpu().double() @ w64.t() + bias.cpu().double()) < TOL
    use_split(grad_path, m, n, k, qw)
    dx = quant_matmul_backward(dy, qw, out=nan(m, k), path=grad_path, deterministic=deterministic)
    assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL
    for path in {fwd_path, grad_path} & {"splitk", "splitn"}:  # the workspace path, not one slice
        assert launched_split(path) >= 2, (path, m, n, k)


PATHS = [  # (M, forward path, input-gradient path, deterministic)
    pytest.param(40, "gemm", "gemm", False, id="gemm-M40"),
    pytest.param(5, "splitk", "splitn", False, id="split-atomic-M5"),
    pytest.param(17, "splitk", "splitn", True, id="split-det-M17"),
]


# --------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("case", INT_CASES, ids=int_id)
def test_int_oracle_agrees_with_qlk_dequantize(case):
    """The bit-level oracle and qlk's own unpacker agree (a format bug shows up here and in every
    kernel test below, whichever side it is on)."""
    qw, w64 = int_weight(*case)
    assert torch.equal(w64, qw.cpu().dequantize(torch.float64))


@pytest.mark.parametrize("case", NF4_CASES, ids=nf4_id)
def test_nf4_oracle_agrees_with_bitsandbytes(case):
    """The NF4 bit-level oracle on the imported bytes equals bitsandbytes' dequantize_4bit (fp32
    rounding apart), and qlk's dequantize equals it bit for bit."""
    qw, ref = nf4_weight(*case)
    assert oracles.rel_err(oracles.nf4_dequant64(qw), ref) < 1e-6  # bnb de-nests absmax in fp32
    assert torch.equal(qw.cpu().dequantize(torch.float32).double(), ref)
    if case[1]:
        assert qw.absmax.numel() > 256 and qw.absmax_scale.numel() >= 3
        assert qw.absmax_scale.unique().numel() == qw.absmax_scale.numel()


# --------------------------------------------------------------------------------- base kernels
@pytest.mark.parametrize("m,fwd_path,grad_path,det", PATHS)
@pytest.mark.parametrize("case", INT_CASES, ids=int_id)
def test_int_paths(case, m, fwd_path, grad_path, det):
    qw, w64 = int_weight(*case)
    check_base(qw, w64, m, fwd_path, grad_path, det)


@pytest.mark.parametrize("m,fwd_path,grad_path,det", PATHS)
@pytest.mark.parametrize("case", NF4_CASES, ids=nf4_id)
def test_nf4_paths(case, m, fwd_path, grad_path, det):
    qw, ref = nf4_weight(*case)
    check_base(qw, ref, m, fwd_path, grad_path, det)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,fwd_path,grad_path,det", PATHS)
@pytest.mark.parametrize("case", NF4_CASES, ids=nf4_id)
def test_nf4_half_numerics_exact(case, m, fwd_path, grad_path, det, dtype):
    """fp16/bf16 activations (round 21's half2 lookup, every fused NF4 tile): rows of the identity
    pick single weights, so Y = X·Ŵᵀ and dX = dY·Ŵ hold ŵ itself (one non-zero product, fp32
    accumulation and split partials exact): both equal ``oracles.nf4_dequant_act`` (NF4 and absmax
    rounded to the dtype, then the product) bit for bit, at columns / rows spread over every K / N
    tile, NaN-poisoned outputs, each path of the forward and input gradient. bf16 on a GPU only
    (the interpreter's bf16 ``tl.dot`` is not IEEE; the lookup's bf16 rounding is checked on CPU by
    tests/test_nf4_tile.py)."""
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("bf16 tl.dot under the Triton interpreter is not exact: bf16 runs in make gpu-check")
    qw, ref = nf4_weight(*case)
    n, k = qw.shape
    w_act = oracles.nf4_dequant_act(qw, dtype)
    assert (w_act - ref).abs().max() > 0  # the half numerics differ from bitsandbytes' one rounding here
    gen = torch.Generator().manual_seed(m + k)
    cols, rows = torch.randperm(k, generator=gen)[:m], torch.randperm(n, generator=gen)[:m]
    x = torch.zeros(m, k, dtype=dtype)
    x[torch.arange(m), cols] = 1.0
    dy = torch.zeros(m, n, dtype=dtype)
    dy[torch.arange(m), rows] = 1.0
    use_split(fwd_path, m, n, k, qw)
    y = quant_matmul_forward(x.to(DEVICE), qw, out=nan(m, n).to(dtype), path=fwd_path, deterministic=det)
    assert torch.equal(y.cpu().double(), w_act[:, cols].t())
    use_split(grad_path, m, n, k, qw)
    dx = quant_matmul_backward(dy.to(DEVICE), qw, out=nan(m, k).to(dtype), path=grad_path, deterministic=det)
    assert torch.equal(dx.cpu().double(), w_act[rows])
    for path in {fwd_path, grad_path} & {"splitk", "splitn"}:  # the workspace path, not one slice
        assert launched_split(path) >= 2, (path, m, n, k)


GRAD_LOOP_CASES = [  # every packed layout; g < tile, g > tile, ragged K with a half-used INT3 chunk / INT2 word
    ("int", 4, 32, 512), ("int", 4, 128, 512), ("int", 3, 256, 512), ("int", 3, 16, 784), ("int", 2, 64, 512),
    ("int", 2, 8, 520), ("nf4", 64, True, 576), ("nf4", 128, False, 512),
]  # fmt: skip


# every case through the sm_80 loop at M = 17 (the sm_90 loop: test_int_paths / test_nf4_paths, gemm-M40);
# four (INT4, INT3 ragged, INT2 ragged, NF4) through the sm_90 loop at M = 333 (the M tiles are outside
# the K loop, which is what differs; CI time)
GRAD_LOOP_RUNS = ([pytest.param(c, 17, False, id=f"{(int_id if c[0] == 'int' else nf4_id)(c[1:])}-M17-cpasync")
                   for c in GRAD_LOOP_CASES]
                  + [pytest.param(c, 333, True, id=f"{(int_id if c[0] == 'int' else nf4_id)(c[1:])}-M333-ahead")
                     for c in [GRAD_LOOP_CASES[i] for i in (0, 3, 5, 6)]])


@pytest.mark.parametrize("case,m,ahead", GRAD_LOOP_RUNS)
def test_grad_input_gemm_loops(case, m, ahead, monkeypatch):
    """The GEMM input gradient's two K loops (docs/kernels.md "Input gradient, round 4"): the words of
    the next N tile loaded ahead into registers (sm_90; the interpreter runs it with tl.load, the GPU
    by inline PTX) and the plain one (sm_80). 3 N tiles (the last one ragged: its next-tile load
    reads the clamped last row), 8..13 K tiles, M = 17 / 333 (one ragged M tile / six), NaN output."""
    qw, w64 = int_weight(*case[1:]) if case[0] == "int" else nf4_weight(*case[1:])
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: ahead)
    _SMS[0] = 1  # the unsplit kernel (every N tile in one program; the split: test_grad_input_gemm_split)
    n, k = qw.shape
    dy = randn(m, n, seed=m + n + 3)
    dx = quant_matmul_backward(dy, qw, out=nan(m, k), path="gemm")
    assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL


# ------------------------------------------------------ GEMM input gradient, split N (round 5)
SPLIT_N_ROWS = 264  # 9 N tiles of 32, the last ragged (8 rows): 3 slices of 3 tiles
_SPLIT_TILE = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=64, GROUP_M=2)  # 16-row M tiles: 2 at M = 17, 4 at M = 64


@pytest.fixture
def split_gemm_tile(monkeypatch):
    """The GEMM input gradient's one interpreter candidate with 16-row M tiles, and the SM count at
    which the rules (heuristics.grad_split) give 3 slices of 3 N tiles each: returns a function
    (M, K) -> the choice, asserting that."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, **_SPLIT_TILE)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [cfg] if op == "grad" else real(op))
    monkeypatch.setattr(heuristics, "GRAD_SPLIT_MIN_STEPS", 3)  # 9 N tiles: 3 slices (CI time)
    heuristics._choose_default.cache_clear()

    def choose(m, k, n=SPLIT_N_ROWS, per_slice=3):
        base = math.ceil(m / 16) * math.ceil(k / 64)
        for sms in range(base + 1, 4 * base):
            _SMS[0] = sms
            c = heuristics.choose_config("grad", m, n, k, "int4", fm.target_arch(), sms)
            if c.split == 3:
                break
        assert c.split == 3 and math.ceil(math.ceil(n / 32) / c.split) == per_slice, (m, k, c)
        return c

    yield choose
    heuristics._choose_default.cache_clear()


_SPLIT_W = {}


def split_weight(case, n=SPLIT_N_ROWS):
    """(qw with N = ``n`` rows, float64 Ŵ) for ("int", bits, g, K) / ("nf4", block, dq, K)."""
    if (case, n) not in _SPLIT_W:
        if case[0] == "int":
            _, bits, g, k = case
            qw = qlk.quantize(grouped_weight(n, k, g, seed=bits + g + k), bits=bits, group_size=g)
            _SPLIT_W[case, n] = (qw.to(DEVICE), oracles.int_dequant64(qw))
        else:
            pytest.importorskip("bitsandbytes")
            _, block, dq, k = case
            gen = torch.Generator().manual_seed(block + k)
            w = torch.randn(n, k, generator=gen) * torch.logspace(-1, 1, n)[:, None]
            qw, ref = oracles.bnb_weight(w, blocksize=block, double_quant=dq)
            _SPLIT_W[case, n] = (qw.to(DEVICE), ref)
    return _SPLIT_W[case, n]


GRAD_SPLIT_RUNS = [  # (weight, M, deterministic, words ahead): each format, both reductions, both loops
    pytest.param(("int", 4, 32, 256), 17, False, True, id="int4g32k256-M17-atomic-ahead"),
    pytest.param(("int", 3, 48, 336), 64, True, True, id="int3g48k336-M64-det-ahead"),  # K mod 32 = 16
    pytest.param(("int", 2, 8, 264), 64, False, False, id="int2g8k264-M64-atomic-cpasync"),  # K mod 16 = 8
    pytest.param(("nf4", 64, True, 320), 17, True, False, id="nf4b64dqk320-M17-det-cpasync"),  # 1320 blocks
]


@pytest.mark.parametrize("case,m,det,ahead", GRAD_SPLIT_RUNS)
def test_grad_input_gemm_split(case, m, det, ahead, split_gemm_tile, monkeypatch):
    """The GEMM input gradient with its N reduction split over the grid (mid M, docs/kernels.md
    "Input gradient, split N at mid M (round 5)"): 3 slices of 3 N tiles (the last tile ragged),
    2 or 4 M tiles, 4..6 K tiles (ragged K), fp32 atomics or the NaN-poisoned [SPLIT, M, K]
    workspace, NaN-poisoned dX, against float64."""
    qw, w64 = split_weight(case)
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: ahead)
    n, k = qw.shape
    chosen = split_gemm_tile(m, k)
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    dy = randn(m, n, seed=m + k + 11)
    dx = quant_matmul_backward(dy, qw, out=nan(m, k), path="gemm", deterministic=det)
    assert [(op, c.split) for op, c in log] == [("grad", chosen.split)]
    assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL


def test_grad_input_gemm_split_uneven_slices(split_gemm_tile, monkeypatch):
    """Split N where the slices cannot be equal: N = 296 is 10 N tiles (the last ragged, 8 rows),
    3 slices of ⌈10/3⌉ = 4, 4 and 2 tiles, so a slice length rounded down (3) would drop the last
    tile and one rounded up wrongly would overlap; INT2 g16 (2 groups per K tile), words ahead,
    the NaN-poisoned [SPLIT, M, K] workspace, NaN-poisoned dX, against float64."""
    qw, w64 = split_weight(("int", 2, 16, 192), n=296)
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: True)
    n, k = qw.shape
    m = 17
    chosen = split_gemm_tile(m, k, n=n, per_slice=4)
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    dy = randn(m, n, seed=29)
    dx = quant_matmul_backward(dy, qw, out=nan(m, k), path="gemm", deterministic=True)
    assert [(op, c.split) for op, c in log] == [("grad", chosen.split)]
    assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL


def test_grad_input_gemm_wave_split(monkeypatch):
    """Round 6's wave split: the dX tiles fill the SMs (2 M tiles x 5 K tiles = 10 CTAs on 6
    SMs, a short second wave), the rules split N in 3 (30 CTAs, 5 waves of 6), the workspace's
    passes not charged so the split is taken at this tiny shape; fp32 atomics into the workspace,
    NaN-poisoned dX, against float64 (INT3 g48, ragged K and N)."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, **_SPLIT_TILE)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [cfg] if op == "grad" else real(op))
    monkeypatch.setattr(heuristics, "GRAD_SPLIT_MIN_STEPS", 3)
    monkeypatch.setattr(heuristics, "GRAD_WORKSPACE_PASS_BYTES", 0)
    heuristics._choose_default.cache_clear()
    qw, w64 = split_weight(("int", 3, 48, 288))
    n, k = qw.shape
    m, _SMS[0] = 17, 6
    try:
        c = heuristics.choose_config("grad", m, n, k, "int3", fm.target_arch(), 6)
        assert c.ctas // c.split == 10 and c.split == 3, c  # base 10 >= 6 SMs: the wave split
        log = []
        monkeypatch.setattr(fm, "CHOICE_LOG", log)
        dy = randn(m, n, seed=23)
        dx = quant_matmul_backward(dy, qw, out=nan(m, k), path="gemm")
        assert [(op, c.split) for op, c in log] == [("grad", 3)]
        assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL
    finally:
        heuristics._choose_default.cache_clear()


def test_grad_input_gemm_split_qalora(split_gemm_tile, monkeypatch):
    """QA-LoRA's input gradient through the split launch: dX (folded biases) split over N, V = dY·B
    from the unsplit V programs (slice 0's), both NaN-poisoned, against the paper's formula."""
    qw, w64 = split_weight(("int", 4, 32, 256))
    n, k = qw.shape
    m = 17
    a = randn(RANK, k // 32, seed=5).cpu() * 16
    b = randn(n, RANK, seed=6).cpu()
    dy = randn(m, n, seed=7)
    assert split_gemm_tile(m, k).split == 3
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    dx, v = qalora_grad_input(dy, qw, a.to(DEVICE), b.to(DEVICE), SIGMA, out=nan(m, k), path="gemm")
    assert [(op, c.split) for op, c in log] == [("grad", 3)]
    dx_ref, _, _ = oracles.qalora_backward64(torch.zeros(m, k, dtype=torch.float64), dy.cpu().double(), w64, a, b,
                                             SIGMA, 32)
    assert oracles.rel_err(dy.cpu().double() @ w64, dx_ref) > 0.05, "the adapter term of dX is too small to test"
    assert oracles.rel_err(dx, dx_ref) < TOL
    assert oracles.rel_err(v, dy.cpu().double() @ b.double()) < 1e-6


def test_qalora_splitn_launch_asks_for_the_qalora_tiles(monkeypatch):
    """Round 15: QA-LoRA's split-N launch asks the rules for QA-LoRA's tiles (``pool``: its fused
    V = dY·B programs), so a tile that spills only with them is not proposed there
    (heuristics.SPLITN_SPILLS_WITH_V_RAGGED_K); the plain input gradient asks for the plain ones.
    Both still match the float64 oracle at a K whose last tile is cut."""
    calls, real = [], fm._tiles

    def spy(op, *args, **kwargs):
        calls.append((op, kwargs.get("pool", False)))
        return real(op, *args, **kwargs)

    monkeypatch.setattr(fm, "_tiles", spy)
    qw, w64 = split_weight(("int", 2, 32, 160))  # K = 160: the last 128-row output tile holds 32
    n, k = qw.shape
    m = 3
    a = randn(RANK, k // 32, seed=15).cpu() * 16
    b = randn(n, RANK, seed=16).cpu()
    dy = randn(m, n, seed=17)
    dx, v = qalora_grad_input(dy, qw, a.to(DEVICE), b.to(DEVICE), SIGMA, out=nan(m, k), path="splitn")
    plain = quant_matmul_backward(dy, qw, out=nan(m, k), path="splitn")
    assert calls == [("splitn", True), ("splitn", False)]
    dx_ref, _, _ = oracles.qalora_backward64(torch.zeros(m, k, dtype=torch.float64), dy.cpu().double(), w64, a, b,
                                             SIGMA, 32)
    assert oracles.rel_err(dx, dx_ref) < TOL
    assert oracles.rel_err(v, dy.cpu().double() @ b.double()) < 1e-6
    assert oracles.rel_err(plain, dy.cpu().double() @ w64) < TOL


def test_grad_split_rule():
    """heuristics.grad_split: no split once the dX tiles fill the SMs (M = 4096), a filled grid at
    M = 64 on K = 2048 (16 dX tiles on 132 SMs), >= GRAD_SPLIT_MIN_STEPS N tiles per slice, none empty."""
    assert heuristics.grad_split(14336, 64, 16 * 32, 132) == 1
    assert heuristics.grad_split(4096, 64, 132, 132) == 1
    assert heuristics.grad_split(2048, 64, 16, 132) == 8  # 8 slices of 4 tiles: 128 CTAs
    s = heuristics.grad_split(8192, 64, 16, 132)
    assert 16 * s <= 2 * 132 and heuristics.sm_balance(16 * s, 132) > 0.9
    assert heuristics.grad_split(512, 64, 16, 132) == 2  # 8 N tiles: 2 slices of 4
    assert heuristics.grad_split(448, 64, 16, 132) == 1  # 7 N tiles: no slice of 4 beside another
    for n in (512, 2048, 8192, 72, 1000, 3000):
        s = heuristics.grad_split(n, 64, 16, 132)
        steps = math.ceil(n / 64)
        assert (s - 1) * math.ceil(steps / s) < steps  # the last slice holds a tile
        assert s == 1 or math.ceil(steps / s) >= heuristics.GRAD_SPLIT_MIN_STEPS


# ------------------------------------------------------------- forward GEMM, split K (round 6)
_FWD_SPLIT_TILE = dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, GROUP_M=2)  # 3 N tiles at N = 72; 16-row M tiles


@pytest.fixture
def split_fwd_tile(monkeypatch):
    """The forward GEMM's one interpreter candidate with 16-row M tiles and 32-column K tiles, the
    rule (heuristics.fwd_split) allowed at every M and at 2 K tiles per slice (CI time), and the SM
    count at which it gives 3 slices: returns a function (M, K, group size) -> the choice, asserting
    3 slices of >= 4 K tiles and >= 2 whole groups each (heuristics.fwd_slices)."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, **_FWD_SPLIT_TILE)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [cfg] if op == "fwd" else real(op))
    monkeypatch.setattr(heuristics, "FWD_SPLIT_MIN_STEPS", 2)
    monkeypatch.setattr(heuristics, "SPLIT_MAX_M", 0)  # the rule splits only above the split kernels' range
    heuristics._choose_default.cache_clear()

    def choose(m, k, g, pool=False):
        base = math.ceil(m / 16) * math.ceil(N / 32)
        for sms in range(base + 1, 4 * base):
            _SMS[0] = sms
            c = heuristics.choose_config("fwd", m, N, k, "int4" + f"g{g}", fm.target_arch(), sms, pool=pool)
            if c.split == 3:
                break
        slice_k, slices = heuristics.fwd_slices(k, 32, g, c.split)
        assert c.split == 3 and slices == 3 and slice_k % g == 0 and slice_k // 32 >= 4 and slice_k // g >= 2, \
            (m, k, g, c, slice_k)
        return c

    yield choose
    heuristics._choose_default.cache_clear()


# (weight, M, deterministic, atomics): each format, both reductions, M = 1 / 17 / 64 (1, 2, 4 M tiles)
FWD_SPLIT_RUNS = [
    pytest.param(("int", 4, 32, 384), 17, False, True, id="int4g32k384-M17-atomic"),  # 3 slices of 4 groups
    # slices of 192 columns = 4 groups; K mod 32 = 16: the last slice ends in a ragged K tile
    pytest.param(("int", 3, 48, 528), 64, True, True, id="int3g48k528-M64-det"),
    # sm_80: no atomics (_fwd_split_atomic), the fixed-order sum also without deterministic=True
    pytest.param(("int", 2, 128, 768), 1, False, False, id="int2g128k768-M1-fixed"),  # groups over 4 K tiles
    pytest.param(("nf4", 64, True, 384), 17, False, True, id="nf4b64dqk384-M17-atomic"),  # 432 blocks: nested absmax
]


@pytest.mark.parametrize("case,m,det,atomic", FWD_SPLIT_RUNS)
def test_forward_gemm_split(case, m, det, atomic, split_fwd_tile, monkeypatch):
    """The forward GEMM with its K loop split over the grid (mid M, docs/kernels.md "Forward, split K
    at mid M (round 6)"): 3 slices of whole groups and >= 4 K tiles (the last slice ragged where K
    is), 3 N tiles (the last ragged), fp32 atomics (sm_90) or the NaN-poisoned
    [SPLIT, M, N] workspace (deterministic, and sm_80 always),
    the bias added once, NaN-poisoned Y, against float64."""
    qw, w64 = int_weight(*case[1:]) if case[0] == "int" else nf4_weight(*case[1:])
    monkeypatch.setattr(fm, "_fwd_split_atomic", lambda: atomic)
    n, k = qw.shape
    chosen = split_fwd_tile(m, k, qw.group_size)
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    x, bias = randn(m, k, seed=m + k + 5), randn(n, seed=k)
    y = quant_matmul_forward(x, qw, bias, out=nan(m, n), path="gemm", deterministic=det)
    assert [(op, c.split) for op, c in log] == [("fwd", chosen.split)]
    assert oracles.rel_err(y, x.cpu().double() @ w64.t() + bias.cpu().double()) < TOL


@pytest.mark.parametrize("case,m,det", [
    pytest.param((4, 128, 768), 17, True, id="int4g128k768-M17-det"),  # pooled groups over 4 K tiles
    pytest.param((2, 16, 384), 64, False, id="int2g16k384-M64-atomic"),  # 2 groups per K tile
])
def test_qalora_forward_gemm_split(case, m, det, split_fwd_tile, monkeypatch):
    """QA-LoRA's forward through the split launch: Y (folded biases, split over K, the bias once)
    and P(X) (each slice's first-N-tile programs pool their own groups), both NaN-poisoned,
    against the paper's formula."""
    qw, w64 = int_weight(*case)
    monkeypatch.setattr(fm, "_fwd_split_atomic", lambda: True)
    n, k = qw.shape
    g = qw.group_size
    a, b = adapter(qw, w64, seed=k + g + 1)
    x, bias = randn(m, k, seed=m + 13), randn(n, seed=15)
    chosen = split_fwd_tile(m, k, g, pool=True)
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    y_ref, p_ref = oracles.qalora_forward64(x.cpu(), w64, a.cpu(), b.cpu(), SIGMA, g, bias.cpu())
    assert oracles.rel_err(x.cpu().double() @ w64.t(), y_ref) > 0.3, "the adapter term is too small to test"
    y, p = qalora_forward(x, qw, a, b, SIGMA, bias, out=nan(m, n), path="gemm", deterministic=det)
    assert [(op, c.split) for op, c in log] == [("fwd", chosen.split)]
    assert oracles.rel_err(p, p_ref) < 1e-6
    assert oracles.rel_err(y, y_ref) < TOL


def test_fwd_split_rule(monkeypatch):
    """heuristics.fwd_split / fwd_slices: split where the output tiles leave SMs idle (sm_80's
    128x128 tile at M = 333 on N = 2048: 48 CTAs on 108 SMs) or fill the last wave badly (192 CTAs
    on 132 SMs), never for a grid of >= 2.9 waves or many waves, >= FWD_SPLIT_MIN_STEPS K tiles and
    whole groups per slice, no empty slice; the rules keep M = 4096 and M <= SPLIT_MAX_M unsplit."""
    assert heuristics.fwd_split(2048, 32, 32, 48, 108) == 2  # 96 CTAs
    assert heuristics.fwd_split(2048, 64, 32, 192, 132) == 2  # 1.45 waves -> 2.9
    assert heuristics.fwd_split(2048, 64, 32, 32, 132) == 4  # 2048->512 at M = 2048 on 256x128 tiles
    assert heuristics.fwd_split(8192, 64, 32, 384, 132) == 1  # 2.9 waves: 0.97 balanced already
    assert heuristics.fwd_split(8192, 64, 128, 672, 132) == 1  # 5.1 waves: more would exceed the wave cap
    assert heuristics.fwd_split(960, 64, 32, 8, 132) == 1  # 15 K tiles: no two slices of 8
    for k, bk, g in ((2048, 32, 32), (4096, 64, 128), (3000, 64, 96), (1000, 32, 8), (28672, 64, 128)):
        for base in (8, 48, 100, 200):
            s = heuristics.fwd_split(k, bk, g, base, 132)
            slice_k, slices = heuristics.fwd_slices(k, bk, g, s)
            assert slices == s and (s - 1) * slice_k < k <= s * slice_k  # no empty slice
            assert slice_k % bk == 0 and slice_k % g == 0
            assert s == 1 or slice_k // bk >= heuristics.FWD_SPLIT_MIN_STEPS
            assert s == 1 or base * s <= heuristics.FWD_SPLIT_MAX_WAVES * 132
    from qlk.kernels import config

    with monkeypatch.context() as mp:
        mp.setattr(config, "INTERPRETED", False)
        real = config.gemm_configs()  # the GPU's candidate list

    def choose(m, n, k, arch):
        return heuristics.choose_config("fwd", m, n, k, "int4g32", arch, configs=real)

    assert choose(4096, 14336, 4096, 90).split == 1 and choose(4096, 14336, 4096, 80).split == 1
    assert choose(64, 2048, 2048, 90).split == 1  # M <= SPLIT_MAX_M: the split-K kernel's range
    # 8192->2048: round 9's two-warp 64x128 tile fills 108 SMs unsplit (96 CTAs); 4096->1024 on it: 48 -> 96
    assert choose(333, 2048, 8192, 80).split == 1 and choose(333, 1024, 4096, 80).split == 2
    # sm_90 at 2048->512, M = 2048: 256x128 split 4 fills the SMs, but its workspace passes cost
    # about 0.7x its GEMM time (heuristics.fwd_split_share): a 128x64 tile, unsplit
    assert choose(2048, 512, 2048, 90).split == 1


GEMV_CASES = [  # (format, weight case, deterministic): each format and reduction once, to keep the time down
    (("int", 4, 32, 512), False), (("int", 2, 8, 520), True), (("nf4", 64, True, 576), False),
    (("nf4", 128, False, 512), True),
]


@pytest.mark.parametrize("case,det", GEMV_CASES,
                         ids=[(int_id if c[0] == "int" else nf4_id)(c[1:]) + ("-det" if d else "-atomic")
                              for c, d in GEMV_CASES])  # fmt: skip
def test_gemv_grad_input(case, det, monkeypatch):
    """The M = 1 FMA input-gradient kernel: slices of 2+ N tiles (ragged last tile), atomic and
    deterministic (NaN workspace); "auto" runs what heuristics.choose_m1_grad says (round 3: the MMA
    split-N kernel for every format, NF4 included: the analyzer estimates it faster at every shape)."""
    qw, w64 = int_weight(*case[1:]) if case[0] == "int" else nf4_weight(*case[1:])
    n, k = qw.shape
    dy = randn(1, n, seed=k + 11)
    use_split("gemv", 1, n, k)
    dx = quant_matmul_backward(dy, qw, out=nan(1, k), path="gemv", deterministic=det)
    assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL
    calls = []
    real = fm._gemv_grad_input
    monkeypatch.setattr(fm, "_gemv_grad_input", lambda *a: calls.append(1) or real(*a))
    dx = quant_matmul_backward(dy, qw, out=nan(1, k), deterministic=det)
    fmt = "nf4" if case[0] == "nf4" else f"int{qw.bits}"
    want = heuristics.choose_m1_grad(n, k, heuristics.format_class(4 if fmt == "nf4" else qw.bits, fmt == "nf4",
                                                                   qw.group_size), fm.target_arch(), fm.num_sms(qw.qweight.device))
    assert calls == ([1] if want == "gemv" else [])
    assert oracles.rel_err(dx, dy.cpu().double() @ w64) < TOL


@pytest.mark.parametrize("case", INT_CASES, ids=int_id)
def test_int_dequant(case):
    qw, w64 = int_weight(*case)
    out = dequantize_forward(qw, torch.float32, out=nan(*qw.shape))
    assert oracles.rel_err(out, w64) < 1e-6


@pytest.mark.parametrize("case", NF4_CASES, ids=nf4_id)
def test_nf4_dequant(case):
    qw, ref = nf4_weight(*case)
    out = dequantize_forward(qw, torch.float32, out=nan(*qw.shape))
    assert torch.equal(out.cpu().double(), ref)


# --------------------------------------------------------------------------------- QA-LoRA
RANK = 4


def adapter(qw, w64, seed):
    """A, B with the adapter term as large as the base term on a probe X (so a dropped, mis-scaled
    or misplaced adapter is a large error)."""
    n, k = qw.shape
    g = qw.group_size
    a = randn(RANK, k // g, seed=seed).cpu()
    b = randn(n, RANK, seed=seed + 1).cpu()
    probe = torch.randn(8, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y, _ = oracles.qalora_forward64(probe, torch.zeros_like(w64), a, b, SIGMA, g)
    b = b * float((probe @ w64.t()).norm() / y.norm())
    return a.to(DEVICE), b.to(DEVICE)


QALORA_CASES = [(4, 32, 512), (4, 128, 512), (3, 256, 512), (3, 48, 528), (2, 8, 520)]


@pytest.mark.parametrize("m,fwd_path,grad_path,det", PATHS)
@pytest.mark.parametrize("case", QALORA_CASES, ids=int_id)
def test_qalora_paths(case, m, fwd_path, grad_path, det):
    """Y, P(X), dX and V of the fused QA-LoRA kernels against the paper's formula."""
    qw, w64 = int_weight(*case)
    n, k = qw.shape
    g = qw.group_size
    a, b = adapter(qw, w64, seed=k + g)
    x, dy = randn(m, k, seed=m + 3), randn(m, n, seed=m + 4)
    bias = randn(n, seed=9)
    y_ref, p_ref = oracles.qalora_forward64(x.cpu(), w64, a.cpu(), b.cpu(), SIGMA, g, bias.cpu())
    assert oracles.rel_err(x.cpu().double() @ w64.t(), y_ref) > 0.3, "the adapter term is too small to test"
    use_split(fwd_path, m, n, k, qw)
    y, p = qalora_forward(x, qw, a, b, SIGMA, bias, out=nan(m, n), path=fwd_path, deterministic=det)
    assert oracles.rel_err(p, p_ref) < 1e-6
    assert oracles.rel_err(y, y_ref) < TOL
    dx_ref, _, _ = oracles.qalora_backward64(x.cpu(), dy.cpu(), w64, a.cpu(), b.cpu(), SIGMA, g)
    assert oracles.rel_err(dy.cpu().double() @ w64, dx_ref) > 0.05, "the adapter term of dX is too small to test"
    use_split(grad_path, m, n, k, qw, pool=True)
    dx, v = qalora_grad_input(dy, qw, a, b, SIGMA, out=nan(m, k), path=grad_path, deterministic=det)
    assert oracles.rel_err(dx, dx_ref) < TOL
    assert oracles.rel_err(v, dy.cpu().double() @ b.cpu().double()) < 1e-6
    for path in {fwd_path, grad_path} & {"splitk", "splitn"}:  # the workspace path, not one slice
        assert launched_split(path) >= 2, (path, m, n, k)


@pytest.mark.parametrize("case", [(4, 16, 512), (2, 8, 520)], ids=int_id)
def test_qalora_splitk_fp16_pools_stored_order(case):
    """fp16 activations at small M: the split-K decode loop reads X in the lane-owned k order
    (decode_tile._lane_x_tile: INT4 permutes 32-column spans, INT2 64-column ones) and must pool
    P(X) from X in the stored order. Groups narrower than that span (g16 INT4, g8 INT2, ragged K =
    520), several tiles a slice, P(X) and Y NaN-poisoned, against the paper's formula (Y: Ŵ and the
    folded biases rounded to fp16, fp16 output)."""
    qw, w64 = int_weight(*case)
    n, k = qw.shape
    g = qw.group_size
    a, b = adapter(qw, w64, seed=k + g + 3)
    m = 5
    x = randn(m, k, seed=k + 31).half()
    y_ref, p_ref = oracles.qalora_forward64(x.cpu(), w64, a.cpu(), b.cpu(), SIGMA, g)
    use_split("splitk", m, n, k)
    y, p = qalora_forward(x, qw, a, b, SIGMA, None, out=nan(m, n).half(), path="splitk")
    assert oracles.rel_err(p, p_ref) < 1e-6
    assert oracles.rel_err(y, y_ref) < 2e-3


class _MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every aten.mm / addmm / bmm dispatched inside the block."""

    def __enter__(self):
        self.shapes = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            operands = args[-2:]
            self.shapes.append(tuple(tuple(t.shape[-2:]) for t in operands))
        return func(*args, **(kwargs or {}))


V_GEMM_CASES = [  # (M, rank, dtype): 1 ragged M tile / 6 M tiles (BLOCK_M = 64), r padded to 16 or exactly 16
    pytest.param(17, 5, torch.float32, id="M17-r5-fp32"),
    pytest.param(333, 16, torch.float16, id="M333-r16-fp16"),
    pytest.param(333, 5, torch.float32, id="M333-r5-fp32"),
]


@pytest.mark.parametrize("m,rank,dtype", V_GEMM_CASES)
def test_qalora_grad_v_gemm(m, rank, dtype):
    """V = dY·B from the large-M input-gradient launch (one extra program per M tile, N = 72 in 3
    BLOCK_N steps, the last ragged) and dX from the same launch, both outputs NaN-poisoned,
    against float64: V = dY·B with B rounded to dY's dtype (fp32 sums), dX the paper's formula."""
    qw, w64 = int_weight(4, 32, 256)
    n, k = qw.shape
    a = randn(rank, k // 32, seed=rank).cpu() * 16  # the adapter term of dX about as large as dY·Ŵ
    b = randn(n, rank, seed=rank + 1).cpu()
    dy = randn(m, n, seed=m + rank).to(dtype)
    _SMS[0] = 1  # the unsplit launch (split: test_grad_input_gemm_split_qalora)
    v_out = []
    real = fm._v_buffer
    with pytest.MonkeyPatch.context() as mp:  # keep the V buffer the launch writes (NaN-poisoned)
        mp.setattr(fm, "_v_buffer", lambda shape, device: v_out.append(real(shape, device)) or v_out[-1])
        dx, v = qalora_grad_input(dy, qw, a.to(DEVICE), b.to(DEVICE), SIGMA, out=nan(m, k).to(dtype), path="gemm")
    assert v.dtype == torch.float32 and v.shape == (m, rank) and v.data_ptr() == v_out[0].data_ptr()
    v_ref = dy.cpu().double() @ b.to(dtype).double()
    assert oracles.rel_err(v, v_ref) < 1e-6
    dx_ref, _, _ = oracles.qalora_backward64(torch.zeros(m, k, dtype=torch.float64), dy.cpu().double(), w64, a, b,
                                             SIGMA, 32)
    assert oracles.rel_err(dy.cpu().double() @ w64, dx_ref) > 0.05, "the adapter term of dX is too small to test"
    assert dx.dtype == dtype and oracles.rel_err(dx, dx_ref) < (1e-3 if dtype == torch.float16 else TOL)


@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("case", [(4, 32, 512), (3, 256, 512), (2, 8, 520)], ids=int_id)
def test_qalora_autograd_grads(monkeypatch, case, m):
    """dX, dA, dB of the autograd function on the Triton backend (fused kernels; M = 5 split, 40 GEMM).
    On a GPU, path "auto" at M = 40 would dequantize (round 35, FUSED_GEMM_AUTO) and compute V = dY·B
    beside it: the fused GEMM is turned back on to test it."""
    monkeypatch.setattr(fm, "FUSED_GEMM_AUTO", True)
    qw, w64 = int_weight(*case)
    n, k = qw.shape
    g = qw.group_size
    a0, b0 = adapter(qw, w64, seed=k + 2 * g)
    use_split("splitk" if m <= fm.SPLITK_MAX_M else "gemm", m, n, k)
    x = randn(m, k, seed=m + 5).requires_grad_(True)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    dy = randn(m, n, seed=m + 6)
    with qlk.use_backend("triton"):
        y = qalora_linear(x, qw, a, b, SIGMA)
        with _MatmulShapes() as mms:
            y.backward(dy)
    # V = dY·B comes out of the input-gradient launch: no [M, N]·[N, r] matmul beside it
    assert ((m, n), (n, RANK)) not in mms.shapes, mms.shapes
    assert ((RANK, m), (m, k // g)) in mms.shapes  # dA = σ·Vᵀ·P (the recorder sees the autograd's matmuls)
    y_ref, _ = oracles.qalora_forward64(x.detach().cpu(), w64, a0.cpu(), b0.cpu(), SIGMA, g)
    dx_ref, da_ref, db_ref = oracles.qalora_backward64(x.detach().cpu(), dy.cpu(), w64, a0.cpu(), b0.cpu(), SIGMA, g)
    assert oracles.rel_err(y, y_ref) < TOL
    assert oracles.rel_err(x.grad, dx_ref) < TOL
    assert oracles.rel_err(a.grad, da_ref) < TOL
    assert oracles.rel_err(b.grad, db_ref) < TOL


@pytest.mark.parametrize("case", [(4, 128, 512), (2, 8, 520)], ids=int_id)
def test_qalora_merge_equals_adapter(case):
    """Merging the adapter into the INT biases (fp32 scales/biases: no fp16 rounding of the merge)
    gives the unmerged layer's output: the merged model is Ŵ' = s·(q − m) + c', c' = c + (σ/g)·B·A."""
    bits, g, k = case
    qw = qlk.quantize(grouped_weight(N, k, g, seed=11), bits=bits, group_size=g, scale_dtype=torch.float32)
    a, b = adapter(qw, oracles.int_dequant64(qw), seed=12)
    a, b = a.cpu(), b.cpu()
    merged = reference.qalora_merge(qw, a, b, SIGMA)
    assert torch.equal(merged.qweight, qw.qweight) and torch.equal(merged.scales, qw.scales)
    x = randn(9, k, seed=13).cpu()
    y_ref, _ = oracles.qalora_forward64(x, oracles.int_dequant64(qw), a, b, SIGMA, g)
    assert oracles.rel_err(x.double() @ oracles.int_dequant64(merged).t(), y_ref) < 1e-6


@pytest.mark.parametrize("case", [(4, 128, 512), (3, 48, 528)], ids=int_id)
def test_reference_qalora_against_the_paper(case):
    """qlk.reference (the CPU fallback and the other tests' oracle) against the paper's formula,
    and the autograd function on the reference backend (the unfused path) for dX, dA, dB."""
    qw, w64 = int_weight(*case)
    qw = qw.cpu()
    n, k = qw.shape
    g = qw.group_size
    a, b = (t.cpu().double() for t in adapter(qw, w64, seed=21))
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    dy = torch.randn(7, n, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    y_ref, p_ref = oracles.qalora_forward64(x, w64, a, b, SIGMA, g)
    dx_ref, da_ref, db_ref = oracles.qalora_backward64(x, dy, w64, a, b, SIGMA, g)
    assert oracles.rel_err(reference.qalora_forward(x, qw, a, b, SIGMA), y_ref) < 1e-12
    assert oracles.rel_err(reference.pool_groups(x, g), p_ref) < 1e-12
    dx, da, db = reference.qalora_backward(dy, p_ref, qw, a, b, SIGMA)
    assert oracles.rel_err(dx, dx_ref) < 1e-12 and oracles.rel_err(da, da_ref) < 1e-12
    assert oracles.rel_err(db, db_ref) < 1e-12
    xf, af, bf = (t.float().requires_grad_(True) for t in (x, a, b))
    with qlk.use_backend("reference"):
        y = qalora_linear(xf, qw, af, bf, SIGMA)
        y.backward(dy.float())
    assert oracles.rel_err(y, y_ref) < TOL and oracles.rel_err(xf.grad, dx_ref) < TOL
    assert oracles.rel_err(af.grad, da_ref) < TOL and oracles.rel_err(bf.grad, db_ref) < TOL


# ------------------------------------------------ GEMM input gradient, the round-8 tiles
# config.grad_configs' round-8 candidates (docs/kernels.md "Round 8"): their block sizes under the
# interpreter (one candidate there), each with several tiles along every axis of the launch
ROUND8_TILES = [  # (tile, arch, weight with N = SPLIT_N_ROWS rows, M, split)
    pytest.param(dict(BLOCK_N=32, BLOCK_M=128, BLOCK_K=128), 80, ("nf4", 64, True, 256), 130, 1,
                 id="nf4b64dq-128x32x128-sm80"),  # 2 M tiles, 2 K tiles, 9 N steps
    pytest.param(dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=128), 80, ("int", 3, 128, 384), 70, 1,
                 id="int3g128-64x64x128-sm80"),  # 2 M tiles, 3 K tiles, 5 N steps (the last 8 rows)
    pytest.param(dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64), 90, ("nf4", 64, True, 192), 130, 1,
                 id="nf4b64dq-128x128x64-sm90"),  # 2 M tiles, 3 K tiles, 3 N steps (the last 8 rows)
    pytest.param(dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64), 90, ("int", 2, 32, 320), 130, 1,
                 id="int2g32-128x128x64-sm90"),  # INT since the merge: 2 M tiles, 5 K tiles (groups
                                                  # of 2 per tile), 3 N steps (the last 8 rows)
    pytest.param(dict(BLOCK_N=32, BLOCK_M=64, BLOCK_K=64), 90, ("int", 4, 128, 256), 64, 2,
                 id="int4g128-64x32x64-sm90-split"),  # groups of 2 K tiles, 9 N steps in 2 slices
    # round 16: sm_90's 64-column dXᵀ tile (heuristics.CANDIDATE_M_RANGE), the sm_90 decoder
    pytest.param(dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=128), 90, ("int", 4, 32, 384), 133, 1,
                 id="int4g32-64x64x128-sm90"),  # 3 M tiles (the last 5 rows), 3 K tiles of 4 groups, 5 N steps
    pytest.param(dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=128), 90, ("int", 3, 256, 512), 70, 2,
                 id="int3g256-64x64x128-sm90-split"),  # a group over 2 K tiles, 9 N steps in 2 slices
    pytest.param(dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=128), 90, ("nf4", 64, True, 256), 130, 1,
                 id="nf4b64dq-64x64x128-sm90"),
]


def _spy_launches(monkeypatch, name):
    """A list that fills with (grid, keyword arguments) of every launch of ``fused_matmul.<name>``,
    which still runs."""
    seen, kernel = [], getattr(fm, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, kwargs))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fm, name, Spy())
    return seen


def _only_grad_tile(monkeypatch, op, cfg, case, m, split):
    """(qw, float64 Ŵ) of ``case``, with ``cfg`` the rules' only candidate for ``op`` ("grad" /
    "splitn") and the SM count set so that they launch ``split`` slices at M = ``m``. The GEMM's N:
    SPLIT_N_ROWS, or enough ``BLOCK_N`` steps for ``split`` slices of GRAD_SPLIT_MIN_STEPS (the
    last step 8 rows) where its steps are taller."""
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda o: [cfg] if o == op else real(o))
    monkeypatch.setattr(heuristics, "GRAD_WORKSPACE_PASS_BYTES", 0)  # the split taken at this tiny shape
    heuristics._choose_default.cache_clear()
    rows = SPLIT_N_ROWS
    if op == "grad" and split > 1:
        rows = max(rows, cfg.kwargs["BLOCK_N"] * heuristics.GRAD_SPLIT_MIN_STEPS * split + 8)
    qw, w64 = split_weight(case, rows)
    n, k = qw.shape
    fmt = "nf4" if case[0] == "nf4" else f"int{case[1]}g{case[2]}"
    for sms in range(1, 128):  # an SM count at which the rules launch ``split`` slices
        _SMS[0] = sms
        if heuristics.choose_config(op, m, n, k, fmt, fm.target_arch(), sms).split == split:
            break
    return qw, w64


@pytest.mark.parametrize("tile,arch,case,m,split", ROUND8_TILES)
def test_grad_input_gemm_round8_tiles(tile, arch, case, m, split, monkeypatch):
    """dX = dY·Ŵ in fp16 through the GEMM input gradient at the round-8 candidates' block sizes
    (the rules' only candidate here), NaN-poisoned dX, against float64 on Ŵ rounded to fp16 (the
    INT scales are stored in fp16, NF4's absmax·NF4[q] rounds once): 64- and 128-row M tiles with a
    ragged last one, 32/64/128-row N steps with a ragged last one, the split-N launch for the
    64x32x64 tile (the sm_90 M = 64 pick)."""
    from qlk.kernels import config

    monkeypatch.setattr(fm, "target_arch", lambda: arch)
    qw, w64 = _only_grad_tile(monkeypatch, "grad", config._cfg(None, 4, 1, GROUP_M=2, **tile), case, m, split)
    n, k = qw.shape
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    dy = randn(m, n, seed=m + k + 8).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((m, k), float("nan"), dtype=torch.float16, device=DEVICE),
                               path="gemm")
    heuristics._choose_default.cache_clear()
    assert [(op, c.label, c.split) for op, c in log] == [
        ("grad", f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} w4 s1", split)]
    assert oracles.rel_err(dx, dy.cpu().double() @ w64.half().double()) < 5e-4


# round 18: sm_90's input gradient with Ŵ as the MMA's B operand (heuristics.GRAD_W_AS_B), where it
# applies (INT2/INT4 with groups of whole words, INT3 of whole chunks (round 19), NF4; whole K tiles or the shifted last one) and where the kernel
# keeps the Ŵᵀ tile (a group that is not a power of two or smaller than a word, a K tile K cuts)
W_AS_B_RUNS = [  # (weight with N = SPLIT_N_ROWS rows, M, split, deterministic, the B-operand tile runs,
    # the next N tile's words loaded ahead (round 19) or in the same iteration)
    pytest.param(("int", 4, 32, 384), 133, 1, False, True, True, id="int4g32-M133"),  # 3 K tiles of 4 groups
    pytest.param(("int", 4, 32, 352), 70, 1, False, True, False, id="int4g32-k352-shifted"),  # last tile 224 .. 352
    pytest.param(("int", 2, 32, 352), 70, 2, False, True, True, id="int2g32-k352-shifted-split-atomic"),
    pytest.param(("int", 2, 256, 512), 17, 2, True, True, False, id="int2g256-split-det"),  # a group over 2 tiles
    pytest.param(("int", 4, 8, 384), 17, 1, False, True, True, id="int4g8"),  # a group per word
    pytest.param(("nf4", 64, True, 384), 133, 1, False, True, True, id="nf4b64dq"),  # absmax de-nested once a call
    pytest.param(("nf4", 32, False, 352), 70, 1, False, True, False, id="nf4b32-k352-shifted"),
    pytest.param(("int", 2, 8, 384), 17, 1, False, False, True, id="int2g8-transposed"),  # half a word
    pytest.param(("int", 4, 96, 384), 17, 1, False, False, True, id="int4g96-transposed"),
    pytest.param(("int", 4, 16, 336), 17, 1, False, False, True, id="int4g16-k336-cut-transposed"),  # not shiftable
    # INT3 (round 19): a 32-column chunk of 3 words a thread
    pytest.param(("int", 3, 32, 384), 133, 1, False, True, True, id="int3g32-M133"),  # 4 groups a K tile
    pytest.param(("int", 3, 32, 352), 70, 2, False, True, True, id="int3g32-k352-shifted-split-atomic"),
    pytest.param(("int", 3, 256, 512), 17, 2, True, True, False, id="int3g256-split-det"),  # a group over 2 tiles
    pytest.param(("int", 3, 96, 384), 17, 1, False, False, True, id="int3g96-transposed"),  # not a power of two
    pytest.param(("int", 3, 16, 384), 17, 1, False, False, True, id="int3g16-transposed"),  # half a chunk
]


# round 20: sm_90's 64x128x128 tile, 128-row N steps (N = 264: 3 steps, the last 8 rows), the words
# ahead on and off; the same checks
W_AS_B_128_ROW_RUNS = [
    pytest.param(("int", 4, 32, 384), 133, 1, False, True, True, id="int4g32-M133-ahead"),
    # round 31: INT3 g32 keeps Ŵᵀ on 128-row N steps (the B-operand tile fails to compile there), g64 not
    pytest.param(("int", 3, 32, 384), 133, 1, False, False, False, id="int3g32-M133-transposed"),
    pytest.param(("int", 3, 64, 384), 133, 1, False, True, True, id="int3g64-M133-ahead"),
    pytest.param(("int", 3, 256, 512), 17, 2, True, True, True, id="int3g256-split-det-ahead"),
    pytest.param(("int", 2, 32, 352), 70, 2, False, True, False, id="int2g32-k352-shifted-split-atomic"),
    pytest.param(("nf4", 64, True, 384), 133, 1, False, True, True, id="nf4b64dq-ahead"),
    pytest.param(("int", 3, 16, 384), 17, 1, False, False, True, id="int3g16-transposed"),
]


@pytest.mark.parametrize("case,m,split,det,rows,ahead", W_AS_B_128_ROW_RUNS)
def test_grad_input_w_as_b_128_row_steps(case, m, split, det, rows, ahead, monkeypatch):
    """test_grad_input_w_as_b at the round-20 tile: 128 rows of Ŵ (N) an iteration."""
    test_grad_input_w_as_b(case, m, split, det, rows, ahead, monkeypatch, block_n=128)


# round 36: the same B-operand tiles computed as the transposed product, Ŵᵀ as the MMA's first operand
# (fused_matmul.GRAD_W_AS_A): every format the tile decodes, words ahead on and off, split (atomic and
# deterministic), SHIFT_K's last tile, ragged M and N, both N step heights
W_AS_A_RUNS = [p for p in W_AS_B_RUNS if p.values[4]]
W_AS_A_128_ROW_RUNS = [p for p in W_AS_B_128_ROW_RUNS if p.values[4]]


@pytest.mark.parametrize("case,m,split,det,rows,ahead", W_AS_A_RUNS)
def test_grad_input_w_as_a(case, m, split, det, rows, ahead, monkeypatch):
    """test_grad_input_w_as_b with dXᵀ = Ŵᵀ·dYᵀ (W_AS_A): the launch passes the flag, the result
    is the same float64 product."""
    test_grad_input_w_as_b(case, m, split, det, rows, ahead, monkeypatch, w_as_a=True)


@pytest.mark.parametrize("case,m,split,det,rows,ahead", W_AS_A_128_ROW_RUNS)
def test_grad_input_w_as_a_128_row_steps(case, m, split, det, rows, ahead, monkeypatch):
    test_grad_input_w_as_b(case, m, split, det, rows, ahead, monkeypatch, block_n=128, w_as_a=True)


@pytest.mark.parametrize("case,m,split,det,rows,ahead", W_AS_B_RUNS)
def test_grad_input_w_as_b(case, m, split, det, rows, ahead, monkeypatch, block_n=64, w_as_a=False):
    """dX = dY·Ŵ in fp16 through sm_90's GEMM input gradient at its 64x64x128 tile (the rules' only
    candidate): Ŵ decoded by decode_tile._decode_int_tile_rows (NF4: _decode_nf4_tile_rows) as the MMA's B
    operand, dX stored
    through its column map (a wrong map, group or word order fails here), or the Ŵᵀ tile where that
    does not apply (which of the two ran is checked under the interpreter; compiled kernels cannot
    be spied on, so there the launch's W_AS_B flag, which the B-operand tile needs). Ragged M and N
    tiles (N = 264: 5 N steps, the last 8 rows), SHIFT_K's last tile (K = 352: its first 96 columns
    belong to the tile before), the split over N (atomics, or the NaN-poisoned workspace),
    NaN-poisoned dX, against float64 on Ŵ rounded to fp16."""
    from qlk.kernels import config

    monkeypatch.setattr(fm, "target_arch", lambda: 90)
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: ahead)
    monkeypatch.setattr(fm, "GRAD_W_AS_A", w_as_a)
    assert heuristics.grad_w_as_b(90) and not heuristics.grad_w_as_b(80)
    qw, w64 = _only_grad_tile(monkeypatch, "grad", config._cfg(None, 4, 1, GROUP_M=2, BLOCK_N=block_n, BLOCK_M=64,
                                                               BLOCK_K=128), case, m, split)
    # which decoder ran: a spy on the jitted helpers, interpreter only (None compiled: tests/spies.py);
    # compiled, the launch's W_AS_B flag, which the B-operand tile needs
    ran = spies.record_calls(monkeypatch, fm, "_decode_int_tile_rows", "_decode_int3_tile_rows",
                             "_decode_nf4_tile_rows", when_compiled="none")
    seen = _spy_launches(monkeypatch, "_quant_matmul_grad_input_kernel") if ran is None or w_as_a else None
    n, k = qw.shape
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    dy = randn(m, n, seed=m + k + 18).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((m, k), float("nan"), dtype=torch.float16, device=DEVICE),
                               path="gemm", deterministic=det)
    heuristics._choose_default.cache_clear()
    assert [(op, c.label, c.split) for op, c in log] == [("grad", f"64x{block_n}x128 w4 s1", split)]
    if ran is not None:
        assert bool(ran) == rows
    else:
        (grid, kwargs), = seen
        assert grid[1] == split and (kwargs["W_AS_B"] or not rows)
    if w_as_a:
        (grid, kwargs), = seen
        assert kwargs["W_AS_A"] is True
    assert oracles.rel_err(dx, dy.cpu().double() @ w64.half().double()) < 5e-4


@pytest.mark.parametrize("case,m,split", [pytest.param((4, 32, 384), 133, 1, id="int4g32-M133"),
                                          pytest.param((2, 64, 512), 70, 2, id="int2g64-M70-split"),
                                          pytest.param((3, 32, 384), 133, 1, id="int3g32-M133")])
def test_qalora_grad_input_round16_tile(case, m, split, monkeypatch):
    """QA-LoRA's input gradient (fp32 folded biases, V = dY·B from the same launch) at sm_90's
    64x64x128 tile (round 16), unsplit and split over N: dX and V NaN-poisoned against the paper's
    formula; 3 M tiles with a ragged last (M = 133), groups inside a K tile (g32) and over half of one."""
    from qlk.kernels import config

    monkeypatch.setattr(fm, "target_arch", lambda: 90)
    tile = dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=128)
    qw, w64 = _only_grad_tile(monkeypatch, "grad", config._cfg(None, 4, 1, GROUP_M=2, **tile), ("int",) + case, m,
                              split)
    n, k = qw.shape
    g = qw.group_size
    a, b = adapter(qw, w64, seed=k + g + 5)
    dy = randn(m, n, seed=m + 29).half()
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    dx, v = qalora_grad_input(dy, qw, a.half(), b.half(), SIGMA,
                              out=torch.full((m, k), float("nan"), dtype=torch.float16, device=DEVICE), path="gemm")
    heuristics._choose_default.cache_clear()
    assert [(op, c.label, c.split) for op, c in log] == [("grad", "64x64x128 w4 s1", split)]
    dx_ref, _, _ = oracles.qalora_backward64(torch.zeros(m, k, dtype=torch.float64), dy.cpu().double(),
                                             w64.half().double(), a.cpu().half().double(), b.cpu().half().double(),
                                             SIGMA, g)
    assert oracles.rel_err(dy.cpu().double() @ w64, dx_ref) > 0.05, "the adapter term of dX is too small to test"
    assert oracles.rel_err(dx, dx_ref) < 5e-3
    assert oracles.rel_err(v, dy.cpu().double() @ b.cpu().half().double()) < 1e-3


# ------------------------------------------------ forward GEMM, the round-9 two-warp tiles
# config.gemm_configs' round-9 candidates (sm_80, 2 warps; docs/kernels.md "Round 9"): their block sizes
# under the interpreter (warps do not exist there), fp16 X through the half2 forward tile, several
# tiles along every axis, the last of each ragged, and several K tiles per group (INT3 g128: 4)
ROUND9_TILES = [  # (tile, weight with N = SPLIT_N_ROWS rows, M)
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=32), ("int", 3, 128, 384), 133,
                 id="int3g128-64x128x32"),  # 3 M tiles, 3 N tiles (the last 8 rows), 12 K tiles
    pytest.param(dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=32), ("int", 3, 128, 384), 133,
                 id="int3g128-128x64x32"),  # 2 M tiles, 5 N tiles, 12 K tiles
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=32), ("int", 4, 32, 256), 70,
                 id="int4g32-64x128x32"),  # a group per K tile
    pytest.param(dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=32), ("int", 2, 64, 256), 130,
                 id="int2g64-128x64x32"),  # 2 K tiles per group
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=32), ("nf4", 64, True, 256), 70,
                 id="nf4b64dq-64x128x32"),
    # round 15: sm_90's one-warpgroup 64x128x64 tile (heuristics.CANDIDATE_M_RANGE): 3 M tiles
    # with a ragged last, 6 K tiles, two groups per K tile (g32) and a group over two (g128)
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64), ("int", 4, 32, 384), 133,
                 id="int4g32-64x128x64"),
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64), ("int", 3, 128, 384), 133,
                 id="int3g128-64x128x64"),
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64), ("nf4", 64, True, 384), 133,
                 id="nf4b64dq-64x128x64"),
    # round 28: NF4's 128-deep step as two 64-deep dots (fused_matmul._fwd_step): 3 whole steps of two
    # blocks each; 2 whole steps and a cut one (the cut step keeps one dot); blocks as deep as the step
    # (one absmax for both halves), without double quantization
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128), ("nf4", 64, True, 384), 133,
                 id="nf4b64dq-64x128x128"),
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128), ("nf4", 64, True, 320), 70,
                 id="nf4b64dq-64x128x128-cut"),
    pytest.param(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128), ("nf4", 128, False, 384), 17,
                 id="nf4b128-64x128x128"),
]


@pytest.mark.parametrize("tile,case,m", ROUND9_TILES)
def test_forward_gemm_round9_tiles(tile, case, m, monkeypatch):
    """Y = X·Ŵᵀ + b in fp16 through the forward GEMM at the round-9 candidates' block sizes (the
    rules' only candidate here, unsplit), NaN-poisoned Y, against float64 on Ŵ rounded to fp16."""
    from qlk.kernels import config

    cfg = config._cfg(None, 2, 1, GROUP_M=2, **tile)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [cfg] if op == "fwd" else real(op))
    monkeypatch.setattr(fm, "target_arch", lambda: 80)
    heuristics._choose_default.cache_clear()
    qw, w64 = split_weight(case)
    n, k = qw.shape
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    x, bias = randn(m, k, seed=m + k + 9).half(), randn(n, seed=k + 3).half()
    y = quant_matmul_forward(x, qw, bias, out=torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE),
                             path="gemm")
    heuristics._choose_default.cache_clear()
    assert [(op, c.label, c.split) for op, c in log] == [
        ("fwd", f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} w2 s1", 1)]
    ref = x.cpu().double() @ w64.half().double().t() + bias.cpu().double()
    assert oracles.rel_err(y, ref) < 5e-4


@pytest.mark.parametrize("case,m", [pytest.param((4, 128, 384), 133, id="int4g128-M133"),
                                    pytest.param((3, 32, 256), 70, id="int3g32-M70")])
def test_qalora_forward_round9_tile(case, m, monkeypatch):
    """QA-LoRA's pooled forward at the two-warp 64x128x32 tile's block sizes (unsplit, as the rules
    launch it with the pooling: heuristics.FWD_SPLIT_SPILLS_POOL), fp16 X: Y and P(X) NaN-poisoned
    against the paper's formula; groups over 4 K tiles (g = 128) and one per K tile (g = 32)."""
    from qlk.kernels import config

    cfg = config._cfg(None, 2, 1, GROUP_M=2, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda op: [cfg] if op == "fwd" else real(op))
    monkeypatch.setattr(fm, "target_arch", lambda: 80)
    heuristics._choose_default.cache_clear()
    qw, w64 = int_weight(*case)
    n, k = qw.shape
    g = qw.group_size
    a, b = adapter(qw, w64, seed=k + g + 3)
    x, bias = randn(m, k, seed=m + 17).half(), randn(n, seed=19).half()
    log = []
    monkeypatch.setattr(fm, "CHOICE_LOG", log)
    y_ref, p_ref = oracles.qalora_forward64(x.cpu().double(), w64.half().double(), a.cpu(), b.cpu(), SIGMA, g,
                                            bias.cpu().double())
    y, p = qalora_forward(x, qw, a.half(), b.half(), SIGMA, bias,
                          out=torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE), path="gemm")
    heuristics._choose_default.cache_clear()
    assert [(op, c.label, c.split) for op, c in log] == [("fwd", "64x128x32 w2 s1", 1)]
    assert oracles.rel_err(p, p_ref) < 1e-3
    assert oracles.rel_err(y, y_ref) < 5e-3


# ------------------------------------------------ GEMM input gradient, half2 decoder (round 7)
# fp16 dY through the half2 transposed decoder (quant_tile_t._pair_half2, the twin here): both K loops,
# INT2 in both unpackings (sm_80: half words), ragged K with a half-used INT3 chunk / INT2 word
HALF2_RUNS = [pytest.param((4, 32, 512), 90, True, id="int4g32-sm90-ahead"),
              pytest.param((3, 16, 784), 80, False, id="int3g16k784-sm80-cpasync"),
              pytest.param((3, 256, 512), 90, True, id="int3g256-sm90-ahead"),
              pytest.param((2, 8, 520), 90, True, id="int2g8k520-sm90-ahead"),
              pytest.param((2, 64, 512), 80, False, id="int2g64-sm80-halves")]


@pytest.mark.parametrize("case,arch,ahead", HALF2_RUNS)
def test_grad_input_gemm_half2(case, arch, ahead, monkeypatch):
    """dX = dY·Ŵ in fp16 with the half2 decoder against float64 math on Ŵ rounded to fp16 (the scales
    and biases are stored in fp16, so the decoder's ŵ is that value exactly): M = 17 (one ragged M
    tile), 3 N tiles (the last ragged), 8..13 K tiles, the output NaN-poisoned. The tolerance is
    fp32 accumulation and the final fp16 rounding; a wrong code or group is off by far more."""
    monkeypatch.setattr(fm, "target_arch", lambda: arch)
    monkeypatch.setattr(fm, "_grad_words_ahead", lambda: ahead)
    monkeypatch.setattr(fm, "_grad_half2", lambda qw, dtype: True)
    _SMS[0] = 1
    qw, w64 = int_weight(*case)
    n, k = qw.shape
    dy = randn(17, n, seed=n + k).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((17, k), float("nan"), dtype=torch.float16, device=DEVICE),
                               path="gemm")
    ref = dy.cpu().double() @ w64.half().double()
    assert oracles.rel_err(dx, ref) < 5e-4  # 2e-4 observed (fp16 output rounding)


# ------------------------------------------------ input gradients, a ragged K: the last K tile shifted
# K % BLOCK_K != 0 (K = 2880 or 576 against 128-column tiles): the last dX tile starts at K − BLOCK_K
# and stores only its own columns (fused_matmul.shift_last_k), so the launch compiles the unmasked
# decoder. Here K = 224 against 64-column tiles: 4 K tiles, the last moved back by 32 columns, which
# the third tile computes too; a double store or a double atomic add there would show.
SHIFT_K_RUNS = [  # (weight with N = SPLIT_N_ROWS rows, M, path, split, deterministic)
    pytest.param(("int", 4, 32, 224), 70, "gemm", 1, False, id="int4g32-gemm"),
    pytest.param(("int", 3, 32, 224), 70, "gemm", 2, False, id="int3g32-gemm-split-atomic"),
    pytest.param(("int", 2, 32, 224), 70, "gemm", 2, True, id="int2g32-gemm-split-det"),
    pytest.param(("nf4", 32, True, 224), 17, "gemm", 1, False, id="nf4b32dq-gemm"),
    pytest.param(("int", 4, 32, 224), 5, "splitn", 3, False, id="int4g32-splitn-atomic"),
    pytest.param(("nf4", 32, True, 224), 5, "splitn", 3, True, id="nf4b32dq-splitn-det"),
]


@pytest.mark.parametrize("case,m,path,split,det", SHIFT_K_RUNS)
def test_grad_input_ragged_k_shifts_the_last_tile(case, m, path, split, det, monkeypatch):
    """dX = dY·Ŵ in fp16 with K ragged for the tile: the GEMM (unsplit, split over N with atomics and
    in fixed order) and split-N kernels take the shifted last tile (the launch's SHIFT_K, EVEN_K), and
    dX, NaN-poisoned, matches float64 on Ŵ rounded to fp16 in every column."""
    from qlk.kernels import config

    op = "grad" if path == "gemm" else "splitn"
    bm = 64 if op == "grad" else 16
    cfg = config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=bm, BLOCK_K=64, **({"GROUP_M": 2} if op == "grad" else {}))
    qw, w64 = _only_grad_tile(monkeypatch, op, cfg, case, m, split)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_grad_input_kernel" if op == "grad"
                         else "_quant_matmul_grad_input_splitn_kernel")
    dy = randn(m, n, seed=m + k + 11).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((m, k), float("nan"), dtype=torch.float16, device=DEVICE),
                               path=path, deterministic=det)
    heuristics._choose_default.cache_clear()
    (grid, kwargs), = seen
    assert grid[1] == split
    assert fm.shift_last_k(dict(K=k, BLOCK_K=64, GROUP_SIZE=qw.group_size))
    assert not torch.isnan(dx).any()
    assert oracles.rel_err(dx, dy.cpu().double() @ w64.half().double()) < 5e-4


# ------------------------------------------------ split-N input gradient, the transposed tile (round 14)
# fp16 dY through the split-N kernel, whose Ŵᵀ now comes from quant_tile_t._dequant_tile_t (the
# half2 twin for the INT formats): 3 slices of 3 N tiles (the last ragged), 2 M tiles (M = 17, the
# second with 1 row), 8-9 K tiles; INT3 in 32-column chunks, INT2 with a half-used last word, a group
# smaller than a chunk (the forward tile transposed) and NF4 (the fp32 path)
SPLITN_TILE_RUNS = [
    pytest.param(("int", 4, 32, 512), False, id="int4g32-atomic"),
    pytest.param(("int", 3, 256, 512), True, id="int3g256-det"),
    pytest.param(("int", 2, 8, 520), False, id="int2g8k520-atomic"),
    pytest.param(("int", 3, 16, 528), True, id="int3g16-det"),
    pytest.param(("nf4", 64, True, 512), False, id="nf4b64dq-atomic"),
]


@pytest.mark.parametrize("case,det", SPLITN_TILE_RUNS)
def test_splitn_grad_input_transposed_tile(case, det, monkeypatch):
    """dX = dY·Ŵ in fp16 through the split-N kernel, NaN-poisoned, against float64 on Ŵ rounded to
    fp16 (INT scales and biases are stored in fp16, so the half2 decoder's ŵ is that value exactly;
    NF4's absmax·NF4[q] rounds once): a wrong pair, group, row or slice is off by far more than the
    fp32 accumulation and fp16 output rounding the tolerance allows."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)
    qw, w64 = _only_grad_tile(monkeypatch, "splitn", cfg, case, 17, 3)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_grad_input_splitn_kernel")
    dy = randn(17, n, seed=n + k + 5).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((17, k), float("nan"), dtype=torch.float16, device=DEVICE),
                               path="splitn", deterministic=det)
    heuristics._choose_default.cache_clear()
    (grid, kwargs), = seen
    assert grid[1] == 3 and grid[2] == 2
    # the half2 decoder for the INT formats; its inline PTX (HALF2_ASM) compiled, its Triton twin under
    # the interpreter (fused_matmul: HALF2_ASM = half2 and not INTERPRETED)
    assert kwargs["HALF2"] == (case[0] == "int") and kwargs["HALF2_ASM"] == (kwargs["HALF2"] and COMPILED)
    assert not torch.isnan(dx).any()
    assert oracles.rel_err(dx, dy.cpu().double() @ w64.half().double()) < 5e-4


# ------------------------------------------------ split-N with one slice: dX stored directly (round 32)
# The launch whose grid has one slice of N (narrow layers: N within the tile's rows, or a full grid)
# stores dX in dY's dtype itself (DIRECT): no workspace. 9 N tiles in the one slice (the last ragged),
# 1-3 M tiles (the last short), 8-9 K tiles (K = 520: the shifted last tile), an out= inside a
# NaN-poisoned buffer, QA-LoRA's V beside it.
SPLITN_DIRECT_RUNS = [
    pytest.param(("int", 4, 32, 512), 17, False, id="int4g32-M17"),
    pytest.param(("int", 3, 256, 512), 33, False, id="int3g256-M33"),
    pytest.param(("int", 2, 8, 520), 20, False, id="int2g8k520-M20"),
    pytest.param(("int", 3, 16, 528), 17, False, id="int3g16-M17"),
    pytest.param(("nf4", 64, True, 512), 17, False, id="nf4b64dq-M17"),
    pytest.param(("int", 4, 32, 512), 20, True, id="int4g32-M20-qalora"),
]


@pytest.mark.parametrize("case,m,with_v", SPLITN_DIRECT_RUNS)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "det"])
def test_splitn_one_slice_stores_dx_directly(case, m, with_v, det, monkeypatch):
    """dX = dY·Ŵ in fp16 through the split-N kernel launched with one slice: the launch is DIRECT,
    no workspace is made, dX lands in ``out`` and nothing beside it is written, and
    it matches float64 on Ŵ rounded to fp16; with QA-LoRA's B, V = dY·B too."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)
    qw, w64 = _only_grad_tile(monkeypatch, "splitn", cfg, case, m, 1)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_grad_input_splitn_kernel")
    made, real_ws = [], fm._workspace
    monkeypatch.setattr(fm, "_workspace", lambda shape, device: made.append(tuple(shape)) or real_ws(shape, device))
    dy = randn(m, n, seed=n + k + m).half()
    big = torch.full((m * k + 256,), float("nan"), dtype=torch.float16, device=DEVICE)
    out = big[64:64 + m * k].view(m, k)  # guards wider than a stray K tile's columns
    if with_v:
        a = randn(RANK, k // qw.group_size, seed=15).cpu() * 16
        b = randn(n, RANK, seed=16).cpu()
        dx, v = qalora_grad_input(dy, qw, a.to(DEVICE), b.to(DEVICE), SIGMA, out=out, path="splitn",
                                  deterministic=det)
    else:
        dx = quant_matmul_backward(dy, qw, out=out, path="splitn", deterministic=det)
    heuristics._choose_default.cache_clear()
    (grid, kwargs), = seen
    assert grid[1] == 1 and grid[2] == math.ceil(m / 16) and kwargs["DIRECT"]
    assert made == ([(1, m, RANK) if det else (m, RANK)] if with_v else []), made  # V's only
    assert dx.data_ptr() == out.data_ptr()
    assert torch.isnan(big[:64]).all() and torch.isnan(big[64 + m * k:]).all()
    assert not torch.isnan(dx).any()
    if with_v:
        dx_ref, _, _ = oracles.qalora_backward64(torch.zeros(m, k, dtype=torch.float64),
                                                 dy.cpu().double(), w64.half().double(), a, b, SIGMA, qw.group_size)
        assert oracles.rel_err(dx, dx_ref) < 1e-3
        assert oracles.rel_err(v, dy.cpu().double() @ b.half().double()) < 1e-6
    else:
        assert oracles.rel_err(dx, dy.cpu().double() @ w64.half().double()) < 5e-4


def test_splitn_slices_keep_the_workspace(monkeypatch):
    """The other side of DIRECT: a launch with several slices of N adds into a zeroed fp32
    workspace, not into dX (a DIRECT store from each slice would keep only one slice's sum)."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)
    qw, w64 = _only_grad_tile(monkeypatch, "splitn", cfg, ("int", 4, 32, 512), 17, 3)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_grad_input_splitn_kernel")
    dy = randn(17, n, seed=3).half()
    dx = quant_matmul_backward(dy, qw, out=torch.full((17, k), float("nan"), dtype=torch.float16, device=DEVICE),
                               path="splitn")
    heuristics._choose_default.cache_clear()
    (grid, kwargs), = seen
    assert grid[1] == 3 and not kwargs["DIRECT"]
    assert oracles.rel_err(dx, dy.cpu().double() @ w64.half().double()) < 5e-4


# ------------------------------------------------ split-K with one slice: Y stored directly (round 33)
# The forward's split-K launch whose grid has one slice of K stores Y (+ bias) in X's dtype itself
# (DIRECT): no workspace. 8-9 K tiles in the one slice (K = 520: ragged), 17 N tiles (the last 8
# rows; enough output tiles at M = 1 for the rules to launch one slice), 1-3 M tiles (the last
# short), an out= inside a NaN-poisoned buffer, with and without a bias, QA-LoRA's pooled forward.
SPLITK_DIRECT_RUNS = [
    pytest.param(("int", 4, 32, 512), 1, True, False, id="int4g32-M1-bias"),
    pytest.param(("int", 4, 16, 512), 17, False, False, id="int4g16-M17"),
    pytest.param(("int", 3, 128, 512), 33, True, False, id="int3g128-M33-bias"),
    pytest.param(("int", 2, 8, 520), 5, True, False, id="int2g8k520-M5-bias"),
    pytest.param(("nf4", 64, True, 512), 16, True, False, id="nf4b64dq-M16-bias"),
    pytest.param(("int", 4, 32, 512), 7, True, True, id="int4g32-M7-qalora-bias"),
]


SPLITK_DIRECT_ROWS = (SPLIT_N_ROWS, 520)  # 9 or 17 N tiles of 32, the last ragged (8 rows)


def _only_splitk_tile(monkeypatch, case, m, split):
    """(qw, float64 Ŵ) of ``case``, with the interpreter's split-K tile the rules' only candidate and
    the SM count set so that they launch ``split`` slices at M = ``m``. N: the first of
    SPLITK_DIRECT_ROWS at which some SM count gives ``split`` (the interpreter's time goes with N; at
    M = 1 and N = 264 the rules split K at every SM count)."""
    from qlk.kernels import config

    cfg = config._cfg(None, 4, 1, BLOCK_N=32, BLOCK_M=16, BLOCK_K=64)
    real = heuristics.candidates
    monkeypatch.setattr(heuristics, "candidates", lambda o: [cfg] if o == "splitk" else real(o))
    heuristics._choose_default.cache_clear()
    fmt = "nf4" if case[0] == "nf4" else f"int{case[1]}g{case[2]}"
    for rows in SPLITK_DIRECT_ROWS:
        qw, w64 = split_weight(case, rows)
        n, k = qw.shape
        for sms in range(1, 256):
            _SMS[0] = sms
            if heuristics.choose_config("splitk", m, n, k, fmt, fm.target_arch(), sms).split == split:
                return qw, w64
    raise AssertionError(f"no SM count gives {split} slices at M = {m}")


@pytest.mark.parametrize("case,m,with_bias,qalora", SPLITK_DIRECT_RUNS)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "det"])
def test_splitk_one_slice_stores_y_directly(case, m, with_bias, qalora, det, monkeypatch):
    """Y = X·Ŵᵀ (+ bias) in fp16 through the split-K kernel launched with one slice: the launch is
    DIRECT, no workspace is made, Y lands in ``out`` and nothing beside it is written, and it matches float64 on Ŵ (INT's fp16 scales make ŵ exact in fp16 for the decoder;
    the tolerance allows fp32 sums and one fp16 rounding); QA-LoRA's pooled forward too."""
    qw, w64 = _only_splitk_tile(monkeypatch, case, m, 1)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_splitk_kernel")
    made, real_ws = [], fm._workspace
    monkeypatch.setattr(fm, "_workspace", lambda shape, device: made.append(tuple(shape)) or real_ws(shape, device))
    x = randn(m, k, seed=n + k + m).half()
    bias = randn(n, seed=m + 2).half() * 4 if with_bias else None
    big = torch.full((64 + m * n + 64,), float("nan"), dtype=torch.float16, device=DEVICE)
    out = big[64:64 + m * n].view(m, n)  # guards wider than a stray N tile's rows on either side
    if qalora:
        a, b = adapter(qw, w64, seed=k + 3)
        y, p = qalora_forward(x, qw, a, b, SIGMA, bias, out=out, path="splitk", deterministic=det)
        y_ref, p_ref = oracles.qalora_forward64(x.cpu(), w64, a.cpu(), b.cpu(), SIGMA, qw.group_size,
                                                None if bias is None else bias.cpu())
        assert oracles.rel_err(p, p_ref) < 1e-6
    else:
        y = quant_matmul_forward(x, qw, bias, out=out, path="splitk", deterministic=det)
        y_ref = x.cpu().double() @ w64.t() + (0 if bias is None else bias.cpu().double())
    heuristics._choose_default.cache_clear()
    (grid, kwargs), = seen
    assert grid[1] == 1 and grid[2] == math.ceil(m / 16) and kwargs["DIRECT"]
    assert kwargs["HAS_BIAS"] == with_bias
    assert made == [], made
    assert y.data_ptr() == out.data_ptr()
    assert torch.isnan(big[:64]).all() and torch.isnan(big[64 + m * n:]).all()
    assert not torch.isnan(y).any()
    assert oracles.rel_err(y, y_ref) < (2e-3 if qalora else 5e-4)


def test_splitk_slices_keep_the_workspace(monkeypatch):
    """The other side of DIRECT: a launch with several slices of K adds into a zeroed fp32
    workspace, the bias once, not into Y (a DIRECT store from each slice would keep only one
    slice's sum, and the bias in each)."""
    qw, w64 = _only_splitk_tile(monkeypatch, ("int", 4, 32, 512), 9, 4)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_splitk_kernel")
    x, bias = randn(9, k, seed=3).half(), randn(n, seed=4).half()
    y = quant_matmul_forward(x, qw, bias, out=torch.full((9, n), float("nan"), dtype=torch.float16, device=DEVICE),
                             path="splitk")
    heuristics._choose_default.cache_clear()
    (grid, kwargs), = seen
    assert grid[1] == 4 and not kwargs["DIRECT"] and not kwargs["HAS_BIAS"]
    assert oracles.rel_err(y, x.cpu().double() @ w64.t() + bias.cpu().double()) < 5e-4


SPLITK_FINISH_RUNS = [  # (weight, M, slices, bias, QA-LoRA)
    pytest.param(("int", 4, 32, 512), 5, 4, True, False, id="int4g32-M5-4slices-bias"),
    pytest.param(("int", 3, 48, 528), 16, 3, False, False, id="int3g48k528-M16-3slices"),
    pytest.param(("int", 2, 8, 520), 1, 3, True, False, id="int2g8k520-M1-3slices-bias"),
    pytest.param(("nf4", 64, True, 512), 9, 2, True, False, id="nf4b64dq-M9-2slices-bias"),
    pytest.param(("int", 4, 32, 512), 7, 4, True, True, id="int4g32-M7-4slices-qalora-bias"),
]


@pytest.mark.parametrize("case,m,split,with_bias,qalora", SPLITK_FINISH_RUNS)
def test_splitk_finish_in_the_kernel(case, m, split, with_bias, qalora, monkeypatch):
    """FINISH (``SPLITK_FINISH``, round 37): the split-K decode with several slices finishes Y in the
    kernel. One launch: no workspace made, no cast after it; Y (+ bias, once) in ``out``'s fp16 and
    nothing beside it written; the kept workspace and counts back at zero after each call, so a second
    call with another M, input and bias (into the same buffers) is right too. On a GPU (``make
    gpu-check``) the slices run concurrently and ``repeat`` calls check the cross-CTA ordering."""
    monkeypatch.setattr(fm, "SPLITK_FINISH", True)
    monkeypatch.setattr(fm, "_FINISH_BUFFERS", {})
    qw, w64 = _only_splitk_tile(monkeypatch, case, m, split)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_splitk_kernel")
    made = []
    monkeypatch.setattr(fm, "_workspace", lambda shape, device: made.append(tuple(shape)))
    repeat = 1 if INTERPRETED else 20
    for call, (rows, biased) in enumerate([(m, with_bias)] * repeat + [(max(1, m - 3), not with_bias)]):
        x = randn(rows, k, seed=n + k + rows + call).half()
        bias = randn(n, seed=rows + 2).half() * 4 if biased else None
        big = torch.full((64 + rows * n + 64,), float("nan"), dtype=torch.float16, device=DEVICE)
        out = big[64:64 + rows * n].view(rows, n)
        if qalora:
            a, b = adapter(qw, w64, seed=k + 3)
            y, p = qalora_forward(x, qw, a, b, SIGMA, bias, out=out, path="splitk")
            y_ref, p_ref = oracles.qalora_forward64(x.cpu(), w64, a.cpu(), b.cpu(), SIGMA, qw.group_size,
                                                    None if bias is None else bias.cpu())
            assert oracles.rel_err(p, p_ref) < 1e-6
        else:
            y = quant_matmul_forward(x, qw, bias, out=out, path="splitk")
            y_ref = x.cpu().double() @ w64.t() + (0 if bias is None else bias.cpu().double())
        grid, kwargs = seen[-1]
        if rows == m:
            assert grid[1] == split
        assert kwargs["FINISH"] and kwargs["ATOMIC"] and not kwargs["DIRECT"] and kwargs["HAS_BIAS"] == biased
        assert y.data_ptr() == out.data_ptr() and made == []
        assert torch.isnan(big[:64]).all() and torch.isnan(big[64 + rows * n:]).all()
        assert not torch.isnan(y).any(), call
        assert oracles.rel_err(y, y_ref) < (2e-3 if qalora else 5e-4), call
        (ws, counts), = fm._FINISH_BUFFERS.values()
        assert ws.numel() >= rows * n and not ws.any() and not counts.any(), call
    heuristics._choose_default.cache_clear()


def test_splitk_finish_keeps_one_workspace_per_stream(monkeypatch):
    """FINISH's kept workspace is per (device, stream): a launch on a second CUDA stream gets its
    own (two streams' launches may overlap), both right; at most ``_FINISH_STREAMS`` are kept.
    Under the interpreter (CPU tensors: no streams) one workspace serves every call."""
    monkeypatch.setattr(fm, "SPLITK_FINISH", True)
    monkeypatch.setattr(fm, "_FINISH_BUFFERS", {})
    qw, w64 = _only_splitk_tile(monkeypatch, ("int", 4, 32, 512), 5, 4)
    n, k = qw.shape
    x = randn(5, k, seed=11)
    want = x.cpu().double() @ w64.t()
    assert oracles.rel_err(quant_matmul_forward(x, qw, out=nan(5, n), path="splitk"), want) < TOL
    if DEVICE == "cpu":
        assert list(fm._FINISH_BUFFERS) == [(x.device, None)]
    else:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = quant_matmul_forward(x, qw, out=nan(5, n), path="splitk")
        torch.cuda.current_stream().wait_stream(side)
        assert oracles.rel_err(y, want) < TOL
        assert len(fm._FINISH_BUFFERS) == 2
    monkeypatch.setattr(fm, "_FINISH_STREAMS", 1)
    fm._finish_workspace(8, 1, torch.device("meta"))  # a third key: the oldest is dropped
    assert len(fm._FINISH_BUFFERS) == 1 and next(iter(fm._FINISH_BUFFERS))[0].type == "meta"
    heuristics._choose_default.cache_clear()


def test_splitk_finish_keeps_deterministic_and_one_slice_launches(monkeypatch):
    """FINISH is for the atomics' launches with several slices: ``deterministic`` keeps its ordered
    [SPLIT, M, N] sum, one slice stays DIRECT."""
    monkeypatch.setattr(fm, "SPLITK_FINISH", True)
    qw, w64 = _only_splitk_tile(monkeypatch, ("int", 4, 32, 512), 5, 4)
    n, k = qw.shape
    seen = _spy_launches(monkeypatch, "_quant_matmul_splitk_kernel")
    x, bias = randn(5, k, seed=1), randn(n, seed=2)
    y = quant_matmul_forward(x, qw, bias, out=nan(5, n), path="splitk", deterministic=True)
    assert not seen[-1][1]["FINISH"] and not seen[-1][1]["ATOMIC"]
    assert oracles.rel_err(y, x.cpu().double() @ w64.t() + bias.cpu().double()) < TOL
    qw, w64 = _only_splitk_tile(monkeypatch, ("int", 4, 32, 512), 5, 1)
    n = qw.shape[0]
    bias = randn(n, seed=2)
    y = quant_matmul_forward(x, qw, bias, out=nan(5, n), path="splitk")
    assert seen[-1][1]["DIRECT"] and not seen[-1][1]["FINISH"]
    assert oracles.rel_err(y, x.cpu().double() @ w64.t() + bias.cpu().double()) < TOL
    heuristics._choose_default.cache_clear()


def test_shift_last_k_rule():
    """The shift needs a ragged K longer than the tile and a start on a whole group and packed unit."""
    assert fm.shift_last_k(dict(K=2880, BLOCK_K=128, GROUP_SIZE=32))
    assert fm.shift_last_k(dict(K=576, BLOCK_K=128, GROUP_SIZE=64))
    assert not fm.shift_last_k(dict(K=4096, BLOCK_K=128, GROUP_SIZE=32))  # even: nothing to shift
    assert not fm.shift_last_k(dict(K=96, BLOCK_K=128, GROUP_SIZE=32))  # one tile, shorter than K
    assert not fm.shift_last_k(dict(K=2880, BLOCK_K=128, GROUP_SIZE=192))  # 2752 is not a whole group
    assert not fm.shift_last_k(dict(K=264, BLOCK_K=64, GROUP_SIZE=8))  # 200: not a whole 32-column unit

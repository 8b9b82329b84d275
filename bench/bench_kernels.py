"""Kernel microbenchmark: qlk's fused dequant-GEMM against its peers, same run, same shapes.

    python bench/bench_kernels.py --quick --out bench/results/x/kernels.csv
    python bench/bench_kernels.py --shapes 4096->14336 --ms 1,4096 --formats int4g32,nf4 --providers cublas,qlk,bnb_dequant

Providers (``--providers``; every one named gets a row, ``unavailable: <reason>`` if it cannot run):

===================  ====================================================================  ============
provider             what runs                                                              formats
===================  ====================================================================  ============
cublas               ``torch.nn.functional.linear`` / ``dy @ W`` on the dense bf16 weight   bf16
qlk                  ``qlk.kernels.quant_matmul`` / ``quant_matmul_grad_input`` (fused)     all
qlk_dequant          ``qlk.kernels.dequantize`` to bf16 + cuBLAS (qlk's fallback path)      all
bnb_dequant          ``bnb.functional.dequantize_4bit`` + cuBLAS (bnb's training path)      nf4
bnb_matmul4bit       ``bnb.matmul_4bit`` inference call (gemv_4bit kernel when M = 1)        nf4
bnb_linear4bit       ``bnb.nn.Linear4bit`` under autograd: fwd, and fwd + backward dX       nf4
tinygemm             ``torch._weight_int4pack_mm`` (``_convert_weight_to_int4pack``)        int4
gemlite              ``gemlite.helper.A16Wn`` (Triton, its shipped H100 configs)            int4, int2
gptq_triton          ``gptq_triton.quant_linear.triton_matmul4`` (fp16 activations)         int4g128
exllamav2, gptqmodel  reported unavailable with the reason (no wheel that runs here)        —
===================  ====================================================================  ============

Ops: ``fwd`` (Y = X·Ŵᵀ), ``bwd_dx`` (dX = dY·Ŵ), ``fwd_bwd`` (both; autograd for Linear4bit).
Peers have no backward kernel: their ``bwd_dx`` row says ``n/a``. All INT peers are built from the
same qlk codes (conversions below, checked on the CPU by the smoke test), so one reference Ŵ serves
them all; bitsandbytes quantizes the same dense weight itself. Before each timing, every (provider,
shape, format, op, M) is checked at that M against float64 X·Ŵᵀ (dY·Ŵ) on fresh random data (a
``rel_err`` row per M); a mismatch keeps its timing but gets ``status = wrong: rel_err=…``, stays
out of the summary, and makes the script exit with status 1 (so ``make gpu-check`` fails).

Metrics per (provider, op, shape, format, M): time (median, p20, p80), TFLOP/s, effective GB/s
(the format's stored bytes + X + Y, the same byte count for every provider of a format),
fractions of the ceilings measured at the start of the run (copy GB/s, cuBLAS bf16 8192³
TFLOP/s), speedup vs cuBLAS and, for qlk, vs each peer of the same format.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from common import Budget, Rotating, Stats, measure, randn, rel_err, short_reason  # noqa: E402

import qlk  # noqa: E402
from qlk.formats import pack_codes, unpack_codes  # noqa: E402

# ---- what is measured --------------------------------------------------------------------------
#: (K, N) = (in, out) of Llama-3-8B's projections and Llama-3-70B's gate/up
SHAPES = {
    "8b-qo": (4096, 4096),
    "8b-kv": (4096, 1024),
    "8b-gateup": (4096, 14336),
    "8b-down": (14336, 4096),
    "70b-gateup": (8192, 28672),
}
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]
#: name -> (fmt, bits, group_size); nf4 is bitsandbytes' blocksize 64 with double quantization
FORMATS = {
    "int4g32": ("int", 4, 32), "int4g128": ("int", 4, 128),
    "int3g32": ("int", 3, 32), "int3g128": ("int", 3, 128),
    "int2g32": ("int", 2, 32), "int2g128": ("int", 2, 128),
    "nf4": ("nf4", 4, 64),
}  # fmt: skip
OPS = ["fwd", "bwd_dx", "fwd_bwd"]
QUICK = dict(shapes=["8b-qo", "8b-gateup"], ms=[1, 16, 256, 1024, 4096], formats=["int4g32", "int4g128", "nf4"],
             ops=["fwd", "bwd_dx"], warmup_ms=10, rep_ms=40, budget_s=120)  # fmt: skip
TOL = 2e-2  # bf16 outputs land near 4e-3; a wrong layout lands near 1


def shape_label(k: int, n: int) -> str:
    return f"{k}->{n}"


def parse_shape(s: str) -> tuple[int, int]:
    if s in SHAPES:
        return SHAPES[s]
    k, n = s.replace("x", "->").split("->")
    return int(k), int(n)


# ---- operand conversions for the INT peers (pure torch; the smoke test checks them on CPU) -----
# qlk stores ŵ = s·(q − m) + c, m = 2^(bits−1) (per output channel n and group j).
# * tinygemm (torch._weight_int4pack_mm): ŵ = (q − 8)·scale + zero; uint8 [N, K/2] with the even
#   column in the high nibble, and scales_and_zeros [G, N, 2]: scale = s, zero = c.
# * gemlite (A16Wn.from_weights): ŵ = (q − z)·s, uint8 codes [N, K], s and z [N, G]; z = m − c/s is
#   an integer for every live group (qlk's min-max quantizer stores c = s·(m − z)), so it is rounded.
# * GPTQ v1 (gptq-triton): qweight int32 [K/8, N] = qlk's INT4 words transposed, scales [G, N]
#   fp16, qzeros int32 [G, N/8] holding z − 1: ŵ = s·(q − (stored + 1)).


def _codes(qw) -> torch.Tensor:
    if qw.fmt != "int":
        raise ValueError(f"needs an INT QuantizedWeight, got fmt={qw.fmt!r}")
    if qw.perm is not None:
        raise ValueError("act-order (perm) weights are not converted")
    return unpack_codes(qw.qweight, qw.bits, qw.in_features)  # int64 [N, K]


def integer_zeros(qw) -> torch.Tensor:
    """z = m − c/s rounded, [N, G] float32; m where the group is constant (s = 0)."""
    s, c = qw.scales.float(), qw.biases.float()
    live, mid = s > 0, float(1 << (qw.bits - 1))
    return torch.where(live, mid - torch.round(c / torch.where(live, s, torch.ones_like(s))), torch.full_like(s, mid))


def tinygemm_operands(qw, dtype=torch.bfloat16):
    """(uint8 [N, K/2], scales_and_zeros [G, N, 2]) for torch's int4 tinygemm; INT4 only."""
    if qw.bits != 4:
        raise ValueError("tinygemm is INT4 only")
    q = _codes(qw)
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    s, c = qw.scales.float(), qw.biases.float()
    sz = torch.stack([s, c], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz


def tinygemm_dequantize(packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """tinygemm's formula on the operands above (the test's oracle), float32 [N, K]."""
    hi, lo = (packed.to(torch.int64) >> 4) & 15, packed.to(torch.int64) & 15
    q = torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1).float()
    scale = sz[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zero = sz[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q - 8) * scale + zero


def gemlite_operands(qw, dtype=torch.bfloat16):
    """(uint8 codes [N, K], scales [N, G], zeros [N, G]) for ``gemlite.helper.A16Wn.from_weights``."""
    return _codes(qw).to(torch.uint8), qw.scales.to(dtype), integer_zeros(qw).to(dtype)


def gemlite_dequantize(codes, scales, zeros, group_size: int) -> torch.Tensor:
    rep = lambda t: t.float().repeat_interleave(group_size, dim=1)  # noqa: E731
    return (codes.float() - rep(zeros)) * rep(scales)


def gptq_v1_operands(qw):
    """(qweight [K/8, N], scales [G, N] fp16, qzeros [G, N/8]) in GPTQ v1; INT4 only."""
    if qw.bits != 4:
        raise ValueError("the GPTQ kernels measured here are INT4 only")
    _codes(qw)  # checks
    z = integer_zeros(qw).to(torch.int64)
    if (z < 1).any():
        raise ValueError("GPTQ v1 stores z − 1 in 4 bits: a zero point of 0 is not representable")
    qweight = qw.qweight.t().contiguous()
    qzeros = pack_codes((z - 1).t().contiguous(), 4)  # [G, N/8]: N packed 8 per word, lowest first
    return qweight, qw.scales.t().contiguous().half(), qzeros


def gptq_v1_dequantize(qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    """GPTQ's formula, [N, K] float32."""
    k = qweight.shape[0] * 8
    n = qweight.shape[1]
    q = unpack_codes(qweight.t().contiguous(), 4, k).float()  # [N, K]
    z = unpack_codes(qzeros, 4, n).float() + 1  # [G, N]
    rep = lambda t: t.t().float().repeat_interleave(group_size, dim=1)  # noqa: E731
    return (q - rep(z)) * rep(scales)


# ---- providers ---------------------------------------------------------------------------------
class Unsupported(Exception):
    """This provider has no kernel for this format / shape (an ``n/a`` row, not a failure)."""


class Case:
    """One (shape, format): the dense weight, qlk's quantized weight and the reference Ŵ."""

    def __init__(self, k: int, n: int, fmt_name: str, w: torch.Tensor):
        self.k, self.n, self.fmt_name, self.w = k, n, fmt_name, w
        self.fmt, self.bits, self.group_size = FORMATS.get(fmt_name, ("bf16", 16, 0))
        self.device = w.device
        self._qw = None
        self.qw_error = None

    @property
    def qw(self):
        """qlk's quantization of ``w`` (computed once, shared by qlk and the INT peers)."""
        if self.fmt == "bf16":
            raise Unsupported("dense case has no quantized weight")
        if self._qw is None and self.qw_error is None:
            try:
                self._qw = qlk.quantize(self.w, bits=self.bits, group_size=self.group_size, fmt=self.fmt)
            except Exception as e:  # noqa: BLE001 - reported as a row
                self.qw_error = short_reason(e)
        if self._qw is None:
            raise RuntimeError(f"qlk.quantize failed: {self.qw_error}")
        return self._qw

    def weight_bytes(self) -> int:
        """Stored bytes of the format (the byte count behind 'effective GB/s')."""
        if self.fmt == "bf16":
            return self.w.numel() * 2
        return self.qw.nbytes


class Provider:
    name = "?"
    formats: tuple | None = None  # None: every quantized format
    ops: tuple = ("fwd", "bwd_dx")
    dtype = torch.bfloat16
    note = ""

    def import_error(self) -> str | None:
        """None if the provider can run here, else why not (checked once per run)."""
        return None

    def supports(self, case: Case) -> str | None:
        if case.fmt == "bf16":
            return "dense baseline only" if self.name != "cublas" else None
        if self.formats is not None and case.fmt_name not in self.formats:
            return f"no {case.fmt_name} kernel"
        return None

    def build(self, case: Case):
        """-> (dict op -> fn(x, dy) -> output(s), reference weight [N, K] float32)."""
        raise NotImplementedError


def _fwd_bwd(fwd, bwd):
    return lambda x, dy: (fwd(x, dy), bwd(x, dy))


class Cublas(Provider):
    name, formats, ops = "cublas", ("bf16",), ("fwd", "bwd_dx", "fwd_bwd")

    def build(self, case):
        w = case.w
        fwd = lambda x, dy: F.linear(x, w)  # noqa: E731
        bwd = lambda x, dy: dy @ w  # noqa: E731
        return {"fwd": fwd, "bwd_dx": bwd, "fwd_bwd": _fwd_bwd(fwd, bwd)}, w.float()


class Qlk(Provider):
    name, ops = "qlk", ("fwd", "bwd_dx", "fwd_bwd")
    note = "qlk.kernels fused dequant-GEMM"

    def import_error(self):
        import qlk.kernels as K

        missing = [f for f in ("quant_matmul", "quant_matmul_grad_input") if not hasattr(K, f)]
        return f"qlk.kernels lacks {missing}" if missing else None

    def build(self, case):
        import qlk.kernels as K

        qw = case.qw
        why = K.supports(qw) if hasattr(K, "supports") else None
        if why is not None:  # the public functions would time the torch reference instead
            raise Unsupported(f"qlk kernels fall back to the torch reference for this weight ({why})")
        fwd = lambda x, dy: K.quant_matmul(x, qw)  # noqa: E731
        bwd = lambda x, dy: K.quant_matmul_grad_input(dy, qw)  # noqa: E731
        return {"fwd": fwd, "bwd_dx": bwd, "fwd_bwd": _fwd_bwd(fwd, bwd)}, qw.dequantize(torch.float32)


class QlkDequant(Provider):
    name = "qlk_dequant"
    note = "qlk.kernels.dequantize to bf16 + cuBLAS, per call"

    def import_error(self):
        import qlk.kernels as K

        return None if hasattr(K, "dequantize") else "qlk.kernels lacks dequantize"

    def build(self, case):
        import qlk.kernels as K

        qw = case.qw
        return {
            "fwd": lambda x, dy: F.linear(x, K.dequantize(qw, torch.bfloat16)),
            "bwd_dx": lambda x, dy: dy @ K.dequantize(qw, torch.bfloat16),
        }, qw.dequantize(torch.float32)


def _bnb_quantize(w):
    import bitsandbytes.functional as BF

    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = BF.dequantize_4bit(packed, state).float()
    return packed, state, ref


class _Bnb(Provider):
    formats = ("nf4",)

    def import_error(self):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return short_reason(e)
        return None


class BnbDequant(_Bnb):
    name = "bnb_dequant"
    note = "bnb.functional.dequantize_4bit + cuBLAS (what MatMul4Bit does in training)"

    def build(self, case):
        import bitsandbytes.functional as BF

        packed, state, ref = _bnb_quantize(case.w)
        return {
            "fwd": lambda x, dy: F.linear(x, BF.dequantize_4bit(packed, state).to(x.dtype)),
            "bwd_dx": lambda x, dy: dy @ BF.dequantize_4bit(packed, state).to(dy.dtype),
        }, ref


class BnbMatmul4bit(_Bnb):
    name, ops = "bnb_matmul4bit", ("fwd",)
    note = "bnb.matmul_4bit without grad: gemv_4bit kernel at M=1, dequantize + cuBLAS above"

    def build(self, case):
        import bitsandbytes as bnb

        packed, state, ref = _bnb_quantize(case.w)

        def fwd(x, dy):
            with torch.no_grad():
                return bnb.matmul_4bit(x, packed.t(), quant_state=state)

        return {"fwd": fwd}, ref


class BnbLinear4bit(_Bnb):
    name, ops = "bnb_linear4bit", ("fwd", "fwd_bwd")
    note = "bnb.nn.Linear4bit under autograd (x requires grad)"
    needs_grad = True

    def build(self, case):
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF

        lin = bnb.nn.Linear4bit(case.k, case.n, bias=False, compute_dtype=torch.bfloat16,
                                compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
        lin.weight = bnb.nn.Params4bit(case.w.detach().cpu(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True, blocksize=64)  # fmt: skip
        lin = lin.to(case.device)
        ref = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()

        def fwd_bwd(x, dy):
            y = lin(x)
            y.backward(dy)
            return y, x.grad

        return {"fwd": lambda x, dy: lin(x), "fwd_bwd": fwd_bwd}, ref


class Tinygemm(Provider):
    name, formats, ops = "tinygemm", ("int4g32", "int4g128"), ("fwd",)
    note = "torch._weight_int4pack_mm, inner_k_tiles=8"

    def import_error(self):
        ok = hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")
        return None if ok else f"torch {torch.__version__} lacks _weight_int4pack_mm"

    def build(self, case):
        qw = case.qw
        packed, sz = tinygemm_operands(qw, torch.bfloat16)
        wpack = torch._convert_weight_to_int4pack(packed, 8)
        g = qw.group_size
        ref = tinygemm_dequantize(packed, sz, g)
        return {"fwd": lambda x, dy: torch._weight_int4pack_mm(x, wpack, g, sz)}, ref


class Gemlite(Provider):
    name, formats, ops = "gemlite", ("int4g32", "int4g128", "int2g32", "int2g128"), ("fwd",)
    note = "gemlite A16Wn (bf16), default autotune 'fast' + shipped configs"

    def import_error(self):
        try:
            import gemlite  # noqa: F401  (reads the GPU name at import)
        except Exception as e:  # noqa: BLE001
            return short_reason(e)
        return None

    def build(self, case):
        from gemlite.helper import A16Wn

        codes, s, z = gemlite_operands(case.qw, torch.bfloat16)
        lin = A16Wn(device=str(case.device), dtype=torch.bfloat16).from_weights(codes, s, z, case.bits, case.group_size)
        ref = gemlite_dequantize(codes, s, z, case.group_size)
        return {"fwd": lambda x, dy: lin(x)}, ref


def _import_gptq_triton():
    """gptq_triton.quant_linear without the package __init__ (which imports old Llama internals)."""
    import importlib
    import importlib.util
    import types

    try:
        return importlib.import_module("gptq_triton.quant_linear")
    except Exception:  # noqa: BLE001
        spec = importlib.util.find_spec("gptq_triton")
        if spec is None:
            raise
        for name in [m for m in sys.modules if m.startswith("gptq_triton")]:
            del sys.modules[name]
        pkg = types.ModuleType("gptq_triton")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["gptq_triton"] = pkg
        return importlib.import_module("gptq_triton.quant_linear")


class GptqTriton(Provider):
    name, formats, ops, dtype = "gptq_triton", ("int4g128",), ("fwd",), torch.float16
    note = "gptq-triton 0.0.4 triton_matmul4 (fp16 only; needs group % 128 == 0, N % 256 == 0)"

    def import_error(self):
        try:
            _import_gptq_triton()
        except Exception as e:  # noqa: BLE001
            return short_reason(e)
        return None

    def supports(self, case):
        if case.n % 256 or case.k % 128:
            return "needs N % 256 == 0 and K % 128 == 0"
        return super().supports(case)

    def build(self, case):
        ql = _import_gptq_triton()
        qweight, scales, qzeros = gptq_v1_operands(case.qw)
        g = case.group_size
        ref = gptq_v1_dequantize(qweight, scales, qzeros, g)
        return {"fwd": lambda x, dy: ql.triton_matmul4(g, x, qweight, scales, qzeros)}, ref


class NotRunnable(Provider):
    """A peer that is listed so that its absence is visible, with the reason."""

    def __init__(self, name, reason):
        self.name, self.reason = name, reason

    def import_error(self):
        return self.reason


PROVIDERS = {
    p.name: p
    for p in (
        Cublas(), Qlk(), QlkDequant(), BnbDequant(), BnbMatmul4bit(), BnbLinear4bit(), Tinygemm(), Gemlite(),
        GptqTriton(),
        NotRunnable("exllamav2", "not attempted: PyPI's exllamav2 0.3.2 wheel builds its CUDA extension at first "
                                 "import (minutes of nvcc), too long for one 10-minute call"),
        NotRunnable("gptqmodel", "not attempted: gptqmodel 7.7.0 is an sdist with CUDA extensions (no wheel for "
                                 "this python/torch); gptq_triton is the GPTQ kernel measured"),
    )
}  # fmt: skip
#: qlk's rows get speedup_vs_<peer> for these, same format
PEERS = ["qlk_dequant", "bnb_dequant", "bnb_matmul4bit", "bnb_linear4bit", "tinygemm", "gemlite", "gptq_triton"]


# ---- the run -----------------------------------------------------------------------------------
def _inputs(m, case, dtype, needs_grad, count):
    def make():
        x = randn(m, case.k, dtype=dtype, device=case.device)
        dy = randn(m, case.n, dtype=dtype, device=case.device)
        if needs_grad:
            x.requires_grad_(True)
        return x, dy

    return Rotating(make, count)


def _check(fn, op, case, ref_w, dtype, needs_grad, m) -> float:
    """Largest relative error of the op's output(s) at M = ``m`` against float64 math on the
    provider's Ŵ, fresh inputs (inf when an output holds NaN/Inf)."""
    x = randn(m, case.k, dtype=dtype, device=case.device)
    dy = randn(m, case.n, dtype=dtype, device=case.device)
    if needs_grad:
        x.requires_grad_(True)
    out = fn(x, dy)
    w64 = ref_w.double()
    y_ref = x.detach().double() @ w64.t()
    dx_ref = dy.double() @ w64
    if op == "fwd":
        return rel_err(out, y_ref)
    if op == "bwd_dx":
        return rel_err(out, dx_ref)
    y, dx = out
    return max(rel_err(y, y_ref), rel_err(dx, dx_ref))


def flops_bytes(op, m, case, dtype_bytes=2):
    one = 2.0 * m * case.n * case.k
    act = (m * case.k + m * case.n) * dtype_bytes
    wb = case.weight_bytes()
    if op == "fwd_bwd":
        return 2 * one, 2 * (wb + act)
    return one, wb + act


def run(args, writer: common.ResultWriter, device: str = "cuda") -> dict:
    """Measure every (shape, format, provider, op, M) of ``args``; rows go to ``writer``.

    ``device="cpu"`` is for the smoke test (wall-clock timer, no ceilings): it checks the
    harness, never speed.
    """
    ceilings = None
    if device == "cuda":
        ceilings = common.measure_ceilings(args.warmup_ms, args.rep_ms)
        writer.ceilings(ceilings)
    budget = Budget(args.budget_s)
    providers = []
    for name in args.providers:
        if name not in PROVIDERS:
            writer.status(name, f"unavailable: unknown provider (known: {', '.join(PROVIDERS)})")
            continue
        p = PROVIDERS[name]
        try:
            err = p.import_error()
        except Exception as e:  # noqa: BLE001
            err = short_reason(e)
        if err:
            writer.status(name, f"unavailable: {err}")
            print(f"[bench_kernels] {name}: unavailable: {err}", flush=True)
        else:
            providers.append(p)
    # a provider-wide 'n/a' once for ops it has no kernel for
    for p in providers:
        for op in args.ops:
            if op not in p.ops:
                writer.status(p.name, f"n/a: no {op} kernel", op=op)
    times = {}
    count_cap = 8
    for shape in args.shapes:
        k, n = parse_shape(shape)
        label = shape_label(k, n)
        w = randn(n, k, std=0.02, device=device)
        for fmt_name in ["bf16"] + list(args.formats):
            case = Case(k, n, fmt_name, w)
            for p in providers:
                why = p.supports(case)
                if why:
                    if fmt_name != "bf16" and p.name != "cublas":
                        writer.status(p.name, f"n/a: {why}", shape=label, fmt=fmt_name)
                    continue
                if budget.spent():
                    budget.report_once(writer, f"{p.name} {label} {fmt_name}")
                    break
                keys = dict(shape=label, fmt=fmt_name, dtype=str(p.dtype).removeprefix("torch."))
                try:
                    fns, ref_w = p.build(case)
                except Unsupported as e:
                    writer.status(p.name, f"n/a: {e}", **keys)
                    continue
                except Exception as e:  # noqa: BLE001
                    writer.status(p.name, f"unavailable: build failed: {short_reason(e)}", **keys)
                    print(f"[bench_kernels] {p.name} {label} {fmt_name}: build failed: {short_reason(e, 400)}", flush=True)
                    continue
                grad = getattr(p, "needs_grad", False)
                for op in [o for o in args.ops if o in fns]:
                    for m in args.ms:
                        if budget.spent():
                            budget.report_once(writer, f"{p.name} {op} {label} {fmt_name} M={m}")
                            break
                        status = check_at(writer, fns[op], op, case, ref_w, p, grad, m, keys)
                        if status is None:
                            break
                        t = _time_op(fns[op], m, case, p, grad, args, count_cap, writer, op, keys)
                        if t is None:
                            continue
                        fl, nb = flops_bytes(op, m, case)
                        writer.timing(p.name, t, flops=fl, nbytes=nb, ceilings=ceilings, status=status,
                                      note=p.note, op=op, M=m, **keys)  # fmt: skip
                        if status == "ok":
                            times[(p.name, op, label, fmt_name, m, keys["dtype"])] = t
                del fns, ref_w
                _free()
            del case
            _free()
        del w
        _free()
        # ratios now, shape by shape, so a run stopped at its time limit keeps them
        common.speedup_rows(writer, {key: t for key, t in times.items() if key[2] == label}, "cublas",
                            peers_of=lambda p: PEERS if p == "qlk" else [])  # fmt: skip
    return times


def check_at(writer, fn, op, case, ref_w, p, grad, m, keys) -> str | None:
    """Check ``fn`` at M = ``m`` against float64 and write its ``rel_err`` row; returns the status
    the timing row carries ("ok" or "wrong: ..."), or None when the op could not run at all."""
    try:
        err = _check(fn, op, case, ref_w, p.dtype, grad, m)
    except torch.cuda.OutOfMemoryError as e:
        writer.status(p.name, f"unavailable: out of memory: {short_reason(e, 80)}", op=op, M=m, **keys)
        return None
    except Exception as e:  # noqa: BLE001
        writer.status(p.name, f"unavailable: run failed: {short_reason(e)}", op=op, M=m, **keys)
        print(f"[bench_kernels] {p.name} {op} {keys} M={m}: failed: {short_reason(e, 400)}", flush=True)
        return None
    finally:
        _free()
    status = "ok" if err <= TOL else f"wrong: rel_err={err:.3g} at M={m}"
    writer.row(provider=p.name, op=op, M=m, metric="rel_err", value=err, status=status,
               note="vs float64 X·Ŵᵀ / dY·Ŵ", **keys)  # fmt: skip
    if status != "ok":
        print(f"[bench_kernels] {p.name} {op} {keys['shape']} {keys['fmt']} M={m}: {status}", flush=True)
    return status


def _time_op(fn, m, case, p, grad, args, count_cap, writer, op, keys) -> Stats | None:
    try:
        per = (m * case.k + m * case.n) * 2
        rot = _inputs(m, case, p.dtype, grad, Rotating.count_for(per, max_count=count_cap))
        xs = [x for x, _ in rot.items] if grad else None

        def call():
            x, dy = rot()
            return fn(x, dy)

        t = measure(call, args.warmup_ms, args.rep_ms, grad_to_none=xs, device=case.device.type)
        print(f"[bench_kernels] {p.name:15s} {op:8s} {keys['shape']:12s} {keys['fmt']:9s} M={m:<5d} "
              f"{t.p50 * 1e3:10.1f} µs", flush=True)  # fmt: skip
        return t
    except torch.cuda.OutOfMemoryError as e:
        writer.status(p.name, f"unavailable: out of memory: {short_reason(e, 80)}", op=op, M=m, **keys)
    except Exception as e:  # noqa: BLE001
        writer.status(p.name, f"unavailable: run failed: {short_reason(e)}", op=op, M=m, **keys)
        print(f"[bench_kernels] {p.name} {op} {keys} M={m}: failed: {short_reason(e, 400)}", flush=True)
    finally:
        _free()
    return None


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"a subset that fits one 10-minute call: {QUICK}")
    ap.add_argument("--shapes", help=f"comma list of names {list(SHAPES)} or K->N (default: all)")
    ap.add_argument("--ms", help=f"comma list of M (default: {MS})")
    ap.add_argument("--formats", help=f"comma list of {list(FORMATS)} (default: all)")
    ap.add_argument("--providers", help=f"comma list of {list(PROVIDERS)} (default: all)")
    ap.add_argument("--ops", help=f"comma list of {OPS} (default: all)")
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up, ms (default 25; quick 10)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time, ms (default 100; quick 40)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting measurements after this long")
    ap.add_argument("--out", default=None, help="CSV to append rows to (default bench/results/kernels-<date>.csv)")
    a = ap.parse_args(argv)
    q = QUICK if a.quick else {}
    a.shapes = common.parse_list(a.shapes) or q.get("shapes") or list(SHAPES)
    a.ms = common.parse_list(a.ms, int) or q.get("ms") or MS
    a.formats = common.parse_list(a.formats) or q.get("formats") or list(FORMATS)
    a.providers = common.parse_list(a.providers) or list(PROVIDERS)
    a.ops = common.parse_list(a.ops) or q.get("ops") or OPS
    a.warmup_ms = a.warmup_ms if a.warmup_ms is not None else q.get("warmup_ms", 25)
    a.rep_ms = a.rep_ms if a.rep_ms is not None else q.get("rep_ms", 100)
    a.budget_s = a.budget_s if a.budget_s is not None else q.get("budget_s")
    bad = [f for f in a.formats if f not in FORMATS] + [o for o in a.ops if o not in OPS]
    if bad:
        ap.error(f"unknown format/op: {bad}")
    for s in a.shapes:
        try:
            parse_shape(s)
        except ValueError:
            ap.error(f"bad shape {s!r}: a name in {list(SHAPES)} or K->N")
    if a.out is None:
        a.out = common.default_out("kernels")
    return a


def main(argv=None) -> int:
    return common.run_benchmark("kernels", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())

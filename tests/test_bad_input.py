"""Bad input at every public entry point: one catalogue, checked here and rendered into
docs/bad-inputs.md (so the document says exactly what a user gets, and stays true).

Each :class:`Case` is one bad input at one entry point, with its status:

* ``rejects``  — raises ``exc`` whose message contains every ``says`` substring (what was given
  and what is allowed). Asserted.
* ``accepts``  — a deliberate decision to accept the input (e.g. an overlapping ``expand``-ed x);
  asserted to run and give the dense result.
* ``gap``      — today's behaviour is wrong (a crash with an unrelated exception, or silent
  acceptance). The test is ``xfail(strict=True)`` on the wanted behaviour (``exc`` + ``says``), so
  it starts failing — as a reminder to move the case to ``rejects`` — once the gap is fixed.

The document's table is generated from what the calls really raise today::

    python tests/test_bad_input.py --write-doc     # regenerate docs/bad-inputs.md's table
    python -m pytest -q tests/test_bad_input.py    # checks the cases and that the table is current
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
if __name__ == "__main__":  # run as a script (--write-doc): import the qlk of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qlk  # noqa: E402
from qlk._checks import UsageError  # noqa: E402
from qlk.export.gguf import GGUFExportError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"
BEGIN, END = "<!-- BEGIN GENERATED: tests/test_bad_input.py --write-doc -->", "<!-- END GENERATED -->"

_TMP = None


def tmp() -> str:
    """A per-process scratch directory for the file cases (rendered as ``<tmp>`` in the doc)."""
    global _TMP
    if _TMP is None:
        _TMP = tempfile.mkdtemp(prefix="qlk-bad-input-")
    return _TMP


# ---------------------------------------------------------------------------------- fixtures
def W(n=33, k=128, seed=0, dtype=torch.float32):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def QW(fmt="int", **kw):
    return qlk.quantize(W(), fmt=fmt, **kw)


def X(m=2, k=128, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)


def sd_with(fmt="int", drop=(), **tensors):
    sd = QW(fmt).state_dict()
    sd.update(tensors)
    return {k: v for k, v in sd.items() if k not in drop}


def sd_config(fmt="int", raw=None, **changes):
    sd = QW(fmt).state_dict()
    cfg = json.loads(bytes(sd["qlk_config"].tolist()).decode())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not _DROP}
    data = raw if raw is not None else json.dumps(cfg).encode()
    sd["qlk_config"] = torch.tensor(list(data), dtype=torch.uint8)
    return sd


_DROP = object()


def gptq(k=128, n=64, bits=4, g=32, **over):
    args = dict(
        qweight=torch.zeros(k * bits // 32, n, dtype=torch.int32),
        qzeros=torch.zeros(k // g, n * bits // 32, dtype=torch.int32),
        scales=torch.full((k // g, n), 0.01, dtype=torch.float16),
        bits=bits, group_size=g,
    )  # fmt: skip
    args.update(over)
    return qlk.from_gptq(**args)


def bnb_sd(**over):
    sd = qlk.to_bnb_state_dict(QW("nf4"))
    sd.update(over)
    return sd


def bnb_state(**over):
    qs = {"quant_type": "nf4", "shape": [33, 128], "blocksize": 64, "absmax": torch.ones(66), "dtype": "float32"}
    qs.update(over)
    return {k: v for k, v in qs.items() if v is not _DROP}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def patch_model(*a, **kw):
    from qlk.patch import patch_model as f

    return f(*a, **kw)


def patched(**kw):
    return patch_model(mlp(), verbose=False, **kw)


def bnb_mlp(kind: str):
    """An MLP of bitsandbytes layers quantized on CPU: "nf4", "fp4" (Linear4bit) or "int8" (Linear8bitLt)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    if kind == "int8":
        layers = [bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False), bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)]
    else:
        layers = [bnb.nn.Linear4bit(64, 32, quant_type=kind), bnb.nn.Linear4bit(32, 16, quant_type=kind)]
    return nn.Sequential(layers[0], nn.ReLU(), layers[1]).to("cpu")  # .to(device) quantizes


def saved_model() -> str:
    from qlk.io import save_quantized

    path = os.path.join(tmp(), "model.safetensors")
    if not os.path.exists(path):
        save_quantized(patched(), path)
    return path


def saved_adapter() -> str:
    from qlk.io import save_adapter

    path = os.path.join(tmp(), "adapter.safetensors")
    if not os.path.exists(path):
        save_adapter(patched(), path)
    return path


def file_variant(name: str, make) -> str:
    path = os.path.join(tmp(), name)
    make(path)
    return path


def truncated(src_fn, keep, name):
    def make(path):
        data = open(src_fn(), "rb").read()
        open(path, "wb").write(data[: keep(len(data))])

    return file_variant(name, make)


def foreign(path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, path)


def with_nan_scales(path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = saved_model()
    tensors = load_file(src)
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    tensors["0.weight_scales"] = torch.full_like(tensors["0.weight_scales"], float("nan"))
    save_file(tensors, path, metadata=meta)


def mixed_device_qw():
    qw = QW()
    qw.scales = qw.scales.to("meta")
    return qw


def load_quantized(*a, **kw):
    from qlk.io import load_quantized as f

    return f(*a, **kw)


def load_adapter(*a, **kw):
    from qlk.io import load_adapter as f

    return f(*a, **kw)


def save_quantized(*a, **kw):
    from qlk.io import save_quantized as f

    return f(*a, **kw)


def QuantLinear(*a, **kw):
    from qlk.nn import QuantLinear as cls

    return cls(*a, **kw)


def launcher_forward(*a, **kw):
    from qlk.kernels import quant_matmul_forward

    return quant_matmul_forward(*a, **kw)


def export_encode(what):
    from qlk.export import export_model
    from qlk.export.gguf import encode_quantized

    if what == "fmt":
        return export_model(tmp(), fmt="onnx")
    if what == "g16":
        return encode_quantized(QW(group_size=16), what="layer 'x'")
    if what == "nf4":
        return encode_quantized(QW("nf4", group_size=64), what="layer 'x'")
    return encode_quantized(QW(), fallback="f8")


def overlapping_out_result():
    x, qw = X(m=32), QW()
    out = torch.zeros(1, 33).expand(32, 33)  # every row aliases one row of memory
    return launcher_forward(x, qw, out=out)  # a wrong result: all 32 rows are one row of memory


def grouped(offsets=None, num_experts=4, **kwargs):
    from qlk.autograd.experts import grouped_experts_linear

    qw = qlk.quantize(W(n=4 * 33), bits=4, group_size=32)
    return grouped_experts_linear(torch.zeros(4, 128), qw, torch.tensor([0, 1, 2, 3, 4]) if offsets is None else offsets,
                                  num_experts, **kwargs)


class _Experts(nn.Module):
    """The Transformers experts contract (use_experts_implementation), tiny."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.has_gate, self.has_bias, self.is_transposed = 3, True, False, False
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 64))
        self.down_proj = nn.Parameter(torch.randn(3, 64, 8))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def moe_model():
    return nn.ModuleDict({"experts": _Experts(), "proj": nn.Linear(64, 64)})


def _export_expert_dropout():
    import tempfile

    from qlk.integrations.peft import export_peft_adapter

    model = qlk.patch_model(moe_model(), bits=4, group_size=8, method="lora", r=2, dropout=0.1, verbose=False)
    with tempfile.TemporaryDirectory() as d:
        return export_peft_adapter(model, d)


# ---------------------------------------------------------------------------------- catalogue
@dataclass
class Case:
    id: str
    entry: str  # the public entry point, as a user calls it
    given: str  # the bad input, in words
    call: object  # () -> anything
    status: str = "rejects"  # rejects | accepts | gap
    exc: type | None = ValueError  # expected (rejects) or wanted (gap)
    says: tuple = ()  # substrings the message must contain (rejects) / should contain (gap)
    check: object = None  # accepts: () -> bool, the input gave the dense result
    note: str = ""
    volatile: bool = False  # the exception comes from torch internals and varies run to run: doc shows "a torch error"


def _dense_ok(y, x, qw, atol=1e-4):
    return torch.allclose(y.double(), x.double() @ qw.dequantize(torch.float64).t(), atol=atol)


CASES = [
    # ---- qlk.quantize
    Case("quantize-bits-5", "qlk.quantize", "bits=5", lambda: qlk.quantize(W(), bits=5), says=("bits=5", "(2, 3, 4)")),
    Case("quantize-bits-float", "qlk.quantize", "bits=4.0 (a float)", lambda: qlk.quantize(W(), bits=4.0),
         says=("bits=4.0", "(2, 3, 4)"), note="was TypeError `<<` on float before _checks rejected non-integers"),
    Case("quantize-bits-bool", "qlk.quantize", "bits=True", lambda: qlk.quantize(W(), bits=True), says=("bits=True",)),
    Case("quantize-fmt", "qlk.quantize", "fmt='fp4'", lambda: qlk.quantize(W(), fmt="fp4"), says=("fmt='fp4'", "'int', 'nf4'")),
    Case("quantize-nf4-bits", "qlk.quantize", "fmt='nf4', bits=3", lambda: qlk.quantize(W(), fmt="nf4", bits=3),
         says=("4-bit", "bits=3")),
    Case("quantize-group-not-dividing", "qlk.quantize", "group_size=48 with in_features=128",
         lambda: qlk.quantize(W(), group_size=48), says=("in_features=128", "group_size=48", "[8, 16, 32, 64, 128]")),
    Case("quantize-group-not-mult8", "qlk.quantize", "group_size=12", lambda: qlk.quantize(W(k=96), group_size=12),
         says=("group_size=12", "multiple of 8")),
    Case("quantize-group-negative", "qlk.quantize", "group_size=-32", lambda: qlk.quantize(W(), group_size=-32),
         says=("group_size=-32", "positive integer")),
    Case("quantize-group-bool", "qlk.quantize", "group_size=True", lambda: qlk.quantize(W(), group_size=True),
         says=("group_size=True", "positive integer")),
    Case("quantize-group-zero", "qlk.quantize", "group_size=0", lambda: qlk.quantize(W(), group_size=0),
         says=("group_size=0", "positive integer")),
    Case("quantize-nf4-blocksize", "qlk.quantize", "fmt='nf4', group_size=48",
         lambda: qlk.quantize(W(), fmt="nf4", group_size=48), says=("48", "allowed: (32, 64, 128")),
    Case("quantize-nan", "qlk.quantize", "a NaN in the weight", lambda: qlk.quantize(W().index_fill(1, torch.tensor([3]), float("nan"))),
         says=("33 NaN/Inf", "finite")),
    Case("quantize-inf-nf4", "qlk.quantize", "an Inf in the weight (nf4)",
         lambda: qlk.quantize(W().index_fill(0, torch.tensor([0]), float("inf")), fmt="nf4"), says=("NaN/Inf",)),
    Case("quantize-int-weight", "qlk.quantize", "int32 weight", lambda: qlk.quantize(torch.ones(4, 64, dtype=torch.int32)),
         exc=TypeError, says=("torch.int32", "floating-point")),
    Case("quantize-fp8-weight", "qlk.quantize", "float8_e4m3fn weight",
         lambda: qlk.quantize(torch.ones(4, 64).to(torch.float8_e4m3fn)), exc=TypeError,
         says=("float8_e4m3fn", "allowed: float16, bfloat16, float32, float64"),
         note="was NotImplementedError from isfinite"),
    Case("quantize-1d", "qlk.quantize", "1-D weight", lambda: qlk.quantize(torch.randn(64)), says=("2-D", "(64,)")),
    Case("quantize-empty", "qlk.quantize", "weight of shape (0, 64)", lambda: qlk.quantize(torch.randn(0, 64)),
         says=("empty", "(0, 64)")),
    Case("quantize-meta", "qlk.quantize", "weight on the meta device", lambda: qlk.quantize(torch.randn(4, 64, device="meta")),
         says=("meta device",), note="was RuntimeError from .item()"),
    Case("quantize-list", "qlk.quantize", "a Python list", lambda: qlk.quantize([[0.0] * 32]), exc=TypeError,
         says=("torch.Tensor", "list")),
    Case("quantize-fp16-overflow", "qlk.quantize", "|w| ~ 1e6 with fp16 scales", lambda: qlk.quantize(W() * 1e6),
         says=("overflows scale_dtype=torch.float16", "scale_dtype=torch.float32")),
    Case("quantize-fp16-underflow", "qlk.quantize", "|w| ~ 1e-30 with fp16 scales (all of Ŵ becomes 0)",
         lambda: qlk.quantize(W() * 1e-30), says=("scale_dtype",)),
    Case("quantize-scale-dtype", "qlk.quantize", "scale_dtype=torch.int32", lambda: qlk.quantize(W(), scale_dtype=torch.int32),
         exc=TypeError, says=("scale_dtype=torch.int32", "allowed")),
    Case("quantize-nf4-1e-44", "qlk.quantize", "fmt='nf4' (double quant), |w| ~ 1e-44 (fp32 subnormal)",
         lambda: qlk.quantize(W(8, 64, seed=1) * 1e-44, fmt="nf4"), status="accepts",
         check=lambda: bool((qlk.quantize(W(8, 64, seed=1) * 1e-44, fmt="nf4").dequantize().abs() <= 1e-43).all()),
         note="quantizes; the subnormal absmax is scaled by division (bitsandbytes' 1/absmax overflows to inf)"),
    # ---- qlk.quant_matmul / quant_matmul_grad_input
    Case("matmul-device", "qlk.quant_matmul", "x on cpu, weight on meta (a stand-in for another device)",
         lambda: qlk.quant_matmul(X(), QW().to("meta")), says=("x is on cpu", "weight is on meta", "qw.to(")),
    Case("grad-device", "qlk.quant_matmul_grad_input", "dy on cpu, weight on meta",
         lambda: qlk.quant_matmul_grad_input(X(k=33), QW().to("meta")), says=("dy is on cpu", "on meta")),
    Case("matmul-int-x", "qlk.quant_matmul", "int32 x", lambda: qlk.quant_matmul(X().int(), QW()), exc=TypeError,
         says=("torch.int32", "allowed: float16, bfloat16, float32")),
    Case("matmul-bool-x", "qlk.quant_matmul", "bool x", lambda: qlk.quant_matmul(X().bool(), QW()), exc=TypeError,
         says=("torch.bool", "allowed")),
    Case("grad-int-dy", "qlk.quant_matmul_grad_input", "int64 dy", lambda: qlk.quant_matmul_grad_input(X(k=33).long(), QW()),
         exc=TypeError, says=("dy has dtype torch.int64", "allowed")),
    Case("matmul-shape", "qlk.quant_matmul", "x [2, 64] for in_features=128", lambda: qlk.quant_matmul(X(k=64), QW()),
         says=("(2, 64)", "in_features=128")),
    Case("grad-shape", "qlk.quant_matmul_grad_input", "dy [2, 32] for out_features=33",
         lambda: qlk.quant_matmul_grad_input(X(k=32), QW()), says=("(2, 32)", "out_features=33"),
         note="said 'in_features=33' before check_activation named the dim after the argument"),
    Case("matmul-0d", "qlk.quant_matmul", "0-d x", lambda: qlk.quant_matmul(torch.tensor(1.0), QW()), says=("shape ()",)),
    Case("matmul-list-x", "qlk.quant_matmul", "x a list", lambda: qlk.quant_matmul([0.0] * 128, QW()), exc=TypeError,
         says=("torch.Tensor", "list")),
    Case("matmul-bias-shape", "qlk.quant_matmul", "bias [32] for out_features=33",
         lambda: qlk.quant_matmul(X(), QW(), bias=torch.zeros(32)), says=("(32,)", "(33,)")),
    Case("matmul-bias-device", "qlk.quant_matmul", "bias on meta", lambda: qlk.quant_matmul(X(), QW(), bias=torch.zeros(33, device="meta")),
         says=("meta", "cpu")),
    Case("matmul-backend", "qlk.quant_matmul", "backend='cuda'", lambda: qlk.quant_matmul(X(), QW(), backend="cuda"),
         says=("backend='cuda'", "'auto', 'triton', 'reference'")),
    Case("matmul-qw-tensor", "qlk.quant_matmul", "a dense tensor as the weight", lambda: qlk.quant_matmul(X(), W()),
         exc=TypeError, says=("QuantizedWeight", "Tensor")),
    Case("matmul-bias-list", "qlk.quant_matmul", "bias a list", lambda: qlk.quant_matmul(X(), QW(), bias=[0.0] * 33),
         exc=TypeError, says=("bias", "list")),
    Case("matmul-mixed-device-qw", "qlk.quant_matmul", "weight whose scales are on meta, codes on cpu",
         lambda: qlk.quant_matmul(X(), mixed_device_qw()), says=("different devices",), volatile=True),
    Case("matmul-f64-triton", "qlk.quant_matmul", "float64 x with backend='triton'",
         lambda: qlk.quant_matmul(X(dtype=torch.float64), QW(), backend="triton"), status="accepts",
         check=lambda: _dense_ok(qlk.quant_matmul(X(dtype=torch.float64), QW(), backend="triton"), X(dtype=torch.float64), QW()),
         note="decision (qlk.kernels): float64 (and bf16 under the interpreter) silently runs the reference path; "
              "the launcher qlk.kernels.quant_matmul_forward raises TypeError instead"),
    Case("matmul-expanded-x", "qlk.quant_matmul", "x = row.expand(4, 128) (overlapping rows, stride 0), backend='triton'",
         lambda: qlk.quant_matmul(X(1).expand(4, 128), QW(), backend="triton"), status="accepts",
         check=lambda: _dense_ok(qlk.quant_matmul(X(1).expand(4, 128), QW(), backend="triton"), X(1).expand(4, 128), QW()),
         note="decision: inputs are read-only, the kernels take any strides (no copy); tests/test_fuzz.py fuzzes "
              "transposed, sliced, expanded and batched x"),
    Case("matmul-nan-x", "qlk.quant_matmul", "NaN/Inf in x", lambda: qlk.quant_matmul(X().index_fill(1, torch.tensor([0]), float("nan")), QW()),
         status="accepts", check=lambda: bool(torch.isnan(qlk.quant_matmul(X().index_fill(1, torch.tensor([0]), float("nan")), QW())).all()),
         note="decision: propagates like dense math (NaN rows); fuzzed in tests/test_fuzz.py"),
    Case("launcher-overlapping-out", "qlk.kernels.quant_matmul_forward", "out=torch.zeros(1, 33).expand(32, 33) (overlapping output)",
         overlapping_out_result, says=("out", "overlap")),
    Case("launcher-path", "qlk.kernels.quant_matmul_forward", "path='gemv'",
         lambda: launcher_forward(X(), QW(), path="gemv"), says=("path='gemv'", "'auto'", "'dequant'", "'fused'")),
    # ---- QuantizedWeight.from_state_dict
    Case("sd-foreign", "QuantizedWeight.from_state_dict", "a dict without qlk_config",
         lambda: qlk.QuantizedWeight.from_state_dict({"weight": torch.zeros(2)}), says=("no 'qlk_config'",)),
    Case("sd-version", "QuantizedWeight.from_state_dict", "layout_version=99",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(layout_version=99)), says=("version 99", "reads version 1")),
    Case("sd-truncated-codes", "QuantizedWeight.from_state_dict", "qweight with a missing column",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with(qweight=QW().qweight[:, :-1])), says=("qweight has shape (33, 15)", "(33, 16)")),
    Case("sd-group-mismatch", "QuantizedWeight.from_state_dict", "config group_size=64, tensors for 32",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(group_size=64)), says=("scales has shape (33, 4)", "(33, 2)")),
    Case("sd-missing-biases", "QuantizedWeight.from_state_dict", "no biases entry",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with(drop=("biases",))), exc=TypeError, says=("biases", "NoneType")),
    Case("sd-nan-scales", "QuantizedWeight.from_state_dict", "NaN scales",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with(scales=torch.full((33, 4), float("nan"), dtype=torch.float16))),
         says=("scales contains 132 NaN/Inf",), note="was accepted (every output NaN) before check_tensor checked finiteness"),
    Case("sd-nf4-nan-absmax", "QuantizedWeight.from_state_dict", "NaN nested absmax (nf4)",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with("nf4", absmax_scale=torch.full((1,), float("nan")))),
         says=("absmax_scale contains 1 NaN/Inf",)),
    Case("sd-bits-5", "QuantizedWeight.from_state_dict", "config bits=5",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(bits=5)), says=("bits=5", "(2, 3, 4)")),
    Case("sd-group-0", "QuantizedWeight.from_state_dict", "config group_size=0",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(group_size=0)), says=("group_size=0",)),
    Case("sd-dtype", "QuantizedWeight.from_state_dict", "config dtype='int8'",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(dtype="int8")), says=("dtype", "int8")),
    Case("sd-missing-bits", "QuantizedWeight.from_state_dict", "config without 'bits'",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(bits=_DROP)), says=("bits",)),
    Case("sd-config-list", "QuantizedWeight.from_state_dict", "config JSON is a list",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(raw=b"[1, 2]")), says=("qlk_config",)),
    Case("sd-shape-3d", "QuantizedWeight.from_state_dict", "config shape [33, 128, 1]",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_config(shape=[33, 128, 1])), says=("shape",)),
    Case("sd-int-scales", "QuantizedWeight.from_state_dict", "int32 scales",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with(scales=torch.ones(33, 4, dtype=torch.int32))),
         exc=TypeError, says=("scales", "int32")),
    Case("sd-scales-meta", "QuantizedWeight.from_state_dict", "scales on meta, codes on cpu",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with(scales=torch.ones(33, 4, dtype=torch.float16, device="meta"))),
         says=("meta",)),
    Case("sd-perm-not-permutation", "QuantizedWeight.from_state_dict", "perm = zeros(128)",
         lambda: qlk.QuantizedWeight.from_state_dict(sd_with(perm=torch.zeros(128, dtype=torch.int64))),
         says=("perm", "permutation")),
    # ---- from_gptq
    Case("gptq-bits", "qlk.from_gptq", "bits=8", lambda: gptq(bits=8, k=128), says=("bits=8", "(2, 3, 4)")),
    Case("gptq-format", "qlk.from_gptq", "checkpoint_format='awq'", lambda: gptq(checkpoint_format="awq"),
         says=("checkpoint_format='awq'", "'gptq', 'gptq_v2'")),
    Case("gptq-group-0", "qlk.from_gptq", "group_size=0", lambda: gptq(g=32, group_size=0), says=("group_size=0",)),
    Case("gptq-scales-shape", "qlk.from_gptq", "scales for 2 groups, group_size=32 (4 groups)",
         lambda: gptq(scales=torch.ones(2, 64, dtype=torch.float16)), says=("scales has shape (2, 64)", "[4, 64]")),
    Case("gptq-qweight-dtype", "qlk.from_gptq", "float qweight", lambda: gptq(qweight=torch.zeros(16, 64)), exc=TypeError,
         says=("qweight", "torch.int32", "torch.float32")),
    Case("gptq-nan-scales", "qlk.from_gptq", "NaN scales", lambda: gptq(scales=torch.full((4, 64), float("nan"), dtype=torch.float16)),
         says=("scales contains 256 NaN/Inf",), note="was accepted before check_tensor checked finiteness"),
    Case("gptq-g-idx-dtype", "qlk.from_gptq", "float g_idx", lambda: gptq(g_idx=torch.zeros(128)), exc=TypeError,
         says=("g_idx", "torch.int32 or torch.int64")),
    Case("gptq-scales-meta", "qlk.from_gptq", "scales on meta, qweight on cpu",
         lambda: gptq(scales=torch.ones(4, 64, dtype=torch.float16, device="meta")), says=("meta", "cpu")),
    Case("gptq-scale-dtype", "qlk.from_gptq", "scale_dtype=torch.int32", lambda: gptq(scale_dtype=torch.int32),
         exc=TypeError, says=("scale_dtype",)),
    # ---- from_bnb / from_bnb_state_dict
    Case("bnb-fp4", "qlk.from_bnb", "quant_type='fp4'", lambda: qlk.from_bnb(QW("nf4").qweight, bnb_state(quant_type="fp4")),
         says=("quant_type='fp4'", "'nf4'")),
    Case("bnb-truncated", "qlk.from_bnb_state_dict", "packed weight one byte short",
         lambda: qlk.from_bnb_state_dict(bnb_sd(weight=QW("nf4").qweight[:-1])), says=("2111 bytes", "2112")),
    Case("bnb-int8", "qlk.from_bnb_state_dict", "int8 packed weight",
         lambda: qlk.from_bnb_state_dict(bnb_sd(weight=QW("nf4").qweight.to(torch.int8))), exc=TypeError,
         says=("packed", "torch.uint8", "torch.int8")),
    Case("bnb-no-weight", "qlk.from_bnb_state_dict", "empty dict", lambda: qlk.from_bnb_state_dict({}), says=("no 'weight'",)),
    Case("bnb-state-type", "qlk.from_bnb", "quant_state=5", lambda: qlk.from_bnb(QW("nf4").qweight, 5), exc=TypeError,
         says=("QuantState or a dict", "int")),
    Case("bnb-nan-absmax", "qlk.from_bnb", "NaN absmax (no double quant)",
         lambda: qlk.from_bnb(QW("nf4").qweight, bnb_state(absmax=torch.full((66,), float("nan")))), says=("absmax contains 66 NaN/Inf",)),
    Case("bnb-missing-blocksize", "qlk.from_bnb", "quant_state without blocksize",
         lambda: qlk.from_bnb(QW("nf4").qweight, bnb_state(blocksize=_DROP)), says=("blocksize",)),
    Case("bnb-missing-absmax", "qlk.from_bnb", "quant_state without absmax",
         lambda: qlk.from_bnb(QW("nf4").qweight, bnb_state(absmax=_DROP)), says=("absmax",)),
    Case("bnb-dtype", "qlk.from_bnb", "quant_state dtype='junk'", lambda: qlk.from_bnb(QW("nf4").qweight, bnb_state(dtype="junk")),
         says=("dtype", "junk")),
    Case("bnb-blocksize", "qlk.from_bnb", "blocksize=48 (not a bitsandbytes block size)",
         lambda: qlk.from_bnb(QW("nf4").qweight, bnb_state(blocksize=48, absmax=torch.ones(88))),
         says=("48",)),
    Case("bnb-json", "qlk.from_bnb_state_dict", "garbage in weight.quant_state.bitsandbytes__nf4",
         lambda: qlk.from_bnb_state_dict(bnb_sd(**{"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)})),
         says=("quant_state",)),
    # ---- QuantLinear / patch_model
    Case("qlinear-tensor", "qlk.nn.QuantLinear", "a dense tensor", lambda: QuantLinear(W()), exc=TypeError,
         says=("QuantizedWeight", "Tensor")),
    Case("qlinear-bias", "qlk.nn.QuantLinear", "bias [32] for out_features=33", lambda: QuantLinear(QW(), bias=torch.zeros(32)),
         says=("(32,)", "(33,)")),
    Case("qlinear-qalora-nf4", "qlk.nn.QuantLinear", "method='qalora' on nf4", lambda: QuantLinear(QW("nf4"), method="qalora"),
         says=("fmt='int'", "fmt='nf4'")),
    Case("qlinear-rank", "qlk.nn.QuantLinear", "r=0", lambda: QuantLinear(QW(), method="lora", r=0), says=("r=0", "positive integer")),
    Case("qlinear-forward-dtype", "QuantLinear.forward", "int64 x", lambda: patched()(torch.ones(2, 64, dtype=torch.long)),
         exc=TypeError, says=("torch.int64", "allowed")),
    Case("qlinear-forward-device", "QuantLinear.forward", "x on meta, layer on cpu", lambda: patched()(torch.ones(2, 64, device="meta")),
         says=("x is on meta", "on cpu")),
    Case("qlinear-bias-device", "qlk.nn.QuantLinear", "bias on meta, weight on cpu",
         lambda: QuantLinear(QW(), bias=torch.zeros(33, device="meta")), says=("bias", "meta")),
    Case("qlinear-mixed-device", "qlk.nn.QuantLinear", "weight with scales on meta", lambda: QuantLinear(mixed_device_qw()),
         says=("different devices",)),
    Case("patch-bits", "qlk.patch.patch_model", "bits=5", lambda: patched(bits=5), says=("bits=5", "(2, 3, 4)")),
    Case("patch-bits-float", "qlk.patch.patch_model", "bits=4.0", lambda: patched(bits=4.0), says=("bits=4.0", "(2, 3, 4)"),
         note="was TypeError `<<` on float"),
    Case("patch-group", "qlk.patch.patch_model", "group_size=48 (divides no layer)", lambda: patched(group_size=48),
         says=("in_features=64", "group_size=48", "every target layer's in_features [32, 64]: [8, 16, 32]",
               "skip_incompatible=True (Python)", "--skip-incompatible"),
         note="listed per-layer sizes that failed on other layers, and only the Python kwarg, before issue 14"),
    Case("patch-fmt", "qlk.patch.patch_model", "fmt='fp4'", lambda: patched(fmt="fp4"), says=("fmt='fp4'",)),
    Case("patch-nan", "qlk.patch.patch_model", "a NaN in layer '0'",
         lambda: patch_model(_nan_mlp(), verbose=False), says=("layer '0'", "NaN/Inf")),
    Case("patch-meta", "qlk.patch.patch_model", "a model on the meta device",
         lambda: patch_model(mlp().to("meta"), verbose=False), says=("meta device",)),
    Case("patch-requantize", "qlk.patch.patch_model", "requantize='yes'", lambda: patched(requantize="yes"),
         exc=TypeError, says=("requantize", "'yes'")),
    Case("patch-bnb-qalora", "qlk.patch.patch_model", "method='qalora' on a bitsandbytes NF4 model",
         lambda: patch_model(bnb_mlp("nf4"), verbose=False), says=("'0', '2'", "NF4", "method='qlora'", "requantize=True")),
    Case("patch-bnb-fp4", "qlk.patch.patch_model", "method='qlora' on bitsandbytes FP4 layers",
         lambda: patch_model(bnb_mlp("fp4"), method="qlora", verbose=False),
         says=("'0', '2'", "FP4", "bnb_4bit_quant_type='nf4'", "requantize=True")),
    Case("patch-bnb-int8", "qlk.patch.patch_model", "bitsandbytes 8-bit layers",
         lambda: patch_model(bnb_mlp("int8"), method=None, verbose=False), says=("'0', '2'", "8-bit", "requantize=True")),
    # ---- save / load
    Case("load-truncated-header", "qlk.io.load_quantized", "file cut to 100 bytes",
         lambda: load_quantized(mlp(), truncated(saved_model, lambda n: 100, "cut100.safetensors")),
         says=("cut100.safetensors", "truncated or corrupt")),
    Case("load-truncated-data", "qlk.io.load_quantized", "file missing its last 8 bytes",
         lambda: load_quantized(mlp(), truncated(saved_model, lambda n: n - 8, "cut-tail.safetensors")),
         says=("cut-tail.safetensors", "truncated or corrupt")),
    Case("adapter-truncated", "qlk.io.load_adapter", "adapter file cut in half",
         lambda: load_adapter(patched(), truncated(saved_adapter, lambda n: n // 2, "adapter-half.safetensors")),
         says=("adapter-half.safetensors", "truncated or corrupt")),
    Case("load-foreign", "qlk.io.load_quantized", "a safetensors file not written by qlk",
         lambda: load_quantized(mlp(), file_variant("foreign.safetensors", foreign)),
         says=("foreign.safetensors", "without qlk metadata")),
    Case("adapter-foreign", "qlk.io.load_adapter", "a safetensors file not written by qlk",
         lambda: load_adapter(patched(), file_variant("foreign.safetensors", foreign)), says=("foreign.safetensors", "qlk.save_adapter")),
    Case("load-junk", "qlk.io.load_quantized", "a text file", lambda: load_quantized(
        mlp(), file_variant("junk.bin", lambda p: open(p, "w").write("hello " * 20))), says=("junk.bin", "not a readable safetensors")),
    Case("load-missing", "qlk.io.load_quantized", "a path that does not exist",
         lambda: load_quantized(mlp(), os.path.join(tmp(), "nope.safetensors")), exc=FileNotFoundError, says=("nope.safetensors",)),
    Case("load-kind", "qlk.io.load_quantized", "an adapter file", lambda: load_quantized(mlp(), saved_adapter()),
         says=("adapter.safetensors", "'qlk.adapter'", "qlk.load_adapter")),
    Case("load-other-model", "qlk.io.load_quantized", "a model of another shape",
         lambda: load_quantized(nn.Sequential(nn.Linear(64, 16)), saved_model()), says=("model.safetensors", "[32, 64]", "[16, 64]")),
    Case("adapter-other-rank", "qlk.io.load_adapter", "model patched with r=8, file r=16",
         lambda: load_adapter(patched(r=8), saved_adapter()), says=("r=16", "r=8")),
    Case("load-nan-scales", "qlk.io.load_quantized", "a file whose scales are NaN",
         lambda: load_quantized(mlp(), file_variant("nan-scales.safetensors", with_nan_scales)),
         says=("nan-scales.safetensors", "'0.weight_scales'", "NaN/Inf"), note="was accepted before check_tensor checked finiteness"),
    Case("save-unpatched", "qlk.io.save_quantized", "an unpatched model", lambda: save_quantized(mlp(), os.path.join(tmp(), "x.safetensors")),
         says=("no qlk layer", "patch_model")),
    Case("save-missing-dir", "qlk.io.save_quantized", "a path in a directory that does not exist",
         lambda: save_quantized(patched(), os.path.join(tmp(), "nodir", "x.safetensors")),
         exc=FileNotFoundError, says=("nodir/x.safetensors",)),
    # ---- mixture-of-experts (qlk/nn/experts.py, qlk/kernels/grouped_matmul.py)
    Case("experts-offsets-shape", "qlk.autograd.experts.grouped_experts_linear", "offsets of 3 entries for 4 experts",
         lambda: grouped(offsets=torch.tensor([0, 2, 4])), says=("offsets has shape [3]", "expected [5]")),
    Case("experts-offsets-dtype", "qlk.autograd.experts.grouped_experts_linear", "float offsets",
         lambda: grouped(offsets=torch.tensor([0.0, 1, 2, 3, 4])), exc=TypeError, says=("int32/int64", "torch.float32")),
    Case("experts-count", "qlk.autograd.experts.grouped_experts_linear", "num_experts=5 for a 4·33-row stack",
         lambda: grouped(num_experts=5), says=("132 rows", "num_experts=5")),
    Case("experts-row-token-range", "qlk.autograd.experts.grouped_experts_linear",
         "row_token naming row 9 of x's 4 rows", lambda: grouped(row_token=torch.tensor([0, 1, 2, 9])),
         says=("row_token holds rows 0 .. 9", "x has 4 rows")),
    Case("experts-row-token-dtype", "qlk.autograd.experts.grouped_experts_linear", "float row_token",
         lambda: grouped(row_token=torch.zeros(4)), exc=TypeError, says=("row_token must be an int32/int64", "float32")),
    Case("experts-gate-up-odd", "qlk.autograd.experts.grouped_experts_linear", "gate_up=True with 33 rows an expert",
         lambda: grouped(gate_up=True), says=("gate_up needs an even number of rows per expert", "got 33")),
    Case("experts-group-size", "qlk.patch_model", "group_size=48 on experts with in_features=64",
         lambda: qlk.patch_model(moe_model(), bits=4, group_size=48, method=None, verbose=False),
         says=("experts", "in_features=64", "group_size=48", "skip_incompatible")),
    Case("experts-partial-target", "qlk.patch_model", "target_modules=['down_proj'] (one projection of the experts)",
         lambda: qlk.patch_model(moe_model(), bits=4, group_size=8, target_modules=["down_proj"], verbose=False),
         says=("['down_proj']", "not all of its projections", "name the module ('experts')")),
    Case("peft-export-expert-dropout", "qlk.integrations.peft.export_peft_adapter",
         "expert adapters trained with dropout=0.1 (PEFT's target_parameters refuses lora_dropout)",
         lambda: _export_expert_dropout(), says=("dropout=0.1", "target_parameters", "export again")),
    # ---- the qlk finetune command (UsageError: a ValueError the CLI prints before exiting with status 2)
    Case("finetune-lr-inf", "qlk finetune", "--lr inf", lambda: qlk_finetune("--lr", "inf"), exc=UsageError,
         says=("--lr", "finite positive", "inf"), note="was accepted: every output NaN after the first step"),
    Case("finetune-lr-nan", "qlk finetune", "--lr nan", lambda: qlk_finetune("--lr", "nan"), exc=UsageError,
         says=("--lr", "nan")),
    Case("finetune-alpha", "qlk finetune", "--alpha -1", lambda: qlk_finetune("--alpha", "-1"), exc=UsageError,
         says=("--alpha", "-1"), note="was answered with a group-size hint"),
    Case("finetune-alpha-nan", "qlk finetune", "--alpha nan", lambda: qlk_finetune("--alpha", "nan"), exc=UsageError,
         says=("--alpha", "nan")),
    Case("finetune-dropout", "qlk finetune", "--dropout 1.5", lambda: qlk_finetune("--dropout", "1.5"), exc=UsageError,
         says=("--dropout", "[0, 1)", "1.5"), note="was answered with a group-size hint"),
    Case("finetune-device-cuda", "qlk finetune", "--device cuda on a machine without a GPU",
         lambda: qlk_finetune("--device", "cuda") if not torch.cuda.is_available() else qlk_finetune("--device", "cuda:999"),
         exc=UsageError, says=("--device cuda",), note="was a torch traceback"),
    Case("finetune-device-junk", "qlk finetune", "--device gpu0", lambda: qlk_finetune("--device", "gpu0"), exc=UsageError,
         says=("--device 'gpu0'", "cpu, cuda")),
    Case("finetune-bad-utf8", "qlk finetune", "a data file with a Latin-1 byte on line 2",
         lambda: qlk_finetune("--data", bad_utf8_data()), exc=UsageError,
         says=("latin1.jsonl, line 2", "not valid UTF-8", "0xE9"), note="was a UnicodeDecodeError traceback"),
    Case("finetune-batch-split", "qlk finetune", "--batch-size 6 --grad-accum 4",
         lambda: qlk_finetune("--batch-size", "6", "--grad-accum", "4"), exc=UsageError, says=("--batch-size 6", "multiple of")),
    Case("finetune-overwrite-resume", "qlk finetune", "--overwrite --resume", lambda: qlk_finetune("--overwrite", "--resume"),
         exc=UsageError, says=("contradict",)),
    Case("finetune-fsdp-one-process", "qlk finetune", "--fsdp in one process (not under torchrun)",
         lambda: qlk_finetune("--fsdp"), exc=UsageError, says=("--fsdp", "torchrun --nproc-per-node")),
    # ---- issue 14: hyperparameters (NaN/Inf, and checked before any group-size hint)
    Case("patch-alpha-nan", "qlk.patch.patch_model", "alpha=nan", lambda: patched(alpha=float("nan")),
         says=("alpha=nan", "positive, finite")),
    Case("patch-alpha-inf", "qlk.patch.patch_model", "alpha=inf", lambda: patched(alpha=float("inf")),
         says=("alpha=inf", "positive, finite")),
    Case("patch-alpha-negative", "qlk.patch.patch_model", "alpha=-1 with group_size=48 (which fits no layer)",
         lambda: patched(alpha=-1, group_size=48), says=("alpha=-1", "positive, finite"),
         note="was answered with the group-size hint"),
    Case("patch-dropout", "qlk.patch.patch_model", "dropout=1.5 with group_size=48",
         lambda: patched(dropout=1.5, group_size=48), says=("dropout=1.5", "[0, 1)")),
    Case("patch-dropout-nan", "qlk.patch.patch_model", "dropout=nan", lambda: patched(dropout=float("nan")),
         says=("dropout=nan", "[0, 1)")),
    Case("patch-rank-float", "qlk.patch.patch_model", "r=8.0", lambda: patched(r=8.0), says=("r=8.0", "positive integer")),
    Case("qlinear-alpha-inf", "qlk.nn.QuantLinear", "method='lora', alpha=inf",
         lambda: QuantLinear(QW(), method="lora", alpha=float("inf")), says=("alpha=inf", "finite")),
    Case("lora-linear-scaling-nan", "qlk.autograd.lora_linear", "scaling=nan",
         lambda: _lora_linear(float("nan")), says=("scaling=nan", "finite")),
    Case("qlkconfig-alpha-nan", "qlk.QlkConfig", "method='qalora', alpha=nan",
         lambda: qlk.QlkConfig(method="qalora", alpha=float("nan")), says=("QlkConfig: alpha=nan", "finite")),
    Case("qlkconfig-dropout", "qlk.QlkConfig", "method='lora', dropout=1.0",
         lambda: qlk.QlkConfig(method="lora", dropout=1.0), says=("QlkConfig: dropout=1.0", "[0, 1)")),
    Case("patch-scale-dtype", "qlk.patch.patch_model", "scale_dtype=torch.int32", lambda: patched(scale_dtype=torch.int32),
         exc=TypeError, says=("scale_dtype=torch.int32", "allowed")),
    Case("patch-fp16-underflow", "qlk.patch.patch_model", "layer '2' with |w| ~ 1e-9 (fp16 scales flush to 0)",
         lambda: patch_model(_tiny_mlp(), verbose=False), says=("layer '2'", "scale_dtype=torch.float32"),
         note="checked for every layer before any is converted (was raised mid-conversion, model half-patched)"),
    Case("quantize-partial-underflow", "qlk.quantize", "half the groups at |w| ~ 1e-6 (fp16 scales partly subnormal)",
         lambda: qlk.quantize(_half_tiny()), status="accepts", check=lambda: _warns_subnormal(),
         note="decision: quantizes with a SubnormalScaleWarning naming the count and the worst error in half steps "
              "(patch_model names the layers); scale_dtype=torch.float32 keeps the bound"),
    # ---- issue 14: non-finite state, one check for every load path
    Case("qlinear-nan-bias", "qlk.nn.QuantLinear", "bias with a NaN",
         lambda: QuantLinear(QW(), bias=torch.zeros(33).index_fill(0, torch.tensor([3]), float("nan"))),
         says=("QuantLinear bias contains 1 NaN/Inf",)),
    Case("patch-nan-bias", "qlk.patch.patch_model", "a NaN in the bias of layer '0'",
         lambda: patch_model(_nan_bias_mlp(), verbose=False), says=("layer '0'", "bias has NaN/Inf")),
    Case("adapter-nan", "qlk.io.load_adapter", "an adapter file with an Inf in lora_B",
         lambda: load_adapter(patched(), file_variant("inf-adapter.safetensors", _with_inf_lora_b)),
         says=("inf-adapter.safetensors", "'0.lora_B'", "NaN/Inf"), note="was accepted by load_adapter"),
    Case("load-nan-bias", "qlk.io.load_quantized", "a model file with a NaN dense bias",
         lambda: load_quantized(mlp(), file_variant("nan-bias.safetensors", _with_nan_bias)),
         says=("nan-bias.safetensors", "'0.bias'", "NaN/Inf"), note="was accepted by load_quantized"),
    Case("load-damaged-meta", "qlk.io.load_quantized", "qlk metadata whose 'layers' is a list",
         lambda: load_quantized(mlp(), file_variant("damaged-meta.safetensors", _with_layers_list)),
         says=("damaged-meta.safetensors", "metadata is damaged", "'layers' is a list"),
         note="was AttributeError: 'list' object has no attribute 'items'"),
    Case("adapter-other-base", "qlk.io.load_adapter", "an INT4 adapter onto an INT2 base", lambda: _adapter_onto_int2(),
         status="accepts", check=lambda: _warns_other_base(),
         note="decision: loads with a UserWarning naming both bases (files without the base format: no warning)"),
    # ---- issue 14: ops and patching
    Case("qw-to-dtype", "QuantizedWeight.to", "qw.to(torch.float16) (dtype positional)", lambda: QW().to(torch.float16),
         exc=TypeError, says=("moves devices only", "dtype=torch.float16"), note="cast the packed int32 codes to float"),
    Case("matmul-grad-triton", "qlk.quant_matmul", "x.requires_grad on backend='triton'", lambda: _triton_grad(),
         status="accepts", check=lambda: _triton_grad_ok(),
         note="decision: differentiable on every backend, as bitsandbytes' matmul_4bit (had no grad_fn on Triton)"),
    Case("qalora-empty-batch", "qlk.autograd.qalora_linear", "0 rows (an MoE expert with no tokens), backend='triton'",
         lambda: _empty_qalora(), status="accepts", check=lambda: _empty_qalora() == (0, 128),
         note="crashed in the fused backward; every op is tested with M=0 on both backends in tests/test_faults.py"),
    Case("patch-mha", "qlk.patch.patch_model", "a model with nn.MultiheadAttention", lambda: _patch_mha(), status="accepts",
         check=lambda: _patch_mha() == "NonDynamicallyQuantizableLinear",
         note="decision: its projections stay dense (the attention reads out_proj.weight), with a warning, as "
              "torch.ao.quantization does"),
    Case("patch-shared-linear", "qlk.patch.patch_model", "one nn.Linear reachable by two names", lambda: _patch_shared(),
         status="accepts", check=lambda: _patch_shared(), note="patched once; every name sees the same QuantLinear"),
    Case("gptq-v1-zero-0", "qlk.from_gptq", "v1 qzeros of zero points 0 as GPTQModel's v2->v1 writer stores them",
         lambda: _gptq_v1_zero_0(), status="accepts", check=lambda: _gptq_v1_zero_0(),
         note="decision: read as GPTQModel reads v1 (docs/formats.md); was 14-45% of elements wrong"),
    # ---- qlk export (GGUF)
    Case("export-fmt", "qlk.export.export_model", "fmt='onnx'", lambda: export_encode("fmt"), says=("fmt='onnx'", "'gguf'")),
    Case("export-g16", "qlk export / export_model", "an INT4 g16 layer (Q4_1 blocks are 32 wide), no fallback",
         lambda: export_encode("g16"), exc=GGUFExportError, says=("layer 'x'", "g16", "multiple of 32", "fallback='f16'", "--fallback f16")),
    Case("export-nf4", "qlk export / export_model", "an NF4 layer, no fallback", lambda: export_encode("nf4"),
         exc=GGUFExportError, says=("NF4 has no GGUF block type", "fallback='f16'")),
    Case("export-fallback", "qlk export / export_model", "fallback='f8'", lambda: export_encode("fallback"),
         says=("fallback='f8'", "'f16'", "'q8_0'")),
]


def qlk_finetune(*argv):
    """``qlk finetune ARGS`` up to its first error, as the CLI runs it (which prints the message and
    exits 2). ``--model`` points nowhere: a bad input that got through would fail to load a model."""
    from qlk.cli import build_parser, cmd_finetune

    out = os.path.join(tmp(), "ft-out")
    args = build_parser().parse_args(["finetune", "--model", os.path.join(tmp(), "no-model"), "--output-dir", out,
                                      "--no-progress", *argv])  # fmt: skip
    return cmd_finetune(args)


def bad_utf8_data() -> str:
    def make(path):
        with open(path, "wb") as f:
            f.write(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n')

    return file_variant("latin1.jsonl", make)


def _lora_linear(scaling):
    from qlk.autograd import lora_linear

    return lora_linear(X(), QW(), torch.zeros(4, 128), torch.zeros(33, 4), scaling)


def _tiny_mlp():
    m = mlp()
    with torch.no_grad():
        m[2].weight.mul_(1e-8)
    return m


def _half_tiny():
    w = W(64, 128, seed=3)
    w[:, :64] *= 1e-6
    return w


def _warns_subnormal() -> bool:
    from qlk.formats.int_group import SubnormalScaleWarning

    with pytest.warns(SubnormalScaleWarning, match=r"group\(s\) have scales below torch.float16's normal range"):
        qlk.quantize(_half_tiny())
    return True


def _nan_bias_mlp():
    m = mlp()
    with torch.no_grad():
        m[0].bias[1] = float("nan")
    return m


def _edit(path, src, change_tensors=None, change_meta=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        q = json.loads(meta["qlk"])
        change_meta(q)
        meta["qlk"] = json.dumps(q)
    save_file(tensors, path, metadata=meta)


def _with_inf_lora_b(path):
    _edit(path, saved_adapter(), lambda t: t.update({"0.lora_B": torch.full_like(t["0.lora_B"], float("inf"))}))


def _with_nan_bias(path):
    _edit(path, saved_model(), lambda t: t.update({"0.bias": torch.full_like(t["0.bias"], float("nan"))}))


def _with_layers_list(path):
    _edit(path, saved_model(), change_meta=lambda q: q.update(layers=[1, 2]))


def _adapter_onto_int2():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_adapter(patched(bits=2), saved_adapter())


def _warns_other_base() -> bool:
    with pytest.warns(UserWarning, match="adapter trained on a int4 g32 base, loaded onto a int2 g32 base"):
        load_adapter(patched(bits=2), saved_adapter())
    return True


def _triton_grad():
    x = X().requires_grad_()
    y = qlk.quant_matmul(x, QW(), backend="triton")
    y.sum().backward()
    return x.grad


def _triton_grad_ok() -> bool:
    expected = torch.ones(2, 33, dtype=torch.float64) @ QW().dequantize(torch.float64)
    return torch.allclose(_triton_grad().double(), expected, atol=1e-4)


def _empty_qalora():
    from qlk.autograd import qalora_linear

    x = torch.zeros(0, 128, requires_grad=True)
    a, b = torch.randn(4, 4, requires_grad=True), torch.randn(33, 4, requires_grad=True)
    with qlk.use_backend("triton"):
        qalora_linear(x, QW(), a, b, 1.0).sum().backward()
    return tuple(x.grad.shape)


def _patch_mha():
    import warnings

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(64, 4, batch_first=True)
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(self.att(x, x, x)[0])

    m = Att()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_model(m, verbose=False)
    m(torch.randn(1, 3, 64))
    return type(m.att.out_proj).__name__


def _patch_shared():
    shared = nn.Linear(64, 64)
    m = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    patch_model(m, verbose=False)
    return m[0][0] is m[1][0] and isinstance(m[1][0], qlk.QuantLinear)


def _gptq_v1_zero_0() -> bool:
    k, n, g = 64, 8, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (k // 8, n), generator=gen, dtype=torch.int32) * 0  # codes 0: ŵ = −s·z
    v2 = torch.zeros(k // g, 1, dtype=torch.int32)  # every zero point 0
    v1 = torch.full_like(v2, (0 - 0x11111111) & 0xFFFFFFFF - 2**32)  # the word subtraction GPTQModel writes
    s = torch.full((k // g, n), 0.5, dtype=torch.float16)
    a = qlk.from_gptq(q, v1, s, bits=4, group_size=g, checkpoint_format="gptq").dequantize()
    b = qlk.from_gptq(q, v2, s, bits=4, group_size=g, checkpoint_format="gptq_v2").dequantize()
    return bool(torch.equal(a, b)) and bool((b == 0).all())


def _nan_mlp():
    m = mlp()
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    return m


# ---------------------------------------------------------------------------------- running
def outcome(case: Case) -> str:
    """What the user gets today, one line: 'ExcType: message' or 'no error (...)'."""
    try:
        r = case.call()
    except Exception as e:  # noqa: BLE001 - recording any exception is the point
        if case.volatile:
            return "a torch error from deep inside (RuntimeError or NotImplementedError, it varies)"
        msg = " ".join(str(e).split())
        return f"{type(e).__name__}: {msg}"
    return f"no error (returns {type(r).__name__})"


def _normalize(text: str) -> str:
    if _TMP:
        text = text.replace(_TMP, "<tmp>")
    text = re.sub(r"\.x\.safetensors\.[A-Za-z0-9_]+\.tmp", ".x.safetensors.<random>.tmp", text)
    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table() -> str:
    rows = [
        "| # | entry point | bad input | status | what the user gets (exception: message) | asserted substrings / note |",
        "|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(CASES, 1):
        got = _normalize(outcome(c))
        want = ", ".join(f"`{s}`" for s in c.says)
        if c.status == "gap":
            want = f"**wanted** {c.exc.__name__ if c.exc else ''} with {want}" + (f". {c.note}" if c.note else "")
        elif c.status == "accepts":
            want = c.note
        else:
            want = want + (f" ({c.note})" if c.note else "")
        rows.append(f"| {i} | `{c.entry}` | {_cell(c.given)} | {c.status} | {_cell(got)} | {_cell(want)} |")
    return "\n".join(rows)


def _doc_table() -> str | None:
    if not DOC.exists():
        return None
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write_doc() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{tail}")


# ---------------------------------------------------------------------------------- tests
def _by(status):
    return [pytest.param(c, id=c.id) for c in CASES if c.status == status]


@pytest.mark.parametrize("case", _by("rejects"))
def test_rejects_with_a_message_that_says_what_and_what_is_allowed(case):
    with pytest.raises(case.exc) as info:
        case.call()
    assert type(info.value) is case.exc or case.exc is Exception, f"got {type(info.value).__name__}: {info.value}"
    for s in case.says:
        assert s in str(info.value), f"{s!r} not in: {info.value}"


@pytest.mark.parametrize("case", _by("accepts"))
def test_accepted_by_design_and_correct(case):
    assert case.check(), case.note


@pytest.mark.parametrize("case", _by("gap"))
@pytest.mark.xfail(strict=True, reason="known gap, see docs/bad-inputs.md (strict: passing means fixed — move to rejects)")
def test_known_gaps_wanted_behaviour(case):
    try:
        r = case.call()
    except case.exc as e:
        assert all(s in str(e) for s in case.says), f"{type(e).__name__}: {e}"
        return
    except Exception as e:  # noqa: BLE001
        # ValueError subclasses such as JSONDecodeError do not count as the wanted, named error
        raise AssertionError(f"{type(e).__name__}: {e}") from None
    if case.id == "launcher-overlapping-out":
        x, qw = X(m=32), QW()
        assert torch.allclose(r, x @ qw.dequantize().t(), atol=1e-4), "silently wrong result"
    raise AssertionError("accepted silently")


def test_messages_follow_one_style():
    """Every rejection is a ValueError/TypeError/FileNotFoundError (never AttributeError, KeyError,
    IndexError, RuntimeError or ZeroDivisionError from deep inside) — gaps excepted, listed above."""
    for c in CASES:
        if c.status == "rejects":
            assert c.exc in (ValueError, TypeError, FileNotFoundError, UsageError), c.id
            assert c.says, f"{c.id}: a rejection must assert what its message says"


def test_doc_table_is_current():
    table = _doc_table()
    assert table is not None, f"{DOC} lacks the generated table markers; run: python tests/test_bad_input.py --write-doc"
    expected = render_table()
    if table != expected:
        diff = [f"- {a}\n+ {b}" for a, b in zip(table.splitlines(), expected.splitlines()) if a != b]
        pytest.fail(
            "docs/bad-inputs.md is out of date (a message or a case changed); regenerate it with\n"
            "    python tests/test_bad_input.py --write-doc\nfirst differences:\n" + "\n".join(diff[:5])
        )


def test_checks_helpers_keep_their_style():
    from qlk import _checks

    with pytest.raises(TypeError, match="must be a qlk.QuantizedWeight, got Tensor"):
        _checks.check_quantized_weight(torch.zeros(2))
    with pytest.raises(ValueError, match="different devices"):
        _checks.check_quantized_weight(mixed_device_qw())
    _checks.check_quantized_weight(QW())
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        _checks.check_bias([0.0], 1, torch.device("cpu"))
    with pytest.raises(TypeError, match="bias has dtype torch.int64"):
        _checks.check_bias(torch.zeros(3, dtype=torch.long), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"bias has shape \(2,\), expected \(3,\)"):
        _checks.check_bias(torch.zeros(2), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="bias is on meta"):
        _checks.check_bias(torch.zeros(3, device="meta"), 3, torch.device("cpu"))
    _checks.check_bias(None, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="t is on cpu, expected meta"):
        _checks.check_tensor(torch.zeros(2), "t", device="meta")
    _checks.check_tensor(torch.full((2,), float("nan")), "t", finite=False)
    _checks.check_tensor(torch.zeros(2, device="meta"), "t")  # meta: no values to check
    import numpy as np

    _checks.check_int_bits(np.int64(4))  # numpy integers are integers
    _checks.check_group_size(128, np.int64(32))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-doc"]:
        write_doc()
        print(f"wrote {DOC}")
    else:
        print(render_table())

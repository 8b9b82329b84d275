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
         says=("in_features=64", "group_size=48", "skip_incompatible=True")),
    Case("patch-fmt", "qlk.patch.patch_model", "fmt='fp4'", lambda: patched(fmt="fp4"), says=("fmt='fp4'",)),
    Case("patch-nan", "qlk.patch.patch_model", "a NaN in layer '0'",
         lambda: patch_model(_nan_mlp(), verbose=False), says=("layer '0'", "NaN/Inf")),
    Case("patch-meta", "qlk.patch.patch_model", "a model on the meta device",
         lambda: patch_model(mlp().to("meta"), verbose=False), says=("meta device",)),
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
         says=("nan-scales.safetensors", "layer '0'", "NaN/Inf"), note="was accepted before check_tensor checked finiteness"),
    Case("save-unpatched", "qlk.io.save_quantized", "an unpatched model", lambda: save_quantized(mlp(), os.path.join(tmp(), "x.safetensors")),
         says=("no qlk layer", "patch_model")),
    Case("save-missing-dir", "qlk.io.save_quantized", "a path in a directory that does not exist",
         lambda: save_quantized(patched(), os.path.join(tmp(), "nodir", "x.safetensors")),
         exc=FileNotFoundError, says=("nodir/x.safetensors",)),
    # ---- qlk export (GGUF)
    Case("export-fmt", "qlk.export.export_model", "fmt='onnx'", lambda: export_encode("fmt"), says=("fmt='onnx'", "'gguf'")),
    Case("export-g16", "qlk export / export_model", "an INT4 g16 layer (Q4_1 blocks are 32 wide), no fallback",
         lambda: export_encode("g16"), exc=GGUFExportError, says=("layer 'x'", "g16", "multiple of 32", "fallback='f16'", "--fallback f16")),
    Case("export-nf4", "qlk export / export_model", "an NF4 layer, no fallback", lambda: export_encode("nf4"),
         exc=GGUFExportError, says=("NF4 has no GGUF block type", "fallback='f16'")),
    Case("export-fallback", "qlk export / export_model", "fallback='f8'", lambda: export_encode("fallback"),
         says=("fallback='f8'", "'f16'", "'q8_0'")),
]


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
            assert c.exc in (ValueError, TypeError, FileNotFoundError), c.id
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

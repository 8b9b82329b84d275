"""Import/export of bitsandbytes NF4 (``Linear4bit``) weights. qlk stores NF4 in bitsandbytes' own
bytes, so both directions are a relabelling: no requantization, no loss."""
from __future__ import annotations

import json

import torch

from .._checks import check_tensor
from .nf4 import BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_map, nf4_table
from .quantized_weight import QuantizedWeight, validate

_PACKED_KEY = "quant_state.bitsandbytes__nf4"


def _unpack_json_tensor(t: torch.Tensor, key: str) -> dict:
    try:
        out = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"quant_state entry {key!r} is not bitsandbytes' packed JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"quant_state entry {key!r} holds {type(out).__name__}, not a JSON object")
    return out


def _json_tensor(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _quant_state_dict(quant_state) -> dict:
    """Accept a bitsandbytes QuantState, its ``as_dict()`` (packed or not), or Linear4bit keys."""
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("this QuantState was repacked by bitsandbytes for its CPU kernel (a forward in eval mode "
                         "without grad on a CPU with AVX512-BF16: codes reordered, absmax de-nested to bf16); the "
                         "NF4 bytes it describes are gone. Take the weight from a freshly loaded layer")
    if hasattr(quant_state, "as_dict"):
        return quant_state.as_dict(packed=False)
    if not isinstance(quant_state, dict):
        raise TypeError(f"quant_state must be a bitsandbytes QuantState or a dict, got {type(quant_state).__name__}")
    qs = {k.split(".")[-1]: v for k, v in quant_state.items() if "quant_state" not in k}
    for k, v in quant_state.items():
        if "quant_state" in k:
            if not k.endswith("bitsandbytes__nf4"):
                raise ValueError(f"quant_state entry {k!r}: only NF4 ('bitsandbytes__nf4') imports into qlk")
            qs.update(_unpack_json_tensor(v, k))
    return qs


def from_bnb(packed: torch.Tensor, quant_state) -> QuantizedWeight:
    """A bitsandbytes NF4 weight (``Params4bit`` data + its ``QuantState``) as a ``QuantizedWeight``.

    ``packed`` is the uint8 tensor [(n+1)//2, 1] (any shape with that many bytes);
    ``quant_state`` a ``QuantState``, its ``as_dict()``, or the ``weight.*`` entries of a
    ``Linear4bit`` state dict.
    """
    qs = _quant_state_dict(quant_state)
    missing = [k for k in ("quant_type", "blocksize", "shape", "absmax") if qs.get(k) is None]
    if missing:
        raise ValueError(f"quant_state lacks {missing}; pass a bitsandbytes QuantState or Linear4bit weight.* entries")
    if qs.get("quant_type") != "nf4":
        raise ValueError(f"quant_type={qs.get('quant_type')!r}: qlk imports bitsandbytes 'nf4' weights only")
    if qs.get("shape") is None or len(qs["shape"]) != 2:
        raise ValueError(f"quant_state shape {qs.get('shape')!r}: expected a 2-D [out, in] weight")
    n, k = (int(s) for s in qs["shape"])
    blocksize = int(qs["blocksize"])
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state blocksize={blocksize}; bitsandbytes NF4 uses one of {BLOCKSIZES}")
    dtype_name = qs.get("dtype", "float16")
    if not isinstance(getattr(torch, str(dtype_name), None), torch.dtype):
        raise ValueError(f"quant_state dtype={dtype_name!r} is not a torch dtype (e.g. 'bfloat16')")
    check_tensor(packed, "packed", torch.uint8)
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes; a [{n}, {k}] NF4 weight has {(n * k + 1) // 2}")
    qmap = qs.get("quant_map", qs.get("code"))
    if qmap is not None and not torch.equal(qmap.float().cpu(), nf4_table()):
        raise ValueError("quant_map is not the standard NF4 table; qlk reads standard NF4 only")
    qw = QuantizedWeight(
        fmt="nf4", shape=(n, k), bits=4, group_size=blocksize, qweight=packed.reshape(-1),
        dtype=getattr(torch, str(dtype_name)),
    )  # fmt: skip
    if "nested_absmax" in qs:
        if int(qs.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize={qs['nested_blocksize']}: qlk reads 256 only")
        nmap = qs.get("nested_quant_map")
        if nmap is not None and not torch.equal(nmap.float().cpu(), dynamic_map()):
            raise ValueError("nested_quant_map is not bitsandbytes' signed dynamic map")
        qw.absmax = qs["absmax"]
        qw.absmax_scale = qs["nested_absmax"].float()
        qw.absmax_offset = torch.tensor([float(qs["nested_offset"])], dtype=torch.float32, device=packed.device)
    else:
        qw.absmax = qs["absmax"].float()
    validate(qw, "bitsandbytes weight")
    return qw


def from_bnb_state_dict(sd: dict, prefix: str = "") -> QuantizedWeight:
    """From a ``Linear4bit`` state dict: keys ``{prefix}weight``, ``{prefix}weight.absmax``, …"""
    key = prefix + "weight"
    if key not in sd:
        raise ValueError(f"no {key!r} in the state dict")
    qs = {k[len(key) + 1 :]: v for k, v in sd.items() if k.startswith(key + ".")}
    return from_bnb(sd[key], qs)


def to_bnb_state_dict(qw: QuantizedWeight, prefix: str = "") -> dict:
    """The ``Linear4bit`` state-dict entries (``{prefix}weight``, ``{prefix}weight.absmax``, …)."""
    if qw.fmt != "nf4":
        raise ValueError(f"only NF4 weights export to bitsandbytes, this one is fmt={qw.fmt!r}")
    if qw.perm is not None:
        raise ValueError("a weight with an input permutation has no bitsandbytes form")
    w = prefix + "weight"
    meta = {
        "quant_type": "nf4", "blocksize": qw.group_size,
        "dtype": str(qw.dtype).removeprefix("torch."), "shape": list(qw.shape),
    }  # fmt: skip
    out = {w: qw.qweight.reshape(-1, 1), w + ".absmax": qw.absmax, w + ".quant_map": nf4_table(qw.device).clone()}
    if qw.double_quant:
        out[w + ".nested_absmax"] = qw.absmax_scale
        out[w + ".nested_quant_map"] = dynamic_map(qw.device).clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=qw.absmax_offset.item())
    out[w + "." + _PACKED_KEY] = _json_tensor(meta)
    return out

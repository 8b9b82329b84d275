"""GGUF export: a (merged) qlk model as one file that llama.cpp runs.

Weights. qlk's INT-b group format stores, per group of g inputs, an fp16 scale s and the value c
of the middle code m = 2^(b−1):  ŵ = s·(q − m) + c = s·q + (c − m·s).
GGUF's Q4_1 block (32 inputs: fp16 d, fp16 min, 32 four-bit codes) dequantizes to w = d·q + min.
So with d = s, min = fp16(c − m·s) and the same codes q, a Q4_1 block holds an INT4/INT3/INT2
group exactly except for one rounding: the minimum c − m·s, computed in fp32 and stored in fp16,
is off by at most half an fp16 ulp of |c − m·s|, i.e. |error| ≤ 2^-11·|c − m·s| (relative to the
INT4 step s: ≤ 2^-11·(|c|/s + 8)). Every weight of the block shares that one offset, and the
error is measured and reported per tensor (``GGUFExportReport``). It needs each 32-block to lie in
one group: group sizes that are multiples of 32 (32, 64, 96, 128, ...), scales representable in
fp16, and for act-order (GPTQ ``perm``) weights, blocks whose original columns all come from one
stored group. INT3/INT2 codes (0..7, 0..3) are stored as Q4_1 codes: exact, at Q4_1's 5.0
bits/weight (qlk: INT3 g32 4.0, INT2 g32 3.0). GGUF has no block type with a free per-16 scale and
minimum and no NF4 table (IQ4_NL's table differs), so INT g16/g48/..., NF4 and unmatched act-order
weights have no exact type: they raise, or are written dequantized (``fallback``: F16, Q8_0 or F32)
with the error reported.

Layout. GGUF tensors list dimensions innermost first, so an [out, in] torch weight is a GGUF
tensor of ne = (in, out) with the same bytes, each row being in/32 Q4_1 blocks. llama.cpp applies
rotary embeddings to interleaved pairs (x[2i], x[2i+1]) while Hugging Face Llama rotates halves
(x[i], x[i + d/2]); so the rows (output features) of attn_q and attn_k are reordered per head:
row h·d + 2i + j of the GGUF tensor is HF row h·d + j·d/2 + i (j ∈ {0, 1}), with the KV head count
for attn_k. Reordering rows moves whole Q4_1 rows, so it costs nothing in exactness.

Tokenizer. Byte-level BPE (GPT-2 style: SmolLM2, Llama 3): tokens by id, merges, token types
(NORMAL, CONTROL for special added tokens, USER_DEFINED for other added tokens, UNUSED padding up
to the embedding's vocabulary size), bos/eos/unk/pad ids, add-bos/eos flags and the chat template.
``tokenizer.ggml.pre`` names the pre-tokenizer split that llama.cpp applies; it is read from the
tokenizer's own pre-tokenizer (``tokenizer_pre`` overrides it).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..formats import QuantizedWeight
from ..formats.packing import unpack_codes

#: what a weight without an exact GGUF block type becomes: "error" raises, else the dequantized
#: weight in that type (F16: ≤ 2^-11·|ŵ| per weight; Q8_0: ≤ (1/254 + 2^-11)·max|ŵ| of its 32-block;
#: F32: exact)
FALLBACKS = ("error", "f16", "q8_0", "f32")
#: dense 2-D tensors (embeddings, a dense lm_head, unquantized linears); norms are always F32
FLOAT_TYPES = ("f16", "f32")
#: Hugging Face model_type -> GGUF architecture (Llama family: Llama 2/3, SmolLM2, Mistral)
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
Q4_1_BLOCK = 32
Q4_1_BYTES = 20  # fp16 d, fp16 min, 16 bytes of codes

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


#: what export raises when the model cannot be written as asked (the message names the layer and what
#: to do): a plain ValueError, as every qlk rejection (tests/test_bad_input.py)
GGUFExportError = ValueError


@dataclass
class TensorExport:
    """One tensor of the written file: its GGUF name and type, what it came from and its error
    against the weight qlk computes with (qlk's dequantized ŵ, or the dense tensor)."""

    name: str
    ggml_type: str
    source: str
    shape: tuple
    max_abs_error: float = 0.0
    note: str = ""
    max_error_in_steps: float = float("nan")
    nbytes: int = 0


@dataclass
class GGUFExportReport:
    path: Path
    tensors: list = field(default_factory=list)
    file_type: str = ""
    tokenizer_pre: str = ""

    @property
    def max_abs_error(self) -> float:
        return max((t.max_abs_error for t in self.tensors), default=0.0)

    def by_type(self) -> dict:
        out = {}
        for t in self.tensors:
            out.setdefault((t.source, t.ggml_type), []).append(t)
        return out

    def summary(self) -> str:
        lines = [f"{self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, file type {self.file_type}, "
                 f"{len(self.tensors)} tensors, tokenizer pre {self.tokenizer_pre!r})"]  # fmt: skip
        for (source, ggml_type), ts in self.by_type().items():
            err = max(t.max_abs_error for t in ts)
            notes = sorted({t.note for t in ts if t.note})
            lines.append(f"  {source} -> {ggml_type}: {len(ts)} tensors, max |error| vs qlk {err:.3g}"
                         + (f" ({'; '.join(notes)})" if notes else ""))  # fmt: skip
        return "\n".join(lines)


# ---- weights ---------------------------------------------------------------------------------
def _columns_in_original_order(qw: QuantizedWeight):
    """(codes uint8 [n, k], group index [k]) with columns in the weight's original input order."""
    n, k = qw.shape
    codes = unpack_codes(qw.qweight, qw.bits, k, dtype=torch.uint8)
    group = torch.arange(k, device=codes.device) // qw.group_size
    if qw.perm is not None:  # stored column j holds input perm[j]: input i sits at argsort(perm)[i]
        inv = torch.argsort(qw.perm.to(codes.device))
        codes, group = codes[:, inv], group[inv]
    return codes, group


def _best_code_shift(q: torch.Tensor, s: torch.Tensor, c: torch.Tensor, mid: int):
    """Per block, the code shift t (q' = q + t within 0..15) whose minimum c − (m + t)·s loses least
    to fp16, and that fp16 minimum: ŵ = s·q' + (c − (m + t)·s) for every t, so any t is exact
    algebraically. INT4 blocks that use codes 0 and 15 keep t = 0; INT3/INT2 blocks have 8/12 more
    candidates, so their rounding error is smaller than INT4's (docs/integrations.md measures it)."""
    qmin, qmax = q.amin(-1).to(torch.int64), q.amax(-1).to(torch.int64)
    shift = torch.zeros_like(qmin)
    best_m16 = (c - mid * s).to(torch.float16)
    best_err = (best_m16.double() - (c - mid * s)).abs()
    for t in [t for t in range(-15, 16) if t != 0]:
        ok = (qmin + t >= 0) & (qmax + t <= 15)
        if not bool(ok.any()):
            continue
        m_exact = c - (mid + t) * s
        m16 = m_exact.to(torch.float16)
        err = (m16.double() - m_exact).abs()
        better = ok & (err < best_err) & torch.isfinite(m16)
        shift = torch.where(better, t, shift)
        best_m16 = torch.where(better, m16, best_m16)
        best_err = torch.where(better, err, best_err)
    return shift, best_m16


def int_to_q4_1(qw: QuantizedWeight):
    """Q4_1 blocks for an INT2/3/4 weight, or None when no Q4_1 tensor holds it (see module doc).

    Returns (blocks uint8 [out, in/32·20], max_abs_error, max_error_in_steps): the exact largest
    |(d·q' + min) − (s·(q − m) + c)| over the weight, evaluated in float64, and the largest ratio of
    a block's error to its step s.
    """
    if qw.fmt != "int":
        return None
    n, k = qw.shape
    if k % Q4_1_BLOCK:
        return None
    nb = k // Q4_1_BLOCK
    mid = 1 << (qw.bits - 1)
    codes, group = _columns_in_original_order(qw)
    gb = group.view(nb, Q4_1_BLOCK)
    scales, biases = qw.scales.to(torch.float64), qw.biases.to(torch.float64)
    if bool((gb == gb[:, :1]).all()):
        s_blk, c_blk = scales[:, gb[:, 0]], biases[:, gb[:, 0]]
    else:  # a block spans groups: still one Q4_1 block if those groups share s and c
        s_col, c_col = scales[:, group].view(n, nb, Q4_1_BLOCK), biases[:, group].view(n, nb, Q4_1_BLOCK)
        if not (bool((s_col == s_col[..., :1]).all()) and bool((c_col == c_col[..., :1]).all())):
            return None
        s_blk, c_blk = s_col[..., 0], c_col[..., 0]
    d16 = s_blk.to(torch.float16)
    q = codes.view(n, nb, Q4_1_BLOCK)
    shift, m16 = _best_code_shift(q, s_blk, c_blk, mid)
    if not (bool(torch.isfinite(d16).all()) and bool(torch.isfinite(m16).all())):
        return None
    q = (q.to(torch.int16) + shift.to(torch.int16)[..., None]).to(torch.uint8)
    # exact error per weight: (d16 − s)·q' + (min16 − (c − (m + t)·s)), in row chunks to bound the temporary
    err = steps = 0.0
    for r0 in range(0, n, 1024):
        sl = slice(r0, r0 + 1024)
        m_exact = c_blk[sl] - (mid + shift[sl].double()) * s_blk[sl]
        e = ((d16[sl].double() - s_blk[sl])[..., None] * q[sl].double() + (m16[sl].double() - m_exact)[..., None]).abs()
        err = max(err, float(e.max()))
        block_err = e.amax(-1)
        live = s_blk[sl] > 0
        if bool(live.any()):
            steps = max(steps, float((block_err[live] / s_blk[sl][live]).max()))
    qs = q[..., :16] | (q[..., 16:] << 4)  # byte j: code j in the low nibble, code j + 16 in the high one
    blocks = torch.cat([d16.contiguous().view(torch.uint8).view(n, nb, 2),
                        m16.contiguous().view(torch.uint8).view(n, nb, 2), qs], dim=-1)  # fmt: skip
    return blocks.reshape(n, nb * Q4_1_BYTES).cpu().numpy(), err, steps


def _encode_float(w: torch.Tensor, kind: str):
    """(array, ggml type name, max_abs_error vs w) for a dense [out, in] float32 tensor as ``kind``."""
    import gguf

    w32 = w.detach().to(torch.float32).cpu()
    if kind == "f32":
        return w32.numpy(), "F32", 0.0
    if kind == "f16":
        a = w32.to(torch.float16)
        if not bool(torch.isfinite(a).all()):
            raise GGUFExportError(f"a tensor with max |w| = {w32.abs().max():.3g} overflows F16; use float_type/fallback 'f32'")
        return a.numpy(), "F16", float((a.float() - w32).abs().max()) if w32.numel() else 0.0
    if kind == "q8_0":
        if w32.shape[-1] % 32:
            return _encode_float(w, "f16")
        a = gguf.quants.quantize(w32.numpy(), gguf.GGMLQuantizationType.Q8_0)
        back = torch.from_numpy(gguf.quants.dequantize(a, gguf.GGMLQuantizationType.Q8_0).reshape(w32.shape))
        return a, "Q8_0", float((back - w32).abs().max())
    raise ValueError(f"kind={kind!r}; allowed: {FLOAT_TYPES + ('q8_0',)}")


class Encoded(NamedTuple):
    array: np.ndarray
    ggml_type: str
    max_abs_error: float  # against qlk's dequantized ŵ
    note: str = ""
    max_error_in_steps: float = float("nan")  # Q4_1: error over the block's quantization step s


def encode_quantized(qw: QuantizedWeight, fallback: str = "error", what: str = "weight") -> Encoded:
    """One qlk weight as GGUF data (:class:`Encoded`): Q4_1 when exact, else ``fallback``."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}; allowed: {', '.join(map(repr, FALLBACKS))}")
    exact = int_to_q4_1(qw)
    if exact is not None:
        blocks, err, steps = exact
        note = "" if qw.bits == 4 else f"INT{qw.bits} codes in Q4_1 (5.0 bits/weight)"
        return Encoded(blocks, "Q4_1", err, note, steps)
    why = _no_exact_type_reason(qw)
    if fallback == "error":
        raise GGUFExportError(
            f"{what}: {why}; pass fallback='f16' (error ≤ 2^-11·|ŵ|, 16 bits/weight), 'q8_0' (≤ (1/254 + 2^-11)·max|ŵ| "
            f"per 32, 8.5 bits/weight) or 'f32' (exact, 32 bits/weight) to write it dequantized "
            f"(CLI: --fallback f16), or quantize it as INT2/3/4 with a group size that is a multiple of 32"
        )
    arr, ggml_type, err = _encode_float(qw.dequantize(torch.float32), fallback)
    return Encoded(arr, ggml_type, err, f"fallback: {why}")


def _no_exact_type_reason(qw: QuantizedWeight) -> str:
    n, k = qw.shape
    if qw.fmt == "nf4":
        return "NF4 has no GGUF block type (GGUF's only 4-bit table type, IQ4_NL, uses other levels)"
    if k % Q4_1_BLOCK:
        return f"in_features={k} is not a multiple of 32, the Q4_1 block"
    if qw.perm is not None:
        return f"act-order INT{qw.bits} g{qw.group_size}: its 32-column blocks (original order) mix quantization groups"
    if qw.group_size % Q4_1_BLOCK:
        return f"INT{qw.bits} g{qw.group_size}: Q4_1 blocks of 32 need a group size that is a multiple of 32"
    return f"INT{qw.bits} g{qw.group_size}: its scales or minima do not fit fp16 (scale dtype {qw.scales.dtype})"


def rope_row_order(out_features: int, n_heads: int) -> torch.Tensor:
    """Row index r such that gguf_rows = hf_rows[r] for attn_q / attn_k (module doc)."""
    head_dim = out_features // n_heads
    return torch.arange(out_features).view(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


# ---- tokenizer -------------------------------------------------------------------------------
_PREFERRED_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


def detect_tokenizer_pre(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer``; None if unknown."""
    if not pre:
        return None
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
        except ImportError:
            return None
        names = [n for n, r in splits.items() if r == regex]
        for n in _PREFERRED_PRE:
            if n in names:
                return n
        return names[0] if names else None
    return None


def _merges(model_json: dict) -> list:
    return [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]


def tokenizer_metadata(tokenizer, vocab_size: int, tokenizer_pre: str | None = None) -> dict:
    """The GGUF tokenizer fields for a Hugging Face fast tokenizer (byte-level BPE)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"the tokenizer ({type(tokenizer).__name__}) has no fast (tokenizer.json) backend to export")
    tj = json.loads(backend.to_str())
    model_json = tj.get("model") or {}
    decoder = (tj.get("decoder") or {}).get("type")
    if model_json.get("type") != "BPE" or decoder != "ByteLevel":
        raise GGUFExportError(
            f"tokenizer model {model_json.get('type')!r} with decoder {decoder!r}: qlk exports byte-level BPE tokenizers "
            "(GPT-2 style: SmolLM2, Llama 3); SentencePiece vocabularies are not supported yet"
        )
    id_to_token = {i: t for t, i in model_json["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in id_to_token}
    for added in tj.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    n_tok = max(id_to_token) + 1
    if n_tok > vocab_size:
        raise GGUFExportError(f"the tokenizer has {n_tok} tokens, more than the model's vocab_size={vocab_size} embedding rows")
    tokens, token_types = [], []
    for i in range(vocab_size):
        tokens.append(id_to_token.get(i, f"[PAD{i}]"))
        token_types.append(int(types.get(i, gguf.TokenType.UNUSED)))
    pre = tokenizer_pre or detect_tokenizer_pre(tj.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        warnings.warn(
            f"qlk export: unrecognised pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}; wrote "
            "tokenizer.ggml.pre='default' (llama.cpp may split text differently); pass tokenizer_pre=NAME",
            stacklevel=3,
        )
    meta = {"tokens": tokens, "token_types": token_types, "merges": _merges(model_json), "pre": pre}
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            meta[f"{key}_token_id"] = int(tid)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    meta["add_bos"] = meta.get("bos_token_id") is not None and len(probe) > len(bare) and probe[0] == meta["bos_token_id"]
    meta["add_eos"] = meta.get("eos_token_id") is not None and len(probe) > len(bare) and probe[-1] == meta["eos_token_id"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        meta["chat_template"] = template
    return meta


# ---- model -----------------------------------------------------------------------------------
def _config_value(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def llama_hparams(cfg) -> dict:
    """GGUF hyper-parameters of a Hugging Face Llama-family config (ValueError for what llama.cpp's
    llama architecture would run differently)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"model_type={model_type!r}: qlk exports the Llama family to GGUF ({', '.join(sorted(ARCHITECTURES))})"
        )
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"hidden_act={act!r}: the GGUF llama architecture computes SiLU-gated MLPs")
    if getattr(cfg, "sliding_window", None):
        raise GGUFExportError(f"sliding_window={cfg.sliding_window}: GGUF's llama architecture has no sliding window")
    n_head = cfg.num_attention_heads
    n_kv = _config_value(cfg, "num_key_value_heads", default=n_head)
    head_dim = _config_value(cfg, "head_dim", default=cfg.hidden_size // n_head)
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise GGUFExportError(f"rope type {rope_type!r}: qlk's GGUF export writes default and linear RoPE only")
    return {
        "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size, "n_ff": cfg.intermediate_size,
        "n_head": n_head, "n_head_kv": n_kv, "head_dim": head_dim, "n_ctx": cfg.max_position_embeddings,
        "rope_theta": float(theta if theta is not None else 10000.0), "rms_eps": float(cfg.rms_norm_eps),
        "vocab_size": cfg.vocab_size, "rope_linear_factor": float(rope["factor"]) if rope_type == "linear" else None,
        "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
    }  # fmt: skip


def gguf_tensor_name(hf_module: str) -> str | None:
    """llama.cpp's tensor name (without ``.weight``) for a Hugging Face Llama module name."""
    if hf_module in _TOP_NAMES:
        return _TOP_NAMES[hf_module]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_module)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _file_type(linear_types: list[str]):
    import gguf

    ft = gguf.LlamaFileType
    table = {"Q4_1": ft.MOSTLY_Q4_1, "Q8_0": ft.MOSTLY_Q8_0, "F16": ft.MOSTLY_F16, "F32": ft.ALL_F32}
    if not linear_types:
        return ft.ALL_F32
    most = max(set(linear_types), key=linear_types.count)
    return table[most]


def write_gguf(
    model: nn.Module,
    tokenizer,
    output,
    fallback: str = "error",
    float_type: str = "f16",
    tokenizer_pre: str | None = None,
    name: str | None = None,
    verbose: bool = False,
) -> GGUFExportReport:
    """Write ``model`` (a Hugging Face Llama-family causal LM, qlk-patched or dense) and ``tokenizer``
    to the GGUF file ``output`` (atomically: a temporary file, then a rename). See the module doc."""
    import gguf

    from ..nn.linear import QuantLinear

    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}; allowed: {', '.join(map(repr, FALLBACKS))}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r}; allowed: {', '.join(map(repr, FLOAT_TYPES))}")
    output = Path(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"cannot write {output}: the directory {str(output.parent)!r} does not exist (create it first)")
    hp = llama_hparams(model.config)
    arch = ARCHITECTURES[model.config.model_type]
    tok_meta = tokenizer_metadata(tokenizer, hp["vocab_size"], tokenizer_pre)

    # collect the tensors; every parameter of the model must land in the file (nothing lost silently)
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    done: set[int] = set()
    tensors: list[tuple] = []  # (name, array, GGMLQuantizationType for raw block bytes | None)
    report = GGUFExportReport(path=output, tokenizer_pre=tok_meta["pre"])
    linear_types = []
    modules = list(model.named_modules())
    iterator = modules
    if verbose:
        from tqdm import tqdm

        iterator = tqdm(modules, desc="qlk export: encoding", unit="module")
    for mod_name, module in iterator:
        gname = gguf_tensor_name(mod_name)
        if gname is None:
            continue
        if gname == "output" and getattr(module, "weight", None) is model.get_input_embeddings().weight:
            done.add(id(module.weight))  # tied: llama.cpp reads token_embd when there is no output tensor
            continue
        rope_heads = {"attn_q": hp["n_head"], "attn_k": hp["n_head_kv"]}.get(gname.rpartition(".")[2])
        if isinstance(module, QuantLinear):
            if module.method is not None and bool((module.lora_B != 0).any()):
                raise GGUFExportError(
                    f"layer '{mod_name}' carries an unmerged {module.method} adapter; merge it first (qlk.merge_model, "
                    "as qlk finetune does) and export the merged model"
                )
            qw = module.qweight
            arr, ggml_type, err, note, steps = encode_quantized(qw, fallback, what=f"layer '{mod_name}'")
            source = f"{qw.fmt}{qw.bits} g{qw.group_size}" + (" act-order" if qw.perm is not None else "")
            for p in module.parameters():
                done.add(id(p))
            linear_types.append(ggml_type)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            arr, ggml_type, err = _encode_float(module.weight, float_type)
            note, steps, source = "", float("nan"), "dense" if isinstance(module, nn.Linear) else "embedding"
            if isinstance(module, nn.Linear):
                linear_types.append(ggml_type)
            done.add(id(module.weight))
        elif getattr(module, "weight", None) is not None and module.weight.dim() == 1:  # RMSNorm
            arr, ggml_type, err, note, source = module.weight.detach().float().cpu().numpy(), "F32", 0.0, "", "norm"
            steps = float("nan")
            done.add(id(module.weight))
        else:
            raise GGUFExportError(f"module '{mod_name}' ({type(module).__name__}) has no GGUF encoding in qlk")
        if rope_heads is not None:
            arr = arr[rope_row_order(arr.shape[0], rope_heads).numpy()]
        raw = getattr(gguf.GGMLQuantizationType, ggml_type) if arr.dtype == np.uint8 else None
        tensors.append((f"{gname}.weight", np.ascontiguousarray(arr), raw))
        shape = module.qweight.shape if isinstance(module, QuantLinear) else tuple(module.weight.shape)
        report.tensors.append(TensorExport(f"{gname}.weight", ggml_type, source, shape, err, note, steps, arr.nbytes))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not gname.endswith("norm"):  # Llama: attention_bias / mlp_bias
            b = bias.detach().float().cpu().numpy()
            if rope_heads is not None:
                b = b[rope_row_order(b.shape[0], rope_heads).numpy()]
            tensors.append((f"{gname}.bias", np.ascontiguousarray(b), None))
            report.tensors.append(TensorExport(f"{gname}.bias", "F32", "bias", tuple(b.shape), nbytes=b.nbytes))
            done.add(id(bias))
    if any(t.source == "bias" for t in report.tensors):
        warnings.warn(
            "qlk export: wrote Llama linear biases (attention_bias/mlp_bias, attn_q/attn_k biases in the rope row "
            "order); llama.cpp reads them, transformers' GGUF loader ignores them; no reader verified them in qlk's tests",
            stacklevel=2,
        )
    left = sorted(n for i, n in params.items() if i not in done)
    if left:
        raise GGUFExportError(f"{len(left)} parameter(s) have no place in the GGUF llama layout: {left[:6]}")

    ft = _file_type(linear_types)
    report.file_type = ft.name
    fd, tmp = tempfile.mkstemp(prefix="." + output.name + ".", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch=arch)
        w.add_name(name or str(getattr(model.config, "name_or_path", "") or "qlk model"))
        w.add_quantized_by("qlk")
        w.add_block_count(hp["n_layer"])
        w.add_context_length(hp["n_ctx"])
        w.add_embedding_length(hp["n_embd"])
        w.add_feed_forward_length(hp["n_ff"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_head_kv"])
        w.add_rope_freq_base(hp["rope_theta"])
        w.add_layer_norm_rms_eps(hp["rms_eps"])
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp["head_dim"])
        if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        if hp["rope_linear_factor"] is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(hp["rope_linear_factor"])
        w.add_file_type(int(ft))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok_meta["pre"])
        w.add_token_list(tok_meta["tokens"])
        w.add_token_types(tok_meta["token_types"])
        w.add_token_merges(tok_meta["merges"])
        for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                         ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):  # fmt: skip
            if key in tok_meta:
                add(tok_meta[key])
        w.add_add_bos_token(bool(tok_meta["add_bos"]))
        w.add_add_eos_token(bool(tok_meta["add_eos"]))
        if "chat_template" in tok_meta:
            w.add_chat_template(tok_meta["chat_template"])
        for tname, arr, raw in tensors:
            w.add_tensor(tname, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=verbose)
        w.close()
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return report


def _load(model_dir):
    """(model, tokenizer) for a qlk model directory, a qlk ``.safetensors`` file with config.json and
    the tokenizer beside it, or a dense Hugging Face directory."""
    from ..hf_models import ModelLoadError, load_model, load_tokenizer

    p = Path(model_dir)
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            is_qlk = "qlk" in (f.metadata() or {})
        if is_qlk:
            from transformers import AutoConfig, AutoModelForCausalLM

            from ..io import load_quantized

            if not (p.parent / "config.json").is_file():
                raise ModelLoadError(f"{p}: a qlk model file without config.json beside it to build the architecture from")
            config = AutoConfig.from_pretrained(str(p.parent), local_files_only=True)
            model = AutoModelForCausalLM.from_config(config)
            load_quantized(model, p)
            if getattr(config, "tie_word_embeddings", False):
                model.tie_weights()
            return model.eval(), load_tokenizer(p.parent)
    model, tok, _ = load_model(p)
    return model, tok


def export_gguf(model_dir, output=None, fallback: str = "error", float_type: str = "f16",
                tokenizer_pre: str | None = None, verbose: bool = False) -> GGUFExportReport:  # fmt: skip
    """Load ``model_dir`` (see :func:`qlk.export.export_model`) and write it with :func:`write_gguf`.
    ``output`` defaults to ``<model_dir>/model.gguf``."""
    p = Path(model_dir)
    if output is None:
        output = (p if p.is_dir() else p.parent) / "model.gguf"
    model, tok = _load(p)
    return write_gguf(model, tok, output, fallback=fallback, float_type=float_type, tokenizer_pre=tokenizer_pre,
                      name=p.resolve().name, verbose=verbose)  # fmt: skip


__all__ = ["export_gguf", "write_gguf", "int_to_q4_1", "encode_quantized", "GGUFExportReport", "GGUFExportError",
           "FALLBACKS", "FLOAT_TYPES", "detect_tokenizer_pre", "rope_row_order", "gguf_tensor_name"]  # fmt: skip

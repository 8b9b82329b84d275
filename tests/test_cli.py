"""The ``qlk`` command end to end on a tiny random Llama (built offline): finetune, outputs that
load, eval / quantize / inspect, bad input, and resume equivalence."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from qlk.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
FAST = ["--steps", "4", "--batch-size", "4", "--max-length", "48", "--save-every", "2", "--no-progress",
        "--max-new-tokens", "4", "--prompt", "What is 2+2?"]  # fmt: skip


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials) built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [{"instruction": f"What is {i}+{i}?", "response": f"Answer: {2 * i}.\nReason: {i} plus {i}."} for i in range(12)]
    rows.append({"text": "A plain text record is also fine. " * 3})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QLK_CACHE_DIR", "off")


def run_ft(tiny_model, data_file, out, *extra):
    return main(["finetune", "--model", str(tiny_model), "--data", str(data_file), "--output-dir", str(out),
                 *FAST, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(tiny_model, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    os.environ["QLK_CACHE_DIR"] = "off"
    assert run_ft(tiny_model, data_file, out, "--export", "gguf") == 0
    return out


def test_finetune_outputs_exist_and_load(finetuned, tiny_model):
    from qlk.hf_models import load_model
    from qlk.io import load_adapter
    from qlk.patch import patch_model, qlk_layers

    for name in ("adapter.safetensors", "loss.png", "summary.json", "run_config.json", "checkpoints/checkpoint-4/COMPLETE",
                 "checkpoints/checkpoint-4/adapter.safetensors", "merged/model.qlk.safetensors", "merged/config.json"):  # fmt: skip
        assert (finetuned / name).is_file(), name
    assert not (finetuned / ".qlk-staging").exists()
    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["losses"]) == 4
    # the configuration as run: defaults resolved, the same group size as run_config.json
    run_config = json.loads((finetuned / "run_config.json").read_text())
    assert summary["config"]["group_size"] == run_config["group_size"] == 32
    assert all(map(lambda v: v == v, summary["losses"]))  # no NaN
    assert summary["memory_training"]["bits_per_param_quantized"] > 4
    assert "before" in summary and "after" in summary
    check = summary["merge_check"]  # perplexity of the same text before and after the QA-LoRA merge
    assert check["tokens"] > 0 and abs(check["ppl_merged"] - check["ppl_unmerged"]) <= 1e-3 * check["ppl_unmerged"]
    assert check["window"] == 512 and set(summary["eval"]) == {"4"}  # eval split perplexity logged during training
    # the merged directory loads as a qlk model without any adapter left
    model, tok, desc = load_model(finetuned / "merged")
    layers = qlk_layers(model)
    assert layers and all(m.method is None and m.bits == 4 for m in layers.values())
    out = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(out).all()
    # the adapter loads onto a freshly patched base, and the merged model equals base + adapter
    base, _, _ = load_model(tiny_model)
    patch_model(base, bits=4, group_size=32, method="qalora", r=16, alpha=32, verbose=False)
    load_adapter(base, finetuned / "adapter.safetensors")
    x = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=x).logits, model(input_ids=x).logits, atol=2e-3, rtol=2e-3)


def test_finetune_export_gguf_holds_the_merged_weights(finetuned):
    """--export gguf: model.gguf next to merged/, read by the gguf package (not qlk): the Q4_1 blocks
    of every projection dequantize to the merged INT4 weights within the fp16 rounding of the block
    minimum (docs/integrations.md), with q/k rows in llama.cpp's rotary order."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from qlk.hf_models import load_model
    from qlk.patch import qlk_layers

    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["export"]["file"] == "model.gguf"
    reader = gguf.GGUFReader(str(finetuned / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    model, _, _ = load_model(finetuned / "merged")
    layers = qlk_layers(model)
    for hf, name in (("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"),
                     ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight")):  # fmt: skip
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float64")).reshape(layers[hf].out_features, -1)
        want = layers[hf].qweight.dequantize(torch.float64)
        assert (got - want).abs().max() <= 2.0**-10 * want.abs().max() + 1e-6, hf


def test_merge_check_and_eval_report_the_same_measurement(finetuned, capsys):
    """finetune's merge check and `qlk eval --max-tokens 512 --window 512` on the merged model: one
    function, one wording, one number (up to the dense vs quantized-layer decode, < 1e-4)."""
    check = json.loads((finetuned / "summary.json").read_text())["merge_check"]
    assert main(["eval", "--model", str(finetuned / "merged"), "--max-tokens", "512", "--window", "512",
                 "--max-new-tokens", "0"]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert f"first {check['tokens']} tokens, {check['windows']} window(s) of <= 512" in shown
    ppl = float(re.search(r"window\(s\) of <= 512\).*?: ([0-9.]+)  \[", shown).group(1))
    assert ppl == pytest.approx(check["ppl_merged"], rel=1e-4)


def test_eval_quantize_inspect(finetuned, tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", "--model", str(finetuned / "merged"), "--text", str(text), "--max-tokens", "300",
                 "--window", "128", "--max-new-tokens", "3", "--prompt", "Hi", "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["perplexity"]["ppl"] > 1 and res["perplexity"]["tokens"] > 100
    assert main(["eval", "--model", str(tiny_model), "--adapter", str(finetuned / "adapter.safetensors"),
                 "--text", str(text), "--max-tokens", "200", "--max-new-tokens", "0", "--json"]) == 0  # fmt: skip
    patched = json.loads(capsys.readouterr().out)["perplexity"]["ppl"]
    assert patched == pytest.approx(res["perplexity"]["ppl"], rel=0.05) or patched > 1
    qdir = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model), "--bits", "3", "--group-size", "32", "--output-dir", str(qdir)]) == 0
    assert (qdir / "model.qlk.safetensors").is_file()
    capsys.readouterr()
    assert main(["inspect", str(qdir)]) == 0
    shown = capsys.readouterr().out
    assert "qlk.quantized_model" in shown and "int3 g32" in shown and "model.layers.0.self_attn.q_proj" in shown
    assert main(["inspect", str(finetuned / "adapter.safetensors")]) == 0
    assert "qlk.adapter" in capsys.readouterr().out
    assert main(["quantize", "--model", str(tiny_model), "--output-dir", str(qdir)]) == 2  # exists


def test_bad_json_line_names_line_number(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": oops}\n')
    assert run_ft(tiny_model, bad, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "not valid JSON" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "a", "answer": "b"}\n')
    assert run_ft(tiny_model, wrong, tmp_path / "o2") == 2
    assert "line 1" in capsys.readouterr().err


def test_empty_and_missing_dataset(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert run_ft(tiny_model, empty, tmp_path / "o") == 2
    assert "no records" in capsys.readouterr().err
    assert run_ft(tiny_model, tmp_path / "nope.jsonl", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err


def test_existing_output_dir_refused(tiny_model, data_file, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    assert run_ft(tiny_model, data_file, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "something.txt").read_text() == "mine"


def test_model_without_weights_and_bad_group_size(tiny_model, data_file, tmp_path, capsys):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model / "config.json").read_text())
    assert main(["finetune", "--model", str(empty), "--data", str(data_file), "--output-dir", str(tmp_path / "o"), *FAST]) == 2
    assert "no weights" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "missing"), "--data", str(data_file),
                 "--output-dir", str(tmp_path / "o2"), *FAST]) == 2  # fmt: skip
    assert "no such file" in capsys.readouterr().err
    # hidden 64 is not divisible by 48: the error names the layers and the sizes that work
    assert run_ft(tiny_model, data_file, tmp_path / "o3", "--group-size", "48") == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "divide every layer of this model: [8, 16, 32, 64]" in err
    assert "--skip-incompatible" in err


def test_skip_incompatible_leaves_those_layers_dense(tiny_model):
    """--skip-incompatible is patch_model(skip_incompatible=True): group 128 fits only down_proj (in 128)."""
    from qlk.hf_models import load_model
    from qlk.patch import qlk_layers
    from qlk.train.command import _patch
    from qlk.train.config import FinetuneConfig

    model, _, _ = load_model(tiny_model)
    with pytest.warns(UserWarning, match="skipping 12 layer"):
        _patch(model, FinetuneConfig(group_size=128, skip_incompatible=True, progress=False))
    assert sorted(qlk_layers(model)) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_python_m_qlk_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "qlk", "finetune", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--resume" in r.stdout and "--group-size" in r.stdout


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_rank_of_several_leaves_without_the_teardown(world):
    """``python -m qlk`` under torchrun (WORLD_SIZE > 1) ends by os._exit once its streams are
    flushed: the interpreter's teardown, where gloo's threads could abort a finished rank (and
    torchrun then killed rank 0 mid-write), does not run; one process exits as usual. Both keep the
    exit status and the printed output."""
    code = ("import atexit, sys\n"
            "from qlk.cli import exit_process\n"
            "atexit.register(lambda: print('teardown ran'))\n"
            "print('written', flush=False)\n"
            "exit_process(3)\n")
    env = dict(os.environ, WORLD_SIZE=world, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3 and "written" in r.stdout
    assert ("teardown ran" in r.stdout) == (world == "1"), r.stdout

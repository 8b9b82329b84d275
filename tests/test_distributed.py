"""DDP and FSDP2 (fully_shard) on CPU/gloo through torchrun, against a single-process run.

One torchrun launch (2 processes, ~15 s on 2 cores) runs every case of tests/_dist_worker.py;
the tests below assert on its JSON summary.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["ddp/qalora", "ddp/lora", "fsdp2/qalora", "fsdp2/lora"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc_per_node=2", "--standalone", os.path.join(ROOT, "tests", "_dist_worker.py"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", QLK_BACKEND="reference", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_matches_single_process(results, case):
    r = results[case]
    assert results["world"] == 2
    assert r["n_grads"] == 28  # 7 linears × 2 layers, lora_A and lora_B each
    assert r["grad_rel_err"] < 1e-5, r
    assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-5, abs=1e-6)
    assert r["loss"][-1] < r["loss"][0]  # it trains
    assert r["buffers_whole"]  # packed weights: plain tensors, identical to the unsharded model's


@pytest.mark.parametrize("method", ["qalora", "lora"])
def test_fsdp2_shards_adapters_not_packed_weights(results, method):
    r = results[f"fsdp2/{method}"]
    assert r["adapters_sharded"] and r["check_fsdp_after"] == 14


def test_wrapping_order_mistakes_are_explained(results):
    assert "fully_shard ran before qlk.patch_model" in results["err_shard_before_patch_check"]
    assert "cannot quantize a sharded weight" in results["err_shard_before_patch"]
    assert "patch the unsharded model first" in results["err_shard_before_patch"].lower()
    assert "registered as a parameter" in results["err_packed_as_parameter"]
    assert "sliced or sharded" in results["err_sliced_buffer"]


def test_check_fsdp_single_process():
    """check_fsdp needs no process group: it checks a patched model before it is wrapped."""
    import transformers

    import qlk
    from qlk.integrations import FSDPWrapError, check_fsdp

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(FSDPWrapError, match="call qlk.patch_model first"):
        check_fsdp(model)
    qlk.patch_model(model, verbose=False)
    assert len(check_fsdp(model)) == 7

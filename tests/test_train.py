"""``qlk finetune`` on the Trainer: resume after SIGINT / SIGKILL at several points of a step equals
an uninterrupted run, the same run under torchrun (2 processes, gloo; DDP, and FSDP2 with --fsdp)
matches one process, an FSDP2 run resumed after Ctrl-C equals the uninterrupted FSDP2 run, the
output directory is locked, and --overwrite replaces outputs only once new ones exist.

A tiny random Llama and 4 steps; interrupted runs are subprocesses (tests/_ft_interrupt.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from qlk.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_cli import TINY, byte_tokenizer  # noqa: E402

ARGS = ["--steps", "4", "--batch-size", "4", "--max-length", "48", "--save-every", "2", "--eval-every", "2",
        "--no-progress", "--no-generate"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("train")
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"instruction": f"What is {i}+{i}?", "response": f"Answer: {2 * i}.\nReason: {i} plus {i}."} for i in range(14)]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def ft_args(tiny, out, *extra):
    return ["finetune", "--model", str(tiny / "model"), "--data", str(tiny / "d.jsonl"), "--output-dir", str(out), *ARGS, *extra]


def env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", QLK_CACHE_DIR="off", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def reference(tiny):
    """One uninterrupted single-process run: the result every other run must reproduce."""
    out = tiny / "reference"
    assert main(ft_args(tiny, out)) == 0
    return out


@pytest.fixture(scope="module")
def reference_dropout(tiny):
    """The uninterrupted run for the resume tests: with adapter dropout, so that resuming must also
    restore the RNG state (the dropout masks of the redone steps)."""
    out = tiny / "reference-dropout"
    assert main(ft_args(tiny, out, "--dropout", "0.1")) == 0
    return out


def same_result(a: Path, b: Path, atol=0.0, loss_rtol=0.0):
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol == 0:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(tb[k], ta[k], atol=atol, rtol=0, msg=k)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert len(sa["losses"]) == len(sb["losses"]) == 4
    assert sb["losses"] == pytest.approx(sa["losses"], rel=loss_rtol, abs=0)
    assert sb["eval"].keys() == sa["eval"].keys()
    return sa, sb


def interrupt_then_resume(tiny, out, signal, at, step):
    args = ft_args(tiny, out, "--dropout", "0.1")
    cmd = [sys.executable, str(REPO / "tests" / "_ft_interrupt.py"), "--send", signal, "--at", at, "--step", str(step),
           "--", *args]  # fmt: skip
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    want = -9 if signal == "KILL" else 130
    assert r.returncode == want, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (out / "adapter.safetensors").exists()
    if signal == "INT":
        assert "continue with the same command plus --resume" in r.stdout
    assert main([*args, "--resume"]) == 0


CI_CASES = [("INT", "optimizer", 3), ("KILL", "optimizer", 3)]
# checkpoints at steps 2 and 4: a kill inside step 3 or inside checkpoint-4 resumes from checkpoint-2
SLOW_CASES = [("KILL", "forward", 3), ("KILL", "backward", 3), ("KILL", "checkpoint", 4), ("INT", "forward", 2),
              ("INT", "checkpoint", 2)]  # fmt: skip


@pytest.mark.parametrize("signal,at,step", CI_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CASES])
def test_resume_after_interrupt_equals_uninterrupted(tiny, reference_dropout, signal, at, step):
    out = tiny / f"{signal}-{at}-{step}"
    interrupt_then_resume(tiny, out, signal, at, step)
    same_result(reference_dropout, out)  # bit for bit on CPU
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) == 1


def torchrun(*args):
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc-per-node", "2", "--standalone", "-m", "qlk", *args]
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert "terminate called" not in r.stderr, r.stderr[-5000:]  # a rank died at exit (see test_every_rank_destroys...)
    return r


def test_two_processes_match_one(tiny, reference):
    """DDP, same global batch (4 = 2 processes x 2): the loss curve and adapter match one process up to
    float summation order (the all-reduce adds two half-batch gradients where one process adds all rows)."""
    out = tiny / "ddp"
    r = torchrun(*ft_args(tiny, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.stdout.count("done in") == 1  # only rank 0 reports and writes
    sa, sb = same_result(reference, out, atol=1e-6, loss_rtol=1e-6)  # seen: 3e-8 on |values| <= 0.7; 9e-8
    assert sb["world_size"] == 2 and sb["config"]["batch_size"] == 4


@pytest.fixture(scope="module")
def fsdp_run(tiny):
    """The run of test_fsdp_two_processes_match_one: FSDP2 over 2 processes (gloo), uninterrupted."""
    out = tiny / "fsdp"
    return out, torchrun(*ft_args(tiny, out, "--fsdp", "--grad-accum", "2"))


def test_fsdp_two_processes_match_one(tiny, reference, fsdp_run):
    """FSDP2 (qlk shards the patched model with fully_shard; the Trainer does not wrap it again) with 2
    accumulation steps of 1 example per rank (one reduce-scatter per step), same global batch as one
    process: loss curve and adapter equal up to float summation order (seen: 1.7e-7 relative, 1.8e-7
    absolute). Fails if gradients were reduced twice or not at all (each rank's own half)."""
    out, r = fsdp_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.stdout.count("done in") == 1 and "fsdp2" in r.stdout  # only rank 0 reports and writes
    sa, sb = same_result(reference, out, atol=1e-6, loss_rtol=1e-6)
    assert sb["world_size"] == 2 and sb["config"]["fsdp"] is True
    assert sb["fsdp"]["sharded_adapter_tensors"] == 2 * sb["fsdp"]["qlk_layers_checked"] > 0
    # rank 0 merged the gathered full adapter: the merge check sees the one-process model's perplexity
    for key in ("ppl_unmerged", "ppl_merged"):
        assert sb["merge_check"][key] == pytest.approx(sa["merge_check"][key], rel=1e-5)
    ta, tb = (load_file(d / "adapter.safetensors") for d in (reference, out))
    print("fsdp vs one process: max |adapter diff|", max((ta[k] - tb[k]).abs().max().item() for k in ta),
          "loss rel diff", max(abs(b - a) / abs(a) for a, b in zip(sa["losses"], sb["losses"])))


def test_fsdp_resume_after_ctrl_c_equals_uninterrupted(tiny, fsdp_run):
    """Ctrl-C on both ranks after the optimizer step of step 3: the ranks agree to stop, the checkpoint
    gathers the sharded adapter and Adam state to rank 0; the resumed FSDP2 run (every rank takes its
    shard back) ends bit for bit where the uninterrupted FSDP2 run ends."""
    ref, r = fsdp_run
    assert r.returncode == 0, r.stderr[-3000:]
    out = tiny / "fsdp-int"
    args = ft_args(tiny, out, "--fsdp", "--grad-accum", "2")
    exe = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd = [*exe, str(REPO / "tests" / "_ft_interrupt.py"), "--send", "INT", "--at", "optimizer", "--step", "3", "--", *args]
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode != 0 and "continue with the same command plus --resume" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (out / "adapter.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    r = torchrun(*args, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    same_result(ref, out)


def test_every_rank_destroys_its_process_group(tmp_path, monkeypatch):
    """A rank that leaves the process group to the interpreter's teardown can die of SIGABRT at exit (gloo
    worker threads still hold the last collective's work), and torchrun then kills rank 0 before it
    writes its outputs (seen in CI). ``run`` must destroy the group on every exit path, errors too."""
    import torch.distributed as dist

    from qlk.train import command

    closed = []
    monkeypatch.setattr(command.Distributed, "close", lambda self: closed.append(self.rank))

    def fail(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(command, "_run", fail)
    cfg = command.FinetuneConfig(output_dir=str(tmp_path / "out"), data=None)
    with pytest.raises(RuntimeError, match="boom"):
        command.run(cfg)
    assert closed == [0]
    monkeypatch.undo()

    # close() itself: a started group is gone afterwards (one-process gloo group standing in for a launch)
    d = command.Distributed("cpu")
    d.world = 2
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.is_initialized()
    d.close()
    assert not dist.is_initialized()


def test_fsdp_in_one_process_is_refused(tiny, tmp_path, capsys):
    assert main(ft_args(tiny, tmp_path / "fsdp", "--fsdp")) == 2
    assert "--fsdp shards the model over processes" in capsys.readouterr().err


def test_second_run_into_a_locked_dir_is_refused(tiny, tmp_path, capsys):
    from qlk.train.outputs import LOCK, DirectoryLock

    out = tmp_path / "busy"
    out.mkdir()
    held = DirectoryLock(out)
    held.acquire()  # another run holds the directory
    try:
        assert main(ft_args(tiny, out)) == 2
        err = capsys.readouterr().err
        assert "in use by another qlk finetune" in err and f"pid {os.getpid()}" in err
    finally:
        held.release()
    # a lock file left by a run that died holds no flock: the next run takes it over
    (out / LOCK).write_text("pid 999999 on somewhere, since long ago")
    assert main(ft_args(tiny, out, "--steps", "1", "--eval-fraction", "0")) == 0


def test_overwrite_keeps_user_files_and_old_outputs_until_new_ones_exist(tiny, reference, tmp_path, monkeypatch):
    from qlk.train import trainer as trainer_mod

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    old_adapter = (out / "adapter.safetensors").read_bytes()

    def broken_train(self, *a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainer_mod.QlkTrainer, "train", broken_train)
    with pytest.raises(RuntimeError, match="disk full"):
        main(ft_args(tiny, out, "--overwrite", "--seed", "1"))
    assert (out / "adapter.safetensors").read_bytes() == old_adapter  # the failed run replaced nothing
    assert (out / "merged" / "model.qlk.safetensors").is_file() and (out / "summary.json").is_file()
    monkeypatch.undo()
    assert main(ft_args(tiny, out, "--overwrite", "--seed", "1")) == 0
    assert (out / "adapter.safetensors").read_bytes() != old_adapter
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / ".qlk-staging").exists()
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1

"""torchrun worker for tests/test_distributed.py (CPU, gloo):

    torchrun --nproc_per_node=2 --standalone tests/_dist_worker.py --out results.json

For each (wrapper, method) in {ddp, fsdp2} × {qalora, lora}: every rank builds the same tiny
patched Llama (same seed), trains STEPS AdamW steps on its half of a fixed global batch, and
compares, on rank 0, the adapter gradients of step 1 and the global loss of every step with a
single-process run on the whole global batch. Also exercises the FSDP wrapping-order checks.
Rank 0 writes a JSON summary to --out; the pytest side asserts on it.
"""
import argparse
import copy
import json
import os
import sys

os.environ.setdefault("QLK_BACKEND", "reference")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import qlk  # noqa: E402
from qlk.integrations import FSDPWrapError, check_fsdp, shard_model  # noqa: E402

VOCAB, STEPS, GLOBAL_B, T = 128, 3, 4, 16


def build(method, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    qlk.patch_model(model, bits=4, group_size=32, method=method, r=4, alpha=8, verbose=False)
    with torch.no_grad():  # nonzero B so that A gets a gradient too
        for m in model.modules():
            if isinstance(m, qlk.QuantLinear):
                m.lora_B.normal_(0, 0.05)
    return model.train()


def global_batch():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (GLOBAL_B, T), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def adapter_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            key = n.removeprefix("module.").replace("_fsdp_wrapped_module.", "")
            out[key] = g.detach().clone()
    return out


def train(model, batch, distributed):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], None
    for step in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            grads = adapter_grads(model)
        opt.step()
        opt.zero_grad()
        l = loss.detach().clone()
        if distributed:  # the global-batch loss: mean of the (equal-size) per-rank means
            dist.all_reduce(l)
            l /= dist.get_world_size()
        losses.append(l.item())
    return losses, grads


def compare(ref, got):
    (l_ref, g_ref), (l_got, g_got) = ref, got
    assert g_ref.keys() == g_got.keys(), (sorted(g_ref)[:3], sorted(g_got)[:3])
    grad_err = max(((g_got[k] - g_ref[k]).abs().max() / g_ref[k].abs().max().clamp_min(1e-12)).item() for k in g_ref)
    return {"loss_ref": l_ref, "loss": l_got, "grad_rel_err": grad_err, "n_grads": len(g_ref)}


def buffers_whole(model, ref_model):
    ref = {n: b for n, b in ref_model.named_buffers() if "weight_" in n}
    got = {n.removeprefix("module."): b for n, b in model.named_buffers() if "weight_" in n}
    return ref.keys() == got.keys() and all(torch.equal(ref[n], got[n]) and type(got[n]) is torch.Tensor for n in ref)


def expect_error(fn):
    try:
        fn()
    except (ValueError, FSDPWrapError) as e:
        return str(e)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    batch = global_batch()
    per = GLOBAL_B // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    results = {"world": world}
    for method in ("qalora", "lora"):
        base = build(method)
        ref = train(copy.deepcopy(base), batch, distributed=False)

        ddp_model = copy.deepcopy(base)
        ddp = DDP(ddp_model)
        results[f"ddp/{method}"] = compare(ref, train(ddp, local, distributed=True))
        results[f"ddp/{method}"]["buffers_whole"] = buffers_whole(ddp, base)

        fsdp_model = copy.deepcopy(base)
        shard_model(fsdp_model, mesh=mesh)  # check_fsdp → fully_shard(each LlamaDecoderLayer) → root
        res = compare(ref, train(fsdp_model, local, distributed=True))
        res["buffers_whole"] = buffers_whole(fsdp_model, base)
        res["adapters_sharded"] = all(
            type(p).__name__ == "DTensor" for n, p in fsdp_model.named_parameters() if p.requires_grad
        )
        res["check_fsdp_after"] = len(check_fsdp(fsdp_model))
        results[f"fsdp2/{method}"] = res

    # wrapping-order mistakes
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(build.__globals__["transformers"].LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))  # fmt: skip
    for layer in dense.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(dense, mesh=mesh)
    results["err_shard_before_patch_check"] = expect_error(lambda: check_fsdp(dense))
    results["err_shard_before_patch"] = expect_error(lambda: qlk.patch_model(dense, verbose=False))

    bad = build("qalora")
    m = bad.model.layers[0].self_attn.q_proj
    packed = m._buffers.pop("weight_packed")
    m.weight_packed = torch.nn.Parameter(packed, requires_grad=False)
    results["err_packed_as_parameter"] = expect_error(lambda: shard_model(bad, mesh=mesh))

    sliced = build("qalora")
    m = sliced.model.layers[0].mlp.up_proj
    m._buffers["weight_scales"] = m._buffers["weight_scales"][: m.out_features // world]
    results["err_sliced_buffer"] = expect_error(lambda: check_fsdp(sliced))

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from qlk.cli import exit_process

    main()
    exit_process(0)  # as `python -m qlk` under torchrun: no teardown for gloo's threads to abort

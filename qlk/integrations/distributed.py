"""qlk under ``torch.distributed``: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

A patched model holds two kinds of state:

* frozen packed weights (``weight_packed``, ``weight_scales``, ``weight_biases``, ``weight_absmax``,
  ...) registered as **buffers** of each :class:`~qlk.QuantLinear`. Neither DDP nor FSDP2 shards
  or all-reduces buffers: every rank keeps the whole packed weight (DDP broadcasts buffers from
  rank 0 at construction, which is a no-op copy since all ranks quantized the same weights).
* trainable adapters (``lora_A``, ``lora_B``): ordinary parameters. DDP all-reduces their
  gradients; FSDP2 shards them (dim 0) and reduce-scatters their gradients.

The order that works:  build/load the model → ``qlk.patch_model`` → ``fully_shard`` (per block,
then the root) or ``DistributedDataParallel``. The mistakes this module detects:

1. ``fully_shard`` *before* ``patch_model``: the dense weights are already DTensor shards, and
   quantizing one would quantize a shard, or a gathered copy, with groups that do not match the
   layer. :meth:`qlk.QuantLinear.from_dense` refuses a DTensor weight with an explanation.
2. packed tensors registered as **parameters** (e.g. a hand-written conversion, or an
   integration that wraps every tensor in ``nn.Parameter``): FSDP2 would shard the int32 codes and
   the per-group scales along dim 0 as flat parameters; the optimizer would see them.
   :func:`check_fsdp` raises naming the layer and tensor.
3. packed tensors that are DTensors or whose local shapes no longer agree with the layer (a
   sharded buffer): :func:`check_fsdp` raises.
"""
from __future__ import annotations

from torch import nn

from ..formats.quantized_weight import validate
from ..nn.linear import BUFFERS, QuantLinear


class FSDPWrapError(ValueError):
    """A qlk model is (or is about to be) wrapped in a way that shards a packed weight."""


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def check_fsdp(model: nn.Module) -> list[str]:
    """Check that ``model`` (patched by qlk; before or after ``fully_shard``/DDP) keeps every packed
    weight whole on every rank. Returns the names of the qlk layers checked; raises
    :class:`FSDPWrapError` (a ``ValueError``) naming each problem otherwise.

    Checks, per :class:`~qlk.QuantLinear`:
      * the packed tensors (``weight_packed``, ``weight_scales``, ...) are buffers, not parameters;
      * they are plain tensors, not DTensors (not sharded);
      * their shapes agree with the layer's ``(out_features, in_features)``, format, bits and group
        size (so a buffer sharded or sliced by hand is caught);
      * no dense ``nn.Linear``/``Conv1D`` is left with a sharded weight while ``model.qlk_config``
        says it was patched (it would be a layer skipped by ``patch_model``: harmless, reported
        only when its name says it was a target).
    And, for the model: no qlk layer at all while dense weights are DTensors means ``fully_shard``
    ran on an unpatched model; patch first.
    """
    problems = []
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in layers.items():
        for field, buf in BUFFERS.items():
            if buf in m._parameters and m._parameters[buf] is not None:
                problems.append(
                    f"'{name}.{buf}' is registered as a parameter; qlk packed tensors must be buffers (FSDP2 "
                    "shards parameters along dim 0 and optimizers would update them). Re-create the layer "
                    "with QuantLinear(...) / qlk.patch_model instead of converting its buffers"
                )
            t = m._buffers.get(buf)
            if t is not None and is_dtensor(t):
                problems.append(f"'{name}.{buf}' is a DTensor (sharded); packed weights must stay whole on each rank")
        if any(p.startswith(f"'{name}.") for p in problems):
            continue
        try:
            validate(m.qweight, f"'{name}'")
        except (ValueError, TypeError) as e:
            problems.append(f"{e} (a packed buffer was sliced or sharded?)")
    if not layers:
        sharded = [n for n, p in model.named_parameters() if is_dtensor(p)]
        if sharded:
            problems.append(
                f"{type(model).__name__} has no qlk layer but its parameters are already sharded (e.g. "
                f"'{sharded[0]}'): fully_shard ran before qlk.patch_model. Patch the unsharded model, then "
                "call fully_shard"
            )
        else:
            problems.append(f"{type(model).__name__} has no qlk layer; call qlk.patch_model first")
    if problems:
        raise FSDPWrapError("qlk.integrations.check_fsdp: " + "; ".join(problems))
    return sorted(layers)


def shard_model(model: nn.Module, mesh=None, block_classes=None, **fsdp_kwargs) -> nn.Module:
    """``fully_shard`` each transformer block of a patched ``model``, then the root, after
    :func:`check_fsdp`. ``block_classes``: module classes to wrap separately (default: the
    classes in ``model._no_split_modules`` of a Hugging Face model, else none). Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    check_fsdp(model)
    names = set(block_classes or getattr(model, "_no_split_modules", None) or ())
    classes = tuple(c for c in (block_classes or ()) if isinstance(c, type))
    for module in model.modules():
        if module is model:
            continue
        if (classes and isinstance(module, classes)) or type(module).__name__ in names:
            fully_shard(module, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    check_fsdp(model)
    return model

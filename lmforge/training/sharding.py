"""pretrain.parallel fsdp: weights, gradients and AdamW's state sharded over the processes (FSDP2).

Under DDP every GPU holds the fp32 weights, their gradients and AdamW's two moments: 16 bytes a
parameter before activations. `shard` hands the model to PyTorch's `fully_shard`, one unit per
transformer block and one for the rest (embeddings, final norm, head), so each process keeps
1/world of those bytes and gathers a block's weights only while it runs. On a GPU the gathered
weights are bf16 and gradients are reduced in fp32 (a MixedPrecisionPolicy: the fp32 shards stay
the masters, which is what master_weights.py does for DDP, so param_dtype has no role here). With
pretrain.compile each block is compiled on its own, before it is sharded, and the loss apart from the
model (pretrain_step.loss_function).

The same run trains the same model under ddp and fsdp (tests/test_sharding.py compares their loss
curves), and its checkpoints (checkpoint.py, through torch.distributed.checkpoint) resume under
either, on any number of processes.

Imports only torch and transformers (through model.py).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmforge.training.model import blocks
from lmforge.training.runtime import Dist

CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module"  # the name activation checkpointing puts in front of a block's


def mixed_precision(device: torch.device):
    """bf16 weights in the forward and backward on a GPU, fp32 gradient reduction; fp32 on the CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: torch.nn.Module, p: Any, d: Dist, say: Callable[[str], None]) -> torch.nn.Module:
    """fully_shard each block, then the root, over all `d.world` processes (in place; returns the model).

    Call after activation checkpointing is set and before the optimizer is made: the optimizer
    must see the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = mixed_precision(d.device)
    stack = blocks(model)
    for index, block in enumerate(stack):
        if p.compile:
            block.compile()
        # The last block's weights are needed again at once by the backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(stack) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    say(f"fsdp: {len(stack)} blocks and the root sharded over {d.world} processes"
        f"{', bf16 weights in compute, fp32 reduction' if d.device.type == 'cuda' else ''}"
        f"{', each block compiled' if p.compile else ''}")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (an empty dict elsewhere). Collective: every
    process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied parameter (the input embedding as the output layer) comes back once per name, as two
    # tensors; stored once, as checkpoint.snapshot stores it, so an unsharded model loads the file.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            weights.pop(name.replace(f"{CHECKPOINT_WRAPPER}.", ""), None)
        else:
            first[id(param)] = name
    return weights


def plain_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded model of the same class and config holding `weights`, on the CPU: what the stage
    saves with save_pretrained."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, strict=False, assign=True)
    copy.tie_weights()
    # Buffers left out of the state dict (rotary frequencies) are whole on every process: take them.
    buffers = {name.replace(f"{CHECKPOINT_WRAPPER}.", ""): b for name, b in model.named_buffers()}
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            target = copy.get_submodule(owner)
            target.register_buffer(leaf, buffers[name].detach().cpu().clone(),
                                   persistent=leaf not in target._non_persistent_buffers_set)
    missing = [name for name, t in list(copy.named_parameters()) + list(copy.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"internal: the gathered weights lack {missing[:5]}")
    return copy.train(model.training)

"""pretrain.param_dtype bf16: forward and backward on a bf16 copy of the weights, AdamW on fp32 ones.

Under autocast the fp32 weights are cast to bf16 at every forward, and the residual stream stays
fp32 because the embeddings are fp32. On G1's shape those casts and the wider residual traffic cost
about 5% of the step (call 7 of bench/results/2026-11-28-h200-bench-gpu-4.json profiled the model
cast to bf16). A bf16 working copy removes both. The fp32 weights stay the masters: AdamW updates
them, and checkpoints, evaluation and the saved model read them. The price is two passes over the
weights per step (bf16 gradients into fp32 ones, updated fp32 weights into the bf16 copy), a bf16
copy and the masters' fp32 gradients held in memory from step to step (0.5 GB more peak at G1's
shape than gradients made each step, for 0.6 ms less per step), and gradients summed in bf16
across micro-batches and (under DDP) across GPUs.

Imports only torch.
"""

from __future__ import annotations

import copy

import torch


class BF16Working:
    """A bf16 working copy of `masters` (an fp32 module) and the two copies that keep them in step."""

    def __init__(self, masters: torch.nn.Module):
        self.model = copy.deepcopy(masters)
        # Parameters only: buffers keep their dtype (rotary frequencies stay fp32). A tied
        # parameter is one object in both places it is used, so it is cast once and stays tied.
        for param in self.model.parameters():
            param.data = param.data.to(torch.bfloat16)
        self._pairs = [(m, w) for m, w in zip(masters.parameters(), self.model.parameters()) if m.requires_grad]
        for master, work in self._pairs:
            if master.shape != work.shape:  # zip order must pair each weight with its copy
                raise RuntimeError(f"internal: master {tuple(master.shape)} paired with copy {tuple(work.shape)}")
        # The masters' fp32 gradients live here from step to step. Casting into them is one multi-tensor
        # copy; a fresh .float() per weight was a kernel and an allocation each (0.8 ms of G1's step).
        self._master_grads = [torch.zeros_like(master) for master, _ in self._pairs]

    def grads_to_masters(self) -> None:
        """Move the working copy's bf16 gradients onto the masters as fp32 (after the backward); the
        copy's gradients are unset, so the next backward starts from none."""
        moved = [(master, work, buffer) for (master, work), buffer in zip(self._pairs, self._master_grads)
                 if work.grad is not None]
        if not moved:
            return
        torch._foreach_copy_([buffer for _, _, buffer in moved], [work.grad for _, work, _ in moved])
        for master, work, buffer in moved:
            master.grad = buffer  # the optimizer's zero_grad(set_to_none) unsets it each step
            work.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the updated masters into the bf16 weights (after the optimizer step)."""
        torch._foreach_copy_([w for _, w in self._pairs], [m for m, _ in self._pairs])

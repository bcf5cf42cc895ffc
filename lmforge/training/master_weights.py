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

pretrain.compile_optimizer folds both passes into the update: torch.compile makes PyTorch's own
AdamW (its functional form, over the optimizer's own state), the clipping and the refresh one
function, whose kernels read the bf16 gradients and write the bf16 copy as they update the
masters. The two passes move 12 bytes a weight (18 GB a step at 1.5B weights) beside AdamW's 28,
and the masters need no fp32 gradients. On an H100 at the 1B Llama shape it took about 13 ms off
each step and 5.6 GiB off the peak (bench/results/2026-12-08-h100-g7-compiled-update.json).

Imports only torch.
"""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
from torch.optim.adamw import adamw as functional_adamw


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
        # The masters' fp32 gradients live here from step to step (made at the first eager update).
        # Casting into them is one multi-tensor copy; a fresh .float() per weight was a kernel and an
        # allocation each (0.8 ms of G1's step).
        self._master_grads: list[torch.Tensor] = []
        self._work_of = {id(master): work for master, work in self._pairs}
        self._lrs: list[torch.Tensor] = []  # compiled_update's learning rates, one per param group

    def grads_to_masters(self) -> None:
        """Move the working copy's bf16 gradients onto the masters as fp32 (after the backward); the
        copy's gradients are unset, so the next backward starts from none."""
        if not self._master_grads:
            self._master_grads = [torch.zeros_like(master) for master, _ in self._pairs]
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

    def compiled_update(self, optimizer: torch.optim.AdamW, max_norm: float) -> None:
        """Clip (max_norm > 0), AdamW on the masters from the copy's bf16 gradients, and the copy
        refreshed, as one compiled function; the copy's gradients are unset after."""
        groups = []
        for index, group in enumerate(optimizer.param_groups):
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("internal: compiled_update runs plain AdamW (no amsgrad, no maximize)")
            masters = [m for m in group["params"] if self._work_of[id(m)].grad is not None]
            if not masters:
                continue
            works = [self._work_of[id(m)] for m in masters]
            states = [_adamw_state(optimizer, m) for m in masters]
            groups.append(UpdateGroup(
                masters, works, [w.grad for w in works], [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states], [st["step"] for st in states],
                self._lr(index, group["lr"], masters[0].device),
                (*group["betas"], group["eps"], group["weight_decay"])))
        if groups:
            _compiled_update()(groups, max_norm)
        optimizer._opt_called = True  # as optimizer.step() records it: the lr scheduler checks that a step ran
        for group in groups:
            for work in group.works:
                work.grad = None

    def _lr(self, index: int, lr: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        """The group's lr as a tensor: a float would be a constant of the compiled code, recompiled
        each time the schedule moves it. (Under cuda_graph the optimizer already holds tensors.)"""
        if isinstance(lr, torch.Tensor):
            return lr
        while len(self._lrs) <= index:
            self._lrs.append(torch.zeros((), dtype=torch.float32, device=device))
        return self._lrs[index].fill_(lr)


class UpdateGroup(NamedTuple):
    """One AdamW param group as compiled_update hands it over: lists of tensors, and its constants."""

    masters: list[torch.Tensor]
    works: list[torch.Tensor]
    grads: list[torch.Tensor]  # the bf16 copy's
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    lr: torch.Tensor
    hyper: tuple[float, float, float, float]  # beta1, beta2, eps, weight_decay


def _adamw_state(optimizer: torch.optim.AdamW, master: torch.Tensor) -> dict:
    """The optimizer's state of `master`, made as fused AdamW makes it (so checkpoints and an eager
    update go on from it)."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def _update(groups: list[UpdateGroup], max_norm: float) -> None:
    grads = [[g.float() for g in group.grads] for group in groups]
    if max_norm > 0:  # clip_grad_norm_'s scaling, over every group's gradients at once
        # Each norm a reduction of Inductor's own, reading the bf16 gradients: _foreach_norm would be a
        # call out of the compiled code, over fp32 copies of them written first.
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for group in groups for g in group.grads]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        grads = [torch._foreach_div(gs, torch.clamp((norm + 1e-6) / max_norm, min=1.0)) for gs in grads]
    for group, gs in zip(groups, grads):
        beta1, beta2, eps, weight_decay = group.hyper
        functional_adamw(group.masters, gs, group.exp_avgs, group.exp_avg_sqs, [], group.steps, foreach=True,
                         capturable=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group.lr,
                         weight_decay=weight_decay, eps=eps, maximize=False)
        torch._foreach_copy_(group.works, group.masters)


def _no_loop_reordering() -> dict[str, bool]:
    """Inductor's loop reordering asserts in torch 2.11 on a GPU (reorder_loops_by_dep_pair: a fused node
    holding other than plain nodes) when it weighs fusing the clipping's norms with the update over the
    same gradients; CPU code skips that pass, so only a GPU meets it. Every tensor here is contiguous
    and read in its own order: there is nothing to reorder."""
    import torch._inductor.config as inductor_config  # about 1 s of imports: only when the update compiles

    return {key: False for key in ("loop_ordering_after_fusion", "loop_reindexing_after_fusion")
            if hasattr(inductor_config, key)}


@functools.cache
def _compiled_update():
    return torch.compile(_update, dynamic=False, options=_no_loop_reordering())

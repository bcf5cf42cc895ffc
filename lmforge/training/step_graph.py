"""A whole optimizer step captured once as a CUDA graph, then replayed (pretrain.cuda_graph).

A small model's eager step is bound by the CPU launching a few hundred short kernels, not by the
GPU running them: the 10.8M-parameter G2 model kept an H200 a fifth busy. A replay hands the GPU
the whole step (every micro-batch's forward and backward, clipping and the fused AdamW update) in
one launch; torch.compile is then optional, which saves its start-up on short runs.

What a replay reads must live at fixed addresses: the batches are copied into static inputs, each
param group's learning rate into a device tensor, the running loss adds into the loop's own accumulator.
Capture needs the lazily made state to exist (AdamW's moments, cuBLAS workspaces, a compiled
backward), so the loop runs WARMUP_STEPS eager steps first, on a side stream as PyTorch's CUDA
graph notes advise. One process, one GPU: DDP's gradient hooks cannot be captured.

Imports only torch.
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP_STEPS = 3


class CapturedStep:
    """Record `step(batches)` on static copies of `batches`; `replay` runs it on new ones."""

    def __init__(self, step: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], None],
                 optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], factor: float):
        self.inputs = [(_same_layout(x), _same_layout(y)) for x, y in batches]
        device = self.inputs[0][0].device
        # The scheduler's float lrs would be baked into the graph: the optimizer reads them from
        # tensors instead, one per param group, as each group has a peak lr of its own (LambdaLR's
        # initial_lr) that the schedule's factor scales.
        self.peaks = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.lrs = [torch.tensor(peak * factor, dtype=torch.float32, device=device) for peak in self.peaks]
        for group, lr in zip(optimizer.param_groups, self.lrs):
            group["lr"], group["capturable"] = lr, True
        # Gradients allocated during capture live in the graph's pool; each replay rewrites them.
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step(self.inputs)

    def replay(self, batches: list[tuple[torch.Tensor, torch.Tensor]], factor: float) -> None:
        """One step on `batches`, at `factor` times each group's peak learning rate."""
        for (x_static, y_static), (x, y) in zip(self.inputs, batches):
            x_static.copy_(x, non_blocking=True)
            y_static.copy_(y, non_blocking=True)
        for lr, peak in zip(self.lrs, self.peaks):
            lr.fill_(peak * factor)
        self.graph.replay()


def _same_layout(batch: torch.Tensor) -> torch.Tensor:
    """A copy with `batch`'s strides: a compiled model guards on them, and a new layout would
    recompile it inside the capture, which cannot sync."""
    static = torch.empty_strided(batch.size(), batch.stride(), dtype=batch.dtype, device=batch.device)
    return static.copy_(batch)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream for the warm-up steps, ordered after the work already queued on the current one."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream

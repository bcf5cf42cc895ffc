"""pretrain.optimizer muon: Muon on the blocks' weight matrices, AdamW on everything else, as one optimizer.

Muon (Keller Jordan, 2024) replaces a matrix's update by the nearest semi-orthogonal matrix to
its Nesterov momentum (five Newton-Schulz iterations in bf16), so every direction of the update
moves at the same rate. The GPT-2 speedruns reach a given loss in fewer steps with it than with
AdamW. Embeddings, the output layer, norms and biases keep AdamW, as Muon's authors advise.

Why one optimizer and not torch's Muon beside torch's AdamW: the learning-rate schedule, gradient
clipping, checkpoints (DCP's optimizer state dict) and the captured CUDA-graph step all take one
optimizer. So this is torch's fused AdamW with the Muon groups set aside while it steps, and a
Muon update that reads its learning rate as a float or as a device tensor (a captured step
replays with the lr in a tensor; torch.optim.Muon passes it to `add_(alpha=...)`, which needs a
number). The orthogonalisation is torch.optim.Muon's Newton-Schulz iteration, batched over matrices of one
shape.

Update size: the orthogonalised matrix is scaled by 0.2 * sqrt(max(rows, cols)), which gives it
the root-mean-square of a typical AdamW update (Moonshot's "match_rms_adamw", also an option of
torch.optim.Muon), so AdamW's learning rate and weight decay carry over as a starting point, and
the scale does not depend on whether a layer stores its matrix as (in, out) like GPT-2's Conv1D
or as (out, in) like nn.Linear.

Imports only torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic iteration's coefficients (Jordan's Muon)
NS_STEPS = 5


def orthogonalize(matrices: torch.Tensor) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for each matrix U S V^T of a (n, rows, cols) stack, in bf16.

    torch.optim.Muon's iteration, batched: a step orthogonalises one stack per weight shape (4 for
    GPT-2's blocks) instead of one matrix at a time (24 for G2's 6 blocks), and a small model's
    step is bound by how many kernels it runs, not by their arithmetic."""
    a, b, c = NS_COEFFICIENTS
    x = matrices.bfloat16()
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x if wide else x.mT


class MuonAdamW(torch.optim.AdamW):
    """Fused AdamW over `adamw_groups`, Muon (momentum, Nesterov) over the `muon_params` matrices.

    The Muon group is an ordinary param group marked `muon: True`, with its own `lr` (so
    LambdaLR schedules it like the others), `weight_decay` and `momentum`; its state per matrix
    is a momentum buffer and a step count."""

    def __init__(self, muon_params: list[torch.Tensor], adamw_groups: list[dict[str, Any]], *, lr: float,
                 muon_lr: float, momentum: float, weight_decay: float, betas: tuple[float, float]):
        for param in muon_params:
            if param.dim() != 2:
                raise ValueError(f"internal: Muon updates matrices, got a parameter of shape {tuple(param.shape)}")
        groups = [{**group, "muon": False} for group in adamw_groups]
        groups.append({"params": muon_params, "lr": muon_lr, "weight_decay": weight_decay, "momentum": momentum,
                       "muon": True})
        super().__init__(groups, lr=lr, betas=betas, fused=True)

    @torch.no_grad()
    def step(self, closure=None):
        everything = self.param_groups
        # AdamW's own step walks self.param_groups: show it only its groups, for the length of its step.
        self.param_groups = [group for group in everything if not group.get("muon")]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = everything
        for group in everything:
            if group.get("muon"):
                self._muon_step(group)
        return loss

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        for param in params:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
                # A step count, as AdamW's states have: AdamW's load_state_dict expects one in every state.
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["step"] += 1
        return [self.state[param]["momentum_buffer"] for param in params]

    def _muon_step(self, group: dict[str, Any]) -> None:
        """One Muon update; `lr` may be a float or a device tensor (a captured step's)."""
        lr, momentum = group["lr"], group["momentum"]
        params = [param for param in group["params"] if param.grad is not None]
        if not params:
            return
        grads = [param.grad for param in params]
        # Clipping rides on the fused AdamW's grad_scale (runtime.clip_gradients): divide as AdamW does.
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            grads = torch._foreach_div(grads, scale)
        buffers = self._buffers(params)
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        ahead = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov: the gradient a step ahead
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        by_shape: dict[torch.Size, list[int]] = {}
        for index, param in enumerate(params):
            by_shape.setdefault(param.shape, []).append(index)
        for shape, indices in by_shape.items():
            update = orthogonalize(torch.stack([ahead[i] for i in indices]))
            update = update.float() * (lr * 0.2 * math.sqrt(max(shape)))  # AdamW's update size
            torch._foreach_sub_([params[i] for i in indices], list(update.unbind(0)))

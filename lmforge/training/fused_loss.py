"""Next-token cross-entropy that keeps the logits' gradient instead of the logits (pretrain.fused_loss).

At G1's shape the logits are 32,768 x 50,304 bf16 values, 3.3 GB: the plain compiled loss writes
them, reads them for the loss in the forward, and reads them again in the backward to write their
gradient (4.4 ms of a 64 ms H200 step). The gradient of a mean cross-entropy is known as soon as
the row's log-sum-exp is: softmax minus the one-hot target, over the count of scored rows. So the
forward here writes that gradient (bf16, where the plain loss kept the bf16 logits) and the
backward is the two head matmuls alone.

On CUDA one Triton program per row does it: a pass for the log-sum-exp (online max and sum), a
second that writes the gradient (measured on an H200 at G1's shape: 2.4 ms where the plain loss's
two kernels took 4.4 ms; the step 2% faster, peak memory 3 GiB higher, as logits and gradient
coexist for a moment; a one-read variant that held the 50,304-word row in registers was no
faster). torch.compile sees the pair as one opaque op (lmforge::cross_entropy_grad). Elsewhere the
same op runs as plain torch.

Only for heads that are one bias-free matrix over the last hidden state (the classes in
PLAIN_HEADS): any other head keeps the plain loss. Targets must lie in [0, vocab) or equal
ignore_index (the tokenizer and pad_vocab see to it; the kernel does not check). Where every row is
ignored the loss is 0 with zero gradients (F.cross_entropy gives NaN). The gradient is stored before
the loss's own gradient scales it, so it wants bf16 or fp32, not fp16 (its entries are ~1/rows).
Imports only torch (Triton on CUDA, lazily).
"""

from __future__ import annotations

import functools

import torch

# Causal LM classes whose logits are exactly lm_head(last_hidden_state): no bias, scaling or capping.
PLAIN_HEADS = {"GPT2LMHeadModel", "LlamaForCausalLM"}


def supports(model) -> bool:
    head = model.get_output_embeddings()
    return type(model).__name__ in PLAIN_HEADS and isinstance(head, torch.nn.Linear) and head.bias is None


@torch.library.custom_op("lmforge::cross_entropy_grad", mutates_args=())
def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss in fp32, d mean-loss / d logits in logits' dtype); ignored rows get zeros.

    count: the number of scored rows, a one-element tensor (no host sync to read it).
    """
    logits32 = logits.float()
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(logits32, dim=-1)
    row_loss = (lse - logits32.gather(1, safe_targets).squeeze(1)) * valid
    row_weight = (valid.float() / count)[:, None]
    grad = torch.exp(logits32 - lse[:, None]) * row_weight
    grad.scatter_add_(1, safe_targets, -row_weight)  # minus the one-hot target, without an (N, V) one-hot
    return row_loss, grad.to(logits.dtype).contiguous()


@cross_entropy_grad.register_fake
def _(logits, targets, count, ignore_index):
    # Contiguous, as both implementations return it, whatever the logits' strides.
    return logits.new_empty(logits.size(0), dtype=torch.float32), logits.new_empty(logits.shape)


@cross_entropy_grad.register_kernel("cuda")
def _(logits, targets, count, ignore_index):
    logits = logits.contiguous()
    row_loss = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    _triton_kernel()[(logits.size(0),)](logits, grad, targets.contiguous(), row_loss, count, logits.size(1),
                                         ignore_index)
    return row_loss, grad


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                              ((4096, 8), (8192, 16), (16384, 16), (32768, 32))], key=["n_cols"])
    @triton.jit
    def cross_entropy_grad_kernel(logits_ptr, grad_ptr, targets_ptr, loss_ptr, count_ptr, n_cols, ignore_index,
                                  BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_logits = logits_ptr + row * n_cols
        row_grad = grad_ptr + row * n_cols
        target = tl.load(targets_ptr + row)
        # Pass 1: online max and sum of exponentials, one block of the row at a time.
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_logits + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        valid = target != ignore_index
        safe_target = tl.where(valid, target, 0)
        target_logit = tl.load(row_logits + safe_target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        scale = tl.where(valid, 1.0 / tl.load(count_ptr).to(tl.float32), 0.0)
        # Pass 2: the gradient, reading the row again (much of it still in L2 from pass 1).
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_logits + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - (cols == safe_target).to(tl.float32)) * scale
            tl.store(row_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)

    return cross_entropy_grad_kernel


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, `ignore_index` rows left out.

    hidden (N, D) and weight (V, D) in the dtype the matmul should run in (bf16 under autocast);
    the loss comes out in fp32, as F.cross_entropy over upcast logits gives it.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        count = (targets != ignore_index).sum().clamp(min=1)
        row_loss, grad_logits = cross_entropy_grad(hidden @ weight.t(), targets, count, ignore_index)
        ctx.save_for_backward(grad_logits, hidden, weight)
        return row_loss.sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_logits, hidden, weight = ctx.saved_tensors
        # The scalar scales the small results, not the (N, V) gradient: no extra pass over it.
        grad_hidden = (grad_logits @ weight) * grad_loss
        grad_weight = (grad_logits.t() @ hidden) * grad_loss
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None


def causal_lm_loss(model, x: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The model's mean next-token loss on (x, y) through LinearCrossEntropy (a `supports` model)."""
    hidden = model.base_model(input_ids=x, use_cache=False).last_hidden_state
    weight = model.get_output_embeddings().weight
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
    # Casts outside the Function: autograd carries the gradients back to fp32 parameters and activations.
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)).to(dtype), weight.to(dtype),
                                    y.reshape(-1), ignore_index)

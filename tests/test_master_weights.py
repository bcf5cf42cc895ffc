"""pretrain.param_dtype bf16: a bf16 working copy that stays tied, keeps its buffers, and follows its fp32 masters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge import master_weights  # noqa: E402
from lmforge.model import TokenInfo, build_model  # noqa: E402


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_working_copy_is_bf16_tied_and_follows_its_masters(arch):
    model = build_model(fx.params({"arch": arch}).pretrain, TokenInfo(300, 0, 1, 2, 3), seed=0)
    working = master_weights.BF16Working(model)
    copy = working.model
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Tied input and output embeddings stay one tensor in the copy.
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    # Buffers keep their dtype (llama's rotary frequencies stay fp32).
    buffers = dict(model.named_buffers())
    assert buffers or arch == "gpt2"  # transformers' GPT-2 holds none
    assert all(b.dtype == buffers[name].dtype for name, b in copy.named_buffers())

    x = torch.randint(4, 300, (2, 16))
    copy(input_ids=x).logits.float().logsumexp(-1).mean().backward()
    working.grads_to_masters()
    assert all(p.grad is None for p in copy.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())

    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)
    working.refresh()
    for master, work in zip(model.parameters(), copy.parameters()):
        assert torch.equal(work, master.to(torch.bfloat16))

"""pretrain.param_dtype bf16: a bf16 working copy that stays tied, keeps its buffers, and follows its fp32 masters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge.training import master_weights  # noqa: E402
from lmforge.training.model import TokenInfo, build_model  # noqa: E402


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

    # Compared by name, so two same-shaped weights swapped in the pairing would show.
    x = torch.randint(4, 300, (2, 16))
    copy(input_ids=x).logits.float().logsumexp(-1).mean().backward()
    work_grads = {name: p.grad.clone() for name, p in copy.named_parameters()}
    working.grads_to_masters()
    assert all(p.grad is None for p in copy.parameters())
    for name, master in model.named_parameters():
        assert master.grad.dtype == torch.float32 and torch.equal(master.grad, work_grads[name].float()), name

    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.add_(0.5 + i)  # a different shift per weight
    working.refresh()
    work_weights = dict(copy.named_parameters())
    for name, master in model.named_parameters():
        assert torch.equal(work_weights[name], master.to(torch.bfloat16)), name


def test_masters_gradients_reuse_their_buffers_from_step_to_step():
    model = build_model(fx.params({"arch": "gpt2"}).pretrain, TokenInfo(300, 0, 1, 2, 3), seed=0)
    working = master_weights.BF16Working(model)
    copy = working.model
    frozen = next(copy.parameters())  # the embeddings: a weight the backward leaves without a gradient
    frozen.requires_grad_(False)
    held = None
    for seed in (1, 2):
        x = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(seed))
        copy(input_ids=x).logits.float().logsumexp(-1).mean().backward()
        work_grads = {name: p.grad.clone() for name, p in copy.named_parameters() if p.grad is not None}
        working.grads_to_masters()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert next(iter(grads.values())) is None  # the frozen embeddings: no gradient, none made up
        for name, want in work_grads.items():
            assert torch.equal(grads[name], want.float()), name
        if held is not None:  # the same fp32 tensors, refilled: no allocation per step
            assert all(grads[name] is held[name] for name in work_grads)
        held = grads
        model.zero_grad(set_to_none=True)  # as the optimizer's zero_grad does between steps


def test_param_dtype_fp32_keeps_the_run_key_of_runs_made_before_it_existed():
    from lmforge.training import pretraining, runtime

    meta = {"splits": {}, "vocab_size": 300}
    fp32 = pretraining.run_fingerprint(fx.params({"param_dtype": "fp32"}).pretrain, 1, meta, 1)
    bf16 = pretraining.run_fingerprint(fx.params({"param_dtype": "bf16"}).pretrain, 1, meta, 1)
    assert "pretrain.param_dtype" not in fp32 and bf16["pretrain.param_dtype"] == "bf16"
    assert runtime.run_key(fp32) != runtime.run_key(bf16)

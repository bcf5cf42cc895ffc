"""pretrain.fused_loss: the same loss and gradients as the plain cross-entropy, in less memory traffic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge.training import batches
from lmforge.training import fused_loss
from lmforge.training import pretrain_step  # noqa: E402
from lmforge.training.model import TokenInfo, build_model, set_training_attention  # noqa: E402

torch.set_num_threads(1)
IGNORE = batches.IGNORE_INDEX
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(hidden, weight, targets):
    """F.cross_entropy over fp32 logits, as pretrain_step.plain_loss computes it, and its gradients."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("vocab", [5003, 70001])  # CUDA: a row shorter than the largest block, one longer than all
def test_linear_cross_entropy_matches_the_plain_loss(device, compiled, vocab):
    # Vocabularies that no kernel block divides, and ignored rows that must score and send nothing.
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(96, 32, device=device, dtype=dtype)
    weight = torch.randn(vocab, 32, device=device, dtype=dtype) * 0.3
    targets = torch.randint(0, vocab, (96,), device=device)
    targets[::7] = IGNORE
    want_loss, want_dh, want_dw = _reference(hidden, weight, targets)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fn = fused_loss.LinearCrossEntropy.apply
    loss = (torch.compile(fn) if compiled else fn)(h, w, targets, IGNORE)
    (loss * 0.5).backward()  # a scale on the loss must reach both gradients

    tol = {"rtol": 2e-2, "atol": 2e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, **tol)
    torch.testing.assert_close(h.grad.float(), 0.5 * want_dh.float(), **tol)
    torch.testing.assert_close(w.grad.float(), 0.5 * want_dw.float(), **tol)
    assert torch.count_nonzero(h.grad[::7]) == 0  # an ignored row scores nothing, so sends no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_with_every_row_ignored_is_zero_not_nan(device):
    hidden = torch.randn(8, 16, device=device, requires_grad=True)
    weight = torch.randn(300, 16, device=device, requires_grad=True)
    loss = fused_loss.LinearCrossEntropy.apply(hidden, weight, torch.full((8,), IGNORE, device=device), IGNORE)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_loss_gives_the_model_loss_and_gradients(arch):
    p = fx.params({"arch": arch, "pad_vocab": 64}).pretrain
    model = build_model(p, TokenInfo(300, 0, 1, 2, 3), seed=0).train()
    set_training_attention(model, True)
    assert fused_loss.supports(model)
    torch.manual_seed(1)
    x = torch.randint(4, 300, (4, p.context))
    y = torch.roll(x, -1, 1)
    y[:, -3:] = IGNORE

    plain = pretrain_step.TrainingLoss(model, False)(x, y)
    plain.backward()
    want = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = pretrain_step.TrainingLoss(model, False, fused=True)(x, y)
    assert type(fused.grad_fn).__name__ == "LinearCrossEntropyBackward"  # the fused path, not the plain one
    fused.backward()

    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation keeps the plain loss: no gradient to make
        torch.testing.assert_close(pretrain_step.TrainingLoss(model, False, fused=True)(x, y), plain.detach())


def test_fused_loss_falls_back_where_the_head_is_not_one_matrix():
    p = fx.params({"arch": "bert", "fused_loss": True}).pretrain
    model = build_model(p, TokenInfo(300, 0, 1, 2, 3), seed=0)
    assert not fused_loss.supports(model)  # BERT's head: a transform, then a matrix with a bias
    for masked in (True, False):
        said = []
        assert not pretrain_step.use_fused_loss(p, model, masked, said.append)
        assert "BertForMaskedLM keeps the plain loss" in said[0]



def test_under_fsdp_with_compile_the_loss_is_compiled_on_its_own():
    """Sharded, the model's forward stays eager around its compiled blocks: the loss gets a compile of
    its own (the fp32 upcast fused into the cross-entropy), and gives the plain loss's value and gradient."""
    compiled_p, eager_p = fx.params({"compile": True}).pretrain, fx.params({"compile": False}).pretrain
    assert pretrain_step.loss_function(compiled_p, sharded=False) is pretrain_step.cross_entropy  # compiled with the model
    assert pretrain_step.loss_function(eager_p, sharded=True) is pretrain_step.cross_entropy
    compiled = pretrain_step.loss_function(compiled_p, sharded=True)
    assert compiled is not pretrain_step.cross_entropy
    logits = torch.randn(2, 8, 301, requires_grad=True)
    y = torch.randint(0, 301, (2, 8))
    y[0, :3] = IGNORE
    want = pretrain_step.cross_entropy(logits, y)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = compiled(logits, y)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)

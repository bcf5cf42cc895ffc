"""pretrain.activation_memory_budget: the compiled step keeps fewer activations for the backward, and
trains the same (the partitioner only moves work from memory to recompute)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge.training import pretrain_step, runtime  # noqa: E402
from lmforge.training.model import TokenInfo, build_model, set_training_attention  # noqa: E402

torch.set_num_threads(1)


def _step_saving(budget: float) -> tuple[int, float, dict[str, torch.Tensor]]:
    """One compiled optimizer step of a tiny Llama at `budget`: the bytes the step saved for its
    backward, its loss, and the weights after it."""
    torch._dynamo.reset()  # a fresh compile, partitioned under this budget
    p = fx.params({"arch": "llama", "compile": True, "activation_memory_budget": budget}).pretrain
    model = build_model(p, TokenInfo(300, 0, 1, 2, 3), seed=0).train()
    set_training_attention(model, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = pretrain_step.build_step(model, optimizer, p, runtime.Dist(), masked=False, say=lambda _m: None)
    torch.manual_seed(1)
    x = torch.randint(4, 300, (4, p.context))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with pretrain_step.activation_budget(p), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step([(x, torch.roll(x, -1, 1))])
    weights = {n: q.detach().clone() for n, q in model.named_parameters()}
    return sum(saved), float(step.loss_sum), weights


def test_a_lower_budget_saves_fewer_bytes_and_trains_the_same():
    import torch._functorch.config as functorch_config

    kept, kept_loss, kept_weights = _step_saving(1.0)
    low, low_loss, low_weights = _step_saving(0.1)
    assert functorch_config.activation_memory_budget == 1.0  # the context put PyTorch's default back
    assert low < 0.9 * kept, (low, kept)
    assert low_loss == pytest.approx(kept_loss, rel=1e-5)
    for name, weight in kept_weights.items():
        torch.testing.assert_close(low_weights[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_training_runs_its_steps_under_the_budget(tmp_path, monkeypatch):
    """pretraining.train enters the budget around its loop, where the compiled step is first traced."""
    import torch._functorch.config as functorch_config

    from lmforge.training import pretraining

    torch._dynamo.reset()
    fx.make_tokens(tmp_path / "tokens", n_docs=40)
    p = fx.params({"arch": "llama", "compile": True, "activation_memory_budget": 0.25, "max_steps": 2,
                   "warmup_steps": 1, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}).pretrain
    seen: list[float] = []
    run = pretrain_step.StepRunner.run

    def noting_the_budget(self, *args, **kwargs):
        seen.append(functorch_config.activation_memory_budget)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(pretrain_step.StepRunner, "run", noting_the_budget)
    pretraining.train(p, seed=0, tokens_dir=tmp_path / "tokens", checkpoint_root=tmp_path / "ckpt", progress=False)
    assert seen == [0.25, 0.25]
    assert functorch_config.activation_memory_budget == 1.0


def test_a_budget_needs_compile():
    with pytest.raises(ValueError, match="activation_memory_budget 0.5 is met by torch.compile's partitioner"):
        fx.params({"activation_memory_budget": 0.5, "compile": False})
    with pytest.raises(ValueError, match="two ways to recompute activations"):
        fx.params({"activation_memory_budget": 0.5, "compile": True, "activation_checkpointing": 2})
    assert isinstance(pretrain_step.activation_budget(fx.params({"compile": False}).pretrain),
                      type(pretrain_step.nullcontext()))

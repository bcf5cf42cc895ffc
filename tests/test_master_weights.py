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


def _model_copy_and_adamw():
    from lmforge.training import runtime

    model = build_model(fx.params({"arch": "llama", "n_kv_head": 2}).pretrain, TokenInfo(300, 0, 1, 2, 3), seed=0)
    working = master_weights.BF16Working(model)
    optimizer = runtime.adamw(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    return model, working, optimizer, runtime.lr_scheduler(optimizer, lambda step: 1.0 / (step + 1))


@pytest.mark.filterwarnings(r"error:Detected call of `lr_scheduler\.step\(\)` before")
def test_the_compiled_update_is_the_eager_one_reading_bf16_gradients():
    """pretrain.compile_optimizer: clipping, AdamW and the copy's refresh in one compiled function give
    what the eager path's four passes give, on the optimizer's own state, with no fp32 gradients."""
    from lmforge.training import runtime

    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(0)
    shapes = [q.shape for q in _model_copy_and_adamw()[0].parameters()]
    steps = [[(0.1 * torch.randn(s, generator=gen)).to(torch.bfloat16) for s in shapes] for _ in range(3)]
    runs = {}
    for mode in ("eager", "compiled"):
        model, working, optimizer, schedule = _model_copy_and_adamw()
        for grads in steps:  # the same bf16 gradients on both sides, the lr moving with the schedule
            for (_master, work), grad in zip(working._pairs, grads):
                work.grad = grad.clone()
            if mode == "eager":
                working.grads_to_masters()
                runtime.optimizer_step(model, optimizer, 1.0)  # the norm is about 30: clipping acts
                working.refresh()
            else:
                working.compiled_update(optimizer, 1.0)
                assert all(w.grad is None for w in working.model.parameters())
                assert all(m.grad is None for m in model.parameters()) and working._master_grads == []
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        runs[mode] = (model, working, optimizer)
    (eager, _, eager_opt), (compiled, working, compiled_opt) = runs["eager"], runs["compiled"]
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(w, m.to(torch.bfloat16)) for w, m in zip(working.model.parameters(), compiled.parameters()))
    want, got = eager_opt.state_dict(), compiled_opt.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for key, state in want["state"].items():
        assert got["state"][key]["step"].dtype == state["step"].dtype and float(got["state"][key]["step"]) == 3.0
        torch.testing.assert_close(got["state"][key]["exp_avg"], state["exp_avg"], rtol=0, atol=1e-7)
        torch.testing.assert_close(got["state"][key]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=1e-9)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the moving lr compiled nothing new


def test_compile_optimizer_needs_the_bf16_copy_and_adamw():
    from lmforge.config.pretrain import PretrainParams

    assert PretrainParams(param_dtype="bf16", compile_optimizer=True).compile_optimizer
    for other in ({"param_dtype": "fp32"}, {"param_dtype": "bf16", "optimizer": "muon"},
                  {"param_dtype": "bf16", "cuda_graph": True}):
        with pytest.raises(ValueError, match="compile_optimizer .* needs param_dtype bf16 and optimizer adamw"):
            PretrainParams(compile_optimizer=True, **other)


def test_the_compiled_update_writes_no_fp32_copy_of_the_gradients():
    """What the knob is for: the generated code reads the bf16 gradients where it uses them (the norm
    and AdamW) instead of writing fp32 copies first, and calls out to no eager op."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    model, working, optimizer, _schedule = _model_copy_and_adamw()
    for work in working.model.parameters():
        work.grad = torch.randn_like(work)
    torch._dynamo.reset()
    master_weights._compiled_update.cache_clear()  # compile here, where the code is caught
    _result, code = run_and_get_code(working.compiled_update, optimizer, 1.0)
    source = "\n".join(code)
    assert source and not re.search(r"torch\.ops\.aten\.\w+\.\w+\(|extern_kernels\.\w+\(", source)
    # Allocations the generated code makes: the norms (scalars, and their stack), no weight-sized buffer.
    shapes = re.findall(r"empty_strided_\w+\(\(([^)]*)\)", source)
    sizes = [math.prod(int(d) for d in re.findall(r"\d+", shape)) for shape in shapes]
    assert sizes and max(sizes) <= len(list(model.parameters())), shapes
    assert all(torch.equal(w, m.to(torch.bfloat16)) for w, m in zip(working.model.parameters(), model.parameters()))


def test_the_update_compiles_without_loop_reordering():
    # torch 2.11's Inductor failed an assertion in loop reordering on a GPU (call g7_co_a of
    # bench/results/2026-12-07-h100-g7-compile-optimizer.json), a pass CPU code never runs: the key
    # must still name an option this torch has, or the compile would go back to that pass unnoticed.
    assert master_weights._no_loop_reordering()["loop_ordering_after_fusion"] is False

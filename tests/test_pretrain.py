"""The pretrain stage: configs that fail early, tiny models that learn, kill-and-resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge.data import token_shards
from lmforge.training import batches
from lmforge.training import checkpoint
from lmforge.evaluation import language_model as evaluation
from lmforge.training import pretrain_step, pretraining, runtime  # noqa: E402
from lmforge.config import ConfigError  # noqa: E402
from lmforge.training.model import ModelConfigError, TokenInfo, build_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    fx.make_tokens(out)
    return out


def _val_metrics(model, tokens: Path) -> dict:
    meta = token_shards.read_meta(tokens)
    log_probs = evaluation.unigram_log_probs(batches.open_split(tokens, "train", meta), meta["vocab_size"])
    return evaluation.causal_split_metrics(
        model, batches.open_split(tokens, "val", meta), log_probs, meta["splits"]["val"]["bytes"],
        context=32, batch_size=32, device=torch.device("cpu"))


# --- configs that must fail before any work ---------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_head": 3}, "n_head (3) does not divide d_model (64)"),
        ({"n_kv_head": 3}, "n_kv_head (3) does not divide n_head (4)"),
        ({"warmup_steps": 500}, "warmup_steps (500) must be below max_steps"),
        ({"n_layers": 2}, "pretrain.n_layers"),
        ({"learning_rate": -1.0}, "pretrain.learning_rate"),
        ({"arch": "mamba"}, "pretrain.arch"),
        ({"gguf_file": "x.gguf"}, "set init_from too"),
        ({"compile": True, "cuda_graph": True, "compile_mode": "reduce-overhead"}, "CUDA graphs of its own"),
        ({"compile": True, "cuda_graph": True, "compile_mode": "max-autotune"}, "CUDA graphs of its own"),
        ({"attention": "flash3"}, "pretrain.attention"),
        ({"ddp_bucket_mb": 0.5}, "pretrain.ddp_bucket_mb"),
    ],
)
def test_bad_pretrain_params_fail_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        fx.params(override)
    assert message in str(err.value)
    assert "pretrain" in str(err.value)


def test_bad_evaluate_params_fail_with_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.temprature"):
        fx.params(evaluate={"temprature": 1.0})
    with pytest.raises(ConfigError, match="splits lists a split twice"):
        fx.params(evaluate={"splits": ["val", "val"]})


def test_context_longer_than_the_data_fails_early(tokens, tmp_path):
    val_tokens = token_shards.read_meta(tokens)["splits"]["val"]["tokens"]
    p = fx.params({"context": val_tokens + 10}).pretrain
    with pytest.raises(batches.DataError, match=r"context \(\d+\) is longer than the data: the val split"):
        pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "nothing may be written before the check"


def test_vocab_mismatch_with_the_tokenizer_fails_early(tokens, tmp_path):
    # A model saved with another tokenizer (BPE on the same text): other ids, another size.
    other = tmp_path / "other_tokens"
    fx.make_tokens(other, kind="bpe", vocab_size=280)
    p = fx.params().pretrain
    model = build_model(p, TokenInfo.from_meta(token_shards.read_meta(other)), seed=0)
    folder = tmp_path / "other_model"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    cont = fx.params({"init_from": str(folder)}).pretrain
    with pytest.raises(ModelConfigError, match="vocabulary mismatch"):
        pretraining.train(cont, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt", progress=False)
    # A model with fewer embeddings than the tokenizer has tokens.
    small = build_model(fx.params().pretrain, TokenInfo(20, 0, 1, 2, 3), seed=0)
    small.save_pretrained(tmp_path / "small")
    small_params = fx.params({"init_from": str(tmp_path / "small")}).pretrain
    # No tokenizer beside the weights: nothing proves the ids mean the same tokens.
    with pytest.raises(ModelConfigError, match="holds no tokenizer"):
        pretraining.train(small_params, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt", progress=False)
    (tmp_path / "small" / "tokenizer.json").write_bytes((tokens / "tokenizer.json").read_bytes())
    with pytest.raises(ModelConfigError, match="has 20 token embeddings but the tokenizer of the token folder has"):
        pretraining.train(small_params, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


# --- tiny models learn ------------------------------------------------------------------------


def test_tiny_decoder_beats_unigram_reloads_and_generates(tokens, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = fx.params().pretrain
    seen: list[tuple[dict, int]] = []
    result = pretraining.train(p, seed=3, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt", progress=False,
                            on_metrics=lambda m, s: seen.append((m, s)))
    assert result.history["val"][-1]["step"] == p.max_steps
    assert any("val_loss" in m for m, _ in seen) and any("tokens_per_s" in m for m, _ in seen)
    metrics = _val_metrics(result.model, tokens)
    assert metrics["bits_per_byte"] < 0.6 * metrics["unigram_bits_per_byte"], metrics

    pretraining.save_model(result.model, tokens, tmp_path / "pretrained", {"context": p.context})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pretrained")
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    # Continued pretraining from our own saved model starts where it ended.
    cont = fx.params({"init_from": str(tmp_path / "pretrained"), "max_steps": 5, "warmup_steps": 1,
                      "learning_rate": 1e-5, "eval_steps": 5, "save_steps": 5}).pretrain
    resumed = pretraining.train(cont, seed=3, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt2", progress=False)
    assert resumed.history["val"][-1]["val_loss"] < result.history["val"][0]["val_loss"]
    ids = tokenizer("KING:\n", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=5, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 12
    assert isinstance(tokenizer.decode(out[0]), str)


def test_benchmark_steps_score_the_model_in_training_beside_the_loss(tokens, tmp_path):
    from tasks.pretrain import benchmark_scorer

    p = fx.params({"max_steps": 40, "eval_steps": 20, "save_steps": 20, "benchmark_steps": 20,
                   "benchmark_tasks": [{"name": "copa", "limit": 6}]}).pretrain
    seen: list[tuple[dict, int]] = []
    result = pretraining.train(p, seed=3, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt", progress=False,
                               on_metrics=lambda m, s: seen.append((m, s)), scorer=benchmark_scorer(p, tokens))
    rows = result.history["benchmarks"]
    assert [row["step"] for row in rows] == [20, 40]
    assert all(0.0 <= row["bench_copa_acc"] <= 1.0 for row in rows)
    assert [s for m, s in seen if "bench_copa_acc" in m] == [20, 40]  # logged beside the loss
    assert result.history["val"][-1]["step"] == 40 and result.model.training  # scoring gave training mode back
    assert benchmark_scorer(fx.params().pretrain, tokens) is None  # benchmark_steps null: off


def test_gpt2_style_decoder_trains(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    p = fx.params({"arch": "gpt2", "max_steps": 40, "warmup_steps": 5, "eval_steps": 20, "save_steps": 40,
                   "pad_vocab": 64}).pretrain
    result = pretraining.train(p, seed=3, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    assert type(result.model).__name__ == "GPT2LMHeadModel"
    assert result.model.config.vocab_size % 64 == 0 and result.model.config.vocab_size >= token_shards.read_meta(tokens)["vocab_size"]
    assert result.history["val"][-1]["val_loss"] < result.history["train"][0]["train_loss"]
    result.model.save_pretrained(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel"
    # Samples longer than the learned positions stop at the context instead of failing.
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokens / "tokenizer.json"), pad_token="<pad>",
                                        eos_token="<|endoftext|>")
    samples = evaluation.generate_samples(model, tokenizer, ["KING:"], n=1, max_new_tokens=100, temperature=1.0,
                                          top_k=None, seed=0, device=torch.device("cpu"))
    assert samples[0]["text"]


def test_tiny_masked_lm_beats_unigram(tokens, tmp_path):
    from transformers import AutoModelForMaskedLM

    p = fx.params({"arch": "bert", "max_steps": 300, "learning_rate": 0.002, "warmup_steps": 30, "eval_steps": 100,
                   "save_steps": 300}).pretrain
    result = pretraining.train(p, seed=3, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    assert result.masked
    meta = token_shards.read_meta(tokens)
    log_probs = evaluation.unigram_log_probs(batches.open_split(tokens, "train", meta), meta["vocab_size"])
    masking = batches.Masking(0.15, meta["special_ids"]["mask"], meta["vocab_size"],
                              tuple(sorted(meta["special_ids"].values())))
    m = evaluation.masked_split_metrics(result.model, batches.open_split(tokens, "val", meta), log_probs, masking,
                                        context=32, batch_size=32, device=torch.device("cpu"), seed=0)
    # A tiny BERT on characters starts slowly: clearly better than the unigram guess is enough.
    assert m["masked_accuracy"] > m["unigram_masked_accuracy"] + 0.05, m
    assert m["masked_loss"] < m["unigram_masked_loss"] - 0.15, m
    result.model.save_pretrained(tmp_path / "mlm")
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm")).__name__ == "BertForMaskedLM"


def test_rope_theta_reaches_the_llama_config_and_the_rotary_frequencies():
    # Llama 3's base is 500,000 (bench/bench_titan.py's 1B shape); the default stays Llama 2's 10,000.
    from lmforge.config.pretrain import PretrainParams
    from lmforge.training.model import make_config

    tok = TokenInfo(40, 0, 1, 2, 3)
    assert make_config(fx.params().pretrain, tok).rope_parameters["rope_theta"] == 10_000.0
    p = fx.params({"rope_theta": 500_000.0, "n_kv_head": 2}).pretrain
    config = make_config(p, tok)
    assert config.rope_parameters["rope_theta"] == 500_000.0
    model = build_model(p, tok, seed=0)
    head = p.d_model // p.n_head
    expected = 1.0 / 500_000.0 ** (torch.arange(0, head, 2, dtype=torch.float32) / head)
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected)
    with pytest.raises(ValueError, match="rope_theta"):
        PretrainParams(rope_theta=0.0)
    # The default keeps the run key of runs made before the knob existed; another base is another run.
    meta = {"splits": {}, "vocab_size": 300}
    assert "pretrain.rope_theta" not in pretraining.run_fingerprint(PretrainParams(), 1, meta, 1)
    llama3 = pretraining.run_fingerprint(PretrainParams(rope_theta=500_000.0), 1, meta, 1)
    assert llama3["pretrain.rope_theta"] == 500_000.0


@pytest.mark.parametrize("arch, extra", [("gpt2", {}), ("llama", {"n_kv_head": 2})])
def test_training_attention_computes_what_sdpa_computes(arch, extra):
    from lmforge.training.model import set_training_attention

    p = fx.params({"arch": arch, **extra}).pretrain
    model = build_model(p, TokenInfo(40, 0, 1, 2, 3), seed=0).eval()
    ids = torch.randint(4, 40, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        set_training_attention(model, True)
        assert model.config._attn_implementation != "sdpa"
        got = model(input_ids=ids).logits
        set_training_attention(model, False)
        assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_fused_adamw_clips_through_its_grad_scale_as_clip_grad_norm_does():
    from types import SimpleNamespace

    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    p = SimpleNamespace(max_grad_norm=1.0)
    weights = {}
    for fused in (False, True):  # fused AdamW runs on the CPU too: the GPU's code path, here
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        norms = []
        for step in range(6):
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
            ((model(x) ** 2).sum() * (10.0 if step % 2 else 1e-3)).backward()  # clipped, then not
            norms.append(float(torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])))
            pretrain_step.update(model, optimizer, None, p)
            assert getattr(optimizer, "grad_scale", None) is None  # no clipping carried into the next step
            optimizer.zero_grad(set_to_none=True)
        weights[fused] = [q.detach().clone() for q in model.parameters()]
        assert min(norms) < 1.0 < max(norms)
    for plain, fused in zip(weights[False], weights[True]):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_a_state_resumed_from_an_unfused_adamw_still_clips():
    # Optimizer.load_state_dict takes each group's settings, "fused" included, from the saved state:
    # a run checkpointed with a plain AdamW and resumed here steps unfused, so clip_grad_norm_ clips.
    from types import SimpleNamespace

    model = torch.nn.Linear(8, 8)
    saved = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}], lr=1e-2).state_dict()
    knobs = SimpleNamespace(optimizer="adamw", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1)
    optimizer = pretraining.make_optimizer(model, knobs)
    optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[0]["fused"] and optimizer.defaults["fused"]
    (model(torch.ones(4, 8)) * 100).sum().backward()
    pretrain_step.update(model, optimizer, None, SimpleNamespace(max_grad_norm=1.0))
    assert float(torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])) == pytest.approx(1.0, rel=1e-4)


def test_training_gelu_is_gpt2s_tanh_gelu():
    from transformers.activations import GELUTanh

    from lmforge.training.model import SigmoidTanhGELU

    x = torch.linspace(-12, 12, 4001, dtype=torch.float64).requires_grad_()
    want = GELUTanh()(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    got = SigmoidTanhGELU()(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    x32 = x.detach().float()
    torch.testing.assert_close(SigmoidTanhGELU()(x32), GELUTanh()(x32), rtol=1e-6, atol=1e-6)


def test_training_swaps_the_gelu_in_and_out():
    from transformers.activations import GELUTanh

    from lmforge.training.model import SigmoidTanhGELU, set_training_activation

    model = build_model(fx.params({"arch": "gpt2"}).pretrain, TokenInfo(40, 0, 1, 2, 3), seed=0)
    kinds = lambda: {type(m) for m in model.modules()} & {GELUTanh, SigmoidTanhGELU}  # noqa: E731
    assert kinds() == {GELUTanh}
    set_training_activation(model, True)
    assert kinds() == {SigmoidTanhGELU}
    set_training_activation(model, False)
    assert kinds() == {GELUTanh}


def test_training_leaves_the_model_on_plain_sdpa_and_its_own_gelu(tokens, tmp_path):
    from transformers.activations import GELUTanh

    from lmforge.training.model import SigmoidTanhGELU

    # Compiled: the run that trains with SigmoidTanhGELU (an eager one keeps torch's one-kernel GELU).
    p = fx.params({"arch": "gpt2", "compile": True, "max_steps": 4, "warmup_steps": 1, "eval_steps": 4,
                   "save_steps": 4}).pretrain
    result = pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    assert result.model.config._attn_implementation == "sdpa"
    modules = [type(m) for m in result.model.modules()]
    assert GELUTanh in modules and SigmoidTanhGELU not in modules


def test_a_compiled_step_may_be_captured_and_keeps_the_batches_strides():
    from lmforge.training.step_graph import _same_layout

    p = fx.params({"compile": True, "cuda_graph": True}).pretrain  # compile_mode default: no graphs of its own
    assert p.compile and p.cuda_graph
    windows = torch.arange(2 * 9).view(2, 9)
    x = windows[:, :-1]  # the sampler's inputs: a strided view of (context + 1)-long windows
    static = _same_layout(x)  # a compiled model guards on strides: a contiguous copy would recompile it
    assert static.stride() == x.stride() and torch.equal(static, x) and static.data_ptr() != x.data_ptr()


def test_a_compiled_run_trains_in_one_process(tokens, tmp_path):
    p = fx.params({"compile": True, "max_steps": 6, "warmup_steps": 1, "logging_steps": 2, "eval_steps": 6,
                   "save_steps": 6}).pretrain
    result = pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    assert result.history["train"][-1]["train_loss"] < result.history["train"][0]["train_loss"]


def test_ddp_overlap_sets_how_dynamo_compiles_a_ddp_module():
    import torch._dynamo as dynamo

    before = dynamo.config.optimize_ddp
    try:
        for overlap, mode in ((False, "no_optimization"), (True, "ddp_optimizer"),
                              ("compiled_autograd", "python_reducer")):
            pretrain_step.set_optimize_ddp(fx.params({"compile": True, "ddp_overlap": overlap}).pretrain)
            assert dynamo.config.optimize_ddp == mode
    finally:
        dynamo.config.optimize_ddp = before
    with pytest.raises(ValueError, match="ddp_overlap compiled_autograd traces the backward with torch.compile"):
        fx.params({"compile": False, "ddp_overlap": "compiled_autograd"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("param_dtype, compiled, optimizer", [("fp32", False, "adamw"), ("bf16", False, "adamw"),
                                                               ("bf16", True, "adamw"), ("fp32", False, "muon")],
                         ids=["fp32", "bf16", "bf16-compiled", "muon"])
def test_captured_steps_follow_the_eager_trajectory(tokens, tmp_path, param_dtype, compiled, optimizer):
    # Same seed and batches: the replayed graph must train like the eager loop (bf16, so close, not equal).
    # With param_dtype bf16 the graph also holds the copies between the bf16 weights and their fp32 masters;
    # compiled, it holds Inductor's kernels and the fused loss (G1's setting). Muon's groups read their
    # own learning rates from tensors of their own (G2's setting).
    common = {"device": "cuda", "max_steps": 60, "warmup_steps": 5, "eval_steps": 20, "save_steps": 30,
              "gradient_accumulation_steps": 2, "dropout": 0.0, "param_dtype": param_dtype, "compile": compiled,
              "fused_loss": compiled, "optimizer": optimizer, "muon_learning_rate": 1e-2}
    eager = pretraining.train(fx.params(common).pretrain, seed=2, tokens_dir=tokens, checkpoint_root=tmp_path / "e",
                           progress=False)
    graphed = pretraining.train(fx.params({**common, "cuda_graph": True}).pretrain, seed=2, tokens_dir=tokens,
                             checkpoint_root=tmp_path / "g", progress=False)
    for a, b in zip(eager.history["val"], graphed.history["val"]):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 0.02, (a, b)
    assert graphed.history["val"][-1]["val_loss"] < graphed.history["val"][0]["val_loss"]


def test_a_run_with_the_fused_loss_trains_like_one_without(tokens, tmp_path):
    common = {"arch": "gpt2", "max_steps": 30, "warmup_steps": 3, "eval_steps": 15, "save_steps": 30}
    p = fx.params({**common, "fused_loss": True}).pretrain
    assert pretrain_step.use_fused_loss(p, build_model(p, TokenInfo(300, 0, 1, 2, 3), seed=0), False, print)
    plain = pretraining.train(fx.params(common).pretrain, seed=4, tokens_dir=tokens, checkpoint_root=tmp_path / "p",
                           progress=False)
    fused = pretraining.train(p, seed=4, tokens_dir=tokens, checkpoint_root=tmp_path / "f", progress=False)
    assert [v["step"] for v in fused.history["val"]] == [15, 30]
    for a, b in zip(plain.history["val"], fused.history["val"]):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-3, (a, b)
    assert fused.history["val"][-1]["val_loss"] < fused.history["train"][0]["train_loss"]



class _Killed(Exception):
    pass


def killed_at_step_25_and_resumed(p, tokens: Path, root: Path):
    """Train `p` (seed 4) until its metrics at step 25 raise, then run it again: the resumed result."""
    def die_at_step_25(metrics, step):
        if step == 25:
            raise _Killed
    with pytest.raises(_Killed):
        pretraining.train(p, seed=4, tokens_dir=tokens, checkpoint_root=root, progress=False, on_metrics=die_at_step_25)
    return pretraining.train(p, seed=4, tokens_dir=tokens, checkpoint_root=root, progress=False)


@pytest.mark.parametrize("compile_optimizer", [False, True])
def test_bf16_working_weights_train_like_fp32_and_a_killed_run_resumes_exactly(tokens, tmp_path, compile_optimizer):
    common = {"arch": "gpt2", "max_steps": 30, "warmup_steps": 3, "eval_steps": 15, "save_steps": 10,
              "logging_steps": 5, "dropout": 0.0}
    fp32 = pretraining.train(fx.params(common).pretrain, seed=4, tokens_dir=tokens, checkpoint_root=tmp_path / "fp32",
                          progress=False)
    # compile_optimizer: the update compiled, reading the bf16 gradients (master_weights.compiled_update)
    p = fx.params({**common, "param_dtype": "bf16", "compile_optimizer": compile_optimizer}).pretrain
    torch._dynamo.utils.counters.clear()
    bf16 = pretraining.train(p, seed=4, tokens_dir=tokens, checkpoint_root=tmp_path / "bf16", progress=False)
    # The model is not compiled here: a graph can only be the update's.
    assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compile_optimizer
    assert {param.dtype for param in bf16.model.parameters()} == {torch.float32}  # the masters are what is kept
    for a, b in zip(fp32.history["val"], bf16.history["val"]):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 0.05, (a, b)
    assert bf16.history["val"][-1]["val_loss"] < bf16.history["train"][0]["train_loss"]

    resumed = killed_at_step_25_and_resumed(p, tokens, tmp_path / "killed")
    assert resumed.resumed_from == 20  # the bf16 copy is rebuilt from the fp32 masters of step 20
    reference = bf16.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference[name]), f"{name} differs after resume"

def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    p = fx.params({"arch": "gpt2", "optimizer": "muon", "muon_learning_rate": 0.01}).pretrain
    model = build_model(p, TokenInfo(300, 0, 1, 2, 3), seed=0)
    optimizer = pretraining.make_optimizer(model, p)
    muon_group = next(g for g in optimizer.param_groups if g["muon"])
    names = {id(q): n for n, q in model.named_parameters()}
    assert muon_group["lr"] == 0.01 and muon_group["momentum"] == 0.95
    assert {names[id(q)].split(".")[-2] for q in muon_group["params"]} == {"c_attn", "c_proj", "c_fc"}
    others = {names[id(q)] for g in optimizer.param_groups if not g["muon"] for q in g["params"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= others
    assert not others & {names[id(q)] for q in muon_group["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # each tensor once


def test_a_muon_run_learns_and_a_killed_one_resumes_exactly(tokens, tmp_path):
    common = {"arch": "gpt2", "max_steps": 30, "warmup_steps": 3, "eval_steps": 15, "save_steps": 10,
              "logging_steps": 5, "dropout": 0.0, "optimizer": "muon", "learning_rate": 3e-3}
    p = fx.params(common).pretrain
    whole = pretraining.train(p, seed=4, tokens_dir=tokens, checkpoint_root=tmp_path / "whole", progress=False)
    adamw = pretraining.train(fx.params({**common, "optimizer": "adamw"}).pretrain, seed=4, tokens_dir=tokens,
                              checkpoint_root=tmp_path / "adamw", progress=False)
    assert whole.run_dir.name != adamw.run_dir.name  # the optimizer is part of the run key
    assert whole.history["val"][-1]["val_loss"] < whole.history["train"][0]["train_loss"] - 1.0

    resumed = killed_at_step_25_and_resumed(p, tokens, tmp_path / "killed")
    assert resumed.resumed_from == 20  # Muon's momentum came back from the checkpoint with AdamW's moments
    reference = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference[name]), f"{name} differs after resume"


def _fp8_gpu() -> bool:
    import importlib.util

    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
            and importlib.util.find_spec("torchao") is not None)


@pytest.mark.skipif(not _fp8_gpu(), reason="FP8 training needs torchao and a GPU of compute capability >= 8.9")
@pytest.mark.parametrize("recipe, width", [("tensorwise", 1024), ("rowwise", 2048)])
def test_a_float8_run_trains_like_bf16_and_saves_a_plain_gpt2(tokens, tmp_path, recipe, width):
    # Widths at which torchao's thresholds convert some layers (the MLP's up-projection at least).
    from transformers.pytorch_utils import Conv1D

    common = {"arch": "gpt2", "device": "cuda", "d_model": width, "n_head": 8, "max_steps": 60, "warmup_steps": 5,
              "eval_steps": 20, "save_steps": 30, "dropout": 0.0, "compile": True, "param_dtype": "bf16",
              "fused_loss": True, "learning_rate": 1e-3}
    bf16 = pretraining.train(fx.params(common).pretrain, seed=2, tokens_dir=tokens, checkpoint_root=tmp_path / "b",
                             progress=False)
    said: list[str] = []
    fp8 = pretraining.train(fx.params({**common, "float8": recipe}).pretrain, seed=2, tokens_dir=tokens,
                            checkpoint_root=tmp_path / "f", progress=False, log=said.append)
    assert any(f"float8 {recipe}: " in line and "linear layers compute" in line for line in said), said
    # The stage's wiring, not FP8's accuracy (test_float8.py compares a step with bf16's): at these widths
    # and this learning rate the two runs drift apart early (8% at step 40 on an H200), then both settle.
    assert [v["step"] for v in fp8.history["val"]] == [v["step"] for v in bf16.history["val"]]
    assert fp8.history["val"][-1]["val_loss"] < fp8.history["train"][0]["train_loss"] - 1.0
    assert abs(fp8.history["val"][-1]["val_loss"] - bf16.history["val"][-1]["val_loss"]) < 0.15 * bf16.best_val_loss
    blocks = fp8.model.transformer.h
    assert all(type(block.mlp.c_fc) is Conv1D and type(block.attn.c_attn) is Conv1D for block in blocks)
    assert blocks[0].mlp.c_fc.weight.shape == (width, 4 * width)  # GPT-2's (in, out) layout again


# --- checkpoints ------------------------------------------------------------------------------


def test_batches_depend_only_on_seed_and_step(tokens):
    train = batches.open_split(tokens, "train")
    a = batches.BatchSampler(train, 32, 4, seed=5, device=torch.device("cpu"), accumulation=2)
    b = batches.BatchSampler(train, 32, 4, seed=5, device=torch.device("cpu"), accumulation=2)
    x1, y1 = a.get(7, 0)
    a.get(8, 0)
    x2, y2 = b.get(7, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(a.get(7, 1)[0], x1)
    with pytest.raises(IndexError):
        a.get(7, 2)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
def test_a_global_batch_is_the_same_however_it_is_cut(tokens, masked):
    # What lets a run resume on another number of processes: 1 process x 4 micro-batches of 2,
    # 2 processes x 2 x 2 and 4 processes x 1 x 2 see the same 8 windows of a step, in the same order.
    train = batches.open_split(tokens, "train")
    masking = batches.Masking(0.15, mask_id=3, vocab_size=300, special_ids=(0, 1, 2, 3)) if masked else None

    def cut(world: int, accumulation: int) -> torch.Tensor:
        parts = []
        for rank in range(world):
            sampler = batches.BatchSampler(train, 32, 2, seed=5, device=torch.device("cpu"), masking=masking,
                                           rank=rank, world=world, accumulation=accumulation)
            parts += [torch.cat(sampler.get(11, micro), dim=1) for micro in range(accumulation)]
        return torch.cat(parts)

    whole = batches.BatchSampler(train, 32, 8, seed=5, device=torch.device("cpu"), masking=masking)
    assert torch.equal(cut(1, 4), torch.cat(whole.get(11), dim=1))  # one process, one micro-batch of 8
    assert torch.equal(cut(1, 4), cut(2, 2)) and torch.equal(cut(1, 4), cut(4, 1))


def test_kill_and_resume_ends_bitwise_equal_to_an_uninterrupted_run(tokens, tmp_path):
    from safetensors.torch import load_file

    overrides = {"max_steps": 300, "save_steps": 20, "eval_steps": 100, "save": "last", "dropout": 0.1}
    root = fx.project(tmp_path / "proj", overrides, tokens=tokens)
    command = [sys.executable, "-m", "tasks.pretrain"]
    proc = subprocess.Popen(command, cwd=root, env=fx.stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not list((root / "models" / "checkpoints").glob("*/latest")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = next((root / "models" / "checkpoints").glob("*/latest"))
    killed_at = checkpoint.read_state(latest.parent / latest.read_text().strip())["step"]
    assert 0 < killed_at < 300, "the kill must land mid-training"
    assert not (root / "models" / "pretrained").exists()

    again = subprocess.run(command, cwd=root, env=fx.stage_env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming run" in again.stdout

    # The uninterrupted reference, in this process (one thread, like the stage).
    p = fx.params(overrides).pretrain
    reference = pretraining.train(p, seed=fx.params().seed, tokens_dir=tokens, checkpoint_root=tmp_path / "ref",
                               progress=False)
    resumed = load_file(root / "models" / "pretrained" / "model.safetensors")
    ref_state = reference.model.state_dict()
    assert resumed.keys() <= ref_state.keys()
    for name, value in resumed.items():
        assert torch.equal(value, ref_state[name]), f"{name} differs after resume"
    metrics = json.loads((root / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["resumed_from"] == killed_at
    assert metrics["tokens_per_s"] > 0 and metrics["train_s"] > 0
    assert (root / "reports" / "pretrain" / "loss.csv").read_text().startswith("step,train_loss,val_loss")


# A run in a real process: it opens its checkpoint folder, says so, and waits for a line on stdin.
_HOLDER = r"""
import sys
from lmforge.training import runtime
checkpoints = runtime.RunCheckpoints(sys.argv[1], {"run": 1}, runtime.Dist())
print("holding", flush=True)
sys.stdin.readline()
"""


def test_a_second_process_on_the_same_run_is_refused_and_a_killed_runs_folder_is_free(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=Path(__file__).parents[1],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "holding"
    with pytest.raises(checkpoint.RunInUseError, match=rf"is in use by another run \(pid {first.pid} on "):
        runtime.RunCheckpoints(tmp_path, {"run": 1}, runtime.Dist())
    runtime.RunCheckpoints(tmp_path, {"run": 2}, runtime.Dist())  # another run key is another folder
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    resumed = runtime.RunCheckpoints(tmp_path, {"run": 1}, runtime.Dist())  # the OS freed the killed run's lock
    assert resumed.dir == tmp_path / runtime.run_key({"run": 1})


def test_corrupt_or_mismatched_checkpoint_is_an_error_not_a_restart(tokens, tmp_path):
    p = fx.params({"max_steps": 20, "warmup_steps": 2, "save_steps": 10, "eval_steps": 10}).pretrain
    result = pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    folder = checkpoint.latest_checkpoint(result.run_dir)
    # A finished run started again does no work and does not restart.
    again = pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)
    assert again.resumed_from == 20

    shard = folder / "__0_0.distcp"  # the model and optimizer state rank 0 wrote
    blob = bytearray(shard.read_bytes())
    blob[-8:] = b"\xff" * 8
    shard.write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="__0_0.distcp does not match its sha256"):
        pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)

    shard.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="__0_0.distcp is missing"):
        pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)

    state = json.loads((folder / "state.json").read_text())
    state["files"].pop("__0_0.distcp")
    state["fingerprint"]["pretrain.d_model"] = 999
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match=r"another run configuration \(differs in: pretrain.d_model\)"):
        pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)

    (result.run_dir / "latest").write_text("step-000000999\n")
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt"):
        pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path, progress=False)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [runtime.warmup_cosine(s, warmup=10, total=100, floor=0.1) for s in range(101)]
    assert f[0] < f[5] < f[9] <= 1.0
    assert max(f) <= 1.0 and abs(f[10] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert abs(f[100] - 0.1) < 1e-9
    assert np.isclose(runtime.warmup_cosine(55, warmup=10, total=100, floor=0.0), 0.5)


def test_wrap_ddp_sets_the_bucket_size_and_keeps_fp32_gradients_on_gloo(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        notes: list[str] = []
        p = fx.params({"ddp_bucket_mb": 2, "ddp_comm_dtype": "bf16"}).pretrain
        ddp = pretrain_step.wrap_ddp(torch.nn.Linear(8, 8), p, runtime.Dist(world=1), notes.append)
        assert ddp.bucket_bytes_cap == 2 * 2**20
        assert notes == ["ddp_comm_dtype bf16 needs NCCL (GPUs); gloo sends the gradients as fp32"]
    finally:
        dist.destroy_process_group()


def run_two_ranks(*args: str, cwd: Path = fx.REPO, timeout: int) -> subprocess.CompletedProcess:
    """`args` under torchrun as two gloo processes on the CPU, with the stage's environment."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=cwd, env=fx.stage_env(), capture_output=True, text=True, timeout=timeout)


REPLICA_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
import pretrain_fixtures as fx
from lmforge.training import pretrain_step, pretraining

step_update = pretrain_step.update


def update_then_drift_on_rank_1(model, optimizer, working, p):
    step_update(model, optimizer, working, p)
    if torch.distributed.get_rank() == 1:  # as a rank that missed an all-reduce would be left
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-3


pretrain_step.update = update_then_drift_on_rank_1
p = fx.params({{"max_steps": 20, "warmup_steps": 2, "eval_steps": 10, "save_steps": 10}}).pretrain
pretraining.train(p, seed=1, tokens_dir={tokens!r}, checkpoint_root={checkpoints!r}, progress=False)
"""


def test_replicas_that_drift_apart_stop_the_run_on_every_rank_before_a_checkpoint(tokens, tmp_path):
    script = tmp_path / "drift.py"
    checkpoints = tmp_path / "checkpoints"
    script.write_text(REPLICA_SCRIPT.format(tests=str(Path(__file__).parent), tokens=str(tokens),
                                            checkpoints=str(checkpoints)))
    done = run_two_ranks(str(script), timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    for rank in (0, 1):  # both ranks stop, so neither waits for the other at the next collective
        assert f"[rank{rank}]: lmforge.training.pretraining.ReplicaDivergence: at step 10, rank 1's weights differ from rank 0's" \
            in output, output[-3000:]
    assert not list(checkpoints.glob("*/step-*")), "no checkpoint may be written from drifted replicas"


NAN_SCRIPT = """
import torch
from lmforge.training import pretraining, runtime

d = runtime.setup_distributed("cpu")
torch.manual_seed(0)  # the same weights on both ranks
model = torch.nn.Linear(4, 4)
with torch.no_grad():
    model.weight[0, 0] = float("nan")  # a run that blew up: the same NaN on both ranks is no drift
pretraining.check_replicas_agree(model, d, step=5)
print(f"rank {d.rank}: agree")
# Both ranks past every collective before either tears down: a rank that destroys its group while the
# other still talks to it makes gloo abort the process ("terminate called without an active exception").
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # left to exit, gloo's threads can abort the process
"""


def test_replicas_holding_the_same_nan_agree(tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT)
    done = run_two_ranks(str(script), timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 0: agree" in done.stdout and "rank 1: agree" in done.stdout


@pytest.mark.parametrize("ddp", [{}, {"ddp_comm_dtype": "bf16", "ddp_bucket_mb": 1}, {"param_dtype": "bf16"},
                                 {"compile": True, "ddp_overlap": False},
                                 {"compile": True, "ddp_overlap": "compiled_autograd", "param_dtype": "bf16", "fused_loss": True},
                                 {"param_dtype": "bf16", "compile_optimizer": True}],
                         ids=["fp32", "bf16-1mb-buckets", "bf16-weights", "compiled-one-graph", "compiled-autograd",
                              "compiled-update"])
def test_two_processes_under_torchrun_share_one_code_path(tokens, tmp_path, ddp):
    # DDP over gloo on the CPU: the path N GPUs take under torchrun, minus NCCL. The second case
    # asks for bf16 gradients (NCCL only, so refused with a note) in the smallest buckets allowed;
    # the third wraps the bf16 working copy (param_dtype bf16), whose gradients DDP sums in bf16;
    # the fourth compiles the DDP module as one graph (ddp_overlap false), G3's setting; the fifth traces
    # the backward and its all-reduces with compiled autograd (accumulating, so one micro-batch of each
    # step skips the all-reduce: a graph that kept or lost it wrongly leaves the replicas apart, which the
    # run checks before each checkpoint); the sixth compiles the update, which then reads DDP's averaged
    # bf16 gradients where they lie (views into its buckets) and writes both copies of the weights.
    root = fx.project(tmp_path / "proj", {"max_steps": 20, "warmup_steps": 2, "eval_steps": 10, "save_steps": 10,
                                          "gradient_accumulation_steps": 2, **ddp}, tokens=tokens)
    done = run_two_ranks("-m", "tasks.pretrain", cwd=root, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((root / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["tokens_per_step"] == 16 * 32 * 2 * 2
    latest = next((root / "models" / "checkpoints").glob("*/latest"))
    state = checkpoint.read_state(latest.parent / latest.read_text().strip())
    assert state["world_size"] == 2 and (latest.parent / latest.read_text().strip() / "rng-rank1.pt").exists()
    train = state["history"]["train"]
    assert train[-1]["train_loss"] < train[0]["train_loss"], train  # the averaged gradients still train
    if ddp.get("ddp_comm_dtype") == "bf16":  # bf16 needs NCCL: on gloo the run says so and goes on in fp32
        assert "ddp_comm_dtype bf16 needs NCCL" in done.stdout + done.stderr
    if ddp.get("compile_optimizer"):
        assert "compiled to read the copy's gradients" in done.stdout + done.stderr


# --- the progress bar; the run key across the rename to TrainingArguments' names ----------------


def test_the_bar_shows_no_val_field_before_the_first_evaluation():
    progress = pretraining.PretrainProgress(history={"train": [], "val": []}, best=float("inf"))
    assert pretraining.bar_fields(progress) == {}
    progress.last_train, progress.tokens_per_s = 2.5, 1234.0
    assert pretraining.bar_fields(progress) == {"loss": "2.500", "tok/s": "1,234"}  # no val=nan, no placeholder
    progress.last_val, progress.mfu = 2.25, 0.5
    assert pretraining.bar_fields(progress) == {"loss": "2.500", "val": "2.250", "tok/s": "1,234", "mfu": "50.0%"}


def test_a_run_shows_its_last_val_loss_on_the_bar(tokens, tmp_path, capsys):
    p = fx.params({"max_steps": 6, "warmup_steps": 1, "logging_steps": 1, "eval_steps": 3, "save_steps": 6}).pretrain
    result = pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt", log=lambda _m: None)
    bar = capsys.readouterr().err
    # The closed bar's line carries the val loss of the last evaluation (taken after the last log).
    assert f"val={result.history['val'][-1]['val_loss']:.3f}" in bar.splitlines()[-1] and "nan" not in bar, bar


def test_renamed_knobs_keep_the_run_key_runs_had_before_the_rename():
    # A run checkpointed before lr became learning_rate (and steps max_steps, ...) still resumes.
    from lmforge.config.pretrain import PretrainParams

    fingerprint = pretraining.run_fingerprint(PretrainParams(), 1, {"splits": {}, "vocab_size": 300}, 1)
    assert {"pretrain.lr", "pretrain.steps", "pretrain.grad_accum", "pretrain.grad_clip"} <= set(fingerprint)
    assert "pretrain.learning_rate" not in fingerprint
    assert runtime.run_key(fingerprint) == "d36c717a4e1e"  # these defaults' key, computed before the rename


def test_a_checkpoint_of_the_format_before_dcp_still_resumes(tokens, tmp_path):
    # A run checkpointed before checkpoints went through torch.distributed.checkpoint (format 1:
    # model.safetensors + optimizer.pt) keeps its run key and must go on where it stopped.
    import shutil

    from safetensors.torch import save_model

    p = fx.params({"max_steps": 20, "warmup_steps": 2, "save_steps": 10, "eval_steps": 10}).pretrain
    kept = tmp_path / "step-10"

    def keep_step_10(values, step):
        if "checkpoint_s" in values and step == 10:
            shutil.copytree(next((tmp_path / "ref").glob("*/step-000000010")), kept)

    reference = pretraining.train(p, seed=2, tokens_dir=tokens, checkpoint_root=tmp_path / "ref", progress=False,
                                  on_metrics=keep_step_10)
    # The step-10 checkpoint, rewritten in format 1 as the earlier code wrote it.
    run, _, _ = pretraining.prepare_run(p, 2, tokens, tmp_path / "scratch", None, lambda _m: None)
    state = checkpoint.load_checkpoint(kept, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                       rank=0, world_size=1, fingerprint=run.checkpoints.fingerprint)
    legacy = tmp_path / "legacy" / run.checkpoints.dir.name
    folder = legacy / ".step-000000010.tmp"
    folder.mkdir(parents=True)
    save_model(run.model, str(folder / "model.safetensors"))
    torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}, folder / "optimizer.pt")
    shutil.copy2(kept / "rng-rank0.pt", folder / "rng-rank0.pt")
    state = {k: v for k, v in state.items() if k not in ("files", "rng_restored")}
    checkpoint._finish_folder(folder, legacy / "step-000000010", {**state, "format": 1})
    (legacy / "latest").write_text("step-000000010\n")

    resumed = pretraining.train(p, seed=2, tokens_dir=tokens, checkpoint_root=tmp_path / "legacy", progress=False)
    assert resumed.resumed_from == 10
    ref_state = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, ref_state[name]), f"{name} differs after resuming a format-1 checkpoint"
    assert checkpoint.read_state(checkpoint.latest_checkpoint(resumed.run_dir))["format"] == 2


def test_checkpoints_from_before_global_batches_are_named_not_resumed(tmp_path):
    from lmforge.config.pretrain import PretrainParams

    meta = {"splits": {}, "vocab_size": 300}
    single = PretrainParams()
    # One process, no accumulation: the batches and the key are the ones such runs had.
    assert (runtime.run_key(pretraining.fingerprint_before_global_batches(single, 1, meta, 1))
            == runtime.run_key(pretraining.run_fingerprint(single, 1, meta, 1)))
    accumulated = PretrainParams(gradient_accumulation_steps=2)
    old = runtime.run_key(pretraining.fingerprint_before_global_batches(accumulated, 1, meta, 1))
    (tmp_path / old).mkdir()
    (tmp_path / old / "latest").write_text("step-000000010\n")
    said: list[str] = []
    key = runtime.run_key(pretraining.run_fingerprint(accumulated, 1, meta, 1))
    pretraining.warn_of_stranded_checkpoints(accumulated, 1, meta, runtime.Dist(), tmp_path, key, said.append)
    assert len(said) == 1 and str(tmp_path / old) in said[0] and "starts at step 0" in said[0]

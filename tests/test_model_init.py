"""A random model is built on the meta device and its weights drawn once, where it will train.

The reference is what transformers makes when it constructs the model for real: the same buffers,
the same kinds of values (normal init of the configured range, ones and zeros for norms and biases,
tied embeddings), with nothing left on the meta device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge.training.model import TokenInfo, build_model, make_config  # noqa: E402

TOK = TokenInfo(300, 0, 1, 2, 3)
ARCHS = {"llama": {"n_kv_head": 2, "tie_embeddings": True}, "gpt2": {}, "bert": {}}


def _built_for_real(p):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if p.arch == "bert" else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(make_config(p, TOK), attn_implementation="sdpa").float()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_random_model_matches_one_constructed_for_real_in_all_but_its_draws(arch):
    p = fx.params({"arch": arch, **ARCHS[arch]}).pretrain
    model, reference = build_model(p, TOK, seed=0), _built_for_real(p)

    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert on_meta == []
    # Buffers are computed, not drawn: rotary frequencies, BERT's position and token type ids.
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys()
    for name, buffer in buffers.items():
        assert torch.equal(buffer, expected[name]), name
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr() \
        or not model.config.tie_word_embeddings
    params, reference_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == reference_params.keys()
    for name, weight in params.items():
        ref = reference_params[name]
        assert weight.dtype == torch.float32 and weight.shape == ref.shape, name
        if ref.unique().numel() == 1:  # norms' ones, biases' zeros
            assert torch.equal(weight, ref), name
        elif weight.numel() >= 1024:  # drawn: the same spread as the model's own init gives
            assert weight.std().item() == pytest.approx(ref.std().item(), rel=0.15), name
    pad = model.config.pad_token_id
    if pad is not None and model.get_input_embeddings().padding_idx is not None:
        assert torch.equal(model.get_input_embeddings().weight[pad], reference.get_input_embeddings().weight[pad])


def test_no_weight_is_drawn_on_a_real_tensor_while_the_model_is_constructed(monkeypatch):
    # torch's own init runs as each layer is made; on the meta device it draws nothing. What the model
    # trains from is drawn after, by transformers' init (normal, not kaiming).
    real_draws = []
    kaiming = torch.nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        if not tensor.is_meta:
            real_draws.append(tuple(tensor.shape))
        return kaiming(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    build_model(fx.params({"arch": "llama", "n_kv_head": 2}).pretrain, TOK, seed=0)
    assert real_draws == []
    _built_for_real(fx.params({"arch": "llama", "n_kv_head": 2}).pretrain)  # the spy sees the old way
    assert real_draws


def test_the_same_seed_gives_the_same_weights_and_another_seed_other_ones():
    p = fx.params({"arch": "llama", "n_kv_head": 2}).pretrain
    first, again, other = (build_model(p, TOK, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    drawn = [k for k in first if first[k].unique().numel() > 1]
    assert drawn and not any(torch.equal(first[k], other[k]) for k in drawn)
    # Drawing the weights leaves the caller's generator where it was.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(p, TOK, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_random_model_is_made_on_the_gpu_it_is_asked_for():
    p = fx.params({"arch": "llama", "n_kv_head": 2}).pretrain
    model = build_model(p, TOK, seed=0, device="cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    again = build_model(p, TOK, seed=0, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))

"""lmforge.training.float8: GPT-2's Conv1D <-> nn.Linear swap (exact, reversible, saveable), the clear
errors where FP8 cannot run, and (on an FP8-capable GPU with torchao) a converted step close to bf16."""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lmforge.errors import UserError
from lmforge.training.float8 import (Float8Error, conv1d_from_linears, convert_linears, linears_from_conv1d,
                                     plain_linears, to_float8_training)

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
GPT2_LINEARS = ("c_attn", "c_proj", "c_fc")


def tiny_gpt2(n_embd: int = 32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=64, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def batch(device="cpu"):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (3, 16), generator=generator).to(device)


def conv1d_names(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if type(m) is Conv1D]


def test_linears_keep_logits_and_gradients():
    import copy

    conv = tiny_gpt2()
    linear = copy.deepcopy(conv)
    names = conv1d_names(conv)
    assert len(names) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks

    linears_from_conv1d(linear)
    assert conv1d_names(linear) == []
    modules = dict(linear.named_modules())
    assert all(type(modules[n]) is torch.nn.Linear for n in names)
    conv_state, linear_state = conv.state_dict(), linear.state_dict()
    assert conv_state.keys() == linear_state.keys()  # same names, transposed shapes
    for n in names:
        assert linear_state[f"{n}.weight"].shape == conv_state[f"{n}.weight"].shape[::-1]
        assert linear_state[f"{n}.weight"].is_contiguous()

    ids = batch()
    out_conv, out_linear = conv(ids, labels=ids), linear(ids, labels=ids)
    assert torch.allclose(out_conv.logits, out_linear.logits, atol=1e-6, rtol=0)
    out_conv.loss.backward()
    out_linear.loss.backward()
    conv_params, linear_params = dict(conv.named_parameters()), dict(linear.named_parameters())
    for name, param in conv_params.items():
        grad = linear_params[name].grad
        expected = param.grad.t() if name.removesuffix(".weight") in names else param.grad
        assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-5), name


def test_round_trip_restores_conv1d_bitwise():
    model = tiny_gpt2()
    names = conv1d_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears_from_conv1d(model)
    conv1d_from_linears(model)
    assert conv1d_names(model) == names
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is untouched


def test_round_trip_leaves_other_linears():
    """Only the modules that were Conv1D go back: the output layer stays a linear."""
    model = tiny_gpt2()
    linears_from_conv1d(model)
    conv1d_from_linears(model)
    assert type(model.lm_head) is torch.nn.Linear


def test_round_trip_saves_a_normal_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2()
    ids = batch()
    with torch.no_grad():
        expected = model(ids).logits
    linears_from_conv1d(model)
    conv1d_from_linears(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert conv1d_names(loaded) == conv1d_names(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.skipif(FP8_GPU, reason="checks the refusal on machines without an FP8 GPU")
def test_to_float8_training_needs_an_fp8_gpu():
    model = tiny_gpt2()
    with pytest.raises(Float8Error, match="CUDA GPU") as caught:
        to_float8_training(model, "tensorwise")
    assert isinstance(caught.value, UserError)
    assert conv1d_names(model)  # nothing was swapped before the refusal


def test_to_float8_training_names_missing_torchao(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    with pytest.raises(Float8Error, match="pip install torchao"):
        to_float8_training(tiny_gpt2(), "tensorwise")


def test_to_float8_training_refuses_old_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(Float8Error, match="8.9 or newer.*A100 has 8.0"):
        to_float8_training(tiny_gpt2(), "rowwise")


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
def test_emulated_float8_converts_and_goes_back():
    """torchao's emulated FP8 (plain matmuls, CPU too): the block linears become Float8Linear, the
    output layer and odd widths do not, and the round trip still restores GPT-2's Conv1D exactly."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc = type(model.transformer.h[0].mlp.c_fc)(100, 32)  # 100 wide: not FP8
    model.transformer.h[0].mlp.c_proj = type(model.transformer.h[0].mlp.c_proj)(32, 100)
    names = conv1d_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    converted = convert_linears(model, Float8LinearConfig(emulate=True))
    assert converted == 6
    float8 = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(float8) == 6 and not any(n.startswith("transformer.h.0.mlp") for n in float8)
    assert type(model.lm_head) is torch.nn.Linear
    ids = batch()
    model(ids, labels=ids).loss.backward()  # runs through the emulated FP8 casts

    conv1d_from_linears(model)
    assert conv1d_names(model) == names
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
def test_plain_linears_undoes_the_conversion_of_other_linears():
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    weights = [model[0].weight, model[2].weight]
    assert convert_linears(model, Float8LinearConfig(emulate=True)) == 2
    assert isinstance(model[0], Float8Linear)
    plain_linears(model)
    assert type(model[0]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    assert model[0].weight is weights[0] and model[2].weight is weights[1]


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
def test_only_the_layers_torchao_expects_to_gain_are_converted():
    from torchao.float8 import Float8LinearConfig

    # torchao's tensorwise thresholds at GPT-2 small's width: 768 -> 2304 and 768 -> 3072 gain,
    # 768 -> 768 and 3072 -> 768 do not.
    model = torch.nn.ModuleDict({"qkv": torch.nn.Linear(768, 2304), "out": torch.nn.Linear(768, 768),
                                 "up": torch.nn.Linear(768, 3072), "down": torch.nn.Linear(3072, 768)})
    assert convert_linears(model, Float8LinearConfig(emulate=True), where_faster="tensorwise") == 2
    assert {name for name, m in model.items() if type(m) is not torch.nn.Linear} == {"qkv", "up"}


@pytest.mark.skipif(not (FP8_GPU and HAS_TORCHAO), reason="needs torchao and a CUDA GPU of capability 8.9+")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_step_close_to_bf16(recipe, compiled):
    import copy

    from torchao.float8.float8_linear import Float8Linear

    reference = tiny_gpt2(n_embd=64).cuda().train()
    model = copy.deepcopy(reference)
    names = conv1d_names(model)
    assert to_float8_training(model, recipe, only_where_faster=False) == len(names) == 8
    assert to_float8_training(copy.deepcopy(reference), recipe) == 0  # 64 wide: too small to gain
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 8
    ids = batch("cuda")

    def loss(m):
        runner = torch.compile(m) if compiled else m
        with torch.autocast("cuda", torch.bfloat16):
            return runner(ids, labels=ids).loss

    fp8_loss, bf16_loss = loss(model), loss(reference)
    fp8_loss.backward()
    assert torch.isfinite(fp8_loss)
    assert torch.allclose(fp8_loss.float(), bf16_loss.float(), rtol=5e-2)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    conv1d_from_linears(model)
    assert conv1d_names(model) == names


def test_rowwise_has_inductor_round_its_casts_as_eager_does():
    import torch._inductor.config as inductor_config

    from lmforge.training.float8 import emulate_eager_casts_for

    with inductor_config.patch(emulate_precision_casts=False):  # patch restores it, where monkeypatch would delete it
        emulate_eager_casts_for("tensorwise")
        assert inductor_config.emulate_precision_casts is False
        emulate_eager_casts_for("rowwise")
        assert inductor_config.emulate_precision_casts is True

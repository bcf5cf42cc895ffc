"""Models for pretraining: a transformers causal decoder (Llama or GPT-2 style) or a BERT masked LM.

`build_model` makes one from the `pretrain` section of params.yaml, either randomly initialised
from the seed or loaded from a transformers folder (`init_from`, optionally a GGUF file in it).
Every check that can fail (heads not dividing the width, a vocabulary that disagrees with the
tokenizer, a context the model cannot hold) fails here, before any training starts.

Imports only torch and transformers (the training path runs on a bare GPU image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError

MASKED_ARCHS = ("bert",)


class ModelConfigError(UserError, ValueError):
    """The model cannot be built for this data: the message says what disagrees and how to fix it."""


@dataclass(frozen=True)
class TokenInfo:
    """What the model needs to know about the tokenizer (from the token folder's meta.json)."""

    vocab_size: int
    eos_id: int
    pad_id: int
    mask_id: int
    unk_id: int

    @classmethod
    def from_meta(cls, meta: dict) -> TokenInfo:
        ids = meta["special_ids"]
        return cls(int(meta["vocab_size"]), int(ids["eos"]), int(ids["pad"]), int(ids["mask"]), int(ids["unk"]))


def is_masked(arch_or_model: Any) -> bool:
    """True for a masked LM (by arch name, transformers config or model)."""
    if isinstance(arch_or_model, str):
        return arch_or_model in MASKED_ARCHS
    config = getattr(arch_or_model, "config", arch_or_model)
    return any(a.endswith("ForMaskedLM") for a in (getattr(config, "architectures", None) or [])) or (
        getattr(config, "model_type", "") in MASKED_ARCHS and not getattr(config, "is_decoder", False)
    )


def _llama_ff(d_model: int) -> int:
    # SwiGLU keeps the parameter count of a 4x MLP at about 8/3 x width; round up to 32.
    return ((8 * d_model // 3) + 31) // 32 * 32


def make_config(p: Any, tok: TokenInfo):
    """A transformers config from the pretrain params and the tokenizer facts."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if p.d_model % p.n_head:
        raise ModelConfigError(f"pretrain.n_head ({p.n_head}) does not divide pretrain.d_model ({p.d_model})")
    # Rows past the tokenizer's ids are never inputs and learn to score -inf as outputs; a width
    # that is a multiple of 64 keeps the output layer's matrix products on aligned tensor-core tiles.
    vocab = -(-tok.vocab_size // p.pad_vocab) * p.pad_vocab
    common = dict(vocab_size=vocab, pad_token_id=tok.pad_id, tie_word_embeddings=p.tie_embeddings)
    if p.arch == "llama":
        return LlamaConfig(
            hidden_size=p.d_model,
            intermediate_size=p.d_ff or _llama_ff(p.d_model),
            num_hidden_layers=p.n_layer,
            num_attention_heads=p.n_head,
            num_key_value_heads=p.n_kv_head or p.n_head,
            max_position_embeddings=p.context,
            # transformers 5 reads the rotary base from rope_parameters (a rope_theta keyword is only
            # converted into it)
            rope_parameters={"rope_type": "default", "rope_theta": float(p.rope_theta)},
            attention_dropout=p.dropout,
            bos_token_id=tok.eos_id,
            eos_token_id=tok.eos_id,
            **common,
        )
    if p.arch == "gpt2":
        return GPT2Config(
            n_embd=p.d_model,
            n_inner=p.d_ff or 4 * p.d_model,
            n_layer=p.n_layer,
            n_head=p.n_head,
            n_positions=p.context,
            activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one kernel (gelu_new is seven)
            resid_pdrop=p.dropout,
            embd_pdrop=p.dropout,
            attn_pdrop=p.dropout,
            bos_token_id=tok.eos_id,
            eos_token_id=tok.eos_id,
            **common,
        )
    if p.arch == "bert":
        return BertConfig(
            hidden_size=p.d_model,
            intermediate_size=p.d_ff or 4 * p.d_model,
            num_hidden_layers=p.n_layer,
            num_attention_heads=p.n_head,
            max_position_embeddings=p.context,
            hidden_dropout_prob=p.dropout,
            attention_probs_dropout_prob=p.dropout,
            type_vocab_size=1,
            **common,
        )
    raise ModelConfigError(f"pretrain.arch {p.arch!r} is not one of llama, gpt2, bert")


def max_context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _tokenizer_vocab(folder: Path, gguf_file: str | None = None) -> dict[str, int] | None:
    """The vocabulary of the tokenizer saved in a model folder (or inside its GGUF file), if any."""
    path = folder / "tokenizer.json"
    if path.exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    if gguf_file:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).get_vocab())
    return None


def _without_quantizer(model):
    """transformers marks a GGUF load as quantized, which save_pretrained refuses: the same
    (dequantised) weights in a plain model of the same class."""
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    plain = type(model)._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def check_same_tokenizer(data_vocab: dict[str, int] | None, model_vocab: dict[str, int] | None, source: str) -> None:
    if data_vocab is not None and model_vocab is not None and data_vocab != model_vocab:
        differ = sum(1 for t, i in data_vocab.items() if model_vocab.get(t) != i)
        raise ModelConfigError(
            f"vocabulary mismatch: the tokenizer saved with {source} maps {differ} of the "
            f"{len(data_vocab)} tokens of the token folder to other ids; the token arrays were made "
            f"with a different tokenizer"
        )


def check_compatible(model, tok: TokenInfo, context: int, *, data_vocab: dict[str, int] | None = None,
                     model_vocab: dict[str, int] | None = None, source: str = "the model") -> None:
    """Fail early when the model and the token data disagree."""
    vocab = model.config.vocab_size
    if vocab < tok.vocab_size:
        raise ModelConfigError(
            f"vocabulary mismatch: {source} has {vocab} token embeddings but the tokenizer of "
            f"the token folder has {tok.vocab_size} tokens; retokenize with the model's tokenizer or "
            f"train from scratch (pretrain.init_from: null)"
        )
    check_same_tokenizer(data_vocab, model_vocab, source)
    limit = max_context(model.config)
    if limit is not None and context > limit:
        raise ModelConfigError(
            f"pretrain.context ({context}) exceeds what {source} can hold ({limit} positions)"
        )


def build_model(p: Any, tok: TokenInfo, seed: int, *, data_vocab: dict[str, int] | None = None,
                device: torch.device | str = "cpu"):
    """A model ready to train, in fp32: a random one initialised on `device`, one from init_from on the CPU.

    p: the pretrain params (attributes as in lmforge.config.pretrain.PretrainParams).
    data_vocab: the token->id map of the token folder's tokenizer, compared with init_from's tokenizer.
    device: where a random model's weights are made and drawn. Its generator decides them, so a seed
    gives the same weights on the same device type (and, for GPUs, the same model), not across them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if p.init_from:
        folder = Path(p.init_from)
        if not folder.is_dir():
            raise ModelConfigError(f"pretrain.init_from: {folder} is not a folder")
        kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.float32}
        if p.gguf_file:
            if not (folder / p.gguf_file).exists():
                raise ModelConfigError(f"pretrain.gguf_file: {folder / p.gguf_file} does not exist")
            kwargs["gguf_file"] = p.gguf_file
        try:
            config = AutoConfig.from_pretrained(folder, **({"gguf_file": p.gguf_file} if p.gguf_file else {}))
        except (OSError, ValueError) as err:
            raise ModelConfigError(f"pretrain.init_from: {folder} is not a transformers model folder: {err}") from None
        model_vocab = _tokenizer_vocab(folder, p.gguf_file)
        if data_vocab is not None and model_vocab is None:
            raise ModelConfigError(
                f"pretrain.init_from: {folder} holds no tokenizer (tokenizer.json or a GGUF file), so "
                f"nothing shows that the token folder was made with the model's tokenizer; add its tokenizer.json"
            )
        check_same_tokenizer(data_vocab, model_vocab, f"init_from {folder}")  # before loading weights
        auto = AutoModelForMaskedLM if is_masked(config) else AutoModelForCausalLM
        model = auto.from_pretrained(folder, **kwargs)
        check_compatible(model, tok, p.context, data_vocab=data_vocab, model_vocab=model_vocab,
                         source=f"init_from {folder}")
        if p.gguf_file:
            model = _without_quantizer(model)
        return model.float()

    auto = AutoModelForMaskedLM if p.arch in MASKED_ARCHS else AutoModelForCausalLM
    model = _initialised(auto, make_config(p, tok), seed, torch.device(device))
    check_compatible(model, tok, p.context)
    return model.float()


def _initialised(auto, config, seed: int, device: torch.device):
    """A random model from `config`, its weights drawn once, on `device`.

    Built on the meta device first: constructed for real on the CPU, every weight would be drawn
    twice there (torch's init as each layer is made, then the model's own) and then copied to the
    GPU. Drawing once, where the model will train, is what torchtitan does too.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = auto.from_config(config, attn_implementation="sdpa")  # transformers skips init on meta
        model.to_empty(device=device)
        model.init_weights()  # the model's own init; it also fills the buffers (rotary frequencies, BERT's ids)
    return model


# Training runs on unpadded windows: every sequence is causal from its first token, so SDPA's
# `is_causal` flag is the whole mask. transformers builds that mask as a 4D tensor whenever
# torch.compile traces (with torch < 2.14), and a mask bars SDPA from its flash and cuDNN kernels:
# the compiled G1 step ran at 48% MFU with it. So the training loop swaps this in, and back.
CAUSAL_TRAINING_ATTENTION = "lmforge_causal_sdpa"


def _causal_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 **_ignored):
    """transformers attention-interface function: SDPA with is_causal=True and no mask."""
    import torch.nn.functional as F

    groups = getattr(module, "num_key_value_groups", 1)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                         enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def set_training_attention(model, training: bool) -> None:
    """Causal decoders: the mask-free causal SDPA while training (True), plain "sdpa" again after (False).

    Never leave it on for inference: a cached decoding step (one query, many keys) is not upper-left causal.
    """
    if is_masked(model):
        return
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_TRAINING_ATTENTION, _causal_sdpa)
    model.set_attn_implementation(CAUSAL_TRAINING_ATTENTION if training else "sdpa")


TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


class SigmoidTanhGELU(torch.nn.Module):
    """GPT-2's tanh GELU through the sigmoid: 0.5 * (1 + tanh(u)) is sigmoid(2u), so this is the same
    function as transformers' GELUTanh, up to float rounding.

    Why: Inductor compiles tanh to libdevice's accurate tanh, many instructions per element, and sigmoid
    to one fast exponential. G1's GELU kernels (forward, and backward with the MLP's bias gradient)
    ran 0.55 ms faster per step on an H200: +0.6% tokens/s with 6 and with 12 heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))


def set_training_activation(model, training: bool) -> None:
    """Swap transformers' tanh GELU for SigmoidTanhGELU while training (True), and back (False), so the
    saved model holds the modules its config names.

    For compiled training only: eagerly, torch's tanh GELU is one kernel and this form is six (G2's
    eager, graph-captured steps lost a quarter of their speed to it)."""
    from transformers.activations import GELUTanh

    old, new = (GELUTanh, SigmoidTanhGELU) if training else (SigmoidTanhGELU, GELUTanh)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is old:
                setattr(module, name, new())


def count_params(model, *, non_embedding: bool = False) -> int:
    """Parameters, each shared tensor counted once; optionally without position embeddings."""
    seen: set[int] = set()
    total = 0
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if non_embedding and ("position" in name or name.endswith("wpe.weight")):
            continue
        total += param.numel()
    return total


def flops_per_token(model, context: int) -> float:
    """Training FLOPs per token: 6N + 12 * layers * width * context (PaLM appendix B)."""
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    width = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    return 6.0 * count_params(model, non_embedding=True) + 12.0 * layers * width * context


def blocks(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (Llama's model.layers, GPT-2's transformer.h, BERT's
    encoder.layer): the first ModuleList as long as the config's layer count."""
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise ModelConfigError(f"{type(model).__name__} has no list of {layers} blocks to checkpoint or shard")


def every_nth_block(setting: str | int, n_blocks: int) -> list[int]:
    """The blocks pretrain.activation_checkpointing recomputes: none, full, or every n-th (from the first)."""
    if setting == "none":
        return []
    step = 1 if setting == "full" else int(setting)
    return list(range(0, n_blocks, step))


def set_activation_checkpointing(model, setting: str | int, training: bool) -> None:
    """Wrap the chosen blocks so the backward recomputes their activations (True), or unwrap them
    (False: the saved model holds its own modules). Non-reentrant checkpointing: it works under
    torch.compile and FSDP2, and with the keyword arguments transformers' blocks take."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointWrapper,
                                                                             checkpoint_wrapper)

    stack = blocks(model)
    chosen = set(every_nth_block(setting, len(stack))) if training else set()
    for index, block in enumerate(stack):
        if isinstance(block, CheckpointWrapper) and index not in chosen:
            stack[index] = block._checkpoint_wrapped_module
        elif not isinstance(block, CheckpointWrapper) and index in chosen:
            stack[index] = checkpoint_wrapper(block)

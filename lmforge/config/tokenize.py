"""The `tokenize` section: the tokenizer the tokenize stage learns, or the base model's it takes
(lmforge/data/tokenization.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section


class TokenizeParams(Section):
    # char: one token per character; bpe: a byte-level BPE learned on the corpus; pretrained: the
    # tokenizer of `model` (a packaged model such as smollm2, or a transformers folder), kept as it
    # is, so that pretrain.init_from can continue training that model on the corpus.
    kind: Literal["char", "bpe", "pretrained"] = "bpe"
    model: str | None = Field(None, min_length=1)
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    sample_mb: float = Field(64.0, gt=0.0)  # MB of train text (a seeded sample) the tokenizer learns from

    @model_validator(mode="after")
    def _model_with_pretrained(self) -> TokenizeParams:
        if self.kind == "pretrained" and self.model is None:
            raise ValueError("kind pretrained takes the tokenizer of `model`: name a packaged model (smollm2) or a folder")
        if self.kind != "pretrained" and self.model is not None:
            raise ValueError(f"model is read only with kind pretrained; kind {self.kind} learns its own tokenizer")
        return self

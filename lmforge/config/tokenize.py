"""The `tokenize` section: the tokenizer the tokenize stage learns (lmforge/data/tokenization.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config import Section


class TokenizeParams(Section):
    kind: Literal["char", "bpe"] = "bpe"
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    sample_mb: float = Field(64.0, gt=0.0)  # MB of train text (a seeded sample) the tokenizer learns from

"""The `split` section: per dataset, the seeded train/val/test split (lmforge/data/splitting.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Fraction, Section


class SplitParams(Section):
    mode: Literal["hash", "random", "contiguous"] = "random"
    val: Fraction = 0.1
    test: Fraction = 0.1
    max_rows: int | None = Field(None, ge=3)

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves nothing to train on")
        if self.mode == "hash" and self.max_rows is not None:
            raise ValueError("max_rows has no meaning in hash mode (each document is placed on its own); set it to null")
        return self

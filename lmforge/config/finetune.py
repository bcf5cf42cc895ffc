"""The `finetune` section: sequence-classification fine-tuning (lmforge/training/finetuning.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Fraction, Section, refuse_renamed_knobs


class FinetuneParams(Section):
    """Sequence-classification fine-tuning (lmforge/training/finetuning.py); the tune stage searches it."""

    class Lora(Section):
        r: int = Field(8, ge=1, le=4096)
        alpha: float = Field(16.0, gt=0)
        dropout: Fraction = 0.1
        target_modules: list[str] | None = Field(None, min_length=1)

    base_model: str = Field("minilm", min_length=1)
    method: Literal["full", "lora"] = "full"
    lora: Lora = Lora()
    max_length: int = Field(128, ge=8, le=32_768)
    truncation: Literal["head", "tail", "head_tail"] = "head"
    num_train_epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1, le=65_536)
    eval_batch_size: int = Field(64, ge=1, le=65_536)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0)  # lr x decay^(layers above): the head learns fastest
    warmup_ratio: Fraction = 0.1
    max_grad_norm: float = Field(1.0, ge=0.0)
    group_by_length: bool = True
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    early_stopping_patience: int = Field(2, ge=0)
    save_steps: int = Field(100, ge=1)
    max_train_rows: int | None = Field(None, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    pad_multiple: int = Field(8, ge=1, le=128)  # batch widths rounded up to a multiple (tensor-core friendly)
    logging_steps: int = Field(50, ge=1)
    use_tuned: bool = True
    baseline_c: float = Field(4.0, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _no_old_names(cls, data: object) -> object:
        return refuse_renamed_knobs(data, "finetune")

"""The `sft` section: chat fine-tuning of a decoder on conversations (lmforge/training/chat_tuning.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config import Benchmark, Fraction, Section


class SftParams(Section):
    """Supervised fine-tuning on conversations: loss on the assistant's tokens, packed rows, full or LoRA."""

    class Lora(Section):
        r: int = Field(16, ge=1, le=4096)
        alpha: float = Field(32.0, gt=0)
        dropout: Fraction = 0.05
        target_modules: list[str] | None = Field(None, min_length=1)

    dataset: str = Field("chat", min_length=1)  # the split folder it reads (data/split/<dataset>)
    # trl: TRL's SFTTrainer inside lmforge's contract (lmforge/training/chat_trl.py), 1.38x the tokens/s
    # of lmforge's own loop (lmforge/training/chat_tuning.py) on one H100 at the same loss; lmforge: the
    # own loop, about twice TRL's speed on 2 CPU cores; auto: trl on a GPU, lmforge on the CPU.
    engine: Literal["auto", "trl", "lmforge"] = "auto"
    base_model: str = Field("smollm2", min_length=1)
    method: Literal["full", "lora"] = "lora"
    lora: Lora = Lora()
    chat_template: Literal["model", "plain"] = "model"
    max_length: int = Field(256, ge=16, le=131_072)
    pack: bool = True
    max_train_conversations: int | None = Field(None, ge=1)
    max_eval_conversations: int | None = Field(None, ge=1)
    num_train_epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, le=65_536)
    eval_batch_size: int = Field(8, ge=1, le=65_536)
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_ratio: Fraction = 0.1
    max_grad_norm: float = Field(1.0, ge=0.0)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    sample_prompts: list[str] = Field(default_factory=lambda: ["Hi! How was your weekend?"], max_length=32)
    sample_tokens: int = Field(48, ge=1, le=4096)
    # Harness tasks scored on the base model and on the chat model, the same documents for both
    # (reports/sft/benchmarks.json): fine-tuning that forgets shows as a drop. []: none. Sized for
    # 2 CPU cores (about 50 s for both models); configs/gpu.yaml scores the whole sets.
    benchmarks: list[Benchmark] = Field(default_factory=lambda: [Benchmark(name=name, limit=30)
                                                                 for name in ("hellaswag", "arc_easy", "piqa")])
    benchmark_batch_size: int = Field(16, ge=1)

"""The `evaluate` section: scoring the pretrained language model (lmforge/evaluation/language_model.py)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import Benchmark, Section

# accelerate's sizes (convert_file_size_to_int): no TB, and a bare number is no size in a string.
_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*[KMG]i?B$", re.IGNORECASE)


def _default_benchmarks() -> list[Benchmark]:
    # Sized for 2 CPU cores: ~11 s for the 1M-parameter default model, ~55 s for SmolLM2-135M.
    # (A PIQA answer longer than the default model's 128 positions is passed over and counted.)
    return [Benchmark(name=name, limit=100) for name in ("hellaswag", "arc_easy", "piqa", "winogrande")]


class EvaluateParams(Section):
    """lmforge/evaluation/language_model.py: losses over whole splits, a unigram baseline, samples."""

    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    batch_size: int = Field(32, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    samples: int = Field(3, ge=0, le=100)
    sample_tokens: int = Field(120, ge=1)
    temperature: float = Field(0.8, gt=0.0, le=10.0)
    top_k: int | None = Field(50, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:"])
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A model larger than one device: none puts it whole on `device`; auto is transformers'
    # device_map="auto", its layers spread over the visible GPUs, then CPU memory, then disk
    # (with device cpu: CPU memory, then disk).
    device_map: Literal["none", "auto"] = "none"
    # device_map auto only: accelerate's cap per device, a GPU index or cpu -> a size such as 60GiB;
    # a device left out gets nothing, and disk takes what fits nowhere (null: what each device has free).
    max_memory: dict[str, str] | None = None
    # lm-evaluation-harness tasks scored on the model (lmforge/evaluation/benchmarks.py); []: none.
    benchmarks: list[Benchmark] = Field(default_factory=_default_benchmarks)
    benchmark_batch_size: int = Field(16, ge=1)  # documents' choices per forward pass in the harness

    @field_validator("max_memory", mode="before")
    @classmethod
    def _device_keys(cls, caps: object) -> object:
        # YAML reads `0: 60GiB` with an int key.
        if isinstance(caps, dict):
            return {str(k): v for k, v in caps.items()}
        return caps

    @field_validator("max_memory")
    @classmethod
    def _sizes(cls, caps: dict[str, str] | None) -> dict[str, str] | None:
        for key, size in (caps or {}).items():
            # accelerate reads a disk cap and ignores it: disk always takes the rest.
            if not (key.isdigit() or key == "cpu"):
                raise ValueError(f"{key!r} is no device max_memory caps: a GPU index (0, 1, ...) or cpu")
            if not _MEMORY_SIZE.match(size):
                raise ValueError(f"{key}: {size!r} is no size accelerate reads: a number and KB, MB, GB, "
                                 "KiB, MiB or GiB, e.g. 60GiB")
        return caps

    @model_validator(mode="after")
    def _distinct(self) -> EvaluateParams:
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits lists a split twice: {self.splits}")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmarks lists a task twice: {names}")
        if self.samples and not self.prompts:
            raise ValueError("samples > 0 needs at least one prompt")
        return self

    @model_validator(mode="after")
    def _placement(self) -> EvaluateParams:
        if self.max_memory is not None and self.device_map != "auto":
            raise ValueError("max_memory caps the devices of device_map auto: set device_map: auto, "
                             "or max_memory: null")
        gpus = [key for key in self.max_memory or {} if key.isdigit()]
        if gpus and self.device == "cpu":
            raise ValueError(f"device cpu keeps the GPUs out of device_map auto, yet max_memory caps GPU "
                             f"{', '.join(gpus)}: use device auto or cuda, or leave the GPUs out of max_memory")
        return self

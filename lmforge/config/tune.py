"""The `tune` section: the Optuna study over finetune's knobs (lmforge/training/tuning.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, model_validator

from lmforge.config import Section, renamed_key_hint
from lmforge.config.finetune import FinetuneParams


class TuneParams(Section):
    """An Optuna study over finetune's knobs (lmforge/training/tuning.py)."""

    class Dimension(Section):
        """One searched knob: float / int in [low, high] (log scale or step), or categorical."""

        type: Literal["float", "int", "categorical"]
        low: float | None = None
        high: float | None = None
        log: bool = False
        step: float | None = Field(None, gt=0)
        choices: list[bool | int | float | str] | None = None

        @model_validator(mode="after")
        def _sampleable(self) -> TuneParams.Dimension:
            if self.type == "categorical":
                if not self.choices:
                    raise ValueError("a categorical dimension needs a non-empty `choices` list")
                if self.low is not None or self.high is not None or self.step is not None or self.log:
                    raise ValueError("a categorical dimension takes only `choices`")
                return self
            if self.choices is not None:
                raise ValueError(f"a {self.type} dimension takes low/high, not choices")
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} dimension needs both `low` and `high`")
            if self.low > self.high:
                raise ValueError(f"low ({self.low:g}) exceeds high ({self.high:g})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale dimension needs low > 0, got {self.low:g}")
            if self.log and self.step is not None:
                raise ValueError("`log` and `step` cannot be combined")
            if self.type == "int":
                for name in ("low", "high", "step"):
                    value = getattr(self, name)
                    if value is not None and value != int(value):
                        raise ValueError(f"an int dimension needs an integer {name}, got {value:g}")
            return self

        def candidates(self) -> list:
            """The values that bound this dimension (checked against finetune's schema)."""
            if self.type == "categorical":
                return list(self.choices or [])
            cast = int if self.type == "int" else float
            return [cast(self.low), cast(self.high)]

    study_name: str = Field("finetune", min_length=1)
    storage: str | None = None
    n_trials: int = Field(2, ge=1, le=100_000)
    timeout: float | None = Field(None, gt=0)
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    startup_trials: int = Field(10, ge=0)
    pruner: Literal["median", "hyperband", "threshold", "none"] = "median"
    pruner_startup_trials: int = Field(1, ge=0)
    pruner_warmup_epochs: int = Field(0, ge=0)
    pruner_threshold: float = Field(0.0, ge=0.0, le=1.0)
    heartbeat_interval: int | None = Field(60, ge=1)
    max_train_rows: int | None = Field(400, ge=2)
    max_val_rows: int | None = Field(200, ge=2)
    max_length: int | None = Field(None, ge=8, le=32_768)  # trials' max_length (null: finetune's)
    # The study's first trial runs finetune's own values (the untuned default); fine-tuning
    # takes the best trial only when it beats that trial by at least this much.
    min_gain: float = Field(0.01, ge=0.0, le=1.0)
    space: dict[str, Dimension] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _space_fits_finetune(self) -> TuneParams:
        # Every searched key must be a finetune knob, and every bound a value finetune accepts,
        # so a study never starts on a space whose trials would all fail.
        fields = FinetuneParams.model_fields
        for key, dim in self.space.items():
            head, _, rest = key.partition(".")
            if hint := renamed_key_hint(f"tune.space.{key}"):
                raise ValueError(hint)
            if head not in fields or (rest and head != "lora"):
                raise ValueError(f"space.{key}: not a finetune knob")
            if rest and rest not in FinetuneParams.Lora.model_fields:
                raise ValueError(f"space.{key}: not a finetune.lora knob")
            for value in dim.candidates():
                override = {head: {rest: value}} if rest else {head: value}
                try:
                    FinetuneParams.model_validate(override)
                except ValidationError as err:
                    reason = "; ".join(e["msg"] for e in err.errors())
                    raise ValueError(f"space.{key}: {value!r} is not a valid finetune.{key}: {reason}") from None
        return self

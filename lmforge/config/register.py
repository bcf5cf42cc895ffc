"""The `register` section: registering, gating and serving the models (lmforge/registry/)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section

MAX_SERVED_BODY_BYTES = 256 << 20


class RegisterParams(Section):
    """lmforge/registry/registration.py: log and register the models in MLflow, gate promotion (aliases only)."""

    class Gate(Section):
        """`lmforge promote` moves `champion` to the challenger only when this passes."""

        metric: str = Field(min_length=1)
        direction: Literal["max", "min"] = "max"
        min_gain: float = Field(0.0, ge=0.0)

    class Model(Section):
        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=200)
        gate: RegisterParams.Gate

    class Serving(Section):
        """Request caps of the served models: a request over them is answered 400."""

        max_texts: int = Field(64, ge=1, le=10_000)
        max_chars: int = Field(20_000, ge=1, le=10_000_000)
        max_new_tokens: int = Field(64, ge=1, le=4096)

        @model_validator(mode="after")
        def _body_fits_memory(self) -> RegisterParams.Serving:
            # The server's body cap is room for max_texts texts of max_chars characters, each
            # escaped to 6 bytes (lmforge/registry/serving.py: body_limit): keep it to what one
            # server can hold, so no pair of caps lets a client send gigabytes.
            body = self.max_texts * (self.max_chars * 6 + 16) + 4096
            if body > MAX_SERVED_BODY_BYTES:
                raise ValueError(f"max_texts x max_chars allows request bodies of {body:,} bytes; the most is "
                                 f"{MAX_SERVED_BODY_BYTES:,} ({MAX_SERVED_BODY_BYTES >> 20} MiB): lower one of them")
            return self

    tracking_uri: str | None = Field(None, min_length=1)
    sentiment: Model = Field(default_factory=lambda: RegisterParams.Model(
        name="lmforge-sentiment", gate={"metric": "accuracy", "direction": "max"}))
    lm: Model = Field(default_factory=lambda: RegisterParams.Model(
        name="lmforge-lm", gate={"metric": "perplexity", "direction": "min"}))
    chat: Model = Field(default_factory=lambda: RegisterParams.Model(
        name="lmforge-chat", gate={"metric": "loss", "direction": "min"}))
    serving: Serving = Field(default_factory=lambda: RegisterParams.Serving())

    @model_validator(mode="after")
    def _distinct_names(self) -> RegisterParams:
        names = {"sentiment": self.sentiment.name, "lm": self.lm.name, "chat": self.chat.name}
        for key, name in names.items():
            same = [other for other, n in names.items() if n == name and other != key]
            if same:
                raise ValueError(f"{key}.name and {same[0]}.name are both {name!r}: give each model its own name")
        return self

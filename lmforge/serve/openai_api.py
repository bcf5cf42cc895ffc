"""The OpenAI API as lmforge serves it: request bodies, validated once (pydantic), and the shapes
of responses, stream chunks and errors that the `openai` client and its kin read.

Fields lmforge does not serve (logprobs, tools, echo, suffix, best_of, ...) are refused with a
400 naming the field when they ask for something, and ignored when left at their defaults, as
clients send them. Errors never quote the request: a message names the field and the rule.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 8  # n
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


class OpenAIError(Exception):
    """An error the client sees in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error",
             500: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at their defaults only
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if value is None else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence must hold 1 to {MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name, default in (("logprobs", None), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("logit_bias", None)):
            if getattr(self, name) not in (default, False, {}):
                raise ValueError(f"{name} is not supported by this server")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # the API's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or len(prompts) > MAX_CHOICES:
            raise ValueError(f"give 1 to {MAX_CHOICES} prompts")
        return value

    @model_validator(mode="after")
    def _completion_only(self):
        if self.echo or self.suffix or (self.best_of not in (None, self.n)):
            raise ValueError("echo, suffix and best_of are not supported by this server")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts times n may be at most {MAX_CHOICES}")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported by this server")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is the newer name of the system role; chat templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]


# --- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                        for c in choices], "usage": use}


def chat_completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices], "usage": use}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
                     with_usage: bool) -> dict[str, Any]:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None,
               with_usage: bool) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict[str, Any]:
    """The last chunk before [DONE] when stream_options.include_usage is set: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A pydantic error list as one message and the first offending field, never the input."""
    parts, param = [], None
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        param = param or where or None
        reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {reason}" if where else reason)
    return "; ".join(parts) or "invalid request", param

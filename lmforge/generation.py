"""Talking to a trained causal LM: one completion, or a conversation through its chat template,
streamed token by token as transformers generates them.

    model, tokenizer = load_causal_lm(folder)
    for piece in stream(model, tokenizer, "ROMEO:", Sampling(max_new_tokens=40, seed=1)):
        print(piece, end="", flush=True)
    reply = "".join(stream(model, tokenizer, [{"role": "user", "content": "Hello"}], Sampling()))

A prompt that is a list of messages goes through the tokenizer's chat template; a tokenizer that
has none (a model pretrained here from raw text) gets DEFAULT_CHAT_TEMPLATE, a plain-text layout
("User: ...\nAssistant: ...") that such a model can continue. Sampling follows `generate()`:
temperature 0 is greedy; a seed makes a sampled answer reproducible, no seed samples afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import Any, Iterator, Sequence

# A plain-text layout for models whose tokenizer carries no chat template: each turn on its own
# line as "System:", "User:" or "Assistant:", and the reply cued by a last "Assistant:".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant")

Messages = Sequence[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 50
    seed: int | None = None  # None: a fresh sample every time

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 100_000:
            raise ValueError(f"max_new_tokens must be between 1 and 100,000, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature must be between 0 and 10, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, got {self.top_k}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def load_causal_lm(folder: Path | str, device: str = "auto"):
    """(model in eval mode on the device, tokenizer) from a transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if place == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(place).eval()
    return model, tokenizer


def prompt_ids(tokenizer, prompt: str | Messages):
    """The input ids of a text prompt, or of a conversation rendered by the chat template (the
    default one where the tokenizer has none), cued for the assistant's reply."""
    if isinstance(prompt, str):
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    for message in prompt:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"a message needs a role ({', '.join(ROLES)}) and a text content, got {message!r:.80}")
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                         chat_template=template)
    # the template writes any special tokens itself (a BOS where the model wants one)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def stream(model, tokenizer, prompt: str | Messages, sampling: Sampling) -> Iterator[str]:
    """The reply's text piece by piece as it is generated (the prompt not repeated). Generation
    runs in a thread; the pieces come from transformers' TextIteratorStreamer."""
    import torch
    from transformers import TextIteratorStreamer

    ids = prompt_ids(tokenizer, prompt).to(model.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        ids = ids[:, -max(1, limit - sampling.max_new_tokens):]  # keep the latest turns within the context
    if sampling.seed is None:
        torch.seed()
    else:
        torch.manual_seed(sampling.seed)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                  pad_token_id=pad, streamer=streamer, **sampling.generate_kwargs())
    worker = Thread(target=_generate, args=(model, kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()


def _generate(model, kwargs: dict[str, Any]) -> None:
    import torch

    with torch.inference_mode():
        model.generate(**kwargs)

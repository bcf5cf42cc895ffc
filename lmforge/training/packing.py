"""Conversations as chat fine-tuning reads them: rendered by the model's chat template, loss on the
assistant's tokens only, packed several to a row without one seeing another.

    example = encode_conversation(tokenizer, messages, max_length=512)   # ids and their targets
    rows = pack([example, ...], row_length=512)                           # first fit, in order
    batch = collate(rows)   # input_ids, targets, position_ids, attention_mask (4D, boolean)
    loss = token_loss(model(**batch.model_inputs()).logits, batch.targets)

Targets are aligned with the positions that predict them (targets[t] is the token at t + 1 when
that token is the assistant's, else IGNORE), so a packed row never asks the last token of one
conversation to predict the first of the next. Packing without cross-contamination takes two
things, both here: position ids restart at 0 for each conversation, and the attention mask is
causal within each conversation and closed between them (block diagonal). Restarted positions
alone are not enough with SDPA: the tokens would still attend across the boundary
(tests/test_packing.py shows both).

A conversation's assistant tokens are found by rendering it turn by turn: the tokens an
assistant turn adds after the prompt that cues it (add_generation_prompt) are the reply. That
holds for templates that render a conversation's prefix as a prefix of the whole, as ChatML and
lmforge.generation.DEFAULT_CHAT_TEMPLATE do; a template that does not is refused, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

IGNORE = -100  # cross_entropy's ignore_index: no loss at this position


class TemplateError(ValueError):
    """The chat template does not render a conversation's turns as prefixes of the whole."""


@dataclass(frozen=True)
class Example:
    """One conversation: its token ids and, per position, the token it must predict (or IGNORE)."""

    ids: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def _render(tokenizer, messages: Sequence[dict[str, str]], template: str | None, cue: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=cue,
                                         chat_template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages: Sequence[dict[str, str]], max_length: int,
                        template: str | None = None) -> Example:
    """The conversation's ids and targets, cut to max_length tokens. `template`: a chat template
    for a tokenizer that has none (lmforge.generation.DEFAULT_CHAT_TEMPLATE)."""
    ids: list[int] = []
    learn: list[bool] = []  # whether each token is the assistant's
    for turn in range(len(messages)):
        message = messages[turn]
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:turn], template, cue=True)
            whole = _render(tokenizer, messages[: turn + 1], template, cue=False)
            _extend(ids, learn, prompt, False)
            _extend(ids, learn, whole, True)
        else:
            _extend(ids, learn, _render(tokenizer, messages[: turn + 1], template, cue=False), False)
        if len(ids) > max_length:  # the later turns would be cut anyway: rendering them costs quadratic time
            break
    ids, learn = ids[:max_length], learn[:max_length]
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets)


def _extend(ids: list[int], learn: list[bool], rendered: list[int], assistant: bool) -> None:
    """Append what `rendered` (the conversation so far) adds to `ids`; it must start with `ids`."""
    if rendered[: len(ids)] != ids:
        raise TemplateError("the chat template does not render the conversation so far as the start of the whole: "
                            "the assistant's tokens cannot be told apart")
    added = rendered[len(ids):]
    ids.extend(added)
    learn.extend([assistant] * len(added))


def pack(examples: Sequence[Example], row_length: int) -> list[list[Example]]:
    """Examples grouped into rows of at most row_length tokens, first fit in the given order (the
    order is the sampler's: packing keeps it deterministic). An example longer than a row is
    refused: cut it first (encode_conversation's max_length)."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for example in examples:
        if len(example) > row_length:
            raise ValueError(f"an example of {len(example)} tokens does not fit a row of {row_length}")
        for i, room in enumerate(free):
            if len(example) <= room:
                rows[i].append(example)
                free[i] -= len(example)
                break
        else:
            rows.append([example])
            free.append(row_length - len(example))
    return rows


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (rows, length)
    targets: torch.Tensor  # (rows, length), IGNORE where nothing is learned (padding too)
    position_ids: torch.Tensor  # restart at 0 for every conversation
    attention_mask: torch.Tensor  # (rows, 1, length, length) bool: causal within a conversation only

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}


def collate(rows: Sequence[Sequence[Example]], pad_id: int = 0, length: int | None = None) -> PackedBatch:
    """Rows of examples as one batch, padded to the longest row (or `length`)."""
    width = length or max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding, attends to nothing else
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example)
            ids[r, start:end] = torch.tensor(example.ids)
            targets[r, start:end] = torch.tensor(example.targets)
            positions[r, start:end] = torch.arange(len(example))
            segments[r, start:end] = s
            start = end
    return PackedBatch(ids, targets, positions, block_causal_mask(segments))


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(rows, 1, n, n) bool: position i attends to j <= i of its own conversation. A padding
    position attends to itself alone (a row of nothing would give NaN attention)."""
    n = segments.shape[1]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=segments.device))
    same = segments[:, :, None] == segments[:, None, :]
    mask = causal & same & (segments[:, :, None] >= 0)
    mask |= torch.eye(n, dtype=torch.bool, device=segments.device)
    return mask[:, None]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions that have a target (the assistant's tokens)."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

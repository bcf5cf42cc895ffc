"""Conversations for chat fine-tuning: read, validated with pandera, malformed ones quarantined.

    result = clean_conversations(raw_dir, layout="messages", max_chars=8000)
    result.kept        # id, text (the messages as JSON: [{"role", "content"}, ...]), turns, chars
    result.quarantine  # id, raw (what was read, cut to 2,000 chars), reason
    result.report      # rows_in = rows_kept + rows_quarantined, and the count of each reason

Layouts:
- `messages`: JSONL files (*.jsonl), one conversation a line: {"messages": [{"role": "user",
  "content": "..."}, {"role": "assistant", "content": "..."}, ...]} (roles: system, user,
  assistant), an optional "id";
- `chitchat`: the chitchat-dataset package's dataset.json: {conversation id: {"messages":
  [[{"text", "sender", ...}, ...], ...]}}, each inner list one speaker's turn. The speaker who
  opens is the user, the other the assistant; a turn's messages are joined by line breaks.

A conversation is kept when every role is known, no content is empty, it has an assistant turn,
and its contents add up to at most max_chars characters. A line that is not UTF-8 or not JSON, or
holds no messages list, is quarantined with that reason, and so is a repeat of a kept conversation
(naming the first); nothing read is dropped unaccounted. The kept conversations' `text` is their
messages as JSON, so they split as any table of texts does (splitting.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pandera.pandas as pa

from lmforge.data.cleaning import split_failures
from lmforge.errors import UserError

ROLES = ("system", "user", "assistant")
RAW_SHOWN = 2_000  # characters of a quarantined record kept beside its reason


class ConversationError(UserError, ValueError):
    """The raw folder holds nothing this layout reads."""


@dataclass
class CleanConversations:
    kept: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict


# --- reading ------------------------------------------------------------------------------------


def read_messages_layout(raw_dir: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(id, messages or the raw text, the reason it cannot be read or None) per line of the JSONL files."""
    files = sorted(Path(raw_dir).glob("*.jsonl"))
    if not files:
        raise ConversationError(f"{raw_dir} holds no *.jsonl file of conversations")
    for path in files:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                where = f"{path.name}:{number}"
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield where, raw.decode("latin-1"), "not UTF-8"
                    continue
                try:
                    record = json.loads(text)
                except ValueError:
                    yield where, text, "not JSON"
                    continue
                messages = record.get("messages") if isinstance(record, dict) else None
                if not isinstance(messages, list):
                    yield where, text, "no `messages` list"
                    continue
                yield str(record.get("id") or where), messages, None


def read_chitchat_layout(raw_dir: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(id, messages, None) per conversation of chitchat-dataset's dataset.json: alternate speakers'
    turns as user and assistant."""
    files = sorted(Path(raw_dir).rglob("dataset.json"))
    if not files:
        raise ConversationError(f"{raw_dir} holds no dataset.json of the chitchat layout")
    for path in files:
        for conversation_id, record in json.loads(path.read_text(encoding="utf-8")).items():
            turns = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(turns, list):
                yield str(conversation_id), json.dumps(record)[:RAW_SHOWN], "no `messages` list"
                continue
            yield str(conversation_id), chitchat_messages(turns), None


def chitchat_messages(turns: list) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(turns):
        texts = [m.get("text", "") for m in turn if isinstance(m, dict)] if isinstance(turn, list) else []
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": "\n".join(t.strip() for t in texts)})
    return messages


READERS = {"messages": read_messages_layout, "chitchat": read_chitchat_layout}


# --- validating ---------------------------------------------------------------------------------


def _roles_known(messages: Any) -> bool:
    return all(isinstance(m, dict) and m.get("role") in ROLES for m in messages)


def _contents_present(messages: Any) -> bool:
    return all(isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"].strip() for m in messages)


def _has_assistant(messages: Any) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def conversation_schema(max_chars: int) -> pa.DataFrameSchema:
    """One check per way a conversation can be malformed; pandera names each failure by its check."""
    element = dict(element_wise=True)
    return pa.DataFrameSchema({
        "id": pa.Column(str, unique=True),
        "messages": pa.Column(object, checks=[
            pa.Check(_roles_known, name=f"every role one of {', '.join(ROLES)}", **element),
            pa.Check(_contents_present, name="no empty content", **element),
            pa.Check(_has_assistant, name="an assistant turn", **element),
        ]),
        "chars": pa.Column(int, checks=pa.Check(lambda n: n <= max_chars, name=f"at most {max_chars} chars", **element)),
    })


def _chars(messages: Any) -> int:
    return sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))


def clean_conversations(raw_dir: Path, layout: str, max_chars: int) -> CleanConversations:
    """Read the raw folder in `layout`, keep the well-formed conversations, quarantine the rest."""
    if layout not in READERS:
        raise ConversationError(f"unknown conversation layout {layout!r}: use one of {', '.join(READERS)}")
    rows, unreadable = [], []
    for conversation_id, messages, reason in READERS[layout](Path(raw_dir)):
        if reason is None:
            rows.append({"id": conversation_id, "messages": messages, "chars": _chars(messages)})
        else:
            unreadable.append({"id": conversation_id, "raw": str(messages)[:RAW_SHOWN], "reason": reason})
    frame = pd.DataFrame(rows, columns=["id", "messages", "chars"]).astype({"chars": int})
    kept, reasons = split_failures(frame, conversation_schema(max_chars), name_columns=False)
    failed = [{"id": frame.at[i, "id"], "raw": json.dumps(frame.at[i, "messages"], ensure_ascii=False)[:RAW_SHOWN],
               "reason": reasons[i]} for i in reasons.index]
    quarantine = pd.DataFrame(unreadable + failed, columns=["id", "raw", "reason"])
    kept = pd.DataFrame({"id": kept["id"], "text": [json.dumps(m, ensure_ascii=False) for m in kept["messages"]],
                         "turns": [len(m) for m in kept["messages"]], "chars": kept["chars"]}).reset_index(drop=True)
    kept, repeats = _drop_repeats(kept)
    quarantine = pd.concat([quarantine, repeats], ignore_index=True)
    rows_in = len(rows) + len(unreadable)
    if rows_in != len(kept) + len(quarantine):
        raise AssertionError(f"conversation accounting broke: {rows_in} in, {len(kept)} kept, {len(quarantine)} quarantined")
    report = {"rows_in": rows_in, "rows_kept": len(kept), "rows_quarantined": len(quarantine),
              "quarantine_by_reason": quarantine["reason"].value_counts().to_dict(),
              "turns_kept": int(kept["turns"].sum()), "chars_kept": int(kept["chars"].sum())}
    return CleanConversations(kept, quarantine, report)


def _drop_repeats(kept: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first of each identical conversation kept; the repeats as quarantine records naming it."""
    first = kept.groupby("text", sort=False)["id"].transform("first")
    repeat = first != kept["id"]
    records = pd.DataFrame({"id": kept.loc[repeat, "id"], "raw": kept.loc[repeat, "text"].str.slice(0, RAW_SHOWN),
                            "reason": "repeats conversation " + first[repeat]})
    return kept[~repeat].reset_index(drop=True), records

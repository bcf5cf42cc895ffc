"""Chat data: conversations read in two layouts, validated with pandera, the malformed ones
quarantined with their reason, and the counts reconciled."""

from __future__ import annotations

import json

import pytest

from lmforge.data.conversations import ConversationError, chitchat_messages, clean_conversations


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_malformed_conversations_go_to_the_quarantine_with_their_reason(tmp_path):
    good = [turn("system", "Be kind."), turn("user", "Hello"), turn("assistant", "Hi! How can I help?")]
    records = [
        {"id": "good", "messages": good},
        {"id": "no-reply", "messages": [turn("user", "Anyone there?")]},
        {"id": "odd-role", "messages": [turn("user", "Hi"), turn("narrator", "Meanwhile..."), turn("assistant", "Hello")]},
        {"id": "blank", "messages": [turn("user", "Hi"), turn("assistant", "   ")]},
        {"id": "long", "messages": [turn("user", "x" * 90), turn("assistant", "y" * 20)]},
        {"id": "twice", "messages": good},
        {"id": "twice", "messages": good},
        {"id": "no-list", "messages": "Hello"},
    ]
    lines = [json.dumps(r).encode() for r in records]
    lines.insert(3, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')  # latin-1, not UTF-8
    lines.insert(5, b"{not json")
    (tmp_path / "chats.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")

    result = clean_conversations(tmp_path, layout="messages", max_chars=100)
    report = result.report
    assert report["rows_in"] == 10 == report["rows_kept"] + report["rows_quarantined"]
    assert result.kept["id"].tolist() == ["good"]
    assert (result.quarantine["id"] == "twice").sum() == 2  # an id given twice: both copies held back
    reasons = dict(zip(result.quarantine["id"], result.quarantine["reason"]))
    assert reasons["no-reply"] == "an assistant turn"
    assert reasons["odd-role"] == "every role one of system, user, assistant"
    assert reasons["blank"] == "no empty content"
    assert reasons["long"] == "at most 100 chars"
    assert reasons["chats.jsonl:4"] == "not UTF-8" and reasons["chats.jsonl:6"] == "not JSON"
    assert reasons["chats.jsonl:10"] == "no `messages` list"  # the record whose messages is no list


def test_good_conversations_are_kept_as_json_messages(tmp_path):
    chats = [{"messages": [turn("user", f"Question {i}?"), turn("assistant", f"Answer {i}.")]} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    result = clean_conversations(tmp_path, layout="messages", max_chars=1000)
    assert result.report["rows_kept"] == 3 and result.report["rows_quarantined"] == 0
    assert json.loads(result.kept["text"][2]) == chats[2]["messages"]
    assert result.kept["turns"].tolist() == [2, 2, 2] and result.kept["id"].tolist() == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]


def test_a_repeated_conversation_is_quarantined_naming_the_first(tmp_path):
    chat = {"messages": [turn("user", "Hi"), turn("assistant", "Hello")]}
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({**chat, "id": i}) for i in ("one", "two")) + "\n")
    result = clean_conversations(tmp_path, layout="messages", max_chars=100)
    assert result.kept["id"].tolist() == ["one"]
    assert result.quarantine[["id", "reason"]].values.tolist() == [["two", "repeats conversation one"]]


def test_the_chitchat_layout_alternates_its_speakers_as_user_and_assistant(tmp_path):
    """The chitchat-dataset package's layout: per conversation, turns of one speaker's messages."""
    speaker_a, speaker_b = "720840be", "549cc1d1"
    dataset = {
        "c1": {"messages": [[{"text": "Hello", "sender": speaker_a}, {"text": "How are you?", "sender": speaker_a}],
                            [{"text": "im doing good", "sender": speaker_b}],
                            [{"text": "Glad to hear", "sender": speaker_a}]],
               "start": "2018-05-02T19:38:15Z"},
        "c2": {"messages": [[{"text": "hi", "sender": speaker_a}]]},  # nobody answered
    }
    folder = tmp_path / "chitchat_dataset"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps(dataset))
    result = clean_conversations(tmp_path, layout="chitchat", max_chars=1000)
    assert result.report["rows_in"] == 2 and result.report["rows_kept"] == 1
    assert json.loads(result.kept["text"][0]) == [turn("user", "Hello\nHow are you?"), turn("assistant", "im doing good"),
                                                      turn("user", "Glad to hear")]
    assert result.quarantine["reason"].tolist() == ["an assistant turn"]
    assert chitchat_messages([]) == []


def test_a_folder_without_conversations_is_a_clear_error(tmp_path):
    with pytest.raises(ConversationError, match="no \\*.jsonl file"):
        clean_conversations(tmp_path, layout="messages", max_chars=10)
    with pytest.raises(ConversationError, match="unknown conversation layout 'csv'"):
        clean_conversations(tmp_path, layout="csv", max_chars=10)


@pytest.mark.slow
def test_conversations_flow_through_ingest_clean_and_split_in_dvc(dvc_repo, sources, tmp_path):
    import pandas as pd

    from tests.conftest import run, sha256, write_params

    chats = tmp_path / "chats.jsonl"
    good = [{"messages": [turn("user", f"What is {i} + {i}?"), turn("assistant", f"It is {2 * i}.")]} for i in range(30)]
    bad = [{"messages": [turn("user", "Hello?")]}, {"messages": [turn("robot", "beep"), turn("assistant", "hi")]}]
    chats.write_text("\n".join(json.dumps(c) for c in good + bad) + "\n{broken\n")
    write_params(dvc_repo, sources, datasets=["corpus", "task", "chat"],
                 **{"sources.chat": {"uri": str(chats), "sha256": sha256(chats)}, "clean.chat.layout": "messages"})
    run(["dvc", "repro", "split@chat"], dvc_repo)
    report = json.loads((dvc_repo / "reports/clean/chat.json").read_text())
    assert (report["rows_in"], report["rows_kept"], report["rows_quarantined"]) == (33, 30, 3)
    quarantine = pd.read_parquet(dvc_repo / "data/clean/chat/quarantine")
    assert sorted(quarantine["reason"]) == ["an assistant turn", "every role one of system, user, assistant", "not JSON"]
    splits = {s: pd.read_parquet(dvc_repo / f"data/split/chat/{s}.parquet") for s in ("train", "val", "test")}
    assert [len(f) for f in splits.values()] == [24, 3, 3]
    assert json.loads(splits["val"]["text"][0])[1]["role"] == "assistant"

"""`lmforge generate` and `lmforge chat`: a tiny real Llama, from a folder and from the registry."""

from __future__ import annotations

import io
import os
import subprocess


from tests.conftest import BIN
from tests.test_register import make_project, register, store  # noqa: F401 (store: the module's MLflow store)
from tests.tiny_models import lm_folder


def talk(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    from tasks import cli

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_a_continuation_that_a_seed_reproduces(capsys):
    folder = str(lm_folder())
    flags = ["--max-new-tokens", "12", "--temperature", "1.5"]
    first = talk(["generate", folder, "ROMEO:", *flags, "--seed", "3"], capsys)
    again = talk(["generate", folder, "ROMEO:", *flags, "--seed", "3"], capsys)
    assert first[0] == 0 and first[1] == again[1] and first[1].strip()
    unseeded = {talk(["generate", folder, "ROMEO:", *flags], capsys)[1] for _ in range(3)}
    assert len(unseeded) > 1  # no seed: a fresh sample each time
    greedy = talk(["generate", folder, "ROMEO:", "--temperature", "0", "--max-new-tokens", "6"], capsys)
    assert greedy[1] == talk(["generate", folder, "ROMEO:", "--temperature", "0", "--max-new-tokens", "6"], capsys)[1]


def test_bad_sampling_flags_and_models_are_clear_errors(capsys, tmp_path):
    code, _, err = talk(["generate", str(lm_folder()), "x", "--top-p", "0"], capsys)
    assert code == 2 and "top_p must be in (0, 1]" in err
    code, _, err = talk(["generate", str(tmp_path), "x"], capsys)
    assert code == 2 and "neither a registry URI" in err


def test_chat_keeps_the_conversation_over_stdin(capsys, monkeypatch):
    """Two user turns, a reset, a third, then end of input: a reply to each, and the second turn's
    prompt holds the first exchange (the template renders the whole history)."""
    from lmforge import generation

    seen: list[list[dict]] = []
    real = generation.prompt_ids
    monkeypatch.setattr(generation, "prompt_ids", lambda tok, prompt: (seen.append(list(prompt)), real(tok, prompt))[1])
    code, out, err = talk(["chat", str(lm_folder()), "--max-new-tokens", "5", "--seed", "1", "--system", "Be brief."],
                          capsys, stdin="hello there\nand again\n/reset\nfresh start\n", monkeypatch=monkeypatch)
    assert code == 0 and out.count("model> ") == 3
    assert [m["role"] for m in seen[0]] == ["system", "user"]
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "hello there" and seen[1][3]["content"] == "and again"
    assert [m["content"] for m in seen[2]] == ["Be brief.", "fresh start"]  # /reset kept only the system message
    assert "/reset starts over" in err


def test_the_console_command_chats_with_the_registered_model(store, tmp_path, monkeypatch):  # noqa: F811
    """The installed `lmforge` command, on the registry's challenger, over a real stdin pipe."""
    root = make_project(tmp_path / "proj", "talk")
    register(root, monkeypatch, "lm")
    done = subprocess.run([str(BIN / "lmforge"), "chat", "models:/talk-lm@challenger", "--max-new-tokens", "4",
                           "--temperature", "0"], cwd=root, input="ROMEO, speak\n/exit\n", capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("model> ") == 1
    generated = subprocess.run([str(BIN / "lmforge"), "generate", "models:/talk-lm/1", "ROMEO:", "--seed", "2",
                                "--max-new-tokens", "4"], cwd=root, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
    missing = subprocess.run([str(BIN / "lmforge"), "generate", "models:/talk-lm@nobody", "x"], cwd=root,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert missing.returncode == 2 and "error:" in missing.stderr and "Traceback" not in missing.stderr


def test_the_chat_champion_answers_lmforge_chat_and_generate(store, tmp_path, monkeypatch):  # noqa: F811
    """The sft stage's model as the registry files it: registered, promoted past its base model,
    then talked to by alias with the installed `lmforge` command."""
    root = make_project(tmp_path / "proj", "talkchat")
    register(root, monkeypatch, "chat")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    promoted = subprocess.run([str(BIN / "lmforge"), "promote", "talkchat-chat"], cwd=root, capture_output=True,
                              text=True, timeout=300, env=env)
    assert promoted.returncode == 0 and "champion" in promoted.stdout + promoted.stderr, promoted.stderr[-2000:]
    chatted = subprocess.run([str(BIN / "lmforge"), "chat", "models:/talkchat-chat@champion", "--max-new-tokens", "4",
                              "--temperature", "0"], cwd=root, input="hi 3\nand again\n/exit\n", capture_output=True,
                             text=True, timeout=300, env=env)
    assert chatted.returncode == 0, chatted.stderr[-2000:]
    assert chatted.stdout.count("model> ") == 2
    generated = subprocess.run([str(BIN / "lmforge"), "generate", "models:/talkchat-chat@champion", "hi 3", "--chat",
                                "--seed", "1",
                                "--max-new-tokens", "4"], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]

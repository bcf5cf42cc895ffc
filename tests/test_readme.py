"""The README's quick start, run as a new user would: a clone, then `make run` on the default.

`make test` is not run again from here (it is what runs this test); its line is checked only.
The clone borrows this checkout's .venv (make's -o flag keeps the install step from running), so
the test measures the pipeline, not pip.
"""

import json
import os
import re
import subprocess

import pytest

from tests.conftest import ROOT, run


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash)?\n(.*?)```", readme, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands():
    assert quick_start_commands() == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci/run").read_text()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_make_run_from_a_clone_builds_registers_and_summarises(tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "--quiet", str(ROOT), str(clone)], tmp_path)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    assert quick_start_commands()[0] == "make run"
    # Every core, as a user's run has them: the suite's one-thread switch (conftest) is for its tiny
    # in-process steps, and on 2 cores it made this run about 6 minutes longer.
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run(["make", "-o", ".venv/.installed", "run"], cwd=clone, env=env, capture_output=True,
                            text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    for stage in ("ingest@corpus", "clean@task", "tokenize", "pretrain", "evaluate", "tune", "finetune", "sft",
                  "register"):
        assert f"[{stage}] done in" in log, f"no time printed for {stage}"
    bench = json.loads((clone / "reports/evaluate/benchmarks.json").read_text())
    assert {"hellaswag", "arc_easy", "piqa"} <= set(bench["tasks"]) and bench["tasks"]["hellaswag"]["examples"] > 0
    chat = json.loads((clone / "reports/sft/metrics.json").read_text())
    assert chat["test"]["loss"] < chat["base"]["test"]["loss"]  # the chat model learned the held-out replies
    forgetting = json.loads((clone / "reports/sft/benchmarks.json").read_text())["tasks"]
    assert {"hellaswag", "arc_easy", "piqa"} <= set(forgetting) and "change_points" in forgetting["piqa"]
    served_chat_answers(clone)
    summary = (clone / "reports/summary.md").read_text()
    assert "## Registry" in summary and "@champion = v1" in summary
    assert "_has not run yet._" not in summary


def served_chat_answers(clone) -> None:
    """After `make run`, `lmforge serve` serves the registered chat champion over the OpenAI API."""
    from tests.test_openai_serving import Server

    server = Server("models:/lmforge-chat@champion", cwd=clone)
    try:
        reply = server.client().chat.completions.create(model=None, messages=[{"role": "user", "content": "Hi!"}],
                                                        max_tokens=8, temperature=0)
        assert reply.model == "lmforge-chat/1" and reply.choices[0].message.content is not None
    finally:
        server.stop()


def test_the_guides_link_only_to_files_a_clone_has():
    """README.md and docs/*.md: every relative link resolves inside the repository, nothing points
    outside it (a clone has no ../shared), and the README stays a guide, not a benchmark log."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            resolved = (page.parent / path).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
        assert "../shared" not in text and "BENCHMARKS.md" not in text, page
    assert not broken, broken
    assert len((ROOT / "README.md").read_bytes()) < 15_000

"""Shared test setup: offline switches, one torch thread, and a real DVC project in a temp dir."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "OMP_NUM_THREADS": "1",  # a busy second core makes 2-thread tiny steps 10-20x slower
    "TOKENIZERS_PARALLELISM": "false",
}
# Temp repos commit (dvc exp save does too): give git an identity on machines without one.
for _who in ("AUTHOR", "COMMITTER"):
    OFFLINE.setdefault(f"GIT_{_who}_NAME", os.environ.get(f"GIT_{_who}_NAME", "lmforge tests"))
    OFFLINE.setdefault(f"GIT_{_who}_EMAIL", os.environ.get(f"GIT_{_who}_EMAIL", "tests@lmforge.invalid"))
os.environ.update(OFFLINE)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return path


def play(title: str, lines: int = 60) -> str:
    """A small but real-looking play: speakers and verse, distinct per title."""
    speakers = ["HAMLET", "HORATIO", "OPHELIA", "POLONIUS"]
    body = [f"{title.upper()}\n\nby a Test Author\n"]
    for i in range(lines):
        body.append(f"{speakers[i % 4]}.\nLine {i} of {title}: the quality of mercy is not strained, good {title.lower()}.\n")
    return "\n".join(body)


def reviews_csv(n_per_label: int = 60) -> str:
    good = ["wonderful", "brilliant", "moving", "superb", "delightful"]
    bad = ["awful", "boring", "dreadful", "tedious", "terrible"]
    rows = ["text,label,source"]
    for i in range(n_per_label):
        rows.append(f'"A {good[i % 5]} film, number {i}, truly {good[(i + 2) % 5]}.<br /><br />Loved it.",1,imdb')
        rows.append(f'"An {bad[i % 5]} film, number {i}, utterly {bad[(i + 3) % 5]}. Hated it.",0,imdb')
    return "\n".join(rows) + "\n"


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """Small real source files: a tar.gz of plays, a reviews CSV and conversations in JSONL."""
    src = tmp_path / "sources"
    src.mkdir()
    plays = {f"pkg/texts/{t.lower()}_gut.txt": play(t).encode() for t in
             ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa"]}
    plays["pkg/README"] = b"not a play"
    tar = make_tar(src / "plays.tar.gz", plays)
    csv = src / "reviews.csv"
    csv.write_text(reviews_csv())
    chats = src / "chats.jsonl"
    chats.write_text(chats_jsonl())
    return {"corpus": tar, "task": csv, "chat": chats}


def chats_jsonl(n: int = 40) -> str:
    """n short two-turn conversations in the messages layout, one JSON record a line."""
    import json

    def talk(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]

    return "".join(json.dumps({"messages": talk(i)}) + "\n" for i in range(n))


def write_params(repo: Path, sources: dict[str, Path], **overrides) -> None:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sources"] = {
        "corpus": {"uri": f"file:{sources['corpus']}#pkg/texts/*_gut.txt", "sha256": sha256(sources["corpus"])},
        "task": {"uri": str(sources["task"]), "sha256": sha256(sources["task"])},
        "chat": {"uri": str(sources["chat"]), "sha256": sha256(sources["chat"])},
    }
    params["clean"]["chat"]["layout"] = "messages"
    params["clean"]["corpus"]["min_chars"] = 100
    params["split"]["task"]["max_rows"] = None
    params["tokenize"]["vocab_size"] = 300
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def dvc_repo(tmp_path: Path, sources) -> Path:
    """A real git + DVC project holding this checkout's code, dvc.yaml and small sources."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for folder in ("lmforge", "tasks"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo, sources)
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    return repo

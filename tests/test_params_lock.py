"""Edits of params.yaml at once (tasks/params.py): real processes apply their overlays together,
and each change survives, because the read, merge and write of one edit wait for the other's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 25

# Each worker owns one key and sets it to base + 1, base + 2, ... one overlay per round. Only it
# changes that key, so before each round the key must still hold the value its last round wrote:
# another writer's read-merge-write around it would have put the older value back.
WORKER = r"""
import sys, time
from pathlib import Path
import yaml
from tasks.params import apply_overlay

params, key, base, rounds, scratch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
*parents, leaf = key.split(".")

def overlay(value):
    tree = {leaf: value}
    for parent in reversed(parents):
        tree = {parent: tree}
    return tree

def current():
    node = yaml.safe_load(params.read_text())
    for part in key.split("."):
        node = node[part]
    return node

print("ready", flush=True)
while not (scratch / "go").exists():
    time.sleep(0.001)
for r in range(1, rounds + 1):
    if r > 1 and current() != base + r - 1:
        sys.exit(f"lost: {key} reads {current()} before round {r}; round {r - 1} wrote {base + r - 1}")
    path = scratch / f"{key}-{r}.yaml"
    path.write_text(yaml.safe_dump(overlay(base + r)))
    changes = apply_overlay(params, path)
    assert changes, f"round {r} of {key} changed nothing"
"""

KEYS = {"seed": 1000, "pretrain.max_steps": 400, "workers": 0}


def _value(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_overlays_applied_at_once_by_several_processes_all_survive(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(params), key, str(base), str(ROUNDS), str(tmp_path)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for key, base in KEYS.items()]
    for worker in workers:  # every one imported and waiting, so their rounds overlap
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
    (tmp_path / "go").touch()
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    merged = yaml.safe_load(params.read_text())
    assert {key: _value(merged, key) for key in KEYS} == {key: base + ROUNDS for key, base in KEYS.items()}
    assert "# lmforge parameters" in params.read_text(), "the comments are kept"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "no lock or temp file is left"

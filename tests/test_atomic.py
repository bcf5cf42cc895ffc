"""Atomic outputs (lmforge/atomic.py) under real kills and real readers: a killed writer's copy is
removed by the next writer, a live writer's copy is left alone, and a folder being replaced is
never missing to a reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lmforge.atomic import atomic_dir, replace_dir, write_json

ROOT = Path(__file__).resolve().parents[1]

# A writer in a real process: it fills its temporary copy of the target, says so, and waits for a
# line on stdin (it is killed there, or told to finish).
WRITER = r"""
import sys
from lmforge.atomic import atomic_dir, atomic_path
kind, target = sys.argv[1], sys.argv[2]
with (atomic_dir if kind == "dir" else atomic_path)(target) as out:
    if kind == "dir":
        (out / "data.bin").write_bytes(b"x" * 1_000_000)
    else:
        out.write_bytes(b"x" * 1_000_000)
    print("inside", flush=True)
    sys.stdin.readline()
"""

# A reader in a real process: polls whether the folder is there until told to stop.
READER = r"""
import os, sys
target, stop = sys.argv[1], sys.argv[2]
reads = missing = 0
print("polling", flush=True)
while not os.path.exists(stop):
    reads += 1
    missing += not os.path.isdir(target)
print(reads, missing)
"""


def _writer_inside(kind: str, target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "inside"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_the_copies_of_killed_writers_are_removed_by_the_next_write_of_the_folder(tmp_path):
    target = tmp_path / "out"
    writers = [_writer_inside("dir", target) for _ in range(2)]
    for writer in writers:
        _kill(writer)
    assert len(list(tmp_path.iterdir())) == 2, "each kill leaves its full temporary copy"
    with atomic_dir(target) as out:
        (out / "v").write_text("next")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["v"]


def test_the_copy_of_a_killed_file_writer_is_removed_by_the_next_write_of_the_file(tmp_path):
    target = tmp_path / "report.json"
    _kill(_writer_inside("file", target))
    assert len(list(tmp_path.iterdir())) == 1
    write_json(target, {"ok": True})
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert json.loads(target.read_text()) == {"ok": True}


def test_a_live_writers_copy_is_left_alone_and_it_still_publishes(tmp_path):
    target = tmp_path / "out"
    live = _writer_inside("dir", target)
    with atomic_dir(target) as out:
        (out / "v").write_text("mine")
    assert len(list(tmp_path.iterdir())) == 2, "the live writer's copy is still there"
    live.communicate("go\n", timeout=30)
    assert live.returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["data.bin"], "the last writer's folder is the target"


def test_a_polling_reader_never_sees_the_folder_missing_while_it_is_replaced(tmp_path):
    target, stop = tmp_path / "out", tmp_path / "stop"
    with atomic_dir(target) as out:
        (out / "v").write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), str(stop)], text=True,
                              stdout=subprocess.PIPE)
    assert reader.stdout.readline().strip() == "polling"
    try:
        for i in range(1, 1001):
            new = tmp_path / f".out.new-{i}"
            new.mkdir()
            (new / "v").write_text(str(i))
            replace_dir(new, target)
    finally:
        stop.touch()
    reads, missing = map(int, reader.communicate(timeout=30)[0].split())
    assert reads > 1000, "the reader polled while the folder was replaced"
    assert missing == 0, f"the folder was missing in {missing} of {reads} reads"
    assert (target / "v").read_text() == "1000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stop"], "every old folder was deleted"

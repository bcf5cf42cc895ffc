"""What DVC recorded about the pipeline's files, read from dvc.lock: pipeline code, not library.

    input_hashes(["data/tokens"], root)          {"input.data/tokens": md5}: tags for a training run
    model_lineage(root, ["models/finetuned"])    dvc.* tags: the hashes of what built these outputs
    changed_outputs(root, tags)                  the outputs among those tags whose files no longer match
    trace_inputs(tags) / trace_rebuild(tags)     the DVC parts of `lmforge trace`

Every read of dvc.lock holds DVC's repo lock where there is a DVC project: in a Prefect flow a
sibling stage's `dvc repro` may be rewriting the file.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from tasks import layout

LOCK_FILE = "dvc.lock"
LINEAGE_STATUS = "dvc.lock"  # the tag that says whether (and why not) the hashes are there
DEP_TAG, OUT_TAG = "dvc.dep.", "dvc.out."


@contextmanager
def locked_dvc_repo(root: Path) -> Iterator[Any]:
    """The DVC repo at `root`, held under DVC's repo lock.

    In a Prefect flow a sibling stage's `dvc repro` rewrites dvc.lock in place while it holds
    that lock, so a read without it can meet half a file. This waits for the lock, as
    `dvc --wait-for-lock` does, instead of giving up after DVC's 3 s of retries: a sibling may
    hold it for as long as hashing a large output takes. No deadlock from inside a stage: the
    stage's own `dvc repro` lets go of the lock while the stage's command runs."""
    from dvc.repo import Repo, lock_repo

    with Repo(str(root), _wait_for_lock=True) as repo, lock_repo(repo):
        yield repo


def read_dvc_lock(root: Path) -> str:
    """dvc.lock's text, read under DVC's repo lock where there is one."""
    # No DVC installed (a bare GPU image) or no DVC project: no sibling repro can be writing it.
    if importlib.util.find_spec("dvc") is None or not (root / ".dvc").is_dir():
        return (root / LOCK_FILE).read_text()
    with locked_dvc_repo(root):
        return (root / LOCK_FILE).read_text()


def lock_stages(root: Path) -> dict[str, Any]:
    """The `stages` mapping of dvc.lock. Raises FileNotFoundError or yaml.YAMLError."""
    return (yaml.safe_load(read_dvc_lock(root)) or {}).get("stages") or {}


def input_hashes(paths: list[str], root: Path | str | None = None) -> dict[str, str]:
    """{"input.<path>": md5} for each path that some stage of dvc.lock lists as an output: the
    data a run read, as DVC versioned it (empty where there is no dvc.lock yet)."""
    root = layout.repo_root(root)
    if not (root / LOCK_FILE).exists():
        return {}
    try:
        stages = lock_stages(root)
    except yaml.YAMLError as error:
        # A tag is not worth failing a training run over, but a corrupt dvc.lock is worth a word.
        print(f"{LOCK_FILE} does not parse, so this run records no input hashes: {error}", file=sys.stderr)
        return {}
    found: dict[str, str] = {}
    for stage in stages.values():
        for out in stage.get("outs") or []:
            if out.get("path") in paths and out.get("md5"):
                found[f"input.{out['path']}"] = out["md5"]
    return found


def model_lineage(root: Path, outputs: list[str]) -> dict[str, str]:
    """Tags from dvc.lock: the md5 of every dep of the stages that wrote `outputs`, and of those outputs.

    `dvc.dep.<path>` / `dvc.out.<path>` -> md5 and `dvc.stages` -> the stage names; `dvc.lock` says
    "present", or why there is nothing (no lock file, or no stage wrote these outputs yet).
    """
    if not (root / LOCK_FILE).exists():
        return {LINEAGE_STATUS: f"absent: no {LOCK_FILE} (the models were not built by `dvc repro`)"}
    try:
        stages = lock_stages(root)
    except yaml.YAMLError as err:
        return {LINEAGE_STATUS: f"unreadable: {err}"[:500]}
    wanted = {o.rstrip("/") for o in outputs}
    tags: dict[str, str] = {}
    names = []
    for name, stage in stages.items():
        outs = {str(o.get("path", "")).rstrip("/"): o for o in stage.get("outs") or []}
        hit = wanted & set(outs)
        if not hit:
            continue
        names.append(name)
        for dep in stage.get("deps") or []:
            if dep.get("md5"):
                tags[f"{DEP_TAG}{dep['path']}"] = str(dep["md5"])
        for path in hit:
            if outs[path].get("md5"):
                tags[f"{OUT_TAG}{path}"] = str(outs[path]["md5"])
    if not names:
        return {LINEAGE_STATUS: f"present, but no stage in it wrote {', '.join(sorted(wanted))}"}
    return {LINEAGE_STATUS: "present", "dvc.stages": ",".join(sorted(names)), **tags}


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for a file or a folder (a folder's ends in `.dir`), computed by DVC's own
    hashing (dvc-data), so it equals what `dvc repro` wrote into dvc.lock for unchanged files."""
    from dvc.fs import LocalFileSystem
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="lmforge-md5-") as scratch:  # the .dir listing lands here
        _, _, hashed = build(HashFileDB(fs, scratch), str(path), fs, "md5")
    return hashed.hash_info.value


def changed_outputs(root: Path, tags: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(path, md5 in dvc.lock, md5 now) for each `dvc.out.*` path of model_lineage's tags whose
    files differ from what dvc.lock recorded ("missing" when the path is gone). Lineage copied
    from dvc.lock is only true of the files it was computed from: this is the check."""
    changed = []
    for key, recorded in sorted(tags.items()):
        if not key.startswith(OUT_TAG):
            continue
        path = key[len(OUT_TAG):]
        now = dvc_md5(root / path) if (root / path).exists() else "missing"
        if now != recorded:
            changed.append((path, recorded, now))
    return changed


def trace_inputs(tags: Mapping[str, str]) -> list[str]:
    """The `lmforge trace` lines of a version's DVC hashes."""
    lines = [f"data and inputs ({LOCK_FILE} md5):", f"  {LINEAGE_STATUS}: {tags.get(LINEAGE_STATUS, 'not recorded')}"]
    for key in sorted(k for k in tags if k.startswith((DEP_TAG, OUT_TAG))):
        lines.append(f"  {key[len('dvc.'):]}: {tags[key]}")
    return lines


def trace_rebuild(tags: Mapping[str, str]) -> list[str]:
    """The `lmforge trace` lines that say how to rebuild a version: its commit, then `dvc repro register`."""
    commit, dirty = tags.get("git_commit", "unknown"), tags.get("git_dirty", "unknown")
    stages = [s for s in tags.get("lmforge.rebuild_stages", "").split(",") if s]
    if commit in ("unknown", "uncommitted"):
        return ["rebuild:", "  (no git commit recorded: this version cannot be rebuilt from git)"]
    rebuilt = f" rebuilds {', '.join(stages)} and any upstream stage that is missing or stale" if stages else ""
    lines = ["rebuild:",
             f"  git checkout {commit}",
             "  dvc pull            # only where a DVC remote holds the cached data and models",
             f"  dvc repro register  #{rebuilt or ' reruns every stage whose inputs differ'}",
             f"  # or in one line: git checkout {commit} && dvc repro register"]
    if dirty == "true":
        lines.append("  # warning: registered from a dirty tree; the commit alone may not reproduce it")
    fingerprint = tags.get("lmforge.fingerprint")
    if fingerprint:
        lines.append(f"  # a bit-identical rebuild carries fingerprint {fingerprint} (tag lmforge.fingerprint)")
    return lines

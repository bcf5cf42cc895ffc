"""What every bench record says about where it was measured: the commit and the package versions.

Imported by the bench scripts, which run as `python bench/NAME.py` (this folder is on sys.path).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(given: str | None = None) -> str:
    """The tree's commit (-dirty when tracked files differ); on a copy without .git (the lent GPU
    machine's), `given` (a --commit flag), LMFORGE_COMMIT or "unknown"."""
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False)
        if head.returncode == 0:
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LMFORGE_COMMIT") or "unknown"


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Python's version and each package's, from the installed metadata (None: not installed).
    Nothing is imported: a bench must not load what it times in its own process."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out

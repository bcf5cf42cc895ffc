"""The one file hasher: what pins a source, checks a checkpoint, keys a registered version.

    file_digest(path)          sha256 hex digest, read in blocks (never the whole file in memory)
    file_digest(path, "md5")   the md5 MLflow's dataset digests use
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()

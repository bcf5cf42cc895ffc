"""What the data stages (clean, split, tokenize) share: the shard engine and their scratch folders.

Apart from tasks/_common.py so that a training stage, which imports that one, does not depend on
the data engine (tests/test_dvc_deps.py): an edit here must not rerun pretraining.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import layout

if TYPE_CHECKING:  # the whole-file schema: a type here, never a dependency
    from lmforge.config.whole import Params


def data_engine(params: Params):
    """Where the data stages run their shards: params.yaml's `workers` (null: every core) and
    `data_engine` (datatrove's local or Slurm executor)."""
    from lmforge.data.engine import Engine, default_workers

    section = params.data_engine
    return Engine(workers=params.workers or default_workers(), executor=section.executor,
                  slurm=section.slurm.model_dump(exclude_none=True))


WORK = layout.WORK


def work_dir_for(name: str, section, *inputs: Path) -> Path:
    """The scratch folder of one run of a data stage, keyed by its params, the content of the given
    input files (a manifest or an index) and the library's code, so a rerun after a kill reuses
    the shards it finished, and a changed input or code never reuses stale ones."""
    import lmforge

    key = hashlib.sha256(section.model_dump_json().encode())
    for path in inputs:
        key.update(Path(path).read_bytes() if Path(path).exists() else b"-")
    for source in sorted(Path(inspect.getfile(lmforge)).parent.rglob("*.py")):
        key.update(source.read_bytes())
    return WORK / f"{name}-{key.hexdigest()[:16]}"


def remove_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

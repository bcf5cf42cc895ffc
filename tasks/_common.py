"""What every stage module shares: argument parsing, params loading, and a clean failure."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from lmforge.atomic import write_json
from lmforge.config import ConfigError, Params, load_params


def stage_args(description: str, with_dataset: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if with_dataset:
        parser.add_argument("dataset", help="the dataset name, a key of `datasets` in params.yaml")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    return parser.parse_args()


def params_or_exit(path: str) -> Params:
    try:
        return load_params(path)
    except ConfigError as err:
        fail(str(err))


def data_engine(params: Params):
    """Where the data stages run their shards: params.yaml's `workers` (null: every core) and
    `data_engine` (datatrove's local or Slurm executor)."""
    from lmforge.data.engine import Engine, default_workers

    section = params.data_engine
    return Engine(workers=params.workers or default_workers(), executor=section.executor,
                  slurm=section.slurm.model_dump(exclude_none=True))


WORK = Path("data/.work")


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


def fail(message: str) -> None:
    # Exit code 2 marks a user error (bad config or data): orchestrators must not retry it.
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


TIMINGS = Path("reports/timings")


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Print the stage's wall time and keep it in reports/timings/<stage>.json for the summary.

    That folder is no DVC output on purpose: a timing differs on every run and must not make
    DVC think a stage changed."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    print(f"[{stage}] done in {seconds:.1f}s", file=sys.stderr)
    write_json(TIMINGS / f"{stage}.json", {"stage": stage, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run_main(stage: str, main: Callable[[], object], user_errors: tuple[str, ...] = ()) -> NoReturn:
    """Run a stage's main under `timed` and exit with its code. A ConfigError, or an exception whose
    class name is in `user_errors` (named, so the stage imports its heavy modules only when run),
    is a user error: its message alone on stderr and exit code 2, which orchestrators never retry."""
    try:
        with timed(stage):
            code = main()
    except ConfigError as err:
        fail(str(err))
    except Exception as err:
        if type(err).__name__ not in user_errors:
            raise
        fail(f"{type(err).__name__}: {err}")
    raise SystemExit(code or 0)

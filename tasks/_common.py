"""What every stage module shares: argument parsing, params loading, and a clean failure."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn

from lmforge.atomic import write_json
from lmforge.config import ConfigError, load_params
from lmforge.errors import UserError
from tasks import layout

if TYPE_CHECKING:  # the whole-file schema: a type here, never a dependency
    from lmforge.config.whole import Params


def stage_args(description: str, with_dataset: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if with_dataset:
        parser.add_argument("dataset", help="the dataset name, a key of `datasets` in params.yaml")
    parser.add_argument("--params", default=str(layout.PARAMS), help="the params file (default: %(default)s)")
    return parser.parse_args()


def params_or_exit(path: str) -> Params:
    try:
        return load_params(path)
    except ConfigError as err:
        fail(str(err))


USER_ERROR_EXIT = 2  # a user error (bad config or data): orchestrators must not retry it


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT)


TIMINGS = layout.TIMINGS


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


def run_main(stage: str, main: Callable[[], object]) -> NoReturn:
    """Run a stage's main under `timed` and exit with its code. A UserError (lmforge.errors) is the
    user's to fix: its message alone on stderr and exit code 2, which orchestrators never retry;
    any other exception is a bug and keeps its traceback."""
    try:
        with timed(stage):
            code = main()
    except ConfigError as err:
        fail(str(err))  # the message names the key path already
    except UserError as err:
        fail(f"{type(err).__name__}: {err}")
    raise SystemExit(code or 0)

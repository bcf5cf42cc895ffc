"""What every stage module shares: argument parsing, params loading, and a clean failure."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator

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


def fail(message: str) -> None:
    # Exit code 2 marks a user error (bad config or data): orchestrators must not retry it.
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"[{stage}] done in {time.perf_counter() - start:.1f}s", file=sys.stderr)

"""ingest: fetch a pinned source into data/raw/<dataset>/ with a manifest.json.

The folder persists between runs (dvc.yaml), so when a glob's pin stops matching, the message can
name the first file that changed since the last ingest. A download that broke off exits with
TRANSIENT_EXIT, which the flow retries; a source that is wrong exits with 2, which it does not."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lmforge.atomic import atomic_dir, write_json
from lmforge.data.sources import ByteCap, TransientSourceError, fetch
from lmforge.errors import UserError
from lmforge.redaction import redact
from tasks import layout
from tasks._common import fail, params_or_exit, stage_args, timed

TRANSIENT_EXIT = 1  # anything but USER_ERROR_EXIT: the flow retries the stage


def main() -> None:
    args = stage_args(__doc__, with_dataset=True)
    params = params_or_exit(args.params)
    if args.dataset not in params.sources:
        fail(f"no source named {args.dataset!r} under sources in {args.params}")
    source = params.sources[args.dataset]
    target = layout.RAW / args.dataset
    start = time.perf_counter()
    with timed(f"ingest@{args.dataset}"):
        try:
            with atomic_dir(target) as out:
                cap = ByteCap(source.max_bytes, knob=f"sources.{args.dataset}.max_bytes")
                manifest = fetch(source.uri, source.sha256, out, previous=_previous_manifest(target),
                                 revision=source.revision, cap=cap)
                write_json(out / "manifest.json", manifest)
        except UserError as err:
            fail(str(err))
        except TransientSourceError as err:  # no bug, so no traceback; and worth another try
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(TRANSIENT_EXIT) from None
    seconds = time.perf_counter() - start
    print(f"ingest {args.dataset}: {len(manifest['files'])} files, {manifest['bytes']:,} bytes from {redact(source.uri)} "
          f"({manifest['bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)")


def _previous_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()

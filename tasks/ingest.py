"""ingest: fetch a pinned source into data/raw/<dataset>/ with a manifest.json."""

from __future__ import annotations

from pathlib import Path

from lmforge.atomic import atomic_dir, write_json
from lmforge.sources import SourceError, fetch
from tasks._common import fail, params_or_exit, stage_args, timed


def main() -> None:
    args = stage_args(__doc__, with_dataset=True)
    params = params_or_exit(args.params)
    if args.dataset not in params.sources:
        fail(f"no source named {args.dataset!r} under sources in {args.params}")
    source = params.sources[args.dataset]
    with timed(f"ingest@{args.dataset}"):
        try:
            with atomic_dir(Path("data/raw") / args.dataset) as out:
                manifest = fetch(source.uri, source.sha256, out)
                write_json(out / "manifest.json", manifest)
        except SourceError as err:
            fail(str(err))
    print(f"ingest {args.dataset}: {len(manifest['files'])} files, {manifest['bytes']:,} bytes from {source.uri}")


if __name__ == "__main__":
    main()

"""clean: normalise and validate data/raw/<dataset>/ into data/clean/<dataset>.parquet, with the
rows that fail in data/clean/<dataset>.quarantine.parquet and counts in reports/clean/<dataset>.json."""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.atomic import write_json, write_parquet
from lmforge.cleaning import CleanError, clean_documents, clean_examples
from lmforge.config import CleanDocuments
from tasks._common import fail, params_or_exit, stage_args, timed


def main() -> None:
    args = stage_args(__doc__, with_dataset=True)
    params = params_or_exit(args.params)
    if args.dataset not in params.clean:
        fail(f"no section clean.{args.dataset} in {args.params}")
    section = params.clean[args.dataset]
    raw_dir = Path("data/raw") / args.dataset
    if not raw_dir.is_dir():
        fail(f"{raw_dir} is missing: run the ingest stage first (dvc repro ingest@{args.dataset})")
    with timed(f"clean@{args.dataset}"):
        start = time.perf_counter()
        bytes_in = sum(p.stat().st_size for p in raw_dir.iterdir() if p.name != "manifest.json")
        try:
            if isinstance(section, CleanDocuments):
                result = clean_documents(raw_dir, section)
            else:
                result = clean_examples(raw_dir, section, args.dataset)
        except CleanError as err:
            fail(str(err))
        seconds = time.perf_counter() - start
        write_parquet(Path("data/clean") / f"{args.dataset}.parquet", result.kept)
        write_parquet(Path("data/clean") / f"{args.dataset}.quarantine.parquet", result.quarantine)
        report = {**result.report, "bytes_in": bytes_in, "seconds": round(seconds, 3),
                  "mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 1)}
        write_json(Path("reports/clean") / f"{args.dataset}.json", report)
    r = result.report
    print(f"clean {args.dataset}: {r['rows_in']} rows in = {r['rows_kept']} kept + {r['rows_quarantined']} quarantined")
    for reason, count in r["quarantine_by_reason"].items():
        print(f"  quarantined {count:>6}  {reason[:100]}")


if __name__ == "__main__":
    main()

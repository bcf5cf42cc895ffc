"""split: data/clean/<dataset>.parquet -> data/split/<dataset>/{train,val,test}.parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmforge.atomic import atomic_dir, write_json
from lmforge.splitting import SplitError, split_frame, split_report
from tasks._common import fail, params_or_exit, stage_args, timed


def main() -> None:
    args = stage_args(__doc__, with_dataset=True)
    params = params_or_exit(args.params)
    if args.dataset not in params.split:
        fail(f"no section split.{args.dataset} in {args.params}")
    clean = Path("data/clean") / f"{args.dataset}.parquet"
    if not clean.exists():
        fail(f"{clean} is missing: run the clean stage first (dvc repro clean@{args.dataset})")
    with timed(f"split@{args.dataset}"):
        try:
            splits = split_frame(pd.read_parquet(clean), params.split[args.dataset], params.seed)
        except SplitError as err:
            fail(f"split.{args.dataset}: {err}")
        with atomic_dir(Path("data/split") / args.dataset) as out:
            for name, frame in splits.items():
                frame.to_parquet(out / f"{name}.parquet", index=False)
        report = split_report(splits)
        write_json(Path("reports/split") / f"{args.dataset}.json", report)
    print(f"split {args.dataset}: " + ", ".join(f"{s} {r['rows']} rows" for s, r in report.items()))


if __name__ == "__main__":
    main()

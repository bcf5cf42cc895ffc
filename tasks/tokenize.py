"""tokenize: learn a tokenizer on data/split/corpus/train.parquet, write data/tokens/."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from lmforge.atomic import atomic_dir, write_json
from lmforge.tokenization import SPLITS, write_tokens
from tasks._common import fail, params_or_exit, stage_args, timed


def main() -> None:
    args = stage_args(__doc__)
    params = params_or_exit(args.params).tokenize
    split_dir = Path("data/split/corpus")
    if not split_dir.is_dir():
        fail(f"{split_dir} is missing: run the split stage first (dvc repro split@corpus)")
    texts = {s: pd.read_parquet(split_dir / f"{s}.parquet")["text"].tolist() for s in SPLITS}
    with timed("tokenize"):
        start = time.perf_counter()
        try:
            with atomic_dir("data/tokens") as out:
                meta = write_tokens(texts, out, params.kind, params.vocab_size, params.min_frequency)
        except ValueError as err:
            fail(f"tokenize: {err}")
        seconds = time.perf_counter() - start
    total = sum(s["tokens"] for s in meta["splits"].values())
    report = {"kind": meta["kind"], "vocab_size": meta["vocab_size"], "seconds": round(seconds, 2),
              **{f"{s}_tokens": v["tokens"] for s, v in meta["splits"].items()},
              "bytes_per_token": round(sum(s["bytes"] for s in meta["splits"].values()) / max(total, 1), 3)}
    write_json("reports/tokenize.json", report)
    print(f"tokenize: {meta['kind']} vocab {meta['vocab_size']}, " +
          ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items()))


if __name__ == "__main__":
    main()

"""C2/C3 (docs/performance.md): clean throughput, BPE tokenization throughput, no-op repro.

Run from the project root after `make run` has built data/ (the default sources):
    .venv/bin/python bench/bench_data.py [--record bench/results/<date>-<card>.json]
Prints one JSON line per case. The 2-core machines are noisy: each case reports its best of N.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from lmforge.data.cleaning import clean_documents, clean_examples
from lmforge.config import load_params
from lmforge.data.tokenization import encode_documents, token_dtype, train_tokenizer

REPEATS = 3


def best_of(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json")


def bench_clean(params) -> list[dict]:
    cases = []
    for name, fn in (
        ("corpus", lambda: clean_documents(Path("data/raw/corpus"), params.clean["corpus"])),
        ("task", lambda: clean_examples(Path("data/raw/task"), params.clean["task"], "task")),
    ):
        size = raw_bytes(Path(f"data/raw/{name}"))
        seconds = best_of(fn)
        cases.append({"case": f"C3 clean+validate {name}", "mb": round(size / 1e6, 2), "seconds": round(seconds, 3),
                      "mb_per_s": round(size / 1e6 / seconds, 1), "target_mb_per_s": 20})
    return cases


def bench_bpe(params) -> dict:
    train = pd.read_parquet("data/split/corpus/train")["text"].tolist()
    tokenizer = train_tokenizer(train, "bpe", params.tokenize.vocab_size, params.tokenize.min_frequency)
    dtype = token_dtype(tokenizer.get_vocab_size())
    n_tokens = encode_documents(tokenizer, train, dtype).size
    seconds = best_of(lambda: encode_documents(tokenizer, train, dtype))
    return {"case": "C3 BPE encode corpus train", "tokens": n_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(n_tokens / seconds), "target_tokens_per_s": 1_000_000}


def bench_noop_repro() -> dict:
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "repro"], check=True, capture_output=True)  # make sure all is built
    seconds = best_of(lambda: subprocess.run([dvc, "repro"], check=True, capture_output=True))
    return {"case": "C2 no-op dvc repro", "seconds": round(seconds, 2), "target_s": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", help="also write the results with their context to this JSON file")
    parser.add_argument("--skip-repro", action="store_true", help="skip the no-op dvc repro case")
    args = parser.parse_args()
    params = load_params()
    cases = bench_clean(params) + [bench_bpe(params)]
    if not args.skip_repro:
        cases.append(bench_noop_repro())
    for case in cases:
        print(json.dumps(case))
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
        record = {"command": " ".join(sys.argv), "commit": commit, "dirty": dirty,
                  "card": f"CPU {platform.processor() or platform.machine()}, 2 cores (developer machine)",
                  "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "cases": cases}
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Which data engine runs the clean stage: Hugging Face `datasets` or datatrove (docs/data.md).

Both run the same work on the same jsonl.gz shards: read each document, clean it with lmforge's
own rules (`clean_document_batch`: decode, normalise, pandera checks), write the kept rows to
parquet. Each case runs in a fresh process; the table gives wall time, MB/s of text and the peak
RSS of the largest process (the engine's workers included).

    .venv/bin/python bench/engine_compare.py --corpus '/tmp/corpus-256/*.jsonl.gz' --workers 1,2 \
        --record bench/results/<date>-cpu-engine-compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASE = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from lmforge.config.clean import CleanDocuments
params = CleanDocuments(min_chars=50, strip_boilerplate=False)
engine, workers, glob, out = {engine!r}, {workers}, {glob!r}, Path({out!r})
start = time.perf_counter()
if engine == "datasets":
    import datasets
    from lmforge.data.cleaning import Repairs, clean_document_batch
    from lmforge.data.documents import RawDocument
    datasets.disable_progress_bars()
    corpus = datasets.load_dataset("json", data_files=glob, split="train", cache_dir=str(out / "cache"),
                                   num_proc=workers if workers > 1 else None)

    def clean(batch, indices):
        records = [RawDocument(f"doc-{{i}}", "corpus", t if isinstance(t, str) else "") for i, t in zip(indices, batch["text"])]
        kept, _ = clean_document_batch(records, params, Repairs())
        return {{"id": kept["id"].tolist(), "text": kept["text"].tolist()}}

    cleaned = corpus.map(clean, batched=True, batch_size=1000, with_indices=True, num_proc=workers if workers > 1 else None,
                         remove_columns=corpus.column_names)
    cleaned.to_parquet(str(out / "kept.parquet"))
    rows = len(cleaned)
else:
    from lmforge.data.cleaning import clean_document_shard
    from lmforge.data.documents import corpus_files, plan_shards
    from lmforge.data.engine import Engine, run_shards
    from lmforge.data.sources import split_glob
    raw, _ = split_glob(glob)
    shards = plan_shards(raw, corpus_files(raw), 16_000_000)
    jobs = [(str(raw), files, params, str(out / f"{{i}}.parquet"), str(out / f"{{i}}.q.parquet"), str(out / f"{{i}}.npy"))
            for i, files in enumerate(shards)]
    reports = run_shards(clean_document_shard, jobs, out / "work", engine=Engine(workers=workers), desc="clean", progress=False)
    rows = sum(r["rows_kept"] for r in reports)
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({{"engine": engine, "workers": workers, "seconds": round(seconds, 1), "rows_kept": rows,
                  "peak_rss_mb": round(peak / 1024)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--scratch", default="/tmp/lmforge-engine-compare")
    parser.add_argument("--record")
    args = parser.parse_args()
    from lmforge.data.sources import match_glob

    prefix, members = match_glob(args.corpus)
    cases = []
    for engine in ("datatrove", "datasets"):
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(args.scratch) / f"{engine}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            code = CASE.format(root=str(ROOT), engine=engine, workers=workers, glob=args.corpus, out=str(out))
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise SystemExit(f"{engine} x{workers} failed:\n{result.stderr[-3000:]}")
            case = json.loads(result.stdout.strip().splitlines()[-1])
            cases.append(case)
            print(json.dumps(case), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        record = {"command": " ".join(sys.argv), "commit": commit, "date": time.strftime("%Y-%m-%d"),
                  "card": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "corpus_gz_mb": round(sum((prefix / m).stat().st_size for m in members) / 1e6, 1),
                  "cases": cases}
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""D1-D3 of docs/performance.md: the data stages on a corpus of jsonl.gz shards (bench/make_corpus.py).

Runs ingest, clean, split and tokenize as the pipeline does (`python -m tasks.<stage>`), in a
scratch project whose params.yaml points `sources.corpus` at the corpus glob, and reports per
stage: wall time, MB/s of raw text, and the peak RSS of the largest process (the stage or any of
its workers). With --workers 1,2 the stages after ingest run once per worker count on the same
ingested corpus, and the ratio of their times is D3.

    .venv/bin/python bench/make_corpus.py --mb 256 --out /tmp/corpus-256
    .venv/bin/python bench/bench_data_plane.py --corpus '/tmp/corpus-256/*.jsonl.gz' --workers 2,1 \
        --record bench/results/<date>-cpu-data-plane-256mb.json
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.sources import manifest_pin, match_glob  # noqa: E402
from lmforge.hashing import file_digest  # noqa: E402

# The stage runs in a child; this wrapper reports the largest peak RSS of it and its workers.
_MEASURE = (
    "import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
    "print(json.dumps({'rc': r.returncode, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def pin_of(glob: str) -> str:
    prefix, members = match_glob(glob)
    return manifest_pin([{"member": m, "sha256": file_digest(prefix / m)} for m in members])


def scratch_project(where: Path, glob: str, workers: int) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = ["corpus"]
    params["workers"] = workers
    params["sources"]["corpus"] = {"uri": glob, "sha256": pin_of(glob)}
    params["clean"]["corpus"]["strip_boilerplate"] = False
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(where: Path, stage: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", f"tasks.{stage}", *args],
                            cwd=where, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["rc"] != 0:
        raise SystemExit(f"{stage} failed:\n{result.stdout}\n{result.stderr}")
    return {"stage": stage, "seconds": round(seconds, 1), "peak_rss_mb": round(measured["peak_rss_mb"])}


def set_workers(where: Path, workers: int) -> None:
    params = yaml.safe_load((where / "params.yaml").read_text())
    params["workers"] = workers
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the corpus glob, e.g. '/tmp/corpus-256/*.jsonl.gz'")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts to run clean..tokenize with")
    parser.add_argument("--scratch", default="/tmp/lmforge-bench-data-plane")
    parser.add_argument("--record", help="also write the results with their context to this JSON file")
    parser.add_argument("--drop-inputs", action="store_true",
                        help="delete each stage's input once the next stage is done (a corpus larger than the disk's "
                             "room for every stage's copy; one worker count only)")
    args = parser.parse_args()
    where = Path(args.scratch)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    counts = [int(w) for w in args.workers.split(",")]
    scratch_project(where, args.corpus, counts[0])
    prefix, members = match_glob(args.corpus)
    gz_mb = sum((prefix / m).stat().st_size for m in members) / 1e6
    cases = [run_stage(where, "ingest", "corpus")]
    print(json.dumps(cases[-1]), flush=True)  # each stage as it ends: a long run can be read while it goes
    inputs = {"clean": "data/raw", "split": "data/clean", "tokenize": "data/split"}
    for workers in counts:
        set_workers(where, workers)
        for stage in ("clean", "split", "tokenize"):
            cases.append({**run_stage(where, stage, *(["corpus"] if stage != "tokenize" else [])), "workers": workers})
            print(json.dumps(cases[-1]), flush=True)
            if args.drop_inputs:
                shutil.rmtree(where / inputs[stage], ignore_errors=True)
    text_mb = json.loads((where / "reports/clean/corpus.json").read_text())["text_bytes"] / 1e6
    for case in cases:
        case["text_mb_per_s"] = round(text_mb / case["seconds"], 2)
    summary = {"text_mb": round(text_mb, 1), "gz_mb": round(gz_mb, 1)}
    for workers in counts:
        mine = [c for c in cases if c.get("workers") == workers or c["stage"] == "ingest"]
        total = sum(c["seconds"] for c in mine)
        summary[f"end_to_end_s_w{workers}"] = round(total, 1)
        summary[f"end_to_end_mb_per_s_w{workers}"] = round(text_mb / total, 2)
        summary[f"peak_rss_mb_w{workers}"] = max(c["peak_rss_mb"] for c in mine)
        summary[f"tokenize_mb_per_s_w{workers}"] = next(c["text_mb_per_s"] for c in cases
                                                        if c["stage"] == "tokenize" and c["workers"] == workers)
    if 1 in counts and len(counts) > 1:
        best = max(counts)
        one = sum(c["seconds"] for c in cases if c.get("workers") == 1)
        many = sum(c["seconds"] for c in cases if c.get("workers") == best)
        summary[f"scaling_{best}_over_1_clean_to_tokenize"] = round(one / many, 2)
    print(json.dumps(summary))
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip())
        record = {"command": " ".join(sys.argv), "commit": commit, "dirty": dirty,
                  "card": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                  "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                  "cases": cases, "summary": summary}
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

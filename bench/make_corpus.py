"""Make a realistic corpus of a given size for the data-plane benchmark (docs/performance.md, D1-D3).

Documents are built from the sentences of the texts the project already has (the plays of
data/raw/corpus and the reviews of data/raw/task: run `dvc repro ingest` first): each one a
shuffled run of sentences in paragraphs, of varied length (a log-normal around 3 kB). Like a web
crawl it carries some mess: about 2% exact copies of earlier documents, and 1% junk (too short,
a line without breaks, a record that is not JSON, one without a text field, HTML remnants).

    .venv/bin/python bench/make_corpus.py --mb 256 --out /tmp/corpus-256mb
    # then: sources.corpus.uri: /tmp/corpus-256mb/*.jsonl.gz

Shards are jsonl.gz of about --shard-mb of text each, written by --workers processes; the same
arguments give the same files. Prints the glob's pin (the sha256 of its sha256sum manifest).

A corpus larger than the machine's memory is quicker made from a smaller one than from scratch:
`--variants-of /tmp/corpus-4g --copies 6` writes 6 variants of each of its shards, every document
with its paragraphs rotated and a variant line on top, so none is an exact copy (they are near
copies; the default clean stage keeps them, as near_dedup is off).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.sources import manifest_pin  # noqa: E402
from lmforge.hashing import file_digest  # noqa: E402

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_pool() -> list[str]:
    sentences: list[str] = []
    for path in sorted((ROOT / "data/raw/corpus").glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        sentences += [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if 20 <= len(s.strip()) <= 400]
    csv.field_size_limit(1 << 24)
    for path in sorted((ROOT / "data/raw/task").glob("*.csv")):
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            for row in csv.DictReader(handle):
                text = row.get("text", "").replace("<br />", " ")
                sentences += [s.strip() for s in _SENTENCE_END.split(text) if 20 <= len(s.strip()) <= 400]
    if not sentences:
        raise SystemExit("no source texts: run `dvc repro ingest` first (data/raw/corpus, data/raw/task)")
    return sentences


def document(rng: np.random.Generator, pool: list[str]) -> str:
    target = int(min(60_000, max(300, rng.lognormal(np.log(3000), 0.8))))
    paragraphs, size = [], 0
    while size < target:
        picks = rng.integers(0, len(pool), size=int(rng.integers(2, 8)))
        paragraph = " ".join(pool[i] for i in picks)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def junk(rng: np.random.Generator, pool: list[str]) -> str:
    """One line of a jsonl file that the clean stage must quarantine or repair."""
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return json.dumps({"text": "Too short."})
    if kind == 1:
        return json.dumps({"text": "x" * 30_000})  # a line with no breaks: a broken extraction
    if kind == 2:
        return '{"text": "an unterminated record'
    if kind == 3:
        return json.dumps({"body": document(rng, pool)})
    return json.dumps({"text": "<p>" + document(rng, pool).replace("\n\n", "<br /><br />") + "</p>"})


def write_shard(job: tuple[int, int, int, str, int]) -> tuple[str, int]:
    index, text_bytes, seed, out, junk_rate = job
    pool = sentence_pool()
    rng = np.random.default_rng([seed, index])
    recent: list[str] = []
    size = 0
    path = Path(out) / f"shard-{index:05d}.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
        while size < text_bytes:
            roll = rng.random()
            if roll < junk_rate:
                line = junk(rng, pool)
            elif roll < junk_rate + 0.02 and recent:
                line = json.dumps({"text": recent[int(rng.integers(0, len(recent)))]})
            else:
                text = document(rng, pool)
                recent = (recent + [text])[-50:]
                line = json.dumps({"text": text, "url": f"https://example.invalid/{index}/{size}"})
            handle.write(line + "\n")
            size += len(line)
    return path.name, size


def write_variant(job: tuple[str, str, int]) -> tuple[str, int]:
    source, out, copy = job
    name = f"v{copy}-{Path(source).name}"
    size = 0
    with gzip.open(source, "rt", encoding="utf-8") as lines, gzip.open(Path(out) / name, "wt", encoding="utf-8",
                                                                        compresslevel=1) as handle:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                paragraphs = record["text"].split("\n\n")
                turn = copy % len(paragraphs)
                record["text"] = f"Variant {copy}.\n\n" + "\n\n".join(paragraphs[turn:] + paragraphs[:turn])
                line = json.dumps(record) + "\n"
            handle.write(line)
            size += len(line)
    return name, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, help="MB of text (uncompressed) in all")
    parser.add_argument("--variants-of", help="a corpus folder to make variants of, instead of new documents")
    parser.add_argument("--copies", type=int, default=1, help="with --variants-of: variants of each shard")
    parser.add_argument("--out", required=True, help="the folder to write the shards into")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="MB of text per shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--junk-rate", type=float, default=0.01, help="share of junk records (0 for an engine "
                        "that stops at a malformed line, bench/engine_compare.py)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variants_of:
        sources = sorted(Path(args.variants_of).glob("*.jsonl.gz"))
        jobs = [(str(source), str(out), copy) for copy in range(1, args.copies + 1) for source in sources]
        with Pool(args.workers) as pool:
            written = pool.map(write_variant, jobs)
        n = len(written)
    else:
        if args.mb is None:
            parser.error("give --mb, or --variants-of")
        n = max(1, round(args.mb / args.shard_mb))
        per_shard = int(args.mb * 1e6 / n)
        with Pool(args.workers) as pool:
            written = pool.map(write_shard, [(i, per_shard, args.seed, str(out), args.junk_rate) for i in range(n)])
    files = [{"member": name, "sha256": file_digest(out / name)} for name, _ in written]
    total = sum(size for _, size in written)
    print(json.dumps({"out": str(out), "shards": n, "text_mb": round(total / 1e6, 1),
                      "gz_mb": round(sum((out / f["member"]).stat().st_size for f in files) / 1e6, 1),
                      "uri": f"{out}/*.jsonl.gz", "sha256": manifest_pin(files)}))


if __name__ == "__main__":
    main()

"""split: data/clean/<dataset>/kept/ -> data/split/<dataset>/.

A corpus (documents) becomes {train,val,test}/part-NNNNN.parquet with an index.json of the parts
(rows and bytes of text each); in hash mode each clean shard is split on its own, on the data
engine. Labelled examples become {train,val,test}.parquet, stratified by label."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from lmforge.atomic import atomic_dir, write_json
from lmforge.data.engine import peak_child_rss_mb, peak_rss_mb, run_shards
from lmforge.data.splitting import SPLITS, SplitError, split_frame, split_report, split_shard
from lmforge.errors import UserError
from tasks import layout
from tasks._common import fail, params_or_exit, stage_args, timed
from tasks._data_plane import data_engine, remove_work_dir, work_dir_for


def main() -> None:
    args = stage_args(__doc__, with_dataset=True)
    params = params_or_exit(args.params)
    if args.dataset not in params.split:
        fail(f"no section split.{args.dataset} in {args.params}")
    section = params.split[args.dataset]
    kept = layout.CLEAN / args.dataset / "kept"
    if not kept.is_dir():
        fail(f"{kept} is missing: run the clean stage first (dvc repro clean@{args.dataset})")
    documents = params.clean[args.dataset].kind == "documents"
    with timed(f"split@{args.dataset}"):
        start = time.perf_counter()
        try:
            with atomic_dir(layout.SPLIT / args.dataset) as out:
                if documents and section.mode == "hash":
                    report = _split_by_hash(kept, out, params, section, args.dataset)
                else:
                    report = _split_in_memory(kept, out, section, params.seed, documents)
                _check_not_empty(report, section, args.dataset, documents)
        except UserError as err:
            fail(f"split.{args.dataset}: {err}")
        seconds = time.perf_counter() - start
        rows = sum(report[s]["rows"] for s in SPLITS)
        text_bytes = sum(report[s].get("bytes", report[s].get("chars", 0)) for s in SPLITS)
        report.update(seconds=round(seconds, 3), docs_per_s=round(rows / max(seconds, 1e-9), 1),
                      mb_per_s=round(text_bytes / 1e6 / max(seconds, 1e-9), 2),
                      peak_rss_mb=max(peak_rss_mb(), peak_child_rss_mb()))
        write_json(layout.SPLIT_REPORTS / f"{args.dataset}.json", report)
    print(f"split {args.dataset}: " + ", ".join(f"{s} {report[s]['rows']} rows" for s in SPLITS))


def _split_by_hash(kept: Path, out: Path, params, section, dataset: str) -> dict:
    parts = sorted(kept.glob("part-*.parquet"))
    for split in SPLITS:
        (out / split).mkdir()
    work = work_dir_for(f"split-{dataset}", section, *parts)
    jobs = [(str(p), str(out), p.stem, params.seed, section.val, section.test) for p in parts]
    shards = run_shards(split_shard, jobs, work, engine=data_engine(params), desc="split", bytes_key="bytes_in")
    remove_work_dir(work)
    index = {s: [{"file": f"{s}/{p.stem}.parquet", **r[s]} for p, r in zip(parts, shards)] for s in SPLITS}
    write_json(out / "index.json", index)
    # Hash mode counts UTF-8 bytes of text (what tokenize and bits per byte use), not characters.
    report = {s: {"rows": sum(e["rows"] for e in index[s]), "bytes": sum(e["bytes"] for e in index[s])} for s in SPLITS}
    return {**report, "shards": len(parts)}


def _split_in_memory(kept: Path, out: Path, section, seed: int, documents: bool) -> dict:
    splits = split_frame(pd.read_parquet(kept), section, seed)
    if not documents:
        for name, frame in splits.items():
            frame.to_parquet(out / f"{name}.parquet", index=False)
        return split_report(splits)
    index = {}
    for name, frame in splits.items():
        (out / name).mkdir()
        frame.to_parquet(out / name / "part-00000.parquet", index=False)
        index[name] = [{"file": f"{name}/part-00000.parquet", "rows": len(frame),
                        "bytes": int(frame["text"].map(lambda t: len(t.encode("utf-8"))).sum())}]
    write_json(out / "index.json", index)
    return split_report(splits)


def _check_not_empty(report: dict, section, dataset: str, documents: bool) -> None:
    # A corpus's plain-text files are cut into more documents when clean's min_documents is higher.
    finer = f"raise clean.{dataset}.min_documents, " if documents else ""
    for split, fraction in (("train", 1.0), ("val", section.val), ("test", section.test)):
        if fraction > 0 and report[split]["rows"] == 0:
            raise SplitError(f"the {split} split came out empty ({sum(report[s]['rows'] for s in SPLITS)} rows in all); "
                             f"add data, raise its fraction, {finer}or use mode: random for a handful of documents")


if __name__ == "__main__":
    main()

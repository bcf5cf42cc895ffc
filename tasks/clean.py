"""clean: normalise and validate data/raw/<dataset>/ into data/clean/<dataset>/, a folder of
parquet shards: kept/part-NNNNN.parquet and quarantine/part-NNNNN.parquet (each row with its
reason), with the counts, in total and per shard, in reports/clean/<dataset>.json.

A corpus (kind: documents) is cleaned shard by shard on the data engine, `workers` at a time, with
scratch files under data/.work/: a killed run, rerun with the same inputs, skips the shards it
finished. A plain-text file longer than clean.<dataset>.chunk_chars is cut into documents (the
report's `cutting` says how). Labelled examples are small and cleaned in one piece (one part)."""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.atomic import atomic_dir, write_json
from lmforge.data.cleaning import clean_corpus, clean_examples
from lmforge.config.clean import CleanDocuments
from lmforge.data.engine import peak_child_rss_mb, peak_rss_mb
from lmforge.errors import UserError
from tasks import layout
from tasks._common import fail, params_or_exit, stage_args, timed
from tasks._data_plane import data_engine, remove_work_dir, work_dir_for


def main() -> None:
    args = stage_args(__doc__, with_dataset=True)
    params = params_or_exit(args.params)
    if args.dataset not in params.clean:
        fail(f"no section clean.{args.dataset} in {args.params}")
    section = params.clean[args.dataset]
    raw_dir = layout.RAW / args.dataset
    if not raw_dir.is_dir():
        fail(f"{raw_dir} is missing: run the ingest stage first (dvc repro ingest@{args.dataset})")
    with timed(f"clean@{args.dataset}"):
        start = time.perf_counter()
        work = work_dir_for(f"clean-{args.dataset}", section, raw_dir / "manifest.json")
        try:
            with atomic_dir(layout.CLEAN / args.dataset) as out:
                if isinstance(section, CleanDocuments):
                    report = clean_corpus(raw_dir, section, out, work, data_engine(params))
                elif section.kind == "chat":
                    report = _clean_chat(raw_dir, section, out)
                else:
                    report = _clean_labelled(raw_dir, section, args.dataset, out)
        except UserError as err:
            fail(str(err))
        seconds = time.perf_counter() - start
        report = {**report, "seconds": round(seconds, 3),
                  "mb_per_s": round(report.get("text_bytes", report["bytes_in"]) / 1e6 / max(seconds, 1e-9), 2),
                  "docs_per_s": round(report["rows_in"] / max(seconds, 1e-9), 1),
                  "peak_rss_mb": max(peak_rss_mb(), peak_child_rss_mb())}
        write_json(layout.CLEAN_REPORTS / f"{args.dataset}.json", report)
        remove_work_dir(work)
    print(f"clean {args.dataset}: {report['rows_in']} rows in = {report['rows_kept']} kept + "
          f"{report['rows_quarantined']} quarantined ({report.get('shards', 1)} shards, {report['mb_per_s']} MB/s, "
          f"peak {report['peak_rss_mb']:.0f} MB)")
    if report.get("cutting", {}).get("files_cut"):
        cut = report["cutting"]
        print(f"  cut {cut['files_cut']} long text files into {cut['documents_from_cut_files']} documents of about "
              f"{cut['target_chars']} chars: {cut['cuts_at_blank_lines']} cuts at blank lines, "
              f"{cut['cuts_at_line_breaks']} at line breaks")
    for reason, count in report["quarantine_by_reason"].items():
        print(f"  quarantined {count:>6}  {reason[:100]}")


def _clean_chat(raw_dir: Path, section, out: Path) -> dict:
    from lmforge.data.conversations import clean_conversations

    result = clean_conversations(raw_dir, section.layout, section.max_chars)
    for folder, frame in (("kept", result.kept), ("quarantine", result.quarantine)):
        (out / folder).mkdir()
        frame.to_parquet(out / folder / "part-00000.parquet", index=False)
    bytes_in = sum(p.stat().st_size for p in raw_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {**result.report, "bytes_in": bytes_in, "shards": 1}


def _clean_labelled(raw_dir: Path, section, dataset: str, out: Path) -> dict:
    result = clean_examples(raw_dir, section, dataset)
    for folder, frame in (("kept", result.kept), ("quarantine", result.quarantine)):
        (out / folder).mkdir()
        frame.to_parquet(out / folder / "part-00000.parquet", index=False)
    bytes_in = sum(p.stat().st_size for p in raw_dir.iterdir() if p.name != "manifest.json")
    return {**result.report, "bytes_in": bytes_in, "shards": 1}


if __name__ == "__main__":
    main()

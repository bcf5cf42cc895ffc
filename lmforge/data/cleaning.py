"""Cleaning: decode, normalise, validate with pandera, deduplicate, quarantine what fails.

Every raw row ends up in exactly one place: the clean table or the quarantine table (with the
reason). `rows_in == rows_kept + rows_quarantined` holds and is reported. Repairs follow stated
rules and are counted:
  - bytes: a UTF-8 BOM is dropped; NUL bytes are dropped; a line that is not valid UTF-8 is
    decoded as Windows-1252 (the usual legacy encoding of such texts), so a file mixing
    encodings keeps every line;
  - text: Unicode NFC; CRLF and CR become LF; HTML line breaks (`<br />`) become line breaks,
    other HTML tags are dropped and entities unescaped; exotic spaces become plain spaces;
  - documents: Project Gutenberg licence header, footer and notice blocks are stripped; trailing
    spaces go and runs of blank lines shrink to one; a plain-text file longer than the cutting
    target becomes several documents (`cutting_for`, lmforge/data/documents.py: `cut_lines`);
  - labelled examples: all whitespace folds to single spaces; labels like "1.0" read as "1".
"""

from __future__ import annotations

import hashlib
import html
import io
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq
from pandera.errors import SchemaErrors
from pandera.typing import Series

from lmforge.config.clean import CleanDocuments, CleanLabelled
from lmforge.data.documents import Cutting, RawDocument, corpus_files, plan_shards, read_documents
from lmforge.data.engine import Engine, run_shards
from lmforge.errors import UserError

TABLE_SUFFIXES = (".csv", ".parquet")

_HTML_BREAK = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
# Only known HTML tags: a bare "<" in prose (or "<<" in old e-texts) must survive.
_HTML_TAG = re.compile(
    r"</?(?:a|b|i|u|em|strong|p|div|span|font|center|blockquote|h[1-6])\b[^>\n]{0,200}>",
    re.IGNORECASE,
)
_ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000\t\f\v]")
_TRAILING_SPACE = re.compile(r"[ ]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.DOTALL)


class CleanError(UserError, ValueError):
    """The raw data is wholly unusable (no rows, missing columns): nothing can be cleaned."""


@dataclass
class Repairs:
    counts: Counter = field(default_factory=Counter)

    def add(self, rule: str, n: int = 1) -> None:
        if n:
            self.counts[rule] += n


# --- bytes and text ---------------------------------------------------------------------------


def decode_bytes(raw: bytes, repairs: Repairs) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        repairs.add("bom_removed")
    if b"\x00" in raw:
        repairs.add("nul_bytes_removed", raw.count(b"\x00"))
        raw = raw.replace(b"\x00", b"")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            # cp1252 leaves five bytes undefined; latin-1 maps every byte, so nothing is lost.
            try:
                lines.append(line.decode("cp1252"))
            except UnicodeDecodeError:
                lines.append(line.decode("latin-1"))
            repairs.add("lines_redecoded_cp1252")
    return "\n".join(lines)


def normalise_text(text: str) -> str:
    """The rules common to documents and examples: NFC, line ends, HTML remnants, spaces."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "<" in text:
        text = _HTML_TAG.sub("", _HTML_BREAK.sub("\n", text))
    if "&" in text:
        text = html.unescape(text)
    return _ODD_SPACES.sub(" ", text)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    stripped = _GUTENBERG_NOTICE.sub("", text)
    if start := _GUTENBERG_START.search(stripped):
        stripped = stripped[start.end() :]
    if end := _GUTENBERG_END.search(stripped):
        stripped = stripped[: end.start()]
    return stripped, stripped != text


def normalise_document(text: str, params: CleanDocuments, repairs: Repairs) -> str:
    text = normalise_text(text)
    if params.strip_boilerplate:
        text, changed = strip_gutenberg(text)
        repairs.add("boilerplate_stripped", int(changed))
    text = _BLANK_RUNS.sub("\n\n", _TRAILING_SPACE.sub("\n", text))
    return text.strip()


def normalise_example(text: str) -> str:
    # str.split() folds every Unicode whitespace run, several times faster than a regex.
    return " ".join(normalise_text(text).split())


def canonical_label(raw: str) -> str:
    raw = raw.strip()
    try:
        number = float(raw)
    except ValueError:
        return raw
    return str(int(number)) if number.is_integer() else raw


# --- schemas ----------------------------------------------------------------------------------


class DocumentSchema(pa.DataFrameModel):
    id: Series[str] = pa.Field(unique=True)
    source: Series[str]
    text: Series[str]


class ExampleSchema(pa.DataFrameModel):
    id: Series[str] = pa.Field(unique=True)
    text: Series[str]
    label: Series[str]


def _length_check(min_chars: int, max_chars: int) -> pa.Check:
    # Custom checks, not the built-ins: pandera reports a custom check by its readable name.
    return pa.Check(lambda s: s.str.len().between(min_chars, max_chars), name=f"length between {min_chars} and {max_chars} chars")


def document_schema(params: CleanDocuments) -> pa.DataFrameSchema:
    longest_line = pa.Check(
        lambda s: s.map(lambda t: max(map(len, t.split("\n")), default=0)) <= params.max_line_chars,
        name=f"no line over {params.max_line_chars} chars",
    )
    checks = [_length_check(params.min_chars, params.max_chars), longest_line]
    return DocumentSchema.to_schema().update_column("text", checks=checks)


def example_schema(params: CleanLabelled) -> pa.DataFrameSchema:
    declared = sorted(params.labels)
    schema = ExampleSchema.to_schema().update_column("text", checks=[_length_check(params.min_chars, params.max_chars)])
    return schema.update_column("label", checks=[pa.Check(lambda s: s.isin(declared), name=f"label in declared set {declared}")])


# --- the cleaning itself ----------------------------------------------------------------------


@dataclass
class CleanResult:
    kept: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict


def split_failures(frame: pd.DataFrame, schema: pa.DataFrameSchema,
                   name_columns: bool = True) -> tuple[pd.DataFrame, pd.Series]:
    """Validate lazily; return the passing rows and, per failing row index, its failed checks
    ("column: check", or the check alone where its name says enough)."""
    try:
        schema.validate(frame, lazy=True)
        return frame, pd.Series(dtype=str)
    except SchemaErrors as err:
        cases = err.failure_cases.dropna(subset=["index"])
        checks = cases["check"].astype(str)
        if name_columns:
            checks = cases["column"].astype(str) + ": " + checks
        reasons = checks.groupby(cases["index"]).agg(lambda r: "; ".join(sorted(set(r))))
        bad = frame.index.isin(reasons.index)
        return frame[~bad], reasons


def _with_reason(frame: pd.DataFrame, reasons, detail="") -> pd.DataFrame:
    out = frame.copy()
    out["reason"] = reasons
    out["detail"] = detail
    return out


def _finish(kept: pd.DataFrame, quarantined: list[pd.DataFrame], rows_in: int, repairs: Repairs, columns: list[str]) -> CleanResult:
    quarantine_columns = columns + ["reason", "detail"]
    parts = [q.reindex(columns=quarantine_columns, fill_value="") for q in quarantined if len(q)]
    quarantine = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: pd.Series(dtype=str) for c in quarantine_columns})
    kept = kept[columns].reset_index(drop=True)
    if rows_in != len(kept) + len(quarantine):
        raise AssertionError(f"row accounting broke: {rows_in} in, {len(kept)} kept, {len(quarantine)} quarantined")
    by_reason = Counter(quarantine["reason"]) if len(quarantine) else Counter()
    report = {
        "rows_in": rows_in,
        "rows_kept": len(kept),
        "rows_quarantined": len(quarantine),
        "quarantine_by_reason": dict(by_reason.most_common()),
        "repairs": dict(repairs.counts),
        "chars_kept": int(kept["text"].str.len().sum()) if len(kept) else 0,
    }
    return CleanResult(kept, quarantine, report)


def _dedupe(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first of each exact duplicate text; the rest go to quarantine naming the first."""
    first_id = frame.groupby("text", sort=False)["id"].transform("first")
    dupes = frame["id"] != first_id
    return frame[~dupes], _with_reason(frame[dupes], "exact duplicate", detail="first kept: " + first_id[dupes])


def clean_documents(raw_dir: Path, params: CleanDocuments) -> CleanResult:
    """Clean a small corpus in memory (every file of `raw_dir`): the tests' and notebooks' view of
    what the sharded run (`clean_document_shard` + `find_duplicates`) writes."""
    repairs, cut_counts = Repairs(), Counter()
    files = corpus_files(raw_dir)
    cutting = cutting_for(params, corpus_bytes(raw_dir, files))
    records = [r for name in files for r in read_documents(raw_dir, name, params.text_field, cutting, cut_counts)]
    repairs.add("boilerplate_stripped", cut_counts.pop("boilerplate_stripped", 0))
    kept, quarantined = clean_document_batch(records, params, repairs)
    kept, duplicates = _dedupe(kept)
    result = _finish(kept, [quarantined, duplicates], len(records), repairs, DOCUMENT_COLUMNS)
    result.report["cutting"] = cutting_report(cutting, params, [cut_counts])
    return result


# --- long plain-text files --------------------------------------------------------------------


def corpus_bytes(raw_dir: Path, files: list[str]) -> int:
    return sum((Path(raw_dir) / name).stat().st_size for name in files)


def _line_pattern(pattern: re.Pattern[str]) -> re.Pattern[bytes]:
    """A marker pattern for one raw line (the cutter reads bytes, a line at a time)."""
    return re.compile(pattern.pattern.encode("utf-8"), re.IGNORECASE)


def cutting_for(params: CleanDocuments, corpus_size: int) -> Cutting | None:
    """How a corpus of `corpus_size` bytes cuts its long plain-text files. The target is
    `chunk_chars`, lowered for a small corpus so that it still makes about `min_documents`
    documents (a hash split of a 10 kB file then fills val and test), but never below twice
    `min_chars`, so that what normalising removes cannot leave a piece under `min_chars`. A line
    is read up to 4 bytes a character past `max_line_chars`: longer, it fails that check anyway.
    None (no file is cut) when `chunk_chars` is null."""
    if params.chunk_chars is None:
        return None
    target = max(2 * params.min_chars, min(params.chunk_chars, corpus_size // params.min_documents))
    markers = (_line_pattern(_GUTENBERG_START), _line_pattern(_GUTENBERG_END)) if params.strip_boilerplate else (None, None)
    return Cutting(target, 4 * (params.max_line_chars + 1), *markers)


CUT_COUNTS = ("files_cut", "documents_from_cut_files", "cuts_at_blank_lines", "cuts_at_line_breaks",
              "long_lines_cut_short")


def cutting_report(cutting: Cutting | None, params: CleanDocuments, counts: list[dict]) -> dict:
    """How the plain-text files were cut, summed over shards; a cut file of n documents has n - 1
    cuts, so documents_from_cut_files = files_cut + cuts_at_blank_lines + cuts_at_line_breaks."""
    total = {key: sum(c.get(key, 0) for c in counts) for key in CUT_COUNTS}
    if total["documents_from_cut_files"] != total["files_cut"] + total["cuts_at_blank_lines"] + total["cuts_at_line_breaks"]:
        raise AssertionError(f"cut accounting broke: {total}")
    return {"target_chars": cutting.target_chars if cutting else None, "chunk_chars": params.chunk_chars,
            "min_documents": params.min_documents, **total}


DOCUMENT_COLUMNS = ["id", "source", "text"]


def clean_document_batch(records: list[RawDocument], params: CleanDocuments,
                         repairs: Repairs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalise and validate a batch of raw documents: (kept, quarantined with reason and detail)."""
    rows, unusable = [], []
    for record in records:
        row = {"id": record.id, "source": record.source}
        if record.problem is not None:
            unusable.append({**row, "text": record.payload, "reason": record.problem, "detail": record.detail})
            continue
        text = decode_bytes(record.payload, repairs) if isinstance(record.payload, bytes) else record.payload
        if not text or text.isspace():
            whole_file = isinstance(record.payload, bytes)
            unusable.append({**row, "text": "", "reason": "empty file" if whole_file else "empty text"})
            continue
        rows.append({**row, "text": normalise_document(text, params, repairs)})
    frame = pd.DataFrame(rows, columns=DOCUMENT_COLUMNS)
    valid, reasons = split_failures(frame, document_schema(params))
    failed = _with_reason(frame.loc[reasons.index], reasons)
    parts = [p.reindex(columns=QUARANTINE_COLUMNS, fill_value="") for p in (pd.DataFrame(unusable), failed) if len(p)]
    quarantined = pd.concat(parts, ignore_index=True) if parts else _empty(QUARANTINE_COLUMNS)
    return valid.reset_index(drop=True), quarantined


QUARANTINE_COLUMNS = DOCUMENT_COLUMNS + ["reason", "detail"]
KEPT_SCHEMA = pa_arrow.schema([("id", pa_arrow.string()), ("source", pa_arrow.string()), ("text", pa_arrow.string())])
QUARANTINE_SCHEMA = pa_arrow.schema([(c, pa_arrow.string()) for c in QUARANTINE_COLUMNS])


def _writer(path: str, schema: pa_arrow.Schema) -> pq.ParquetWriter:
    # zstd: text shards take about half the room they take with parquet's default snappy.
    return pq.ParquetWriter(path, schema, compression="zstd")


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str) for c in columns})


def text_hash(text: str) -> int:
    """A 64-bit hash of a text: the key of exact deduplication (a collision needs ~4e9 documents)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# --- one shard of a corpus --------------------------------------------------------------------


BATCH_BYTES = 8 << 20  # the text a shard's worker holds at once


def clean_document_shard(raw_dir: str, files: list[str], params: CleanDocuments, kept_path: str,
                         quarantine_path: str, hashes_path: str, batch_bytes: int = BATCH_BYTES,
                         cutting: Cutting | None = None) -> dict:
    """Clean one shard's files, a batch of documents at a time, into two parquet files (kept,
    quarantined) and the kept texts' hashes (for `find_duplicates`). Memory holds one batch.
    Plain-text files longer than `cutting`'s target are cut into documents (none without it)."""
    repairs, counts, cut_counts = Repairs(), Counter(), Counter()
    hashes: list[int] = []
    totals = Counter()
    with _writer(kept_path, KEPT_SCHEMA) as kept_out, _writer(quarantine_path, QUARANTINE_SCHEMA) as bad_out:
        for batch in _batches(raw_dir, files, params.text_field, batch_bytes, totals, cutting, cut_counts):
            kept, quarantined = clean_document_batch(batch, params, repairs)
            kept_out.write_table(pa_arrow.Table.from_pandas(kept[DOCUMENT_COLUMNS], schema=KEPT_SCHEMA, preserve_index=False))
            bad_out.write_table(pa_arrow.Table.from_pandas(quarantined[QUARANTINE_COLUMNS], schema=QUARANTINE_SCHEMA, preserve_index=False))
            hashes.extend(text_hash(t) for t in kept["text"])
            counts.update(quarantined["reason"])
            totals["rows_in"] += len(batch)
            totals["rows_kept"] += len(kept)
            totals["chars_kept"] += int(kept["text"].str.len().sum()) if len(kept) else 0
    np.save(hashes_path, np.asarray(hashes, dtype=np.uint64))
    repairs.add("boilerplate_stripped", cut_counts.pop("boilerplate_stripped", 0))
    return {
        "files": len(files),
        "bytes_in": corpus_bytes(raw_dir, files),
        "text_bytes": totals["text_bytes"],
        "rows_in": totals["rows_in"],
        "rows_kept": totals["rows_kept"],
        "rows_quarantined": sum(counts.values()),
        "quarantine_by_reason": dict(counts.most_common()),
        "repairs": dict(repairs.counts),
        "chars_kept": totals["chars_kept"],
        "cutting": dict(cut_counts),
    }


def _batches(raw_dir: str, files: list[str], text_field: str, batch_bytes: int, totals: Counter,
             cutting: Cutting | None, cut_counts: Counter):
    batch, size = [], 0
    for name in files:
        for record in read_documents(Path(raw_dir), name, text_field, cutting, cut_counts):
            batch.append(record)
            nbytes = len(record.payload) if isinstance(record.payload, bytes) else len(record.payload.encode("utf-8"))
            totals["text_bytes"] += nbytes
            size += nbytes
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def find_duplicates(hash_files: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact duplicates across every shard: for each shard, (rows to drop, and for each the shard
    and row of the first copy, which is kept). "First" is in shard order, so the result does not
    depend on how the shards were scheduled. Memory: 8 bytes and two indices per kept document."""
    per_shard = [np.load(f) for f in hash_files]
    if not per_shard:
        return []
    sizes = np.array([len(h) for h in per_shard])
    shard_of = np.repeat(np.arange(len(per_shard)), sizes)
    row_of = np.concatenate([np.arange(n) for n in sizes]) if sizes.sum() else np.zeros(0, dtype=np.int64)
    hashes = np.concatenate(per_shard)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first_of_each = first[inverse]
    duplicate = first_of_each != np.arange(len(hashes))
    out = []
    for shard in range(len(per_shard)):
        mine = duplicate & (shard_of == shard)
        firsts = first_of_each[mine]
        out.append((row_of[mine], shard_of[firsts], row_of[firsts]))
    return out


def drop_duplicates(kept_tmp: str, quarantine_tmp: str, rows: list[int], reasons: list[str], first_ids: list[str],
                    kept_path: str, quarantine_path: str) -> dict:
    """Write a shard's final kept and quarantine files: the duplicate `rows` move to quarantine
    with their reason, each naming the id of the copy that was kept. Streams a row group at a time."""
    drop = {row: (reason, first) for row, reason, first in zip(rows, reasons, first_ids)}
    offset = 0
    with _writer(kept_path, KEPT_SCHEMA) as kept_out, _writer(quarantine_path, QUARANTINE_SCHEMA) as bad_out:
        for table in _row_groups(quarantine_tmp):
            bad_out.write_table(table)
        for table in _row_groups(kept_tmp):
            index = np.arange(offset, offset + table.num_rows)
            offset += table.num_rows
            is_dup = np.isin(index, rows) if rows else np.zeros(len(index), dtype=bool)
            kept_out.write_table(table.filter(pa_arrow.array(~is_dup)))
            if is_dup.any():
                dups = table.filter(pa_arrow.array(is_dup)).to_pandas()
                dups["reason"] = [drop[int(i)][0] for i in index[is_dup]]
                dups["detail"] = ["first kept: " + drop[int(i)][1] for i in index[is_dup]]
                bad_out.write_table(pa_arrow.Table.from_pandas(dups[QUARANTINE_COLUMNS], schema=QUARANTINE_SCHEMA, preserve_index=False))
    return {"rows_dropped": len(rows)}


def _row_groups(path: str):
    reader = pq.ParquetFile(path)
    for i in range(reader.num_row_groups):
        yield reader.read_row_group(i)


def _ids_of_first_copies(drops: list[dict], kept_files: list[str]) -> dict[tuple[int, int], str]:
    """(shard, row) of each dropped document -> the id of its kept first copy; each shard's id
    column is read once, and only when it holds a first copy."""
    wanted: dict[int, set[int]] = {}
    for shard_drops in drops:
        for _, first_shard, first_row in shard_drops.values():
            wanted.setdefault(first_shard, set()).add(first_row)
    found: dict[tuple[int, int], str] = {}
    for shard, rows in wanted.items():
        ids = pq.read_table(kept_files[shard], columns=["id"]).column("id")
        found.update({(shard, row): ids[row].as_py() for row in rows})
    return {(shard, row): found[(fs, fr)] for shard, shard_drops in enumerate(drops)
            for row, (_, fs, fr) in shard_drops.items()}


def clean_corpus(raw_dir: Path, params: CleanDocuments, out_dir: Path, work_dir: Path, engine: Engine,
                 progress: bool = True) -> dict:
    """Clean every shard of a corpus on the data engine, then drop exact duplicates across shards.

    Writes out_dir/kept/part-NNNNN.parquet and out_dir/quarantine/part-NNNNN.parquet, one of each
    per shard; the scratch files and the engine's completion marks live in `work_dir`, so a
    killed run picks up at the first unfinished shard. Returns the totals and each shard's counts."""
    raw_dir, out_dir, work_dir = Path(raw_dir), Path(out_dir), Path(work_dir)
    files = corpus_files(raw_dir)
    shards = plan_shards(raw_dir, files, int(params.shard_mb * 1e6))
    if not shards:
        raise CleanError(f"{raw_dir}: no data files to clean")
    cutting = cutting_for(params, corpus_bytes(raw_dir, files))
    scratch = work_dir / "shards"
    scratch.mkdir(parents=True, exist_ok=True)
    part = [f"part-{i:05d}" for i in range(len(shards))]
    jobs = [(str(raw_dir), files, params, str(scratch / f"{p}.kept.parquet"), str(scratch / f"{p}.quarantine.parquet"),
             str(scratch / f"{p}.hashes.npy"), BATCH_BYTES, cutting) for p, files in zip(part, shards)]
    shard_reports = run_shards(clean_document_shard, jobs, work_dir / "cleaning", engine=engine, desc="cleaning",
                               bytes_key="text_bytes", progress=progress)
    drops = [{row: ("exact duplicate", fs, fr) for row, fs, fr in zip(*(a.tolist() for a in found))}
             for found in find_duplicates([job[5] for job in jobs])]
    if params.near_dedup is not None:
        _add_near_duplicates(drops, scratch, len(jobs), work_dir / "near-dedup", engine, params)
    first_ids = _ids_of_first_copies(drops, [job[3] for job in jobs])
    (out_dir / "kept").mkdir(parents=True, exist_ok=True)
    (out_dir / "quarantine").mkdir(parents=True, exist_ok=True)
    finals = []
    for i, shard_drops in enumerate(drops):
        rows = sorted(shard_drops)
        finals.append((jobs[i][3], jobs[i][4], rows, [shard_drops[r][0] for r in rows], [first_ids[(i, r)] for r in rows],
                       str(out_dir / "kept" / f"{part[i]}.parquet"), str(out_dir / "quarantine" / f"{part[i]}.parquet")))
    run_shards(drop_duplicates, finals, work_dir / "dedup", engine=engine, desc="dedup", progress=False)
    for report, shard_drops in zip(shard_reports, drops):
        _count_duplicates(report, [reason for reason, _, _ in shard_drops.values()])
    report = corpus_report(shard_reports)
    report["cutting"] = cutting_report(cutting, params, [shard.get("cutting", {}) for shard in shard_reports])
    return report


def _add_near_duplicates(drops: list[dict], scratch: Path, shards: int, work_dir: Path, engine: Engine,
                         params: CleanDocuments) -> None:
    """Add each near-duplicate cluster's members but its first (in shard order) to `drops`."""
    from lmforge.data.near_dedup import near_duplicate_clusters, rows_to_drop

    near = params.near_dedup
    clusters = near_duplicate_clusters(scratch, "*.kept.parquet", shards, work_dir, engine, n_grams=near.n_grams,
                                       buckets=near.buckets, hashes_per_bucket=near.hashes_per_bucket, seed=near.seed)
    for (shard, row), (first_shard, first_row) in rows_to_drop(clusters).items():
        drops[shard].setdefault(row, ("near duplicate", first_shard, first_row))


def _count_duplicates(report: dict, reasons: list[str]) -> None:
    report["rows_kept"] -= len(reasons)
    report["rows_quarantined"] += len(reasons)
    for reason, n in Counter(reasons).items():
        report["quarantine_by_reason"][reason] = report["quarantine_by_reason"].get(reason, 0) + n
    if report["rows_in"] != report["rows_kept"] + report["rows_quarantined"]:
        raise AssertionError(f"row accounting broke in a shard: {report}")


def corpus_report(shards: list[dict]) -> dict:
    """Totals over the shards (which reconcile one by one), with the shards' own counts kept."""
    by_reason, repairs = Counter(), Counter()
    for shard in shards:
        by_reason.update(shard["quarantine_by_reason"])
        repairs.update(shard["repairs"])
    total = {key: sum(s[key] for s in shards) for key in ("rows_in", "rows_kept", "rows_quarantined", "chars_kept",
                                                          "bytes_in", "text_bytes", "files")}
    if total["rows_in"] != total["rows_kept"] + total["rows_quarantined"]:
        raise AssertionError(f"row accounting broke: {total}")
    return {**total, "quarantine_by_reason": dict(by_reason.most_common()), "repairs": dict(repairs),
            "shards": len(shards), "shards_resumed": sum(bool(s.get("resumed")) for s in shards),
            "peak_rss_mb_worker": max((s.get("peak_rss_mb", 0) for s in shards), default=0),
            "per_shard": [{k: s[k] for k in ("files", "rows_in", "rows_kept", "rows_quarantined")} for s in shards]}


def read_table(path: Path, repairs: Repairs, quarantined: list[dict]) -> pd.DataFrame:
    """A raw CSV or parquet file as strings; CSV lines that do not parse are quarantined."""
    if path.suffix == ".parquet":
        return pd.read_parquet(path).astype(str)
    text = decode_bytes(path.read_bytes(), repairs)
    if not text or text.isspace():  # isspace() scans without copying a large text
        quarantined.append({"id": path.name, "text": "", "label": "", "reason": "empty file"})
        return pd.DataFrame()
    options = dict(dtype=str, keep_default_na=False)
    try:
        return pd.read_csv(io.StringIO(text), **options)
    except pd.errors.ParserError:
        pass
    # Slow path, only for broken files: the python engine hands us each malformed line.
    def keep_bad(fields: list[str]) -> None:
        quarantined.append({"id": f"{path.name}:malformed", "text": ",".join(fields), "label": "", "reason": "malformed CSV line"})
        return None

    return pd.read_csv(io.StringIO(text), engine="python", on_bad_lines=keep_bad, **options)


def clean_examples(raw_dir: Path, params: CleanLabelled, dataset: str) -> CleanResult:
    repairs = Repairs()
    unreadable: list[dict] = []
    tables = []
    paths = sorted(p for p in Path(raw_dir).iterdir() if p.suffix in TABLE_SUFFIXES)
    if not paths:
        raise CleanError(f"{raw_dir}: no .csv or .parquet file to read")
    for path in paths:
        table = read_table(path, repairs, unreadable)
        if table.empty and not len(table.columns):
            continue
        missing = [c for c in (params.text_column, params.label_column) if c not in table.columns]
        if missing:
            raise CleanError(
                f"{path.name}: missing column(s) {', '.join(missing)}; it has {', '.join(map(str, table.columns))}. "
                f"Set clean.{dataset}.text_column / label_column to the right names."
            )
        tables.append(table)
    raw = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[params.text_column, params.label_column])
    frame = pd.DataFrame(
        {
            "id": [f"{dataset}-{i:07d}" for i in range(len(raw))],
            "text": raw[params.text_column].astype(str).map(normalise_example),
            "label": raw[params.label_column].astype(str).map(canonical_label),
        }
    )
    quarantined = [pd.DataFrame(unreadable)]
    if params.keep_sources is not None and "source" not in raw.columns:
        raise CleanError(f"clean.{dataset}.keep_sources is set but the data has no `source` column")
    if params.keep_sources is not None:
        outside = ~raw["source"].isin(params.keep_sources).to_numpy()
        quarantined.append(_with_reason(frame[outside], "source not in keep_sources"))
        frame = frame[~outside]
    valid, reasons = split_failures(frame, example_schema(params))
    quarantined.append(_with_reason(frame.loc[reasons.index], reasons))
    valid, conflicts = _drop_conflicting_labels(valid)
    kept, duplicates = _dedupe(valid)
    kept = kept.assign(label=kept["label"].map(params.labels))
    rows_in = len(raw) + len(unreadable)
    return _finish(kept, quarantined + [conflicts, duplicates], rows_in, repairs, ["id", "text", "label"])


def _drop_conflicting_labels(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same text under two labels cannot teach anything: quarantine every copy."""
    label_count = frame.groupby("text")["label"].transform("nunique")
    conflicting = label_count > 1
    return frame[~conflicting], _with_reason(frame[conflicting], "identical text with conflicting labels")

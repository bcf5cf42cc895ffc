"""Raw documents out of the files a corpus ships in, one record at a time, and the shards they
are grouped into.

Formats, by the file name's ending:
  .jsonl .jsonl.gz .jsonl.zst   one JSON object per line, the text in a named field (`text`)
  .parquet                      one row per document, the text in a named column; read a row
                                group at a time
  anything else (.txt, ...)     the whole file is one document (a book, a play)
Every record comes out, readable or not: an unreadable one carries the reason, so cleaning
can quarantine it instead of dropping it. Ids are made here, from the file's path relative to the
corpus folder (`web/part-0.jsonl.gz:17` is its 17th line), so they are unique across the corpus
and stable when files are added.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.errors import UserError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


class CorpusFormatError(UserError, ValueError):
    """A corpus file cannot be read as a whole (a parquet file without the text column)."""


@dataclass(frozen=True)
class RawDocument:
    id: str
    source: str  # the file, relative to the corpus folder
    payload: str | bytes  # bytes for whole files (decoded with repairs later), str for records
    problem: str | None = None  # why the record cannot be used, if it cannot (a stable reason to count by)
    detail: str = ""  # the particulars (the parser's message)


def hash_position(key: str) -> float:
    """Where a key falls in [0, 1): the first 8 bytes of its blake2b hash. Splits and samples
    placed by it depend on the key alone, never on the other documents or the workers."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def corpus_files(raw_dir: Path) -> list[str]:
    """The data files under `raw_dir` (the manifest aside), relative and sorted."""
    raw_dir = Path(raw_dir)
    return sorted(p.relative_to(raw_dir).as_posix() for p in raw_dir.rglob("*")
                  if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))


def plan_shards(raw_dir: Path, files: list[str], shard_bytes: int) -> list[list[str]]:
    """Group the sorted files into shards of about `shard_bytes` each (a bigger file is a shard of
    its own). The plan depends on the files alone, never on the number of workers."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in files:
        current.append(name)
        size += (Path(raw_dir) / name).stat().st_size
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def read_documents(raw_dir: Path, name: str, text_field: str) -> Iterator[RawDocument]:
    """Every document of one file, in file order; `text_field` names the text's JSON field or
    parquet column (clean's `text_field` setting)."""
    path = Path(raw_dir) / name
    if name.endswith(".parquet"):
        yield from _parquet_records(path, name, text_field)
    elif name.endswith(RECORD_SUFFIXES):
        yield from _jsonl_records(path, name, text_field)
    else:
        yield RawDocument(_strip_suffix(name), name, path.read_bytes())


def _strip_suffix(name: str) -> str:
    path = Path(name)
    return path.with_suffix("").as_posix() if path.suffix else name


def _open_lines(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_records(path: Path, name: str, text_field: str) -> Iterator[RawDocument]:
    import orjson

    with _open_lines(path) as lines:
        for number, line in enumerate(lines, start=1):
            doc_id = f"{name}:{number}"
            if not line.strip():
                continue  # a blank line is no record (files often end with one)
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                yield RawDocument(doc_id, name, line.decode("utf-8", "replace"), "not valid JSON", str(err))
                continue
            yield _from_record(record, doc_id, name, text_field, line)


def _from_record(record: object, doc_id: str, name: str, text_field: str, line: bytes) -> RawDocument:
    if not isinstance(record, dict) or text_field not in record:
        shown = line.decode("utf-8", "replace")
        return RawDocument(doc_id, name, shown, f"no text field {text_field!r} (set clean.<dataset>.text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        return RawDocument(doc_id, name, str(text), f"text field {text_field!r} is {type(text).__name__}, not a string")
    return RawDocument(doc_id, name, text)


def _parquet_records(path: Path, name: str, text_field: str) -> Iterator[RawDocument]:
    import pyarrow.parquet as pq

    table_file = pq.ParquetFile(path)
    if text_field not in table_file.schema_arrow.names:
        columns = ", ".join(table_file.schema_arrow.names)
        raise CorpusFormatError(f"{name}: no column {text_field!r} (it has {columns}); set clean.<dataset>.text_field")
    row = 0
    for batch in table_file.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                yield RawDocument(f"{name}:{row}", name, "", "null text")
            else:
                yield RawDocument(f"{name}:{row}", name, str(text))

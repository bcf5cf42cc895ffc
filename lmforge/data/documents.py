"""Raw documents out of the files a corpus ships in, one record at a time, and the shards they
are grouped into.

Formats, by the file name's ending:
  .jsonl .jsonl.gz .jsonl.zst   one JSON object per line, the text in a named field (`text`)
  .parquet                      one row per document, the text in a named column; read a row
                                group at a time
  anything else (.txt, ...)     plain text: the whole file is one document (a book, a play), or,
                                when longer than the cutting target, several (see `cut_lines`)
Every record comes out, readable or not: an unreadable one carries the reason, so cleaning
can quarantine it instead of dropping it. Ids are made here, from the file's path relative to the
corpus folder (`web/part-0.jsonl.gz:17` is its 17th line, `books/input#3` the fourth piece of a cut
`books/input.txt`), so they are unique across the corpus and stable when files are added.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

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


def read_documents(raw_dir: Path, name: str, text_field: str, cutting: Cutting | None = None,
                   counts: Counter | None = None) -> Iterator[RawDocument]:
    """Every document of one file, in file order; `text_field` names the text's JSON field or
    parquet column (clean's `text_field` setting). A plain-text file longer than `cutting`'s
    target is cut into pieces (none is cut without `cutting`); `counts` tallies how."""
    path = Path(raw_dir) / name
    if name.endswith(".parquet"):
        yield from _parquet_records(path, name, text_field)
    elif name.endswith(RECORD_SUFFIXES):
        yield from _jsonl_records(path, name, text_field)
    elif cutting is not None and path.stat().st_size > cutting.target_chars:
        yield from _cut_file(path, name, cutting, Counter() if counts is None else counts)
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


# --- long plain-text files: cut into documents, streamed -------------------------------------

# UTF-8 continuation bytes (0x80-0xBF) start no character: a line's length in characters is its
# length without them (an exact count for UTF-8; a low one for a legacy-encoded line).
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
_BLOCK = 1 << 20
BLANK_LINE, LINE_BREAK, END_OF_FILE = "blank line", "line break", "end of file"


@dataclass(frozen=True)
class Cutting:
    """How a plain-text file longer than `target_chars` becomes documents (see `cut_lines`).

    A line is read up to `line_limit_bytes` and the rest of a longer one skipped, so memory never
    holds more than a piece and a line; the piece keeping the cut line then fails the longest-line
    check. With `body_start` and `body_end` (line patterns), what precedes a start marker within
    the first `header_bytes` of the file, and everything from an end marker on, is not text (a
    licence header and footer, which per-document stripping cannot see once a file is in pieces)."""

    target_chars: int
    line_limit_bytes: int
    body_start: re.Pattern[bytes] | None = None
    body_end: re.Pattern[bytes] | None = None
    header_bytes: int = 64 << 10


@dataclass(frozen=True)
class Piece:
    text: bytes
    chars: int
    end: str  # BLANK_LINE, LINE_BREAK or END_OF_FILE: where it was cut off the rest


def cut_lines(lines: Iterator[bytes], target_chars: int) -> Iterator[Piece]:
    """Pieces of a stream of lines: a piece ends at a blank line once it holds `target_chars`
    characters (a paragraph or section break), or, when no blank line has come by twice that,
    at the line break there (fixed-size chunks for text without blank lines)."""
    piece: list[bytes] = []
    chars = 0
    for line in lines:
        piece.append(line)
        chars += len(line.translate(None, _CONTINUATION_BYTES))
        if chars >= target_chars and not line.strip():
            end = BLANK_LINE
        elif chars >= 2 * target_chars:
            end = LINE_BREAK
        else:
            continue
        yield Piece(b"".join(piece), chars, end)
        piece, chars = [], 0
    if piece:
        yield Piece(b"".join(piece), chars, END_OF_FILE)


def _cut_file(path: Path, name: str, cutting: Cutting, counts: Counter) -> Iterator[RawDocument]:
    """A long plain-text file as documents `<id>#0`, `<id>#1`, ...; a last piece shorter than the
    target joins the one before it (no stub at the end), and a file that comes out as one piece
    keeps the id of an uncut file."""
    stem = _strip_suffix(name)
    cuts: Counter = Counter()
    held: Piece | None = None  # held back one step, so that a short last piece can join it
    with open(path, "rb") as handle:
        lines = _body(_bounded_lines(handle, cutting.line_limit_bytes, counts), cutting, counts)
        for piece in cut_lines(lines, cutting.target_chars):
            if held is not None and piece.end == END_OF_FILE and piece.chars < cutting.target_chars:
                held = Piece(held.text + piece.text, held.chars + piece.chars, END_OF_FILE)
                continue
            if held is not None:
                yield RawDocument(f"{stem}#{sum(cuts.values())}", name, held.text)
                cuts[held.end] += 1
            held = piece
    if not cuts:
        yield RawDocument(stem, name, held.text if held is not None else b"")
        return
    yield RawDocument(f"{stem}#{sum(cuts.values())}", name, held.text)
    counts.update({"files_cut": 1, "documents_from_cut_files": sum(cuts.values()) + 1,
                   "cuts_at_blank_lines": cuts[BLANK_LINE], "cuts_at_line_breaks": cuts[LINE_BREAK]})


def _bounded_lines(handle: BinaryIO, limit: int, counts: Counter) -> Iterator[bytes]:
    """The lines of a binary file, each at most `limit` bytes: of a longer line (a file without
    newlines) the first `limit` bytes come out, the rest is skipped a block at a time."""
    while line := handle.readline(limit):
        if len(line) == limit and not line.endswith(b"\n"):
            counts["long_lines_cut_short"] += 1
            while (block := handle.readline(_BLOCK)) and not block.endswith(b"\n"):
                pass
            line += b"\n"
        yield line


def _body(lines: Iterator[bytes], cutting: Cutting, counts: Counter) -> Iterator[bytes]:
    """The lines between the start and end markers (all of them when there are none); a file
    with either marker counts once in `boilerplate_stripped`."""
    if cutting.body_start is None or cutting.body_end is None:
        yield from lines
        return
    head, found_start = _header(lines, cutting)
    for line in itertools.chain(head, lines):
        if cutting.body_end.match(line):
            counts["boilerplate_stripped"] += 1
            return
        yield line
    counts["boilerplate_stripped"] += found_start


def _header(lines: Iterator[bytes], cutting: Cutting) -> tuple[list[bytes], bool]:
    """Reads up to `header_bytes` of lines looking for the start marker: ([], True) once found
    (what came before it, and the marker, are dropped), else (the lines read, False)."""
    head: list[bytes] = []
    size = 0
    for line in lines:
        if cutting.body_start.match(line):
            return [], True
        head.append(line)
        size += len(line)
        if size >= cutting.header_bytes:
            break
    return head, False

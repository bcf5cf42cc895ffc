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
    spaces go and runs of blank lines shrink to one;
  - labelled examples: all whitespace folds to single spaces; labels like "1.0" read as "1".
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors
from pandera.typing import Series

from lmforge.config import CleanDocuments, CleanLabelled

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


class CleanError(ValueError):
    """The raw data is wholly unusable (no rows, missing columns): the stage fails."""


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


def _split_failures(frame: pd.DataFrame, schema: pa.DataFrameSchema) -> tuple[pd.DataFrame, pd.Series]:
    """Validate lazily; return the passing rows and, per failing row index, its failed checks."""
    try:
        schema.validate(frame, lazy=True)
        return frame, pd.Series(dtype=str)
    except SchemaErrors as err:
        cases = err.failure_cases.dropna(subset=["index"])
        reasons = (cases["column"].astype(str) + ": " + cases["check"].astype(str)).groupby(cases["index"]).agg(
            lambda r: "; ".join(sorted(set(r)))
        )
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
    repairs = Repairs()
    rows, empty = [], []
    for path in sorted(p for p in Path(raw_dir).iterdir() if p.is_file() and p.name != "manifest.json"):
        raw = path.read_bytes()
        row = {"id": path.stem, "source": path.name}
        if not raw or raw.isspace():
            empty.append({**row, "text": "", "reason": "empty file"})
            continue
        row["text"] = normalise_document(decode_bytes(raw, repairs), params, repairs)
        rows.append(row)
    columns = ["id", "source", "text"]
    frame = pd.DataFrame(rows, columns=columns)
    valid, reasons = _split_failures(frame, document_schema(params))
    failed = _with_reason(frame.loc[reasons.index], reasons)
    kept, duplicates = _dedupe(valid)
    rows_in = len(rows) + len(empty)
    return _finish(kept, [pd.DataFrame(empty), failed, duplicates], rows_in, repairs, columns)


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
    valid, reasons = _split_failures(frame, example_schema(params))
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

"""docs/performance.md's summary table quotes only what its records hold.

The table under "## Where each target stands" names, in its record column, the files of
`bench/results/` each row's figures come from. Every figure in the row's "best measured" cell must
be a number of one of those records:

- A figure is every number in the cell, except dates, commit hashes, numbers inside names
  (SmolLM2-135M, GPT-2, FSDP2, H200s) and the labels in LABELS (head counts, GPU counts, the
  corpus a figure was measured on): what a row measured on, not what it measured.
- "9 min 51 s" is one figure, 591 s.
- It matches a record's number (a JSON int or float; numbers inside the records' prose do not
  count) that rounds to it at the figure's precision: 1.58x matches 1.5812, 581,368 matches
  581368.4, 1.1 s matches 1.15.
- Units change only the scale: a % figure may be stored as a fraction (63.1% as 0.6311); a size
  or a figure with a k, M or B suffix in any power of 1000 (28.2 GB as 28223.3 MB, 2.16M as
  2163725, 13.0B as 13.016).
- A ratio (a figure followed by "x") that no record stores may instead be the ratio of two other
  figures quoted in the same cell, each of them checked on its own: "1.58x the Trainer (511
  against 324 samples/s)", "363 MB at 256 MB, 440 MB at 4 GB (1.21x)".
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/performance.md"
RESULTS = ROOT / "bench/results"

# Not figures: dates, commit hashes, names with a number in them, and what a figure was measured on.
IGNORED = [
    r"\d{4}-\d{2}-\d{2}",
    r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b",
    r"\b[A-Za-z][\w.]*-[\w.]+",
]
LABELS = [
    r"\b\d+ heads(?: of \d+)?",
    r"\b\d+ (?:GPUs?|H200s?)\b",
    r"\b(?:at|on) [\d.]+ [MG]B\b",
]
NUMBER = re.compile(
    r"(?P<min>\d+) min (?P<sec>\d+) s\b"
    r"|(?<![\w.,])(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?P<suffix>[kMB]\b)?"
    r"(?P<unit>x|%| ?(?:MB|GB|GiB)\b)?"
)
SUFFIX = {"k": 1e3, "M": 1e6, "B": 1e9}


def summary_rows(text: str) -> list[dict[str, str]]:
    section = text.split("## Where each target stands", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, _, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return [dict(zip(header, row)) for row in rows]


def figures(cell: str) -> list[tuple[str, float, float, str]]:
    """(as quoted, value, tolerance, unit) for every figure of a table cell."""
    cell = cell.replace("**", "")
    for pattern in IGNORED + LABELS:
        cell = re.sub(pattern, " ", cell)
    found = []
    for m in NUMBER.finditer(cell):
        if m["min"]:
            found.append((m[0], int(m["min"]) * 60 + int(m["sec"]), 0.5, "s"))
            continue
        frac = m["frac"] or ""
        scale = SUFFIX.get(m["suffix"] or "", 1.0)
        value = float(m["int"].replace(",", "") + "." + (frac or "0"))
        unit = (m["unit"] or "").strip() or (m["suffix"] or "")
        found.append((m[0].strip(), value * scale, 0.5 * 10 ** -len(frac) * scale, unit))
    return found


def numbers(record) -> list[float]:
    """Every number of a JSON record, at any depth; numbers inside strings are not counted."""
    if isinstance(record, dict):
        return [n for v in record.values() for n in numbers(v)]
    if isinstance(record, list):
        return [n for v in record for n in numbers(v)]
    if isinstance(record, (int, float)) and not isinstance(record, bool):
        return [float(record)]
    return []


def scales(unit: str) -> list[float]:
    if unit == "%":
        return [1.0, 100.0]
    if unit in ("MB", "GB", "GiB", "k", "M", "B"):
        return [1000.0**k for k in range(-3, 4)]
    return [1.0]


def quoted_in(figure, recorded: list[float], cell: list = ()) -> bool:
    """Whether a figure is one of a record's numbers, or the ratio of two other figures of its cell."""
    _, value, tolerance, unit = figure
    tolerance += 1e-9 * max(1.0, abs(value))
    if any(abs(v * s - value) <= tolerance for v in recorded for s in scales(unit)):
        return True
    others = [other for other in cell if other is not figure]
    return unit == "x" and any(
        abs(a / b - value) <= tolerance + ta / b + a * tb / b**2
        for (_, a, ta, _) in others
        for (_, b, tb, _) in others
        if b
    )


def test_the_rule_on_examples():
    def match(quote, recorded):
        figure, *others = figures(quote)
        return quoted_in(figure, recorded, others)

    assert match("1.58x", [1.5812]) and match("1.58x the Trainer (511 against 324 samples/s)", [])
    assert not match("1.61x (511 against 324 samples/s)", []) and not match("1.58x", [511.4, 323.6])
    assert match("581,368 tokens/s", [581368.4]) and not match("578,428 tokens/s", [581368])
    assert match("28.2 GB", [28223.3]) and match("28.2 GB", [28_214_000_000]) and not match("28.8 GB", [28223.3])
    assert match("63.1% MFU", [0.6311]) and match("2.16M tokens/s", [2163725]) and match("1.1 s", [1.15])
    assert match("9 min 51 s", [590.6]) and not match("9 min 51 s", [592])
    assert [f[0] for f in figures("GPT-2's 12 heads of 64 on 2 H200s at 256 MB (80d8f97, 2026-12-01)")] == []


ROWS = summary_rows(DOC.read_text())


def test_the_summary_table_covers_every_target():
    assert [row["target"] for row in ROWS] == [*(f"G{i}" for i in range(1, 8)), "C1", "C2", "C3", "D1", "D2", "D3", "B1", "P1", "S1"]


@pytest.mark.parametrize("row", ROWS, ids=[row["target"] for row in ROWS])
def test_each_figure_is_in_a_record_its_row_names(row):
    names = re.findall(r"`([^`]+\.json)`", row["record (`bench/results/`)"])
    assert names, f"{row['target']} names no record"
    missing = [name for name in names if not (RESULTS / name).is_file()]
    assert not missing, f"{row['target']} names records that do not exist: {missing}"
    recorded = [n for name in names for n in numbers(json.loads((RESULTS / name).read_text()))]
    quoted = figures(row["best measured"])
    assert quoted, f"{row['target']} quotes no figure"
    absent = [figure[0] for figure in quoted if not quoted_in(figure, recorded, quoted)]
    assert not absent, f"{row['target']}: {absent} not in {names}"

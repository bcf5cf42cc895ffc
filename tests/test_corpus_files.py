"""A corpus of one big plain-text file, or of many small ones, with the default params: clean cuts
long files into documents (at blank lines, else at line breaks), reports how, and split (hash
mode) fills train, val and test. The stages run for real (python -m tasks.<stage> in a DVC project
in a temp dir); the cutter's own rules are checked on small inputs beside them."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from lmforge.config.clean import CleanDocuments
from lmforge.data.cleaning import clean_documents, normalise_document, Repairs
from lmforge.data.documents import BLANK_LINE, END_OF_FILE, LINE_BREAK, cut_lines
from tests.conftest import ROOT, run, sha256, write_params

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())["clean"]["corpus"]
WORDS = ("the quality of mercy is not strained it droppeth as gentle rain from heaven upon the place "
         "beneath twice blest it blesseth him that gives and him that takes").split()


def expected_target(corpus_bytes: int) -> int:
    """The cutting target the defaults give a corpus of this size (lmforge/data/cleaning.py: cutting_for)."""
    return max(2 * DEFAULTS["min_chars"], min(DEFAULTS["chunk_chars"], corpus_bytes // DEFAULTS["min_documents"]))


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(n)]


def sectioned_text(n_bytes: int, seed: int = 0) -> str:
    """Numbered paragraphs of 2-8 lines separated by blank lines (no two alike), about n_bytes long."""
    rng = np.random.default_rng(seed)
    paragraphs, size = [], 0
    while size < n_bytes:
        paragraph = f"{len(paragraphs)} " + "\n".join(sentences(rng, int(rng.integers(2, 9))))
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


def stages(repo: Path, sources: dict, uri: str, pin: str, *names: str) -> dict:
    """Ingest, clean and split the corpus `uri` with params.yaml's clean and split settings for it;
    returns the clean and split reports."""
    write_params(repo, sources, **{"sources.corpus": {"uri": uri, "sha256": pin},
                                   "clean.corpus.min_chars": DEFAULTS["min_chars"]})
    for stage in ("ingest", "clean", "split"):
        run(["python", "-m", f"tasks.{stage}", "corpus"], repo)
    return {stage: json.loads((repo / f"reports/{stage}/corpus.json").read_text()) for stage in ("clean", "split")}


def kept(repo: Path) -> pd.DataFrame:
    frame = pd.read_parquet(repo / "data/clean/corpus/kept")
    return frame.assign(piece=frame["id"].str.rsplit("#", n=1).str[1].astype(int)).sort_values("piece")


def assert_split_fills_every_part(repo: Path, report: dict, n_documents: int) -> None:
    placed = {s: pd.read_parquet(repo / "data/split/corpus" / s) for s in ("train", "val", "test")}
    assert all(len(frame) > 0 for frame in placed.values()), {s: len(f) for s, f in placed.items()}
    assert sum(len(f) for f in placed.values()) == n_documents == sum(report[s]["rows"] for s in placed)


def test_a_4_mb_file_is_cut_at_its_blank_lines_and_splits(dvc_repo, sources, tmp_path):
    text = sectioned_text(4_000_000)
    book = tmp_path / "input.txt"
    book.write_text(text)
    reports = stages(dvc_repo, sources, str(book), sha256(book))
    clean, cutting = reports["clean"], reports["clean"]["cutting"]
    assert clean["rows_in"] == clean["rows_kept"] + clean["rows_quarantined"] == clean["rows_kept"]
    assert cutting["target_chars"] == DEFAULTS["chunk_chars"] == 20_000  # 4 MB / 200 documents is 20,000 too
    assert cutting["files_cut"] == 1 and cutting["documents_from_cut_files"] == clean["rows_in"]
    assert cutting["cuts_at_blank_lines"] == clean["rows_in"] - 1 and cutting["cuts_at_line_breaks"] == 0
    assert 180 <= clean["rows_in"] <= 200
    documents = kept(dvc_repo)
    assert documents["id"].tolist() == [f"input#{i}" for i in range(len(documents))]
    lengths = documents["text"].str.len()
    assert lengths.iloc[:-1].between(20_000 - 2, 40_000).all()  # the blank line the piece ends at is stripped
    # Nothing is lost or reordered: the pieces, joined at the blank lines they were cut at, are the file.
    assert "\n\n".join(documents["text"]) == text.strip()
    assert_split_fills_every_part(dvc_repo, reports["split"], len(documents))


def test_a_10_kb_file_makes_enough_documents_for_a_hash_split(dvc_repo, sources, tmp_path):
    book = tmp_path / "notes.txt"
    book.write_text(sectioned_text(10_000, seed=3))
    reports = stages(dvc_repo, sources, str(book), sha256(book))
    clean, cutting = reports["clean"], reports["clean"]["cutting"]
    # 10 kB / 200 documents = 50 chars a piece (never under twice min_chars): about 90 documents,
    # enough that val and test (10% each, placed by hash) are both very unlikely to be empty.
    assert cutting["target_chars"] == expected_target(book.stat().st_size) == 50
    assert clean["rows_quarantined"] == 0 and clean["rows_kept"] == cutting["documents_from_cut_files"] >= 60
    assert cutting["cuts_at_blank_lines"] + cutting["cuts_at_line_breaks"] == clean["rows_in"] - 1
    assert_split_fills_every_part(dvc_repo, reports["split"], clean["rows_kept"])


def test_a_file_without_blank_lines_is_cut_at_line_breaks_and_a_huge_line_is_quarantined(dvc_repo, sources, tmp_path):
    rng = np.random.default_rng(5)
    lines = [f"{i} {s}" for i, s in enumerate(sentences(rng, 8_000))]
    huge = "x" * 100_000  # one line past max_line_chars (20,000): a broken stretch, no newline in 100 kB
    book = tmp_path / "log.txt"
    book.write_text("\n".join(lines[:4_000] + [huge] + lines[4_000:]) + "\n")
    reports = stages(dvc_repo, sources, str(book), sha256(book))
    clean, cutting = reports["clean"], reports["clean"]["cutting"]
    target = cutting["target_chars"]
    assert target == expected_target(book.stat().st_size) == book.stat().st_size // 200
    assert cutting["cuts_at_blank_lines"] == 0 and cutting["cuts_at_line_breaks"] == clean["rows_in"] - 1 > 0
    assert cutting["long_lines_cut_short"] == 1
    assert clean["rows_in"] == clean["rows_kept"] + 1
    assert list(clean["quarantine_by_reason"]) == ["text: no line over 20000 chars"]
    broken = pd.read_parquet(dvc_repo / "data/clean/corpus/quarantine")["text"].iloc[0]
    assert len(broken) < 2 * target + 4 * 20_001  # of the huge line, only 4 bytes a character past the limit were read
    documents = kept(dvc_repo)
    assert documents["text"].str.len().iloc[:-1].between(2 * target - 1, 2 * target + 100).all()
    # Every line is kept, whole and in order, but the huge one and those in its piece.
    kept_lines = "\n".join(documents["text"]).split("\n")
    beside_huge = [line for line in broken.split("\n") if not line.startswith("xxx")]
    assert kept_lines == [line for line in lines if line not in set(beside_huge)]
    assert_split_fills_every_part(dvc_repo, reports["split"], clean["rows_kept"])


def test_a_folder_of_2000_small_files_is_kept_whole(dvc_repo, sources, tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    rng = np.random.default_rng(9)
    for i in range(2_000):
        size = int(rng.integers(1_000, 3_000))
        (folder / f"page-{i:04d}.txt").write_text(sectioned_text(size, seed=100 + i)[:size])
    pin = subprocess.run("sha256sum *.txt | LC_ALL=C sort -k2 | sha256sum", shell=True, cwd=folder,
                         capture_output=True, text=True, check=True).stdout.split()[0]
    reports = stages(dvc_repo, sources, f"{folder}/*.txt", pin)
    clean, cutting = reports["clean"], reports["clean"]["cutting"]
    # ~4 MB / 200 documents is near chunk_chars, far above the longest page: no page is cut;
    # none is quarantined with the defaults (min_chars 20: 1,000 lost the shortest pages).
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert cutting["target_chars"] == expected_target(total) > 3_000 and cutting["files_cut"] == 0
    assert clean["rows_in"] == clean["rows_kept"] == 2_000
    assert sorted(pd.read_parquet(dvc_repo / "data/clean/corpus/kept")["id"]) == [f"page-{i:04d}" for i in range(2_000)]
    assert_split_fills_every_part(dvc_repo, reports["split"], 2_000)


# --- the cutter's rules ------------------------------------------------------------------------


def test_pieces_end_at_blank_lines_else_at_twice_the_target_and_stream():
    lines = [b"aaaa\n", b"bbbb\n", b"\n", b"cccc\n", b"dddd\n", b"eeee\n", b"ffff\n", b"gggg\n", b"\n", b"hh\n"]
    pieces = list(cut_lines(iter(lines), target_chars=8))
    assert [p.text for p in pieces] == [b"aaaa\nbbbb\n\n", b"cccc\ndddd\neeee\nffff\n", b"gggg\n\nhh\n"]
    assert [p.end for p in pieces] == [BLANK_LINE, LINE_BREAK, END_OF_FILE]
    assert [p.chars for p in pieces] == [11, 20, 9]
    # Characters, not bytes: four two-byte letters and a newline are five.
    assert next(cut_lines(iter(["\u00e9\u00e9\u00e9\u00e9\n".encode()]), 100)).chars == 5
    # It streams: pieces come out of an endless input.
    endless = itertools.cycle([b"a line of text\n", b"\n"])
    assert len(list(itertools.islice(cut_lines(endless, 1_000), 3))) == 3


def test_a_short_tail_joins_the_piece_before_and_boilerplate_goes_across_pieces(tmp_path):
    body = sectioned_text(30_000, seed=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    header = "The Project Gutenberg EBook of Test\n" + "Small print.\n" * 400  # 5 kB before the start marker
    (raw / "book.txt").write_text(header + "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n" + body
                                  + "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\n" + "Licence.\n" * 3_000)
    params = CleanDocuments(min_chars=20, chunk_chars=1_000, min_documents=1)
    result = clean_documents(raw, params)
    texts = result.kept["text"].tolist()
    assert "\n\n".join(texts) == normalise_document(body, params, Repairs())
    assert not any("Gutenberg" in t or "Small print" in t or "Licence" in t for t in texts)
    assert result.report["repairs"]["boilerplate_stripped"] == 1
    assert all(len(t) >= 1_000 - 2 for t in texts)  # the last piece too: a short tail joined the one before
    cutting = result.report["cutting"]
    assert cutting["target_chars"] == 1_000 and cutting["documents_from_cut_files"] == len(texts) > 20
    assert result.kept["id"].tolist() == [f"book#{i}" for i in range(len(texts))]


def test_a_file_that_comes_out_as_one_piece_keeps_its_uncut_id(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "short.txt").write_text("A line of some length.\n" * 60)  # 1,380 bytes, no blank line
    result = clean_documents(raw, CleanDocuments(min_chars=20, chunk_chars=1_000, min_documents=1))
    assert result.kept["id"].tolist() == ["short"] and result.report["cutting"]["files_cut"] == 0


def test_cutting_knobs_are_validated():
    with pytest.raises(ValidationError, match="at least twice min_chars"):
        CleanDocuments(min_chars=100, chunk_chars=150)
    with pytest.raises(ValidationError, match="too large for max_chars"):
        CleanDocuments(chunk_chars=1_000_000, max_chars=2_000_000)
    with pytest.raises(ValidationError, match="min_documents"):
        CleanDocuments(min_documents=0)
    assert CleanDocuments(chunk_chars=None, max_chars=100).chunk_chars is None
    assert DEFAULTS["chunk_chars"] == 20_000 and CleanDocuments().chunk_chars is None  # a config without the key: as before

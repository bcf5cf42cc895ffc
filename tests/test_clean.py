from pathlib import Path

import pandas as pd
import pytest

from lmforge.data.cleaning import CleanError, clean_documents, clean_examples, normalise_example, strip_gutenberg
from lmforge.config.clean import CleanDocuments, CleanLabelled
from tests.conftest import play

# Whole-file rules: no file is cut into pieces here (tests/test_corpus_files.py cuts them).
DOCS = CleanDocuments(min_chars=50, max_chars=100_000, max_line_chars=500, chunk_chars=None)
LABELLED = CleanLabelled(labels={"0": "negative", "1": "positive"}, min_chars=10, max_chars=5_000)


def raw_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, data in files.items():
        (raw / name).write_bytes(data)
    (raw / "manifest.json").write_text("{}")
    return raw


def test_every_bad_document_is_repaired_or_quarantined(tmp_path):
    good = play("Alpha")
    files = {
        "good.txt": good.encode(),
        "copy.txt": good.encode(),  # exact duplicate
        "empty.txt": b"  \n",
        "tiny.txt": b"Too short.",
        "oneline.txt": ("x" * 2_000).encode(),  # an enormous line: a broken file
        "nul.txt": play("Nul").encode().replace(b"mercy", b"mer\x00cy"),
        "cp1252.txt": play("Legacy").encode() + "\nOthello\u2019s caf\u00e9\n".encode("cp1252"),
        "mixed.txt": play("Mixed").encode() + "\ncaf\u00e9 ".encode("utf-8") + "\nna\u00efve\n".encode("latin-1"),
        "bom.txt": b"\xef\xbb\xbf" + play("Bom").encode(),
        "gutenberg.txt": (
            "The Project Gutenberg EBook\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
            + play("Guten")
            + "\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence text that must go.\n"
        ).encode(),
    }
    result = clean_documents(raw_folder(tmp_path, files), DOCS)
    report = result.report
    assert report["rows_in"] == len(files) == report["rows_kept"] + report["rows_quarantined"]
    reasons = dict(zip(result.quarantine["id"], result.quarantine["reason"]))
    assert reasons["empty"] == "empty file"
    assert "length between" in reasons["tiny"]
    assert "no line over 500 chars" in reasons["oneline"]
    assert reasons["good"] == "exact duplicate" or reasons["copy"] == "exact duplicate"
    kept = result.kept.set_index("id")["text"]
    assert "mercy" in kept["nul"] and "\x00" not in kept["nul"]
    assert "Othello\u2019s caf\u00e9" in kept["cp1252"]
    assert "caf\u00e9" in kept["mixed"] and "na\u00efve" in kept["mixed"]
    assert not kept["bom"].startswith("\ufeff")
    assert "Gutenberg" not in kept["gutenberg"] and "Licence" not in kept["gutenberg"]
    assert report["repairs"]["nul_bytes_removed"] == files["nul.txt"].count(b"\x00") > 0
    assert report["repairs"]["lines_redecoded_cp1252"] == 2
    assert report["repairs"]["boilerplate_stripped"] == 1


def test_old_gutenberg_notice_blocks_are_stripped():
    text, changed = strip_gutenberg("Act 1\n<<THIS ELECTRONIC VERSION IS COPYRIGHT\nblah>>\nHAMLET.\nTo be.")
    assert changed and "ELECTRONIC" not in text and "To be." in text


def test_example_normalisation_rules():
    assert normalise_example("Great<br /><br />film &amp; <i>cast</i>\r\n\tok") == "Great film & cast ok"
    assert normalise_example("cafe\u0301\u00a0time") == "caf\u00e9 time"  # NFC and odd spaces


def write_csv(tmp_path: Path, body: bytes, name: str = "reviews.csv") -> Path:
    return raw_folder(tmp_path, {name: body})


def test_every_bad_example_is_repaired_or_quarantined(tmp_path):
    rows = [
        b"text,label,source",
        b'"A superb and moving film.",1,imdb',
        b'"A superb and moving film.",1,imdb',  # duplicate
        b'"Same words, two labels here.",1,imdb',
        b'"Same words, two labels here.",0,imdb',  # conflicting labels
        b'"Dreadful, a waste of an evening.",1.0,imdb',  # "1.0" reads as "1"
        b'"A film with a label nobody declared.",7,imdb',
        b'"short",0,imdb',
        b'"Caf\xe9 scenes were charming indeed.",1,imdb',  # a cp1252 line in a UTF-8 file
        b'"Tedious and far too long.",0,imdb',
        b'"Nul\x00 bytes inside this review.",0,imdb',
        b'"broken",0,imdb,extra,fields',  # malformed line
    ]
    result = clean_examples(write_csv(tmp_path, b"\n".join(rows) + b"\n"), LABELLED, "task")
    report = result.report
    assert report["rows_in"] == 11 == report["rows_kept"] + report["rows_quarantined"]
    reasons = result.quarantine["reason"].tolist()
    assert reasons.count("identical text with conflicting labels") == 2
    assert reasons.count("exact duplicate") == 1
    assert reasons.count("malformed CSV line") == 1
    assert any("label in declared set" in r for r in reasons)
    assert any("length between" in r for r in reasons)
    kept = result.kept.set_index("text")["label"]
    assert kept["Dreadful, a waste of an evening."] == "positive"
    assert kept["Caf\u00e9 scenes were charming indeed."] == "positive"
    assert kept["Nul bytes inside this review."] == "negative"
    assert set(result.kept.columns) == {"id", "text", "label"}


def test_keep_sources_quarantines_other_sources(tmp_path):
    body = b'text,label,source\n"A fine film indeed.",1,imdb\n"A fine short review.",0,rt\n'
    params = LABELLED.model_copy(update={"keep_sources": ["imdb"]})
    result = clean_examples(write_csv(tmp_path, body), params, "task")
    assert result.kept["text"].tolist() == ["A fine film indeed."]
    assert result.quarantine["reason"].tolist() == ["source not in keep_sources"]


def test_missing_column_fails_the_stage_with_names(tmp_path):
    with pytest.raises(CleanError, match=r"missing column\(s\) label; it has text, stars"):
        clean_examples(write_csv(tmp_path, b'text,stars\n"Nice film overall.",5\n'), LABELLED, "task")


def test_an_empty_file_is_quarantined_not_fatal(tmp_path):
    raw = raw_folder(tmp_path, {"a.csv": b'text,label\n"A fine film indeed.",1\n', "b.csv": b""})
    result = clean_examples(raw, LABELLED, "task")
    assert result.report["rows_kept"] == 1 and result.quarantine["reason"].tolist() == ["empty file"]


def test_a_three_class_dataset_needs_no_code(tmp_path):
    body = b'text,label\n"Loved every minute.",pos\n"It was fine I guess.",neu\n"Hated every minute.",neg\n'
    params = CleanLabelled(labels={"pos": "positive", "neu": "neutral", "neg": "negative"}, min_chars=5)
    result = clean_examples(write_csv(tmp_path, body), params, "task")
    assert sorted(result.kept["label"]) == ["negative", "neutral", "positive"]


def test_clean_stage_writes_parquets_and_reconciled_metrics(dvc_repo):
    from tests.conftest import run
    import json

    run(["python", "-m", "tasks.ingest", "task"], dvc_repo)
    result = run(["python", "-m", "tasks.clean", "task"], dvc_repo)
    assert "rows in =" in result.stdout
    report = json.loads((dvc_repo / "reports/clean/task.json").read_text())
    kept = pd.read_parquet(dvc_repo / "data/clean/task/kept")
    quarantine = pd.read_parquet(dvc_repo / "data/clean/task/quarantine")
    assert report["rows_in"] == len(kept) + len(quarantine) == 120
    assert "<br" not in " ".join(kept["text"])

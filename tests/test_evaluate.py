"""The evaluate stage, and pretrain -> evaluate end to end through the stage modules and MLflow."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import pretrain_fixtures as fx  # noqa: E402

from lmforge.training import batches
from lmforge.evaluation import language_model as evaluation
from lmforge.training import pretraining  # noqa: E402

torch.set_num_threads(1)


def test_bits_per_byte_and_the_unigram_baseline():
    # 4 tokens of 2 bytes each at ln 2 nats per token: 1 bit per token, half a bit per byte.
    assert evaluation.bits_per_byte(math.log(2), tokens=4, n_bytes=8) == pytest.approx(0.5)
    train = np.array([0, 0, 0, 1], dtype=np.uint16)
    log_probs = evaluation.unigram_log_probs(train, vocab_size=3)
    # add-one smoothing: counts 3, 1, 0 -> (4, 2, 1) / 7
    assert np.allclose(np.exp(log_probs), [4 / 7, 2 / 7, 1 / 7])
    assert evaluation.unigram_loss(log_probs, np.array([0, 1])) == pytest.approx(-(math.log(4 / 7) + math.log(2 / 7)) / 2)


def test_sequential_windows_cover_every_target_once():
    tokens = np.arange(100, dtype=np.uint16)
    windows = list(batches.sequential_windows(tokens, context=8, batch_size=4))
    targets = np.concatenate([w[:, 1:].ravel() for w in windows])
    assert len(set(targets.tolist())) == len(targets)  # no target twice
    assert targets.min() == 1 and len(targets) == 96  # the tail shorter than a window is left out
    assert list(batches.sequential_windows(tokens, context=8, batch_size=4, max_tokens=16))[0].shape == (2, 9)


@pytest.mark.parametrize("masked", [False, True])
def test_the_progress_total_is_the_number_of_batches_scored(masked):
    for n_tokens in (0, 8, 9, 10, 100, 257):
        for max_tokens in (None, 16, 1000):
            windows = list(batches.sequential_windows(np.zeros(n_tokens, dtype=np.uint16), context=8, batch_size=3,
                                                      max_tokens=max_tokens, masked=masked))
            assert evaluation.window_batches(n_tokens, 8, 3, max_tokens, masked=masked) == len(windows), \
                (n_tokens, max_tokens)


def test_scoring_a_split_shows_a_progress_bar_on_stderr(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    tokens = np.random.default_rng(0).integers(0, 40, size=200).astype(np.uint16)
    log_probs = evaluation.unigram_log_probs(tokens, 40)
    score = lambda **kw: evaluation.causal_split_metrics(  # noqa: E731
        model, tokens, log_probs, 200, context=8, batch_size=4, device=torch.device("cpu"), **kw)
    quiet = score(progress=False)
    assert capsys.readouterr().err == ""
    shown = score(desc="evaluate val")
    err = capsys.readouterr().err
    total = evaluation.window_batches(200, 8, 4)
    assert total == 6 and "evaluate val" in err and f"{total}/{total}" in err, err
    assert shown["loss"] == quiet["loss"]  # the bar only watches


def test_pretrain_then_evaluate_through_the_stages_with_mlflow(tmp_path, monkeypatch):
    import mlflow

    from tasks import evaluate as evaluate_stage
    from tasks import pretrain as pretrain_stage

    root = fx.project(tmp_path / "proj", {"max_steps": 100, "eval_steps": 50, "save_steps": 50},
                      {"prompts": ["KING:"], "samples": 2})
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    assert pretrain_stage.main([]) == 0
    assert evaluate_stage.main([]) == 0

    pre = json.loads((root / "reports/pretrain/metrics.json").read_text())
    assert pre["steps"] == 100 and pre["tokens_per_s"] > 0 and pre["resumed_from"] == 0
    assert (root / "reports/pretrain/loss.png").stat().st_size > 1000
    rows = list(csv.DictReader((root / "reports/pretrain/loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [50, 100]
    assert (root / "models/pretrained/tokenizer.json").exists()

    ev = json.loads((root / "reports/evaluate/metrics.json").read_text())
    for split in ("val", "test"):
        m = ev[split]
        assert m["bits_per_byte"] < 0.7 * m["unigram_bits_per_byte"], m
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    samples = (root / "reports/evaluate/samples.md").read_text()
    assert samples.count("**prompt:** `KING:`") == 2
    bench = json.loads((root / "reports/evaluate/benchmarks.json").read_text())
    assert bench == {"tasks": {}, "skipped": "evaluate.benchmarks is empty"}  # written even then: DVC expects it
    positions = list(csv.DictReader((root / "reports/evaluate/loss_by_position.csv").open()))
    assert len(positions) == 32 and set(positions[0]) == {"position", "val_loss", "test_loss"}
    # Later positions see more context: they predict better than the first.
    assert float(positions[-1]["val_loss"]) < float(positions[0]["val_loss"])

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["lmforge"], output_format="list")}
    assert set(runs) == {"pretrain", "evaluate"}
    train_run = runs["pretrain"]
    assert train_run.data.params["pretrain.n_layer"] == "2"
    assert {"git_commit", "git_dirty", "torch", "device", "stage"} <= set(train_run.data.tags)
    history = mlflow.MlflowClient().get_metric_history(train_run.info.run_id, "train_loss")
    assert len(history) == 10 and history[-1].step == 100
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(train_run.info.run_id)}
    assert {"model", "reports"} <= artifacts
    assert runs["evaluate"].data.metrics["val_bits_per_byte"] == pytest.approx(ev["val"]["bits_per_byte"])


def test_evaluate_a_masked_model_reports_accuracy_and_fills_masks(tmp_path, monkeypatch):
    from tasks import evaluate as evaluate_stage

    root = fx.project(tmp_path / "proj", {"arch": "bert", "max_steps": 30, "warmup_steps": 3, "eval_steps": 30,
                                          "save_steps": 30}, {"samples": 2, "max_tokens": 2000})
    tokens = root / "data" / "tokens"
    params = fx.params({"arch": "bert", "max_steps": 30, "warmup_steps": 3, "eval_steps": 30, "save_steps": 30})
    result = pretraining.train(params.pretrain, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "ckpt",
                            progress=False)
    pretraining.save_model(result.model, tokens, root / "models" / "pretrained", {"context": 32})
    monkeypatch.chdir(root)
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    assert evaluate_stage.main([]) == 0
    ev = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert ev["masked"] is True
    assert 0.0 <= ev["val"]["masked_accuracy"] <= 1.0 and "unigram_masked_accuracy" in ev["test"]
    assert ev["val"]["masked_tokens"] > 100
    assert (root / "reports/evaluate/samples.md").read_text().count("**filled**") == 2


def test_a_model_offloaded_to_disk_scores_as_the_whole_model(tmp_path, monkeypatch):
    # device_map auto with a CPU cap below the model's size: accelerate keeps what fits in CPU
    # memory and reads the rest back from disk at every forward. The scores must not change.
    import yaml

    from tasks import evaluate as evaluate_stage

    pretrain = {"max_steps": 40, "warmup_steps": 4, "eval_steps": 40, "save_steps": 40}
    root = fx.project(tmp_path / "proj", pretrain)
    tokens = root / "data" / "tokens"
    result = pretraining.train(fx.params(pretrain).pretrain, seed=1, tokens_dir=tokens,
                               checkpoint_root=tmp_path / "ckpt", progress=False)
    pretraining.save_model(result.model, tokens, root / "models" / "pretrained", {"context": 32})
    # Each of the tiny llama's two blocks holds ~200 kB of fp32 weights: 300 kB of CPU memory takes
    # the embeddings (and the tied head) but no block.
    placements = {"whole": {}, "offloaded": {"device_map": "auto", "max_memory": {"cpu": "300KB"}}}
    for name, evaluate in placements.items():
        raw = fx.raw_params(pretrain, evaluate)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    for name in placements:
        assert evaluate_stage.main(["--params", f"{name}.yaml", "--reports", f"reports/{name}"]) == 0
    whole, offloaded = (json.loads((root / f"reports/{name}/metrics.json").read_text()) for name in placements)

    assert whole["placement"] == "whole"
    placement = offloaded["placement"]  # blocks per device: the embeddings in CPU memory, the blocks on disk
    assert isinstance(placement, dict) and set(placement) == {"cpu", "disk"}, placement
    assert offloaded["device"] == "cpu"
    for split in ("val", "test"):
        # Trained weights, so a block read back wrong (or initialised afresh) would show.
        assert whole[split]["loss"] < 0.8 * whole[split]["unigram_loss"], whole[split]
        assert offloaded[split]["tokens"] == whole[split]["tokens"]
        assert offloaded[split]["loss"] == pytest.approx(whole[split]["loss"], rel=1e-4), split
    # Sampling went through the offloaded model too, from the same seed.
    assert (root / "reports/offloaded/samples.md").read_text() == (root / "reports/whole/samples.md").read_text()


def test_evaluate_without_a_model_says_so(tmp_path, monkeypatch):
    from tasks import evaluate as evaluate_stage

    root = fx.project(tmp_path / "proj")
    monkeypatch.chdir(root)
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    with pytest.raises(batches.DataError, match="run the pretrain stage first"):
        evaluate_stage.main([])


def test_tracking_helpers_flatten_params_and_read_input_hashes(tmp_path, monkeypatch, capsys):
    from lmforge.registry import tracking
    from tasks.lineage import input_hashes

    assert tracking.as_params({"pretrain": {"learning_rate": 0.1, "prompts": ["a"]}, "seed": 1}) == {
        "pretrain.learning_rate": "0.1", "pretrain.prompts": "['a']", "seed": "1"}
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  tokenize:\n    outs:\n    - path: data/tokens\n      md5: abc.dir\n")
    assert input_hashes(["data/tokens", "models/pretrained"], tmp_path) == {"input.data/tokens": "abc.dir"}
    (tmp_path / "dvc.lock").write_text("stages:\n  tokenize: [unclosed\n")
    assert input_hashes(["data/tokens"], tmp_path) == {}
    assert "dvc.lock does not parse, so this run records no input hashes" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"

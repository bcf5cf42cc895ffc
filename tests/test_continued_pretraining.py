"""Continued pretraining from a base model, through `dvc repro evaluate` in a real DVC project: the
corpus is encoded with the base model's own tokenizer, pretrain continues from its weights, and
evaluate scores the base and the continued model on the same tokens, side by side."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.conftest import run, write_params
from tests.tiny_models import lm_folder


@pytest.mark.slow
def test_init_from_a_base_model_continues_it_and_evaluate_compares_the_two(dvc_repo, sources):
    base = str(lm_folder())
    write_params(dvc_repo, sources, **{
        "tokenize.kind": "pretrained", "tokenize.model": base, "pretrain.init_from": base,
        "pretrain.context": 32, "pretrain.batch_size": 8, "pretrain.max_steps": 30, "pretrain.warmup_steps": 3,
        "pretrain.eval_steps": 10, "pretrain.eval_batches": 2, "pretrain.save_steps": 100,
        "pretrain.learning_rate": 0.003, "pretrain.device": "cpu",
        "evaluate.max_tokens": 4096, "evaluate.samples": 1, "evaluate.sample_tokens": 8, "evaluate.device": "cpu",
        "evaluate.benchmarks": []})
    done = run(["dvc", "repro", "evaluate"], dvc_repo)

    meta = json.loads((dvc_repo / "data/tokens/meta.json").read_text())
    assert (meta["kind"], meta["tokenizer_from"]) == ("pretrained", base)
    assert meta["vocab_size"] == len(AutoTokenizer.from_pretrained(base))  # no tokenizer was learned
    info = json.loads((dvc_repo / "models/pretrained/lmforge.json").read_text())
    assert info["base_model"]["folder"] == str(lm_folder().resolve())
    assert AutoTokenizer.from_pretrained(dvc_repo / "models/pretrained").get_vocab() == \
        AutoTokenizer.from_pretrained(base).get_vocab()

    metrics = json.loads((dvc_repo / "reports/evaluate/metrics.json").read_text())
    for split in ("val", "test"):
        base_loss, continued = metrics["base"][split]["loss"], metrics[split]["loss"]
        assert metrics["base"][split]["tokens"] == metrics[split]["tokens"]  # the same tokens scored
        assert continued < base_loss  # the untrained base learns the plays' text
        assert metrics["vs_base"][split]["loss_drop"] == pytest.approx(base_loss - continued)
    assert "base model loss" in done.stdout + done.stderr

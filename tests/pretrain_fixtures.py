"""Helpers for tests/test_pretrain.py and tests/test_evaluate.py: a small structured corpus,
its data/tokens folder, and params built from the repository's params.yaml."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

_SUBJECTS = ["the king", "a fool", "my lord", "the queen", "good sir", "the duke", "fair lady"]
_VERBS = ["loves", "hates", "follows", "calls", "serves", "fears", "greets"]
_OBJECTS = ["the crown", "his horse", "her ring", "the sea", "my sword", "this land", "thy name"]


def corpus(n_docs: int, seed: int) -> list[str]:
    """Documents of lines with a fixed grammar: a model learns them fast, a unigram cannot."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = [f"{rng.choice(['KING', 'FOOL', 'LORD'])}:"]
        for _ in range(rng.randint(8, 14)):
            lines.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.")
        docs.append("\n".join(lines) + "\n")
    return docs


def make_tokens(out_dir: Path, kind: str = "char", vocab_size: int = 300, n_docs: int = 240) -> dict:
    from lmforge.data.tokenization import write_tokens

    splits = {"train": corpus(n_docs, 1), "val": corpus(max(4, n_docs // 8), 2), "test": corpus(max(4, n_docs // 8), 3)}
    return write_tokens(splits, out_dir, kind, vocab_size, min_frequency=2)


TINY = {
    "arch": "llama", "n_layer": 2, "n_head": 4, "d_model": 64, "context": 32, "max_steps": 120, "batch_size": 16,
    "learning_rate": 0.01, "warmup_steps": 10, "eval_steps": 40, "eval_batches": 4, "save_steps": 40,
    "logging_steps": 10, "device": "cpu",
}


def raw_params(pretrain: dict | None = None, evaluate: dict | None = None) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["pretrain"] = {**raw.get("pretrain", {}), **TINY, **(pretrain or {})}
    if raw["pretrain"].get("init_from"):  # params.yaml asks the tokenize stage for the base model's tokenizer too
        raw["tokenize"] = {**raw["tokenize"], "kind": "pretrained", "model": raw["pretrain"]["init_from"]}
    # No benchmarks: their answers are longer than these models' 32 positions (tests/test_benchmarks.py scores them).
    raw["evaluate"] = {**raw.get("evaluate", {}), **{"samples": 1, "sample_tokens": 20, "device": "cpu",
                                                     "benchmarks": []}, **(evaluate or {})}
    return raw


def params(pretrain: dict | None = None, evaluate: dict | None = None):
    from lmforge.config import validate_params

    return validate_params(raw_params(pretrain, evaluate))


def project(root: Path, pretrain: dict | None = None, evaluate: dict | None = None, tokens: Path | None = None) -> Path:
    """A project folder for running a stage: params.yaml and data/tokens (copied from `tokens`)."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params(pretrain, evaluate), sort_keys=False))
    if tokens is not None:
        shutil.copytree(tokens, root / "data" / "tokens")
    else:
        make_tokens(root / "data" / "tokens")
    return root


def stage_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "LMFORGE_TRACKING": "off", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env

"""Where the pipeline keeps its files: every path a stage reads or writes, written once in Python.

The task modules take their paths from here (their argparse defaults included); dvc.yaml names
the same paths as each stage's deps and outs, as YAML must, and tests/test_layout.py checks that
the two agree. The library (lmforge/) takes every one of these as an argument and names none.

Only pathlib here: a stage that imports this module must not pull library code into its
dependencies (tests/test_dvc_deps.py).
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")  # every stage's --params (lmforge.config.load_params defaults to the same file)

DATA = "data/"  # every dataset lies below it: a dep there is data, not code, params or reports
RAW = Path("data/raw")  # ingest writes RAW/<dataset>
CLEAN = Path("data/clean")  # clean writes CLEAN/<dataset>
SPLIT = Path("data/split")  # split writes SPLIT/<dataset>
TASK_SPLIT = SPLIT / "task"
CORPUS_SPLIT = SPLIT / "corpus"
CHAT_SPLIT = SPLIT / "chat"  # what sft reads by default (sft.dataset)
TOKENS = Path("data/tokens")  # tokenize's token shards, meta.json and tokenizer
WORK = Path("data/.work")  # the data stages' scratch folders (no DVC output)

PRETRAINED = Path("models/pretrained")  # pretrain's model; finetune.base_model `pretrained` means it
CHECKPOINTS = Path("models/checkpoints")  # pretrain's run folders, kept between runs (persist)
FINETUNED = Path("models/finetuned")
FINETUNE_CHECKPOINTS = Path("models/finetune-checkpoints")
CHAT_MODEL = Path("models/chat")  # sft's model
SFT_CHECKPOINTS = Path("models/sft-checkpoints")

REPORTS = Path("reports")
CLEAN_REPORTS = REPORTS / "clean"  # clean writes CLEAN_REPORTS/<dataset>.json
SPLIT_REPORTS = REPORTS / "split"  # split writes SPLIT_REPORTS/<dataset>.json
TOKENIZE_REPORT = REPORTS / "tokenize.json"
PRETRAIN_REPORTS = REPORTS / "pretrain"
EVALUATE_REPORTS = REPORTS / "evaluate"
EVALUATE_METRICS = EVALUATE_REPORTS / "metrics.json"
EVALUATE_BENCHMARKS = EVALUATE_REPORTS / "benchmarks.json"
TUNE_REPORTS = REPORTS / "tune"
TUNE_BEST = TUNE_REPORTS / "best.yaml"  # tune's best trial, which finetune reads
FINETUNE_REPORTS = REPORTS / "finetune"
FINETUNE_METRICS = FINETUNE_REPORTS / "metrics.json"
SFT_REPORTS = REPORTS / "sft"
SFT_METRICS = SFT_REPORTS / "metrics.json"
SFT_BENCHMARKS = SFT_REPORTS / "benchmarks.json"
REGISTER_REPORT = REPORTS / "register.json"
SUMMARY = REPORTS / "summary.md"  # tasks/summarize.py's page (no DVC stage)
TIMINGS = REPORTS / "timings"  # each stage's wall time (no DVC output: it differs on every run)


def repo_root(start: Path | str | None = None) -> Path:
    """The folder holding dvc.yaml or .git, from `start` (default: the working folder) upwards."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    return here

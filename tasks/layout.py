"""Where the pipeline keeps its files, for the task modules that share a path (dvc.yaml names the
same paths as each stage's deps and outs). The library takes every one of these as an argument.

Only pathlib here: a stage that imports this module must not pull library code into its
dependencies (tests/test_dvc_deps.py).
"""

from __future__ import annotations

from pathlib import Path

DATA = "data/"  # every dataset lies below it: a dep there is data, not code, params or reports
PRETRAINED = Path("models/pretrained")  # pretrain's model; finetune.base_model `pretrained` means it
FINETUNED = Path("models/finetuned")
TASK_SPLIT = Path("data/split/task")
CORPUS_SPLIT = Path("data/split/corpus")
TUNE_REPORTS = Path("reports/tune")
FINETUNE_METRICS = Path("reports/finetune/metrics.json")
EVALUATE_METRICS = Path("reports/evaluate/metrics.json")
REGISTER_REPORT = Path("reports/register.json")


def repo_root(start: Path | str | None = None) -> Path:
    """The folder holding dvc.yaml or .git, from `start` (default: the working folder) upwards."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    return here

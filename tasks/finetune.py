"""Stage `finetune`: fine-tune a base model for sequence classification on the task split.

    python -m tasks.finetune            # what dvc.yaml runs; resumes a killed run

Reads params.yaml (seed, finetune), data/split/task/{train,val,test}.parquet and, when
finetune.use_tuned is true and it exists, reports/tune/best.yaml (the tune stage's best trial,
merged over the finetune section). Writes models/finetuned/ (save_pretrained + tokenizer, labels
in the config), models/finetune-checkpoints/ (kept between runs, for resuming),
reports/finetune/ (metrics.json with the TF-IDF baseline beside, confusion_matrix.png, and for
dvc.yaml's charts history.csv and predictions.csv) and one MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

from tasks import layout

STARTED = time.perf_counter()


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(layout.PARAMS))
    parser.add_argument("--data", default=str(layout.TASK_SPLIT))
    parser.add_argument("--best", default=str(layout.TUNE_BEST))
    parser.add_argument("--out", default=str(layout.FINETUNED))
    parser.add_argument("--checkpoints", default=str(layout.FINETUNE_CHECKPOINTS))
    parser.add_argument("--reports", default=str(layout.FINETUNE_REPORTS))
    return parser.parse_args(argv)


def settings(params, best_path: Path):
    """The finetune section, with best.yaml's params merged in when use_tuned (and present)."""
    from lmforge.training.tuned import read_best_values, with_tuned_values

    section = params.finetune
    tuned = read_best_values(best_path) if section.use_tuned else None
    if tuned:
        section = with_tuned_values(section, tuned, str(best_path))
    return section, tuned


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch: the finetune curves of dvc.yaml's charts."""
    from lmforge.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "step", "train_loss", "val_accuracy", "val_macro_f1",
                                                "train_seconds", "train_samples"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def write_predictions(path: Path, pairs: list[tuple[str, str]]) -> None:
    """predictions.csv (columns actual, predicted; label names): dvc.yaml's confusion chart."""
    from lmforge.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows(pairs)


def run(args: argparse.Namespace) -> dict:
    from lmforge.atomic import atomic_dir, atomic_path, write_json
    from lmforge.evaluation.baseline import tfidf_baseline
    from lmforge.evaluation.classification_metrics import tracked_scores, majority_accuracy, plot_confusion_matrix
    from lmforge.config import load_params
    from lmforge.training.finetuning import finetune, read_split, save_model
    from lmforge.training.base_models import resolve_base_model
    from lmforge.registry import tracking

    params = load_params(args.params)
    section, tuned = settings(params, Path(args.best))
    base = resolve_base_model(section.base_model, pretrained_dir=layout.PRETRAINED)
    data = read_split(args.data)
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    with tracking.stage_run("finetune", {"seed": params.seed, "finetune": section.model_dump()},
                            tags={"base_model": section.base_model, "tuned": bool(tuned)}) as mlrun:
        def on_epoch_end(epoch: int, scores: dict) -> None:
            mlrun.log_metrics({"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}, step=epoch)

        result = finetune(base, data, section, seed=params.seed, checkpoint_dir=args.checkpoints,
                          on_epoch_end=on_epoch_end, log=log)
        out = Path(args.out)
        with atomic_dir(out) as tmp:
            save_model(result, tmp)

        # The baseline learns from the rows the model learned from (finetune.max_train_rows).
        train = data["train"].sample(section.max_train_rows, params.seed)
        log(f"finetune: TF-IDF + logistic regression baseline on the same {len(train)} train rows")
        baseline = tfidf_baseline(train.texts, train.labels,
                                  {"val": (data["val"].texts, data["val"].labels),
                                   "test": (data["test"].texts, data["test"].labels)},
                                  labels=result.labels, c=section.baseline_c, seed=params.seed)
        baseline["train_rows"] = len(train)
        metrics = {
            "base_model": section.base_model,
            "method": section.method,
            "labels": result.labels,
            "test": result.test,
            "val": result.val,
            "best_epoch": result.best_epoch,
            "majority_test_accuracy": majority_accuracy(data["train"].labels, data["test"].labels),
            "baseline_tfidf": baseline,
            "train": result.stats,
            "tuned_params": tuned,
            "rows": {name: len(split) for name, split in data.items()},
            "seconds": round(time.perf_counter() - STARTED, 1),
        }
        write_json(reports / "metrics.json", metrics)
        write_history(reports / "history.csv", result.history)
        write_predictions(reports / "predictions.csv", list(zip(data["test"].labels, result.test_predictions)))
        with atomic_path(reports / "confusion_matrix.png") as tmp:
            plot_confusion_matrix(result.test["confusion_matrix"], result.labels, tmp,
                                  title=f"finetune ({section.base_model}) on test")

        flat = {**tracked_scores(result.test, "test"), **tracked_scores(result.val, "val"),
                **tracked_scores(baseline["test"], "baseline_test"),
                "train_samples_per_second": result.stats["samples_per_second"] or 0.0,
                "train_seconds": result.stats["train_seconds"], "best_epoch": result.best_epoch}
        mlrun.log_metrics(flat)
        mlrun.log_artifact(reports / "metrics.json")
        mlrun.log_artifact(reports / "confusion_matrix.png")
        mlrun.log_artifact(reports / "history.csv")
        mlrun.log_artifact(reports / "predictions.csv")
        if Path(args.best).exists() and tuned:
            mlrun.log_artifact(args.best)

    # A finished run leaves nothing to resume: the best weights are in models/finetuned.
    shutil.rmtree(args.checkpoints, ignore_errors=True)
    Path(args.checkpoints).mkdir(parents=True, exist_ok=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    metrics = run(args)
    test, base = metrics["test"], metrics["baseline_tfidf"]["test"]
    print(f"[finetune] test accuracy {test['accuracy']:.4f} macro F1 {test['macro_f1']:.4f} "
          f"(TF-IDF baseline {base['accuracy']:.4f} / {base['macro_f1']:.4f}, "
          f"majority {metrics['majority_test_accuracy']:.4f}); "
          f"{metrics['train']['samples_per_second']} samples/s",
          file=sys.stderr)
    print(json.dumps({"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]}))


if __name__ == "__main__":
    from tasks._common import run_main

    # A UserError (bad data, params or base model): one clear message, exit 2, no retry.
    run_main("finetune", main)

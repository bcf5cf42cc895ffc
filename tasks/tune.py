"""Stage `tune`: an Optuna study over the finetune knobs declared in params.yaml (tune.space).

    python -m tasks.tune                # what dvc.yaml runs; a rerun adds trials to the study
    LMFORGE_OPTUNA_STORAGE=postgresql://... python -m tasks.tune   # one worker of a shared study

Reads params.yaml (seed, tune, finetune) and data/split/task/{train,val}.parquet (never test).
Writes reports/tune/best.yaml (read by the finetune stage), reports/tune/trials.csv, the
optimisation-history and parameter-importance plots, and one MLflow run with a nested run per
trial. The study itself lives in tune.storage / LMFORGE_OPTUNA_STORAGE, by default SQLite at
reports/tune/study.db, which is not a DVC output, so DVC never deletes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.layout import PARAMS, PRETRAINED, TASK_SPLIT, TUNE_REPORTS


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(PARAMS))
    parser.add_argument("--data", default=str(TASK_SPLIT))
    parser.add_argument("--reports", default=str(TUNE_REPORTS))
    return parser.parse_args(argv)


def trial_logger(parent):
    """An Optuna callback that records each finished trial as a nested MLflow run of `parent`
    (its params, per-epoch val metric, value, state and error), with the trial's own times."""
    if not parent.active:
        return None
    import mlflow
    from mlflow.tracking import MlflowClient

    from lmforge.registry.tracking import flatten
    from lmforge.training.tuning import trial_metrics

    client = MlflowClient()
    experiment_id = mlflow.get_run(parent.run_id).info.experiment_id

    def log_trial(study, trial) -> None:
        start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
        end = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else None
        tags = {"mlflow.parentRunId": parent.run_id,
                "stage": "tune", "optuna.study": study.study_name, "optuna.trial": str(trial.number),
                "optuna.state": trial.state.name}
        if trial.user_attrs.get("error"):
            tags["error"] = str(trial.user_attrs["error"])[:5000]
        run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"trial-{trial.number}")
        rid = run.info.run_id
        for key, value in flatten(trial.params).items():
            client.log_param(rid, key, value)
        for epoch, value in sorted(trial.intermediate_values.items()):
            client.log_metric(rid, f"val_{study.user_attrs.get('metric', 'metric')}", value, step=epoch)
        for key, value in trial_metrics(trial).items():
            client.log_metric(rid, key, value)
        status = "FINISHED" if trial.state.name in ("COMPLETE", "PRUNED") else "FAILED"
        client.set_terminated(rid, status=status, end_time=end)

    return log_trial


def run(args: argparse.Namespace) -> dict:
    from lmforge.registry import tracking
    from lmforge.config import load_params
    from lmforge.training.finetuning import read_split
    from lmforge.training.base_models import resolve_base_model
    from lmforge.training.tuning import run_study

    params = load_params(args.params)
    base = resolve_base_model(params.finetune.base_model, pretrained_dir=PRETRAINED)
    data = read_split(args.data, splits=("train", "val"))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tracking.stage_run("tune", {"seed": params.seed, "tune": params.tune.model_dump(),
                                     "finetune": params.finetune.model_dump()}) as mlrun:
        summary = run_study(params, base, data, args.reports, on_trial_end=trial_logger(mlrun), log=log)
        mlrun.log_metrics({"best_value": summary["best_value"], "best_trial": summary["best_trial"],
                           **{f"trials_{k}": v for k, v in summary["trials"].items()}})
        mlrun.log_params({f"best.{k}": v for k, v in tracking.as_params(summary["params"]).items()})
        for name in ("best.yaml", "trials.csv", "optimization_history.png", "param_importances.png"):
            mlrun.log_artifact(Path(args.reports) / name)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    summary = run(args)
    print(f"[tune] best trial {summary['best_trial']}: val {summary['metric']} {summary['best_value']:.4f} "
          f"with {summary['params']}; trials {summary['trials']}",
          file=sys.stderr)


if __name__ == "__main__":
    from tasks._common import run_main

    run_main("tune", main)

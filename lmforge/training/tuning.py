"""Hyperparameter search for fine-tuning: an Optuna study over finetune's knobs.

- The search space is declared in params.yaml (`tune.space`: a finetune key, `lora.r` for a
  LoRA knob, mapped to a float / int / categorical dimension); lmforge/config/tune.py checks every bound
  against finetune's own schema, so a space that cannot be sampled stops before any trial, with
  the key path.
- TPE sampler (seeded by the params seed and the number of trials already in the study, so a
  rerun proposes new points), a pruner fed by each epoch's val metric.
- Storage: LMFORGE_OPTUNA_STORAGE if set, else tune.storage, else SQLite at study.db in the
  reports folder the caller passes. Any SQLAlchemy URL works (PostgreSQL for workers on several
  machines); the study is created with load_if_exists, so a rerun or a second worker adds trials to it. A
  heartbeat marks trials of a killed worker as failed.
- A trial that raises is recorded as failed (its error kept as a user attribute) and the study
  goes on; only a trial that could not sample its space stops the study.
- Each trial trains on a seeded subsample (tune.max_train_rows, tune.max_val_rows) and never
  sees the test split.

Optuna and matplotlib are imported inside the functions that use them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import yaml

from lmforge.config import ConfigError
from lmforge.config.finetune import FinetuneParams
from lmforge.config.tune import TuneParams
from lmforge.redaction import redact
from lmforge.training.tuned import with_tuned_values
from lmforge.training.finetuning import LabelledTexts, finetune

if TYPE_CHECKING:  # the whole-file schema: a type here, never a dependency
    from lmforge.config.whole import Params

STORAGE_ENV = "LMFORGE_OPTUNA_STORAGE"
BEST_FILE = "best.yaml"
TRIALS_FILE = "trials.csv"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
UNTUNED = "untuned_default"  # user attribute of the trial that ran finetune's own values


class SpaceError(ConfigError):
    """A dimension of tune.space cannot be sampled: stops the study (not a failed trial)."""


class TrialFailed(Exception):
    """A trial raised; Optuna records it as failed and the study goes on."""


def storage_url(tune: TuneParams, out_dir: Path | str) -> str:
    env = os.environ.get(STORAGE_ENV, "").strip()
    if env:
        return env
    if tune.storage:
        return tune.storage
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out_dir / 'study.db').as_posix()}"


def suggest(trial, space: Mapping[str, TuneParams.Dimension]) -> dict[str, Any]:
    """Sample every dimension; a dimension Optuna refuses raises SpaceError with its key path."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        try:
            if dim.type == "float":
                values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
            elif dim.type == "int":
                step = int(dim.step) if dim.step is not None else 1
                values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=step, log=dim.log)
            else:
                values[key] = trial.suggest_categorical(key, list(dim.choices))
        except (ValueError, TypeError) as err:
            raise SpaceError(f"tune.space.{key}: cannot be sampled: {err}") from err
    return values


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"lora.r": 8, "learning_rate": 1e-4} -> {"lora": {"r": 8}, "learning_rate": 1e-4}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    return out


def untuned_values(section: FinetuneParams, space: Mapping[str, Any]) -> dict[str, Any]:
    """finetune's own value of every searched key ("lora.r" read from the lora section)."""
    values = {}
    for key in space:
        node: Any = section
        for part in key.split("."):
            node = getattr(node, part)
        values[key] = node
    return values


def _pruner(tune: TuneParams, max_epochs: int):
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                           n_warmup_steps=tune.pruner_warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs))
    if tune.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=tune.pruner_threshold,
                                              n_warmup_steps=tune.pruner_warmup_epochs)
    return optuna.pruners.NopPruner()


def _rdb_storage(url: str, heartbeat_interval: int | None, attempts: int = 4):
    """Optuna's RDBStorage on url. Workers started at once on an empty database each create
    Optuna's tables; PostgreSQL refuses all but the first CREATE (a duplicate type or table): the
    tables exist then, so the refused worker opens the storage again instead of failing."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())  # apart from the other refused workers


def open_study(params: Params, out_dir: Path | str):
    """Create or load the study named in params, with a seeded TPE sampler and the pruner.
    Returns (study, storage url, whether this worker enqueues the untuned default)."""
    import optuna

    tune = params.tune
    url = storage_url(tune, out_dir)
    storage = _rdb_storage(url, tune.heartbeat_interval)
    existing = optuna.create_study(storage=storage, study_name=tune.study_name,
                                   direction="maximize", load_if_exists=True)
    sampler = optuna.samplers.TPESampler(seed=params.seed + len(existing.trials),
                                         n_startup_trials=tune.startup_trials)
    max_epochs = params.finetune.num_train_epochs
    epoch_dim = tune.space.get("num_train_epochs")
    if epoch_dim is not None:
        max_epochs = int(max(epoch_dim.candidates()))
    study = optuna.load_study(study_name=tune.study_name, storage=storage, sampler=sampler,
                              pruner=_pruner(tune, max_epochs))
    study.set_user_attr("metric", tune.metric)
    return study, url, _claim_untuned(storage, tune.study_name, untuned_values(params.finetune, tune.space))


def _claim_untuned(storage, study_name: str, values: Mapping[str, Any]) -> bool:
    """Whether this worker is the one to enqueue the untuned default with these values. Workers
    starting at once each saw no such trial and each enqueued it (skip_if_exists reads, then
    writes: seen on PostgreSQL, where it then ran twice). A storage creates a study name once,
    so an empty marker study named after the study and the values is the claim: only the worker
    whose create succeeds enqueues."""
    import optuna

    digest = hashlib.sha256(json.dumps(dict(values), sort_keys=True, default=str).encode()).hexdigest()[:12]
    try:
        optuna.create_study(storage=storage, study_name=f"{study_name}:untuned:{digest}")
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def run_study(
    params: Params,
    base: Path | str,
    data: Mapping[str, LabelledTexts],
    out_dir: Path | str,
    *,
    on_trial_end: Callable[[Any, Any], None] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Run tune.n_trials new trials (or until tune.timeout) and write the reports into out_dir.

    on_trial_end(study, frozen_trial) runs after each trial, whatever its state (the stage logs
    a nested MLflow run there). Returns the summary written to best.yaml."""
    import optuna

    tune = params.tune
    out_dir = Path(out_dir)
    study, url, claimed = open_study(params, out_dir)
    before = len(study.trials)
    log(f"tune: study {tune.study_name!r} at {redact(url)}: {before} trial(s) so far; "
        f"running {tune.n_trials} more" + (f" or {tune.timeout:g} s" if tune.timeout else ""))
    subset = {
        "train": data["train"].sample(tune.max_train_rows, params.seed),
        "val": data["val"].sample(tune.max_val_rows, params.seed),
    }
    _record_setup(study, {"metric": tune.metric, "base_model": params.finetune.base_model,
                          "train_rows": len(subset["train"]), "val_rows": len(subset["val"]), "seed": params.seed},
                  log)

    ours: set[int] = set()  # this worker's trials: others may add to a shared study meanwhile

    def objective(trial) -> float:
        ours.add(trial.number)
        chosen = suggest(trial, tune.space)
        try:
            section = with_tuned_values(params.finetune, nest(chosen), f"trial {trial.number}")
            # The trial's subsample is already cut; no step log between epochs; tune.max_length
            # (when set) makes trials cheaper than the run they tune.
            cfg = section.model_copy(update={"max_train_rows": None, "logging_steps": 10**9,
                                             "max_length": tune.max_length or section.max_length})

            def report(epoch: int, scores: dict) -> None:
                value = float(scores[tune.metric])
                trial.report(value, step=epoch)
                # After the last epoch there is nothing left to save: the trial completes.
                if epoch < cfg.num_train_epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch}: val {tune.metric} {value:.4f}")

            result = finetune(base, subset, cfg, seed=params.seed, on_epoch_end=report, log=lambda _msg: None,
                              show_progress=False)
            trial.set_user_attr("best_epoch", result.best_epoch)
            trial.set_user_attr("train_seconds", result.stats["train_seconds"])
            value = float(result.val[tune.metric])
            log(f"tune: trial {trial.number} val {tune.metric} {value:.4f} with {chosen}")
            return value
        except optuna.TrialPruned:
            log(f"tune: trial {trial.number} pruned with {chosen}")
            raise
        except Exception as err:  # noqa: BLE001 - recorded as a failed trial; the study goes on
            message = f"{type(err).__name__}: {err}"
            trial.set_user_attr("error", message[:2000])
            log(f"tune: trial {trial.number} failed: {message}")
            raise TrialFailed(message) from err

    # The untuned default is a trial like any other (run once per study), so best.yaml can say
    # whether the search found anything better than what fine-tuning would do without it.
    if claimed:
        study.enqueue_trial(untuned_values(params.finetune, tune.space), user_attrs={UNTUNED: True},
                            skip_if_exists=True)
    callbacks = [on_trial_end] if on_trial_end is not None else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=tune.n_trials, timeout=tune.timeout, catch=(TrialFailed,),
                   callbacks=callbacks, gc_after_trial=True, show_progress_bar=progress)
    _fail_stale_trials(study)
    summary = write_reports(study, params, url, out_dir, new_trials=len(ours))
    return summary


def _record_setup(study, setup: dict, log: Callable[[str], None]) -> None:
    """Trials are only comparable on one setup: record it on a new study, say so when a rerun changed it."""
    earlier = study.user_attrs.get("setup")
    if earlier is None:
        study.set_user_attr("setup", setup)
    elif earlier != setup:
        log(f"tune: warning: study {study.study_name!r} holds trials run on {earlier}, this run uses {setup}; "
            "set tune.study_name to start a fresh study if they should not be compared")


def _fail_stale_trials(study) -> None:
    """Mark failed the trials of workers that died (heartbeat older than its grace period) before
    best.yaml is written. Optuna does this only before a worker asks for its next trial, so the
    last worker to finish would otherwise report a dead one's trial as still running. A storage
    without heartbeats (SQLite by default) is left alone by optuna itself."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna flags fail_stale_trials as experimental
        optuna.storages.fail_stale_trials(study)


def verdict(complete: list, best, params: Params) -> dict[str, Any]:
    """Whether the best trial beats the untuned default by tune.min_gain, and so what fine-tuning
    should merge: a winner within noise of the default is not worth taking."""
    untuned = untuned_values(params.finetune, params.tune.space)
    default = next((t for t in complete if t.user_attrs.get(UNTUNED) and t.params == untuned), None)
    if default is None:
        return {"untuned_trial": None, "untuned_value": None, "gain": None, "tuned": True,
                "verdict": "the untuned default has no complete trial in this study; the best trial is taken",
                "params": nest(best.params)}
    gain = float(best.value) - float(default.value)
    tuned = best.number != default.number and gain >= params.tune.min_gain
    if tuned:
        words = f"trial {best.number} beats the untuned default by {gain:.4f} (min_gain {params.tune.min_gain:g})"
    else:
        words = (f"no trial beats the untuned default ({float(default.value):.4f}) by min_gain "
                 f"{params.tune.min_gain:g} (best gain {gain:+.4f}); fine-tuning keeps its own values")
    return {"untuned_trial": default.number, "untuned_value": float(default.value), "gain": gain,
            "tuned": tuned, "verdict": words, "params": nest(best.params) if tuned else {}}


def _state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.trials:
        name = trial.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return counts


def write_reports(study, params: Params, url: str, out_dir: Path | str, new_trials: int = 0) -> dict:
    """best.yaml, trials.csv and the two plots, each written atomically."""
    import optuna

    from lmforge.atomic import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
        hint = f"; last error: {errors[-1]}" if errors else ""
        raise RuntimeError(f"tune: no trial of study {study.study_name!r} completed "
                           f"({_state_counts(study)}){hint}")
    best = study.best_trial
    summary = {
        "study": study.study_name,
        "storage": redact(url),
        "metric": params.tune.metric,
        "direction": "maximize",
        "best_trial": best.number,
        "best_value": float(best.value),
        "trials": _state_counts(study),
        "new_trials": new_trials,
        **verdict(complete, best, params),
    }
    header = ("# Written from the Optuna study below; fine-tuning merges `params` into its section\n"
              "# when finetune.use_tuned is true (empty when no trial beat the untuned default).\n")
    with atomic_path(out_dir / BEST_FILE) as tmp:
        tmp.write_text(header + yaml.safe_dump(summary, sort_keys=False))
    _write_trials_table(study, out_dir / TRIALS_FILE)
    _write_plots(study, out_dir)
    return summary


def _write_trials_table(study, path: Path) -> None:
    from lmforge.atomic import atomic_path

    keys = sorted({k for t in study.trials for k in t.params})
    header = ["number", "state", "value", "last_epoch", "duration_s", "datetime_start", *keys, "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for t in study.trials:
            duration = t.duration.total_seconds() if t.duration is not None else None
            last = max(t.intermediate_values) if t.intermediate_values else None
            writer.writerow([
                t.number, t.state.name, "" if t.value is None else t.value, "" if last is None else last,
                "" if duration is None else round(duration, 2),
                t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                *[t.params.get(k, "") for k in keys], t.user_attrs.get("error", ""),
            ])


def _write_plots(study, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from lmforge.atomic import atomic_path

    def save(name: str, draw: Callable[[], Any] | None, fallback: str) -> None:
        fig = None
        if draw is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of optuna's matplotlib plots
                try:
                    ax = draw()
                    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    fallback = f"{fallback}\n({err})"
        if fig is None:  # a placeholder keeps the DVC plot output present
            fig, axis = plt.subplots()
            axis.axis("off")
            axis.text(0.5, 0.5, fallback, ha="center", va="center", wrap=True)
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    save(HISTORY_PLOT, lambda: ovm.plot_optimization_history(study), "no complete trial yet")
    varied = [k for k in {k for t in complete for k in t.params}
              if len({repr(t.params.get(k)) for t in complete}) > 1]
    enough = len(complete) >= 2 and varied
    save(IMPORTANCE_PLOT, (lambda: ovm.plot_param_importances(study)) if enough else None,
         "parameter importances need two or more complete trials with varied parameters")


def trial_metrics(trial) -> dict[str, float]:
    """Scalar metrics of a finished trial for a tracker (NaN-free)."""
    out = {}
    if trial.value is not None and math.isfinite(trial.value):
        out["value"] = float(trial.value)
    for key in ("train_seconds", "best_epoch"):
        if isinstance(trial.user_attrs.get(key), (int, float)):
            out[key] = float(trial.user_attrs[key])
    return out

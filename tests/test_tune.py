"""The tune stage: an Optuna study over the tiny BERT on synthetic reviews, one CPU thread."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_fixtures import params_file, tiny_base, tiny_finetune, write_task  # noqa: E402

from lmforge.config import ConfigError, load_params  # noqa: E402

SPACE = {
    "learning_rate": {"type": "float", "low": 2e-3, "high": 6e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16]},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "split", n_train=128, n_val=32, n_test=8)


def tune_section(**overrides) -> dict:
    section = {"n_trials": 3, "timeout": None, "pruner": "median", "pruner_startup_trials": 1,
               "max_train_rows": None, "max_val_rows": None, "space": SPACE, "heartbeat_interval": None}
    section.update(overrides)
    return section


def _params(tmp: Path, base: Path, tune: dict, **finetune) -> Path:
    return params_file(tmp / "params.yaml", tune=tune, finetune=tiny_finetune(base, num_train_epochs=5, **finetune))


def _run(tmp: Path, params: Path, data: Path) -> dict:
    from tasks import tune as stage

    return stage.run(stage._args(["--params", str(params), "--data", str(data), "--reports", str(tmp / "reports/tune")]))


def _study(tmp: Path):
    import optuna

    return optuna.load_study(study_name="finetune", storage=f"sqlite:///{tmp / 'reports/tune/study.db'}")


def test_three_trials_write_best_yaml_and_a_rerun_adds_to_the_same_study(tmp_path, base, data, monkeypatch):
    monkeypatch.delenv("LMFORGE_OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LMFORGE_EXPERIMENT", "test-tune")
    params = _params(tmp_path, base, tune_section(pruner="none"))
    summary = _run(tmp_path, params, data)

    reports = tmp_path / "reports/tune"
    best = yaml.safe_load((reports / "best.yaml").read_text())
    assert best["trials"] == {"complete": 3}
    assert best["best_value"] == summary["best_value"] > 0.5
    # Trial 0 ran finetune's own values; the best is taken only when it beats that by min_gain.
    study = _study(tmp_path)
    assert study.trials[0].user_attrs["untuned_default"] and study.trials[0].params == {
        "learning_rate": 3e-3, "batch_size": 8}
    assert best["untuned_trial"] == 0 and best["untuned_value"] == study.trials[0].value
    assert best["gain"] == pytest.approx(best["best_value"] - study.trials[0].value)
    assert best["tuned"] == (best["best_trial"] != 0 and best["gain"] >= 0.01)
    assert best["params"] == (study.best_trial.params if best["tuned"] else {})
    rows = list(csv.DictReader((reports / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert {"number", "value", "learning_rate", "batch_size", "error"} <= set(rows[0])
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (reports / plot).read_bytes()[:4] == b"\x89PNG"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("test-tune")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["optuna.trial"] for r in children) == ["0", "1", "2"]
    assert all("learning_rate" in r.data.params and "val_accuracy" in r.data.metrics for r in children)
    assert parent.data.metrics["best_value"] == pytest.approx(best["best_value"])

    # A second run continues the study: new trials, new points, one best.yaml over all of them.
    params = _params(tmp_path, base, tune_section(n_trials=2, pruner="none"))
    _run(tmp_path, params, data)
    study = _study(tmp_path)
    assert len(study.trials) == 5
    assert [t.number for t in study.trials if t.user_attrs.get("untuned_default")] == [0]  # run once a study
    first = {t.params["learning_rate"] for t in study.trials[:3]}
    assert not first & {t.params["learning_rate"] for t in study.trials[3:]}
    best = yaml.safe_load((reports / "best.yaml").read_text())
    assert best["trials"] == {"complete": 5} and best["new_trials"] == 2
    assert len(list(csv.DictReader((reports / "trials.csv").open()))) == 5

    # finetune reads best.yaml: its params override the finetune section.
    from tasks.finetune import settings

    section, tuned = settings(load_params(params), reports / "best.yaml")
    assert tuned == best["params"]
    if not tuned:
        return
    assert section.learning_rate == best["params"]["learning_rate"]
    assert section.batch_size == best["params"]["batch_size"]
    assert section.num_train_epochs == 5  # untouched knobs keep the section's value


def test_pruned_trials_are_recorded_as_pruned(tmp_path, base, data, monkeypatch):
    import optuna

    monkeypatch.delenv("LMFORGE_OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    # A learning rate far too small leaves val accuracy at chance: the threshold pruner stops
    # each trial after its first epoch. With no trial complete there is no best to write.
    hopeless = {"learning_rate": {"type": "float", "low": 1e-9, "high": 2e-9, "log": True}}
    params = _params(tmp_path, base, tune_section(n_trials=2, pruner="threshold", pruner_threshold=0.9,
                                                  space=hopeless), learning_rate=1.5e-9)
    with pytest.raises(RuntimeError, match="no trial .* completed"):
        _run(tmp_path, params, data)
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in study.trials)

    # The study goes on: a sound trial completes and the report counts the pruned ones.
    params = _params(tmp_path, base, tune_section(n_trials=1, pruner="none"))
    _run(tmp_path, params, data)
    best = yaml.safe_load((tmp_path / "reports/tune/best.yaml").read_text())
    assert best["trials"] == {"pruned": 2, "complete": 1} and best["best_trial"] == 2
    assert best["untuned_trial"] == 2  # finetune's values changed: a new untuned default ran
    states = [r["state"] for r in csv.DictReader((tmp_path / "reports/tune/trials.csv").open())]
    assert states == ["PRUNED", "PRUNED", "COMPLETE"]


def test_the_best_trial_is_taken_only_when_it_beats_the_untuned_default_by_min_gain():
    import optuna

    from types import SimpleNamespace

    from lmforge.config.finetune import FinetuneParams

    from lmforge.config.tune import TuneParams
    from lmforge.training.tuning import UNTUNED, verdict

    params = SimpleNamespace(tune=TuneParams.model_validate(tune_section(min_gain=0.02)),
                             finetune=FinetuneParams(learning_rate=1e-4, batch_size=16))
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(5e-5, 6e-3, log=True),
                     "batch_size": optuna.distributions.CategoricalDistribution([8, 16])}

    def trial(number: int, value: float, lr: float, batch: int, untuned: bool = False):
        return optuna.trial.create_trial(value=value, params={"learning_rate": lr, "batch_size": batch},
                                         distributions=distributions, user_attrs={UNTUNED: True} if untuned else {})

    default = trial(0, 0.80, 1e-4, 16, untuned=True)
    default._number = 0
    close, clear = trial(1, 0.81, 3e-3, 8), trial(2, 0.85, 4e-3, 8)
    close._number, clear._number = 1, 2
    within = verdict([default, close], close, params)
    assert not within["tuned"] and within["params"] == {} and within["gain"] == pytest.approx(0.01)
    assert "no trial beats the untuned default (0.8000) by min_gain 0.02" in within["verdict"]
    beats = verdict([default, close, clear], clear, params)
    assert beats["tuned"] and beats["params"] == {"learning_rate": 4e-3, "batch_size": 8}
    assert beats["untuned_trial"] == 0 and beats["gain"] == pytest.approx(0.05)
    alone = verdict([default], default, params)
    assert not alone["tuned"] and alone["params"] == {}


def test_a_failing_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path, base, data, monkeypatch):
    import optuna

    from lmforge.training import tuning

    monkeypatch.delenv("LMFORGE_OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    calls = []
    real = tuning.finetune

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "finetune", flaky)
    params = _params(tmp_path, base, tune_section(n_trials=3, pruner="none"))
    _run(tmp_path, params, data)
    study = _study(tmp_path)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE]
    assert "out of memory" in study.trials[1].user_attrs["error"]
    best = yaml.safe_load((tmp_path / "reports/tune/best.yaml").read_text())
    assert best["trials"] == {"complete": 2, "fail": 1}
    rows = list(csv.DictReader((tmp_path / "reports/tune/trials.csv").open()))
    assert "out of memory" in rows[1]["error"]


@pytest.mark.parametrize(
    ("space", "path"),
    [
        ({"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, "tune.space.learning_rate"),
        ({"learning_rate": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "tune.space.learning_rate"),
        ({"batch_size": {"type": "categorical", "choices": []}}, "tune.space.batch_size"),
        ({"lora.r": {"type": "int", "low": 0, "high": 8}}, "space.lora.r"),
        ({"batch_size": {"type": "int", "low": 0, "high": 8}}, "space.batch_size"),
        ({"learning_rte": {"type": "float", "low": 1e-5, "high": 1e-3}}, "space.learning_rte"),
        ({"warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2, "choices": [0.1]}}, "tune.space.warmup_ratio"),
    ],
)
def test_a_space_that_cannot_be_sampled_stops_with_the_key_path(tmp_path, space, path):
    params = params_file(tmp_path / "params.yaml", tune=tune_section(space=space))
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        load_params(params)


def test_sampling_errors_are_space_errors_with_the_key_path():
    import optuna

    from lmforge.config.tune import TuneParams
    from lmforge.training.tuning import SpaceError, suggest

    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: suggest(t, {"batch_size": TuneParams.Dimension(type="categorical", choices=[8])})
                   ["batch_size"], n_trials=1)
    trial = study.ask()
    trial.suggest_categorical("batch_size", [8])
    # The same name with another distribution in one trial: Optuna refuses, the key path is named.
    with pytest.raises(SpaceError, match=r"tune\.space\.batch_size"):
        suggest(trial, {"batch_size": TuneParams.Dimension(type="int", low=1, high=4)})


def test_storage_comes_from_the_env_then_params_then_sqlite_under_reports(tmp_path, monkeypatch):
    from lmforge.config.tune import TuneParams
    from lmforge.redaction import redact
    from lmforge.training.tuning import storage_url

    monkeypatch.delenv("LMFORGE_OPTUNA_STORAGE", raising=False)
    assert storage_url(TuneParams(), tmp_path / "t") == f"sqlite:///{(tmp_path / 't/study.db').as_posix()}"
    assert storage_url(TuneParams(storage="sqlite:///x.db"), tmp_path) == "sqlite:///x.db"
    monkeypatch.setenv("LMFORGE_OPTUNA_STORAGE", "postgresql://tuner:secret@db:5432/optuna")
    assert storage_url(TuneParams(storage="sqlite:///x.db"), tmp_path).startswith("postgresql://")
    assert "secret" not in redact("postgresql://tuner:secret@db:5432/optuna")


def test_best_yaml_that_does_not_fit_finetune_is_refused(tmp_path, base):
    from tasks.finetune import settings

    params = load_params(_params(tmp_path, base, tune_section()))
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"params": {"learning_rate": -1.0}}))
    with pytest.raises(ConfigError, match=r"finetune\.learning_rate"):
        settings(params, best)
    section, tuned = settings(params, tmp_path / "missing.yaml")
    assert tuned is None and section == params.finetune

"""The register stage, `lmforge promote` and `lmforge trace` against a real MLflow SQLite store.

One store per module (creating its tables takes seconds); each test files its models under its own
names, in its own small project folder: tiny real models (tests/tiny_models.py), metrics, split
parquet files, a dvc.lock and a git commit, as the pipeline would leave them.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.lineage import dvc_md5
from tests.conftest import ROOT, run
from tests.tiny_models import chat_folder, lm_folder, sentiment_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh MLflow SQLite store (tracking and registry) with its artifacts in a temp dir."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.setenv("MLFLOW_REGISTRY_URI", uri)
    patch.delenv("LMFORGE_EXPERIMENT", raising=False)
    patch.delenv("LMFORGE_TRACKING", raising=False)
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("lmforge", artifact_location=str(folder / "artifacts"))
    yield uri
    patch.undo()


def make_project(root: Path, name: str, *, accuracy: float = 0.8, lock: bool = True, lr: float = 5e-5,
                 metrics: dict | None = None) -> Path:
    """A project folder as the pipeline leaves it before `register`; models filed under `name`-*."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"]["sentiment"]["name"] = f"{name}-sentiment"
    params["register"]["lm"]["name"] = f"{name}-lm"
    params["register"]["chat"]["name"] = f"{name}-chat"
    params["finetune"] = {**(params.get("finetune") or {}), "learning_rate": lr}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    for source, target in ((sentiment_folder(), "models/finetuned"), (lm_folder(), "models/pretrained"),
                           (chat_folder(), "models/chat")):
        shutil.rmtree(root / target, ignore_errors=True)
        shutil.copytree(source, root / target)
    write_metrics(root, accuracy if metrics is None else metrics)
    (root / "reports/evaluate").mkdir(parents=True, exist_ok=True)
    (root / "reports/evaluate/metrics.json").write_text(json.dumps(
        {"model": "models/pretrained", "val": {"loss": 3.2, "perplexity": 24.5}, "test": {"loss": 3.3, "perplexity": 27.1}}))
    (root / "reports/sft").mkdir(parents=True, exist_ok=True)
    (root / "reports/sft/metrics.json").write_text(json.dumps(
        {"base": {"val": {"loss": 3.9}, "test": {"loss": 3.8}}, "val": {"loss": 3.4}, "test": {"loss": 3.5}}))
    for stage in ("evaluate", "sft"):  # the benchmark reports, empty as with no tasks configured
        (root / f"reports/{stage}/benchmarks.json").write_text(json.dumps({"tasks": {}, "skipped": "no tasks"}))
    split = root / "data/split/task"
    split.mkdir(parents=True, exist_ok=True)
    for part, rows in (("train", 8), ("val", 2), ("test", 2)):
        frame = pd.DataFrame({"id": range(rows), "text": [f"review {i} of {part}" for i in range(rows)],
                              "label": [i % 2 for i in range(rows)]})
        frame.to_parquet(split / f"{part}.parquet", index=False)
    chats = root / "data/split/chat"
    chats.mkdir(parents=True, exist_ok=True)
    for part, rows in (("train", 4), ("val", 1), ("test", 1)):
        talk = [json.dumps([{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}])
                for i in range(rows)]
        pd.DataFrame({"id": [str(i) for i in range(rows)], "text": talk}).to_parquet(chats / f"{part}.parquet", index=False)
    if lock:
        # the deps' hashes are made up; the outputs' are DVC's own, as register checks them
        out = lambda path: {"path": path, "hash": "md5", "md5": dvc_md5(root / path)}  # noqa: E731
        stages = {
            "finetune": {"cmd": "python -m tasks.finetune",
                         "deps": [{"path": "data/split/task", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"},
                                  {"path": "tasks/finetune.py", "hash": "md5", "md5": "11111111111111111111111111111111"}],
                         "outs": [out("models/finetuned"), out("reports/finetune/metrics.json")]},
            "pretrain": {"cmd": "python -m tasks.pretrain",
                         "deps": [{"path": "data/tokens", "hash": "md5", "md5": "44444444444444444444444444444444.dir"}],
                         "outs": [out("models/pretrained")]},
            "sft": {"cmd": "python -m tasks.sft",
                    "deps": [{"path": "data/split/chat", "hash": "md5", "md5": "55555555555555555555555555555555.dir"}],
                    "outs": [out("models/chat"), out("reports/sft/metrics.json")]},
        }
        (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))
    if not (root / ".git").exists():
        run(["git", "init", "-q"], root)
        run(["git", "add", "params.yaml", "dvc.yaml"] + (["dvc.lock"] if lock else []), root)
        run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"], root)
    return root


def write_metrics(root: Path, accuracy_or_payload, baseline: float = 0.6) -> None:
    """reports/finetune/metrics.json: the model's accuracy, with the TF-IDF baseline's beside it."""
    payload = accuracy_or_payload if isinstance(accuracy_or_payload, dict) else \
        {"test_accuracy": accuracy_or_payload, "val_accuracy": accuracy_or_payload - 0.01, "test_macro_f1": 0.7,
         "baseline_tfidf": {"test": {"accuracy": baseline}}}
    (root / "reports/finetune").mkdir(parents=True, exist_ok=True)
    (root / "reports/finetune/metrics.json").write_text(json.dumps(payload))


def head(root: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], root).stdout.strip()


def register(root: Path, monkeypatch, *only: str) -> dict:
    from tasks import register as stage

    monkeypatch.chdir(root)
    stage.main([arg for key in only for arg in ("--only", key)])
    return json.loads((root / "reports/register.json").read_text())


def cli(root: Path, monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    from tasks import cli as entry

    monkeypatch.chdir(root)
    capsys.readouterr()
    code = entry.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --- register -----------------------------------------------------------------------------------


def test_register_twice_registers_once_with_lineage(store, tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "proj", "twice")
    first = register(root, monkeypatch)
    sent, lm = first["models"]["sentiment"], first["models"]["lm"]
    assert (sent["name"], sent["version"], sent["registered"], sent["aliases"]) == ("twice-sentiment", 1, True, ["challenger"])
    assert (lm["name"], lm["version"], lm["registered"]) == ("twice-lm", 1, True)
    assert first["tracking_uri"] == store

    second = register(root, monkeypatch)
    assert "nothing new registered" in capsys.readouterr().out
    for key in ("sentiment", "lm"):
        assert second["models"][key]["registered"] is False
        assert second["models"][key]["version"] == 1
        assert second["models"][key]["fingerprint"] == first["models"][key]["fingerprint"]
    mlflow_client = client(store)
    assert len(mlflow_client.search_model_versions("name = 'twice-sentiment'")) == 1
    assert len(mlflow_client.search_model_versions("name = 'twice-lm'")) == 1

    # the key lineage on the version: commit, dirty flag, data and output hashes, params digest, gate figure
    version = mlflow_client.get_model_version_by_alias("twice-sentiment", "challenger")
    tags = version.tags
    assert tags["git_commit"] == head(root)
    assert tags["git_dirty"] == "false"
    assert tags["dvc.lock"] == "present"
    assert tags["dvc.dep.data/split/task"] == "0123456789abcdef0123456789abcdef.dir"
    assert "dvc.dep.tasks/finetune.py" not in tags  # a code hash: in lineage.json, not on the version
    assert tags["dvc.out.models/finetuned"] == dvc_md5(root / "models/finetuned")
    assert (tags["gate.metric"], tags["gate.metric_key"]) == ("accuracy", "test_accuracy")
    assert tags["lmforge.fingerprint"] == sent["fingerprint"]
    # ... the whole of it in the run's lineage.json, its params digest on the version
    from lmforge.registry import registration as registry

    recorded = json.loads((Path(client(store).download_artifacts(version.run_id, "lineage.json", str(tmp_path)))).read_text())
    assert recorded["lineage"]["dvc.dep.tasks/finetune.py"] == "11111111111111111111111111111111"
    assert recorded["params"]["finetune"]["learning_rate"] == 5e-5
    assert recorded["params"]["split.task"]["val"] == 0.1
    assert tags["params.sha256"] == hashlib.sha256(registry.params_json(recorded["params"]).encode()).hexdigest()
    assert registry.version_metrics(mlflow_client, version)["test_accuracy"] == pytest.approx(0.8)
    # ... and on the run: the tags, the params, the metrics and the datasets under the data's DVC hash
    logged = mlflow_client.get_run(version.run_id)
    assert logged.data.tags["git_commit"] == head(root)
    assert logged.data.tags["dvc.dep.data/split/task"] == "0123456789abcdef0123456789abcdef.dir"
    assert logged.data.params["finetune.learning_rate"] == "5e-05"
    assert logged.data.metrics["test_accuracy"] == pytest.approx(0.8)
    inputs = {d.dataset.name: d for d in logged.inputs.dataset_inputs}
    assert set(inputs) == {"task-train", "task-val", "task-test"}
    assert {inputs[split].dataset.digest for split in inputs} == {tags["dvc.dep.data/split/task"].removesuffix(".dir")}
    assert {t.key: t.value for t in inputs["task-test"].tags}["mlflow.data.context"] == "testing"

    lm_version = mlflow_client.get_model_version("twice-lm", "1")
    assert lm_version.tags["gate.metric_key"] == "test.perplexity"
    assert lm_version.tags["dvc.out.models/pretrained"] == dvc_md5(root / "models/pretrained")
    assert lm_version.tags["dvc.dep.data/tokens"] == "44444444444444444444444444444444.dir"
    # no corpus split files here: the LM's data is named, meta-only, by its dvc.lock hash
    lm_inputs = mlflow_client.get_run(lm_version.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in lm_inputs] == [("tokens", "44444444444444444444444444444444")]


def test_registered_models_predict(store, tmp_path, monkeypatch):
    """The registered pyfuncs load back by alias: labels for the classifier, text for the LM."""
    import mlflow

    root = make_project(tmp_path / "proj", "predict")
    register(root, monkeypatch)
    classifier = mlflow.pyfunc.load_model("models:/predict-sentiment@challenger")
    answer = classifier.predict(pd.DataFrame({"text": ["A wonderful, brilliant film. I loved every minute of it.",
                                                       "An awful, boring film. I hated every minute of it."]}))
    assert answer["label"].tolist() == ["positive", "negative"]
    assert all(0.5 < p <= 1.0 for p in answer["probability"])
    lm = mlflow.pyfunc.load_model("models:/predict-lm@challenger")
    generated = lm.predict(pd.DataFrame({"text": ["ROMEO:"]}), params={"max_new_tokens": 4})
    assert isinstance(generated["generated_text"][0], str) and generated["generated_text"][0]
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="max_new_tokens"):
        lm.predict(pd.DataFrame({"text": ["ROMEO:"]}), params={"max_new_tokens": 10_000})
    with pytest.raises(MlflowException, match="max_new_tokens must be between 1"):
        lm.predict(pd.DataFrame({"text": ["ROMEO:"]}), params={"max_new_tokens": 0})  # not "the default"
    # sampled: a seed reproduces, no seed samples afresh each request
    sample = lambda **extra: lm.predict(pd.DataFrame({"text": ["ROMEO:"]}),  # noqa: E731
                                        params={"max_new_tokens": 24, "temperature": 1.5, **extra})["generated_text"][0]
    assert sample(seed=7) == sample(seed=7)
    assert len({sample() for _ in range(4)}) > 1



def test_registered_pyfuncs_take_a_plain_list_of_texts(store, tmp_path, monkeypatch):
    """As the transformers flavor does: a list of texts, or one text, as well as a DataFrame. The
    signature declares no input schema, so MLflow hands the list over instead of refusing it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tests.tiny_models import NEGATIVE, POSITIVE

    root = make_project(tmp_path / "proj", "listed")
    register(root, monkeypatch)
    classifier = mlflow.pyfunc.load_model("models:/listed-sentiment@challenger")
    assert classifier.metadata.get_input_schema() is None
    answer = classifier.predict(["A fine film.", "Dreadful."])
    assert len(answer) == 2 and set(answer["label"]) <= {"positive", "negative"}
    assert classifier.predict([POSITIVE, NEGATIVE])["label"].tolist() == ["positive", "negative"]
    assert classifier.predict(NEGATIVE)["label"].tolist() == ["negative"]
    framed = classifier.predict(pd.DataFrame({"id": ["1", "2"], "text": [POSITIVE, NEGATIVE]}))
    assert framed.equals(classifier.predict([POSITIVE, NEGATIVE]))
    with pytest.raises(MlflowException, match="no texts"):
        classifier.predict([])
    with pytest.raises(MlflowException, match="text 1 is a int") as err:
        classifier.predict(["SECRET", 3])
    assert "SECRET" not in err.value.message
    for name in ("listed-lm", "listed-chat"):
        generator = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
        assert [p.name for p in generator.metadata.get_params_schema().params] == ["max_new_tokens", "temperature", "seed"]
        replies = generator.predict(["A fine film.", "Dreadful."], params={"max_new_tokens": 3})["generated_text"]
        assert len(replies) == 2 and all(isinstance(reply, str) for reply in replies), name
        assert generator.predict(["Hello"], params={"max_new_tokens": 3}).shape == (1, 1)
        with pytest.raises(MlflowException, match="max_new_tokens must be between 1"):
            generator.predict(["Hello"], params={"max_new_tokens": 0})


def test_a_version_with_the_earlier_text_signature_still_loads_and_predicts(store, tmp_path, monkeypatch):
    """Versions registered before the list support declare a named `text` column: MLflow still
    enforces it for them, and DataFrames and {"inputs": [...]} over HTTP are answered as before."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.pyfunc import scoring_server
    from mlflow.types.schema import ColSpec, Schema

    from lmforge.registry import serving
    from tests.tiny_models import NEGATIVE, POSITIVE

    earlier = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                             outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))
    monkeypatch.setattr(serving, "classifier_signature", lambda: earlier)
    root = make_project(tmp_path / "proj", "earlier")
    register(root, monkeypatch, "sentiment")
    model = mlflow.pyfunc.load_model("models:/earlier-sentiment@challenger")
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == ["text"]
    assert model.predict(pd.DataFrame({"text": [POSITIVE, NEGATIVE]}))["label"].tolist() == ["positive", "negative"]
    answer = scoring_server.invocations(json.dumps({"inputs": [POSITIVE, NEGATIVE]}), "application/json", model, schema)
    assert answer.status == 200
    assert [p["label"] for p in json.loads(answer.response)["predictions"]] == ["positive", "negative"]

def test_missing_gate_metric_fails_clearly(store, tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "proj", "nogate", metrics={"loss": 0.4, "macro_f1": 0.7})
    with pytest.raises(SystemExit) as stop:
        register(root, monkeypatch, "sentiment")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no gate metric 'accuracy'" in err and "test_accuracy" in err and "macro_f1" in err
    assert client(store).search_model_versions("name = 'nogate-sentiment'") == []


def test_benchmark_figures_go_on_the_version_and_a_gate_may_name_one(store, tmp_path, monkeypatch):
    root = make_project(tmp_path / "proj", "bench")
    hellaswag = {"acc": 0.29, "acc_stderr": 0.045, "acc_norm": 0.31, "acc_norm_stderr": 0.046, "examples": 100}
    (root / "reports/evaluate/benchmarks.json").write_text(json.dumps(
        {"tasks": {"hellaswag": hellaswag, "winogrande": {"acc": 0.52, "acc_stderr": 0.05, "examples": 100}}}))
    (root / "reports/sft/benchmarks.json").write_text(json.dumps(
        {"tasks": {"hellaswag": {"base": {"acc_norm": 0.40}, "chat": {"acc_norm": 0.42}, "change_points": {}}}}))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key in ("lm", "chat"):
        params["register"][key]["gate"] = {"metric": "bench.hellaswag.acc_norm", "direction": "max", "min_gain": 0.0}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    register(root, monkeypatch, "lm", "chat")
    from lmforge.registry.registration import version_metrics

    lm_version = client(store).get_model_version("bench-lm", "1")
    lm, figures = lm_version.tags, version_metrics(client(store), lm_version)
    assert figures["bench.hellaswag.acc_norm"] == 0.31 and figures["bench.winogrande.acc"] == 0.52
    assert lm["gate.metric_key"] == "bench.hellaswag.acc_norm" and float(lm["gate.value"]) == 0.31
    assert figures["test.perplexity"] == 27.1
    chat = client(store).get_model_version("bench-chat", "1").tags
    # the chat model's figure is gated; the base model's, on the same documents, is its baseline
    assert float(chat["gate.value"]) == 0.42 and chat["baseline.metric_key"] == "base.bench.hellaswag.acc_norm"
    assert float(chat["baseline.value"]) == 0.40


def training_run(root: Path, stage: str, report: str, artifact_path: str | None = None) -> str:
    """A finished run of `stage` as the training stages leave one: its report file and a plot."""
    from lmforge.registry import tracking

    plot = root / "plot" / f"{stage}_curve.png"
    plot.parent.mkdir(exist_ok=True)
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + stage.encode())
    with tracking.stage_run(stage, {"seed": 1}, root=root) as mlrun:
        mlrun.log_artifact(root / report, artifact_path)
        mlrun.log_artifact(plot, artifact_path)
    return mlrun.run_id


def test_a_version_reads_first_in_its_description_with_a_few_key_tags(store, tmp_path, monkeypatch):
    """The description: gate figure against the baseline, first version, commit, data, the training
    run's link, the trace command. A few tags; the training run's id; its plots on the register run;
    the logged model named as the registered one, scored on the datasets under their DVC hash."""
    import mlflow

    root = make_project(tmp_path / "proj", "card")
    write_metrics(root, {"test_accuracy": 0.5, "baseline_tfidf": {"test": {"accuracy": 0.4}}})
    decoy = training_run(root, "finetune", "reports/finetune/metrics.json")  # an earlier finetune, another model
    write_metrics(root, 0.8)
    make_project(root, "card")  # dvc.lock as finetune left it now
    trained = training_run(root, "finetune", "reports/finetune/metrics.json")
    (root / "reports/pretrain").mkdir(parents=True, exist_ok=True)
    (root / "reports/pretrain/metrics.json").write_text(json.dumps({"best_val_loss": 3.1}))
    pretrained = training_run(root, "pretrain", "reports/pretrain/metrics.json", "reports")
    register(root, monkeypatch, "sentiment", "lm")
    mlflow_client = client(store)
    version = mlflow_client.get_model_version("card-sentiment", "1")
    tags, text = version.tags, version.description
    experiment = mlflow_client.get_run(trained).info.experiment_id

    assert "**card-sentiment version 1**: `test_accuracy` 0.8 (higher is better) vs its TF-IDF baseline 0.6: beats it" in text
    assert "First version to face the gate: there was no `@champion` to replace" in text
    assert "@" not in text.replace("`@champion`", "")  # a bare @word: a link to a GitHub user in MLflow's markdown
    assert f"commit `{head(root)}` (dirty: false)" in text
    assert "data `data/split/task` hash `0123456789abcdef0123456789abcdef`" in text
    assert f"finetune run: [finetune](#/experiments/{experiment}/runs/{trained}) (training run" in text
    assert f"(#/experiments/{experiment}/runs/{version.run_id}) (lineage.json; plots: [finetune_curve.png]" \
           f"(#/experiments/{experiment}/runs/{version.run_id}/artifacts/plots/finetune/finetune_curve.png))" in text
    assert "`lmforge trace models:/card-sentiment/1`" in text and decoy not in text
    assert len(text.splitlines()) <= 15 and len(text) < 1500

    assert len(tags) <= 16, sorted(tags)
    assert tags["training_run_id"] == trained
    for key in ("git_commit", "git_dirty", "dvc.dep.data/split/task", "params.sha256", "gate.metric_key", "gate.value",
                "baseline.value", "lmforge.fingerprint"):
        assert key in tags, key
    assert not any(key.startswith("metric.") for key in tags) and "params" not in tags
    register_artifacts = [a.path for a in mlflow_client.list_artifacts(version.run_id, "plots/finetune")]
    assert register_artifacts == ["plots/finetune/finetune_curve.png"]
    lm = mlflow_client.get_model_version("card-lm", "1")
    assert lm.tags["training_run_id"] == pretrained
    # the UI files the experiment under "Machine learning" (its "Model training" view), not GenAI
    assert mlflow_client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    # the logged model: named after the registered model; its metrics name the datasets it was scored on
    model_id = lambda v: v.model_id or v.source.removeprefix("models:/")  # noqa: E731  (a SQL registry keeps the source only)
    model = mlflow.get_logged_model(model_id(version))
    assert model.name == "card-sentiment" and mlflow.get_logged_model(model_id(lm)).name == "card-lm"
    used = {(m.dataset_name, m.dataset_digest) for m in model.metrics if m.dataset_name}
    assert used == {(f"task-{split}", "0123456789abcdef0123456789abcdef") for split in ("train", "val", "test")}
    lm_used = {(m.dataset_name, m.dataset_digest) for m in mlflow.get_logged_model(model_id(lm)).metrics}
    assert lm_used == {("tokens", lm.tags["dvc.dep.data/tokens"].removesuffix(".dir"))}
    # the model's gated figure and its baseline's, side by side in the register run
    figures = mlflow_client.get_run(version.run_id).data.metrics
    assert (figures["test_accuracy"], figures["baseline.test_accuracy"]) == (pytest.approx(0.8), pytest.approx(0.6))


def test_trace_says_who_moved_the_champion_and_what_it_replaced(store, tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "proj", "moved", metrics={"test": {"accuracy": 0.8},
                                                              "baseline_tfidf": {"test": {"accuracy": 0.6}}})
    name, mlflow_client = "moved-sentiment", client(store)
    register(root, monkeypatch, "sentiment")
    code, out, _ = cli(root, monkeypatch, capsys, "trace", f"models:/{name}/1")
    assert code == 0 and "gate:         not promoted by lmforge promote; registered with `test.accuracy` 0.8" in out
    assert "@champion:    not set" in out
    assert cli(root, monkeypatch, capsys, "promote", name)[0] == 0
    code, out, _ = cli(root, monkeypatch, capsys, "trace", f"models:/{name}@champion")
    assert "gate:         passed: beats its TF-IDF baseline (0.8 vs 0.6)" in out
    assert "replaced:     no champion (the first one)" in out
    assert "@champion:    version 1, set by `lmforge promote` at " in out

    make_project(root, "moved", metrics={"test": {"accuracy": 0.9}, "baseline_tfidf": {"test": {"accuracy": 0.6}}}, lr=1e-4)
    register(root, monkeypatch, "sentiment")
    assert "`@champion` when registered: version 1 (`test.accuracy` 0.8)" in mlflow_client.get_model_version(name, "2").description
    assert cli(root, monkeypatch, capsys, "promote", name)[0] == 0
    promoted = mlflow_client.get_model_version(name, "2")
    assert promoted.tags["promoted_via"] == "lmforge promote"
    assert promoted.description.startswith("**`@champion` since ") and "replacing version 1 (`test.accuracy` 0.8)" in promoted.description
    code, out, _ = cli(root, monkeypatch, capsys, "trace", f"models:/{name}@champion")
    assert "replaced:     version 1 (0.8)" in out and "@champion:    version 2, set by `lmforge promote`" in out

    # the alias pencil of MLflow's UI (the same API call): the champion moves back, no gate
    mlflow_client.set_registered_model_alias(name, "champion", "1")
    code, out, _ = cli(root, monkeypatch, capsys, "trace", f"models:/{name}@champion")
    assert code == 0 and f"models:/{name}@champion -> {name} version 1" in out
    assert ("@champion:    version 1, moved outside `lmforge promote` (MLflow UI alias pencil or API): the gate was "
            "not applied (the last `lmforge promote` made: version 2 at ") in out


def test_trace_reads_a_version_registered_with_the_earlier_tag_set(store, tmp_path, monkeypatch, capsys):
    """Versions registered before lineage.json kept the whole lineage carry it as tags (metric.*,
    params, every dvc.dep.*): trace reads them from there, and an earlier promotion counts."""
    root = make_project(tmp_path / "proj", "earliertags")
    register(root, monkeypatch, "sentiment")
    name, mlflow_client = "earliertags-sentiment", client(store)
    version = mlflow_client.get_model_version(name, "1")
    mlflow_client.delete_model_version_tag(name, "1", "params.sha256")
    for key, value in {"params": json.dumps({"finetune": {"learning_rate": 7e-5}}), "metric.test_accuracy": "0.77",
                       "dvc.dep.tasks/finetune.py": "2" * 32, "promoted_at": "2026-01-01T00:00:00+00:00"}.items():
        mlflow_client.set_model_version_tag(name, "1", key, value)
    mlflow_client.set_registered_model_alias(name, "champion", "1")
    code, out, _ = cli(root, monkeypatch, capsys, "trace", f"models:/{name}@champion")
    assert code == 0 and f"run:          {version.run_id}" in out
    assert "finetune.learning_rate = 5e-05" in out  # lineage.json's: that run had one too
    assert "test_accuracy = 0.77   <- gate" in out  # the metric.* tags, where a version has them
    assert "tasks/finetune.py: " + "2" * 32 in out
    assert "@champion:    version 1, set by `lmforge promote` at 2026-01-01T00:00:00+00:00 (recorded on the version)" in out


def test_without_dvc_lock_lineage_says_so(store, tmp_path, monkeypatch):
    root = make_project(tmp_path / "proj", "nolock", lock=False)
    register(root, monkeypatch, "sentiment")
    tags = client(store).get_model_version("nolock-sentiment", "1").tags
    assert tags["dvc.lock"].startswith("absent")
    assert not any(key.startswith("dvc.dep.") for key in tags)


def test_a_masked_lm_is_skipped_not_failed(store, tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "proj", "masked", lock=False)  # its folder is edited below
    config = json.loads((root / "models/pretrained/config.json").read_text())
    (root / "models/pretrained/config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    report = register(root, monkeypatch, "lm")
    assert "not a causal LM" in report["models"]["lm"]["skipped"]
    assert "skipped" in capsys.readouterr().err
    assert client(store).search_model_versions("name = 'masked-lm'") == []


def test_a_folder_that_differs_from_dvc_lock_is_refused(store, tmp_path, monkeypatch, capsys):
    """Lineage comes from dvc.lock: registration hashes the folder again and refuses a mismatch."""
    root = make_project(tmp_path / "proj", "tampered")
    weights = next((root / "models/finetuned").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte after `dvc repro` wrote it
    with pytest.raises(SystemExit) as stop:
        register(root, monkeypatch, "sentiment")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "models/finetuned is not what dvc.lock says" in err and "dvc repro finetune" in err
    assert client(store).search_model_versions("name = 'tampered-sentiment'") == []


def test_a_changed_server_registers_a_new_version(store, tmp_path, monkeypatch):
    """The fingerprint covers the pyfunc code a version bundles: a fix to the request guard
    reaches the registry though the model and params are unchanged."""
    root = make_project(tmp_path / "proj", "served-code")
    source = tmp_path / "src"
    shutil.copytree(ROOT / "lmforge", source / "lmforge", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": f"{source}{os.pathsep}{ROOT}", "MLFLOW_TRACKING_URI": store}

    def register_with_copy() -> dict:
        run([sys.executable, "-m", "tasks.register", "--only", "sentiment"], root, env=env)
        return json.loads((root / "reports/register.json").read_text())["models"]["sentiment"]

    first = register_with_copy()
    assert (first["version"], first["registered"]) == (1, True)
    assert register_with_copy()["registered"] is False  # nothing changed: nothing new
    guard = source / "lmforge/registry/guard.py"
    guard.write_text(guard.read_text() + "\n# a fix to the served code\n")
    fixed = register_with_copy()
    assert (fixed["version"], fixed["registered"]) == (2, True)
    assert fixed["fingerprint"] != first["fingerprint"]
    import mlflow

    bundled = Path(mlflow.artifacts.download_artifacts("models:/served-code-sentiment/2", dst_path=str(tmp_path / "v2")))
    assert "# a fix to the served code" in (bundled / "code/lmforge/registry/guard.py").read_text()


# --- promote and trace --------------------------------------------------------------------------


def test_promotion_gate_both_ways_and_forced(store, tmp_path, monkeypatch, capsys):
    # the finetune stage's layout: nested per split, with other accuracies beside (baseline, majority)
    nested = lambda acc: {"test": {"accuracy": acc, "macro_f1": acc - 0.1}, "majority_test_accuracy": 0.5,
                          "baseline_tfidf": {"test": {"accuracy": 0.70}}}
    root = make_project(tmp_path / "proj", "gate", metrics=nested(0.80))
    name = "gate-sentiment"
    mlflow_client = client(store)
    register(root, monkeypatch, "sentiment")

    code, out, _ = cli(root, monkeypatch, capsys, "promote", name)  # no champion yet: v1 becomes it
    assert code == 0 and "no @champion yet" in out
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "1"
    assert cli(root, monkeypatch, capsys, "promote", name)[0] == 0  # already champion: nothing to do

    # a worse challenger (another model: other params) fails the gate; both figures are shown
    make_project(root, "gate", metrics=nested(0.75), lr=1e-4)
    assert register(root, monkeypatch, "sentiment")["models"]["sentiment"]["version"] == 2
    code, out, err = cli(root, monkeypatch, capsys, "promote", name)
    assert code == 1
    assert "not promoted" in err and "0.75" in err and "0.8" in err and "gain -0.05" in err
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(mlflow_client.get_model_version_by_alias(name, "challenger").version) == "2"

    # --force needs a reason; with one it moves champion and records who and why
    with pytest.raises(SystemExit) as stop:
        cli(root, monkeypatch, capsys, "promote", name, "--force")
    assert stop.value.code == 2
    code, out, _ = cli(root, monkeypatch, capsys, "promote", name, "--force", "--reason", "rollback drill")
    assert code == 0 and "forced" in out
    forced = mlflow_client.get_model_version_by_alias(name, "champion")
    assert str(forced.version) == "2"
    assert forced.tags["forced"] == "true"
    assert forced.tags["force_reason"] == "rollback drill"
    assert forced.tags["forced_by"] == getpass.getuser()
    assert forced.tags["promoted_over"] == "1"

    # a better challenger passes the gate
    make_project(root, "gate", metrics=nested(0.90), lr=2e-4)
    register(root, monkeypatch, "sentiment")
    code, out, _ = cli(root, monkeypatch, capsys, "promote", name)
    assert code == 0 and "gate passes" in out and "0.9" in out and "0.75" in out
    champion = mlflow_client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "3" and "forced" not in champion.tags
    assert all(not v.current_stage or v.current_stage == "None" for v in mlflow_client.search_model_versions(f"name = '{name}'"))

    # an unknown name is a user error
    assert cli(root, monkeypatch, capsys, "promote", "no-such-model")[0] == 2


def test_a_promotion_never_moves_over_a_champion_it_was_not_judged_against(store, tmp_path, monkeypatch, capsys):
    """Judge and move are one step: when @champion moves while a challenger is being judged (a
    promotion from another machine on a shared registry), the judged challenger is not moved."""
    from mlflow import MlflowClient

    from lmforge.config import load_params
    from lmforge.registry import registration as registry

    scored = lambda acc: {"test": {"accuracy": acc}, "baseline_tfidf": {"test": {"accuracy": 0.5}}}  # noqa: E731
    root = make_project(tmp_path / "proj", "race", metrics=scored(0.80))
    name, mlflow_client = "race-sentiment", client(store)
    register(root, monkeypatch, "sentiment")
    assert cli(root, monkeypatch, capsys, "promote", name)[0] == 0  # v1 champion
    make_project(root, "race", metrics=scored(0.85), lr=1e-4)
    register(root, monkeypatch, "sentiment")  # v2 challenger: beats v1

    class Interleaved(MlflowClient):
        """A real client; after the judging reads, a rival registers v3 (0.95) and makes it champion."""
        reads = 0

        def get_model_version_by_alias(self, model, alias):
            Interleaved.reads += 1
            if Interleaved.reads == 3:  # standing() read challenger and champion: the judging is done
                make_project(root, "race", metrics=scored(0.95), lr=2e-4)
                register(root, monkeypatch, "sentiment")
                mlflow_client.set_registered_model_alias(name, "champion", "3")
            return super().get_model_version_by_alias(model, alias)

    gate = load_params(root / "params.yaml").register_.sentiment.gate
    decision = registry.promote(name, gate, client=Interleaved(tracking_uri=store, registry_uri=store))
    assert not decision.promoted and not decision.passed
    assert "@champion moved to version 3 while version 2 was judged against version 1" in decision.message
    champion = mlflow_client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "3" and "promoted_at" not in mlflow_client.get_model_version(name, "2").tags


def test_the_promote_flow_cannot_force():
    """Forcing past the gate is a person's act at a terminal (recorded), not a flow parameter."""
    import inspect

    from flows.actions import promote, tune_worker

    assert "force" not in inspect.signature(promote.fn).parameters
    assert "storage" not in inspect.signature(tune_worker.fn).parameters  # a Secret block's name instead


def test_a_challenger_that_does_not_beat_its_baseline_is_never_promoted(store, tmp_path, monkeypatch, capsys):
    """The classifier's TF-IDF baseline figure is recorded at registration; promote refuses a
    challenger at or below it (even with no champion, even one the champion trails), --force overrides."""
    scored = lambda acc, baseline: {"test": {"accuracy": acc}, "baseline_tfidf": {"test": {"accuracy": baseline}}}
    root = make_project(tmp_path / "proj", "base", metrics=scored(0.79, 0.82))
    name = "base-sentiment"
    mlflow_client = client(store)
    register(root, monkeypatch, "sentiment")
    tags = mlflow_client.get_model_version(name, "1").tags
    assert (tags["baseline.name"], tags["baseline.metric_key"]) == ("TF-IDF baseline", "baseline_tfidf.test.accuracy")
    assert float(tags["baseline.value"]) == pytest.approx(0.82)

    code, _, err = cli(root, monkeypatch, capsys, "promote", name)  # no champion: still refused
    assert code == 1
    assert "does not beat its TF-IDF baseline" in err and "accuracy 0.79 vs 0.82" in err
    assert client(store).get_registered_model(name).aliases.get("champion") is None

    code, out, _ = cli(root, monkeypatch, capsys, "promote", name, "--force", "--reason", "demo of a forced loser")
    assert code == 0 and "forced" in out and "does not beat its TF-IDF baseline" in out
    forced = mlflow_client.get_model_version_by_alias(name, "champion")
    assert forced.tags["force_reason"] == "demo of a forced loser"
    assert float(forced.tags["gate.baseline_value"]) == pytest.approx(0.82)

    # above its baseline and above the champion: promoted, the message shows both comparisons
    make_project(root, "base", metrics=scored(0.85, 0.82), lr=1e-4)
    register(root, monkeypatch, "sentiment")
    code, out, _ = cli(root, monkeypatch, capsys, "promote", name)
    assert code == 0 and "beats its TF-IDF baseline (0.85 vs 0.82)" in out and "gate passes" in out
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "2"

    # better than the champion but not than its own baseline: refused all the same
    make_project(root, "base", metrics=scored(0.86, 0.90), lr=2e-4)
    register(root, monkeypatch, "sentiment")
    code, _, err = cli(root, monkeypatch, capsys, "promote", name)
    assert code == 1 and "does not beat its TF-IDF baseline" in err and "0.86 vs 0.9" in err
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "2"


def test_a_missing_baseline_figure_fails_registration(store, tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "proj", "nobase", metrics={"test": {"accuracy": 0.8}, "baseline_tfidf": {"seconds": 2}})
    with pytest.raises(SystemExit) as stop:
        register(root, monkeypatch, "sentiment")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no TF-IDF baseline figure for 'accuracy'" in err and "baseline_tfidf.test.accuracy" in err
    assert client(store).search_model_versions("name = 'nobase-sentiment'") == []


def test_min_gain_and_min_direction(store, tmp_path, monkeypatch, capsys):
    """The gate's direction and minimum gain, on the LM (lower perplexity is better)."""
    root = make_project(tmp_path / "proj", "lmgate")
    name = "lmgate-lm"
    register(root, monkeypatch, "lm")
    assert cli(root, monkeypatch, capsys, "promote", name)[0] == 0
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["register"]["lm"]["gate"]["min_gain"] = 5.0
    params["pretrain"] = {**(params.get("pretrain") or {}), "learning_rate": 0.001}  # another model: a new version
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "reports/evaluate/metrics.json").write_text(json.dumps({"test": {"perplexity": 25.0}}))
    register(root, monkeypatch, "lm")
    code, _, err = cli(root, monkeypatch, capsys, "promote", name)  # 27.1 -> 25.0: better, but by < 5
    assert code == 1 and "minimum gain 5" in err and "+2.1" in err


def test_trace_prints_commit_data_params_metrics_and_rebuild(store, tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "proj", "trace")
    register(root, monkeypatch, "sentiment")
    assert cli(root, monkeypatch, capsys, "promote", "trace-sentiment")[0] == 0
    code, out, _ = cli(root, monkeypatch, capsys, "trace", "models:/trace-sentiment@champion")
    assert code == 0
    commit = head(root)
    assert f"commit:       {commit}" in out
    assert "data/split/task: 0123456789abcdef0123456789abcdef.dir" in out
    assert "task-train [training] digest 0123456789abcdef0123456789abcdef" in out
    assert "tasks/finetune.py: 11111111111111111111111111111111" in out  # from lineage.json: not a version tag
    assert "finetune.learning_rate = 5e-05" in out
    assert "test_accuracy = 0.8   <- gate" in out
    assert f"git checkout {commit} && dvc repro register" in out
    assert cli(root, monkeypatch, capsys, "trace", "models:/trace-sentiment@nobody")[0] == 2
    assert cli(root, monkeypatch, capsys, "trace", "not-a-uri")[0] == 2


def test_register_params_are_validated():
    from lmforge.config import ConfigError, validate_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["register"]["sentiment"]["gate"]["direction"] = "up"
    with pytest.raises(ConfigError, match="register.sentiment.gate.direction"):
        validate_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["register"]["sentiment"]["gate"]["min_gian"] = 0.1
    with pytest.raises(ConfigError, match="register.sentiment.gate.min_gian"):
        validate_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["register"]["lm"]["name"] = raw["register"]["sentiment"]["name"]
    with pytest.raises(ConfigError, match="own name"):
        validate_params(raw)


@pytest.mark.slow
def test_dvc_repro_runs_the_register_stage(store, dvc_repo, monkeypatch):
    """dvc.yaml's register stage runs through `dvc repro`, writes its report, and is cached after."""
    make_project(dvc_repo, "dvc")  # models, metrics and splits as the training stages leave them
    (dvc_repo / "dvc.lock").unlink()
    first = run(["dvc", "repro", "--single-item", "register"], dvc_repo)
    assert "Running stage 'register'" in first.stdout
    report = json.loads((dvc_repo / "reports/register.json").read_text())
    assert {m["name"]: m["version"] for m in report["models"].values()} == {"dvc-sentiment": 1, "dvc-lm": 1, "dvc-chat": 1}
    assert "register" in yaml.safe_load((dvc_repo / "dvc.lock").read_text())["stages"]
    second = run(["dvc", "repro", "--single-item", "register"], dvc_repo)
    assert "Running stage 'register'" not in second.stdout

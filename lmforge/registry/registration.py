"""The MLflow model registry side of lmforge: register with lineage, gated promotion, tracing.

    register_model(spec, params, root, lineage=...)   log one model folder as a pyfunc, register it, alias @challenger
    promote(name, gate, force=..., reason=...)   move @champion to @challenger behind the gate
    trace("models:/lmforge-sentiment@champion")   gate, who moved @champion, commit, data hashes, params, metrics, rebuild

Registration is idempotent: each version carries a fingerprint (the hash of every file of the model
folder, of the params that made it, and of the pyfunc code and requirements it bundles); when the latest version of the name carries the same
fingerprint, nothing is logged or registered. Lineage (git commit and dirty flag, the caller's
build tags such as the hashes of the inputs that built the model, params, metrics, gate figure)
goes whole into the run's lineage.json and its tags; the version carries the key facts only
(commit, dirty flag, data hashes, params digest, gate figures, the training run's id) and a
markdown description a person reads first (the gated figure against its baseline and the
champion, the commit, the data, links to the training runs, the `lmforge trace` command), so
`models:/NAME@ALIAS` alone leads back to all of it. The datasets are logged with `mlflow.log_input`
under the caller's DVC hash (the one the data tags carry) and linked to the logged model through
its metrics, which the logged model, named after the registered model, carries beside its baseline's.

This module knows no pipeline layout: where a model, its metrics and its data lie comes in a
ModelSpec, and the build system's lineage comes in as tags and DataInputs.

A registered version is self-contained: the pyfunc's modules travel in it (code_paths: the
closure of lmforge/registry/serving.py, see PYFUNC_MODULES) and its requirements.txt pins the
installed versions of what loading and predicting import, so `mlflow.pyfunc.load_model` and
`mlflow models serve` work in an environment without lmforge.

The gate: a model whose spec names a baseline (the classifier's TF-IDF baseline) has that
baseline's figure recorded on its version at registration, and `promote` never promotes a
challenger that does not beat it, whatever the champion; then the challenger must beat the
champion by the gate's minimum gain.

Promotion only moves aliases; MLflow's deprecated stages are never used. `promote` records each move
on the registered model (PROMOTED_VERSION), so `trace` tells a champion moved outside it (the
MLflow UI's alias pencil, the API), past the gate, from one it moved. mlflow is imported inside
the functions: this module is not on the training path.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from lmforge.errors import UserError
from lmforge.flat import flatten
from lmforge.hashing import file_digest
from lmforge.redaction import redact
from lmforge.registry import tracking

CHALLENGER = "challenger"
CHAMPION = "champion"
FINGERPRINT = "lmforge.fingerprint"
SERVING = "lmforge.serving"  # a version tag's key: unchanged since the first registrations
PARAMS_DIGEST = "params.sha256"  # the sha256 of the (redacted) params JSON, which lineage.json holds
TRAINING_RUN = "training_run_id"  # the run of the stage that trained the model (its plots are there)
LINEAGE_FILE = "lineage.json"  # the register run's artifact holding the whole lineage
# Registered model tags: the version `lmforge promote` last made champion, and when.
PROMOTED_VERSION, PROMOTED_AT = "lmforge.promoted_version", "lmforge.promoted_at"
PROMOTED_VIA = "lmforge promote"
_UNSAFE = re.compile(r"[^\w./\- :]")
_PREFIXES = ("", "test.", "test_", "eval_", "eval.", "val.", "val_", "validation.", "validation_")


class RegistryError(UserError):
    """A user-facing failure: a missing input, an unknown name or alias, a missing gate metric."""


class NotServable(RegistryError):
    """The model exists but no lmforge pyfunc serves its kind (a masked LM): skipped, not failed."""


# --- what gets registered -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model to register; every path is relative to the project root given beside it."""

    key: str  # its section under `register` in the params ("sentiment", "lm")
    kind: str  # "classifier" | "generator" | "chat": the pyfunc that serves it
    folder: str  # the transformers folder
    metrics: str  # the metrics JSON that scored it
    params_sections: tuple[str, ...]  # dotted params sections that made it
    datasets: str  # the folder of {train,val,test}.parquet it was trained and scored on
    rebuild: tuple[str, ...] = field(default=())  # the build steps that make it, kept as a tag
    build_hint: str = "build it first"  # what a user runs when the folder holds no model yet
    # The dotted params key of the length the model was trained to read: served requests are cut
    # to it (None: the serving default).
    max_length_key: str | None = None
    # The section of the metrics JSON holding the figures of the baseline this model must beat
    # (None: no baseline); its gate metric is looked up there as in the model's own metrics.
    baseline: str | None = None
    baseline_name: str = "baseline"  # how messages and the summary call it ("TF-IDF baseline")
    # The lm-evaluation-harness report that scored it (None: none): its figures join the metrics as
    # bench.<task>.<metric>, so they are recorded on the version and a gate may name one.
    benchmarks: str | None = None
    # The runs of the stages that made it, the first the training run (its id a version tag).
    training_runs: tuple["RunLink", ...] = ()


@dataclass(frozen=True)
class RunLink:
    """How a version finds the MLflow run of a stage that made it: the latest finished run tagged
    stage=`stage` whose artifact `artifact` is the file `report` (relative to the project root)."""

    stage: str
    artifact: str
    report: str


@dataclass(frozen=True)
class DataInput:
    """A dataset known only by its hash (no files at hand), logged as a meta-only MLflow dataset."""

    name: str
    path: str  # relative to the project root
    digest: str


def resolve_tracking_uri(params=None, root: Path | str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else register.tracking_uri of params.yaml, else sqlite:///<repo>/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    configured = getattr(getattr(params, "register_", None), "tracking_uri", None)
    return configured or tracking.tracking_uri(root)


@contextmanager
def using(uri: str) -> Iterator[Any]:
    """Point MLflow (tracking and registry, fluent API and tracking.stage_run) at `uri`; yield a client."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # the training runs' reports and lineage.json are fetched as artifacts: no progress bar for each
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow import MlflowClient

    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking.keep_credentials_quiet(uri)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    # mlflow keeps the URIs as module globals: put back whatever was set (None: follow the env).
    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        if hasattr(tracking_utils, "_tracking_uri"):
            tracking_utils._tracking_uri = saved[0]
        if hasattr(registry_utils, "_registry_uri"):
            registry_utils._registry_uri = saved[1]


# --- lineage ------------------------------------------------------------------------------------


def section(params_dump: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params_dump
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def relevant_params(params, spec: ModelSpec) -> dict[str, Any]:
    dump = params.model_dump(mode="json", by_alias=True)
    return {dotted: section(dump, dotted) for dotted in spec.params_sections}


def fingerprint(folder: Path, params_payload: Mapping[str, Any]) -> str:
    """sha256 over every file of the model folder (path and content) and the canonical params JSON."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_digest(path).encode() + b"\n")
    digest.update(json.dumps(params_payload, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def numeric_metrics(payload: Any) -> dict[str, float]:
    """The numbers of a metrics JSON under dotted keys; booleans, text and NaN left out (no figure
    to gate on), names cut to what MLflow takes (word characters, / . - : and space)."""
    return {_UNSAFE.sub("_", key): float(value) for key, value in flatten(payload).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value}


BENCHMARK_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def benchmark_metrics(report: Mapping[str, Any], baseline: str | None = None) -> dict[str, float]:
    """bench.<task>.<metric> of a benchmark report: evaluate's ({"tasks": {name: {acc, ...}}}) or
    sft's, whose tasks hold the tuned model's figures under "chat" and the base model's under
    "base" (those as <baseline>.bench.<task>.<metric>, where the gate finds a baseline's figures)."""
    found: dict[str, float] = {}
    for name, task in (report.get("tasks") or {}).items():
        sides = [("", task.get("chat", task))] + ([(f"{baseline}.", task["base"])] if baseline and "base" in task else [])
        for prefix, scores in sides:
            found.update({f"{prefix}bench.{name}.{metric}": float(scores[metric]) for metric in BENCHMARK_METRICS
                          if isinstance(scores.get(metric), (int, float)) and not isinstance(scores.get(metric), bool)})
    return found


def find_metric(metrics: Mapping[str, float], metric: str) -> tuple[str, float] | None:
    """The (key, value) for a gate metric: the exact key first, then test_/test./eval_/val. forms."""
    for prefix in _PREFIXES:
        if f"{prefix}{metric}" in metrics:
            return f"{prefix}{metric}", metrics[f"{prefix}{metric}"]
    return None


def _git_lineage(root: Path) -> dict[str, str]:
    return tracking.git_facts(root)


def _datasets(root: Path, folder: str, known_by_hash: Sequence[DataInput]) -> list[tuple[Any, str]]:
    """(mlflow dataset, context) for each split parquet; when there are none, a meta-only dataset
    for each of `known_by_hash` (a fresh checkout, a remote cache). A split's digest is the hash
    `known_by_hash` gives its folder (the DVC hash the version's data tag carries), else its md5."""
    import mlflow.data
    import pandas as pd

    split_dir = root / folder
    name = Path(folder).name
    folder_digest = next((d.digest for d in known_by_hash if d.path.rstrip("/") == folder.rstrip("/")), None)
    found = []
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        path = split_dir / f"{split}.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
            targets = "label" if "label" in frame.columns else None
            with warnings.catch_warnings():
                # a local path "can be interpreted in multiple ways" (two local source kinds): noise
                warnings.filterwarnings("ignore", message="The specified dataset source", category=UserWarning)
                dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=f"{name}-{split}",
                                                  targets=targets, digest=folder_digest or file_digest(path, "md5"))
            found.append((dataset, context))
    if not found:
        found = [(_meta_dataset(root, data), "training") for data in known_by_hash]
    return found


def _meta_dataset(root: Path, data: DataInput):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source", category=UserWarning)
        source = resolve_dataset_source(str((root / data.path).resolve()))
    return MetaDataset(source, name=data.name, digest=data.digest)


# --- register -----------------------------------------------------------------------------------


# What a registered pyfunc imports to load and predict (cloudpickle unpickles the wrapper): pinned
# at the installed versions in its requirements.txt.
PYFUNC_REQUIREMENTS = ("mlflow", "cloudpickle", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")
# The modules the pyfunc runs (the wrappers, the request guard, their packages): copied into the
# model, so that lmforge.registry.serving, the module path its wrapper class is pickled by, resolves
# where lmforge is not installed. serving.py and guard.py import nothing else of lmforge.
PYFUNC_MODULES = ("lmforge", "lmforge.registry", "lmforge.registry.serving", "lmforge.registry.guard")


def requirements() -> list[str]:
    """PYFUNC_REQUIREMENTS as `name==version` (a local build tag such as torch's +cpu dropped:
    an index serves the plain version)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            raise RegistryError(f"{package} is not installed: a registered model pins it as a requirement") from None
    return pins


def stage_pyfunc_code(into: Path) -> Path:
    """Copy PYFUNC_MODULES into `into`/lmforge (package layout kept); returns that folder, the
    model's one code path."""
    import importlib.util
    import shutil

    package_root = Path(importlib.util.find_spec("lmforge").origin).parent.parent
    for module in PYFUNC_MODULES:
        source = Path(importlib.util.find_spec(module).origin)
        target = into / source.relative_to(package_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return into / "lmforge"


def pyfunc_identity() -> dict[str, Any]:
    """What a version bundles beside the model folder: the sha256 of each PYFUNC_MODULES file and
    the pinned requirements. Part of the fingerprint, so a change to either registers anew."""
    import importlib.util

    code = {module: file_digest(Path(importlib.util.find_spec(module).origin)) for module in PYFUNC_MODULES}
    return {"code": code, "requirements": requirements()}


def latest_version(client, name: str):
    """The newest version of a registered model, or None when the name has none."""
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version), default=None)


def _check_folder(folder: Path, spec: ModelSpec) -> None:
    if not (folder / "config.json").exists():
        raise RegistryError(f"{folder} holds no transformers model (no config.json): {spec.build_hint}")
    if spec.kind in ("generator", "chat"):
        config = json.loads((folder / "config.json").read_text())
        architectures = config.get("architectures") or []
        if not any(a.endswith("ForCausalLM") for a in architectures):
            raise NotServable(f"{folder} is a {', '.join(architectures) or 'model of unknown architecture'}, "
                              "not a causal LM: the generator pyfunc serves causal LMs only")


def register_model(spec: ModelSpec, params, root: Path | str, *, lineage: Mapping[str, str] | None = None,
                   version_lineage: Mapping[str, str] | None = None, data_inputs: Sequence[DataInput] = (),
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Log `spec`'s folder as a pyfunc with lineage and register it as a new @challenger version.

    lineage: the build system's tags (the hashes of what built the model), set on the run and kept
    whole in its lineage.json beside the git facts; version_lineage: those of them the version
    carries as tags (None: all); data_inputs: the datasets' hashes, their digests in MLflow (and the
    datasets to log when `spec.datasets` holds no split files here).

    Returns the report entry: name, version, aliases, run id, fingerprint and `registered` (False
    when the latest version already holds this fingerprint: then nothing was logged).
    Call it inside `using(uri)`.
    """
    from mlflow import MlflowClient

    if not tracking.enabled():
        raise RegistryError("MLflow tracking is off (LMFORGE_TRACKING=off or mlflow missing): nothing to register to")
    root = Path(root).resolve()
    folder = root / spec.folder
    model_params = getattr(params.register_, spec.key)
    name, gate = model_params.name, model_params.gate
    _check_folder(folder, spec)
    metrics, gate_figure = _gate_metrics(root, spec, gate)
    baseline = _baseline_figure(metrics, spec, gate)

    payload = relevant_params(params, spec)
    # The gate and the name say how the model is judged and filed, not what it is: left out. The
    # served code and its pins are part of what a version is: a fixed guard registers anew.
    print_ = fingerprint(folder, {**{k: v for k, v in payload.items() if k != f"register.{spec.key}"},
                                  "pyfunc": pyfunc_identity()})
    client = MlflowClient()
    latest = latest_version(client, name)
    if latest is not None and latest.tags.get(FINGERPRINT) == print_:
        log(f"register {spec.key}: {name} version {latest.version} already holds these inputs "
            f"(fingerprint {print_[:12]}): nothing new registered")
        return _entry(client, name, latest, registered=False, fingerprint_=print_)

    git = _git_lineage(root)
    key_tags = {**git, FINGERPRINT: print_, "gate.metric": gate.metric, "gate.metric_key": gate_figure[0],
                "gate.value": repr(gate_figure[1]), "gate.direction": gate.direction,
                PARAMS_DIGEST: hashlib.sha256(redact(params_json(payload)).encode()).hexdigest(),
                **(_baseline_tags(spec, baseline) if baseline else {})}
    filed = {"lmforge.model_key": spec.key, "lmforge.model_folder": spec.folder,
             "lmforge.rebuild_stages": ",".join(spec.rebuild)}  # the run's and lineage.json's, not the version's
    logged = LoggedModel(spec=spec, name=name, folder=folder, payload=payload, metrics=metrics,
                         tags={**key_tags, **filed, **(lineage or {})}, fingerprint=print_,
                         serving_config=serving_config(params, spec),
                         version_tags={**key_tags, **((lineage if version_lineage is None else version_lineage) or {})},
                         champion=_champion_figure(client, name, gate.metric))
    version, run_id = _log_and_register(logged, params, root, data_inputs, log)
    client.set_registered_model_alias(name, CHALLENGER, version)
    against = f" vs {spec.baseline_name} {baseline[1]:.6g}" if baseline else ""
    log(f"register {spec.key}: {name} version {version} @{CHALLENGER} (run {run_id}, "
        f"{gate_figure[0]} {gate_figure[1]:.6g}{against}, fingerprint {print_[:12]})")
    return _entry(client, name, client.get_model_version(name, version), registered=True, fingerprint_=print_)


def params_json(payload: Mapping[str, Any]) -> str:
    """The params that made a model as canonical JSON: what PARAMS_DIGEST hashes."""
    return json.dumps(payload, sort_keys=True, default=str)


def _champion_figure(client, name: str, metric: str) -> tuple[str, tuple[str, float] | None] | None:
    """(version, its gate figure) of `name@champion` now, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        champion = by_alias(client, name, CHAMPION)
    except MlflowException:
        return None  # no such registered model yet
    return None if champion is None else (str(champion.version), _figure(client, champion, metric))


def _gate_metrics(root: Path, spec: ModelSpec, gate) -> tuple[dict[str, float], tuple[str, float]]:
    """The model's metrics, flattened, and the one its gate is judged on (key, value)."""
    metrics_path = root / spec.metrics
    if not metrics_path.exists():
        raise RegistryError(f"{spec.metrics} is missing: the model has no evaluation to register it with")
    metrics = numeric_metrics(json.loads(metrics_path.read_text()))
    if spec.benchmarks and (root / spec.benchmarks).exists():
        metrics.update(benchmark_metrics(json.loads((root / spec.benchmarks).read_text()), spec.baseline))
    gate_figure = find_metric(metrics, gate.metric)
    if gate_figure is None:
        shown = ", ".join(sorted(metrics)) or "none"
        raise RegistryError(f"{spec.metrics} has no gate metric {gate.metric!r} (register.{spec.key}.gate.metric; "
                            f"looked for {', '.join(p + gate.metric for p in _PREFIXES)}); its numeric keys: {shown}")
    return metrics, gate_figure


BASELINE_NAME, BASELINE_KEY, BASELINE_VALUE = "baseline.name", "baseline.metric_key", "baseline.value"


def _baseline_figure(metrics: Mapping[str, float], spec: ModelSpec, gate) -> tuple[str, float] | None:
    """(key, value) of the gate metric in the spec's baseline section; None when it names none."""
    if spec.baseline is None:
        return None
    prefix = f"{spec.baseline}."
    inside = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
    found = find_metric(inside, gate.metric)
    if found is None:
        raise RegistryError(f"{spec.metrics} has no {spec.baseline_name} figure for {gate.metric!r} (looked for "
                            f"{', '.join(prefix + p + gate.metric for p in _PREFIXES[:3])}): the gate cannot check "
                            f"that the model beats its {spec.baseline_name}")
    return prefix + found[0], found[1]


def _baseline_tags(spec: ModelSpec, baseline: tuple[str, float]) -> dict[str, str]:
    return {BASELINE_NAME: spec.baseline_name, BASELINE_KEY: baseline[0], BASELINE_VALUE: repr(baseline[1])}


def serving_config(params, spec: ModelSpec) -> dict[str, Any]:
    """register.serving, plus the length the model was trained to read (spec.max_length_key), so a
    served classifier truncates requests as it was fine-tuned, and the request body cap the
    scoring server applies (lmforge/registry/guard.py)."""
    from lmforge.registry import serving

    config = {**params.register_.serving.model_dump()}
    length = section(params.model_dump(by_alias=True), spec.max_length_key) if spec.max_length_key else None
    if length:
        config["max_length"] = int(length)
    config["max_body_bytes"] = serving.body_limit(config)
    return config


@dataclass
class LoggedModel:
    """What one registration logs: the model folder and everything recorded beside it."""

    spec: ModelSpec
    name: str
    folder: Path
    payload: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]  # the whole lineage: the run's tags and its lineage.json
    fingerprint: str
    serving_config: dict[str, Any]
    version_tags: dict[str, str] = field(default_factory=dict)  # the key facts the version carries
    champion: tuple[str, tuple[str, float] | None] | None = None  # (version, figure) of @champion now


def _pyfunc(spec: ModelSpec, params):
    """The pyfunc wrapper, its signature and an input example for the model's kind."""
    import pandas as pd

    from lmforge.registry import serving

    if spec.kind == "classifier":
        example = ["A wonderful film, I loved it.", "A dull, tedious film."]
        return serving.TextClassifier(), serving.classifier_signature(), pd.DataFrame({serving.TEXT_COLUMN: example})
    signature = serving.generator_signature(params.register_.serving.max_new_tokens)
    if spec.kind == "chat":
        return serving.ChatGenerator(), signature, pd.DataFrame({serving.TEXT_COLUMN: ["Hi! How are you?"]})
    return serving.TextGenerator(), signature, pd.DataFrame({serving.TEXT_COLUMN: ["ROMEO:"]})


def _log_and_register(logged: LoggedModel, params, root: Path, data_inputs: Sequence[DataInput],
                      log: Callable[[str], None]) -> tuple[str, str]:
    """One MLflow run: lineage, datasets, the pyfunc model (named after the registered model), its
    metrics (linked to it and its datasets), the training runs' plots; registered as a new version
    with the key tags and a description. Returns (version, run id)."""
    import tempfile

    import mlflow

    spec = logged.spec
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="lmforge-pyfunc-") as staging, tracking.stage_run(
            f"register-{spec.key}", logged.payload, tags={**logged.tags, "register.model": logged.name},
            root=root, log=log) as run:
        run.log_dict({"params": logged.payload, "lineage": logged.tags, "metrics": logged.metrics}, LINEAGE_FILE)
        datasets = _datasets(root, spec.datasets, data_inputs)
        for dataset, context in datasets:
            mlflow.log_input(dataset, context=context)
        trained_by = training_runs(client, root, spec.training_runs)
        plots = copy_plots(client, trained_by, run, Path(staging) / "plots")
        model, signature, example = _pyfunc(spec, params)
        info = mlflow.pyfunc.log_model(
            name=logged.name, python_model=model, artifacts={"model": str(logged.folder)}, signature=signature,
            input_example=example, pip_requirements=requirements(), model_config=logged.serving_config,
            code_paths=[str(stage_pyfunc_code(Path(staging) / "code"))], tags={FINGERPRINT: logged.fingerprint})
        log_model_metrics(info.model_id, {**logged.metrics, **_beside_baseline(logged)}, datasets)
        version_tags = {**logged.version_tags, SERVING: json.dumps(logged.serving_config, sort_keys=True)}
        if trained_by:
            version_tags[TRAINING_RUN] = trained_by[0][1].info.run_id
            run.set_tags({TRAINING_RUN: trained_by[0][1].info.run_id})
        version = mlflow.register_model(info.model_uri, logged.name,
                                        tags={k: redact(str(v)) for k, v in version_tags.items()})
        run.set_tags({"register.version": version.version})
        card = Card(logged.name, str(version.version), version_tags, logged.champion, trained_by, plots,
                    (mlflow.active_run().info.experiment_id, run.run_id, f"register-{spec.key}"),
                    baseline_name=spec.baseline_name, data=data_inputs)
        client.update_model_version(logged.name, version.version, description=redact(describe(card)))
    return version.version, run.run_id


def _beside_baseline(logged: LoggedModel) -> dict[str, float]:
    """The baseline's figure for the gate metric as baseline.<gate key>, beside <gate key> in the run."""
    if BASELINE_VALUE not in logged.tags:
        return {}
    return {f"baseline.{logged.tags['gate.metric_key']}": float(logged.tags[BASELINE_VALUE])}


def log_model_metrics(model_id: str, metrics: Mapping[str, float], datasets: Sequence[tuple[Any, str]]) -> None:
    """Log `metrics` on the active run and the logged model, each split's with its dataset (a key
    naming the split: test_accuracy, baseline_tfidf.test.accuracy), so the logged model's page lists
    the datasets it was scored on; a split's row count goes with it (<split>.rows). Where no key
    names a split (a dataset known only by its hash), all go with the first dataset."""
    import mlflow

    left = dict(metrics)
    matched = []
    for dataset, _ in datasets:
        split = dataset.name.rsplit("-", 1)[-1]
        mine = {key: left.pop(key) for key in [k for k in left if split in re.split(r"[._]", k)]}
        frame = getattr(dataset, "df", None)
        if frame is not None:
            mine[f"{split}.rows"] = float(len(frame))
        matched.append((dataset, mine))
    if datasets and not any(mine for _, mine in matched):
        matched[0] = (matched[0][0], left)
        left = {}
    for dataset, mine in matched:
        if mine:
            mlflow.log_metrics(mine, model_id=model_id, dataset=dataset)
    if left:
        mlflow.log_metrics(left, model_id=model_id)


def training_runs(client, root: Path, links: Sequence[RunLink]) -> list[tuple[str, Any]]:
    """(stage, run) for each link whose run is found in this store's experiment: the latest of
    the last 20 finished runs of the stage whose logged `artifact` has the md5 of `report` now."""
    import tempfile

    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(tracking.experiment_name())
    found = []
    for link in links:
        report = root / link.report
        if experiment is None or not report.is_file():
            continue
        want = file_digest(report, "md5")
        candidates = client.search_runs([experiment.experiment_id],
                                        f"tags.stage = '{link.stage}' and attributes.status = 'FINISHED'",
                                        order_by=["attributes.start_time DESC"], max_results=20)
        for candidate in candidates:
            with tempfile.TemporaryDirectory(prefix="lmforge-link-") as scratch:
                try:
                    local = Path(client.download_artifacts(candidate.info.run_id, link.artifact, scratch))
                except (MlflowException, OSError):
                    continue
                if local.is_file() and file_digest(local, "md5") == want:
                    found.append((link.stage, candidate))
                    break
    return found


def copy_plots(client, trained_by: Sequence[tuple[str, Any]], run, scratch: Path) -> list[str]:
    """The .png artifacts of the training runs (top level and one folder down), logged again on
    the register run under plots/<stage>/, so the version's own run shows them. Returns their paths."""
    from mlflow.exceptions import MlflowException

    def listing(run_id: str, folder: str | None) -> list[Any]:
        try:
            return list(client.list_artifacts(run_id, folder))
        except (MlflowException, OSError):
            return []

    copied = []
    for stage, found in trained_by:
        run_id = found.info.run_id
        top = listing(run_id, None)
        items = top + [item for folder in top if folder.is_dir for item in listing(run_id, folder.path)]
        for item in (i for i in items if not i.is_dir and i.path.endswith(".png")):
            (scratch / stage).mkdir(parents=True, exist_ok=True)
            local = client.download_artifacts(run_id, item.path, str(scratch / stage))
            run.log_artifact(local, f"plots/{stage}")
            copied.append(f"plots/{stage}/{Path(item.path).name}")
    return copied


@dataclass
class Card:
    """What a version's description says (describe)."""

    name: str
    version: str
    tags: Mapping[str, str]  # the version's tags
    champion: tuple[str, tuple[str, float] | None] | None  # @champion when registered: (version, figure)
    runs: Sequence[tuple[str, Any]]  # (stage, MLflow run) that made the model, the training run first
    plots: Sequence[str]  # the training runs' plots copied onto the register run
    register_run: tuple[str, str, str]  # (experiment id, run id, run name)
    baseline_name: str = "baseline"
    data: Sequence[DataInput] = ()


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A markdown link to a run's page, relative to the MLflow UI (its hash routes)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


def gate_line(tags: Mapping[str, str], baseline_name: str = "baseline") -> str:
    """`key` value and, where one is recorded, the baseline's figure and whether the model beats it."""
    key, value, direction = tags["gate.metric_key"], float(tags["gate.value"]), tags.get("gate.direction", "max")
    line = f"`{key}` {value:.6g} ({'higher' if direction == 'max' else 'lower'} is better)"
    if BASELINE_VALUE in tags:
        base = float(tags[BASELINE_VALUE])
        beats = _better(value, base, direction) > 0
        line += (f" vs its {tags.get(BASELINE_NAME, baseline_name)} {base:.6g}: "
                 + ("beats it" if beats else "does not beat it, so `lmforge promote` refuses it"))
    return line


def describe(card: Card) -> str:
    """The version's description (markdown, one screen): the gated figure against its baseline and
    the champion, the commit, the data, the runs that made it, and the trace command."""
    tags = card.tags
    if card.champion is None:
        # aliases in backticks: MLflow's markdown makes a bare @word a link to a GitHub user
        champion = "First version to face the gate: there was no `@champion` to replace"
    else:
        figure = card.champion[1]
        champion = f"`@champion` when registered: version {card.champion[0]}" + (
            f" (`{figure[0]}` {figure[1]:.6g})" if figure else "")
    dirty = tags.get("git_dirty", "unknown")
    lines = [f"**{card.name} version {card.version}**: {gate_line(tags, card.baseline_name)}.", "",
             f"{champion}; `lmforge promote {card.name}` judges it against the champion of the day.", "",
             f"- commit `{tags.get('git_commit', 'unknown')}`"
             + (" **dirty** (uncommitted changes when registered)" if dirty == "true" else f" (dirty: {dirty})")]
    lines += [f"- data `{data.path}` hash `{data.digest}`" for data in card.data]
    lines.append(f"- params sha256 `{tags.get(PARAMS_DIGEST, 'unknown')[:16]}`")
    for stage, found in card.runs:
        lines.append(f"- {stage} run: {run_link(found.info.experiment_id, found.info.run_id, found.info.run_name or stage)}"
                     + (" (training run: curves and plots)" if found is card.runs[0][1] else ""))
    if not card.runs:
        lines.append("- training run: none found in this tracking store (trained elsewhere, or its run deleted)")
    experiment, run_id, run_name = card.register_run
    plots = [f"[{Path(p).name}](#/experiments/{experiment}/runs/{run_id}/artifacts/{p})" for p in card.plots]
    lines.append(f"- register run: {run_link(experiment, run_id, run_name)} (lineage.json"
                 + (f"; plots: {', '.join(plots)})" if plots else ")"))
    lines += ["", f"Everything else: `lmforge trace models:/{card.name}/{card.version}`"]
    return "\n".join(lines)


def _entry(client, name: str, version, *, registered: bool, fingerprint_: str) -> dict[str, Any]:
    aliases = sorted(client.get_registered_model(name).aliases.items())
    return {
        "name": name,
        "version": int(version.version),
        "aliases": [alias for alias, number in aliases if str(number) == str(version.version)],
        "run_id": version.run_id,
        "model_uri": f"models:/{name}/{version.version}",
        "fingerprint": fingerprint_,
        "registered": registered,
    }


# --- promote ------------------------------------------------------------------------------------


@dataclass
class Decision:
    promoted: bool
    passed: bool  # False: the gate refused (the caller exits non-zero)
    message: str
    challenger: str | None = None
    champion: str | None = None


def by_alias(client, name: str, alias: str):
    """The version behind `name@alias`, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def version_metrics(client, version) -> dict[str, float]:
    """The metrics recorded on a version (metric.* tags, on versions registered before their
    register run held them all), else those of its run."""
    metrics = {}
    for key, value in version.tags.items():
        if key.startswith("metric."):
            try:
                metrics[key[len("metric."):]] = float(value)
            except ValueError:
                pass
    if not metrics and version.run_id:
        metrics = dict(client.get_run(version.run_id).data.metrics)
    return metrics


def _figure(client, version, metric: str) -> tuple[str, float] | None:
    return find_metric(version_metrics(client, version), metric)


@dataclass
class Standing:
    """Where `name@challenger` stands against its baseline and `name@champion`, and the gate's verdict."""

    name: str
    metric: str
    direction: str
    challenger: Any  # the MLflow ModelVersion behind each alias (champion: None when unset)
    champion: Any
    challenger_figure: tuple[str, float] | None  # (metric key, value) recorded on each version
    champion_figure: tuple[str, float] | None
    baseline: tuple[str, float] | None  # (the baseline's name, its figure) recorded on the challenger
    passed: bool
    why: str

    @property
    def beats_baseline(self) -> bool | None:
        """None: no baseline (or no figure) to compare with."""
        if self.baseline is None or self.challenger_figure is None:
            return None
        return _better(self.challenger_figure[1], self.baseline[1], self.direction) > 0

    @property
    def is_champion(self) -> bool:
        return self.champion is not None and str(self.champion.version) == str(self.challenger.version)


def _better(value: float, than: float, direction: str) -> float:
    """How much better `value` is than `than` (negative: worse), for the gate's direction."""
    return value - than if direction == "max" else than - value


def recorded_baseline(version) -> tuple[str, float] | None:
    """(name, figure) of the baseline recorded on a version at registration, or None."""
    if version is None or BASELINE_VALUE not in version.tags:
        return None
    return version.tags.get(BASELINE_NAME, "baseline"), float(version.tags[BASELINE_VALUE])


def standing(client, name: str, gate) -> Standing:
    """Judge `name@challenger` by `gate` without moving anything: first against its baseline
    (never promoted unless it beats it), then against the champion."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r} in this registry") from None
    challenger = by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"{name} has no @{CHALLENGER}: register a model first")
    champion = by_alias(client, name, CHAMPION)
    figure_ch = _figure(client, challenger, gate.metric)
    figure_cp = _figure(client, champion, gate.metric) if champion is not None else None
    found = Standing(name, gate.metric, gate.direction, challenger, champion, figure_ch, figure_cp,
                     recorded_baseline(challenger), False, "")
    found.passed, found.why = _verdict(found, gate)
    return found


def _verdict(found: Standing, gate) -> tuple[bool, str]:
    ch = f"version {found.challenger.version}"
    cp = f"version {found.champion.version}" if found.champion is not None else None
    better = "higher" if gate.direction == "max" else "lower"
    if found.baseline is not None:
        if found.challenger_figure is None:
            return False, f"gate metric {gate.metric!r} is not recorded on {ch}: cannot compare with its {found.baseline[0]}"
        figure, (baseline_name, baseline) = found.challenger_figure[1], found.baseline
        if not found.beats_baseline:
            return False, (f"the challenger ({ch}) does not beat its {baseline_name}: {gate.metric} {figure:.6g} vs "
                           f"{baseline:.6g} ({better} is better)")
    if found.champion is None:
        return True, f"no @{CHAMPION} yet: the first challenger becomes champion"
    if found.challenger_figure is None or found.champion_figure is None:
        missing = ch if found.challenger_figure is None else cp
        return False, f"gate metric {gate.metric!r} is not recorded on {missing}: cannot compare"
    gain = _better(found.challenger_figure[1], found.champion_figure[1], gate.direction)
    verdict = "passes" if gain >= gate.min_gain else "fails"
    return gain >= gate.min_gain, (
        f"gate {verdict}: {gate.metric} challenger ({ch}) {found.challenger_figure[1]:.6g} vs champion ({cp}) "
        f"{found.champion_figure[1]:.6g}; gain {gain:+.6g} ({better} is better), minimum gain {gate.min_gain:g}")


def _baseline_clause(found: Standing) -> str:
    if not found.beats_baseline:
        return ""
    name, figure = found.baseline
    return f"beats its {name} ({found.challenger_figure[1]:.6g} vs {figure:.6g}); "


def promote(name: str, gate, *, force: bool = False, reason: str | None = None, user: str | None = None,
            client=None) -> Decision:
    """Move `name@champion` to `name@challenger` when the gate passes (or when forced, with a reason).

    Judged and moved as one step: under promotion_lock (one promotion of a store at a time), and
    with the champion read again right before the move; if it changed since it was judged (a
    promotion from elsewhere), nothing moves and the caller is told to judge again. A challenger
    is never made champion over a version it was not compared with."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    if force and not (reason and reason.strip()):
        raise RegistryError("a forced promotion needs a reason (--reason TEXT)")
    with promotion_lock(client):
        return _judge_and_move(client, name, gate, force, reason, user)


def _judge_and_move(client, name: str, gate, force: bool, reason: str | None, user: str | None) -> Decision:
    found = standing(client, name, gate)
    challenger, champion = found.challenger, found.champion
    ch, cp = f"version {challenger.version}", f"version {champion.version}" if champion else None
    if found.is_champion:
        return Decision(False, True, f"{name}: {ch} is already @{CHAMPION}; nothing to do", ch, cp)
    why = _baseline_clause(found) + found.why
    if not found.passed and not force:
        return Decision(False, False, f"{name}: not promoted; {why}", ch, cp)

    now_champion = by_alias(client, name, CHAMPION)
    if _version_of(now_champion) != _version_of(champion):
        return Decision(False, False, f"{name}: not promoted; @{CHAMPION} moved to version "
                        f"{_version_of(now_champion)} while {ch} was judged against {cp or 'no champion'}: "
                        "run the promotion again to judge it against the new champion", ch, cp)
    client.set_registered_model_alias(name, CHAMPION, challenger.version)
    who = user or getpass.getuser()
    _record_promotion(client, found, why, who, reason.strip() if force else None)
    how = f"forced by {who} ({reason.strip()}); {why}" if force else why
    return Decision(True, True, f"{name}: {ch} is now @{CHAMPION}; {how}", ch, cp)


def _record_promotion(client, found: Standing, why: str, who: str, forced: str | None) -> None:
    """Tag the new champion (who, when, over which version, the gate's figures, how), the version it
    replaced, and the registered model (the version `lmforge promote` made champion, which `trace`
    compares with the alias), and add the promotion to the new champion's description."""
    name, challenger, champion = found.name, found.challenger, found.champion
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    tags = {"promoted_at": now, "promoted_by": who, "promoted_via": PROMOTED_VIA,
            "promoted_over": champion.version if champion else "none",
            "gate.result": ("forced" if forced else "passed") + f": {why}"}
    for key, figure in (("gate.challenger_value", found.challenger_figure), ("gate.champion_value", found.champion_figure),
                        ("gate.baseline_value", found.baseline)):
        if figure is not None:
            tags[key] = repr(figure[1])
    if forced:
        tags.update({"forced": "true", "force_reason": forced, "forced_by": who})
    for key, value in tags.items():
        client.set_model_version_tag(name, challenger.version, key, redact(str(value)))
    if champion is not None:
        client.set_model_version_tag(name, champion.version, "replaced_by", f"{challenger.version} at {now}")
    client.set_registered_model_tag(name, PROMOTED_VERSION, str(challenger.version))
    client.set_registered_model_tag(name, PROMOTED_AT, now)
    replaced = (f"replacing version {champion.version}" + (f" (`{found.champion_figure[0]}` {found.champion_figure[1]:.6g})"
                if found.champion_figure else "")) if champion is not None else "the first champion"
    how = f"**forced** by {who} ({forced})" if forced else f"by {who}, gate passed"
    note = f"**`@{CHAMPION}` since {now}** ({PROMOTED_VIA}, {how}), {replaced}."
    description = challenger.description or ""
    client.update_model_version(name, challenger.version, description=redact(f"{note}\n\n{description}".strip()))


def _version_of(version) -> str | None:
    return None if version is None else str(version.version)


@contextmanager
def promotion_lock(client) -> Iterator[None]:
    """Hold the store's promotion lock (an flock, lmforge/atomic.py:locked): beside a SQLite store
    for every process that promotes in it, else one per store URI in this machine's temp folder.
    MLflow's registry has no compare-and-set: across machines on a shared server, the re-read in
    _judge_and_move is the guard left (docs/security.md)."""
    import tempfile

    from lmforge.atomic import locked

    uri = str(getattr(client, "_registry_uri", None) or getattr(client, "tracking_uri", "") or "")
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///"):])
        target = store.with_name(f"{store.name}.promote")
    else:
        target = Path(tempfile.gettempdir()) / f"lmforge-promote-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    with locked(target):
        yield


def model_folder(uri: str, scratch: Path) -> Path:
    """The transformers folder a registered version holds (its "model" artifact), downloaded into
    `scratch`. Call it inside `using(uri)`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    parse_model_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    except MlflowException as err:
        raise RegistryError(f"{uri}: {err.message}") from None
    found = sorted(p.parent for p in (local / "artifacts").rglob("config.json"))
    if not found:
        raise RegistryError(f"{uri} holds no transformers folder (no artifacts/*/config.json)")
    return found[0]


# --- trace --------------------------------------------------------------------------------------


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise RegistryError(f"{uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")


TraceSection = Callable[[Mapping[str, str]], Sequence[str]]


def trace(uri: str, client=None, *, inputs: TraceSection | None = None, rebuild: TraceSection | None = None) -> str:
    """A readable account of where a registered version came from and how to rebuild it.

    inputs and rebuild turn the version's lineage (its tags over the register run's lineage.json,
    where the whole of it is kept) into the lines of those two sections: the build system that
    wrote the lineage knows how to show it and how to rerun itself."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_model_uri(uri)
    try:
        version = by_alias(client, name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as err:
        raise RegistryError(f"{uri}: {err.message}") from None
    if version is None:
        raise RegistryError(f"{uri}: {name} has no alias @{alias} (or no such model)")
    run = client.get_run(version.run_id) if version.run_id else None
    recorded = _lineage_file(client, run)
    tags = {**recorded.get("lineage", {}), **dict(version.tags)}
    registered = client.get_registered_model(name)
    aliases = sorted(a for a, v in registered.aliases.items() if str(v) == str(version.version))
    commit, dirty = tags.get("git_commit", "unknown"), tags.get("git_dirty", "unknown")

    lines = [f"{uri} -> {name} version {version.version}" + (f" (aliases: {', '.join('@' + a for a in aliases)})" if aliases else "")]
    lines.append(f"  run:          {version.run_id}" + (f" ({run.info.run_name}, {run.info.status})" if run else ""))
    if TRAINING_RUN in tags:
        lines.append(f"  training run: {tags[TRAINING_RUN]}")
    lines.append(f"  fingerprint:  {tags.get(FINGERPRINT, 'none')}")
    lines.append(f"  commit:       {commit}" + ("  (the working tree had uncommitted changes)" if dirty == "true" else "")
                 + f"  dirty: {dirty}")
    lines.extend(_promotion_lines(tags, registered, client))
    if inputs is not None:
        lines.extend(inputs(tags))
    lines.extend(_dataset_lines(run))
    lines.extend(_params_lines(tags, run, recorded.get("params")))
    lines.append("metrics:")
    gate_key = tags.get("gate.metric_key")
    for key, value in sorted(version_metrics(client, version).items()):
        lines.append(f"  {key} = {value:.6g}" + ("   <- gate" if key == gate_key else ""))
    if rebuild is not None:
        lines.extend(rebuild(tags))
    return "\n".join(lines)


def _lineage_file(client, run) -> dict[str, Any]:
    """The register run's lineage.json ({} where the run or the file is gone)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    if run is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="lmforge-trace-") as scratch:
        try:
            return json.loads(Path(client.download_artifacts(run.info.run_id, LINEAGE_FILE, scratch)).read_text())
        except (MlflowException, OSError, ValueError):
            return {}


def _promotion_lines(tags: Mapping[str, str], registered, client=None) -> list[str]:
    """The gate's verdict on the version, the champion it replaced, who promoted it, and whether
    @champion is where `lmforge promote` last put it."""
    lines = []
    if "gate.result" in tags:
        lines.append(f"  gate:         {tags['gate.result']}")
    elif "gate.metric_key" in tags and "gate.value" in tags:
        lines.append(f"  gate:         not promoted by {PROMOTED_VIA}; registered with {gate_line(tags)}")
    if "promoted_over" in tags:
        over = tags["promoted_over"]
        lines.append("  replaced:     " + ("no champion (the first one)" if over == "none" else f"version {over}")
                     + (f" ({tags['gate.champion_value']})" if "gate.champion_value" in tags else ""))
    for key in ("promoted_at", "promoted_by", "forced_by", "force_reason"):
        if key in tags:
            lines.append(f"  {key + ':':<13} {tags[key]}")
    lines.append(f"  @{CHAMPION}:    {champion_provenance(registered, client)}")
    return lines


def champion_provenance(registered, client=None) -> str:
    """Where `name@champion` points and whether `lmforge promote` put it there (the version it
    recorded on the registered model at its last move) or something else moved it since. With a
    client, a registry promoted before that record counts the champion's own promoted_at tag."""
    now = registered.aliases.get(CHAMPION)
    recorded, at = registered.tags.get(PROMOTED_VERSION), registered.tags.get(PROMOTED_AT)
    if recorded is None and now is not None and client is not None:
        earlier = client.get_model_version(registered.name, str(now)).tags.get("promoted_at")
        recorded, at = (str(now), f"{earlier} (recorded on the version)") if earlier else (None, None)
    if now is None:
        return "not set" + (f" (`{PROMOTED_VIA}` set version {recorded} at {at}; the alias was removed since)"
                            if recorded else "")
    if recorded is not None and str(recorded) == str(now):
        return f"version {now}, set by `{PROMOTED_VIA}` at {at}"
    last = f"version {recorded} at {at}" if recorded else "never"
    return (f"version {now}, moved outside `{PROMOTED_VIA}` (MLflow UI alias pencil or API): the gate was not "
            f"applied (the last `{PROMOTED_VIA}` made: {last})")


def _dataset_lines(run) -> list[str]:
    if run is None or not run.inputs or not run.inputs.dataset_inputs:
        return []
    lines = ["datasets (mlflow.log_input):"]
    for item in run.inputs.dataset_inputs:
        ctx = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        ds = item.dataset
        source = json.loads(ds.source).get("uri", ds.source) if ds.source.startswith("{") else ds.source
        lines.append(f"  {ds.name} [{ctx}] digest {ds.digest}  {source}")
    return lines


def _params_lines(tags: Mapping[str, str], run, recorded: Mapping[str, Any] | None = None) -> list[str]:
    """The params a version was made with: its lineage.json's, else the `params` tag of versions
    registered before it, else its run's params."""
    try:
        params = recorded or json.loads(tags.get("params", "{}"))
    except json.JSONDecodeError:
        params = {}
    flat = tracking.as_params(params) if params else (dict(run.data.params) if run else {})
    return ["params:", *(f"  {key} = {value}" for key, value in sorted(flat.items()))]

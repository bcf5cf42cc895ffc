"""MLflow helpers shared by the stages. mlflow is imported inside the functions only.

    with tracking.stage_run("pretrain", params.model_dump()) as run:
        run.log_metrics({"loss": 1.2}, step=10)
        run.log_artifact(loss_plot)

The tracking URI is MLFLOW_TRACKING_URI when set, else `sqlite:///<repo root>/mlflow.db`; runs
go to the experiment "lmforge" (LMFORGE_EXPERIMENT overrides) and carry the git commit, the
dirty flag, the stage and the system facts as tags. Where mlflow is not installed (a bare GPU
image) or LMFORGE_TRACKING=off, the same calls do nothing, and say so once. Every param, tag and
logged dict passes through lmforge.redaction first: a password in a URL never reaches the store.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from lmforge.flat import flatten
from lmforge.redaction import redact, redact_all

EXPERIMENT = "lmforge"
# MLflow 3's UI shows an experiment as "Machine learning" (runs, models) or "GenAI apps & agents"
# (traces) by this experiment tag, guessing when it is unset: lmforge's runs train models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def project_root(root: Path | str | None = None) -> Path:
    """The project folder the MLflow store and git facts belong to: `root`, else the working folder
    (where the pipeline runs its stages)."""
    return Path(root or Path.cwd()).resolve()


def tracking_uri(root: Path | str | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def keep_credentials_quiet(uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>/#/..." as each run ends: where the URI holds
    a credential, that print is turned off (its redacted form would be no working link anyway)."""
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def git_facts(root: Path | str | None = None) -> dict[str, str]:
    """The commit ("uncommitted" before the first one) and whether the tree has changes."""
    cwd = project_root(root)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or "uncommitted"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def system_facts() -> dict[str, str]:
    facts = {"python": platform.python_version(), "platform": platform.platform(), "host_cpus": str(os.cpu_count())}
    torch = sys.modules.get("torch")
    if torch is not None:
        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["device"] = torch.cuda.get_device_name(0)
            facts["gpus"] = str(torch.cuda.device_count())
            facts["cuda"] = str(torch.version.cuda)
        else:
            facts["device"] = "cpu"
    return facts


def as_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested params as MLflow takes them: {"a": {"b": 1}} -> {"a.b": "1"}, every value as its text
    (lists and None too), cut to MLflow's limit."""
    return {key: str(value)[:6000] for key, value in flatten(params).items()}


def experiment_name() -> str:
    return os.environ.get("LMFORGE_EXPERIMENT", EXPERIMENT)


def enabled() -> bool:
    if os.environ.get("LMFORGE_TRACKING", "").lower() in ("0", "off", "false", "no"):
        return False
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_store(root: Path | str | None = None) -> None:
    """Create the tracking store's tables and the lmforge experiment now, from one process.

    Stages that a Prefect flow runs side by side would otherwise each find a fresh mlflow.db and
    run MLflow's schema migrations at the same time, failing on each other's half-made tables
    ("table ... already exists", "duplicate column name")."""
    if not enabled():
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(root))
    if client.get_experiment_by_name(experiment_name()) is None:
        client.create_experiment(experiment_name(), tags=dict([EXPERIMENT_KIND]))


class Run:
    """A thin handle on the active MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, active: bool, run_id: str | None = None):
        self.active, self.run_id = active, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            clean = {k: float(v) for k, v in metrics.items() if v is not None}
            mlflow.log_metrics(clean, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.active:
            import mlflow

            flat = as_params(params)
            items = [(key, redact(value)) for key, value in flat.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
                mlflow.log_params(dict(items[i : i + 100]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags({k: redact(str(v)) for k, v in tags.items()})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, payload: dict, name: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_dict(redact_all(payload), name)


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, *, tags: Mapping[str, Any] | None = None,
              root: Path | str | None = None, log=print) -> Iterator[Run]:
    """An MLflow run for one stage execution, named after the stage, ended (FAILED on error) on exit."""
    if not enabled():
        log(f"[{stage}] MLflow tracking off (mlflow not importable or LMFORGE_TRACKING=off)")
        yield Run(False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    keep_credentials_quiet(tracking_uri(root))
    mlflow.set_tracking_uri(tracking_uri(root))
    experiment = mlflow.set_experiment(experiment_name())
    if EXPERIMENT_KIND[0] not in (experiment.tags or {}):  # a kind someone chose in the UI is kept
        mlflow.set_experiment_tag(*EXPERIMENT_KIND)
    with mlflow.start_run(run_name=stage) as active:
        run = Run(True, active.info.run_id)
        run.set_tags({"stage": stage, **git_facts(root), **system_facts(), **(tags or {})})
        if params:
            run.log_params(params)
        yield run

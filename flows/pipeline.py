"""The pipeline flow: Prefect runs the DVC graph, one task per stage; DVC stays the one
definition of the stages and owns the cache.

    python -m flows.pipeline                          # everything
    python -m flows.pipeline --target tokenize        # a stage and what it needs
    python -m flows.pipeline -S split.task.max_rows=1000   # overrides: a DVC experiment

Each task asks DVC in-process whether its stage is up to date (cheap) and, only if not, runs
`dvc repro --single-item <stage>` so that the stage's own output lands in the task log. Stages
whose upstream tasks succeeded start at once, so the corpus and task branches run side by side.
A stage that exits with code 2 failed for a user error (bad params or data): it is not retried
and nothing downstream runs. Any other failure is retried with exponential backoff.

The training stages (pretrain, tune, finetune, sft) want the accelerator to themselves: each holds a
slot of the Prefect global concurrency limit `lmforge-accelerator` while it runs, one slot by
default, so on one GPU they take turns where the graph would start them side by side. The limit
is the server's, shared by every flow run on it (see and change it under Concurrency in the UI);
`--accelerator-slots 0` turns it off.

With overrides (`-S key.path=value`, checked against params.yaml first) the graph runs as one
DVC experiment, `dvc exp run --temp`, in a temporary copy of the project: the workspace's
params.yaml, dvc.lock and outputs stay as they were, so flow runs with different overrides can
run at the same time. The experiment's name and metrics go to the log and to an artifact; `dvc
exp show` lists it beside the others and `dvc exp apply <name>` brings it into the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from lmforge.config.overrides import apply_overrides as override_params
from lmforge.config import parse_yaml
from lmforge.errors import UserError
from lmforge.flat import flatten
from lmforge.redaction import redact, without_credentials
from lmforge.registry import tracking
from tasks._common import USER_ERROR_EXIT  # what tasks/_common.py:fail() exits with
from tasks.lineage import locked_dvc_repo

DEFAULT_RETRIES = {"ingest": 3}  # per stage name (the part before '@'); others use `retries`
ACCELERATOR_LIMIT = "lmforge-accelerator"  # a Prefect global concurrency limit
TRAINING_STAGES = ["pretrain", "tune", "finetune", "sft"]  # stage names that hold an accelerator slot while they run
# `dvc repro` exits 255 whatever the stage's command did, and says the command's status only in
# its message ("failed to run: <cmd>, exited with N"); in-process, DVC's StageCmdFailedError keeps
# no status either. So the status is read back from that message.
_STAGE_STATUS = re.compile(r"exited with (-?\d+)")
KILLED_EXITS = (137, -9)  # SIGKILL, through a shell or not: on a machine that is not shared, the out-of-memory killer
# What lowers a stage's memory, by stage name, for the message of a stage killed for memory.
MEMORY_KNOBS = {
    "clean": "`workers` (fewer shards at once)",
    "split": "`workers` (fewer shards at once)",
    "tokenize": "tokenize.sample_mb (the tokenizer's training sample) or `workers`",
    "pretrain": "pretrain.batch_size (with gradient_accumulation_steps to keep the tokens per step) or pretrain.context",
    "evaluate": "evaluate.batch_size",
    "tune": "tune.space's batch_size choices or finetune.max_length",
    "finetune": "finetune.batch_size or finetune.max_length",
    "sft": "sft.batch_size or sft.max_length",
}


class StageFailed(RuntimeError):
    """A stage failed for a reason that may pass (I/O, a killed process): retried."""


class StageRefused(UserError):
    """A stage exited with USER_ERROR_EXIT: it refused its params or data, retrying cannot help."""


class KilledForMemory(UserError):
    """A stage (or one of its workers) was killed with SIGKILL, most likely for memory: retrying
    the same stage on the same machine would be killed again."""


def killed_message(addr: str, output: str) -> str:
    knob = MEMORY_KNOBS.get(addr.split("@")[0], "the stage's batch or shard sizes")
    return (f"{addr} was killed (SIGKILL), most likely out of memory; it is not retried. "
            f"To lower its memory, lower {knob} in params.yaml.\n\n{output}")


def dvc_executable() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def stage_env() -> dict[str, str]:
    """The environment for stage commands: `python` in dvc.yaml means this interpreter."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path}


# --- reading the graph from DVC ---------------------------------------------------------------
# Each read holds DVC's repo lock (tasks.lineage.locked_dvc_repo): a sibling task's repro may be
# rewriting dvc.lock.


def stage_graph(root: Path, targets: list[str] | None = None) -> dict[str, list[str]]:
    """Stage address -> the addresses it depends on, for the targets and all they need."""
    with locked_dvc_repo(root) as repo:
        graph = repo.index.graph  # an edge runs from a stage to each stage it depends on
        # Stage names, not `addressing`: that one is relative to the process's cwd.
        by_addr = {stage.name: stage for stage in graph.nodes}
        upstream = {a: sorted(d.name for d in graph.successors(s)) for a, s in by_addr.items()}
    if not targets:
        return upstream
    unknown = [t for t in targets if not any(a == t or a.startswith(t + "@") for a in upstream)]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(sorted(upstream))}")
    wanted: set[str] = set()
    pending = [a for a in upstream if any(a == t or a.startswith(t + "@") for t in targets)]
    while pending:
        addr = pending.pop()
        if addr not in wanted:
            wanted.add(addr)
            pending.extend(upstream[addr])
    return {a: upstream[a] for a in upstream if a in wanted}


def topological(upstream: dict[str, list[str]]) -> list[str]:
    order, done = [], set()
    while len(order) < len(upstream):
        ready = sorted(a for a in upstream if a not in done and all(d in done for d in upstream[a]))
        if not ready:
            raise UserError("the stage graph has a cycle")
        order.extend(ready)
        done.update(ready)
    return order


def stage_is_current(root: Path, addr: str) -> bool:
    with locked_dvc_repo(root) as repo:
        return not repo.status(targets=[f"{root / 'dvc.yaml'}:{addr}"])


def stage_metrics(root: Path, addr: str) -> dict[str, object]:
    """The flattened contents of the metrics files this stage declares in dvc.yaml."""
    with locked_dvc_repo(root) as repo:
        stage = next(s for s in repo.index.stages if s.name == addr)
        paths = [Path(out.fs_path) for out in stage.outs if out.metric]
    flat: dict[str, object] = {}
    for path in paths:
        if path.suffix == ".json" and path.exists():
            flat.update(figures(json.loads(path.read_text()), path.stem))
    return flat


def figures(metrics: object, prefix: str) -> dict[str, object]:
    """A metrics file's values under dotted keys, lists left out (an artifact table shows scalars)."""
    if not isinstance(metrics, dict):
        return {prefix: metrics}
    return {key: value for key, value in flatten(metrics, prefix).items() if not isinstance(value, list)}


# --- tasks ------------------------------------------------------------------------------------


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


def set_accelerator_slots(slots: int) -> None:
    """Create the accelerator limit on the Prefect server, or set its number of slots."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(ACCELERATOR_LIMIT, slots)


@contextmanager
def accelerator_slot(addr: str, logger):
    """Hold one slot of the accelerator limit for the body, waiting for it as long as it takes;
    gives the seconds waited."""
    asked = time.perf_counter()
    # A lease that fails to renew lets another stage start beside this one: slower, not wrong.
    with concurrency(ACCELERATOR_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        waited = round(time.perf_counter() - asked, 2)
        if waited >= 1:
            logger.info("%s waited %.0f s for an accelerator slot (%s)", addr, waited, ACCELERATOR_LIMIT)
        yield waited


@task(task_run_name="{addr}", retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=_retry_unless_user_error)
def run_stage(root: Path, addr: str, accelerator: bool = False) -> dict:
    """`dvc repro` of one stage unless it is up to date; accelerator: hold an accelerator slot meanwhile."""
    logger = get_run_logger()
    start = time.perf_counter()
    if stage_is_current(root, addr):
        logger.info("%s is up to date: skipped (DVC cache)", addr)
        return {"stage": addr, "status": "skipped", "seconds": round(time.perf_counter() - start, 2), "waited": 0.0}
    with accelerator_slot(addr, logger) if accelerator else nullcontext(0.0) as waited:
        result = subprocess.run([dvc_executable(), "--wait-for-lock", "repro", "--single-item", addr], cwd=root,
                                capture_output=True, text=True, env=stage_env())
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise stage_failure(addr, output)
    logger.info("%s", redact(output))
    seconds = round(time.perf_counter() - start, 2)
    try:
        publish_stage_artifacts(root, addr, started_at=time.time() - seconds)
    except Exception as error:
        # DVC has committed the outputs: failing the task here would retry a stage that is now
        # up to date, and the run would report it as skipped.
        logger.warning("%s ran, but its artifacts were not published: %s: %s", addr, type(error).__name__, error)
    return {"stage": addr, "status": "ran", "seconds": seconds, "waited": waited}


def stage_status(dvc_output: str) -> int | None:
    """The exit status of the stage's command, as `dvc repro` reported it (None: not reported)."""
    statuses = _STAGE_STATUS.findall(dvc_output)
    return int(statuses[-1]) if statuses else None


def stage_failure(addr: str, output: str) -> Exception:
    """The error for a failed `dvc repro` of `addr`: a UserError (not retried) when the stage exited
    with USER_ERROR_EXIT or was killed for memory, else StageFailed (retried)."""
    status = stage_status(output)
    if status in KILLED_EXITS:
        return KilledForMemory(killed_message(addr, output))
    stage_errors = [line for line in output.splitlines() if line.startswith("error: ")]
    headline = stage_errors[0] if stage_errors else output.splitlines()[-1] if output else "no output"
    message = redact(f"{addr} failed: {headline}\n\n{output}")
    return StageRefused(message) if status == USER_ERROR_EXIT else StageFailed(message)


def publish_stage_artifacts(root: Path, addr: str, started_at: float) -> None:
    metrics = stage_metrics(root, addr)
    if metrics:
        rows = [{"metric": k, "value": v} for k, v in metrics.items()]
        create_table_artifact(rows, key=_artifact_key(addr), description=f"Metrics of stage {addr}")
    run_link = mlflow_run_url(root, addr.split("@")[0], started_at)
    if run_link:
        create_link_artifact(run_link, link_text=f"MLflow run of {addr}", key=_artifact_key(addr) + "-mlflow")


def mlflow_run_url(root: Path, stage: str, started_at: float) -> str | None:
    """The MLflow UI address of the run this stage just logged (runs carry the tag stage=<name>).

    With a local SQLite store the link points at `make ui`'s MLflow server on 127.0.0.1:5000."""
    if not tracking.enabled():
        return None
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(root)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.experiment_name())
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.start_time >= {int(started_at * 1000)}",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        return None
    base = without_credentials(uri).rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment.experiment_id}/runs/{runs[0].info.run_id}"


def _artifact_key(addr: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]", "-", addr.lower())


# --- parameter overrides as a DVC experiment ---------------------------------------------------
# `dvc exp run --temp` runs the overridden graph in a temporary copy of the project under
# .dvc/tmp/exps, commits the result as an experiment and deletes the copy: the workspace's
# params.yaml, dvc.lock and outputs are never written, so two flow runs with overrides can run at
# once. DVC holds its repo lock only while it sets the copy up; the stages of two experiments
# then run side by side, sharing the cache.

_RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
_EXPERIMENT_NAME = re.compile(r"Ran experiment\(s\): (\S+)")
_FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")


def check_overrides(root: Path, overrides: list[str]) -> None:
    """Refuse an override of a key params.yaml does not have (a ConfigError naming it), before
    DVC runs anything: DVC would add the key, and no stage would read it."""
    params_path = root / "params.yaml"
    override_params(parse_yaml(params_path.read_text(), params_path.name), overrides, where=params_path.name)


def require_git_commit(root: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=root, capture_output=True)
    if head.returncode != 0:
        raise UserError(f"overrides run as a DVC experiment, which starts from a git commit, and {root} has "
                        "none: commit the project first (git add ..., git commit)")


def experiment_command(root: Path, targets: list[str] | None, overrides: list[str], copy_paths: list[str],
                       name: str | None) -> list[str]:
    command = [dvc_executable(), "--wait-for-lock", "exp", "run", "--temp"]
    for override in overrides:
        command += ["--set-param", override]
    # The copy is made from git, which may not hold dvc.lock: without it every stage would rerun.
    for path in (["dvc.lock"] if (root / "dvc.lock").is_file() else []) + copy_paths:
        command += ["--copy-paths", path]
    if name:
        command += ["--name", name]
    return command + list(targets or [])


def experiment_env(root: Path) -> dict[str, str]:
    """stage_env(), with MLflow pointed at the project's store: the stages run in the temporary
    copy, whose own store would be deleted with it."""
    return {**stage_env(), "MLFLOW_TRACKING_URI": tracking.tracking_uri(root)}


def experiment_failure(output: str) -> Exception:
    """The error for a failed `dvc exp run`: as stage_failure() says for the stage that failed."""
    if "user.name" in output or "user name and email" in output:  # retrying cannot help
        return UserError(f"a DVC experiment is a git commit and needs a git identity: run `git config "
                         f"user.name ...` and `git config user.email ...`\n\n{output}")
    failed = _FAILED_STAGE.search(output)
    return stage_failure(failed.group(1) if failed else "the experiment", output)


def stage_statuses(output: str, addrs: list[str]) -> dict[str, str]:
    """Which stages `dvc exp run` ran and which it skipped (up to date, or restored from the run
    cache), read from what it printed."""
    ran = set(_RAN.findall(output))
    return {addr: "ran" if addr in ran else "skipped" for addr in addrs}


def experiment_metrics(root: Path, name: str) -> dict[str, object]:
    """The experiment's metrics as `dvc exp show` has them, flattened: {"<file>.<key>": value}."""
    result = subprocess.run([dvc_executable(), "exp", "show", "--json"], cwd=root, capture_output=True,
                            text=True, env=stage_env())
    if result.returncode != 0:
        return {}
    for baseline in json.loads(result.stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name") == name:
                    flat: dict[str, object] = {}
                    for path, record in ((rev.get("data") or {}).get("metrics") or {}).items():
                        flat.update(figures(record.get("data") or {}, path))
                    return flat
    return {}


@task(task_run_name="experiment", retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=_retry_unless_user_error)
def run_experiment(root: Path, addrs: list[str], targets: list[str] | None, overrides: list[str],
                   copy_paths: list[str], name: str | None, accelerator: bool) -> dict:
    """`dvc exp run --temp` of the targets with the overrides; accelerator: hold an accelerator
    slot meanwhile. Gives the experiment's name, its metrics and what became of each stage."""
    logger = get_run_logger()
    start = time.perf_counter()
    with accelerator_slot("experiment", logger) if accelerator else nullcontext(0.0) as waited:
        result = subprocess.run(experiment_command(root, targets, overrides, copy_paths, name), cwd=root,
                                capture_output=True, text=True, env=experiment_env(root))
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise experiment_failure(output)
    logger.info("%s", redact(output))
    found = _EXPERIMENT_NAME.search(output)
    experiment = found.group(1) if found else name or "unnamed"
    return {"name": experiment, "overrides": overrides, "metrics": experiment_metrics(root, experiment),
            "stages": stage_statuses(output, addrs), "seconds": round(time.perf_counter() - start, 2),
            "waited": waited}


def publish_experiment(experiment: dict) -> None:
    name, metrics = experiment["name"], experiment["metrics"]
    if metrics:
        rows = [{"metric": k, "value": v} for k, v in metrics.items()]
        create_table_artifact(rows, key="experiment-" + _artifact_key(name),
                              description=redact(f"Metrics of DVC experiment {name} ({' '.join(experiment['overrides'])})"))
    shown = ", ".join(f"{k}={v}" for k, v in metrics.items()) or "none"
    print(redact(f"overrides {experiment['overrides']} ran as DVC experiment {name} in {experiment['seconds']} s; "
          f"params.yaml and the workspace unchanged (`dvc exp show`, `dvc exp apply {name}`). Metrics: {shown}"))


# --- the flow ---------------------------------------------------------------------------------


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline(
    targets: list[str] | None = None,
    overrides: list[str] | None = None,
    retries: int = 1,
    stage_retries: dict[str, int] | None = None,
    root: str = ".",
    accelerator_slots: int = 1,
    accelerator_stages: list[str] | None = None,
    experiment_name: str | None = None,
    copy_paths: list[str] | None = None,
) -> list[dict]:
    """Run the DVC stages (all, or `targets` and their upstream) as Prefect tasks.

    overrides: `key.path=value` params; the graph then runs as one DVC experiment (`dvc exp run
    --temp`, named `experiment_name` or by DVC) in a temporary copy of the project, which holds
    what git tracks plus dvc.lock and `copy_paths` (untracked files the stages need).
    accelerator_slots: how many of the `accelerator_stages` (stage names, default TRAINING_STAGES)
    may run at once, server-wide; 0 for no limit.
    """
    if accelerator_slots < 0:
        raise ValueError(f"accelerator_slots must be 0 (no limit) or more, not {accelerator_slots}")
    root_path = Path(root).resolve()
    if overrides:
        check_overrides(root_path, overrides)
        require_git_commit(root_path)
    upstream = stage_graph(root_path, targets)
    tracking.prepare_store(root_path)  # before stages that log to it start side by side
    heavy = set(TRAINING_STAGES if accelerator_stages is None else accelerator_stages) if accelerator_slots else set()
    if heavy:
        set_accelerator_slots(accelerator_slots)
    if overrides:
        results = _run_as_experiment(root_path, targets, upstream, overrides, retries, heavy,
                                     experiment_name, copy_paths or [])
    else:
        results = _run_graph(root_path, upstream, retries, {**DEFAULT_RETRIES, **(stage_retries or {})}, heavy)
    _publish_summary(results)
    # An experiment leaves the workspace as it was, and so its summary.
    summarize(root_path, rebuild=not overrides and any(r["status"] == "ran" for r in results))
    return results


def _run_graph(root: Path, upstream: dict[str, list[str]], retries: int, per_stage: dict[str, int],
               heavy: set[str]) -> list[dict]:
    futures = {}
    for addr in topological(upstream):
        name = addr.split("@")[0]
        stage_task = run_stage.with_options(retries=per_stage.get(name, retries))
        # wait_for: a stage starts only once all it depends on has succeeded; a failure upstream
        # leaves it NotReady, so nothing downstream of a broken stage runs.
        futures[addr] = stage_task.submit(root, addr, accelerator=name in heavy,
                                          wait_for=[futures[d] for d in upstream[addr]])
    wait(list(futures.values()))
    return [f.result() for f in futures.values()]  # raises the first failure, failing the flow


def _run_as_experiment(root: Path, targets: list[str] | None, upstream: dict[str, list[str]], overrides: list[str],
                       retries: int, heavy: set[str], name: str | None, copy_paths: list[str]) -> list[dict]:
    """One task for the whole experiment (DVC runs its stages); a row per stage, as _run_graph gives."""
    addrs = topological(upstream)
    accelerator = any(addr.split("@")[0] in heavy for addr in addrs)
    experiment = run_experiment.with_options(retries=retries)(root, addrs, targets, overrides, copy_paths, name,
                                                              accelerator)
    publish_experiment(experiment)
    return [{"stage": addr, "status": status, "seconds": None, "waited": None, "experiment": experiment["name"]}
            for addr, status in experiment["stages"].items()]


def _publish_summary(results: list[dict]) -> None:
    lines = ["# lmforge pipeline run", "", "| stage | status | seconds | of which waiting for the accelerator |",
             "|---|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['status']} | {_cell(r['seconds'])} | {_cell(r['waited'])} |" for r in results]
    ran = sum(r["status"] == "ran" for r in results)
    lines += ["", f"{ran} stage(s) ran, {len(results) - ran} skipped (up to date in the DVC cache)."]
    experiments = {r["experiment"] for r in results if r.get("experiment")}
    lines += [f"Ran as DVC experiment {name}; the workspace is unchanged." for name in experiments]
    create_markdown_artifact("\n".join(lines), key="pipeline-summary", description="Stages of this run")
    print("\n".join(lines[2:]))


def _cell(value: float | None) -> str:
    return "" if value is None else str(value)  # an experiment's stages are timed together, not one by one


@task(task_run_name="summarize")
def summarize(root: Path, rebuild: bool) -> None:
    """Show reports/summary.md as this run's artifact, rebuilt (tasks/summarize.py) when a stage ran."""
    summary = root / "reports" / "summary.md"
    if rebuild or not summary.exists():
        result = subprocess.run([sys.executable, "-m", "tasks.summarize"], cwd=root, capture_output=True,
                                text=True, env=stage_env())
        if result.returncode != 0:
            get_run_logger().warning("no summary: %s", (result.stderr or result.stdout).strip()[-2000:])
            return
    if summary.exists():
        create_markdown_artifact(summary.read_text(), key="lmforge-summary", description="reports/summary.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the lmforge DVC pipeline as a Prefect flow.")
    parser.add_argument("--target", "-t", action="append", dest="targets", help="a stage to build (repeatable)")
    parser.add_argument("--set-param", "-S", action="append", dest="overrides", default=[],
                        help="a param override key.path=value, run as a DVC experiment (repeatable)")
    parser.add_argument("--name", "-n", dest="experiment_name", help="the DVC experiment's name, with -S")
    parser.add_argument("--copy-path", "-C", action="append", dest="copy_paths", default=[],
                        help="an untracked file or folder the experiment's stages need, with -S (repeatable)")
    parser.add_argument("--retries", type=int, default=1, help="retries for a transient stage failure")
    parser.add_argument("--accelerator-slots", type=int, default=1,
                        help=f"how many of {', '.join(TRAINING_STAGES)} may run at once (0: no limit)")
    args = parser.parse_args(argv)
    pipeline(targets=args.targets, overrides=args.overrides or None, retries=args.retries,
             accelerator_slots=args.accelerator_slots, experiment_name=args.experiment_name,
             copy_paths=args.copy_paths or None)


if __name__ == "__main__":
    main()

"""The pipeline flow: Prefect runs the DVC graph, one task per stage; DVC stays the one
definition of the stages and owns the cache.

    python -m flows.pipeline                          # everything
    python -m flows.pipeline --target tokenize        # a stage and what it needs
    python -m flows.pipeline -S split.task.max_rows=1000   # overrides: a DVC experiment

Each task, named after its stage (ingest@corpus) from the moment it is submitted, asks DVC
in-process whether its stage is up to date (cheap) and, only if not, runs `dvc repro --single-item
<stage>`: the stage's output reaches the task's log line by line as it prints it (a progress bar
every 10 s and in its final state; DVC's hints to a terminal user left out). Stages whose
upstream tasks succeeded start at once, so the corpus and task branches run side by side.
A stage that exits with code 2 failed for a user error (bad params or data): it is not retried
and nothing downstream runs. Any other failure is retried with exponential backoff.

The training stages (pretrain, tune, finetune, sft) want the accelerator to themselves: each holds a
slot of the Prefect global concurrency limit `lmforge-accelerator` while it runs, one slot by
default, so on one GPU they take turns where the graph would start them side by side. The limit
is the server's, shared by every flow run on it (see and change it under Concurrency in the UI);
`--accelerator-slots 0` turns it off.

With overrides (`-S key.path=value`, checked against params.yaml and its schema first) the graph
runs as one DVC experiment, `dvc exp run --temp`, in a temporary copy of the project; a task per
stage follows it, done as DVC runs or skips that stage there. The workspace's
params.yaml, dvc.lock and outputs stay as they were, so flow runs with different overrides can
run at the same time. The experiment's name and metrics go to the log and to an artifact; `dvc
exp show` lists it beside the others and `dvc exp apply <name>` brings it into the workspace.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Callable

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture, wait
from prefect.states import Cancelled
from prefect.tasks import exponential_backoff
from pydantic.json_schema import WithJsonSchema

from lmforge.config.overrides import apply_overrides as override_params
from lmforge.config import ConfigError, parse_yaml, validate_params
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
    # Into a pipe Python buffers what it prints by the 8 KiB: a stage's lines would reach the log
    # in lumps, minutes late.
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}


# --- a command's output, live in the task's log ------------------------------------------------

BAR_SECONDS = 10.0  # a progress bar's line reaches the log at most this often, and in its final state
TAIL_LINES = 200  # the last lines of a command's output kept for its error message
_LINE_END = re.compile(r"\r\n|\r|\n")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PERCENT = re.compile(r"(?:^|[\s:])(\d{1,3})%\|")  # tqdm's "ingest:  45%|████      | 9/20 [...]"
# What DVC tells a person at a terminal after a stage or an experiment; the flow does these itself
# or leaves them to the person reading the run. Each may be followed by tab-indented commands.
_DVC_HINTS = re.compile(r"^(To track the changes with git, run:|To enable auto staging, run:"
                        r"|To apply the results of an experiment to your workspace run:"
                        r"|Use `dvc push` to send your updates to remote storage\.)$")


class CommandOutput:
    """A command's output, fed as it comes, to a Prefect logger line by line (redacted).

    A progress bar redraws its line with '\\r' (tqdm, many times a second): its state reaches the
    log at most every `bar_seconds`, and its final state always. DVC's hints (`git add dvc.lock`,
    `dvc push`, ...) are dropped. The last TAIL_LINES lines logged are kept for an error message:
    a 2-hour stage's whole output would not fit in memory, and its error is at the end."""

    def __init__(self, logger, on_line: Callable[[str], None] | None = None, bar_seconds: float = BAR_SECONDS,
                 on_progress: Callable[[float], None] | None = None):
        self.logger, self.on_line, self.bar_seconds, self.on_progress = logger, on_line, bar_seconds, on_progress
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._buffer = ""
        self._after_cr = False  # the buffer's text redraws a line that a '\r' went back to
        self._drawn: str | None = None  # the bar's state seen last
        self._bar: str | None = None  # the bar's state seen last, if not logged
        self._bar_logged: tuple[str, float] = ("", -math.inf)  # a bar's state logged last, and when
        self._in_hint = False

    def feed(self, text: str) -> None:
        self._buffer += text
        while match := _LINE_END.search(self._buffer):
            segment, self._buffer = self._buffer[:match.start()], self._buffer[match.end():]
            self._redraw(segment) if match.group() == "\r" else self._line(segment)
            self._after_cr = match.group() == "\r"
        if self._after_cr and self._buffer.strip():
            self._redraw(self._buffer)  # tqdm draws a state in one write: no need to wait for the next

    def close(self) -> None:
        self._line(self._buffer)
        self._buffer = ""

    @property
    def text(self) -> str:
        return "\n".join(self.tail)

    def _redraw(self, raw: str) -> None:
        text = _ANSI.sub("", raw).rstrip()
        if not text or text == self._drawn:  # a bar cleared (leave=False), or a state seen already
            return
        self._drawn = text
        if time.monotonic() - self._bar_logged[1] >= self.bar_seconds:
            self._emit(text)
            self._bar_logged, self._bar = (text, time.monotonic()), None
        else:
            self._bar = text

    def _line(self, raw: str) -> None:
        text = _ANSI.sub("", raw).rstrip()
        final = bool(self._after_cr and text)  # a bar's final state, drawn over its last and ended
        if self._bar and not final:
            self._emit(self._bar)  # a bar left where it stopped: its last state
        self._bar = self._drawn = None
        if final and text == self._bar_logged[0]:
            return  # logged already, as it was drawn
        if _DVC_HINTS.match(text):
            self._in_hint = True
        elif not (self._in_hint and (raw.startswith("\t") or not text)):
            self._in_hint = False
            if text:
                self._emit(text)

    def _emit(self, line: str) -> None:
        self.tail.append(line)
        self.logger.info("%s", redact(line))
        if self.on_line:
            self.on_line(line)
        if self.on_progress and (percent := _PERCENT.search(line)):
            self.on_progress(min(float(percent.group(1)), 100.0))


class ProgressArtifact:
    """How far the progress bar a command drew last has got, as a progress artifact of the task,
    updated as its bar's line reaches the log: a long stage's Artifacts tab shows it at a glance."""

    def __init__(self, addr: str, logger):
        self.addr, self.logger, self.id, self.broken = addr, logger, None, False

    def __call__(self, percent: float) -> None:
        if self.broken:
            return
        try:
            if self.id is None:
                self.id = create_progress_artifact(percent, key=_artifact_key(self.addr) + "-progress",
                                                   description=f"How far {self.addr}'s progress bar has got")
            else:
                update_progress_artifact(self.id, percent)
        except Exception as error:  # a progress bar is no reason to fail a stage; its log line has it
            self.logger.warning("%s: no progress artifact: %s: %s", self.addr, type(error).__name__, error)
            self.broken = True


def stream_command(command: list[str], cwd: Path, env: dict[str, str], logger,
                   on_line: Callable[[str], None] | None = None, progress: str | None = None) -> tuple[int, str]:
    """Run `command` with its stdout and stderr merged into the log as it prints them
    (CommandOutput); gives its exit status and the last lines it printed. progress: a name for
    the progress artifact of its progress bars (none if None)."""
    output = CommandOutput(logger, on_line, on_progress=ProgressArtifact(progress, logger) if progress else None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # os.read gives what the pipe holds as soon as it holds something; a file object's read()
        # would wait to fill its buffer.
        while chunk := os.read(process.stdout.fileno(), 1 << 16):
            output.feed(decoder.decode(chunk))
        output.feed(decoder.decode(b"", final=True))
        output.close()
        return process.wait(), output.text
    finally:
        if process.poll() is None:  # the task was cancelled or crashed: the command goes with it
            process.kill()
            process.wait()
        process.stdout.close()


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
        status, output = stream_command([dvc_executable(), "--wait-for-lock", "repro", "--single-item", addr],
                                        root, stage_env(), logger, progress=addr)
    if status != 0:
        raise stage_failure(addr, output)
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
        return KilledForMemory(redact(killed_message(addr, output)))
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
_SKIPPED = re.compile(r"^Stage '([^']+)' (?:didn't change, skipping|is cached - skipping)")
_EXPERIMENT_NAME = re.compile(r"Ran experiment\(s\): (\S+)")
_FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")


def check_overrides(root: Path, overrides: list[str]) -> None:
    """Refuse, before DVC runs anything, an override of a key params.yaml does not have (DVC would
    add the key, and no stage would read it) or one whose value the params schema refuses (a stage
    would refuse it only when its turn came, hours in): a ConfigError naming the dotted key."""
    params_path = root / "params.yaml"
    tree = override_params(parse_yaml(params_path.read_text(), params_path.name), overrides, where=params_path.name)
    try:
        validate_params(tree, params_path.name)
    except ConfigError as error:
        raise ConfigError(redact(f"overrides {' '.join(overrides)}: {params_path.name} would hold {error}")) from None


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


class ExperimentProgress:
    """Which stages a running `dvc exp run` has passed, read from its lines as it prints them
    ("Running stage 'X':", "Stage 'X' didn't change, skipping"): each stage's task waits here for
    its own, so the run's graph shows the experiment going through its stages."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.outcomes: dict[str, dict] = {}  # stage -> {"status": "ran" | "skipped", "seconds": ...}
        self._running: tuple[str, float] | None = None
        self.failed: str | None = None  # the stage DVC reported failed, if one did
        self.error: BaseException | None = None
        self.ended = False

    def on_line(self, line: str) -> None:
        ran, skipped, failed = _RAN.match(line), _SKIPPED.match(line), _FAILED_STAGE.search(line)
        with self._changed:
            if ran or skipped:
                self._finish_running()
            if ran:
                self._running = (ran.group(1), time.perf_counter())
            elif skipped:
                self.outcomes.setdefault(skipped.group(1), {"status": "skipped", "seconds": 0.0})
            elif failed:  # the stage running did not pass; a retry of the experiment runs it again
                self.failed, self._running = failed.group(1), None
            self._changed.notify_all()

    def _finish_running(self) -> None:
        if self._running:
            addr, since = self._running
            self.outcomes.setdefault(addr, {"status": "ran", "seconds": round(time.perf_counter() - since, 2)})
            self._running = None

    def end(self, error: BaseException | None = None) -> None:
        """The experiment is over (the first call counts): the stage still running ran, unless it failed."""
        with self._changed:
            if self.ended:
                return
            if error is None:
                self._finish_running()
            self.error, self.ended = error, True
            self._changed.notify_all()

    def outcome(self, addr: str) -> dict | None:
        """Wait until DVC has passed `addr` or the experiment has ended; None: not passed."""
        with self._changed:
            self._changed.wait_for(lambda: addr in self.outcomes or self.ended)
            return self.outcomes.get(addr)


# The experiments this process is running, by key: the stage tasks share a process (and the
# flow's thread pool) with the experiment's task, and find its progress here.
_EXPERIMENTS: dict[str, ExperimentProgress] = {}


@task(task_run_name="experiment", retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=_retry_unless_user_error)
def run_experiment(root: Path, addrs: list[str], targets: list[str], overrides: list[str],
                   copy_paths: list[str], name: str, accelerator: bool, progress: str = "") -> dict:
    """`dvc exp run --temp` of the targets with the overrides; accelerator: hold an accelerator
    slot meanwhile; progress: the key of an ExperimentProgress to tell which stages DVC passes.
    Gives the experiment's name, its metrics and what became of each stage."""
    logger = get_run_logger()
    start = time.perf_counter()
    seen: list[str] = []  # "Running stage" lines, however long the output
    tracker = _EXPERIMENTS.get(progress)

    def on_line(line: str) -> None:
        if _RAN.match(line):
            seen.append(line)
        if tracker:
            tracker.on_line(line)

    with accelerator_slot("experiment", logger) if accelerator else nullcontext(0.0) as waited:
        status, output = stream_command(experiment_command(root, targets, overrides, copy_paths, name), root,
                                        experiment_env(root), logger, on_line, progress="experiment")
    if status != 0:
        raise experiment_failure(output)
    found = _EXPERIMENT_NAME.search(output)
    experiment = found.group(1) if found else name or "unnamed"
    return {"name": experiment, "overrides": overrides, "metrics": experiment_metrics(root, experiment),
            "stages": stage_statuses("\n".join(seen), addrs), "seconds": round(time.perf_counter() - start, 2),
            "waited": waited}


@task(task_run_name="{addr}")
def experiment_stage(addr: str, progress: str) -> dict:
    """Stage `addr` of the experiment whose ExperimentProgress is `progress`: runs until DVC has
    run or skipped it there, fails if it failed there."""
    tracker = _EXPERIMENTS[progress]
    outcome = tracker.outcome(addr)
    if outcome is None and tracker.error is None:
        outcome = {"status": "skipped", "seconds": 0.0}  # the experiment ended without a word on it
    if outcome is not None:
        get_run_logger().info("%s %s in the experiment", addr, outcome["status"])
        return {"stage": addr, **outcome}
    if tracker.failed == addr:
        raise tracker.error
    return Cancelled(message=f"not run: the experiment stopped at {tracker.failed or 'an error'} first")


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


def stage_choices(root: Path) -> list[str]:
    """The targets dvc.yaml at `root` offers: each stage's address (foreach items as
    ingest@corpus, their list read from params.yaml as DVC reads it) and each bare stage name
    (ingest: all its items). Read as YAML, without DVC's lock: the flow's module reads it on
    import, for the Run form. Empty if the project has no dvc.yaml it can read."""
    try:
        stages = parse_yaml((root / "dvc.yaml").read_text(), "dvc.yaml")["stages"]
        params_path = root / "params.yaml"
        params = parse_yaml(params_path.read_text(), params_path.name) if params_path.is_file() else {}
    except (OSError, ConfigError, KeyError, TypeError):
        return []
    choices = []
    for name, body in stages.items():
        items = body.get("foreach") if isinstance(body, dict) else None
        if isinstance(items, str) and (ref := re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", items)):
            items = params
            for key in ref.group(1).split("."):
                items = items.get(key) if isinstance(items, dict) else None
        choices.append(name)
        choices += [f"{name}@{item}" for item in items] if isinstance(items, (list, dict)) else []
    return choices


# A stage name for the Run form: a choice of dvc.yaml's stages, as this module's project has them.
# Only the form's schema holds the choices; a run checks its targets against the dvc.yaml under
# `root` (stage_graph), which may have other stages.
_CHOICES = stage_choices(Path(__file__).resolve().parents[1])
StageName = Annotated[str, WithJsonSchema({"type": "string", **({"enum": _CHOICES} if _CHOICES else {})})]


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline(
    targets: list[StageName] = [],  # noqa: B006 (read, never changed; a list shows as one in the Run form)
    overrides: list[str] = [],  # noqa: B006
    retries: int = 1,
    stage_retries: dict[str, int] = {},  # noqa: B006
    root: str = ".",
    accelerator_slots: int = 1,
    accelerator_stages: list[str] = list(TRAINING_STAGES),
    experiment_name: str = "",
    copy_paths: list[str] = [],  # noqa: B006
) -> list[dict]:
    """Run the DVC stages (all, or `targets` and their upstream) as Prefect tasks, one per stage.

    Args:
        targets: Stages to build, with what they need (ingest: all its items). None: the whole pipeline, pretrain, tune, finetune and sft included.
        overrides: Params as dotted.key=value (split.task.val=0.2), checked first; any runs the graph as a DVC experiment, params.yaml untouched.
        retries: Retries of a stage that failed for a reason that may pass; one that refuses its params or data, or was killed for memory, gets none.
        stage_retries: Retries by stage name (ingest, tune, ...), over `retries`; ingest has 3 unless set here.
        root: The project folder (dvc.yaml, params.yaml, the DVC cache), from the flow run's working directory.
        accelerator_slots: How many accelerator stages may run at once, server-wide (concurrency limit lmforge-accelerator); 0: no limit.
        accelerator_stages: The stage names that hold an accelerator slot while they run.
        experiment_name: The DVC experiment's name, with overrides; empty: DVC names it.
        copy_paths: Untracked files or folders an experiment's stages need (its copy holds what git tracks, plus dvc.lock).
    """
    if accelerator_slots < 0:
        raise ValueError(f"accelerator_slots must be 0 (no limit) or more, not {accelerator_slots}")
    root_path = Path(root).resolve()
    if overrides:
        check_overrides(root_path, overrides)
        require_git_commit(root_path)
    upstream = stage_graph(root_path, targets)
    tracking.prepare_store(root_path)  # before stages that log to it start side by side
    heavy = set(accelerator_stages) if accelerator_slots else set()
    if heavy:
        set_accelerator_slots(accelerator_slots)
    if overrides:
        results = _run_as_experiment(root_path, targets, upstream, overrides, retries, heavy,
                                     experiment_name, copy_paths)
    else:
        results = _run_graph(root_path, upstream, retries, {**DEFAULT_RETRIES, **stage_retries}, heavy)
    _publish_summary(results)
    # An experiment leaves the workspace as it was, and so its summary.
    summarize(root_path, rebuild=not overrides and any(r["status"] == "ran" for r in results))
    return results


def name_task_runs(futures: dict[str, PrefectFuture], patience: float = 30.0) -> None:
    """Give each submitted task run its name (the key) on the server as soon as the server has the run.

    Prefect renders task_run_name only as a run begins; the server first records a run under the
    name it was created with (`run_stage-971`), and a stage waiting for those it needs, maybe for
    hours, would show that in the run's graph. A run the server has not recorded within `patience`
    seconds keeps that name until it begins: a name is no reason to fail a run."""
    pending = dict(futures)
    deadline = time.monotonic() + patience
    with get_client(sync_client=True) as client:
        while pending and time.monotonic() < deadline:
            for name, future in list(pending.items()):
                try:
                    client.set_task_run_name(future.task_run_id, name)
                except httpx.HTTPStatusError as error:
                    if error.response.status_code != 404:  # 404: not recorded yet
                        raise
                    continue
                del pending[name]
            if pending:
                time.sleep(0.2)


def _run_graph(root: Path, upstream: dict[str, list[str]], retries: int, per_stage: dict[str, int],
               heavy: set[str]) -> list[dict]:
    futures = {}
    for addr in topological(upstream):
        name = addr.split("@")[0]
        stage_task = run_stage.with_options(name=addr, retries=per_stage.get(name, retries))
        # wait_for: a stage starts only once all it depends on has succeeded; a failure upstream
        # leaves it NotReady, so nothing downstream of a broken stage runs.
        futures[addr] = stage_task.submit(root, addr, accelerator=name in heavy,
                                          wait_for=[futures[d] for d in upstream[addr]])
    name_task_runs(futures)
    wait(list(futures.values()))
    return [f.result() for f in futures.values()]  # raises the first failure, failing the flow


def _run_as_experiment(root: Path, targets: list[str], upstream: dict[str, list[str]], overrides: list[str],
                       retries: int, heavy: set[str], name: str, copy_paths: list[str]) -> list[dict]:
    """One task runs the whole experiment (DVC runs its stages); beside it a task per stage follows
    the experiment through the graph. A row per stage, as _run_graph gives."""
    addrs = topological(upstream)
    accelerator = any(addr.split("@")[0] in heavy for addr in addrs)
    key = uuid.uuid4().hex
    progress = _EXPERIMENTS[key] = ExperimentProgress()
    stages: dict[str, PrefectFuture] = {}
    try:
        whole = run_experiment.with_options(retries=retries).submit(root, addrs, targets, overrides, copy_paths,
                                                                    name, accelerator, key)
        for addr in addrs:
            stages[addr] = experiment_stage.with_options(name=addr).submit(
                addr, key, wait_for=[stages[d] for d in upstream[addr]])
        name_task_runs(stages)
        try:
            experiment = whole.result()  # raises the experiment's failure, failing the flow
        except BaseException as error:
            progress.end(error)
            raise
        progress.end()
    finally:
        # Whatever stopped the flow, no stage task waits on: the first end() counts.
        progress.end(RuntimeError("the flow stopped before the experiment ended"))
        wait(list(stages.values()))
        _EXPERIMENTS.pop(key, None)
    publish_experiment(experiment)
    rows = [stages[addr].result() for addr in addrs]
    return [{**row, "waited": None, "experiment": experiment["name"]} for row in rows]


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
    return "" if value is None else str(value)  # an experiment's stages share its accelerator slot


@task(task_run_name="summarize")
def summarize(root: Path, rebuild: bool) -> None:
    """Show reports/summary.md as this run's artifact, rebuilt (tasks/summarize.py) when a stage ran."""
    summary = root / "reports" / "summary.md"
    if rebuild or not summary.exists():
        logger = get_run_logger()
        status, output = stream_command([sys.executable, "-m", "tasks.summarize"], root, stage_env(), logger)
        if status != 0:
            logger.warning("no summary: %s", redact(output[-2000:]))
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
    pipeline(targets=args.targets or [], overrides=args.overrides, retries=args.retries,
             accelerator_slots=args.accelerator_slots, experiment_name=args.experiment_name or "",
             copy_paths=args.copy_paths)


if __name__ == "__main__":
    main()

"""The Prefect pipeline flow over a real DVC project, on Prefect's test harness."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import killed_message, pipeline, stage_is_current, stage_metrics
from tasks import lineage
from tests.conftest import ROOT, run, write_params

DATA = ["tokenize", "split@task"]
FLAKY_STAGE = {
    "cmd": "python flaky.py",
    "deps": ["flaky.py"],
    "outs": ["flaky.txt"],
}
FLAKY_SCRIPT = """
from pathlib import Path
attempts = Path("attempts.log")
attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
if len(attempts.read_text()) == 1:
    raise SystemExit("simulated transient failure (a lost connection)")
Path("flaky.txt").write_text("ok")
"""


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def statuses(results: list[dict]) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in results}


def task_runs(flow_run_id) -> dict[str, int]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.run_count for r in runs}


def add_stages(repo: Path, stages: dict[str, dict]) -> None:
    """Add these stage definitions to the project's dvc.yaml."""
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"].update(stages)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def experiments(repo: Path) -> dict[str, tuple[dict, dict]]:
    """`dvc exp show`'s experiments: name -> (params.yaml, the task split's metrics)."""
    found = {}
    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                found[rev["name"]] = (data["params"]["params.yaml"]["data"],
                                      data["metrics"]["reports/split/task.json"]["data"])
    return found


def commit_all(repo: Path) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "baseline"], repo)


@pytest.mark.slow
def test_flow_runs_the_graph_then_skips_it_then_reruns_only_an_override(dvc_repo):
    first = pipeline(targets=DATA, root=str(dvc_repo))
    assert set(statuses(first).values()) == {"ran"} and len(first) == 7
    assert (dvc_repo / "data/tokens/meta.json").exists()

    second = pipeline(targets=DATA, root=str(dvc_repo))
    assert set(statuses(second).values()) == {"skipped"}

    commit_all(dvc_repo)
    params_before = (dvc_repo / "params.yaml").read_text()
    third = pipeline(targets=DATA, overrides=["split.task.val=0.2"], root=str(dvc_repo))
    assert [s for s, status in statuses(third).items() if status == "ran"] == ["split@task"]
    assert (dvc_repo / "params.yaml").read_text() == params_before
    params, metrics = experiments(dvc_repo)[third[0]["experiment"]]
    assert params["split"]["task"]["val"] == 0.2 and metrics["val"]["rows"] == 24  # 20% of 120 reviews
    assert run(["dvc", "status", *DATA], dvc_repo).stdout.strip().endswith("up to date.")


@pytest.mark.slow
def test_transient_failure_is_retried(dvc_repo):
    (dvc_repo / "flaky.py").write_text(FLAKY_SCRIPT)
    add_stages(dvc_repo, {"flaky": FLAKY_STAGE})
    state = pipeline(targets=["flaky"], retries=1, root=str(dvc_repo), return_state=True)
    assert state.is_completed()
    assert (dvc_repo / "attempts.log").read_text() == "xx"
    assert task_runs(state.state_details.flow_run_id)["flaky"] == 2


TRACKED_SCRIPT = """
import io
import json
from pathlib import Path
from lmforge.registry import tracking
with tracking.stage_run("tracked", {"knob": 1}) as run:
    run.log_metrics({"score": 0.5})
Path("tracked.json").write_text(json.dumps({"score": 0.5}))
"""


@pytest.mark.slow
def test_stage_artifacts_hold_metrics_and_the_mlflow_run_link(dvc_repo):
    (dvc_repo / "tracked.py").write_text(TRACKED_SCRIPT)
    add_stages(dvc_repo, {"tracked": {"cmd": "python tracked.py", "deps": ["tracked.py"],
                                      "metrics": [{"tracked.json": {"cache": False}}]}})
    pipeline(targets=["tracked"], root=str(dvc_repo))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts()}
    assert "0.5" in str(artifacts["tracked"].data)
    link = artifacts["tracked-mlflow"].data
    assert "(http://127.0.0.1:5000/#/experiments/" in link and "/runs/" in link


SIDE_BY_SIDE_SCRIPT = """
import sys
from pathlib import Path
from lmforge.registry import tracking
name = sys.argv[1]
with tracking.stage_run(name) as run:
    run.log_metrics({"score": 0.5})
Path(name + ".txt").write_text("ok")
"""


@pytest.mark.slow
def test_stages_side_by_side_share_a_fresh_mlflow_store(dvc_repo):
    # Six stages with no order between them start together; each would otherwise meet an empty
    # mlflow.db and run MLflow's schema migrations at the same moment as the others.
    (dvc_repo / "tracked.py").write_text(SIDE_BY_SIDE_SCRIPT)
    names = [f"tracked{i}" for i in range(6)]
    add_stages(dvc_repo, {name: {"cmd": f"python tracked.py {name}", "deps": ["tracked.py"], "outs": [f"{name}.txt"]}
                          for name in names})
    assert not (dvc_repo / "mlflow.db").exists()

    state = pipeline(targets=names, retries=0, root=str(dvc_repo), return_state=True)
    assert state.is_completed(), state.message
    assert task_runs(state.state_details.flow_run_id) == {name: 1 for name in names} | {"summarize": 1}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{dvc_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == names


SPAN_SCRIPT = """
import sys, time
from pathlib import Path
began = time.time()
time.sleep(5)
Path(sys.argv[1] + ".txt").write_text(f"{began} {time.time()}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 2])
def test_training_stages_take_turns_on_the_accelerator_slots(dvc_repo, slots):
    # Two stages with no order between them: with one slot the second waits for the first, with
    # two they run side by side (the check that the spans would overlap without the limit).
    (dvc_repo / "span.py").write_text(SPAN_SCRIPT)
    names = ["train_a", "train_b"]
    add_stages(dvc_repo, {name: {"cmd": f"python span.py {name}", "deps": ["span.py"], "outs": [f"{name}.txt"]}
                          for name in names})

    state = pipeline(targets=names, accelerator_stages=names, accelerator_slots=slots, retries=0,
                     root=str(dvc_repo), return_state=True)
    assert state.is_completed(), state.message
    first, second = sorted(tuple(map(float, (dvc_repo / f"{n}.txt").read_text().split())) for n in names)
    assert (second[0] < first[1]) == (slots == 2), (first, second)
    longest_wait = max(r["waited"] for r in state.result())
    # One slot: the second stage waits out the first's 5 s span. Two: no span to wait out, though taking
    # a slot from Prefect's server took 2.0 s on a loaded 2-core host.
    assert (longest_wait > 4) == (slots == 1), longest_wait
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("lmforge-accelerator").limit == slots


def test_a_negative_number_of_accelerator_slots_is_refused(dvc_repo):
    with pytest.raises(ValueError, match="accelerator_slots must be 0 \\(no limit\\) or more, not -1"):
        pipeline(targets=["tokenize"], accelerator_slots=-1, root=str(dvc_repo))


@pytest.mark.slow
def test_a_stage_whose_artifacts_cannot_be_published_still_ran_once(dvc_repo, caplog):
    (dvc_repo / "broken.py").write_text("from pathlib import Path\nPath('broken.json').write_text('{not json')\n")
    add_stages(dvc_repo, {"broken": {"cmd": "python broken.py", "deps": ["broken.py"],
                                     "metrics": [{"broken.json": {"cache": False}}]}})
    state = pipeline(targets=["broken"], retries=1, root=str(dvc_repo), return_state=True)
    assert state.is_completed(), state.message
    assert statuses(state.result()) == {"broken": "ran"}
    assert task_runs(state.state_details.flow_run_id)["broken"] == 1
    assert "broken ran, but its artifacts were not published: JSONDecodeError" in caplog.text


HUNGRY_STAGE = {
    # What the out-of-memory killer does to a stage: SIGKILL.
    "cmd": "python -c \"import os, signal; open('tries.log', 'a').write('x'); os.kill(os.getpid(), signal.SIGKILL)\"",
    "outs": ["never.txt"],
}


def test_a_stage_killed_for_memory_fails_once_and_names_its_memory_knob(dvc_repo):
    add_stages(dvc_repo, {"hungry": HUNGRY_STAGE})
    state = pipeline(targets=["hungry"], retries=2, root=str(dvc_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"hungry was killed \(SIGKILL\), most likely out of memory; it is not retried"):
        state.result()
    assert (dvc_repo / "tries.log").read_text() == "x"
    assert task_runs(state.state_details.flow_run_id)["hungry"] == 1
    assert "tokenize.sample_mb" in killed_message("tokenize", "") and "`workers`" in killed_message("clean@corpus", "")


@pytest.mark.slow
def test_user_error_fails_once_and_stops_downstream(dvc_repo, sources):
    write_params(dvc_repo, sources, **{"split.corpus.mode": "contiguous", "split.corpus.max_rows": 5})
    state = pipeline(targets=["tokenize"], retries=3, root=str(dvc_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="max_rows has no meaning in contiguous mode"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["split@corpus"] == 1  # a user error is not retried
    assert runs.get("tokenize", 0) == 0  # and nothing downstream ran
    assert not (dvc_repo / "data/tokens").exists()


def test_bad_override_is_a_clear_user_error(dvc_repo):
    state = pipeline(targets=["split@task"], overrides=["split.task.nope=1"], root=str(dvc_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no key 'split.task.nope'"):
        state.result()
    assert "nope" not in (dvc_repo / "params.yaml").read_text()


def test_overrides_in_a_project_without_a_commit_ask_for_one(dvc_repo):
    state = pipeline(targets=["split@task"], overrides=["split.task.val=0.2"], root=str(dvc_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="starts from a git commit, and .* has none: commit the project first"):
        state.result()


def start_flow_run(repo: Path, *args: str) -> subprocess.Popen:
    """`python -m flows.pipeline ARGS` in its own process, reporting to this test's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_flow_runs_with_overrides_at_once_each_keep_their_own_params(dvc_repo):
    shutil.copytree(ROOT / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    pipeline(targets=["split@task"], root=str(dvc_repo))
    commit_all(dvc_repo)
    before = {path: (dvc_repo / path).read_bytes() for path in ("params.yaml", "dvc.lock", "reports/split/task.json")}

    runs = {val: start_flow_run(dvc_repo, "-t", "split@task", "-S", f"split.task.val={val}", "--accelerator-slots", "0")
            for val in (0.2, 0.3)}
    logs = {val: process.communicate(timeout=600)[0] for val, process in runs.items()}
    for val, process in runs.items():
        assert process.returncode == 0, logs[val][-3000:]

    assert {path: (dvc_repo / path).read_bytes() for path in before} == before
    assert run(["dvc", "status", "split@task"], dvc_repo).stdout.strip().endswith("up to date.")
    recorded = experiments(dvc_repo)
    for val, val_rows in ((0.2, 24), (0.3, 36)):  # of 120 reviews
        name = re.search(r"ran as DVC experiment (\S+) in", logs[val]).group(1)
        params, metrics = recorded[name]
        assert params["split"]["task"]["val"] == val and metrics["val"]["rows"] == val_rows, (name, recorded)
        assert f"reports/split/task.json.val.rows={val_rows}" in logs[val]  # the metrics, in the run's log


HOLD_DVC_LOCK = """
import sys, time
from pathlib import Path
from dvc.lock import make_lock

lock = make_lock(".dvc/tmp/lock")
lock.lock()
print("held", flush=True)
time.sleep(4)  # longer than the 3 s that DVC retries a held lock before giving up
Path("released").write_text("")
lock.unlock()
"""


def read_input_hashes(root: Path, _addr: str) -> dict[str, str]:
    return lineage.input_hashes(["data/tokens"], root)


@pytest.mark.parametrize("read", [stage_is_current, stage_metrics, read_input_hashes],
                         ids=["status", "metrics", "input-hashes"])
def test_reads_of_the_dvc_repo_wait_while_a_sibling_repro_holds_its_lock(dvc_repo, read):
    # A `dvc repro` holds the repo lock while it rewrites dvc.lock; a read that ignores the lock
    # can meet a half-written file, and one that gives up after DVC's retries fails the task.
    (dvc_repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DVC_LOCK], cwd=dvc_repo, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        read(dvc_repo, "tokenize")
        assert (dvc_repo / "released").exists(), "read the repo while another DVC process held its lock"
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0


def test_the_tune_worker_reads_its_storage_from_a_secret_and_logs_no_password(tmp_path):
    """The storage URL travels as a Prefect Secret block's name, never as a flow parameter, and
    the worker's output is redacted before it reaches the Prefect log."""
    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.actions import tune_worker

    url = "postgresql://tuner:pw-7f3a9c@db.invalid:5432/optuna"
    Secret(value=url).save("lmforge-test-storage", overwrite=True)
    # a stand-in for tasks.tune in the worker's folder: it records and prints the storage it got
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/__init__.py").write_text("")
    (tmp_path / "tasks/tune.py").write_text(
        "import os, pathlib\nurl = os.environ['LMFORGE_OPTUNA_STORAGE']\n"
        "pathlib.Path('got.txt').write_text(url)\nprint('tune: study at', url)\n")
    state = tune_worker(storage_secret="lmforge-test-storage", root=str(tmp_path), return_state=True)
    assert state.is_completed()
    assert (tmp_path / "got.txt").read_text() == url  # the worker process did get the real URL
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        for _ in range(50):
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            text = "\n".join(log.message for log in logs)
            if "tune: study at" in text:
                break
            time.sleep(0.2)
    assert flow_run.parameters == {"storage_secret": "lmforge-test-storage", "root": str(tmp_path)}
    assert "postgresql://tuner:***@db.invalid:5432/optuna" in text and "pw-7f3a9c" not in text


def test_stage_output_and_experiment_records_carry_no_password(dvc_repo):
    """A password in an override or in what a stage prints never reaches the Prefect logs or
    artifacts of the run (the override itself is a flow parameter: docs/security.md says so)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    (dvc_repo / "leaky.py").write_text(
        "import json, yaml\nstorage = yaml.safe_load(open('params.yaml'))['tune']['storage']\n"
        "print('connecting to', storage)\njson.dump({'ok': 1}, open('leaky.json', 'w'))\n")
    add_stages(dvc_repo, {"leaky": {"cmd": "python leaky.py", "deps": ["leaky.py"], "params": ["tune"],
                                    "metrics": [{"leaky.json": {"cache": False}}]}})
    commit_all(dvc_repo)
    state = pipeline(targets=["leaky"], overrides=["tune.storage=postgresql://tuner:pw-leak-42@db.invalid/optuna"],
                     root=str(dvc_repo), return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        for _ in range(50):
            logs = "\n".join(log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
            if "connecting to" in logs:
                break
            time.sleep(0.2)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    shown = logs + "\n".join(str(a.data) + str(a.description) for a in artifacts)
    assert "connecting to postgresql://tuner:***@db.invalid/optuna" in logs  # the stage ran and spoke
    assert artifacts and "pw-leak-42" not in shown


# --- the control room: live logs, named tasks, the experiment's stages, the Run form -----------

TALKER_SCRIPT = """
import sys, time
from pathlib import Path
print("talker: first line", flush=True)
for _ in range(1200):  # the test creates `go` once it has seen the first line in the Prefect API
    if Path("go").exists():
        break
    time.sleep(0.1)
else:
    sys.exit("talker: nobody said go")
for i in range(21):  # a tqdm-like bar: each state redraws the line with a carriage return
    sys.stderr.write(f"\\rtalking {i * 5:3d}%|{'#' * (i // 2):<10}| {i}/20 [00:01<00:02, 5.2it/s]")
    sys.stderr.flush()
    time.sleep(0.05)
sys.stderr.write("\\n")
print("talker: last line")
Path("talker.txt").write_text("ok")
"""
GATE_SCRIPT = """
import sys, time
from pathlib import Path
for _ in range(1200):
    if Path("go").exists():
        break
    time.sleep(0.1)
Path(sys.argv[1] + ".txt").write_text("ok")
"""


def logs_of(task_run_name: str) -> list[str]:
    """The log lines in the Prefect API of the task runs named so, oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[task_run_name])))
        if not runs:
            return []
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[r.id for r in runs])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def wait_until(check, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.3)
    raise AssertionError(f"waited {seconds} s for {what}")


def test_stage_output_reaches_the_log_while_the_stage_runs(dvc_repo):
    shutil.copytree(ROOT / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (dvc_repo / "talker.py").write_text(TALKER_SCRIPT)
    add_stages(dvc_repo, {"talker": {"cmd": "python talker.py", "deps": ["talker.py"], "outs": ["talker.txt"]}})
    flow_run = start_flow_run(dvc_repo, "-t", "talker", "--accelerator-slots", "0")
    try:
        wait_until(lambda: "talker: first line" in logs_of("talker"), "the stage's first line in the API")
        # The stage is still waiting for `go`: the line came live, not with the stage's exit.
        assert flow_run.poll() is None and not (dvc_repo / "talker.txt").exists()
        (dvc_repo / "go").write_text("")
        output = flow_run.communicate(timeout=300)[0]
    finally:
        flow_run.kill()
    assert flow_run.returncode == 0, output[-3000:]
    lines = wait_until(lambda: (got := logs_of("talker")) and "talker: last line" in got and got, "the last line")
    bars = [line for line in lines if "it/s]" in line]
    # 21 states in about a second: the first as drawn and the final one, none in between.
    assert len(bars) <= 3 and bars[-1].startswith("talking 100%|") and "20/20" in bars[-1], bars
    assert lines.index(bars[-1]) < lines.index("talker: last line")
    hints = ("git add", "dvc push", "auto staging", "autostage", "To track the changes")
    assert not [line for line in lines if any(hint in line for hint in hints)], lines
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the bar's progress, at a glance in the Artifacts tab
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["talker-progress"])))
    assert [(a.type, a.data) for a in progress] == [("progress", 100.0)]


def test_a_progress_bar_is_logged_at_most_every_bar_seconds_and_in_its_final_state():
    import logging

    from tqdm import tqdm

    from flows.pipeline import CommandOutput

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    logger, handler = logging.getLogger("test-command-output"), Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    percents = []
    output = CommandOutput(logger, bar_seconds=3600, on_progress=percents.append)
    drawn = io.StringIO()
    output.feed("loading https://user:pw-9@host/data\n")
    for _ in tqdm(range(50), desc="ingest", file=drawn, mininterval=0, ncols=80):
        output.feed(drawn.getvalue())  # what the pipe held since the last read
        drawn.seek(0), drawn.truncate()
    output.feed(drawn.getvalue() + "Updating lock file 'dvc.lock'\n\nTo track the changes with git, run:\n\n"
                "\tgit add dvc.lock\n\nTo enable auto staging, run:\n\n\tdvc config core.autostage true\n"
                "Use `dvc push` to send your updates to remote storage.\ndone")
    output.close()
    assert handler.lines[0] == "loading https://user:***@host/data"  # redacted, line by line
    assert handler.lines[1].startswith("ingest:   0%|") and handler.lines[2].startswith("ingest: 100%|")
    assert "50/50" in handler.lines[2] and handler.lines[3:] == ["Updating lock file 'dvc.lock'", "done"]
    assert output.text.splitlines()[-1] == "done" and len(output.tail) == 5
    assert percents == [0.0, 100.0]  # the bar's states as they reached the log


def test_pending_stage_tasks_carry_their_stage_s_name(dvc_repo):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    shutil.copytree(ROOT / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (dvc_repo / "gate.py").write_text(GATE_SCRIPT)
    chain = {"gate": [], "middle": ["gate.txt"], "last": ["middle.txt"]}
    add_stages(dvc_repo, {name: {"cmd": f"python gate.py {name}", "deps": ["gate.py", *deps], "outs": [f"{name}.txt"]}
                          for name, deps in chain.items()})
    flow_run = start_flow_run(dvc_repo, "-t", "last", "--accelerator-slots", "0")

    def pending_by_name():
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=list(chain))))
        states = {r.name: r.state_type.value for r in runs}
        return states if states == {"gate": "RUNNING", "middle": "PENDING", "last": "PENDING"} else None

    try:
        # While gate runs (it waits for `go`), the two stages after it are pending under their names.
        wait_until(pending_by_name, "the pending stages under their names", seconds=60)
        (dvc_repo / "go").write_text("")
        output = flow_run.communicate(timeout=300)[0]
    finally:
        flow_run.kill()
    assert flow_run.returncode == 0, output[-3000:]
    assert (dvc_repo / "last.txt").exists()


ECHO_VAL_SCRIPT = """
import sys, time, yaml
from pathlib import Path
val = yaml.safe_load(open("params.yaml"))["split"]["task"]["val"]
if sys.argv[1] == "after_val":
    time.sleep(3)  # so the stage before it is seen done while the experiment still runs
Path(sys.argv[1] + ".txt").write_text(f"{val}")
"""


@pytest.mark.slow
def test_an_experiment_shows_a_task_per_stage_done_as_dvc_passes_it(dvc_repo):
    (dvc_repo / "echo_val.py").write_text(ECHO_VAL_SCRIPT)
    add_stages(dvc_repo, {
        "echo_val": {"cmd": "python echo_val.py echo_val", "deps": ["echo_val.py"], "params": ["split.task.val"],
                     "outs": ["echo_val.txt"]},
        "after_val": {"cmd": "python echo_val.py after_val", "deps": ["echo_val.py", "echo_val.txt"],
                      "outs": ["after_val.txt"]},
        "untouched": {"cmd": "python echo_val.py untouched", "deps": ["echo_val.py"], "outs": ["untouched.txt"]},
    })
    targets = ["after_val", "untouched"]
    pipeline(targets=targets, accelerator_slots=0, root=str(dvc_repo))
    commit_all(dvc_repo)

    state = pipeline(targets=targets, overrides=["split.task.val=0.2"], accelerator_slots=0, root=str(dvc_repo),
                     return_state=True)
    assert state.is_completed(), state.message
    assert statuses(state.result()) == {"echo_val": "ran", "after_val": "ran", "untouched": "skipped"}
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = {r.name: r for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))}
    assert set(runs) == {"experiment", "echo_val", "after_val", "untouched", "summarize"}
    assert all(run.state_type.value == "COMPLETED" and run.run_count == 1 for run in runs.values())
    # echo_val's task ended as DVC went on to after_val (3 s), not when the experiment ended.
    assert (runs["experiment"].end_time - runs["echo_val"].end_time).total_seconds() > 2
    assert (dvc_repo / "echo_val.txt").read_text() == "0.1"  # the workspace kept its params


def test_the_run_form_describes_every_parameter_and_offers_the_stages():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import stage_graph

    schema = parameter_schema(pipeline).model_dump_for_openapi()
    properties = schema["properties"]
    assert set(properties) == {"targets", "overrides", "retries", "stage_retries", "root", "accelerator_slots",
                               "accelerator_stages", "experiment_name", "copy_paths"}
    undescribed = [name for name, spec in properties.items() if not spec.get("description")]
    assert not undescribed, f"the Run form shows these without a word: {undescribed}"
    assert not [name for name, spec in properties.items() if "\n" in spec["description"]]  # a line each
    assert "the whole pipeline, pretrain, tune, finetune and sft included" in properties["targets"]["description"]
    addresses = set(stage_graph(ROOT))
    offered = properties["targets"]["items"]["enum"]
    assert set(offered) == addresses | {a.split("@")[0] for a in addresses} and "ingest@corpus" in offered
    # A null choice shows in the form as "Property is type None": every default is a value.
    assert "null" not in json.dumps(schema) and "anyOf" not in json.dumps(schema)
    assert properties["targets"]["type"] == "array" and properties["targets"]["default"] == []


def test_a_bad_override_value_fails_the_run_before_any_stage_with_the_key(dvc_repo):
    params_before = (dvc_repo / "params.yaml").read_text()
    state = pipeline(targets=["split@task"], overrides=["split.task.val=7"], root=str(dvc_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"overrides split\.task\.val=7: params\.yaml would hold invalid params:\n"
                                        r"  split\.task\.val: "):
        state.result()
    assert task_runs(state.state_details.flow_run_id) == {}  # no stage ran, nor waited
    assert (dvc_repo / "params.yaml").read_text() == params_before


@pytest.mark.slow
def test_a_stage_that_fails_in_an_experiment_fails_its_own_task(dvc_repo):
    (dvc_repo / "echo_val.py").write_text(ECHO_VAL_SCRIPT)
    (dvc_repo / "refuse.py").write_text("import sys\nprint('error: refuse: no, not with these params')\nsys.exit(2)\n")
    add_stages(dvc_repo, {
        "echo_val": {"cmd": "python echo_val.py echo_val", "deps": ["echo_val.py"], "params": ["split.task.val"],
                     "outs": ["echo_val.txt"]},
        "refuse": {"cmd": "python refuse.py", "deps": ["refuse.py", "echo_val.txt"], "outs": ["refused.txt"]},
        "after_refuse": {"cmd": "python echo_val.py after_refuse", "deps": ["echo_val.py", "refused.txt"],
                         "outs": ["after_refuse.txt"]},
    })
    commit_all(dvc_repo)
    state = pipeline(targets=["after_refuse"], overrides=["split.task.val=0.2"], retries=2, accelerator_slots=0,
                     root=str(dvc_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="refuse failed: error: refuse: no, not with these params"):
        state.result()
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = {r.name: r for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))}
    shown = {name: (run.state_type.value, run.state_name) for name, run in runs.items()}
    assert shown == {"experiment": ("FAILED", "Failed"), "echo_val": ("COMPLETED", "Completed"),
                     "refuse": ("FAILED", "Failed"), "after_refuse": ("PENDING", "NotReady")}, shown
    assert runs["experiment"].run_count == 1  # a stage's refusal is not retried

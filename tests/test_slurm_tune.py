"""The tune stage as a Slurm array (scripts/tune_array.sbatch on scripts/local_cluster.sh's cluster)
on one Optuna study in a real PostgreSQL 15 (tests/postgres_fixtures.py): a 2-task array of tune
workers on a tiny project, task 1 killed with SIGKILL mid-trial; every trial is counted once, the
killed task's trial is marked failed by the other worker's heartbeat check (Optuna's
fail_stale_trials, run before each trial it asks for), and the finetune stage reads the study's best
from the reports/tune/best.yaml the array left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster_fixtures import Cluster
from tests.cluster_fixtures import slurm_cluster  # noqa: F401 (a session fixture)
from tests.conftest import BIN, ROOT
from tests.finetune_fixtures import params_file, tiny_base, tiny_finetune, write_task
from tests.postgres_fixtures import postgres  # noqa: F401 (a session fixture)

pytestmark = pytest.mark.slow

SBATCH = ROOT / "scripts" / "tune_array.sbatch"
STUDY = "slurm-array"  # the session's PostgreSQL is shared with test_shared_services' study
# Per worker. Optuna fails a stale trial only when a worker asks for its next trial, once the
# stale heartbeat is older than the grace period (2 x tune.heartbeat_interval = 2 s): the survivor
# starts 3 more trials after the kill, the last at least two trials' time (> 2 s) after it.
N_TRIALS = 4
TIMEOUT_S = 180
SPACE = {"learning_rate": {"type": "float", "low": 2e-3, "high": 6e-3, "log": True},
         "batch_size": {"type": "categorical", "choices": [8, 16]}}


def project(root: Path) -> Path:
    """A tiny project: params.yaml (tune.heartbeat_interval 1 s: a stale trial after 2 s) and the task split."""
    root.mkdir(parents=True)
    base = tiny_base(root / "base")
    write_task(root / "split", n_train=128, n_val=32, n_test=8)
    tune = {"study_name": STUDY, "n_trials": N_TRIALS, "timeout": None, "pruner": "none",
            "max_train_rows": None, "max_val_rows": None, "space": SPACE, "heartbeat_interval": 1}
    params_file(root / "params.yaml", tune=tune, finetune=tiny_finetune(base, num_train_epochs=2))
    return root


def job_env(cluster: Cluster, storage: str) -> dict[str, str]:
    # PGPASSFILE is in os.environ (the postgres fixture set it); the URL has no password.
    assert os.environ.get("PGPASSFILE") and "@" in storage and ":" not in storage.split("@")[0].split("//")[1]
    return {**os.environ, **cluster.env, "LMFORGE_OPTUNA_STORAGE": storage, "LMFORGE_TRACKING": "off",
            "LMFORGE_VENV": sys.prefix, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "LMFORGE_TUNE_ARGS": "--params params.yaml --data split --reports reports/tune"}


def slurm(*command: str, env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run(list(command), env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
    return done.stdout


def task_state(job_id: str, index: int, env: dict[str, str]) -> str:
    shown = subprocess.run(["scontrol", "-o", "show", "job", f"{job_id}_{index}"], env=env, capture_output=True,
                           text=True, timeout=30, check=False).stdout
    found = re.search(r"\bJobState=(\S+)", shown)
    return found.group(1) if found else "UNKNOWN"


def trials(storage: str):
    import optuna

    try:
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no worker has created the study yet
        return []


def wait_for(what: str, ready, logs: list[Path], timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
            raise AssertionError(f"{what} not within {timeout} s\n{tails}")
        time.sleep(0.3)
    return found


def logged_trials(log: Path) -> list[int]:
    return [int(n) for n in re.findall(r"^tune: trial (\d+) val ", log.read_text(), re.MULTILINE)]


def test_a_slurm_array_of_tune_workers_shares_one_postgres_study_and_a_killed_tasks_trial_fails(
        slurm_cluster, postgres, tmp_path):  # noqa: F811
    import optuna

    from lmforge.config import load_params
    from tasks.finetune import settings

    start = time.perf_counter()
    root = project(tmp_path / "proj")
    storage = postgres.url("optuna")
    env = job_env(slurm_cluster, storage)
    job_id = slurm("sbatch", "--parsable", f"--partition={slurm_cluster.partition}", "--time=0:10:00",
                   "--array=0-1", "--export=ALL,LMFORGE_OPTUNA_STORAGE,PGPASSFILE", str(SBATCH),
                   env=env, cwd=root).strip().split(";")[0]
    logs = [root / f"slurm-tune-{job_id}_{index}.out" for index in (0, 1)]
    try:
        # Both tasks in a trial: kill task 1 there (SIGKILL reaches the batch step, the exec'd worker).
        running = wait_for("both tasks in a trial",
                           lambda: (r := {t.number for t in trials(storage) if t.state.name == "RUNNING"}) and
                           len(r) == 2 and r, logs)
        slurm("scancel", "--signal=KILL", f"{job_id}_1", env=env)
        wait_for("task 1 to end", lambda: task_state(job_id, 1, env) not in ("RUNNING", "PENDING", "COMPLETING"), logs)
        wait_for("task 0 to end", lambda: task_state(job_id, 0, env) not in ("RUNNING", "PENDING", "COMPLETING"), logs)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30, check=False)
    out0 = logs[0].read_text()
    assert task_state(job_id, 0, env) == "COMPLETED", out0[-4000:]
    assert task_state(job_id, 1, env) in ("CANCELLED", "FAILED"), logs[1].read_text()[-4000:]
    assert f"study in 127.0.0.1:{postgres.port}/optuna" in out0 and "password" not in out0.lower()
    tune_s = time.perf_counter() - start

    study = optuna.load_study(study_name=STUDY, storage=storage)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(len(numbers))), "each trial counted once"
    # The survivor ran its N_TRIALS; the killed task the trials it finished plus the one it died in.
    survivor, victim = logged_trials(logs[0]), logged_trials(logs[1])
    assert len(survivor) == N_TRIALS and not set(survivor) & set(victim)
    failed = [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0] in running, f"the killed task's trial: {failed} of {running}"
    assert sorted(survivor + victim + failed) == numbers, "what the two workers asked, nothing more"
    assert {t.state for t in study.trials if t.number != failed[0]} == {optuna.trial.TrialState.COMPLETE}
    stale = study.trials[failed[0]]
    # Failed by the survivor's heartbeat check: after the kill, past the 2 s grace period.
    assert "error" not in stale.user_attrs and stale.datetime_complete is not None
    assert stale.datetime_complete.timestamp() - stale.datetime_start.timestamp() >= 2
    assert len([t for t in study.trials if t.user_attrs.get("untuned_default")]) == 1

    # The survivor ended last: best.yaml is over the whole study.
    best = yaml.safe_load((root / "reports/tune/best.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number and best["best_value"] == pytest.approx(study.best_value)
    assert best["trials"] == {"complete": len(numbers) - 1, "fail": 1}
    assert best["storage"] == f"postgresql://***@127.0.0.1:{postgres.port}/optuna"

    # The finetune stage reads the study's best.
    section, tuned = settings(load_params(root / "params.yaml"), root / "reports/tune/best.yaml")
    assert tuned == best["params"]
    finetuned = subprocess.run([sys.executable, "-m", "tasks.finetune", "--params", "params.yaml", "--data", "split",
                                "--best", "reports/tune/best.yaml", "--out", "models/finetuned",
                                "--checkpoints", "models/checkpoints", "--reports", "reports/finetune"],
                               cwd=root, env={k: v for k, v in env.items() if k != "LMFORGE_OPTUNA_STORAGE"},
                               capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert finetuned.returncode == 0, finetuned.stderr[-4000:]
    metrics = json.loads((root / "reports/finetune/metrics.json").read_text())
    # What the stage trained with: best.yaml's params ({} when no trial beat the untuned default by min_gain).
    assert metrics["tuned_params"] == best["params"] == tuned
    if tuned:
        assert section.learning_rate == tuned["learning_rate"] and section.batch_size == tuned["batch_size"]
    print(f"\nslurm array of 2 tune workers: {len(numbers)} trials, trial {failed[0]} failed by heartbeat "
          f"{stale.datetime_complete - stale.datetime_start} after it started; array {tune_s:.1f} s, "
          f"with finetune {time.perf_counter() - start:.1f} s")


def test_the_array_script_refuses_to_start_without_a_shared_storage(tmp_path):
    # Without it every task would tune a study of its own in reports/tune/study.db.
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_OPTUNA_STORAGE"}
    done = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env={**env, "LMFORGE_PROJECT": str(tmp_path)},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "LMFORGE_OPTUNA_STORAGE is not set" in done.stderr
    assert "--array=0-" in SBATCH.read_text() and "--export=ALL,LMFORGE_OPTUNA_STORAGE,PGPASSFILE" in SBATCH.read_text()

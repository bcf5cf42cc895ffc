"""The shared services on a real PostgreSQL 15 (#40): scripts/local_postgres.sh itself; two tune
workers joining one Optuna study there, a killed worker's trial failed by its heartbeat; and the
stack of scripts/stack.sh (MLflow and Prefect servers on that PostgreSQL, the lmforge-process pool
and a worker): register, promote, trace and serve against its MLflow, a deployment run on its worker.
One PostgreSQL per session (tests/postgres_fixtures.py); tiny real models and projects reused
from the register, serving, tune and deployment tests."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT
from tests.finetune_fixtures import params_file, tiny_base, tiny_finetune, write_task
from tests.postgres_fixtures import need_postgres, free_port, script, state_folder
from tests.postgres_fixtures import postgres, stack  # noqa: F401 (session fixtures)

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_local_postgres_is_idempotent_keeps_its_password_in_pgpass_and_leaves_nothing_running():
    import psycopg

    need_postgres()
    state = state_folder("lmforge-pg-own-")
    env = {**os.environ, "LMFORGE_PG_PORT": str(free_port())}
    env.pop("PGPASSFILE", None)
    try:
        first = script("local_postgres.sh", "up", str(state), env=env)
        pgpass = state / "pgpass"
        secret = pgpass.read_text()
        again = script("local_postgres.sh", "up", str(state), env=env)  # running already: nothing changes
        assert pgpass.read_text() == secret and stat.S_IMODE(pgpass.stat().st_mode) == 0o600
        password = secret.strip().rsplit(":", 1)[1]
        assert len(password) >= 24
        urls = script("local_postgres.sh", "urls", str(state), env=env).stdout
        said = first.stdout + first.stderr + again.stdout + again.stderr + urls
        assert password not in said and password not in (state / "postgres.log").read_text()
        assert script("local_postgres.sh", "status", str(state), env=env).returncode == 0
        port = env["LMFORGE_PG_PORT"]
        for database in ("optuna", "mlflow", "prefect"):
            assert f"{database}=postgresql://lmforge@127.0.0.1:{port}/{database}" in urls
            with psycopg.connect(host="127.0.0.1", port=port, user="lmforge", dbname=database,
                                 passfile=str(pgpass)) as conn:
                assert conn.execute("SELECT current_user, current_database()").fetchone() == ("lmforge", database)
        # TCP asks for the password: no trust on loopback.
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host="127.0.0.1", port=port, user="lmforge", dbname="optuna", password="wrong")
        script("local_postgres.sh", "down", str(state), env=env)
        assert script("local_postgres.sh", "status", str(state), env=env, check=False).returncode == 3
        assert not (state / "data/postmaster.pid").exists() and not _processes_mentioning(str(state))
        script("local_postgres.sh", "down", str(state), env=env)  # down again: still fine
    finally:
        script("local_postgres.sh", "down", str(state), env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)


# --- Optuna: one study, several workers ------------------------------------------------------

SPACE = {"learning_rate": {"type": "float", "low": 2e-3, "high": 6e-3, "log": True},
         "batch_size": {"type": "categorical", "choices": [8, 16]}}


def _tune_params(path: Path, base: Path, n_trials: int, **finetune) -> Path:
    tune = {"study_name": "shared", "n_trials": n_trials, "timeout": None, "pruner": "none",
            "max_train_rows": None, "max_val_rows": None, "space": SPACE, "heartbeat_interval": 1}
    return params_file(path, tune=tune, finetune=tiny_finetune(base, **finetune))


def _tune_worker(tmp: Path, name: str, params: Path, data: Path, storage: str) -> tuple[subprocess.Popen, Path]:
    """`python -m tasks.tune` in its own process, reports in tmp/name, output in tmp/name.log."""
    log = tmp / f"{name}.log"
    env = {**os.environ, "LMFORGE_OPTUNA_STORAGE": storage, "LMFORGE_TRACKING": "off",
           "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.tune", "--params", str(params), "--data", str(data),
                                 "--reports", str(tmp / name)], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def _finished(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, f"tune worker exited {proc.returncode}:\n{log.read_text()[-4000:]}"


def test_two_tune_workers_share_one_postgres_study_and_a_killed_workers_trial_fails(postgres, tmp_path):  # noqa: F811
    import optuna

    from lmforge.config import load_params
    from tasks.finetune import settings

    base = tiny_base(tmp_path / "base")
    data = write_task(tmp_path / "split", n_train=128, n_val=32, n_test=8)
    storage = postgres.url("optuna")
    # A worker killed mid-trial leaves it RUNNING (its own finetune values: a trial of its own).
    slow = _tune_params(tmp_path / "slow.yaml", base, n_trials=1, num_train_epochs=500, learning_rate=5e-3)
    victim, victim_log = _tune_worker(tmp_path, "victim", slow, data, storage)
    deadline = time.monotonic() + 180
    while not (running := _running(storage)):
        assert victim.poll() is None and time.monotonic() < deadline, victim_log.read_text()[-3000:]
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (stale,) = running

    # Two workers at once: the first trial either starts fails the stale one (its heartbeat is
    # older than the grace period); then each runs its 2 trials in the one study.
    params = _tune_params(tmp_path / "params.yaml", base, n_trials=2, num_train_epochs=2)
    workers = [_tune_worker(tmp_path, name, params, data, storage) for name in ("a", "b")]
    for proc, log in workers:
        _finished(proc, log)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4], "each trial counted once"
    states = {t.number: t.state for t in study.trials}
    assert states.pop(stale) == optuna.trial.TrialState.FAIL and set(states.values()) == {optuna.trial.TrialState.COMPLETE}
    untuned = [t for t in study.trials if t.user_attrs.get("untuned_default") and t.number != stale]
    assert len(untuned) == 1, "both workers enqueued the untuned default: it ran twice"
    # The worker that finished last wrote best.yaml over the whole study.
    last = max((tmp_path / name / "best.yaml" for name in ("a", "b")), key=lambda path: path.stat().st_mtime_ns)
    best = yaml.safe_load(last.read_text())
    assert best["trials"] == {"fail": 1, "complete": 4} and best["untuned_trial"] == untuned[0].number
    assert best["storage"] == f"postgresql://***@127.0.0.1:{postgres.port}/optuna"

    # The finetune stage reads the study's best from best.yaml.
    section, tuned = settings(load_params(params), last)
    assert tuned == best["params"]
    if tuned:
        assert section.learning_rate == tuned["learning_rate"] and section.batch_size == tuned["batch_size"]


def _running(storage: str) -> list[int]:
    import optuna

    try:
        study = optuna.load_study(study_name="shared", storage=storage)
    except KeyError:  # the victim has not created the study yet
        return []
    return [t.number for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]


# --- the stack: MLflow and Prefect on the PostgreSQL ------------------------------------------


def _rows(postgres, database: str, sql: str) -> list[tuple]:  # noqa: F811
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="lmforge", dbname=database,
                         passfile=str(postgres.pgpass)) as conn:
        return conn.execute(sql).fetchall()


def test_register_promote_trace_and_serve_against_the_stacks_mlflow(stack, postgres, tmp_path, monkeypatch, capsys):  # noqa: F811
    from tests.test_openai_serving import Server
    from tests.test_register import cli, head, make_project, register

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, stack.mlflow_url)
    for key in ("LMFORGE_EXPERIMENT", "LMFORGE_TRACKING"):
        monkeypatch.delenv(key, raising=False)
    root = make_project(tmp_path / "proj", "stack")
    register(root, monkeypatch, "chat")
    promoted = subprocess.run([str(BIN / "lmforge"), "promote", "stack-chat"], cwd=root, capture_output=True,
                              text=True, timeout=300, env=os.environ.copy())
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    code, out, _ = cli(root, monkeypatch, capsys, "trace", "models:/stack-chat@champion")
    assert code == 0 and f"git checkout {head(root)}" in out, out
    # The registry is the PostgreSQL database; artifacts went through the server into its local root.
    assert _rows(postgres, "mlflow", "SELECT version FROM registered_model_aliases "
                                     "WHERE name = 'stack-chat' AND alias = 'champion'") == [(1,)]
    assert any(path.is_file() for path in (stack.state / "mlflow-artifacts").rglob("*"))

    served = Server("models:/stack-chat@champion", cwd=root, env={"MLFLOW_TRACKING_URI": stack.mlflow_url})
    try:
        answer = served.client().chat.completions.create(model="models:/stack-chat@champion",
                                                         messages=[{"role": "user", "content": "hi 3"}], max_tokens=4)
        assert answer.model == "stack-chat/1"
    finally:
        served.stop()


def test_a_deployment_run_through_the_stacks_prefect_completes_on_its_worker(stack, postgres, dvc_repo):  # noqa: F811
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.test_deployments import HELLO_STAGE
    from tests.test_flows import add_stages

    shutil.copytree(ROOT / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", dvc_repo / "prefect.yaml")
    add_stages(dvc_repo, {"hello": HELLO_STAGE})
    # PWD as a shell in dvc_repo would set it (prefect.yaml's pull step reads it when deploying)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": stack.prefect_api_url,
           "PWD": str(dvc_repo)}
    deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=dvc_repo, env=env,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, f"{deployed.stdout[-3000:]}\n{deployed.stderr[-3000:]}"
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        # No worker started here: the stack's one polls the pool and runs it.
        flow_run = run_deployment("lmforge-pipeline/on-demand", timeout=300, poll_interval=2,
                                  parameters={"targets": ["hello"], "accelerator_slots": 0})
    worker_log = (stack.state / "worker.log").read_text()[-4000:]
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{worker_log}"
    assert (dvc_repo / "hello.txt").read_text() == "hello from a worker"
    assert flow_run.work_pool_name == "lmforge-process"
    # The run's record is in the PostgreSQL database the server runs on.
    assert _rows(postgres, "prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run.id}'") == [("COMPLETED",)]

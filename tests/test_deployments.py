"""The Prefect deployments: what `python -m flows.deployments` serves and `prefect deploy --all`
reads from prefect.yaml, and a real process worker running one, on Prefect's test harness; that
serving or deploying again keeps nightly switched as a person left it and moves the deployments
on or off the work pool; and, on a full `prefect server start` (the harness runs no late-runs
service), that a run nobody polls for goes Late with the reason."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled
from prefect.testing.utilities import prefect_test_harness

from flows import automations
from flows.deployments import build_deployments
from tests.conftest import ROOT
from tests.test_flows import add_stages


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_deployments_declare_their_schedules():
    deployments = {d.name: d for d in build_deployments()}
    assert set(deployments) == {"nightly", "on-demand", "tune-worker", "promote"}
    nightly = deployments["nightly"]
    assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *"
    # first created with its schedule off, and the deployment not paused (prefect deploy cannot keep paused)
    assert nightly.schedules[0].active is False and nightly.paused is False
    assert "schedule is OFF until you switch it on" in nightly.description
    assert not deployments["on-demand"].schedules
    switched_on = {d.name: d for d in build_deployments(nightly_active=True)}["nightly"]
    assert switched_on.schedules[0].active is True


def readme_pool(command: str) -> str:
    """The work pool that README.md's `prefect <command> ...` line names."""
    found = re.search(rf"prefect {command} (?:--pool )?([\w-]+)(?: --type ([\w-]+))?", (ROOT / "README.md").read_text())
    assert found, f"README.md has no `prefect {command}` line"
    return found.group(1) + (f" {found.group(2)}" if found.group(2) else "")


def test_prefect_yaml_declares_what_build_deployments_serves():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(spec)  # the shape `prefect deploy` reads
    declared = {d["name"]: d for d in spec["deployments"]}
    served = {d.name: d for d in build_deployments()}
    assert declared.keys() == served.keys()
    for name, deployment in declared.items():
        path, function = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{function}")
        assert flow.name == served[name].flow_name, name
        assert deployment["tags"] == served[name].tags and deployment["description"] == served[name].description
        # prefect deploy would send `paused` on every deploy: the schedule's `active` is the switch
        assert "paused" not in deployment and served[name].paused is False, name
        crons = [s.schedule.cron for s in served[name].schedules or []]
        assert [s["cron"] for s in deployment.get("schedules") or []] == crons, name
        assert [s.get("active") for s in deployment.get("schedules") or []] == [
            "{{ nightly-schedule.active }}" for _ in crons], name
        # One pool for all, the one the README creates as a process pool and starts workers for.
        assert readme_pool("work-pool create") == f"{deployment['work_pool']['name']} process"
        assert readme_pool("worker start") == deployment["work_pool"]["name"]
    # the build steps that keep nightly's switch and set up the automation are importable from here
    from prefect.utilities.importtools import import_object

    assert [import_object(next(iter(step))) for step in declared["nightly"]["build"]]
    step = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $PWD }}"


def prefect_cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `prefect` command or a flow-run process that reports to this test's server."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}


HELLO_STAGE = {"cmd": "python -c \"open('hello.txt', 'w').write('hello from a worker')\"", "outs": ["hello.txt"]}


@pytest.mark.slow
def test_prefect_deploy_then_a_process_worker_runs_a_deployment(dvc_repo, tmp_path):
    from prefect.deployments import run_deployment

    shutil.copytree(ROOT / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", dvc_repo / "prefect.yaml")
    add_stages(dvc_repo, {"hello": HELLO_STAGE})
    prefect, pool = str(Path(sys.executable).with_name("prefect")), readme_pool("worker start")

    def cli(*args: str, cwd: Path = dvc_repo) -> str:
        # PWD as a shell in `cwd` would set it (prefect.yaml's pull step reads it when deploying)
        done = subprocess.run([prefect, *args], cwd=cwd, env=prefect_cli_env(PWD=str(cwd)), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    cli("work-pool", "create", pool, "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
        deployments = {d.name: d for d in client.read_deployments()}
    assert set(deployments) == {"nightly", "on-demand", "tune-worker", "promote"}
    assert {d.work_pool_name for d in deployments.values()} == {pool}
    nightly = deployments["nightly"]
    assert not nightly.paused and nightly.schedules[0].schedule.cron == "0 2 * * *" and not nightly.schedules[0].active

    flow_run = run_deployment("lmforge-pipeline/on-demand", parameters={"targets": ["hello"], "accelerator_slots": 0},
                              timeout=0)
    assert deployments["on-demand"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(dvc_repo)}}]
    log = cli("worker", "start", "--pool", pool, "--run-once", cwd=tmp_path)  # the pull step finds the project
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"{state}\n{log[-4000:]}"
    assert (dvc_repo / "hello.txt").read_text() == "hello from a worker"


# --- switches that stay, runs that say why they wait -------------------------------------------

DEPLOYMENTS = {"nightly", "on-demand", "tune-worker", "promote"}


def forget_deployments() -> None:
    """A clean server for a test that counts on first creation (the harness is shared in this module)."""
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            client.delete_deployment(deployment.id)


def read_nightly():
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name("lmforge-pipeline/nightly")


def switch_nightly_on() -> None:
    """What a person does in the UI: the toggle of nightly's schedule."""
    nightly = read_nightly()
    with get_client(sync_client=True) as client:
        client.update_deployment_schedule(nightly.id, nightly.schedules[0].id, active=True)


@contextmanager
def serving(log: Path):
    """`python -m flows.deployments` against this test's server until it has polled for all four
    deployments; then Ctrl-C, as a person stops it."""
    started = datetime.now(timezone.utc)
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "flows.deployments"], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env=prefect_cli_env(PREFECT_RUNNER_POLL_FREQUENCY="1"))
    try:
        deadline = time.monotonic() + 90
        while True:
            with get_client(sync_client=True) as client:
                polled = {d.name for d in client.read_deployments() if d.last_polled and d.last_polled > started}
            if polled >= DEPLOYMENTS:
                break
            assert process.poll() is None and time.monotonic() < deadline, f"not served:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def automations_named_ours() -> list:
    with get_client(sync_client=True) as client:
        return client.read_automations_by_name(automations.NAME)


def test_serving_again_keeps_nightly_as_a_person_switched_it(tmp_path):
    forget_deployments()
    with serving(tmp_path / "first.log"):
        pass
    nightly = read_nightly()
    assert nightly.schedules[0].active is False, "a first creation leaves nightly's schedule off"
    assert not nightly.paused, "stopping the serve process paused nightly"

    switch_nightly_on()
    with serving(tmp_path / "second.log"):
        assert read_nightly().schedules[0].active is True, "serving again switched nightly's schedule off"
    nightly = read_nightly()
    assert nightly.schedules[0].active is True and not nightly.paused

    with get_client(sync_client=True) as client:
        client.pause_deployment(nightly.id)  # the deployment's own switch, off, stays off too
    with serving(tmp_path / "third.log"):
        pass
    assert read_nightly().paused
    # three setups (two served, one by the documented command): one automation
    done = subprocess.run([sys.executable, "-m", "flows.automations"], cwd=ROOT, env=prefect_cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [automation] = automations_named_ours()
    assert automation.enabled and automation.actions[0].message == automations.REASON


@pytest.fixture
def project(tmp_path) -> Path:
    """What `prefect deploy --all` needs: prefect.yaml and the code its entrypoints and build steps import."""
    project = tmp_path / "project"
    for folder in ("flows", "tasks"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
    return project


def prefect_cli(*args: str, cwd: Path) -> str:
    # PWD as a shell in `cwd` would set it (prefect.yaml's pull step reads it when deploying)
    done = subprocess.run([str(Path(sys.executable).with_name("prefect")), *args], cwd=cwd,
                          env=prefect_cli_env(PWD=str(cwd)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def pools() -> dict[str, str | None]:
    with get_client(sync_client=True) as client:
        return {d.name: d.work_pool_name for d in client.read_deployments()}


def test_serving_after_prefect_deploy_leaves_the_pool_and_deploying_again_joins_it(project, tmp_path):
    forget_deployments()
    pool = readme_pool("worker start")
    prefect_cli("work-pool", "create", pool, "--type", "process", "--overwrite", cwd=project)
    prefect_cli("--no-prompt", "deploy", "--all", cwd=project)
    assert read_nightly().schedules[0].active is False, "a first deploy leaves nightly's schedule off"
    assert len(automations_named_ours()) == 1, "prefect deploy did not set up the automation"

    switch_nightly_on()
    with serving(tmp_path / "serve.log"):
        assert pools() == dict.fromkeys(DEPLOYMENTS), "served deployments left on the work pool"
        assert read_nightly().schedules[0].active is True
    assert "moved off work pool" in (tmp_path / "serve.log").read_text()

    prefect_cli("--no-prompt", "deploy", "--all", cwd=project)
    assert pools() == dict.fromkeys(DEPLOYMENTS, pool)
    nightly = read_nightly()
    assert nightly.schedules[0].active is True and not nightly.paused, "prefect deploy switched nightly off"
    assert len(automations_named_ours()) == 1


@pytest.fixture
def full_server(tmp_path):
    """`prefect server start` on a free 127.0.0.1 port: the harness's server runs no late-runs
    service. Runs are marked Late 1 s after their start time, checked every second."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**prefect_cli_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'server.db'}",
           "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "1",
           "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    env.pop("PREFECT_API_URL")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert server.poll() is None and time.monotonic() < deadline, f"no server:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_run_nobody_polls_for_says_why_it_is_late(full_server):
    # the documented one-line setup for the work-pool path
    done = subprocess.run([sys.executable, "-m", "flows.automations"], cwd=ROOT, env=prefect_cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    on_demand = {d.name: d for d in build_deployments()}["on-demand"]
    deployment_id = on_demand.apply()  # registered, but no serve process or worker polls for it
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment_id, state=Scheduled(scheduled_time=datetime.now(timezone.utc) - timedelta(seconds=5)))
        deadline, seen = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            state = client.read_flow_run(run.id).state
            seen.append(state.name)
            if state.name == automations.STATE_NAME:
                break
            time.sleep(1)
    assert state.name == automations.STATE_NAME, f"states seen: {sorted(set(seen))}"
    # still Scheduled: a worker or serve process started now picks it up
    assert state.type == StateType.SCHEDULED and state.message == automations.REASON
    assert "python -m flows.deployments" in state.message and "prefect worker start --pool" in state.message

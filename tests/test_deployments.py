"""The Prefect deployments: what `python -m flows.deployments` serves and `prefect deploy --all`
reads from prefect.yaml, and a real process worker running one, on Prefect's test harness."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

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
    assert nightly.paused is True
    assert not deployments["on-demand"].schedules


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
        assert bool(deployment.get("paused")) == bool(served[name].paused), name
        crons = [s.schedule.cron for s in served[name].schedules or []]
        assert [s["cron"] for s in deployment.get("schedules") or []] == crons, name
        # One pool for all, the one the README creates as a process pool and starts workers for.
        assert readme_pool("work-pool create") == f"{deployment['work_pool']['name']} process"
        assert readme_pool("worker start") == deployment["work_pool"]["name"]
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
    assert deployments["nightly"].paused and deployments["nightly"].schedules[0].schedule.cron == "0 2 * * *"

    flow_run = run_deployment("lmforge-pipeline/on-demand", parameters={"targets": ["hello"], "accelerator_slots": 0},
                              timeout=0)
    assert deployments["on-demand"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(dvc_repo)}}]
    log = cli("worker", "start", "--pool", pool, "--run-once", cwd=tmp_path)  # the pull step finds the project
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"{state}\n{log[-4000:]}"
    assert (dvc_repo / "hello.txt").read_text() == "hello from a worker"

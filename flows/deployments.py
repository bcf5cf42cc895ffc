"""The deployments: the pipeline (nightly, its schedule off until someone switches it on in the
UI), tuning workers and promotion. `python -m flows.deployments` serves them from this process;
for workers of the process pool lmforge-process, `prefect deploy --all` reads the same definitions
from prefect.yaml at the repository root (tests/test_deployments.py keeps the two alike).

What a person switches in the UI stays switched: neither path re-sends "off". The nightly switch
is its schedule's `active` flag, because `prefect deploy` sends the deployment's `paused` flag each
time while prefect.yaml can fill a schedule's `active` from a build step (kept_nightly_schedule),
which reads it back from the server first. The serve process leaves the deployments as they are
when it stops (no pause on shutdown); a run due meanwhile goes Late and, through
flows/automations.py, says why.
"""

from __future__ import annotations

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from flows.actions import promote, tune_worker
from flows.automations import POOL, ensure_late_run_automation
from flows.pipeline import pipeline

NIGHTLY = "0 2 * * *"
NIGHTLY_DESCRIPTION = (
    "Rebuild whatever changed in the DVC graph, nightly at 02:00 UTC. Its schedule is OFF until "
    "you switch it on: Schedules, on this page (the deployment's own switch alone runs nothing). "
    "Serving again or `prefect deploy` keeps the switch as you left it. It runs only while "
    f"`python -m flows.deployments` or `prefect worker start --pool {POOL}` is running; a run "
    "due with neither goes Late and its state message says so."
)


# How a run from the UI gets started, said where the UI shows it (a run waits, Late, otherwise).
RUNS_ONLY_WHILE = (f" Runs start only while `python -m flows.deployments` or `prefect worker start --pool {POOL}` "
                   "is running.")


def build_deployments(nightly_active: bool = False, nightly_paused: bool = False) -> list:
    """The four deployments; nightly's switches as given (off, for a first creation)."""
    return [
        pipeline.to_deployment(
            name="nightly", schedules=[Cron(NIGHTLY, active=nightly_active)], paused=nightly_paused,
            tags=["lmforge", "pipeline"], description=NIGHTLY_DESCRIPTION,
        ),
        pipeline.to_deployment(name="on-demand", tags=["lmforge", "pipeline"],
                               description="Run the pipeline with targets and param overrides." + RUNS_ONLY_WHILE),
        tune_worker.to_deployment(
            name="tune-worker", tags=["lmforge", "tune"],
            description="One Optuna worker; start several against an RDB storage." + RUNS_ONLY_WHILE,
        ),
        promote.to_deployment(name="promote", tags=["lmforge", "registry"],
                              description="Gated promotion of challenger to champion." + RUNS_ONLY_WHILE),
    ]


def nightly_switches() -> dict[str, bool]:
    """Nightly's switches as the server has them: its schedule's `active` and the deployment's
    `paused`; off and not paused when it does not exist yet."""
    with get_client(sync_client=True) as client:
        try:
            nightly = client.read_deployment_by_name(f"{pipeline.name}/nightly")
        except ObjectNotFound:
            return {"nightly_active": False, "nightly_paused": False}
    ours = [s for s in nightly.schedules if isinstance(s.schedule, CronSchedule) and s.schedule.cron == NIGHTLY]
    return {"nightly_active": bool(ours) and all(s.active for s in ours), "nightly_paused": nightly.paused}


def kept_nightly_schedule() -> dict[str, bool]:
    """A prefect.yaml build step: the `active` flag for nightly's schedule. `prefect deploy`
    always un-pauses, so a deployment someone paused keeps its schedule off instead."""
    switches = nightly_switches()
    return {"active": switches["nightly_active"] and not switches["nightly_paused"]}


def leave_work_pool(deployments: list) -> list[str]:
    """Take the deployments that `prefect deploy` put on a work pool off it: this process runs
    them now, and a pool nobody polls shows a red "not ready" queue. Returns their names."""
    moved = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                existing = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                # The pull steps are the pool's way to find the code; served runs start here.
                client.update_deployment(existing.id, DeploymentUpdate(work_pool_name=None, pull_steps=None))
                moved.append(deployment.name)
    return moved


def main() -> None:
    deployments = build_deployments(**nightly_switches())
    for name in leave_work_pool(deployments):
        print(f"{name}: moved off work pool {POOL}; this process runs it now")
    ensure_late_run_automation()
    # Pausing on shutdown would undo what a person switched on; a run due while nobody serves
    # goes Late and the automation says why.
    serve(*deployments, pause_on_shutdown=False)


if __name__ == "__main__":
    main()

"""The Prefect automation that says why a run of ours is Late.

A run that nobody picks up only turns "Late" in the UI, with no hint why. This automation (a
Prefect one, kept on the server) reacts to each lmforge run that goes Late by changing its state
to "Late (nobody polling)" with a message that names the two commands that would run it; the
flow run's page shows both. The run stays Scheduled, so a worker or serve process started later
still picks it up.

`python -m flows.deployments` sets it up before serving; `prefect deploy --all` does too (a build
step in prefect.yaml), and `python -m flows.automations` sets it up on its own. Each creates it
once and afterwards updates it in place, by name.
"""

from __future__ import annotations

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

NAME = "lmforge: say why a run is Late"
POOL = "lmforge-process"
# Not "Late": the state this automation sets must not be another prefect.flow-run.Late event, or
# it would trigger itself. Prefect's late-runs service only marks runs named "Scheduled", so the
# run keeps this name (and its reason) until someone picks it up.
STATE_NAME = "Late (nobody polling)"
REASON = (
    "Nobody picked this run up at its start time: no `python -m flows.deployments` process, and "
    f"no `prefect worker start --pool {POOL}` for a deployment on that work pool, is polling for "
    "this deployment (or the one polling is busy). Start one and it runs this run."
)


def late_run_automation() -> Automation:
    """The automation, as it should be on the server."""
    return Automation(
        name=NAME,
        description="Marks a Late run of an lmforge deployment with the reason: " + REASON,
        # Runs of our deployments carry the deployments' tag "lmforge" as a related resource.
        trigger=EventTrigger(
            expect={"prefect.flow-run.Late"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.lmforge"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name=STATE_NAME, message=REASON)],
    )


def ensure_late_run_automation() -> Automation:
    """Create the automation, or bring the one of that name up to date; one copy either way."""
    wanted = late_run_automation()
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(NAME)
        for extra in existing[1:]:  # a copy left by two setups racing: keep one
            client.delete_automation(extra.id)
    if not existing:
        return wanted.create()
    wanted.id = existing[0].id
    wanted.update()
    return wanted


def late_run_automation_step() -> dict[str, str]:
    """A prefect.yaml build step: `prefect deploy` sets the automation up as well."""
    return {"late_run_automation": str(ensure_late_run_automation().id)}


if __name__ == "__main__":
    automation = ensure_late_run_automation()
    print(f"automation {automation.name!r} ({automation.id}): a Late lmforge run now says why")

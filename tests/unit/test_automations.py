"""fleetwright's automations (automations/*.yaml) match the events Prefect really sends.

The events are built with the labels Prefect 3.9 gives them: a heartbeat is emitted by the flow
engine (``FlowRunEngine._build_heartbeat_event_template``: the flow related resource has a name,
the deployment one only an id), a state change by the server (every related resource named).
The integration proof is tests/integration/test_distributed.py (tests 4 to 6: killed workers).
"""
from __future__ import annotations

import uuid

import pytest

from fleetwright.automations import DIR, load

pytestmark = pytest.mark.unit


def server_trigger(name: str):
    from prefect.automations import Automation
    from prefect.server.events.schemas.automations import EventTrigger

    spec = load(DIR / f"{name}.yaml", {})
    client = Automation.model_validate(spec)
    return EventTrigger.model_validate(client.trigger.model_dump(mode="json"))


def event(name: str, flow: str, *, deployment: str | None, heartbeat: bool, tags=("fleetwright",)):
    """A flow-run event as Prefect labels it (see the module docstring)."""
    from prefect.server.events.schemas.events import ReceivedEvent

    run = uuid.uuid4()
    related = [{"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow",
                "prefect.resource.name": flow}]
    if deployment:
        dep = {"prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}", "prefect.resource.role": "deployment"}
        if not heartbeat:  # the server names it; the engine's heartbeat does not
            dep["prefect.resource.name"] = deployment
        related.append(dep)
    related += [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in tags]
    return ReceivedEvent(event=name, resource={"prefect.resource.id": f"prefect.flow-run.{run}",
                                               "prefect.resource.name": "some-run"},
                         related=related, occurred="2026-12-01T00:00:00Z", id=uuid.uuid4())


@pytest.mark.parametrize("flow", ["reconcile-fleet", "reconcile-shard"])
def test_zombie_detection_starts_at_running_and_is_renewed_by_every_heartbeat(flow):
    t = server_trigger("crash-zombie-runs")
    hb = event("prefect.flow-run.heartbeat", flow, deployment=flow, heartbeat=True)
    running = event("prefect.flow-run.Running", flow, deployment=flow, heartbeat=False)
    assert t.covers(hb) and t.starts_after(hb.event) and t.expects(hb.event)
    # a run killed before its first heartbeat reached the server is still crashed: Running starts the clock
    assert t.covers(running) and t.starts_after(running.event) and not t.expects(running.event)
    for end in ("Completed", "Failed", "Cancelled", "Crashed", "Paused"):
        e = event(f"prefect.flow-run.{end}", flow, deployment=flow, heartbeat=False)
        assert t.covers(e) and t.expects(e.event) and not t.starts_after(e.event), end
    assert t.posture == "Proactive" and t.within.total_seconds() == 120 and t.threshold == 1


def test_zombie_detection_leaves_runs_without_heartbeats_alone():
    t = server_trigger("crash-zombie-runs")
    # a lifecycle deployment (no heartbeats configured) and a sweep run in-process (no deployment, no heartbeat)
    assert not t.covers(event("prefect.flow-run.Running", "create-cluster", deployment="create-cluster", heartbeat=False))
    assert not t.covers(event("prefect.flow-run.Running", "reconcile-fleet", deployment=None, heartbeat=False))


def test_unstarted_detection_covers_every_fleetwright_run_until_it_runs():
    t = server_trigger("crash-unstarted-runs")
    for state in ("Pending", "Submitting"):
        e = event(f"prefect.flow-run.{state}", "create-cluster", deployment="create-cluster", heartbeat=False)
        assert t.covers(e) and t.starts_after(e.event) and not t.expects(e.event)
    for state in ("Running", "Crashed", "Cancelled", "Scheduled"):
        assert t.expects(f"prefect.flow-run.{state}")
    other = event("prefect.flow-run.Pending", "x", deployment="x", heartbeat=False, tags=("someone-else",))
    assert not t.covers(other)

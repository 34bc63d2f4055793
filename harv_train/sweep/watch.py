"""Waiting for a trial's deployment run on a work pool, never forever.

A worker killed together with the run it was training (kill -9 of its process group, a machine lost)
leaves that flow run Running (or Pending) on the Prefect server for good: Prefect 3.8 marks a run
Crashed only when its own process sees it die, or when an automation watches heartbeats. So the
sweep watches: each trial run sends Prefect's flow-run heartbeat event every
`heartbeat_frequency(timeout)` seconds (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in its job environment),
and a run a worker picked up that shows no sign of life (no new heartbeat, no state change) for
`timeout` seconds is set Crashed here; the sweep then runs the trial again from its checkpoint.
A run that no worker picks up while no worker of the pool is online for `timeout` seconds is
cancelled and the sweep stops, in one line (`--resume` continues once workers are back).

Signs of life are compared with this process's monotonic clock, never with the server's
timestamps, so clocks that differ between machines change nothing.
"""

from __future__ import annotations

import time
from uuid import UUID

from harv_train.errors import UserError

MIN_HEARTBEAT_S = 30  # Prefect refuses a PREFECT_FLOWS_HEARTBEAT_FREQUENCY below 30 s
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
POLL_S = 5.0


class NoWorkerError(UserError):
    """No worker of the pool was online for the whole timeout: nobody will run the trial."""


def heartbeat_frequency(timeout: float) -> int:
    """Seconds between a trial run's heartbeats: a third of the timeout (at least Prefect's 30 s), so
    a live run under load still beats at least twice per timeout."""
    return max(MIN_HEARTBEAT_S, int(timeout // 3))


def job_variables(timeout: float) -> dict:
    """The process worker's job variables for a trial run: its heartbeat frequency."""
    return {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_frequency(timeout))}}


def check_timeout(timeout: float) -> None:
    from harv_train.errors import ConfigError

    if timeout < 2 * MIN_HEARTBEAT_S:
        raise ConfigError(f"--heartbeat-timeout must be at least {2 * MIN_HEARTBEAT_S} s (trial runs send a "
                          f"heartbeat every {MIN_HEARTBEAT_S} s at the most often), got {timeout:g}")


def heartbeats(client, flow_run_id: UUID) -> int:
    """How many heartbeat events the flow run has sent (the server keeps them for days)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    page = client.read_events(EventFilter(event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])),
                              limit=1)
    return page.total


def _worker_online(client, pool: str) -> bool:
    from prefect.client.schemas.objects import WorkerStatus

    return any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool))


def wait_for_run(client, flow_run_id: UUID, pool: str, timeout: float, label: str, poll: float = POLL_S):
    """The final state of the deployment run `flow_run_id` (a sync Prefect client): its own, or
    Crashed (set here) once it went `timeout` seconds without a sign of life after a worker took it.
    Raises NoWorkerError (after cancelling the run) when it waited `timeout` seconds for a worker
    while none of the pool was online."""
    from prefect.states import Cancelled, Crashed

    last_sign, quiet_since = None, time.monotonic()
    while True:
        run = client.read_flow_run(flow_run_id)
        state = run.state
        if state is not None and state.is_final():
            return state
        waiting = state is None or state.is_scheduled()
        if waiting:  # any online worker is a sign of progress (they may all be busy with other trials)
            alive = _worker_online(client, pool)
        else:  # taken by a worker: its heartbeats or a new state
            sign = (state.id, heartbeats(client, flow_run_id))
            alive, last_sign = sign != last_sign, sign
        if alive:
            quiet_since = time.monotonic()
        if time.monotonic() - quiet_since > timeout:
            if waiting:
                client.set_flow_run_state(flow_run_id, Cancelled(message="no worker online to run it"), force=True)
                raise NoWorkerError(f"{label}: no worker of work pool {pool!r} was online for {timeout:g} s: start "
                                    f"one (prefect worker start --pool {pool}), then rerun the sweep with --resume")
            message = (f"no heartbeat or state change for {timeout:g} s while {state.name}: its worker or "
                       "machine died (set Crashed by the sweep)")
            crashed = Crashed(message=message)
            client.set_flow_run_state(flow_run_id, crashed, force=True)
            return crashed
        time.sleep(poll)

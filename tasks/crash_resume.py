"""A deployment run that crashed (its process killed: a preempted machine, kill -9, SIGTERM) is
followed by a new run of the same deployment that resumes it: prefect.yaml declares a deployment
trigger on the `prefect.flow-run.Crashed` event of nightly-train's runs whose only parameter is
`resume_after_crash: "{{ event.resource.id }}"`. A run that Failed (bad input, an epoch that kept
raising) emits no Crashed event and is never resumed.

The new run learns from the Prefect API what it continues: it walks back the chain of runs that
resumed each other to the run that started it, trains with that run's params (resume: true, so the
same checkpoints and MLflow run), and refuses when the chain already holds `max_crash_resumes`
automatic resumes: a run that crashes every time stops, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from harv_train.errors import UserError

FLOW_RUN_PREFIX = "prefect.flow-run."


class CrashLoop(UserError):
    """The automatic resumes are used up: one line, and the run ends Failed (never resumed again)."""


@dataclass(frozen=True)
class CrashResume:
    params_file: str | None
    overrides: Any  # the first run's overrides, as Prefect stored them (a dict or None)
    attempt: int  # 1 for the first automatic resume
    max_crash_resumes: int
    crashed_run: str  # the flow run id this run continues


def plan_crash_resume(crashed: str, max_crash_resumes: int) -> CrashResume:
    """`crashed`: the Crashed event's resource id (prefect.flow-run.<id>) or a flow run id.
    `max_crash_resumes` applies unless the first run of the chain set its own."""
    from prefect import get_client

    run_id = crashed.removeprefix(FLOW_RUN_PREFIX)
    attempt = 1
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        while run.parameters.get("resume_after_crash"):  # itself an automatic resume: one more hop back
            attempt += 1
            run = client.read_flow_run(UUID(run.parameters["resume_after_crash"].removeprefix(FLOW_RUN_PREFIX)))
    # The bound the first run was started with: its resumes get only the deployment's default.
    max_crash_resumes = run.parameters.get("max_crash_resumes", max_crash_resumes)
    if attempt > max_crash_resumes:
        raise CrashLoop(
            f"flow run {run_id} crashed, and {attempt - 1} automatic resume(s) of the run started by flow run "
            f"{run.id} already crashed (max_crash_resumes {max_crash_resumes}): not resuming again; find the "
            "cause in their logs, then resume by hand (a run with resume: true, or --resume)")
    return CrashResume(run.parameters.get("params_file"), run.parameters.get("overrides"), attempt,
                       max_crash_resumes, run_id)

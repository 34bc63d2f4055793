"""What a training run needs to report to its sweep: which trial of which study, in which storage.

A plain pydantic model, so the training flow takes it as a parameter (the Prefect deployment form
and `run_deployment` serialise it) and a trial run on a worker reports to the same study.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SweepTrial(BaseModel):
    """The Optuna trial a training run reports its per-epoch val_acc to (and may be pruned by)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    storage: str = Field(description="Optuna RDB storage URL of the sweep's study (sqlite:///... or postgresql://...).")
    study_name: str = Field(description="Name of the study in that storage.")
    trial_number: int = Field(ge=0, description="The trial's number in the study.")

"""Early stopping on validation accuracy, with state that survives a resume."""

from __future__ import annotations

import math
from typing import Any


class EarlyStopping:
    """Stop after `patience` epochs without a better model (0 never stops).

    Better: a higher validation accuracy, or the same accuracy with a lower validation loss. On a
    small validation set accuracy saturates within an epoch or two (every image right) while the
    model still improves; the loss tells those epochs apart, so the best checkpoint is not simply
    the first epoch that got everything right, and training does not stop while it still improves.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("-inf")
        self.best_loss = math.inf
        self.bad_epochs = 0

    def step(self, value: float, loss: float = math.inf) -> bool:
        """Record one epoch's accuracy (and loss, the tie-break); True when this is a new best."""
        if value > self.best or (value == self.best and loss < self.best_loss):
            self.best, self.best_loss = value, loss
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "best_loss": self.best_loss,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_loss = float(state.get("best_loss", math.inf))  # checkpoints before the tie-break
        self.bad_epochs = int(state["bad_epochs"])

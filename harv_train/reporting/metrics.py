"""Classification metrics from true and predicted labels: pure numpy, no model, no files.

Definitions follow scikit-learn's `classification_report`: a class that is never predicted has
precision 0, a class with no true samples has recall 0 (and F1 0); macro averages weigh every class
equally, weighted averages weigh each class by its support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassificationMetrics:
    classes: list[str]
    confusion: np.ndarray  # int64 [C, C]: rows are true classes, columns predicted ones
    per_class: list[ClassMetrics]
    accuracy: float
    macro: dict[str, float]  # precision, recall, f1
    weighted: dict[str, float]

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    def summary(self) -> dict[str, float]:
        """The headline numbers, flat: what goes into MLflow as metrics."""
        out = {"accuracy": self.accuracy}
        for avg_name, avg in (("macro", self.macro), ("weighted", self.weighted)):
            out.update({f"{avg_name}_{k}": v for k, v in avg.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "images": self.total,
            "macro_avg": self.macro,
            "weighted_avg": self.weighted,
            "per_class": [vars(c) for c in self.per_class],
            "classes": list(self.classes),
            "confusion_matrix": self.confusion.tolist(),
        }

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per class, then the macro and weighted averages: the per-class CSV and table."""
        rows = [
            {"class": c.name, "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
            for c in self.per_class
        ]
        for label, avg in (("macro avg", self.macro), ("weighted avg", self.weighted)):
            rows.append({"class": label, **avg, "support": self.total})
        return rows


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels, y_pred {y_pred.size}")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"labels must be in 0..{n_classes - 1}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> ClassificationMetrics:
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _ratio(tp, predicted.astype(np.float64))
    recall = _ratio(tp, support.astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = int(support.sum())

    def average(weights: np.ndarray | None) -> dict[str, float]:
        if weights is not None and weights.sum() == 0:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        return {k: float(np.average(v, weights=weights)) for k, v in
                (("precision", precision), ("recall", recall), ("f1", f1))}

    return ClassificationMetrics(
        classes=list(classes),
        confusion=cm,
        per_class=[
            ClassMetrics(name, float(p), float(r), float(f), int(s))
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        ],
        accuracy=float(tp.sum() / total) if total else 0.0,
        macro=average(None),
        weighted=average(support.astype(np.float64)),
    )

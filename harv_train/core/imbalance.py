"""Class imbalance: counts, balanced loss weights, the epoch's order, and the warning.

`class_weights: balanced` weighs each class's loss by n / (C x n_c), the inverse of its frequency
in the train split (scikit-learn's "balanced"): every class then adds the same total to the loss.
`sampler: balanced` draws the epoch's len(train) images with replacement, each class with equal
probability, from the epoch's seeded generator: the same seed and epoch give the same draw, so a
resumed or retried epoch draws what an uninterrupted one did. `shuffle` is the plain permutation.
"""

from __future__ import annotations

import torch

IMBALANCE_WARN_RATIO = 5  # warn when the largest class holds this many times the smallest


def class_counts(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.bincount(labels.cpu(), minlength=n_classes)


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """n / (C x n_c) per class, float32; a class without images gets weight 0 (it adds no loss)."""
    counts = counts.double()
    weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def epoch_order(labels: torch.Tensor, generator: torch.Generator, sampler: str = "shuffle") -> torch.Tensor:
    """The indices of one epoch, drawn from `generator`: a permutation, or a class-balanced draw."""
    if sampler == "shuffle":
        return torch.randperm(len(labels), generator=generator)
    labels = labels.cpu()
    per_image = (1.0 / class_counts(labels, int(labels.max()) + 1).double())[labels]
    return torch.multinomial(per_image, len(labels), replacement=True, generator=generator)


def imbalance_warning(counts: dict[str, int]) -> str | None:
    """A warning line when the largest class holds IMBALANCE_WARN_RATIO times the smallest, else None."""
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    if counts[largest] < IMBALANCE_WARN_RATIO * max(counts[smallest], 1):
        return None
    return (f"WARNING: the train split is imbalanced: {largest} has {counts[largest]} images, {smallest} "
            f"{counts[smallest]} ({counts[largest] / max(counts[smallest], 1):.1f}x): consider class_weights: "
            "balanced, sampler: balanced or select_metric: val_macro_f1 (docs/data.md, Class imbalance)")

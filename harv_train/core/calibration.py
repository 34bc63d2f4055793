"""Temperature scaling: one number that makes a classifier's softmax probabilities honest.

A network fine-tuned on a few hundred images is usually over- or under-confident: its top
probability does not match how often it is right. Dividing the logits by one temperature T, fitted
on the validation logits by minimising the negative log-likelihood (Guo et al., 2017), fixes most
of that without changing any prediction (argmax(z / T) == argmax(z) for T > 0).

`fit_temperature` fits T (LBFGS on log T, so T stays positive); `expected_calibration_error` and
`reliability_bins` measure calibration in 15 equal-width confidence bins; `TemperatureScaled` puts
the division into the network, so the exported graphs and every runtime compute the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

ECE_BINS = 15
# A validation set the model gets entirely right has no NLL optimum: the NLL falls without end as
# T -> 0 (ever surer), so `calibrate` keeps T = 1 there. One with a few errors and wide margins can
# still pull T low, one it gets all wrong towards inf: the bounds keep T finite.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises mean cross-entropy of softmax(logits / T) against labels."""
    logits = logits.detach().double()
    labels = labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin [k/n, (k+1)/n): how many predictions, their mean confidence and accuracy."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    confidence: tuple[float, ...]  # 0 for an empty bin
    accuracy: tuple[float, ...]  # 0 for an empty bin

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
        total = sum(self.counts)
        if total == 0:
            return 0.0
        return sum(n * abs(a - c) for n, a, c in zip(self.counts, self.accuracy, self.confidence)) / total


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> ReliabilityBins:
    """Bin each prediction by its top probability (the last bin includes 1.0)."""
    probabilities = probabilities.detach().double()
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels.long()).double()
    index = (confidence * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = counts.clamp(min=1).double()
    return ReliabilityBins(
        edges=tuple(i / bins for i in range(bins + 1)),
        counts=tuple(int(c) for c in counts),
        confidence=tuple(float(v) for v in conf_sum / safe),
        accuracy=tuple(float(v) for v in acc_sum / safe),
    )


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               bins: int = ECE_BINS) -> float:
    return reliability_bins(torch.softmax(logits.double() / temperature, dim=1), labels, bins).ece


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did on the logits it was fitted on."""

    temperature: float
    images: int
    errors: int  # misclassified images; with none, nothing was fitted and T is 1
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict[str, float]:
        return {"temperature": self.temperature, "images": self.images, "errors": self.errors,
                "ece_before": self.ece_before, "ece_after": self.ece_after,
                "nll_before": self.nll_before, "nll_after": self.nll_after}


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """Fit T on these logits. Where the model gets every one right they cannot say how sure it should
    be (the fit would only sharpen it to the lower bound), so T stays 1."""
    errors = int((logits.argmax(1) != labels.long()).sum())
    t = fit_temperature(logits, labels) if errors else 1.0
    return Calibration(
        temperature=t, images=len(labels), errors=errors,
        ece_before=expected_calibration_error(logits, labels), ece_after=expected_calibration_error(logits, labels, t),
        nll_before=nll(logits, labels), nll_after=nll(logits, labels, t),
    )


class TemperatureScaled(nn.Module):
    """`model`'s logits divided by a fixed temperature: softmax of its output is the calibrated
    probability. A multiplication by 1/T inside the graph, so TorchScript and ONNX carry it."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.inverse_temperature


def with_temperature(model: nn.Module, temperature: float | None) -> nn.Module:
    """`model` scaled by `temperature`, or `model` itself when there is none (an uncalibrated checkpoint)."""
    if temperature is None or float(temperature) == 1.0:
        return model
    return TemperatureScaled(model, temperature).eval()

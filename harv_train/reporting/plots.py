"""The report's pictures as PNG files: learning curves, confusion matrix, worst-images contact sheet,
reliability diagram.

Drawn on `matplotlib.figure.Figure` objects with the Agg renderer, never through pyplot: no display
needed, no global state shared with whatever else runs in the process (Prefect runs tasks in threads).
Sizes and font sizes follow the number of classes so that 2 to 100 classes, and long class names,
stay readable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

BEST_COLOR = "tab:green"
LR_COLOR = "0.55"


def shorten(text: str, limit: int) -> str:
    """Keep the start and (more of) the end, where similar names tend to differ ("..._left_v2")."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 5
    return text[:head] + "\u2026" + text[len(text) - (limit - 1 - head):]


def tick_labels(classes: Sequence[str], limit: int = 32) -> list[str]:
    """Shortened class names; numbered when shortening made two of them look alike."""
    labels = [shorten(c, limit) for c in classes]
    if len(set(labels)) < len(labels):
        labels = [f"{i}: {shorten(c, limit - len(str(i)) - 2)}" for i, c in enumerate(classes)]
    return labels


def learning_curves(history: Sequence[dict[str, Any]], best_epoch: int | None, path: str | Path) -> Path:
    """Loss, accuracy and learning rate per epoch; dotted lines where the lr changed, the best epoch dashed."""
    fig = Figure(figsize=(13, 4), dpi=110, layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    if not history:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    epochs = [int(h["epoch"]) for h in history]
    marker = "o" if len(epochs) <= 40 else None
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker=marker, ms=4, label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], marker=marker, ms=4, label="val")
        ax.set_title(title)
    ax_acc.set_ylim(-0.02, 1.02)
    lrs = [float(h["lr"]) for h in history]
    ax_lr.plot(epochs, lrs, marker=marker, ms=4, drawstyle="steps-mid", color="tab:purple", label="lr")
    if min(lrs) > 0:
        ax_lr.set_yscale("log")
    ax_lr.set_title("Learning rate (used in the epoch)")

    # The lr an epoch used is logged with it, so a change happened between that epoch and the one before.
    changes = [(e, lr) for e, lr, prev in zip(epochs[1:], lrs[1:], lrs) if lr != prev]
    for i, (e, lr) in enumerate(changes):
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvline(e - 0.5, color=LR_COLOR, ls=":", lw=1.2, label="lr changed" if i == 0 else None)
        ax_lr.annotate(f"{lr:.1e}", (e - 0.5, lr), xytext=(3, 6), textcoords="offset points", fontsize=8)
    if best_epoch and best_epoch in epochs:
        best = history[epochs.index(best_epoch)]
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvline(best_epoch, color=BEST_COLOR, ls="--", lw=1.2, label=f"best epoch {best_epoch}")
        ax_acc.plot([best_epoch], [best["val_acc"]], "*", ms=14, color=BEST_COLOR)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _confusion_layout(n: int) -> tuple[float, float, bool]:
    """(inches per cell, label font size, whether numbers fit in the cells)."""
    if n <= 10:
        return 0.6, 10.0, True
    if n <= 25:
        return 0.4, 8.0, True
    if n <= 50:
        return 0.24, 6.5, False
    return 0.16, 5.0, False


def confusion_matrix_plot(cm: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Counts on the left, row-normalized (recall on the diagonal) on the right."""
    n = len(classes)
    labels = tick_labels(classes)
    cell, font, annotate = _confusion_layout(n)
    label_in = max(len(l) for l in labels) * font * 0.6 / 72  # room for the tick labels
    panel = max(2.5, n * cell)
    fig = Figure(figsize=(2 * (panel + label_in + 1.3), panel + label_in + 1.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    support = cm.sum(axis=1, keepdims=True)
    normalized = np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)
    panels = (
        (axes[0], cm, f"Counts\n({int(cm.sum())} images)", "d"),
        (axes[1], normalized, "Normalized by true class\n(diagonal = recall)", ".2f"),
    )
    for ax, values, title, fmt in panels:
        vmax = values.max() if values.max() > 0 else 1
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8 if n > 10 else 0.9)
        ax.set_title(title, fontsize=max(font + 1, 9))
        ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(n), labels, fontsize=font)
        ax.set_xlabel("predicted class", fontsize=max(font, 8))
        ax.set_ylabel("true class", fontsize=max(font, 8))
        if annotate:
            for (i, j), v in np.ndenumerate(values):
                if v == 0 and fmt == ".2f":
                    continue  # empty cells stay empty: the eye finds the mistakes faster
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=font - 1,
                        color="white" if v > vmax / 2 else "black")
        else:
            # Too many cells for numbers: outline the off-diagonal mistakes so single errors show.
            rows, cols = np.nonzero((cm > 0) & ~np.eye(n, dtype=bool))
            ax.scatter(cols, rows, s=(72 * cell * 0.8) ** 2, marker="s", facecolors="none",
                       edgecolors="tab:red", linewidths=0.6)
    return _save(fig, path)


def _thumbnail(path: str, size: int = 224) -> np.ndarray | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except Exception:  # unreadable now: show an empty tile rather than lose the whole sheet
        return None


def contact_sheet(items: Sequence[dict[str, Any]], path: str | Path, columns: int = 4) -> Path:
    """One tile per image: the picture, its file name, true and predicted class, probability and loss."""
    n = max(len(items), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * 2.8, rows * 3.4 + 0.5), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    if not items:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[0].transAxes)
    for ax, item in zip(axes, items):
        picture = _thumbnail(item["path"])
        if picture is not None:
            ax.imshow(picture)
        wrong = item["true"] != item["predicted"]
        ax.set_title(
            f"{shorten(Path(item['path']).name, 30)}\n"
            f"true: {shorten(item['true'], 26)}\n"
            f"pred: {shorten(item['predicted'], 20)} ({item['probability']:.0%})\n"
            f"loss {item['loss']:.2f}",
            fontsize=8, loc="left", color="tab:red" if wrong else "0.2",
        )
    fig.suptitle("Highest-loss validation images, worst first (red: misclassified)", fontsize=11)
    return _save(fig, path)


def reliability_diagram(curves: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against confidence per bin, one panel per curve (e.g. before and after temperature
    scaling): bars on the diagonal are calibrated; the gap to it, weighted by the bin's share of
    images, sums to the ECE in the title. `curves` maps a title to a calibration.ReliabilityBins."""
    fig = Figure(figsize=(4.5 * len(curves), 4.5), dpi=110, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(curves)))
    for ax, (title, bins) in zip(axes, curves.items()):
        width = bins.edges[1] - bins.edges[0]
        left = np.array(bins.edges[:-1])
        filled = np.array(bins.counts) > 0
        ax.bar(left[filled], np.array(bins.accuracy)[filled], width=width, align="edge",
               edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(left[filled], (np.array(bins.confidence) - np.array(bins.accuracy))[filled],
               bottom=np.array(bins.accuracy)[filled], width=width, align="edge",
               color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "--", color="0.4", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {bins.ece:.3f} ({sum(bins.counts)} images)")
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

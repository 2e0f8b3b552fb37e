# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Plots for recipes: accuracy against the size of the shipped update (seed 000) or against the trainable share
of the model (seed 001), with the Pareto front."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .._files import atomic_file


def plot_pareto(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    references: Mapping[str, float] | None = None,
    title: str = "Balanced accuracy vs. size of the shipped update",
    xlabel: str = "cumulative adapter size (bytes)",
    ylabel: str = "balanced accuracy",
) -> str:
    """Draw one line per ranking score through ``(update bytes, accuracy)`` points and save a PNG.

    Args:
        curves: score name -> points, e.g. ``{"z": [(1.2e5, 0.81), ...]}``.
        path: output PNG path.
        references: horizontal reference lines, e.g. ``{"full fine-tuning": 0.92, "no adaptation": 0.61}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = "osd^v<>"
    for index, (name, points) in enumerate(curves.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[index % len(markers)], label=name)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for index, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle=styles[index % len(styles)], color=f"C{index + len(curves)}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_file(path) as temporary:
        fig.savefig(temporary)
    plt.close(fig)
    return os.fspath(path)


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats: none with at most the cost and at least the score, one strictly.

    ``points`` maps a name to ``(cost, score)`` (e.g. trainable % and AP); the front is sorted by cost.
    """
    front = [
        name
        for name, (cost, score) in points.items()
        if not any(
            (c <= cost and s >= score) and (c < cost or s > score) for other, (c, s) in points.items() if other != name
        )
    ]
    return sorted(front, key=lambda name: points[name][0])


def plot_score_vs_trainable(
    panels: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | os.PathLike,
    *,
    title: str = "Score vs. trainable parameters",
    xlabel: str = "trainable parameters (% of the model, log scale)",
    ylabel: str = "score",
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """One panel per setting (e.g. target domain) with one labelled point per method at ``(trainable %, score)``,
    the Pareto front drawn through the points no other method beats, and optional horizontal reference lines per
    panel (``references[panel][name]``, e.g. a zero-shot score). Saves a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("`panels` is empty; give at least one panel of {method: (trainable %, score)}.")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), dpi=120, squeeze=False)
    methods = sorted({m for points in panels.values() for m in points})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, (panel, points) in zip(axes[0], panels.items()):
        for method, (cost, score) in points.items():
            ax.scatter([cost], [score], color=colours[method], s=36, zorder=3, label=method)
            ax.annotate(method, (cost, score), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(points)
        ax.plot([points[m][0] for m in front], [points[m][1] for m in front], "k--", lw=0.8, label="Pareto front")
        for index, (name, value) in enumerate(((references or {}).get(panel) or {}).items()):
            ax.axhline(value, linestyle=":", color=f"C{(index + len(methods)) % 10}", label=name)
        ax.set_xscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 6))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_file(path) as temporary:
        fig.savefig(temporary)
    plt.close(fig)
    return os.fspath(path)

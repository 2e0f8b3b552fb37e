# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Plots for recipes: the seed's Pareto figure of accuracy against the size of the shipped update."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


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
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The recipe plots: the Pareto front they draw, and that they write an image."""

from __future__ import annotations

import pytest
from PIL import Image

from peft_vision_ext.analysis.plots import pareto_front, plot_score_vs_trainable


def test_pareto_front_keeps_only_unbeaten_points():
    points = {
        "lora": (0.4, 0.30),  # cheapest: on the front
        "adapters x1": (2.0, 0.28),  # costs more and scores less than lora: beaten
        "adapters x2": (4.0, 0.35),  # on the front
        "adapters x3": (4.0, 0.33),  # same cost as x2, lower score: beaten
        "decoder": (20.0, 0.35),  # same score as x2 at higher cost: beaten
        "full": (100.0, 0.40),  # best score: on the front
    }
    assert pareto_front(points) == ["lora", "adapters x2", "full"]
    assert pareto_front({"only": (1.0, 0.0)}) == ["only"]
    # exact ties are both kept (neither is strictly better)
    assert pareto_front({"a": (1.0, 0.5), "b": (1.0, 0.5)}) == ["a", "b"]


def test_plot_score_vs_trainable_writes_one_panel_per_setting(tmp_path):
    panels = {
        "mars": {"lora": (0.4, 0.3), "full": (100.0, 0.4)},
        "moon-boulders": {"lora": (0.4, 0.5), "full": (100.0, 0.45)},
    }
    path = plot_score_vs_trainable(
        panels, tmp_path / "plot.png", ylabel="mask AP", references={"mars": {"zero-shot": 0.1}}
    )
    with Image.open(path) as image:
        width, height = image.size
    assert width > 1.5 * height  # two panels side by side
    with pytest.raises(ValueError, match="`panels` is empty"):
        plot_score_vs_trainable({}, tmp_path / "empty.png")

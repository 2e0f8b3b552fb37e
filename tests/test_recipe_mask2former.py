# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The Mask2Former instance recipe end to end (quick settings): a protocol over ``peft-vision train``."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Mask2FormerForUniversalSegmentation

import peft_vision_ext  # noqa: F401  (registers the methods with peft, as a user's script does)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "mask2former_instance")


@pytest.fixture
def one_thread():
    """The quick runs are tiny: one intra-op thread is as fast, and does not thrash a CPU shared with other jobs
    (two threads there made this test 7x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mask2former_instance_quick(tmp_path, one_thread):
    sys.path.insert(0, RECIPE)
    try:
        import run_mask2former_instance as recipe
    finally:
        sys.path.remove(RECIPE)
    results = recipe.main(["--output_dir", str(tmp_path), "--quick", "--per_device_train_batch_size", "4"])
    grid = recipe.QUICK["learning_rates"]

    # outputs: results.json (as returned), the table with a row per method and the selection evidence, the plot
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["protocol"] == {"learning_rates": grid, "seeds": 1, "validation_split_fraction": 0.2}
    assert (tmp_path / "ap_vs_trainable.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    for title in recipe.TITLES.values():
        assert f"| {title} |" in table
    assert "Learning-rate selection" in table and "| Adapters x2 | moon-boulders |" in table
    assert 0.0 <= saved["source"]["test"]["map"] <= 1.0

    rows = saved["targets"]["moon-boulders"]
    assert set(rows) == set(recipe.METHODS)
    assert 0.0 <= rows["zero_shot"]["map"] <= 1.0 and rows["zero_shot"]["num_images"] == 4
    for method in set(recipe.METHODS) - {"zero_shot"}:
        row = rows[method]
        # the rate chosen on validation scenes carved from the target train split, every rate of the grid scored
        assert set(row["selection"]["scores"]) == {f"{rate:g}" for rate in grid}, method
        assert row["learning_rate"] in grid and row["selection"]["metric"] == "validation map"
        assert row["selection"]["validation_samples"] == 2 and row["selection"]["train_samples"] == 8
        assert len(row["runs"]) == 1 and row["test"]["map"]["values"] == [row["runs"][0]["test"]["map"]]
        assert 0.0 <= row["test"]["map"]["mean"] <= 1.0 and row["test"]["num_images"]["mean"] == 4
    assert rows["seq_adapter_3"]["method"] == "seq_adapter"
    assert rows["seq_adapter_3"]["peft_settings"] == {"adapter_dim": 16, "adapters_per_block": 3}
    assert rows["deform_lora+seq_adapter"]["peft_settings"] == {"r": 8, "adapter_dim": 16, "adapters_per_block": 2}

    shares = {method: row["trainable_percent"] for method, row in results["summary"]["methods"].items()}
    assert shares["zero_shot"] == 0 and shares["full"] == 100
    assert 0 < shares["deform_lora"] < shares["seq_adapter_1"] < shares["seq_adapter_2"] < shares["decoder"] < 100
    assert saved["summary"]["pareto_front"]["moon-boulders"]

    # a run at the chosen rate is a standard peft adapter directory that loads onto the source checkpoint; the runs
    # at the other rate keep their results.json but not their weights
    row = rows["seq_adapter_2"]
    run_dir = tmp_path / "moon-boulders" / "seq_adapter_2" / f"lr{row['learning_rate']:g}-seed42"
    assert run_dir.as_posix() == row["runs"][0]["output_dir"]
    other = next(rate for rate in grid if rate != row["learning_rate"])
    dropped = tmp_path / "moon-boulders" / "seq_adapter_2" / f"lr{other:g}-seed42"
    assert (dropped / "results.json").is_file() and not (dropped / "adapter_model.safetensors").exists()
    base = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "source_model")
    loaded = PeftModel.from_pretrained(base, run_dir)
    state = get_peft_model_state_dict(loaded)
    saved_state = load_file(run_dir / "adapter_model.safetensors")
    assert state.keys() == saved_state.keys()
    assert all(torch.equal(state[key], saved_state[key]) for key in state)
    assert any("class_predictor" in key for key in state) and any("adapter" in key for key in state)
    assert (run_dir / "preprocessor_config.json").is_file()

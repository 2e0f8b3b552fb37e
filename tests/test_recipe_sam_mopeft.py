# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The SAM / MoPEFT recipe (seed 002) as a protocol over ``peft-vision train``, with its quick settings."""

import importlib
import json
import os
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("zero_shot", "decoder", "lora", "vpt", "vpt_deep", "adapter", "mopeft", "full")


def _recipe():
    path = os.path.join(ROOT, "recipes", "sam_mopeft")
    sys.path.insert(0, path)
    try:
        return importlib.import_module("run_sam_mopeft")
    finally:
        sys.path.remove(path)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam_mopeft")
    results = _recipe().main(["--output_dir", str(out), "--quick", "--per_device_train_batch_size", "8"])
    return out, results


def test_results_structure_and_learning_rate_selection(quick_run):
    out, results = quick_run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"settings", "source", "targets", "ablations", "runtime_seconds"}
    grid = saved["settings"]["protocol"]["learning_rates"]
    assert grid == [1e-3, 3e-3] and saved["settings"]["protocol"]["seeds"] == 1
    assert list(saved["targets"]) == ["mars", "moon-boulders"]
    for domain, rows in saved["targets"].items():
        assert list(rows) == list(METHODS)
        assert 0.0 <= rows["zero_shot"]["test"]["mean_iou"] <= 1.0
        for method in METHODS[1:]:
            row = rows[method]
            # the grid was tried on the carved validation split with the first seed; the best rate was kept
            scores = row["selection"]["scores"]
            assert set(scores) == {f"{rate:g}" for rate in grid}
            assert row["learning_rate"] in grid and scores[f"{row['learning_rate']:g}"] == max(scores.values())
            assert row["selection"]["validation_samples"] == 2 and row["selection"]["train_samples"] == 8
            assert len(row["runs"]) == 1 and row["runs"][0]["learning_rate"] == row["learning_rate"]
            stat = row["test"]["mean_iou"]
            assert 0.0 <= stat["mean"] <= 1.0 and stat["std"] == 0.0 and len(stat["values"]) == 1
            # the weights of the rate that was not chosen are removed, its results.json stays
            for rate in grid:
                run_dir = out / domain / method / f"lr{rate:g}-seed42"
                assert (run_dir / "results.json").is_file()
                weights = [n for n in os.listdir(run_dir) if n.endswith(".safetensors")]
                assert bool(weights) == (rate == row["learning_rate"])
    mars = saved["targets"]["mars"]
    shares = {m: mars[m]["trainable_percent"] for m in METHODS[1:]}
    assert shares["lora"] < shares["mopeft"] < shares["full"] == 100.0
    encoder = {m: mars[m]["extras"]["encoder_trainable_percent"]["mean"] for m in METHODS[1:]}
    assert encoder["decoder"] == 0.0 and encoder["full"] == 100.0 and 0 < encoder["lora"] < encoder["mopeft"]


def test_gates_prune_merge_and_ablation(quick_run):
    out, results = quick_run
    assert (out / "gates.png").stat().st_size > 10_000
    for domain in ("mars", "moon-boulders"):
        extras = results["targets"][domain]["mopeft"]["extras"]
        assert set(extras["gates"]["mean"]) == {"lora", "prefix", "adapter"}
        assert all(0.0 <= stat["mean"] <= 1.0 for stat in extras["gates"]["mean"].values())
        pruned = extras["pruned"]
        assert 0.0 <= pruned["test"]["mean_iou"]["mean"] <= 1.0 and pruned["max_rel_change"]["mean"] < 1.0
        assert "report" in results["targets"][domain]["mopeft"]["runs"][0]["extras"]["pruned"]
    ablation = results["ablations"]["r"]["4"]["mars"]
    mopeft = results["targets"]["mars"]["mopeft"]
    # the ablation reuses MoPEFT's chosen rate on that domain (no second grid)
    assert list(ablation["selection"]["scores"]) == [f"{mopeft['learning_rate']:g}"]
    assert ablation["peft_settings"]["r"] == 4 and ablation["trainable_percent"] < mopeft["trainable_percent"]
    table = (out / "results.md").read_text()
    for title in ("Zero-shot", "decoderFT", "LoRA", "VPT", "VPT-deep", "Adapter", "MoPEFT", "Full FT"):
        assert f"| {title} | " in table
    assert "| MoPEFT pruned+merged | " in table and "| 8 (default) | " in table and "| 4 | " in table
    assert "Ablation of `r`" in table and "Learning-rate selection" in table
    assert "| LoRA | mars | " in table and "| mars | " in table


def test_run_directory_reloads_onto_the_source_checkpoint(quick_run):
    """A chosen-rate run directory is a peft adapter of the source checkpoint; reloaded, it scores the test mIoU the
    recipe reports (MoPEFT: the adapter as trained, before the recipe pruned its in-memory copy)."""
    from peft import PeftModel

    from peft_vision_ext.analysis import evaluate_segmentation
    from peft_vision_ext.data.fixed_size import FixedSizeSegmentationTransform
    from peft_vision_ext.models import SamForSemanticSegmentation
    from peft_vision_ext.train.data import embedded_split

    out, results = quick_run
    row = results["targets"]["mars"]["mopeft"]
    run_dir = row["runs"][0]["output_dir"]
    model = PeftModel.from_pretrained(SamForSemanticSegmentation.from_pretrained(out / "source_model"), run_dir)
    saved = json.loads((out / "mars" / "mopeft" / os.path.basename(run_dir) / "results.json").read_text())
    assert saved["method"] == "mopeft" and saved["peft_config"]["r"] == 8
    settings = results["settings"]
    test = embedded_split(
        "rocks", "mars", "test", settings["data"]["test_samples"], 64, settings["data"]["scene_seed"]
    )
    transform = FixedSizeSegmentationTransform(
        size=saved["image_size"], image_mean=saved["image_mean"], image_std=saved["image_std"], ignore_index=255
    )
    with torch.no_grad():
        metrics = evaluate_segmentation(model.eval(), test.with_transform(transform), 3, batch_size=8)
    assert metrics["mean_iou"] == pytest.approx(row["test"]["mean_iou"]["mean"], abs=1e-4)

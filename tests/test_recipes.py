# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The recipes end to end (quick settings), and their accelerate twins under two CPU processes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import peft_vision_ext  # noqa: F401  (registers the methods with peft, as a user's script does)
from peft_vision_ext.models import UNetForSemanticSegmentation


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "space_rocks")


def test_space_rocks_quick(tmp_path):
    """The recipe as a protocol over `peft-vision train`: rates chosen on validation, every run's outputs saved."""
    sys.path.insert(0, RECIPE)
    try:
        import run_space_rocks
    finally:
        sys.path.remove(RECIPE)
    results = run_space_rocks.main(["--output_dir", str(tmp_path), "--quick", "--per_device_train_batch_size", "4"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "pareto_mars.png").stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    for row in (
        "full fine-tuning",
        "decoder-only tuning",
        "conv adapters (BN + 1x1 conv)",
        "BN-only adapters",
        "top 66%",
        "Learning-rate selection",
    ):
        assert row in table
    mars = results["targets"]["mars"]
    assert set(mars) == {"no adaptation", "full", "decoder", "conv_adapter", "bn_adapter"}
    conv = mars["conv_adapter"]
    assert set(conv["selection"]["scores"]) == {"0.001", "0.003"} and conv["learning_rate"] in (1e-3, 3e-3)
    assert conv["selection"]["validation_samples"] == 2 and conv["selection"]["train_samples"] == 8
    fusion = conv["extras"]["fusion"]
    assert fusion["flops"]["mean"] == fusion["base_flops"]["mean"]
    assert max(fusion["max_relative_logit_difference"]["values"]) < 1e-5
    assert fusion["parameters"]["mean"] - fusion["base_parameters"]["mean"] > 0  # created biases only
    assert conv["extras"]["ranked"]["z@0.66"]["update_bytes"]["mean"] < conv["extras"]["update_bytes"]["mean"]
    # each chosen run is a `peft-vision train` output: a peft adapter directory with card and image processor, and the
    # fused model beside it
    run = tmp_path / "mars" / "conv_adapter" / f"lr{conv['learning_rate']:g}-seed42"
    card = (run / "README.md").read_text()
    assert "mean_iou" in card and "model-index" in card and ".tmp-" not in card
    assert (run / "preprocessor_config.json").is_file() and (run / "fused" / "config.json").is_file()
    reloaded = PeftModel.from_pretrained(UNetForSemanticSegmentation.from_pretrained(tmp_path / "source_model"), run)
    assert isinstance(reloaded, PeftModel)
    assert not [name for _, dirs, files in os.walk(tmp_path) for name in dirs + files if ".tmp-" in name]


def _import_recipe(folder: str, module: str):
    path = os.path.join(ROOT, "recipes", folder)
    sys.path.insert(0, path)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(path)


RECIPE_SCRIPTS = [
    ("space_rocks", "run_space_rocks"),
    ("space_rocks", "run_space_rocks_no_trainer"),
    ("sam_mopeft", "run_sam_mopeft"),
    ("sam_mopeft", "run_sam_mopeft_no_trainer"),
    ("mask2former_instance", "run_mask2former_instance"),
    ("mask2former_instance", "run_mask2former_instance_no_trainer"),
]


@pytest.mark.parametrize("folder, module", RECIPE_SCRIPTS, ids=[m for _, m in RECIPE_SCRIPTS])
def test_recipes_refuse_a_non_empty_output_dir(tmp_path, capsys, folder, module):
    """As in the transformers examples: a used --output_dir needs --overwrite_output_dir; refused before any work."""
    recipe = _import_recipe(folder, module)
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(["--output_dir", str(used), "--quick"])
    assert exit_info.value.code == 2
    assert (
        f"`--output_dir` '{used}' already exists and is not empty (1 entry: 'results.json'). Pass "
        "`--overwrite_output_dir` if it may be overwritten"
    ) in capsys.readouterr().err
    assert os.listdir(used) == ["results.json"]
    recipe.parse_args(["--output_dir", str(used), "--quick", "--overwrite_output_dir"])
    recipe.parse_args(["--output_dir", str(tmp_path / "new" / "dir"), "--quick"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output_dir", str(tmp_path / "a-file"), "--quick", "--overwrite_output_dir"])
    assert "is an existing file, not a directory" in capsys.readouterr().err


def test_make_demo_reruns_over_its_own_outputs(tmp_path, capsys):
    """The Makefile's demo command (settings file + --overwrite_output_dir) is accepted over a used output folder;
    the settings file alone is refused there, and no other flag may follow it."""
    recipe = _import_recipe("space_rocks", "run_space_rocks")
    with open(os.path.join(ROOT, "Makefile")) as handle:
        demo = next(line.split() for line in handle if "run_space_rocks.py" in line and line.startswith("\t"))
    settings_file, *flags = demo[demo.index("recipes/space_rocks/run_space_rocks.py") + 1 :]
    assert flags == ["--overwrite_output_dir"]
    settings = json.loads(open(os.path.join(ROOT, settings_file)).read())
    used = tmp_path / "space_rocks"
    used.mkdir()
    (used / "results.md").write_text("an older run")
    copy = tmp_path / "settings.json"
    copy.write_text(json.dumps({**settings, "output_dir": str(used)}))
    args, protocol_args, training_args = recipe.parse_args([str(copy), *flags])
    assert training_args.output_dir == str(used) and args.encoder_name == settings["encoder_name"]
    assert protocol_args.seeds == settings["seeds"] == 3 and protocol_args.learning_rates == settings["learning_rates"]
    with pytest.raises(SystemExit):
        recipe.parse_args([str(copy)])
    assert "already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args([str(copy), "--seed", "1"])
    assert "only --overwrite_output_dir is accepted, got ['--seed', '1']" in capsys.readouterr().err
    copy.write_text(json.dumps({**settings, "output_dir": str(used), "overwrite_output_dir": True}))
    recipe.parse_args([str(copy)])
    with pytest.raises(SystemExit):
        recipe.parse_args([str(tmp_path / "missing.json")])
    assert "settings file" in capsys.readouterr().err


def _run_twin_on_two_cpu_processes(script: str, output_dir, port: int, *extra: str) -> tuple[dict, dict]:
    """Run an accelerate twin under torchrun with two CPU (gloo) processes; check that DDP kept the trainable
    tensors of both ranks identical and that the saved adapter loads back to exactly those tensors."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), script, "--cpu", "--quick"]
    command += ["--output_dir", str(output_dir), "--dump_rank_state", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MULTI_CPU" in result.stderr + result.stdout
    rank0 = load_file(output_dir / "rank0.safetensors")
    rank1 = load_file(output_dir / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    return rank0, results


def _assert_loads_back(base, adapter_dir, rank_state) -> None:
    # Every model and adapter a recipe writes carries the image processor its inputs need.
    assert (adapter_dir / "preprocessor_config.json").is_file()
    assert (adapter_dir.parent / "source_model" / "preprocessor_config.json").is_file()
    loaded = PeftModel.from_pretrained(base, adapter_dir)
    loaded_state = get_peft_model_state_dict(loaded)
    assert loaded_state.keys() == rank_state.keys()
    assert all(torch.equal(loaded_state[key], rank_state[key]) for key in rank_state)


@pytest.mark.slow  # the SAM twin runs DDP on two processes in the default run
def test_accelerate_twin_two_cpu_processes(tmp_path):
    script = os.path.join(RECIPE, "run_space_rocks_no_trainer.py")
    rank0, _ = _run_twin_on_two_cpu_processes(script, tmp_path, 29517, "--encoder_name", "test_resnet")
    from peft_vision_ext.models import UNetForSemanticSegmentation

    base = UNetForSemanticSegmentation.from_pretrained(tmp_path / "source_model")
    _assert_loads_back(base, tmp_path / "conv_adapter", rank0)


def test_sam_mopeft_accelerate_twin_two_cpu_processes(tmp_path):
    script = os.path.join(ROOT, "recipes", "sam_mopeft", "run_sam_mopeft_no_trainer.py")
    rank0, results = _run_twin_on_two_cpu_processes(script, tmp_path, 29518, "--method", "mopeft")
    assert 0.0 <= results["mean_iou"] <= 1.0
    assert set(results["gates_mean_this_process"]) == {"lora", "prefix", "adapter"}
    assert any(".mopeft_" in key for key in rank0) and any("mask_decoder" in key for key in rank0)
    from peft_vision_ext.models import SamForSemanticSegmentation

    base = SamForSemanticSegmentation.from_pretrained(tmp_path / "source_model")
    _assert_loads_back(base, tmp_path / "mopeft", rank0)


@pytest.mark.slow  # the SAM twin runs DDP on two processes in the default run
def test_mask2former_instance_accelerate_twin_two_cpu_processes(tmp_path):
    script = os.path.join(ROOT, "recipes", "mask2former_instance", "run_mask2former_instance_no_trainer.py")
    rank0, results = _run_twin_on_two_cpu_processes(script, tmp_path, 29519, "--method", "deform_lora+seq_adapter")
    # 6 test images over 2 processes with batch 2: the metric sees each image once
    assert results["num_images"] == 6 and 0.0 <= results["map"] <= 1.0
    assert any(".iseg_lora_" in key for key in rank0) and any(".iseg_adapter" in key for key in rank0)
    assert any("class_predictor" in key for key in rank0)
    from transformers import Mask2FormerForUniversalSegmentation

    base = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "source_model")
    _assert_loads_back(base, tmp_path / "deform_lora+seq_adapter", rank0)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The recipes' protocol over ``peft-vision train``: statistics, the validation carve, learning-rate selection."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation
from peft_vision_ext.train import parse_train_args, prepare_run, train_args_from_dict
from peft_vision_ext.train.arguments import UsageError
from peft_vision_ext.train.protocol import (
    Protocol,
    ProtocolArguments,
    aggregate,
    fmt,
    mean_std,
    parse_recipe_args,
    training_settings,
)

from tiny_models import make_unet


def test_mean_std_is_the_sample_statistic_and_skips_undefined_values():
    stat = mean_std([0.5, 0.7, None, float("nan")])
    assert stat["mean"] == pytest.approx(0.6)
    assert stat["std"] == pytest.approx(math.sqrt(0.02))  # ddof=1 over the two defined values
    assert stat["values"][:3] == [0.5, 0.7, None]
    assert mean_std([0.3]) == {"mean": 0.3, "std": 0.0, "values": [0.3]}
    assert mean_std([None])["mean"] is None


def test_aggregate_recurses_into_per_class_dicts_and_keeps_agreeing_labels():
    records = [
        {"mean_iou": 0.5, "per_class_iou": {"rock": 0.2, "sky": 0.8}, "name": "a", "flag": True},
        {"mean_iou": 0.7, "per_class_iou": {"rock": 0.4, "sky": 1.0}, "name": "a", "flag": True},
    ]
    out = aggregate(records)
    assert out["mean_iou"]["mean"] == pytest.approx(0.6)
    assert out["per_class_iou"]["rock"]["values"] == [0.2, 0.4]
    assert out["name"] == "a" and out["flag"] is True
    assert "name" not in aggregate([{"name": "a"}, {"name": "b"}])  # disagreeing labels are not made up


def test_fmt():
    assert fmt(mean_std([0.5, 0.7])) == "0.600 ± 0.141"
    assert fmt(mean_std([0.5])) == "0.500"
    assert fmt(None) == "-" and fmt(mean_std([None])) == "-" and fmt(float("nan")) == "-"
    assert fmt(0.25, 2) == "0.25"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"learning_rates": []}, "`--learning_rates` must be positive finite numbers, got []"),
        ({"learning_rates": [1e-3, float("nan")]}, "`--learning_rates` must be positive finite numbers"),
        ({"learning_rates": [-1e-3]}, "`--learning_rates` must be positive finite numbers"),
        ({"seeds": 0}, "`--seeds` must be a positive whole number, got 0"),
        ({"validation_split_fraction": 1.0}, "`--validation_split_fraction` must be in (0, 1), got 1.0"),
    ],
)
def test_protocol_arguments_refuse_bad_values(changes, expected):
    with pytest.raises(ValueError) as info:
        ProtocolArguments(**changes)
    assert expected in str(info.value)


def test_recipe_command_line_refuses_bad_protocol_values_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_recipe_args(
            (ProtocolArguments, TrainingArguments),
            ["--output_dir", str(tmp_path / "out"), "--seeds", "0"],
            default_output_dir="unused",
        )
    assert info.value.code == 2
    assert "`--seeds` must be a positive whole number, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recipe_defaults_replace_the_protocol_defaults_for_flags_and_settings_files(tmp_path):
    defaults = {"learning_rates": [1e-3, 1e-2], "seeds": 2}
    flags = ["--output_dir", str(tmp_path / "a")]
    _, (protocol_args, _) = parse_recipe_args(
        (ProtocolArguments, TrainingArguments), flags, default_output_dir="unused", defaults=defaults
    )
    assert protocol_args.learning_rates == [1e-3, 1e-2] and protocol_args.seeds == 2
    _, (protocol_args, _) = parse_recipe_args(
        (ProtocolArguments, TrainingArguments),
        flags + ["--seeds", "4"],
        default_output_dir="unused",
        defaults=defaults,
    )
    assert protocol_args.seeds == 4 and protocol_args.learning_rates == [1e-3, 1e-2]  # a flag still wins
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"output_dir": str(tmp_path / "b"), "learning_rates": [5e-4]}))
    _, (protocol_args, _) = parse_recipe_args(
        (ProtocolArguments, TrainingArguments), [str(settings)], default_output_dir="unused", defaults=defaults
    )
    assert protocol_args.learning_rates == [5e-4] and protocol_args.seeds == 2  # the file wins where it says
    with pytest.raises(ValueError, match="no recipe dataclass has: \\['learning_rate_grid'\\]"):
        parse_recipe_args(
            (ProtocolArguments, TrainingArguments),
            flags,
            default_output_dir="unused",
            defaults={"learning_rate_grid": 1},
        )


def test_recipe_settings_file_must_hold_an_object(tmp_path, capsys):
    settings = tmp_path / "s.json"
    settings.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        parse_recipe_args((ProtocolArguments, TrainingArguments), [str(settings)], default_output_dir="unused")
    assert "must hold a JSON object, got list" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["space_rocks", "sam_mopeft", "mask2former_instance"])
def test_recipe_settings_file_agrees_with_the_recipe_defaults(recipe, tmp_path):
    """The .json next to each recipe is what `make demo` and the README ran; flags alone must give the same run."""
    import importlib
    import sys

    root = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", recipe)
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(f"run_{recipe}")
    finally:
        sys.path.remove(root)
    with open(os.path.join(root, f"{recipe}.json"), encoding="utf-8") as handle:
        settings = json.load(handle)
    settings["output_dir"] = str(tmp_path / "file")  # the shipped file's folder may hold a real run
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    from_file = module.parse_args([str(tmp_path / "settings.json")])
    from_flags = module.parse_args(["--output_dir", str(tmp_path / "flags")])
    for file_args, flag_args in zip(from_file, from_flags):
        if isinstance(file_args, TrainingArguments):
            continue
        file_values, flag_values = vars(file_args), vars(flag_args)
        differing = {k: (file_values[k], flag_values[k]) for k in file_values if file_values[k] != flag_values[k]}
        assert not differing, f"{recipe}.json vs the recipe's defaults (file, flags): {differing}"


def test_training_settings_forward_what_the_recipe_changed_only(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        learning_rate=1.0,
        seed=7,
        push_to_hub=False,
    )
    settings = training_settings(args)
    assert settings == {"per_device_train_batch_size": 4, "lr_scheduler_type": "cosine", "warmup_steps": 5}
    parsed = train_args_from_dict(
        {**settings, "model_name_or_path": "x", "method": "full", "output_dir": str(tmp_path / "run")}
    )
    assert parsed.training.lr_scheduler_type == "cosine" and parsed.training.per_device_train_batch_size == 4


def test_train_args_from_dict_refuses_unknown_settings(tmp_path):
    with pytest.raises(UsageError, match=r"settings has unknown settings \['learnin_rate'\]"):
        train_args_from_dict({"learnin_rate": 1e-3, "output_dir": str(tmp_path)})


def _embedded_args(tmp_path, checkpoint, **extra):
    settings = {
        "model_name_or_path": checkpoint,
        "dataset_name": "embedded:rocks/mars",
        "method": "conv_adapter",
        "output_dir": str(tmp_path / "run"),
        "image_size": 64,
        "max_train_samples": 10,
        "max_eval_samples": 4,
        **extra,
    }
    return train_args_from_dict(settings)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("unet")
    make_unet("test_resnet").save_pretrained(directory)
    return str(directory)


def test_validation_is_carved_from_the_training_scenes_with_a_fixed_seed(tmp_path, unet_dir):
    carved = prepare_run(
        _embedded_args(tmp_path, unet_dir, validation_from_train=True, validation_split_fraction=0.3, seed=1)
    )
    assert len(carved.data.train) == 7 and len(carved.data.validation) == 3 and len(carved.data.test) == 4
    assert carved.data.validation_held_out
    # the carve and the scenes follow --data_split_seed, not --seed: every seed of a recipe sees the same split
    fixed = dict(validation_from_train=True, validation_split_fraction=0.3, data_split_seed=0)
    one = prepare_run(_embedded_args(tmp_path, unet_dir, seed=1, **fixed)).data
    two = prepare_run(_embedded_args(tmp_path, unet_dir, seed=2, **fixed)).data
    for split in ("train", "validation", "test"):
        assert getattr(one, split)["image"] == getattr(two, split)["image"]
    other = prepare_run(_embedded_args(tmp_path, unet_dir, seed=1, **{**fixed, "data_split_seed": 3})).data
    assert other.train["image"] != one.train["image"]
    # without the flag the embedded data brings its own validation scenes
    plain = prepare_run(_embedded_args(tmp_path, unet_dir)).data
    assert len(plain.train) == 10 and len(plain.validation) == 4 and not plain.validation_held_out


def test_validation_from_train_with_validation_data_is_refused(tmp_path, unet_dir):
    args = parse_train_args(
        [
            "--model_name_or_path",
            unet_dir,
            "--train_dir",
            str(tmp_path / "train"),
            "--validation_dir",
            str(tmp_path / "validation"),
            "--validation_from_train",
            "--method",
            "conv_adapter",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    with pytest.raises(UsageError, match="`--validation_from_train` holds validation data out of the training data"):
        prepare_run(args)


def test_compare_selects_the_rate_on_validation_and_aggregates_the_seeds(tmp_path, unet_dir, monkeypatch):
    """Two rates, two seeds: the chosen rate is the better validation score, the second seed trains with it, the
    test metrics are their mean ± std, and the run at the other rate keeps its results but not its weights."""
    training = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, seed=5, max_steps=2)
    protocol = Protocol(
        str(tmp_path),
        training,
        ProtocolArguments(learning_rates=[1e-5, 3e-2], seeds=2, validation_split_fraction=0.25),
        data_settings={"image_size": 64, "max_train_samples": 8, "max_eval_samples": 4, "data_split_seed": 0},
    )
    seen = []
    out = protocol.compare(
        "mars",
        "conv",
        unet_dir,
        "embedded:rocks/mars",
        "conv_adapter",
        epochs=1,
        on_run=lambda run: seen.append((run.learning_rate, run.seed, type(run.model).__name__)) or {"x": run.seed},
    )
    scores = out["selection"]["scores"]
    chosen = max(scores, key=scores.get)
    assert out["learning_rate"] == float(chosen)
    assert seen == [(float(chosen), 5, "PeftModel"), (float(chosen), 6, "PeftModel")]
    assert [r["seed"] for r in out["runs"]] == [5, 6]
    values = [r["test"]["mean_iou"] for r in out["runs"]]
    assert out["test"]["mean_iou"] == mean_std(values)
    assert out["extras"]["x"]["values"] == [5, 6]
    assert out["selection"]["validation_samples"] == 2 and out["selection"]["train_samples"] == 6
    other = next(rate for rate in scores if rate != chosen)
    dropped = tmp_path / "mars" / "conv" / f"lr{other}-seed5"
    kept = tmp_path / "mars" / "conv" / f"lr{chosen}-seed5"
    assert (dropped / "results.json").is_file() and not (dropped / "adapter_model.safetensors").exists()
    assert (kept / "adapter_model.safetensors").is_file()
    assert json.loads((kept / "results.json").read_text())["train"]["epoch"] > 0
    assert os.path.isdir(tmp_path / "mars" / "conv" / f"lr{chosen}-seed6")


def test_pretrain_seeds_before_building_the_source_model(tmp_path):
    """``Protocol.pretrain`` builds the source model itself, after setting the protocol's seed: whatever the process's
    random state before (torch seeds every process differently), the source checkpoint is the same. A model passed
    in, built before the seed, is refused."""
    training = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, seed=3, max_steps=1)
    settings = {"image_size": 32, "max_train_samples": 4, "max_eval_samples": 2, "data_split_seed": 0}
    config = UNetConfig(encoder_name="test_resnet", num_labels=3, decoder_channels=[32, 16, 16, 8, 8])
    weights = []
    for state in (1, 2):
        protocol = Protocol(str(tmp_path / f"p{state}"), training, ProtocolArguments(), data_settings=settings)
        torch.manual_seed(state)  # a process's random state before the recipe starts (no seeding in the builder)
        directory, _ = protocol.pretrain(
            lambda: UNetForSemanticSegmentation(config), "embedded:rocks/source", learning_rate=1e-3, epochs=1
        )
        weights.append(load_file(os.path.join(directory, "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    with pytest.raises(TypeError, match="takes a function that builds the fresh source model, got a UNetFor"):
        protocol.pretrain(make_unet("test_resnet"), "embedded:rocks/source", learning_rate=1e-3, epochs=1)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Adapter ranking, export of the kept adapters (the "transmission update"), and the `peft-vision` CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSemanticSegmentation

from peft_vision_ext import ConvAdapterConfig
from peft_vision_ext.analysis import export_adapters, rank_adapters, score_adapters, select_adapters, size_bias
from peft_vision_ext.analysis.ranking import AdapterScore
from peft_vision_ext.cli import main as cli
from peft_vision_ext.tuners.conv_adapter import ConvAdapterLayer

from testing_common import rel_diff
from tiny_models import make_tiny_cnn, make_unet


def _trained_like(model):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        return get_peft_model(model, ConvAdapterConfig(init_weights=False)).eval()


def test_z_score_is_the_seed_formula():
    model = _trained_like(make_tiny_cnn())
    scores = {s.module: s for s in score_adapters(model)}
    layer = model.base_model.model.stem
    weights = torch.cat(
        [
            p.flatten()
            for p in (*layer.convadapter_bn["default"].parameters(), *layer.convadapter_conv["default"].parameters())
        ]
    )
    assert scores["stem"].numel == weights.numel()
    assert scores["stem"].scores["z"] == pytest.approx(weights.norm().item() / weights.numel(), rel=1e-6)
    assert scores["stem"].scores["rms"] == pytest.approx(weights.norm().item() / math.sqrt(weights.numel()), rel=1e-6)
    delta, _ = layer.get_delta_weight("default")
    expected = (delta.norm() / layer.get_base_layer().weight.norm()).item()
    assert scores["stem"].scores["relative"] == pytest.approx(expected, rel=1e-5)


def test_z_favours_small_layers_and_rms_less_so():
    scores = score_adapters(_trained_like(make_unet("test_resnet")))
    assert size_bias(scores, "z") < -0.5
    assert size_bias(scores, "rms") > size_bias(scores, "z")


def _score(module, value, nbytes):
    return AdapterScore(module=module, numel=nbytes // 4, nbytes=nbytes, scores={"z": value})


def test_selection_by_fraction_and_budget():
    scores = [_score("a", 0.1, 400), _score("b", 0.9, 800), _score("c", 0.5, 100), _score("d", 0.7, 300)]
    assert [s.module for s in rank_adapters(scores, "z")] == ["b", "d", "c", "a"]
    assert select_adapters(scores, keep_fraction=0.5) == ["b", "d"]
    assert select_adapters(scores, keep_fraction=0.66) == ["b", "d", "c"]  # ceil(0.66 * 4) = 3
    assert select_adapters(scores, keep_fraction=1.0) == ["b", "d", "c", "a"]
    # budget: b (800) does not fit 500; d (300) and c (100) do; a (400) would overflow
    assert select_adapters(scores, budget_bytes=500) == ["d", "c"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_fraction=0.0), r"`keep_fraction` must be in \(0, 1\], got 0.0"),
        (dict(keep_fraction=1.5), r"`keep_fraction` must be in \(0, 1\], got 1.5"),
        (dict(), r"Pass exactly one of `keep_fraction` and `budget_bytes`"),
        (dict(keep_fraction=0.5, budget_bytes=10), r"Pass exactly one"),
        (dict(budget_bytes=50), r"fits no adapter: the smallest one needs 100 bytes"),
        (dict(keep_fraction=0.5, score="l1"), r"`score` must be one of"),
    ],
)
def test_selection_bad_input(kwargs, match):
    scores = [_score("a", 0.1, 400), _score("c", 0.5, 100)]
    with pytest.raises(ValueError, match=match):
        select_adapters(scores, **kwargs)


def test_relative_score_needs_the_base(tmp_path):
    model = _trained_like(make_tiny_cnn())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'relative' score needs the base model"):
        rank_adapters(score_adapters(tmp_path), "relative")


@torch.no_grad()
def test_export_round_trip_equals_dropping_the_other_adapters(tmp_path):
    model = _trained_like(make_unet("test_resnet"))
    keep = select_adapters(score_adapters(model), score="rms", keep_fraction=0.5)
    result = export_adapters(model, tmp_path / "update", keep)
    assert result.kept == sorted(keep) and result.dropped and 0 < result.reduction < 1
    assert result.nbytes == os.path.getsize(tmp_path / "update" / "adapter_model.safetensors")

    loaded = PeftModel.from_pretrained(make_unet("test_resnet"), tmp_path / "update").eval()
    assert sorted(loaded.base_model.targeted_module_names) == sorted(keep)
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, ConvAdapterLayer) and name not in keep:
            module.enable_adapters(False)
    x = torch.randn(1, 3, 40, 40)
    assert rel_diff(loaded(pixel_values=x).logits, model(pixel_values=x).logits) < 1e-6
    # exporting from the saved directory gives the same update
    model.save_pretrained(tmp_path / "full")
    again = export_adapters(tmp_path / "full", tmp_path / "update2", keep)
    assert again.nbytes == result.nbytes
    assert again.full_nbytes == os.path.getsize(tmp_path / "full" / "adapter_model.safetensors")


def test_export_bad_input(tmp_path):
    model = _trained_like(make_tiny_cnn())
    with pytest.raises(ValueError, match=r"`keep` names \['nope'\], which are not adapted modules"):
        export_adapters(model, tmp_path / "x", ["nope"])
    with pytest.raises(ValueError, match=r"`keep` is empty"):
        export_adapters(model, tmp_path / "x", [])


@pytest.fixture(scope="module")
def saved_unet_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_unet("test_resnet")
    base.save_pretrained(root / "base")
    model = _trained_like(base)
    model.save_pretrained(root / "adapter")
    return root


def test_cli_rank_export_fuse_round_trip(saved_unet_and_adapter, tmp_path, capsys):
    root = saved_unet_and_adapter
    assert cli(["rank", str(root / "adapter"), "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert [r["z"] for r in ranked] == sorted((r["z"] for r in ranked), reverse=True)

    assert cli(["rank", str(root / "adapter"), "--base", str(root / "base")]) == 0
    assert "ranked by 'relative'" in capsys.readouterr().out

    assert cli(["export", str(root / "adapter"), "--keep-fraction", "0.66", "--out", str(tmp_path / "update")]) == 0
    out = capsys.readouterr().out
    assert "smaller" in out and (tmp_path / "update" / "adapter_model.safetensors").exists()
    assert cli(["export", str(root / "adapter"), "--budget-bytes", "20000", "--out", str(tmp_path / "small")]) == 0
    assert os.path.getsize(tmp_path / "small" / "adapter_model.safetensors") < 20000 + 10000  # + JSON header

    assert (
        cli(
            [
                "fuse",
                "--base",
                str(root / "base"),
                "--adapter",
                str(tmp_path / "update"),
                "--out",
                str(tmp_path / "fused"),
            ]
        )
        == 0
    )
    fused = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "fused").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForSemanticSegmentation.from_pretrained(root / "base"), tmp_path / "update"
    ).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert rel_diff(fused(pixel_values=x).logits, adapted(pixel_values=x).logits) < 1e-5
    assert not any("convadapter" in n for n, _ in fused.named_modules())


def test_cli_errors(saved_unet_and_adapter, tmp_path, capsys):
    root = saved_unet_and_adapter
    assert cli(["rank", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == (
        f"peft-vision rank: error: `adapter`: Adapter directory '{tmp_path / 'missing'}' does not exist. Pass the "
        "folder that `save_pretrained` wrote.\n"
    )
    assert cli(["rank", str(root / "adapter"), "--score", "relative"]) == 2
    assert "`--score relative` needs `--base`" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(root / "adapter", broken)
    os.remove(broken / "adapter_model.safetensors")
    assert cli(["export", str(broken), "--keep-fraction", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "no weights file" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("peft-vision") or os.path.join(os.path.dirname(os.sys.executable), "peft-vision")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "rank" in result.stdout and "fuse" in result.stdout

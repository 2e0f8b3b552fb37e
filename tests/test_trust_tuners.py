# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Silent wrong results and lost guarantees at the tuner level, one test per case the "trust" issue names. Each
failed (ran on, or lost a guarantee) before the fix; the shared matrix (`test_matrix.py`) checks the general rules
for every method, these pin the reported cases."""

from __future__ import annotations

import ast
import copy
import json
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file

import peft_vision_ext  # noqa: F401
from peft_vision_ext import ConvAdapterConfig, DeformableLoRAConfig, MoPEFTConfig, SeqAdapterConfig, merge_mergeable
from peft_vision_ext.tuners.mopeft import MoPEFTLayer

from testing_common import rel_diff
from tiny_models import forward_logits, make_mask2former, make_sam, make_tiny_cnn, make_unet


PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peft_vision_ext")


def _conv_peft(model, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        return get_peft_model(model, ConvAdapterConfig(**kwargs))


# ----------------------------------------------------------------------------------------------------------------------
# Configs are not changed by use
# ----------------------------------------------------------------------------------------------------------------------
def test_reusing_one_conv_adapter_config_on_a_second_model_adapts_all_of_its_convs():
    config = ConvAdapterConfig()
    first = _conv_peft(make_tiny_cnn(), **{})  # a config of its own, for reference
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        get_peft_model(make_tiny_cnn(), config)
        second = get_peft_model(make_unet("test_resnet"), config)
    assert config.target_modules is None and config.auto_target_modules is False, "the user's config was changed"
    fresh = _conv_peft(make_unet("test_resnet"))
    assert second.targeted_module_names == fresh.targeted_module_names
    assert len(second.targeted_module_names) > len(first.targeted_module_names)


def test_reusing_a_mopeft_config_keeps_its_modules_to_save_default():
    config = MoPEFTConfig()
    model = get_peft_model(make_sam(), config)
    assert config.modules_to_save is None
    assert model.peft_config["default"].modules_to_save == ["mask_decoder"]


# ----------------------------------------------------------------------------------------------------------------------
# Partial and mismatched loads raise, naming the tensors
# ----------------------------------------------------------------------------------------------------------------------
def test_two_block_mopeft_adapter_on_one_block_sam_is_refused(tmp_path):
    from peft_vision_ext.models import SamForSemanticSegmentation

    from tiny_models import tiny_sam_config

    get_peft_model(make_sam(), MoPEFTConfig(init_weights=False)).save_pretrained(tmp_path)
    config = tiny_sam_config()
    config.vision_config.num_hidden_layers = 1
    config.vision_config.global_attn_indexes = [0]
    one_block = SamForSemanticSegmentation(config).eval()
    with pytest.raises(ValueError, match=r"belongs to a different base model") as error:
        PeftModel.from_pretrained(one_block, tmp_path)
    assert "vision_encoder.layers.1" in str(error.value)


def test_conv_adapter_for_one_unet_on_another_is_refused(tmp_path):
    _conv_peft(make_unet("test_resnet")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"belongs to a different base model") as error:
        PeftModel.from_pretrained(make_unet("resnet18"), tmp_path)
    assert "encoder." in str(error.value), "the message names a module the adapter does not cover"


def _edit_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as handle:
        data = json.load(handle)
    data.update(changes)
    with open(path, "w") as handle:
        json.dump(data, handle)


def test_config_edited_to_a_subset_of_target_modules_is_refused(tmp_path):
    model = _conv_peft(make_tiny_cnn(), init_weights=False, target_modules=["stem", "down", "proj"])
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, target_modules=["stem"])
    with pytest.raises(ValueError, match=r"stored tensor\(s\) match no module of this model") as error:
        PeftModel.from_pretrained(make_tiny_cnn(), tmp_path)
    assert "down" in str(error.value) or "proj" in str(error.value)


@pytest.mark.parametrize("saved_bias", [True, False])
def test_config_with_adapter_bias_flipped_is_refused(tmp_path, saved_bias):
    _conv_peft(make_tiny_cnn(), init_weights=False, adapter_bias=saved_bias).save_pretrained(tmp_path)
    _edit_config(tmp_path, adapter_bias=not saved_bias)
    expected = r"missing from the checkpoint" if not saved_bias else r"match no module of this model"
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(make_tiny_cnn(), tmp_path)


def test_extra_stored_tensor_is_refused(tmp_path):
    _conv_peft(make_tiny_cnn(), init_weights=False).save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    state = load_file(path)
    state["base_model.model.stem.convadapter_conv.extra"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"1 stored tensor\(s\) match no module.*convadapter_conv.extra"):
        PeftModel.from_pretrained(make_tiny_cnn(), tmp_path)


def test_adapter_whose_head_tensors_are_missing_is_refused(tmp_path):
    _conv_peft(make_tiny_cnn(), modules_to_save=["head"]).save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if ".head." not in k}, path)
    with pytest.raises(ValueError, match=r"holds no tensors for `head`"):
        PeftModel.from_pretrained(make_tiny_cnn(), tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Merging the adapter that was asked for
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_merge_mergeable_merges_the_named_adapter_not_the_active_one():
    model = get_peft_model(make_sam(), MoPEFTConfig.from_preset("lora", init_weights=False))
    torch.manual_seed(5)
    model.add_adapter("b", MoPEFTConfig.from_preset("lora", init_weights=False, r=4))
    x = torch.randn(1, 3, 80, 80)
    model.set_adapter("b")
    only_b = forward_logits(model, x)
    model.set_adapter("default")
    only_default = forward_logits(model, x)
    assert rel_diff(only_b, only_default) > 1e-4, "the two adapters must differ for this test to mean anything"
    merge_mergeable(model, "b")
    layers = [m for m in model.modules() if isinstance(m, MoPEFTLayer)]
    assert layers and all(m.merged_adapters == ["b"] for m in layers)
    assert set(model.peft_config) == {"default", "b"}, "merging b must not unload the other adapter"
    model.set_adapter("b")  # b now lives in the weights: the output is that of b alone
    assert rel_diff(forward_logits(model, x), only_b) < 1e-5


def test_merge_mergeable_unknown_adapter():
    model = get_peft_model(make_sam(), MoPEFTConfig.from_preset("lora"))
    with pytest.raises(ValueError, match=r"No MoPEFT adapter named 'nope'; the model has \['default'\]"):
        merge_mergeable(model, "nope")


# ----------------------------------------------------------------------------------------------------------------------
# The folded kernel, the BatchNorm guarantee on every entry point, peft's layer attributes
# ----------------------------------------------------------------------------------------------------------------------
def test_low_level_injection_keeps_frozen_batchnorm_statistics():
    model = inject_adapter_in_model(ConvAdapterConfig(), make_tiny_cnn())
    stats = {n: b.clone() for n, b in model.named_buffers() if "running_" in n and "convadapter" not in n}
    model.train()
    model(torch.randn(2, 3, 16, 16))
    model(torch.randn(2, 3, 16, 16))
    changed = [n for n, b in model.named_buffers() if n in stats and not torch.equal(stats[n], b)]
    assert not changed, f"frozen BatchNorm statistics changed: {changed}"


def test_unloaded_model_trains_its_batchnorm_again():
    model = _conv_peft(make_tiny_cnn())
    base = model.unload().train()
    before = base.bn.running_mean.clone()
    base.requires_grad_(True)
    base(torch.randn(2, 3, 16, 16))
    assert not torch.equal(before, base.bn.running_mean), "the guard must leave with the adapters"


@pytest.mark.parametrize(
    "factory, config",
    [
        (make_tiny_cnn, ConvAdapterConfig()),
        (make_sam, MoPEFTConfig()),
        (make_mask2former, DeformableLoRAConfig(adapters_per_block=2, extra_target_modules=["cross_attn"])),
        (make_mask2former, SeqAdapterConfig()),
    ],
    ids=["conv", "mopeft", "deform_lora", "seq_adapter"],
)
def test_tuner_layers_have_peft_in_and_out_features(factory, config):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        model = get_peft_model(factory(), config)
    layers = [m for m in model.modules() if hasattr(m, "adapter_layer_names") and hasattr(m, "base_layer")]
    assert layers
    for layer in layers:
        assert isinstance(layer.in_features, int) and isinstance(layer.out_features, int), type(layer).__name__
    status = model.get_layer_status()
    assert status and all("default" in row.available_adapters for row in status)


# ----------------------------------------------------------------------------------------------------------------------
# Deformable LoRA with sequential adapters holds several adapters
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_deformable_lora_with_adapters_adds_and_loads_a_second_adapter(tmp_path):
    base = make_mask2former()
    config = DeformableLoRAConfig(adapters_per_block=2, adapter_dim=8, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("other", DeformableLoRAConfig(adapters_per_block=2, adapter_dim=8, init_weights=False, r=2))
    x = torch.randn(1, 3, 64, 64)
    default = forward_logits(model, x)
    model.set_adapter("other")
    other = forward_logits(model, x)
    assert rel_diff(other, default) > 1e-4
    model.set_adapter("default")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert not [n for n, p in loaded.named_parameters() if p.requires_grad], "an inference load trains nothing"
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert not [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert rel_diff(forward_logits(loaded, x), default) < 1e-5
    loaded.set_adapter("other")
    assert rel_diff(forward_logits(loaded, x), other) < 1e-5


def test_trainable_load_of_deformable_lora_with_adapters_trains_only_the_adapter(tmp_path):
    get_peft_model(make_mask2former(), DeformableLoRAConfig(adapters_per_block=1)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mask2former(), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any("iseg_adapter" in n for n in trainable) and any("iseg_lora" in n for n in trainable)
    assert all("iseg_" in n or "modules_to_save" in n for n in trainable)


# ----------------------------------------------------------------------------------------------------------------------
# Mixed-adapter batches: honoured per row (the matrix checks every method); what cannot work is refused in words
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_adapter_cnn():
    model = _conv_peft(make_tiny_cnn(), init_weights=False).eval()
    model.add_adapter("b", ConvAdapterConfig(init_weights=False))
    return model


@pytest.mark.parametrize(
    "adapter_names, extra, error, match",
    [
        (["default"], {}, ValueError, r"got 1 names for a batch of 2"),
        (["default", "nope"], {}, ValueError, r"adapter\(s\) \['nope'\] that the model does not have"),
        ("default", {}, TypeError, r"must be a list with one adapter name per row"),
        (["default", 3], {}, TypeError, r"must hold adapter names"),
        (
            ["default", "b"],
            {"labels": torch.zeros(2, 16, 16, dtype=torch.long)},
            ValueError,
            r"together with `labels`",
        ),
    ],
    ids=["wrong-length", "unknown-name", "a-string", "not-str", "with-labels"],
)
def test_bad_adapter_names_are_refused(two_adapter_cnn, adapter_names, extra, error, match):
    with pytest.raises(error, match=match):
        two_adapter_cnn(torch.randn(2, 3, 16, 16), adapter_names=adapter_names, **extra)


def test_adapter_names_refused_in_training_mode_and_when_merged(two_adapter_cnn):
    x = torch.randn(2, 3, 16, 16)
    two_adapter_cnn.train()
    with pytest.raises(ValueError, match=r"training mode"):
        two_adapter_cnn(x, adapter_names=["default", "b"])
    two_adapter_cnn.eval()
    two_adapter_cnn.merge_adapter()
    with pytest.raises(ValueError, match=r"merged adapters"):
        two_adapter_cnn(x, adapter_names=["default", "b"])


@torch.no_grad()
def test_mixed_batch_puts_rows_back_in_order(two_adapter_cnn):
    x = torch.randn(4, 3, 16, 16)
    names = ["b", "default", "b", "__base__"]
    mixed = two_adapter_cnn(x, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with two_adapter_cnn.disable_adapter():
                expected = two_adapter_cnn(x[row : row + 1])
        else:
            two_adapter_cnn.set_adapter(name)
            expected = two_adapter_cnn(x[row : row + 1])
        assert rel_diff(mixed[row : row + 1], expected) < 1e-5, (row, name)


# ----------------------------------------------------------------------------------------------------------------------
# Gate telemetry through a public hook; imports flow one way
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_gate_hook_returns_a_removable_handle():
    model = get_peft_model(make_sam(), MoPEFTConfig(init_weights=False)).eval()
    layer = next(m for m in model.modules() if isinstance(m, MoPEFTLayer))
    seen = []
    handle = layer.register_gate_hook(lambda adapter, method, gates: seen.append((adapter, method, gates.shape)))
    model(pixel_values=torch.randn(2, 3, 80, 80))
    assert {(a, m) for a, m, _ in seen} == {("default", "lora"), ("default", "prefix"), ("default", "adapter")}
    assert all(shape == (2,) for _, _, shape in seen)
    handle.remove()
    count = len(seen)
    model(pixel_values=torch.randn(2, 3, 80, 80))
    assert len(seen) == count
    with pytest.raises(TypeError, match=r"`hook` must be callable"):
        layer.register_gate_hook("not a function")


def _imports(path: str) -> list[str]:
    """Every module a file imports, absolute, including imports inside functions."""
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(PACKAGE)).replace(os.sep, ".")
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def test_tuners_and_bottom_modules_do_not_import_higher_layers():
    higher = ("peft_vision_ext.analysis", "peft_vision_ext.train", "peft_vision_ext.adaptation")
    offenders = []
    for root, _, files in os.walk(os.path.join(PACKAGE, "tuners")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                offenders += [(path, m) for m in _imports(path) if m.startswith(higher)]
    path = os.path.join(PACKAGE, "_files.py")
    offenders += [(path, m) for m in _imports(path) if m.startswith("peft_vision_ext")]
    assert not offenders, offenders


def _package_files(subpackage: str) -> list[str]:
    return [
        os.path.join(root, name)
        for root, _, files in os.walk(os.path.join(PACKAGE, subpackage))
        for name in files
        if name.endswith(".py")
    ]


def test_analysis_and_train_do_not_import_higher_layers():
    """tuners -> analysis -> train -> recipes: analysis (measurement, ranking, gates) uses neither the training code
    nor the method presets of ``adaptation``; the data, metrics and models layers use neither either."""
    rules = {
        "analysis": ("peft_vision_ext.train", "peft_vision_ext.adaptation"),
        "data": ("peft_vision_ext.train", "peft_vision_ext.adaptation", "peft_vision_ext.analysis"),
        "metrics": ("peft_vision_ext.train", "peft_vision_ext.adaptation", "peft_vision_ext.analysis"),
    }
    offenders = [
        (path, m)
        for subpackage, higher in rules.items()
        for path in _package_files(subpackage)
        for m in _imports(path)
        if m.startswith(higher)
    ]
    assert not offenders, offenders


def test_misspelt_modules_to_save_is_refused_with_close_matches():
    with pytest.raises(ValueError, match=r"'mask_decodr' \(did you mean 'mask_decoder'"):
        get_peft_model(make_sam(), MoPEFTConfig(modules_to_save=["mask_decodr"]))


@pytest.mark.parametrize(
    "content, match",
    [
        ("{}", r"has `peft_type`=None, but ConvAdapterConfig reads"),
        ("[1, 2]", r"holds a JSON list, not an object"),
        ('{"peft_type": "MOPEFT (IMPORT PEFT_VISION_EXT)"}', r"has `peft_type`='MOPEFT"),
    ],
    ids=["empty-object", "list", "other-method"],
)
def test_adapter_config_that_is_not_this_methods_object_is_refused(tmp_path, content, match):
    _conv_peft(make_tiny_cnn()).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        ConvAdapterConfig.from_pretrained(tmp_path)

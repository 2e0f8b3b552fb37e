# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Focused tests of conv adapters: fusion math per conv flavour, targeting, BN handling, bad input."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_vision_ext import ConvAdapterConfig
from peft_vision_ext.analysis import count_flops, set_fold_in_eval
from peft_vision_ext.models import UNetForSemanticSegmentation
from peft_vision_ext.tuners.conv_adapter import ConvAdapterLayer, fusion_blockers

from testing_common import rel_diff, train_steps
from tiny_models import NoConv, make_tiny_cnn, make_unet


def _peft(model, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        return get_peft_model(model, ConvAdapterConfig(**kwargs))


CONVS = {
    "3x3": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "3x3-stride2-nobias": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, stride=2, bias=False),
    "5x5-dilated": dict(in_channels=4, out_channels=6, kernel_size=5, padding=4, dilation=2),
    "3x5-rect": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2)),
    "7x7-stride2": dict(in_channels=3, out_channels=8, kernel_size=7, padding=3, stride=2, bias=False),
    "grouped": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, bias=False),
    "1x1-stride2": dict(in_channels=4, out_channels=6, kernel_size=1, stride=2),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    "same-string": dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"),
}


class Wrap(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("adapter_type", ["conv", "bn"])
@pytest.mark.parametrize("name", list(CONVS))
def test_fusion_is_exact_for_every_conv_flavour(name, adapter_type):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name]).eval()
    model = get_peft_model(Wrap(conv), ConvAdapterConfig(adapter_type=adapter_type, init_weights=False)).eval()
    x = torch.randn(2, conv.in_channels, 13, 10)  # odd sizes: strided borders must match too
    layer = model.base_model.model.conv
    with torch.no_grad():
        layer.fold_in_eval = False
        branch = model(x)
        layer.fold_in_eval = True
        folded = model(x)
        fused = model.merge_and_unload()(x)
    assert branch.shape == fused.shape
    assert rel_diff(folded, branch) < 1e-5 and rel_diff(fused, branch) < 1e-5


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(kernel_size=2, stride=2), "even"),
        (dict(kernel_size=3, padding=0), "not 'same' padding"),
        (dict(kernel_size=3, padding=2), "not 'same' padding"),
        (dict(kernel_size=3, padding="valid"), "valid"),
    ],
)
def test_unfusable_convs_are_refused_with_the_reason(kwargs, reason):
    conv = nn.Conv2d(4, 4, **kwargs)
    assert any(reason in r for r in fusion_blockers(conv))
    with pytest.raises(ValueError, match="cannot be fused exactly"):
        get_peft_model(Wrap(conv), ConvAdapterConfig(target_modules=["conv"]))


def test_conv_with_custom_forward_is_not_fused():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 0, 1, 0)))

    assert any("overrides Conv2d.forward" in r for r in fusion_blockers(PaddedConv(4, 4, 3, padding=1)))


def test_default_targeting_skips_unfusable_convs_with_a_warning():
    model = make_tiny_cnn()
    with pytest.warns(UserWarning, match=r"leave out 1 conv.*`patch`.*even"):
        peft_model = get_peft_model(model, ConvAdapterConfig())
    targeted = peft_model.base_model.targeted_module_names
    assert "patch" not in targeted and {"stem", "down", "depthwise", "grouped", "proj", "head"} <= set(targeted)
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(targeted)


def test_modules_to_save_and_exclude_modules_are_respected():
    model = _peft(make_tiny_cnn(), modules_to_save=["head"], exclude_modules=["stem"])
    targeted = set(model.base_model.targeted_module_names)
    assert "head" not in targeted and "stem" not in targeted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head.modules_to_save" in n for n in trainable)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------
def test_unknown_target_name():
    with pytest.raises(ValueError, match=r"matches no conv of the model.*`stem`"):
        get_peft_model(make_tiny_cnn(), ConvAdapterConfig(target_modules=["does_not_exist"]))


def test_non_conv_target():
    with pytest.raises(ValueError, match=r"selects `bn`, a BatchNorm2d; conv adapters only wrap torch.nn.Conv2d"):
        get_peft_model(make_tiny_cnn(), ConvAdapterConfig(target_modules=["bn"]))


def test_model_without_conv():
    with pytest.raises(ValueError, match=r"has none"):
        get_peft_model(NoConv(), ConvAdapterConfig())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adapter_type="lora"), r"`adapter_type` must be one of \('conv', 'bn'\), got 'lora'"),
        (dict(target_modules=[]), r"`target_modules` is an empty list"),
        (dict(target_modules=3), r"`target_modules` must be None, a list of module names or a regex string"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ConvAdapterConfig(**kwargs)


@pytest.fixture
def saved_adapter(tmp_path):
    model = _peft(make_tiny_cnn(), init_weights=False)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_missing_weights_file(saved_adapter):
    os.remove(saved_adapter / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has a config but no weights file 'adapter_model.safetensors'"):
        PeftModel.from_pretrained(make_tiny_cnn(), saved_adapter)


def test_corrupted_weights_file(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match=r"is damaged and cannot be read"):
        PeftModel.from_pretrained(make_tiny_cnn(), saved_adapter)


def test_corrupted_config_file(saved_adapter):
    from peft_vision_ext.analysis import score_adapters

    (saved_adapter / "adapter_config.json").write_text("{not json")
    # Our entry points (ranking, export, CLI) check the directory first and say what is wrong.
    with pytest.raises(
        ValueError, match=r"adapter_config.json' is not valid JSON .* The adapter directory is damaged"
    ):
        score_adapters(saved_adapter)
    # peft parses the config before our code runs; it raises a JSONDecodeError (a ValueError) naming the position.
    with pytest.raises(ValueError, match=r"line 1 column 2"):
        PeftModel.from_pretrained(make_tiny_cnn(), saved_adapter)


def test_adapter_on_a_base_with_other_shapes(saved_adapter):
    with pytest.raises(
        ValueError, match=r"does not fit this model: .*wrong shape.*checkpoint \(16,\) vs model \(32,\)"
    ):
        PeftModel.from_pretrained(make_tiny_cnn(width=16), saved_adapter)


def test_adapter_on_a_base_with_other_modules(saved_adapter):
    with pytest.raises(ValueError, match=r"belongs to a different base model"):
        PeftModel.from_pretrained(make_unet("test_resnet"), saved_adapter)


def test_tensor_missing_from_checkpoint(saved_adapter):
    from safetensors.torch import load_file, save_file

    path = str(saved_adapter / "adapter_model.safetensors")
    state = load_file(path)
    state.pop(next(k for k in state if "convadapter_conv" in k))
    save_file(state, path)
    with pytest.raises(ValueError, match=r"1 adapter tensor\(s\) are missing from the checkpoint"):
        PeftModel.from_pretrained(make_tiny_cnn(), saved_adapter)


# ----------------------------------------------------------------------------------------------------------------------
# Merging, several adapters, BatchNorm
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_two_conv_adapters_merge_as_their_sum():
    model = _peft(make_tiny_cnn(), init_weights=False)
    model.add_adapter("other", ConvAdapterConfig(init_weights=False, target_modules=["stem", "down"]))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 3, 20, 18)
    both = model(x)
    model.merge_adapter(["default", "other"])
    assert rel_diff(model(x), both) < 1e-5
    model.unmerge_adapter()
    assert rel_diff(model(x), both) < 1e-5


def test_bn_only_adapter_cannot_merge_with_another():
    model = _peft(make_tiny_cnn(), init_weights=False, adapter_type="bn")
    model.add_adapter("conv", ConvAdapterConfig(init_weights=False))
    model.base_model.set_adapter(["default", "conv"])
    with pytest.raises(ValueError, match="BN-only conv adapter rescales the conv output"):
        model.merge_adapter(["default", "conv"])


@torch.no_grad()
def test_unmerge_removes_the_bias_that_merging_created():
    model = _peft(make_tiny_cnn(), init_weights=False)
    stem = model.base_model.model.stem
    assert stem.get_base_layer().bias is None
    model.merge_adapter()
    assert stem.get_base_layer().bias is not None
    model.unmerge_adapter()
    assert stem.get_base_layer().bias is None


def test_merging_in_training_mode_warns():
    model = _peft(make_tiny_cnn(), init_weights=False)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        model.merge_adapter()


def test_new_adapters_follow_the_base_layers_mode():
    model = _peft(make_tiny_cnn())  # base in eval mode
    layers = [m for m in model.modules() if isinstance(m, ConvAdapterLayer)]
    assert layers and not any(m.training for layer in layers for m in layer.modules())


def test_without_freeze_bn_stats_the_base_statistics_drift():
    """The guard of the matrix's BN check: switching it off must make the base BN statistics change."""
    from testing_common import MATRIX

    case = MATRIX[0]
    model = _peft(case.make_base(), freeze_bn_stats=False)
    before = model.base_model.model.bn.running_mean.clone()
    train_steps(model, case)
    assert not torch.equal(before, model.base_model.model.bn.running_mean)


def test_fused_unet_has_base_flops_and_reloads_with_its_biases(tmp_path):
    base = make_unet("test_resnet")
    model = _peft(copy.deepcopy(base), init_weights=False).eval()
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    fused = model.merge_and_unload()
    assert count_flops(fused, (1, 3, 40, 36)) == count_flops(base, (1, 3, 40, 36))
    assert fused.config.conv_bias_modules
    fused.save_pretrained(tmp_path)
    reloaded = UNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_diff(reloaded(pixel_values=x).logits, expected) < 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in fused.parameters())


def test_foreign_model_gets_a_warning_about_created_biases():
    model = _peft(make_tiny_cnn(), init_weights=False).eval()
    with pytest.warns(UserWarning, match="does not recreate them on `from_pretrained`"):
        model.merge_and_unload()


@torch.no_grad()
def test_folded_kernel_is_never_stale():
    """Eval folds the adapters into the kernel at every call: in-place changes through `.data` (which do not bump a
    tensor's version), optimizer-style updates and `load_state_dict` are all seen at the next forward."""
    model = _peft(make_tiny_cnn(), init_weights=False).eval()
    stem = model.base_model.model.stem
    x = torch.randn(1, 3, 16, 16)

    def branch_output():
        set_fold_in_eval(model, False)
        try:
            return model(x)
        finally:
            set_fold_in_eval(model, True)

    first = model(x)
    stem.convadapter_conv["default"].weight.data.mul_(2.0)  # invisible to a version-keyed cache
    changed = model(x)
    assert not torch.allclose(changed, first)
    assert rel_diff(changed, branch_output()) < 1e-5, "the fold must equal the branch computation"
    stem.get_base_layer().weight.data.mul_(0.5)
    assert rel_diff(model(x), branch_output()) < 1e-5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: (v * 0.5 if "convadapter_conv" in k else v) for k, v in state.items()})
    assert rel_diff(model(x), branch_output()) < 1e-5


def test_eval_mode_with_gradients_trains_through_the_fold():
    model = _peft(make_tiny_cnn(), init_weights=False).eval()
    loss = model(torch.randn(1, 3, 16, 16)).square().mean()
    loss.backward()
    grad = model.base_model.model.stem.convadapter_conv["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@torch.no_grad()
def test_unload_returns_the_untouched_base():
    base = make_tiny_cnn()
    x = torch.randn(1, 3, 20, 20)
    expected = base(x)
    model = _peft(copy.deepcopy(base), init_weights=False).eval()
    assert not torch.allclose(model(x), expected)
    unloaded = model.unload()
    assert type(unloaded) is type(base) and torch.equal(unloaded(x), expected)
    assert not any(isinstance(m, ConvAdapterLayer) for m in unloaded.modules())
    assert unloaded.stem.bias is None


@torch.no_grad()
@pytest.mark.parametrize("name", ["grouped", "depthwise", "3x3-stride2-nobias"])
def test_fold_of_a_float64_conv_stays_float64(name):
    """The fold sums in float32 for float32 and lower precisions (rounded once, as `merge`), in float64 for float64:
    a float64 model folds as exactly as float64 allows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name]).double().eval()
    model = get_peft_model(Wrap(conv), ConvAdapterConfig(init_weights=False)).double().eval()
    model.add_adapter("other", ConvAdapterConfig(init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, conv.in_channels, 11, 9, dtype=torch.float64)
    layer = model.base_model.model.conv
    layer.fold_in_eval = False
    branch = model(x)
    layer.fold_in_eval = True
    assert model(x).dtype == torch.float64 and rel_diff(model(x), branch) < 1e-13


@torch.no_grad()
def test_eval_fold_keeps_nothing_between_calls():
    """No cache: after an eval forward the layers hold exactly the tensors they held before (parameters, buffers)."""
    model = _peft(make_tiny_cnn(), init_weights=False).eval()
    layers = [m for m in model.modules() if isinstance(m, ConvAdapterLayer)]

    def tensors(layer):
        return {id(v) for v in vars(layer).values() if isinstance(v, torch.Tensor)} | {
            id(t) for t in layer.state_dict(keep_vars=True).values()
        }

    before = [tensors(layer) for layer in layers]
    model(torch.randn(1, 3, 16, 16))
    assert [tensors(layer) for layer in layers] == before

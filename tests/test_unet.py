# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation


def unet(encoder="test_resnet", **kwargs):
    torch.manual_seed(0)
    return UNetForSemanticSegmentation(UNetConfig(encoder_name=encoder, num_labels=4, **kwargs)).eval()


@pytest.mark.parametrize("encoder", ["resnet18", "vgg19", "vgg19_bn", "test_efficientnet"])
@pytest.mark.parametrize("size", [(32, 32), (37, 50), (65, 33)])
def test_logits_at_input_size_for_any_size(encoder, size):
    model = unet(encoder)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, *size))
    assert isinstance(out, SemanticSegmenterOutput)
    assert out.logits.shape == (1, 4, *size)


def test_vgg_encoder_has_a_full_resolution_skip():
    model = unet("vgg19_bn")
    assert model.encoder.feature_info.reduction()[0] == 1
    assert not model.decoder.final_upsample


def test_loss_honours_ignore_index():
    model = unet(semantic_loss_ignore_index=255)
    x = torch.randn(2, 3, 40, 40)
    labels = torch.randint(0, 4, (2, 40, 40))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        loss = model(pixel_values=x, labels=labels).loss
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels))
        ignored = labels.clone()
        ignored[:, :20] = 255
        expected = torch.nn.functional.cross_entropy(logits[:, :, 20:], labels[:, 20:])
        assert torch.allclose(model(pixel_values=x, labels=ignored).loss, expected, atol=1e-6)
        # labels at another resolution than the image are refused (tests/test_model_inputs.py)


def test_save_and_load_with_auto_class(tmp_path):
    model = unet(id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is UNetForSemanticSegmentation and loaded.config.id2label[2] == "c"
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_from_pretrained_never_downloads_encoder_weights(tmp_path, monkeypatch):
    model = unet()
    model.config.encoder_pretrained = True  # as if the user had built it with timm's weights
    model.save_pretrained(tmp_path)
    import timm

    calls = []
    original = timm.create_model
    monkeypatch.setattr(
        timm,
        "create_model",
        lambda *a, **k: calls.append(k["pretrained"]) or original(*a, **{**k, "pretrained": False}),
    )
    UNetForSemanticSegmentation.from_pretrained(tmp_path)
    assert calls == [False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(encoder_name="resnet_does_not_exist"), r"`encoder_name`='resnet_does_not_exist' is not a timm model"),
        (dict(decoder_channels=[8, 8]), r"`decoder_channels` has 2 entries, but this encoder needs 5"),
        (dict(conv_bias_modules=["nope"]), r"`conv_bias_modules` names 'nope'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetForSemanticSegmentation(UNetConfig(**{"encoder_name": "test_resnet", **kwargs}))


def test_bad_pixel_values():
    with pytest.raises(
        ValueError, match=r"`pixel_values` must have shape \(batch, 3, height, width\), got \(3, 32, 32\)"
    ):
        unet()(pixel_values=torch.randn(3, 32, 32))

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The models in the real training and serving stacks: gradient checkpointing of the U-Net (alone, under peft, under
``Trainer``), and ``pipeline("image-segmentation")`` for saved U-Net and SAM directories (plain, adapter, merged)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from PIL import Image
from transformers import (
    SamImageProcessor,
    SegformerImageProcessor,
    Trainer,
    TrainingArguments,
    ViTConfig,
    pipeline,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import peft_vision_ext  # noqa: F401  (registers the methods and models)
from peft_vision_ext import ConvAdapterConfig, MoPEFTConfig
from peft_vision_ext.data import SegmentationTransform, collate_segmentation
from peft_vision_ext.models import (
    SamForSemanticSegmentation,
    UNetConfig,
    UNetForSemanticSegmentation,
    image_processor_for,
    save_image_processor,
)

from tiny_models import make_sam, make_unet, tiny_sam_config


# `gradient_checkpointing_enable` / `TrainingArguments(gradient_checkpointing=...)` are deprecated aliases in
# transformers 5; they must keep working, so the tests call them.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

# ----------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing of the U-Net
# ----------------------------------------------------------------------------------------------------------------------
# timm's test_resnet as a FeatureListNet: conv1, bn1, act1, maxpool, layer1..layer4. timm checkpoints every stage but
# the first and the last (and in-place ones); the U-Net checkpoints every decoder block.
ENCODER_CHECKPOINTED = ("encoder.layer1", "encoder.layer2", "encoder.layer3")
ENCODER_NOT_CHECKPOINTED = ("encoder.conv1", "encoder.layer4")
DECODER_BLOCKS = tuple(f"decoder.blocks.{i}" for i in range(5))
# A block's recomputation calls its `forward` directly (the block's own hooks stay outside the checkpoint), so the
# calls are counted on its first conv; pre-hooks, because the recomputation stops once it has what backward needs.
DECODER_CHECKPOINTED = tuple(f"{block}.conv1" for block in DECODER_BLOCKS)


def _unet(seed: int = 0) -> UNetForSemanticSegmentation:
    return make_unet("test_resnet", seed).train()


def _batch(seed: int = 0, size: tuple[int, int] = (48, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *size, generator=generator), torch.randint(0, 3, (2, *size), generator=generator)


def _loss_and_grads(model, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_calls(model, names) -> dict[str, int]:
    """Calls of each named submodule from now on (a dict updated in place)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)
        )
    return counts


def _perturb_trainable(model, seed: int = 1, scale: float = 0.3) -> None:
    """Give every trainable tensor (adapters, modules_to_save) signal of its own, so they change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _assert_same_gradients(grads, reference) -> None:
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-6, atol=1e-8, msg=name)


ENABLE = {
    "gradient_checkpointing_enable": lambda model: model.gradient_checkpointing_enable(),
    "reentrant": lambda model: model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": True}
    ),
    "every_second_block": lambda model: model.activation_checkpointing_enable(every_n_layers=2),  # the new name
}


@pytest.mark.parametrize("how", list(ENABLE))
def test_checkpointing_keeps_the_gradients_and_recomputes_the_checkpointed_blocks(how):
    x, y = _batch()
    reference_loss, reference_grads = _loss_and_grads(_unet(), x, y)

    model = _unet()
    assert UNetForSemanticSegmentation.supports_gradient_checkpointing and not model.is_activation_checkpointing
    ENABLE[how](model)
    assert model.is_activation_checkpointing
    counts = _count_calls(model, ENCODER_CHECKPOINTED + ENCODER_NOT_CHECKPOINTED + DECODER_CHECKPOINTED)
    loss, grads = _loss_and_grads(model, x, y)

    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    _assert_same_gradients(grads, reference_grads)
    every = 2 if how == "every_second_block" else 1
    expected = {name: 2 for name in ENCODER_CHECKPOINTED} | {name: 1 for name in ENCODER_NOT_CHECKPOINTED}
    expected |= {name: 2 if index % every == 0 else 1 for index, name in enumerate(DECODER_CHECKPOINTED)}
    assert counts == expected


def test_no_checkpointing_in_eval_mode_without_gradients_or_once_disabled():
    x, y = _batch()
    model = _unet()
    model.gradient_checkpointing_enable()
    counts = _count_calls(model, ENCODER_CHECKPOINTED + DECODER_CHECKPOINTED)
    encoder_flags = []
    model.encoder.register_forward_pre_hook(lambda module, _: encoder_flags.append(module.grad_checkpointing))
    checkpoint_calls = []
    for block in model.decoder.blocks:
        inner = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda *a, inner=inner, **k: checkpoint_calls.append(1) or inner(*a, **k)

    def run(train: bool, grad: bool) -> tuple[set[int], list[bool], int]:
        for name in counts:
            counts[name] = 0
        encoder_flags.clear()
        checkpoint_calls.clear()
        model.train(train)
        with torch.set_grad_enabled(grad):
            out = model(pixel_values=x, labels=y)
            if grad:
                out.loss.backward()
        return set(counts.values()), list(encoder_flags), len(checkpoint_calls)

    assert run(train=True, grad=True) == ({2}, [True], len(DECODER_BLOCKS))
    assert run(train=False, grad=True) == ({1}, [False], 0)  # eval mode: nothing recomputed
    assert run(train=True, grad=False) == ({1}, [False], 0)  # no gradients: nothing to recompute
    assert run(train=True, grad=True) == ({2}, [True], len(DECODER_BLOCKS))  # and on again in training

    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing and not model.encoder.grad_checkpointing
    assert run(train=True, grad=True)[0:2] == ({1}, [False])


def test_vit_encoder_checkpoints_its_blocks():
    # timm wraps ViTs in a FeatureGetterNet, without `set_grad_checkpointing`; the ViT inside it has one.
    torch.manual_seed(0)
    model = UNetForSemanticSegmentation(UNetConfig(encoder_name="test_vit", num_labels=2)).train()
    x, y = torch.randn(1, 3, 32, 32), torch.randint(0, 2, (1, 32, 32))
    _, reference = _loss_and_grads(model, x, y)
    model.gradient_checkpointing_enable()
    counts = _count_calls(model, ["encoder.model.blocks.0", "decoder.blocks.0.conv1"])
    _, grads = _loss_and_grads(model, x, y)
    assert counts == {"encoder.model.blocks.0": 2, "decoder.blocks.0.conv1": 2}
    _assert_same_gradients(grads, reference)


def test_encoder_without_timm_checkpointing_warns_and_checkpoints_the_decoder(monkeypatch):
    model = _unet()
    x, y = _batch()
    _, reference = _loss_and_grads(model, x, y)

    def refuse(self, enable: bool = True) -> None:  # as timm's hrnet, inception, dla, ... models do
        assert not enable, "gradient checkpointing not supported"

    monkeypatch.setattr(type(model.encoder), "set_grad_checkpointing", refuse)
    with pytest.warns(UserWarning, match="has no timm gradient checkpointing .* only the decoder blocks"):
        model.gradient_checkpointing_enable()
    counts = _count_calls(model, ENCODER_CHECKPOINTED + DECODER_CHECKPOINTED)
    _, grads = _loss_and_grads(model, x, y)
    assert counts == dict.fromkeys(ENCODER_CHECKPOINTED, 1) | dict.fromkeys(DECODER_CHECKPOINTED, 2)
    _assert_same_gradients(grads, reference)


def _peft_unet() -> torch.nn.Module:
    model = get_peft_model(_unet(), ConvAdapterConfig(modules_to_save=["segmentation_head"]))
    _perturb_trainable(model)
    return model.train()


PEFT_ENABLE = {
    "peft_model": lambda model: model.gradient_checkpointing_enable(),
    "base_model_reentrant": lambda model: model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": True}
    ),
}


@pytest.mark.parametrize("how", list(PEFT_ENABLE))
def test_checkpointing_through_a_peft_model(how):
    x, y = _batch(seed=3)
    reference = _peft_unet()
    model = copy.deepcopy(reference)
    reference_loss, reference_grads = _loss_and_grads(reference, x, y)
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert reference_grads.keys() == trainable and any("encoder.layer2" in n for n in trainable)
    assert all(grad.abs().sum() > 0 for grad in reference_grads.values())

    PEFT_ENABLE[how](model)
    base = model.get_base_model()
    assert base.is_activation_checkpointing
    counts = _count_calls(base, ENCODER_CHECKPOINTED + DECODER_CHECKPOINTED)
    loss, grads = _loss_and_grads(model, x, y)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    _assert_same_gradients(grads, reference_grads)  # the adapters inside checkpointed blocks get theirs too
    assert set(counts.values()) == {2}


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_trainer_step_with_gradient_checkpointing(tmp_path, wrap):
    model = _unet() if wrap == "plain" else _peft_unet()
    base = model if wrap == "plain" else model.get_base_model()
    counts = _count_calls(base, ["encoder.layer2", "decoder.blocks.0.conv1"])
    generator = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": torch.randint(0, 3, (32, 32))}
        for _ in range(4)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        gradient_checkpointing=True,
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate_segmentation)
    result = trainer.train()
    assert base.is_activation_checkpointing
    assert counts == {"encoder.layer2": 2, "decoder.blocks.0.conv1": 2}  # one step: forward, then recomputed
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def saved_activation_bytes(model, pixel_values: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes that autograd keeps for backward after one training forward: the tensors saved for backward, each
    storage once, parameters and buffers excluded. Tensors inside a (non-reentrant) checkpoint are not saved: the
    checkpoint keeps only its inputs, which it saves through the same hooks."""
    weights = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    return sum(saved.values())


def test_checkpointing_keeps_less_for_backward():
    x, y = _batch(size=(64, 64))
    plain = saved_activation_bytes(_unet(), x, y)
    model = _unet()
    model.gradient_checkpointing_enable()
    checkpointed = saved_activation_bytes(model, x, y)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)


# ----------------------------------------------------------------------------------------------------------------------
# pipeline("image-segmentation") for saved models
# ----------------------------------------------------------------------------------------------------------------------
ID2LABEL = {0: "sky", 1: "rock", 2: "soil"}
IMAGE = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 45, 3), dtype=np.uint8))  # 45 wide, 37 high


def _labelled(model):
    model.config.id2label = dict(ID2LABEL)
    model.config.label2id = {name: index for index, name in ID2LABEL.items()}
    return model


def _expected_segmentation(model, processor) -> torch.Tensor:
    """Argmax of the model's own logits, upsampled to the image size, on the processor's input."""
    pixel_values = processor(IMAGE, return_tensors="pt")["pixel_values"]
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    return F.interpolate(logits, size=(IMAGE.height, IMAGE.width), mode="bilinear", align_corners=False).argmax(1)[0]


def _check_pipeline(directory, model, **kwargs):
    """The pipeline of ``directory`` returns one mask per class of the model's own prediction, labelled with its
    ``id2label``, at the image size, equal to the argmax of the model's logits."""
    segmenter = pipeline("image-segmentation", model=str(directory), **kwargs)
    assert segmenter.image_processor.to_dict() == image_processor_for(model).to_dict()
    output = segmenter(IMAGE)
    expected = _expected_segmentation(model, segmenter.image_processor)
    classes = expected.unique().tolist()
    assert len(classes) >= 2  # a comparison that means something
    assert [segment["label"] for segment in output] == [ID2LABEL[c] for c in classes]
    for segment, index in zip(output, classes):
        assert segment["mask"].size == IMAGE.size and segment["mask"].mode == "L"
        np.testing.assert_array_equal(np.asarray(segment["mask"]), (expected == index).numpy().astype(np.uint8) * 255)
    return segmenter, expected


def _adapter_base(directory) -> str:
    with open(os.path.join(directory, "adapter_config.json")) as handle:
        return json.load(handle)["base_model_name_or_path"]


@pytest.mark.parametrize("family", ["unet", "sam"])
def test_pipeline_from_the_model_the_adapter_and_the_merged_directories(tmp_path, family):
    if family == "unet":
        model_class, make = UNetForSemanticSegmentation, lambda: make_unet("test_resnet")
        config = ConvAdapterConfig(modules_to_save=["segmentation_head"])
    else:
        model_class, make = SamForSemanticSegmentation, make_sam
        config = MoPEFTConfig.from_preset("lora")  # the mask decoder is trained in full (modules_to_save)
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"

    # (a) the model itself: save_pretrained writes the processor next to it
    base = _labelled(make())
    base.save_pretrained(base_dir)
    assert (base_dir / "preprocessor_config.json").is_file()
    _, base_segmentation = _check_pipeline(base_dir, base)

    # (b) the adapter directory: transformers loads the base named in adapter_config.json, then the adapter
    peft_model = get_peft_model(model_class.from_pretrained(base_dir), config)
    _perturb_trainable(peft_model)
    peft_model.save_pretrained(adapter_dir)
    assert _adapter_base(adapter_dir) == str(base_dir)
    segmenter, adapted = _check_pipeline(adapter_dir, peft_model)
    assert segmenter.model._hf_peft_config_loaded and list(segmenter.model.peft_config) == ["default"]
    assert not torch.equal(adapted, base_segmentation)  # the adapter changed the masks, and the pipeline has it

    # (c) the merged model
    merged = peft_model.merge_and_unload()
    assert type(merged) is model_class
    merged.save_pretrained(merged_dir)
    assert (merged_dir / "preprocessor_config.json").is_file()
    _check_pipeline(merged_dir, merged)


def test_sam_directory_with_sam_image_processor(tmp_path):
    model = _labelled(make_sam())
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    SamImageProcessor().save_pretrained(base_dir)  # as a SAM checkpoint from the Hub carries
    with pytest.raises(ValueError, match="Subtask None is not supported"):
        pipeline("image-segmentation", model=str(base_dir))(IMAGE)

    # An adapter over such a base: its own processor, passed to the pipeline.
    peft_model = get_peft_model(SamForSemanticSegmentation.from_pretrained(base_dir), MoPEFTConfig.from_preset("lora"))
    _perturb_trainable(peft_model)
    peft_model.save_pretrained(adapter_dir)
    processor = save_image_processor(peft_model, adapter_dir)
    assert isinstance(processor, SegformerImageProcessor) and (adapter_dir / "preprocessor_config.json").is_file()
    _check_pipeline(adapter_dir, peft_model, image_processor=str(adapter_dir))

    # Saving the model there again replaces the processor that cannot serve it.
    with pytest.warns(UserWarning, match="Replacing the SamImageProcessor"):
        model.save_pretrained(base_dir)
    with open(base_dir / "preprocessor_config.json") as handle:
        assert json.load(handle)["image_processor_type"] == "SegformerImageProcessor"
    _check_pipeline(base_dir, model)


def test_save_pretrained_keeps_a_fitting_processor_and_skips_non_rgb_models(tmp_path):
    custom = SegformerImageProcessor(do_resize=False, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1])
    custom.save_pretrained(tmp_path / "custom")  # e.g. the `processing_class` a Trainer saved there
    make_unet("test_resnet").save_pretrained(tmp_path / "custom")
    with open(tmp_path / "custom" / "preprocessor_config.json") as handle:
        assert json.load(handle)["image_mean"] == [0.1, 0.2, 0.3]

    grey = UNetForSemanticSegmentation(UNetConfig(encoder_name="test_resnet", in_channels=1, num_labels=2))
    grey.save_pretrained(tmp_path / "grey")
    assert sorted(os.listdir(tmp_path / "grey")) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match=r"`in_channels`=1: the image processor and the image-segmentation pipeline"):
        image_processor_for(grey)


IMAGENET = (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def test_processor_normalises_as_the_config_and_the_training_transform_say(tmp_path):
    blank = Image.new("L", IMAGE.size)
    # U-Net: ImageNet's by default, which is what SegmentationTransform() trains with
    for model_or_config in (make_unet("test_resnet"), UNetConfig(encoder_name="test_resnet", num_labels=3)):
        processor = image_processor_for(model_or_config)
        assert (list(processor.image_mean), list(processor.image_std)) == IMAGENET
        assert processor.do_resize is False
    # ... or what the config names, saved with it
    config = UNetConfig(
        encoder_name="test_resnet", num_labels=3, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
    )
    config.save_pretrained(tmp_path)
    config = UNetConfig.from_pretrained(tmp_path)
    assert (config.image_mean, config.image_std) == ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    pixel_values = image_processor_for(config)(IMAGE, return_tensors="pt")["pixel_values"][0]
    trained_on = SegmentationTransform(image_mean=config.image_mean, image_std=config.image_std)
    torch.testing.assert_close(
        pixel_values, trained_on({"image": IMAGE, "label": blank})["pixel_values"], atol=1e-5, rtol=0
    )
    # SAM: its own (ImageNet's) normalisation; no resize in the processor, the model resizes as in training
    processor = image_processor_for(tiny_sam_config())
    assert processor.do_resize is False and processor.size == {"height": 80, "width": 80}
    assert (list(processor.image_mean), list(processor.image_std)) == IMAGENET
    sam_config = tiny_sam_config()
    sam_config.image_mean, sam_config.image_std = [0.5] * 3, [0.5] * 3
    assert list(image_processor_for(sam_config).image_mean) == [0.5] * 3


def _sam_config(**attributes):
    config = tiny_sam_config()
    for name, value in attributes.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: image_processor_for(object()), TypeError, r"`model_or_config` must be a model of this package"),
        (lambda: image_processor_for(ViTConfig()), TypeError, r"`model_or_config` has a ViTConfig"),
        (lambda: UNetConfig(image_mean=[0.5, 0.5]), ValueError, r"`image_mean` must be None or 3 finite numbers"),
        (lambda: UNetConfig(image_std=[0.2, 0.0, 0.2]), ValueError, r"`image_std` must be None or 3 positive"),
        (
            lambda: image_processor_for(_sam_config(image_mean=[0.5])),
            ValueError,
            r"`config.image_mean` must be 3 finite",
        ),
    ],
)
def test_bad_processor_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_save_image_processor_warns_when_the_adapter_names_no_base(tmp_path):
    peft_model = get_peft_model(make_unet("test_resnet"), ConvAdapterConfig())  # built from a config: no base path
    peft_model.save_pretrained(tmp_path)
    assert not _adapter_base(tmp_path)
    with pytest.warns(UserWarning, match="names no `base_model_name_or_path`"):
        save_image_processor(peft_model, tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()


def test_save_pretrained_pushes_the_processor_with_the_model(tmp_path, monkeypatch):
    import transformers.image_processing_base
    import transformers.modeling_utils
    from transformers.utils.hub import PushToHubMixin

    hub = types.SimpleNamespace(create_repo=lambda repo_id, **_: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(transformers.modeling_utils, "hf_api", lambda: hub)
    monkeypatch.setattr(transformers.image_processing_base, "hf_api", lambda: hub)
    uploads = []

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        modified = [
            name
            for name in os.listdir(working_dir)
            if name not in files_timestamps
            or os.path.getmtime(os.path.join(working_dir, name)) > files_timestamps[name]
        ]
        uploads.append((repo_id, sorted(modified)))

    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    make_unet("test_resnet").save_pretrained(tmp_path / "unet", push_to_hub=True, repo_id="me/unet", token="t")
    uploaded = {name for repo_id, names in uploads for name in names if repo_id == "me/unet"}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= uploaded


def test_mask2former_processor_matches_the_instance_training_transform(tmp_path):
    from peft_vision_ext.data import InstanceSegmentationTransform

    from tiny_models import make_mask2former

    model = make_mask2former()
    processor = image_processor_for(model)
    assert type(processor).__name__ == "Mask2FormerImageProcessor" and processor.do_resize is False
    pixel_values = processor(IMAGE, return_tensors="pt")["pixel_values"][0]
    instance_map = np.zeros(IMAGE.size[::-1], dtype=np.int32)
    trained_on = InstanceSegmentationTransform()(
        {"image": IMAGE, "instance_map": instance_map, "instance_classes": []}
    )
    torch.testing.assert_close(pixel_values, trained_on["pixel_values"], atol=1e-5, rtol=0)
    save_image_processor(get_peft_model(model, peft_vision_ext.SeqAdapterConfig()), tmp_path)
    assert os.path.isfile(tmp_path / "preprocessor_config.json")

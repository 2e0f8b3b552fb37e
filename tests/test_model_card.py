# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Model cards of saved adapters: the pipeline tag follows the adapted model class, ``base_model`` is a Hub repo id or
absent (with a comment) for a local base, and the metadata is what the Hub accepts, checked offline (``ModelCard``'s
``validate()`` needs the network): the YAML parses, round-trips through ``ModelCardData`` and names Hub ids only."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from peft import get_peft_model

import peft_vision_ext  # noqa: F401
from peft_vision_ext import DeformableLoRAConfig, MoPEFTConfig, SeqAdapterConfig
from peft_vision_ext.hub import hub_model_id, pipeline_tag_for, update_model_card

from tiny_models import make_deformable_detr, make_sam, make_tiny_cnn


# Task ids of the Hub (https://huggingface.co/tasks, huggingface.js `PIPELINE_DATA`) that vision adapters may carry.
HUB_VISION_TASKS = {
    "depth-estimation",
    "image-classification",
    "image-feature-extraction",
    "image-segmentation",
    "mask-generation",
    "object-detection",
    "zero-shot-object-detection",
}
LOCAL_COMMENT = "<!-- base_model omitted:"


def make_deformable_detr_head():
    """The tiny Deformable DETR with its detection heads (2 decoder layers: transformers 5 cannot tie the per-layer
    heads of one)."""
    from transformers import DeformableDetrForObjectDetection

    config = make_deformable_detr().config
    config.decoder_layers = 2
    return DeformableDetrForObjectDetection(config).eval()


def _named(model, name_or_path: str):
    """The model as ``from_pretrained(name_or_path)`` would have named it."""
    model.config._name_or_path = name_or_path
    model.name_or_path = name_or_path
    return model


def _saved_card(tmp_path, model, config) -> tuple[dict, str]:
    directory = tmp_path / "adapter"
    get_peft_model(model, config).save_pretrained(directory)
    return check_hub_metadata(directory / "README.md"), (directory / "README.md").read_text()


def check_hub_metadata(path) -> dict:
    """The card's metadata, after the offline checks of the Hub's rules."""
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    front_matter = text.split("---\n")[1]
    metadata = metadata_load(path)
    assert metadata == yaml.safe_load(front_matter)
    assert ModelCardData(**metadata).to_dict() == metadata  # round trip, model-index included
    assert ModelCard.load(path).data.to_dict() == metadata
    assert metadata["library_name"] == "peft"
    if "base_model" in metadata:
        validate_repo_id(metadata["base_model"])
    for tag in metadata.get("tags", []):
        assert tag.strip() and isinstance(tag, str)
        if tag.startswith("base_model:"):
            validate_repo_id(tag.split(":", 2)[2])
    if "pipeline_tag" in metadata:
        assert metadata["pipeline_tag"] in HUB_VISION_TASKS
    if "model-index" in metadata:
        _, results = model_index_to_eval_results(metadata["model-index"])
        assert {result.task_type for result in results} == {metadata.get("pipeline_tag", "other")}
    return metadata


@pytest.mark.parametrize(
    "class_name, tag",
    [
        ("DeformableDetrForObjectDetection", "object-detection"),
        ("RTDetrForObjectDetection", "object-detection"),
        ("GroundingDinoForObjectDetection", "zero-shot-object-detection"),
        ("Mask2FormerForUniversalSegmentation", "image-segmentation"),
        ("SamForSemanticSegmentation", "image-segmentation"),  # this package's, by its name
        ("UNetForSemanticSegmentation", "image-segmentation"),
        ("SamModel", "mask-generation"),
        ("DeformableDetrModel", "image-feature-extraction"),
        ("Dinov2Model", "image-feature-extraction"),
        ("SwinBackbone", "image-feature-extraction"),
        ("Mask2FormerModel", None),  # a bare model of no known task: no tag rather than a wrong one
        ("TinyCNN", None),
        (None, None),
    ],
)
def test_pipeline_tag_for_model_classes(class_name, tag):
    assert pipeline_tag_for(class_name) == tag


@pytest.mark.parametrize(
    "name, expected",
    [
        ("facebook/sam-vit-base", "facebook/sam-vit-base"),
        ("bert-base-uncased", "bert-base-uncased"),
        ("/home/me/checkpoints/m2f", None),
        ("./m2f", None),
        ("~/m2f", None),
        ("C:\\models\\m2f", None),
        ("a/b/c", None),
        ("bad..name", None),
        ("", None),
        (None, None),
        ("/root/.cache/huggingface/hub/models--facebook--sam-vit-base/snapshots/0123abcd", "facebook/sam-vit-base"),
    ],
)
def test_hub_model_id(name, expected):
    assert hub_model_id(name) == expected


def test_hub_model_id_of_an_existing_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "m2f").mkdir(parents=True)
    assert hub_model_id("checkpoints/m2f") is None  # a valid repo id by its form, but a local directory


@pytest.mark.parametrize("config_cls", [DeformableLoRAConfig, SeqAdapterConfig])
def test_detection_head_card(tmp_path, config_cls):
    # a card left by an earlier save (with the old, hard-coded segmentation task) is corrected
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "README.md").write_text(
        "---\nlibrary_name: peft\npipeline_tag: image-segmentation\ntags:\n- image-segmentation\n---\nText\n"
    )
    model = _named(make_deformable_detr_head(), "SenseTime/deformable-detr")
    metadata, text = _saved_card(tmp_path, model, config_cls())
    assert metadata["pipeline_tag"] == "object-detection"
    assert "object-detection" in metadata["tags"] and "image-segmentation" not in metadata["tags"]
    assert metadata["base_model"] == "SenseTime/deformable-detr"
    assert "base_model:adapter:SenseTime/deformable-detr" in metadata["tags"]
    assert LOCAL_COMMENT not in text
    # the recipes' second call adds metrics (and the model-index task) without a config
    update_model_card(directory, method=config_cls().method_name, metrics={"map": 0.5}, dataset_name="rocks")
    metadata = check_hub_metadata(directory / "README.md")
    assert metadata["pipeline_tag"] == "object-detection"
    assert metadata["model-index"][0]["results"][0]["task"]["type"] == "object-detection"
    assert metadata["base_model"] == "SenseTime/deformable-detr"


def test_sam_semantic_card_from_a_local_base(tmp_path):
    local = tmp_path / "my-sam-checkpoint"
    local.mkdir()
    model = _named(make_sam(), str(local))
    metadata, text = _saved_card(tmp_path, model, MoPEFTConfig())
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert "base_model" not in metadata
    assert not any(tag.startswith("base_model:") for tag in metadata["tags"])
    assert text.count(LOCAL_COMMENT) == 1
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        local
    )
    # updating again keeps one comment
    update_model_card(tmp_path / "adapter", method="mopeft", metrics={"mean_iou": 0.7})
    assert (tmp_path / "adapter" / "README.md").read_text().count(LOCAL_COMMENT) == 1
    assert check_hub_metadata(tmp_path / "adapter" / "README.md")["pipeline_tag"] == "image-segmentation"


def test_bare_encoder_and_unknown_model_cards(tmp_path):
    metadata, _ = _saved_card(tmp_path / "encoder", make_deformable_detr(), SeqAdapterConfig(adapter_dim=4))
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert "image-segmentation" not in metadata["tags"]
    assert "base_model" not in metadata  # built from a config: no name, and no comment either
    from peft_vision_ext import ConvAdapterConfig

    metadata, text = _saved_card(tmp_path / "cnn", make_tiny_cnn(), ConvAdapterConfig())
    assert "pipeline_tag" not in metadata  # a plain nn.Module: its task is unknown
    assert "image-segmentation" not in metadata["tags"]
    assert LOCAL_COMMENT not in text


def test_task_from_the_base_models_config_json(tmp_path):
    # an adapter_config.json without peft's auto_mapping: the base checkpoint's architectures decide
    base = tmp_path / "rt-detr-local"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["RTDetrForObjectDetection"]}))
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    card = update_model_card(directory, method="deform_lora")
    assert card.data.pipeline_tag == "object-detection"
    metadata = check_hub_metadata(directory / "README.md")
    assert "base_model" not in metadata and LOCAL_COMMENT in card.text
    assert os.path.exists(directory / "README.md")

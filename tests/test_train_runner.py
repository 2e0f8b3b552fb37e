# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""`peft-vision train` end to end, offline: a folder dataset of odd-sized PNG/JPEG/16-bit TIFF images with palette
masks, checkpoints of each family saved with `save_pretrained` (a tiny U-Net, a plain transformers `SamModel`, a tiny
SegFormer), a few steps of each fitting method, the outputs reloaded in a fresh process, and every bad input refused
in one line before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from peft_vision_ext.cli import main as cli_main
from peft_vision_ext.data.fixed_size import FixedSizeSegmentationTransform
from peft_vision_ext.data.folders import find_image_mask_pairs, image_to_rgb8, mask_to_class_ids
from peft_vision_ext.train import main

from tiny_models import make_mask2former, make_unet, tiny_sam_config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ID2LABEL = {0: "soil", 1: "rock"}
# Index 0 black, 1 white (a palette colour unrelated to the class id), 255 grey: masks must keep the indices.
PALETTE = [0, 0, 0, 255, 255, 255] + [0, 0, 0] * 253 + [128, 128, 128]
SIZES = [(37, 45), (41, 33), (48, 40), (33, 39), (45, 37), (40, 44)]  # (height, width)
FAST = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "4",
    "--save_strategy",
    "no",
    "--seed",
    "0",
]


# ----------------------------------------------------------------------------------------------------------------------
# Data and checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright round rocks (class 1) on darker soil (class 0); the top two rows are ignored (255)."""
    yy, xx = np.mgrid[:height, :width]
    label = np.zeros((height, width), np.uint8)
    for _ in range(3):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(4, 10)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    label[:2] = 255
    gray = np.where(label == 1, 180.0, 60.0) + rng.normal(0, 20, (height, width))
    image = np.clip(gray, 0, 255).astype(np.uint8)[:, :, None].repeat(3, axis=2)
    image[:, :, 0] = np.clip(image[:, :, 0].astype(int) + 20, 0, 255)  # a little colour
    return image, label


def _palette_mask(label: np.ndarray) -> Image.Image:
    mask = Image.fromarray(label, mode="P")
    mask.putpalette(PALETTE)
    return mask


def write_split(directory: str, count: int, seed: int) -> None:
    """``count`` pairs cycling through RGB PNG, grayscale PNG, JPEG and 16-bit TIFF images; palette masks (one 8-bit
    grayscale mask per split, to cover both)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    os.makedirs(os.path.join(directory, "masks"), exist_ok=True)
    for index in range(count):
        height, width = SIZES[index % len(SIZES)]
        image, label = _scene(rng, height, width)
        stem = f"scene_{index:02d}"
        images = os.path.join(directory, "images", stem)
        kind = index % 4
        if kind == 0:
            Image.fromarray(image).save(images + ".png")
        elif kind == 1:
            Image.fromarray(image[:, :, 1]).save(images + ".png")  # grayscale
        elif kind == 2:
            Image.fromarray(image).save(images + ".jpg", quality=95)
        else:
            Image.fromarray(image[:, :, 1].astype(np.uint16) * 257).save(images + ".tif")  # 16-bit ("I;16")
        mask = Image.fromarray(label) if index == count - 1 else _palette_mask(label)
        mask.save(os.path.join(directory, "masks", stem + ".png"))


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """SAM initialises with std 1e-10 (made for loading checkpoints): give every tensor some signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def write_coco_split(directory: str, count: int, seed: int) -> None:
    """``count`` images with two objects each, categories 1 ("rock") and 3 ("boulder") (COCO ids need not be
    contiguous), as polygons, compressed RLE and uncompressed RLE, plus a crowd annotation that is skipped."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        height, width = SIZES[index % len(SIZES)]
        image = (60 + rng.integers(0, 20, (height, width, 3))).astype(np.uint8)
        yy, xx = np.mgrid[:height, :width]
        for k, category in enumerate((1, 3)):
            cy, cx, r = int(rng.integers(8, height - 8)), int(rng.integers(8, width - 8)), int(rng.integers(3, 7))
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            image[mask] = 200 - 60 * k
            if k == 1 and index % 3 == 1:
                segmentation = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation["counts"] = segmentation["counts"].decode("ascii")
            elif k == 1 and index % 3 == 2:
                flat = mask.flatten(order="F").astype(int)
                edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                segmentation = {"counts": np.diff(np.concatenate([[0], edges])).tolist(), "size": [height, width]}
            else:
                angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
                segmentation = [[float(v) for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": 100 + index, "category_id": category, "iscrowd": 0,
                 "segmentation": segmentation}
            )  # fmt: skip
        name = f"photo_{index:02d}." + ("png" if index % 2 == 0 else "jpg")
        Image.fromarray(image).save(os.path.join(directory, "images", name))
        images.append({"id": 100 + index, "file_name": name, "height": height, "width": width})
    crowd = {"counts": [0, SIZES[0][0] * SIZES[0][1]], "size": list(SIZES[0])}
    annotations.append({"id": 999, "image_id": 100, "category_id": 1, "iscrowd": 1, "segmentation": crowd})
    coco = {"images": images, "annotations": annotations}
    coco["categories"] = [{"id": 1, "name": "rock"}, {"id": 3, "name": "boulder"}]
    with open(os.path.join(directory, "annotations.json"), "w") as handle:
        json.dump(coco, handle)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: data folders, a saved dataset and the checkpoints (as a user has them on disk)."""
    import datasets
    from transformers import SamModel, SegformerConfig, SegformerForSemanticSegmentation

    root = tmp_path_factory.mktemp("train_runner")
    names = ("train", "val", "test", "unet", "sam", "segformer", "saved", "coco_train", "coco_val", "m2f")
    paths = {name: str(root / name) for name in names}
    write_split(paths["train"], 8, seed=0)
    write_split(paths["val"], 4, seed=1)
    write_split(paths["test"], 3, seed=2)
    make_unet("test_resnet").save_pretrained(paths["unet"])  # 3 classes: the runs replace the head (2 classes)
    torch.manual_seed(0)
    _perturb(SamModel(tiny_sam_config()), seed=0).save_pretrained(paths["sam"])  # a plain SamModel, like SAM's own
    segformer = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=5,
    )
    SegformerForSemanticSegmentation(segformer).save_pretrained(paths["segformer"])
    # A saved `datasets` dataset with its own column names and an id2label.json, as Hub datasets ship it.
    pairs = find_image_mask_pairs(paths["train"])
    saved = datasets.Dataset.from_dict({"pixels": pairs.images, "annotation": pairs.masks})
    saved = saved.cast_column("pixels", datasets.Image()).cast_column("annotation", datasets.Image())
    saved.save_to_disk(paths["saved"])
    with open(os.path.join(paths["saved"], "id2label.json"), "w") as handle:
        json.dump({str(k): v for k, v in ID2LABEL.items()}, handle)
    write_coco_split(paths["coco_train"], 6, seed=3)
    write_coco_split(paths["coco_val"], 3, seed=4)
    make_mask2former().save_pretrained(paths["m2f"])
    paths["root"] = str(root)
    return paths


def _run(args: list[str]) -> dict:
    """``main(args)``; the run must succeed. Returns its results.json."""
    code = main(args + FAST)
    assert code == 0
    output_dir = args[args.index("--output_dir") + 1]
    with open(os.path.join(output_dir, "results.json")) as handle:
        return json.load(handle)


def _id2label_arg() -> str:
    return json.dumps({str(k): v for k, v in ID2LABEL.items()})


@pytest.fixture(scope="module")
def unet_conv(ws):
    out = os.path.join(ws["root"], "out_unet_conv")
    results = _run(
        [
            "--model_name_or_path", ws["unet"], "--method", "conv_adapter",
            "--train_dir", ws["train"], "--validation_dir", ws["val"], "--test_dir", ws["test"],
            "--id2label", _id2label_arg(), "--output_dir", out, "--merge", "--rank_keep_fraction", "0.5",
        ]
    )  # fmt: skip
    return out, results


@pytest.fixture(scope="module")
def sam_lora(ws):
    out = os.path.join(ws["root"], "out_sam_lora")
    results = _run(
        [
            "--model_name_or_path", ws["sam"], "--method", "lora", "--r", "4", "--lora_alpha", "8",
            "--train_dir", ws["train"], "--validation_dir", ws["val"], "--id2label", '["soil", "rock"]',
            "--output_dir", out, "--merge",
        ]
    )  # fmt: skip
    return out, results


@pytest.fixture(scope="module")
def m2f_lora(ws):
    out = os.path.join(ws["root"], "out_m2f_lora")
    results = _run(
        [
            "--task", "instance", "--model_name_or_path", ws["m2f"], "--method", "deform_lora", "--r", "4",
            "--train_dir", ws["coco_train"], "--validation_dir", ws["coco_val"], "--output_dir", out, "--merge",
            "--per_device_train_batch_size", "3",
        ]
    )  # fmt: skip
    return out, results


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------
def test_conv_adapter_on_unet_writes_everything(ws, unet_conv):
    out, results = unet_conv
    assert results["method"] == "conv_adapter" and results["model_family"] == "unet"
    assert results["id2label"] == {"0": "soil", "1": "rock"} and results["id2label_from"] == "`--id2label`"
    for split in ("validation", "test"):
        assert set(results[split]["per_class_iou"]) == {"soil", "rock"}
        assert 0.0 <= results[split]["mean_iou"] <= 1.0
    assert results["data"] == {
        "source": os.path.normpath(ws["train"]),
        "train_samples": 8,
        "validation_samples": 4,
        "test_samples": 3,
        "validation_held_out": False,
    }
    assert 0 < results["trainable_percent"] < 100
    # the new 2-class head trains with the adapters (the checkpoint's head had 3 classes)
    assert results["peft_config"]["modules_to_save"] == ["segmentation_head"]
    assert results["peft_config"]["adapter_type"] == "conv"
    assert results["arguments"]["training"]["learning_rate"] == 1e-3  # the PEFT default, --learning_rate not given
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "preprocessor_config.json"} <= names
    assert {"results.json", "merged", "ranked"} <= names
    assert not [name for name in names if ".tmp-" in name or "staging" in name]
    card = open(os.path.join(out, "README.md")).read()
    assert "conv-adapter" in card and "iou_rock" in card and "mean_iou" in card
    processor = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert processor["size"] == {"height": 64, "width": 64} and results["image_size"] == 64  # 48 px rounded up
    ranked = results["ranked"]
    assert (
        0 < ranked["kept"] < ranked["kept"] + ranked["dropped"]
        and ranked["update_bytes"] < ranked["full_update_bytes"]
    )
    assert set(ranked["validation"]["per_class_iou"]) == {"soil", "rock"}
    merged = results["merged"]
    assert merged["merged"] and merged["class"] == "UNetForSemanticSegmentation"
    assert merged["max_abs_logit_difference"] < 1e-4
    assert merged["validation"]["mean_iou"] == pytest.approx(results["validation"]["mean_iou"], abs=1e-6)


def test_sam_checkpoint_with_lora_and_mopeft(ws, sam_lora):
    out, results = sam_lora
    assert results["model_class"] == "SamForSemanticSegmentation" and results["image_size"] == 80  # SAM's input
    assert results["peft_config"]["modules_to_save"] == ["mask_decoder"]
    assert results["merged"]["merged"] and results["merged"]["max_abs_logit_difference"] < 1e-4

    out = os.path.join(ws["root"], "out_sam_mopeft")
    # the config's fields from a file (as an adapter_config.json holds them); the command line overrides it
    peft_config = os.path.join(ws["root"], "mopeft.json")
    with open(peft_config, "w") as handle:
        json.dump(
            {
                "peft_type": "MOPEFT (IMPORT PEFT_VISION_EXT)",
                "prefix_length": 4,
                "adapter_dim": 32,
                "gate_hidden_size": 4,
            },
            handle,
        )
    results = _run(
        [
            "--model_name_or_path", ws["sam"], "--method", "mopeft", "--peft_config", peft_config,
            "--adapter_dim", "8", "--train_dir", ws["train"], "--output_dir", out, "--prune_calibration_batches", "1",
        ]
    )  # fmt: skip
    config = results["peft_config"]
    assert config["use_lora"] and config["use_prefix"] and config["use_adapter"] and config["gating"]
    assert config["prefix_length"] == 4 and config["gate_hidden_size"] == 4 and config["adapter_dim"] == 8
    assert results["pruned"]["calibration_images"] >= 1 and "validation_before" in results["pruned"]
    # no --validation_dir: a seeded share of the training folder is held out; no names: class_<id>
    assert results["data"]["validation_held_out"] and results["data"]["validation_samples"] == 1
    assert results["id2label"] == {"0": "class_0", "1": "class_1"} and results["id2label_from"] == "the masks"
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert saved["peft_type"].startswith("MOPEFT")


def test_bn_adapter_from_a_saved_dataset(ws):
    out = os.path.join(ws["root"], "out_bn")
    results = _run(
        [
            "--model_name_or_path", ws["unet"], "--method", "bn_adapter", "--dataset_name", ws["saved"],
            "--image_column", "pixels", "--label_column", "annotation", "--output_dir", out,
        ]
    )  # fmt: skip
    assert results["peft_config"]["adapter_type"] == "bn"
    assert results["id2label"] == {"0": "soil", "1": "rock"} and results["id2label_from"] == "the dataset"
    assert results["data"]["validation_held_out"] and results["data"]["train_samples"] == 7


def test_decoder_and_full_from_a_settings_file(ws, tmp_path, unet_conv):
    from transformers import AutoModelForSemanticSegmentation

    settings = {
        "model_name_or_path": ws["unet"],
        "method": "decoder",
        "train_dir": ws["train"],
        "validation_dir": ws["val"],
        "id2label": {"0": "soil", "1": "rock"},
        "output_dir": str(tmp_path / "ignored"),
        "learning_rate": 3e-4,
    }
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    decoder_out = str(tmp_path / "decoder")
    results = _run([str(path), "--output_dir", decoder_out])  # flags after the file override it
    assert results["method"] == "decoder" and results["peft_config"] is None
    assert results["arguments"]["training"]["learning_rate"] == 3e-4
    assert not os.path.exists(tmp_path / "ignored")
    assert 0 < results["trainable_percent"] < 100

    # over an earlier adapter run (--overwrite_output_dir): the adapter files go (transformers would load them in
    # place of the new model), the files this run does not write stay
    full_out = str(tmp_path / "full")
    shutil.copytree(unet_conv[0], full_out)
    open(os.path.join(full_out, "notes.txt"), "w").write("mine")
    results = _run(
        ["--model_name_or_path", ws["unet"], "--method", "full", "--train_dir", ws["train"], "--validation_dir",
         ws["val"], "--id2label", _id2label_arg(), "--output_dir", full_out, "--overwrite_output_dir"]
    )  # fmt: skip
    assert results["trainable_percent"] == pytest.approx(100.0) and "merged" not in results
    assert {"notes.txt", "config.json", "model.safetensors"} <= set(os.listdir(full_out))
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(os.listdir(full_out))
    for directory in (decoder_out, full_out):
        assert "adapter_config.json" not in os.listdir(directory)
        model = AutoModelForSemanticSegmentation.from_pretrained(directory)
        assert model.config.id2label == ID2LABEL
        assert "image-segmentation" in open(os.path.join(directory, "README.md")).read()


def test_conv_adapter_on_segformer(ws, tmp_path):
    """Any AutoModelForSemanticSegmentation checkpoint: the methods come from its structure, its head from the label
    count."""
    out = str(tmp_path / "segformer")
    id2label_file = tmp_path / "classes.json"  # --id2label as a file
    id2label_file.write_text(json.dumps(["soil", "rock"]))
    results = _run(
        ["--model_name_or_path", ws["segformer"], "--method", "conv_adapter", "--train_dir", ws["train"],
         "--validation_dir", ws["val"], "--id2label", str(id2label_file), "--output_dir", out, "--merge"]
    )  # fmt: skip
    assert results["model_family"] == "auto" and results["model_class"] == "SegformerForSemanticSegmentation"
    assert results["peft_config"]["modules_to_save"] == ["decode_head.classifier"]
    assert results["id2label"] == {"0": "soil", "1": "rock"}
    assert results["merged"]["max_abs_logit_difference"] < 1e-4


def test_instance_segmentation_on_coco(ws, m2f_lora, tmp_path):
    out, results = m2f_lora
    assert results["task"] == "instance" and results["model_class"] == "Mask2FormerForUniversalSegmentation"
    assert results["id2label"] == {"0": "rock", "1": "boulder"} and results["id2label_from"] == "the COCO categories"
    assert results["data"]["instances"] == {"train": 12, "validation": 6}  # the crowd annotation is skipped
    validation = results["validation"]
    assert set(validation["per_class_ap"]) == {"rock", "boulder"} and validation["num_targets"] == 6
    assert validation["map"] is not None and validation["loss"] > 0
    assert results["peft_config"]["modules_to_save"] == ["class_predictor"]
    assert results["merged"]["merged"] and results["merged"]["max_abs_logit_difference"] < 1e-4
    processor = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert processor["image_processor_type"] == "Mask2FormerImageProcessor" and processor["size"]["height"] == 64
    assert "ap_rock" in open(os.path.join(out, "README.md")).read()

    # sequential adapters; the annotation file named explicitly, its images found in its images/ folder
    seq_out = str(tmp_path / "seq")
    results = _run(
        ["--task", "instance", "--model_name_or_path", ws["m2f"], "--method", "seq_adapter", "--adapters_per_block",
         "1", "--adapter_dim", "8", "--train_annotations", os.path.join(ws["coco_train"], "annotations.json"),
         "--output_dir", seq_out]
    )  # fmt: skip
    assert results["peft_config"]["adapters_per_block"] == 1 and results["data"]["validation_held_out"]


def test_outputs_reload_in_a_fresh_process(ws, unet_conv, sam_lora, m2f_lora):
    """The adapters load with PeftModel.from_pretrained onto the checkpoints and reproduce the logged metric; the
    merged models load with from_pretrained and predict the same; load_trained does both."""
    script = textwrap.dedent(
        """
        import json, sys
        import torch, datasets
        import peft_vision_ext
        from peft import PeftModel
        from transformers import AutoModelForSemanticSegmentation
        from peft_vision_ext.analysis import evaluate_segmentation
        from peft_vision_ext.data import collate_segmentation
        from peft_vision_ext.data.fixed_size import FixedSizeSegmentationTransform
        from peft_vision_ext.data.folders import find_image_mask_pairs
        from peft_vision_ext.train import load_trained

        report = {}
        for name, out, base_dir in json.loads(sys.argv[1]):
            results = json.load(open(out + "/results.json"))
            id2label = {int(k): v for k, v in results["id2label"].items()}
            base = AutoModelForSemanticSegmentation.from_pretrained(
                base_dir, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                ignore_mismatched_sizes=True,
            )
            model = PeftModel.from_pretrained(base, out).eval()
            pairs = find_image_mask_pairs(sys.argv[2])
            transform = FixedSizeSegmentationTransform(
                results["image_size"], results["image_mean"], results["image_std"]
            )
            data = datasets.Dataset.from_dict({"image": pairs.images, "label": pairs.masks}).with_transform(transform)
            batch = results["arguments"]["training"]["per_device_eval_batch_size"]
            metrics = evaluate_segmentation(model, data, len(id2label), batch_size=batch, id2label=id2label)
            pixels = collate_segmentation([data[i] for i in range(len(data))])["pixel_values"]
            with torch.no_grad():
                logits = model(pixel_values=pixels).logits
                merged = AutoModelForSemanticSegmentation.from_pretrained(out + "/merged").eval()
                merged_logits = merged(pixel_values=pixels).logits
                loaded_logits = load_trained(out)(pixel_values=pixels).logits
            report[name] = {
                "mean_iou": metrics["mean_iou"],
                "logged_mean_iou": results["validation"]["mean_iou"],
                "merged_difference": (merged_logits - logits).abs().max().item(),
                "same_predictions": bool((merged_logits.argmax(1) == logits.argmax(1)).all()),
                "merged_labels": {str(k): v for k, v in merged.config.id2label.items()},
                "load_trained_difference": (loaded_logits - logits).abs().max().item(),
            }

        from torch.utils.data import DataLoader
        from transformers import Mask2FormerForUniversalSegmentation
        from peft_vision_ext.data import collate_instance_segmentation
        from peft_vision_ext.data.fixed_size import FixedSizeInstanceTransform
        from peft_vision_ext.metrics import evaluate_instance_segmentation
        from peft_vision_ext.train.instance_data import _coco_dataset
        from peft_vision_ext.data.coco import read_coco_instances

        out, base_dir, coco_val = json.loads(sys.argv[3])
        results = json.load(open(out + "/results.json"))
        id2label = {int(k): v for k, v in results["id2label"].items()}
        base = Mask2FormerForUniversalSegmentation.from_pretrained(
            base_dir, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True
        )
        model = PeftModel.from_pretrained(base, out).eval()
        transform = FixedSizeInstanceTransform(results["image_size"], results["image_mean"], results["image_std"])
        coco = read_coco_instances(coco_val + "/annotations.json", argument="validation")
        data = _coco_dataset(coco).with_transform(transform)
        batch = results["arguments"]["training"]["per_device_eval_batch_size"]
        loader = DataLoader(data, batch_size=batch, collate_fn=collate_instance_segmentation)
        ap = evaluate_instance_segmentation(model, loader, id2label)
        pixels = collate_instance_segmentation([data[i] for i in range(len(data))])["pixel_values"]
        with torch.no_grad():
            def flat(o):
                return torch.cat([o.masks_queries_logits.flatten(2), o.class_queries_logits], dim=-1)
            logits = flat(model(pixel_values=pixels))
            merged = Mask2FormerForUniversalSegmentation.from_pretrained(out + "/merged").eval()
            merged_logits = flat(merged(pixel_values=pixels))
            loaded_logits = flat(load_trained(out)(pixel_values=pixels))
        report["m2f"] = {
            "map": ap["map"],
            "logged_map": results["validation"]["map"],
            "merged_difference": (merged_logits - logits).abs().max().item(),
            "merged_labels": {str(k): v for k, v in merged.config.id2label.items()},
            "load_trained_difference": (loaded_logits - logits).abs().max().item(),
        }
        print(json.dumps(report))
        """
    )
    runs = [["unet", unet_conv[0], ws["unet"]], ["sam", sam_lora[0], ws["sam"]]]
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            json.dumps(runs),
            ws["val"],
            json.dumps([m2f_lora[0], ws["m2f"], ws["coco_val"]]),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for name in ("unet", "sam"):
        entry = report[name]
        assert entry["mean_iou"] == pytest.approx(entry["logged_mean_iou"], abs=1e-6), name
        assert entry["merged_difference"] < 1e-4 and entry["same_predictions"], name
        assert entry["merged_labels"] == {"0": "soil", "1": "rock"}, name
        assert entry["load_trained_difference"] == 0.0, name
    m2f = report["m2f"]  # mask AP of a 2-step model is no signal; its outputs equal the merged model's
    assert m2f["map"] == pytest.approx(m2f["logged_map"], abs=1e-6)
    assert m2f["merged_difference"] < 1e-4 and m2f["load_trained_difference"] == 0.0
    assert m2f["merged_labels"] == {"0": "rock", "1": "boulder"}


def test_module_entry_point_on_two_processes_on_the_embedded_data(ws, tmp_path):
    """`torchrun --nproc_per_node 2 -m peft_vision_ext.train` (the module entry point that `accelerate launch -m`
    runs too; on CPU accelerate's launcher would run one process), on the embedded rocks: DDP over two gloo
    processes, one set of outputs written by the main process."""
    out = str(tmp_path / "embedded")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [
        torchrun, "--nproc_per_node", "2", "--standalone", "-m", "peft_vision_ext.train", "--use_cpu", "true",
        "--model_name_or_path", ws["unet"], "--method",
        "conv_adapter", "--dataset_name", "embedded:rocks/mars", "--max_train_samples", "4", "--max_eval_samples",
        "2", "--image_size", "32", "--output_dir", out, *FAST,
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("| conv_adapter | validation |") == 1, "the main process prints the table once"
    assert "IoU sky" in completed.stdout
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["num_processes"] == 2
    assert (
        results["id2label"] == {"0": "ground", "1": "rock", "2": "sky"} and results["id2label_from"] == "the dataset"
    )
    assert results["data"]["test_samples"] == 2 and results["test"]["mean_iou"] is not None
    assert results["command"][:5] == ["peft-vision train", "--use_cpu", "true", "--model_name_or_path", ws["unet"]]


# ----------------------------------------------------------------------------------------------------------------------
# Reading images and masks
# ----------------------------------------------------------------------------------------------------------------------
def test_images_of_every_kind_become_rgb8(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 514]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I;16"
    rgb = image_to_rgb8(str(tmp_path / "deep.tif"))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, :, 0], np.round(values / 257.0).astype(np.uint8))  # by the dtype's max
    np.testing.assert_array_equal(rgb[:, :, 0], rgb[:, :, 2])
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(image_to_rgb8(Image.fromarray(gray)), gray[:, :, None].repeat(3, axis=2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    np.testing.assert_array_equal(image_to_rgb8(Image.fromarray(rgba, "RGBA"))[..., 0], 200)
    np.testing.assert_array_equal(image_to_rgb8(np.full((2, 2), 0.5, np.float32)), 128)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_to_rgb8(np.full((2, 2), 3.0, np.float32))


def test_masks_keep_class_ids(tmp_path):
    label = np.array([[0, 1, 255], [2, 1, 0]], dtype=np.uint8)
    _palette_mask(label).save(tmp_path / "palette.png")
    np.testing.assert_array_equal(mask_to_class_ids(str(tmp_path / "palette.png")), label)  # indices, not colours
    deep = np.array([[0, 300], [1000, 2]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(mask_to_class_ids(str(tmp_path / "deep.png")), deep)
    np.testing.assert_array_equal(mask_to_class_ids(Image.fromarray(label).convert("RGB")), label)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(ValueError, match="colour image"):
        mask_to_class_ids(Image.fromarray(colour))


def test_fixed_size_transform_pads_with_the_ignore_index():
    image = np.full((10, 14, 3), 100, np.uint8)
    label = np.ones((10, 14), np.int64)
    label[0, 0] = 7
    evaluation = FixedSizeSegmentationTransform(20)
    pixel_values, labels = evaluation.example(image, label)
    assert pixel_values.shape == (3, 20, 20) and labels.shape == (20, 20)
    assert set(labels.unique().tolist()) == {1, 7}  # nearest: ids never blend
    small = FixedSizeSegmentationTransform(20, train=True, min_scale=0.5, max_scale=0.5, seed=0)
    _, labels = small.example(image, label)
    assert (labels == 255).sum() == 20 * 20 - 10 * 10  # the 10x10 scaled image, padded with ignored pixels
    again = FixedSizeSegmentationTransform(20, train=True, min_scale=0.5, max_scale=0.5, seed=0)
    assert torch.equal(again.example(image, label)[1], labels)  # seeded


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, status 2, nothing written
# ----------------------------------------------------------------------------------------------------------------------
def _broken_copy(ws, tmp_path, change) -> str:
    directory = str(tmp_path / "broken")
    shutil.copytree(ws["train"], directory)
    change(directory)
    return directory


def _remove(*relative):
    return lambda d: [os.remove(os.path.join(d, r)) for r in relative]


def _write_id(value: int):
    def change(directory):
        path = os.path.join(directory, "masks", "scene_00.png")
        label = np.asarray(Image.open(path)).copy()
        label[5, 5] = value
        _palette_mask(label).save(path)

    return change


def _shrink_mask(directory):
    path = os.path.join(directory, "masks", "scene_04.png")
    Image.open(path).crop((0, 0, 20, 20)).save(path)


def _corrupt(relative: str, half: bool):
    def change(directory):
        path = os.path.join(directory, relative)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2] if half else b"\x89PNG\r\n\x1a\n not an image")

    return change


def _jpeg_mask(directory):
    Image.open(os.path.join(directory, "masks", "scene_00.png")).convert("L").save(
        os.path.join(directory, "masks", "scene_00.jpg")
    )
    os.remove(os.path.join(directory, "masks", "scene_00.png"))


BAD_DATA = [
    ("missing_folder", None, ["`--train_dir`", "does not exist"]),
    ("no_masks_folder", lambda d: shutil.rmtree(os.path.join(d, "masks")), ["no masks/ folder"]),
    ("image_without_mask", _remove("masks/scene_01.png", "masks/scene_02.png"), ["2 image(s) have no mask", "'scene_01', 'scene_02'"]),
    ("mask_without_image", _remove("images/scene_03.tif"), ["1 mask(s) have no image", "'scene_03'"]),
    ("id_outside_labels", _write_id(7), ["class ids outside `--id2label`", "7 (in 'scene_00.png')", "255"]),
    ("sizes_differ", _shrink_mask, ["differ in size", "scene_04.png (image 37x45, mask 20x20)"]),
    ("unreadable_image", _corrupt("images/scene_00.png", half=False), ["cannot be read", "scene_00.png"]),
    ("truncated_image", _corrupt("images/scene_02.jpg", half=True), ["cannot be read", "scene_02.jpg"]),
    ("unreadable_mask", _corrupt("masks/scene_05.png", half=False), ["mask(s) cannot be read", "scene_05.png"]),
    ("jpeg_mask", _jpeg_mask, ["masks must be lossless", "scene_00.jpg"]),
]  # fmt: skip


def _refused(args: list[str], capsys, output_dir: str) -> str:
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("peft-vision train: error: ")
    assert not os.path.exists(output_dir)
    return lines[0]


@pytest.mark.parametrize("name, change, expected", BAD_DATA, ids=[case[0] for case in BAD_DATA])
def test_bad_data_is_refused_in_one_line(ws, tmp_path, capsys, name, change, expected):
    train_dir = str(tmp_path / "absent") if change is None else _broken_copy(ws, tmp_path, change)
    out = str(tmp_path / "out")
    line = _refused(
        ["--model_name_or_path", ws["unet"], "--method", "conv_adapter", "--train_dir", train_dir, "--id2label",
         _id2label_arg(), "--output_dir", out],
        capsys,
        out,
    )  # fmt: skip
    for fragment in expected:
        assert fragment in line


BAD_SETTINGS = [
    ("method_does_not_suit_the_model", ["--method", "mopeft"], ["does not suit", "Methods for this model: conv_adapter, bn_adapter, decoder, full"]),
    ("method_does_not_suit_segformer", ["--model_name_or_path", "{segformer}", "--method", "lora"], ["has no ViT transformer blocks", "conv_adapter"]),
    ("unknown_method", ["--method", "dora"], ["`--method` 'dora'", "conv_adapter"]),
    ("bad_config_value", ["--r", "0", "--model_name_or_path", "{sam}", "--method", "lora"], ["--method lora", "`r`", "got 0"]),
    ("setting_of_another_method", ["--prefix_length", "3"], ["`--prefix_length` is not a setting of --method conv_adapter"]),
    ("merge_a_prefix_method", ["--model_name_or_path", "{sam}", "--method", "vpt", "--merge"], ["--method vpt does not merge"]),
    ("rank_without_conv_adapters", ["--method", "decoder", "--rank_keep_fraction", "0.5"], ["ranks conv adapters"]),
    ("missing_model", ["--model_name_or_path", "{root}/no_such_model"], ["`--model_name_or_path`", "does not exist"]),
    ("bad_id2label", ["--id2label", '{"0": "soil", "2": "rock"}'], ["without gaps", "[1]"]),
    ("ignore_index_is_a_class", ["--ignore_index", "1"], ["`--ignore_index` 1 is class 'rock'"]),
    ("unknown_flag", ["--bogus", "1"], ["unknown arguments ['--bogus', '1']"]),
    ("two_data_sources", ["--dataset_name", "embedded:rocks/mars"], ["give the training data once"]),
    ("coco_for_semantic", ["--train_annotations", "{root}/a.json"], ["`--train_annotations` holds COCO instance"]),
    ("peft_config_of_another_method", ["--peft_config", '{"peft_type": "CONV_ADAPTER (IMPORT PEFT_VISION_EXT)"}', "--model_name_or_path", "{sam}", "--method", "lora"], ["is a 'CONV_ADAPTER", "needs a MoPEFTConfig"]),
]  # fmt: skip


@pytest.mark.parametrize("name, changes, expected", BAD_SETTINGS, ids=[case[0] for case in BAD_SETTINGS])
def test_bad_settings_are_refused_in_one_line(ws, tmp_path, capsys, name, changes, expected):
    out = str(tmp_path / "out")
    args = {"--model_name_or_path": ws["unet"], "--method": "conv_adapter", "--train_dir": ws["train"]}
    args |= {"--id2label": _id2label_arg(), "--output_dir": out}
    extra = list(changes)
    for key, path in ws.items():
        extra = [value.replace("{" + key + "}", path) for value in extra]
    for flag in [value for value in extra if value in args]:
        index = extra.index(flag)
        args[flag] = extra[index + 1]
        del extra[index : index + 2]
    line = _refused([item for pair in args.items() for item in pair] + extra, capsys, out)
    for fragment in expected:
        assert fragment in line


def _edit_coco(change):
    def edit(directory):
        path = os.path.join(directory, "annotations.json")
        coco = json.load(open(path))
        change(coco)
        json.dump(coco, open(path, "w"))

    return edit


def _unknown_category(coco):
    coco["annotations"][0]["category_id"] = 7


def _wrong_size(coco):
    coco["images"][1]["width"] += 5


def _bad_polygon(coco):
    coco["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0]]


BAD_COCO = [
    ("image_missing", lambda d: os.remove(os.path.join(d, "images", "photo_01.jpg")), [], ["are not in", "'photo_01.jpg'"]),
    ("unknown_category", _edit_coco(_unknown_category), [], ["category the file does not define", "category_id 7"]),
    ("size_differs", _edit_coco(_wrong_size), [], ["differ in size from their COCO entry", "photo_01.jpg"]),
    ("bad_polygon", _edit_coco(_bad_polygon), [], ["unusable segmentations", "annotation 1"]),
    ("not_json", lambda d: open(os.path.join(d, "annotations.json"), "w").write("{"), [], ["not readable JSON"]),
    ("id2label_with_coco", None, ["--id2label", '["a", "b"]'], ["the categories name the classes"]),
    ("method_does_not_suit", None, ["--method", "conv_adapter"], ["Methods for this model: deform_lora, seq_adapter"]),
    ("semantic_task", None, ["--task", "semantic"], ["for --task instance; got --task semantic"]),
    ("merge_adapters", None, ["--method", "seq_adapter", "--merge", "true"], ["--method seq_adapter does not merge"]),
]  # fmt: skip


@pytest.mark.parametrize("name, change, extra, expected", BAD_COCO, ids=[case[0] for case in BAD_COCO])
def test_bad_coco_input_is_refused_in_one_line(ws, tmp_path, capsys, name, change, extra, expected):
    train_dir = ws["coco_train"]
    if change is not None:
        train_dir = str(tmp_path / "broken")
        shutil.copytree(ws["coco_train"], train_dir)
        change(train_dir)
    out = str(tmp_path / "out")
    args = {"--task": "instance", "--model_name_or_path": ws["m2f"], "--method": "deform_lora"}
    args |= {"--train_dir": train_dir, "--output_dir": out}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    line = _refused([item for pair in args.items() for item in pair], capsys, out)
    for fragment in expected:
        assert fragment in line


def test_non_empty_output_dir_needs_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["--model_name_or_path", ws["unet"], "--method", "conv_adapter", "--train_dir", ws["train"],
                 "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "`--overwrite_output_dir`" in err
    assert os.listdir(out) == ["notes.txt"]


def test_peft_vision_train_subcommand(ws, tmp_path, capsys):
    """`peft-vision train` is the same command (its own parser; listed in `peft-vision --help`)."""
    out = str(tmp_path / "out")
    code = cli_main(["train", "--model_name_or_path", ws["unet"], "--method", "conv_adapter", "--train_dir",
                     str(tmp_path / "absent"), "--output_dir", out])  # fmt: skip
    assert code == 2 and "peft-vision train: error: `--train_dir`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "train" in capsys.readouterr().out

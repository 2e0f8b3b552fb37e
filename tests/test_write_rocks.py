# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""`peft-vision write-rocks`: the embedded rock scenes written as a folder dataset that `peft-vision train` reads
(the command it prints runs as printed), palette masks holding the class ids, COCO instances for --task instance,
and bad input refused in one stderr line with exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from peft_vision_ext.cli import main as cli_main
from peft_vision_ext.data import (
    ROCK_INSTANCE_LABELS,
    ROCK_LABELS,
    load_rock_dataset,
    load_rock_instance_dataset,
    write_rock_folders,
)
from peft_vision_ext.data.coco import decode_instance_masks
from peft_vision_ext.data.folders import find_image_mask_pairs, mask_to_class_ids
from peft_vision_ext.data.rock_folders import ROCK_PALETTE
from peft_vision_ext.train.arguments import parse_train_args
from peft_vision_ext.train.data import load_semantic_splits, resolve_id2label
from peft_vision_ext.train.instance_data import load_instance_splits

from tiny_models import make_unet


SIZE = 64


def _write(capsys, out: str, *flags: str) -> list[str]:
    """Run ``peft-vision write-rocks out *flags``; it must succeed. Returns its stdout lines."""
    assert cli_main(["write-rocks", out, *flags]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out.splitlines()


def _command(lines: list[str], prefix: str, **fill: str) -> list[str]:
    """The `peft-vision train` command printed on the line starting with ``prefix``, placeholders filled, as argv
    after ``peft-vision``."""
    (line,) = [line for line in lines if line.startswith(prefix)]
    command = line[len(prefix) :].strip()
    for name, value in fill.items():
        command = command.replace(f"<{name}>", shlex.quote(value))
    argv = shlex.split(command)
    assert argv[:2] == ["peft-vision", "train"]
    return argv[1:]


@pytest.fixture(scope="module")
def rocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("write_rocks")
    out = str(root / "rocks")
    written = write_rock_folders(out, "mars", train=6, validation=3, test=2, image_size=SIZE, seed=3, instances=True)
    return root, out, written


def test_layout_and_scenes_match_the_embedded_data(rocks):
    _, out, written = rocks
    assert sorted(os.listdir(out)) == ["id2label.json", "instances", "test", "train", "validation"]
    assert written.counts == {"train": 6, "validation": 3, "test": 2}
    with open(os.path.join(out, "id2label.json")) as handle:
        assert json.load(handle) == {str(k): v for k, v in ROCK_LABELS.items()}
    for split, count in written.counts.items():
        pairs = find_image_mask_pairs(os.path.join(out, split))
        assert pairs.stems == [f"scene_{i:04d}" for i in range(count)]
        embedded = load_rock_dataset("mars", split, count, SIZE, seed=3)
        for index, (image_path, mask_path) in enumerate(zip(pairs.images, pairs.masks)):
            mask = Image.open(mask_path)
            assert mask.mode == "P" and mask.size == (SIZE, SIZE)
            palette = mask.getpalette()
            for class_id, colour in ROCK_PALETTE.items():
                assert tuple(palette[3 * class_id : 3 * class_id + 3]) == colour
            ids = mask_to_class_ids(mask_path)
            np.testing.assert_array_equal(ids, np.asarray(embedded[index]["label"]))  # the palette index is the id
            np.testing.assert_array_equal(np.asarray(Image.open(image_path)), np.asarray(embedded[index]["image"]))
    found = {int(i) for split in written.counts for p in find_image_mask_pairs(os.path.join(out, split)).masks
             for i in np.unique(mask_to_class_ids(p))}  # fmt: skip
    assert found <= set(ROCK_LABELS) and {0, 1} <= found
    assert not [name for name in os.listdir(os.path.dirname(out)) if name.startswith(".")]  # no temporary left


def test_semantic_splits_load_with_the_train_data_loader(rocks):
    root, out, written = rocks
    argv = shlex.split(written.train_command().replace("<", "").replace(">", ""))[2:]
    args = parse_train_args(argv)
    splits = load_semantic_splits(args.data, args.model, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (6, 3, 2)
    assert not splits.validation_held_out and splits.max_side == SIZE
    id2label, origin = resolve_id2label(args.data, splits, None)
    assert id2label == ROCK_LABELS and origin == "`--id2label`"
    # without --id2label the names come from the id2label.json above train/
    args.data.id2label = None
    splits = load_semantic_splits(args.data, args.model, seed=0)
    assert resolve_id2label(args.data, splits, None) == (ROCK_LABELS, "the dataset")


def test_printed_command_trains(tmp_path, capsys):
    """The command printed by write-rocks runs as printed (placeholders filled) for one step of a tiny U-Net."""
    out = str(tmp_path / "rocks")
    lines = _write(capsys, out, "--domain", "moon-real", "--train", "4", "--validation", "2", "--test", "0",
                   "--image_size", str(SIZE), "--format", "jpeg")  # fmt: skip
    assert lines[0] == f"train: 4 images + palette masks (moon-real, {SIZE}x{SIZE} JPEG, seed 0) -> {out}/train"
    assert lines[1].startswith("validation: 2 images") and not any(line.startswith("test:") for line in lines)
    assert lines[2] == f"classes: 0 ground, 1 rock, 2 sky -> {out}/id2label.json"
    assert not os.path.exists(os.path.join(out, "test")) and not os.path.exists(os.path.join(out, "instances"))
    assert sorted(os.listdir(os.path.join(out, "train", "images")))[0] == "scene_0000.jpg"
    assert sorted(os.listdir(os.path.join(out, "train", "masks")))[0] == "scene_0000.png"
    checkpoint, run = str(tmp_path / "unet"), str(tmp_path / "run")
    make_unet("test_resnet").save_pretrained(checkpoint)
    argv = _command(lines, "train on it:", checkpoint=checkpoint, method="conv_adapter", output_dir=run)
    assert "--test_dir" not in argv
    fast = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--seed", "0"]
    assert cli_main(argv + fast) == 0
    with open(os.path.join(run, "results.json")) as handle:
        results = json.load(handle)
    assert results["id2label"] == {str(k): v for k, v in ROCK_LABELS.items()}
    assert results["data"]["train_samples"] == 4 and results["data"]["validation_samples"] == 2
    assert results["image_size"] == SIZE


def test_instances_load_with_the_instance_loader(rocks):
    _, out, written = rocks
    argv = shlex.split(written.train_command("instance").replace("<", "").replace(">", ""))[2:]
    assert argv[:2] == ["--task", "instance"] and "--id2label" not in argv
    splits = load_instance_splits(parse_train_args(argv).data, seed=0)
    assert splits.id2label == ROCK_INSTANCE_LABELS and splits.id2label_origin == "the COCO categories"
    empty = 0
    for split, coco in written.instances.items():
        embedded = load_rock_instance_dataset("mars", split, written.counts[split], SIZE, seed=3)
        scenes = [i for i, classes in enumerate(embedded["instance_classes"]) if classes]  # the empty ones left out
        assert (coco.images, coco.empty) == (len(scenes), written.counts[split] - len(scenes))
        empty += coco.empty
        assert splits.instances[split] == sum(coco.per_class.values()) == sum(map(len, embedded["instance_classes"]))
        dataset = getattr(splits, split)
        assert len(dataset) == coco.images
        for row, index in zip(dataset, scenes):
            assert os.path.basename(row["image"]) == f"scene_{index:04d}.png"
            masks = decode_instance_masks(json.loads(row["segmentation"]), SIZE, SIZE)
            instance_map = np.asarray(embedded[index]["instance_map"])
            expected = np.stack([instance_map == k for k in range(1, len(row["classes"]) + 1)])
            np.testing.assert_array_equal(masks, expected)
            assert row["classes"] == embedded[index]["instance_classes"]
            image = np.asarray(Image.open(row["image"]))
            np.testing.assert_array_equal(image, np.asarray(embedded[index]["image"]))
    assert empty > 0  # this seed and size have scenes without a rock: they are left out, and the rest still loads


def test_non_empty_out_dir_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["write-rocks", str(out), "--domain", "source", "--train", "2", "--validation", "1", "--test", "0",
            "--image_size", "32"]  # fmt: skip
    assert cli_main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert "already exists and is not empty" in captured.err and "`--overwrite`" in captured.err
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["data"]

    lines = _write(capsys, str(out), *args[2:], "--overwrite")
    assert lines[0].startswith("train: 2 images")
    assert sorted(os.listdir(out)) == ["id2label.json", "train", "validation"]  # replaced as a whole
    assert sorted(os.listdir(tmp_path)) == ["data"]
    # an empty directory needs no --overwrite; --instances prints the instance files and their command
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _write(capsys, str(empty), *args[2:], "--instances")
    assert len(find_image_mask_pairs(empty / "train")) == 2
    assert [line.split(":")[0] for line in lines] == [
        "train", "validation", "classes", "instances train", "instances validation", "train on it",
        "instance segmentation",
    ]  # fmt: skip
    assert lines[3].endswith(f"-> {empty}/instances/train/annotations.json")
    argv = _command(lines, "instance segmentation:", checkpoint="m", method="lora", output_dir=str(tmp_path / "o"))
    assert argv[argv.index("--train_dir") + 1] == str(empty / "instances" / "train")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--domain", "venus"], "`--domain` 'venus' is not a rock domain; choose one of source, moon-real, mars"),
        (["--domain", "mars", "--train", "0"], "`--train` must be a number of images >= 1, got 0"),
        (["--domain", "mars", "--validation", "-1"], "`--validation` must be a number of images >= 0, got -1"),
        (["--domain", "mars", "--test", "-2"], "`--test` must be a number of images >= 0, got -2"),
        (["--domain", "mars", "--train", "1", "--validation", "0"], "needs at least 2; got `--train` 1"),
        (["--domain", "mars", "--image_size", "16"], "`--image_size` must be a side length in pixels from 32 to 4096"),
        (["--domain", "mars", "--image-size", "5000"], "from 32 to 4096, got 5000"),
        (["--domain", "mars", "--seed", "-1"], "`--seed` must be an integer >= 0, got -1"),
        (["--domain", "mars", "--format", "gif"], "`--format` 'gif' is not one of png, jpeg"),
        (["--domain", "mars", "--train", "many"], "argument --train: invalid int value: 'many'"),
        ([], "the following arguments are required: --domain"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, flags, expected):
    out = tmp_path / "rocks"
    try:
        code = cli_main(["write-rocks", str(out), *flags])
    except SystemExit as exc:  # argparse's own errors (a missing or non-integer flag)
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("peft-vision write-rocks: error: ")
    assert expected in captured.err
    assert os.listdir(tmp_path) == []  # nothing written


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "rocks"
    path.write_text("a file")
    assert cli_main(["write-rocks", str(path), "--domain", "mars", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is an existing file, not a directory" in err
    assert path.read_text() == "a file"


def test_instances_of_only_empty_scenes_are_refused(tmp_path, capsys):
    """Scene 0 of the training split has no rock at 32 px with seed 0: the COCO file would list no image."""
    args = ["write-rocks", str(tmp_path / "rocks"), "--domain", "source", "--train", "1", "--validation", "1",
            "--test", "0", "--image_size", "32", "--instances"]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "none of the 1 train scene(s) of 'source' at 32 px holds a rock" in err
    assert os.listdir(tmp_path) == []  # the temporary directory is gone, nothing in place
    lines = _write(capsys, *args[1:-1])  # without --instances the same scenes are written
    assert lines[0].startswith("train: 1 image + palette masks")

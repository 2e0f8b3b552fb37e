# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Data for ``peft-vision train --task semantic``: the splits from folders, a ``datasets`` source or the embedded
rock scenes; the label set; and the check of every mask before training.

Every source ends as ``datasets.Dataset`` splits with an ``image`` and a ``label`` column (paths, image records or
PIL images, read by :mod:`peft_vision_ext.data.folders`), transformed on the fly by
:class:`~peft_vision_ext.data.fixed_size.FixedSizeSegmentationTransform`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.folders import PairScan, find_image_mask_pairs, scan_pairs
from .arguments import UsageError
from .models import HUB_ID


logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# Defaults of the embedded rock scenes (how many to render; the render size when --image_size is not given).
EMBEDDED_TRAIN_SAMPLES = 80
EMBEDDED_EVAL_SAMPLES = 40
EMBEDDED_IMAGE_SIZE = 128
ANNOTATION_FLAGS = ("train_annotations", "validation_annotations", "test_annotations")
# Split names looked for in a `datasets` source, in order.
VALIDATION_SPLITS = ("validation", "valid", "val", "eval")
TEST_SPLITS = ("test",)
# Names transformers gives classes when a config names none ("LABEL_0", ...).
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")
# The largest default image size (see DataArguments.image_size).
MAX_DEFAULT_IMAGE_SIZE = 1024


@dataclass
class SemanticSplits:
    """The splits of one run (columns ``image`` and ``label``) and what the up-front check found in each."""

    train: Any  # datasets.Dataset
    validation: Any
    test: Any | None
    source: str  # what the data is, for the model card
    scans: dict[str, PairScan] = field(default_factory=dict)  # split description -> scan
    id2label: dict[int, str] | None = None  # names the source itself gives (embedded data, id2label.json)
    validation_held_out: bool = False

    @property
    def max_side(self) -> int:
        return max((scan.max_side for scan in self.scans.values()), default=0)


def check_data_args(data_args) -> None:
    """The data arguments that can be checked without reading anything."""
    instance = data_args.task == "instance"
    annotations = [f"--{name}" for name in ANNOTATION_FLAGS if getattr(data_args, name)]
    if annotations and not instance:
        raise UsageError(
            f"`{annotations[0]}` holds COCO instance annotations, for --task instance; with --task semantic, put "
            "class-id masks in masks/ beside images/."
        )
    files = data_args.train_dir or (instance and data_args.train_annotations)
    if bool(data_args.dataset_name) == bool(files):
        raise UsageError(
            "give the training data once: `--train_dir` (a folder with images/ and masks/; for --task instance the "
            "images of `--train_annotations`) or `--dataset_name` (a Hub id, a local dataset path or "
            f"embedded:rocks/<domain>); got {'both' if files else 'neither'}."
        )
    others = [f"--{name}" for name in ("validation_dir", "test_dir", *ANNOTATION_FLAGS) if getattr(data_args, name)]
    if data_args.dataset_name and others:
        raise UsageError(f"`{others[0]}` goes with `--train_dir`; a `--dataset_name` brings its own splits.")
    if data_args.validation_from_train:
        given = [f"--{name}" for name in ("validation_dir", "validation_annotations") if getattr(data_args, name)]
        if given:
            raise UsageError(
                f"`--validation_from_train` holds validation data out of the training data; `{given[0]}` gives "
                "validation data. Drop one of them."
            )
    fraction = data_args.validation_split_fraction
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(
            f"`--validation_split_fraction` must be in (0, 1), got {fraction!r}; 0.15 holds out 15% for validation."
        )
    for name in ("max_train_samples", "max_eval_samples", "image_size"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive number, got {value!r}.")
    if not 0 < data_args.min_scale <= data_args.max_scale:
        raise ValueError(
            f"`--min_scale` {data_args.min_scale!r} and `--max_scale` {data_args.max_scale!r} must satisfy "
            "0 < min_scale <= max_scale (e.g. 0.5 and 2.0)."
        )
    for name in ("hflip_prob", "vflip_prob"):
        if not 0 <= getattr(data_args, name) <= 1:
            raise ValueError(f"`--{name}` must be a probability in [0, 1], got {getattr(data_args, name)!r}.")
    for name in ("brightness", "contrast"):
        if not 0 <= getattr(data_args, name) < 1:
            raise ValueError(f"`--{name}` must be a jitter amplitude in [0, 1), got {getattr(data_args, name)!r}.")
    if data_args.ignore_index < 0:
        raise ValueError(
            f"`--ignore_index` must be >= 0 (a mask value), got {data_args.ignore_index}; 255 is the usual one."
        )


def subset(dataset, limit: int | None, seed: int):
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def hold_out(dataset, fraction: float, seed: int, argument: str):
    """``(train, validation)``: a seeded ``fraction`` of ``dataset`` (at least one example) held out."""
    if len(dataset) < 2:
        raise ValueError(
            f"{argument} holds {len(dataset)} example(s): holding out validation data needs at least 2. Add images, "
            "or pass validation data (`--validation_dir`)."
        )
    count = min(len(dataset) - 1, max(1, int(round(fraction * len(dataset)))))
    order = np.random.default_rng(seed).permutation(len(dataset))
    return dataset.select(sorted(order[count:].tolist())), dataset.select(sorted(order[:count].tolist()))


def _scan(dataset, argument: str, decode_images: bool) -> PairScan:
    """:func:`scan_pairs` over a split (images and masks read undecoded where ``datasets`` decodes them)."""
    import datasets

    for column in ("image", "label"):
        if isinstance(dataset.features.get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    logger.info("Checking %d image/mask pairs of %s", len(dataset), argument)
    names = dataset["name"] if "name" in dataset.column_names else [f"row {i}" for i in range(len(dataset))]
    return scan_pairs(dataset["image"], dataset["label"], names, argument=argument, decode_images=decode_images)


def _folder_splits(data_args, seed: int):
    import datasets

    splits, scans = {}, {}
    for split, name in (("train", "train_dir"), ("validation", "validation_dir"), ("test", "test_dir")):
        directory = getattr(data_args, name)
        if directory is None:
            continue
        pairs = find_image_mask_pairs(directory, argument=f"`--{name}`")
        splits[split] = datasets.Dataset.from_dict(
            {"image": pairs.images, "label": pairs.masks, "name": [os.path.basename(p) for p in pairs.masks]}
        )
    held_out = "validation" not in splits
    if held_out:
        splits["train"], splits["validation"] = hold_out(
            splits["train"], data_args.validation_split_fraction, seed, f"`--train_dir` {data_args.train_dir!r}"
        )
    splits["train"] = subset(splits["train"], data_args.max_train_samples, seed)
    for split in ("validation", "test"):
        if split in splits:
            splits[split] = subset(splits[split], data_args.max_eval_samples, seed)
    for split, name in (("train", "train_dir"), ("validation", "validation_dir"), ("test", "test_dir")):
        if split not in splits:
            continue
        if split == "validation" and held_out:
            argument = f"`--train_dir` {data_args.train_dir!r} (held out for validation)"
        else:
            argument = f"`--{name}` {getattr(data_args, name)!r}"
        scans[argument] = _scan(splits[split], argument, decode_images=True)
    source = os.path.normpath(data_args.train_dir)
    return SemanticSplits(
        splits["train"],
        splits["validation"],
        splits.get("test"),
        source,
        scans,
        _id2label_beside(source),
        validation_held_out=held_out,
    )


def _id2label_beside(train_dir: str) -> dict[int, str] | None:
    """The class names of a folder dataset: ``id2label.json`` in ``--train_dir`` or in the folder above it (where
    ``peft-vision write-rocks`` puts it, beside train/, validation/ and test/)."""
    for folder in (train_dir, os.path.dirname(os.path.abspath(train_dir))):
        path = os.path.join(folder, "id2label.json")
        if os.path.isfile(path):
            return parse_id2label(path, argument=f"{path!r}")
    return None


@functools.lru_cache(maxsize=16)
def embedded_split(collection: str, domain: str, split: str, count: int, size: int, seed: int):
    """One split of the embedded data, rendered once per process (recipes train many runs on the same scenes; the
    runner only derives new datasets from it: ``with_transform``, ``select``)."""
    from ..data import load_rock_dataset, load_rock_instance_dataset

    load = load_rock_dataset if collection == "rocks" else load_rock_instance_dataset
    return load(domain, split, count, size, seed=seed)


def embedded_splits(data_args, collection: str, seed: int) -> tuple[str, int, dict[str, Any], bool]:
    """``--dataset_name embedded:<collection>/<domain>`` (``rocks`` for --task semantic, ``rock_instances`` for
    instance): its domain, render size, rendered splits and whether validation was held out of train
    (``--validation_from_train``)."""
    from ..data import ROCK_DOMAINS

    spec = data_args.dataset_name[len(EMBEDDED_PREFIX) :]
    found, _, domain = spec.partition("/")
    if found != collection or domain not in ROCK_DOMAINS:
        task = "semantic" if collection == "rocks" else "instance"
        raise ValueError(
            f"`--dataset_name` {data_args.dataset_name!r}: the embedded data for --task {task} is "
            f"'embedded:{collection}/<domain>', with a domain from {', '.join(ROCK_DOMAINS)}."
        )
    size = data_args.image_size or EMBEDDED_IMAGE_SIZE
    counts = {
        "train": data_args.max_train_samples or EMBEDDED_TRAIN_SAMPLES,
        "validation": data_args.max_eval_samples or EMBEDDED_EVAL_SAMPLES,
        "test": data_args.max_eval_samples or EMBEDDED_EVAL_SAMPLES,
    }
    held_out = data_args.validation_from_train
    if held_out:
        del counts["validation"]
    splits = {split: embedded_split(collection, domain, split, count, size, seed) for split, count in counts.items()}
    if held_out:
        argument = f"`--dataset_name` {data_args.dataset_name!r}"
        splits["train"], splits["validation"] = hold_out(
            splits["train"], data_args.validation_split_fraction, seed, argument
        )
    return domain, size, splits, held_out


def _embedded_splits(data_args, seed: int):
    from ..data import ROCK_LABELS

    domain, _, splits, held_out = embedded_splits(data_args, "rocks", seed)
    scans = {}
    for split, dataset in splits.items():
        argument = f"`--dataset_name` {data_args.dataset_name!r} ({split}{', held out' if split == 'validation' and held_out else ''})"
        scans[argument] = _scan(dataset, argument, decode_images=False)
    return SemanticSplits(
        splits["train"],
        splits["validation"],
        splits["test"],
        f"peft-vision-ext rocks ({domain})",
        scans,
        dict(ROCK_LABELS),
        validation_held_out=held_out,
    )


def _load_dataset(data_args, model_args):
    import datasets

    name = data_args.dataset_name
    kwargs = {"cache_dir": model_args.cache_dir}
    if model_args.token is not None:
        kwargs["token"] = model_args.token
    try:
        if os.path.isdir(name) and any(
            os.path.isfile(os.path.join(name, marker)) for marker in ("dataset_dict.json", "state.json")
        ):
            loaded = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
            extension = os.path.splitext(name)[1].lower()
            if extension not in builder:
                raise ValueError(f"unsupported file type {extension!r}; use parquet, json, csv or arrow")
            loaded = datasets.load_dataset(builder[extension], data_files=name, **kwargs)
        elif not os.path.exists(name) and not HUB_ID.match(name):
            raise FileNotFoundError(f"{name!r} does not exist")
        else:
            loaded = datasets.load_dataset(name, data_args.dataset_config_name, **kwargs)
    except Exception as exc:  # datasets raises many types (offline, missing files, unknown formats): all mean "no"
        raise ValueError(
            f"`--dataset_name` {name!r}: cannot load it ({' '.join(str(exc).split())}). Pass a Hub dataset id, a "
            "local folder or file that datasets.load_dataset reads, or a folder that Dataset.save_to_disk wrote."
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _id2label_of_dataset(data_args, model_args) -> dict[int, str] | None:
    """The ``id2label.json`` a dataset ships (in its folder, or its Hub repo as the transformers example reads it)."""
    name = data_args.dataset_name
    path = os.path.join(name, "id2label.json") if os.path.isdir(name) else None
    if path is None and not os.path.exists(name):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, "id2label.json", repo_type="dataset", cache_dir=model_args.cache_dir)
        except Exception:  # offline, no such file, not a Hub id: the dataset gives no names
            path = None
    if path is None or not os.path.isfile(path):
        return None
    return parse_id2label(path, argument=f"{path!r}")


def _dataset_splits(data_args, model_args, seed: int):
    loaded = _load_dataset(data_args, model_args)
    name = data_args.dataset_name
    if "train" not in loaded:
        raise ValueError(f"`--dataset_name` {name!r} has no 'train' split; it has {sorted(loaded)}.")
    columns = loaded["train"].column_names
    for flag, column in (("--image_column", data_args.image_column), ("--label_column", data_args.label_column)):
        if column not in columns:
            raise ValueError(
                f"`{flag}` {column!r} is not a column of `--dataset_name` {name!r}; its columns are {columns}. Pass "
                f"`{flag}` with the column holding the {'images' if 'image' in flag else 'masks'}."
            )
    splits = {}
    for split, names in (("train", ("train",)), ("validation", VALIDATION_SPLITS), ("test", TEST_SPLITS)):
        found = next((loaded[n] for n in names if n in loaded), None)
        if found is not None:
            found = found.select_columns([data_args.image_column, data_args.label_column])
            mapping = {data_args.image_column: "image", data_args.label_column: "label"}
            found = found.rename_columns({old: new for old, new in mapping.items() if old != new})
            splits[split] = found
    if data_args.validation_from_train and "validation" in splits:
        logger.info("--validation_from_train: the validation split of %r is not used.", name)
        del splits["validation"]
    held_out = "validation" not in splits
    if held_out:
        splits["train"], splits["validation"] = hold_out(
            splits["train"], data_args.validation_split_fraction, seed, f"`--dataset_name` {name!r}"
        )
    splits["train"] = subset(splits["train"], data_args.max_train_samples, seed)
    for split in ("validation", "test"):
        if split in splits:
            splits[split] = subset(splits[split], data_args.max_eval_samples, seed)
    scans = {}
    for split, dataset in splits.items():
        argument = f"`--dataset_name` {name!r} ({split}{', held out' if split == 'validation' and held_out else ''})"
        scans[argument] = _scan(dataset, argument, decode_images=False)
    return SemanticSplits(
        splits["train"],
        splits["validation"],
        splits.get("test"),
        name,
        scans,
        _id2label_of_dataset(data_args, model_args),
        validation_held_out=held_out,
    )


def load_semantic_splits(data_args, model_args, seed: int) -> SemanticSplits:
    """The splits of ``--train_dir`` / ``--validation_dir`` / ``--test_dir``, or of ``--dataset_name``, each checked
    pair by pair (readable, image and mask of one size; the class ids present are recorded)."""
    check_data_args(data_args)
    if data_args.train_dir:
        return _folder_splits(data_args, seed)
    if data_args.dataset_name.startswith(EMBEDDED_PREFIX):
        return _embedded_splits(data_args, seed)
    return _dataset_splits(data_args, model_args, seed)


# ----------------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------------
def parse_id2label(value: Any, argument: str = "`--id2label`") -> dict[int, str]:
    """``{id: name}`` from a JSON object (``{"0": "soil"}``) or list (``["soil", "rock"]``), a .json file of one, or
    such an object itself (a settings file may hold it as JSON rather than text)."""
    if isinstance(value, (dict, list)):
        parsed = value
    else:
        text = value
        if not value.lstrip().startswith(("{", "[")):
            if not os.path.isfile(value):
                raise FileNotFoundError(
                    f"{argument} {value!r} is neither JSON nor an existing .json file. Pass e.g. "
                    '\'{"0": "background", "1": "rock"}\' or the path of a file holding that.'
                )
            with open(value, encoding="utf-8") as handle:
                text = handle.read()
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{argument} {value!r} is not valid JSON ({exc}).") from None
    if isinstance(parsed, list):
        parsed = dict(enumerate(parsed))
    if not isinstance(parsed, dict) or not parsed:
        raise ValueError(
            f"{argument} must be a non-empty JSON object of id -> name (or a list of names), got {parsed!r}."
        )
    out = {}
    for key, name in parsed.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{argument} keys must be class ids (0, 1, ...), got {key!r}.") from None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{argument} names must be non-empty strings, got {name!r} for class {class_id}.")
        out[class_id] = name
    return dict(sorted(out.items()))


def _is_named(id2label: Any) -> bool:
    return bool(id2label) and not all(_DEFAULT_LABEL.match(str(name)) for name in id2label.values())


def resolve_id2label(data_args, splits: SemanticSplits, checkpoint_config: Any) -> tuple[dict[int, str], str]:
    """The run's label set and where it came from (``--id2label``, the data, the checkpoint, or ``class_<id>`` for
    every id found), checked against the masks: every id in them must be a class or the ignore index.

    Raises:
        ValueError: gaps in the ids, duplicate names, the ignore index among the classes, fewer than two classes, or
            masks holding ids outside the label set (naming a few masks per id).
    """
    ignore_index = data_args.ignore_index
    found = sorted({class_id for scan in splits.scans.values() for class_id in scan.class_ids} - {ignore_index})
    if data_args.id2label is not None:
        id2label, origin = parse_id2label(data_args.id2label), "`--id2label`"
    elif splits.id2label is not None:
        id2label, origin = splits.id2label, "the dataset"
    elif (
        _is_named(getattr(checkpoint_config, "id2label", None))
        and found
        and found[-1] < len(checkpoint_config.id2label)
    ):
        id2label = {int(k): v for k, v in sorted(checkpoint_config.id2label.items(), key=lambda kv: int(kv[0]))}
        origin = "the checkpoint"
    else:
        if not found:
            raise ValueError(
                f"The masks hold no class id besides the ignore index {ignore_index}: there is nothing to learn. Check "
                "the masks, or `--ignore_index`."
            )
        id2label, origin = {class_id: f"class_{class_id}" for class_id in range(found[-1] + 1)}, "the masks"
        logger.warning(
            "No class names given (--id2label): the %d classes are named class_0 ... class_%d.",
            len(id2label),
            len(id2label) - 1,
        )
    what = origin if origin != "the masks" else "The classes found in the masks"
    gaps = sorted(set(range(max(id2label) + 1)) - set(id2label))
    if gaps or min(id2label) < 0:
        raise ValueError(
            f"{what} must number the classes 0 to {max(id2label)} without gaps; class ids {gaps[:10]} have no "
            'name. Name every class, e.g. \'{"0": "background", "1": "rock"}\'.'
        )
    names = list(id2label.values())
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what} gives several classes the same name: {duplicates}. Give each class its own name.")
    if ignore_index in id2label:
        raise ValueError(
            f"`--ignore_index` {ignore_index} is class {id2label[ignore_index]!r} of {origin}; the ignore index must "
            "not be a class. Pass another `--ignore_index`."
        )
    if len(id2label) < 2:
        raise ValueError(
            f"{what} name(s) one class ({names}); segmentation needs at least two, e.g. background and foreground: "
            '\'{"0": "background", "1": "rock"}\'.'
        )
    for argument, scan in splits.scans.items():
        outside = sorted(set(scan.class_ids) - set(id2label) - {ignore_index})
        if outside:
            shown = "; ".join(f"{i} (in {', '.join(repr(n) for n in scan.class_ids[i])})" for i in outside[:5])
            raise ValueError(
                f"{argument}: masks hold class ids outside {origin} (0-{len(id2label) - 1}) and `--ignore_index` "
                f"{ignore_index}: {shown}{' ...' if len(outside) > 5 else ''}. Name those classes in `--id2label`, or "
                f"set those pixels to {ignore_index}."
            )
    return id2label, origin


def default_image_size(family: str, config: Any, splits: SemanticSplits) -> int:
    """SAM's encoder input size; otherwise the largest image side of the data rounded up to a multiple of 32, at
    most :data:`MAX_DEFAULT_IMAGE_SIZE`."""
    if family == "sam":
        return int(config.vision_config.image_size)
    side = max(splits.max_side, 32)
    return min(MAX_DEFAULT_IMAGE_SIZE, 32 * math.ceil(side / 32))

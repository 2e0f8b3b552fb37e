# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The arguments of ``peft-vision train``: four dataclasses parsed by ``HfArgumentParser`` with ``TrainingArguments``,
as in the transformers examples, plus one generated from our PEFT configs.

:class:`PeftSettings` is not written by hand: it has one optional field per field of ``ConvAdapterConfig``,
``MoPEFTConfig``, ``DeformableLoRAConfig`` and ``SeqAdapterConfig`` that a user sets (``--r 4``,
``--adapter_dim 32``, ``--modules_to_save head``, ``--projection_ranks '{"value_proj": 4}'``), with the config's own
help text. Fields left at ``None`` are not passed, so the config's defaults apply; the values are checked by the
config itself. A new config field appears on the command line by itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from transformers import HfArgumentParser, TrainingArguments

from ..tuners import ConvAdapterConfig, DeformableLoRAConfig, MoPEFTConfig, SeqAdapterConfig
from ..tuners.mopeft import MOPEFT_PRESETS


# ----------------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------------
PEFT_METHOD_CONFIGS: dict[str, type] = {
    "conv_adapter": ConvAdapterConfig,
    "bn_adapter": ConvAdapterConfig,
    **{preset: MoPEFTConfig for preset in MOPEFT_PRESETS},
    "deform_lora": DeformableLoRAConfig,
    "seq_adapter": SeqAdapterConfig,
    "deform_lora+seq_adapter": DeformableLoRAConfig,
}
"""Each PEFT method of the runner and the config class that builds it."""

METHODS: tuple[str, ...] = (*PEFT_METHOD_CONFIGS, "decoder", "full")
"""Every ``--method``: the PEFT methods, decoder-only tuning (the encoder frozen) and full fine-tuning."""

# Learning rates used when `--learning_rate` is not given (TrainingArguments' 5e-5 suits full fine-tuning of a
# pretrained model; zero-initialised adapters and a fresh head need larger steps).
DEFAULT_LEARNING_RATES: dict[str, float] = {**dict.fromkeys(PEFT_METHOD_CONFIGS, 1e-3), "decoder": 1e-4, "full": 5e-5}

# Config fields that tools set, not users: the method picks `adapter_type`; injection and pruning fill the rest.
_TOOL_FIELDS = frozenset({"adapter_type", "auto_target_modules", "pruned", "frozen_gates"})


# ----------------------------------------------------------------------------------------------------------------------
# The dataclasses
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "Required. A Hub model id or a local directory written by save_pretrained: a SAM checkpoint "
                "(SamModel, e.g. facebook/sam-vit-base), a peft-vision-ext U-Net, any "
                "AutoModelForSemanticSegmentation checkpoint (SegFormer, ...) for --task semantic; a Mask2Former for "
                "--task instance. Its head is replaced by one for the data's label set."
            )
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models or data (default: the logged-in one)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model and dataset code from the Hub to run (only for repos you trust)."},
    )


@dataclass
class DataArguments:
    """Which images and masks to train on, and how to feed them."""

    task: Literal["semantic", "instance"] = field(
        default="semantic",
        metadata={
            "help": "'semantic': one class per pixel (masks of class ids). 'instance': Mask2Former + COCO json."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": (
                "A Hub dataset id or a local path that datasets.load_dataset reads (a folder of parquet files, an "
                "imagefolder, a parquet file) or that Dataset.save_to_disk wrote; or 'embedded:rocks/<domain>' for "
                "the embedded procedural rock scenes, 'embedded:rock_instances/<domain>' for --task instance (no "
                "download; domains: source, moon-real, mars, moon-highsun, moon-boulders). Alternative to --train_dir."
            )
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    image_column: str = field(default="image", metadata={"help": "Column of --dataset_name holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column of --dataset_name holding the masks."})
    train_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "A folder holding images/ and masks/, paired by file stem (images/a.jpg with masks/a.png). Images: "
                "PNG, JPEG, TIFF (RGB, grayscale, 16-bit); masks: class ids in an 8/16-bit or palette PNG/TIFF. For "
                "--task instance: the folder of the images of --train_annotations."
            )
        },
    )
    validation_dir: str | None = field(
        default=None,
        metadata={
            "help": "Validation folder (images/ + masks/). Without it, --validation_split_fraction is held out."
        },
    )
    test_dir: str | None = field(
        default=None,
        metadata={"help": "Test folder (as --validation_dir), evaluated once after training."},
    )
    train_annotations: str | None = field(
        default=None,
        metadata={
            "help": (
                "--task instance: the COCO instances JSON of the training images (polygons or RLE), whose file_names "
                "are looked up in --train_dir (default: the JSON's folder) and its images/ subfolder. Default: "
                "<train_dir>/annotations.json, or the one .json file in --train_dir."
            )
        },
    )
    validation_annotations: str | None = field(
        default=None, metadata={"help": "--task instance: the COCO instances JSON of the validation images."}
    )
    test_annotations: str | None = field(
        default=None, metadata={"help": "--task instance: the COCO instances JSON of the test images."}
    )
    id2label: str | None = field(
        default=None,
        metadata={
            "help": (
                'Class names: a JSON object {"0": "background", "1": "rock"} or list ["background", "rock"], or the '
                "path of a .json file holding one. Default: the data's id2label.json (in the --dataset_name folder "
                "or Hub repo; in --train_dir or the folder above it), else the checkpoint's names when they fit, "
                "else class_<id> for every id found in the masks."
            )
        },
    )
    ignore_index: int = field(
        default=255, metadata={"help": "Mask value of pixels that are not scored and not learned (default 255)."}
    )
    validation_split_fraction: float = field(
        default=0.15,
        metadata={"help": "Share of the training data held out for validation when there is no validation data."},
    )
    validation_from_train: bool = field(
        default=False,
        metadata={
            "help": (
                "Hold out --validation_split_fraction of the training data for validation even when the data brings "
                "a validation split (which is then not used); e.g. to choose a learning rate on data carved from a "
                "small training set. Not with --validation_dir / --validation_annotations."
            )
        },
    )
    data_split_seed: int | None = field(
        default=None,
        metadata={
            "help": (
                "Seed of the held-out validation split, of --max_*_samples' subsets and of the embedded scenes "
                "(default: --seed). Fix it to train several seeds on the same split."
            )
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many training images (for the embedded data: how many to render, 80)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many validation and test images (embedded data: how many, 40)."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": (
                "Side of the square images the model sees in training (random scale-crop) and evaluation (resize). "
                "Default: SAM's encoder input size; otherwise the largest image side of the training data, rounded up "
                "to a multiple of 32 and capped at 1024."
            )
        },
    )
    augment: bool = field(
        default=True,
        metadata={"help": "Training-time augmentation: random scale-crop, flips, brightness/contrast jitter."},
    )
    min_scale: float = field(default=0.5, metadata={"help": "Smallest random scale of the training scale-crop."})
    max_scale: float = field(default=2.0, metadata={"help": "Largest random scale of the training scale-crop."})
    hflip_prob: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip in training."})
    vflip_prob: float = field(
        default=0.0, metadata={"help": "Probability of a vertical flip in training (e.g. 0.5 for aerial images)."}
    )
    brightness: float = field(default=0.1, metadata={"help": "Brightness jitter amplitude in training, in [0, 1)."})
    contrast: float = field(default=0.1, metadata={"help": "Contrast jitter amplitude in training, in [0, 1)."})


@dataclass
class MethodArguments:
    """How to adapt the model, and what to do with the result."""

    method: str | None = field(
        default=None,
        metadata={
            "help": (
                "Required. One of: "
                + ", ".join(METHODS)
                + ". conv_adapter/bn_adapter: U-Nets and CNNs (fusable); mopeft, lora, vpt, vpt_deep, adapter: SAM "
                "and ViT encoders; deform_lora, seq_adapter, deform_lora+seq_adapter: Mask2Former/DETR family; "
                "decoder: freeze the encoder; full: train everything."
            )
        },
    )
    peft_config: str | None = field(
        default=None,
        metadata={
            "help": (
                "A .json file (or a JSON object) with fields of the method's config (e.g. an adapter_config.json); "
                "settings given on the command line override it."
            )
        },
    )
    merge: bool = field(
        default=False,
        metadata={
            "help": (
                "Also save the merged model (adapters folded into the weights; loads with from_pretrained) to "
                "<output_dir>/merged. For conv_adapter, bn_adapter, lora, deform_lora, and mopeft after pruning."
            )
        },
    )
    prune_calibration_batches: int = field(
        default=0,
        metadata={
            "help": (
                "mopeft only: after training, prune sub-methods whose gates stay below --prune_threshold on this many "
                "batches of training images (evaluation transform), then evaluate and save the pruned adapter."
            )
        },
    )
    prune_threshold: float = field(default=0.05, metadata={"help": "Gate value below which pruning drops a part."})
    prune_freeze_gates: bool = field(
        default=True, metadata={"help": "Pruning also fixes near-constant gates, so that gated LoRA merges."}
    )
    prune_freeze_tolerance: float = field(
        default=0.02, metadata={"help": "Largest gate range over the calibration images that counts as constant."}
    )
    rank_keep_fraction: float | None = field(
        default=None,
        metadata={
            "help": (
                "conv_adapter/bn_adapter only: rank the adapters, export the top fraction (0, 1] to <output_dir>/ranked "
                "and evaluate it reloaded onto the checkpoint."
            )
        },
    )
    rank_score: Literal["z", "rms", "relative"] = field(
        default="z", metadata={"help": "Ranking score for --rank_keep_fraction: z (seed's), rms or relative."}
    )


# Settings given as JSON text on the command line (dict fields such as projection_ranks).
JSON_SETTINGS: set[str] = set()


def _settings_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """One optional field per user-settable field of our configs (see the module docstring)."""
    from peft import PeftConfig

    base = {f.name for f in dataclasses.fields(PeftConfig)}
    collected: dict[str, dict[str, Any]] = {}
    for config_cls in dict.fromkeys(PEFT_METHOD_CONFIGS.values()):
        hints = typing.get_type_hints(config_cls)
        for config_field in dataclasses.fields(config_cls):
            name = config_field.name
            if name in base or name in _TOOL_FIELDS:
                continue
            entry = collected.setdefault(name, {"hint": hints[name], "help": config_field.metadata.get("help", "")})
            entry.setdefault("configs", []).append(config_cls.__name__)
    fields = []
    for name, entry in collected.items():
        arg_type, parse = _cli_type(entry["hint"])
        help_text = f"{entry['help']} [{', '.join(entry['configs'])}]" + (" (JSON)" if parse == "json" else "")
        if parse == "json":
            JSON_SETTINGS.add(name)
        fields.append((name, arg_type | None, field(default=None, metadata={"help": help_text})))
    return fields


def _cli_type(hint: Any) -> tuple[type, str]:
    """The command-line type of a config field's type hint, and how its value is read (``"plain"``/``"json"``)."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    origin = typing.get_origin(hint)
    if hint in (int, float, bool, str):
        return hint, "plain"
    if origin is Literal:
        return str, "plain"
    if origin is list or any(typing.get_origin(arg) is list for arg in args):
        return list[str], "plain"  # e.g. target_modules, modules_to_save, lora_targets
    if len(args) == 1 and args[0] in (int, float, bool, str):
        return args[0], "plain"
    return str, "json"  # dicts such as projection_ranks


PeftSettings = dataclasses.make_dataclass("PeftSettings", _settings_fields())
PeftSettings.__doc__ = (
    "Fields of the PEFT configs, settable on the command line (generated; see the module docstring). Each applies to "
    "the methods whose config has it."
)
PeftSettings.__module__ = __name__


# ----------------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------------
OVERWRITE_OUTPUT_DIR = "--overwrite_output_dir"
_OVERWRITE_HELP = (
    "Write into a non-empty --output_dir: the files and folders this run writes replace those there. Without it a "
    "non-empty --output_dir is refused."
)


class RunnerTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose pickled form (Trainer's ``training_args.bin``, saved beside the model and uploaded
    by ``--push_to_hub``) holds no Hub token: ``--hub_token`` is used, never written."""

    def __getstate__(self):
        state = dict(self.__dict__)
        if state.get("hub_token"):
            state["hub_token"] = "<hidden>"
        return state


class UsageError(ValueError):
    """A bad command line; the runner prints it as one ``error:`` line and exits with status 2."""


class TrainArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors raise :class:`UsageError` (one line) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class ParsedArguments:
    """The parsed dataclasses, the overwrite flag and the names of the settings the user gave explicitly."""

    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    settings: Any  # PeftSettings
    training: TrainingArguments
    overwrite_output_dir: bool
    given: frozenset[str]

    def peft_settings(self) -> dict[str, Any]:
        """The PEFT config settings given on the command line (JSON ones decoded)."""
        out = {}
        for settings_field in dataclasses.fields(self.settings):
            value = getattr(self.settings, settings_field.name)
            if value is None:
                continue
            if settings_field.name in JSON_SETTINGS and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise UsageError(
                        f"`--{settings_field.name}` must be JSON, e.g. '{{\"value_proj\": 4}}', got {value!r} ({exc})."
                    ) from None
            out[settings_field.name] = value
        return out


def build_parser() -> TrainArgumentParser:
    parser = TrainArgumentParser(
        (ModelArguments, DataArguments, MethodArguments, PeftSettings, RunnerTrainingArguments),
        prog="peft-vision train",
        description=(
            "Fine-tune a segmentation checkpoint on your images with a PEFT method. Arguments as flags, or a .json "
            "settings file (optionally followed by flags that override it)."
        ),
    )
    if not any(f.name == "overwrite_output_dir" for f in dataclasses.fields(TrainingArguments)):
        parser.add_argument(OVERWRITE_OUTPUT_DIR, action="store_true", help=_OVERWRITE_HELP)
    return parser


def _flag_names(argv: list[str]) -> set[str]:
    names = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


def parse_train_args(argv: list[str] | None = None) -> ParsedArguments:
    """Parse ``peft-vision train``'s arguments: flags, or a ``.json`` settings file followed by optional flags that
    override its values. Raises :class:`UsageError` for a bad command line (unknown flag, bad value, unknown key in the
    settings file, missing ``--model_name_or_path``, ``--method`` or ``--output_dir``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = None
    if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        path, argv = argv[0], argv[1:]
        if not os.path.isfile(path):
            raise UsageError(f"settings file {path!r} does not exist; pass the path of a .json settings file.")
        try:
            with open(path, encoding="utf-8") as handle:
                settings = json.load(handle)
        except (OSError, ValueError) as exc:
            raise UsageError(f"settings file {path!r} is not readable JSON ({' '.join(str(exc).split())}).") from None
        return _parse(settings, argv, f"settings file {path!r}")
    return _parse(None, argv, "")


def train_args_from_dict(settings: dict[str, Any], argv: list[str] | tuple[str, ...] = ()) -> ParsedArguments:
    """:func:`parse_train_args` of a settings dict (the contents of a ``.json`` settings file; values as Python
    objects), then ``argv`` flags overriding it. For programs that run ``peft-vision train`` in-process, such as the
    recipes (:mod:`peft_vision_ext.train.protocol`)."""
    return _parse(dict(settings), list(argv), "settings")


def _parse(settings: dict[str, Any] | None, argv: list[str], source: str) -> ParsedArguments:
    parser = build_parser()
    given: set[str] = set()
    if settings is not None:
        if not isinstance(settings, dict):
            raise UsageError(f"{source} must hold a JSON object of settings, got {type(settings).__name__}.")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UsageError(f"{source} has unknown settings {unknown}; see `peft-vision train --help` for the names.")
        parser.set_defaults(**settings)
        given |= set(settings)
    given |= _flag_names(argv)
    *dataclasses_parsed, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if remaining:
        raise UsageError(f"unknown arguments {remaining} (see `peft-vision train --help` for the names)")
    # The namespace of --overwrite_output_dir comes last, unless TrainingArguments has the field (transformers 4.x).
    holder = (
        dataclasses_parsed[-1] if isinstance(dataclasses_parsed[-1], TrainingArguments) else dataclasses_parsed.pop()
    )
    overwrite = bool(holder.overwrite_output_dir)
    model_args, data_args, method_args, settings_args, training_args = dataclasses_parsed
    for flag, value in (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--method", method_args.method),
        ("--output_dir", training_args.output_dir if "output_dir" in given else None),
    ):
        if not value:
            raise UsageError(f"the following argument is required: {flag} (see `peft-vision train --help`)")
    return ParsedArguments(
        model_args, data_args, method_args, settings_args, training_args, overwrite, frozenset(given)
    )

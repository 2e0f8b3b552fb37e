# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""What the Trainer recipes in ``recipes/`` share: argument handling and per-run training arguments. The plain
loops of their ``accelerate launch`` twins are in :mod:`peft_vision_ext.train.no_trainer`.

Output safety, as in the transformers examples: a recipe refuses a non-empty ``--output_dir`` unless
``--overwrite_output_dir`` is given; with it, the recipe writes into the directory, replacing what it writes. Every file
a recipe writes is replaced in one step (temporary file and rename) and every model or adapter folder through
:func:`peft_vision_ext._files.atomic_directory`, so an interrupted run leaves complete old outputs or complete new
ones."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from ._files import atomic_directory, atomic_write_text  # noqa: F401  (the Trainer recipes import them from here)
from .train.protocol import _OVERWRITE_HELP, OVERWRITE_OUTPUT_DIR, check_recipe_output_dir


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: list[str] | None,
    *,
    default_output_dir: str,
    quick: Mapping[str, Any] | None = None,
) -> tuple[HfArgumentParser, tuple]:
    """Parse a recipe's arguments like the transformers examples: a ``.json`` settings path (optionally followed by
    ``--overwrite_output_dir``, which the file may also set), or command-line flags (``--output_dir`` defaults to
    ``default_output_dir``). When a parsed dataclass has ``quick=True``, every field named in ``quick`` is overridden
    in every dataclass that has it. A non-empty output directory is refused unless ``--overwrite_output_dir`` is
    given (:func:`check_recipe_output_dir`). Returns the parser (for ``parser.error``) and the parsed dataclasses, in
    the order given."""
    parser = HfArgumentParser(tuple(dataclass_types))
    # transformers 4.x's TrainingArguments has the field itself (5.x dropped it): then it is parsed as such.
    in_dataclass = any(f.name == "overwrite_output_dir" for t in dataclass_types for f in dataclasses.fields(t))
    if not in_dataclass:
        parser.add_argument(OVERWRITE_OUTPUT_DIR, action="store_true", help=_OVERWRITE_HELP)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(".json"):
        extra = [arg for arg in argv[1:] if arg != OVERWRITE_OUTPUT_DIR]
        if extra:
            parser.error(
                f"after the settings file {argv[0]!r} only {OVERWRITE_OUTPUT_DIR} is accepted, got {extra}; put the "
                "other settings in the file."
            )
        if not os.path.isfile(argv[0]):
            parser.error(f"settings file {argv[0]!r} does not exist; pass the path of a recipe's .json settings.")
        with open(argv[0]) as handle:
            settings = json.load(handle)
        if OVERWRITE_OUTPUT_DIR in argv[1:]:
            settings["overwrite_output_dir"] = True
        overwrite = bool(settings.get("overwrite_output_dir", False))
        if not in_dataclass:
            settings.pop("overwrite_output_dir", None)
        parsed = list(parser.parse_dict(settings))
    else:
        defaults = ["--output_dir", default_output_dir] if "--output_dir" not in argv else []
        parsed = list(parser.parse_args_into_dataclasses(defaults + argv))
        if not in_dataclass:
            overwrite = parsed.pop().overwrite_output_dir  # the namespace of the flags outside the dataclasses
        else:
            overwrite = any(getattr(args, "overwrite_output_dir", False) for args in parsed)
    output_dir = next(args.output_dir for args in parsed if hasattr(args, "output_dir"))
    check_recipe_output_dir(parser, output_dir, overwrite)
    if quick and any(getattr(args, "quick", False) for args in parsed):
        for args in parsed:
            if isinstance(args, TrainingArguments):
                continue
            for key, value in quick.items():
                if hasattr(args, key):
                    setattr(args, key, value)
    return parser, tuple(parsed)


def run_training_args(
    training_args: TrainingArguments,
    *,
    run_name: str,
    learning_rate: float,
    epochs: float,
    label_names: Sequence[str] = ("labels",),
) -> TrainingArguments:
    """The recipe's ``TrainingArguments`` for one training run: its own output folder under ``trainer/``, no
    checkpoints or evaluation during training, no external loggers; the batches keep their labels (``label_names``:
    ``labels`` for semantic segmentation, ``mask_labels`` / ``class_labels`` for Mask2Former)."""
    return dataclasses.replace(
        training_args,
        output_dir=os.path.join(training_args.output_dir, "trainer", run_name),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        run_name=run_name,
        label_names=list(label_names),
        remove_unused_columns=False,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
    )


def train_with_trainer(
    model: torch.nn.Module,
    training_args: TrainingArguments,
    dataset,
    *,
    collate_fn: Callable,
    run_name: str,
    learning_rate: float,
    epochs: float,
    label_names: Sequence[str] = ("labels",),
) -> float:
    """Train ``model`` in place with ``transformers.Trainer`` under :func:`run_training_args`; returns the seconds."""
    import time

    from transformers import Trainer

    args = run_training_args(
        training_args, run_name=run_name, learning_rate=learning_rate, epochs=epochs, label_names=label_names
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_fn)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start

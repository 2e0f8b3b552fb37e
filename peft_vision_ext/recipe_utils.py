# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Argument handling and per-run training arguments shared by the Trainer recipes in ``recipes/``."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import HfArgumentParser, TrainingArguments


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: list[str] | None,
    *,
    default_output_dir: str,
    quick: Mapping[str, Any] | None = None,
) -> tuple[HfArgumentParser, tuple]:
    """Parse a recipe's arguments like the transformers examples: one ``.json`` settings path, or command-line flags
    (``--output_dir`` defaults to ``default_output_dir``). When a parsed dataclass has ``quick=True``, every field
    named in ``quick`` is overridden in every dataclass that has it. Returns the parser (for ``parser.error``) and
    the parsed dataclasses, in the order given."""
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        defaults = ["--output_dir", default_output_dir] if "--output_dir" not in argv else []
        parsed = parser.parse_args_into_dataclasses(defaults + argv)
    if quick and any(getattr(args, "quick", False) for args in parsed):
        for args in parsed:
            if isinstance(args, TrainingArguments):
                continue
            for key, value in quick.items():
                if hasattr(args, key):
                    setattr(args, key, value)
    return parser, tuple(parsed)


def run_training_args(
    training_args: TrainingArguments, *, run_name: str, learning_rate: float, epochs: float
) -> TrainingArguments:
    """The recipe's ``TrainingArguments`` for one training run: its own output folder under ``trainer/``, no
    checkpoints or evaluation during training, no external loggers; the segmentation batches keep their labels."""
    return dataclasses.replace(
        training_args,
        output_dir=os.path.join(training_args.output_dir, "trainer", run_name),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        run_name=run_name,
        label_names=["labels"],
        remove_unused_columns=False,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
    )

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""``peft-vision train``: fine-tune your checkpoint on your images with a PEFT method.

::

    peft-vision train --model_name_or_path facebook/sam-vit-base --method mopeft \\
        --train_dir data/train --validation_dir data/val --id2label '{"0": "soil", "1": "rock"}' \\
        --output_dir out/sam-rocks --num_train_epochs 10 --per_device_train_batch_size 4

    peft-vision train --task instance --model_name_or_path facebook/mask2former-swin-tiny-coco-instance \\
        --method deform_lora --train_annotations coco/instances_train.json --train_dir coco/train \\
        --validation_annotations coco/instances_val.json --validation_dir coco/val --output_dir out/m2f-rocks

    python -m peft_vision_ext.train settings.json              # a .json of the same settings
    accelerate launch -m peft_vision_ext.train settings.json   # several GPUs / processes

Arguments (``peft-vision train --help``): :class:`ModelArguments`, :class:`DataArguments`, :class:`MethodArguments`,
the PEFT config fields (:data:`PeftSettings`, e.g. ``--r 4``) and ``transformers.TrainingArguments``. See
:mod:`peft_vision_ext.train.runner` for what is written to ``--output_dir``.

Load the result with :func:`load_trained` (or ``PeftModel.from_pretrained`` on the checkpoint loaded with the
run's ``id2label``, which ``results.json`` records).
"""

from __future__ import annotations

from .arguments import (
    DEFAULT_LEARNING_RATES,
    METHODS,
    PEFT_METHOD_CONFIGS,
    DataArguments,
    MethodArguments,
    ModelArguments,
    PeftSettings,
    parse_train_args,
    train_args_from_dict,
)
from .loading import load_trained
from .runner import Plan, evaluate_split, execute, main, prepare_run, results_table


__all__ = [
    "DEFAULT_LEARNING_RATES",
    "METHODS",
    "PEFT_METHOD_CONFIGS",
    "DataArguments",
    "MethodArguments",
    "ModelArguments",
    "PeftSettings",
    "Plan",
    "evaluate_split",
    "execute",
    "load_trained",
    "main",
    "parse_train_args",
    "prepare_run",
    "results_table",
    "train_args_from_dict",
]

#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The accelerate twin of ``run_space_rocks.py``: the same adaptation with a plain loop, for ``accelerate launch``.

It pretrains a source U-Net (or loads ``--source_model``), adapts it to one target domain with one method, evaluates
with ``gather_for_metrics`` and saves the adapter (``save_pretrained``) from the main process.

    accelerate launch recipes/space_rocks/run_space_rocks_no_trainer.py --method conv_adapter --output_dir out/ddp
    torchrun --nproc_per_node 2 recipes/space_rocks/run_space_rocks_no_trainer.py --cpu --quick --output_dir out/ddp
"""

from __future__ import annotations

import argparse
import os

from accelerate.utils import set_seed

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import ADAPTATION_METHODS, prepare_for_adaptation
from peft_vision_ext.analysis import count_parameters
from peft_vision_ext.data import ROCK_LABELS, SegmentationTransform, collate_segmentation, load_rock_dataset
from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation
from peft_vision_ext.train.no_trainer import (
    accelerate_evaluate_segmentation,
    accelerate_train,
    add_accelerate_arguments,
    finish_accelerate_run,
    parse_accelerate_args,
    pretrain_source_model,
    start_accelerate_run,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_accelerate_arguments(parser, seed=42)
    parser.add_argument("--encoder_name", default="resnet18")
    parser.add_argument("--decoder_channels", type=int, nargs="+", default=[128, 64, 32, 16, 16])
    parser.add_argument("--source_model", help="directory of a pretrained source U-Net (skips pretraining)")
    parser.add_argument("--method", default="conv_adapter", choices=ADAPTATION_METHODS)
    parser.add_argument("--target_domain", default="mars")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--source_train_samples", type=int, default=600)
    parser.add_argument("--target_train_samples", type=int, default=80)
    parser.add_argument("--test_samples", type=int, default=100)
    parser.add_argument("--pretrain_epochs", type=int, default=6)
    parser.add_argument("--adapt_epochs", type=int, default=8)
    parser.add_argument("--pretrain_learning_rate", type=float, default=2e-3)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    args = parse_accelerate_args(parser, argv)
    if args.quick:
        args.image_size, args.source_train_samples, args.target_train_samples, args.test_samples = 64, 16, 8, 8
        args.pretrain_epochs, args.adapt_epochs, args.per_device_train_batch_size = 1, 2, 2
        args.decoder_channels = [32, 16, 16, 8, 8]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = start_accelerate_run(args)

    def split(domain, name, count, augment):
        dataset = load_rock_dataset(domain, name, count, args.image_size, seed=0)
        return dataset.with_transform(SegmentationTransform(augment=augment, seed=args.seed))

    # --- source model -----------------------------------------------------------------------------------------------
    source_dir = args.source_model or os.path.join(args.output_dir, "source_model")
    if args.source_model is None:
        config = UNetConfig(
            encoder_name=args.encoder_name,
            decoder_channels=args.decoder_channels,
            num_labels=len(ROCK_LABELS),
            id2label=ROCK_LABELS,
            label2id={v: k for k, v in ROCK_LABELS.items()},
        )
        pretrain_source_model(
            accelerator,
            UNetForSemanticSegmentation(config),
            split("source", "train", args.source_train_samples, True),
            args,
            source_dir,
            collate_fn=collate_segmentation,
        )

    # --- adaptation -------------------------------------------------------------------------------------------------
    set_seed(args.seed)
    model = prepare_for_adaptation(UNetForSemanticSegmentation.from_pretrained(source_dir), args.method)
    trainable, total = count_parameters(model)
    model, last_loss = accelerate_train(
        accelerator,
        model,
        split(args.target_domain, "train", args.target_train_samples, True),
        collate_fn=collate_segmentation,
        epochs=args.adapt_epochs,
        learning_rate=args.learning_rate,
        batch_size=args.per_device_train_batch_size,
        desc=f"adapt ({args.method}, {args.target_domain})",
    )
    metrics = accelerate_evaluate_segmentation(
        accelerator,
        model,
        split(args.target_domain, "test", args.test_samples, False),
        collate_fn=collate_segmentation,
        batch_size=args.per_device_eval_batch_size,
        id2label=ROCK_LABELS,
    )

    results = {
        "trainable_params": trainable,
        "total_params": total,
        "last_loss": last_loss,
        "balanced_accuracy": metrics["balanced_accuracy"],
        "mean_iou": metrics["mean_iou"],
    }
    return finish_accelerate_run(accelerator, model, args, results)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The accelerate twin of ``run_mask2former_instance.py``: one Mask2Former adaptation run with a plain loop, for
``accelerate launch``.

It pretrains the small source Mask2Former (or loads ``--source_model``), adapts it to one target domain with one
method, computes COCO mask AP over all processes (``gather_for_metrics`` of the encoded predictions, so the samples
the sampler repeats are dropped), and saves the adapter (``save_pretrained``) from the main process.

    accelerate launch recipes/mask2former_instance/run_mask2former_instance_no_trainer.py --method seq_adapter_2 \\
        --output_dir out/m2f_ddp
    torchrun --nproc_per_node 2 recipes/mask2former_instance/run_mask2former_instance_no_trainer.py --cpu --quick \\
        --output_dir out/m2f_ddp
"""

from __future__ import annotations

import argparse
import os

from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from transformers import Mask2FormerForUniversalSegmentation

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import (
    MASK2FORMER_ADAPTATION_METHODS,
    mask2former_method_settings,
    prepare_mask2former_for_adaptation,
)
from peft_vision_ext.analysis import base_parameter_count, count_parameters, percent
from peft_vision_ext.data import (
    ROCK_DOMAINS,
    ROCK_INSTANCE_LABELS,
    InstanceSegmentationTransform,
    collate_instance_segmentation,
    load_rock_instance_dataset,
)
from peft_vision_ext.metrics import evaluate_instance_segmentation
from peft_vision_ext.models import small_mask2former_config
from peft_vision_ext.train.no_trainer import (
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
    parser.add_argument("--source_model", help="directory of a pretrained source Mask2FormerForUniversalSegmentation")
    parser.add_argument("--method", default="seq_adapter_2", choices=MASK2FORMER_ADAPTATION_METHODS)
    parser.add_argument("--target_domain", default="moon-real", choices=sorted(ROCK_DOMAINS))
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--embed_dim", type=int, default=32)
    parser.add_argument("--depths", type=int, nargs=4, default=[1, 1, 2, 1])
    parser.add_argument("--num_heads", type=int, nargs=4, default=[1, 2, 4, 8])
    parser.add_argument("--hidden_dim", type=int, default=64)
    parser.add_argument("--encoder_layers", type=int, default=2)
    parser.add_argument("--decoder_layers", type=int, default=4)
    parser.add_argument("--num_queries", type=int, default=32)
    parser.add_argument("--train_num_points", type=int, default=2048)
    parser.add_argument("--adapter_dim", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--adapters_per_block", type=int, default=2, help="of 'deform_lora+seq_adapter'")
    parser.add_argument("--source_train_samples", type=int, default=320)
    parser.add_argument("--target_train_samples", type=int, default=96)
    parser.add_argument("--test_samples", type=int, default=64)
    parser.add_argument("--min_area", type=int, default=32)
    parser.add_argument("--pretrain_epochs", type=int, default=30)
    parser.add_argument("--adapt_epochs", type=int, default=12)
    parser.add_argument("--pretrain_learning_rate", type=float, default=2e-3)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 1e-2 PEFT, 1e-3 decoder and full")
    args = parse_accelerate_args(parser, argv)
    if args.quick:
        args.image_size, args.embed_dim, args.depths, args.num_heads = 64, 16, [1, 1, 1, 1], [1, 1, 2, 2]
        args.hidden_dim, args.encoder_layers, args.decoder_layers, args.num_queries = 32, 1, 3, 8
        args.train_num_points, args.min_area = 256, 4
        args.source_train_samples, args.target_train_samples, args.test_samples = 8, 8, 6
        args.pretrain_epochs, args.adapt_epochs, args.per_device_train_batch_size = 1, 2, 2
        args.per_device_eval_batch_size = 2
    if args.learning_rate is None:
        args.learning_rate = {"decoder": 1e-3, "full": 1e-3}.get(args.method, 1e-2)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The Swin backbone carries a final `layernorm` that Mask2Former never uses (it reads the per-stage feature
    # norms), so those two parameters get no gradient in pretraining / full fine-tuning: DDP must be told.
    accelerator = start_accelerate_run(
        args, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )

    def split(domain, name, count, augment):
        dataset = load_rock_instance_dataset(
            domain, name, count, image_size=args.image_size, seed=0, min_area=args.min_area
        )
        return dataset.with_transform(InstanceSegmentationTransform(augment=augment, seed=args.seed))

    # --- source model -----------------------------------------------------------------------------------------------
    source_dir = args.source_model or os.path.join(args.output_dir, "source_model")
    if args.source_model is None:
        config = small_mask2former_config(
            id2label=ROCK_INSTANCE_LABELS,
            image_size=args.image_size,
            embed_dim=args.embed_dim,
            depths=args.depths,
            num_heads=args.num_heads,
            hidden_dim=args.hidden_dim,
            encoder_layers=args.encoder_layers,
            decoder_layers=args.decoder_layers,
            num_queries=args.num_queries,
            train_num_points=args.train_num_points,
        )
        pretrain_source_model(
            accelerator,
            Mask2FormerForUniversalSegmentation(config),
            split("source", "train", args.source_train_samples, True),
            args,
            source_dir,
            collate_fn=collate_instance_segmentation,
        )

    # --- adaptation -------------------------------------------------------------------------------------------------
    set_seed(args.seed)
    source = Mask2FormerForUniversalSegmentation.from_pretrained(source_dir)
    settings = mask2former_method_settings(
        args.method, adapter_dim=args.adapter_dim, r=args.r, adapters_per_block=args.adapters_per_block
    )
    model = prepare_mask2former_for_adaptation(source, args.method, **settings)
    trainable, total = count_parameters(model)
    trainable_percent = percent(trainable, base_parameter_count(model))
    last_loss = float("nan")
    if args.method != "zero_shot":
        model, last_loss = accelerate_train(
            accelerator,
            model,
            split(args.target_domain, "train", args.target_train_samples, True),
            collate_fn=collate_instance_segmentation,
            epochs=args.adapt_epochs,
            learning_rate=args.learning_rate,
            batch_size=args.per_device_train_batch_size,
            desc=f"adapt ({args.method}, {args.target_domain})",
        )
    test = split(args.target_domain, "test", args.test_samples, False)
    loader = accelerator.prepare(
        DataLoader(test, batch_size=args.per_device_eval_batch_size, collate_fn=collate_instance_segmentation)
    )
    metrics = evaluate_instance_segmentation(
        model,
        loader,
        ROCK_INSTANCE_LABELS,
        gather=lambda records: accelerator.gather_for_metrics(records, use_gather_object=True),
    )
    results = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": trainable_percent,
        "last_loss": last_loss,
        **metrics,
    }
    return finish_accelerate_run(accelerator, model, args, results)


if __name__ == "__main__":
    main()

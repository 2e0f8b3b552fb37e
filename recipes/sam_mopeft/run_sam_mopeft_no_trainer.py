#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The accelerate twin of ``run_sam_mopeft.py``: one SAM adaptation run with a plain loop, for ``accelerate launch``.

It pretrains the small source SAM (or loads ``--source_model``), adapts it to one target domain with one method
(MoPEFT or one of its baselines), evaluates with ``gather_for_metrics``, writes MoPEFT's gate statistics, and saves
the adapter (``save_pretrained``) from the main process.

    accelerate launch recipes/sam_mopeft/run_sam_mopeft_no_trainer.py --method mopeft --output_dir out/sam_ddp
    torchrun --nproc_per_node 2 recipes/sam_mopeft/run_sam_mopeft_no_trainer.py --cpu --quick --output_dir out/sam_ddp
"""

from __future__ import annotations

import argparse
import contextlib
import os

from accelerate.utils import DistributedDataParallelKwargs, set_seed

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import SAM_ADAPTATION_METHODS, prepare_sam_for_adaptation
from peft_vision_ext.analysis import collect_gate_statistics, count_parameters
from peft_vision_ext.data import (
    ROCK_DOMAINS,
    ROCK_LABELS,
    SegmentationTransform,
    collate_segmentation,
    load_rock_dataset,
)
from peft_vision_ext.models import SamForSemanticSegmentation, small_sam_config
from peft_vision_ext.train.no_trainer import (
    accelerate_evaluate_segmentation,
    accelerate_train,
    add_accelerate_arguments,
    finish_accelerate_run,
    parse_accelerate_args,
    pretrain_source_model,
    start_accelerate_run,
)
from peft_vision_ext.tuners.mopeft import MOPEFT_PRESETS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_accelerate_arguments(parser, seed=0)
    parser.add_argument("--source_model", help="directory of a pretrained source SamForSemanticSegmentation")
    parser.add_argument("--method", default="mopeft", choices=SAM_ADAPTATION_METHODS)
    parser.add_argument("--target_domain", default="mars", choices=sorted(ROCK_DOMAINS))
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--window_size", type=int, default=5)
    parser.add_argument("--global_attn_indexes", type=int, nargs="*", default=[1, 3])
    parser.add_argument("--decoder_hidden_size", type=int, default=32)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--prefix_length", type=int, default=20)
    parser.add_argument("--adapter_dim", type=int, default=16)
    parser.add_argument("--source_train_samples", type=int, default=480)
    parser.add_argument("--target_train_samples", type=int, default=64)
    parser.add_argument("--test_samples", type=int, default=64)
    parser.add_argument("--pretrain_epochs", type=int, default=12)
    parser.add_argument("--adapt_epochs", type=int, default=10)
    parser.add_argument("--pretrain_learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--learning_rate", type=float, default=None, help="default: 3e-3 PEFT, 1e-3 decoder, 5e-4 full"
    )
    args = parse_accelerate_args(parser, argv)
    if args.quick:
        args.image_size, args.hidden_size, args.num_hidden_layers, args.window_size = 64, 32, 2, 3
        args.global_attn_indexes, args.decoder_hidden_size, args.prefix_length = [1], 16, 4
        args.source_train_samples, args.target_train_samples, args.test_samples = 16, 8, 8
        args.pretrain_epochs, args.adapt_epochs, args.per_device_train_batch_size = 1, 2, 2
    if args.learning_rate is None:
        args.learning_rate = {"decoder": 1e-3, "full": 5e-4}.get(args.method, 3e-3)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # SAM's prompt-point embeddings, IoU head and the first hypernetwork MLP get no gradient in semantic segmentation
    # (the model lists them in `unused_parameter_prefixes`): DDP must be told, as Trainer does by default.
    accelerator = start_accelerate_run(
        args, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )

    def split(domain, name, count, augment):
        dataset = load_rock_dataset(domain, name, count, image_size=args.image_size, seed=0)
        return dataset.with_transform(SegmentationTransform(augment=augment, seed=args.seed))

    # --- source model -----------------------------------------------------------------------------------------------
    source_dir = args.source_model or os.path.join(args.output_dir, "source_model")
    if args.source_model is None:
        config = small_sam_config(
            num_labels=len(ROCK_LABELS),
            id2label=ROCK_LABELS,
            image_size=args.image_size,
            patch_size=args.patch_size,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            window_size=args.window_size,
            global_attn_indexes=args.global_attn_indexes,
            decoder_hidden_size=args.decoder_hidden_size,
        )
        pretrain_source_model(
            accelerator,
            SamForSemanticSegmentation(config),
            split("source", "train", args.source_train_samples, True),
            args,
            source_dir,
            collate_fn=collate_segmentation,
            scheduler="cosine",
        )

    # --- adaptation -------------------------------------------------------------------------------------------------
    set_seed(args.seed)
    source = SamForSemanticSegmentation.from_pretrained(source_dir)
    settings = {"r": args.r, "prefix_length": args.prefix_length, "adapter_dim": args.adapter_dim}
    model = prepare_sam_for_adaptation(source, args.method, **(settings if args.method in MOPEFT_PRESETS else {}))
    trainable, total = count_parameters(model)
    last_loss = float("nan")
    if args.method != "zero_shot":
        model, last_loss = accelerate_train(
            accelerator,
            model,
            split(args.target_domain, "train", args.target_train_samples, True),
            collate_fn=collate_segmentation,
            epochs=args.adapt_epochs,
            learning_rate=args.learning_rate,
            batch_size=args.per_device_train_batch_size,
            desc=f"adapt ({args.method}, {args.target_domain})",
            scheduler="cosine",
        )
    test = split(args.target_domain, "test", args.test_samples, False)
    with (
        collect_gate_statistics(accelerator.unwrap_model(model))
        if args.method == "mopeft"
        else contextlib.nullcontext() as gates
    ):
        metrics = accelerate_evaluate_segmentation(
            accelerator,
            model,
            test,
            collate_fn=collate_segmentation,
            batch_size=args.per_device_eval_batch_size,
            id2label=ROCK_LABELS,
        )

    results = {
        "trainable_params": trainable,
        "total_params": total,
        "last_loss": last_loss,
        "mean_iou": metrics["mean_iou"],
        "balanced_accuracy": metrics["balanced_accuracy"],
    }
    if gates is not None:
        # Each process records the gates of its own share of the test set.
        results["gates_mean_this_process"] = gates.mean_by_method()
    return finish_accelerate_run(accelerator, model, args, results)


if __name__ == "__main__":
    main()

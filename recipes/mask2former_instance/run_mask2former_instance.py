#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 001 at CPU scale: adapt a small Mask2Former to shifted rock-instance domains with sequential adapters and
LoRA on deformable attention.

1. Pretrain a small Mask2Former (Swin backbone, multi-scale deformable-attention pixel decoder, masked-attention
   decoder) on the source domain's rock instances (classes "rock" and "boulder").
2. For each target domain, compare zero-shot, decoder-only ("conventional") tuning, 1-3 sequential adapters per
   block, LoRA on deformable attention, both together, and full fine-tuning: COCO mask AP (pycocotools) against the
   trainable share of the model.

Writes ``results.json``, ``results.md`` and ``ap_vs_trainable.png`` to ``--output_dir``.

    python recipes/mask2former_instance/run_mask2former_instance.py recipes/mask2former_instance/mask2former_instance.json
    python recipes/mask2former_instance/run_mask2former_instance.py --output_dir outputs/m2f_quick --quick
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

from torch.utils.data import DataLoader
from transformers import Mask2FormerForUniversalSegmentation, TrainingArguments, set_seed

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import (
    MASK2FORMER_ADAPTATION_METHODS,
    base_parameter_count,
    count_parameters,
    mask2former_method_settings,
    percent,
    prepare_mask2former_for_adaptation,
)
from peft_vision_ext.analysis.plots import pareto_front, plot_score_vs_trainable
from peft_vision_ext.data import (
    ROCK_INSTANCE_LABELS,
    InstanceSegmentationTransform,
    collate_instance_segmentation,
    load_rock_instance_dataset,
)
from peft_vision_ext.metrics import evaluate_instance_segmentation
from peft_vision_ext.models import small_mask2former_config
from peft_vision_ext.recipe_utils import atomic_write_text, parse_recipe_args, train_with_trainer


logger = logging.getLogger(__name__)

METHODS = MASK2FORMER_ADAPTATION_METHODS
TITLES = {
    "zero_shot": "Zero-shot",
    "decoder": "Decoder FT (conventional)",
    "seq_adapter_1": "Adapters x1",
    "seq_adapter_2": "Adapters x2",
    "seq_adapter_3": "Adapters x3",
    "deform_lora": "Deformable LoRA",
    "deform_lora+seq_adapter": "Deformable LoRA + adapters",
    "full": "Full FT",
}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    image_size: int = field(default=128, metadata={"help": "Input size (pixels), a multiple of 32."})
    embed_dim: int = field(default=32, metadata={"help": "Swin width of the first stage."})
    depths: list[int] = field(default_factory=lambda: [1, 1, 2, 1], metadata={"help": "Swin blocks per stage."})
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "Swin heads per stage."})
    window_size: int = field(default=4, metadata={"help": "Swin window size."})
    hidden_dim: int = field(default=64, metadata={"help": "Pixel and transformer decoder width."})
    encoder_layers: int = field(default=2, metadata={"help": "Deformable-attention pixel-decoder layers."})
    decoder_layers: int = field(default=4, metadata={"help": "Transformer decoder depth (transformers' count)."})
    num_queries: int = field(default=32, metadata={"help": "Object queries (>= instances per image)."})
    train_num_points: int = field(default=2048, metadata={"help": "Mask-loss sample points per mask."})


@dataclass
class DataArguments:
    source_domain: str = field(default="source", metadata={"help": "Pretraining domain."})
    target_domains: list[str] = field(
        default_factory=lambda: ["moon-real", "moon-boulders"], metadata={"help": "Target domains."}
    )
    source_train_samples: int = field(default=320, metadata={"help": "Source training scenes."})
    target_train_samples: int = field(default=96, metadata={"help": "Training scenes per target domain."})
    test_samples: int = field(default=64, metadata={"help": "Test scenes per domain."})
    min_area: int = field(default=32, metadata={"help": "Visible pixels a rock needs to be an instance."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the scene generator."})


@dataclass
class PeftArguments:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to compare."})
    pretrain_epochs: float = field(default=30, metadata={"help": "Source pretraining epochs."})
    pretrain_learning_rate: float = field(default=2e-3)
    adapt_epochs: float = field(default=12, metadata={"help": "Epochs per adaptation run."})
    peft_learning_rate: float = field(default=1e-2)
    decoder_learning_rate: float = field(default=1e-3)
    full_learning_rate: float = field(default=1e-3)
    adapter_dim: int = field(default=16, metadata={"help": "Bottleneck size of the sequential adapters."})
    r: int = field(default=8, metadata={"help": "LoRA rank of the deformable-attention projections."})
    both_adapters_per_block: int = field(
        default=2, metadata={"help": "Adapters per block of 'deform_lora+seq_adapter'."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny run for tests (seconds)."})


QUICK = {
    "image_size": 64,
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "hidden_dim": 32,
    "encoder_layers": 1,
    "decoder_layers": 3,
    "num_queries": 8,
    "train_num_points": 256,
    "target_domains": ["moon-boulders"],
    "source_train_samples": 8,
    "target_train_samples": 4,
    "test_samples": 4,
    "min_area": 4,
    "pretrain_epochs": 1,
    "adapt_epochs": 1,
}


def parse_args(argv: list[str] | None = None):
    parser, (model_args, data_args, peft_args, training_args) = parse_recipe_args(
        (ModelArguments, DataArguments, PeftArguments, TrainingArguments),
        argv,
        default_output_dir="outputs/mask2former_instance",
        quick=QUICK,
    )
    unknown = sorted(set(peft_args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods got {unknown}; choose from {list(METHODS)}")
    return model_args, data_args, peft_args, training_args


# ----------------------------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------------------------
def load_split(domain: str, split: str, count: int, data_args: DataArguments, size: int, augment: bool):
    dataset = load_rock_instance_dataset(
        domain, split, count, image_size=size, seed=data_args.scene_seed, min_area=data_args.min_area
    )
    return dataset.with_transform(InstanceSegmentationTransform(augment=augment, seed=data_args.scene_seed))


def train(model, training_args, dataset, *, learning_rate, epochs, run_name):
    return train_with_trainer(
        model,
        training_args,
        dataset,
        collate_fn=collate_instance_segmentation,
        run_name=run_name,
        learning_rate=learning_rate,
        epochs=epochs,
        label_names=["mask_labels", "class_labels"],
    )


def mask_ap(model, dataset) -> dict:
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate_instance_segmentation)
    return evaluate_instance_segmentation(model, loader, ROCK_INSTANCE_LABELS)


def prepare(source, method: str, peft_args: PeftArguments):
    """A copy of the source model set up for ``method`` (the source stays untouched for the next run)."""
    settings = mask2former_method_settings(
        method, adapter_dim=peft_args.adapter_dim, r=peft_args.r, adapters_per_block=peft_args.both_adapters_per_block
    )
    return prepare_mask2former_for_adaptation(copy.deepcopy(source), method, **settings)


def learning_rate(method: str, peft_args: PeftArguments) -> float:
    return {"decoder": peft_args.decoder_learning_rate, "full": peft_args.full_learning_rate}.get(
        method, peft_args.peft_learning_rate
    )


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, peft_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    os.makedirs(training_args.output_dir, exist_ok=True)
    set_seed(training_args.seed)
    size = model_args.image_size
    started = time.perf_counter()

    # --- 1. pretrain on the source domain -----------------------------------------------------------------------------
    source_train = load_split(data_args.source_domain, "train", data_args.source_train_samples, data_args, size, True)
    source = Mask2FormerForUniversalSegmentation(
        small_mask2former_config(id2label=ROCK_INSTANCE_LABELS, **dataclasses.asdict(model_args))
    )
    logger.info(
        "Pretraining a %.2fM-parameter Mask2Former on %r",
        sum(p.numel() for p in source.parameters()) / 1e6,
        data_args.source_domain,
    )
    pretrain_s = train(
        source,
        training_args,
        source_train,
        learning_rate=peft_args.pretrain_learning_rate,
        epochs=peft_args.pretrain_epochs,
        run_name="pretrain",
    )
    source.eval()
    source_test = load_split(data_args.source_domain, "test", data_args.test_samples, data_args, size, False)
    results: dict = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "peft": dataclasses.asdict(peft_args),
        "pretrain_seconds": pretrain_s,
        "source": mask_ap(source, source_test),
        "domains": {},
        "trainable_percent": {},
    }
    logger.info("Source model on %r: mask AP %.3f", data_args.source_domain, results["source"]["map"])

    # --- 2. adapt to each target domain ------------------------------------------------------------------------------
    for domain in data_args.target_domains:
        target_train = load_split(domain, "train", data_args.target_train_samples, data_args, size, True)
        target_test = load_split(domain, "test", data_args.test_samples, data_args, size, False)
        row = results["domains"].setdefault(domain, {})
        for method in peft_args.methods:
            set_seed(training_args.seed)
            model = prepare(source, method, peft_args)
            trainable, _ = count_parameters(model)
            results["trainable_percent"][method] = percent(trainable, base_parameter_count(model))
            seconds = 0.0
            if method != "zero_shot":
                seconds = train(
                    model,
                    training_args,
                    target_train,
                    learning_rate=learning_rate(method, peft_args),
                    epochs=peft_args.adapt_epochs,
                    run_name=f"{domain}-{method}",
                )
            row[method] = {**mask_ap(model, target_test), "train_seconds": seconds}
            logger.info(
                "%s / %s: mask AP %.3f, AP50 %.3f (%.1f s)",
                domain,
                method,
                row[method]["map"],
                row[method]["map_50"],
                seconds,
            )

    # --- 3. outputs --------------------------------------------------------------------------------------------------
    results["total_seconds"] = time.perf_counter() - started
    panels = {
        domain: {
            TITLES[m]: (results["trainable_percent"][m], row[m]["map"])
            for m in peft_args.methods
            if m != "zero_shot"  # nothing trains: no point on a log axis
        }
        for domain, row in results["domains"].items()
    }
    results["pareto_front"] = {domain: pareto_front(points) for domain, points in panels.items()}
    if panels:
        plot_score_vs_trainable(
            panels,
            os.path.join(training_args.output_dir, "ap_vs_trainable.png"),
            title="Mask AP vs. trainable parameters (Mask2Former, rock instances)",
            ylabel="mask AP (COCO, IoU .50:.95)",
            references={
                domain: {"zero-shot": row["zero_shot"]["map"]}
                for domain, row in results["domains"].items()
                if "zero_shot" in row
            },
        )
    atomic_write_text(os.path.join(training_args.output_dir, "results.json"), json.dumps(results, indent=2))
    table = markdown_table(results, peft_args)
    atomic_write_text(os.path.join(training_args.output_dir, "results.md"), table)
    print(table)
    return results


def markdown_table(results: dict, peft_args: PeftArguments) -> str:
    domains = list(results["domains"])
    methods = [m for m in METHODS if m in peft_args.methods]
    source = results["source"]
    lines = [
        f"Source model on the source domain: mask AP {source['map']:.3f}, AP50 {source['map_50']:.3f}",
        "",
        "| Method | trainable % | " + " | ".join(f"{d} AP | {d} AP50" for d in domains) + " | mean AP |",
        "|---" * (2 * len(domains) + 3) + "|",
    ]
    for method in methods:
        rows = [results["domains"][d][method] for d in domains]
        cells = " | ".join(f"{r['map']:.3f} | {r['map_50']:.3f}" for r in rows)
        mean = sum(r["map"] for r in rows) / len(rows)
        lines.append(f"| {TITLES[method]} | {results['trainable_percent'][method]:.2f} | {cells} | {mean:.3f} |")
    fronts = "; ".join(f"{d}: {', '.join(f)}" for d, f in results["pareto_front"].items())
    lines += ["", f"Pareto front (AP vs. trainable %): {fronts}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

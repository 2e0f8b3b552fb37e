#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 002 at CPU scale: adapt a small SAM to shifted domains with LoRA, VPT, VPT-deep, adapters and MoPEFT.

1. Pretrain a small SAM (SAM's ViT architecture, narrow and shallow, windowed + global blocks) on the source domain.
2. For each target domain (they differ in class set, sensor look and segment size), compare zero-shot, decoder-only
   tuning, LoRA, VPT, VPT-deep, Adapter, MoPEFT and full fine-tuning (mIoU, trainable %).
3. Record MoPEFT's gates on each domain's test set (the seed's Figure 4.2), prune + merge MoPEFT and re-evaluate.
4. Ablations of r, L and D_mid on two domains (Tables 4.6-4.8).

Writes ``results.json``, ``results.md`` and ``gates.png`` to ``--output_dir``.

    python recipes/sam_mopeft/run_sam_mopeft.py recipes/sam_mopeft/sam_mopeft.json
    python recipes/sam_mopeft/run_sam_mopeft.py --output_dir outputs/sam_quick --quick
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext import merge_mergeable, prune_mopeft
from peft_vision_ext.adaptation import (
    SAM_ADAPTATION_METHODS,
    count_parameters,
    evaluate_segmentation,
    percent,
    prepare_sam_for_adaptation,
)
from peft_vision_ext.analysis import collect_gate_statistics, plot_gate_usage
from peft_vision_ext.data import ROCK_LABELS, SegmentationTransform, collate_segmentation, load_rock_dataset
from peft_vision_ext.models import SamForSemanticSegmentation, small_sam_config
from peft_vision_ext.recipe_utils import atomic_write_text, parse_recipe_args, train_with_trainer
from peft_vision_ext.tuners.mopeft import MOPEFT_PRESETS


logger = logging.getLogger(__name__)

# The seed's baselines; all but zero-shot, decoderFT and full FT are presets of one MoPEFTConfig.
METHODS = SAM_ADAPTATION_METHODS
TITLES = {
    "zero_shot": "Zero-shot",
    "decoder": "decoderFT",
    "lora": "LoRA",
    "vpt": "VPT",
    "vpt_deep": "VPT-deep",
    "adapter": "Adapter",
    "mopeft": "MoPEFT",
    "mopeft_pruned": "MoPEFT pruned+merged",
    "full": "Full FT",
}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    image_size: int = field(default=96, metadata={"help": "SAM encoder input size (pixels)."})
    patch_size: int = field(default=8, metadata={"help": "Patch size of the ViT."})
    hidden_size: int = field(default=64, metadata={"help": "ViT width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    window_size: int = field(default=5, metadata={"help": "Window size of the windowed blocks (12 tokens: padded)."})
    global_attn_indexes: list[int] = field(default_factory=lambda: [1, 3], metadata={"help": "Global blocks."})
    decoder_hidden_size: int = field(default=32, metadata={"help": "Mask decoder width."})


@dataclass
class DataArguments:
    source_domain: str = field(default="source", metadata={"help": "Pretraining domain."})
    target_domains: list[str] = field(
        default_factory=lambda: ["moon-real", "mars", "moon-highsun", "moon-boulders"],
        metadata={"help": "Target domains (at least 4 for a small MESS)."},
    )
    source_train_samples: int = field(default=480, metadata={"help": "Source training scenes."})
    target_train_samples: int = field(default=64, metadata={"help": "Training scenes per target domain."})
    test_samples: int = field(default=64, metadata={"help": "Test scenes per domain."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the scene generator."})


@dataclass
class PeftArguments:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to compare."})
    pretrain_epochs: float = field(default=12, metadata={"help": "Source pretraining epochs."})
    pretrain_learning_rate: float = field(default=2e-3)
    adapt_epochs: float = field(default=10, metadata={"help": "Epochs per adaptation run."})
    peft_learning_rate: float = field(default=3e-3)
    decoder_learning_rate: float = field(default=1e-3)
    full_learning_rate: float = field(default=5e-4)
    r: int = field(default=8, metadata={"help": "LoRA rank (seed default 8)."})
    prefix_length: int = field(default=20, metadata={"help": "Prefix length L (seed default 20)."})
    adapter_dim: int = field(default=16, metadata={"help": "Adapter D_mid (seed: 64 for width 768; ours is 64)."})
    ablation_domains: list[str] = field(default_factory=lambda: ["mars", "moon-boulders"])
    ablation_r: list[int] = field(default_factory=lambda: [4, 16])
    ablation_prefix_length: list[int] = field(default_factory=lambda: [5, 10])
    ablation_adapter_dim: list[int] = field(default_factory=lambda: [8, 32])
    prune_threshold: float = field(default=0.05, metadata={"help": "prune_mopeft threshold."})
    freeze_tolerance: float = field(default=0.1, metadata={"help": "prune_mopeft gate range counted as constant."})
    quick: bool = field(default=False, metadata={"help": "Tiny run for tests (seconds)."})


QUICK = {
    "image_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "global_attn_indexes": [1],
    "window_size": 3,
    "decoder_hidden_size": 16,
    "target_domains": ["mars", "moon-boulders"],
    "source_train_samples": 16,
    "target_train_samples": 8,
    "test_samples": 8,
    "pretrain_epochs": 1,
    "adapt_epochs": 1,
    "prefix_length": 4,
    "ablation_domains": ["mars"],
    "ablation_r": [4],
    "ablation_prefix_length": [],
    "ablation_adapter_dim": [],
}


def parse_args(argv: list[str] | None = None):
    parser, (model_args, data_args, peft_args, training_args) = parse_recipe_args(
        (ModelArguments, DataArguments, PeftArguments, TrainingArguments),
        argv,
        default_output_dir="outputs/sam_mopeft",
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
    dataset = load_rock_dataset(domain, split, count, image_size=size, seed=data_args.scene_seed)
    return dataset.with_transform(SegmentationTransform(augment=augment, seed=data_args.scene_seed))


def train(model, training_args, dataset, *, learning_rate, epochs, run_name):
    return train_with_trainer(
        model,
        training_args,
        dataset,
        collate_fn=collate_segmentation,
        run_name=run_name,
        learning_rate=learning_rate,
        epochs=epochs,
    )


def prepare(source: SamForSemanticSegmentation, method: str, peft_args: PeftArguments, **overrides):
    """A copy of the source model set up for ``method`` (the source stays untouched for the next run)."""
    model = copy.deepcopy(source)
    if method not in MOPEFT_PRESETS:  # zero-shot, decoder-only, full: no PEFT settings
        return prepare_sam_for_adaptation(model, method)
    kwargs = {"r": peft_args.r, "prefix_length": peft_args.prefix_length, "adapter_dim": peft_args.adapter_dim}
    kwargs.update(overrides)
    return prepare_sam_for_adaptation(model, method, **kwargs)


def encoder_trainable_percent(model, encoder_params: int) -> float:
    """Trainable share of the image encoder alone (the seed's Table 4.5 counts the ViT; in a width-64 SAM the mask
    decoder, trained by every method but zero-shot, dominates the whole-model share)."""
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "vision_encoder." in n)
    return percent(trainable, encoder_params)


def miou(model, dataset) -> float:
    return float(evaluate_segmentation(model, dataset, len(ROCK_LABELS), batch_size=16)["mean_iou"])


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
    source = SamForSemanticSegmentation(
        small_sam_config(num_labels=len(ROCK_LABELS), id2label=ROCK_LABELS, **dataclasses.asdict(model_args))
    )
    logger.info(
        "Pretraining a %.2fM-parameter SAM on %r",
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
    results: dict = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "peft": dataclasses.asdict(peft_args),
        "pretrain_seconds": pretrain_s,
        "source_miou": miou(
            source, load_split(data_args.source_domain, "test", data_args.test_samples, data_args, size, False)
        ),
        "domains": {},
        "trainable_percent": {},
        "encoder_trainable_percent": {},
        "ablations": {},
    }
    base_params = sum(p.numel() for p in source.parameters())
    encoder_params = sum(p.numel() for p in source.vision_encoder.parameters())

    # --- 2. adapt to each target domain ------------------------------------------------------------------------------
    gate_telemetry = {}
    for domain in data_args.target_domains:
        target_train = load_split(domain, "train", data_args.target_train_samples, data_args, size, True)
        target_test = load_split(domain, "test", data_args.test_samples, data_args, size, False)
        row = results["domains"].setdefault(domain, {})
        for method in peft_args.methods:
            set_seed(training_args.seed)
            model = prepare(source, method, peft_args)
            trainable, _ = count_parameters(model)
            results["trainable_percent"][method] = percent(trainable, base_params)
            results["encoder_trainable_percent"][method] = encoder_trainable_percent(model, encoder_params)
            seconds = 0.0
            if method != "zero_shot":
                lr = {"decoder": peft_args.decoder_learning_rate, "full": peft_args.full_learning_rate}.get(
                    method, peft_args.peft_learning_rate
                )
                seconds = train(
                    model,
                    training_args,
                    target_train,
                    learning_rate=lr,
                    epochs=peft_args.adapt_epochs,
                    run_name=f"{domain}-{method}",
                )
            row[method] = {"mean_iou": miou(model, target_test), "train_seconds": seconds}
            logger.info("%s / %s: mIoU %.3f (%.1f s)", domain, method, row[method]["mean_iou"], seconds)
            if method == "mopeft":
                with collect_gate_statistics(model) as gates:
                    miou(model, target_test)
                gate_telemetry[domain] = gates
                row["mopeft_gates"] = {
                    "mean": gates.mean_by_method(),
                    "selections": gates.selection_counts(),
                    "per_block": gates.summary(),
                }
                calibration = [collate_segmentation([target_train[i] for i in range(min(8, len(target_train)))])]
                report = prune_mopeft(
                    model,
                    calibration,
                    threshold=peft_args.prune_threshold,
                    freeze_gates=True,
                    freeze_tolerance=peft_args.freeze_tolerance,
                )
                merged = merge_mergeable(model)
                row["mopeft_pruned"] = {
                    "mean_iou": miou(merged, target_test),
                    "prune_report": report.to_dict(),
                    "fully_merged": type(merged) is SamForSemanticSegmentation,
                }

    # --- 3. ablations (Tables 4.6-4.8) -------------------------------------------------------------------------------
    ablations = {
        "r": peft_args.ablation_r,
        "prefix_length": peft_args.ablation_prefix_length,
        "adapter_dim": peft_args.ablation_adapter_dim,
    }
    for name, values in ablations.items():
        for value in values:
            for domain in peft_args.ablation_domains:
                set_seed(training_args.seed)
                target_train = load_split(domain, "train", data_args.target_train_samples, data_args, size, True)
                target_test = load_split(domain, "test", data_args.test_samples, data_args, size, False)
                model = prepare(source, "mopeft", peft_args, **{name: value})
                train(
                    model,
                    training_args,
                    target_train,
                    learning_rate=peft_args.peft_learning_rate,
                    epochs=peft_args.adapt_epochs,
                    run_name=f"ablation-{name}{value}-{domain}",
                )
                trainable, _ = count_parameters(model)
                results["ablations"].setdefault(name, {}).setdefault(str(value), {})[domain] = {
                    "mean_iou": miou(model, target_test),
                    "trainable_percent": percent(trainable, base_params),
                }

    # --- 4. outputs --------------------------------------------------------------------------------------------------
    results["total_seconds"] = time.perf_counter() - started
    if gate_telemetry:
        plot_gate_usage(
            gate_telemetry,
            os.path.join(training_args.output_dir, "gates.png"),
            title="MoPEFT gates on each target domain (test set)",
        )
    atomic_write_text(os.path.join(training_args.output_dir, "results.json"), json.dumps(results, indent=2))
    table = markdown_tables(results, peft_args)
    atomic_write_text(os.path.join(training_args.output_dir, "results.md"), table)
    print(table)
    return results


def markdown_tables(results: dict, peft_args: PeftArguments) -> str:
    domains = list(results["domains"])
    methods = [m for m in METHODS if m in peft_args.methods]
    if "mopeft" in methods:
        methods.insert(methods.index("mopeft") + 1, "mopeft_pruned")
    lines = [f"Source model on the source domain: mIoU {results['source_miou']:.3f}", ""]
    lines += [
        "| Method | trainable % (model) | trainable % (encoder) | " + " | ".join(domains) + " | mean |",
        "|---" * (len(domains) + 4) + "|",
    ]
    for method in methods:
        scores = [results["domains"][d].get(method, {}).get("mean_iou", float("nan")) for d in domains]
        share = results["trainable_percent"].get(method.replace("_pruned", ""), float("nan"))
        encoder_share = results["encoder_trainable_percent"].get(method.replace("_pruned", ""), float("nan"))
        lines.append(
            f"| {TITLES[method]} | {share:.2f} | {encoder_share:.2f} | "
            + " | ".join(f"{s:.3f}" for s in scores)
            + f" | {sum(scores) / len(scores):.3f} |"
        )
    for name, values in results["ablations"].items():
        domains_a = sorted({d for v in values.values() for d in v})
        lines += [
            "",
            f"Ablation of `{name}` (MoPEFT, mIoU)",
            "",
            f"| {name} | trainable % | " + " | ".join(domains_a) + " |",
            "|---" * (len(domains_a) + 2) + "|",
        ]
        for value, row in values.items():
            share = next(iter(row.values()))["trainable_percent"]
            lines.append(
                f"| {value} | {share:.2f} | " + " | ".join(f"{row[d]['mean_iou']:.3f}" for d in domains_a) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

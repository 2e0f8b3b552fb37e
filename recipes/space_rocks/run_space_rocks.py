#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 000 end to end: adapt a rock-segmentation U-Net from a synthetic Moon to real-looking Moon and Mars scenes.

A protocol over ``peft-vision train`` (:mod:`peft_vision_ext.train.protocol`):

1. Pretrain a U-Net (timm encoder) on the synthetic *source* domain.
2. Evaluate it on each target domain with no adaptation.
3. Adapt on a small target train split with full fine-tuning, decoder-only tuning, conv adapters and BN-only
   adapters; each method's learning rate is chosen on validation scenes carved from that split, then every seed
   trains with it (mean ± std over seeds on the target test split).
4. Rank each seed's conv adapters (Z, RMS and relative-update scores), export several kept fractions, reload each onto
   the source checkpoint and evaluate it.
5. Fuse (``merge_and_unload``) and check that the fused model equals the adapter model at the base model's cost.

Writes ``results.json``, ``results.md`` and ``pareto_<domain>.png`` to ``--output_dir`` (a non-empty one only with
``--overwrite_output_dir``), with every run's ``peft-vision train`` outputs under ``<domain>/<method>/``.

    python recipes/space_rocks/run_space_rocks.py recipes/space_rocks/space_rocks.json [--overwrite_output_dir]
    python recipes/space_rocks/run_space_rocks.py --output_dir outputs/quick --quick
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import TrainingArguments

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import ADAPTATION_METHODS
from peft_vision_ext.analysis import (
    count_flops,
    count_parameters,
    export_adapters,
    score_adapters,
    select_adapters,
    set_fold_in_eval,
    size_bias,
    update_size_bytes,
)
from peft_vision_ext.analysis.plots import plot_pareto
from peft_vision_ext.data import ROCK_LABELS
from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation
from peft_vision_ext.train import evaluate_split
from peft_vision_ext.train.protocol import Protocol, ProtocolArguments, Run, fmt, parse_recipe_args, save_checkpoint


logger = logging.getLogger(__name__)


@dataclass
class RecipeArguments:
    encoder_name: str = field(default="resnet18", metadata={"help": "timm encoder (the seed: resnet18, vgg19_bn)."})
    decoder_channels: list[int] | None = field(
        default_factory=lambda: [128, 64, 32, 16, 16], metadata={"help": "U-Net decoder widths, deepest first."}
    )
    encoder_pretrained: bool = field(
        default=False, metadata={"help": "Start from timm's ImageNet weights (needs network access)."}
    )
    source_model: str | None = field(
        default=None, metadata={"help": "Directory of an already pretrained source U-Net: skips step 1."}
    )
    image_size: int = field(default=96, metadata={"help": "Square image size of the embedded rock scenes."})
    source_train_samples: int = field(default=480, metadata={"help": "Source-domain training scenes."})
    target_domains: list[str] = field(
        default_factory=lambda: ["moon-real", "mars"], metadata={"help": "Target domains to adapt to."}
    )
    target_train_samples: int = field(
        default=80, metadata={"help": "Small target train split (validation is carved out of it)."}
    )
    test_samples: int = field(default=100, metadata={"help": "Test scenes per domain."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the procedural scenes and of the validation carve."})
    methods: list[str] = field(
        default_factory=lambda: list(ADAPTATION_METHODS), metadata={"help": f"Methods: {ADAPTATION_METHODS}"}
    )
    pretrain_epochs: float = field(default=6.0, metadata={"help": "Source pretraining epochs."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Source pretraining learning rate."})
    adapt_epochs: float = field(default=4.0, metadata={"help": "Target adaptation epochs (every method)."})
    keep_fractions: list[float] = field(
        default_factory=lambda: [0.8, 0.66, 0.33, 0.1],
        metadata={"help": "Fractions of ranked adapters to keep (step 4)."},
    )
    scores: list[str] = field(
        default_factory=lambda: ["z", "rms"],
        metadata={"help": "Ranking scores to compare (step 4): z, rms, relative."},
    )
    quick: bool = field(default=False, metadata={"help": "Tiny settings for smoke tests (about a minute)."})


# The learning-rate grid every method is tuned over (chosen on validation), and the seeds.
PROTOCOL_DEFAULTS = {"learning_rates": [1e-3, 3e-3, 1e-2], "seeds": 3}

QUICK = {
    "image_size": 64,
    "source_train_samples": 24,
    "target_domains": ["mars"],
    "target_train_samples": 10,
    "test_samples": 8,
    "pretrain_epochs": 1.0,
    "adapt_epochs": 1.0,
    "keep_fractions": [0.66],
    "scores": ["z", "relative"],
    "encoder_name": "test_resnet",
    "decoder_channels": [32, 16, 16, 8, 8],
    "learning_rates": [1e-3, 3e-3],
    "seeds": 1,
}


def parse_args(argv: list[str] | None = None):
    parser, (args, protocol_args, training_args) = parse_recipe_args(
        (RecipeArguments, ProtocolArguments, TrainingArguments),
        argv,
        default_output_dir="outputs/space_rocks",
        quick=QUICK,
        defaults=PROTOCOL_DEFAULTS,
    )
    unknown = sorted(set(args.methods) - set(ADAPTATION_METHODS))
    if unknown:
        parser.error(f"--methods got {unknown}; choose from {ADAPTATION_METHODS}")
    return args, protocol_args, training_args


# ----------------------------------------------------------------------------------------------------------------------
# What the recipe measures on each trained model
# ----------------------------------------------------------------------------------------------------------------------
def measure(run: Run) -> dict:
    return {"update_bytes": update_size_bytes(run.model)}


def rank_and_fuse(run: Run, args: RecipeArguments, source_dir: str) -> dict:
    """Steps 4 and 5 on one trained conv-adapter model (the model is merged at the end)."""
    model, test = run.model.eval(), run.plan.eval_datasets["test"]
    scores = score_adapters(model)
    out = {
        "update_bytes": update_size_bytes(model),
        "size_bias_spearman": {s: size_bias(scores, s) for s in args.scores},
        "ranked": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for score in args.scores:
            for fraction in args.keep_fractions:
                keep = select_adapters(scores, score=score, keep_fraction=fraction)
                exported = export_adapters(model, os.path.join(tmp, f"{score}-{fraction}"), keep)
                reloaded = PeftModel.from_pretrained(
                    UNetForSemanticSegmentation.from_pretrained(source_dir), exported.path
                )
                metrics = evaluate_split(reloaded.eval().merge_and_unload(), test, run.plan)
                out["ranked"][f"{score}@{fraction}"] = {
                    "balanced_accuracy": metrics["balanced_accuracy"],
                    "mean_iou": metrics["mean_iou"],
                    "kept": len(exported.kept),
                    "update_bytes": exported.nbytes,
                    "reduction": exported.reduction,
                }
    probe = torch.stack([test[i]["pixel_values"] for i in range(min(4, len(test)))])
    size = run.plan.image_size
    with torch.no_grad():
        set_fold_in_eval(model, False)  # the adapter branches computed as such, not folded on the fly
        unfused = model(pixel_values=probe).logits
        fused = model.merge_and_unload()
        difference = ((fused(pixel_values=probe).logits - unfused).abs().max() / unfused.abs().max()).item()
    save_checkpoint(fused, os.path.join(run.output_dir, "fused"))
    base = UNetForSemanticSegmentation.from_pretrained(source_dir)
    metrics = evaluate_split(fused, test, run.plan)
    out["fusion"] = {
        "max_relative_logit_difference": difference,
        "parameters": count_parameters(fused)[1],
        "base_parameters": count_parameters(base)[1],
        "biases_created": len(fused.config.conv_bias_modules or []),
        "flops": count_flops(fused, (1, 3, size, size)),
        "base_flops": count_flops(base, (1, 3, size, size)),
        "balanced_accuracy": metrics["balanced_accuracy"],
        "mean_iou": metrics["mean_iou"],
    }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args, protocol_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started, out = time.time(), training_args.output_dir
    protocol = Protocol(
        out,
        training_args,
        protocol_args,
        data_settings={
            "image_size": args.image_size,
            "data_split_seed": args.scene_seed,
            "max_train_samples": args.target_train_samples,
            "max_eval_samples": args.test_samples,
        },
    )
    results: dict = {"settings": {"recipe": dataclasses.asdict(args), "protocol": dataclasses.asdict(protocol_args)}}

    # 1. pretrain on the source domain
    source_dir = args.source_model
    if source_dir is None:
        labels = dict(ROCK_LABELS)
        config = UNetConfig(
            encoder_name=args.encoder_name,
            encoder_pretrained=args.encoder_pretrained,
            decoder_channels=args.decoder_channels,
            num_labels=len(labels),
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
        source_dir, source = protocol.pretrain(
            lambda: UNetForSemanticSegmentation(config),
            "embedded:rocks/source",
            learning_rate=args.pretrain_learning_rate,
            epochs=args.pretrain_epochs,
            max_train_samples=args.source_train_samples,
        )
        results["source"] = {"test": source["test"]}
    results["targets"] = {}

    for domain in args.target_domains:
        dataset = f"embedded:rocks/{domain}"
        rows = {"no adaptation": protocol.evaluate(source_dir, dataset)}  # 2. no adaptation
        for method in args.methods:  # 3-5. adapt (rank and fuse the conv adapters)
            on_run = measure
            if method == "conv_adapter":
                on_run = lambda run: rank_and_fuse(run, args, source_dir)  # noqa: E731
            rows[method] = protocol.compare(
                domain, method, source_dir, dataset, method, epochs=args.adapt_epochs, on_run=on_run
            )
        results["targets"][domain] = rows
        if "conv_adapter" in rows:
            plot(rows, domain, os.path.join(out, f"pareto_{domain}.png"))

    results["runtime_seconds"] = time.time() - started
    table = markdown_table(results)
    protocol.write(results, table)
    print(table)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
NAMES = {
    "no adaptation": "no adaptation (source model)",
    "full": "full fine-tuning",
    "decoder": "decoder-only tuning",
    "conv_adapter": "conv adapters (BN + 1x1 conv)",
    "bn_adapter": "BN-only adapters",
}


def plot(rows: dict, domain: str, path: str) -> None:
    ranked = rows["conv_adapter"]["extras"]["ranked"]
    curves: dict[str, list] = {}
    for key, row in ranked.items():
        curves.setdefault(key.split("@")[0], []).append(
            (row["update_bytes"]["mean"], row["balanced_accuracy"]["mean"])
        )
    references = {"no adaptation": rows["no adaptation"]["balanced_accuracy"]}
    references["all conv adapters"] = rows["conv_adapter"]["test"]["balanced_accuracy"]["mean"]
    if "full" in rows:
        references["full fine-tuning"] = rows["full"]["test"]["balanced_accuracy"]["mean"]
    seeds = len(rows["conv_adapter"]["seeds"])
    title = f"Ranked conv adapters on {domain} (mean of {seeds} seed{'s' if seeds > 1 else ''})"
    plot_pareto(curves, path, references=references, title=title)


def markdown_table(results: dict) -> str:
    protocol = results["settings"]["protocol"]
    lines = []
    if "source" in results:
        source = results["source"]["test"]
        lines += [
            f"Source model on source test: balanced accuracy {source['balanced_accuracy']:.3f}, mIoU "
            f"{source['mean_iou']:.3f}.",
            "",
        ]
    lines += [
        f"Mean ± std over {protocol['seeds']} seed(s) on the test split; each method's learning rate chosen from "
        f"{protocol['learning_rates']} on validation scenes carved from the target train split.",
        "",
    ]
    for domain, rows in results["targets"].items():
        lines += [
            f"### Target: {domain}",
            "",
            "| method | lr | trainable params % | update size (bytes) | balanced accuracy | mIoU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        zero = rows["no adaptation"]
        lines.append(
            f"| {NAMES['no adaptation']} | - | 0.00 | 0 | {fmt(zero['balanced_accuracy'])} | {fmt(zero['mean_iou'])} |"
        )
        for method, row in rows.items():
            if method == "no adaptation":
                continue
            lines.append(
                f"| {NAMES.get(method, method)} | {row['learning_rate']:g} | {row['trainable_percent']:.2f} | "
                f"{row['extras']['update_bytes']['mean']:,.0f} | {fmt(row['test']['balanced_accuracy'])} | "
                f"{fmt(row['test']['mean_iou'])} |"
            )
        extras = rows.get("conv_adapter", {}).get("extras", {})
        for key, row in extras.get("ranked", {}).items():
            score, fraction = key.split("@")
            lines.append(
                f"| conv adapters, top {100 * float(fraction):.0f}% by {score} ({row['kept']['mean']:.0f} kept, "
                f"{100 * row['reduction']['mean']:.1f}% smaller) | - | - | {row['update_bytes']['mean']:,.0f} | "
                f"{fmt(row['balanced_accuracy'])} | {fmt(row['mean_iou'])} |"
            )
        fusion = extras.get("fusion")
        if fusion:
            lines += [
                f"| conv adapters fused (merge_and_unload) | - | - | - | {fmt(fusion['balanced_accuracy'])} | "
                f"{fmt(fusion['mean_iou'])} |",
                "",
                f"Fusion: max relative logit difference {max(fusion['max_relative_logit_difference']['values']):.1e} "
                f"(largest over seeds); parameters {fusion['parameters']['mean']:,.0f} vs base "
                f"{fusion['base_parameters']['mean']:,.0f} ({fusion['biases_created']['mean']:.0f} conv biases "
                f"created); FLOPs {fusion['flops']['mean']:,.0f} vs base {fusion['base_flops']['mean']:,.0f}.",
            ]
        bias = extras.get("size_bias_spearman")
        if bias:
            lines.append(
                "Spearman correlation of each ranking score with adapter size (negative: favours small layers): "
                + ", ".join(f"{k} {fmt(v, 2)}" for k, v in bias.items())
                + "."
            )
        lines += ["", "Learning-rate selection (validation mIoU, first seed):", ""]
        for method, row in rows.items():
            if method != "no adaptation":
                scores = ", ".join(f"{lr}: {value:.3f}" for lr, value in row["selection"]["scores"].items())
                lines.append(f"- {NAMES.get(method, method)}: {scores} -> {row['learning_rate']:g}")
        lines.append("")
    lines.append(f"Runtime: {results['runtime_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 001 at CPU scale: adapt a small Mask2Former to shifted rock-instance domains with sequential adapters and
LoRA on deformable attention.

A protocol over ``peft-vision train`` (:mod:`peft_vision_ext.train.protocol`, ``task="instance"``):

1. Pretrain a small Mask2Former (Swin backbone, multi-scale deformable-attention pixel decoder, masked-attention
   decoder) in full on the source domain's rock instances (classes "rock" and "boulder").
2. Evaluate it on each target domain without adaptation (zero-shot).
3. Adapt it to each target domain with decoder-only ("conventional") tuning, 1-3 sequential adapters per block, LoRA
   on deformable attention, both together, and full fine-tuning. Each method's learning rate is chosen by COCO mask
   AP on validation scenes carved from the target train split (the same grid for every method), then every seed
   trains with it: mask AP and AP50 on the target test split (mean ± std over seeds) against the trainable share.

Writes ``results.json``, ``results.md`` and ``ap_vs_trainable.png`` to ``--output_dir`` (a non-empty one only with
``--overwrite_output_dir``), with every run's ``peft-vision train`` outputs under ``<domain>/<method>/``.

    python recipes/mask2former_instance/run_mask2former_instance.py recipes/mask2former_instance/mask2former_instance.json
    python recipes/mask2former_instance/run_mask2former_instance.py --output_dir outputs/m2f_quick --quick
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from transformers import Mask2FormerForUniversalSegmentation, TrainingArguments

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import MASK2FORMER_ADAPTATION_METHODS, mask2former_method_settings
from peft_vision_ext.analysis.plots import pareto_front, plot_score_vs_trainable
from peft_vision_ext.data import ROCK_INSTANCE_LABELS
from peft_vision_ext.models import small_mask2former_config
from peft_vision_ext.train.protocol import Protocol, ProtocolArguments, fmt, mean_std, parse_recipe_args


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
    target_train_samples: int = field(
        default=80, metadata={"help": "Training scenes per target domain (validation is carved out of them)."}
    )
    test_samples: int = field(default=64, metadata={"help": "Test scenes per domain."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the scene generator and of the validation carve."})


@dataclass
class PeftArguments:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to compare."})
    source_model: str | None = field(
        default=None, metadata={"help": "Directory of an already pretrained source Mask2Former: skips step 1."}
    )
    pretrain_epochs: float = field(default=16, metadata={"help": "Source pretraining epochs."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Source pretraining learning rate."})
    adapt_epochs: float = field(default=5, metadata={"help": "Epochs per adaptation run (every method)."})
    adapter_dim: int = field(default=16, metadata={"help": "Bottleneck size of the sequential adapters."})
    r: int = field(default=8, metadata={"help": "LoRA rank of the deformable-attention projections."})
    both_adapters_per_block: int = field(
        default=2, metadata={"help": "Adapters per block of 'deform_lora+seq_adapter'."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny run for tests (about a minute)."})


# The learning-rate grid every method is tuned over (chosen on validation), and the seeds.
PROTOCOL_DEFAULTS = {"learning_rates": [1e-3, 3e-3, 1e-2], "seeds": 3}

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
    "target_train_samples": 10,
    "test_samples": 4,
    "pretrain_epochs": 1,
    "adapt_epochs": 1,
    "learning_rates": [1e-3, 1e-2],
    "seeds": 1,
}


# Training-time augmentation of every run: horizontal flips only (the runner's default scale-crop and jitter cost this
# small model 0.08 source AP after 20 pretraining epochs: 0.12 instead of 0.20).
AUGMENTATION = {"min_scale": 1.0, "max_scale": 1.0, "brightness": 0.0, "contrast": 0.0}


def parse_args(argv: list[str] | None = None):
    parser, (model_args, data_args, peft_args, protocol_args, training_args) = parse_recipe_args(
        (ModelArguments, DataArguments, PeftArguments, ProtocolArguments, TrainingArguments),
        argv,
        default_output_dir="outputs/mask2former_instance",
        quick=QUICK,
        defaults=PROTOCOL_DEFAULTS,
    )
    unknown = sorted(set(peft_args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods got {unknown}; choose from {list(METHODS)}")
    return model_args, data_args, peft_args, protocol_args, training_args


def runner_method(method: str, peft_args: PeftArguments) -> tuple[str, dict]:
    """``peft-vision train``'s method and PEFT settings for one of :data:`METHODS` (the PEFT methods also train the
    class head, the runner's default ``modules_to_save`` for Mask2Former)."""
    settings = mask2former_method_settings(
        method, adapter_dim=peft_args.adapter_dim, r=peft_args.r, adapters_per_block=peft_args.both_adapters_per_block
    )
    if method.startswith("seq_adapter_"):
        return "seq_adapter", {**settings, "adapters_per_block": int(method.rsplit("_", 1)[1])}
    return method, settings


# ----------------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, peft_args, protocol_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started, out = time.time(), training_args.output_dir
    protocol = Protocol(
        out,
        training_args,
        protocol_args,
        task="instance",
        data_settings={
            "image_size": model_args.image_size,
            "data_split_seed": data_args.scene_seed,
            "max_train_samples": data_args.target_train_samples,
            "max_eval_samples": data_args.test_samples,
            **AUGMENTATION,
        },
    )
    settings = {"model": model_args, "data": data_args, "peft": peft_args, "protocol": protocol_args}
    results: dict = {"settings": {key: dataclasses.asdict(value) for key, value in settings.items()}}

    # 1. pretrain on the source domain
    source_dir = peft_args.source_model
    if source_dir is None:
        config = small_mask2former_config(id2label=ROCK_INSTANCE_LABELS, **dataclasses.asdict(model_args))
        source_dir, source = protocol.pretrain(
            lambda: Mask2FormerForUniversalSegmentation(config),
            f"embedded:rock_instances/{data_args.source_domain}",
            learning_rate=peft_args.pretrain_learning_rate,
            epochs=peft_args.pretrain_epochs,
            max_train_samples=data_args.source_train_samples,
        )
        results["source"] = {"test": source["test"], "train_runtime": source["train"].get("train_runtime")}
    results["targets"] = {}

    for domain in data_args.target_domains:
        dataset = f"embedded:rock_instances/{domain}"
        rows = results["targets"].setdefault(domain, {})
        for method in peft_args.methods:
            if method == "zero_shot":  # 2. no adaptation
                rows[method] = protocol.evaluate(source_dir, dataset)
                continue
            name, peft = runner_method(method, peft_args)  # 3. learning rate on validation, then every seed
            rows[method] = protocol.compare(
                domain, method, source_dir, dataset, name, epochs=peft_args.adapt_epochs, peft=peft
            )

    results["summary"] = summarise(results, peft_args.methods)
    if results["summary"]["panels"]:
        plot(results, os.path.join(out, "ap_vs_trainable.png"))
    results["runtime_seconds"] = time.time() - started
    table = markdown_table(results)
    protocol.write(results, table)
    print(table)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def summarise(results: dict, methods: list[str]) -> dict:
    """Per method: trainable %, mask AP averaged over the target domains (mean ± std over seeds); per domain and over
    the domains: the Pareto front of mean AP against trainable % (zero-shot, which trains nothing, left out)."""
    targets = results["targets"]
    out: dict = {"methods": {}, "panels": {}, "pareto_front": {}}
    for method in methods:
        rows = [rows[method] for rows in targets.values()]
        if method == "zero_shot":
            out["methods"][method] = {
                "trainable_percent": 0.0,
                "map": mean_std([sum(r["map"] for r in rows) / len(rows)]),
            }
            continue
        per_seed = [sum(values) / len(values) for values in zip(*(r["test"]["map"]["values"] for r in rows))]
        out["methods"][method] = {"trainable_percent": rows[0]["trainable_percent"], "map": mean_std(per_seed)}
    trained = [m for m in methods if m != "zero_shot"]
    panels = {
        d: {TITLES[m]: (rows[m]["trainable_percent"], rows[m]["test"]["map"]["mean"]) for m in trained}
        for d, rows in targets.items()
    }
    if trained and len(targets) > 1:
        panels["mean over domains"] = {
            TITLES[m]: (out["methods"][m]["trainable_percent"], out["methods"][m]["map"]["mean"]) for m in trained
        }
    if trained:
        out["panels"] = panels
        out["pareto_front"] = {panel: pareto_front(points) for panel, points in panels.items()}
    return out


def plot(results: dict, path: str) -> None:
    summary, targets = results["summary"], results["targets"]
    references = {d: {"zero-shot": rows["zero_shot"]["map"]} for d, rows in targets.items() if "zero_shot" in rows}
    if "zero_shot" in summary["methods"] and "mean over domains" in summary["panels"]:
        references["mean over domains"] = {"zero-shot": summary["methods"]["zero_shot"]["map"]["mean"]}
    seeds = results["settings"]["protocol"]["seeds"]
    plot_score_vs_trainable(
        summary["panels"],
        path,
        title=f"Mask2Former on rock instances: test mask AP (mean over {seeds} seed(s)) vs. trainable %",
        ylabel="mask AP (COCO, IoU .50:.95)",
        references=references,
    )


def markdown_table(results: dict) -> str:
    protocol, targets, summary = results["settings"]["protocol"], results["targets"], results["summary"]
    domains = list(targets)
    lines = []
    if "source" in results:
        source = results["source"]["test"]
        lines += [f"Source model on the source domain: mask AP {source['map']:.3f}, AP50 {source['map_50']:.3f}", ""]
    selection = next((r["selection"] for rows in targets.values() for r in rows.values() if "selection" in r), None)
    carve = (
        f"{selection['validation_samples']} of the {selection['validation_samples'] + selection['train_samples']}"
        if selection
        else f"{100 * protocol['validation_split_fraction']:.0f}% of the"
    )
    lines += [
        f"Test mask AP and AP50 (COCO, {results['settings']['data']['test_samples']} test scenes per domain), mean ± "
        f"std over {protocol['seeds']} seed(s); mean AP: the domains' average per seed. Each method's learning rate "
        f"(lr, per domain) was chosen from {protocol['learning_rates']} by validation mask AP on {carve} target "
        "train scenes (the rest train).",
        "",
        "| Method | lr | trainable % | " + " | ".join(f"{d} AP | {d} AP50" for d in domains) + " | mean AP |",
        "|---|---|" + "---:|" * (2 * len(domains) + 2),
    ]
    for method, row in summary["methods"].items():
        rows = [targets[d][method] for d in domains]
        if method == "zero_shot":
            rates, cells = "-", [f"{fmt(r['map'])} | {fmt(r['map_50'])}" for r in rows]
        else:
            rates = " / ".join(f"{r['learning_rate']:g}" for r in rows)
            cells = [f"{fmt(r['test']['map'])} | {fmt(r['test']['map_50'])}" for r in rows]
        lines.append(
            f"| {TITLES[method]} | {rates} | {row['trainable_percent']:.2f} | {' | '.join(cells)} | {fmt(row['map'])} |"
        )
    fronts = "; ".join(f"{panel}: {', '.join(front)}" for panel, front in summary["pareto_front"].items())
    lines += ["", f"Pareto front (mean test AP vs. trainable %): {fronts or '-'}", ""]
    lines += ["Learning-rate selection (validation mask AP, first seed; * chosen):", ""]
    rates = [f"{rate:g}" for rate in protocol["learning_rates"]]
    lines += ["| Method | domain | " + " | ".join(f"lr {r}" for r in rates) + " |", "|---|---|" + "---:|" * len(rates)]
    for method in summary["methods"]:
        for domain in domains if method != "zero_shot" else ():
            row = targets[domain][method]
            scores = row["selection"]["scores"]
            chosen = f"{row['learning_rate']:g}"
            cells = [f"{fmt(scores.get(r))}{'*' if r == chosen else ''}" for r in rates]
            lines.append(f"| {TITLES[method]} | {domain} | {' | '.join(cells)} |")
    lines += ["", f"Runtime: {results['runtime_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

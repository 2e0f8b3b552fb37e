#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 002 at CPU scale: adapt a small SAM to shifted domains with LoRA, VPT, VPT-deep, adapters and MoPEFT.

A protocol over ``peft-vision train`` (:mod:`peft_vision_ext.train.protocol`):

1. Pretrain a small SAM (SAM's ViT architecture, narrow and shallow, windowed + global blocks) on the source domain.
2. For each target domain (they differ in class set, sensor look and segment size), compare zero-shot, decoder-only
   tuning, LoRA, VPT, VPT-deep, Adapter, MoPEFT and full fine-tuning (mIoU, trainable %). Each method's learning rate
   is chosen on validation scenes carved from the target train split (the same grid for every method), then every
   seed trains with it (mean ± std over seeds on the target test split).
3. Record MoPEFT's gates on each domain's test set (the seed's Figure 4.2, pooled over seeds), prune + merge MoPEFT
   and re-evaluate.
4. Ablations of r, L and D_mid on the ablation domains (Tables 4.6-4.8), at MoPEFT's chosen learning rate there.

Writes ``results.json``, ``results.md`` and ``gates.png`` to ``--output_dir`` (a non-empty one only with
``--overwrite_output_dir``), with every run's ``peft-vision train`` outputs under ``<domain>/<method>/``.

    python recipes/sam_mopeft/run_sam_mopeft.py recipes/sam_mopeft/sam_mopeft.json [--overwrite_output_dir]
    python recipes/sam_mopeft/run_sam_mopeft.py --output_dir outputs/sam_quick --quick
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext import merge_mergeable, prune_mopeft
from peft_vision_ext.adaptation import SAM_ADAPTATION_METHODS
from peft_vision_ext.analysis import GateTelemetry, collect_gate_statistics, plot_gate_usage
from peft_vision_ext.data import ROCK_LABELS, collate_segmentation
from peft_vision_ext.models import SamForSemanticSegmentation, small_sam_config
from peft_vision_ext.train import evaluate_split
from peft_vision_ext.train.protocol import Protocol, ProtocolArguments, Run, fmt, mean_std, parse_recipe_args
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
ABLATIONS = {"r": "ablation_r", "prefix_length": "ablation_prefix_length", "adapter_dim": "ablation_adapter_dim"}


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
    target_train_samples: int = field(
        default=80, metadata={"help": "Training scenes per target domain (validation is carved out of them)."}
    )
    test_samples: int = field(default=64, metadata={"help": "Test scenes per domain."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the scene generator and of the validation carve."})


@dataclass
class PeftArguments:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to compare."})
    pretrain_epochs: float = field(default=12, metadata={"help": "Source pretraining epochs."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Source pretraining learning rate."})
    adapt_epochs: float = field(default=8, metadata={"help": "Epochs per adaptation run (every method)."})
    r: int = field(default=8, metadata={"help": "LoRA rank (seed default 8)."})
    prefix_length: int = field(default=20, metadata={"help": "Prefix length L (seed default 20)."})
    adapter_dim: int = field(default=16, metadata={"help": "Adapter D_mid (seed: 64 for width 768)."})
    ablation_domains: list[str] = field(default_factory=lambda: ["mars"])
    ablation_r: list[int] = field(default_factory=lambda: [4, 16])
    ablation_prefix_length: list[int] = field(default_factory=lambda: [5, 10])
    ablation_adapter_dim: list[int] = field(default_factory=lambda: [8, 32])
    prune_threshold: float = field(default=0.05, metadata={"help": "prune_mopeft threshold."})
    freeze_tolerance: float = field(default=0.1, metadata={"help": "prune_mopeft gate range counted as constant."})
    calibration_images: int = field(default=16, metadata={"help": "Training images that calibrate the pruning."})
    quick: bool = field(default=False, metadata={"help": "Tiny run for tests (about a minute)."})


# The learning-rate grid every method is tuned over (chosen on validation), and the seeds.
PROTOCOL_DEFAULTS = {"learning_rates": [1e-3, 3e-3, 1e-2], "seeds": 3}

QUICK = {
    "image_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "global_attn_indexes": [1],
    "window_size": 3,
    "decoder_hidden_size": 16,
    "target_domains": ["mars", "moon-boulders"],
    "source_train_samples": 16,
    "target_train_samples": 10,
    "test_samples": 8,
    "pretrain_epochs": 1,
    "adapt_epochs": 1,
    "prefix_length": 4,
    "ablation_domains": ["mars"],
    "ablation_r": [4],
    "ablation_prefix_length": [],
    "ablation_adapter_dim": [],
    "calibration_images": 4,
    "learning_rates": [1e-3, 3e-3],
    "seeds": 1,
}


def parse_args(argv: list[str] | None = None):
    parser, (model_args, data_args, peft_args, protocol_args, training_args) = parse_recipe_args(
        (ModelArguments, DataArguments, PeftArguments, ProtocolArguments, TrainingArguments),
        argv,
        default_output_dir="outputs/sam_mopeft",
        quick=QUICK,
        defaults=PROTOCOL_DEFAULTS,
    )
    unknown = sorted(set(peft_args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods got {unknown}; choose from {list(METHODS)}")
    return model_args, data_args, peft_args, protocol_args, training_args


# ----------------------------------------------------------------------------------------------------------------------
# What the recipe measures on each trained model
# ----------------------------------------------------------------------------------------------------------------------
def encoder_share(run: Run, encoder_parameters: int) -> dict:
    """Trainable share of the image encoder alone (the seed's Table 4.5 counts the ViT; in a width-64 SAM the mask
    decoder, trained by every method but zero-shot, dominates the whole-model share)."""
    trainable = sum(p.numel() for n, p in run.model.named_parameters() if p.requires_grad and "vision_encoder." in n)
    return {"encoder_trainable_percent": 100.0 * trainable / encoder_parameters}


def gates_prune_merge(run: Run, args: PeftArguments, pooled: GateTelemetry, encoder_parameters: int) -> dict:
    """MoPEFT's gates on the test split (also pooled over seeds into ``pooled`` for the plot), then prune on
    calibration images from the training data, merge what folds, and evaluate the result on the test split."""
    out = encoder_share(run, encoder_parameters)
    model, test = run.model.eval(), run.plan.eval_datasets["test"]
    with collect_gate_statistics(model) as gates:
        evaluate_split(model, test, run.plan)
    for block in gates.blocks:
        for method in gates.methods:
            pooled.record(block, "default", method, gates.values(block, method))
    out["gates"] = {"mean": gates.mean_by_method(), "selections": gates.selection_counts()}
    calibration = run.plan.calibration_dataset
    images = collate_segmentation([calibration[i] for i in range(min(args.calibration_images, len(calibration)))])
    device = next(model.parameters()).device
    with torch.no_grad():
        report = prune_mopeft(
            model,
            [images["pixel_values"].to(device)],
            threshold=args.prune_threshold,
            freeze_gates=True,
            freeze_tolerance=args.freeze_tolerance,
        )
        merged = merge_mergeable(model)
    out["pruned"] = {
        "test": evaluate_split(merged, test, run.plan),
        "fully_merged": float(type(merged) is SamForSemanticSegmentation),
        "dropped_sub_methods": float(sum(len(v) for v in report.pruned.values())),
        "frozen_gates": float(sum(len(v) for v in report.frozen.values())),
        "max_rel_change": report.max_rel_change,
        "report": report.to_dict(),
    }
    return out


def chosen_rate(results: dict, domain: str) -> list[float] | None:
    """MoPEFT's chosen learning rate on ``domain`` (the ablations reuse it), or None (then the grid chooses)."""
    rate = results["targets"].get(domain, {}).get("mopeft", {}).get("learning_rate")
    return [rate] if rate is not None else None


# ----------------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------------
def pretrain(protocol: Protocol, model_args: ModelArguments, data_args: DataArguments, args: PeftArguments):
    """Step 1: a fresh small SAM trained in full on the source domain. Returns the checkpoint directory, the source
    run's results and the parameter count of the image encoder (for the encoder's trainable share)."""
    config = small_sam_config(num_labels=len(ROCK_LABELS), id2label=ROCK_LABELS, **dataclasses.asdict(model_args))
    with torch.device("meta"):  # the shapes only: no memory, no random numbers drawn
        encoder_parameters = sum(p.numel() for p in SamForSemanticSegmentation(config).vision_encoder.parameters())
    source_dir, results = protocol.pretrain(
        lambda: SamForSemanticSegmentation(config),
        f"embedded:rocks/{data_args.source_domain}",
        learning_rate=args.pretrain_learning_rate,
        epochs=args.pretrain_epochs,
        max_train_samples=data_args.source_train_samples,
    )
    return source_dir, results, encoder_parameters


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, peft_args, protocol_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    started, out = time.time(), training_args.output_dir
    data_settings = {
        "image_size": model_args.image_size,
        "data_split_seed": data_args.scene_seed,
        "max_train_samples": data_args.target_train_samples,
        "max_eval_samples": data_args.test_samples,
    }
    protocol = Protocol(out, training_args, protocol_args, data_settings=data_settings)
    settings = {"model": model_args, "data": data_args, "peft": peft_args, "protocol": protocol_args}
    results: dict = {"settings": {k: dataclasses.asdict(v) for k, v in settings.items()}, "targets": {}}

    source_dir, source, count = pretrain(protocol, model_args, data_args, peft_args)  # 1.
    results["source"] = {"test": source["test"], "base_parameters": source["base_parameters"]}
    peft = {"r": peft_args.r, "prefix_length": peft_args.prefix_length, "adapter_dim": peft_args.adapter_dim}

    def adapt(domain: str, name: str, method: str, on_run=None, **kwargs) -> dict:
        on_run = on_run or functools.partial(encoder_share, encoder_parameters=count)
        dataset, epochs = f"embedded:rocks/{domain}", peft_args.adapt_epochs
        return protocol.compare(domain, name, source_dir, dataset, method, epochs=epochs, on_run=on_run, **kwargs)

    telemetry: dict[str, GateTelemetry] = {}  # 2-3. every method on every target (MoPEFT: gates, prune + merge)
    for domain in data_args.target_domains:
        rows = results["targets"].setdefault(domain, {})
        for method in peft_args.methods:
            if method == "zero_shot":
                rows[method] = {"test": protocol.evaluate(source_dir, f"embedded:rocks/{domain}")}
            elif method == "mopeft":
                pooled = telemetry.setdefault(domain, GateTelemetry())
                on_run = functools.partial(gates_prune_merge, args=peft_args, pooled=pooled, encoder_parameters=count)
                rows[method] = adapt(domain, method, method, on_run, peft=peft)
            else:
                rows[method] = adapt(domain, method, method, peft=peft if method in MOPEFT_PRESETS else None)

    ablations = results["ablations"] = {}  # 4. r, L, D_mid at MoPEFT's chosen rate on each domain
    for name, values_field in ABLATIONS.items():
        for value in getattr(peft_args, values_field):
            for domain in peft_args.ablation_domains:
                rate = chosen_rate(results, domain)
                row = adapt(domain, f"mopeft_{name}{value}", "mopeft", peft={**peft, name: value}, learning_rates=rate)
                ablations.setdefault(name, {}).setdefault(str(value), {})[domain] = row

    if telemetry:
        title = f"MoPEFT gates on each target domain (test set, pooled over {protocol_args.seeds} seed(s))"
        plot_gate_usage(telemetry, os.path.join(out, "gates.png"), title=title)
    results["runtime_seconds"] = time.time() - started
    table = markdown_table(results)
    protocol.write(results, table)
    print(table)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def test_metrics(row: dict, method: str) -> dict:
    """A method's test metrics on one domain (the pruned+merged model's from MoPEFT's extras); numbers as
    :func:`mean_std` over seeds (zero-shot's single values made so too)."""
    if method == "mopeft_pruned":
        return row["mopeft"]["extras"]["pruned"]["test"]
    if method == "zero_shot":
        test = row[method]["test"]
        return {"mean_iou": mean_std([test["mean_iou"]]), "per_class_iou": test["per_class_iou"]}
    return row[method]["test"]


def class_ious(metrics: dict) -> str:
    """Per-class IoU as ``0.89 / 0.15 / -``: means over the seeds where the class counts (``(k/n)``: in k of n seeds;
    ``-``: in none, the class neither present nor predicted)."""
    cells = []
    for value in metrics["per_class_iou"].values():
        stat = value if isinstance(value, dict) else mean_std([value])
        counted, seeds = sum(v is not None for v in stat["values"]), len(stat["values"])
        cell = "-" if stat["mean"] is None else f"{stat['mean']:.2f}"
        cells.append(cell + (f" ({counted}/{seeds})" if 0 < counted < seeds else ""))
    return " / ".join(cells)


def mean_over_domains(stats: list[dict]) -> dict:
    """Mean over domains of the per-domain means; its std over seeds: per seed the mean over domains, then their
    std (zero-shot has one value per domain)."""
    mean = statistics.fmean(s["mean"] for s in stats)
    per_seed = [statistics.fmean(values) for values in zip(*(s["values"] for s in stats))]
    return {"mean": mean, "std": mean_std(per_seed)["std"], "values": per_seed}


def method_row(results: dict, method: str, domains: list[str]) -> str:
    targets = results["targets"]
    base = method.removesuffix("_pruned")
    stats = [test_metrics(targets[d], method)["mean_iou"] for d in domains]
    if base == "zero_shot":
        lr, share, encoder = "-", 0.0, 0.0
    else:
        first, rates = targets[domains[0]][base], [f"{targets[d][base]['learning_rate']:g}" for d in domains]
        lr = rates[0] if len(set(rates)) == 1 else " / ".join(rates)
        share, encoder = first["trainable_percent"], first["extras"]["encoder_trainable_percent"]["mean"]
    cells = " | ".join(fmt(s) for s in stats)
    return f"| {TITLES[method]} | {lr} | {share:.2f} | {encoder:.2f} | {cells} | {fmt(mean_over_domains(stats))} |"


def markdown_table(results: dict) -> str:
    protocol, targets = results["settings"]["protocol"], results["targets"]
    domains = list(targets)
    methods = [m for m in METHODS if domains and m in targets[domains[0]]]
    if "mopeft" in methods:
        methods.insert(methods.index("mopeft") + 1, "mopeft_pruned")
    grid = ", ".join(f"{r:g}" for r in protocol["learning_rates"])
    source = results["source"]["test"]
    lines = [
        f"Source model on the source domain (test): mIoU {source['mean_iou']:.3f}.",
        "",
        f"Test mIoU, mean ± std over {protocol['seeds']} seed(s). Each method's learning rate is chosen from "
        f"[{grid}] on validation scenes carved ({protocol['validation_split_fraction']:g}) from each target's train "
        "split (lr column: the chosen rate, per domain in column order where they differ). The mean column: mean of "
        "the per-domain means ± std over seeds of the per-seed mean over domains.",
        "",
        "| Method | lr | trainable % (model) | trainable % (encoder) | " + " | ".join(domains) + " | mean |",
        "|---|---|---:|---:|" + "---:|" * (len(domains) + 1),
    ]
    lines += [method_row(results, method, domains) for method in methods]
    classes = " / ".join(ROCK_LABELS.values())
    lines += [
        "",
        f"Per-class test IoU ({classes}; mean over seeds; '-': the class is neither present nor predicted, so it "
        "does not count in the mIoU; a class absent from a domain's masks but predicted counts as 0):",
        "",
        "| Method | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for method in methods:
        cells = " | ".join(class_ious(test_metrics(targets[d], method)) for d in domains)
        lines.append(f"| {TITLES[method]} | {cells} |")
    if "mopeft" in methods:
        lines += gates_table(targets, domains)
    for name, values in results["ablations"].items():
        lines += ablation_table(results, name, values)
    lines += ["", "Learning-rate selection (validation mIoU per rate, first seed; chosen rate last):", ""]
    lines += ["| method | domain | " + " | ".join(f"lr {r:g}" for r in protocol["learning_rates"]) + " | chosen |"]
    lines.append("|---|---|" + "---:|" * (len(protocol["learning_rates"]) + 1))
    for method in methods:
        for domain in domains:
            row = targets[domain].get(method, {})
            if "selection" in row:
                scores = row["selection"]["scores"]
                cells = " | ".join(
                    f"{scores[f'{r:g}']:.3f}" if f"{r:g}" in scores else "-" for r in protocol["learning_rates"]
                )
                lines.append(f"| {TITLES[method]} | {domain} | {cells} | {row['learning_rate']:g} |")
    lines += ["", f"Runtime: {results['runtime_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def gates_table(targets: dict, domains: list[str]) -> list[str]:
    lines = [
        "",
        "MoPEFT's gates on the test split (mean gate per sub-method over blocks and images, mean ± std over seeds; "
        "selected: share of block x image pairs where it has the largest gate) and its pruning (means over seeds):",
        "",
        "| domain | gate lora | gate prefix | gate adapter | selected lora / prefix / adapter | pruned sub-methods | "
        "frozen gates | fully merged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for domain in domains:
        extras = targets[domain]["mopeft"]["extras"]
        gates, pruned = extras["gates"], extras["pruned"]
        means = " | ".join(fmt(gates["mean"].get(m), 2) for m in ("lora", "prefix", "adapter"))
        counts = {m: gates["selections"].get(m, {}).get("mean") or 0.0 for m in ("lora", "prefix", "adapter")}
        total = sum(counts.values()) or 1.0
        selected = " / ".join(f"{100 * c / total:.0f}%" for c in counts.values())
        lines.append(
            f"| {domain} | {means} | {selected} | {pruned['dropped_sub_methods']['mean']:.1f} | "
            f"{pruned['frozen_gates']['mean']:.1f} | {100 * pruned['fully_merged']['mean']:.0f}% of seeds |"
        )
    return lines


def ablation_table(results: dict, name: str, values: dict) -> list[str]:
    domains = sorted({d for row in values.values() for d in row})
    default = results["settings"]["peft"][name]
    lines = [
        "",
        f"Ablation of `{name}` (MoPEFT, test mIoU, mean ± std over seeds; at MoPEFT's chosen learning rate on each "
        "domain, not re-selected; the default row is the MoPEFT row above)",
        "",
        f"| {name} | trainable % (model) | " + " | ".join(domains) + " |",
        "|---|---:|" + "---:|" * len(domains),
    ]
    rows = {str(v): row for v, row in values.items()}
    mopeft = {d: results["targets"][d]["mopeft"] for d in domains if "mopeft" in results["targets"].get(d, {})}
    if len(mopeft) == len(domains):
        rows[f"{default} (default)"] = mopeft
    for value, row in sorted(rows.items(), key=lambda item: float(item[0].split()[0])):
        share = next(iter(row.values()))["trainable_percent"]
        cells = " | ".join(fmt(row[d]["test"]["mean_iou"]) for d in domains)
        lines.append(f"| {value} | {share:.2f} | {cells} |")
    return lines


if __name__ == "__main__":
    main()

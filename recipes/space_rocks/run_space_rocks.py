#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 000 end to end: adapt a rock-segmentation U-Net from a synthetic Moon to real-looking Moon and Mars scenes.

1. Pretrain a U-Net (timm encoder) on the synthetic *source* domain.
2. Evaluate it on each target domain with no adaptation.
3. Adapt on a small target train split: full fine-tuning, decoder-only tuning, conv adapters, BN-only adapters.
4. Rank the conv adapters (Z, RMS and relative-update scores).
5. Keep several fractions (top 66% among them), export each as an adapter directory, reload and evaluate it.
6. Fuse (``merge_and_unload``) and check that the fused model equals the adapter model at the base model's cost.

Writes ``results.json``, ``results.md`` and ``pareto_<domain>.png`` to ``--output_dir`` (a non-empty one only with
``--overwrite_output_dir``).

    python recipes/space_rocks/run_space_rocks.py recipes/space_rocks/space_rocks.json [--overwrite_output_dir]
    python recipes/space_rocks/run_space_rocks.py --output_dir outputs/quick --quick
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments, set_seed

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.adaptation import (
    ADAPTATION_METHODS,
    base_parameter_count,
    count_flops,
    count_parameters,
    evaluate_segmentation,
    percent,
    prepare_for_adaptation,
    set_fold_in_eval,
    update_size_bytes,
)
from peft_vision_ext.analysis import export_adapters, score_adapters, select_adapters, size_bias
from peft_vision_ext.analysis.plots import plot_pareto
from peft_vision_ext.data import ROCK_LABELS, SegmentationTransform, collate_segmentation, load_rock_dataset
from peft_vision_ext.hub import update_model_card
from peft_vision_ext.metrics import make_compute_metrics, preprocess_logits_for_metrics
from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation, save_image_processor
from peft_vision_ext.recipe_utils import atomic_directory, atomic_write_text, parse_recipe_args, run_training_args


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
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


@dataclass
class DataArguments:
    image_size: int = field(default=128, metadata={"help": "Square image size of the embedded rock scenes."})
    source_train_samples: int = field(default=600, metadata={"help": "Source-domain training scenes."})
    target_domains: list[str] = field(
        default_factory=lambda: ["moon-real", "mars"], metadata={"help": "Target domains to adapt to."}
    )
    target_train_samples: int = field(default=80, metadata={"help": "Small target-domain training split."})
    test_samples: int = field(default=100, metadata={"help": "Test scenes per domain."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the procedural scenes."})


@dataclass
class PeftArguments:
    methods: list[str] = field(
        default_factory=lambda: list(ADAPTATION_METHODS),
        metadata={"help": f"Adaptation methods: {ADAPTATION_METHODS}"},
    )
    pretrain_epochs: float = field(default=6.0, metadata={"help": "Source pretraining epochs."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Source pretraining learning rate."})
    adapt_epochs: float = field(default=8.0, metadata={"help": "Target adaptation epochs (every method)."})
    full_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of full fine-tuning."})
    partial_learning_rate: float = field(
        default=3e-3, metadata={"help": "Learning rate of decoder-only tuning and adapters."}
    )
    keep_fractions: list[float] = field(
        default_factory=lambda: [1.0, 0.8, 0.66, 0.5, 0.33, 0.2, 0.1],
        metadata={"help": "Fractions of ranked adapters to keep (step 5)."},
    )
    scores: list[str] = field(
        default_factory=lambda: ["z", "rms", "relative"], metadata={"help": "Ranking scores to compare (step 4)."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny settings for smoke tests (about a minute)."})


QUICK = {
    "image_size": 64,
    "source_train_samples": 24,
    "target_domains": ["mars"],
    "target_train_samples": 8,
    "test_samples": 8,
    "pretrain_epochs": 1.0,
    "adapt_epochs": 1.0,
    "keep_fractions": [1.0, 0.66],
    "scores": ["z", "relative"],
    "encoder_name": "test_resnet",
    "decoder_channels": [32, 16, 16, 8, 8],
}


def parse_args(argv: list[str] | None = None):
    parser, (model_args, data_args, peft_args, training_args) = parse_recipe_args(
        (ModelArguments, DataArguments, PeftArguments, TrainingArguments),
        argv,
        default_output_dir="outputs/space_rocks",
        quick=QUICK,
    )
    unknown = sorted(set(peft_args.methods) - set(ADAPTATION_METHODS))
    if unknown:
        parser.error(f"--methods got {unknown}; choose from {ADAPTATION_METHODS}")
    return model_args, data_args, peft_args, training_args


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
def make_trainer(model, training_args, train_dataset, *, learning_rate, epochs, run_name):
    args = run_training_args(training_args, run_name=run_name, learning_rate=learning_rate, epochs=epochs)
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collate_segmentation,
        compute_metrics=make_compute_metrics(len(ROCK_LABELS), id2label=ROCK_LABELS),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )


def summary(metrics: dict) -> dict:
    keys = ("balanced_accuracy", "mean_iou", "overall_accuracy")
    return {key: float(metrics.get(key, metrics.get(f"eval_{key}", float("nan")))) for key in keys}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, peft_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    started = time.time()
    size = data_args.image_size

    # --- data ---------------------------------------------------------------------------------------------------------
    train_transform = SegmentationTransform(augment=True, seed=training_args.seed)
    eval_transform = SegmentationTransform()

    def split(domain: str, name: str, count: int, transform):
        return load_rock_dataset(domain, name, count, size, seed=data_args.scene_seed).with_transform(transform)

    # --- 1. pretrain on the source domain -----------------------------------------------------------------------------
    source_dir = model_args.source_model or os.path.join(out, "source_model")
    if model_args.source_model is None:
        logger.info("Step 1: pretraining a %s U-Net on the source domain", model_args.encoder_name)
        config = UNetConfig(
            encoder_name=model_args.encoder_name,
            encoder_pretrained=model_args.encoder_pretrained,
            decoder_channels=model_args.decoder_channels,
            num_labels=len(ROCK_LABELS),
            id2label=ROCK_LABELS,
            label2id={v: k for k, v in ROCK_LABELS.items()},
        )
        model = UNetForSemanticSegmentation(config)
        trainer = make_trainer(
            model,
            training_args,
            split("source", "train", data_args.source_train_samples, train_transform),
            learning_rate=peft_args.pretrain_learning_rate,
            epochs=peft_args.pretrain_epochs,
            run_name="pretrain",
        )
        trainer.train()
        with atomic_directory(source_dir, overwrite=True) as temporary:
            model.save_pretrained(temporary)

    def load_source() -> UNetForSemanticSegmentation:
        return UNetForSemanticSegmentation.from_pretrained(source_dir)

    source = load_source()
    evaluate = lambda model, dataset: evaluate_segmentation(  # noqa: E731
        model, dataset, len(ROCK_LABELS), id2label=ROCK_LABELS, batch_size=training_args.per_device_eval_batch_size
    )
    base_params = count_parameters(source)[1]
    flops_base = count_flops(source, (1, 3, size, size))
    results = {
        "settings": {
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "peft": dataclasses.asdict(peft_args),
            "seed": training_args.seed,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
        },
        "base_parameters": base_params,
        "source": {"test": summary(evaluate(source, split("source", "test", data_args.test_samples, eval_transform)))},
        "targets": {},
    }
    logger.info("Source test: %s", results["source"]["test"])

    for domain in data_args.target_domains:
        target_train = split(domain, "train", data_args.target_train_samples, train_transform)
        target_test = split(domain, "test", data_args.test_samples, eval_transform)
        rows = {}

        # --- 2. no adaptation ---------------------------------------------------------------------------------------
        rows["no adaptation"] = {
            **summary(evaluate(source, target_test)),
            "trainable_percent": 0.0,
            "update_bytes": 0,
        }
        logger.info("[%s] Step 2, no adaptation: %s", domain, rows["no adaptation"])

        # --- 3. adapt -----------------------------------------------------------------------------------------------
        adapter_model = None
        for method in peft_args.methods:
            set_seed(training_args.seed)
            model = prepare_for_adaptation(load_source(), method)
            trainable = count_parameters(model)[0]
            lr = peft_args.full_learning_rate if method == "full" else peft_args.partial_learning_rate
            trainer = make_trainer(
                model,
                training_args,
                target_train,
                learning_rate=lr,
                epochs=peft_args.adapt_epochs,
                run_name=f"{domain}-{method}",
            )
            train_output = trainer.train()
            metrics = trainer.evaluate(eval_dataset=target_test)
            method_dir = os.path.join(out, domain, method)
            if isinstance(model, PeftModel):
                with atomic_directory(method_dir, overwrite=True) as temporary:
                    model.save_pretrained(temporary)
                    save_image_processor(model, temporary)
                    update_model_card(
                        temporary,
                        method="conv_adapter",
                        metrics=summary(metrics),
                        dataset_name=f"peft-vision-ext rocks ({domain})",
                        dataset_type="procedural-rocks",
                        model_name=method,
                    )
            rows[method] = {
                **summary(metrics),
                "trainable_params": trainable,
                "trainable_percent": percent(trainable, base_parameter_count(model)),
                "update_bytes": update_size_bytes(model),
                "train_seconds": train_output.metrics.get("train_runtime"),
            }
            logger.info("[%s] Step 3, %s: %s", domain, method, rows[method])
            if method == "conv_adapter":
                adapter_model = model.eval()

        domain_result = {"methods": rows}
        if adapter_model is not None:
            # --- 4. rank ------------------------------------------------------------------------------------------------
            scores = score_adapters(adapter_model)
            domain_result["ranking"] = {
                "size_bias_spearman": {s: size_bias(scores, s) for s in peft_args.scores},
                "adapters": [{"module": s.module, "numel": s.numel, "nbytes": s.nbytes, **s.scores} for s in scores],
            }

            # --- 5. keep fractions, export, reload, evaluate --------------------------------------------------------
            curves, ranked = {}, {}
            with tempfile.TemporaryDirectory() as tmp:
                for score in peft_args.scores:
                    for fraction in peft_args.keep_fractions:
                        keep = select_adapters(scores, score=score, keep_fraction=fraction)
                        exported = export_adapters(adapter_model, os.path.join(tmp, f"{score}-{fraction}"), keep)
                        reloaded = PeftModel.from_pretrained(load_source(), exported.path).eval()
                        metrics = summary(evaluate(reloaded.merge_and_unload(), target_test))
                        ranked[f"{score}@{fraction}"] = {
                            **metrics,
                            "score": score,
                            "keep_fraction": fraction,
                            "kept": len(exported.kept),
                            "update_bytes": exported.nbytes,
                            "reduction": exported.reduction,
                        }
                        curves.setdefault(score, []).append((exported.nbytes, metrics["balanced_accuracy"]))
                        logger.info(
                            "[%s] Step 5, %s keep %.2f: %s", domain, score, fraction, ranked[f"{score}@{fraction}"]
                        )
            domain_result["ranked"] = ranked
            references = {
                "full fine-tuning": rows.get("full", {}).get("balanced_accuracy"),
                "no adaptation": rows["no adaptation"]["balanced_accuracy"],
            }
            plot_pareto(
                curves,
                os.path.join(out, f"pareto_{domain}.png"),
                references={k: v for k, v in references.items() if v is not None},
                title=f"Ranked conv adapters, {domain}: balanced accuracy vs. update size",
            )

            # --- 6. fuse ------------------------------------------------------------------------------------------------
            probe = torch.stack([target_test[i]["pixel_values"] for i in range(min(4, len(target_test)))])
            with torch.no_grad():
                # Compare with the adapter branches computed as such (not folded into the kernel on the fly).
                set_fold_in_eval(adapter_model, False)
                unfused_logits = adapter_model(pixel_values=probe).logits
                fused = adapter_model.merge_and_unload()
                fused_logits = fused(pixel_values=probe).logits
            with atomic_directory(os.path.join(out, domain, "conv_adapter_fused"), overwrite=True) as temporary:
                fused.save_pretrained(temporary)
            domain_result["fusion"] = {
                "max_relative_logit_difference": (
                    (fused_logits - unfused_logits).abs().max() / unfused_logits.abs().max()
                ).item(),
                "class": type(fused).__name__,
                "parameters": count_parameters(fused)[1],
                "base_parameters": base_params,
                "biases_created": len(fused.config.conv_bias_modules or []),
                "flops": count_flops(fused, (1, 3, size, size)),
                "base_flops": flops_base,
                **summary(evaluate(fused, target_test)),
            }
            logger.info("[%s] Step 6, fusion: %s", domain, domain_result["fusion"])
        results["targets"][domain] = domain_result

    results["runtime_seconds"] = time.time() - started
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    table = markdown_table(results)
    atomic_write_text(os.path.join(out, "results.md"), table)
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


def markdown_table(results: dict) -> str:
    lines = [
        f"Source model on source test: balanced accuracy {results['source']['test']['balanced_accuracy']:.3f}, "
        f"mIoU {results['source']['test']['mean_iou']:.3f}.",
        "",
    ]
    for domain, result in results["targets"].items():
        lines += [
            f"### Target: {domain}",
            "",
            "| method | trainable params % | update size (bytes) | balanced accuracy | mIoU |",
            "|---|---:|---:|---:|---:|",
        ]
        for method, row in result["methods"].items():
            lines.append(
                f"| {NAMES.get(method, method)} | {row['trainable_percent']:.2f} | {row['update_bytes']:,} | "
                f"{row['balanced_accuracy']:.3f} | {row['mean_iou']:.3f} |"
            )
        for row in result.get("ranked", {}).values():
            if row["keep_fraction"] == 1.0 and row["score"] != "z":
                continue
            lines.append(
                f"| conv adapters, top {100 * row['keep_fraction']:.0f}% by {row['score']} ({row['kept']} kept, "
                f"{100 * row['reduction']:.1f}% smaller) | - | {row['update_bytes']:,} | "
                f"{row['balanced_accuracy']:.3f} | {row['mean_iou']:.3f} |"
            )
        fusion = result.get("fusion")
        if fusion:
            lines.append(
                f"| conv adapters fused (merge_and_unload) | - | - | {fusion['balanced_accuracy']:.3f} | "
                f"{fusion['mean_iou']:.3f} |"
            )
            lines += [
                "",
                f"Fusion: max relative logit difference {fusion['max_relative_logit_difference']:.1e}; "
                f"parameters {fusion['parameters']:,} vs base {fusion['base_parameters']:,} "
                f"(+{fusion['parameters'] - fusion['base_parameters']:,}: {fusion['biases_created']} conv biases); "
                f"FLOPs {fusion['flops']:,} vs base {fusion['base_flops']:,}.",
            ]
        bias = result.get("ranking", {}).get("size_bias_spearman")
        if bias:
            lines.append(
                "Spearman correlation of each ranking score with adapter size (negative: favours small layers): "
                + ", ".join(f"{k} {v:+.2f}" for k, v in bias.items())
                + "."
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The run of ``peft-vision train``: check everything, train with ``transformers.Trainer``, evaluate, save.

Two phases. :func:`prepare_run` checks every input (arguments, the model and which methods suit it, every image and
mask or annotation) and loads the model and data; any bad input ends the command there with one ``error:`` line and
exit status 2, before anything is written. :func:`execute` trains and writes:

``--output_dir`` (the layout of ``Trainer.save_model``, so ``--push_to_hub`` uploads a loadable repo):

- the adapter (``adapter_config.json``, ``adapter_model.safetensors``) for the PEFT methods, the whole model
  (``config.json``, ``model.safetensors``) for ``decoder`` and ``full``; ``preprocessor_config.json`` (the image
  processor that resizes and normalises as evaluation did); ``README.md``, the model card with the metrics;
- ``results.json``: metrics per split with the class names (semantic: mIoU, balanced and overall accuracy, IoU and
  accuracy per class; instance: COCO mask AP, AP50, AP75, AR100, AP per class, and the loss), the method, the
  trainable share, the label set, the image size and normalisation, the arguments; written after the model files,
  so its presence means they are complete;
- ``ranked/`` (``--rank_keep_fraction``): the exported top-ranked conv adapters;
- ``merged/`` (``--merge``): the merged model, loadable with ``from_pretrained``; made last (merging unloads the
  adapter) and not pushed;
- Trainer's own ``checkpoint-*`` folders, if ``--save_strategy`` asks for them.

The model files are saved into a hidden staging folder and moved into place file by file (``os.replace``), other
folders through :func:`~peft_vision_ext._files.atomic_directory`, ``results.json`` through a temporary file: an
interrupted run leaves old complete files or new complete ones. Multi-process runs (``accelerate launch -m
peft_vision_ext.train``, ``torchrun -m peft_vision_ext.train``) train and evaluate on every process; the main
process writes, ranks and merges. A non-empty ``--output_dir`` needs ``--overwrite_output_dir``, also to resume from
one of its checkpoints (``--resume_from_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._files import atomic_directory, atomic_write_text, check_output_dir
from ..cli import _one_line, _raise_terminated, _Terminated
from .arguments import (
    DEFAULT_LEARNING_RATES,
    METHODS,
    PEFT_METHOD_CONFIGS,
    ParsedArguments,
    UsageError,
    parse_train_args,
)
from .data import ANNOTATION_FLAGS, default_image_size, load_semantic_splits, resolve_id2label
from .instance_data import load_instance_splits
from .models import (
    ModelInfo,
    build_peft_config,
    check_method,
    default_modules_to_save,
    inspect_model,
    load_model,
    method_settings,
    prepare_model,
)


logger = logging.getLogger("peft_vision_ext.train")

PROG = "peft-vision train"
RESULTS_NAME = "results.json"
STAGING_NAME = ".peft-vision-train-staging"
MERGED_DIR = "merged"
RANKED_DIR = "ranked"
# Methods whose adapters fold into the weights exactly; mopeft does after pruning has frozen or dropped its gates.
MERGEABLE_METHODS = ("conv_adapter", "bn_adapter", "lora", "deform_lora")
RANKABLE_METHODS = ("conv_adapter", "bn_adapter")
# Files of the other kind of model directory, removed from an overwritten --output_dir so that no stale adapter sits
# beside a new whole model (transformers would load the adapter) or the reverse.
_ADAPTER_FILES = re.compile(r"^adapter_(config\.json|model\.(safetensors|bin))$")
_MODEL_FILES = re.compile(r"^(config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?)$")


@dataclass
class Plan:
    """Everything :func:`prepare_run` checked and loaded."""

    args: ParsedArguments
    info: ModelInfo
    data: Any  # SemanticSplits or InstanceSplits
    id2label: dict[int, str]
    id2label_origin: str
    image_size: int
    model: torch.nn.Module
    peft_config: Any
    processor: Any
    train_dataset: Any
    eval_datasets: dict[str, Any]  # "validation" and maybe "test"
    calibration_dataset: Any
    trainable_parameters: int
    base_parameters: int
    output_dir: str


# ----------------------------------------------------------------------------------------------------------------------
# Phase 1: check and load
# ----------------------------------------------------------------------------------------------------------------------
def _check_method_args(args: ParsedArguments) -> None:
    method_args = args.method
    method = method_args.method
    if method not in METHODS:
        raise UsageError(f"`--method` {method!r} is not a method of this command; choose from {', '.join(METHODS)}.")
    if method_args.merge:
        if method in ("decoder", "full"):
            raise ValueError(
                f"`--merge` folds adapters into the model; --method {method} already saves the whole model. Drop "
                "--merge."
            )
        if method == "mopeft" and method_args.prune_calibration_batches < 1:
            raise ValueError(
                "`--merge` with --method mopeft needs pruning first: its gates depend on the input and do not fold "
                "into the weights. Add `--prune_calibration_batches N` (pruning freezes near-constant gates), or use "
                "--method lora."
            )
        if method not in (*MERGEABLE_METHODS, "mopeft"):
            raise ValueError(
                f"`--merge`: --method {method} does not merge (prefixes and bottleneck adapters are not weight "
                f"updates). Methods that merge: {', '.join((*MERGEABLE_METHODS, 'mopeft (after pruning)'))}."
            )
    if method_args.prune_calibration_batches:
        if method_args.prune_calibration_batches < 0:
            raise ValueError(
                f"`--prune_calibration_batches` must be >= 0, got {method_args.prune_calibration_batches}."
            )
        if method != "mopeft":
            raise ValueError(
                f"`--prune_calibration_batches` prunes MoPEFT's gated parts; --method {method} has no gates. Use "
                "--method mopeft, or drop it."
            )
    if method_args.rank_keep_fraction is not None:
        fraction = method_args.rank_keep_fraction
        if method not in RANKABLE_METHODS:
            raise ValueError(
                f"`--rank_keep_fraction` ranks conv adapters; --method {method} has none. Use --method conv_adapter "
                "or bn_adapter, or drop it."
            )
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(
                f"`--rank_keep_fraction` must be in (0, 1], got {fraction!r}; 0.66 keeps the top 66% of the adapters."
            )


def _data_inputs(args: ParsedArguments) -> dict[str, str | None]:
    """The local inputs that ``--output_dir`` must neither be, nor contain, nor lie in."""
    names = ("train_dir", "validation_dir", "test_dir", *ANNOTATION_FLAGS)
    inputs = {f"`--{name}`": getattr(args.data, name) for name in names}
    for label, path in (
        ("`--model_name_or_path`", args.model.model_name_or_path),
        ("`--dataset_name`", args.data.dataset_name),
    ):
        if path and os.path.exists(path):
            inputs[label] = path
    return inputs


def _image_processor(info: ModelInfo, model, size: int, model_args):
    """The processor that prepares images as evaluation did: resize to ``size x size``, rescale, normalise with the
    model's mean and std (the checkpoint's own processor's when it has one that rescales to [0, 1]; else this
    package's :func:`~peft_vision_ext.models.image_processor_for` for its models and Mask2Former; else ImageNet's).
    Semantic models get a ``SegformerImageProcessor``, Mask2Former its own processor."""
    from transformers import AutoImageProcessor, Mask2FormerImageProcessor, SegformerImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ..models import image_processor_for

    mean = std = None
    if info.family in ("unet", "sam", "mask2former"):
        processor = image_processor_for(model)
        mean, std = processor.image_mean, processor.image_std
    if info.family in ("auto", "mask2former"):
        try:
            own = AutoImageProcessor.from_pretrained(info.path, cache_dir=model_args.cache_dir)
        except (OSError, ValueError, KeyError):
            own = None
        if own is not None and getattr(own, "do_rescale", False) and getattr(own, "image_mean", None) is not None:
            mean, std = own.image_mean, own.image_std
    if mean is None:
        logger.info("%s has no image processor: normalising with ImageNet's mean and std.", info.path)
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    settings = dict(
        do_resize=True,
        size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_reduce_labels=False,
    )
    if info.family == "mask2former":
        return Mask2FormerImageProcessor(**settings, ignore_index=255)
    return SegformerImageProcessor(**settings)


def prepare_run(args: ParsedArguments) -> Plan:
    """Check every input and load model and data. Raises ``UsageError``, ``ValueError``, ``TypeError`` or ``OSError``
    naming the argument; nothing is written."""
    from transformers import set_seed

    from ..analysis import base_parameter_count, count_parameters
    from ..data.fixed_size import FixedSizeInstanceTransform, FixedSizeSegmentationTransform

    training_args = args.training
    output_dir = check_output_dir(
        training_args.output_dir,
        inputs=_data_inputs(args),
        overwrite=args.overwrite_output_dir,
        argument="`--output_dir`",
        overwrite_hint="`--overwrite_output_dir`",
    )
    _check_method_args(args)
    method = args.method.method
    settings = method_settings(method, args.peft_settings(), args.method.peft_config)
    info = inspect_model(args.model, args.data.task)
    check_method(info, method)
    peft_config = None
    if method in PEFT_METHOD_CONFIGS:
        try:
            peft_config = build_peft_config(method, settings, default_modules_to_save(info))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"--method {method}: {exc}") from exc

    data_seed = args.data.data_split_seed if args.data.data_split_seed is not None else training_args.seed
    if args.data.task == "semantic":
        data = load_semantic_splits(args.data, args.model, data_seed)
        id2label, origin = resolve_id2label(args.data, data, info.config)
    else:
        data = load_instance_splits(args.data, data_seed)
        id2label, origin = data.id2label, data.id2label_origin
    image_size = args.data.image_size or default_image_size(info.family, info.config, data)

    set_seed(training_args.seed)
    model = load_model(info, args.model, id2label, args.data.ignore_index)
    base_parameters = count_parameters(model)[1]
    model = prepare_model(model, info, method, peft_config)
    if peft_config is not None:
        peft_config = model.peft_config["default"]  # as injection completed it (modules_to_save, target_modules)
    trainable = count_parameters(model)[0]
    if trainable == 0:
        raise ValueError(f"--method {method} leaves nothing to train on this model; choose another method.")
    base_parameters = base_parameter_count(model) if peft_config is not None else base_parameters

    processor = _image_processor(info, model, image_size, args.model)
    data_args = args.data
    common = dict(size=image_size, image_mean=processor.image_mean, image_std=processor.image_std)
    augment = dict(
        train=data_args.augment,
        min_scale=data_args.min_scale,
        max_scale=data_args.max_scale,
        hflip_prob=data_args.hflip_prob,
        vflip_prob=data_args.vflip_prob,
        brightness=data_args.brightness,
        contrast=data_args.contrast,
        seed=training_args.seed,
    )
    if data_args.task == "semantic":
        ignore = dict(ignore_index=data_args.ignore_index)
        train_transform = FixedSizeSegmentationTransform(**common, **augment, **ignore)
        eval_transform = FixedSizeSegmentationTransform(**common, **ignore)
    else:
        train_transform = FixedSizeInstanceTransform(**common, **augment)
        eval_transform = FixedSizeInstanceTransform(**common)
    eval_datasets = {"validation": data.validation.with_transform(eval_transform)}
    if data.test is not None:
        eval_datasets["test"] = data.test.with_transform(eval_transform)
    return Plan(
        args=args,
        info=info,
        data=data,
        id2label=id2label,
        id2label_origin=origin,
        image_size=image_size,
        model=model,
        peft_config=peft_config,
        processor=processor,
        train_dataset=data.train.with_transform(train_transform),
        eval_datasets=eval_datasets,
        calibration_dataset=data.train.with_transform(eval_transform),
        trainable_parameters=trainable,
        base_parameters=base_parameters,
        output_dir=output_dir,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Phase 2: train, evaluate, save
# ----------------------------------------------------------------------------------------------------------------------
def _trainer_class():
    from transformers import Trainer

    class RunnerTrainer(Trainer):
        """``Trainer`` whose model card (written when pushing to the Hub) keeps this package's method and metrics."""

        card_update = None

        def create_model_card(self, *args, **kwargs):
            super().create_model_card(*args, **kwargs)
            if self.card_update is not None and self.is_world_process_zero():
                self.card_update(self.args.output_dir)

    return RunnerTrainer


def _split_metrics(metrics: dict[str, float], prefix: str, id2label: dict[int, str]) -> dict[str, Any]:
    """Metrics named ``<prefix>_<key>`` (Trainer's; ``prefix=""``: plain keys) as ``{mean_iou, balanced_accuracy,
    overall_accuracy, loss, per_class_iou: {name: value}, per_class_accuracy: {name: value}}``."""
    get = lambda key: metrics.get(f"{prefix}_{key}" if prefix else key, float("nan"))  # noqa: E731
    return {
        "mean_iou": get("mean_iou"),
        "balanced_accuracy": get("balanced_accuracy"),
        "overall_accuracy": get("overall_accuracy"),
        "loss": get("loss"),
        "per_class_iou": {name: get(f"iou_{name}") for name in id2label.values()},
        "per_class_accuracy": {name: get(f"accuracy_{name}") for name in id2label.values()},
    }


def _instance_metrics(ap: dict[str, Any], loss: float | None) -> dict[str, Any]:
    """:class:`~peft_vision_ext.metrics.CocoMaskAP`'s results as ``{map, map_50, map_75, mar_100, loss,
    per_class_ap: {name: value}, num_images, num_targets}``; pycocotools' ``-1`` (undefined) as None."""

    def defined(value: float) -> float | None:
        return None if value is None or value < 0 else float(value)

    return {
        **{key: defined(ap[key]) for key in ("map", "map_50", "map_75", "mar_100")},
        "loss": loss,
        "per_class_ap": {name: defined(value) for name, value in ap["map_per_class"].items()},
        "num_images": ap["num_images"],
        "num_targets": ap["num_targets"],
    }


def _mask_ap(model, loader, plan: Plan, gather=None) -> dict[str, Any]:
    from ..metrics import evaluate_instance_segmentation

    return evaluate_instance_segmentation(model, loader, plan.id2label, gather=gather)


def evaluate_split(model, dataset, plan: Plan) -> dict[str, Any]:
    """A split's metrics (``plan.eval_datasets[split]``, transformed as evaluation does) in one process, without
    Trainer (and without loss): semantic ones from
    :func:`~peft_vision_ext.adaptation.evaluate_segmentation`, mask AP from
    :func:`~peft_vision_ext.metrics.evaluate_instance_segmentation`."""
    from torch.utils.data import DataLoader

    from ..analysis import evaluate_segmentation
    from ..data import collate_instance_segmentation

    batch_size = plan.args.training.per_device_eval_batch_size
    if plan.args.data.task == "instance":
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_instance_segmentation)
        return _instance_metrics(_mask_ap(model, loader, plan), None)
    metrics = evaluate_segmentation(
        model,
        dataset,
        len(plan.id2label),
        batch_size=batch_size,
        ignore_index=plan.args.data.ignore_index,
        id2label=plan.id2label,
        device=next(model.parameters()).device,
    )
    return _split_metrics(metrics, "", plan.id2label) | {"loss": None}


def _output_tensor(output) -> torch.Tensor:
    """One tensor of a model's predictions: the logits, or Mask2Former's mask and class logits per query."""
    if getattr(output, "logits", None) is not None:
        return output.logits
    return torch.cat([output.masks_queries_logits.flatten(2), output.class_queries_logits], dim=-1)


def _base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft model (the model itself otherwise)."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def json_safe(value: Any) -> Any:
    """NaN and infinities as None (strict JSON), tuples as lists, other objects as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _masked_argv(argv: Sequence[str]) -> list[str]:
    """The command line with the values of token arguments hidden."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("<hidden>")
            hide = False
            continue
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name.rstrip("_").endswith("token"):
            if "=" in arg:
                out.append(f"{name}=<hidden>")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(arg)
    return out


def _card_metrics(split: dict[str, Any]) -> dict[str, float]:
    if "map" in split:  # instance segmentation
        metrics = {key: split[key] for key in ("map", "map_50", "map_75")}
        metrics.update({f"ap_{name}": value for name, value in split["per_class_ap"].items()})
    else:
        metrics = {key: split[key] for key in ("mean_iou", "balanced_accuracy", "overall_accuracy")}
        metrics.update({f"iou_{name}": value for name, value in split["per_class_iou"].items()})
    return {key: float(value) for key, value in metrics.items() if value is not None and math.isfinite(value)}


def _write_model_card(directory: str, plan: Plan, validation: dict[str, Any]) -> None:
    """The model card: :func:`~peft_vision_ext.hub.update_model_card` for an adapter; a transformers card with the
    same metrics for a whole model (``decoder``, ``full``)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..hub import hub_model_id, update_model_card

    metrics = _card_metrics(validation)
    name = os.path.basename(plan.output_dir)
    if plan.peft_config is not None:
        update_model_card(
            directory,
            method=type(plan.peft_config).method_name,
            config=plan.peft_config,
            metrics=metrics,
            dataset_name=plan.data.source,
            dataset_type="image-segmentation",
            model_name=name,
        )
        return
    base = hub_model_id(plan.info.path)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        base_model=base,
        tags=["peft-vision-ext", f"{plan.args.method.method}-fine-tuning", "image-segmentation"],
        model_name=name,
        eval_results=[
            EvalResult(
                task_type="image-segmentation",
                dataset_type="image-segmentation",
                dataset_name=plan.data.source,
                metric_type=key,
                metric_value=value,
            )
            for key, value in metrics.items()
        ],
    )
    table = "\n".join(f"| {key} | {value:.4f} |" for key, value in metrics.items())
    text = (
        f"# {name}\n\n{type(plan.model).__name__} fine-tuned with `peft-vision train --method "
        f"{plan.args.method.method}` ({'decoder-only tuning' if plan.args.method.method == 'decoder' else 'full fine-tuning'}) "
        f"from `{plan.info.path}` on {plan.data.source}.\n\n## Evaluation results\n\n| metric | value |\n|---|---|\n{table}\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(os.path.join(directory, "README.md"))


def _publish(staging: str, output_dir: str) -> list[str]:
    """Move the files of ``staging`` into ``output_dir`` one by one (each ``os.replace`` is atomic), after removing
    files of the other kind of model directory left by an earlier run. Returns the names moved."""
    names = sorted(os.listdir(staging))
    adapter = "adapter_config.json" in names
    for name in os.listdir(output_dir):
        stale = (_MODEL_FILES if adapter else _ADAPTER_FILES).match(name)
        if stale and name not in names and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    for name in names:
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(source):
            with atomic_directory(target, overwrite=True) as temporary:
                os.rmdir(temporary)
                os.rename(source, temporary)
        else:
            os.replace(source, target)
    return names


def _evaluate(trainer, plan: Plan) -> dict[str, dict[str, Any]]:
    """Every evaluation split through the Trainer (semantic metrics; for instances the loss, then mask AP over the
    Trainer's evaluation loader, gathered across processes)."""
    out = {}
    for split, dataset in plan.eval_datasets.items():
        prefix = "eval" if split == "validation" else split
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
        if plan.args.data.task == "semantic":
            out[split] = _split_metrics(metrics, prefix, plan.id2label)
            continue
        gather = None
        if trainer.accelerator.num_processes > 1:
            gather = lambda records: trainer.accelerator.gather_for_metrics(records, use_gather_object=True)  # noqa: E731
        ap = _mask_ap(trainer.model, trainer.get_eval_dataloader(dataset), plan, gather=gather)
        out[split] = _instance_metrics(ap, metrics.get(f"{prefix}_loss"))
    return out


def _prune(trainer, plan: Plan) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from ..data import collate_segmentation
    from ..tuners.mopeft import prune_mopeft

    method_args = plan.args.method
    model = trainer.model
    device = next(model.parameters()).device
    loader = DataLoader(
        plan.calibration_dataset,
        batch_size=plan.args.training.per_device_eval_batch_size,
        collate_fn=collate_segmentation,
    )
    batches = []
    for batch in loader:
        if len(batches) == method_args.prune_calibration_batches:
            break
        batches.append(batch["pixel_values"].to(device))
    report = prune_mopeft(
        model,
        batches,
        threshold=method_args.prune_threshold,
        freeze_gates=method_args.prune_freeze_gates,
        freeze_tolerance=method_args.prune_freeze_tolerance,
    )
    logger.info("Pruned MoPEFT on %d calibration images: %s", report.calibration_images, report.to_dict())
    return report.to_dict()


def _load_base_for_reuse(plan: Plan):
    """A fresh copy of the checkpoint with the run's label set (for reloading exported adapters)."""
    return load_model(plan.info, plan.args.model, plan.id2label, plan.args.data.ignore_index)


def _rank(model, plan: Plan) -> dict[str, Any]:
    from peft import PeftModel

    from ..analysis import export_adapters, score_adapters, select_adapters

    method_args = plan.args.method
    directory = os.path.join(plan.output_dir, RANKED_DIR)
    scores = score_adapters(model, model=model)
    keep = select_adapters(scores, score=method_args.rank_score, keep_fraction=method_args.rank_keep_fraction)
    exported = export_adapters(model, directory, keep, overwrite=True)
    device = next(model.parameters()).device
    reloaded = PeftModel.from_pretrained(_load_base_for_reuse(plan), directory).to(device).eval()
    metrics = evaluate_split(reloaded, plan.eval_datasets["validation"], plan)
    del reloaded
    return {
        "directory": directory,
        "score": method_args.rank_score,
        "keep_fraction": method_args.rank_keep_fraction,
        "kept": len(exported.kept),
        "dropped": len(exported.dropped),
        "update_bytes": exported.nbytes,
        "full_update_bytes": exported.full_nbytes,
        "reduction": exported.reduction,
        "validation": metrics,
    }


@torch.no_grad()
def _merge(model, plan: Plan) -> dict[str, Any]:
    """Merge the adapter into the model (``merge_and_unload``; MoPEFT through ``merge_mergeable``), compare the
    logits with the adapter's on a validation batch, evaluate, and save the merged model to ``merged/``."""
    from peft import PeftModel

    from ..data import collate_instance_segmentation, collate_segmentation
    from ..tuners.mopeft import merge_mergeable

    model.eval()
    device = next(model.parameters()).device
    validation = plan.eval_datasets["validation"]
    collate = collate_segmentation if plan.args.data.task == "semantic" else collate_instance_segmentation
    probe = collate([validation[i] for i in range(min(4, len(validation)))])["pixel_values"].to(device)
    before = _output_tensor(model(pixel_values=probe))
    merged = merge_mergeable(model) if plan.args.method.method == "mopeft" else model.merge_and_unload(safe_merge=True)
    if isinstance(merged, PeftModel):
        logger.warning(
            "--merge: the pruned MoPEFT adapter still has input-dependent parts (gates that pruning did not freeze, "
            "prefixes or adapters), so it does not merge fully; no merged model is saved. Raise "
            "--prune_freeze_tolerance or --prune_threshold, or train with --method lora."
        )
        return {"merged": False}
    after = _output_tensor(merged(pixel_values=probe))
    difference = (after - before).abs().max().item()
    metrics = evaluate_split(merged, plan.eval_datasets["validation"], plan)
    directory = os.path.join(plan.output_dir, MERGED_DIR)
    with atomic_directory(directory, overwrite=True) as temporary:
        plan.processor.save_pretrained(temporary)  # first: the model keeps a usable processor it finds there
        merged.save_pretrained(temporary)
    return {
        "merged": True,
        "directory": directory,
        "class": type(merged).__name__,
        "max_abs_logit_difference": difference,
        "validation": metrics,
    }


def _results(
    plan: Plan, training_args, evaluation: dict, train_metrics: dict, extra: dict, argv: Sequence[str]
) -> dict[str, Any]:
    args = plan.args
    training = json.loads(training_args.to_json_string())
    for key in list(training):
        if key.endswith("token"):
            training[key] = "<hidden>" if training[key] else None
    model_arguments = dataclasses.asdict(args.model)
    if model_arguments.get("token"):
        model_arguments["token"] = "<hidden>"
    return {
        "task": args.data.task,
        "method": args.method.method,
        "model_name_or_path": args.model.model_name_or_path,
        "model_class": type(_base_of(plan.model)).__name__,
        "model_family": plan.info.family,
        "peft_config": plan.peft_config.to_dict() if plan.peft_config is not None else None,
        "trainable_parameters": plan.trainable_parameters,
        "base_parameters": plan.base_parameters,
        "trainable_percent": 100.0 * plan.trainable_parameters / plan.base_parameters,
        "id2label": {str(k): v for k, v in plan.id2label.items()},
        "id2label_from": plan.id2label_origin,
        "ignore_index": args.data.ignore_index if args.data.task == "semantic" else None,
        "image_size": plan.image_size,
        "image_mean": list(plan.processor.image_mean),
        "image_std": list(plan.processor.image_std),
        "data": {
            "source": plan.data.source,
            "train_samples": len(plan.data.train),
            **({"instances": plan.data.instances} if args.data.task == "instance" else {}),
            "validation_samples": len(plan.data.validation),
            "test_samples": len(plan.data.test) if plan.data.test is not None else 0,
            "validation_held_out": plan.data.validation_held_out,
        },
        "train": train_metrics,
        "num_processes": training_args.world_size,
        **evaluation,
        **extra,
        "arguments": {
            "model": model_arguments,
            "data": dataclasses.asdict(args.data),
            "method": dataclasses.asdict(args.method),
            "peft_settings": args.peft_settings(),
            "training": training,
        },
        "command": [PROG, *_masked_argv(argv)],
    }


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def results_table(results: dict[str, Any]) -> str:
    """The Markdown table printed at the end of a run."""
    names = list(results["id2label"].values())
    if results["task"] == "semantic":
        columns = [
            ("mIoU", "mean_iou"),
            ("balanced accuracy", "balanced_accuracy"),
            ("overall accuracy", "overall_accuracy"),
        ]
        per_class, prefix = "per_class_iou", "IoU"
    else:
        columns = [("mask AP", "map"), ("AP50", "map_50"), ("AP75", "map_75"), ("AR100", "mar_100")]
        per_class, prefix = "per_class_ap", "AP"
    lines = [
        f"{results['method']} on {results['model_class']} ({results['model_name_or_path']}): trainable "
        f"{results['trainable_percent']:.2f}% ({results['trainable_parameters']:,} of {results['base_parameters']:,} "
        f"parameters), {len(names)} classes, images {results['image_size']}x{results['image_size']}",
        "",
        "| model | split | "
        + " | ".join(title for title, _ in columns)
        + " | "
        + " | ".join(f"{prefix} {n}" for n in names)
        + " |",
        "|---|---|" + "---:|" * (len(columns) + len(names)),
    ]

    def row(label: str, split: str, metrics: dict[str, Any]) -> None:
        values = [_fmt(metrics.get(key)) for _, key in columns] + [_fmt(metrics[per_class].get(n)) for n in names]
        lines.append(f"| {label} | {split} | " + " | ".join(values) + " |")

    for split in ("validation", "test"):
        if split in results:
            row(results["method"], split, results[split])
    if results.get("pruned", {}).get("validation_before") is not None:
        row(f"{results['method']} before pruning", "validation", results["pruned"]["validation_before"])
    if "ranked" in results:
        ranked = results["ranked"]
        label = (
            f"ranked: top {100 * ranked['keep_fraction']:.0f}% by {ranked['score']} ({ranked['kept']} kept, "
            f"{100 * ranked['reduction']:.1f}% smaller)"
        )
        row(label, "validation", ranked["validation"])
    if results.get("merged", {}).get("merged"):
        row("merged", "validation", results["merged"]["validation"])
    return "\n".join(lines) + "\n"


def execute(plan: Plan, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Train, evaluate, save; return the results (also written to ``results.json``)."""
    from ..data import collate_instance_segmentation, collate_segmentation
    from ..metrics import make_compute_metrics, preprocess_logits_for_metrics

    args = plan.args
    method = args.method.method
    if args.data.task == "semantic":
        overrides = dict(remove_unused_columns=False, label_names=["labels"], batch_eval_metrics=True)
        task_kwargs = dict(
            data_collator=collate_segmentation,
            compute_metrics=make_compute_metrics(len(plan.id2label), args.data.ignore_index, plan.id2label),
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
    else:  # the Trainer computes the loss; mask AP needs the post-processed masks (see _evaluate)
        overrides = dict(remove_unused_columns=False, label_names=["mask_labels", "class_labels"])
        task_kwargs = dict(data_collator=collate_instance_segmentation)
    if "dataloader_pin_memory" not in args.given and not torch.cuda.is_available():
        overrides["dataloader_pin_memory"] = False  # pinning needs an accelerator; torch warns at every loader
    if "learning_rate" not in args.given:
        overrides["learning_rate"] = DEFAULT_LEARNING_RATES[method]
        logger.info("--learning_rate not given: %g for --method %s", overrides["learning_rate"], method)
    training_args = dataclasses.replace(args.training, **overrides)
    trainer = _trainer_class()(
        model=plan.model,
        args=training_args,
        train_dataset=plan.train_dataset,
        eval_dataset=plan.eval_datasets["validation"],
        processing_class=plan.processor,
        **task_kwargs,
    )
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    evaluation = _evaluate(trainer, plan)
    extra: dict[str, Any] = {}
    if args.method.prune_calibration_batches:
        before = evaluation["validation"]
        extra["pruned"] = _prune(trainer, plan)
        evaluation = _evaluate(trainer, plan)  # the saved adapter is the pruned one: its metrics are the run's
        extra["pruned"]["validation_before"] = before
    validation = evaluation["validation"]

    # --- the model directory ------------------------------------------------------------------------------------
    staging = os.path.join(plan.output_dir, STAGING_NAME)
    main_process = trainer.is_world_process_zero()
    if main_process and os.path.lexists(staging):
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(staging, _internal_call=True)  # not a push of its own: the finished repo is pushed below
        trainer.accelerator.wait_for_everyone()
        if main_process:
            _write_model_card(staging, plan, validation)
            sizes = {n: os.path.getsize(os.path.join(staging, n)) for n in os.listdir(staging) if "safetensors" in n}
            extra["saved_weight_bytes"] = sum(sizes.values())
            _publish(staging, plan.output_dir)
    finally:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)

    model = trainer.model
    if main_process and args.method.rank_keep_fraction is not None:
        extra["ranked"] = _rank(model, plan)
    train_metrics = {key: value for key, value in train_output.metrics.items() if isinstance(value, (int, float))}
    results = json_safe(_results(plan, training_args, evaluation, train_metrics, extra, argv))
    if main_process:
        atomic_write_text(os.path.join(plan.output_dir, RESULTS_NAME), json.dumps(results, indent=2))
    trainer.accelerator.wait_for_everyone()

    if training_args.push_to_hub:
        trainer.card_update = lambda directory: _write_model_card(directory, plan, validation)
        trainer.push_to_hub(commit_message=f"peft-vision train --method {method}")

    if args.method.merge:
        if main_process:
            results["merged"] = json_safe(_merge(model, plan))
            atomic_write_text(os.path.join(plan.output_dir, RESULTS_NAME), json.dumps(results, indent=2))
        trainer.accelerator.wait_for_everyone()
    if main_process:
        print(results_table(results))
        print(f"Outputs in {plan.output_dir}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-vision train``; returns the exit status (0, 2 for bad input, 128 + signal when interrupted).

    Bad input (arguments, data, model, method) prints one ``error:`` line on stderr, before anything is written or
    trained. Errors during training itself are raised with their traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        try:
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
            args = parse_train_args(argv)
            if args.training.log_level != "passive":
                logger.setLevel(args.training.get_process_log_level())
            plan = prepare_run(args)
        except (UsageError, ValueError, TypeError, OSError) as exc:
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        execute(plan, argv)
        return 0
    except (_Terminated, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        print(f"{PROG}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)

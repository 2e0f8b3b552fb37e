#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 001 on the Mask2Former Swin-T COCO-instance architecture (random weights): trainable parameters, training
step time and peak memory of each PEFT method as ratios to full fine-tuning, and inference time of merged and
unmerged deformable LoRA and of sequential adapters as ratios to the base model, all measured in one run.

The model is the architecture of ``facebook/mask2former-swin-tiny-coco-instance`` built from its config
(:func:`swin_tiny_coco_config`, 80 classes) with random weights; nothing is downloaded. The input is a synthetic
batch (``--batch-size`` images of ``--size`` px, random pixels, three random rectangle instances per image with random
classes, fixed seed), the same for every variant.

* **Training** (``model.train()``; one step = ``zero_grad`` + forward with ``mask_labels``/``class_labels`` + loss
  backward + AdamW step on the trainable parameters): ``full`` (every parameter trains), ``decoder`` (backbone frozen,
  pixel decoder + transformer decoder + class head train: the "conventional" fine-tuning of seed 001),
  ``seq_adapter_{1,2,3}`` (``SeqAdapterConfig(adapters_per_block=k)``), ``deform_lora`` (``DeformableLoRAConfig()``)
  and ``deform_lora_seq2`` (``DeformableLoRAConfig(adapters_per_block=2)``); every PEFT variant also trains
  ``class_predictor`` (``modules_to_save``). Trainable % is relative to the base model's parameter count (adapters
  and the trained copy of the head are not part of it; the script checks that the PEFT model's total is exactly base
  + ``iseg_*`` adapter parameters + the ``modules_to_save`` copies).
* **Inference** (``model.eval()``, ``torch.no_grad()``, ``pixel_values`` only): ``base``, ``deform_lora`` (unmerged),
  ``deform_lora_merged`` (``merge_and_unload()`` of that model) and ``seq_adapter_2`` (unmerged; adapters cannot
  merge). The deformable LoRA model is built with ``init_weights=False`` (random ``B``), so its outputs differ from
  the base model's, and the merged model must reproduce them: the script fails unless the max abs difference of the
  class and mask logits is within ``1e-4 * max(1, max |logit|)``, and records it (and the difference to the base
  model, which shows the check is not trivial) in the JSON. Every inference variant is frozen
  (``requires_grad_(False)``), as a deployed model is: ``torch.matmul`` chooses its kernels by its operands'
  ``requires_grad`` flags even under ``no_grad``, so a trainable base would run other kernels than the frozen merged
  model (a few percent apart on CPU) although both are the same network.

Timing method (the helpers of ``timing.py``, shared with ``bench_conv_adapter.py``): every variant of a group is
built up front, runs ``--warmup`` untimed calls (training: these create the AdamW state) and one memory-tracked call;
then ``--repeats`` rounds run the variants round-robin, the order rotated every round, so that drifts of the machine
hit every variant alike. Each call is timed on wall time and on the process's CPU time (all threads). As in
``bench_conv_adapter.py`` (whose docstring says why): OpenMP's wait policy is left to the environment, and training
steps use ``AdamW(fused=True)``, ``transformers.Trainer``'s default optimizer (figures before 2026-12-02 were measured
with ``OMP_WAIT_POLICY=PASSIVE`` and torch's per-tensor AdamW). Reported: median [IQR] over the
rounds, and the median [IQR] of the per-round ratios to the reference (``full``, resp. ``base``). Memory is the peak
of tensor memory during one call: on CPU, the static tensors (parameters, gradients, buffers, AdamW state, batch)
plus the peak of the tensors the call creates, counted by a dispatch mode; on CUDA, the caching allocator's peak, each
variant measured alone on the device (the others parked on the host).

Usage (the JSON goes to ``--output``, ``--markdown`` prints the tables; the CPU run at 256 px takes about 4-5 min
on a 2-core machine, 2 of it building and warming up, and about 35 s per further round)::

    python benchmarks/bench_mask2former.py --size 256 --batch-size 2 --repeats 5 --device cpu \
        --output benchmarks/results/mask2former_cpu_256.json --markdown
    python benchmarks/bench_mask2former.py --size 1024 --batch-size 2 --repeats 5 --device cuda \
        --output benchmarks/results/mask2former_cuda_1024.json --markdown

``--quick`` is a smoke run (a small Mask2Former from ``small_mask2former_config`` at 64 px, 3 classes, bottleneck 8,
1 round) used by ``tests/test_benchmarks_smoke.py``; its figures say nothing about the real model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import get_peft_model
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

import peft_vision_ext  # noqa: F401  (registers the seed-001 tuners with peft)
from peft_vision_ext import DeformableLoRAConfig, SeqAdapterConfig
from peft_vision_ext.models import mask2former_parts, small_mask2former_config

from timing import (  # (a sibling module: this script's folder is on sys.path)
    MIB,
    add_denormal_argument,
    count_params,
    interleaved_times,
    log,
    machine_info,
    make_optimizer,
    measure_memory,
    run_settings,
    synchronizer,
    time_cells,
    timing_report,
)


TRAINING_VARIANTS = (
    "full",
    "decoder",
    "seq_adapter_1",
    "seq_adapter_2",
    "seq_adapter_3",
    "deform_lora",
    "deform_lora_seq2",
)
INFERENCE_VARIANTS = ("base", "deform_lora", "deform_lora_merged", "seq_adapter_2")
HEADS = ["class_predictor"]  # trained in full by every PEFT variant (a new label set needs a new class head)
ADAPTER_PREFIX = "iseg_"  # parameter prefix of both seed-001 tuners (LoRA factors and sequential adapters)
INSTANCES_PER_IMAGE = 3


# --------------------------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------------------------
def swin_tiny_coco_config(num_labels: int = 80) -> Mask2FormerConfig:
    """The architecture of ``facebook/mask2former-swin-tiny-coco-instance`` (random init, ``num_labels`` classes)."""
    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4.0,
        drop_path_rate=0.3,
        use_absolute_embeddings=False,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = {i: f"class_{i}" for i in range(num_labels)}
    return Mask2FormerConfig(
        backbone_config=backbone,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        hidden_dim=256,
        feature_size=256,
        mask_feature_size=256,
        encoder_layers=6,
        decoder_layers=10,
        num_attention_heads=8,
        num_queries=100,
        dim_feedforward=2048,
        encoder_feedforward_dim=1024,
        train_num_points=12544,
    )


def quick_config(size: int, num_labels: int) -> Mask2FormerConfig:
    """A tiny Mask2Former of the same structure for the smoke test."""
    id2label = {i: f"class_{i}" for i in range(num_labels)}
    return small_mask2former_config(
        id2label=id2label,
        image_size=size,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        hidden_dim=32,
        encoder_layers=1,
        decoder_layers=3,
        num_queries=8,
        train_num_points=256,
    )


def build_base(config: Mask2FormerConfig, seed: int) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).eval()


def synthetic_batch(batch_size: int, size: int, num_labels: int, seed: int) -> dict[str, Any]:
    """Random pixels, ``INSTANCES_PER_IMAGE`` random rectangles per image (1/8 to 1/2 of the side) with random
    classes: the ``pixel_values`` / ``mask_labels`` / ``class_labels`` of Mask2Former's training forward."""
    generator = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    masks, classes = [], []
    for _ in range(batch_size):
        mask = torch.zeros(INSTANCES_PER_IMAGE, size, size)
        for index in range(INSTANCES_PER_IMAGE):
            height, width = randint(size // 8, size // 2 + 1), randint(size // 8, size // 2 + 1)
            top, left = randint(0, size - height + 1), randint(0, size - width + 1)
            mask[index, top : top + height, left : left + width] = 1.0
        masks.append(mask)
        classes.append(torch.randint(0, num_labels, (INSTANCES_PER_IMAGE,), generator=generator))
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {"pixel_values": pixel_values, "mask_labels": masks, "class_labels": classes}


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
        for key, value in batch.items()
    }


def batch_tensors(batch: dict[str, Any]) -> list[torch.Tensor]:
    return [batch["pixel_values"], *batch["mask_labels"], *batch["class_labels"]]


def seq_adapter(base: nn.Module, per_block: int, adapter_dim: int, **kwargs: Any) -> nn.Module:
    config = SeqAdapterConfig(adapters_per_block=per_block, adapter_dim=adapter_dim, modules_to_save=HEADS, **kwargs)
    return get_peft_model(copy.deepcopy(base), config)


def deform_lora(base: nn.Module, adapter_dim: int, **kwargs: Any) -> nn.Module:
    config = DeformableLoRAConfig(adapter_dim=adapter_dim, modules_to_save=HEADS, **kwargs)
    return get_peft_model(copy.deepcopy(base), config)


def build_training_variant(name: str, base: nn.Module, adapter_dim: int) -> nn.Module:
    if name in ("full", "decoder"):
        model = copy.deepcopy(base).requires_grad_(True)
        if name == "decoder":
            for module in mask2former_parts(model)["backbone"]:
                module.requires_grad_(False)
    elif name.startswith("seq_adapter_"):
        model = seq_adapter(base, int(name.rpartition("_")[2]), adapter_dim)
    elif name == "deform_lora":
        model = deform_lora(base, adapter_dim)
    elif name == "deform_lora_seq2":
        model = deform_lora(base, adapter_dim, adapters_per_block=2)
    else:
        raise ValueError(f"Unknown training variant {name!r}.")
    return model.train()


def build_inference_variants(base: nn.Module, adapter_dim: int) -> dict[str, nn.Module]:
    # Random B (init_weights=False): the unmerged LoRA changes the outputs, so the merge check below means something.
    unmerged = deform_lora(base, adapter_dim, init_weights=False).eval()
    models = {
        "base": copy.deepcopy(base),
        "deform_lora": unmerged,
        "deform_lora_merged": copy.deepcopy(unmerged).merge_and_unload(),
        "seq_adapter_2": seq_adapter(base, 2, adapter_dim),
    }
    # Every variant frozen, as deployed (see the module docstring): with trainable weights torch.matmul copies some
    # non-contiguous inputs and calls mm where frozen ones get bmm, which would time kernels, not adapters.
    return {name: models[name].eval().requires_grad_(False) for name in INFERENCE_VARIANTS}


def parameter_counts(model: nn.Module, base_total: int) -> dict[str, Any]:
    """Trainable parameters and their share of the base model's parameters (``base_total``).

    The share is relative to the base model's own count, not to the peft model's total (which also holds the
    ``iseg_`` adapter parameters and the trained copies of ``modules_to_save``): the function checks that the peft
    model's total is exactly those three parts, so that nothing is counted twice or missed.
    """
    total = count_params(model)
    trainable = count_params(model, trainable_only=True)
    adapter = sum(p.numel() for n, p in model.named_parameters() if ADAPTER_PREFIX in n)
    saved_copies = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n)
    if total - adapter - saved_copies != base_total:
        raise RuntimeError(
            f"{type(model).__name__}: {total} parameters - {adapter} adapter - {saved_copies} modules_to_save copies "
            f"!= {base_total} base parameters: the trainable share would be relative to the wrong count."
        )
    return {
        "trainable_parameters": trainable,
        "trainable_percent": 100.0 * trainable / base_total,
        "adapter_parameters": adapter,
        "modules_to_save_parameters": saved_copies,
        "total_parameters": total,
    }


# --------------------------------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------------------------------
def inference_call(model: nn.Module, pixel_values: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def call() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            output = model(pixel_values=pixel_values)
        return output.class_queries_logits, output.masks_queries_logits

    return call


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def park(model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    """Move a model and its AdamW state (not the step counters, which stay on the host) to ``device``."""
    model.to(device)
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    state[key] = value.to(device)


def max_abs_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------------------------
def measure_group(
    models: dict[str, nn.Module],
    make_call: Callable[[nn.Module], tuple[Callable[[], Any], torch.optim.Optimizer | None]],
    args: argparse.Namespace,
    device: torch.device,
    batch: list[torch.Tensor],
    reference: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Warm up and memory-track every variant (on CUDA alone on the device), then time them interleaved.

    Returns ``(report, outputs)``: per variant the timing report with ``memory`` added, and the output of the
    memory-tracked call.
    """
    host = torch.device("cpu")
    calls, optimizers, memory, outputs = {}, {}, {}, {}
    for name, model in models.items():
        model.to(device)
        calls[name], optimizers[name] = make_call(model)
        for _ in range(args.warmup):
            calls[name]()
        if optimizers[name] is not None:
            # The step frees the previous gradients first (zero_grad(set_to_none=True)), so they never coexist with
            # the new ones: free them before taking the static memory, or they would be counted twice.
            optimizers[name].zero_grad(set_to_none=True)
        memory[name], output = measure_memory(calls[name], device, model, optimizers[name], batch)
        outputs[name] = output if output is None else tuple(t.to(host) for t in output)  # off the measured device
        if device.type == "cuda":  # the allocator counts everything on the device: measure each variant alone
            model.zero_grad(set_to_none=True)
            park(model, optimizers[name], host)
            torch.cuda.empty_cache()
        log(f"{name}: warmed up, peak {memory[name]['peak_bytes'] / MIB:.0f} MiB")
    if device.type == "cuda":  # all back on the device, and one more untimed call to refill the allocator's cache
        for name, model in models.items():
            park(model, optimizers[name], device)
            calls[name]()
    times = interleaved_times(calls, args.repeats, synchronizer(device))
    report = timing_report(times, reference)
    for name in models:
        ratio = memory[name]["peak_bytes"] / memory[reference]["peak_bytes"]
        report[name]["memory"] = {**memory[name], f"peak_ratio_vs_{reference}": ratio}
    return report, outputs


def bench_training(base: nn.Module, args: argparse.Namespace, device: torch.device, batch: dict[str, Any]):
    base_total = count_params(base)
    models = {name: build_training_variant(name, base, args.adapter_dim) for name in TRAINING_VARIANTS}
    counts = {name: parameter_counts(model, base_total) for name, model in models.items()}

    def make_call(model: nn.Module) -> tuple[Callable[[], None], torch.optim.Optimizer]:
        optimizer = make_optimizer(model)
        return training_step(model, optimizer, batch), optimizer

    report, _ = measure_group(models, make_call, args, device, batch_tensors(batch), "full")
    return {name: {**counts[name], **report[name]} for name in TRAINING_VARIANTS}


def bench_inference(base: nn.Module, args: argparse.Namespace, device: torch.device, batch: dict[str, Any]):
    models = build_inference_variants(base, args.adapter_dim)
    pixel_values = batch["pixel_values"]
    report, outputs = measure_group(
        models, lambda model: (inference_call(model, pixel_values), None), args, device, [pixel_values], "base"
    )
    for name, model in models.items():
        report[name]["parameters"] = count_params(model)
    scale = max(x.abs().max().item() for x in outputs["deform_lora"])
    tolerance = 1e-4 * max(1.0, scale)
    merged_diff = max_abs_diff(outputs["deform_lora_merged"], outputs["deform_lora"])
    report["deform_lora"]["max_abs_diff_vs_base"] = max_abs_diff(outputs["deform_lora"], outputs["base"])
    report["deform_lora_merged"].update(
        max_abs_diff_vs_unmerged=merged_diff,
        max_abs_logit=scale,
        tolerance=tolerance,
        merged_equals_unmerged=merged_diff <= tolerance,
    )
    if merged_diff > tolerance:
        raise RuntimeError(f"merge_and_unload changed the outputs: max abs diff {merged_diff:.3e} > {tolerance:.3e}.")
    return report


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------
CLOCK_NAMES = {"cpu": "CPU time", "wall": "wall time"}


def _table(
    title: str, first: dict[str, Any], entries: dict[str, Any], clocks: tuple[str, ...], unit: str, reference: str
) -> list[str]:
    """A markdown table: the columns of ``first`` (header -> cell per variant), then time and ratio per clock (``unit``
    "s" or "ms"), then peak memory and its ratio to ``reference``."""
    scale, fmt = (1, ".2f") if unit == "s" else (1e3, ".0f")
    headers = [*first, *(f"{CLOCK_NAMES[c]} ({unit}) | {CLOCK_NAMES[c]} ratio" for c in clocks), "peak mem (MiB)"]
    lines = [
        title,
        "",
        "| " + " | ".join([*headers, "mem ratio"]) + " |",
        "|" + "---|" * (len(first) + 2 * len(clocks) + 2),
    ]
    for name, entry in entries.items():
        memory = entry["memory"]
        cells = [cell(name, entry) for cell in first.values()]
        cells += [time_cells(entry, clocks, scale, fmt), f"{memory['peak_bytes'] / MIB:.0f}"]
        lines.append("| " + " | ".join([*cells, f"{memory[f'peak_ratio_vs_{reference}']:.3f}"]) + " |")
    return lines


def to_markdown(data: dict[str, Any]) -> str:
    meta, results = data["meta"], data["results"]
    clocks = ("cpu", "wall") if meta["machine"]["device"] == "cpu" else ("wall",)
    setting = (
        f"{meta['architecture']}, {meta['size']}×{meta['size']}, batch {meta['batch_size']}, {meta['repeats']} "
        f"interleaved rounds, {meta['machine']['torch_threads']} threads"
    )
    lines: list[str] = []
    if "training" in results:
        title = (
            f"Training step (zero_grad + forward with loss + backward + AdamW), {setting}. Times: median [IQR] s. "
            "Ratios: median [IQR] of the per-round ratios to `full`. Trainable % of the base model's parameters. "
            "Peak: tensor memory (static + transient), MiB."
        )
        first = {
            "variant": lambda name, entry: name,
            "trainable": lambda name, entry: f"{entry['trainable_parameters']:,}",
            "trainable %": lambda name, entry: f"{entry['trainable_percent']:.2f}",
        }
        lines += [*_table(title, first, results["training"], clocks, "s", "full"), ""]
    if "inference" in results:
        merged = results["inference"]["deform_lora_merged"]
        title = (
            f"Inference (eval, no_grad, pixel_values only), {setting}. Times: median [IQR] ms. Ratios: median [IQR] "
            "of the per-round ratios to `base`. Merged vs unmerged deformable LoRA: max abs diff "
            f"{merged['max_abs_diff_vs_unmerged']:.2e} (max |logit| {merged['max_abs_logit']:.2e})."
        )
        first = {
            "variant": lambda name, entry: name,
            "parameters": lambda name, entry: f"{entry['parameters']:,}",
        }
        lines += _table(title, first, results["inference"], clocks, "ms", "base")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=None, help="square input size (default 256; 64 with --quick)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--num-labels", "--num_labels", dest="num_labels", type=int, default=None)
    parser.add_argument("--adapter-dim", "--adapter_dim", dest="adapter_dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/mask2former_cpu_256.json")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown on stdout")
    parser.add_argument("--quick", action="store_true", help="smoke run: small Mask2Former, 64 px, 1 round")
    add_denormal_argument(parser)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.num_labels = args.num_labels or (3 if args.quick else 80)
    args.adapter_dim = args.adapter_dim or (8 if args.quick else 64)
    if args.size % 32:
        parser.error(f"--size {args.size} must be a multiple of 32 (the coarsest feature stride).")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = run_settings(args.keep_denormals)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False.")
    start, load_start = time.time(), os.getloadavg()
    config = quick_config(args.size, args.num_labels) if args.quick else swin_tiny_coco_config(args.num_labels)
    base = build_base(config, args.seed)  # stays on the host: every variant is a copy moved to the device
    batch = batch_to(synthetic_batch(args.batch_size, args.size, args.num_labels, args.seed), device)
    data: dict[str, Any] = {
        "meta": {
            "command": "python " + " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "peft_vision_ext": peft_vision_ext.__version__,
            },
            "architecture": "small Mask2Former (--quick)" if args.quick else "Mask2Former Swin-T COCO instance",
            "size": args.size,
            "batch_size": args.batch_size,
            "instances_per_image": INSTANCES_PER_IMAGE,
            "num_labels": args.num_labels,
            "adapter_dim": args.adapter_dim,
            "lora_rank": DeformableLoRAConfig().r,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "seed": args.seed,
            "memory_method": "cuda_allocator" if device.type == "cuda" else "tensor_dispatch_tracker",
            **settings,
        },
        "results": {
            "parameters": {
                "base": count_params(base),
                "parts": {
                    part: sum(count_params(module) for module in modules)
                    for part, modules in mask2former_parts(base).items()
                },
            }
        },
    }
    if not args.skip_inference:
        log("inference: start")
        data["results"]["inference"] = bench_inference(base, args, device, batch)
        gc.collect()
    if not args.skip_training:
        log("training: start")
        data["results"]["training"] = bench_training(base, args, device, batch)
    data["meta"].update(wall_s=time.time() - start, load_average_1m_start_end=[load_start[0], os.getloadavg()[0]])
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(data, indent=1))
        log(f"wrote {output} ({data['meta']['wall_s']:.0f} s)")
    if args.markdown:
        print(to_markdown(data))
    return data


if __name__ == "__main__":
    main()

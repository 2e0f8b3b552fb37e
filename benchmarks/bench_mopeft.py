#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The seed's Table 4.5 on the full SAM ViT-B architecture (random weights): trainable parameters, training step time
and peak memory relative to full fine-tuning, inference time relative to the base model, and our LoRA against stock
peft LoRA on the same ``qkv`` layers.

All variants are timed side by side in one process, interleaved round-robin with the order rotated every round (so
drifts of the machine hit every variant alike); each figure is the median over ``--repeats`` rounds of the process
CPU time (all threads) and wall time. Memory is the peak of tensor storages alive at once (CPU: counted by a dispatch mode; CUDA: the allocator).

    python benchmarks/bench_mopeft.py --size 256 --output benchmarks/results/mopeft_cpu.json
    python benchmarks/bench_mopeft.py --size 1024 --device cuda --output benchmarks/results/mopeft_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_conv_adapter import measure_memory  # noqa: E402

import peft_vision_ext  # noqa: E402,F401
from peft_vision_ext import MoPEFTConfig  # noqa: E402
from peft_vision_ext.models import SamForSemanticSegmentation, small_sam_config  # noqa: E402
from peft_vision_ext.tuners.mopeft.layer import named_mopeft_layers  # noqa: E402


METHODS = {
    "lora": {"use_prefix": False, "use_adapter": False, "gating": False},
    "vpt": {"use_lora": False, "use_adapter": False, "gating": False, "prefix_depth": "shallow"},
    "vpt_deep": {"use_lora": False, "use_adapter": False, "gating": False},
    "adapter": {"use_lora": False, "use_prefix": False, "gating": False},
    "mopeft": {},
}


def build_base(size: int, attn: str, quick: bool = False) -> SamForSemanticSegmentation:
    from transformers import SamConfig

    if quick:  # a small SAM for the smoke test: checks the script, not the figures
        config = small_sam_config(num_labels=3, image_size=size, hidden_size=32, num_hidden_layers=2, window_size=3)
        config.vision_config.global_attn_indexes = [1]
    else:
        config = SamConfig(num_labels=3)  # SAM ViT-B: width 768, 12 blocks, window 14, global blocks 2/5/8/11
    config.vision_config.image_size = size
    config.prompt_encoder_config.image_size = size
    config.prompt_encoder_config.image_embedding_size = size // config.vision_config.patch_size
    config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    torch.manual_seed(0)
    return SamForSemanticSegmentation(config).eval()


def peft_variant(base: nn.Module, method: str, **overrides) -> nn.Module:
    # Encoder-only update, as in the seed's parameter counts: the mask decoder stays frozen here.
    kwargs = {**METHODS[method], "modules_to_save": [], **overrides}
    return get_peft_model(copy.deepcopy(base), MoPEFTConfig(**kwargs))


def stock_lora(base: nn.Module) -> nn.Module:
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"]))


def trainable_share(model: nn.Module, total: int) -> float:
    return 100.0 * sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    for call in calls.values():
        for _ in range(warmup):
            call()
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for round_index in range(repeats):
        # Rotate the order every round, so that no variant always runs first (or right after the same neighbour).
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            c0, w0 = time.process_time(), time.perf_counter()
            call()
            w1, c1 = time.perf_counter(), time.process_time()
            cpu[name].append(c1 - c0)
            wall[name].append(w1 - w0)
    return {k: {"cpu_s": statistics.median(cpu[k]), "wall_s": statistics.median(wall[k])} for k in calls}


def inference_call(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return model(pixel_values=x).logits

    return call


def training_call(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def call():
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss

    return call, optimizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="input size (SAM uses 1024)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--quick", action="store_true", help="a small SAM instead of ViT-B (smoke test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    base = build_base(args.size, args.attn, args.quick).to(device)
    total = sum(p.numel() for p in base.parameters())
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 3, (args.batch_size, args.size, args.size), device=device)

    models = {name: peft_variant(base, name).to(device).eval() for name in METHODS}
    # Pruned + merged MoPEFT. After training, prune_mopeft drops sub-modules whose gates stay closed on a calibration
    # set, freezes near-constant gates and LoRA folds into qkv; what is left is what pruning could not remove.
    calibration = [torch.randn(1, 3, args.size, args.size, device=device)]
    # (a) Worst case, nothing pruned: all gates frozen (random init gives input-independent gates), LoRA merged,
    #     prefixes and adapters still running.
    frozen = peft_variant(base, "mopeft")
    report = peft_vision_ext.prune_mopeft(frozen, calibration, threshold=0.0, freeze_gates=True, freeze_tolerance=1.0)
    models["mopeft_frozen_gates_lora_merged"] = peft_vision_ext.merge_mergeable(frozen).eval()
    # (b) The case pruning is for: the prefix and adapter gates closed in training (here: their gate biases set to
    #     -12, sigmoid = 6e-6, as a trained model whose domain needs only LoRA would have them). prune_mopeft measures
    #     the gates on the calibration image, drops prefix and adapter, freezes G_L; LoRA then merges.
    closed = peft_variant(base, "mopeft")
    for layer in named_mopeft_layers(closed).values():
        gated = layer.mopeft_settings["default"]["gated"]
        with torch.no_grad():
            for method in ("prefix", "adapter"):
                layer.mopeft_gate_out["default"].bias[gated.index(method)] = -12.0
    closed_report = peft_vision_ext.prune_mopeft(
        closed, calibration, threshold=0.05, freeze_gates=True, freeze_tolerance=0.1
    )
    models["mopeft_pruned_to_lora_merged"] = peft_vision_ext.merge_mergeable(closed).eval()
    # (c) LoRA-only trained with gating=False, merged: the base model again.
    models["lora_merged"] = peft_vision_ext.merge_mergeable(peft_variant(base, "lora").eval()).eval()
    models["stock_peft_lora_qkv"] = stock_lora(base).to(device).eval()

    result: dict = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "architecture": "small SAM (--quick)" if args.quick else "SAM ViT-B",
        "size": args.size,
        "batch_size": args.batch_size,
        "attn": args.attn,
        "base_parameters": total,
        "trainable_percent": {name: trainable_share(models[name], total) for name in METHODS},
        "trainable_percent_with_decoder": {
            name: trainable_share(get_peft_model(copy.deepcopy(base), MoPEFTConfig(**METHODS[name])), total)
            for name in METHODS
        },
    }
    result["prune_reports"] = {
        name: {**rep.to_dict(), "fully_merged": type(models[name]) is SamForSemanticSegmentation}
        for name, rep in (
            ("mopeft_frozen_gates_lora_merged", report),
            ("mopeft_pruned_to_lora_merged", closed_report),
        )
    }
    result["trainable_percent"]["stock_peft_lora_qkv"] = trainable_share(models["stock_peft_lora_qkv"], total)

    calls = {"base": inference_call(base, x)} | {name: inference_call(m, x) for name, m in models.items()}
    timings = interleaved(calls, args.repeats)
    result["inference"] = {
        name: {
            **t,
            "cpu_ratio_vs_base": t["cpu_s"] / timings["base"]["cpu_s"],
            "wall_ratio_vs_base": t["wall_s"] / timings["base"]["wall_s"],
        }
        for name, t in timings.items()
    }
    ours, stock = timings["lora"], timings["stock_peft_lora_qkv"]
    result["lora_vs_stock_peft_inference"] = {
        "cpu": ours["cpu_s"] / stock["cpu_s"],
        "wall": ours["wall_s"] / stock["wall_s"],
    }

    if not args.skip_training:
        train_models = {"full_ft": copy.deepcopy(base).requires_grad_(True)}
        train_models["decoder_ft"] = copy.deepcopy(base).requires_grad_(False)
        train_models["decoder_ft"].mask_decoder.requires_grad_(True)
        for name in METHODS:
            train_models[name] = get_peft_model(copy.deepcopy(base), MoPEFTConfig(**METHODS[name])).to(device)
        train_models["stock_peft_lora_qkv"] = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["mask_decoder"]),
        )
        steps, memory = {}, {}
        for name, model in train_models.items():
            model.to(device)
            step, optimizer = training_call(model, x, labels)
            step()  # creates the optimizer state, so memory below is a steady-state step
            memory[name], _ = measure_memory(step, device, model, optimizer, [x, labels])
            steps[name] = step
        train_timings = interleaved(steps, max(2, args.repeats // 2), warmup=0)
        full = train_timings["full_ft"]
        result["training"] = {
            name: {
                **t,
                "cpu_ratio_vs_full": t["cpu_s"] / full["cpu_s"],
                "wall_ratio_vs_full": t["wall_s"] / full["wall_s"],
                "peak_bytes": memory[name]["peak_bytes"],
                "peak_ratio_vs_full": memory[name]["peak_bytes"] / memory["full_ft"]["peak_bytes"],
            }
            for name, t in train_timings.items()
        }
        ours, stock = train_timings["lora"], train_timings["stock_peft_lora_qkv"]
        result["lora_vs_stock_peft_training"] = {
            "cpu": ours["cpu_s"] / stock["cpu_s"],
            "wall": ours["wall_s"] / stock["wall_s"],
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text)
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The seed's Table 4.5 on the full SAM ViT-B architecture (random weights): trainable parameters, training step time
and peak memory relative to full fine-tuning, inference time relative to the base model, and our LoRA against stock
peft LoRA on the same ``qkv`` layers.

All variants are timed side by side in one process, interleaved round-robin with the order rotated every round (so
drifts of the machine hit every variant alike). Reported per variant: median [IQR] of the per-round ratios to the
reference (the base model for inference, full fine-tuning for training), on process CPU time (all threads) and wall
time. Memory is the peak of tensor storages alive at once (CPU: counted by a dispatch mode; CUDA: the allocator).
Training steps use ``timing.make_optimizer`` (``AdamW(fused=True)``, ``transformers.Trainer``'s default optimizer);
figures before 2026-12-02 were measured with torch's default per-tensor AdamW, whose optimizer step on CPU costs full
fine-tuning several times what the fused one does.

    python benchmarks/bench_mopeft.py --size 256 --repeats 20 --output benchmarks/results/mopeft_cpu_256.json --markdown
    python benchmarks/bench_mopeft.py --size 1024 --skip-training --output benchmarks/results/mopeft_cpu_1024.json
    python benchmarks/bench_mopeft.py --size 1024 --device cuda --output benchmarks/results/mopeft_cuda_1024.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_vision_ext  # noqa: F401
from peft_vision_ext import MoPEFTConfig
from peft_vision_ext.models import SamForSemanticSegmentation, small_sam_config
from peft_vision_ext.tuners.mopeft.layer import named_mopeft_layers

from timing import (  # a sibling module
    add_denormal_argument,
    interleaved_times,
    machine_info,
    make_optimizer,
    measure_memory,
    run_settings,
    summarize,
    synchronizer,
    timing_report,
)


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


def inference_call(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return model(pixel_values=x).logits

    return call


def training_call(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    model.train()
    optimizer = make_optimizer(model)

    def call():
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss

    return call, optimizer


def paired_ratio(report: dict, name: str, reference: str) -> dict[str, dict[str, float]]:
    """Median [IQR] of the per-round ratios ``name / reference`` (both timed in the same rounds), per clock."""
    return {
        clock: summarize(
            [a / b for a, b in zip(report[name][clock]["values_s"], report[reference][clock]["values_s"])]
        )
        for clock in ("cpu", "wall")
    }


def _ratio(entry: dict, clock: str = "cpu") -> str:
    ratio = entry[clock]["ratio"]
    return f"{ratio['median']:.2f} [{ratio['q1']:.2f}-{ratio['q3']:.2f}]"


ROWS = (
    ("full_ft", "Full fine-tuning"),
    ("decoder_ft", "Decoder fine-tuning"),
    ("lora", "LoRA (q, v; r=8)"),
    ("vpt", "VPT (L=20, first block)"),
    ("vpt_deep", "VPT-deep (L=20)"),
    ("adapter", "Adapter (D_mid=64)"),
    ("mopeft", "MoPEFT (all three, gated)"),
    ("mopeft_grad_ckpt", "MoPEFT + gradient checkpointing"),
    ("mopeft_frozen_gates_lora_merged", "MoPEFT, gates frozen + LoRA merged, nothing pruned"),
    ("mopeft_pruned_to_lora_merged", "MoPEFT pruned to LoRA (prefix/adapter gates closed) + merged"),
    ("lora_merged", "LoRA merged"),
    ("stock_peft_lora_qkv", "stock peft LoRA on the whole `qkv` (r=8)"),
)


def to_markdown(result: dict) -> str:
    """The table of BENCHMARKS.md: ratios are median [IQR] of per-round ratios, process CPU time."""
    training = result.get("training", {})
    inference = result["inference"]
    lines = [
        "| Method | trainable % (encoder only) | trainable % (+ mask decoder) | train step time / full FT "
        "| train peak memory / full FT | inference time / base |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ROWS:
        if key not in training and key not in inference:
            continue
        share = result["trainable_percent"].get(key)
        with_decoder = result["trainable_percent_with_decoder"].get(key)
        cells = [
            label,
            "" if share is None else f"{share:.2f}",
            "" if with_decoder is None else f"{with_decoder:.2f}",
            _ratio(training[key]) if key in training else "",
            f"{training[key]['memory']['peak_ratio_vs_full']:.2f}" if key in training else "",
            _ratio(inference[key]) if key in inference else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = [("inference", result["lora_vs_stock_peft_inference"])]
    if "lora_vs_stock_peft_training" in result:
        pairs.append(("training", result["lora_vs_stock_peft_training"]))
    lines.append("")
    for what, ratio in pairs:
        cpu = ratio["cpu"]
        lines.append(
            f"Our LoRA / stock peft LoRA, {what}: {cpu['median']:.2f} [{cpu['q1']:.2f}-{cpu['q3']:.2f}] (CPU time)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="input size (SAM uses 1024)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved inference rounds")
    parser.add_argument("--train-repeats", type=int, default=None, help="training rounds (default: repeats // 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--quick", action="store_true", help="a small SAM instead of ViT-B (smoke test)")
    parser.add_argument("--markdown", action="store_true", help="also print the markdown table of BENCHMARKS.md")
    add_denormal_argument(parser)
    args = parser.parse_args(argv)
    settings = run_settings(args.keep_denormals)
    start, load_start = time.time(), os.getloadavg()[0]
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
        "date": datetime.now(timezone.utc).date().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(device),
        **settings,
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
    decoder = sum(p.numel() for p in base.mask_decoder.parameters())
    result["trainable_percent_with_decoder"] |= {"full_ft": 100.0, "decoder_ft": 100.0 * decoder / total}

    sync = synchronizer(device)
    calls = {"base": inference_call(base, x)} | {name: inference_call(m, x) for name, m in models.items()}
    for call in calls.values():  # warm-up
        call()
    result["inference"] = timing_report(interleaved_times(calls, args.repeats, sync), "base")
    result["lora_vs_stock_peft_inference"] = paired_ratio(result["inference"], "lora", "stock_peft_lora_qkv")

    if not args.skip_training:
        train_models = {"full_ft": copy.deepcopy(base).requires_grad_(True)}
        train_models["decoder_ft"] = copy.deepcopy(base).requires_grad_(False)
        train_models["decoder_ft"].mask_decoder.requires_grad_(True)
        for name in METHODS:
            train_models[name] = get_peft_model(copy.deepcopy(base), MoPEFTConfig(**METHODS[name])).to(device)
        # MoPEFT with transformers' gradient checkpointing of the encoder blocks (`gradient_checkpointing=True` in
        # TrainingArguments): memory for recomputation.
        train_models["mopeft_grad_ckpt"] = get_peft_model(copy.deepcopy(base), MoPEFTConfig(**METHODS["mopeft"]))
        checkpointed = train_models["mopeft_grad_ckpt"]
        # transformers >= 5.23 calls it activation_checkpointing_enable (the old name warns); 4.x has the old name.
        (
            getattr(checkpointed, "activation_checkpointing_enable", None)
            or checkpointed.gradient_checkpointing_enable
        )()
        train_models["stock_peft_lora_qkv"] = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["mask_decoder"]),
        )
        steps, memory = {}, {}
        for name, model in train_models.items():
            model.to(device)
            step, optimizer = training_call(model, x, labels)
            step()  # creates the optimizer state, so memory below is a steady-state step
            optimizer.zero_grad(set_to_none=True)  # the step frees old gradients before making new ones
            memory[name], _ = measure_memory(step, device, model, optimizer, [x, labels])
            steps[name] = step
        rounds = args.train_repeats or max(2, args.repeats // 2)
        result["training"] = timing_report(interleaved_times(steps, rounds, sync), "full_ft")
        for name, entry in result["training"].items():
            entry["memory"] = {
                **memory[name],
                "peak_ratio_vs_full": memory[name]["peak_bytes"] / memory["full_ft"]["peak_bytes"],
            }
        result["lora_vs_stock_peft_training"] = paired_ratio(result["training"], "lora", "stock_peft_lora_qkv")
    result["wall_s"] = time.time() - start
    result["load_average_1m_start_end"] = [load_start, os.getloadavg()[0]]
    text = json.dumps(result, indent=2)
    print(text)
    if args.markdown:
        print(to_markdown(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text)
    return result


if __name__ == "__main__":
    main()

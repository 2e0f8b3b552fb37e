# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Benchmark conv adapters (seed 000) on timm U-Nets: inference latency, training step time, memory, params, FLOPs.

What is measured, per encoder (default ``resnet18`` and ``vgg19_bn``, ``num_labels=3``, square ``--size`` input):

* **Inference** (``model.eval()``, ``torch.inference_mode()``), per batch size in ``--batch-sizes``, five variants:
  ``base`` (the plain U-Net), ``unfused`` (peft model, conv adapters on every fusable conv, default eval fast path:
  the adapters folded into the kernel at every call; nothing is cached, so no extra weight copy and never a stale
  kernel), ``unfused_branch`` (``fold_in_eval=False`` on every ``ConvAdapterLayer``: conv + BN + 1x1 conv branch
  per layer), ``fused`` (``merge_and_unload``) and ``lora_unfused`` (stock peft ``LoraConfig`` on the same convs,
  unmerged; see below). The adapters carry random weights and BN statistics (``init_weights=False``; LoRA:
  ``init_lora_weights=False``) so that fused and unfused outputs can be compared (``max_abs_diff_*`` in the JSON).
* **Training** (``model.train()``, one step = ``zero_grad`` + forward with labels + cross-entropy backward + AdamW
  step), per batch size in ``--train-batch-sizes``: ``full_ft`` (plain U-Net, every parameter trainable),
  ``conv_adapter`` (``ConvAdapterConfig(modules_to_save=["segmentation_head"])``; train mode runs the fused autograd
  Function of ``tuners/conv_adapter/_autograd.py``), ``bn_adapter`` (the same with ``adapter_type="bn"``),
  ``conv_adapter_ckpt`` (conv adapters with the U-Net's gradient checkpointing on), ``conv_adapter_plain_bn`` (conv
  adapters with the base's frozen BatchNorms run by PyTorch's own class, which keeps their input for backward,
  instead of ``frozen_bn.py``'s), ``lora`` (stock peft LoRA on the same convs, same head) and ``adapter_floor`` (no
  adapters: the base frozen with its BatchNorms in eval mode, only the first conv's weight and the segmentation head
  trainable, so that backward still runs through the whole network: what a step with adapters that cost nothing
  would cost).
* **Stock LoRA**: ``LoraConfig(r=r, lora_alpha=r, lora_dropout=0, target_modules=<the convs the conv adapters
  adapt>, modules_to_save=["segmentation_head"])`` with one ``r`` for all layers, chosen so that LoRA's adapter
  parameters (``r (C_in k_h k_w + C_out)`` per conv) match the conv adapters' as closely as one ``r`` can. Per-round
  ratios ``conv_adapter / lora`` (training) and ``unfused / lora_unfused`` (inference) are reported.
* **Parameters**: base, trainable with each adapter type, fused (= base + biases created for bias-free convs).
* **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode`` at batch 1: one inference forward per variant (fused
  must equal base exactly), and one training forward+backward per training variant. The counter only counts
  matmul/conv-like ops (no BN, elementwise, pad or add), so the on-the-fly fold of the fast path is invisible to it;
  the 1x1 weight gradients of the fused training path (``bmm``) are counted.

Timing method: every variant of a group (one encoder, one mode, one batch size) is built up front and warmed up
(inference: ``--warmup`` untimed calls, the last of them the memory-tracked call below; training: ``--warmup``
untimed steps, which also create the AdamW state, then the memory-tracked step); then ``--repeats`` rounds run the variants round-robin, the starting variant rotating each round (A B C D, B C D A,
...), so that drift (thermal, other processes on a shared machine) hits every variant alike. Each call is timed on
two clocks: wall time (``time.perf_counter``) and the process's CPU time (``time.process_time``, all threads).
Reported per clock: the median and IQR/min/max over rounds, and the ratio to the reference (``base`` resp.
``full_ft``) as the median [IQR] of the per-round ratios (each round's variant time over the same round's reference
time). Run it on an idle machine: wall time is then the latency to quote. OpenMP's wait policy is left as the
environment sets it, so the default measures what a user gets: libgomp's idle threads spin for a while before they
sleep. ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) keeps the process's CPU time honest on a machine shared
with other CPU-bound jobs, but every parallel region then pays a thread wake-up (on the 2-core VM of 2026-12-02 a
16-channel 4x4 conv's forward and backward took 2.1 ms instead of 0.26 ms), which penalises many small ops and
inflated every variant's time by 20-50 %; figures before 2026-12-02 14:00 UTC were measured that way. CPU time counts a
parallel section once per thread and a serial one once, so CPU-time ratios slightly underweight serial overheads
(Python, small ops). On CUDA every timed call is bracketed by ``torch.cuda.synchronize()`` and only wall time is
meaningful.

The optimizer is ``torch.optim.AdamW(fused=True)``, what ``transformers.Trainer`` uses by default with torch >= 2.8
(``optim="adamw_torch_fused"``). It favours full fine-tuning: on resnet18 the per-tensor loop of ``AdamW()`` takes
75 ms per step for its 14.3 M parameters against 13 ms fused (conv adapters: 17 ms against 2 ms).

Memory method (tensor memory, the CPU analogue of ``torch.cuda.max_memory_allocated``): one extra, untimed call per
variant and group runs under a ``TorchDispatchMode`` that records every tensor storage an op creates and frees it
when the storage dies (weakref finalizer), giving the peak bytes of tensors created during the call and still alive
at the same time ("transient peak": activations, saved tensors, gradients, optimizer temporaries, on-the-fly folded
kernels). To it is added the "static" memory alive when the call starts: the model's parameters and buffers,
the optimizer state (AdamW moments; the tracked training step runs after ``--warmup`` untimed steps, which create
that state) and the input batch; gradients are freed before the tracked step, as its own ``zero_grad`` would, and
are counted in the transient peak. ``peak = static + transient peak``. It is deterministic and independent of the
allocator, but does not see library scratch buffers (oneDNN reorders, workspaces) or allocator fragmentation. On
CUDA the same numbers come from the caching allocator: ``static = memory_allocated()`` before the call,
``peak = max_memory_allocated()`` after ``reset_peak_memory_stats()``.

Optional RSS cross-check (``--rss``, or ``--rss-only`` without timing and FLOPs; CPU/Linux only): for every variant a fresh subprocess of this script imports
torch, releases free heap (``malloc_trim``) and records its RSS, builds the variant, runs ``--warmup`` (+1 for
training) calls, collects garbage and trims again, records RSS, resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), runs one call and reads ``VmHWM``. Reported: the RSS of the built, warmed model
over the post-import baseline, and the peak RSS during the call over that baseline (what the process really held,
including allocator and oneDNN overheads).

Usage (the JSON goes to ``--output``, ``--markdown`` prints the tables). The figures of ``BENCHMARKS.md`` (256 px,
batch 4, 10 inference and 6 training rounds: about 9 min on the 2-core VMs, three quarters of it vgg19_bn), other
batch sizes, the RSS cross-check (about as long) and a CUDA run::

    python benchmarks/bench_conv_adapter.py --size 256 --batch-sizes 4 --train-batch-sizes 4 --repeats 10 \
        --train-repeats 6 --output benchmarks/results/conv_adapter_cpu_256.json --markdown
    python benchmarks/bench_conv_adapter.py --encoders resnet18 vgg19_bn --size 256 --batch-sizes 1 4 \
        --repeats 5 --device cpu --output benchmarks/results/conv_adapter.json --markdown
    python benchmarks/bench_conv_adapter.py --rss-only --encoders resnet18 vgg19_bn --size 256 --batch-sizes 1 4 \
        --output benchmarks/results/conv_adapter_rss.json --markdown
    python benchmarks/bench_conv_adapter.py --device cuda --batch-sizes 1 4 8 --train-batch-sizes 4 8 --markdown

``--quick`` is a smoke run (1 round, tiny defaults) used by ``tests/test_benchmarks_smoke.py``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import peft_vision_ext  # noqa: F401  (registers ConvAdapterConfig with peft)
from peft_vision_ext import ConvAdapterConfig
from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation
from peft_vision_ext.tuners.conv_adapter.frozen_bn import restore_batchnorm_classes
from peft_vision_ext.tuners.conv_adapter.layer import ConvAdapterLayer

from timing import (  # (a sibling module: this script's folder is on sys.path)
    MIB,
    add_denormal_argument,
    count_params,
    interleaved_times,
    log,
    machine_info,
    make_optimizer,
    measure_memory,
    paired_ratio,
    run_settings,
    spread,
    summarize,
    synchronizer,
    time_cells,
    timing_report,
)


INFERENCE_VARIANTS = ("base", "unfused", "unfused_branch", "fused", "lora_unfused")
TRAINING_VARIANTS = (
    "full_ft",
    "conv_adapter",
    "bn_adapter",
    "conv_adapter_ckpt",
    "conv_adapter_plain_bn",
    "lora",
    "adapter_floor",
)
# Per-round ratios between two variants of a group, besides the ratios to the reference.
INFERENCE_PAIRS = (("unfused", "lora_unfused"),)
TRAINING_PAIRS = (
    ("conv_adapter", "lora"),
    ("conv_adapter", "adapter_floor"),
    ("bn_adapter", "adapter_floor"),
    ("conv_adapter", "conv_adapter_plain_bn"),
)
NUM_LABELS = 3


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
def build_base(encoder: str, seed: int) -> UNetForSemanticSegmentation:
    torch.manual_seed(seed)
    return UNetForSemanticSegmentation(UNetConfig(encoder_name=encoder, num_labels=NUM_LABELS))


def adapter_layers(model: nn.Module) -> list[ConvAdapterLayer]:
    return [module for module in model.modules() if isinstance(module, ConvAdapterLayer)]


def set_fold_in_eval(model: nn.Module, value: bool) -> None:
    for layer in adapter_layers(model):
        layer.fold_in_eval = value


def build_peft(base: nn.Module, adapter_type: str = "conv", init_weights: bool = True) -> nn.Module:
    config = ConvAdapterConfig(
        adapter_type=adapter_type, init_weights=init_weights, modules_to_save=["segmentation_head"]
    )
    return get_peft_model(copy.deepcopy(base), config)


def adapted_conv_names(base: nn.Module) -> list[str]:
    """The convs the conv adapters adapt (every fusable conv outside the segmentation head)."""
    return sorted(build_peft(base).peft_config["default"].target_modules)


def lora_rank(base: nn.Module) -> int:
    """One LoRA rank for all adapted convs whose adapter parameter count is closest to the conv adapters'. LoRA's
    count is linear in ``r`` (``lora_A``: ``r x C_in x k_h x k_w``, ``lora_B``: ``C_out x r``, no biases)."""
    conv = build_peft(base)
    target = sum(p.numel() for n, p in conv.named_parameters() if "convadapter_" in n)
    one = build_lora(base, r=1)
    per_rank = sum(p.numel() for n, p in one.named_parameters() if "lora_" in n)
    return max(1, round(target / per_rank))


def build_lora(base: nn.Module, r: int, init_weights: bool = True) -> nn.Module:
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=adapted_conv_names(base),
        modules_to_save=["segmentation_head"],
        init_lora_weights=init_weights,
    )
    return get_peft_model(copy.deepcopy(base), config)


def build_floor(base: nn.Module) -> nn.Module:
    """No adapters: frozen base (BatchNorms kept in eval mode), the first conv's weight and the head trainable, so
    that backward runs through the whole network as it must with an adapter on the first conv."""
    from peft_vision_ext.tuners.conv_adapter import protect_frozen_batchnorm

    model = copy.deepcopy(base)
    model.requires_grad_(False)
    model.segmentation_head.requires_grad_(True)
    first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    first.weight.requires_grad_(True)
    protect_frozen_batchnorm(model)
    return model


def build_inference_variants(base: nn.Module, device: torch.device, r: int) -> dict[str, nn.Module]:
    """The inference variants; the two unfused ones are copies of one adapter model (fold switched)."""
    unfused = build_peft(base, init_weights=False).eval()
    fused = copy.deepcopy(unfused).merge_and_unload().eval()
    branch = copy.deepcopy(unfused)
    models = {
        "base": base.eval(),
        "unfused": unfused,
        "unfused_branch": branch,
        "fused": fused,
        "lora_unfused": build_lora(base, r, init_weights=False).eval(),
    }
    return {name: model.to(device) for name, model in models.items()}


def build_inference_variant(name: str, base: nn.Module, r: int) -> nn.Module:
    if name == "base":
        return base.eval()
    if name == "lora_unfused":
        return build_lora(base, r, init_weights=False).eval()
    unfused = build_peft(base, init_weights=False).eval()
    if name == "fused":
        return unfused.merge_and_unload().eval()
    set_fold_in_eval(unfused, name == "unfused")
    return unfused


def build_training_variant(name: str, base: nn.Module, r: int) -> nn.Module:
    if name == "full_ft":
        model = copy.deepcopy(base)
        model.requires_grad_(True)
    elif name == "conv_adapter":
        model = build_peft(base, "conv")
    elif name == "bn_adapter":
        model = build_peft(base, "bn")
    elif name == "conv_adapter_ckpt":  # conv adapters with the U-Net's gradient checkpointing (encoder + decoder)
        model = build_peft(base, "conv")
        model.gradient_checkpointing_enable()
    elif name == "conv_adapter_plain_bn":  # the base's frozen BatchNorms as PyTorch runs them (they keep their input)
        model = build_peft(base, "conv")
        restore_batchnorm_classes(model)
    elif name == "lora":
        model = build_lora(base, r)
    elif name == "adapter_floor":
        model = build_floor(base)
    else:
        raise ValueError(f"Unknown training variant {name!r}.")
    return model.train()


def inference_call(model: nn.Module, x: torch.Tensor, fold: bool | None) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        if fold is not None:
            set_fold_in_eval(model, fold)
        with torch.inference_mode():
            return model(pixel_values=x).logits

    return call


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()

    return step


# --------------------------------------------------------------------------------------------------------------------
# Timing (the generic helpers are in timing.py)
# --------------------------------------------------------------------------------------------------------------------
def fold_only_call(model: nn.Module) -> Callable[[], None]:
    """What the eval fast path computes besides its convs at every forward: every layer's folded kernel and bias."""
    layers = adapter_layers(model)

    def call() -> None:
        with torch.inference_mode():
            for layer in layers:
                layer.folded_weight([name for name in layer.active_adapters if name in layer.convadapter_bn])

    return call


# --------------------------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------------------------
# RSS cross-check (fresh subprocess per variant)
# --------------------------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: RSS of one built variant and peak RSS during one call (see module docstring)."""
    torch.set_num_threads(spec["threads"])
    _trim_heap()
    baseline = _proc_status_kib("VmRSS")
    base = build_base(spec["encoder"], spec["seed"])
    size, batch_size = spec["size"], spec["batch_size"]
    x = torch.randn(batch_size, 3, size, size)
    if spec["mode"] == "inference":
        model = build_inference_variant(spec["variant"], base, spec["lora_r"])
        del base
        call = inference_call(model, x, None)
        calls = spec["warmup"]
    else:
        model = build_training_variant(spec["variant"], base, spec["lora_r"])
        del base
        labels = torch.randint(0, NUM_LABELS, (batch_size, size, size))
        call = training_step(model, make_optimizer(model), x, labels)
        calls = spec["warmup"] + 1
    for _ in range(max(calls, 1)):
        call()
    _trim_heap()
    before = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        peak_includes_setup = False
    except OSError:
        peak_includes_setup = True
    call()
    if peak_includes_setup:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        peak = _proc_status_kib("VmHWM")
    return {
        "baseline_kib": baseline,
        "model_rss_bytes": (before - baseline) * 1024,
        "peak_rss_bytes": (peak - baseline) * 1024,
        "step_rss_increase_bytes": (peak - before) * 1024,
        "peak_includes_setup": peak_includes_setup,
    }


def run_rss(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--rss-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS worker failed for {spec}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
def bench_encoder(encoder: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    sync = synchronizer(device)
    size = args.size
    result: dict[str, Any] = {}
    base = build_base(encoder, args.seed).to(device)
    r = lora_rank(base)

    # ---- parameters -------------------------------------------------------------------------------------------------
    models = build_inference_variants(base, device, r)
    conv_train = build_training_variant("conv_adapter", base, r)
    bn_train = build_training_variant("bn_adapter", base, r)
    lora_train = build_training_variant("lora", base, r)
    head = count_params(base.segmentation_head)
    params = {
        "base": count_params(base),
        "fused": count_params(models["fused"]),
        "adapted_convs": len(adapter_layers(conv_train)),
        "segmentation_head": head,
    }
    params["fused_created_bias"] = params["fused"] - params["base"]
    for name, model, prefix in (
        ("conv_adapter", conv_train, "convadapter_"),
        ("bn_adapter", bn_train, "convadapter_"),
        ("lora", lora_train, "lora_"),
    ):
        adapter = sum(p.numel() for n, p in model.named_parameters() if prefix in n)
        params[name] = {
            "trainable": count_params(model, trainable_only=True),
            "adapter_only": adapter,
            "trainable_pct_of_base": 100.0 * count_params(model, trainable_only=True) / params["base"],
        }
    params["lora"]["r"] = r
    result["params"] = params
    del conv_train, bn_train, lora_train

    # ---- FLOPs (batch 1) --------------------------------------------------------------------------------------------
    x1 = torch.randn(1, 3, size, size, device=device)
    folds = {"base": None, "unfused": True, "unfused_branch": False, "fused": None, "lora_unfused": None}
    inference_flops = {name: count_flops(inference_call(models[name], x1, folds[name])) for name in INFERENCE_VARIANTS}
    training_flops = {}
    labels1 = torch.randint(0, NUM_LABELS, (1, size, size), device=device)
    for name in TRAINING_VARIANTS:
        model = build_training_variant(name, base, r).to(device)

        def forward_backward(model: nn.Module = model) -> None:
            model(pixel_values=x1, labels=labels1).loss.backward()

        training_flops[name] = count_flops(forward_backward)
        del model
    result["flops"] = {
        "batch_size": 1,
        "inference": inference_flops,
        "fused_equals_base": inference_flops["fused"] == inference_flops["base"],
        "training_forward_backward": training_flops,
    }
    log(f"{encoder}: params and FLOPs done")

    # ---- inference --------------------------------------------------------------------------------------------------
    result["inference"] = {}
    for batch_size in args.batch_sizes:
        x = torch.randn(batch_size, 3, size, size, device=device)
        calls = {name: inference_call(models[name], x, folds[name]) for name in INFERENCE_VARIANTS}
        memory, outputs = {}, {}
        for name, call in calls.items():
            for _ in range(args.warmup - 1):
                call()
            memory[name], outputs[name] = measure_memory(call, device, models[name], None, [x])
        times = interleaved_times(calls, args.repeats, sync)
        group = timing_report(times, "base")
        group["pairs"] = {f"{a}/{b}": paired_ratio(times, a, b) for a, b in INFERENCE_PAIRS}
        for name in INFERENCE_VARIANTS:
            group[name]["memory"] = memory[name]
            group[name]["memory"]["peak_ratio_vs_base"] = memory[name]["peak_bytes"] / memory["base"]["peak_bytes"]
        ref = outputs["unfused_branch"].float()
        group["max_abs_diff_fused_vs_branch"] = (outputs["fused"].float() - ref).abs().max().item()
        group["max_abs_diff_fast_vs_branch"] = (outputs["unfused"].float() - ref).abs().max().item()
        group["max_abs_logit"] = ref.abs().max().item()
        result["inference"][f"bs{batch_size}"] = group
        del outputs
        log(f"{encoder}: inference bs{batch_size} done")

    fold = fold_only_call(models["unfused"])
    fold()
    fold_times = interleaved_times({"fold": fold}, max(args.repeats, 5), sync)["fold"]
    reference = result["inference"][f"bs{args.batch_sizes[0]}"]["base"]
    result["fold_only"] = {
        "description": "fast-path fold of every adapter (deltas + kernel add), without convs, per forward",
        "reference": f"base forward at batch size {args.batch_sizes[0]}",
    }
    for clock, values in fold_times.items():
        result["fold_only"][clock] = {
            "values_s": values,
            "time_s": summarize(values),
            "pct_of_reference": 100.0 * statistics.median(values) / reference[clock]["time_s"]["median"],
        }
    del models, calls, fold
    gc.collect()

    # ---- training ---------------------------------------------------------------------------------------------------
    result["training"] = {}
    for batch_size in args.train_batch_sizes:
        x = torch.randn(batch_size, 3, size, size, device=device)
        labels = torch.randint(0, NUM_LABELS, (batch_size, size, size), device=device)
        steps, memory = {}, {}
        for name in TRAINING_VARIANTS:
            model = build_training_variant(name, base, r).to(device)
            optimizer = make_optimizer(model)
            steps[name] = training_step(model, optimizer, x, labels)
            for _ in range(max(args.warmup, 1)):
                steps[name]()
            # The step frees the previous gradients first (zero_grad(set_to_none=True)), so they never coexist with
            # the new ones: free them before taking the static memory, or they would be counted twice.
            optimizer.zero_grad(set_to_none=True)
            memory[name], _ = measure_memory(steps[name], device, model, optimizer, [x, labels])
        times = interleaved_times(steps, args.train_repeats, sync)
        group = timing_report(times, "full_ft")
        group["pairs"] = {f"{a}/{b}": paired_ratio(times, a, b) for a, b in TRAINING_PAIRS}
        for name in TRAINING_VARIANTS:
            group[name]["memory"] = memory[name]
            group[name]["memory"]["peak_ratio_vs_full_ft"] = (
                memory[name]["peak_bytes"] / memory["full_ft"]["peak_bytes"]
            )
        result["training"][f"bs{batch_size}"] = group
        del steps
        gc.collect()
        log(f"{encoder}: training bs{batch_size} done")

    if args.rss:
        result["rss"] = bench_rss(encoder, args)
    return result


def bench_rss(encoder: str, args: argparse.Namespace) -> dict[str, Any]:
    """RSS cross-check: one fresh subprocess per variant and group (see module docstring)."""
    size = args.size
    rss: dict[str, Any] = {}
    common = {"encoder": encoder, "size": size, "seed": args.seed, "threads": args.threads, "warmup": args.warmup}
    common["lora_r"] = lora_rank(build_base(encoder, args.seed))
    for mode, variants, sizes in (
        ("inference", INFERENCE_VARIANTS, args.batch_sizes),
        ("training", TRAINING_VARIANTS, args.train_batch_sizes),
    ):
        for batch_size in sizes:
            rss[f"{mode}_bs{batch_size}"] = {
                name: run_rss({**common, "mode": mode, "variant": name, "batch_size": batch_size}) for name in variants
            }
            log(f"{encoder}: RSS {mode} bs{batch_size} done")
    return rss


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------
def to_markdown(data: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = data["meta"]
    results = data["results"]
    if all("inference" in result for result in results.values()):
        lines += _timing_markdown(meta, results)
    if any("rss" in result for result in results.values()):
        lines += _rss_markdown(results)
    return "\n".join(lines)


def _timing_markdown(meta: dict[str, Any], results: dict[str, Any]) -> list[str]:
    clocks = ("cpu", "wall") if meta["machine"]["device"] == "cpu" else ("wall",)
    headers = {"cpu": "CPU time", "wall": "wall time"}
    lines = [
        f"Inference, eval mode, `torch.inference_mode`, {meta['size']}×{meta['size']}, {meta['repeats']} interleaved "
        "rounds. Times: median [IQR] ms per batch (CPU time = process CPU time of the call, all threads). Ratios: "
        "median [IQR] of the per-round ratios to `base`. Peak mem: tensor memory (static + transient), MiB.",
        "",
        "| encoder | batch | variant | "
        + " | ".join(f"{headers[c]} (ms) | {headers[c]} ratio" for c in clocks)
        + " | peak mem (MiB) | mem ratio |",
        "|---|---|---|" + "---|---|" * len(clocks) + "---|---|",
    ]
    for encoder, result in results.items():
        for group_name, group in result["inference"].items():
            for name in INFERENCE_VARIANTS:
                entry = group[name]
                lines.append(
                    f"| {encoder} | {group_name[2:]} | {name} | {time_cells(entry, clocks, 1e3, '.0f')} | "
                    f"{entry['memory']['peak_bytes'] / MIB:.1f} | {entry['memory']['peak_ratio_vs_base']:.3f} |"
                )
    lines += [
        "",
        f"Training step (zero_grad + forward + backward + AdamW), train mode, {meta['train_repeats']} interleaved "
        "rounds. Times: median [IQR] s per step. Ratios: median [IQR] of per-round ratios to `full_ft`. Static: "
        "params + buffers + AdamW state + batch; peak = static + transient (activations, saved tensors, grads), MiB.",
        "",
        "| encoder | batch | variant | "
        + " | ".join(f"{headers[c]} (s) | {headers[c]} ratio" for c in clocks)
        + " | static (MiB) | peak mem (MiB) | mem ratio |",
        "|---|---|---|" + "---|---|" * len(clocks) + "---|---|---|",
    ]
    for encoder, result in results.items():
        for group_name, group in result["training"].items():
            for name in TRAINING_VARIANTS:
                entry = group[name]
                lines.append(
                    f"| {encoder} | {group_name[2:]} | {name} | {time_cells(entry, clocks, 1, '.2f')} | "
                    f"{entry['memory']['static_bytes'] / MIB:.1f} | {entry['memory']['peak_bytes'] / MIB:.1f} | "
                    f"{entry['memory']['peak_ratio_vs_full_ft']:.3f} |"
                )
    lines += [
        "",
        "Per-round ratios between variants (median [IQR] of each round's ratio).",
        "",
        "| encoder | group | ratio | " + " | ".join(headers[c] for c in clocks) + " |",
        "|---|---|---|" + "---|" * len(clocks),
    ]
    for encoder, result in results.items():
        for mode in ("inference", "training"):
            for group_name, group in result[mode].items():
                for pair, entry in group["pairs"].items():
                    cells = " | ".join(spread(entry[c]["ratio"], 1, ".3f") for c in clocks)
                    lines.append(f"| {encoder} | {mode} {group_name} | {pair} | {cells} |")
    lines += [
        "",
        "Parameters and FLOPs (FlopCounterMode, batch 1; counts conv/matmul ops only). Trainable counts include the "
        "segmentation head (modules_to_save); adapter-only counts in parentheses after LoRA's rank.",
        "",
        "| encoder | base params | fused params (created biases) | adapted convs | trainable, conv adapter | "
        "trainable, BN adapter | trainable, LoRA (r; adapter only vs conv adapter's) | GFLOPs base | fused | "
        "unfused (fast) | unfused (branch) | LoRA unfused | fused == base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for encoder, result in results.items():
        p, f = result["params"], result["flops"]["inference"]
        lines.append(
            f"| {encoder} | {p['base']:,} | {p['fused']:,} (+{p['fused_created_bias']:,}) | {p['adapted_convs']} | "
            f"{p['conv_adapter']['trainable']:,} ({p['conv_adapter']['trainable_pct_of_base']:.1f}%) | "
            f"{p['bn_adapter']['trainable']:,} ({p['bn_adapter']['trainable_pct_of_base']:.2f}%) | "
            f"{p['lora']['trainable']:,} (r={p['lora']['r']}; {p['lora']['adapter_only']:,} vs "
            f"{p['conv_adapter']['adapter_only']:,}) | "
            f"{f['base'] / 1e9:.3f} | {f['fused'] / 1e9:.3f} | {f['unfused'] / 1e9:.3f} | "
            f"{f['unfused_branch'] / 1e9:.3f} | {f['lora_unfused'] / 1e9:.3f} | {result['flops']['fused_equals_base']} |"
        )
    lines += [
        "",
        "Training FLOPs, one forward + backward at batch 1 (GFLOPs; ratio vs full FT).",
        "",
        "| encoder | " + " | ".join(TRAINING_VARIANTS) + " |",
        "|---" * (len(TRAINING_VARIANTS) + 1) + "|",
    ]
    for encoder, result in results.items():
        t = result["flops"]["training_forward_backward"]
        cells = [f"{t[name] / 1e9:.2f} ({t[name] / t['full_ft']:.3f})" for name in TRAINING_VARIANTS]
        lines.append(f"| {encoder} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fold fast path: every layer's folded kernel and bias computed alone (no convs), once per forward: median "
        "[IQR] ms and % of the base forward at the first batch size; max |logit difference| at that batch size.",
        "",
        "| encoder | "
        + " | ".join(f"fold {headers[c]} (ms) | % of base" for c in clocks)
        + " | max abs diff fused vs branch | max abs diff fast vs branch | max abs logit |",
        "|---|" + "---|---|" * len(clocks) + "---|---|---|",
    ]
    for encoder, result in results.items():
        fold = result["fold_only"]
        cells = " | ".join(
            f"{spread(fold[c]['time_s'], 1e3, '.1f')} | {fold[c]['pct_of_reference']:.1f}%" for c in clocks
        )
        group = next(iter(result["inference"].values()))
        lines.append(
            f"| {encoder} | {cells} | {group['max_abs_diff_fused_vs_branch']:.2e} | "
            f"{group['max_abs_diff_fast_vs_branch']:.2e} | {group['max_abs_logit']:.2e} |"
        )
    return lines


def _rss_markdown(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "RSS cross-check (fresh process per variant): RSS of the built, warmed model and peak RSS during one call, "
        "both over the post-import baseline, MiB.",
        "",
        "| encoder | group | variant | model RSS | peak RSS during call | peak ratio vs reference |",
        "|---|---|---|---|---|---|",
    ]
    for encoder, result in results.items():
        for group_name, group in result.get("rss", {}).items():
            reference = group.get("base") or group["full_ft"]
            for name, entry in group.items():
                lines.append(
                    f"| {encoder} | {group_name} | {name} | {entry['model_rss_bytes'] / MIB:.1f} | "
                    f"{entry['peak_rss_bytes'] / MIB:.1f} | "
                    f"{entry['peak_rss_bytes'] / reference['peak_rss_bytes']:.3f} |"
                )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet18", "vgg19_bn"])
    parser.add_argument("--size", type=int, default=None, help="square input size (default 256; 64 with --quick)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="inference (default 1 4)")
    parser.add_argument("--train-batch-sizes", nargs="+", type=int, default=None, help="training (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="inference rounds (default 5; 1 with --quick)")
    parser.add_argument("--train-repeats", type=int, default=None, help="training rounds (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing (>= 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/conv_adapter.json")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown on stdout")
    parser.add_argument("--rss", action="store_true", help="also measure RSS, one fresh subprocess per variant")
    parser.add_argument("--rss-only", action="store_true", help="only the RSS cross-check (no timing, no FLOPs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, size 64, batch 1, train batch 2")
    parser.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    add_denormal_argument(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or (64 if quick else 256)
    args.batch_sizes = args.batch_sizes or ([1] if quick else [1, 4])
    args.train_batch_sizes = args.train_batch_sizes or ([2] if quick else [4])
    args.repeats = args.repeats or (1 if quick else 5)
    args.train_repeats = args.train_repeats or (1 if quick else 3)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the last warm-up call of an inference variant measures memory)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = run_settings(args.keep_denormals)
    warnings.filterwarnings("ignore")
    if args.rss_worker is not None:
        print(json.dumps(rss_worker(json.loads(args.rss_worker))))
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False.")
    if (args.rss or args.rss_only) and device.type != "cpu":
        raise SystemExit("--rss measures process RSS and only makes sense with --device cpu.")
    start = time.time()
    load_start = os.getloadavg()
    data: dict[str, Any] = {
        "meta": {
            "command": "python " + " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device),
            "size": args.size,
            "num_labels": NUM_LABELS,
            "batch_sizes": args.batch_sizes,
            "train_batch_sizes": args.train_batch_sizes,
            "repeats": args.repeats,
            "train_repeats": args.train_repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "seed": args.seed,
            "memory_method": "cuda_allocator" if device.type == "cuda" else "tensor_dispatch_tracker",
            **settings,
        },
        "results": {},
    }
    for encoder in args.encoders:
        log(f"{encoder}: start")
        if args.rss_only:
            data["results"][encoder] = {"rss": bench_rss(encoder, args)}
        else:
            data["results"][encoder] = bench_encoder(encoder, args, device)
        gc.collect()
    data["meta"]["wall_s"] = time.time() - start
    data["meta"]["load_average_1m_start_end"] = [load_start[0], os.getloadavg()[0]]
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(data, handle, indent=1)
        log(f"wrote {args.output} ({data['meta']['wall_s']:.0f} s)")
    if args.markdown:
        print(to_markdown(data))
    return data


if __name__ == "__main__":
    main()

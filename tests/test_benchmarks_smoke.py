# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Smoke test of ``benchmarks/bench_conv_adapter.py --quick``: the script runs and its JSON has the expected shape.

A correctness check, not a timing check: it asserts that the fused model has exactly the base model's FLOPs and
parameter count plus the created biases, and that fused and unfused outputs agree, never anything about times.
Not marked slow: the subprocess takes 10-17 s on a shared 2-core machine (mostly imports and model building).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_conv_adapter.py"
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


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("bench") / "conv_adapter.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--size",
        "64",
        "--encoders",
        "resnet18",
        "--repeats",
        "1",
        "--output",
        str(output),
        "--markdown",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| resnet18 | 1 | fused |" in proc.stdout  # the markdown table was printed
    return json.loads(output.read_text())


def _assert_user_settings(meta: dict) -> None:
    """The recorded settings of a benchmark run: Trainer's fused AdamW, and subnormals flushed on x86 (where
    ``torch.set_flush_denormal`` works), since random weights backpropagate subnormal gradients (``timing.py``)."""
    assert "fused=True" in meta["optimizer"]
    assert "omp_wait_policy" in meta
    assert isinstance(meta["flush_denormal"], bool)
    if platform.machine() in ("x86_64", "AMD64"):
        assert meta["flush_denormal"] is True


def test_quick_benchmark_json_shape(quick_results: dict) -> None:
    meta = quick_results["meta"]
    assert meta["quick"] is True and meta["size"] == 64 and meta["repeats"] == 1
    for key in ("command", "machine", "batch_sizes", "train_batch_sizes", "memory_method", "wall_s"):
        assert key in meta
    _assert_user_settings(meta)
    result = quick_results["results"]["resnet18"]
    assert set(result) >= {"params", "flops", "inference", "training", "fold_only"}
    assert set(result["fold_only"]) >= {"wall", "cpu"}

    inference = result["inference"]["bs1"]
    for name in INFERENCE_VARIANTS:
        entry = inference[name]
        for clock in ("wall", "cpu"):
            assert len(entry[clock]["values_s"]) == 1
            assert set(entry[clock]["time_s"]) == {"median", "q1", "q3", "min", "max"}
            assert set(entry[clock]["ratio"]) == {"median", "q1", "q3", "min", "max"}
        assert (
            entry["memory"]["peak_bytes"] == entry["memory"]["static_bytes"] + entry["memory"]["transient_peak_bytes"]
        )
        assert entry["memory"]["peak_bytes"] > 0

    training = result["training"]["bs2"]
    for name in TRAINING_VARIANTS:
        entry = training[name]
        assert "median" in entry["wall"]["time_s"] and "median" in entry["cpu"]["ratio"]
        assert entry["memory"]["peak_bytes"] > 0
    # Adapters train far fewer parameters, so they hold far less AdamW state than full fine-tuning.
    assert training["conv_adapter"]["memory"]["static_bytes"] < training["full_ft"]["memory"]["static_bytes"]
    # The base's frozen BatchNorms keep no input for backward (frozen_bn.py); PyTorch's own class does.
    assert training["conv_adapter"]["memory"]["peak_bytes"] < training["conv_adapter_plain_bn"]["memory"]["peak_bytes"]
    # Per-round ratios between variants (conv adapters vs stock LoRA, vs the zero-cost floor).
    assert set(training["pairs"]) == {
        "conv_adapter/lora",
        "conv_adapter/adapter_floor",
        "bn_adapter/adapter_floor",
        "conv_adapter/conv_adapter_plain_bn",
    }
    assert set(inference["pairs"]) == {"unfused/lora_unfused"}
    for entry in (*training["pairs"].values(), *inference["pairs"].values()):
        assert len(entry["cpu"]["values"]) == 1 and entry["cpu"]["ratio"]["median"] > 0


def test_quick_benchmark_fusion_is_exact(quick_results: dict) -> None:
    result = quick_results["results"]["resnet18"]
    flops = result["flops"]["inference"]
    assert flops["fused"] == flops["base"]
    assert result["flops"]["fused_equals_base"] is True
    # The branch path runs an extra 1x1 conv per adapted conv; the fast path folds it into the kernel.
    assert flops["unfused_branch"] > flops["base"]
    assert flops["unfused"] == flops["base"]

    params = result["params"]
    assert params["fused"] == params["base"] + params["fused_created_bias"]
    # Stock LoRA on the same convs, r chosen for a parameter count close to the conv adapters'.
    lora, conv = params["lora"], params["conv_adapter"]
    assert params["lora"]["r"] >= 1 and 0.5 < lora["adapter_only"] / conv["adapter_only"] < 1.5
    assert flops["lora_unfused"] > flops["base"]
    assert 0 < params["fused_created_bias"] < params["conv_adapter"]["adapter_only"]
    assert 0 < params["bn_adapter"]["trainable"] < params["conv_adapter"]["trainable"] < params["base"]

    inference = result["inference"]["bs1"]
    tolerance = 1e-4 * max(1.0, inference["max_abs_logit"])
    assert inference["max_abs_diff_fused_vs_branch"] <= tolerance
    assert inference["max_abs_diff_fast_vs_branch"] <= tolerance


def test_mopeft_benchmark_quick_runs_and_prunes_to_a_merged_model(tmp_path) -> None:
    """``benchmarks/bench_mopeft.py --quick`` (a small SAM instead of ViT-B): the script runs, reports every variant,
    and the closed-gates scenario really prunes prefix and adapter everywhere and merges back to the plain model."""
    output = tmp_path / "mopeft.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_mopeft.py"), "--quick", "--size", "64"]
    command += ["--repeats", "1", "--output", str(output), "--markdown"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(output.read_text())
    assert result["architecture"] == "small SAM (--quick)"
    _assert_user_settings(result)
    methods = ("lora", "vpt", "vpt_deep", "adapter", "mopeft")
    shares = result["trainable_percent"]
    assert all(0 < shares[m] < 100 for m in methods)
    assert shares["vpt"] < shares["vpt_deep"] and shares["lora"] < shares["mopeft"]
    assert set(result["inference"]) >= {"base", *methods, "stock_peft_lora_qkv", "mopeft_pruned_to_lora_merged"}
    assert all(entry["cpu"]["time_s"]["median"] > 0 for entry in result["inference"].values())
    assert result["inference"]["base"]["cpu"]["ratio"]["median"] == 1.0
    assert set(result["training"]) >= {"full_ft", "decoder_ft", *methods, "mopeft_grad_ckpt", "stock_peft_lora_qkv"}
    assert all(entry["memory"]["peak_bytes"] > 0 for entry in result["training"].values())
    assert "| MoPEFT (all three, gated) |" in proc.stdout  # --markdown
    closed = result["prune_reports"]["mopeft_pruned_to_lora_merged"]
    assert closed["fully_merged"] is True
    assert all(sorted(dropped) == ["adapter", "prefix"] for dropped in closed["pruned"].values())
    assert closed["max_rel_change"] < 1e-3  # closed gates: dropping them changes (almost) nothing
    worst = result["prune_reports"]["mopeft_frozen_gates_lora_merged"]
    assert worst["fully_merged"] is False and not worst["pruned"]


MASK2FORMER_PEFT = ("seq_adapter_1", "seq_adapter_2", "seq_adapter_3", "deform_lora", "deform_lora_seq2")
MASK2FORMER_TRAINING = ("full", "decoder", *MASK2FORMER_PEFT)
MASK2FORMER_INFERENCE = ("base", "deform_lora", "deform_lora_merged", "seq_adapter_2")


@pytest.fixture(scope="module")
def mask2former_quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``benchmarks/bench_mask2former.py --quick`` (a small Mask2Former at 64 px): about 10 s."""
    output = tmp_path_factory.mktemp("bench") / "mask2former.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_mask2former.py"), "--quick", "--repeats", "1"]
    command += ["--output", str(output), "--markdown"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| deform_lora_merged |" in proc.stdout and "| deform_lora_seq2 |" in proc.stdout  # markdown tables
    return json.loads(output.read_text())


def _check_timed_entry(entry: dict, reference: str) -> None:
    for clock in ("wall", "cpu"):
        assert len(entry[clock]["values_s"]) == 1
        assert set(entry[clock]["time_s"]) == {"median", "q1", "q3", "min", "max"}
        assert set(entry[clock]["ratio"]) == {"median", "q1", "q3", "min", "max"}
    memory = entry["memory"]
    assert set(memory) == {"static_bytes", "transient_peak_bytes", "peak_bytes", f"peak_ratio_vs_{reference}"}
    assert memory["peak_bytes"] == memory["static_bytes"] + memory["transient_peak_bytes"] > 0


@pytest.mark.slow  # the conv-adapter and MoPEFT benchmarks keep a smoke test in the default run
def test_mask2former_benchmark_json_shape(mask2former_quick: dict) -> None:
    meta = mask2former_quick["meta"]
    assert meta["quick"] is True and meta["size"] == 64 and meta["repeats"] == 1 and meta["warmup"] == 1
    for key in ("command", "date_utc", "machine", "versions", "batch_size", "memory_method", "wall_s"):
        assert key in meta
    assert meta["machine"]["torch_threads"] >= 1
    assert set(meta["versions"]) >= {"torch", "transformers", "peft"}
    _assert_user_settings(meta)
    results = mask2former_quick["results"]
    assert set(results["parameters"]["parts"]) == {"backbone", "pixel_decoder", "transformer_decoder", "heads"}
    assert sum(results["parameters"]["parts"].values()) == results["parameters"]["base"]

    assert tuple(results["training"]) == MASK2FORMER_TRAINING
    for entry in results["training"].values():
        _check_timed_entry(entry, "full")
        for key in ("trainable_parameters", "trainable_percent", "adapter_parameters", "total_parameters"):
            assert key in entry
    assert tuple(results["inference"]) == MASK2FORMER_INFERENCE
    for entry in results["inference"].values():
        _check_timed_entry(entry, "base")
        assert entry["parameters"] > 0


def test_mask2former_benchmark_trainable_shares(mask2former_quick: dict) -> None:
    base = mask2former_quick["results"]["parameters"]["base"]
    training = mask2former_quick["results"]["training"]
    share = {name: entry["trainable_percent"] for name, entry in training.items()}
    assert share["full"] == 100.0 and training["full"]["trainable_parameters"] == base
    assert share["decoder"] < share["full"]
    assert all(0 < share[name] < share["decoder"] for name in MASK2FORMER_PEFT)
    counts = {name: training[name]["trainable_parameters"] for name in MASK2FORMER_PEFT}
    assert counts["seq_adapter_3"] > counts["seq_adapter_2"] > counts["seq_adapter_1"]
    for name in MASK2FORMER_PEFT:  # the share is of the base count: adapters and head copies are not counted in it
        entry = training[name]
        assert entry["adapter_parameters"] > 0
        assert entry["trainable_parameters"] == entry["adapter_parameters"] + entry["modules_to_save_parameters"]
        assert entry["total_parameters"] == base + entry["trainable_parameters"]
        assert entry["trainable_percent"] == pytest.approx(100.0 * entry["trainable_parameters"] / base)


def test_mask2former_benchmark_merged_lora_is_exact(mask2former_quick: dict) -> None:
    base = mask2former_quick["results"]["parameters"]["base"]
    inference = mask2former_quick["results"]["inference"]
    merged = inference["deform_lora_merged"]
    assert merged["max_abs_diff_vs_unmerged"] < 1e-4 and merged["merged_equals_unmerged"] is True
    # Not trivial: the LoRA B matrices are random, so the unmerged model's outputs differ from the base model's.
    assert inference["deform_lora"]["max_abs_diff_vs_base"] > 1e-3
    assert merged["parameters"] == inference["base"]["parameters"] == base
    assert inference["deform_lora"]["parameters"] > base and inference["seq_adapter_2"]["parameters"] > base

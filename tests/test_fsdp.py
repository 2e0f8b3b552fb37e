# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""MoPEFT under the sharding real training stacks use: FSDP2 ``fully_shard`` on each transformer block (the MoPEFT
wrapper or the block inside it) then the root, and FSDP1 with a per-block ``ModuleWrapPolicy`` (accelerate's
TRANSFORMER_BASED_WRAP). Two CPU processes (gloo) run tests/fsdp_mopeft_worker.py once for every case; the tests read
what each rank wrote. Also, in this process: MoPEFT's entry points in the wrapped block (hooks and the attention
dispatcher) under copies, unloading and torch's own activation checkpointing."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

import peft_vision_ext  # noqa: F401
from peft_vision_ext import MoPEFTConfig
from peft_vision_ext.analysis import collect_gate_statistics
from peft_vision_ext.tuners.mopeft import MoPEFTLayer

from fsdp_mopeft_worker import CASES, outputs_of
from tiny_models import make_dinov2, make_sam, make_vit


WORKER = Path(__file__).with_name("fsdp_mopeft_worker.py")
FACTORIES = {"sam": make_sam, "vit": make_vit, "dinov2": make_dinov2}
# FSDP1 wrapping the MoPEFT wrappers themselves (not the blocks inside, which is what `_no_split_modules` and
# accelerate's TRANSFORMER_BASED_WRAP give) trains correctly, but peft 0.21 selects the adapter's keys by module name and
# strips `_fsdp_wrapped_module.` only at the start of a name, so `save_pretrained(state_dict=...)` misses every MoPEFT
# tensor (the mask decoder's are saved). Wrap the blocks, or use FSDP2. Fails (strict) once peft handles it.
SAVE_CASES = [
    pytest.param(case, marks=pytest.mark.xfail(strict=True, reason="peft misses keys of FSDP1-wrapped tuner layers"))
    if case.endswith("fsdp1_outer")
    else case
    for case in CASES
]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    # --standalone: a free rendezvous port, so parallel runs on one machine do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(WORKER), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def reports(results: Path, case: str) -> list[dict]:
    found = [json.loads((results / case / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(found):
        assert "error" not in report, f"rank {rank}: {report['error']}"
    return found


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_equals_the_unsharded_step(fsdp_results, case):
    # Each rank took the step on half of the batch; the reference is the full-batch step without FSDP.
    ranks = reports(fsdp_results, case)
    for report in ranks:
        assert math.isfinite(report["loss"])
        assert not report["missing"] and not report["grad_missing"], report
        assert not report["inactive_in_reference"], "every MoPEFT part must get a gradient (init_weights=False)"
        assert report["compared_grads"] > 0 and report["identical_across_ranks"]
        assert report["max_difference"] <= 1e-5, (report["worst"], report["max_difference"])
        assert report["max_relative_grad_error"] <= 1e-4, (report["worst_grad"], report["max_relative_grad_error"])
    # The two half-batch losses average to the full-batch loss: the ranks saw different images.
    assert ranks[0]["loss"] != ranks[1]["loss"]
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - ranks[0]["reference_loss"]) <= 1e-5


@pytest.mark.parametrize("case", SAVE_CASES)
def test_adapter_saved_from_the_sharded_model_reloads(fsdp_results, case):
    reports(fsdp_results, case)
    folder = fsdp_results / case
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    expected = load_file(folder / "reference_adapter" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and any("mopeft_prefix" in k for k in saved)
    for key, tensor in expected.items():
        assert torch.allclose(saved[key], tensor, atol=1e-5, rtol=0), key
    base = FACTORIES[case.split("-")[0]](0)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder / "adapter").eval()
    reference = torch.load(folder / "reference.pt")
    got, untrained = outputs_of(loaded, reference["x"]), outputs_of(base, reference["x"])
    for name, tensor in reference["outputs"].items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=0), (name, (got[name] - tensor).abs().max())
    assert (got["encoder"] - untrained["encoder"]).abs().max() > 1e-2  # the adapter acts


# ---------------------------------------------------------------------------------------------------------------------
# The entry points without FSDP
# ---------------------------------------------------------------------------------------------------------------------
def peft_model(name: str, **kwargs):
    base = FACTORIES[name](0)
    torch.manual_seed(0)
    kwargs = {"init_weights": False, "prefix_length": 4, **kwargs}
    return base, get_peft_model(copy.deepcopy(base), MoPEFTConfig(**kwargs)).eval()


def images(name: str, batch: int = 2) -> torch.Tensor:
    size = 80 if name == "sam" else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


def encoder_output(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return outputs_of(model, x)["encoder"]


def layers(model) -> list[MoPEFTLayer]:
    return [m for m in model.modules() if isinstance(m, MoPEFTLayer)]


def no_entry_points(block: torch.nn.Module) -> bool:
    """No hook of a MoPEFT layer anywhere in the block and no instance-level ``forward`` on any of its modules
    (transformers' own output-capturing hooks, installed by ``output_hidden_states=True``, may stay)."""
    for module in block.modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if "forward" in vars(module) or any(isinstance(getattr(h, "__self__", None), MoPEFTLayer) for h in hooks):
            return False
    return True


@pytest.mark.parametrize("name", ["sam", "vit", "dinov2"])
def test_unload_restores_the_original_blocks(name):
    base, model = peft_model(name)
    x = images(name)
    blocks = [layer.base_layer for layer in layers(model)]
    assert not any(no_entry_points(block) for block in blocks)
    # The wrapped block run on its own (or its parts called directly) is the base block: the wrapper arms MoPEFT.
    with torch.no_grad():
        adapted = encoder_output(model, x)
        assert (adapted - encoder_output(base, x)).abs().max() > 1e-2
        hidden = torch.randn(2, *((10, 10) if name == "sam" else (17,)), 32)
        original = next(m for m in base.modules() if type(m) is type(blocks[0]))
        assert torch.equal(blocks[0](hidden), original(hidden))
    unloaded = model.unload()
    assert all(no_entry_points(block) for block in blocks)
    assert not any(isinstance(m, MoPEFTLayer) for m in unloaded.modules())
    assert torch.equal(encoder_output(unloaded, x), encoder_output(base, x))
    # merge_and_unload (plain LoRA: the one part that folds into weights) leaves no entry point either.
    base, model = peft_model(name, use_prefix=False, use_adapter=False, gating=False)
    expected = encoder_output(model, x)
    merged = model.merge_and_unload()
    assert all(no_entry_points(m) for m in merged.modules() if type(m) is type(blocks[0]))
    assert torch.allclose(encoder_output(merged, x), expected, atol=1e-5)


def test_copies_own_their_entry_points():
    _, model = peft_model("sam")
    x = images("sam")
    before = encoder_output(model, x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers(twin):
            layer.mopeft_adapter_up["default"].weight.mul_(3)
    assert torch.equal(encoder_output(model, x), before)  # the copy's hooks use the copy's parameters
    assert (encoder_output(twin, x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("where", ["block", "wrapper"])
def test_torch_activation_checkpointing_around_the_block_or_the_wrapper(where):
    # torch's checkpoint_wrapper (what accelerate's FSDP plugin applies with activation_checkpointing=True) around the
    # wrapped block or around the MoPEFT wrapper itself: the recomputation in backward runs MoPEFT again (same
    # gradients as without checkpointing) and gate telemetry records each image once per block.
    x = images("sam")
    labels = torch.randint(0, 3, (2, 80, 80), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointed in (False, True):
        _, model = peft_model("sam")
        if checkpointed:
            blocks = tuple({type(layer.base_layer) for layer in layers(model)}) if where == "block" else (MoPEFTLayer,)
            apply_activation_checkpointing(model, check_fn=lambda m, blocks=blocks: isinstance(m, blocks))
        model.train()
        with collect_gate_statistics(model) as gates:
            loss = model(pixel_values=x, labels=labels, output_hidden_states=True)
            (loss.loss + loss.hidden_states[-1].pow(2).mean()).backward()
        assert all(stats["count"] == 2 for block in gates.summary().values() for stats in block.values())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None and "mopeft_" in n})
    names = {n.replace("._checkpoint_wrapped_module", "") for n in grads[1]}
    assert names == set(grads[0]) and len(names) == 30
    for name, grad in grads[1].items():
        expected = grads[0][name.replace("._checkpoint_wrapped_module", "")]
        assert torch.allclose(grad, expected, atol=1e-6 * expected.abs().max(), rtol=1e-5), name

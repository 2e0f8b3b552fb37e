# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The shared test matrix: tiny models x configs, and the checks every method must pass.

A method joins by adding `Case`s to `MATRIX` and, if it needs one, a tolerance to `TOLERANCES`. The thin parametrized
tests in `test_matrix.py` call the `check_*` functions below.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig, get_peft_model

import peft_vision_ext  # noqa: F401  (registers the methods)
from peft_vision_ext import ConvAdapterConfig, DeformableLoRAConfig, MoPEFTConfig, SeqAdapterConfig

from tiny_models import FACTORIES, forward_logits


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Relative tolerance (max |a - b| / max |b|) for merged vs unmerged outputs in fp32, per config class.
TOLERANCES: dict[type[PeftConfig], float] = {
    ConvAdapterConfig: 1e-5,
    MoPEFTConfig: 1e-5,
    DeformableLoRAConfig: 1e-5,
    SeqAdapterConfig: 1e-5,
}

# Substrings of state-dict keys that belong to adapters (trainable by design).
ADAPTER_KEY_MARKERS = ("convadapter_", "mopeft_", "iseg_", "modules_to_save")


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # key of tiny_models.FACTORIES
    config_cls: type[PeftConfig]
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (2, 3, 40, 52)
    # merge_and_unload is exact for this config (otherwise it must refuse, in words, and change nothing).
    mergeable: bool = True
    # Config overrides under which the model must equal the base at init. Prefixes take attention mass from step 0
    # (like every prefix/prompt method); a gated prefix is removed exactly by a gate at 0 (a very negative init).
    identity_overrides: dict[str, Any] = field(default_factory=dict)
    # Ungated prefixes cannot be an identity at init: the check asserts that they act, and that nothing else does.
    prefix_acts_at_init: bool = False
    has_batchnorm: bool = True
    # SDPA kernels round differently once the key length changes, so a zero-weight prefix equals the base only to
    # float precision there; everything else must be bit-exact.
    identity_exact: bool = True

    def make_base(self, seed: int = 0) -> torch.nn.Module:
        return FACTORIES[self.model](seed=seed)

    def make_config(self, **overrides: Any) -> PeftConfig:
        return self.config_cls(**{**self.kwargs, **overrides})

    def make_input(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(seed))


MATRIX: list[Case] = [
    Case("tiny_cnn-conv", "tiny_cnn", ConvAdapterConfig),
    Case("tiny_cnn-bn_only", "tiny_cnn", ConvAdapterConfig, {"adapter_type": "bn"}),
    Case(
        "tiny_cnn-conv_nobias-head",
        "tiny_cnn",
        ConvAdapterConfig,
        {"adapter_bias": False, "modules_to_save": ["head"]},
    ),
    Case(
        "unet_resnet18-conv-head",
        "unet_resnet18",
        ConvAdapterConfig,
        {"modules_to_save": ["segmentation_head"]},
        (2, 3, 32, 40),
    ),
    Case("unet_test_resnet-bn_only", "unet_test_resnet", ConvAdapterConfig, {"adapter_type": "bn"}),
    Case(
        "unet_test_resnet-decoder_regex",
        "unet_test_resnet",
        ConvAdapterConfig,
        {"target_modules": r"decoder\..*\.conv"},
    ),
    Case("unet_test_efficientnet-conv", "unet_test_efficientnet", ConvAdapterConfig, {}, (2, 3, 33, 47)),
]

_GATE_OFF = {"prefix_gate_init": -1e4}  # log G_P = -1e4: the prefixes get exactly zero attention weight
_TRANSFORMER = {"has_batchnorm": False}
MATRIX += [
    # SAM (windowed block with padded windows + global block), the full mixture and each plain method.
    Case("sam-mopeft", "sam_tiny", MoPEFTConfig, {}, (2, 3, 64, 72), False, _GATE_OFF, **_TRANSFORMER),
    Case(
        "sam_sdpa-mopeft",
        "sam_tiny_sdpa",
        MoPEFTConfig,
        {},
        (2, 3, 80, 80),
        False,
        _GATE_OFF,
        identity_exact=False,
        **_TRANSFORMER,
    ),
    Case(
        "sam-lora",
        "sam_tiny",
        MoPEFTConfig,
        {"gating": False, "use_prefix": False, "use_adapter": False},
        (2, 3, 64, 64),
        **_TRANSFORMER,
    ),
    Case(
        "sam-vpt_deep",
        "sam_tiny",
        MoPEFTConfig,
        {"gating": False, "use_lora": False, "use_adapter": False},
        (2, 3, 64, 64),
        False,
        prefix_acts_at_init=True,
        **_TRANSFORMER,
    ),
    Case(
        "sam-vpt_shallow",
        "sam_tiny",
        MoPEFTConfig,
        {"gating": False, "use_lora": False, "use_adapter": False, "prefix_depth": "shallow"},
        (2, 3, 64, 64),
        False,
        prefix_acts_at_init=True,
        **_TRANSFORMER,
    ),
    Case(
        "sam-adapter",
        "sam_tiny",
        MoPEFTConfig,
        {"gating": False, "use_lora": False, "use_prefix": False},
        (2, 3, 64, 64),
        False,
        **_TRANSFORMER,
    ),
    # Other ViT-family encoders (the seed's future work).
    Case(
        "vit-mopeft",
        "vit_tiny",
        MoPEFTConfig,
        {"r": 4, "prefix_length": 5},
        (2, 3, 32, 32),
        False,
        _GATE_OFF,
        **_TRANSFORMER,
    ),
    Case(
        "dinov2-lora_k",
        "dinov2_tiny",
        MoPEFTConfig,
        {"gating": False, "use_prefix": False, "use_adapter": False, "lora_targets": ["q", "k", "v"]},
        (2, 3, 32, 32),
        **_TRANSFORMER,
    ),
]
# Seed 001. Freezing the parameters of Mask2Former or Deformable DETR changes their float rounding by ~1e-7 (another
# kernel path in deformable attention), so an adapted model equals the unfrozen base to float precision only.
_MASK2FORMER = {"has_batchnorm": False, "identity_exact": False}
MATRIX += [
    Case("m2f-deform_lora", "mask2former_tiny", DeformableLoRAConfig, {}, (2, 3, 64, 64), **_MASK2FORMER),
    Case(
        "m2f-deform_lora_ranks_mha_heads",
        "mask2former_tiny",
        DeformableLoRAConfig,
        {
            "projection_ranks": {"sampling_offsets": 2, "value_proj": 0},
            "extra_target_modules": ["cross_attn"],
            "multihead_attention_targets": ["q", "k", "v", "out"],
            "modules_to_save": ["class_predictor"],
        },
        (2, 3, 64, 64),
        **_MASK2FORMER,
    ),
    Case(
        "m2f-seq_adapter3",
        "mask2former_tiny",
        SeqAdapterConfig,
        {"adapters_per_block": 3},
        (2, 3, 64, 64),
        False,
        **_MASK2FORMER,
    ),
    Case(
        "m2f-both",
        "mask2former_tiny",
        DeformableLoRAConfig,
        {"adapters_per_block": 2, "adapter_dim": 8, "extra_target_modules": ["cross_attn"]},
        (2, 3, 64, 64),
        False,
        **_MASK2FORMER,
    ),
    Case("detr-deform_lora", "deformable_detr_tiny", DeformableLoRAConfig, {"r": 4}, (2, 3, 64, 64), **_MASK2FORMER),
    Case(
        "detr-seq_adapter1",
        "deformable_detr_tiny",
        SeqAdapterConfig,
        {"adapters_per_block": 1},
        (2, 3, 64, 64),
        False,
        **_MASK2FORMER,
    ),
]


def build_peft(case: Case, seed: int = 0, **config_overrides: Any):
    """The base model (eval mode) and its peft model; expected 'left out' warnings of default targeting are hushed."""
    base = case.make_base(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        model = get_peft_model(copy.deepcopy(base), case.make_config(**config_overrides))
    return base, model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def check_identity_at_init(case: Case) -> None:
    x = case.make_input()
    if case.prefix_acts_at_init:
        base, model = build_peft(case)
        assert rel_diff(forward_logits(model, x), forward_logits(base, x)) > 1e-6, "ungated prefixes must act"
        base, model = build_peft(case, use_prefix=False, use_adapter=True)  # everything but the prefixes
        assert torch.equal(forward_logits(model, x), forward_logits(base, x))
        return
    base, model = build_peft(case, **case.identity_overrides)
    adapted, expected = forward_logits(model, x), forward_logits(base, x)
    if case.identity_exact:
        assert torch.equal(adapted, expected), "adapters must not change the model at init"
    else:
        assert rel_diff(adapted, expected) < 1e-5, rel_diff(adapted, expected)


@torch.no_grad()
def check_disable_adapter(case: Case) -> None:
    base, model = build_peft(case, init_weights=False)
    x = case.make_input()
    expected = forward_logits(base, x)
    adapted = forward_logits(model, x)
    assert rel_diff(adapted, expected) > 1e-3, "random adapters should change the output"
    with model.disable_adapter():
        assert torch.allclose(forward_logits(model, x), expected, atol=1e-6)
    assert torch.allclose(forward_logits(model, x), adapted, atol=1e-6), "re-enabled adapters must act again"


@torch.no_grad()
def check_merge_equivalence(case: Case) -> None:
    """Unmerged == merge_adapter == unmerge_adapter again == merge_and_unload, within the method's tolerance."""
    tol = TOLERANCES[case.config_cls]
    base, model = build_peft(case, init_weights=False)
    x = case.make_input()
    unmerged = forward_logits(model, x)
    if not case.mergeable:
        # Refused in words, and nothing changed: the model still computes the unmerged output.
        try:
            model.merge_and_unload()
        except ValueError as error:
            assert "cannot merge" in str(error).lower(), error
        else:
            raise AssertionError("merge_and_unload must refuse an inexact merge")
        assert torch.equal(forward_logits(model, x), unmerged)
        return
    model.merge_adapter()
    merged = forward_logits(model, x)
    assert rel_diff(merged, unmerged) < tol
    model.unmerge_adapter()
    assert rel_diff(forward_logits(model, x), unmerged) < tol
    fused_check = _check_fused_convs if case.config_cls is ConvAdapterConfig else _check_fused_transformer
    fused = model.merge_and_unload()
    assert type(fused) is type(base)
    assert rel_diff(forward_logits(fused, x), unmerged) < tol
    fused_check(base, fused)


def _check_fused_transformer(base: torch.nn.Module, fused: torch.nn.Module) -> None:
    assert not any("mopeft" in n or "base_layer" in n for n, _ in fused.named_modules()), "adapters survived"
    assert {n: p.shape for n, p in fused.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}


def _check_fused_convs(base: torch.nn.Module, fused: torch.nn.Module) -> None:
    base_params = sum(p.numel() for p in base.parameters())
    base_convs = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert not any("convadapter" in n or "base_layer" in n for n, _ in fused.named_modules()), "adapters survived"
    fused_convs = {n: m for n, m in fused.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert fused_convs.keys() == base_convs.keys()
    # The only extra parameters fusion may add: one bias for each conv that had none.
    new_biases = [n for n, m in fused_convs.items() if m.bias is not None and base_convs[n].bias is None]
    extra = sum(p.numel() for p in fused.parameters()) - base_params
    assert extra == sum(fused_convs[n].out_channels for n in new_biases)


def train_steps(model: torch.nn.Module, case: Case, steps: int = 3, lr: float = 0.05) -> set[str]:
    """A few SGD steps in train mode; returns the names of parameters that received a non-zero gradient."""
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=lr)
    generator = torch.Generator().manual_seed(7)
    got_gradient = set()
    for step in range(steps):
        x = case.make_input(seed=100 + step)
        logits = forward_logits(model, x)
        if logits.ndim == 4:  # segmentation logits (B, K, H, W)
            labels = torch.randint(0, logits.shape[1], (x.shape[0], *logits.shape[2:]), generator=generator)
            loss = torch.nn.functional.cross_entropy(logits, labels)
        else:  # an encoder's hidden states: regress onto a fixed random target
            target = torch.randn(logits.shape, generator=generator)
            loss = torch.nn.functional.mse_loss(logits, target)
        optimizer.zero_grad()
        loss.backward()
        got_gradient |= {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
    model.eval()
    return got_gradient


def _model_key(name: str) -> str:
    """A PeftModel parameter name as the base model names it."""
    return name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")


def check_only_adapters_train(case: Case) -> None:
    """Training changes adapter parameters (and modules_to_save) only; base BatchNorm statistics stay put."""
    _, model = build_peft(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(m in n for m in ADAPTER_KEY_MARKERS) for n in trainable), sorted(trainable)[:5]
    got_gradient = train_steps(model, case)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_changed = sorted(k for k in changed if not any(m in k for m in ADAPTER_KEY_MARKERS))
    assert not frozen_changed, f"frozen tensors changed (BN statistics?): {frozen_changed[:5]}"
    # Behind a zero-initialised branch some updates are below fp32 resolution after 3 steps (e.g. BN_a's weight at
    # 1.0), so the check is that every trainable parameter gets a gradient, and that training moved the model.
    unused = getattr(model.get_base_model(), "unused_parameter_prefixes", ())  # parts the model's forward never reads
    no_gradient = sorted(n for n in trainable - got_gradient if not _model_key(n).startswith(tuple(unused)))
    assert not no_gradient, f"trainable parameters got no gradient: {no_gradient[:5]}"
    assert changed & trainable, "training changed no trainable parameter"


def check_bn_stats_frozen(case: Case) -> None:
    """Every frozen BatchNorm of the base keeps its running statistics through training in train mode."""
    _, model = build_peft(case)
    bn_stats = {
        n: b.clone()
        for n, b in model.named_buffers()
        if ("running_" in n) and not any(m in n for m in ADAPTER_KEY_MARKERS)
    }
    assert bn_stats, "the test models all have BatchNorm layers"
    train_steps(model, case)
    buffers = dict(model.named_buffers())
    assert all(torch.equal(bn_stats[n], buffers[n]) for n in bn_stats)


_LOAD_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import peft_vision_ext  # the import a user needs
from peft import PeftModel
from tiny_models import FACTORIES, forward_logits
jobs = json.load(open({manifest!r}))
for job in jobs:
    base = FACTORIES[job["model"]](seed=0)
    model = PeftModel.from_pretrained(base, job["adapter_dir"]).eval()
    x = torch.load(job["input"])
    with torch.no_grad():
        torch.save(forward_logits(model, x), job["output"])
"""


def save_for_fresh_process(case: Case, workdir: str) -> dict[str, Any]:
    """Train a little, save the adapter and the expected output; return the job for `load_in_fresh_process`."""
    _, model = build_peft(case)
    train_steps(model, case)
    x = case.make_input(seed=3)
    with torch.no_grad():
        expected = forward_logits(model, x)
    job_dir = os.path.join(workdir, case.name)
    model.save_pretrained(os.path.join(job_dir, "adapter"))
    torch.save(x, os.path.join(job_dir, "input.pt"))
    torch.save(expected, os.path.join(job_dir, "expected.pt"))
    return {
        "model": case.model,
        "adapter_dir": os.path.join(job_dir, "adapter"),
        "input": os.path.join(job_dir, "input.pt"),
        "output": os.path.join(job_dir, "output.pt"),
        "expected": os.path.join(job_dir, "expected.pt"),
    }


def load_in_fresh_process(jobs: list[dict[str, Any]], workdir: str, run: Callable = subprocess.run) -> None:
    manifest = os.path.join(workdir, "manifest.json")
    with open(manifest, "w") as handle:
        json.dump(jobs, handle)
    script = _LOAD_SCRIPT.format(tests_dir=TESTS_DIR, manifest=manifest)
    result = run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

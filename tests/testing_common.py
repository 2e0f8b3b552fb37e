# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The shared test matrix: tiny models x configs, and the checks every method must pass (our `PeftCommonTester`).

A method joins by adding `Case`s to `MATRIX`; every `check_*` function below then runs on it through the thin
parametrized tests in `test_matrix.py`. Tolerances live in `TOLERANCES` (one table; a case may tighten or loosen one
in `Case.tolerances`). A check that cannot apply to a case says so through a `Case` field, never through a skip.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.peft_model import get_layer_status, get_model_status
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

import peft_vision_ext  # noqa: F401  (registers the methods)
from peft_vision_ext import ConvAdapterConfig, DeformableLoRAConfig, MoPEFTConfig, SeqAdapterConfig

from tiny_models import DEFAULT_MODULES_TO_SAVE, FACTORIES, forward_logits, logits_of


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Every tolerance of the matrix: relative difference (max |a - b| / max |b|, see `rel_diff`) unless noted.
TOLERANCES: dict[str, float] = {
    # adapted at init vs the base, for cases that equal it to float precision only (`Case.identity_exact=False`).
    "identity": 1e-5,
    # Absolute: disable_adapter() vs the base, and re-enabled vs before; a fresh process's load vs the saved output.
    "disable": 1e-6,
    "fresh_process": 1e-6,
    # Relative: a `low_cpu_mem_usage=True` load (meta-device path) vs the output saved with the adapter.
    "save_load": 1e-5,
    # merged (merge_adapter / merge_and_unload) vs unmerged outputs, fp32; also merge_adapter() twice vs once.
    "merge": 1e-5,
    # Outputs that must be the same computation: set_adapter / delete_adapter / load_adapter vs the model that has
    # that adapter alone, and a reused config vs a fresh one (fp32).
    "adapters": 1e-5,
    # One row of a mixed-adapter batch (`forward(adapter_names=...)`) vs that adapter alone on the whole batch.
    "mixed_batch": 1e-5,
    # unload() vs the base model, for cases whose frozen base rounds differently (`Case.identity_exact=False`).
    "unload": 1e-5,
    # A base cast to bf16 / fp16 with the adapter, eval mode, vs the fp32 model with the same adapter (see
    # `check_low_precision`). The bases alone already differ by up to ~8e-2 (bf16) and ~1e-2 (fp16) on the tiny models.
    "bfloat16": 0.15,
    "float16": 0.03,
}


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    model: str  # key of tiny_models.FACTORIES
    config_cls: type[PeftConfig]
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (2, 3, 40, 52)
    # merge_and_unload is exact for this config (otherwise it must refuse, in words, and change nothing).
    mergeable: bool = True
    # How `check_merge_equivalence` checks the fused model: "convs" (conv adapters fold into the convs: the same convs,
    # plus at most one bias per bias-free conv) or "transformer" (exactly the base's parameters).
    fused_check: Literal["convs", "transformer"] = "transformer"
    # merge_adapter() itself must refuse (in words, changing nothing): a gated LoRA scaling is input-dependent, so no
    # weight update equals it. Every other case merges what folds and keeps the rest running.
    merge_adapter_refuses: bool = False
    # Config overrides under which the model must equal the base at init. Prefixes take attention mass from step 0
    # (like every prefix/prompt method); a gated prefix is removed exactly by a gate at 0 (a very negative init).
    identity_overrides: dict[str, Any] = field(default_factory=dict)
    # Ungated prefixes cannot be an identity at init: the check asserts that they act, and that nothing else does.
    prefix_acts_at_init: bool = False
    has_batchnorm: bool = True
    # SDPA kernels round differently once the key length changes, so a zero-weight prefix equals the base only to
    # float precision there; everything else must be bit-exact.
    identity_exact: bool = True
    # A core case runs every common check in the default `make test`. The others (further models and variants of a
    # method whose core case already runs everything) run the original six checks there, and every other check
    # under `-m slow`, which CI-free full runs use. New methods: leave this True.
    core: bool = True
    # A case whose model is heavy for the 2-core CI (the seed's resnet18 U-Net): every check of it runs under
    # `-m slow` only; lighter cases of the same method cover the default run.
    heavy: bool = False
    # Per-case overrides of `TOLERANCES` (same keys).
    tolerances: dict[str, float] = field(default_factory=dict)
    # The output that `check_low_precision` compares with fp32: the logits, or a field of the model output computed
    # before any discontinuity (the final output is still checked finite and of the base dtype).
    low_precision_output: str = "logits"

    def make_base(self, seed: int = 0) -> torch.nn.Module:
        """A fresh copy of the tiny base model (built once per process: some take a second to construct)."""
        key = (self.model, seed)
        if key not in _BASES:
            _BASES[key] = FACTORIES[self.model](seed=seed)
        return copy.deepcopy(_BASES[key])

    def make_config(self, **overrides: Any) -> PeftConfig:
        return self.config_cls(**{**self.kwargs, **overrides})

    def make_input(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(seed))

    @cached_property
    def prefix(self) -> str:
        """The tuner's attribute prefix, as peft knows it (`PEFT_TYPE_TO_PREFIX_MAPPING`)."""
        return PEFT_TYPE_TO_PREFIX_MAPPING[self.make_config().peft_type]

    @cached_property
    def adapter_markers(self) -> tuple[str, ...]:
        """Substrings of parameter / state-dict names that belong to the adapter (trainable by design)."""
        return (self.prefix, "modules_to_save")

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """The modules this case trains in full: named in the config, or declared by the model."""
        return tuple(self.kwargs.get("modules_to_save") or DEFAULT_MODULES_TO_SAVE.get(self.model, ()))

    def tolerance(self, check: str) -> float:
        return self.tolerances.get(check, TOLERANCES[check])

    def is_adapter_key(self, name: str) -> bool:
        return any(marker in name for marker in self.adapter_markers)


_BASES: dict[tuple[str, int], torch.nn.Module] = {}

_CONV = {"config_cls": ConvAdapterConfig, "fused_check": "convs"}
MATRIX: list[Case] = [
    Case(name="tiny_cnn-conv", model="tiny_cnn", **_CONV),
    Case(name="tiny_cnn-bn_only", model="tiny_cnn", kwargs={"adapter_type": "bn"}, **_CONV),
    Case(
        name="tiny_cnn-conv_nobias-head",
        core=False,
        model="tiny_cnn",
        kwargs={"adapter_bias": False, "modules_to_save": ["head"]},
        **_CONV,
    ),
    Case(
        name="unet_resnet18-conv-head",
        core=False,
        heavy=True,
        model="unet_resnet18",
        kwargs={"modules_to_save": ["segmentation_head"]},
        input_shape=(2, 3, 32, 40),
        **_CONV,
    ),
    Case(
        name="unet_test_resnet-bn_only", core=False, model="unet_test_resnet", kwargs={"adapter_type": "bn"}, **_CONV
    ),
    Case(
        name="unet_test_resnet-decoder_regex",
        core=False,
        model="unet_test_resnet",
        kwargs={"target_modules": r"decoder\..*\.conv"},
        **_CONV,
    ),
    Case(
        name="unet_test_efficientnet-conv",
        core=False,
        model="unet_test_efficientnet",
        input_shape=(2, 3, 33, 47),
        **_CONV,
    ),
]

_GATE_OFF = {"prefix_gate_init": -1e4}  # log G_P = -1e4: the prefixes get exactly zero attention weight
_TRANSFORMER = {"config_cls": MoPEFTConfig, "has_batchnorm": False}
# Gated LoRA (the full mixture): merge_and_unload refuses, and so does merge_adapter().
_GATED = {"mergeable": False, "merge_adapter_refuses": True, "identity_overrides": _GATE_OFF}
MATRIX += [
    # SAM (windowed block with padded windows + global block), the full mixture and each plain method.
    Case(name="sam-mopeft", model="sam_tiny", input_shape=(2, 3, 64, 72), **_GATED, **_TRANSFORMER),
    Case(
        name="sam_sdpa-mopeft",
        core=False,
        model="sam_tiny_sdpa",
        input_shape=(2, 3, 80, 80),
        identity_exact=False,
        **_GATED,
        **_TRANSFORMER,
    ),
    Case(
        name="sam-lora",
        model="sam_tiny",
        kwargs={"gating": False, "use_prefix": False, "use_adapter": False},
        input_shape=(2, 3, 64, 64),
        **_TRANSFORMER,
    ),
    Case(
        name="sam-vpt_deep",
        core=False,
        model="sam_tiny",
        kwargs={"gating": False, "use_lora": False, "use_adapter": False},
        input_shape=(2, 3, 64, 64),
        mergeable=False,
        prefix_acts_at_init=True,
        **_TRANSFORMER,
    ),
    Case(
        name="sam-vpt_shallow",
        model="sam_tiny",
        kwargs={"gating": False, "use_lora": False, "use_adapter": False, "prefix_depth": "shallow"},
        input_shape=(2, 3, 64, 64),
        mergeable=False,
        prefix_acts_at_init=True,
        **_TRANSFORMER,
    ),
    Case(
        name="sam-adapter",
        core=False,
        model="sam_tiny",
        kwargs={"gating": False, "use_lora": False, "use_prefix": False},
        input_shape=(2, 3, 64, 64),
        mergeable=False,
        **_TRANSFORMER,
    ),
    # Other ViT-family encoders (the seed's future work).
    Case(
        name="vit-mopeft",
        model="vit_tiny",
        kwargs={"r": 4, "prefix_length": 5},
        input_shape=(2, 3, 32, 32),
        **_GATED,
        **_TRANSFORMER,
    ),
    Case(
        name="dinov2-lora_k",
        model="dinov2_tiny",
        kwargs={"gating": False, "use_prefix": False, "use_adapter": False, "lora_targets": ["q", "k", "v"]},
        input_shape=(2, 3, 32, 32),
        **_TRANSFORMER,
    ),
]
# Seed 001. Freezing the parameters of Mask2Former or Deformable DETR changes their float rounding by ~1e-7 (another
# kernel path in deformable attention), so an adapted model equals the unfrozen base to float precision only.
_MASK2FORMER = {"has_batchnorm": False, "identity_exact": False, "input_shape": (2, 3, 64, 64)}
# Mask2Former's masked attention thresholds each layer's predicted masks at sigmoid 0.5, and a quarter of the adapted
# tiny model's mask logits lie within 0.05 of it: rounding flips attention masks, so the fp32 model itself moves its
# decoder output by ~0.4 under a 1e-3 input perturbation. Low precision is compared on the pixel decoder's output
# (backbone, pixel decoder and their adapters), before the first threshold.
_MASKED_ATTENTION = {"low_precision_output": "pixel_decoder_last_hidden_state", **_MASK2FORMER}
MATRIX += [
    Case(
        name="m2f-deform_lora",
        core=False,
        model="mask2former_tiny",
        config_cls=DeformableLoRAConfig,
        **_MASKED_ATTENTION,
    ),
    Case(
        name="m2f-deform_lora_ranks_mha_heads",
        core=False,
        model="mask2former_tiny",
        config_cls=DeformableLoRAConfig,
        kwargs={
            "projection_ranks": {"sampling_offsets": 2, "value_proj": 0},
            "extra_target_modules": ["cross_attn"],
            "multihead_attention_targets": ["q", "k", "v", "out"],
            "modules_to_save": ["class_predictor"],
        },
        **_MASKED_ATTENTION,
    ),
    Case(
        name="m2f-seq_adapter3",
        core=False,
        model="mask2former_tiny",
        config_cls=SeqAdapterConfig,
        kwargs={"adapters_per_block": 3},
        mergeable=False,
        **_MASKED_ATTENTION,
    ),
    Case(
        name="m2f-both",
        model="mask2former_tiny",
        config_cls=DeformableLoRAConfig,
        kwargs={"adapters_per_block": 2, "adapter_dim": 8, "extra_target_modules": ["cross_attn"]},
        mergeable=False,
        **_MASKED_ATTENTION,
    ),
    Case(
        name="detr-deform_lora",
        model="deformable_detr_tiny",
        config_cls=DeformableLoRAConfig,
        kwargs={"r": 4},
        **_MASK2FORMER,
    ),
    Case(
        name="detr-seq_adapter1",
        core=False,
        model="deformable_detr_tiny",
        config_cls=SeqAdapterConfig,
        kwargs={"adapters_per_block": 1},
        mergeable=False,
        **_MASK2FORMER,
    ),
]


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def peft_model(base: torch.nn.Module, config: PeftConfig, **kwargs: Any) -> PeftModel:
    """``get_peft_model`` with the global RNG seeded (adapters drawn from it are the same in every build) and the
    expected 'left out' warnings of default conv targeting hushed."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        return get_peft_model(base, config, **kwargs)


def build_peft(
    case: Case,
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    autocast_adapter_dtype: bool = True,
    **config_overrides: Any,
):
    """The base model (eval mode, cast to ``dtype`` if given) and its peft model (eval mode)."""
    base = case.make_base(seed)
    if dtype is not None:
        base = base.to(dtype)
    config = case.make_config(**config_overrides)
    model = peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast_adapter_dtype)
    return base, model.eval()


def add_adapter(case: Case, model: PeftModel, name: str, **config_overrides: Any) -> None:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        model.add_adapter(name, case.make_config(**config_overrides))
    model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def tuner_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _sample(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN in the same places counting as equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def changed_tensors(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """State-dict entries of ``model`` that differ from the snapshot ``before`` (added and removed ones too)."""
    after = model.state_dict()
    return sorted(
        {k for k in before if k not in after or not _same(before[k], after[k])} | {k for k in after if k not in before}
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    diff = rel_diff(got, expected)
    assert diff < tol, f"{what}: relative difference {diff:.3g} (tolerance {tol:g})"


def merged_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    return {name: list(layer.merged_adapters) for name, layer in tuner_layers(model).items() if layer.merged_adapters}


class Problems:
    """Collects the failures of a check's independent steps, so that one run reports every one of them."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.lines: list[str] = []

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # AssertionError included: the step failed, the next ones still run
            frames = [f for f in traceback.extract_tb(error.__traceback__) if "site-packages" not in f.filename]
            where = f" [{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}]" if frames else ""
            message = " ".join(str(error).split())
            message = message if len(message) < 600 else message[:600] + " ..."
            self.lines.append(f"{label}: {type(error).__name__}: {message}{where}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise AssertionError(f"{self.what}:\n  - " + "\n  - ".join(self.lines))


# ----------------------------------------------------------------------------------------------------------------------
# Identity, disabling, merging
# ----------------------------------------------------------------------------------------------------------------------
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
        assert_close(adapted, expected, case.tolerance("identity"), "adapters changed the model at init")


@torch.no_grad()
def check_disable_adapter(case: Case) -> None:
    base, model = build_peft(case, init_weights=False)
    x = case.make_input()
    expected = forward_logits(base, x)
    adapted = forward_logits(model, x)
    assert rel_diff(adapted, expected) > 1e-3, "random adapters should change the output"
    atol = case.tolerance("disable")
    with model.disable_adapter():
        assert torch.allclose(forward_logits(model, x), expected, atol=atol), "disabled adapters still act"
    assert torch.allclose(forward_logits(model, x), adapted, atol=atol), "re-enabled adapters must act again"


@torch.no_grad()
def check_merge_equivalence(case: Case) -> None:
    """Unmerged == merge_adapter == unmerge_adapter again == merge_and_unload, within the method's tolerance."""
    tol = case.tolerance("merge")
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
    fused = model.merge_and_unload()
    assert type(fused) is type(base)
    assert rel_diff(forward_logits(fused, x), unmerged) < tol
    _assert_no_adapter_modules(case, fused)
    if case.fused_check == "convs":
        _check_fused_convs(base, fused)
    else:
        assert {n: p.shape for n, p in fused.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}


def _assert_no_adapter_modules(case: Case, model: torch.nn.Module) -> None:
    left = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
        or case.prefix in name
        or name.endswith("base_layer")
        or name.endswith("original_module")
    ]
    assert not left, f"adapter modules survived: {_sample(left)}"


def _check_fused_convs(base: torch.nn.Module, fused: torch.nn.Module) -> None:
    base_params = sum(p.numel() for p in base.parameters())
    base_convs = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)}
    fused_convs = {n: m for n, m in fused.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert fused_convs.keys() == base_convs.keys()
    # The only extra parameters fusion may add: one bias for each conv that had none.
    new_biases = [n for n, m in fused_convs.items() if m.bias is not None and base_convs[n].bias is None]
    extra = sum(p.numel() for p in fused.parameters()) - base_params
    assert extra == sum(fused_convs[n].out_channels for n in new_biases)


def _nan_target(case: Case, model: PeftModel) -> tuple[str, torch.nn.Parameter]:
    """The first parameter of a tuner layer (not of modules_to_save): NaN there reaches the first merged layer."""
    for name, param in model.named_parameters():
        if case.prefix in name and "modules_to_save" not in name:
            return name, param
    raise AssertionError(f"{case.name}: the model has no parameter with the tuner prefix {case.prefix!r}")


@torch.no_grad()
def check_safe_merge_refuses_nan(case: Case) -> None:
    """With a NaN in an adapter tensor, ``safe_merge=True`` raises a ValueError and changes nothing (mergeable cases);
    non-mergeable cases refuse merge_and_unload in words regardless, and merge_adapter never writes a NaN into the
    base weights."""
    _, model = build_peft(case, init_weights=False)
    name, param = _nan_target(case, model)
    param.view(-1)[0] = float("nan")
    before = snapshot(model)
    problems = Problems(f"{case.name}: NaN in `{name}`")
    with problems.step("merge_adapter(safe_merge=True)"):
        try:
            model.merge_adapter(safe_merge=True)
        except ValueError as error:
            changed = changed_tensors(before, model)
            assert not changed, f"raised ({error}) but changed {_sample(changed)}"
            assert not merged_layers(model), f"raised but left layers marked merged: {merged_layers(model)}"
            if case.mergeable or case.merge_adapter_refuses:
                expected = ("nan", "inf") if case.mergeable else ("merge",)
                assert any(w in str(error).lower() for w in expected), f"the error does not say why: {error}"
        else:
            assert not (case.mergeable or case.merge_adapter_refuses), "merged an adapter holding a NaN"
            base_keys = [k for k in model.state_dict() if not case.is_adapter_key(k)]
            broken = [k for k in base_keys if not torch.isfinite(model.state_dict()[k].float()).all()]
            assert not broken, f"merge_adapter(safe_merge=True) wrote NaN/Inf into base weights: {_sample(broken)}"
            model.unmerge_adapter()
    with problems.step("merge_and_unload(safe_merge=True)"):
        before = snapshot(model)
        try:
            result = model.merge_and_unload(safe_merge=True)
        except ValueError as error:
            changed = changed_tensors(before, model)
            assert not changed, f"raised ({error}) but changed {_sample(changed)}"
            expected = ("nan", "inf") if case.mergeable else ("cannot merge",)
            assert any(w in str(error).lower() for w in expected), f"the error does not say why: {error}"
        else:
            broken = [n for n, t in result.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
            raise AssertionError(f"did not refuse; the merged model holds NaN/Inf in {_sample(broken)}")
    problems.raise_if_any()


@torch.no_grad()
def check_merge_idempotent(case: Case) -> None:
    """merge_adapter() twice == once (no double merge); one unmerge_adapter() restores the unmerged output."""
    tol = case.tolerance("merge")
    _, model = build_peft(case, init_weights=False)
    x = case.make_input()
    unmerged = forward_logits(model, x)
    if case.merge_adapter_refuses:
        before = snapshot(model)
        try:
            model.merge_adapter()
        except ValueError as error:
            assert "merge" in str(error).lower(), f"merge_adapter() refused without saying why: {error}"
        else:
            raise AssertionError("merge_adapter() must refuse an adapter that no weight update equals")
        changed = changed_tensors(before, model)
        assert not changed and not merged_layers(model), f"a refused merge_adapter() changed {_sample(changed)}"
        assert torch.equal(forward_logits(model, x), unmerged), "a refused merge_adapter() changed the output"
        return
    model.merge_adapter()
    once = forward_logits(model, x)
    assert_close(once, unmerged, tol, "merge_adapter() changed the output")
    weights_once = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that everything is merged already
        model.merge_adapter()
    twice = forward_logits(model, x)
    changed = changed_tensors(weights_once, model)
    assert not changed, f"a second merge_adapter() changed weights again (double merge): {_sample(changed)}"
    assert_close(twice, once, tol, "a second merge_adapter() changed the output (double merge)")
    doubled = {name: merged for name, merged in merged_layers(model).items() if len(merged) != len(set(merged))}
    assert not doubled, f"layers list an adapter as merged twice: {doubled}"
    model.unmerge_adapter()
    assert not merged_layers(model), f"unmerge_adapter() left layers merged: {merged_layers(model)}"
    assert_close(forward_logits(model, x), unmerged, tol, "one unmerge_adapter() did not restore the unmerged output")


@torch.no_grad()
def check_unload(case: Case) -> None:
    """unload() returns the base class without any adapter module, computing exactly what the base computes."""
    base, model = build_peft(case, init_weights=False)
    x = case.make_input()
    expected = forward_logits(base, x)
    assert rel_diff(forward_logits(model, x), expected) > 1e-3, "random adapters should change the output"
    unloaded = model.unload()
    assert type(unloaded) is type(base), f"unload() returned {type(unloaded).__name__}, not {type(base).__name__}"
    _assert_no_adapter_modules(case, unloaded)
    shapes = {n: tuple(p.shape) for n, p in unloaded.named_parameters()}
    base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    assert shapes == base_shapes, (
        f"unload() changed the parameters: extra {_sample(shapes.keys() - base_shapes.keys())}, missing "
        f"{_sample(base_shapes.keys() - shapes.keys())}"
    )
    got = forward_logits(unloaded, x)
    if case.identity_exact:
        assert torch.equal(got, expected), f"unload() output differs from the base by {rel_diff(got, expected):.3g}"
    else:
        assert_close(got, expected, case.tolerance("unload"), "unload() output differs from the base")


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
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
    trainable = trainable_names(model)
    assert trainable and all(case.is_adapter_key(n) for n in trainable), sorted(trainable)[:5]
    got_gradient = train_steps(model, case)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_changed = sorted(k for k in changed if not case.is_adapter_key(k))
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
    bn_stats = {n: b.clone() for n, b in model.named_buffers() if ("running_" in n) and not case.is_adapter_key(n)}
    assert bn_stats, "the test models all have BatchNorm layers"
    train_steps(model, case)
    buffers = dict(model.named_buffers())
    assert all(torch.equal(bn_stats[n], buffers[n]) for n in bn_stats)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _outputs(case: Case, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the output `check_low_precision` compares (`Case.low_precision_output`)."""
    out = model(pixel_values=x)
    probe = logits_of(out) if case.low_precision_output == "logits" else getattr(out, case.low_precision_output)
    return logits_of(out), probe


def check_low_precision(case: Case, dtype: torch.dtype) -> None:
    """A base cast to ``dtype``, adapted with ``autocast_adapter_dtype`` True and False: a finite eval output of the
    base dtype, close to the fp32 model with the same adapter weights; adapter parameters in float32 (True) or the
    base dtype (False, peft's contract); saved and reloaded onto a ``dtype`` base, the same output exactly; a
    train-mode forward and backward with a finite loss and finite gradients on
    adapter parameters only. The adapters start from their init plus the same small noise everywhere (random-init
    adapters compound to 1e5x the base output on deep BN-only cases: that overflows fp16 by design, not by a bug)."""
    tol = case.tolerance(str(dtype).removeprefix("torch."))
    x = case.make_input()
    _, reference_model = build_peft(case)
    _perturb_trainable(reference_model, seed=5)
    with torch.no_grad():
        _, reference = _outputs(case, reference_model, x)
    problems = Problems(f"{case.name} in {dtype}")
    for autocast in (True, False):
        label = f"autocast_adapter_dtype={autocast}"
        _, model = build_peft(case, dtype=dtype, autocast_adapter_dtype=autocast)
        with problems.step(f"{label}, adapter dtypes"):
            want = torch.float32 if autocast else dtype
            wrong = [
                f"{n} ({p.dtype})"
                for n, p in model.named_parameters()
                if case.prefix in n and "modules_to_save" not in n and p.dtype != want
            ]
            assert not wrong, f"adapter parameters should be {want}: {_sample(wrong)}"
        _perturb_trainable(model, seed=5)
        with problems.step(f"{label}, eval forward"), torch.no_grad():
            out, probe = _outputs(case, model, x.to(dtype))
            assert out.dtype == dtype, f"the output is {out.dtype}, not the base dtype"
            assert torch.isfinite(out).all(), "the output holds NaN/Inf"
            what = "the output" if case.low_precision_output == "logits" else f"`{case.low_precision_output}`"
            assert_close(probe.float(), reference, tol, f"{what} is far from the fp32 model's")
        with problems.step(f"{label}, save and reload onto a {dtype} base"), tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            again = PeftModel.from_pretrained(case.make_base().to(dtype), path, autocast_adapter_dtype=autocast).eval()
            assert {p.dtype for n, p in again.named_parameters() if case.prefix in n} <= {want}
            with torch.no_grad():  # the same (no-grad) code path as `out`
                reloaded, _ = _outputs(case, again, x.to(dtype))
            assert torch.equal(reloaded, out), "the reloaded model computes differently"
        with problems.step(f"{label}, train-mode forward and backward"):
            model.train()
            loss = forward_logits(model, x.to(dtype)).float().square().mean()
            assert torch.isfinite(loss), f"the loss is {loss.item()}"
            loss.backward()
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad, "no parameter got a gradient"
            frozen = sorted(n for n in with_grad if not case.is_adapter_key(n))
            assert not frozen, f"base parameters got gradients: {_sample(frozen)}"
            broken = sorted(n for n in with_grad if not torch.isfinite(model.get_parameter(n).grad).all())
            assert not broken, f"gradients hold NaN/Inf: {_sample(broken)}"
    problems.raise_if_any()


@torch.no_grad()
def check_low_precision_merge(case: Case, dtype: torch.dtype) -> None:
    """Merging on a ``dtype`` base rounds once: every merged weight equals the float32 merge of the same (already
    rounded) base and adapter tensors, cast to ``dtype``. That is as exact as a merge in ``dtype`` can be; peft's own
    LoRA adds a delta already rounded to the base dtype (two roundings)."""
    base = case.make_base().to(dtype)
    low = peft_model(copy.deepcopy(base), case.make_config(init_weights=False)).eval()
    high = peft_model(copy.deepcopy(base).float(), case.make_config(init_weights=False)).eval()
    # The float32 twin gets exactly the low-precision model's adapter tensors (BN statistics included).
    adapter_state = {k: v.float() for k, v in low.state_dict().items() if case.is_adapter_key(k)}
    high.load_state_dict(adapter_state, strict=False)
    fused_low, fused_high = low.merge_and_unload(), high.merge_and_unload()
    expected = {k: v.to(dtype) for k, v in fused_high.state_dict().items()}
    got = fused_low.state_dict()
    assert got.keys() == expected.keys()
    off = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not off, f"{case.name}: merged {dtype} weights are not the once-rounded float32 merge: {_sample(off)}"


# ----------------------------------------------------------------------------------------------------------------------
# Several adapters
# ----------------------------------------------------------------------------------------------------------------------
def single_adapter_model(case: Case, base: torch.nn.Module, model: PeftModel, name: str) -> PeftModel:
    """A model built with adapter ``name`` alone, holding the weights that ``model`` has for it (a plain
    ``load_state_dict`` of the same keys: no peft loading code in between)."""
    alone = peft_model(copy.deepcopy(base), case.make_config(init_weights=False), adapter_name=name).eval()
    source, target = model.state_dict(), alone.state_dict()
    missing = [k for k in target if k not in source]
    assert not missing, f"the multi-adapter model lacks tensors of a model with only {name!r}: {_sample(missing)}"
    alone.load_state_dict({k: source[k] for k in target})
    return alone


def _keys_of(model: torch.nn.Module, adapter: str) -> list[str]:
    return [k for k in model.state_dict() if adapter in k.split(".")]


@torch.no_grad()
def check_multiple_adapters(case: Case, saved: SavedAdapters) -> None:
    """add_adapter / set_adapter / delete_adapter (inactive and active) on one model, and load_adapter onto a loaded
    model: each computes what the model with that adapter alone computes."""
    tol = case.tolerance("adapters")
    x = case.make_input()
    problems = Problems(f"{case.name}: several adapters")
    with problems.step("add_adapter('other') / set_adapter / delete_adapter"):
        base, model = build_peft(case, init_weights=False)
        out_default = forward_logits(model, x)
        add_adapter(case, model, "other", init_weights=False)
        assert model.active_adapters == ["default"], (
            f"add_adapter changed the active adapters: {model.active_adapters}"
        )
        assert_close(forward_logits(model, x), out_default, tol, "adding an inactive adapter changed the output")
        model.set_adapter("other")
        out_other = forward_logits(model, x)
        assert rel_diff(out_other, out_default) > 1e-3, "set_adapter('other') did not change the output"
        expected_other = forward_logits(single_adapter_model(case, base, model, "other"), x)
        assert_close(out_other, expected_other, tol, "with 'other' active, the output is not that of 'other' alone")
        model.set_adapter("default")
        assert_close(forward_logits(model, x), out_default, tol, "set_adapter('default') did not switch back")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that the active adapter changes
            model.delete_adapter("default")  # the active one
        assert model.active_adapters == ["other"], f"after deleting the active adapter: {model.active_adapters}"
        left = _keys_of(model, "default")
        assert not left, f"delete_adapter('default') left its tensors: {_sample(left)}"
        assert_close(forward_logits(model, x), out_other, tol, "after deleting 'default', 'other' computes otherwise")
        add_adapter(case, model, "third", init_weights=False)
        model.delete_adapter("third")  # an inactive one
        left = _keys_of(model, "third")
        assert not left, f"delete_adapter('third') left its tensors: {_sample(left)}"
        assert model.active_adapters == ["other"], f"deleting an inactive adapter changed {model.active_adapters}"
        assert_close(forward_logits(model, x), out_other, tol, "deleting an inactive adapter changed the output")
    with problems.step("PeftModel.from_pretrained(A) + load_adapter(B, 'other') + set_adapter('other')"):
        loaded = PeftModel.from_pretrained(case.make_base(), saved.dirs[0]).eval()
        assert_close(forward_logits(loaded, saved.x), saved.expected[0], tol, "the loaded adapter A")
        loaded.load_adapter(saved.dirs[1], adapter_name="other")
        loaded.eval()
        assert_close(forward_logits(loaded, saved.x), saved.expected[0], tol, "load_adapter changed the active A")
        loaded.set_adapter("other")
        assert_close(forward_logits(loaded, saved.x), saved.expected[1], tol, "set_adapter('other') after loading B")
    problems.raise_if_any()


@torch.no_grad()
def check_mixed_adapter_batch(case: Case) -> None:
    """``forward(adapter_names=["default", "other"])`` and ``["other", "__base__"]``: each row computed with its
    adapter (or none), the model unchanged afterwards. Rows silently computed with the active adapter fail."""
    tol = case.tolerance("mixed_batch")
    _, model = build_peft(case, init_weights=False)
    add_adapter(case, model, "other", init_weights=False)
    x = case.make_input()
    assert x.shape[0] == 2, "the check pairs one row with each adapter"
    out_default = forward_logits(model, x)
    model.set_adapter("other")
    out_other = forward_logits(model, x)
    model.set_adapter("default")
    model.eval()
    assert rel_diff(out_other[1], out_default[1]) > 1e-3, "the two adapters should compute differently"
    with model.disable_adapter():
        out_base = forward_logits(model, x)
    trainable_before = trainable_names(model)
    mixed = forward_logits(model, x, adapter_names=["default", "other"])
    if rel_diff(mixed[1], out_default[1]) < tol:
        raise AssertionError(
            "forward(adapter_names=['default', 'other']) silently ignored `adapter_names`: row 1 was computed with "
            "the active adapter 'default'. Honour it per row or raise a ValueError that names `adapter_names`."
        )
    assert_close(mixed[0], out_default[0], tol, "row 0 (adapter 'default') of the mixed batch")
    assert_close(mixed[1], out_other[1], tol, "row 1 (adapter 'other') of the mixed batch")
    with_base = forward_logits(model, x, adapter_names=["other", "__base__"])
    assert_close(with_base[0], out_other[0], tol, "row 0 (adapter 'other') of a batch with '__base__'")
    assert_close(with_base[1], out_base[1], tol, "row 1 ('__base__': no adapter) of the mixed batch")
    assert_close(forward_logits(model, x), out_default, tol, "a mixed batch left the model changed")
    assert trainable_names(model) == trainable_before, "a mixed batch changed which parameters train"


# ----------------------------------------------------------------------------------------------------------------------
# Configs and status
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_config_reuse(case: Case) -> None:
    """get_peft_model leaves the config as it was, and the same config object on a second fresh base adapts the same
    modules and computes the same output as a fresh config."""
    problems = Problems(f"{case.name}: config reuse")
    config = case.make_config(init_weights=False)
    before = copy.deepcopy(config.to_dict())
    first = peft_model(case.make_base(), config)
    with problems.step("get_peft_model must not change the config"):
        after = config.to_dict()
        changed = {
            k: (before.get(k), after.get(k))
            for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)
        }
        assert not changed, "fields changed (before, after): " + "; ".join(
            f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changed.items()
        )
    del first
    with problems.step("the reused config adapts as a fresh one"):
        x = case.make_input()
        reused = peft_model(case.make_base(), config).eval()
        fresh = peft_model(case.make_base(), case.make_config(init_weights=False)).eval()
        names_reused, names_fresh = set(tuner_layers(reused)), set(tuner_layers(fresh))
        assert names_reused == names_fresh, (
            f"adapted modules differ: only with the reused config {_sample(names_reused - names_fresh)}; only with a "
            f"fresh one {_sample(names_fresh - names_reused)}"
        )
        assert trainable_names(reused) == trainable_names(fresh), "the trainable parameters differ"
        assert_close(forward_logits(reused, x), forward_logits(fresh, x), case.tolerance("adapters"), "outputs differ")
    problems.raise_if_any()


def check_layer_and_model_status(case: Case) -> None:
    """peft's get_layer_status / get_model_status list our layers with our adapter names, enabled and merged state."""
    _, model = build_peft(case)
    problems = Problems(f"{case.name}: get_layer_status / get_model_status")
    ours = {name for name, layer in tuner_layers(model.base_model).items()}
    with problems.step("one adapter"):
        layers = {status.name: status for status in get_layer_status(model)}
        missing = ours - layers.keys()
        assert not missing, f"get_layer_status misses our layers {_sample(missing)}"
        wrong = [
            f"{name}: available {s.available_adapters}, active {s.active_adapters}, merged {s.merged_adapters}, "
            f"requires_grad {s.requires_grad}, enabled {s.enabled}"
            for name, s in layers.items()
            if name in ours
            and (
                s.available_adapters != ["default"]
                or s.active_adapters != ["default"]
                or s.merged_adapters
                or s.requires_grad != {"default": True}
                or not s.enabled
            )
        ]
        assert not wrong, f"{len(wrong)} layer(s) report something other than one trainable 'default': " + " | ".join(
            wrong[:3]
        )
        status = get_model_status(model)
        assert status.available_adapters == ["default"], status.available_adapters
        assert status.active_adapters == ["default"], status.active_adapters
        assert status.merged_adapters == [], status.merged_adapters
        assert status.enabled is True, status.enabled
        assert status.requires_grad == {"default": True}, status.requires_grad
        assert list(status.peft_types) == ["default"], status.peft_types
        assert status.num_adapter_layers == len(layers), (status.num_adapter_layers, len(layers))
        assert 0 < status.trainable_params < status.total_params
        with model.disable_adapter():
            assert get_model_status(model).enabled is False, "disabled adapters reported enabled"
    if not case.merge_adapter_refuses:
        # peft's model-level `merged_adapters` reads "irregular" when modules_to_save (which never merge) are present,
        # so the merged state is checked on our layers.
        with problems.step("merge_adapter()"):
            with torch.no_grad():
                model.merge_adapter()
            wrong = [
                f"{s.name}: {s.merged_adapters}"
                for s in get_layer_status(model)
                if s.name in ours and "default" in s.available_adapters and s.merged_adapters != ["default"]
            ]
            assert not wrong, f"after merge_adapter(), layers report merged: {_sample(wrong)}"
            with torch.no_grad():
                model.unmerge_adapter()
            wrong = [f"{s.name}: {s.merged_adapters}" for s in get_layer_status(model) if s.merged_adapters]
            assert not wrong, f"after unmerge_adapter(), layers report merged: {_sample(wrong)}"
    with problems.step("a second adapter 'other'"):
        add_adapter(case, model, "other")
        status = get_model_status(model)
        assert status.available_adapters == ["default", "other"], status.available_adapters
        assert status.active_adapters == ["default"], status.active_adapters
        assert list(status.peft_types) == ["default", "other"], status.peft_types
        model.set_adapter("other")
        assert get_model_status(model).active_adapters == ["other"], get_model_status(model).active_adapters
    problems.raise_if_any()


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class SavedAdapters:
    """Two different adapters of one case saved with ``save_pretrained`` (``dirs``), and each one's eval output on
    ``x`` (``expected``). Tests must copy a directory before changing anything in it."""

    case: Case
    dirs: tuple[str, str]
    x: torch.Tensor
    expected: tuple[torch.Tensor, torch.Tensor]
    modules_to_save: tuple[str, ...]  # PeftModel names of the ModulesToSaveWrappers


def _perturb_trainable(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add the same noise (drawn in float32, in name order) to the trainable parameters of any build of a case."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_((scale * torch.randn(param.shape, generator=generator)).to(param.dtype))


class AdapterStore:
    """Saves each case's `SavedAdapters` once, on first use (a module-scoped fixture in `test_matrix.py`)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.saved: dict[str, SavedAdapters] = {}

    def get(self, case: Case) -> SavedAdapters:
        if case.name not in self.saved:
            self.saved[case.name] = save_adapters(case, os.path.join(self.root, case.name))
        return self.saved[case.name]


@torch.no_grad()
def save_adapters(case: Case, directory: str) -> SavedAdapters:
    _, model = build_peft(case, init_weights=False)
    declared = sorted(model.peft_config["default"].modules_to_save or [])
    assert declared == sorted(case.modules_to_save), (
        f"{case.name} trains modules_to_save={declared}, but the case declares {sorted(case.modules_to_save)}: update "
        "the case's kwargs or tiny_models.DEFAULT_MODULES_TO_SAVE"
    )
    x = case.make_input(seed=3)
    dirs, expected = [], []
    for seed in (11, 12):  # A and B differ in every trainable tensor
        _perturb_trainable(model, seed)
        dirs.append(os.path.join(directory, f"adapter_{seed}"))
        model.save_pretrained(dirs[-1])
        expected.append(forward_logits(model, x))
    wrappers = tuple(n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    return SavedAdapters(case, tuple(dirs), x, tuple(expected), wrappers)


def check_requires_grad_after_loading(case: Case, saved: SavedAdapters) -> None:
    """from_pretrained(is_trainable=False) -> nothing trainable; is_trainable=True -> exactly the parameters
    get_peft_model makes trainable; load_adapter(..., is_trainable=False) adds no trainable parameter."""
    _, built = build_peft(case, init_weights=False)
    expected = trainable_names(built)
    problems = Problems(f"{case.name}: requires_grad after loading")
    with problems.step("from_pretrained(is_trainable=False)"):
        inference = PeftModel.from_pretrained(case.make_base(), saved.dirs[0])
        trainable = trainable_names(inference)
        assert not trainable, f"an inference load left {len(trainable)} parameter(s) trainable: {_sample(trainable)}"
        with problems.step("then load_adapter(B, 'other', is_trainable=False)"):
            inference.load_adapter(saved.dirs[1], adapter_name="other", is_trainable=False)
            trainable = trainable_names(inference)
            assert not trainable, f"load_adapter made {len(trainable)} parameter(s) trainable: {_sample(trainable)}"
    with problems.step("from_pretrained(is_trainable=True)"):
        training = PeftModel.from_pretrained(case.make_base(), saved.dirs[0], is_trainable=True)
        trainable = trainable_names(training)
        assert trainable == expected, (
            f"trainable after loading differs from get_peft_model: extra {_sample(trainable - expected)}; missing "
            f"{_sample(expected - trainable)}"
        )
        with problems.step("then load_adapter(B, 'other', is_trainable=False)"):
            training.load_adapter(saved.dirs[1], adapter_name="other", is_trainable=False)
            added = trainable_names(training) - expected
            assert not added, (
                f"load_adapter(is_trainable=False) made {len(added)} parameter(s) trainable: {_sample(added)}"
            )
    problems.raise_if_any()


@torch.no_grad()
def check_low_cpu_mem_usage_load(case: Case, saved: SavedAdapters) -> None:
    """peft's meta-device path (how large bases are loaded): ``from_pretrained(..., low_cpu_mem_usage=True)`` builds
    the adapters on the meta device and assigns the checkpoint to them; the result equals a normal load and holds no
    meta tensor. ``inject_adapter_in_model(..., low_cpu_mem_usage=True)`` leaves only adapter tensors on meta."""
    model = PeftModel.from_pretrained(case.make_base(), saved.dirs[0], low_cpu_mem_usage=True).eval()
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"{case.name}: tensors left on the meta device: {_sample(meta)}"
    assert_close(
        forward_logits(model, saved.x), saved.expected[0], case.tolerance("save_load"), "low_cpu_mem_usage load"
    )
    injected = inject_adapter_in_model(case.make_config(), case.make_base(), low_cpu_mem_usage=True)
    meta = [n for n, p in injected.named_parameters() if p.is_meta]
    assert meta and all(case.is_adapter_key(n) for n in meta), f"{case.name}: meta tensors {_sample(meta)}"


# Ways a checkpoint directory can be damaged; `check_damaged_checkpoint` applies one and expects a clear error.
DAMAGES = (
    "missing_weights",  # adapter_model.safetensors deleted
    "truncated_weights",  # the file cut in half
    "foreign_weights",  # the weights file of a case of another method and model
    "missing_tensor",  # one adapter tensor removed from the file
    "extra_tensor",  # one unexpected adapter tensor added
    "fewer_target_modules",  # adapter_config.json edited to a subset of its target_modules
    "missing_modules_to_save",  # the modules_to_save tensors removed (cases with modules_to_save only)
)


def damages_for(case: Case) -> list[str]:
    """The damages that apply to ``case``: a checkpoint without modules_to_save cannot lose them."""
    return [d for d in DAMAGES if d != "missing_modules_to_save" or case.modules_to_save]


def foreign_case(case: Case) -> Case:
    """A case of another model and another method: its checkpoint is a foreign one for ``case``."""
    return next(c for c in MATRIX if c.model != case.model and c.config_cls is not case.config_cls)


def _module_path(key: str, prefix: str) -> str:
    """``base_model.model.a.b.<prefix>x.weight`` -> ``a.b``."""
    parts = key.removeprefix("base_model.model.").split(".")
    index = next(i for i, part in enumerate(parts) if prefix in part)
    return ".".join(parts[:index])


def damage_checkpoint(case: Case, damage: str, saved: SavedAdapters, foreign: SavedAdapters | None, path: str):
    """Copy adapter A of ``saved`` to ``path`` and damage it; return the words (any of them) that the error message
    must contain to name the problem."""
    shutil.copytree(saved.dirs[0], path)
    weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    config_path = os.path.join(path, CONFIG_NAME)
    if damage == "missing_weights":
        os.remove(weights)
        return (SAFETENSORS_WEIGHTS_NAME,)
    if damage == "truncated_weights":
        with open(weights, "rb") as handle:
            data = handle.read()
        with open(weights, "wb") as handle:
            handle.write(data[: len(data) // 2])
        return ("damaged", "truncated", "corrupt", "incomplete", "cannot be read")
    if damage == "foreign_weights":
        shutil.copyfile(os.path.join(foreign.dirs[0], SAFETENSORS_WEIGHTS_NAME), weights)
        return ("does not fit", "missing", "unexpected", "mismatch", "wrong shape", "another adapter", "different")
    tensors = load_file(weights)
    # Adapter tensors; not BatchNorm's step counter, which torch's BatchNorm may legitimately fill in when absent.
    adapter_keys = sorted(k for k in tensors if case.prefix in k and not k.endswith("num_batches_tracked"))
    assert adapter_keys, f"the saved checkpoint has no tensor with the prefix {case.prefix!r}: {_sample(tensors)}"
    if damage == "missing_tensor":
        key = adapter_keys[len(adapter_keys) // 2]
        del tensors[key]
        save_file(tensors, weights)
        return (key.removeprefix("base_model.model."),)
    if damage == "extra_tensor":
        module = _module_path(adapter_keys[0], case.prefix)
        key = f"base_model.model.{module}.{case.prefix}unexpected.weight"
        tensors[key] = torch.zeros(2, 2)
        save_file(tensors, weights)
        return (f"{case.prefix}unexpected",)
    if damage == "fewer_target_modules":
        with open(config_path) as handle:
            config = json.load(handle)
        targets = config["target_modules"]
        if isinstance(targets, str):  # a regex: exclude the first module it matched
            paths = sorted({_module_path(k, case.prefix) for k in adapter_keys})
            dropped = next(p for p in paths if re.fullmatch(targets, p))
            config["target_modules"] = f"(?!{re.escape(dropped)}$)(?:{targets})"
        else:
            assert len(targets) > 1, f"the case adapts a single target module ({targets}): no subset to test"
            dropped = sorted(targets)[-1]
            config["target_modules"] = [t for t in targets if t != dropped]
        with open(config_path, "w") as handle:
            json.dump(config, handle)
        return (dropped,)
    if damage == "missing_modules_to_save":
        prefixes = tuple(f"{name}." for name in saved.modules_to_save)
        removed = [k for k in tensors if k.startswith(prefixes)]
        assert removed, f"no modules_to_save tensor ({saved.modules_to_save}) in the checkpoint: {_sample(tensors)}"
        save_file({k: v for k, v in tensors.items() if k not in removed}, weights)
        return tuple(name.removeprefix("base_model.model.") for name in saved.modules_to_save)
    raise ValueError(f"unknown damage {damage!r}")


def _normalise_names(message: str) -> str:
    """Drop the adapter name from tensor names in ``message`` (`a.lora_A.default.weight` -> `a.lora_A.weight`)."""
    return re.sub(r"\.default(?=[.`'\"\s,;:)\]]|$)", "", message)


def check_damaged_checkpoint(case: Case, damage: str, saved: SavedAdapters, foreign: SavedAdapters, path: str) -> None:
    """Loading a damaged checkpoint raises a ValueError or FileNotFoundError whose message names the problem."""
    words = damage_checkpoint(case, damage, saved, foreign, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftModel.from_pretrained(case.make_base(), path)
    except (ValueError, FileNotFoundError) as error:
        message = _normalise_names(str(error))
        assert any(w.lower() in message.lower() for w in words), (
            f"{damage}: the {type(error).__name__} does not name the problem (expected one of {list(words)}): {error}"
        )
    except Exception as error:
        raise AssertionError(
            f"{damage}: raised {type(error).__name__} instead of a ValueError/FileNotFoundError naming the problem "
            f"(one of {list(words)}): {' '.join(str(error).split())[:400]}"
        ) from error
    else:
        raise AssertionError(
            f"{damage}: the damaged checkpoint loaded silently (expected an error naming {list(words)})"
        )


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

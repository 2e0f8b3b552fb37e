# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Pruning MoPEFT on a calibration set, then merging what is a weight update.

The gates are what makes MoPEFT cost more at inference than the base model: they are input-dependent, so a gated
LoRA cannot be folded into ``qkv``, and prefixes and adapters add work in every block. After training, many gates sit
near zero (the sub-method is not used in that block) or barely move between images. ``prune_mopeft``

1. runs the calibration batches and records every gate,
2. drops each sub-method whose gate stays below ``threshold`` on *every* calibration image (its parameters are
   deleted and the block is recorded in ``config.pruned``),
3. with ``freeze_gates=True``, replaces each remaining gate whose range over the calibration set is at most
   ``freeze_tolerance`` by its mean (recorded in ``config.frozen_gates``), which makes a LoRA's scaling constant,
4. measures how far the model's outputs moved on the calibration batches, and reports it.

Both steps are approximations chosen by the caller and measured, never silent. ``merge_mergeable`` then folds every
LoRA with a constant scaling into the weights; ``merge_and_unload`` works once nothing else is left.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layer import MoPEFTLayer, named_mopeft_layers


@dataclass
class PruneReport:
    pruned: dict[str, list[str]] = field(default_factory=dict)  # block -> dropped sub-methods
    frozen: dict[str, dict[str, float]] = field(default_factory=dict)  # block -> {sub-method: constant gate}
    kept: dict[str, list[str]] = field(default_factory=dict)  # block -> sub-methods still live
    max_abs_change: float = 0.0  # largest output change on the calibration batches
    max_rel_change: float = 0.0  # ... relative to the largest output magnitude
    calibration_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "frozen": self.frozen,
            "kept": self.kept,
            "max_abs_change": self.max_abs_change,
            "max_rel_change": self.max_rel_change,
            "calibration_images": self.calibration_images,
        }


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(pixel_values=batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _as_inputs(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k in ("pixel_values",)}
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(
        f"Calibration batches must be tensors of pixel values or dicts with `pixel_values`, got {type(batch).__name__}."
    )


@torch.no_grad()
def _drop(layer: MoPEFTLayer, adapter: str, dropped: list[str], frozen: dict[str, float]) -> None:
    """Remove ``dropped`` sub-methods and fix ``frozen`` gates of one adapter in one block, keeping trained gates."""
    settings = layer.mopeft_settings[adapter]
    attrs = {
        "lora": ("mopeft_lora_A", "mopeft_lora_B"),
        "prefix": ("mopeft_prefix_embedding", "mopeft_prefix_hidden", "mopeft_prefix_out"),
        "adapter": ("mopeft_adapter_down", "mopeft_adapter_up"),
    }
    for method in dropped:
        for attr in attrs[method]:
            del getattr(layer, attr)[adapter]
    settings["live"] = tuple(m for m in settings["live"] if m not in dropped)
    settings["pruned"] = sorted(set(settings["pruned"]) | set(dropped))
    settings["frozen"] = {**{m: v for m, v in settings["frozen"].items() if m not in dropped}, **frozen}
    old_gated = settings["gated"]
    new_gated = tuple(m for m in old_gated if m in settings["live"] and m not in settings["frozen"])
    if new_gated != old_gated:
        old = layer.mopeft_gate_out[adapter]
        if new_gated:
            rows = [old_gated.index(m) for m in new_gated]
            new = nn.Linear(old.in_features, len(rows)).to(old.weight.device, old.weight.dtype)
            new.weight.copy_(old.weight[rows])
            new.bias.copy_(old.bias[rows])
            new.requires_grad_(old.weight.requires_grad)
            layer.mopeft_gate_out[adapter] = new
        else:
            del layer.mopeft_gate_out[adapter]
            if adapter in layer.mopeft_gate_hidden:
                del layer.mopeft_gate_hidden[adapter]
        settings["gated"] = new_gated


def prune_mopeft(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    threshold: float = 0.05,
    freeze_gates: bool = False,
    freeze_tolerance: float = 0.02,
    adapter_name: str = "default",
) -> PruneReport:
    """Drop MoPEFT sub-modules whose gates stay below ``threshold`` on the calibration set and, with
    ``freeze_gates=True``, fix gates whose range is at most ``freeze_tolerance`` to their mean.

    Args:
        model: a ``PeftModel`` (or its base model) with a MoPEFT adapter.
        calibration_batches: tensors of pixel values, or dicts with ``pixel_values`` (e.g. a DataLoader).
        threshold: a sub-method is dropped from a block if its gate is below this on every calibration image.
        freeze_gates: also replace near-constant gates by constants (makes gated LoRA mergeable).
        freeze_tolerance: the largest gate range (max - min over the calibration images) that counts as constant.
        adapter_name: the adapter to prune.

    Returns:
        A [`PruneReport`] with what was dropped and frozen, and the largest change of the outputs it caused on the
        calibration batches. The adapter's config records the new structure, so ``save_pretrained`` and
        ``PeftModel.from_pretrained`` reproduce it.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}.")
    if freeze_tolerance < 0:
        raise ValueError(f"`freeze_tolerance` must be >= 0, got {freeze_tolerance!r}.")
    layers = named_mopeft_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoPEFT layers to prune.")
    if not any(adapter_name in layer.mopeft_settings for layer in layers.values()):
        raise ValueError(f"No MoPEFT adapter named {adapter_name!r}; the model has {sorted(_adapter_names(layers))}.")
    if any(adapter_name in layer.merged_adapters for layer in layers.values()):
        raise ValueError(f"Adapter {adapter_name!r} is merged; call `unmerge_adapter()` before pruning.")
    was_training = model.training
    model.eval()
    batches = [_as_inputs(batch) for batch in calibration_batches]
    if not batches:
        raise ValueError("`calibration_batches` is empty: pass a few batches of target-domain images.")
    recorded: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)

    def record(block: str, adapter: str, method: str, values: torch.Tensor) -> None:
        if adapter == adapter_name:
            recorded[block, method].append(values.float().reshape(-1).cpu())

    handles = [
        layer.register_gate_hook(lambda adapter, method, values, block=block: record(block, adapter, method, values))
        for block, layer in layers.items()
    ]
    try:
        reference = [_outputs(model, batch) for batch in batches]
    finally:
        for handle in handles:
            handle.remove()

    report = PruneReport(calibration_images=sum(r.shape[0] for r in reference))
    config = _peft_config(model, adapter_name)
    for block, layer in layers.items():
        if adapter_name not in layer.mopeft_settings:
            continue
        settings = layer.mopeft_settings[adapter_name]
        dropped, frozen = [], {}
        for method in settings["live"]:
            if not recorded[block, method]:
                continue
            values = torch.cat(recorded[block, method])  # (calibration images,)
            if values.max().item() < threshold:
                dropped.append(method)
            elif freeze_gates and method in settings["gated"]:
                if (values.max() - values.min()).item() <= freeze_tolerance:
                    frozen[method] = values.mean().item()
        if dropped or frozen:
            _drop(layer, adapter_name, dropped, frozen)
        if dropped:
            report.pruned[block] = sorted(dropped)
        if frozen:
            report.frozen[block] = frozen
        report.kept[block] = list(settings["live"])
        if config is not None:
            if settings["pruned"]:
                config.pruned[block] = list(settings["pruned"])
            if settings["frozen"]:
                config.frozen_gates[block] = dict(settings["frozen"])

    with torch.no_grad():
        for batch, before in zip(batches, reference):
            after = _outputs(model, batch)
            change = (after - before).abs().max().item()
            report.max_abs_change = max(report.max_abs_change, change)
            report.max_rel_change = max(report.max_rel_change, change / max(before.abs().max().item(), 1e-12))
    model.train(was_training)
    return report


def _adapter_names(layers: dict[str, MoPEFTLayer]) -> set[str]:
    return {name for layer in layers.values() for name in layer.mopeft_settings}


def _peft_config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    return configs.get(adapter_name) if isinstance(configs, dict) else None


def merge_mergeable(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Fold every LoRA of ``adapter_name`` with a constant scaling into its q/k/v weights. Returns the unloaded base
    model when that adapter is the only one and nothing of it is left, else the (partially merged, still exact) peft
    model."""
    layers = named_mopeft_layers(model)
    names = _adapter_names(layers)
    if adapter_name not in names:
        raise ValueError(f"No MoPEFT adapter named {adapter_name!r}; the model has {sorted(names)}.")
    blockers = [
        r
        for layer in layers.values()
        if adapter_name in layer.mopeft_settings
        for r in layer.merge_blockers(adapter_name)
    ]
    if not blockers and names == {adapter_name} and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload(adapter_names=[adapter_name])
    # Other adapters stay (unloading would drop them); the LoRA of this one is folded in place, which is exact.
    for layer in layers.values():
        settings = layer.mopeft_settings.get(adapter_name)
        if settings and "lora" in settings["live"] and "lora" not in settings["gated"]:
            if adapter_name not in layer.merged_adapters:
                layer.merge(adapter_names=[adapter_name])
    return model

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""A sequential bottleneck adapter on the output of one sublayer (attention, cross-attention or FFN) of a block.

    h = sublayer(...)                 # (..., C); for a tuple output, its first element
    h = h + up(act(down(h)))          # per active adapter; up starts at zero: identity at init

The block then adds its residual and normalises as before. The adapter is non-linear, so it never folds into a
weight: ``merge`` leaves it running (the output stays exact) and ``merge_and_unload`` refuses it (see the tuners).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .._common import base_layer_device_and_dtype


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class SeqAdapterLayer(nn.Module, BaseTunerLayer):
    """Wraps one sublayer (``base_layer``) and adds a bottleneck adapter to its output."""

    # Shared prefix `iseg_` (seed 001): one DeformableLoRA adapter may hold sequential adapters too.
    adapter_layer_names: tuple[str, ...] = ("iseg_adapter_down", "iseg_adapter_up")
    other_param_names: tuple[str, ...] = ("iseg_adapter_act",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, width: int, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.width = width
        self.in_features = self.out_features = width  # what peft's utilities read on tuner layers
        self.iseg_adapter_down = nn.ModuleDict({})
        self.iseg_adapter_up = nn.ModuleDict({})
        self.iseg_adapter_act: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, adapter_dim: int, adapter_act: str, init_weights: bool) -> None:
        down = nn.Linear(self.width, adapter_dim)
        up = nn.Linear(adapter_dim, self.width)
        with torch.no_grad():
            if init_weights:
                # The up-projection starts at zero, so the adapter leaves the block unchanged at step 0.
                nn.init.zeros_(up.weight)
            else:  # random (tests of disabling and of the unmerged path)
                nn.init.normal_(up.weight, std=0.1)
            nn.init.zeros_(up.bias)
        self.iseg_adapter_down[adapter_name] = down
        self.iseg_adapter_up[adapter_name] = up
        self.iseg_adapter_act[adapter_name] = adapter_act
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # An attention or FFN sublayer has no `weight`: follow its parameters (bf16 base, autocast_adapter_dtype).
        return base_layer_device_and_dtype(base_layer)

    def _adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        for name in self.active_adapters:
            if name not in self.iseg_adapter_down:
                continue
            down, up = self.iseg_adapter_down[name], self.iseg_adapter_up[name]
            update = up(ACTIVATIONS[self.iseg_adapter_act[name]](down(hidden.to(down.weight.dtype))))
            hidden = hidden + update.to(hidden.dtype)
        return hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return output
        if isinstance(output, tuple):
            return (self._adapt(output[0]), *output[1:])
        return self._adapt(output)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Nothing folds (the adapter is non-linear): the adapters are marked merged and keep running, so a partial
        ``merge_adapter()`` of a model that also holds LoRA stays exact."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.iseg_adapter_down:
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The module that replaces this wrapper on unload (peft calls this). peft skips modules under a tuner layer,
        so tuner layers inside the wrapped module (LoRA on a deformable attention's projections) are unloaded, and
        merged if asked, here."""
        return unload_nested(self, merge, safe_merge, adapter_names)

    def __repr__(self) -> str:
        return "seq_adapter." + super().__repr__()


def unload_nested(layer: BaseTunerLayer, merge: bool, safe_merge: bool, adapter_names: list[str] | None) -> nn.Module:
    """Unload (and optionally merge) the tuner layers inside ``layer``'s base layer; return that base layer."""
    base = layer.get_base_layer()
    for name, inner in list(base.named_modules()):
        if name and isinstance(inner, BaseTunerLayer):
            parent_name, _, child_name = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            if merge:
                inner.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            setattr(parent, child_name, inner.get_base_layer())
    return base

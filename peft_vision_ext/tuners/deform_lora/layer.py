# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""LoRA layers of the deformable-attention method: one for ``nn.Linear`` (the four projections of a deformable
attention, and any extra linear target) and one for ``nn.MultiheadAttention``.

    Linear:  y = W x + b + s * B A dropout(x),   s = lora_alpha / r,  B = 0 at init
    MHA:     the module's own forward with in_proj_weight[q|k|v rows] + s * B_t A_t and out_proj.weight + s * B A

Both merge exactly (the update is a weight delta) and unmerge by subtraction.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call


class _LoraMixin(BaseTunerLayer):
    # Shared prefix `iseg_` with the sequential adapters (seed 001), so one adapter can hold both.
    adapter_layer_names: tuple[str, ...] = ("iseg_lora_A", "iseg_lora_B")
    other_param_names: tuple[str, ...] = ("iseg_scaling", "iseg_dropout")

    def _init_containers(self, adapter_name: str) -> None:
        self.iseg_lora_A = nn.ParameterDict({})
        self.iseg_lora_B = nn.ParameterDict({})
        self.iseg_scaling: dict[str, float] = {}
        self.iseg_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name

    def _add_factors(
        self, adapter_name: str, parts: int, out_features: int, in_features: int, r: int, init_weights: bool
    ) -> None:
        """``A``: ``(parts, r, in)`` (kaiming-uniform, as peft's LoRA); ``B``: ``(parts, out, r)``, zero at init."""
        a = torch.empty(parts, r, in_features)
        for index in range(parts):
            nn.init.kaiming_uniform_(a[index], a=math.sqrt(5))
        b = torch.zeros(parts, out_features, r) if init_weights else 0.1 * torch.randn(parts, out_features, r)
        self.iseg_lora_A[adapter_name] = nn.Parameter(a)
        self.iseg_lora_B[adapter_name] = nn.Parameter(b)

    def _unmerged_active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.iseg_lora_A and a not in self.merged_adapters]

    def delta_weight(self, adapter_name: str, part: int = 0) -> torch.Tensor:
        """``s * B A`` of one part: the exact weight update, ``(out, in)``."""
        a = self.iseg_lora_A[adapter_name][part]
        b = self.iseg_lora_B[adapter_name][part]
        return (b @ a) * self.iseg_scaling[adapter_name]

    def _weights_to_update(self, adapter_name: str) -> list[tuple[torch.Tensor, slice, int]]:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.iseg_lora_A:
                continue
            updates = []
            for weight, rows, part in self._weights_to_update(name):
                # Sum in float32 and round once: bf16/fp16 weights merge as exactly as their dtype allows.
                merged = (weight.data[rows].float() + self.delta_weight(name, part).float()).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or Infs detected in the merged weights of adapter {name!r}; not merged.")
                updates.append((weight, rows, merged))
            for weight, rows, merged in updates:
                weight.data[rows] = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for weight, rows, part in self._weights_to_update(name):
                data = weight.data
                data[rows] = (data[rows].float() - self.delta_weight(name, part).float()).to(data.dtype)


class LoraLinear(nn.Module, _LoraMixin):
    """LoRA on an ``nn.Linear`` (e.g. a deformable attention's ``sampling_offsets``)."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._init_containers(adapter_name)
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init_weights: bool):
        base = self.base_layer
        self._add_factors(adapter_name, 1, base.out_features, base.in_features, r, init_weights)
        self.iseg_scaling[adapter_name] = lora_alpha / r
        self.iseg_dropout[adapter_name] = lora_dropout
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _weights_to_update(self, adapter_name: str) -> list[tuple[torch.Tensor, slice, int]]:
        return [(self.base_layer.weight, slice(None), 0)]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            a, b = self.iseg_lora_A[name][0], self.iseg_lora_B[name][0]
            inputs = x.to(a.dtype)
            if self.iseg_dropout[name] > 0:
                inputs = F.dropout(inputs, p=self.iseg_dropout[name], training=self.training)
            result = result + (F.linear(F.linear(inputs, a), b) * self.iseg_scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "deform_lora." + super().__repr__()


class LoraMultiheadAttention(nn.Module, _LoraMixin):
    """LoRA on an ``nn.MultiheadAttention``: its forward reads ``in_proj_weight`` and ``out_proj.weight`` directly
    (``F.multi_head_attention_forward``), so the adapted weights are passed in with ``torch.func.functional_call``;
    everything else (masks, ``batch_first``, dropout, returned weights) is the module's own code."""

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on an nn.MultiheadAttention needs the packed `in_proj_weight` (kdim == vdim == embed_dim); "
                f"this one has kdim={base_layer.kdim}, vdim={base_layer.vdim}, embed_dim={base_layer.embed_dim}."
            )
        self.base_layer = base_layer
        self.in_features = self.out_features = base_layer.embed_dim  # what peft's utilities read on tuner layers
        self.iseg_targets: dict[str, list[str]] = {}
        self._init_containers(adapter_name)
        self.update_layer(adapter_name, **kwargs)

    other_param_names: tuple[str, ...] = ("iseg_scaling", "iseg_dropout", "iseg_targets")

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init_weights: bool, targets: list[str]
    ) -> None:
        width = self.base_layer.embed_dim
        self._add_factors(adapter_name, len(targets), width, width, r, init_weights)
        self.iseg_scaling[adapter_name] = lora_alpha / r
        self.iseg_dropout[adapter_name] = lora_dropout  # not applicable to a weight update; kept for the record
        self.iseg_targets[adapter_name] = list(targets)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _weights_to_update(self, adapter_name: str) -> list[tuple[torch.Tensor, slice, int]]:
        width = self.base_layer.embed_dim
        out = []
        for part, target in enumerate(self.iseg_targets[adapter_name]):
            if target == "out":
                out.append((self.base_layer.out_proj.weight, slice(None), part))
            else:
                index = "qkv".index(target)
                out.append((self.base_layer.in_proj_weight, slice(index * width, (index + 1) * width), part))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = self._unmerged_active()
        if not active:
            return self.base_layer(*args, **kwargs)
        base = self.base_layer
        width = base.embed_dim
        in_proj, out_proj = base.in_proj_weight, base.out_proj.weight
        in_deltas = [torch.zeros_like(in_proj[:width])] * 3
        for name in active:
            for part, target in enumerate(self.iseg_targets[name]):
                delta = self.delta_weight(name, part).to(in_proj.dtype)
                if target == "out":
                    out_proj = out_proj + delta
                else:
                    index = "qkv".index(target)
                    in_deltas[index] = in_deltas[index] + delta
        weights = {"in_proj_weight": in_proj + torch.cat(in_deltas), "out_proj.weight": out_proj}
        return functional_call(base, weights, args, kwargs)

    def __repr__(self) -> str:
        return "deform_lora." + super().__repr__()

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""peft's mixed-adapter batches, ``model(..., adapter_names=["a", "b", "__base__", ...])``, for every method here.

peft's LoRA handles them inside each layer (one base pass, a LoRA delta per row group). Our methods act on blocks,
attention windows and sublayers whose batch dimension is not always the first (Mask2Former's decoder runs
sequence-first), and MoPEFT's prefixes give each adapter its own attention keys. So the batch is split by adapter at
the model's input instead: each group of rows runs the unchanged model with only its adapter active, and the outputs
are put back in row order. That is exact by construction (the models here treat the samples of an eval batch
independently) and costs no more arithmetic than per-row layers, only smaller batches.

What cannot be split or put back is refused in words: training mode (as peft does), labels (a batch loss is not the
combination of per-group losses), merged adapters, unknown adapter names, and output fields whose first dimension
is not the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.utils import ModelOutput


BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`
LABEL_KEYS = ("labels", "mask_labels", "class_labels")


def check_adapter_names(model: nn.Module, adapter_names: Any, known: Sequence[str]) -> list[str]:
    """Validate ``adapter_names`` against the tuner's state; returns it as a list."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"`adapter_names` must be a list with one adapter name per row of the batch, got {adapter_names!r}."
        )
    if not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"`adapter_names` must hold adapter names (str), got {adapter_names!r}.")
    if model.training:
        raise ValueError(
            "Cannot pass `adapter_names` when the model is in training mode (as in peft): call `model.eval()`, or "
            "train one adapter at a time."
        )
    unknown = sorted({name for name in adapter_names if name != BASE} - set(known))
    if unknown:
        raise ValueError(
            f"`adapter_names` names adapter(s) {unknown} that the model does not have; it has {sorted(known)} (and "
            f"{BASE!r} for the base model)."
        )
    if any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters (as in peft): call `unmerge_adapter()` first."
        )
    return list(adapter_names)


@contextlib.contextmanager
def _only(model: nn.Module, adapter: str) -> Iterator[None]:
    """Run with ``adapter`` as the only active adapter of every tuner layer and modules_to_save wrapper (or with all of
    them disabled for ``__base__``), without touching ``requires_grad`` as ``set_adapter`` would."""
    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for module in layers:
            if adapter == BASE:
                module._disable_adapters = True
            else:
                module._active_adapter = [adapter] if isinstance(module._active_adapter, list) else adapter
        yield
    finally:
        for module, active, disabled in saved:
            module._active_adapter, module._disable_adapters = active, disabled


def _batch_size(args: tuple, kwargs: dict) -> int:
    first = args[0] if args else kwargs.get("pixel_values")
    if not isinstance(first, torch.Tensor) or first.ndim == 0:
        raise ValueError(
            "`adapter_names` needs the batch as a tensor (`pixel_values`, or the first positional input) to split "
            f"it by adapter; got {type(first).__name__}."
        )
    return first.shape[0]


def _take(value: Any, rows: list[int], batch: int) -> Any:
    """The ``rows`` of one forward argument: tensors and per-sample lists with ``batch`` entries are split, anything
    else (flags, sizes) is passed to every group unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, (list, tuple)) and len(value) == batch and batch > 1:
        return type(value)(value[i] for i in rows)
    return value


def _put_back(parts: list[Any], groups: list[list[int]], batch: int, where: str) -> Any:
    """Reassemble one output field from the groups' outputs, rows back in their original order."""
    first = parts[0]
    if first is None:
        if any(p is not None for p in parts):
            raise ValueError(f"Cannot reassemble the mixed-adapter batch: `{where}` is None for some groups only.")
        return None
    if isinstance(first, torch.Tensor):
        if first.ndim == 0 or any(p.shape[0] != len(rows) for p, rows in zip(parts, groups)):
            raise ValueError(
                f"Cannot reassemble the mixed-adapter batch: output `{where}` (shape {tuple(first.shape)}) does not "
                "have the batch as its first dimension. Run one forward per adapter with `set_adapter` instead."
            )
        out = first.new_empty((batch, *first.shape[1:]))
        for part, rows in zip(parts, groups):
            out[rows] = part
        return out
    if isinstance(first, ModelOutput):
        fields = {key: _put_back([p[key] for p in parts], groups, batch, key) for key in first.keys()}
        return type(first)(**fields)
    if isinstance(first, dict):
        return {key: _put_back([p[key] for p in parts], groups, batch, f"{where}.{key}") for key in first}
    if isinstance(first, (list, tuple)):
        if any(len(p) != len(first) for p in parts):
            raise ValueError(f"Cannot reassemble the mixed-adapter batch: `{where}` has a different length per group.")
        items = [_put_back([p[i] for p in parts], groups, batch, f"{where}[{i}]") for i in range(len(first))]
        return type(first)(items)
    if any(p != first for p in parts):
        raise ValueError(f"Cannot reassemble the mixed-adapter batch: `{where}` differs between adapters.")
    return first


def mixed_batch_forward(model: nn.Module, forward, adapter_names: list[str], args: tuple, kwargs: dict) -> Any:
    """``forward(*args, **kwargs)`` with row ``i`` computed by adapter ``adapter_names[i]``."""
    given = [key for key in LABEL_KEYS if kwargs.get(key) is not None]
    if given:
        raise ValueError(
            f"Cannot pass `adapter_names` together with `{given[0]}`: a batch loss is not the combination of "
            "per-adapter losses. Compute the loss per adapter (`set_adapter`), or drop the labels."
        )
    batch = _batch_size(args, kwargs)
    if len(adapter_names) != batch:
        raise ValueError(
            f"`adapter_names` must name one adapter per row: got {len(adapter_names)} names for a batch of {batch}."
        )
    order = list(dict.fromkeys(adapter_names))
    groups = [[i for i, name in enumerate(adapter_names) if name == adapter] for adapter in order]
    outputs = []
    for adapter, rows in zip(order, groups):
        group_args = tuple(_take(a, rows, batch) for a in args)
        group_kwargs = {k: _take(v, rows, batch) for k, v in kwargs.items()}
        with _only(model, adapter):
            outputs.append(forward(*group_args, **group_kwargs))
    if len(groups) == 1:
        return outputs[0]
    return _put_back(outputs, groups, batch, "output")

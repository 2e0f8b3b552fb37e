# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Adapter ranking and export of the kept adapters: the "transmission update" of seed 000.

A ground station ranks the adapters of a trained model, keeps the most important ones (a fraction, or as many as fit a
byte budget), and ships only those as a standard adapter directory. The spacecraft loads it with
``PeftModel.from_pretrained`` and fuses it (``merge_and_unload``), so inference costs what the base model costs.

Scores (higher = more important):

- ``"z"``: the seed's ``Z = ||w||_2 / numel(w)`` over all parameters of the adapter module. Since ``||w||_2`` grows
  like ``sqrt(numel)`` for weights of similar magnitude, Z scales like ``1 / sqrt(numel)``: it favours small layers.
  :func:`size_bias` measures that.
- ``"rms"``: ``||w||_2 / sqrt(numel(w))``, the root-mean-square weight: the same magnitude idea without the size bias.
- ``"relative"``: ``||dW||_F / ||W||_F``, the size of the fused kernel update relative to the conv it changes: how much
  the adapter actually moves the layer. Needs the base weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from .._files import atomic_directory, check_adapter_dir, check_output_dir
from ..tuners.conv_adapter import ConvAdapterConfig, ConvAdapterLayer


SCORES = ("z", "rms", "relative")
_ADAPTER_MARKER = ".convadapter_"
_PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterScore:
    """Importance scores and storage cost of one adapter module (one adapted conv)."""

    module: str
    numel: int
    nbytes: int
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What :func:`export_adapters` wrote."""

    path: str
    kept: list[str]
    dropped: list[str]
    nbytes: int
    full_nbytes: int

    @property
    def reduction(self) -> float:
        """Fraction of the full adapter file that the export saves (0.86 = 86% smaller)."""
        return 1.0 - self.nbytes / self.full_nbytes if self.full_nbytes else 0.0


def _module_of(key: str) -> str | None:
    """``base_model.model.encoder.conv1.convadapter_bn.weight`` -> ``encoder.conv1`` (None for non-adapter keys)."""
    if _ADAPTER_MARKER not in key:
        return None
    return key.split(_ADAPTER_MARKER, 1)[0].removeprefix(_PEFT_PREFIX)


def _is_parameter_key(key: str) -> bool:
    # BN running statistics are state, not learned weights; the seed's Z is a norm of the weights.
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _group_by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module = _module_of(key)
        if module is not None:
            groups.setdefault(module, {})[key] = tensor
    return groups


def _relative_update(model: PeftModel, adapter_name: str) -> dict[str, float]:
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, ConvAdapterLayer) and adapter_name in module.convadapter_bn:
            with torch.no_grad():
                delta_w, _ = module.get_delta_weight(adapter_name)
                base_norm = module.get_base_layer().weight.float().norm()
                out[name] = (delta_w.float().norm() / base_norm.clamp_min(1e-12)).item()
    return out


def _check_adapter_name(model: PeftModel | None, adapter_name: str) -> None:
    if model is not None and adapter_name not in model.peft_config:
        raise ValueError(
            f"`adapter_name` {adapter_name!r} is not an adapter of this model; it has {sorted(model.peft_config)}. "
            "Pass one of those."
        )


def _load_state(
    source: PeftModel | str | os.PathLike, adapter_name: str
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The adapter's state dict, and the path of its weights file when ``source`` is a directory."""
    if isinstance(source, PeftModel):
        _check_adapter_name(source, adapter_name)
        return get_peft_model_state_dict(source, adapter_name=adapter_name), None
    weights = check_adapter_dir(source)
    return load_file(weights), weights


def score_adapters(
    source: PeftModel | str | os.PathLike, adapter_name: str = "default", model: PeftModel | None = None
) -> list[AdapterScore]:
    """Score every adapter module of a conv-adapter model or adapter directory.

    Args:
        source: a ``PeftModel`` with conv adapters, or an adapter directory written by ``save_pretrained``.
        adapter_name: which adapter of a multi-adapter model to score (for a directory: the name it has in
            ``model``). A name the model does not have raises ``ValueError``, listing the names it has.
        model: for a directory, the ``PeftModel`` with that adapter loaded; needed only for the ``"relative"``
            score (which needs the base weights). When ``source`` is a model it is used directly.

    Returns:
        One :class:`AdapterScore` per adapted conv, in model order. ``scores`` has ``"z"`` and ``"rms"`` always, and
        ``"relative"`` when the base weights are available.
    """
    if isinstance(source, PeftModel):
        model = source
    _check_adapter_name(model, adapter_name)
    state, _ = _load_state(source, adapter_name)
    groups = _group_by_module(state)
    if not groups:
        raise ValueError(
            "No conv-adapter tensors (keys containing '.convadapter_') found in the adapter. Is it a conv-adapter "
            "(ConvAdapterConfig) checkpoint?"
        )
    relative = _relative_update(model, adapter_name) if model is not None else {}
    results = []
    for module, tensors in groups.items():
        weights = [t.float().flatten() for k, t in tensors.items() if _is_parameter_key(k)]
        flat = torch.cat(weights) if weights else torch.zeros(1)
        numel = flat.numel()
        norm = flat.norm().item()
        scores = {"z": norm / numel, "rms": norm / math.sqrt(numel)}
        if module in relative:
            scores["relative"] = relative[module]
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        results.append(AdapterScore(module=module, numel=numel, nbytes=nbytes, scores=scores))
    return results


def rank_adapters(scores: Sequence[AdapterScore], score: str = "z") -> list[AdapterScore]:
    """Sort by ``score``, most important first (ties keep model order)."""
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}.")
    missing = [s.module for s in scores if score not in s.scores]
    if missing:
        raise ValueError(
            f"Score {score!r} is not available for {len(missing)} adapter(s) (e.g. `{missing[0]}`). The 'relative' "
            "score needs the base model: pass `model=` (CLI: `--base`)."
        )
    return sorted(scores, key=lambda s: -s.scores[score])


def select_adapters(
    scores: Sequence[AdapterScore],
    *,
    score: str = "z",
    keep_fraction: float | None = None,
    budget_bytes: int | None = None,
) -> list[str]:
    """Names of the adapters to keep: the top ``keep_fraction`` of modules, or the best ones that fit ``budget_bytes``.

    With a budget, adapters are taken in rank order and any that would overflow the budget is skipped (a smaller,
    lower-ranked one may still fit). Exactly one of ``keep_fraction`` and ``budget_bytes`` must be given.
    """
    if (keep_fraction is None) == (budget_bytes is None):
        raise ValueError(
            f"Pass exactly one of `keep_fraction` and `budget_bytes`; got keep_fraction={keep_fraction!r}, "
            f"budget_bytes={budget_bytes!r}."
        )
    ranked = rank_adapters(scores, score)
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"`keep_fraction` must be in (0, 1], got {keep_fraction!r}. 0.66 keeps the top 66%.")
        count = max(1, math.ceil(keep_fraction * len(ranked) - 1e-9))
        return [s.module for s in ranked[:count]]
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"`budget_bytes` must be a positive int, got {budget_bytes!r}.")
    kept, used = [], 0
    for s in ranked:
        if used + s.nbytes <= budget_bytes:
            kept.append(s.module)
            used += s.nbytes
    if not kept:
        smallest = min(s.nbytes for s in ranked)
        raise ValueError(
            f"`budget_bytes`={budget_bytes} fits no adapter: the smallest one needs {smallest} bytes. Raise the budget."
        )
    return kept


def _load_config(source: PeftModel | str | os.PathLike, adapter_name: str) -> ConvAdapterConfig:
    if isinstance(source, PeftModel):
        _check_adapter_name(source, adapter_name)
        config = source.peft_config[adapter_name]
    else:
        config = ConvAdapterConfig.from_pretrained(os.fspath(source))
    if not isinstance(config, ConvAdapterConfig):
        raise TypeError(f"Expected a conv-adapter (ConvAdapterConfig) adapter, got {type(config).__name__}.")
    return config


def export_adapters(
    source: PeftModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    keep: Iterable[str],
    adapter_name: str = "default",
    *,
    overwrite: bool = False,
) -> ExportResult:
    """Write a standard adapter directory that holds only the adapters in ``keep`` (plus ``modules_to_save``).

    ``PeftModel.from_pretrained(base, output_dir)`` loads it: its config targets exactly the kept convs. The returned
    result reports the weights file size in bytes, against the size of the full adapter.

    ``output_dir`` is written whole (see :func:`peft_vision_ext._files.atomic_directory`): an interrupted export leaves
    the old directory or none. An existing non-empty ``output_dir`` is replaced only with ``overwrite=True``; the
    ``source`` directory itself, or a directory that contains it or lies inside it, is always refused.
    """
    output_dir = os.fspath(output_dir)
    inputs = {} if isinstance(source, PeftModel) else {"the source adapter directory `source`": source}
    check_output_dir(output_dir, inputs=inputs, overwrite=overwrite)
    config = _load_config(source, adapter_name)
    state, source_weights = _load_state(source, adapter_name)
    groups = _group_by_module(state)
    keep = list(dict.fromkeys(keep))
    unknown = [name for name in keep if name not in groups]
    if unknown:
        raise ValueError(
            f"`keep` names {unknown[:5]}, which are not adapted modules of this adapter. Adapted modules include "
            f"{list(groups)[:5]}."
        )
    if not keep:
        raise ValueError("`keep` is empty: an adapter directory needs at least one adapter.")
    kept_state = {k: v.contiguous() for k, v in state.items() if _module_of(k) is None or _module_of(k) in keep}

    settings = {**config.to_dict(), "target_modules": sorted(keep)}
    if "auto_target_modules" in settings:
        # The kept convs are an explicit subset: loading must not expect every conv of the base to be adapted.
        settings["auto_target_modules"] = False
    exported = ConvAdapterConfig(**settings)
    exported.inference_mode = True
    with atomic_directory(output_dir, overwrite=overwrite) as temporary:
        weights_path = os.path.join(temporary, SAFETENSORS_WEIGHTS_NAME)
        save_file(kept_state, weights_path, metadata={"format": "pt"})
        nbytes = os.path.getsize(weights_path)
        exported.save_pretrained(temporary)

    if source_weights is None:
        # The exact size the full adapter's safetensors file would have (tensors plus JSON header).
        full_nbytes = len(safetensors_bytes({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"}))
    else:
        full_nbytes = os.path.getsize(source_weights)
    return ExportResult(
        path=output_dir,
        kept=sorted(keep),
        dropped=sorted(set(groups) - set(keep)),
        nbytes=nbytes,
        full_nbytes=full_nbytes,
    )


def size_bias(scores: Sequence[AdapterScore], score: str) -> float:
    """Spearman rank correlation between a score and the adapters' parameter counts (-1: favours small layers)."""
    values = [s.scores[score] for s in scores]
    sizes = [float(s.numel) for s in scores]
    return _spearman(values, sizes)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else 0.0

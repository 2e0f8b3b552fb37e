# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Adaptation baselines (each seed's comparison of methods) shared by the recipes, the CLI and the benchmarks.

Seed 000 compares full fine-tuning, decoder-only tuning, conv adapters and BN-only adapters on the same pretrained
U-Net (:func:`prepare_for_adaptation`); seed 002 compares MoPEFT and its sub-methods on SAM
(:func:`prepare_sam_for_adaptation`); seed 001 compares sequential adapters and deformable LoRA on Mask2Former
(:func:`prepare_mask2former_for_adaptation`). Each builds every method of its comparison, so that recipes stay thin.
What the methods cost and achieve is measured in :mod:`peft_vision_ext.analysis.measure`.
"""

from __future__ import annotations

from typing import Any

from peft import get_peft_model
from torch import nn

from .analysis.measure import (  # noqa: F401  (re-exported for older imports)
    base_parameter_count,
    count_flops,
    count_parameters,
    evaluate_segmentation,
    percent,
    set_fold_in_eval,
    update_size_bytes,
)
from .tuners.conv_adapter import ConvAdapterConfig, protect_frozen_batchnorm
from .tuners.deform_lora import DeformableLoRAConfig
from .tuners.mopeft import MOPEFT_PRESETS, MoPEFTConfig
from .tuners.seq_adapter import SeqAdapterConfig


ADAPTATION_METHODS = ("full", "decoder", "conv_adapter", "bn_adapter")
# Seed 002's comparison on SAM: two baselines without training/with the decoder only, the MoPEFT presets, full FT.
SAM_ADAPTATION_METHODS = ("zero_shot", "decoder", *MOPEFT_PRESETS, "full")
# Seed 001's comparison on Mask2Former: conventional fine-tuning (all but the backbone), 1-3 sequential adapters per
# block, LoRA on deformable attention, both PEFT methods together, full fine-tuning.
MASK2FORMER_ADAPTATION_METHODS = (
    "zero_shot",
    "decoder",
    "seq_adapter_1",
    "seq_adapter_2",
    "seq_adapter_3",
    "deform_lora",
    "deform_lora+seq_adapter",
    "full",
)
# What a PEFT method trains besides its adapters: the class head (its label set may differ from the source's).
MASK2FORMER_HEADS = ["class_predictor"]


def prepare_for_adaptation(model: nn.Module, method: str, **config_kwargs: Any) -> nn.Module:
    """Return ``model`` set up for one of :data:`ADAPTATION_METHODS`.

    - ``"full"``: every parameter trains (BatchNorm statistics too).
    - ``"decoder"``: the encoder is frozen, with its BatchNorms kept in eval mode; decoder and head train.
    - ``"conv_adapter"`` / ``"bn_adapter"``: ``get_peft_model`` with :class:`ConvAdapterConfig` (``adapter_type``
      ``"conv"`` / ``"bn"``); ``config_kwargs`` go to the config.
    """
    if method not in ADAPTATION_METHODS:
        raise ValueError(f"`method` must be one of {ADAPTATION_METHODS}, got {method!r}.")
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "decoder":
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise ValueError(f"Decoder-only tuning needs a model with an `encoder`; {type(model).__name__} has none.")
        model.requires_grad_(True)
        encoder.requires_grad_(False)
        # Trainer calls model.train() every step; keep the frozen encoder's BN statistics those of the source model.
        protect_frozen_batchnorm(encoder)
        return model
    adapter_type = "conv" if method == "conv_adapter" else "bn"
    return get_peft_model(model, ConvAdapterConfig(adapter_type=adapter_type, **config_kwargs))


def prepare_sam_for_adaptation(model: nn.Module, method: str, **config_kwargs: Any) -> nn.Module:
    """Return a ``SamForSemanticSegmentation`` set up for one of :data:`SAM_ADAPTATION_METHODS`.

    - ``"zero_shot"``: nothing trains (evaluate the source model as it is).
    - ``"decoder"``: only the mask decoder trains.
    - ``"full"``: every parameter trains.
    - ``"lora"``, ``"vpt"``, ``"vpt_deep"``, ``"adapter"``, ``"mopeft"``: ``get_peft_model`` with
      ``MoPEFTConfig.from_preset(method, **config_kwargs)`` (the mask decoder trains as ``modules_to_save``).
    """
    if method not in SAM_ADAPTATION_METHODS:
        raise ValueError(f"`method` must be one of {SAM_ADAPTATION_METHODS}, got {method!r}.")
    if method in ("zero_shot", "full"):
        if config_kwargs:
            raise ValueError(f"Method {method!r} takes no PEFT settings, got {config_kwargs}.")
        return model.requires_grad_(method == "full")
    if method == "decoder":
        if config_kwargs:
            raise ValueError(f"Method 'decoder' takes no PEFT settings, got {config_kwargs}.")
        model.requires_grad_(False)
        model.mask_decoder.requires_grad_(True)
        return model
    return get_peft_model(model, MoPEFTConfig.from_preset(method, **config_kwargs))


def prepare_mask2former_for_adaptation(
    model: nn.Module,
    method: str,
    *,
    adapter_dim: int | None = None,
    r: int | None = None,
    adapters_per_block: int | None = None,
    modules_to_save: list[str] | None = None,
    **config_kwargs: Any,
) -> nn.Module:
    """Return a ``Mask2FormerForUniversalSegmentation`` set up for one of :data:`MASK2FORMER_ADAPTATION_METHODS`.

    - ``"zero_shot"``: nothing trains; ``"full"``: everything trains.
    - ``"decoder"``: the backbone is frozen; pixel decoder, transformer decoder and class head train (seed 001's
      "conventional" fine-tuning).
    - ``"seq_adapter_<k>"``: :class:`SeqAdapterConfig` with ``adapters_per_block=k`` and ``adapter_dim``
      (default 64).
    - ``"deform_lora"``: :class:`DeformableLoRAConfig` with rank ``r`` (default 8).
    - ``"deform_lora+seq_adapter"``: both, with ``adapters_per_block`` (default 2) adapters per block.

    PEFT methods also train ``modules_to_save`` (default: the class head, :data:`MASK2FORMER_HEADS`);
    ``config_kwargs`` go to the PEFT config (e.g. ``lora_alpha``, ``projection_ranks``, ``extra_target_modules``).
    """
    from .models.mask2former import mask2former_parts

    if method not in MASK2FORMER_ADAPTATION_METHODS:
        raise ValueError(f"`method` must be one of {MASK2FORMER_ADAPTATION_METHODS}, got {method!r}.")
    parts = mask2former_parts(model)  # also checks that this is a Mask2Former
    settings = dict(
        adapter_dim=adapter_dim, r=r, adapters_per_block=adapters_per_block, modules_to_save=modules_to_save
    )
    settings = {key: value for key, value in settings.items() if value is not None}
    if method in ("zero_shot", "full", "decoder"):
        if config_kwargs or settings:
            raise ValueError(f"Method {method!r} takes no PEFT settings, got {dict(settings, **config_kwargs)}.")
        model.requires_grad_(method != "zero_shot")
        if method == "decoder":
            for module in parts["backbone"]:
                module.requires_grad_(False)
        return model
    heads = list(MASK2FORMER_HEADS if modules_to_save is None else modules_to_save)
    adapter_dim = 64 if adapter_dim is None else adapter_dim
    if method.startswith("seq_adapter_"):
        if r is not None or adapters_per_block is not None:
            raise ValueError(
                f"Method {method!r} has no LoRA and sets its adapters per block by name; got r={r!r}, "
                f"adapters_per_block={adapters_per_block!r}. Use 'deform_lora+seq_adapter' for both methods."
            )
        config = SeqAdapterConfig(
            adapters_per_block=int(method.rsplit("_", 1)[1]),
            adapter_dim=adapter_dim,
            modules_to_save=heads,
            **config_kwargs,
        )
    else:
        both = method == "deform_lora+seq_adapter"
        if not both and adapters_per_block is not None:
            raise ValueError(
                f"Method 'deform_lora' is LoRA alone; got adapters_per_block={adapters_per_block!r}. Use "
                "'deform_lora+seq_adapter' for LoRA and sequential adapters together."
            )
        config = DeformableLoRAConfig(
            r=8 if r is None else r,
            adapters_per_block=(2 if adapters_per_block is None else adapters_per_block) if both else 0,
            adapter_dim=adapter_dim,
            modules_to_save=heads,
            **config_kwargs,
        )
    return get_peft_model(model, config)


def mask2former_method_settings(method: str, *, adapter_dim: int, r: int, adapters_per_block: int) -> dict[str, int]:
    """The settings among ``adapter_dim``, ``r`` and ``adapters_per_block`` that ``method`` takes, for
    :func:`prepare_mask2former_for_adaptation` (recipes keep one set of settings for all methods)."""
    if method not in MASK2FORMER_ADAPTATION_METHODS:
        raise ValueError(f"`method` must be one of {MASK2FORMER_ADAPTATION_METHODS}, got {method!r}.")
    if method.startswith("seq_adapter_"):
        return {"adapter_dim": adapter_dim}
    if method == "deform_lora":
        return {"r": r}
    if method == "deform_lora+seq_adapter":
        return {"r": r, "adapter_dim": adapter_dim, "adapters_per_block": adapters_per_block}
    return {}

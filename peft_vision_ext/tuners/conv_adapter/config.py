# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ..._registry import peft_type_for
from .._common import CheckedLoadingMixin, normalize_module_names
from .._validation import check_bools, check_choice, check_modules_to_save_names, check_peft_fields, check_regexes


CONV_ADAPTER = peft_type_for("conv_adapter")
ADAPTER_TYPES = ("conv", "bn")


@dataclass
class ConvAdapterConfig(CheckedLoadingMixin, PeftConfig):
    """Configuration of [`ConvAdapterModel`]: fusable conv adapters (seed 000, "adapter fusion and ranking").

    Each targeted ``nn.Conv2d`` gets a parallel branch ``y = conv(x) + conv1x1(BN_a(x))``. The 1×1 conv has the
    conv's stride, groups and ``out_channels`` and starts at zero, so the model is unchanged at step 0. Because there
    is no non-linearity in the branch, it folds exactly into the conv kernel and bias (``merge_and_unload``).

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Names (exact or suffix) or a regex (full match) of the ``nn.Conv2d`` modules to adapt. ``None`` (the
            default) adapts every conv of the model that satisfies the fusion conditions; convs that do not are left
            out with a warning that gives the reason. Naming a module that is not a conv, or a conv that cannot be
            fused, raises a ``ValueError``.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Names or a regex of modules not to adapt, as in peft.
        adapter_type (`Literal["conv", "bn"]`):
            ``"conv"`` (default): BN followed by a 1×1 conv, about 11% of a 3×3 conv's parameters. ``"bn"``: the
            seed's BN-only capacity ablation, a per-output-channel affine ``y = z + BN_a(z)`` on the conv output
            ``z``, zero-initialised, 2 parameters per output channel.
        adapter_bias (`bool`):
            Whether the adapter's 1×1 conv has its own bias (``adapter_type="conv"`` only).
        init_weights (`bool`):
            ``True`` (default) zero-initialises the adapter so the model is unchanged at init. ``False`` draws random
            weights and BN statistics; only useful for tests of merging.
        freeze_bn_stats (`bool`):
            Keep every frozen BatchNorm layer of the base model in eval mode while the model trains, so that its
            running statistics stay those of the pretrained model (peft does not save them: peft issue 1732).
            Trainable BatchNorms (adapters, ``modules_to_save``) still update theirs. Plain ``nn.BatchNorm1d/2d/3d``
            also get a subclass whose frozen eval-mode backward keeps no activation (`frozen_bn.py`); their class is
            restored by ``merge_and_unload``/``unload``.
        modules_to_save (`Optional[list[str]]`):
            Modules trained in full and saved with the adapter, such as a new segmentation head.
        auto_target_modules (`bool`):
            Set by injection, not by users: True when `target_modules` was None and injection expanded it to every
            supported module of the base model. The saved `target_modules` then list them all, and loading refuses a
            base model that has supported modules the list lacks (a different base).

    Every field, and those inherited from ``PeftConfig`` (``inference_mode``, ...), is checked on construction,
    including when peft builds the config from an ``adapter_config.json``: a wrong type raises a ``TypeError``, a
    value out of range a ``ValueError``.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (exact or suffix) or a full-match regex of the nn.Conv2d modules to adapt. None adapts every "
                "conv that satisfies the fusion conditions and leaves the others out with a warning."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a full-match regex of modules not to adapt."}
    )
    adapter_type: Literal["conv", "bn"] = field(
        default="conv",
        metadata={"help": "'conv': BN followed by a 1x1 conv (default). 'bn': BN-only affine on the conv output."},
    )
    adapter_bias: bool = field(
        default=True, metadata={"help": "Give the adapter's 1x1 conv its own bias (adapter_type='conv' only)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero-initialise the adapters (identity at init). False draws random weights (tests)."},
    )
    freeze_bn_stats: bool = field(
        default=True,
        metadata={"help": "Keep frozen BatchNorm layers of the base model in eval mode during training."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter, e.g. a new segmentation head."},
    )
    auto_target_modules: bool = field(
        default=False,
        metadata={
            "help": (
                "Set by injection, not by users: True when target_modules was None and was expanded to every "
                "supported conv; loading then refuses a base model with supported convs the list lacks."
            )
        },
    )

    method_name = "conv_adapter"

    def __post_init__(self) -> None:
        check_peft_fields(self, CONV_ADAPTER)
        super().__post_init__()
        self.peft_type = CONV_ADAPTER
        check_choice(
            self,
            "adapter_type",
            ADAPTER_TYPES,
            hint="use 'conv' for BN + 1x1 conv adapters or 'bn' for the BN-only ablation.",
        )
        check_bools(self, "adapter_bias", "init_weights", "freeze_bn_stats", "auto_target_modules")
        normalize_module_names(self, "target_modules", "exclude_modules")
        check_regexes(self, "target_modules", "exclude_modules")
        check_modules_to_save_names(self)
        if self.target_modules == []:
            raise ValueError("`target_modules` is an empty list. Pass None to adapt every fusable conv.")

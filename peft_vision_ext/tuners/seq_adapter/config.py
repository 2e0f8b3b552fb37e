# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ..._registry import peft_type_for
from .._common import CheckedLoadingMixin, normalize_module_names
from .._validation import (
    check_bools,
    check_choice,
    check_modules_to_save_names,
    check_peft_fields,
    check_regexes,
    check_size,
)
from .blocks import PLACEMENT
from .layer import ACTIVATIONS


SEQ_ADAPTER = peft_type_for("seq_adapter")


PLACEMENT_HINT = (
    "1 puts an adapter after the FFN, 2 after self-attention and the FFN, 3 after self-attention, cross-attention and "
    "the FFN."
)


def check_adapter_settings(config, *, allow_none: bool = False) -> None:
    """Check the sequential-adapter fields ``adapters_per_block``, ``adapter_dim`` and ``adapter_act`` of ``config``
    (shared by `SeqAdapterConfig` and `DeformableLoRAConfig`; with ``allow_none``, ``adapters_per_block=0`` means no
    adapters)."""
    allowed = sorted(PLACEMENT)
    check_choice(
        config,
        "adapters_per_block",
        [0, *allowed] if allow_none else allowed,
        shown=f"{allowed} (or 0 for none)" if allow_none else str(allowed),
        hint=PLACEMENT_HINT,
    )
    check_size(config, "adapter_dim")
    check_choice(config, "adapter_act", tuple(sorted(ACTIVATIONS)))


@dataclass
class SeqAdapterConfig(CheckedLoadingMixin, PeftConfig):
    """Configuration of [`SeqAdapterModel`]: sequential bottleneck adapters in transformer blocks (seed 001).

    Each targeted block gets ``adapters_per_block`` adapters ``h + up(act(down(h)))`` on sublayer outputs, before the
    block's residual: ``1`` after the FFN, ``2`` after self-attention and the FFN (Houlsby), ``3`` after
    self-attention, cross-attention and the FFN. Blocks without cross-attention (Swin, encoder layers) have two
    positions, so ``3`` gives them the same two adapters as ``2``. Blocks are found by structure (see
    ``tuners/seq_adapter/blocks.py``): for Mask2Former that is the Swin backbone, the pixel-decoder encoder and the
    masked-attention decoder. Up-projections start at zero, so the model is unchanged at step 0.

    Args:
        adapters_per_block (`int`): 1, 2 or 3 adapters per block (see above).
        adapter_dim (`int`): The bottleneck size (at most 65536).
        adapter_act (`str`): Activation between the projections, ``"relu"`` or ``"gelu"``.
        target_modules (`Optional[Union[list[str], str]]`): Names (exact or suffix) or a full-match regex of the blocks
            to adapt; ``None`` adapts every block found. Saved expanded to the adapted block names.
        exclude_modules (`Optional[Union[list[str], str]]`): Names or a regex of blocks not to adapt.
        init_weights (`bool`): ``True`` zero-initialises the up-projections (identity); ``False`` draws them at random.
        modules_to_save (`Optional[list[str]]`): Modules trained in full and saved with the adapter. ``None``
            (default): the task heads of a known head model (see ``tuners/seq_adapter/heads.py``): Mask2Former's
            ``class_predictor``; the DETR family's class and box heads per decoder layer (``class_embed.<i>``,
            ``bbox_embed.<i>``; RT-DETR's under ``model.decoder`` plus its encoder proposal heads and denoising label
            embedding; Grounding DINO's box heads, its class head being a parameter-free text similarity); the
            modules a model declares in ``peft_modules_to_save``; none for a bare backbone or encoder. Heads the base
            model ties to copies in its decoder (box refinement, two stages) keep one shared trainable copy. ``[]``:
            none; a ``UserWarning`` then names each head left frozen (a class head fine-tuned on a new label set starts
            from random weights). A ModuleList of per-layer heads is named layer by layer (``class_embed.0``, ...).
            Saved as resolved.
        auto_target_modules (`bool`): Set by injection, not by users: True when `target_modules` was None and
            injection expanded it to every supported module of the base model. The saved `target_modules` then list
            them all, and loading refuses a base model that has supported modules the list lacks (a different base).

    Every field, and those inherited from ``PeftConfig`` (``inference_mode``, ...), is checked on construction,
    including when peft builds the config from an ``adapter_config.json``: a wrong type raises a ``TypeError``, a
    value out of range a ``ValueError``.
    """

    adapters_per_block: int = field(default=2, metadata={"help": "Adapters per block: 1, 2 or 3."})
    adapter_dim: int = field(default=64, metadata={"help": "Bottleneck size of each adapter (at most 65536)."})
    adapter_act: Literal["relu", "gelu"] = field(default="relu", metadata={"help": "Adapter activation."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of blocks to adapt; None: every block found."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of blocks not to adapt."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-init the up-projections (identity at init)."})
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules trained in full and saved with the adapter; None: the model's task heads (class and box "
                "heads), []: none."
            )
        },
    )
    auto_target_modules: bool = field(
        default=False,
        metadata={
            "help": (
                "Set by injection, not by users: True when target_modules was None and was expanded to every "
                "supported block; loading then refuses a base model with supported blocks the list lacks."
            )
        },
    )

    method_name = "seq_adapter"

    def __post_init__(self) -> None:
        check_peft_fields(self, SEQ_ADAPTER)
        super().__post_init__()
        self.peft_type = SEQ_ADAPTER
        normalize_module_names(self, "target_modules", "exclude_modules")
        check_regexes(self, "target_modules", "exclude_modules")
        if self.target_modules == []:
            raise ValueError("`target_modules` is an empty list. Pass None to adapt every block found.")
        check_adapter_settings(self)
        check_bools(self, "init_weights", "auto_target_modules")
        check_modules_to_save_names(self)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ..._registry import peft_type_for
from .._common import CheckedLoadingMixin, normalize_module_names
from .._validation import (
    check_bools,
    check_choice_list,
    check_float,
    check_modules_to_save_names,
    check_peft_fields,
    check_regexes,
    check_size,
    check_size_value,
    check_str_dict,
)
from ..seq_adapter.config import check_adapter_settings


DEFORM_LORA = peft_type_for("deform_lora")
PROJECTIONS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
MHA_TARGETS = ("q", "k", "v", "out")


@dataclass
class DeformableLoRAConfig(CheckedLoadingMixin, PeftConfig):
    """Configuration of [`DeformableLoRAModel`]: LoRA on multi-scale deformable attention (seed 001).

    Multi-scale deformable attention modules are found by structure: a module with the four linear projections
    ``sampling_offsets`` (2 x the width of ``attention_weights``), ``attention_weights``, ``value_proj`` and
    ``output_proj``. That is Mask2Former's pixel decoder and the Deformable-DETR family in transformers (Deformable
    DETR, RT-DETR, Grounding DINO, ...). Each projection gets ``W x + lora_alpha / r_p * B_p A_p x`` with its own rank
    ``r_p``; ``B`` starts at zero, so the pretrained sampling offsets and weights are untouched at step 0, and
    ``merge_and_unload`` folds every update into its projection exactly.

    Other layers may get LoRA too (``extra_target_modules``): an ``nn.Linear`` gets rank ``r``; an
    ``nn.MultiheadAttention`` (Mask2Former's decoder ``cross_attn``) is adapted as a whole, on the q/k/v slices of its
    packed ``in_proj_weight`` and its ``out_proj`` (``multihead_attention_targets``), because its forward reads those
    weights directly and a wrapped ``out_proj`` would be bypassed.

    Set ``adapters_per_block`` (1-3) to add sequential bottleneck adapters in the same adapter (both methods of the
    seed together); see [`SeqAdapterConfig`] for their placement. Adapters do not merge: ``merge_and_unload`` then
    refuses, and ``merge_adapter()`` merges the LoRA part in place.

    Args:
        r (`int`): Default LoRA rank of each projection (and of ``extra_target_modules``), 1 to 65536.
        lora_alpha (`float`): Scaling numerator, a finite number > 0; a projection of rank ``r_p`` is scaled by
            ``lora_alpha / r_p``.
        lora_dropout (`float`): Dropout on the LoRA input, in [0, 1).
        projection_ranks (`dict[str, int]`): Rank per projection (keys from ``sampling_offsets``,
            ``attention_weights``, ``value_proj``, ``output_proj``; ranks 0 to 65536); missing keys use ``r``, ``0``
            leaves a projection without LoRA.
        target_modules (`Optional[Union[list[str], str]]`): Names or a full-match regex of the deformable attention
            modules to adapt; ``None`` adapts every one found. Saved expanded to the adapted module names.
        exclude_modules (`Optional[Union[list[str], str]]`): Deformable attention modules not to adapt.
        extra_target_modules (`Optional[Union[list[str], str]]`): Other ``nn.Linear`` or ``nn.MultiheadAttention``
            modules that get LoRA (names, suffixes or a full-match regex).
        multihead_attention_targets (`list[str]`): Parts of an adapted ``nn.MultiheadAttention``: any of ``"q"``,
            ``"k"``, ``"v"``, ``"out"``.
        adapters_per_block (`int`): 0 (default): LoRA only; 1-3: sequential adapters as well.
        adapter_dim (`int`): Bottleneck size of those adapters (at most 65536).
        adapter_act (`str`): Their activation.
        adapter_target_modules (`Optional[Union[list[str], str]]`): Blocks that get adapters (``None``: all found).
        init_weights (`bool`): ``True`` zero-initialises ``B`` (and the adapters' up-projections): identity at init.
            ``False`` draws them at random (tests of merging).
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

    r: int = field(default=8, metadata={"help": "Default LoRA rank (1 to 65536)."})
    lora_alpha: float = field(
        default=8.0, metadata={"help": "LoRA scaling numerator, > 0 (scaling = lora_alpha / rank)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    projection_ranks: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Rank per deformable-attention projection (0 to 65536); 0: no LoRA there."},
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Deformable attention modules to adapt; None: every one found."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Deformable attention modules not to adapt."}
    )
    extra_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Other nn.Linear / nn.MultiheadAttention modules that get LoRA."}
    )
    multihead_attention_targets: list[str] = field(
        default_factory=lambda: ["q", "v"], metadata={"help": "Parts of an nn.MultiheadAttention: q, k, v, out."}
    )
    adapters_per_block: int = field(default=0, metadata={"help": "0: LoRA only; 1-3: sequential adapters too."})
    adapter_dim: int = field(
        default=64, metadata={"help": "Bottleneck size of the sequential adapters (at most 65536)."}
    )
    adapter_act: Literal["relu", "gelu"] = field(default="relu", metadata={"help": "Sequential adapter activation."})
    adapter_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Blocks that get sequential adapters; None: every block found."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-init B (identity at init); False: random."})
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
                "deformable attention module; loading then refuses a base model with ones the list lacks."
            )
        },
    )

    method_name = "deform_lora"

    def __post_init__(self) -> None:
        check_peft_fields(self, DEFORM_LORA)
        super().__post_init__()
        self.peft_type = DEFORM_LORA
        selectors = ("target_modules", "exclude_modules", "extra_target_modules", "adapter_target_modules")
        normalize_module_names(self, *selectors)
        check_regexes(self, *selectors)
        for name in ("target_modules", "extra_target_modules", "adapter_target_modules"):
            if getattr(self, name) == []:
                raise ValueError(f"`{name}` is an empty list; pass None instead.")
        check_size(self, "r")
        check_float(self, "lora_alpha", minimum=0.0, min_inclusive=False)
        check_float(self, "lora_dropout", minimum=0.0, maximum=1.0, max_inclusive=False)
        check_str_dict(
            self,
            "projection_ranks",
            lambda label, rank: check_size_value(label, rank, minimum=0, meaning="0: no LoRA"),
            keys=PROJECTIONS,
            what="projections",
            expected="a dict of projection -> rank",
        )
        if not any(self.rank(p) for p in PROJECTIONS) and self.extra_target_modules is None:
            raise ValueError(
                "Every projection rank is 0 and `extra_target_modules` is None: LoRA would adapt nothing. Give a "
                "projection a rank > 0, or use SeqAdapterConfig for adapters alone."
            )
        check_choice_list(self, "multihead_attention_targets", MHA_TARGETS, what="parts", allow_str=True)
        check_adapter_settings(self, allow_none=True)
        check_bools(self, "init_weights", "auto_target_modules")
        check_modules_to_save_names(self)

    def rank(self, projection: str) -> int:
        """The LoRA rank of a deformable-attention projection."""
        return self.projection_ranks.get(projection, self.r)

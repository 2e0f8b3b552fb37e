# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ..._registry import peft_type_for
from .._common import CheckedLoadingMixin, normalize_module_names
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
        r (`int`): Default LoRA rank of each projection (and of ``extra_target_modules``).
        lora_alpha (`float`): Scaling numerator; a projection of rank ``r_p`` is scaled by ``lora_alpha / r_p``.
        lora_dropout (`float`): Dropout on the LoRA input.
        projection_ranks (`dict[str, int]`): Rank per projection (keys from ``sampling_offsets``,
            ``attention_weights``, ``value_proj``, ``output_proj``); missing keys use ``r``, ``0`` leaves a projection
            without LoRA.
        target_modules (`Optional[Union[list[str], str]]`): Names or a full-match regex of the deformable attention
            modules to adapt; ``None`` adapts every one found. Saved expanded to the adapted module names.
        exclude_modules (`Optional[Union[list[str], str]]`): Deformable attention modules not to adapt.
        extra_target_modules (`Optional[Union[list[str], str]]`): Other ``nn.Linear`` or ``nn.MultiheadAttention``
            modules that get LoRA (names, suffixes or a full-match regex).
        multihead_attention_targets (`list[str]`): Parts of an adapted ``nn.MultiheadAttention``: any of ``"q"``,
            ``"k"``, ``"v"``, ``"out"``.
        adapters_per_block (`int`): 0 (default): LoRA only; 1-3: sequential adapters as well.
        adapter_dim (`int`): Bottleneck size of those adapters.
        adapter_act (`str`): Their activation.
        adapter_target_modules (`Optional[Union[list[str], str]]`): Blocks that get adapters (``None``: all found).
        init_weights (`bool`): ``True`` zero-initialises ``B`` (and the adapters' up-projections): identity at init.
            ``False`` draws them at random (tests of merging).
        modules_to_save (`Optional[list[str]]`): Modules trained in full and saved with the adapter (heads).
    """

    r: int = field(default=8, metadata={"help": "Default LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA scaling numerator (scaling = lora_alpha / rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    projection_ranks: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Rank per deformable-attention projection; 0: no LoRA there."}
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
    adapter_dim: int = field(default=64, metadata={"help": "Bottleneck size of the sequential adapters."})
    adapter_act: Literal["relu", "gelu"] = field(default="relu", metadata={"help": "Sequential adapter activation."})
    adapter_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Blocks that get sequential adapters; None: every block found."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-init B (identity at init); False: random."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. the heads)."}
    )

    method_name = "deform_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DEFORM_LORA
        normalize_module_names(
            self, "target_modules", "exclude_modules", "extra_target_modules", "adapter_target_modules"
        )
        for name in ("target_modules", "extra_target_modules", "adapter_target_modules"):
            if getattr(self, name) == []:
                raise ValueError(f"`{name}` is an empty list; pass None instead.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive int, got {self.r!r}.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a positive number, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.projection_ranks, dict):
            raise ValueError(
                f"`projection_ranks` must be a dict of projection -> rank, got {self.projection_ranks!r}."
            )
        unknown = sorted(set(self.projection_ranks) - set(PROJECTIONS))
        if unknown:
            raise ValueError(
                f"`projection_ranks` names unknown projections {unknown}; deformable attention has {list(PROJECTIONS)}."
            )
        for name, rank in self.projection_ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"`projection_ranks[{name!r}]` must be an int >= 0 (0: no LoRA), got {rank!r}.")
        if not any(self.rank(p) for p in PROJECTIONS) and self.extra_target_modules is None:
            raise ValueError(
                "Every projection rank is 0 and `extra_target_modules` is None: LoRA would adapt nothing. Give a "
                "projection a rank > 0, or use SeqAdapterConfig for adapters alone."
            )
        targets = [self.multihead_attention_targets] if isinstance(self.multihead_attention_targets, str) else None
        targets = targets or list(self.multihead_attention_targets)
        bad = [t for t in targets if t not in MHA_TARGETS]
        if bad or not targets:
            raise ValueError(
                f"`multihead_attention_targets` must be a non-empty list from {list(MHA_TARGETS)}, got "
                f"{self.multihead_attention_targets!r}."
            )
        self.multihead_attention_targets = [t for t in MHA_TARGETS if t in targets]
        check_adapter_settings(self.adapters_per_block, self.adapter_dim, self.adapter_act, allow_none=True)

    def rank(self, projection: str) -> int:
        """The LoRA rank of a deformable-attention projection."""
        return self.projection_ranks.get(projection, self.r)

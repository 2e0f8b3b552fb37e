# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ..._registry import peft_type_for
from .._common import CheckedLoadingMixin, normalize_module_names
from .blocks import PLACEMENT
from .layer import ACTIVATIONS


SEQ_ADAPTER = peft_type_for("seq_adapter")


def check_adapter_settings(adapters_per_block, adapter_dim, adapter_act, *, allow_none: bool = False) -> None:
    """Validate the sequential-adapter fields (shared by `SeqAdapterConfig` and `DeformableLoRAConfig`)."""
    allowed = sorted(PLACEMENT)
    if allow_none and adapters_per_block == 0:
        pass
    elif isinstance(adapters_per_block, bool) or adapters_per_block not in PLACEMENT:
        extra = " (or 0 for none)" if allow_none else ""
        raise ValueError(
            f"`adapters_per_block` must be one of {allowed}{extra}, got {adapters_per_block!r}: 1 puts an adapter after "
            "the FFN, 2 after self-attention and the FFN, 3 after self-attention, cross-attention and the FFN."
        )
    if isinstance(adapter_dim, bool) or not isinstance(adapter_dim, int) or adapter_dim <= 0:
        raise ValueError(f"`adapter_dim` (the bottleneck size) must be a positive int, got {adapter_dim!r}.")
    if adapter_act not in ACTIVATIONS:
        raise ValueError(f"`adapter_act` must be one of {sorted(ACTIVATIONS)}, got {adapter_act!r}.")


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
        adapter_dim (`int`): The bottleneck size.
        adapter_act (`str`): Activation between the projections, ``"relu"`` or ``"gelu"``.
        target_modules (`Optional[Union[list[str], str]]`): Names (exact or suffix) or a full-match regex of the blocks
            to adapt; ``None`` adapts every block found. Saved expanded to the adapted block names.
        exclude_modules (`Optional[Union[list[str], str]]`): Names or a regex of blocks not to adapt.
        init_weights (`bool`): ``True`` zero-initialises the up-projections (identity); ``False`` draws them at random.
        modules_to_save (`Optional[list[str]]`): Modules trained in full and saved with the adapter (heads).
    """

    adapters_per_block: int = field(default=2, metadata={"help": "Adapters per block: 1, 2 or 3."})
    adapter_dim: int = field(default=64, metadata={"help": "Bottleneck size of each adapter."})
    adapter_act: Literal["relu", "gelu"] = field(default="relu", metadata={"help": "Adapter activation."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of blocks to adapt; None: every block found."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of blocks not to adapt."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-init the up-projections (identity at init)."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. the heads)."}
    )

    method_name = "seq_adapter"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SEQ_ADAPTER
        normalize_module_names(self, "target_modules", "exclude_modules")
        if self.target_modules == []:
            raise ValueError("`target_modules` is an empty list. Pass None to adapt every block found.")
        check_adapter_settings(self.adapters_per_block, self.adapter_dim, self.adapter_act)

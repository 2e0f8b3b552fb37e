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
    check_choice_list,
    check_choice_list_value,
    check_float,
    check_float_value,
    check_modules_to_save_names,
    check_peft_fields,
    check_regexes,
    check_size,
    check_str_dict,
    check_str_dict_value,
)


MOPEFT = peft_type_for("mopeft")
SUB_METHODS = ("lora", "prefix", "adapter")
LORA_TARGETS = ("q", "k", "v")
PREFIX_DEPTHS = ("deep", "shallow")
ADAPTER_ACTIVATIONS = ("gelu", "relu")
# The seed's Table 4.4 columns as settings of one config: `MoPEFTConfig.from_preset(name, **overrides)`.
MOPEFT_PRESETS: dict[str, dict] = {
    "lora": {"use_prefix": False, "use_adapter": False, "gating": False},
    "vpt": {"use_lora": False, "use_adapter": False, "gating": False, "prefix_depth": "shallow"},
    "vpt_deep": {"use_lora": False, "use_adapter": False, "gating": False},
    "adapter": {"use_lora": False, "use_prefix": False, "gating": False},
    "mopeft": {},
}


def _check_pruned_entry(label: str, methods) -> list[str]:
    """One block of `pruned`: the sub-methods dropped there (possibly none)."""
    return check_choice_list_value(label, methods, SUB_METHODS, what="sub-methods", non_empty=False)


def _check_frozen_gates_entry(label: str, gates) -> dict[str, float]:
    """One block of `frozen_gates`: sub-method -> constant gate value in [0, 1]."""
    return check_str_dict_value(
        label,
        gates,
        lambda gate_label, gate: check_float_value(gate_label, gate, minimum=0.0, maximum=1.0),
        keys=SUB_METHODS,
        what="sub-methods",
        expected="a dict of sub-method -> gate value",
    )


@dataclass
class MoPEFTConfig(CheckedLoadingMixin, PeftConfig):
    """Configuration of [`MoPEFTModel`]: a gated mixture of LoRA, prefix tuning and bottleneck adapters (seed 002).

    MoPEFT adapts the transformer blocks of a ViT-style image encoder (SAM's, ViT's, DINOv2's). Three sub-methods,
    each switched on or off, act on every targeted block:

    - **LoRA** on the query and value projections (for SAM: the q and v slices of the fused ``qkv`` layer).
    - **Prefix tuning** (VPT-deep): ``prefix_length`` learned key and value vectors, produced by a small MLP from
      learned embeddings, prepended to K and V in every attention window. Relative-position bias applies to the
      spatial keys only. ``prefix_depth="shallow"`` puts prefixes in the first targeted block only (VPT-shallow).
    - **Adapter**: a bottleneck MLP ``up(act(down(f)))`` added to the FFN output ``f`` (``f + G_A * adapter(f)``).

    With ``gating=True`` (the default), a small feed-forward net per block reads the block's normalised input,
    mean-pooled over all spatial tokens, and gives three gates per image: the LoRA gate ``G_L`` (the LoRA scaling is
    ``lora_alpha / r * G_L``), the prefix gate ``G_P`` and the adapter gate ``G_A``, each a sigmoid in (0, 1).
    ``G_P`` scales the attention mass of the prefix tokens (it adds ``log G_P`` to their attention logits), so
    ``G_P -> 0`` gives exactly the original attention. With ``gating=False`` each sub-method is the plain method:
    LoRA with the constant scaling ``lora_alpha / r``, ungated prefixes, ungated adapters. LoRA-only, VPT, VPT-deep,
    Adapter-only and MoPEFT are all configurations of this one class.

    At init the LoRA ``B`` matrices and the adapter up-projections are zero, so LoRA and adapters leave the model
    unchanged. Prefixes cannot: like every prefix/prompt method, they take attention mass from step 0 (with gating,
    a share scaled by ``G_P``, which starts at ``sigmoid(prefix_gate_init)``).

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Names (exact or suffix) or a full-match regex of the transformer blocks to adapt. ``None`` (default)
            adapts every block of a supported family (SAM ViT, ViT, DINOv2).
        exclude_modules (`Optional[Union[list[str], str]]`): Names or a regex of blocks not to adapt.
        use_lora (`bool`): Switch LoRA on the query and value projections.
        use_prefix (`bool`): Switch prefix tuning.
        use_adapter (`bool`): Switch the bottleneck adapter after the FFN.
        gating (`bool`): Learn per-image gates for the three sub-methods (MoPEFT). ``False`` gives the plain methods.
        r (`int`): LoRA rank (seed default 8), 1 to 65536.
        lora_alpha (`float`): LoRA scaling numerator, a finite number > 0; the scaling is ``lora_alpha / r`` (times
            ``G_L`` when gated).
        lora_dropout (`float`): Dropout on the LoRA input, in [0, 1).
        lora_targets (`list[str]`): Which projections get LoRA, from ``"q"``, ``"k"``, ``"v"`` (default q and v).
        prefix_length (`int`): Number of prefix key/value vectors ``L`` per block (seed default 20), 1 to 65536.
        prefix_projection_dim (`int`): Width of the prefix embeddings and of the re-parameterisation MLP's hidden
            layer (1 to 65536). The prefix matrix has rank at most ``min(prefix_length, prefix_projection_dim)``.
        prefix_depth (`Literal["deep", "shallow"]`): ``"deep"``: prefixes in every targeted block (VPT-deep).
            ``"shallow"``: in the first targeted block only (VPT).
        adapter_dim (`int`): Bottleneck width ``D_mid`` of the adapter (seed default 64), 1 to 65536.
        adapter_act (`str`): Activation inside the adapter (``"gelu"`` or ``"relu"``).
        gate_hidden_size (`int`): Hidden width of the gate FFN (at most 65536); 0 uses a single linear layer per
            gate.
        prefix_gate_init (`float`): Initial pre-sigmoid bias of the prefix gate (gate starts at its sigmoid); any
            finite number.
        init_weights (`bool`): ``True`` zero-initialises LoRA ``B`` and the adapter up-projection (identity for LoRA
            and adapters). ``False`` draws them at random (tests of merging and disabling).
        modules_to_save (`Optional[list[str]]`): Modules trained in full and saved with the adapter. ``None`` on a
            model that declares default ones (``SamForSemanticSegmentation``: its ``mask_decoder``) uses those; pass
            ``[]`` to train none.
        pruned (`dict[str, list[str]]`): Sub-methods dropped per block by [`prune_mopeft`]; filled by pruning and
            saved, so a loaded adapter has the same structure.
        frozen_gates (`dict[str, dict[str, float]]`): Gates replaced by constants per block by [`prune_mopeft`]
            (with ``freeze_gates=True``), each a finite number in [0, 1]. A LoRA with a frozen gate has an
            input-independent scaling and merges.
        auto_target_modules (`bool`): Set by injection, not by users: True when `target_modules` was None and
            injection expanded it to every supported module of the base model. The saved `target_modules` then list
            them all, and loading refuses a base model that has supported modules the list lacks (a different base).

    Every field, and those inherited from ``PeftConfig`` (``inference_mode``, ...), is checked on construction,
    including when peft builds the config from an ``adapter_config.json``: a wrong type raises a ``TypeError``, a
    value out of range a ``ValueError``.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names or a full-match regex of transformer blocks to adapt; None: every supported block."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a full-match regex of blocks not to adapt."}
    )
    use_lora: bool = field(default=True, metadata={"help": "LoRA on the query and value projections."})
    use_prefix: bool = field(default=True, metadata={"help": "Prefix tuning (VPT-deep) in every attention window."})
    use_adapter: bool = field(default=True, metadata={"help": "Bottleneck adapter after the FFN."})
    gating: bool = field(
        default=True, metadata={"help": "Learn per-image gates (MoPEFT). False gives the plain sub-methods."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank (1 to 65536)."})
    lora_alpha: float = field(
        default=8.0, metadata={"help": "LoRA scaling numerator, > 0 (scaling = lora_alpha / r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_targets: list[str] = field(
        default_factory=lambda: ["q", "v"], metadata={"help": "Projections that get LoRA: any of 'q', 'k', 'v'."}
    )
    prefix_length: int = field(
        default=20, metadata={"help": "Prefix length L (key/value vectors per block), 1 to 65536."}
    )
    prefix_projection_dim: int = field(
        default=32,
        metadata={"help": "Width of the prefix embeddings and of the re-parameterisation MLP (1 to 65536)."},
    )
    prefix_depth: Literal["deep", "shallow"] = field(
        default="deep", metadata={"help": "'deep': prefixes in every block (VPT-deep); 'shallow': first block (VPT)."}
    )
    adapter_dim: int = field(default=64, metadata={"help": "Adapter bottleneck width D_mid (1 to 65536)."})
    adapter_act: Literal["gelu", "relu"] = field(default="gelu", metadata={"help": "Adapter activation."})
    gate_hidden_size: int = field(
        default=16,
        metadata={"help": "Hidden width of the gate feed-forward net (at most 65536); 0 for one linear layer."},
    )
    prefix_gate_init: float = field(
        default=0.0, metadata={"help": "Initial pre-sigmoid bias of the prefix gate (a finite number)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-init LoRA B and adapter up-projections; False: random (tests)."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (default: the model's own, if any)."},
    )
    pruned: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": "Sub-methods dropped per block by prune_mopeft (filled by pruning)."}
    )
    frozen_gates: dict[str, dict[str, float]] = field(
        default_factory=dict,
        metadata={"help": "Gates replaced by constants (in [0, 1]) per block by prune_mopeft."},
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

    method_name = "mopeft"

    def __post_init__(self) -> None:
        check_peft_fields(self, MOPEFT)
        super().__post_init__()
        self.peft_type = MOPEFT
        normalize_module_names(self, "target_modules", "exclude_modules")
        check_regexes(self, "target_modules", "exclude_modules")
        if self.target_modules == []:
            raise ValueError("`target_modules` is an empty list. Pass None to adapt every supported block.")
        check_bools(self, "use_lora", "use_prefix", "use_adapter", "gating", "init_weights", "auto_target_modules")
        if not (self.use_lora or self.use_prefix or self.use_adapter):
            raise ValueError(
                "MoPEFT needs at least one sub-method: `use_lora`, `use_prefix` and `use_adapter` are all False. "
                "Switch one on (all three give the full mixture)."
            )
        for name in ("r", "prefix_length", "prefix_projection_dim", "adapter_dim"):
            check_size(self, name)
        check_size(self, "gate_hidden_size", minimum=0, describe=">= 0", meaning="0: one linear layer per gate")
        check_float(self, "lora_alpha", minimum=0.0, min_inclusive=False)
        check_float(self, "lora_dropout", minimum=0.0, maximum=1.0, max_inclusive=False)
        check_float(self, "prefix_gate_init")
        check_choice_list(self, "lora_targets", LORA_TARGETS, what="projections", allow_str=True)
        check_choice(self, "prefix_depth", PREFIX_DEPTHS, hint="'deep' for VPT-deep, 'shallow' for VPT.")
        check_choice(self, "adapter_act", ADAPTER_ACTIVATIONS)
        check_modules_to_save_names(self)
        check_str_dict(self, "pruned", _check_pruned_entry, expected="a dict of block -> dropped sub-methods")
        check_str_dict(
            self, "frozen_gates", _check_frozen_gates_entry, expected="a dict of block -> {sub-method: gate value}"
        )

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> MoPEFTConfig:
        """One of the seed's baselines as a config: ``"lora"``, ``"vpt"`` (shallow prefixes), ``"vpt_deep"``,
        ``"adapter"`` (each ungated) or ``"mopeft"`` (all three, gated). ``overrides`` set any other field."""
        if preset not in MOPEFT_PRESETS:
            raise ValueError(f"Unknown MoPEFT preset {preset!r}; choose from {list(MOPEFT_PRESETS)}.")
        clash = sorted(set(MOPEFT_PRESETS[preset]) & set(overrides))
        if clash:
            raise ValueError(
                f"Preset {preset!r} fixes {clash}; build `MoPEFTConfig(...)` directly to change them, got {overrides}."
            )
        return cls(**MOPEFT_PRESETS[preset], **overrides)

    @property
    def sub_methods(self) -> tuple[str, ...]:
        """The switched-on sub-methods, in the order the gates are stored."""
        return tuple(m for m, on in zip(SUB_METHODS, (self.use_lora, self.use_prefix, self.use_adapter)) if on)

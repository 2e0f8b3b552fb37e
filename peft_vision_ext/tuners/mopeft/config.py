# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ..._registry import peft_type_for
from .._common import CheckedLoadingMixin, normalize_module_names


MOPEFT = peft_type_for("mopeft")
SUB_METHODS = ("lora", "prefix", "adapter")
LORA_TARGETS = ("q", "k", "v")
PREFIX_DEPTHS = ("deep", "shallow")
# The seed's Table 4.4 columns as settings of one config: `MoPEFTConfig.from_preset(name, **overrides)`.
MOPEFT_PRESETS: dict[str, dict] = {
    "lora": {"use_prefix": False, "use_adapter": False, "gating": False},
    "vpt": {"use_lora": False, "use_adapter": False, "gating": False, "prefix_depth": "shallow"},
    "vpt_deep": {"use_lora": False, "use_adapter": False, "gating": False},
    "adapter": {"use_lora": False, "use_prefix": False, "gating": False},
    "mopeft": {},
}


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
        r (`int`): LoRA rank (seed default 8).
        lora_alpha (`float`): LoRA scaling numerator; the scaling is ``lora_alpha / r`` (times ``G_L`` when gated).
        lora_dropout (`float`): Dropout on the LoRA input.
        lora_targets (`list[str]`): Which projections get LoRA, from ``"q"``, ``"k"``, ``"v"`` (default q and v).
        prefix_length (`int`): Number of prefix key/value vectors ``L`` per block (seed default 20).
        prefix_projection_dim (`int`): Width of the prefix embeddings and of the re-parameterisation MLP's hidden
            layer. The prefix matrix has rank at most ``min(prefix_length, prefix_projection_dim)``.
        prefix_depth (`Literal["deep", "shallow"]`): ``"deep"``: prefixes in every targeted block (VPT-deep).
            ``"shallow"``: in the first targeted block only (VPT).
        adapter_dim (`int`): Bottleneck width ``D_mid`` of the adapter (seed default 64).
        adapter_act (`str`): Activation inside the adapter (``"gelu"`` or ``"relu"``).
        gate_hidden_size (`int`): Hidden width of the gate FFN; 0 uses a single linear layer per gate.
        prefix_gate_init (`float`): Initial pre-sigmoid bias of the prefix gate (gate starts at its sigmoid).
        init_weights (`bool`): ``True`` zero-initialises LoRA ``B`` and the adapter up-projection (identity for LoRA
            and adapters). ``False`` draws them at random (tests of merging and disabling).
        modules_to_save (`Optional[list[str]]`): Modules trained in full and saved with the adapter. ``None`` on a
            model that declares default ones (``SamForSemanticSegmentation``: its ``mask_decoder``) uses those; pass
            ``[]`` to train none.
        pruned (`dict[str, list[str]]`): Sub-methods dropped per block by [`prune_mopeft`]; filled by pruning and
            saved, so a loaded adapter has the same structure.
        frozen_gates (`dict[str, dict[str, float]]`): Gates replaced by constants per block by [`prune_mopeft`]
            (with ``freeze_gates=True``). A LoRA with a frozen gate has an input-independent scaling and merges.
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
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA scaling numerator (scaling = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: list[str] = field(
        default_factory=lambda: ["q", "v"], metadata={"help": "Projections that get LoRA: any of 'q', 'k', 'v'."}
    )
    prefix_length: int = field(default=20, metadata={"help": "Prefix length L (key/value vectors per block)."})
    prefix_projection_dim: int = field(
        default=32, metadata={"help": "Width of the prefix embeddings and of the re-parameterisation MLP."}
    )
    prefix_depth: Literal["deep", "shallow"] = field(
        default="deep", metadata={"help": "'deep': prefixes in every block (VPT-deep); 'shallow': first block (VPT)."}
    )
    adapter_dim: int = field(default=64, metadata={"help": "Adapter bottleneck width D_mid."})
    adapter_act: Literal["gelu", "relu"] = field(default="gelu", metadata={"help": "Adapter activation."})
    gate_hidden_size: int = field(
        default=16, metadata={"help": "Hidden width of the gate feed-forward net; 0 for one linear layer."}
    )
    prefix_gate_init: float = field(default=0.0, metadata={"help": "Initial pre-sigmoid bias of the prefix gate."})
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
        default_factory=dict, metadata={"help": "Gates replaced by constants per block by prune_mopeft."}
    )

    method_name = "mopeft"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MOPEFT
        normalize_module_names(self, "target_modules", "exclude_modules")
        if self.target_modules == []:
            raise ValueError("`target_modules` is an empty list. Pass None to adapt every supported block.")
        if not (self.use_lora or self.use_prefix or self.use_adapter):
            raise ValueError(
                "MoPEFT needs at least one sub-method: `use_lora`, `use_prefix` and `use_adapter` are all False. "
                "Switch one on (all three give the full mixture)."
            )
        for name in ("r", "prefix_length", "prefix_projection_dim", "adapter_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if isinstance(self.gate_hidden_size, bool) or not isinstance(self.gate_hidden_size, int):
            raise ValueError(f"`gate_hidden_size` must be an int >= 0, got {self.gate_hidden_size!r}.")
        if self.gate_hidden_size < 0:
            raise ValueError(f"`gate_hidden_size` must be >= 0 (0: one linear layer), got {self.gate_hidden_size}.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a positive number, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        targets = [self.lora_targets] if isinstance(self.lora_targets, str) else list(self.lora_targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ValueError(
                f"`lora_targets` must be a non-empty list drawn from {list(LORA_TARGETS)}, got {self.lora_targets!r}."
            )
        self.lora_targets = [t for t in LORA_TARGETS if t in targets]
        if self.prefix_depth not in PREFIX_DEPTHS:
            raise ValueError(
                f"`prefix_depth` must be one of {PREFIX_DEPTHS}, got {self.prefix_depth!r}: 'deep' for VPT-deep, "
                "'shallow' for VPT."
            )
        if self.adapter_act not in ("gelu", "relu"):
            raise ValueError(f"`adapter_act` must be 'gelu' or 'relu', got {self.adapter_act!r}.")
        for block, methods in (self.pruned or {}).items():
            bad = [m for m in methods if m not in SUB_METHODS]
            if bad:
                raise ValueError(f"`pruned[{block!r}]` names unknown sub-methods {bad}; use {list(SUB_METHODS)}.")
        for block, gates in (self.frozen_gates or {}).items():
            for method, value in gates.items():
                if method not in SUB_METHODS or not 0.0 <= float(value) <= 1.0:
                    raise ValueError(
                        f"`frozen_gates[{block!r}]` must map sub-methods {list(SUB_METHODS)} to values in [0, 1], "
                        f"got {method!r}: {value!r}."
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

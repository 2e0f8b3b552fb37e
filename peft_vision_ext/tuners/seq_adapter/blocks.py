# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Where sequential adapters go in a transformer block, found by structure.

A block qualifies when it has a self-attention sublayer and a feed-forward sublayer whose outputs are the sublayer
results *before* the block adds its residual (an adapter placed there is the sequential, Houlsby-style adapter:
``h <- h + up(act(down(h)))`` on the sublayer output). Positions, in the order the seed lists them:

- ``self_attn``: the child ``self_attn``, ``attention`` or ``attn`` (its output, or the first element of its tuple);
- ``cross_attn``: the child ``cross_attn`` or ``encoder_attn`` (Mask2Former's is an ``nn.MultiheadAttention``);
- ``ffn``: the child ``mlp`` (a module whose last layer is an ``nn.Linear``), or else the ``fc2`` ``nn.Linear``.

This covers Swin's ``SwinLayer`` (Mask2Former's backbone), Mask2Former's pixel-decoder encoder layers and its
masked-attention decoder layers, and the Deformable-DETR family's encoder and decoder layers. Blocks whose FFN output
already contains the residual (BERT/ViT-style ``intermediate`` + ``output``) have no ``mlp``/``fc2`` child and are not
matched.
"""

from __future__ import annotations

from torch import nn


POSITIONS = ("self_attn", "cross_attn", "ffn")
_SELF_ATTENTION = ("self_attn", "attention", "attn")
_CROSS_ATTENTION = ("cross_attn", "encoder_attn")
# Which positions `adapters_per_block` adapters occupy (a block without cross-attention skips that position).
PLACEMENT = {1: ("ffn",), 2: ("self_attn", "ffn"), 3: ("self_attn", "cross_attn", "ffn")}
SUPPORTED_BLOCKS = (
    "transformer blocks with a self-attention child (`self_attn`, `attention` or `attn`), optionally a cross-attention "
    "child (`cross_attn` or `encoder_attn`), a LayerNorm, and a feed-forward child `mlp` (ending in an nn.Linear) or "
    "an `fc2` nn.Linear: e.g. SwinLayer, Mask2Former's pixel-decoder and masked-attention decoder layers, "
    "Deformable-DETR encoder/decoder layers"
)


def _last_linear(module: nn.Module) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _has_attention(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.MultiheadAttention)) for m in module.modules())


def block_positions(block: nn.Module) -> dict[str, str] | None:
    """``{position: child name}`` of a block that takes sequential adapters, or None."""
    children = dict(block.named_children())
    if not any(isinstance(m, nn.LayerNorm) for m in children.values()):
        return None
    positions: dict[str, str] = {}
    for position, names in (("self_attn", _SELF_ATTENTION), ("cross_attn", _CROSS_ATTENTION)):
        found = next((name for name in names if name in children and _has_attention(children[name])), None)
        if found is not None:
            positions[position] = found
    if "mlp" in children and _last_linear(children["mlp"]) is not None:
        positions["ffn"] = "mlp"
    elif isinstance(children.get("fc2"), nn.Linear):
        positions["ffn"] = "fc2"
    if "self_attn" not in positions or "ffn" not in positions:
        return None
    return positions


def block_width(block: nn.Module, positions: dict[str, str]) -> int:
    """The block's hidden size: the output width of its feed-forward sublayer."""
    ffn = getattr(block, positions["ffn"])
    return ffn.out_features if isinstance(ffn, nn.Linear) else _last_linear(ffn).out_features


def placement(adapters_per_block: int, positions: dict[str, str]) -> list[str]:
    """The positions of a block that get an adapter (``PLACEMENT`` limited to the positions the block has)."""
    return [p for p in PLACEMENT[adapters_per_block] if p in positions]

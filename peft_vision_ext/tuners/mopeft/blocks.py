# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Transformer-block families that MoPEFT can adapt, recognised by structure rather than by class name.

A family knows three things about a block: where the query/key/value projections are (for LoRA and its merge), where
MoPEFT enters the block, and its widths. The block always runs its **own** forward (so FSDP's unshard of the block,
transformers' activation checkpointing and any user hooks apply); MoPEFT enters through three points that
``MoPEFTLayer`` installs once, at wrap time, on the block's parts (``parts``):

1. a forward hook on the first norm: the gates, from its output pooled over all tokens (``pool``);
2. the attention module's ``forward``, replaced by a dispatcher that runs the family's ``attention`` (LoRA on q/v,
   prefixes prepended to K/V, gated) while a plan is active, and the module's own forward otherwise;
3. a forward hook on the FFN (``mlp``) that adds the gated adapter to its output.

With LoRA ``B`` and adapter up-projections at zero the output is the block's own output.

Families:

- ``sam``: SAM's ViT (``SamVisionLayer``): ``(B, H, W, C)`` tokens, fused ``qkv`` linear, windowed attention with
  zero-padded windows (window size 0: global), decomposed relative-position bias.
- ``vit``: pre-norm blocks with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (ViT, DeiT-style:
  ``layernorm_before``/``layernorm_after``; DINOv2-style: ``norm1``/``norm2`` with layer scale and drop path).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn


if TYPE_CHECKING:
    from .layer import MoPEFTLayer


SUPPORTED_BLOCKS = (
    "SAM ViT blocks (attention `attn` with a fused `qkv` nn.Linear, `layer_norm1`, `layer_norm2`, `mlp`, "
    "`window_size`), e.g. transformers' SamVisionLayer",
    "ViT-style blocks (attention `attention` with `q_proj`/`k_proj`/`v_proj`/`o_proj` nn.Linear and `mlp`, plus "
    "`layernorm_before`/`layernorm_after` or `norm1`/`norm2` with `layer_scale1`/`layer_scale2`), e.g. transformers' "
    "ViTLayer and Dinov2Layer",
)


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear)


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _own_parameters(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters(recurse=False)}


# A family's `attention` replaces the block's attention, and its hooks assume the block's layout (first norm ->
# attention -> residual -> FFN -> residual), so a block matches only if it holds exactly these parts: a block with
# anything more (Swin's shifted windows and relative-position table, ...) is refused rather than silently run without
# it.
_SAM_BLOCK_PARTS = {"layer_norm1", "attn", "layer_norm2", "mlp"}
_SAM_ATTENTION_PARAMS = {"rel_pos_h", "rel_pos_w"}
_VIT_BLOCK_PARTS = ({"attention", "layernorm_before", "layernorm_after", "mlp", "dropout"},)
_DINOV2_BLOCK_PARTS = {"norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2"}


class SamBlock:
    name = "sam"

    @staticmethod
    def matches(block: nn.Module) -> bool:
        attn = getattr(block, "attn", None)
        return (
            attn is not None
            and _children(block) == _SAM_BLOCK_PARTS
            and _children(attn) == {"qkv", "proj"}
            and _own_parameters(attn) <= _SAM_ATTENTION_PARAMS
            and _is_linear(getattr(attn, "qkv", None))
            and _is_linear(getattr(attn, "proj", None))
            and hasattr(attn, "num_attention_heads")
            and all(hasattr(block, n) for n in ("layer_norm1", "layer_norm2", "mlp", "window_size"))
            and callable(getattr(block, "window_partition", None))
            and attn.qkv.out_features == 3 * attn.qkv.in_features
        )

    @staticmethod
    def hidden_size(block: nn.Module) -> int:
        return block.attn.qkv.in_features

    @staticmethod
    def num_heads(block: nn.Module) -> int:
        return block.attn.num_attention_heads

    @staticmethod
    def projection(block: nn.Module, target: str) -> tuple[nn.Linear, slice]:
        """The linear layer holding ``target`` ("q", "k" or "v") and the rows of its weight that produce it."""
        width = SamBlock.hidden_size(block)
        index = "qkv".index(target)
        return block.attn.qkv, slice(index * width, (index + 1) * width)

    @staticmethod
    def parts(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """Where MoPEFT enters the block: its first norm, its attention and its FFN."""
        return block.layer_norm1, block.attn, block.mlp

    @staticmethod
    def pool(normed: torch.Tensor) -> torch.Tensor:
        """The gates' input: the first norm's output ``(B, H, W, C)`` mean-pooled over all H*W tokens, ``(B, C)``."""
        return normed.flatten(1, 2).mean(dim=1)

    @staticmethod
    def attention(
        layer: MoPEFTLayer,
        attn: nn.Module,
        plan: dict,
        batch_size: int,
        hidden_states: torch.Tensor,
        output_attentions: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SAM's attention with MoPEFT, called as ``attn(hidden_states=...)`` by the block: ``hidden_states`` are the
        windows ``(n, h, w, C)`` (``n = B * windows per image``; a global block passes the whole ``(B, H, W, C)``
        map). Returns ``(output (n, h, w, C), attention weights (n * heads, N, L+N) or None)`` as SAM's does."""
        n, h, w, _ = hidden_states.shape
        repeats = n // batch_size  # windows per image: per-image gates are repeated over them
        heads = attn.num_attention_heads
        qkv = layer.add_lora_to_fused(attn.qkv(hidden_states), hidden_states, plan, repeats)  # (n, h, w, 3C)
        # As SAM's attention: one contiguous (3, n, heads, N, hd) copy, so q, k and v are dense.
        qkv = qkv.reshape(n, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, n, heads, h * w, -1)
        query, key, value = qkv.unbind(0)  # each (n, heads, N, hd)
        prefix = layer.prefix_key_values(plan, n, repeats, heads, dtype=query.dtype)
        bias = _sam_attention_bias(attn, query, (h, w), prefix)  # (n, heads, N, L+N) or None
        if prefix is not None:  # prefixes first, then the window's tokens: (n, heads, L+N, hd)
            key = torch.cat([prefix[0].expand(n, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix[1].expand(n, -1, -1, -1), value], dim=2)
        output, weights = _sam_attention(attn, query, key, value, bias)  # (n, N, C)
        return attn.proj(output.reshape(n, h, w, -1)), weights


def _sam_attention_bias(
    attn: nn.Module,
    query: torch.Tensor,
    size: tuple[int, int],
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
) -> torch.Tensor | None:
    """The additive attention bias ``(n, heads, N, L+N)`` of a window batch: ``log G_P`` (or 0) in the ``L`` prefix
    columns, SAM's decomposed relative-position bias in the ``N`` spatial columns (relative positions exist only
    between spatial tokens). None when there is neither.

    ``query``: ``(n, heads, N, hd)``; ``prefix``: keys ``(heads, L, hd)``, values, and the prefix logit bias
    ``(n, 1, 1, L)`` or None. At inference both parts are written into one buffer, so the ``(n, heads, N, N)``
    relative-position bias is never built and then copied next to the prefix columns.
    """
    n, heads, tokens, _ = query.shape
    height, width = size
    length = prefix[0].shape[1] if prefix is not None else 0
    prefix_bias = prefix[2] if prefix is not None else None
    if not attn.use_rel_pos and prefix_bias is None:
        return None
    if attn.use_rel_pos:
        # SAM's get_decomposed_rel_pos: bias[q, k] = rel_h[q, k_row] + rel_w[q, k_col].
        grid = query.reshape(n * heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid, attn.get_rel_pos(height, height, attn.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid, attn.get_rel_pos(width, width, attn.rel_pos_w))
    if torch.is_grad_enabled() and (
        (attn.use_rel_pos and (rel_h.requires_grad or rel_w.requires_grad))
        or (prefix_bias is not None and prefix_bias.requires_grad)
    ):
        # Training: a concatenation, whose backward only slices the bias gradient (in-place writes into a buffer
        # would make autograd copy the whole (n, heads, N, L+N) gradient once per write).
        spatial = (
            (rel_h.contiguous()[..., None] + rel_w.contiguous()[..., None, :]).view(n, heads, tokens, tokens)
            if attn.use_rel_pos
            else query.new_zeros(n, heads, tokens, tokens)
        )
        if not length:
            return spatial
        prefix_cols = (
            prefix_bias.to(query.dtype).expand(n, heads, tokens, length)
            if prefix_bias is not None
            else query.new_zeros(n, heads, tokens, length)
        )
        return torch.cat([prefix_cols, spatial], dim=-1)
    # Inference: both parts written into one buffer, the relative positions by the broadcast add itself.
    bias = query.new_empty(n, heads, tokens, length + tokens)
    spatial = bias[..., length:]  # (n, heads, N, N), a strided view of the buffer
    if attn.use_rel_pos:
        torch.add(rel_h[..., None], rel_w[..., None, :], out=spatial.view(n * heads, height, width, height, width))
    else:
        spatial.zero_()
    if length:
        bias[..., :length] = prefix_bias.to(query.dtype) if prefix_bias is not None else 0.0
    return bias


def _sam_attention(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SAM's attention (eager or SDPA, as the module is configured) over keys that may start with prefixes.

    ``query``: ``(n, heads, N, hd)``; ``key/value``: ``(n, heads, L+N, hd)``; ``bias``: ``(n, heads, N, L+N)`` or None
    (see `_sam_attention_bias`). Returns ``(n, N, heads*hd)`` and, as SAM's eager attention, the attention weights
    ``(n * heads, N, L+N)`` (None with SDPA).
    """
    n, _, tokens, _ = query.shape
    weights = None
    if type(attn).__name__.endswith("SdpaAttention"):  # transformers' SamVisionSdpaAttention
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)  # (n, heads, N, hd)
    else:
        weights = (query * attn.scale) @ key.transpose(-2, -1)  # (n, heads, N, L+N)
        if bias is not None:
            weights = weights + bias
        weights = torch.softmax(weights, dtype=torch.float32, dim=-1).to(query.dtype)
        output = F.dropout(weights, p=attn.dropout, training=attn.training) @ value
        weights = weights.flatten(0, 1)  # (n * heads, N, L+N): SAM's layout, before dropout as SAM returns them
    return output.permute(0, 2, 1, 3).reshape(n, tokens, -1), weights


class ViTBlock:
    name = "vit"

    @staticmethod
    def matches(block: nn.Module) -> bool:
        attn = getattr(block, "attention", None)
        if attn is None or _children(block) not in (*_VIT_BLOCK_PARTS, _DINOV2_BLOCK_PARTS):
            return False
        if _children(attn) != {"q_proj", "k_proj", "v_proj", "o_proj"} or _own_parameters(attn):
            return False
        return all(_is_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            hasattr(attn, n) for n in ("head_dim", "scaling", "num_attention_heads", "config")
        )

    @staticmethod
    def hidden_size(block: nn.Module) -> int:
        return block.attention.q_proj.in_features

    @staticmethod
    def num_heads(block: nn.Module) -> int:
        return block.attention.num_attention_heads

    @staticmethod
    def projection(block: nn.Module, target: str) -> tuple[nn.Linear, slice]:
        linear = getattr(block.attention, f"{target}_proj")
        return linear, slice(0, linear.out_features)

    @staticmethod
    def parts(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """Where MoPEFT enters the block: its first norm, its attention and its FFN (the adapter acts on the FFN
        output, before layer scale, drop path or dropout)."""
        return (block.norm1 if hasattr(block, "norm1") else block.layernorm_before), block.attention, block.mlp

    @staticmethod
    def pool(normed: torch.Tensor) -> torch.Tensor:
        """The gates' input: the first norm's output ``(B, N, C)`` mean-pooled over all tokens, ``(B, C)``."""
        return normed.mean(dim=1)

    @staticmethod
    def attention(
        layer: MoPEFTLayer,
        attn: nn.Module,
        plan: dict,
        batch_size: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's attention with MoPEFT, called as the block calls its attention module:
        ``(hidden_states (B, N, C), attention_mask)``. Returns ``(output (B, N, C), attention weights or None)``."""
        return _vit_attention(layer, attn, hidden_states, plan, attention_mask, **kwargs)


def _vit_attention(
    layer: MoPEFTLayer,
    attn: nn.Module,
    hidden_states: torch.Tensor,
    plan: Any,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> torch.Tensor:
    """The block's own attention function (eager, SDPA, ...) with LoRA deltas and prefixes added; returns the output
    ``(B, N, C)`` and the attention weights the function returns (``(B, heads, N, L+N)`` for eager, else None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    projected = {t: getattr(attn, f"{t}_proj")(hidden_states) for t in "qkv"}  # each (B, N, heads*hd)
    for target, delta in layer.lora_deltas(hidden_states, plan, 1).items():
        projected[target] = projected[target] + delta
    query, key, value = (projected[t].view(hidden_shape).transpose(1, 2) for t in "qkv")  # (B, heads, N, hd)
    batch_size, heads, tokens, _ = query.shape
    prefix = layer.prefix_key_values(plan, batch_size, 1, heads, dtype=query.dtype)
    if prefix is not None:
        prefix_key, prefix_value, prefix_bias = prefix  # (heads, L, hd), (B, 1, 1, L)
        length = prefix_key.shape[1]
        key = torch.cat([prefix_key.expand(batch_size, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_value.expand(batch_size, -1, -1, -1), value], dim=2)
        if prefix_bias is not None or attention_mask is not None:
            prefix_cols = (
                prefix_bias.to(query.dtype).expand(batch_size, 1, tokens, length)
                if prefix_bias is not None
                else query.new_zeros(batch_size, 1, tokens, length)
            )
            token_cols = (
                attention_mask.to(query.dtype).expand(batch_size, -1, tokens, -1)
                if attention_mask is not None
                else query.new_zeros(batch_size, 1, tokens, tokens)
            )
            prefix_cols = prefix_cols.expand(-1, token_cols.shape[1], -1, -1)
            attention_mask = torch.cat([prefix_cols, token_cols], dim=-1)  # (B, 1 or heads, N, L+N)
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    output, weights = interface(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        **kwargs,
    )
    return attn.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


FAMILIES = (SamBlock, ViTBlock)


def block_family(module: nn.Module) -> type | None:
    """The family of a transformer block, or None if MoPEFT cannot adapt it."""
    for family in FAMILIES:
        if family.matches(module):
            return family
    return None

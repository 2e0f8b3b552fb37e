# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .._common import CheckedTunerMixin, WrapperReplaceMixin, check_auto_targets, is_excluded
from .blocks import SUPPORTED_BLOCKS, block_positions, block_width, placement
from .config import SeqAdapterConfig
from .heads import resolve_modules_to_save, tie_module_copies
from .layer import SeqAdapterLayer


PREFIX = "iseg_"  # shared by both seed-001 methods (see layer.py)


def find_blocks(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{block name: {position: child name}}`` for every transformer block that takes sequential adapters. A
    sublayer already wrapped by a `SeqAdapterLayer` counts as its base layer."""
    found = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, BaseTunerLayer):
            continue
        view = _unwrapped_children(module)
        positions = block_positions(view)
        if positions is not None:
            found[name] = positions
    return found


class _Children(nn.Module):
    """A block's children with our wrappers replaced by what they wrap (for structure matching only)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child.get_base_layer() if isinstance(child, SeqAdapterLayer) else child)


def _unwrapped_children(module: nn.Module) -> nn.Module:
    if any(isinstance(child, SeqAdapterLayer) for child in module.children()):
        return _Children(module)
    return module


def plan_sequential_adapters(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None,
    adapters_per_block: int,
    field_name: str = "target_modules",
    config=None,
) -> tuple[list[str], dict[str, int]]:
    """The blocks selected by ``target_modules``/``exclude_modules`` and ``{sublayer name: hidden size}`` of the
    sublayers that get an adapter. Raises a ``ValueError`` that says what the model has when nothing fits. With the
    adapter's ``config``, a list that was expanded from ``None`` must equal this model's blocks (``check_auto_targets``)."""
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no transformer block that sequential adapters support. Supported: "
            f"{SUPPORTED_BLOCKS}. For ViT/SAM encoders use MoPEFTConfig; for CNNs, ConvAdapterConfig."
        )
    probe = SeqAdapterConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    if target_modules is None:
        selected = [name for name in blocks if not is_excluded(probe, name)]
    else:
        selected = [name for name in blocks if check_target_module_exists(probe, name)]
        strays = [
            name
            for name, _ in model.named_modules()
            if name and name not in blocks and check_target_module_exists(probe, name)
        ]
        if config is not None:
            check_auto_targets(config, [name for name in blocks if not is_excluded(probe, name)], "transformer block")
        if strays:
            raise ValueError(
                f"`{field_name}` selects `{strays[0]}`, which is not a transformer block that sequential adapters "
                f"support. Name whole blocks (e.g. {', '.join(f'`{b}`' for b in list(blocks)[:2])}), or pass None "
                "to adapt every block found."
            )
    if not selected:
        raise ValueError(
            f"`{field_name}`={target_modules!r} with `exclude_modules`={exclude_modules!r} leaves no block to adapt. "
            f"The model's blocks include {', '.join(f'`{b}`' for b in list(blocks)[:4])} ({len(blocks)} in all)."
        )
    sublayers = {}
    for name in selected:
        positions = blocks[name]
        block = model.get_submodule(name)
        width = block_width(_unwrapped_children(block), positions)
        for position in placement(adapters_per_block, positions):
            sublayers[f"{name}.{positions[position]}"] = width
    return selected, sublayers


def wrap_sublayer(
    tuner: BaseTuner,
    model: nn.Module,
    key: str,
    width: int,
    adapter_name: str,
    *,
    adapter_dim: int,
    adapter_act: str,
    init_weights: bool,
) -> None:
    """Put an adapter named ``adapter_name`` on the sublayer ``key`` (wrapping it, or adding to its wrapper)."""
    parent_name, _, child_name = key.rpartition(".")
    parent = model.get_submodule(parent_name)
    target = getattr(parent, child_name)
    settings = {"adapter_dim": adapter_dim, "adapter_act": adapter_act, "init_weights": init_weights}
    if isinstance(target, SeqAdapterLayer):
        target.update_layer(adapter_name, **settings)
        return
    if isinstance(target, BaseTunerLayer):
        raise ValueError(
            f"`{key}` already carries a {type(target).__name__} (LoRA) and is also a sequential-adapter position. "
            "Remove it from `extra_target_modules` or lower `adapters_per_block`: one module takes one of the two."
        )
    new_module = SeqAdapterLayer(target, adapter_name, width, **settings)
    if adapter_name not in tuner.active_adapters:
        new_module.requires_grad_(False)
    setattr(parent, child_name, new_module)


def refuse_unmergeable_adapters(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """``merge_and_unload`` would drop the sequential adapters it is asked to merge (default: the active ones), as
    they cannot fold into weights: refuse in words."""
    live = [
        name
        for name, module in model.named_modules()
        if isinstance(module, SeqAdapterLayer)
        and any(a in module.iseg_adapter_down for a in (adapter_names or module.active_adapters))
    ]
    if live:
        raise ValueError(
            f"Cannot merge exactly: {len(live)} sequential adapter(s) (e.g. `{live[0]}`) are non-linear "
            "(h + up(act(down(h)))) and fold into no weight. Keep the PeftModel for inference; `merge_adapter()` "
            "merges any LoRA in place while the adapters keep running, and `unload()` removes everything unmerged."
        )


class SeqAdapterModel(CheckedTunerMixin, WrapperReplaceMixin, BaseTuner):
    """Sequential bottleneck adapters (seed 001) as a peft tuner: ``get_peft_model(model, SeqAdapterConfig())``.

    Example:

        ```py
        >>> import peft_vision_ext
        >>> from peft import get_peft_model
        >>> from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
        >>> from peft_vision_ext import SeqAdapterConfig

        >>> base = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(num_labels=3))
        >>> model = get_peft_model(base, SeqAdapterConfig(adapters_per_block=2))  # + class_predictor in full
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = SeqAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}
    adapter_title = "Sequential adapter"

    def _prepare_model(self, peft_config: SeqAdapterConfig, model: nn.Module) -> None:
        resolve_modules_to_save(peft_config, model)
        selected, sublayers = plan_sequential_adapters(
            model,
            peft_config.target_modules,
            peft_config.exclude_modules,
            peft_config.adapters_per_block,
            config=peft_config,
        )
        if peft_config.target_modules is None:
            peft_config.auto_target_modules = True
        peft_config.target_modules = selected  # saved expanded, like peft's "all-linear"
        self._sublayers = sublayers

    def _check_target_module_exists(self, peft_config: SeqAdapterConfig, key: str) -> bool:
        return key in getattr(self, "_sublayers", {})

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        tie_module_copies(model, adapter_name)

    def _create_and_replace(
        self,
        peft_config: SeqAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        wrap_sublayer(
            self,
            self.model,
            current_key,
            self._sublayers[current_key],
            adapter_name,
            adapter_dim=peft_config.adapter_dim,
            adapter_act=peft_config.adapter_act,
            init_weights=peft_config.init_weights,
        )

    def _refuse_inexact_merge(self, adapter_names: list[str] | None = None) -> None:
        refuse_unmergeable_adapters(self.model, adapter_names)

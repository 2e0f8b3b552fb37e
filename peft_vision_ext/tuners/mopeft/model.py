# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .._common import CheckedTunerMixin, WrapperReplaceMixin, check_auto_targets, is_excluded
from .blocks import SUPPORTED_BLOCKS, block_family
from .config import MoPEFTConfig
from .layer import MoPEFTLayer


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Map the name of every transformer block MoPEFT can adapt to the block (a wrapped block counts once)."""
    found = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, MoPEFTLayer):
            found[name] = module.get_base_layer()
            inside.append(name + ".")
        elif isinstance(module, BaseTunerLayer):
            inside.append(name + ".")
        elif block_family(module) is not None:
            found[name] = module
    return found


def _unsupported_model_error(model: nn.Module, config: MoPEFTConfig) -> ValueError:
    what = (
        "prefix tuning needs an attention it can prepend keys and values to"
        if config.use_prefix
        else ("MoPEFT adapts the transformer blocks of ViT-style encoders")
    )
    return ValueError(
        f"{type(model).__name__} has no transformer block that MoPEFT supports ({what}). Supported: "
        + "; ".join(SUPPORTED_BLOCKS)
        + ". For convolutional models use ConvAdapterConfig; for Mask2Former-style models, the deformable-attention "
        "and sequential-adapter methods."
    )


class MoPEFTModel(CheckedTunerMixin, WrapperReplaceMixin, BaseTuner):
    """MoPEFT (seed 002) as a peft tuner. Create it with ``get_peft_model(model, MoPEFTConfig())``.

    Each targeted transformer block is wrapped by [`~peft_vision_ext.tuners.mopeft.layer.MoPEFTLayer`].
    ``merge_and_unload`` folds LoRA with an input-independent scaling into the q/k/v weights and refuses, with the
    reason, anything it cannot fold exactly (gated LoRA, prefixes, adapters); ``prune_mopeft`` removes the parts whose
    gates stay near zero and can freeze near-constant gates so that LoRA merges.

    Example:

        ```py
        >>> import peft_vision_ext
        >>> from peft import get_peft_model
        >>> from transformers import SamConfig
        >>> from peft_vision_ext import MoPEFTConfig
        >>> from peft_vision_ext.models import SamForSemanticSegmentation

        >>> base = SamForSemanticSegmentation(SamConfig(num_labels=3))
        >>> model = get_peft_model(base, MoPEFTConfig())  # mask decoder trained in full (modules_to_save)
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = "mopeft_"
    tuner_layer_cls = MoPEFTLayer
    target_module_mapping: dict[str, list[str]] = {}
    adapter_title = "MoPEFT adapter"

    def _prepare_model(self, peft_config: MoPEFTConfig, model: nn.Module) -> None:
        if peft_config.modules_to_save is None:
            defaults = getattr(model, "peft_modules_to_save", None)
            if defaults:
                peft_config.modules_to_save = list(defaults)
        blocks = find_blocks(model)
        if not blocks:
            raise _unsupported_model_error(model, peft_config)
        if peft_config.target_modules is None:
            selected = [name for name in blocks if not is_excluded(peft_config, name)]
            if not selected:
                raise ValueError(
                    f"`exclude_modules`={peft_config.exclude_modules!r} excludes every one of the model's "
                    f"{len(blocks)} transformer blocks; nothing is left to adapt."
                )
            # Expanded like peft's "all-linear": the saved config then names exactly the adapted blocks.
            peft_config.target_modules = selected
            peft_config.auto_target_modules = True
        else:
            check_auto_targets(
                peft_config, [name for name in blocks if not is_excluded(peft_config, name)], "transformer block"
            )
            selected = []
            for name, module in model.named_modules():
                if not name or not check_target_module_exists(peft_config, name):
                    continue
                if name in blocks:
                    selected.append(name)
                elif not any(name.startswith(block + ".") for block in blocks):
                    raise ValueError(
                        f"`target_modules` selects `{name}`, a {type(module).__name__}, which is not a transformer "
                        "block MoPEFT supports. Name whole blocks (e.g. "
                        f"{', '.join(f'`{b}`' for b in list(blocks)[:2])}), or leave `target_modules=None` to adapt "
                        "them all."
                    )
                else:
                    raise ValueError(
                        f"`target_modules` selects `{name}`, a part of a transformer block. MoPEFT adapts whole "
                        f"blocks (its gates read the whole block input): name the block instead."
                    )
            if not selected:
                sample = ", ".join(f"`{name}`" for name in list(blocks)[:4])
                raise ValueError(
                    f"`target_modules`={peft_config.target_modules!r} matches no transformer block of the model. Its "
                    f"blocks include {sample} ({len(blocks)} in all)."
                )
        # Order of the blocks in the model: VPT-shallow puts prefixes in the first one only.
        order = [name for name in blocks if name in set(selected)]
        self._prefix_blocks = set(order[:1]) if peft_config.prefix_depth == "shallow" else set(order)

    def _create_and_replace(
        self,
        peft_config: MoPEFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        kwargs = {
            "sub_methods": peft_config.sub_methods,
            "gating": peft_config.gating,
            "with_prefix": current_key in getattr(self, "_prefix_blocks", {current_key}),
            "r": peft_config.r,
            "lora_alpha": peft_config.lora_alpha,
            "lora_dropout": peft_config.lora_dropout,
            "lora_targets": peft_config.lora_targets,
            "prefix_length": peft_config.prefix_length,
            "prefix_projection_dim": peft_config.prefix_projection_dim,
            "adapter_dim": peft_config.adapter_dim,
            "adapter_act": peft_config.adapter_act,
            "gate_hidden_size": peft_config.gate_hidden_size,
            "prefix_gate_init": peft_config.prefix_gate_init,
            "init_weights": peft_config.init_weights,
            "pruned": (peft_config.pruned or {}).get(current_key),
            "frozen_gates": (peft_config.frozen_gates or {}).get(current_key),
        }
        if not any(m != "prefix" or kwargs["with_prefix"] for m in peft_config.sub_methods):
            return  # nothing of this adapter lives in this block (VPT-shallow past the first block): leave it alone
        if isinstance(target, MoPEFTLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        family = block_family(target)
        if family is None:
            raise ValueError(
                f"`{current_key}` ({type(target).__name__}) is not a transformer block MoPEFT supports. Supported: "
                + "; ".join(SUPPORTED_BLOCKS)
                + "."
            )
        new_module = MoPEFTLayer(target, adapter_name, family, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _refuse_inexact_merge(self, adapter_names: list[str] | None = None) -> None:
        """``merge_and_unload`` removes the wrappers, so every part to merge must be a weight update."""
        problems = []
        for name, module in self.model.named_modules():
            if isinstance(module, MoPEFTLayer):
                for adapter in adapter_names or module.active_adapters:
                    if adapter in module.mopeft_settings:
                        reasons = module.merge_blockers(adapter)
                        if reasons:
                            problems.append(f"`{name}` ({adapter}): " + "; ".join(reasons))
        if problems:
            raise ValueError(
                f"MoPEFT cannot merge exactly: {len(problems)} block(s) hold parts that are not a weight update, e.g. "
                + " | ".join(problems[:3])
                + ". Only LoRA with an input-independent scaling merges. Run `peft_vision_ext.prune_mopeft(model, "
                "calibration_batches, freeze_gates=True)` to drop parts whose gates stay near zero and fix "
                "near-constant gates, or keep the model unmerged. `unload()` removes all MoPEFT parts without merging."
            )

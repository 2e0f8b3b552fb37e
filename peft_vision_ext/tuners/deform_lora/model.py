# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .._common import CheckedTunerMixin, WrapperReplaceMixin, check_auto_targets, is_excluded
from ..seq_adapter.heads import resolve_modules_to_save, tie_module_copies
from ..seq_adapter.layer import SeqAdapterLayer
from ..seq_adapter.model import PREFIX, plan_sequential_adapters, refuse_unmergeable_adapters, wrap_sublayer
from .config import PROJECTIONS, DeformableLoRAConfig
from .layer import LoraLinear, LoraMultiheadAttention


SUPPORTED_ATTENTION = (
    "multi-scale deformable attention: a module with nn.Linear children `sampling_offsets`, `attention_weights` "
    "(sampling_offsets has twice its outputs), `value_proj` and `output_proj` (square), e.g. Mask2Former's pixel "
    "decoder, Deformable DETR, RT-DETR, Grounding DINO"
)


def is_deformable_attention(module: nn.Module) -> bool:
    """Whether ``module`` has the structure of multi-scale deformable attention (see ``SUPPORTED_ATTENTION``)."""
    parts = {}
    for name in PROJECTIONS:
        part = getattr(module, name, None)
        if isinstance(part, BaseTunerLayer):
            part = part.get_base_layer()
        if not isinstance(part, nn.Linear):
            return False
        parts[name] = part
    return (
        parts["sampling_offsets"].out_features == 2 * parts["attention_weights"].out_features
        and parts["sampling_offsets"].in_features == parts["attention_weights"].in_features
        and parts["value_proj"].in_features == parts["value_proj"].out_features
        and parts["output_proj"].in_features == parts["output_proj"].out_features
    )


def find_deformable_attention(model: nn.Module) -> list[str]:
    """Names of every multi-scale deformable attention module of ``model``, found by structure."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, SeqAdapterLayer):
            continue  # its base layer is listed under `<name>.base_layer`
        if name and is_deformable_attention(module):
            names.append(name)
    return names


def _linear_inside_mha(model: nn.Module, name: str) -> bool:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return isinstance(parent, (nn.MultiheadAttention, LoraMultiheadAttention))


class DeformableLoRAModel(CheckedTunerMixin, WrapperReplaceMixin, BaseTuner):
    """LoRA on multi-scale deformable attention (seed 001) as a peft tuner:
    ``get_peft_model(model, DeformableLoRAConfig())``. With ``adapters_per_block`` > 0 it also places sequential
    adapters, so one adapter holds both of the seed's methods.

    Example:

        ```py
        >>> import peft_vision_ext
        >>> from peft import get_peft_model
        >>> from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
        >>> from peft_vision_ext import DeformableLoRAConfig

        >>> base = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(num_labels=3))
        >>> config = DeformableLoRAConfig(r=8, projection_ranks={"sampling_offsets": 4}, extra_target_modules=["cross_attn"])
        >>> model = get_peft_model(base, config)
        >>> merged = model.merge_and_unload()  # exact: every update is a weight delta
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = (LoraLinear, LoraMultiheadAttention, SeqAdapterLayer)
    target_module_mapping: dict[str, list[str]] = {}
    adapter_title = "Deformable LoRA adapter"

    def _prepare_model(self, peft_config: DeformableLoRAConfig, model: nn.Module) -> None:
        resolve_modules_to_save(peft_config, model)
        attention = find_deformable_attention(model)
        if not attention:
            raise ValueError(
                f"{type(model).__name__} has no multi-scale deformable attention. Supported: {SUPPORTED_ATTENTION}. "
                "For models without it, use SeqAdapterConfig (sequential adapters) or peft's LoraConfig."
            )
        if peft_config.target_modules is None:
            selected = [name for name in attention if not is_excluded(peft_config, name)]
            peft_config.auto_target_modules = True
        else:
            check_auto_targets(
                peft_config, [n for n in attention if not is_excluded(peft_config, n)], "deformable attention module"
            )
            selected = [name for name in attention if check_target_module_exists(peft_config, name)]
            if not selected:
                raise ValueError(
                    f"`target_modules`={peft_config.target_modules!r} matches no deformable attention module. The "
                    f"model has {len(attention)}, e.g. {', '.join(f'`{n}`' for n in attention[:3])}."
                )
        if not selected:
            raise ValueError(
                f"`exclude_modules`={peft_config.exclude_modules!r} excludes all {len(attention)} deformable attention "
                "modules; nothing is left to adapt."
            )
        peft_config.target_modules = selected  # saved expanded, so loading adapts exactly these
        targets = {
            f"{name}.{projection}": peft_config.rank(projection)
            for name in selected
            for projection in PROJECTIONS
            if peft_config.rank(projection) > 0
        }
        if peft_config.extra_target_modules is not None:
            probe = copy.copy(peft_config)
            probe.target_modules, probe.exclude_modules = peft_config.extra_target_modules, None
            extra = [n for n, _ in model.named_modules() if n and check_target_module_exists(probe, n)]
            if not extra:
                raise ValueError(
                    f"`extra_target_modules`={peft_config.extra_target_modules!r} matches no module of the model."
                )
            for name in extra:
                module = model.get_submodule(name)
                if isinstance(module, BaseTunerLayer):
                    module = module.get_base_layer()
                if _linear_inside_mha(model, name):
                    raise ValueError(
                        f"`extra_target_modules` selects `{name}`, a projection inside an nn.MultiheadAttention. Its "
                        "forward reads that weight directly, so LoRA on it alone would be silently bypassed. Target "
                        f"the attention module `{name.rpartition('.')[0]}` instead (parts set by "
                        "`multihead_attention_targets`)."
                    )
                if not isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                    raise ValueError(
                        f"`extra_target_modules` selects `{name}`, a {type(module).__name__}; only nn.Linear and "
                        "nn.MultiheadAttention modules take LoRA here."
                    )
                if name in targets or any(name.startswith(t + ".") for t in selected):
                    continue  # already a deformable-attention projection
                targets[name] = peft_config.r
        self._lora_targets = targets
        self._sublayers = {}
        if peft_config.adapters_per_block:
            _, self._sublayers = plan_sequential_adapters(
                model,
                peft_config.adapter_target_modules,
                None,
                peft_config.adapters_per_block,
                field_name="adapter_target_modules",
            )
            clash = sorted(set(self._sublayers) & set(targets))
            if clash:
                raise ValueError(
                    f"`{clash[0]}` is both a LoRA target and a sequential-adapter position. Remove it from "
                    "`extra_target_modules` or change `adapters_per_block`: one module takes one of the two."
                )

    def _check_target_module_exists(self, peft_config: DeformableLoRAConfig, key: str) -> bool:
        return key in getattr(self, "_lora_targets", {})

    def _create_and_replace(
        self,
        peft_config: DeformableLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        r = self._lora_targets[current_key]
        kwargs = {
            "r": r,
            "lora_alpha": peft_config.lora_alpha,
            "lora_dropout": peft_config.lora_dropout,
            "init_weights": peft_config.init_weights,
        }
        if isinstance(target, (nn.MultiheadAttention, LoraMultiheadAttention)):
            kwargs["targets"] = peft_config.multihead_attention_targets
        if isinstance(target, (LoraLinear, LoraMultiheadAttention)):
            target.update_layer(adapter_name, **kwargs)
            return
        layer_cls = LoraMultiheadAttention if isinstance(target, nn.MultiheadAttention) else LoraLinear
        new_module = layer_cls(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # LoRA first, on the model as it was before any sequential adapter: a `SeqAdapterLayer` wrapping a deformable
        # attention (Mask2Former's encoder `self_attn`) would rename its projections (`self_attn.base_layer.*`) and
        # hide them from peft, which skips everything inside a tuner layer. So a second adapter (or `load_adapter`)
        # would find no target. Lift existing wrappers off while peft injects, then put them back.
        # Adding an adapter must not change the trainability of what was there (peft's own rule, which peft applies
        # before the sequential adapters below exist, so it is applied again at the end).
        existing = (
            [(p, p.requires_grad) for p in model.parameters()]
            if any(isinstance(m, BaseTunerLayer) for m in model.modules())
            else []
        )
        lifted = []
        for name, module in list(model.named_modules()):
            if isinstance(module, SeqAdapterLayer):
                parent_name, _, child_name = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child_name, module.get_base_layer())
                lifted.append((parent, child_name, module))
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            for parent, child_name, module in lifted:
                setattr(parent, child_name, module)  # its base layer is the same object, now holding the new LoRA
        tie_module_copies(model, adapter_name)
        config = self.peft_config[adapter_name]
        for key, width in self._sublayers.items():
            wrap_sublayer(
                self,
                model,
                key,
                width,
                adapter_name,
                adapter_dim=config.adapter_dim,
                adapter_act=config.adapter_act,
                init_weights=config.init_weights,
            )
        # The new sequential adapters train only if their adapter is active and not loaded for inference.
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        for module in model.modules():
            if isinstance(module, SeqAdapterLayer):
                for attr in module.adapter_layer_names:
                    if adapter_name in getattr(module, attr):
                        getattr(module, attr)[adapter_name].requires_grad_(trainable)
        for parameter, requires_grad in existing:
            parameter.requires_grad = requires_grad

    def _refuse_inexact_merge(self, adapter_names: list[str] | None = None) -> None:
        refuse_unmergeable_adapters(self.model, adapter_names)

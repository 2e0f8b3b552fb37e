# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from ..._registry import register_method
from ..seq_adapter.model import PREFIX
from .config import DEFORM_LORA, MHA_TARGETS, PROJECTIONS, DeformableLoRAConfig
from .layer import LoraLinear, LoraMultiheadAttention
from .model import DeformableLoRAModel, find_deformable_attention, is_deformable_attention


__all__ = [
    "DEFORM_LORA",
    "MHA_TARGETS",
    "PROJECTIONS",
    "DeformableLoRAConfig",
    "DeformableLoRAModel",
    "LoraLinear",
    "LoraMultiheadAttention",
    "find_deformable_attention",
    "is_deformable_attention",
]

register_method(name="deform_lora", config_cls=DeformableLoRAConfig, model_cls=DeformableLoRAModel, prefix=PREFIX)

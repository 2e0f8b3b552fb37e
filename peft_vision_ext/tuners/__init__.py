# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from .conv_adapter import ConvAdapterConfig, ConvAdapterModel
from .deform_lora import DeformableLoRAConfig, DeformableLoRAModel
from .mopeft import MoPEFTConfig, MoPEFTModel
from .seq_adapter import SeqAdapterConfig, SeqAdapterModel


__all__ = [
    "ConvAdapterConfig",
    "ConvAdapterModel",
    "DeformableLoRAConfig",
    "DeformableLoRAModel",
    "MoPEFTConfig",
    "MoPEFTModel",
    "SeqAdapterConfig",
    "SeqAdapterModel",
]

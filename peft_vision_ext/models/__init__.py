# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from transformers import AutoConfig, AutoModelForSemanticSegmentation, SamConfig

from .mask2former import MASK2FORMER_PARTS, mask2former_parts, small_mask2former_config
from .processing import image_processor_for, save_image_processor
from .sam import SamForSemanticSegmentation, small_sam_config
from .unet import LegacyUNetConfig, UNetConfig, UNetForSemanticSegmentation


__all__ = [
    "MASK2FORMER_PARTS",
    "SamForSemanticSegmentation",
    "UNetConfig",
    "UNetForSemanticSegmentation",
    "image_processor_for",
    "mask2former_parts",
    "save_image_processor",
    "small_mask2former_config",
    "small_sam_config",
]

# Lets `AutoModelForSemanticSegmentation.from_pretrained(<saved U-Net>)` (and the `peft-vision` CLI) find the class.
AutoConfig.register(UNetConfig.model_type, UNetConfig, exist_ok=True)
# U-Nets saved before `model_type` carried the import hint; `LegacyUNetConfig` reads them as `UNetConfig`s.
AutoConfig.register(LegacyUNetConfig.model_type, LegacyUNetConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(UNetConfig, UNetForSemanticSegmentation, exist_ok=True)
# SAM has no semantic-segmentation head in transformers; ours answers for SamConfig in this Auto class.
AutoModelForSemanticSegmentation.register(SamConfig, SamForSemanticSegmentation, exist_ok=True)

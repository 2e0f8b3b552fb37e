# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from .conv_adapter import ConvAdapterConfig, ConvAdapterModel
from .mopeft import MoPEFTConfig, MoPEFTModel


__all__ = ["ConvAdapterConfig", "ConvAdapterModel", "MoPEFTConfig", "MoPEFTModel"]

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from .conv_adapter import ConvAdapterConfig, ConvAdapterModel


__all__ = ["ConvAdapterConfig", "ConvAdapterModel"]

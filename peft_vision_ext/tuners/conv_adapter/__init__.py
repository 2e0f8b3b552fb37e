# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from ..._registry import register_method
from .config import CONV_ADAPTER, ConvAdapterConfig
from .frozen_bn import (
    FrozenBatchNormFunction,
    freeze_frozen_batchnorm,
    protect_frozen_batchnorm,
    unprotect_frozen_batchnorm,
)
from .layer import Conv2d, ConvAdapterLayer, fusion_blockers
from .model import ConvAdapterModel, find_convs


__all__ = [
    "CONV_ADAPTER",
    "Conv2d",
    "ConvAdapterConfig",
    "ConvAdapterLayer",
    "ConvAdapterModel",
    "FrozenBatchNormFunction",
    "find_convs",
    "freeze_frozen_batchnorm",
    "fusion_blockers",
    "protect_frozen_batchnorm",
    "unprotect_frozen_batchnorm",
]

register_method(name="conv_adapter", config_cls=ConvAdapterConfig, model_cls=ConvAdapterModel, prefix="convadapter_")

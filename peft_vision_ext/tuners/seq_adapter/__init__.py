# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from ..._registry import register_method
from .blocks import PLACEMENT, POSITIONS, SUPPORTED_BLOCKS, block_positions
from .config import SEQ_ADAPTER, SeqAdapterConfig
from .layer import SeqAdapterLayer
from .model import PREFIX, SeqAdapterModel, find_blocks, plan_sequential_adapters


__all__ = [
    "PLACEMENT",
    "POSITIONS",
    "PREFIX",
    "SEQ_ADAPTER",
    "SUPPORTED_BLOCKS",
    "SeqAdapterConfig",
    "SeqAdapterLayer",
    "SeqAdapterModel",
    "block_positions",
    "find_blocks",
    "plan_sequential_adapters",
]

register_method(name="seq_adapter", config_cls=SeqAdapterConfig, model_cls=SeqAdapterModel, prefix=PREFIX)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from ..._registry import register_method
from .blocks import SUPPORTED_BLOCKS, SamBlock, ViTBlock, block_family
from .config import MOPEFT, MOPEFT_PRESETS, SUB_METHODS, MoPEFTConfig
from .layer import MoPEFTLayer
from .model import MoPEFTModel, find_blocks
from .prune import PruneReport, merge_mergeable, prune_mopeft


__all__ = [
    "MOPEFT",
    "MOPEFT_PRESETS",
    "SUB_METHODS",
    "SUPPORTED_BLOCKS",
    "MoPEFTConfig",
    "MoPEFTLayer",
    "MoPEFTModel",
    "PruneReport",
    "SamBlock",
    "ViTBlock",
    "block_family",
    "find_blocks",
    "merge_mergeable",
    "prune_mopeft",
]

register_method(name="mopeft", config_cls=MoPEFTConfig, model_cls=MoPEFTModel, prefix="mopeft_")

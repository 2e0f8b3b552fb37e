# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""peft-vision-ext: parameter-efficient fine-tuning methods for vision segmentation models, as peft plug-ins.

Importing this package registers every method with stock peft, so that ``get_peft_model``, ``PeftModel.from_pretrained``
and the rest of peft's workflow accept our configs.
"""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the models with the transformers Auto classes)
from .tuners import (  # noqa: E402  (registers)
    ConvAdapterConfig,
    ConvAdapterModel,
    DeformableLoRAConfig,
    DeformableLoRAModel,
    MoPEFTConfig,
    MoPEFTModel,
    SeqAdapterConfig,
    SeqAdapterModel,
)
from .tuners.mopeft import merge_mergeable, prune_mopeft  # noqa: E402


__all__ = [
    "ConvAdapterConfig",
    "ConvAdapterModel",
    "DeformableLoRAConfig",
    "DeformableLoRAModel",
    "MoPEFTConfig",
    "MoPEFTModel",
    "SeqAdapterConfig",
    "SeqAdapterModel",
    "__version__",
    "merge_mergeable",
    "prune_mopeft",
]

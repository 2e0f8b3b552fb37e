# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""peft-vision-ext: parameter-efficient fine-tuning methods for vision segmentation models, as peft plug-ins.

Importing this package registers every method with stock peft, so that ``get_peft_model``, ``PeftModel.from_pretrained``
and the rest of peft's workflow accept our configs.
"""

import warnings


__version__ = "0.1.0"

# peft's `PeftModel.__init__` (peft/peft_model.py, in every `get_peft_model` and `PeftModel.from_pretrained`) reads
# transformers' deprecated `PreTrainedModel.is_gradient_checkpointing`, whose FutureWarning (transformers >= 5.23)
# tells the *caller* to read `is_activation_checkpointing` instead: nothing a user of peft can act on, and harmless
# (the alias returns the new property). Exactly that message and category are ignored; remove this once peft reads
# `is_activation_checkpointing`. (pyproject.toml's pytest `filterwarnings` has the same line for the tests.)
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated and will be removed", category=FutureWarning
)

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

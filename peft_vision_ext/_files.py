# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Reading, checking and safely writing directories on disk.

This module sits at the bottom of the package (beside ``_registry``): tuners, analysis, the runner and the CLI all use
it, and it imports none of them."""

from __future__ import annotations

import json
import os

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open


def check_adapter_dir(path: str | os.PathLike) -> str:
    """Check that ``path`` is a readable adapter directory; return the path of its weights file.

    Raises:
        FileNotFoundError: the directory, its ``adapter_config.json`` or its weights file is missing.
        ValueError: the config is not valid JSON, or the safetensors file is damaged.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Adapter directory {path!r} does not exist. Pass the folder that `save_pretrained` wrote."
        )
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{path!r} has no {CONFIG_NAME}; it holds {sorted(os.listdir(path))}. Pass the folder that "
            "`save_pretrained` wrote."
        )
    try:
        with open(config_path) as handle:
            json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path!r} is not valid JSON ({exc}). The adapter directory is damaged.") from exc
    weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            return os.path.join(path, WEIGHTS_NAME)
        raise FileNotFoundError(
            f"Adapter directory {path!r} has a config but no weights file {SAFETENSORS_WEIGHTS_NAME!r}; it holds "
            f"{sorted(os.listdir(path))}. Copy the whole directory that `save_pretrained` wrote."
        )
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"The adapter weights file {weights!r} is damaged and cannot be read ({exc}). Re-export or re-download "
            "the adapter."
        ) from exc
    return weights

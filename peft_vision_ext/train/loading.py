# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Load what ``peft-vision train`` wrote, for inference or further work."""

from __future__ import annotations

import json
import os

from torch import nn


def load_trained(output_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> nn.Module:
    """The trained model of a ``peft-vision train`` run, in eval mode.

    For a PEFT method: the checkpoint the run started from, loaded with the run's label set (from ``results.json``),
    with the adapter of ``output_dir`` on it (``PeftModel.from_pretrained``). For ``decoder`` / ``full``: the saved
    model (``from_pretrained(output_dir)``).

    Args:
        output_dir: the run's ``--output_dir``.
        base_model_name_or_path: where the checkpoint is now, if not where ``results.json`` says (e.g. the run used a
            relative path from another directory).

    Raises:
        FileNotFoundError: ``output_dir`` has no ``results.json`` (not a finished run).
    """
    from peft import PeftModel

    from .arguments import ModelArguments
    from .models import inspect_model, load_model

    output_dir = os.fspath(output_dir)
    path = os.path.join(output_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{output_dir!r} has no results.json; pass the --output_dir of a finished `peft-vision train` run."
        )
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    model_args = ModelArguments(model_name_or_path=base_model_name_or_path or results["model_name_or_path"])
    info = inspect_model(model_args, results["task"])
    id2label = {int(k): v for k, v in results["id2label"].items()}
    if not os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        return info.model_class.from_pretrained(output_dir).eval()
    base = load_model(info, model_args, id2label, results["ignore_index"])
    return PeftModel.from_pretrained(base, output_dir).eval()

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Config behaviour shared by every method of this package (module-name normalisation, checked loading, cards)."""

from __future__ import annotations

import os

from ..hub import update_model_card


def normalize_module_names(config, *names: str) -> None:
    """Normalise peft-style module selectors in place: a list becomes a sorted list of unique names, a string stays a
    regex, anything else is refused with the field name."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, (set, tuple)):
            value = list(value)
        if isinstance(value, list):
            if not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"`{name}` must be a list of non-empty module names, got {value!r}.")
            value = sorted(set(value))
        elif value is not None and not isinstance(value, str):
            raise TypeError(
                f"`{name}` must be None, a list of module names or a regex string, got {type(value).__name__}: "
                f"{value!r}."
            )
        setattr(config, name, value)
    if isinstance(getattr(config, "modules_to_save", None), str):
        config.modules_to_save = [config.modules_to_save]


class CheckedLoadingMixin:
    """``from_pretrained`` checks a local adapter directory before peft builds anything (peft would otherwise reach a
    missing weights file only after building the model, and report it as a failed Hub download); ``save_pretrained``
    writes a model card that names the method. Subclasses set ``method_name`` (a key of ``hub.METHOD_TITLES``)."""

    method_name: str = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        from ..analysis.io import check_adapter_dir

        path = pretrained_model_name_or_path
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            check_adapter_dir(path)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        update_model_card(save_directory, method=self.method_name, config=self)

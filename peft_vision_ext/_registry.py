# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The one module that knows peft is not designed for out-of-tree methods.

peft (>= 0.21) keeps its methods in a closed ``str`` enum (``PeftType``) and four mapping tables. Its public
``register_peft_method`` fills the tables, but refuses any name that is not already a member of the enum. This module
therefore:

1. adds our members to ``PeftType`` (idempotently: importing twice, or reloading a module, is harmless), and
2. calls ``register_peft_method`` (or, on re-registration after a reload, points the tables at the new classes).

Every assumption about peft's internals is checked by :func:`check_peft_internals`, which runs at import time and in
the test suite, so that a peft upgrade that changes them fails loudly here instead of corrupting adapters later.

Why the odd-looking enum values: ``PeftModel.from_pretrained`` looks up the ``peft_type`` string of
``adapter_config.json`` in ``PEFT_TYPE_TO_CONFIG_MAPPING`` and, when nothing registered it, fails with a bare
``KeyError(<that string>)``. That string is the only text of ours that reaches a user who forgot ``import
peft_vision_ext``, so it carries the instruction: ``KeyError: 'CONV_ADAPTER (IMPORT PEFT_VISION_EXT)'``. peft requires
the value to equal the upper-cased registration name, hence the capitals.
"""

from __future__ import annotations

import enum
import inspect

import peft
from peft import PeftConfig
from peft.utils import PeftType, register_peft_method


# The suffix every value carries; see the module docstring for why it exists.
IMPORT_HINT = " (IMPORT PEFT_VISION_EXT)"


def peft_type_value(method: str) -> str:
    """The ``PeftType`` value (also the ``peft_type`` string written to ``adapter_config.json``) of a method."""
    return f"{method.upper()}{IMPORT_HINT}"


def peft_type_for(method: str) -> PeftType:
    """The ``PeftType`` member of one of our methods (e.g. ``"conv_adapter"``), added to the enum on first use.

    Config classes call this at import time: their ``__post_init__`` sets ``peft_type`` before registration runs.
    """
    check_peft_internals()
    return _add_peft_type_member(peft_type_value(method))


class PeftInternalsChanged(RuntimeError):
    """Raised when the installed peft no longer has the internals that registration relies on."""


def check_peft_internals() -> None:
    """Verify every peft internal that :func:`register_method` relies on, with a message that says what changed."""
    from peft import mapping

    problems = []
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)):
        problems.append("`peft.utils.PeftType` is no longer a `str` Enum")
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(PeftType, attr):
            problems.append(f"`PeftType` has no `{attr}` (the enum implementation changed)")
    for table in (
        "PEFT_TYPE_TO_CONFIG_MAPPING",
        "PEFT_TYPE_TO_TUNER_MAPPING",
        "PEFT_TYPE_TO_PREFIX_MAPPING",
        "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    ):
        if not isinstance(getattr(mapping, table, None), dict):
            problems.append(f"`peft.mapping.{table}` is missing or no longer a dict")
    params = set(inspect.signature(register_peft_method).parameters)
    if not {"name", "config_cls", "model_cls", "prefix"} <= params:
        problems.append(f"`register_peft_method` signature changed: parameters are {sorted(params)}")
    if problems:
        raise PeftInternalsChanged(
            f"peft_vision_ext cannot register its methods with peft {peft.__version__}: "
            + "; ".join(problems)
            + ". Pin `peft` to a version this release supports (see pyproject.toml) or update `_registry.py`."
        )


def _add_peft_type_member(value: str) -> PeftType:
    """Add ``value`` to the closed ``PeftType`` enum, or return the member that is already there."""
    existing = PeftType._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    # `EnumType.__setattr__` refuses to rebind members, but a new name is plain class state.
    type.__setattr__(PeftType, value, member)
    return member


def register_method(*, name: str, config_cls: type[PeftConfig], model_cls: type, prefix: str) -> PeftType:
    """Register one of our methods with peft; safe to call again (for example after ``importlib.reload``).

    Args:
        name: lower-case method name, e.g. ``"conv_adapter"``.
        config_cls: the method's ``PeftConfig`` subclass.
        model_cls: the method's ``BaseTuner`` subclass; its ``prefix`` must equal ``prefix``.
        prefix: the unique prefix of the method's adapter attributes, e.g. ``"convadapter_"``.

    Returns:
        The (possibly new) ``PeftType`` member.
    """
    from peft import mapping

    registration_name = (name + IMPORT_HINT).lower()
    peft_type = peft_type_for(name)
    assert peft_type.value == registration_name.upper()

    registered = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=registration_name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    elif registered is not config_cls:
        # Re-registration after a module reload: the classes are new objects with the same meaning.
        if registered.__qualname__ != config_cls.__qualname__:
            raise KeyError(f"PEFT type {peft_type.value!r} is already registered to {registered!r}.")
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    return peft_type


check_peft_internals()

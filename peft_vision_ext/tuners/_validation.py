# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Checks of config fields, written once for the four configs of this package.

Every config's ``__post_init__`` calls these, so a value is checked whether it comes from Python code or from an
``adapter_config.json`` (peft builds configs from JSON with ``cls(**kwargs)``). Each checker raises a
:class:`ConfigTypeError` for a value of the wrong type and a ``ValueError`` for a value of the right type that is out
of range; every message names the field in backticks, shows the value received (``repr``) and says how to fix it.

The ``check_*_value(label, value, ...)`` functions check one value under a label (a field name, or an entry such as
``projection_ranks['value_proj']``); the ``check_*(config, name, ...)`` functions check the field ``name`` of
``config`` and store the normalised value back where there is one.

:func:`check_modules_to_save` checks ``modules_to_save`` against a model (it needs the model, so the tuners call it
during injection).
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn


# The largest size (rank, bottleneck, prefix length, hidden width) a config accepts.
MAX_SIZE = 65536
SIZE_BOUND_REASON = (
    f"sizes are capped at {MAX_SIZE} because no vision model this package adapts is wider, and a larger value is "
    "almost always a typo or a unit mistake that would try to allocate an absurd amount of memory (r=10**12 asked "
    "for 128 TB). Use a size below the width of the layers it adapts (ranks of 4-64 are typical)"
)


class ConfigTypeError(TypeError, ValueError):
    """A config field holds a value of the wrong type.

    It is a ``TypeError``, and also a ``ValueError``: before these checks, several wrong types (``adapter_dim=1.5``,
    ``adapters_per_block=True``, ``projection_ranks=[...]``) raised ``ValueError``, and code that catches that keeps
    working.
    """


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 80, 40, 80


def _show(value: Any) -> str:
    """``repr(value)``, shortened when long (a 400-digit int, a long list)."""
    return _REPR.repr(value)


def _got(value: Any) -> str:
    return f"got {_show(value)} ({type(value).__name__})"


def _number_hint(value: Any, expected: str) -> str:
    """How to fix a value that should have been a number (``expected``: what to pass, e.g. "an int")."""
    if isinstance(value, bool):
        return f"A bool is not accepted as a number; pass {expected}."
    if isinstance(value, str):
        return f"Pass {expected}, not a string (in adapter_config.json: without quotes)."
    if isinstance(value, float) and value.is_integer():
        return f"Write it as a whole number, without a decimal point: {int(value)}."
    if hasattr(value, "item"):
        return f"Convert it to a Python number first (e.g. `.item()`); {expected} is expected."
    return f"Pass {expected}."


# ---------------------------------------------------------------------------------------------------------------------
# One value under a label
# ---------------------------------------------------------------------------------------------------------------------
def check_bool_value(label: str, value: Any) -> bool:
    """``value`` must be a real ``bool`` (not ``"False"``, ``0``/``1`` or ``[False]``, which Python treats as truthy
    or falsy without complaint)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        hint = (
            f"The string {_show(value)} would switch the feature on, whatever it says. Pass True or False (in "
            "adapter_config.json: true or false, without quotes)."
        )
    else:
        hint = "Pass True or False."
    raise ConfigTypeError(f"`{label}` must be True or False, {_got(value)}. {hint}")


def check_int_value(
    label: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    describe: str | None = None,
    meaning: str = "",
    bound_reason: str = SIZE_BOUND_REASON,
) -> int:
    """``value`` must be a real ``int`` (not a bool, a float or a string) in ``[minimum, maximum]``.

    ``describe`` replaces the default description ("a positive int", "an int >= 0"); ``meaning`` is appended to the
    too-small message (e.g. what 0 means); ``bound_reason`` says why ``maximum`` exists.
    """
    if describe is None:
        if minimum == 1:
            describe = "a positive int"
        elif minimum is not None:
            describe = f"an int >= {minimum}"
        else:
            describe = "an int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"`{label}` must be {describe}, {_got(value)}. {_number_hint(value, 'an int')}")
    if minimum is not None and value < minimum:
        suffix = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{label}` must be {describe}{suffix}, got {_show(value)}. Pass an int >= {minimum}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{label}` must be at most {maximum}, got {_show(value)}: {bound_reason}.")
    return value


def check_size_value(
    label: str, value: Any, *, minimum: int = 1, describe: str | None = None, meaning: str = ""
) -> int:
    """``value`` is a size (rank, width, length): an ``int`` in ``[minimum, MAX_SIZE]``."""
    return check_int_value(label, value, minimum=minimum, maximum=MAX_SIZE, describe=describe, meaning=meaning)


def _interval(minimum: float | None, maximum: float | None, min_inclusive: bool, max_inclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'[' if min_inclusive else '('}{minimum:g}, {maximum:g}{']' if max_inclusive else ')'}"
    if minimum is not None:
        return f"{'>=' if min_inclusive else '>'} {minimum:g}"
    if maximum is not None:
        return f"{'<=' if max_inclusive else '<'} {maximum:g}"
    return ""


def check_float_value(
    label: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    meaning: str = "",
) -> float:
    """``value`` must be a finite real number (an ``int`` or a ``float``; a bool is refused) in the interval given by
    ``minimum`` / ``maximum``, each end closed unless ``min_inclusive`` / ``max_inclusive`` is False."""
    interval = _interval(minimum, maximum, min_inclusive, max_inclusive)
    finite = f"a finite number {interval}" if interval else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"`{label}` must be {finite}, {_got(value)}. {_number_hint(value, 'an int or a float')}")
    try:
        is_finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        is_finite = False
    if not is_finite:
        raise ValueError(
            f"`{label}` must be {finite}, got {_show(value)}: a NaN or infinite setting makes the adapter's outputs "
            "and the loss NaN or infinite from the first step. Pass a finite value (in adapter_config.json, NaN and "
            "Infinity are not valid settings)."
        )
    too_small = minimum is not None and (value < minimum if min_inclusive else value <= minimum)
    too_large = maximum is not None and (value > maximum if max_inclusive else value >= maximum)
    if too_small or too_large:
        suffix = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{label}` must be {interval}{suffix}, got {_show(value)}.")
    return value


def _same_kind(value: Any, choice: Any) -> bool:
    if isinstance(value, bool) != isinstance(choice, bool):
        return False
    return isinstance(value, type(choice)) or isinstance(choice, type(value))


def check_choice_value(label: str, value: Any, choices: Sequence, *, shown: str | None = None, hint: str = "") -> Any:
    """``value`` must be one of ``choices``, and of the same type (``True`` is not the choice ``1``).

    ``shown`` replaces ``repr(choices)`` in the message; ``hint`` says what the choices mean.
    """
    if any(_same_kind(value, choice) and value == choice for choice in choices):
        return value
    shown = repr(choices) if shown is None else shown
    suffix = f": {hint}" if hint else "."
    if not any(_same_kind(value, choice) for choice in choices):
        raise ConfigTypeError(f"`{label}` must be one of {shown}, {_got(value)}{suffix}")
    raise ValueError(f"`{label}` must be one of {shown}, got {_show(value)}{suffix}")


def check_choice_list_value(
    label: str, value: Any, choices: Sequence[str], *, what: str, allow_str: bool = False, non_empty: bool = True
) -> list[str]:
    """``value`` must be a list (a tuple or set is accepted) of strings drawn from ``choices`` (``what`` names them
    in the message, e.g. "projections"), non-empty unless ``non_empty`` is False. With ``allow_str`` a single string
    stands for a one-element list. Returns the entries deduplicated, in the order of ``choices``."""
    kind = "a non-empty list" if non_empty else "a list"
    expected = f"`{label}` must be {kind} drawn from {list(choices)}"
    items = [value] if allow_str and isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set)):
        raise ConfigTypeError(f"{expected}, {_got(value)}. Pass a list such as {[choices[0]]!r}.")
    wrong_type = [item for item in items if not isinstance(item, str)]
    if wrong_type:
        raise ConfigTypeError(
            f"{expected}, got {_show(value)}: {_show(wrong_type)} are not strings. Pass the names as strings."
        )
    unknown = [item for item in items if item not in choices]
    if unknown:
        raise ValueError(f"{expected}, got {_show(value)}: unknown {what} {unknown}. Use names from {list(choices)}.")
    if non_empty and not items:
        raise ValueError(f"{expected}, got {_show(value)}. Name at least one of {list(choices)}.")
    return [choice for choice in choices if choice in items]


def check_str_dict_value(
    label: str,
    value: Any,
    check_entry: Callable[[str, Any], Any],
    *,
    keys: Sequence[str] | None = None,
    what: str = "keys",
    expected: str = "a dict",
) -> dict[str, Any]:
    """``value`` must be a dict with non-empty string keys (from ``keys`` if given; ``what`` names them in the
    message). ``check_entry(entry_label, entry)`` checks each value under the label ``label[key]`` and returns it
    (normalised). ``expected`` describes the dict in the type-error message. Returns a new dict."""
    if not isinstance(value, dict):
        raise ConfigTypeError(f"`{label}` must be {expected}, {_got(value)}. Pass a dict (or {{}} for none).")
    bad_keys = [key for key in value if not isinstance(key, str) or not key]
    if bad_keys:
        raise ConfigTypeError(
            f"`{label}` must be {expected} with non-empty string keys, got {_show(value)}: the keys {_show(bad_keys)} "
            "are not. Use the names as strings."
        )
    if keys is not None:
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ValueError(f"`{label}` names unknown {what} {unknown}; the allowed {what} are {list(keys)}.")
    return {key: check_entry(f"{label}[{key!r}]", entry) for key, entry in value.items()}


def check_optional_instance_value(label: str, value: Any, types: type | tuple[type, ...], expected: str) -> Any:
    """``value`` must be ``None`` or an instance of ``types`` (described as ``expected``, e.g. "a string")."""
    if value is None or isinstance(value, types):
        return value
    raise ConfigTypeError(f"`{label}` must be None or {expected}, {_got(value)}. Pass {expected} or leave it unset.")


def check_module_names_value(label: str, value: Any) -> list[str] | None:
    """``value`` must be ``None`` or a list (or tuple) of non-empty module names. An empty name is refused: peft
    matches ``modules_to_save`` by suffix, and every module name ends with ``""``."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(
            f"`{label}` must be None or a list of module names, {_got(value)}. Pass a list such as ['classifier']."
        )
    wrong_type = [item for item in value if not isinstance(item, str)]
    if wrong_type:
        raise ConfigTypeError(
            f"`{label}` must be None or a list of module names, got {_show(value)}: {_show(wrong_type)} are not "
            "strings. Pass the names as strings."
        )
    if "" in value:
        raise ValueError(
            f"`{label}` holds an empty module name, got {_show(value)}: it would match every module of the model. "
            "Remove it."
        )
    return list(value)


# ---------------------------------------------------------------------------------------------------------------------
# A field of a config
# ---------------------------------------------------------------------------------------------------------------------
def check_bool(config: Any, name: str) -> None:
    """The field ``name`` must be a real ``bool``."""
    check_bool_value(name, getattr(config, name))


def check_bools(config: Any, *names: str) -> None:
    """Each of the fields ``names`` must be a real ``bool``."""
    for name in names:
        check_bool(config, name)


def check_int(
    config: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    describe: str | None = None,
    meaning: str = "",
) -> None:
    """The field ``name`` must be a real ``int`` in ``[minimum, maximum]`` (see :func:`check_int_value`)."""
    check_int_value(name, getattr(config, name), minimum=minimum, maximum=maximum, describe=describe, meaning=meaning)


def check_size(config: Any, name: str, *, minimum: int = 1, describe: str | None = None, meaning: str = "") -> None:
    """The field ``name`` is a size (rank, width, length): an ``int`` in ``[minimum, MAX_SIZE]``."""
    check_size_value(name, getattr(config, name), minimum=minimum, describe=describe, meaning=meaning)


def check_float(
    config: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    meaning: str = "",
) -> None:
    """The field ``name`` must be a finite number in the given interval (see :func:`check_float_value`)."""
    check_float_value(
        name,
        getattr(config, name),
        minimum=minimum,
        maximum=maximum,
        min_inclusive=min_inclusive,
        max_inclusive=max_inclusive,
        meaning=meaning,
    )


def check_choice(config: Any, name: str, choices: Sequence, *, shown: str | None = None, hint: str = "") -> None:
    """The field ``name`` must be one of ``choices`` (see :func:`check_choice_value`)."""
    check_choice_value(name, getattr(config, name), choices, shown=shown, hint=hint)


def check_choice_list(
    config: Any, name: str, choices: Sequence[str], *, what: str, allow_str: bool = False, non_empty: bool = True
) -> None:
    """The field ``name`` must be a list drawn from ``choices``; it is stored deduplicated in the order of
    ``choices`` (see :func:`check_choice_list_value`)."""
    value = check_choice_list_value(
        name, getattr(config, name), choices, what=what, allow_str=allow_str, non_empty=non_empty
    )
    setattr(config, name, value)


def check_str_dict(
    config: Any,
    name: str,
    check_entry: Callable[[str, Any], Any],
    *,
    keys: Sequence[str] | None = None,
    what: str = "keys",
    expected: str = "a dict",
) -> None:
    """The field ``name`` must be a dict with string keys whose values pass ``check_entry`` (see
    :func:`check_str_dict_value`); the checked copy is stored back."""
    value = check_str_dict_value(name, getattr(config, name), check_entry, keys=keys, what=what, expected=expected)
    setattr(config, name, value)


def check_regexes(config: Any, *names: str) -> None:
    """Each of the module-selector fields ``names`` that holds a string is a regular expression (peft full-matches
    module names against it), so it must compile; peft would otherwise fail with a bare ``re.error`` during injection."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, str):
            continue
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(
                f"`{name}` is a string, so it is read as a regular expression, but {_show(value)} is not a valid one "
                f"({exc}). Fix the pattern, or pass a list of module names."
            ) from exc


def check_modules_to_save_names(config: Any) -> None:
    """``modules_to_save`` must be ``None`` or a list of non-empty module names (a tuple is stored as a list)."""
    config.modules_to_save = check_module_names_value("modules_to_save", config.modules_to_save)


def check_peft_fields(config: Any, peft_type: str) -> None:
    """Check the fields every ``PeftConfig`` has: ``peft_type`` (None or ``peft_type``, the config's own),
    ``task_type``, ``inference_mode``, ``base_model_name_or_path``, ``revision``, ``auto_mapping`` and
    ``peft_version``. Call it before ``PeftConfig.__post_init__`` (which fills ``peft_version``)."""
    from peft.utils import TaskType

    value = config.peft_type
    check_optional_instance_value("peft_type", value, str, "a string")
    own = getattr(peft_type, "value", peft_type)
    if value is not None and value != own:
        raise ValueError(
            f"`peft_type` of a {type(config).__name__} must be {own!r}, got {_show(value)}: this adapter config "
            "belongs to another PEFT method. Load it with `PeftConfig.from_pretrained`, which picks the right class, "
            "or leave `peft_type` unset."
        )
    if config.task_type is not None:
        check_choice_value(
            "task_type",
            config.task_type,
            [task.value for task in TaskType],
            hint="peft's text task types; vision models of this package need none, so leave it None.",
        )
    check_bool(config, "inference_mode")
    for name in ("base_model_name_or_path", "revision", "peft_version"):
        check_optional_instance_value(name, getattr(config, name), str, "a string")
    check_optional_instance_value("auto_mapping", config.auto_mapping, dict, "a dict")


# ---------------------------------------------------------------------------------------------------------------------
# modules_to_save against a model
# ---------------------------------------------------------------------------------------------------------------------
_PEFT_WRAPPER_PARTS = ("modules_to_save", "base_layer")


def check_modules_to_save(model: nn.Module, config: Any) -> None:
    """Raise a ``ValueError`` if an entry of ``config.modules_to_save`` matches no module of ``model``.

    An entry matches the way peft's ``_set_trainable`` (peft 0.21) matches it: a module whose name ends with the entry
    (``"mask_decoder"`` matches ``mask_decoder`` and ``model.mask_decoder``; being a plain suffix test, it also
    matches ``model.pixel_mask_decoder``). Modules inside peft wrappers (names with a ``modules_to_save`` or
    ``base_layer`` part) are not candidates, so a model that already holds adapters is checked against its own
    modules. The message names each unmatched entry with up to 3 close matches among the module names and their last
    components.
    """
    names = getattr(config, "modules_to_save", None)
    if not names:
        return
    keys = [
        key
        for key, _ in model.named_modules(remove_duplicate=False)
        if key and not any(part in _PEFT_WRAPPER_PARTS for part in key.split("."))
    ]
    unmatched = [name for name in names if not any(key.endswith(name) for key in keys)]
    if not unmatched:
        return
    candidates = sorted(set(keys) | {key.rsplit(".", 1)[-1] for key in keys})
    described = []
    for name in unmatched:
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
        described.append(
            f"{name!r} (did you mean {' or '.join(repr(c) for c in close)}?)"
            if close
            else f"{name!r} (no close match)"
        )
    example = next((key for key in keys if "." in key), keys[0] if keys else "head")
    raise ValueError(
        f"`modules_to_save` names modules that {type(model).__name__} does not have: {', '.join(described)}. An entry "
        f"must be the name of a module or its end (e.g. {example.rsplit('.', 1)[-1]!r} or {example!r} for the module "
        f"{example!r}); `model.named_modules()` lists the names. Fix or remove these entries."
    )

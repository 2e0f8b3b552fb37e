# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Reading, checking and safely writing directories on disk.

This module sits at the bottom of the package (beside ``_registry``): tuners, analysis, the runner and the CLI all use
it, and it imports none of them."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping

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
        if os.path.exists(path):
            raise FileNotFoundError(
                f"Adapter directory {path!r} is a file, not a directory. Pass the folder that `save_pretrained` "
                "wrote (it holds adapter_config.json and the weights)."
            )
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


# ----------------------------------------------------------------------------------------------------------------------
# Safe writing: outputs never replace an input, never half-written in place
# ----------------------------------------------------------------------------------------------------------------------
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def _resolved(path: str | os.PathLike) -> str:
    """Absolute path with symlinks, ``.``/``..`` and trailing slashes resolved."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same place on disk (``./x`` and ``x/``, a symlink and its target, ...)."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_inside(path: str, directory: str) -> bool:
    """Whether the resolved ``path`` lies strictly inside the resolved ``directory``."""
    return path != directory and os.path.commonpath([path, directory]) == directory


def _entries(path: str) -> str:
    names = sorted(os.listdir(path))
    shown = ", ".join(repr(name) for name in names[:3])
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}{', ...' if len(names) > 3 else ''}"


def _refuse_existing(path: str, shown: str, *, overwrite: bool, argument: str, overwrite_hint: str) -> None:
    """Raise if the existing ``path`` may not be replaced: it is a file, or a non-empty directory without overwrite."""
    if not os.path.isdir(path):
        raise FileExistsError(
            f"{argument} {shown!r} is an existing file, not a directory. Remove it or choose another {argument}."
        )
    if not overwrite and os.listdir(path):
        raise FileExistsError(
            f"{argument} {shown!r} already exists and is not empty ({_entries(path)}). Pass {overwrite_hint} if it "
            f"may be overwritten, or choose another {argument}."
        )


def check_output_dir(
    path: str | os.PathLike,
    *,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    overwrite: bool = False,
    argument: str = "`output_dir`",
    overwrite_hint: str = "`overwrite=True`",
) -> str:
    """Check, before any work, that the directory ``path`` may be written (replaced as a whole); return it resolved.

    Refused:

    - an empty path (it would mean the current directory);
    - the same place as one of ``inputs`` (label -> path; ``None`` values are skipped), however it is spelled
      (``./x`` and ``x/``, a symlink, ...);
    - a directory that contains one of the inputs, or that lies inside one: replacing the output must never delete or
      change an input, even with ``overwrite``;
    - an existing file, or a path below a file;
    - an existing non-empty directory, unless ``overwrite``.

    ``argument`` and ``overwrite_hint`` name the argument and the way to allow replacing in the messages (e.g.
    ``"`--out`"`` and ``"`--overwrite`"`` for a command line).

    Raises:
        ValueError: ``path`` is empty, is an input, contains one or lies inside one.
        FileExistsError: ``path`` is a file, lies below a file, or is a non-empty directory and ``overwrite`` is
            false.
    """
    shown = os.fspath(path)
    if not shown.strip():
        raise ValueError(f"{argument} is empty ({shown!r}). Give the path of the directory to write.")
    resolved = _resolved(shown)
    for label, source in (inputs or {}).items():
        if source is None or not os.fspath(source).strip():
            continue
        source_resolved = _resolved(source)
        if same_path(shown, source):
            raise ValueError(
                f"{argument} {shown!r} is the same directory as {label} {os.fspath(source)!r}; writing there would "
                f"replace the input. Choose another {argument}."
            )
        if _is_inside(source_resolved, resolved):
            raise ValueError(
                f"{argument} {shown!r} contains {label} {os.fspath(source)!r}; replacing it would delete the input, "
                f"so this is refused even with {overwrite_hint}. Choose a directory outside it."
            )
        if _is_inside(resolved, source_resolved):
            raise ValueError(
                f"{argument} {shown!r} lies inside {label} {os.fspath(source)!r}; inputs are never modified. "
                f"Choose a directory outside it."
            )
    if os.path.lexists(resolved):
        _refuse_existing(resolved, shown, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint)
        return resolved
    ancestor = os.path.dirname(resolved)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise FileExistsError(
            f"{argument} {shown!r} cannot be created: {ancestor!r} is a file, not a directory. Choose another "
            f"{argument}."
        )
    return resolved


def _free_sibling(target: str, mark: str, suffix: str = "") -> str:
    """A path beside ``target`` that does not exist yet: ``.<name><mark><random><suffix>`` (hidden)."""
    parent, name = os.path.split(target)
    while True:
        candidate = os.path.join(parent, f".{name}{mark}{secrets.token_hex(4)}{suffix}")
        if not os.path.lexists(candidate):
            return candidate


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    *,
    overwrite: bool = False,
    argument: str = "`output_dir`",
    overwrite_hint: str = "`overwrite=True`",
) -> Iterator[str]:
    """Write a directory all at once: yield a new temporary sibling of ``target`` to fill, then rename it into place.

    The temporary directory is ``.<name>.tmp-<random>`` in ``target``'s parent (created if needed), so the final
    rename stays on one file system. When the block ends normally an existing ``target`` is renamed aside
    (``.<name>.old-<random>``), the new directory renamed in and the old one deleted; at every instant ``target`` is
    the old complete directory, the new complete one, or absent (only between the two renames). When the block raises
    (an error, Ctrl-C, or SIGTERM turned into an exception as the ``peft-vision`` command does), the temporary
    directory is deleted and ``target`` is left as it was. A process killed outright (SIGKILL, power loss) can leave a
    hidden ``.tmp-`` or ``.old-`` sibling behind, never a mixed ``target``.

    A symlink ``target`` is resolved: the directory it points to is replaced and the link kept.

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty directory and ``overwrite`` is false (checked on entry,
            and again before the rename in case it appeared meanwhile).
    """
    shown = os.fspath(target)
    resolved = _resolved(target)
    if os.path.lexists(resolved):
        _refuse_existing(resolved, shown, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint)
    os.makedirs(os.path.dirname(resolved), exist_ok=True)
    temporary = _free_sibling(resolved, _TMP_MARK)
    try:
        try:
            # Inside the clean-up's reach: an interruption just after mkdir must not leave the directory behind. Not
            # tempfile.mkdtemp: that makes it 0o700, and the rename would keep that mode.
            os.mkdir(temporary)
        except FileExistsError:
            temporary = None  # another writer took this random name between the check and mkdir: not ours
            raise
        yield temporary
        _move_into_place(
            temporary, resolved, shown, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint
        )
    except BaseException:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)  # a no-op once the new directory is in place
        raise


def _move_into_place(temporary: str, target: str, shown: str, **refuse_kwargs) -> None:
    aside = None
    try:
        if os.path.lexists(target):
            _refuse_existing(target, shown, **refuse_kwargs)
            aside = _free_sibling(target, _OLD_MARK)
            os.rename(target, aside)
        os.rename(temporary, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        # An error or an interruption (SIGTERM turned into an exception, Ctrl-C) somewhere in the renames or the
        # deletion: read from the disk how far they got, since the exception may have come between a call and the
        # next line.
        if os.path.isdir(temporary):  # the new directory is not in place: put the old one back
            if aside is not None and os.path.isdir(aside) and not os.path.lexists(target):
                os.rename(aside, target)
            shutil.rmtree(temporary, ignore_errors=True)
        elif aside is not None:  # the new directory is in place: finish deleting the old one
            shutil.rmtree(aside, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Write one file all at once: yield a temporary path beside ``path`` (same extension, so writers that read the
    format from it still work) for the caller to create, then ``os.replace`` it onto ``path``. On an exception the
    temporary file is removed and ``path`` keeps its old content (or stays absent)."""
    target = _resolved(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = _free_sibling(target, _TMP_MARK, suffix=os.path.splitext(target)[1])
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``, flushed to disk first, so
    ``path`` holds the old text or the new one, never a part. Returns ``path``."""
    with atomic_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return os.fspath(path)

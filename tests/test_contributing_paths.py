# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""CONTRIBUTING.md matches the repository: every path it names exists, and the local links of the docs resolve.

Paths named by CONTRIBUTING.md are the entries of its layout block (``peft_vision_ext/`` and the entries indented
under it, the other top-level entries), the file names in those entries' descriptions, and every backticked token of
its prose that looks like a path (has a ``/`` or a file extension, no spaces; in a description, where ``a/b`` means
"a or b", a file extension or a trailing ``/``). ``<placeholder>`` parts match any name.
A path in a description may be relative to its entry; a path in prose may be relative to the repository root or to any
folder of it (``train/arguments.py`` is ``peft_vision_ext/train/arguments.py``)."""

from __future__ import annotations

import fnmatch
import os
import re

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIBUTING = os.path.join(ROOT, "CONTRIBUTING.md")
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "outputs", "build", "dist"}
_EXTENSIONS = (".py", ".md", ".json", ".toml", ".txt", ".png", ".yaml", ".yml", ".cfg", ".sh")
_PATH_TOKEN = re.compile(r"^[\w.<>*/-]+$")
# Backticked names that are not paths of this repository: the folders of a user's data set.
NOT_REPOSITORY_PATHS = {"images/", "masks/"}


def repository_entries() -> list[str]:
    """Every file and folder of the repository (folders with a trailing ``/``), relative to its root."""
    entries = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        relative = os.path.relpath(folder, ROOT).replace(os.sep, "/")
        prefix = "" if relative == "." else relative + "/"
        entries += [prefix + d + "/" for d in dirs] + [prefix + f for f in files]
    return entries


def exists(path: str, entries: list[str], *, anywhere: bool) -> bool:
    """Whether ``path`` (placeholders allowed; a trailing ``/`` means a folder) names something in ``entries``."""
    pattern = re.sub(r"<[^>]+>", "*", path)
    patterns = [pattern, "*/" + pattern] if anywhere else [pattern]
    return any(fnmatch.fnmatchcase(entry, p) for entry in entries for p in patterns)


def _is_path(token: str) -> bool:
    return bool(_PATH_TOKEN.match(token)) and ("/" in token or token.endswith(_EXTENSIONS)) and token != "/"


def layout_paths(markdown: str) -> list[tuple[str, list[str]]]:
    """``(entry path, [paths named in its description])`` for each entry of the layout block."""
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```$", markdown, flags=re.S | re.M)
    assert block, "CONTRIBUTING.md has no layout block under '## Layout'"
    entries: list[tuple[str, list[str]]] = []
    parent = ""
    for line in block.group(1).splitlines():
        match = re.match(r"^( {0,2})(\S+)(.*)$", line)
        if match is None:  # a description's continuation line
            if entries:
                entries[-1][1].extend(_description_paths(line))
            continue
        indent, name, description = match.groups()
        path = name if not indent else parent + name
        if not indent:
            parent = name if name.endswith("/") else ""
        entries.append((path, _description_paths(description)))
    return entries


def _description_paths(text: str) -> list[str]:
    """File names (with an extension) and folders (a trailing ``/``) in a description; ``a/b`` there means "a or
    b", not a path."""
    tokens = [t.rstrip(".") for t in re.findall(r"[\w.<>/-]+", text.replace("`", " "))]
    return [t for t in tokens if _is_path(t) and t.endswith((*_EXTENSIONS, "/")) and not t.startswith("-")]


def prose_paths(markdown: str) -> list[str]:
    """Backticked path-like tokens outside fenced blocks."""
    prose = re.sub(r"^```.*?^```$", "", markdown, flags=re.S | re.M)
    return sorted({t for t in re.findall(r"`([^`\n]+)`", prose) if _is_path(t)})


def test_layout_entries_exist():
    with open(CONTRIBUTING, encoding="utf-8") as handle:
        layout = layout_paths(handle.read())
    entries = repository_entries()
    assert len(layout) > 10
    missing = []
    for path, named in layout:
        if not exists(path, entries, anywhere=False):
            missing.append(path)
        folder = path if path.endswith("/") else ""
        for name in named:
            if not (exists(folder + name, entries, anywhere=False) or exists(name, entries, anywhere=True)):
                missing.append(f"{name} (in the description of {path})")
    assert not missing, f"CONTRIBUTING.md's layout names paths that do not exist: {missing}"


def test_layout_lists_every_module_and_folder():
    """The other way round: each module and subpackage of peft_vision_ext, and each top-level folder, is in the
    layout (a new one gets its line)."""
    with open(CONTRIBUTING, encoding="utf-8") as handle:
        listed = {path for path, _ in layout_paths(handle.read())}
    package = os.path.join(ROOT, "peft_vision_ext")
    expected = {
        f"peft_vision_ext/{name}/" if os.path.isdir(os.path.join(package, name)) else f"peft_vision_ext/{name}"
        for name in os.listdir(package)
        if name not in _SKIP_DIRS and name != "__init__.py" and (name.endswith(".py") or "." not in name)
    }
    expected |= {
        f"{name}/"
        for name in os.listdir(ROOT)
        if os.path.isdir(os.path.join(ROOT, name))
        and not name.startswith(".")
        and name not in _SKIP_DIRS
        and not name.endswith(".egg-info")
    }
    unlisted = sorted(
        path
        for path in expected
        if not any(fnmatch.fnmatchcase(path, re.sub(r"<[^>]+>", "*", p)) or p.startswith(path) for p in listed)
    )
    assert not unlisted, f"CONTRIBUTING.md's layout does not list {unlisted}"


def test_paths_in_prose_exist():
    with open(CONTRIBUTING, encoding="utf-8") as handle:
        paths = prose_paths(handle.read())
    entries = repository_entries()
    assert len(paths) > 10
    missing = [p for p in paths if p not in NOT_REPOSITORY_PATHS and not exists(p, entries, anywhere=True)]
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md"])
def test_local_links_resolve(doc):
    """Links and images to files of the repository exist; ``#anchors`` name a heading of the file."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as handle:
        markdown = handle.read()
    prose = re.sub(r"^```.*?^```$", "", markdown, flags=re.S | re.M)
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", prose, flags=re.M)}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path and not os.path.exists(os.path.join(ROOT, os.path.dirname(doc), path)):
            broken.append(target)
        elif not path and anchor not in anchors:
            broken.append(target)
    assert not broken, f"{doc} links to what does not exist: {broken}"


def test_the_checks_see_a_missing_path(tmp_path):
    """The matching is not vacuous: a made-up path, a renamed file and a wrong placeholder path are missing."""
    entries = repository_entries()
    assert exists("peft_vision_ext/tuners/<method>/config.py", entries, anywhere=False)
    assert exists("train/protocol.py", entries, anywhere=True)
    assert not exists("peft_vision_ext/recipe_utils.py", entries, anywhere=True)
    assert not exists("peft_vision_ext/tuners/<method>/missing.py", entries, anywhere=False)
    assert not exists("train/protocol.py", entries, anywhere=False)
    assert _is_path("tests/test_<method>.py") and not _is_path("embedded:<collection>/<domain>")

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The README's snippets run as a reader pastes them: every fenced ``python`` block of a checked section, in order,
in one fresh interpreter (so a block may use what an earlier one defined, and nothing from the test process leaks in).
A failing block fails the test with the block's number and the interpreter's error."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sections whose python blocks are executed (their heading, as written in README.md).
CHECKED_SECTIONS = ("## Training at scale",)


def python_blocks(markdown: str, heading: str) -> list[str]:
    """The ``python`` fenced blocks of the section that starts with ``heading`` (up to the next ``## `` heading)."""
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find("\n## ", start + len(heading) + 2)
    section = markdown[start : None if end == -1 else end]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


@pytest.mark.parametrize("heading", CHECKED_SECTIONS)
def test_readme_section_runs(heading, tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        blocks = python_blocks(handle.read(), heading)
    assert blocks, f"{heading!r} has no python block"
    # Each block is announced on stderr, so an error names the block it came from.
    script = "\n".join(
        f"import sys; print('--- block {i} ---', file=sys.stderr, flush=True)\n{block}"
        for i, block in enumerate(blocks)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]

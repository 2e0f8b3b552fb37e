# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The docs run as a reader pastes them.

Every fenced ``python`` block of README.md and of CONTRIBUTING.md runs, in the order a reader meets it, in one fresh
interpreter per file and one shared namespace (a later block may use what an earlier one defined, and nothing from
the test process leaks in). A block that raises fails the test, named by its file and line.

Fence info strings:

- ```` ```python ````: runs.
- ```` ```python network ````: needs the Hugging Face Hub; skipped, with the reason printed, unless
  ``PEFT_VISION_EXT_DOCS_NETWORK=1``.
- ```` ```python gpu ````: needs a CUDA GPU; runs when torch sees one, otherwise skipped with the reason printed.
- ```` ```text output ```` directly under a ``python`` block (blank lines between are allowed): what that block
  prints. The printed text must equal it, line by line, trailing spaces and blank lines at the ends ignored.

The documented environment switch ``PEFT_VISION_EXT_DOCS_TINY=1`` (the tests set it) shrinks the two full-size
architectures that a snippet may build with random weights, so the docs run in seconds on a CPU:
``transformers.SamConfig(...)`` given no sub-configs becomes the 4-block SAM of
``peft_vision_ext.models.small_sam_config`` instead of SAM ViT-B, and ``transformers.Mask2FormerConfig(...)`` given no
``backbone_config`` the Mask2Former of ``small_mask2former_config`` (64 px Swin) instead of the default Swin. Nothing
else changes: U-Nets, explicit small configs and ``from_pretrained`` are built as written. So a block whose shown
output depends on those two configs would fail here; show such numbers in prose.

Run the docs yourself (the same check, printing as it goes)::

    PEFT_VISION_EXT_DOCS_TINY=1 python tests/test_readme_snippets.py README.md      # seconds
    python tests/test_readme_snippets.py README.md                                 # full-size SAM / Mask2Former

It writes what the snippets save (``out/``, ...) into the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import time
import traceback

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "CONTRIBUTING.md")
TINY_ENV = "PEFT_VISION_EXT_DOCS_TINY"
NETWORK_ENV = "PEFT_VISION_EXT_DOCS_NETWORK"
# Marks a ``python`` fence may carry, and why a block so marked may not run.
MARKS = {
    "network": f"needs network access to the Hugging Face Hub (set {NETWORK_ENV}=1 to run it)",
    "gpu": "needs a CUDA GPU (none is visible to torch)",
}
OUTPUT_INFO = "text output"
_FENCE = re.compile(r"^```(.*)$")


@dataclasses.dataclass
class Block:
    path: str  # as given (README.md)
    line: int  # 1-based line of the first code line
    info: str  # the fence's info string ("python", "python network", "text output", "bash", "")
    code: str
    end: int  # 1-based line of the closing fence
    output: str | None = None  # the ``text output`` block under it, if any

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def marks(self) -> list[str]:
        return self.info.split()[1:]

    @property
    def where(self) -> str:
        return f"{os.path.basename(self.path)}:{self.line}"


def fenced_blocks(path: str) -> list[Block]:
    """Every fenced block of a markdown file, in order (fences are ```` ``` ```` at the start of a line)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: the fence ```{opening.group(1)} is never closed.")
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 2, opening.group(1).strip(), code, end + 1))
        i = end + 1
    return blocks


def python_blocks(path: str) -> list[Block]:
    """The ``python`` blocks of a markdown file, in order, each with the ``text output`` block shown under it.

    Raises ``ValueError`` for an unknown mark or an output block that does not directly follow a python block."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    blocks = fenced_blocks(path)
    out: list[Block] = []
    for index, block in enumerate(blocks):
        if block.language == "python":
            unknown = [mark for mark in block.marks if mark not in MARKS]
            if unknown:
                raise ValueError(f"{block.where}: unknown mark(s) {unknown} on a python fence; known: {list(MARKS)}.")
            out.append(block)
        elif block.info == OUTPUT_INFO:
            previous = blocks[index - 1] if index else None
            # Only blank lines between the previous block's closing fence and this opening fence.
            between = lines[previous.end : block.line - 2] if previous else []
            if previous is None or previous.language != "python" or any(line.strip() for line in between):
                raise ValueError(f"{block.where}: a ```{OUTPUT_INFO} block must come directly under a python block.")
            previous.output = block.code
    return out


def skip_reason(block: Block) -> str | None:
    """Why ``block`` does not run here (None: it runs)."""
    if "network" in block.marks and os.environ.get(NETWORK_ENV) != "1":
        return MARKS["network"]
    if "gpu" in block.marks:
        import torch

        if not torch.cuda.is_available():
            return MARKS["gpu"]
    return None


def shrink_default_configs() -> None:
    """The ``PEFT_VISION_EXT_DOCS_TINY=1`` switch: ``SamConfig`` and ``Mask2FormerConfig`` built without their
    sub-configs get the small ones of ``peft_vision_ext.models`` (see the module docstring)."""
    from transformers import Mask2FormerConfig, SamConfig

    from peft_vision_ext.models import small_mask2former_config, small_sam_config

    small_sam = small_sam_config(num_labels=1)
    sam_defaults = {
        "vision_config": small_sam.vision_config.to_dict(),
        "prompt_encoder_config": small_sam.prompt_encoder_config.to_dict(),
        "mask_decoder_config": small_sam.mask_decoder_config.to_dict(),
    }
    small_m2f = small_mask2former_config(id2label={0: "object"}, image_size=64)
    m2f_fields = ("feature_size", "mask_feature_size", "hidden_dim", "encoder_feedforward_dim", "dim_feedforward")
    m2f_fields += ("encoder_layers", "decoder_layers", "num_attention_heads", "num_queries", "train_num_points")
    m2f_defaults = {
        "backbone_config": small_m2f.backbone_config.to_dict(),
        **{k: getattr(small_m2f, k) for k in m2f_fields},
    }

    def shrink(cls, subconfigs: tuple[str, ...], defaults: dict) -> None:
        full_size_init = cls.__init__

        def __init__(self, *args, **kwargs):
            if not args and all(kwargs.get(name) is None for name in subconfigs):
                kwargs = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
                for name in subconfigs:  # a fresh copy per config
                    kwargs[name] = dict(kwargs[name])
            full_size_init(self, *args, **kwargs)

        cls.__init__ = __init__

    shrink(SamConfig, ("vision_config", "prompt_encoder_config", "mask_decoder_config"), sam_defaults)
    shrink(Mask2FormerConfig, ("backbone_config",), m2f_defaults)


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (what the block printed)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def _normalise(text: str) -> list[str]:
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n").split("\n")


def run_docs(path: str) -> int:
    """Run ``path``'s python blocks in this interpreter, in order, in one namespace; report and return an exit code."""
    path = os.path.abspath(path)
    blocks = python_blocks(path)
    if blocks and os.environ.get(TINY_ENV) == "1":
        shrink_default_configs()
    print(f"=== {os.path.basename(path)}: {len(blocks)} python block(s), {TINY_ENV}={os.environ.get(TINY_ENV, '')}")
    namespace: dict = {"__name__": "__main__"}
    mismatches = []
    for block in blocks:
        reason = skip_reason(block)
        if reason is not None:
            print(f"--- {block.where} ```{block.info}: skipped: {reason}", flush=True)
            continue
        print(f"--- {block.where} ```{block.info}", flush=True)
        # Pad so that tracebacks give the file's own line numbers (and show its lines).
        code = compile("\n" * (block.line - 1) + block.code, path, "exec")
        start = time.perf_counter()
        tee = _Tee(sys.stdout)
        try:
            with contextlib.redirect_stdout(tee):
                exec(code, namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the block at {block.where} raised (above).", file=sys.stderr, flush=True)
            return 1
        print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)
        if block.output is not None and _normalise(tee.copy.getvalue()) != _normalise(block.output):
            mismatches.append(block)
            shown = "\n".join(_normalise(block.output))
            printed = "\n".join(_normalise(tee.copy.getvalue()))
            print(
                f"MISMATCH: the output shown under {block.where} is not what it printed.\n"
                f"shown:\n{shown}\nprinted:\n{printed}",
                file=sys.stderr,
                flush=True,
            )
    return 1 if mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("markdown", help="a markdown file (README.md, CONTRIBUTING.md)")
    return run_docs(parser.parse_args(argv).markdown)


# ---------------------------------------------------------------------------------------------------- the tests


def _run_in_fresh_interpreter(doc: str, cwd, *, tiny: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    if env.get(NETWORK_ENV) != "1":  # nothing may download (the `network` blocks are skipped)
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop(TINY_ENV, None)
    if tiny:
        env[TINY_ENV] = "1"
    command = [sys.executable, os.path.abspath(__file__), os.path.join(ROOT, doc)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200, env=env)


@pytest.mark.parametrize("doc", DOCS)
def test_fences_are_well_formed(doc):
    """Known marks only, output blocks under python blocks, and (README) the output blocks it promises exist."""
    blocks = python_blocks(os.path.join(ROOT, doc))
    if doc == "README.md":
        assert blocks and any(block.output is not None for block in blocks)


@pytest.mark.parametrize("doc", DOCS)
def test_docs_run_in_order(doc, tmp_path):
    """Every python block of ``doc`` runs, in order, in a fresh interpreter (tiny configs); shown outputs match."""
    if not python_blocks(os.path.join(ROOT, doc)):
        return  # nothing to run (CONTRIBUTING.md has no python block today)
    result = _run_in_fresh_interpreter(doc, tmp_path, tiny=True)
    print(result.stdout)  # the block list with timings and skip reasons (pytest -s / -rA shows it)
    assert result.returncode == 0, (result.stdout[-3000:] + "\n" + result.stderr[-6000:]).strip()


SAMPLE = """Text.

```python
greeting = "hello"
print(greeting)
```

```text output
hello
```

```python network
raise RuntimeError("a network block must not run here")
```

```python
print(greeting.upper())
```

```text output
HELLO, WORLD
```

```python
1 / 0
```

```python
raise RuntimeError("never reached: the first error stops the run")
```
"""


def test_runner_skips_marked_blocks_and_reports_mismatches_and_errors(tmp_path, monkeypatch, capsys):
    """The runner itself, on a sample: a shared namespace, a network block skipped with its reason, a shown output
    that differs from the printed one, and an exception named by file and line."""
    monkeypatch.delenv(NETWORK_ENV, raising=False)
    monkeypatch.delenv(TINY_ENV, raising=False)  # never patch transformers in the test process
    sample = tmp_path / "SAMPLE.md"
    sample.write_text(SAMPLE)
    blocks = python_blocks(str(sample))
    assert [b.line for b in blocks] == [4, 13, 17, 25, 29]
    assert blocks[0].output == "hello\n" and blocks[2].output == "HELLO, WORLD\n" and blocks[1].output is None
    assert run_docs(str(sample)) == 1
    captured = capsys.readouterr()
    assert f"SAMPLE.md:13 ```python network: skipped: {MARKS['network']}" in captured.out
    assert "MISMATCH: the output shown under SAMPLE.md:17" in captured.err and "printed:\nHELLO\n" in captured.err
    # The traceback names the markdown file and line, and shows the line.
    assert f'File "{sample}", line 25' in captured.err and "1 / 0" in captured.err
    assert "ZeroDivisionError" in captured.err and "FAILED: the block at SAMPLE.md:25 raised" in captured.err
    assert "never reached" not in captured.err


def test_runner_refuses_bad_fences(tmp_path):
    bad_mark = tmp_path / "mark.md"
    bad_mark.write_text("```python netwrok\npass\n```\n")
    with pytest.raises(ValueError, match="unknown mark"):
        python_blocks(str(bad_mark))
    stray = tmp_path / "stray.md"
    stray.write_text("```python\npass\n```\n\nSome prose.\n\n```text output\nx\n```\n")
    with pytest.raises(ValueError, match="directly under a python block"):
        python_blocks(str(stray))
    unclosed = tmp_path / "unclosed.md"
    unclosed.write_text("```python\npass\n")
    with pytest.raises(ValueError, match="never closed"):
        python_blocks(str(unclosed))


def _marked_blocks():
    return [
        pytest.param(block, id=f"{block.where}-{'-'.join(block.marks)}")
        for doc in DOCS
        for block in python_blocks(os.path.join(ROOT, doc))
        if block.marks
    ]


@pytest.mark.parametrize("block", _marked_blocks())
def test_marked_block(block):
    """A block marked ``network`` / ``gpu`` shows up as a skip with its reason when it does not run here."""
    reason = skip_reason(block)
    if reason is not None:
        pytest.skip(f"{block.where} ```{block.info}: {reason}")


@pytest.mark.slow
def test_readme_runs_full_size(tmp_path):
    """Without the switch: the README's SAM ViT-B and Mask2Former default architectures, as written."""
    result = _run_in_fresh_interpreter("README.md", tmp_path, tiny=False)
    print(result.stdout)
    assert result.returncode == 0, (result.stdout[-3000:] + "\n" + result.stderr[-6000:]).strip()


if __name__ == "__main__":
    sys.exit(main())

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Never destroy or half-write a user's files: ``peft-vision export/fuse --out`` refuses the inputs however they are
spelled, every written directory appears whole or not at all (also when the process is killed), and every bad
argument gets one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

from peft_vision_ext import ConvAdapterConfig
from peft_vision_ext._files import atomic_directory, atomic_write_text, check_output_dir
from peft_vision_ext.analysis import export_adapters, score_adapters
from peft_vision_ext.cli import main as cli

from tiny_models import make_tiny_cnn, make_unet


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def _digest(root) -> dict[str, str]:
    """Every directory and file under ``root`` (symlinks not followed), files by SHA-256: equal digests mean the tree
    is byte-identical."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        relative = os.path.relpath(dirpath, root)
        tree[relative + "/"] = "directory"
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                tree[os.path.join(relative, name)] = "link to " + os.readlink(path)
            else:
                with open(path, "rb") as handle:
                    tree[os.path.join(relative, name)] = hashlib.sha256(handle.read()).hexdigest()
    return tree


def _leftovers(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if re.search(r"\.(tmp|old)-[0-9a-f]{8}", name))


def _trained_like(model):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        return get_peft_model(model, ConvAdapterConfig(init_weights=False)).eval()


def _one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """``base`` (a tiny U-Net), ``adapter`` (conv adapters with non-trivial weights) and ``half`` (an export of half
    of them, for "older" outputs), all written by ``save_pretrained``."""
    root = tmp_path_factory.mktemp("safety")
    base = make_unet("test_resnet")
    base.save_pretrained(root / "base")
    model = _trained_like(base)
    model.save_pretrained(root / "adapter")
    export_adapters(model, root / "half", [s.module for s in score_adapters(model)][::2])
    return root


# ----------------------------------------------------------------------------------------------------------------------
# --out refusals
# ----------------------------------------------------------------------------------------------------------------------
def _command(command: str, out: str, *extra: str) -> list[str]:
    if command == "export":
        return ["export", "adapter", "--keep-fraction", "0.5", "--base", "base", "--out", out, *extra]
    return ["fuse", "--base", "base", "--adapter", "adapter", "--out", out, *extra]


OUT_REFUSALS = [
    # (id, --out, extra flags, part of the message)
    ("is-the-adapter", "adapter", (), "same directory as the input adapter"),
    ("is-the-base", "base", (), "same directory as `--base`"),
    ("dot-slash-spelling", "./adapter", (), "same directory as the input adapter"),
    ("trailing-slash", "base/", (), "same directory as `--base`"),
    ("dot-dot-spelling", "half/../adapter/.", (), "same directory as the input adapter"),
    ("absolute-spelling", "{root}/base", (), "same directory as `--base`"),
    ("symlink-to-the-adapter", "link-to-adapter", (), "same directory as the input adapter"),
    ("symlink-to-the-base", "link-to-base/", (), "same directory as `--base`"),
    ("is-the-adapter-even-with-overwrite", "adapter", ("--overwrite",), "same directory as the input adapter"),
    ("contains-the-inputs", ".", ("--overwrite",), "contains the input adapter"),
    ("contains-the-inputs-absolute", "{root}", ("--overwrite",), "refused even with `--overwrite`"),
    ("inside-the-adapter", "adapter/update", (), "lies inside the input adapter"),
    ("inside-the-base-via-symlink", "link-to-base/fused", ("--overwrite",), "lies inside `--base`"),
    (
        "non-empty-directory",
        "occupied",
        (),
        "already exists and is not empty (1 entry: 'notes.txt'). Pass `--overwrite`",
    ),
    ("an-existing-file", "a-file.txt", ("--overwrite",), "is an existing file, not a directory"),
    ("below-a-file", "a-file.txt/out", (), "is a file, not a directory"),
    ("empty", "", (), "`--out` is empty"),
]


@pytest.mark.parametrize("command", ["export", "fuse"])
@pytest.mark.parametrize("case, out, extra, message", OUT_REFUSALS, ids=[c[0] for c in OUT_REFUSALS])
def test_out_is_refused_and_nothing_changes(workspace, monkeypatch, capsys, command, case, out, extra, message):
    monkeypatch.chdir(workspace)
    for link, target in (("link-to-adapter", "adapter"), ("link-to-base", "base")):
        if not os.path.lexists(link):
            os.symlink(target, link)
    os.makedirs("occupied", exist_ok=True)
    (workspace / "occupied" / "notes.txt").write_text("a user's notes")
    (workspace / "a-file.txt").write_text("a user's file")
    out = out.format(root=workspace)
    before = _digest(workspace)

    assert cli(_command(command, out, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, "`--out`", repr(out), message)
    assert _digest(workspace) == before  # inputs, the occupied directory, the file: byte-identical; nothing added


def test_out_refusal_from_a_real_process_is_one_line(workspace, fork_server, tmp_path):
    """What a user sees: the module run as ``__main__`` in its own process, its whole stderr."""
    before = _digest(workspace)
    argv = ["fuse", "--base", str(workspace / "base"), "--adapter", str(workspace / "adapter")]
    code, out, err, _ = fork_server.run([*argv, "--out", str(workspace / "base") + "/"], tmp_path)
    assert code == 2 and out == ""
    _one_error_line(err, f"`--out` '{workspace}/base/' is the same directory as `--base`")
    code, out, err, _ = fork_server.run([*argv, "--out", str(workspace / "missing" / "x"), "--bogus"], tmp_path)
    assert code == 2 and out == ""
    _one_error_line(err, "unrecognized arguments: --bogus")
    assert _digest(workspace) == before


@pytest.mark.parametrize("command", ["export", "fuse"])
def test_overwrite_replaces_a_non_empty_out_and_the_result_loads(workspace, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    os.symlink(workspace / "adapter", tmp_path / "adapter")
    os.symlink(workspace / "base", tmp_path / "base")
    argv = [a if a not in ("adapter", "base") else str(tmp_path / a) for a in _command(command, str(out))]
    inputs = _digest(workspace)
    assert cli(argv) == 2  # without --overwrite
    assert "already exists and is not empty" in capsys.readouterr().err
    assert cli([*argv, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and not _leftovers(tmp_path)
    if command == "export":
        loaded = PeftModel.from_pretrained(make_unet("test_resnet"), out)
        assert len(loaded.base_model.targeted_module_names) == len(score_adapters(workspace / "adapter")) // 2
    else:
        fused = AutoModelForSemanticSegmentation.from_pretrained(out)
        assert not any("convadapter" in name for name, _ in fused.named_modules())
    assert _digest(workspace) == inputs


# ----------------------------------------------------------------------------------------------------------------------
# Bad arguments: one line each, nothing loaded or written
# ----------------------------------------------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    # (id, argv with {root}/{out}, part of the message)
    (
        "base-missing",
        ["fuse", "--base", "{root}/missing", "--adapter", "adapter", "--out", "{out}"],
        "`--base` '{root}/missing' does not exist",
    ),
    (
        "base-is-a-file",
        ["fuse", "--base", "a-file.txt", "--adapter", "adapter", "--out", "{out}"],
        "`--base` 'a-file.txt' is a file, not a directory",
    ),
    (
        "base-without-config",
        ["fuse", "--base", "adapter", "--adapter", "adapter", "--out", "{out}"],
        "`--base` 'adapter' has no config.json",
    ),
    ("base-empty", ["fuse", "--base", "", "--adapter", "adapter", "--out", "{out}"], "`--base` is empty"),
    (
        "base-missing-export",
        ["export", "adapter", "--keep-fraction", "0.5", "--base", "./nope", "--out", "{out}"],
        "`--base` './nope' does not exist",
    ),
    ("base-missing-rank", ["rank", "adapter", "--base", "{root}/nope/"], "`--base` '{root}/nope/' does not exist"),
    (
        "adapter-missing",
        ["fuse", "--base", "base", "--adapter", "nope", "--out", "{out}"],
        "`--adapter`: Adapter directory 'nope' does not exist",
    ),
    (
        "adapter-is-a-file",
        ["export", "a-file.txt", "--keep-fraction", "0.5", "--out", "{out}"],
        "is a file, not a directory",
    ),
    ("adapter-is-a-model", ["rank", "base"], "`adapter`: 'base' has no adapter_config.json"),
    ("adapter-empty", ["rank", ""], "`adapter` is empty"),
    (
        "keep-fraction-zero",
        ["export", "adapter", "--keep-fraction", "0", "--out", "{out}"],
        "`--keep-fraction` must be a number in (0, 1], got 0.0",
    ),
    (
        "keep-fraction-above-one",
        ["export", "adapter", "--keep-fraction", "1.5", "--out", "{out}"],
        "`--keep-fraction` must be a number in (0, 1], got 1.5",
    ),
    (
        "keep-fraction-nan",
        ["export", "adapter", "--keep-fraction", "nan", "--out", "{out}"],
        "`--keep-fraction` must be a number in (0, 1], got nan",
    ),
    (
        "keep-fraction-inf",
        ["export", "adapter", "--keep-fraction", "inf", "--out", "{out}"],
        "`--keep-fraction` must be a number in (0, 1], got inf",
    ),
    (
        "keep-fraction-negative",
        ["export", "adapter", "--keep-fraction", "-0.5", "--out", "{out}"],
        "`--keep-fraction` must be a number in (0, 1], got -0.5",
    ),
    (
        "budget-negative",
        ["export", "adapter", "--budget-bytes", "-3", "--out", "{out}"],
        "`--budget-bytes` must be a positive number of bytes, got -3",
    ),
    (
        "budget-zero",
        ["export", "adapter", "--budget-bytes", "0", "--out", "{out}"],
        "`--budget-bytes` must be a positive number of bytes, got 0",
    ),
    (
        "relative-without-base",
        ["export", "adapter", "--keep-fraction", "0.5", "--score", "relative", "--out", "{out}"],
        "`--score relative` needs `--base`",
    ),
]
ARGPARSE_ERRORS = [
    (
        "keep-fraction-not-a-number",
        ["export", "adapter", "--keep-fraction", "abc", "--out", "{out}"],
        "invalid float value: 'abc'",
    ),
    (
        "budget-not-an-int",
        ["export", "adapter", "--budget-bytes", "1e3", "--out", "{out}"],
        "invalid int value: '1e3'",
    ),
    (
        "both-fraction-and-budget",
        ["export", "adapter", "--keep-fraction", "0.5", "--budget-bytes", "9", "--out", "{out}"],
        "not allowed with argument",
    ),
    ("out-missing", ["fuse", "--base", "base", "--adapter", "adapter"], "the following arguments are required: --out"),
    ("score-unknown", ["rank", "adapter", "--score", "l1"], "invalid choice: 'l1'"),
    ("no-command", [], "the following arguments are required: command"),
]


@pytest.mark.parametrize("case, argv, message", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_get_one_line(workspace, monkeypatch, capsys, case, argv, message):
    monkeypatch.chdir(workspace)
    (workspace / "a-file.txt").write_text("a user's file")
    before = _digest(workspace)
    argv = [a.format(root=workspace, out="new-out") for a in argv]
    assert cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, message.format(root=workspace))
    assert _digest(workspace) == before and not os.path.exists("new-out")


@pytest.mark.parametrize("case, argv, message", ARGPARSE_ERRORS, ids=[c[0] for c in ARGPARSE_ERRORS])
def test_argparse_errors_get_one_line(workspace, monkeypatch, capsys, case, argv, message):
    monkeypatch.chdir(workspace)
    with pytest.raises(SystemExit) as exit_info:
        cli([a.format(out="new-out") for a in argv])
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, message)
    assert not os.path.exists("new-out")


def test_a_base_that_fails_to_load_gets_one_line(workspace, fork_server, tmp_path):
    """A Hub-id-like ``--base`` that cannot be fetched (offline), and a base directory with a broken config: only
    loading finds out; still one line, from a real process."""
    broken = tmp_path / "broken-base"
    shutil.copytree(workspace / "base", broken)
    (broken / "config.json").write_text("{not json")
    for base, message in (
        ("nope-model", "`--base` 'nope-model': cannot load the Hub model id"),
        (str(broken), f"`--base` '{broken}': cannot load the model directory"),
    ):
        argv = ["fuse", "--base", base, "--adapter", str(workspace / "adapter"), "--out", str(tmp_path / "o")]
        code, out, err, _ = fork_server.run(argv, tmp_path)
        assert code == 2 and out == ""
        _one_error_line(err, message)
        assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The Python functions
# ----------------------------------------------------------------------------------------------------------------------
def test_score_adapters_unknown_adapter_name(workspace):
    model = _trained_like(make_tiny_cnn())
    with pytest.raises(
        ValueError, match=r"`adapter_name` 'nope' is not an adapter of this model; it has \['default'\]"
    ):
        score_adapters(model, adapter_name="nope")
    with pytest.raises(
        ValueError, match=r"`adapter_name` 'nope' is not an adapter of this model; it has \['default'\]"
    ):
        export_adapters(model, workspace / "never", ["stem"], adapter_name="nope")
    loaded = PeftModel.from_pretrained(make_unet("test_resnet"), workspace / "adapter", adapter_name="mars")
    with pytest.raises(
        ValueError, match=r"`adapter_name` 'default' is not an adapter of this model; it has \['mars'\]"
    ):
        score_adapters(workspace / "adapter", model=loaded)
    assert "relative" in score_adapters(workspace / "adapter", adapter_name="mars", model=loaded)[0].scores
    assert not (workspace / "never").exists()


def test_export_adapters_overwrite_policy(workspace, tmp_path):
    model = _trained_like(make_tiny_cnn())
    target = tmp_path / "update"
    export_adapters(model, target, ["stem"])
    first = _digest(target)
    with pytest.raises(
        FileExistsError,
        match=r"`output_dir` '.*update' already exists and is not empty .* Pass "
        r"`overwrite=True` if it may be overwritten",
    ):
        export_adapters(model, target, ["stem", "down"])
    assert _digest(target) == first
    export_adapters(model, target, ["stem", "down"], overwrite=True)
    assert sorted(json.loads((target / "adapter_config.json").read_text())["target_modules"]) == ["down", "stem"]
    assert not _leftovers(tmp_path)
    source = workspace / "adapter"
    with pytest.raises(ValueError, match=r"`output_dir` '.*adapter/' is the same directory as the source adapter"):
        export_adapters(source, f"{source}/", ["encoder.conv1.0"], overwrite=True)
    with pytest.raises(ValueError, match=r"contains the source adapter directory `source`"):
        export_adapters(source, workspace, ["encoder.conv1.0"], overwrite=True)


def test_atomic_directory_exception_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    (target / "weights.bin").write_bytes(b"old weights")
    before = _digest(target)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target, overwrite=True) as temporary:
            assert os.path.dirname(temporary) == str(tmp_path) and os.path.basename(temporary).startswith(
                ".model.tmp-"
            )
            with open(os.path.join(temporary, "config.json"), "w") as handle:
                handle.write('{"new": true}')
            raise RuntimeError("disk full")
    assert _digest(target) == before and os.listdir(tmp_path) == ["model"]

    # and for a new target: nothing at all is left
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "new") as temporary:
            open(os.path.join(temporary, "config.json"), "w").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_directory_replaces_whole_and_refuses_without_overwrite(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as temporary:
        assert not target.exists()  # nothing appears before the end
        (open(os.path.join(temporary, "a.txt"), "w")).write("first")
    os.mkdir(tmp_path / "plain")
    assert target.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the umask's mode, not mkdtemp's 0o700
    os.rmdir(tmp_path / "plain")
    assert os.listdir(target) == ["a.txt"]
    with pytest.raises(
        FileExistsError, match=r"`output_dir` '.*model' already exists and is not empty \(1 entry: 'a.txt'\)"
    ):
        with atomic_directory(target):
            pytest.fail("the block must not run")
    with atomic_directory(target, overwrite=True) as temporary:
        open(os.path.join(temporary, "b.txt"), "w").close()
    assert os.listdir(target) == ["b.txt"] and os.listdir(tmp_path) == ["model"]
    # a link is resolved: the directory it points to is replaced, the link stays
    os.symlink(target, tmp_path / "link")
    with atomic_directory(tmp_path / "link", overwrite=True) as temporary:
        open(os.path.join(temporary, "c.txt"), "w").close()
    assert os.path.islink(tmp_path / "link") and os.listdir(target) == ["c.txt"]
    # something that appears at the target while the block runs is not replaced without overwrite
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with atomic_directory(tmp_path / "late") as temporary:
            os.makedirs(tmp_path / "late" / "theirs")
    assert os.listdir(tmp_path / "late") == ["theirs"] and sorted(os.listdir(tmp_path)) == ["late", "link", "model"]


def test_atomic_write_text_and_check_output_dir(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path / "a-dir", "x")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a-dir", "results.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["a-dir", "results.json"]
    assert check_output_dir(tmp_path / "a" / "b") == os.path.realpath(tmp_path / "a" / "b")
    with pytest.raises(
        FileExistsError, match=r"`output_dir` '.*results.json/x' cannot be created: '.*results.json' is a file"
    ):
        check_output_dir(path / "x")


# ----------------------------------------------------------------------------------------------------------------------
# Interrupted runs: SIGTERM / SIGKILL a real `peft-vision` process at every step of writing --out
# ----------------------------------------------------------------------------------------------------------------------
# The server imports torch, transformers and peft once, then forks one child per request; the child runs
# `peft_vision_ext.cli` as `__main__` (as `python -m peft_vision_ext.cli` does) with its stdout and stderr in files. With
# `pause_at=k`, the child reports every file-system step under `watch` (mkdir, open for writing, safetensors writes,
# rename, rmtree: before and after each) on the server's stdout, and stops at the k-th report until it is killed.
_SERVER = r"""
import builtins, json, os, re, runpy, shutil, sys, time
import peft, torch, transformers, transformers.modeling_utils
from transformers import AutoModelForSemanticSegmentation
import peft_vision_ext, peft_vision_ext.analysis.ranking as ranking

CHANNEL = os.dup(1)

def send(text):
    os.write(CHANNEL, (text + "\n").encode())

def child(request):
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    watch, pause_at, count = request["watch"], request["pause_at"], [0]

    def report(text):
        count[0] += 1  # before the report: the kill can come as soon as it is sent
        send(f"step {os.getpid()} {text}")
        if count[0] - 1 == pause_at:
            time.sleep(60)  # until the kill; SIGTERM's exception leaves from here

    def hook(name, function):
        def wrapper(*args, **kwargs):
            paths = [os.fspath(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
            paths = [p for p in paths if os.path.abspath(p).startswith(watch + os.sep)]
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if not paths or (name == "open" and not set("wxa+") & set(mode)):
                return function(*args, **kwargs)
            label = name + " " + " ".join(re.sub(r"\.(tmp|old)-[0-9a-f]{8}", r".\1-*", os.path.relpath(p, watch)) for p in paths)
            report("before " + label)
            result = function(*args, **kwargs)
            report("after " + label)
            return result
        return wrapper

    if pause_at is not None:
        os.mkdir, os.rename, os.replace = hook("mkdir", os.mkdir), hook("rename", os.rename), hook("replace", os.replace)
        shutil.rmtree, builtins.open = hook("rmtree", shutil.rmtree), hook("open", builtins.open)
        transformers.modeling_utils.safe_save_file = hook("save_file", transformers.modeling_utils.safe_save_file)
        ranking.save_file = hook("save_file", ranking.save_file)
    sys.argv = ["peft-vision", *request["argv"]]
    code = 0
    try:
        runpy.run_module("peft_vision_ext.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(request)
        finally:
            os._exit(99)
    send(f"pid {pid}")
    # Report the exit but reap the child only once the test acknowledges it: until then its pid cannot be reused, so
    # a late kill can never reach another process.
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    send(f"exit {info.si_status if info.si_code == os.CLD_EXITED else -info.si_status}")
    sys.stdin.readline()
    os.waitpid(pid, 0)
"""


class ForkServer:
    def __init__(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._buffer = b""

    def _line(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "no answer from the fork server"
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"the fork server died (exit {self.process.poll()})"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str], logs, *, watch=None, pause_at: int | None = None) -> int:
        request = {
            "argv": argv,
            "stdout": str(logs / "stdout.txt"),
            "stderr": str(logs / "stderr.txt"),
            "watch": os.path.realpath(watch) if watch else "/nonexistent",
            "pause_at": pause_at,
        }
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        kind, pid = self._line().split()
        assert kind == "pid", kind
        return int(pid)

    def finish(self, logs, *, kill_at: int | None = None, kill_signal: int = signal.SIGTERM, pid: int | None = None):
        """Read the child's steps until it exits (killing it at step ``kill_at``); return (exit code, stdout, stderr,
        steps)."""
        steps = []
        while True:
            line = self._line()
            if line.startswith("exit "):
                code = int(line.split()[1])
                self.process.stdin.write(b"reaped\n")
                self.process.stdin.flush()
                break
            _, step_pid, text = line.split(" ", 2)
            steps.append(text)
            if kill_at is not None and len(steps) == kill_at + 1:
                os.kill(int(step_pid), kill_signal)
        return code, (logs / "stdout.txt").read_text(), (logs / "stderr.txt").read_text(), steps

    def exited(self) -> bool:
        """Whether the child's exit report has arrived (it stays unreaped until :meth:`finish`)."""
        return bool(self._buffer) or bool(select.select([self.process.stdout], [], [], 0)[0])

    def run(self, argv: list[str], logs, *, watch=None, **kwargs):
        self.start(argv, logs, watch=watch, pause_at=kwargs.get("kill_at"))
        return self.finish(logs, **kwargs)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a test failed with a child still paused
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def fork_server():
    server = ForkServer()
    yield server
    server.close()


def _state(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, [f for f in os.listdir(path) if f.endswith(".safetensors")][0]))


def _interrupt_everywhere(fork_server, tmp_path, argv_for, old_dir, load):
    """Run ``argv_for(out)`` over a copy of ``old_dir`` at ``out``: once to the end, recording its file-system steps,
    then SIGTERM at each step, SIGKILL between the two renames, and SIGTERM at a few delays after the temporary
    directory appears. After each: ``out`` is the old complete directory or the new one, byte for byte, never a mix,
    and it loads with ``load`` to the weights of the one it is."""
    work = tmp_path / "work"
    work.mkdir()
    out, logs = work / "out", tmp_path
    old = _digest(old_dir)

    def reset():
        for name in os.listdir(work):
            shutil.rmtree(work / name)
        shutil.copytree(old_dir, out)

    def outcome() -> str:
        if not out.exists():
            return "absent"
        tree = _digest(out)
        assert tree in (old, new), f"--out is a mix of the old and the new directory: {sorted(tree)}"
        which = "old" if tree == old else "new"
        if which not in loaded:  # byte-identical trees load alike: load each once
            state, expected = load(out), _state(old_dir if which == "old" else reference)
            assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
            loaded.add(which)
        return which

    loaded = set()

    reference = tmp_path / "reference"
    reset()
    code, _, err, steps = fork_server.run(argv_for(out), logs, watch=work, kill_at=10_000)  # never reached
    assert code == 0, err
    shutil.copytree(out, reference)
    new = _digest(reference)
    assert new != old and not _leftovers(work)
    swap = steps.index("after rename .out.tmp-* out")
    assert [s.split()[1] for s in steps[swap - 3 : swap + 3]] == ["rename"] * 4 + ["rmtree"] * 2, steps
    writing = [i for i, s in enumerate(steps) if s.startswith(("after mkdir", "before save_file", "after save_file"))]
    # The temporary directory made, the weights not yet written (the config already is), written; then each side of
    # the two renames and of the old directory's deletion, and the last step.
    kill_points = sorted({writing[0], writing[1], writing[2], *range(swap - 3, swap + 2), len(steps) - 1})

    for index in kill_points:
        step = steps[index]
        reset()
        code, _, err, _ = fork_server.run(argv_for(out), logs, watch=work, kill_at=index)
        assert code == 128 + signal.SIGTERM, (step, err)
        assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(": interrupted by SIGTERM"), err
        assert outcome() == ("old" if index < swap else "new"), step
        assert not _leftovers(work), (step, os.listdir(work))

    # SIGKILL cannot be caught: between the renames --out is absent, the old directory complete beside it.
    reset()
    code, *_ = fork_server.run(argv_for(out), logs, watch=work, kill_at=swap - 2, kill_signal=signal.SIGKILL)
    assert code == -signal.SIGKILL and outcome() == "absent"
    (aside,) = [name for name in _leftovers(work) if ".old-" in name]
    assert _digest(work / aside) == old

    for delay in (0.0, 0.002, 0.01):
        reset()
        pid = fork_server.start(argv_for(out), logs)
        while not _leftovers(work) and not fork_server.exited():
            time.sleep(0.0005)
        time.sleep(delay)
        os.kill(pid, signal.SIGTERM)  # the child is not reaped before `finish`: this pid is still ours
        code, *_ = fork_server.finish(logs)
        assert code in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
        assert outcome() in ("old", "new") and not _leftovers(work)
    return steps


def test_interrupted_fuse_leaves_the_old_model_or_the_new_one(workspace, fork_server, tmp_path):
    old = tmp_path / "old-fused"  # an older fused model: another adapter, so another config and other weights
    assert (
        cli(["fuse", "--base", str(workspace / "base"), "--adapter", str(workspace / "half"), "--out", str(old)]) == 0
    )

    def argv_for(out):
        return [
            "fuse",
            "--base",
            str(workspace / "base"),
            "--adapter",
            str(workspace / "adapter"),
            "--out",
            str(out),
            "--overwrite",
        ]

    def load(path):
        return AutoModelForSemanticSegmentation.from_pretrained(path).state_dict()

    steps = _interrupt_everywhere(fork_server, tmp_path, argv_for, old, load)
    assert steps.index("before open .out.tmp-*/config.json") < steps.index(
        "before save_file .out.tmp-*/model.safetensors"
    )


def test_interrupted_export_leaves_the_old_update_or_the_new_one(workspace, fork_server, tmp_path):
    def argv_for(out):
        return ["export", str(workspace / "adapter"), "--keep-fraction", "0.66", "--out", str(out), "--overwrite"]

    def load(path):
        return get_peft_model_state_dict(PeftModel.from_pretrained(make_unet("test_resnet"), path))

    steps = _interrupt_everywhere(fork_server, tmp_path, argv_for, workspace / "half", load)
    assert "before save_file .out.tmp-*/adapter_model.safetensors" in steps

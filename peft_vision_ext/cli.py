# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""``peft-vision``: fine-tune a checkpoint on your images; rank, export and fuse conv adapters.

    peft-vision train --model_name_or_path <checkpoint> --method <method> --train_dir <folder> --output_dir <dir>

``train`` is :mod:`peft_vision_ext.train` (``peft-vision train --help`` lists its arguments; also
``python -m peft_vision_ext.train``). The ground-station / spacecraft workflow of seed 000::

    peft-vision rank   out/adapter --base out/base                       # which adapters matter
    peft-vision export out/adapter --keep-fraction 0.66 --out out/update # ship only those
    peft-vision fuse   --base out/base --adapter out/update --out out/fused   # on board: fold into the convs

``write-rocks`` writes the embedded rock scenes as a folder dataset (train/, validation/, test/ with images/ and
palette-PNG masks/, and id2label.json), to try ``train`` on folders before your own::

    peft-vision write-rocks data/rocks --domain mars     # then: peft-vision train --train_dir data/rocks/train ...

``--base`` is a directory written by ``save_pretrained`` (or a Hub id, with network access) of a model that
``transformers.AutoModelForSemanticSegmentation`` can load; peft_vision_ext's U-Net is registered with it.

``--out`` is written whole: into a hidden temporary directory beside it, renamed into place at the end, so an
interrupted run leaves the old ``--out`` or none, never a mix. An existing non-empty ``--out`` is replaced only with
``--overwrite``; the input adapter or ``--base`` themselves (however spelled), a directory inside one or a directory
that contains one are always refused. Every bad argument gets one ``error:`` line on stderr and exit status 2; SIGTERM
and Ctrl-C stop the run cleanly (status 143 or 130).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from ._files import atomic_directory, check_adapter_dir, check_output_dir


# A Hub model id: "name" or "owner/name"; anything else that does not exist on disk is a missing local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class _Parser(argparse.ArgumentParser):
    """argparse with the usage block left out of errors: one ``error:`` line, as for every other bad argument."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Terminated(BaseException):
    """SIGTERM as an exception, so that ``atomic_directory`` removes its temporary directory before the exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut short the clean-up of the first
    raise _Terminated(signum)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_adapter(path: str, flag: str) -> None:
    if not path.strip():
        raise ValueError(f"{flag} is empty ({path!r}). Give the adapter directory that `save_pretrained` wrote.")
    try:
        check_adapter_dir(path)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{flag}: {exc}") from exc


def _check_base(path: str) -> None:
    """A local model directory, or a Hub model id (which only loading can check)."""
    if not path.strip():
        raise ValueError(f"`--base` is empty ({path!r}). Give the model directory that `save_pretrained` wrote.")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"`--base` {path!r} has no config.json (it holds {sorted(os.listdir(path))[:5]}). Pass the model "
                "directory that `save_pretrained` wrote."
            )
    elif os.path.lexists(path):
        raise ValueError(
            f"`--base` {path!r} is a file, not a directory. Pass the model directory that `save_pretrained` wrote "
            "(it holds config.json and the weights)."
        )
    elif not _HUB_ID.match(path):
        raise FileNotFoundError(
            f"`--base` {path!r} does not exist. Pass the model directory that `save_pretrained` wrote, or a Hub "
            "model id."
        )


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any model is loaded or anything is written."""
    if args.command == "write-rocks":
        return _check_write_rocks(args)
    if args.command == "export":
        if args.keep_fraction is not None and not (math.isfinite(args.keep_fraction) and 0 < args.keep_fraction <= 1):
            raise ValueError(
                f"`--keep-fraction` must be a number in (0, 1], got {args.keep_fraction!r}. 0.66 keeps the top 66% of "
                "the adapters."
            )
        if args.budget_bytes is not None and args.budget_bytes <= 0:
            raise ValueError(
                f"`--budget-bytes` must be a positive number of bytes, got {args.budget_bytes!r}. For example "
                "`--budget-bytes 500000` keeps the best adapters that fit 500 kB."
            )
    if getattr(args, "score", None) == "relative" and args.base is None:
        raise ValueError(
            "`--score relative` needs `--base`: the relative score compares the update with the base weights. Pass "
            "`--base`, or choose `--score z` or `--score rms`."
        )
    adapter_flag = "`--adapter`" if args.command == "fuse" else "`adapter`"
    _check_adapter(args.adapter, adapter_flag)
    if args.base is not None:
        _check_base(args.base)
    if args.command in ("export", "fuse"):
        inputs = {f"the input adapter directory {adapter_flag}": args.adapter, "`--base`": args.base}
        check_output_dir(
            args.out, inputs=inputs, overwrite=args.overwrite, argument="`--out`", overwrite_hint="`--overwrite`"
        )


def _load_base(path: str):
    from transformers import AutoModelForSemanticSegmentation

    import peft_vision_ext  # noqa: F401  (registers our models and methods)

    try:
        return AutoModelForSemanticSegmentation.from_pretrained(path).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        what = "the model directory" if os.path.isdir(path) else "the Hub model id"
        raise ValueError(
            f"`--base` {path!r}: cannot load {what} ({_one_line(exc)}). Pass a directory that `save_pretrained` wrote "
            "for a model that AutoModelForSemanticSegmentation loads."
        ) from exc


def _load_peft(base_path: str, adapter_path: str, adapter_flag: str):
    from peft import PeftModel

    base = _load_base(base_path)
    try:
        return PeftModel.from_pretrained(base, adapter_path).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(
            f"{adapter_flag} {adapter_path!r} does not load onto `--base` {base_path!r}: {_one_line(exc)}"
        ) from exc


def _rank(args: argparse.Namespace) -> int:
    from .analysis import rank_adapters, score_adapters

    model = _load_peft(args.base, args.adapter, "`adapter`") if args.base else None
    score = args.score or ("relative" if model is not None else "z")
    ranked = rank_adapters(score_adapters(args.adapter, model=model), score)
    if args.json:
        print(json.dumps([{"module": s.module, "numel": s.numel, "nbytes": s.nbytes, **s.scores} for s in ranked]))
        return 0
    names = sorted({key for s in ranked for key in s.scores})
    header = f"{'rank':>4}  {'module':<44} {'params':>9} {'bytes':>9} {'cum. bytes':>11}  " + "  ".join(
        f"{n:>10}" for n in names
    )
    print(f"ranked by {score!r}\n{header}")
    cumulative = 0
    for index, s in enumerate(ranked, 1):
        cumulative += s.nbytes
        values = "  ".join(f"{s.scores[n]:>10.4g}" for n in names)
        print(f"{index:>4}  {s.module:<44} {s.numel:>9} {s.nbytes:>9} {cumulative:>11}  {values}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .analysis import export_adapters, score_adapters, select_adapters

    model = _load_peft(args.base, args.adapter, "`adapter`") if args.base else None
    scores = score_adapters(args.adapter, model=model)
    keep = select_adapters(scores, score=args.score, keep_fraction=args.keep_fraction, budget_bytes=args.budget_bytes)
    result = export_adapters(args.adapter, args.out, keep, overwrite=args.overwrite)
    print(
        f"kept {len(result.kept)} of {len(result.kept) + len(result.dropped)} adapters (score {args.score!r}); "
        f"update: {result.nbytes} bytes, full adapter: {result.full_nbytes} bytes "
        f"({100 * result.reduction:.1f}% smaller) -> {result.path}"
    )
    return 0


def _fuse(args: argparse.Namespace) -> int:
    model = _load_peft(args.base, args.adapter, "`--adapter`")
    fused = model.merge_and_unload(safe_merge=True)
    with atomic_directory(
        args.out, overwrite=args.overwrite, argument="`--out`", overwrite_hint="`--overwrite`"
    ) as tmp:
        fused.save_pretrained(tmp)
    params = sum(p.numel() for p in fused.parameters())
    biases = len(getattr(fused.config, "conv_bias_modules", None) or [])
    print(f"fused {type(fused).__name__}: {params} parameters ({biases} conv biases created by fusion) -> {args.out}")
    return 0


_WRITE_ROCKS_FLAGS = {
    "domain": "`--domain`",
    "image_format": "`--format`",
    "train": "`--train`",
    "validation": "`--validation`",
    "test": "`--test`",
    "image_size": "`--image_size`",
    "seed": "`--seed`",
}


def _check_write_rocks(args: argparse.Namespace) -> None:
    from .data.rock_folders import check_rock_folder_arguments

    counts = {"train": args.train, "validation": args.validation, "test": args.test}
    check_rock_folder_arguments(args.domain, counts, args.image_size, args.seed, args.format, _WRITE_ROCKS_FLAGS)
    check_output_dir(args.out_dir, overwrite=args.overwrite, argument="`OUT_DIR`", overwrite_hint="`--overwrite`")


def _write_rocks(args: argparse.Namespace) -> int:
    from .data.rock_folders import write_rock_folders

    written = write_rock_folders(
        args.out_dir,
        args.domain,
        train=args.train,
        validation=args.validation,
        test=args.test,
        image_size=args.image_size,
        seed=args.seed,
        image_format=args.format,
        instances=args.instances,
        overwrite=args.overwrite,
        argument="`OUT_DIR`",
        overwrite_hint="`--overwrite`",
    )
    size = f"{written.image_size}x{written.image_size}"
    for split, count in written.counts.items():
        print(
            f"{split}: {count} image{'s' if count != 1 else ''} + palette masks ({written.domain}, {size} {written.image_format.upper()}, "
            f"seed {args.seed}) -> {written.split_dir(split)}"
        )
    classes = ", ".join(f"{class_id} {name}" for class_id, name in written.id2label.items())
    print(f"classes: {classes} -> {written.id2label_file}")
    for split, coco in written.instances.items():
        rocks = ", ".join(f"{count} {name}" for name, count in coco.per_class.items())
        empty = f" ({coco.empty} without a rock left out)" if coco.empty else ""
        print(
            f"instances {split}: {coco.images} images{empty}, {rocks} (COCO RLE) -> "
            f"{os.path.join(written.instance_dir(split), 'annotations.json')}"
        )
    print(f"train on it: {written.train_command()}")
    if written.instances:
        print(f"instance segmentation: {written.train_command('instance')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peft-vision", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Parsed by peft_vision_ext.train's own HfArgumentParser (main hands it everything after "train"); listed here for
    # `peft-vision --help`.
    sub.add_parser(
        "train",
        help="fine-tune a checkpoint on your images with a PEFT method (see `peft-vision train --help`)",
        add_help=False,
    )
    overwrite_help = "replace --out if it exists and is not empty (never allowed: the inputs, or a folder holding one)"

    rank = sub.add_parser("rank", help="score and rank the adapters of an adapter directory")
    rank.add_argument("adapter", help="adapter directory written by save_pretrained")
    rank.add_argument("--base", help="base model directory; enables the 'relative' score")
    rank.add_argument("--score", choices=("z", "rms", "relative"), help="default: 'relative' with --base, else 'z'")
    rank.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rank.set_defaults(func=_rank)

    export = sub.add_parser("export", help="write an adapter directory with only the top-ranked adapters")
    export.add_argument("adapter", help="adapter directory written by save_pretrained")
    export.add_argument("--out", required=True, help="output adapter directory (new, or empty; see --overwrite)")
    group = export.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep-fraction", type=float, help="keep this fraction of adapters, in (0, 1], e.g. 0.66")
    group.add_argument("--budget-bytes", type=int, help="keep the best adapters that fit this many bytes (> 0)")
    export.add_argument("--score", default="z", choices=("z", "rms", "relative"), help="ranking score (default: z)")
    export.add_argument("--base", help="base model directory (needed for --score relative)")
    export.add_argument("--overwrite", action="store_true", help=overwrite_help)
    export.set_defaults(func=_export)

    fuse = sub.add_parser("fuse", help="fold an adapter into its base model and save the fused model")
    fuse.add_argument("--base", required=True, help="base model directory (or Hub id)")
    fuse.add_argument("--adapter", required=True, help="adapter directory")
    fuse.add_argument(
        "--out", required=True, help="output directory for the fused model (new, or empty; see --overwrite)"
    )
    fuse.add_argument("--overwrite", action="store_true", help=overwrite_help)
    fuse.set_defaults(func=_fuse)

    write_rocks = sub.add_parser(
        "write-rocks",
        help="write the embedded rock scenes as a folder dataset for `peft-vision train --train_dir`",
        description=(
            "Render rock scenes of one domain into OUT_DIR/{train,validation,test}/{images,masks} (masks: palette "
            "PNGs, palette index = class id) and OUT_DIR/id2label.json, the layout `peft-vision train --train_dir` "
            "reads; the scenes are those of --dataset_name embedded:rocks/<domain> with the same size and seed."
        ),
    )
    write_rocks.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (new, or empty; see --overwrite)")
    write_rocks.add_argument(
        "--domain",
        required=True,
        metavar="DOMAIN",
        help="rock domain: source, moon-real, mars, moon-highsun or moon-boulders",
    )
    write_rocks.add_argument("--train", type=int, default=64, metavar="N", help="training images (default: 64)")
    write_rocks.add_argument(
        "--validation",
        type=int,
        default=16,
        metavar="N",
        help="validation images (default: 16; 0: none, `peft-vision train` then holds some training images out)",
    )
    write_rocks.add_argument("--test", type=int, default=32, metavar="N", help="test images (default: 32; 0: none)")
    write_rocks.add_argument(
        "--image_size",
        "--image-size",
        type=int,
        default=128,
        metavar="PIXELS",
        help="side of the square images (32-4096; default: 128)",
    )
    write_rocks.add_argument("--seed", type=int, default=0, metavar="N", help="scene seed (default: 0)")
    write_rocks.add_argument(
        "--format", default="png", metavar="{png,jpeg}", help="image file format (default: png); masks are always PNG"
    )
    write_rocks.add_argument(
        "--instances",
        action="store_true",
        help="also write instance scenes with COCO annotations to OUT_DIR/instances/<split>/ (for --task instance)",
    )
    write_rocks.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR (all of it) if it exists and is not empty"
    )
    write_rocks.set_defaults(func=_write_rocks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-vision``; returns the exit status. Bad arguments print one ``error:`` line to stderr (argparse's
    own, such as a missing flag, exit with ``SystemExit(2)``; the others return 2) and nothing is loaded or written.
    ``peft-vision train ...`` runs :func:`peft_vision_ext.train.main` on the arguments after ``train``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        _check_args(args)
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:  # OSError: FileNotFoundError, FileExistsError, PermissionError
        print(f"peft-vision {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (_Terminated, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        print(f"peft-vision {args.command}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

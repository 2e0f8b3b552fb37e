# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""``peft-vision``: rank, export and fuse conv adapters from the command line.

The ground-station / spacecraft workflow of seed 000::

    peft-vision rank   out/adapter --base out/base                       # which adapters matter
    peft-vision export out/adapter --keep-fraction 0.66 --out out/update # ship only those
    peft-vision fuse   --base out/base --adapter out/update --out out/fused   # on board: fold into the convs

``--base`` is a directory written by ``save_pretrained`` (or a Hub id, with network access) of a model that
``transformers.AutoModelForSemanticSegmentation`` can load; peft_vision_ext's U-Net is registered with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _load_base(path: str):
    from transformers import AutoModelForSemanticSegmentation

    import peft_vision_ext  # noqa: F401  (registers our models and methods)

    return AutoModelForSemanticSegmentation.from_pretrained(path).eval()


def _load_peft(base_path: str, adapter_path: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_base(base_path), adapter_path).eval()


def _rank(args: argparse.Namespace) -> int:
    from .analysis import rank_adapters, score_adapters

    model = _load_peft(args.base, args.adapter) if args.base else None
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

    model = _load_peft(args.base, args.adapter) if args.base else None
    scores = score_adapters(args.adapter, model=model)
    keep = select_adapters(scores, score=args.score, keep_fraction=args.keep_fraction, budget_bytes=args.budget_bytes)
    result = export_adapters(args.adapter, args.out, keep)
    print(
        f"kept {len(result.kept)} of {len(result.kept) + len(result.dropped)} adapters (score {args.score!r}); "
        f"update: {result.nbytes} bytes, full adapter: {result.full_nbytes} bytes "
        f"({100 * result.reduction:.1f}% smaller) -> {result.path}"
    )
    return 0


def _fuse(args: argparse.Namespace) -> int:
    model = _load_peft(args.base, args.adapter)
    fused = model.merge_and_unload(safe_merge=True)
    fused.save_pretrained(args.out)
    params = sum(p.numel() for p in fused.parameters())
    biases = len(getattr(fused.config, "conv_bias_modules", None) or [])
    print(f"fused {type(fused).__name__}: {params} parameters ({biases} conv biases created by fusion) -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-vision", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rank = sub.add_parser("rank", help="score and rank the adapters of an adapter directory")
    rank.add_argument("adapter", help="adapter directory written by save_pretrained")
    rank.add_argument("--base", help="base model directory; enables the 'relative' score")
    rank.add_argument("--score", choices=("z", "rms", "relative"), help="default: 'relative' with --base, else 'z'")
    rank.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rank.set_defaults(func=_rank)

    export = sub.add_parser("export", help="write an adapter directory with only the top-ranked adapters")
    export.add_argument("adapter", help="adapter directory written by save_pretrained")
    export.add_argument("--out", required=True, help="output adapter directory")
    group = export.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep-fraction", type=float, help="keep this fraction of adapters, e.g. 0.66")
    group.add_argument("--budget-bytes", type=int, help="keep the best adapters that fit this many bytes")
    export.add_argument("--score", default="z", choices=("z", "rms", "relative"), help="ranking score (default: z)")
    export.add_argument("--base", help="base model directory (needed for --score relative)")
    export.set_defaults(func=_export)

    fuse = sub.add_parser("fuse", help="fold an adapter into its base model and save the fused model")
    fuse.add_argument("--base", required=True, help="base model directory (or Hub id)")
    fuse.add_argument("--adapter", required=True, help="adapter directory")
    fuse.add_argument("--out", required=True, help="output directory for the fused model (save_pretrained)")
    fuse.set_defaults(func=_fuse)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "score", None) == "relative" and not getattr(args, "base", None):
        parser.error("--score relative needs --base (the relative score compares the update with the base weights)")
    adapter = getattr(args, "adapter", None)
    if adapter and not os.path.isdir(adapter):
        parser.error(f"adapter directory {adapter!r} does not exist")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"peft-vision {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The recipes' shared protocol over ``peft-vision train``: pretrain a source model, then compare methods on target
data with a learning rate chosen on validation data and several seeds.

Every training run is one in-process run of ``peft-vision train`` (:func:`~peft_vision_ext.train.prepare_run` and
:func:`~peft_vision_ext.train.execute` on settings built here), so the recipes train, evaluate and save exactly as
the command does for a user's checkpoint and images. A recipe is then a short protocol over :class:`Protocol`:

1. :meth:`Protocol.pretrain`: save a freshly built model and train it in full on the source data; the run's output
   directory is the source checkpoint (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
2. :meth:`Protocol.evaluate`: the source checkpoint on a target's test split, without training (zero-shot).
3. :meth:`Protocol.compare`, per method: carve ``--validation_split_fraction`` of the target's training scenes out
   as validation data (the same carve for every method and seed: ``--data_split_seed``), train once per learning
   rate of the grid (``--learning_rates``, the same grid for every method) with the first seed, keep the rate with
   the best validation score, train the other seeds (``--seeds`` in all) with it, and report the test metrics as mean
   and standard deviation over the seeds (sample standard deviation, ``ddof=1``; 0 for one seed). A callback sees
   every run at the chosen rate with its trained model, for the recipe's own measurements (ranking, fusion, gates,
   pruning); their numbers are aggregated over the seeds the same way.

Output layout: ``<output_dir>/<target>/<name>/lr<rate>-seed<seed>/`` holds each run's ``peft-vision train``
outputs (``results.json``, the adapter or model with its card). The weights of the runs at rates that were not
chosen are removed once the rate is chosen (their ``results.json`` stays).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser

from .._files import atomic_directory, atomic_write_text, check_output_dir
from .arguments import train_args_from_dict
from .runner import Plan, evaluate_split, execute, json_safe, prepare_run


logger = logging.getLogger("peft_vision_ext.train.protocol")

# TrainingArguments fields a recipe does not forward to its runs: the protocol sets them per run, or they concern the
# recipe's own output folder, or they would reach outside (pushing every run to the Hub).
_RUN_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "seed",
        "run_name",
        "logging_dir",
        "save_strategy",
        "eval_strategy",
        "report_to",
        "push_to_hub",
        "resume_from_checkpoint",
        "do_train",
        "do_eval",
        "do_predict",
    }
)
_RUN_FIELDS_PREFIXES = ("hub_", "_")


@dataclass
class ProtocolArguments:
    """How a recipe compares methods (every recipe has these)."""

    learning_rates: list[float] = field(
        default_factory=lambda: [3e-4, 1e-3, 3e-3],
        metadata={
            "help": (
                "The learning-rate grid, the same for every method: each method trains once per rate (first seed) "
                "and keeps the rate with the best validation score."
            )
        },
    )
    seeds: int = field(
        default=3,
        metadata={"help": "Seeds per method at the chosen rate (--seed, --seed + 1, ...); results are mean ± std."},
    )
    validation_split_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of each target's training scenes held out to choose the learning rate."},
    )

    def __post_init__(self):
        rates = self.learning_rates
        if not rates or not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"`--learning_rates` must be positive finite numbers, got {rates!r}.")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"`--seeds` must be a positive whole number, got {self.seeds!r}.")
        fraction = self.validation_split_fraction
        if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
            raise ValueError(f"`--validation_split_fraction` must be in (0, 1), got {fraction!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# A recipe's command line
# ----------------------------------------------------------------------------------------------------------------------
OVERWRITE_OUTPUT_DIR = "--overwrite_output_dir"
_OVERWRITE_HELP = (
    "Write into a non-empty --output_dir: the files and folders this run writes replace those there; other files are "
    "left alone. Without it a non-empty --output_dir is refused."
)


def check_recipe_output_dir(parser: argparse.ArgumentParser, output_dir: str, overwrite: bool) -> None:
    """Refuse (``parser.error``: one message, exit status 2, before any work) an ``--output_dir`` that is a file, lies
    below a file, or is a non-empty directory while ``overwrite`` (``--overwrite_output_dir``) is false."""
    try:
        check_output_dir(
            output_dir, overwrite=overwrite, argument="`--output_dir`", overwrite_hint=f"`{OVERWRITE_OUTPUT_DIR}`"
        )
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None,
    *,
    default_output_dir: str,
    quick: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[HfArgumentParser, tuple]:
    """Parse a recipe's arguments like the transformers examples: a ``.json`` settings path (optionally followed by
    ``--overwrite_output_dir``, which the file may also set), or command-line flags (``--output_dir`` defaults to
    ``default_output_dir``). When a parsed dataclass has ``quick=True``, every field named in ``quick`` is overridden
    in every dataclass that has it (``TrainingArguments`` excepted). ``defaults`` replaces fields' defaults (a recipe's own
    learning-rate grid, say) for both the flags and a settings file that leaves the field out; a name that no parsed
    dataclass has is a programming error (``ValueError``). A non-empty output directory is refused unless
    ``--overwrite_output_dir`` is given (:func:`check_recipe_output_dir`); bad values (e.g. of
    :class:`ProtocolArguments`) end in ``parser.error``. Returns the parser and the parsed dataclasses, in order."""
    from transformers import TrainingArguments

    parser = HfArgumentParser(tuple(dataclass_types))
    defaults = dict(defaults or {})
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    if set(defaults) - known:
        raise ValueError(f"`defaults` names fields no recipe dataclass has: {sorted(set(defaults) - known)}")
    parser.set_defaults(**defaults)
    # transformers 4.x's TrainingArguments has the field itself (5.x dropped it): then it is parsed as such.
    in_dataclass = any(f.name == "overwrite_output_dir" for t in dataclass_types for f in dataclasses.fields(t))
    if not in_dataclass:
        parser.add_argument(OVERWRITE_OUTPUT_DIR, action="store_true", help=_OVERWRITE_HELP)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0].endswith(".json"):
            extra = [arg for arg in argv[1:] if arg != OVERWRITE_OUTPUT_DIR]
            if extra:
                parser.error(
                    f"after the settings file {argv[0]!r} only {OVERWRITE_OUTPUT_DIR} is accepted, got {extra}; put "
                    "the other settings in the file."
                )
            if not os.path.isfile(argv[0]):
                parser.error(f"settings file {argv[0]!r} does not exist; pass the path of a recipe's .json settings.")
            with open(argv[0], encoding="utf-8") as handle:
                settings = json.load(handle)
            if not isinstance(settings, dict):
                parser.error(f"settings file {argv[0]!r} must hold a JSON object, got {type(settings).__name__}.")
            settings = {**defaults, **settings}
            if OVERWRITE_OUTPUT_DIR in argv[1:]:
                settings["overwrite_output_dir"] = True
            overwrite = bool(settings.get("overwrite_output_dir", False))
            if not in_dataclass:
                settings.pop("overwrite_output_dir", None)
            parsed = list(parser.parse_dict(settings))
        else:
            defaults = ["--output_dir", default_output_dir] if "--output_dir" not in argv else []
            parsed = list(parser.parse_args_into_dataclasses(defaults + argv))
            if not in_dataclass:
                overwrite = parsed.pop().overwrite_output_dir  # the namespace of the flags outside the dataclasses
            else:
                overwrite = any(getattr(args, "overwrite_output_dir", False) for args in parsed)
    except (ValueError, TypeError) as exc:  # a dataclass's own checks (__post_init__), unknown keys of a file
        parser.error(" ".join(str(exc).split()))
    output_dir = next(args.output_dir for args in parsed if hasattr(args, "output_dir"))
    check_recipe_output_dir(parser, output_dir, overwrite)
    if quick and any(getattr(args, "quick", False) for args in parsed):
        for args in parsed:
            if isinstance(args, TrainingArguments):
                continue
            for key, value in quick.items():
                if hasattr(args, key):
                    setattr(args, key, value)
    return parser, tuple(parsed)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` of finite numbers (NaN and None are left out of mean and std, kept in values);
    the sample standard deviation (``ddof=1``), 0 for a single value."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    mean = statistics.fmean(finite) if finite else None
    std = statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else None)
    return {"mean": mean, "std": std, "values": list(values)}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The records (one per seed) as one record whose numeric leaves are :func:`mean_std` of theirs (nested dicts
    such as per-class IoU included); other leaves are kept when all records agree."""
    if not records:
        return {}
    out: dict[str, Any] = {}
    for key in records[0]:
        values = [record.get(key) for record in records]
        first = values[0]
        if isinstance(first, Mapping):
            out[key] = aggregate([v if isinstance(v, Mapping) else {} for v in values])
        elif isinstance(first, (int, float)) and not isinstance(first, bool) or first is None:
            if all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out[key] = mean_std(values)
        elif all(v == first for v in values):
            out[key] = first
    return out


def fmt(stat: Mapping[str, Any] | float | None, digits: int = 3) -> str:
    """``"0.812 ± 0.010"`` for a :func:`mean_std` over several values, ``"0.812"`` for one, ``"-"`` for none."""
    if stat is None:
        return "-"
    if not isinstance(stat, Mapping):
        return f"{stat:.{digits}f}" if math.isfinite(stat) else "-"
    if stat.get("mean") is None:
        return "-"
    if len(stat.get("values", ())) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One ``peft-vision train`` run: its results (as in its ``results.json``), the trained model and the plan (the
    loaded data, the image processor, the label set)."""

    name: str
    method: str
    learning_rate: float
    seed: int
    output_dir: str
    results: dict[str, Any]
    model: torch.nn.Module
    plan: Plan
    seconds: float

    def score(self, split: str, metric: str) -> float:
        value = self.results.get(split, {}).get(metric)
        return float(value) if value is not None and math.isfinite(value) else float("-inf")


def training_settings(training_args) -> dict[str, Any]:
    """The recipe's ``TrainingArguments`` settings that every run takes over (batch sizes, scheduler, warm-up,
    weight decay, precision, logging, data loading, ...): those that differ from the defaults, less the ones the
    protocol sets per run."""
    from transformers import TrainingArguments

    defaults = TrainingArguments(output_dir=training_args.output_dir)
    out = {}
    for item in dataclasses.fields(TrainingArguments):
        name = item.name
        if not item.init or name in _RUN_FIELDS or name.startswith(_RUN_FIELDS_PREFIXES):
            continue
        value = getattr(training_args, name)
        if value == getattr(defaults, name):
            continue
        out[name] = value.value if isinstance(value, enum.Enum) else value
    return out


def _rate_name(rate: float) -> str:
    return f"{rate:g}"


class Protocol:
    """Runs of ``peft-vision train`` for one recipe (see the module docstring).

    Args:
        output_dir: the recipe's output folder (already checked by the recipe's argument parsing).
        training_args: the recipe's ``TrainingArguments``; :func:`training_settings` of them go to every run, and
            ``seed`` is the first seed.
        protocol_args: the learning-rate grid, the number of seeds and the validation share.
        task: ``"semantic"`` (selected by validation mIoU) or ``"instance"`` (by validation mask AP).
        data_settings: ``peft-vision train`` data settings every run takes (``image_size``, ``data_split_seed``,
            augmentation, ...).
    """

    def __init__(
        self,
        output_dir: str,
        training_args,
        protocol_args: ProtocolArguments,
        *,
        task: str = "semantic",
        data_settings: Mapping[str, Any] | None = None,
    ):
        self.output_dir = output_dir
        self.protocol = protocol_args
        self.task = task
        self.metric = "mean_iou" if task == "semantic" else "map"
        self.first_seed = training_args.seed
        self.seeds = [training_args.seed + i for i in range(protocol_args.seeds)]
        self.common = {**training_settings(training_args), "task": task, **(data_settings or {})}

    # --- one run ------------------------------------------------------------------------------------------------------
    def settings(
        self,
        checkpoint: str,
        dataset: str,
        method: str,
        *,
        learning_rate: float,
        epochs: float,
        seed: int,
        output_dir: str,
        peft: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """The ``peft-vision train`` settings of one run (what its ``.json`` settings file would hold)."""
        return {
            **self.common,
            "model_name_or_path": checkpoint,
            "dataset_name": dataset,
            "method": method,
            "output_dir": output_dir,
            "overwrite_output_dir": True,
            "learning_rate": learning_rate,
            "num_train_epochs": epochs,
            "seed": seed,
            "save_strategy": "no",
            "report_to": "none",
            **(peft or {}),
            **overrides,
        }

    def train(self, name: str, checkpoint: str, dataset: str, method: str, **settings: Any) -> Run:
        """One ``peft-vision train`` run with :meth:`settings`; returns it with the trained model."""
        values = self.settings(checkpoint, dataset, method, **settings)
        started = time.perf_counter()
        plan = prepare_run(train_args_from_dict(values))
        results = execute(plan, ["<recipe>", name])
        seconds = time.perf_counter() - started
        run = Run(
            name,
            method,
            values["learning_rate"],
            values["seed"],
            values["output_dir"],
            results,
            plan.model,
            plan,
            seconds,
        )
        logger.info(
            "%s, lr %g, seed %d: validation %s %.4f, test %s %.4f (%.0f s)",
            name,
            run.learning_rate,
            run.seed,
            self.metric,
            run.score("validation", self.metric),
            self.metric,
            run.score("test", self.metric),
            seconds,
        )
        return run

    # --- the protocol's steps -----------------------------------------------------------------------------------------
    def pretrain(
        self,
        build_model: Callable[[], torch.nn.Module],
        dataset: str,
        *,
        learning_rate: float,
        epochs: float,
        name: str = "source_model",
        **overrides: Any,
    ) -> tuple[str, dict[str, Any]]:
        """Build a fresh model with ``build_model()`` (e.g. ``lambda: UNetForSemanticSegmentation(config)``), seeded
        with the protocol's first seed, and train it in full on ``dataset`` as ``<output_dir>/<name>``: the source
        checkpoint. Returns its directory and the run's results (validation and test on the source domain).

        A function rather than a model: the random initial weights must come after the seed is set. torch seeds its
        generator differently in every process, so a model built before would start every run of the recipe from
        different weights (seen: two runs of the space-rocks recipe whose source models scored 0.801 and 0.787 mIoU on
        moon-real without adaptation).

        Raises:
            TypeError: ``build_model`` is a model or not callable.
        """
        from transformers import set_seed

        from ..models import save_image_processor

        if isinstance(build_model, torch.nn.Module) or not callable(build_model):
            raise TypeError(
                f"Protocol.pretrain takes a function that builds the fresh source model, got a "
                f"{type(build_model).__name__}. Pass e.g. `lambda: UNetForSemanticSegmentation(config)`: the "
                "protocol sets its seed first, so the initial weights are the same in every run."
            )
        set_seed(self.first_seed)
        model = build_model()
        directory = os.path.join(self.output_dir, name)
        with tempfile.TemporaryDirectory(prefix="peft-vision-init-") as initial:
            model.save_pretrained(initial)
            save_image_processor(model, initial)
            run = self.train(
                name,
                initial,
                dataset,
                "full",
                learning_rate=learning_rate,
                epochs=epochs,
                seed=self.first_seed,
                output_dir=directory,
                **overrides,
            )
        return directory, run.results

    def evaluate(self, checkpoint: str, dataset: str, split: str = "test") -> dict[str, Any]:
        """The checkpoint's metrics on a split of ``dataset``, without training (a zero-shot baseline)."""
        with tempfile.TemporaryDirectory(prefix="peft-vision-eval-") as scratch:
            values = self.settings(
                checkpoint,
                dataset,
                "full",
                learning_rate=1.0,
                epochs=0,
                seed=self.first_seed,
                output_dir=os.path.join(scratch, "unused"),
                validation_from_train=True,
                validation_split_fraction=self.protocol.validation_split_fraction,
            )
            plan = prepare_run(train_args_from_dict(values))
            plan.model.eval()
            return evaluate_split(plan.model, plan.eval_datasets[split], plan)

    def compare(
        self,
        target: str,
        name: str,
        checkpoint: str,
        dataset: str,
        method: str,
        *,
        epochs: float,
        peft: Mapping[str, Any] | None = None,
        on_run: Callable[[Run], Mapping[str, Any] | None] | None = None,
        learning_rates: Sequence[float] | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Choose ``method``'s learning rate on validation data carved from ``dataset``'s training split, train every
        seed with it, and aggregate (see the module docstring). ``on_run(run)`` is called for every run at the chosen
        rate while its model is alive; the numbers it returns are aggregated as ``extras``. ``learning_rates``
        replaces the grid (e.g. ``[rate]`` to reuse a rate chosen for a related setting)."""
        rates = list(learning_rates or self.protocol.learning_rates)
        folder = os.path.join(self.output_dir, target, name)

        def run(rate: float, seed: int) -> Run:
            return self.train(
                f"{target}/{name}",
                checkpoint,
                dataset,
                method,
                learning_rate=rate,
                epochs=epochs,
                seed=seed,
                output_dir=os.path.join(folder, f"lr{_rate_name(rate)}-seed{seed}"),
                peft=peft,
                validation_from_train=True,
                validation_split_fraction=self.protocol.validation_split_fraction,
                **overrides,
            )

        grid = [run(rate, self.seeds[0]) for rate in rates]
        scores = {_rate_name(r.learning_rate): r.score("validation", self.metric) for r in grid}
        best = max(grid, key=lambda r: r.score("validation", self.metric))  # ties: the first (smallest) rate
        for other in grid:
            if other is not best:
                _drop_weights(other.output_dir)
                other.model = None  # free it before the next runs
        logger.info(
            "%s/%s: learning rate %g chosen (validation %s: %s)", target, name, best.learning_rate, self.metric, scores
        )

        records, extras = [], []
        for index, seed in enumerate(self.seeds):
            current = best if index == 0 else run(best.learning_rate, seed)
            extra = dict(on_run(current) or {}) if on_run is not None else {}
            extras.append(extra)
            records.append(
                {
                    "seed": seed,
                    "learning_rate": current.learning_rate,
                    "output_dir": current.output_dir,
                    "seconds": current.seconds,
                    "train_runtime": current.results.get("train", {}).get("train_runtime"),
                    "validation": current.results.get("validation"),
                    "test": current.results.get("test"),
                    **({"extras": extra} if extra else {}),
                }
            )
            if index == 0:
                first = current
            current.model = None
        trainable, total = first.results["trainable_parameters"], first.results["base_parameters"]
        return {
            "name": name,
            "method": method,
            "peft_settings": dict(peft or {}),
            "learning_rate": best.learning_rate,
            "selection": {
                "metric": f"validation {self.metric}",
                "seed": self.seeds[0],
                "scores": scores,
                "validation_samples": first.results["data"]["validation_samples"],
                "train_samples": first.results["data"]["train_samples"],
            },
            "seeds": list(self.seeds),
            "trainable_parameters": trainable,
            "base_parameters": total,
            "trainable_percent": 100.0 * trainable / total,
            "runs": records,
            "test": aggregate([r["test"] for r in records]),
            "validation": aggregate([r["validation"] for r in records]),
            "extras": aggregate(extras),
            "seconds": sum(r.seconds for r in grid) + sum(r["seconds"] for r in records[1:]),
        }

    def write(self, results: Mapping[str, Any], table: str) -> None:
        """``results.json`` and ``results.md`` in the output folder, each replaced in one step."""
        atomic_write_text(os.path.join(self.output_dir, "results.json"), json.dumps(json_safe(results), indent=2))
        atomic_write_text(os.path.join(self.output_dir, "results.md"), table)


def _drop_weights(directory: str) -> None:
    """Remove a run's model files, keeping its ``results.json`` and card (runs at rates that were not chosen)."""
    if not os.path.isdir(directory):
        return
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry.endswith((".safetensors", ".bin")) and os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path) and entry in ("merged", "ranked"):
            shutil.rmtree(path)


def save_checkpoint(model: torch.nn.Module, directory: str) -> None:
    """``save_pretrained`` with the image processor, into ``directory`` through a temporary sibling."""
    from ..models import save_image_processor

    with atomic_directory(directory, overwrite=True) as temporary:
        model.save_pretrained(temporary)
        save_image_processor(model, temporary)


__all__ = [
    "Protocol",
    "ProtocolArguments",
    "check_recipe_output_dir",
    "parse_recipe_args",
    "Run",
    "aggregate",
    "fmt",
    "mean_std",
    "training_settings",
]

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The plain ``accelerate`` loops of the recipes' ``*_no_trainer.py`` twins, as in the transformers examples
(``run_semantic_segmentation_no_trainer.py``): the flags every twin shares, the run's start and end, a training loop,
a distributed evaluation, and saving from the main process.

A twin refuses a non-empty ``--output_dir`` unless ``--overwrite_output_dir`` is given (the check of the Trainer
recipes, :func:`peft_vision_ext.train.protocol.check_recipe_output_dir`); everything it writes is replaced in one step
(temporary file or folder and rename)."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import get_scheduler

from .._files import atomic_directory, atomic_file, atomic_write_text
from ..models import save_image_processor
from .protocol import _OVERWRITE_HELP, OVERWRITE_OUTPUT_DIR, check_recipe_output_dir


def accelerate_train(
    accelerator,
    model: torch.nn.Module,
    dataset,
    *,
    collate_fn: Callable,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    desc: str,
    scheduler: str = "linear",
    warmup_steps: int = 0,
) -> tuple[torch.nn.Module, float]:
    """A plain ``accelerate`` training loop (AdamW on the trainable parameters, gradient accumulation, tqdm progress
    on the local main process). Returns the prepared model and the last loss, averaged over processes."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{desc}: the model has no trainable parameters; nothing to train.")
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    steps = epochs * math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    progress = tqdm(total=epochs * len(loader), desc=desc, disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    model.train()
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss_value = accelerator.gather(loss.detach()).mean().item()
            progress.set_postfix(loss=f"{loss_value:.3f}")
            progress.update(1)
    progress.close()
    return model, loss_value


@torch.no_grad()
def accelerate_evaluate_segmentation(
    accelerator, model: torch.nn.Module, dataset, *, collate_fn: Callable, batch_size: int, id2label: dict[int, str]
) -> dict[str, Any]:
    """mIoU / per-class IoU / balanced accuracy over all processes (``gather_for_metrics`` drops the samples that
    were duplicated to even out the last batch)."""
    from torch.utils.data import DataLoader

    from ..metrics import ConfusionMatrix, metrics_from_confusion

    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn))
    model.eval()
    confusion = ConfusionMatrix(len(id2label))
    for batch in loader:
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(dim=1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        confusion.update(predictions.cpu(), labels.cpu())
    return metrics_from_confusion(confusion.compute(), id2label=id2label)


def save_rank_state(accelerator, model: torch.nn.Module, output_dir: str) -> None:
    """Write this process's trainable tensors (the peft adapter state for a ``PeftModel``) to
    ``rank<i>.safetensors``: tests compare the files across processes to check that DDP kept them in sync."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, PeftModel):
        state = get_peft_model_state_dict(unwrapped)
    else:
        state = {k: p for k, p in unwrapped.named_parameters() if p.requires_grad}
    with atomic_file(os.path.join(output_dir, f"rank{accelerator.process_index}.safetensors")) as temporary:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, temporary)


def add_accelerate_arguments(parser, *, seed: int) -> None:
    """The command-line flags every accelerate twin shares (run layout, batch sizes, seed, CPU/DDP test switches)."""
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(OVERWRITE_OUTPUT_DIR, action="store_true", help=_OVERWRITE_HELP)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--quick", action="store_true", help="tiny settings for smoke tests")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="run on CPU; with torchrun this uses the gloo backend (env ACCELERATE_USE_CPU=1)",
    )
    parser.add_argument(
        "--dump_rank_state", action="store_true", help="each rank writes its trainable tensors (checks DDP sync)"
    )


def parse_accelerate_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` for a twin, then :func:`check_recipe_output_dir` (every process checks before any of
    them creates the folder: :func:`start_accelerate_run` waits for all of them first)."""
    args = parser.parse_args(argv)
    check_recipe_output_dir(parser, args.output_dir, args.overwrite_output_dir)
    return args


def start_accelerate_run(args, **accelerator_kwargs):
    """The ``Accelerator`` of a twin run (gradient accumulation and ``--cpu`` from ``args``), with logging set up, the
    seed set and the output folder created once every process has checked it (:func:`parse_accelerate_args`)."""
    import logging

    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=args.cpu, **accelerator_kwargs
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    get_logger(__name__).info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    accelerator.wait_for_everyone()
    os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def save_from_main_process(accelerator, model: torch.nn.Module, directory: str) -> None:
    """``save_pretrained`` of the unwrapped model by the main process into a temporary folder renamed to
    ``directory`` when complete (:func:`peft_vision_ext._files.atomic_directory`; an existing ``directory`` is
    replaced), with every process waiting before and after (so no process reads the folder half-written). The
    weights come from ``accelerator.get_state_dict``, which every process calls: under DDP the model's own state
    dict, under FSDP/DeepSpeed the full one gathered from the shards (the main process's own parameters would be
    one shard only)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_directory(directory, overwrite=True) as temporary:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(
                temporary, is_main_process=True, save_function=accelerator.save, state_dict=state_dict
            )
            save_image_processor(unwrapped, temporary)  # so `pipeline(...)` and users read the inputs it expects
    accelerator.wait_for_everyone()


def pretrain_source_model(
    accelerator,
    model: torch.nn.Module,
    dataset,
    args,
    directory: str,
    *,
    collate_fn: Callable,
    scheduler: str = "linear",
) -> None:
    """The twins' source pretraining: :func:`accelerate_train` with ``args.pretrain_epochs``,
    ``args.pretrain_learning_rate`` and ``args.per_device_train_batch_size``, then ``save_pretrained`` to
    ``directory`` from the main process, and the prepared objects freed before adaptation."""
    model, _ = accelerate_train(
        accelerator,
        model,
        dataset,
        collate_fn=collate_fn,
        epochs=args.pretrain_epochs,
        learning_rate=args.pretrain_learning_rate,
        batch_size=args.per_device_train_batch_size,
        desc="pretrain (source)",
        scheduler=scheduler,
    )
    save_from_main_process(accelerator, model, directory)
    accelerator.free_memory()


def finish_accelerate_run(accelerator, model: torch.nn.Module, args, results: dict[str, Any]) -> dict[str, Any]:
    """End a twin run: optional per-rank state dump, the adapter saved to ``<output_dir>/<method>``, ``results.json``
    (with the method, domain and number of processes) written by the main process. Returns the results."""
    from accelerate.logging import get_logger

    if args.dump_rank_state:
        save_rank_state(accelerator, model, args.output_dir)
    save_from_main_process(accelerator, model, os.path.join(args.output_dir, args.method))
    results = {
        "method": args.method,
        "target_domain": args.target_domain,
        "num_processes": accelerator.num_processes,
        **results,
    }
    if accelerator.is_main_process:
        atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
        get_logger(__name__).info("results: %s", results)
    accelerator.end_training()
    return results

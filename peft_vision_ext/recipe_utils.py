# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""What the recipes in ``recipes/`` share: argument handling and per-run training arguments for the Trainer
scripts, and the plain training and evaluation loops of their ``accelerate launch`` twins."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments, get_scheduler


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: list[str] | None,
    *,
    default_output_dir: str,
    quick: Mapping[str, Any] | None = None,
) -> tuple[HfArgumentParser, tuple]:
    """Parse a recipe's arguments like the transformers examples: one ``.json`` settings path, or command-line flags
    (``--output_dir`` defaults to ``default_output_dir``). When a parsed dataclass has ``quick=True``, every field
    named in ``quick`` is overridden in every dataclass that has it. Returns the parser (for ``parser.error``) and
    the parsed dataclasses, in the order given."""
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        defaults = ["--output_dir", default_output_dir] if "--output_dir" not in argv else []
        parsed = parser.parse_args_into_dataclasses(defaults + argv)
    if quick and any(getattr(args, "quick", False) for args in parsed):
        for args in parsed:
            if isinstance(args, TrainingArguments):
                continue
            for key, value in quick.items():
                if hasattr(args, key):
                    setattr(args, key, value)
    return parser, tuple(parsed)


def run_training_args(
    training_args: TrainingArguments, *, run_name: str, learning_rate: float, epochs: float
) -> TrainingArguments:
    """The recipe's ``TrainingArguments`` for one training run: its own output folder under ``trainer/``, no
    checkpoints or evaluation during training, no external loggers; the segmentation batches keep their labels."""
    return dataclasses.replace(
        training_args,
        output_dir=os.path.join(training_args.output_dir, "trainer", run_name),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        run_name=run_name,
        label_names=["labels"],
        remove_unused_columns=False,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
    )


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

    from .metrics import ConfusionMatrix, metrics_from_confusion

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
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        os.path.join(output_dir, f"rank{accelerator.process_index}.safetensors"),
    )

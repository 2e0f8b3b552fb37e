# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""What a method costs and what it achieves, measured the same way for every recipe, benchmark and CLI run.

- Size: :func:`count_parameters` (trainable and total), :func:`base_parameter_count` (the model without its adapters:
  what ``trainable %`` is relative to, :func:`percent`), :func:`update_size_bytes` (the bytes a deployed model must
  receive).
- Compute: :func:`count_flops` (forward FLOPs of one input), with :func:`set_fold_in_eval` to compare conv adapters
  folded into their convolutions against computed as branches.
- Quality: :func:`evaluate_segmentation` (streaming mIoU / per-class IoU / balanced accuracy on one process).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader

from ..metrics import ConfusionMatrix, metrics_from_confusion


__all__ = [
    "base_parameter_count",
    "count_flops",
    "count_parameters",
    "evaluate_segmentation",
    "percent",
    "set_fold_in_eval",
    "update_size_bytes",
]


def set_fold_in_eval(model: nn.Module, enabled: bool) -> None:
    """Switch the eval-mode kernel folding of every conv adapter layer (``False``: compute the branches)."""
    from ..tuners.conv_adapter import ConvAdapterLayer

    for module in model.modules():
        if isinstance(module, ConvAdapterLayer):
            module.fold_in_eval = enabled


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without any adapter: what ``trainable %`` is relative to."""
    if isinstance(model, PeftModel):
        _, total = model.get_nb_trainable_parameters()
        # Remove the adapters and the trained copies of modules_to_save (the originals stay in the count).
        prefix = model.base_model.prefix  # every tuner names its adapter weights with its own prefix
        adapters = sum(p.numel() for n, p in model.named_parameters() if prefix in n)
        modules_to_save = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n)
        return total - adapters - modules_to_save
    return count_parameters(model)[1]


def update_size_bytes(model: nn.Module) -> int:
    """Bytes of the update a deployed model must receive, as one safetensors file.

    For a ``PeftModel``: the adapter file ``save_pretrained`` writes. Otherwise: every tensor of the state dict that
    training changes (all of them for full fine-tuning; the trainable modules with their buffers for partial tuning).
    """
    if isinstance(model, PeftModel):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        trainable_modules = {
            name for name, module in model.named_modules() if any(p.requires_grad for p in module.parameters(False))
        }
        state = {
            key: value for key, value in model.state_dict().items() if key.rpartition(".")[0] in trainable_modules
        }
    state = {key: value.contiguous() for key, value in state.items()}
    return len(safetensors_bytes(state, metadata={"format": "pt"}))


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Iterable[dict[str, torch.Tensor]],
    num_labels: int,
    *,
    batch_size: int = 16,
    ignore_index: int = 255,
    id2label: dict[int, str] | None = None,
    collate_fn: Any = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Streaming mIoU / per-class IoU / balanced accuracy of ``model`` on ``dataset`` (eval mode, no gradients)."""
    from ..data import collate_segmentation

    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn or collate_segmentation)
    confusion = ConfusionMatrix(num_labels, ignore_index=ignore_index)
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        labels = batch["labels"]
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = torch.nn.functional.interpolate(
                logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
        confusion.update(logits.argmax(dim=1).cpu(), labels)
    model.train(was_training)
    return metrics_from_confusion(confusion.compute(), id2label=id2label)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of ``model`` for one input of ``input_shape`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.zeros(input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def percent(part: float, whole: float) -> float:
    """``part`` as a percentage of ``whole`` (NaN when ``whole`` is zero)."""
    return 100.0 * part / whole if whole else math.nan

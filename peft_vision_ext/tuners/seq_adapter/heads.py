# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The task heads the seed-001 methods train in full by default (``modules_to_save=None``), shared by
`SeqAdapterConfig` and `DeformableLoRAConfig`.

Fine-tuning a detection or segmentation model on a new label set (transformers' task guides load it with a new
``id2label`` and ``ignore_mismatched_sizes=True``) replaces its classification head with a freshly initialised one. An
adapter that leaves that head frozen cannot learn the classes, so the head is trained in full and saved with the
adapter. The guides then train the whole model, box heads included; the class-agnostic box heads of the DETR family
are small, so they are trained in full too. Mask2Former's mask head does not depend on the labels and stays frozen
(its decoder gets the adapters).

Heads are found from the head model's class name and attribute paths (see ``HEADS``); a model may also declare its own
(``peft_modules_to_save``, as ``SamForSemanticSegmentation`` does). A bare backbone or encoder
(``DeformableDetrModel``, ``SwinModel``) has no head, and nothing is added.
"""

from __future__ import annotations

import warnings

from torch import nn


# (class-name endings of head models, attribute paths of their heads relative to the head model). A path counts when
# it leads to a module with parameters; a ModuleList (one head per decoder layer) gives an entry per layer
# (`class_embed.0`, ...), as peft cannot wrap a ModuleList. peft matches each `modules_to_save` entry as a suffix of
# module names, so an entry also covers its namesakes deeper in the model: the DETR family's decoder copies
# `model.decoder.class_embed.<i>` (two-stage) and `model.decoder.bbox_embed.<i>` (box refinement), whose parameters
# transformers ties to the head's (see `tie_module_copies`).
HEADS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    # Mask2Former, MaskFormer: the class head (num_labels + 1 outputs).
    (("ForUniversalSegmentation", "ForInstanceSegmentation"), ("class_predictor",)),
    # The DETR family: class and box heads per decoder layer (ModuleLists), at the top (Deformable DETR, Grounding
    # DINO, whose class head is a parameter-free text similarity), or in the decoder (RT-DETR); the two-stage proposal
    # heads of the encoder (RT-DETR's, Grounding DINO's box head) and RT-DETR's denoising label embedding (num_labels
    # + 1 rows); DETR and Conditional DETR name theirs differently.
    (
        ("ForObjectDetection",),
        (
            "class_embed",
            "bbox_embed",
            "model.decoder.class_embed",
            "model.decoder.bbox_embed",
            "model.enc_score_head",
            "model.enc_bbox_head",
            "model.denoising_class_embed",
            "model.encoder_output_bbox_embed",
            "class_labels_classifier",
            "bbox_predictor",
        ),
    ),
)


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def default_heads(model: nn.Module) -> list[str]:
    """The ``modules_to_save`` entries of ``model``'s task heads: those it declares (``peft_modules_to_save``), else
    those ``HEADS`` lists for its class; ``[]`` for a model without a known head."""
    declared = getattr(model, "peft_modules_to_save", None)
    if declared:
        return list(declared)
    class_name = type(model).__name__
    for endings, paths in HEADS:
        if not class_name.endswith(endings):
            continue
        found: list[str] = []
        for path in paths:
            module = _module_at(model, path)
            if module is None:
                continue
            # peft cannot wrap a ModuleList (per-decoder-layer heads): name its layers.
            parts = module.named_children() if isinstance(module, (nn.ModuleList, nn.ModuleDict)) else [("", module)]
            for child_name, child in parts:
                entry = f"{path}.{child_name}" if child_name else path
                if next(child.parameters(), None) is None or any(entry.endswith(e) for e in found):
                    continue  # nothing to train, or an entry already matches it
                found.append(entry)
        return found
    return []


def _trained(head: str, entries: list[str]) -> bool:
    """Whether peft wraps ``head`` (or a module around it) for the ``modules_to_save`` ``entries``."""
    parts = head.split(".")
    return any(".".join(parts[:end]).endswith(entry) for entry in entries for end in range(1, len(parts) + 1))


def resolve_modules_to_save(config, model: nn.Module) -> None:
    """Fill ``config.modules_to_save`` with ``model``'s task heads when it is None. When it is a list (``[]``
    included) that leaves a head frozen, warn with the head's name (not when loading for inference)."""
    heads = default_heads(model)
    if config.modules_to_save is None:
        if heads:
            config.modules_to_save = heads
        return
    for entry in config.modules_to_save:
        for name, module in model.named_modules():
            if name.endswith(entry) and isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                layers = [f"{entry}.{child}" for child, _ in module.named_children()]
                raise ValueError(
                    f"`modules_to_save` entry {entry!r} names `{name}`, a {type(module).__name__} (e.g. one head per "
                    f"decoder layer), which peft cannot train as a whole. Name its parts instead: {layers}, or pass "
                    "`modules_to_save=None` to train the model's heads."
                )
    frozen = [head for head in heads if not _trained(head, config.modules_to_save)]
    if frozen and not config.inference_mode:
        warnings.warn(
            f"`modules_to_save`={config.modules_to_save!r} leaves the head(s) "
            + ", ".join(f"`{head}`" for head in frozen)
            + f" of {type(model).__name__} frozen. Fine-tuned on a new label set, a class head starts from random "
            "weights, and frozen it cannot learn the classes. Pass `modules_to_save=None` to train the model's heads "
            f"(here {heads}), or add the head(s) to the list; ignore this warning if the head already fits your "
            "labels.",
            UserWarning,
            stacklevel=2,
        )


def tie_module_copies(model: nn.Module, adapter_name: str) -> None:
    """Share the trained copies of ``modules_to_save`` as the base model shares their originals.

    peft deep-copies each wrapped module on its own, so parameters that transformers ties between two of them (the
    DETR family's ``bbox_embed.<i>`` and ``model.decoder.bbox_embed.<i>`` under box refinement, ``class_embed.<i>``
    across decoder layers) would become two independent trainable copies: trained apart, counted and stored twice.
    After this, each tied parameter has one trainable copy, used everywhere the original was: a module whose
    parameters are all tied to an earlier wrapped module's shares that module's copy (so a load that assigns new
    tensors, ``low_cpu_mem_usage=True``, keeps the tie), other tied parameters are shared one by one. Warns if an
    original is also used by a module outside ``modules_to_save`` (that module keeps the frozen original, and the tie
    breaks)."""
    from peft.utils import ModulesToSaveWrapper

    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    copies: dict[int, nn.Parameter] = {}  # id of an original parameter -> its one copy for this adapter
    copy_of: dict[tuple[int, ...], nn.Module] = {}  # ids of a wrapped module's original parameters -> its copy
    for wrapper in wrappers.values():
        if adapter_name not in wrapper.modules_to_save:
            continue
        originals = dict(wrapper.original_module.named_parameters(remove_duplicate=False))
        signature = tuple(id(param) for param in originals.values())
        if signature and signature in copy_of:  # the same parameters as an earlier module: share its copy
            wrapper.modules_to_save[adapter_name] = copy_of[signature]
            continue
        copied = wrapper.modules_to_save[adapter_name]
        copy_of.setdefault(signature, copied)
        for name, param in list(copied.named_parameters(remove_duplicate=False)):
            if name not in originals:
                continue
            shared = copies.setdefault(id(originals[name]), param)
            if shared is not param:
                owner, _, leaf = name.rpartition(".")
                setattr(copied.get_submodule(owner) if owner else copied, leaf, shared)
    if not copies:
        return
    inside = tuple(f"{name}." for name in wrappers)
    untied = sorted(
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if id(param) in copies and not name.startswith(inside)
    )
    if untied:
        warnings.warn(
            f"{len(untied)} parameter(s) of modules outside `modules_to_save`, e.g. `{untied[0]}`, are tied to a "
            "module in `modules_to_save`: they keep the frozen original while the module's copy trains, so the tie "
            f"breaks. Add the module of `{untied[0]}` to `modules_to_save` as well.",
            UserWarning,
            stacklevel=2,
        )

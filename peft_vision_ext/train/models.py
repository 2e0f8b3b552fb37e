# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints for ``peft-vision train``: which family a checkpoint belongs to, which methods suit it, loading it with
the data's label set, and setting it up for a method.

Families:

- ``"unet"``: this package's ``UNetForSemanticSegmentation`` (methods of :data:`~peft_vision_ext.adaptation.ADAPTATION_METHODS`).
- ``"sam"``: any SAM checkpoint (``model_type`` ``"sam"``, e.g. a plain transformers ``SamModel`` such as
  ``facebook/sam-vit-base``), loaded into :class:`~peft_vision_ext.models.SamForSemanticSegmentation` (the methods of
  :data:`~peft_vision_ext.adaptation.SAM_ADAPTATION_METHODS` but zero-shot).
- ``"mask2former"``: ``Mask2FormerForUniversalSegmentation``, for ``--task instance``.
- ``"auto"``: any other ``AutoModelForSemanticSegmentation`` checkpoint (SegFormer, BEiT, DPT, UperNet, ...). Which
  methods suit it is read from its structure (a skeleton built on the meta device, no weights): conv adapters where
  it has convs that fold exactly, MoPEFT where it has ViT blocks MoPEFT knows, deformable LoRA / sequential adapters
  where it has those blocks, decoder-only tuning where its encoder is a separate module.

The head: whatever depends on the number of classes (found by building two skeletons with different label counts)
is re-initialised by loading with ``ignore_mismatched_sizes=True`` when its size changes, and trained by every method
(``modules_to_save`` of the PEFT methods: SAM's mask decoder and Mask2Former's class head by their configs' own
defaults, the head modules so found for the others).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from torch import nn

from ..adaptation import (
    ADAPTATION_METHODS,
    SAM_ADAPTATION_METHODS,
    prepare_for_adaptation,
    prepare_mask2former_for_adaptation,
    prepare_sam_for_adaptation,
)
from ..cli import _HUB_ID as HUB_ID
from ..tuners.conv_adapter import protect_frozen_batchnorm
from ..tuners.mopeft import MOPEFT_PRESETS, MoPEFTConfig
from .arguments import PEFT_METHOD_CONFIGS, UsageError


logger = logging.getLogger(__name__)


MASK2FORMER_METHODS = ("deform_lora", "seq_adapter", "deform_lora+seq_adapter", "decoder", "full")
_FAMILY_METHODS = {
    "unet": tuple(ADAPTATION_METHODS),
    "sam": tuple(m for m in SAM_ADAPTATION_METHODS if m != "zero_shot"),
    "mask2former": MASK2FORMER_METHODS,
}
_FAMILY_TASK = {"unet": "semantic", "sam": "semantic", "mask2former": "instance", "auto": "semantic"}
# Why a method does not suit a model, by what it needs.
_NEEDS = {
    "conv": "conv layers that a conv adapter folds into exactly (odd kernels, 'same' padding)",
    "mopeft": "ViT transformer blocks MoPEFT adapts (SAM, ViT, DINOv2)",
    "deform_lora": "multi-scale deformable attention (Mask2Former, Deformable DETR family)",
    "seq_adapter": "transformer blocks with attention and an FFN that sequential adapters fit",
    "decoder": "a separate encoder module to freeze",
}


@dataclass
class ModelInfo:
    """What the runner knows about a checkpoint before loading its weights."""

    path: str
    config: Any  # PretrainedConfig
    family: str
    model_class: type
    methods: dict[str, str | None] = field(default_factory=dict)  # method -> None if it suits, else what it lacks

    @property
    def suitable(self) -> list[str]:
        return [method for method, missing in self.methods.items() if missing is None]


def _load_kwargs(model_args) -> dict[str, Any]:
    kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    if model_args.token is not None:
        kwargs["token"] = model_args.token
    if model_args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


def read_model_config(model_args) -> Any:
    """The checkpoint's config (no weights), with errors naming `--model_name_or_path`."""
    from transformers import AutoConfig

    import peft_vision_ext  # noqa: F401  (registers the U-Net with AutoConfig)

    path = model_args.model_name_or_path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"`--model_name_or_path` {path!r} has no config.json (it holds {sorted(os.listdir(path))[:5]}). Pass a "
                "directory that save_pretrained wrote."
            )
    elif os.path.exists(path):
        raise ValueError(f"`--model_name_or_path` {path!r} is a file; pass the model directory that holds it.")
    elif not HUB_ID.match(path):
        raise FileNotFoundError(
            f"`--model_name_or_path` {path!r} does not exist. Pass a directory that save_pretrained wrote, or a Hub id."
        )
    try:
        return AutoConfig.from_pretrained(path, **_load_kwargs(model_args))
    except (OSError, ValueError, KeyError) as exc:
        where = "the directory" if os.path.isdir(path) else "the Hub id (is the network reachable?)"
        raise ValueError(
            f"`--model_name_or_path` {path!r}: cannot read the config of {where}: {' '.join(str(exc).split())}"
        ) from exc


def _model_class(config: Any, task: str, path: str) -> tuple[str, type]:
    from transformers import AutoModelForSemanticSegmentation, Mask2FormerForUniversalSegmentation, SamConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING

    from ..models import SamForSemanticSegmentation, UNetConfig, UNetForSemanticSegmentation

    if isinstance(config, UNetConfig):
        family, cls = "unet", UNetForSemanticSegmentation
    elif isinstance(config, SamConfig):
        family, cls = "sam", SamForSemanticSegmentation
    elif config.model_type == "mask2former":
        family, cls = "mask2former", Mask2FormerForUniversalSegmentation
    elif type(config) in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING:
        family, cls = "auto", AutoModelForSemanticSegmentation
    else:
        raise ValueError(
            f"`--model_name_or_path` {path!r} is a {config.model_type!r} model ({type(config).__name__}), which "
            "`peft-vision train` cannot fine-tune: --task semantic takes SAM, a peft-vision-ext U-Net or an "
            "AutoModelForSemanticSegmentation checkpoint (SegFormer, BEiT, DPT, UperNet, ...); --task instance takes "
            "Mask2Former."
        )
    if _FAMILY_TASK[family] != task:
        raise ValueError(
            f"`--model_name_or_path` {path!r} is a {type(config).__name__} model, for --task {_FAMILY_TASK[family]}; "
            f"got --task {task}. Pass --task {_FAMILY_TASK[family]}, or a checkpoint for {task} segmentation."
        )
    return family, cls


def skeleton(model_class: type, config: Any) -> nn.Module:
    """``model_class`` built from ``config`` on the meta device: structure without memory or weights."""
    config = copy.deepcopy(config)
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # an Auto class
            return model_class.from_config(config)
        return model_class(config)


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder that decoder-only tuning freezes: a child ``encoder``, the transformers base model (its
    ``base_model_prefix`` child, e.g. SegFormer's ``segformer``), or a child ``backbone``; None when there is none."""
    for name in ("encoder", getattr(model, "base_model_prefix", None), "backbone"):
        child = getattr(model, name, None) if name else None
        if isinstance(child, nn.Module) and child is not model and any(True for _ in child.parameters()):
            # The encoder must leave something to train.
            if sum(p.numel() for p in child.parameters()) < sum(p.numel() for p in model.parameters()):
                return child
    return None


def _probe_methods(model: nn.Module) -> dict[str, str | None]:
    """Which methods fit the structure of ``model`` (a skeleton), and what the others lack."""
    from ..tuners.conv_adapter.layer import fusion_blockers
    from ..tuners.conv_adapter.model import find_convs
    from ..tuners.deform_lora.model import find_deformable_attention
    from ..tuners.mopeft.model import find_blocks as find_mopeft_blocks
    from ..tuners.seq_adapter.model import find_blocks as find_seq_blocks

    has = {
        "conv": any(not fusion_blockers(conv) for conv in find_convs(model).values()),
        "mopeft": bool(find_mopeft_blocks(model)),
        "deform_lora": bool(find_deformable_attention(model)),
        "seq_adapter": bool(find_seq_blocks(model)),
        "decoder": encoder_of(model) is not None,
    }
    needs = {
        "conv_adapter": ["conv"],
        "bn_adapter": ["conv"],
        **{preset: ["mopeft"] for preset in MOPEFT_PRESETS},
        "deform_lora": ["deform_lora"],
        "seq_adapter": ["seq_adapter"],
        "deform_lora+seq_adapter": ["deform_lora", "seq_adapter"],
        "decoder": ["decoder"],
        "full": [],
    }
    return {
        method: next((_NEEDS[need] for need in required if not has[need]), None) for method, required in needs.items()
    }


def inspect_model(model_args, task: str) -> ModelInfo:
    """Read ``--model_name_or_path``'s config and work out its family and the methods that suit it (no weights)."""
    config = read_model_config(model_args)
    family, cls = _model_class(config, task, model_args.model_name_or_path)
    if family == "auto":
        methods = _probe_methods(skeleton(cls, config))
    else:
        methods = {
            method: None if method in _FAMILY_METHODS[family] else "a method of this family"
            for method in (*PEFT_METHOD_CONFIGS, "decoder", "full")
        }
    return ModelInfo(model_args.model_name_or_path, config, family, cls, methods)


def check_method(info: ModelInfo, method: str) -> None:
    """Refuse a method that does not suit the model, naming the methods that do."""
    missing = info.methods.get(method)
    if missing is None:
        return
    if info.family == "auto":
        name = f"{type(info.config).__name__.removesuffix('Config')} ({info.config.model_type})"
        reason = f": it has no {missing}"
    else:
        name, reason = info.model_class.__name__, ""
    raise ValueError(
        f"`--method` {method!r} does not suit `--model_name_or_path` {info.path!r}, a {name} model{reason}. "
        f"Methods for this model: {', '.join(info.suitable)}."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Loading with the data's labels
# ----------------------------------------------------------------------------------------------------------------------
def label_dependent_modules(info: ModelInfo) -> list[str]:
    """Modules whose parameters change shape with the number of classes (the head), from two skeletons."""
    shapes = []
    for count in (2, 3):
        config = copy.deepcopy(info.config)
        config.id2label = {i: f"class_{i}" for i in range(count)}
        config.label2id = {name: i for i, name in config.id2label.items()}
        model = skeleton(info.model_class, config)
        shapes.append({name: tuple(tensor.shape) for name, tensor in model.state_dict().items()})
    changed = [name for name, shape in shapes[0].items() if shapes[1].get(name) != shape]
    return sorted({name.rpartition(".")[0] for name in changed})


def labelled_config(info: ModelInfo, id2label: dict[int, str], ignore_index: int) -> Any:
    """The checkpoint's config with the data's label set and ignore index."""
    config = copy.deepcopy(info.config)
    config.id2label = dict(id2label)
    config.label2id = {name: class_id for class_id, name in id2label.items()}
    if info.family != "mask2former":
        config.semantic_loss_ignore_index = ignore_index
    return config


def load_model(info: ModelInfo, model_args, id2label: dict[int, str], ignore_index: int) -> nn.Module:
    """Load the checkpoint's weights with the data's label set: tensors whose size depends on the number of classes
    start fresh (``ignore_mismatched_sizes``); the loading report lists them."""
    config = labelled_config(info, id2label, ignore_index)
    kwargs = _load_kwargs(model_args)
    if info.family != "sam":  # SAM's own from_pretrained allows exactly its class-dependent tensors to differ
        kwargs["ignore_mismatched_sizes"] = True
    try:
        model = info.model_class.from_pretrained(info.path, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"`--model_name_or_path` {info.path!r}: cannot load the weights ({' '.join(str(exc).split())})"
        ) from exc
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------------
def default_modules_to_save(info: ModelInfo) -> list[str] | None:
    """What the PEFT methods train in full by default: ``None`` (the config's own default) for SAM (its mask decoder)
    and Mask2Former (its class head), the label-dependent modules for the others."""
    if info.family in ("sam", "mask2former"):
        return None
    return label_dependent_modules(info)


def build_peft_config(method: str, settings: dict[str, Any], modules_to_save: list[str] | None):
    """The PEFT config of ``method`` with ``settings`` (each checked by the config itself)."""
    config_cls = PEFT_METHOD_CONFIGS[method]
    settings = dict(settings)
    if modules_to_save is not None:
        settings.setdefault("modules_to_save", modules_to_save)
    if method in MOPEFT_PRESETS:
        return MoPEFTConfig.from_preset(method, **settings)
    if method in ("conv_adapter", "bn_adapter"):
        return config_cls(adapter_type="conv" if method == "conv_adapter" else "bn", **settings)
    if method == "seq_adapter":
        return config_cls(**settings)
    if method == "deform_lora+seq_adapter":
        settings.setdefault("adapters_per_block", 2)
        if settings["adapters_per_block"] == 0:
            raise ValueError(
                "`--adapters_per_block` 0 gives deformable LoRA alone; use --method deform_lora, or 1-3 adapters per "
                "block for 'deform_lora+seq_adapter'."
            )
        return config_cls(**settings)
    if settings.get("adapters_per_block"):
        raise ValueError(
            f"`--adapters_per_block` {settings['adapters_per_block']} adds sequential adapters; --method deform_lora "
            "is LoRA alone. Use --method deform_lora+seq_adapter for both."
        )
    return config_cls(**settings)


def method_settings(method: str, settings: dict[str, Any], peft_config_arg: str | None) -> dict[str, Any]:
    """The config settings of ``method``: ``--peft_config``'s, overridden by the command line's. Settings that are not
    fields of the method's config are refused, naming those that are."""
    merged: dict[str, Any] = {}
    config_cls = PEFT_METHOD_CONFIGS.get(method)
    if isinstance(peft_config_arg, dict):  # a settings file may hold the object itself
        peft_config_arg = json.dumps(peft_config_arg)
    if peft_config_arg is not None:
        text = peft_config_arg
        if not text.lstrip().startswith("{"):
            if not os.path.isfile(text):
                raise FileNotFoundError(
                    f"`--peft_config` {text!r} does not exist; pass a .json file (or a JSON object) of config fields."
                )
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        try:
            merged = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"`--peft_config` {peft_config_arg!r} is not valid JSON ({exc}).") from None
        if not isinstance(merged, dict):
            raise ValueError(f"`--peft_config` must hold a JSON object of config fields, got {type(merged).__name__}.")
        if config_cls is None:
            raise UsageError(f"`--peft_config` sets a PEFT config, but --method {method} has none; drop it.")
        peft_type = merged.pop("peft_type", None)
        expected = getattr(config_cls().peft_type, "value", config_cls().peft_type)
        if peft_type is not None and peft_type != expected:
            raise ValueError(
                f"`--peft_config` {peft_config_arg!r} is a {peft_type!r} config, but --method {method} needs a "
                f"{config_cls.__name__} ({expected!r})."
            )
        # Bookkeeping peft writes into adapter_config.json; not settings.
        for name in (f.name for f in dataclasses.fields(PeftConfig)):
            merged.pop(name, None)
        if method in ("conv_adapter", "bn_adapter"):
            merged.pop("adapter_type", None)
    merged.update(settings)
    if not merged:
        return merged
    if config_cls is None:
        names = ", ".join(f"--{name}" for name in settings) or ", ".join(merged)
        raise UsageError(f"--method {method} trains without a PEFT config and takes no PEFT settings; got {names}.")
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"adapter_type"}
    unknown = [name for name in merged if name not in fields]
    if unknown:
        own = sorted(fields - {f.name for f in dataclasses.fields(PeftConfig)} - {"auto_target_modules"})
        raise UsageError(
            f"{', '.join(f'`--{name}`' for name in unknown)} is not a setting of --method {method} "
            f"({config_cls.__name__}); its settings are {', '.join(own)}."
        )
    return merged


def prepare_model(model: nn.Module, info: ModelInfo, method: str, peft_config) -> nn.Module:
    """Set ``model`` up for ``method``: ``get_peft_model`` with ``peft_config`` for the PEFT methods; the encoder
    frozen for ``decoder`` (through :mod:`~peft_vision_ext.adaptation` for our families); everything for ``full``."""
    if peft_config is not None:
        return get_peft_model(model, peft_config)
    if info.family == "unet":
        return prepare_for_adaptation(model, method)
    if info.family == "sam":
        return prepare_sam_for_adaptation(model, method)
    if info.family == "mask2former":
        return prepare_mask2former_for_adaptation(model, method)
    model.requires_grad_(True)
    if method == "decoder":
        encoder = encoder_of(model)
        assert encoder is not None, "inspect_model offers 'decoder' only with an encoder"
        encoder.requires_grad_(False)
        protect_frozen_batchnorm(encoder)  # its BatchNorms keep the checkpoint's statistics
    return model

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The image processor of each model of this package, so that ``pipeline("image-segmentation", model=<dir>)`` works.

Our models take normalised float images of any size: the U-Net is fully convolutional, and SAM resizes its input to
the encoder's ``vision_config.image_size`` itself (and its logits back to the input size). Training
(:class:`~peft_vision_ext.data.SegmentationTransform`) feeds them images at their own size, scaled to [0, 1] and
normalised with a mean and std. The matching processor is transformers' stock ``SegformerImageProcessor`` set up the
same way: no resize, rescale by 1/255, normalise with the model's mean and std. Its
``post_process_semantic_segmentation`` (bilinear resize of the logits to the image size, then argmax) is what the
image-segmentation pipeline calls, so the pipeline's masks are the argmax of the model's own logits. Being a stock
class, the processor loads with ``AutoImageProcessor`` even where this package is not imported.

Mean and std come from the model config when it names them (``config.image_mean`` / ``config.image_std``; declared
by ``UNetConfig``, set as extra attributes on a ``SamConfig``), else ImageNet's: SAM's own, and the default of
``SegmentationTransform``, which the recipes train with. A U-Net trained with other values must name them in its
config (a warning says so when its pretrained timm encoder expects other values); train and infer with the same ones:
``SegmentationTransform(image_mean=processor.image_mean, image_std=processor.image_std)``.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

from transformers import (
    AutoImageProcessor,
    Mask2FormerConfig,
    Mask2FormerImageProcessor,
    PretrainedConfig,
    PreTrainedModel,
    SamConfig,
    SegformerImageProcessor,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import IMAGE_PROCESSOR_NAME


__all__ = ["IMAGE_PROCESSOR_NAME", "SavesImageProcessorMixin", "image_processor_for", "save_image_processor"]

# Keyword arguments of `save_pretrained(..., push_to_hub=True, ...)` that the processor's upload understands too.
_PROCESSOR_HUB_KWARGS = ("repo_id", "commit_message", "token", "private")


class _NotRGBError(ValueError):
    """The model does not take 3-channel images, so no image processor (and no pipeline) can feed it."""


def _config_of(model_or_config: Any) -> PretrainedConfig:
    """The config of a model (unwrapped from peft), or the config itself."""
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    model = model_or_config
    # A peft model (PeftModel, or a tuner model such as ConvAdapterModel): the model it wraps.
    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "model", None), PreTrainedModel):
        model = model.model
    if isinstance(model, PreTrainedModel):
        return model.config
    raise TypeError(
        f"`model_or_config` must be a model of this package (UNetForSemanticSegmentation, "
        f"SamForSemanticSegmentation), a peft model wrapping one, or its config; got {type(model_or_config).__name__}."
    )


def _check_normalisation(name: str, values: Any, channels: int, positive: bool) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"`{name}` must be a list of {channels} numbers (one per channel), got {values!r}.")
    values = list(values)
    ok = len(values) == channels and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    if not ok or (positive and any(v <= 0 for v in values)):
        kind = "positive numbers" if positive else "finite numbers"
        raise ValueError(
            f"`{name}` must be {channels} {kind} (one per input channel), got {values!r}. Set it to the values the "
            "training data was normalised with, e.g. ImageNet's [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225]."
        )
    return [float(v) for v in values]


def _warn_if_the_encoder_expects_another_normalisation(config: PretrainedConfig) -> None:
    """The U-Net's default is ImageNet's normalisation (that of ``SegmentationTransform()``); warn when its timm
    encoder was built with pretrained weights that expect another one and the config does not say which was used."""
    if not config.encoder_pretrained:
        return
    import timm

    cfg = timm.get_pretrained_cfg(config.encoder_name)
    overlay = dict(config.encoder_kwargs.get("pretrained_cfg_overlay") or {})
    mean = overlay.get("mean", getattr(cfg, "mean", None))
    std = overlay.get("std", getattr(cfg, "std", None))
    if mean is None or std is None:
        return
    if any(abs(a - b) > 1e-6 for a, b in zip((*mean, *std), (*IMAGENET_DEFAULT_MEAN, *IMAGENET_DEFAULT_STD))):
        warnings.warn(
            f"The pretrained `{config.encoder_name}` encoder expects images normalised with mean {tuple(mean)} and "
            f"std {tuple(std)}, but the config names none, so the image processor uses ImageNet's (the default of "
            "`SegmentationTransform`). Set `config.image_mean` / `config.image_std` to what the model was trained "
            "with (and pass the same to `SegmentationTransform(image_mean=..., image_std=...)`).",
            stacklevel=3,
        )


def image_processor_for(model_or_config: Any) -> BaseImageProcessor:
    """The image processor that prepares images for ``model_or_config`` exactly as its forward and training expect.

    Args:
        model_or_config: a ``UNetForSemanticSegmentation``, ``SamForSemanticSegmentation`` or
            ``Mask2FormerForUniversalSegmentation`` (or a peft model wrapping one, or a merged one), or its config.

    Returns:
        A ``SegformerImageProcessor`` that does not resize (the models take any size), rescales by 1/255 and
        normalises with the model's mean and std (see the module docstring). ``processor(images,
        return_tensors="pt")["pixel_values"]`` is the model's input; ``post_process_semantic_segmentation`` turns
        its output into class maps.

    Example:

        ```py
        >>> processor = image_processor_for(model)
        >>> processor.save_pretrained(adapter_dir)  # or: save_image_processor(model, adapter_dir)
        >>> trainer = Trainer(model=peft_model, processing_class=processor, ...)  # checkpoints carry it too
        ```

    Raises:
        TypeError: ``model_or_config`` is not one of our models or configs.
        ValueError: the model does not take RGB images, or ``config.image_mean`` / ``config.image_std`` are invalid.
    """
    from .unet import UNetConfig

    config = _config_of(model_or_config)
    size = None
    if isinstance(config, UNetConfig):
        channels, channels_name = config.in_channels, "in_channels"
        if config.image_mean is None or config.image_std is None:
            _warn_if_the_encoder_expects_another_normalisation(config)
    elif isinstance(config, SamConfig):
        channels, channels_name = config.vision_config.num_channels, "vision_config.num_channels"
        size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    elif isinstance(config, Mask2FormerConfig):
        # Mask2Former's own processor (its post-processing is the instance/semantic/panoptic one), set up as
        # `InstanceSegmentationTransform` trains it: any size, [0, 1] then ImageNet normalisation.
        mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
        return Mask2FormerImageProcessor(
            do_resize=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=_check_normalisation(
                "config.image_mean", IMAGENET_DEFAULT_MEAN if mean is None else mean, 3, False
            ),
            image_std=_check_normalisation("config.image_std", IMAGENET_DEFAULT_STD if std is None else std, 3, True),
            ignore_index=255,
            do_reduce_labels=False,
        )
    else:
        raise TypeError(
            f"`model_or_config` has a {type(config).__name__}; image_processor_for knows UNetConfig, SamConfig and "
            "Mask2FormerConfig (the models this package trains). For a stock transformers model use its own processor, e.g. "
            "`AutoImageProcessor.from_pretrained(<its checkpoint>)`."
        )
    if channels != 3:
        raise _NotRGBError(
            f"`{channels_name}`={channels}: the image processor and the image-segmentation pipeline feed RGB images "
            "(3 channels). Prepare the inputs of this model yourself (a float tensor of shape "
            f"(batch, {channels}, height, width))."
        )
    # ImageNet's: SAM's own (SamImageProcessor's), and the default of SegmentationTransform, which trains our models.
    mean = getattr(config, "image_mean", None)
    std = getattr(config, "image_std", None)
    mean = _check_normalisation("config.image_mean", IMAGENET_DEFAULT_MEAN if mean is None else mean, channels, False)
    std = _check_normalisation("config.image_std", IMAGENET_DEFAULT_STD if std is None else std, channels, True)
    kwargs = {"size": size} if size is not None else {}
    return SegformerImageProcessor(
        do_resize=False,  # the models take any size; SAM resizes inside its forward, as in training
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_reduce_labels=False,
        **kwargs,
    )


def save_image_processor(model_or_config: Any, save_directory: str | os.PathLike, **kwargs) -> BaseImageProcessor:
    """Write ``image_processor_for(model_or_config)`` to ``save_directory`` (``preprocessor_config.json``, replacing
    one that is there); return the processor. ``kwargs`` go to the processor's ``save_pretrained`` (e.g.
    ``push_to_hub=True, repo_id=...``).

    Our models' ``save_pretrained`` already writes it next to the weights. Use this for a peft adapter directory
    (``PeftModel.save_pretrained`` writes none): ``pipeline("image-segmentation", model=<adapter dir>)`` reads the
    processor of the base model named in ``adapter_config.json`` (``base_model_name_or_path``), so the adapter's
    own copy is for the cases where that one is missing or unfit (e.g. a base on the Hub with ``SamImageProcessor``):
    ``pipeline("image-segmentation", model=adapter_dir, image_processor=adapter_dir)``.
    """
    processor = image_processor_for(model_or_config)
    save_directory = os.fspath(save_directory)
    processor.save_pretrained(save_directory, **kwargs)
    adapter_config = os.path.join(save_directory, "adapter_config.json")
    if os.path.isfile(adapter_config):
        try:
            with open(adapter_config, encoding="utf-8") as handle:
                base = json.load(handle).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = "?"
        if not base:
            warnings.warn(
                f"{adapter_config} names no `base_model_name_or_path`, so `pipeline(model={save_directory!r})` cannot "
                "find the base model. Load the base with `from_pretrained(<its directory>)` before `get_peft_model` "
                "(peft records that directory), or set `peft_model.peft_config['default'].base_model_name_or_path` "
                "before `save_pretrained`.",
                stacklevel=2,
            )
    return processor


def _usable_processor_in(directory: str) -> bool:
    """Whether ``directory`` holds an image processor that can post-process semantic segmentation logits."""
    if not os.path.isfile(os.path.join(directory, IMAGE_PROCESSOR_NAME)):
        return False
    try:
        processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # unreadable, or a class that needs the model's config
        warnings.warn(
            f"Replacing {IMAGE_PROCESSOR_NAME} in {directory!r}, which does not load ({exc}), with the model's own "
            "image processor.",
            stacklevel=4,
        )
        return False
    if callable(getattr(processor, "post_process_semantic_segmentation", None)):
        return True
    warnings.warn(
        f"Replacing the {type(processor).__name__} in {directory!r}: it cannot turn this model's semantic "
        "logits into masks (`pipeline('image-segmentation')` would fail with 'Subtask None is not supported'). "
        "The model's own image processor (see `image_processor_for`) takes its place.",
        stacklevel=4,
    )
    return False


class SavesImageProcessorMixin:
    """``save_pretrained`` also writes the model's image processor (:func:`image_processor_for`) unless the directory
    already holds one that can post-process semantic segmentation (e.g. the ``processing_class`` a ``Trainer`` saved);
    one that cannot (e.g. ``SamImageProcessor``) is replaced. Models whose processor cannot be built (inputs that are
    not RGB) save no processor."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        arguments = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        arguments.apply_defaults()
        arguments = arguments.arguments
        directory = os.fspath(save_directory)
        if not os.path.isdir(directory) or not self.should_save_on_this_rank(arguments["is_main_process"]):
            return result
        if _usable_processor_in(directory):
            return result
        try:
            processor = image_processor_for(self)
        except _NotRGBError:  # no processor can feed this model (nor can the pipeline)
            return result
        hub_kwargs = {}
        push_to_hub = arguments["push_to_hub"]
        if push_to_hub:
            extra = {**arguments.get("kwargs", {}), "token": arguments["token"]}
            hub_kwargs = {key: extra[key] for key in _PROCESSOR_HUB_KWARGS if extra.get(key) is not None}
            hub_kwargs.setdefault("repo_id", directory.split(os.path.sep)[-1])  # as the model's upload defaults
            if extra.get("create_pr"):
                push_to_hub, hub_kwargs = False, {}
                warnings.warn(
                    f"The image processor was saved in {directory!r} but not pushed (`create_pr=True`): push it with "
                    "`image_processor_for(model).push_to_hub(repo_id, create_pr=True)`.",
                    stacklevel=2,
                )
        processor.save_pretrained(directory, push_to_hub=push_to_hub, **hub_kwargs)
        return result

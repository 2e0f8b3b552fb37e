# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""A U-Net with any timm ``features_only`` encoder, as a transformers ``PreTrainedModel``.

The seed paper (000) adapts U-Nets with ResNet-18 and VGG-19 encoders. Here the encoder is any timm model that
supports ``features_only``; the decoder asks it for its feature channels and reductions (``feature_info``) and wires
encoder -> decoder -> head. Because it is a ``PreTrainedModel``, ``save_pretrained``/``from_pretrained``,
``push_to_hub`` and ``Trainer`` work unchanged; ``save_pretrained`` also writes the matching image processor (see
:mod:`peft_vision_ext.models.processing`), so ``pipeline("image-segmentation", model=<dir>)`` works, and
``gradient_checkpointing_enable()`` / ``TrainingArguments(gradient_checkpointing=True)`` checkpoint the encoder (timm's
``set_grad_checkpointing``) and each decoder block.
"""

from __future__ import annotations

import contextvars
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SemanticSegmenterOutput

from ._outputs import (
    check_labels,
    check_loss_ignore_index,
    check_pixel_values,
    check_segmentation_num_labels,
    segmenter_output,
    semantic_segmentation_loss,
)
from .processing import SavesImageProcessorMixin


DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)

# `model_type` of saved configs: transformers quotes it when it does not know it ("The checkpoint you are trying to load
# has model type `...`"), which is what a user who forgot `import peft_vision_ext` reads; so it carries the fix, like
# the peft types of this package (see `_registry.IMPORT_HINT`).
MODEL_TYPE = "pve_unet (import peft_vision_ext)"
# Earlier `model_type`s of the same config, still read after `import peft_vision_ext`.
LEGACY_MODEL_TYPES = ("pve_unet",)

# Set while `from_pretrained` builds the model: the weights come from the checkpoint, so timm must not download.
_LOADING_CHECKPOINT = contextvars.ContextVar("peft_vision_ext_loading_checkpoint", default=False)


class UNetConfig(PretrainedConfig):
    """Configuration of [`UNetForSemanticSegmentation`].

    Args:
        encoder_name (`str`): a timm model name that supports ``features_only`` (e.g. ``"resnet18"``, ``"vgg19"``,
            ``"vgg19_bn"``, ``"efficientnet_b0"``, ``"convnext_tiny"``).
        encoder_pretrained (`bool`): load timm's pretrained weights for the encoder when the model is first built
            (needs network access to the Hugging Face Hub; ignored by ``from_pretrained``, whose checkpoint holds the
            weights).
        encoder_kwargs (`dict`, *optional*): extra keyword arguments for ``timm.create_model`` (e.g. ``out_indices``).
        in_channels (`int`): number of input channels.
        decoder_channels (`list[int]`, *optional*): output channels of each decoder block, deepest first. One block
            per skip connection, plus one that returns to full resolution when the shallowest feature is strided.
            Defaults to ``(256, 128, 64, 32, 16)`` truncated (or extended with 16) to the number of blocks.
        num_labels (`int`): number of classes, at least 2 (from ``PretrainedConfig``; ``id2label``/``label2id`` work
            too). Binary segmentation has 2: background and foreground.
        semantic_loss_ignore_index (`int`, *optional*): label value ignored by the cross-entropy loss; ``None`` when
            every pixel is labelled.
        conv_bias_modules (`list[str]`, *optional*): convs that carry a bias created by adapter fusion
            (``merge_and_unload`` of conv adapters fills it); the model recreates those biases when it is built.
        image_mean (`list[float]`, *optional*): per-channel mean the images are normalised with after scaling to
            [0, 1]; ``None`` means ImageNet's, the default of ``SegmentationTransform``. The image processor saved
            with the model (``image_processor_for(model)``), and so ``pipeline("image-segmentation")``, use it: set
            it (and ``image_std``) when the training data was normalised otherwise, e.g. with the values a pretrained
            timm encoder expects (``timm.get_pretrained_cfg(encoder_name).mean``).
        image_std (`list[float]`, *optional*): per-channel std, likewise (``None``: ImageNet's).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        encoder_name: str = "resnet18",
        encoder_pretrained: bool = False,
        encoder_kwargs: dict | None = None,
        in_channels: int = 3,
        decoder_channels: Sequence[int] | None = None,
        semantic_loss_ignore_index: int = 255,
        conv_bias_modules: Sequence[str] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(encoder_name, str) or not encoder_name:
            raise ValueError(f"`encoder_name` must be a timm model name such as 'resnet18', got {encoder_name!r}.")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"`in_channels` must be a positive int, got {in_channels!r}.")
        if decoder_channels is not None:
            decoder_channels = list(decoder_channels)
            if not decoder_channels or not all(isinstance(c, int) and c > 0 for c in decoder_channels):
                raise ValueError(f"`decoder_channels` must be positive ints, got {decoder_channels!r}.")
        self.encoder_name = encoder_name
        self.encoder_pretrained = encoder_pretrained
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.in_channels = in_channels
        self.decoder_channels = decoder_channels
        self.semantic_loss_ignore_index = check_loss_ignore_index(semantic_loss_ignore_index)
        self.conv_bias_modules = list(conv_bias_modules) if conv_bias_modules else None
        self.image_mean = _check_normalisation("image_mean", image_mean, in_channels, positive=False)
        self.image_std = _check_normalisation("image_std", image_std, in_channels, positive=True)
        if kwargs.get("model_type") in (MODEL_TYPE, *LEGACY_MODEL_TYPES):
            del kwargs["model_type"]  # a saved config's own type (perhaps an old one): the class attribute is it
        super().__init__(**kwargs)
        check_segmentation_num_labels(self.num_labels)

    @classmethod
    def get_config_dict(cls, *args, **kwargs) -> tuple[dict, dict]:
        """``PretrainedConfig.get_config_dict``; configs saved under a legacy ``model_type`` read as current ones."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in LEGACY_MODEL_TYPES:
            config_dict["model_type"] = MODEL_TYPE
        return config_dict, kwargs


def _check_normalisation(name: str, values, channels: int, positive: bool) -> list[float] | None:
    if values is None:
        return None
    ok = not isinstance(values, (str, bytes)) and isinstance(values, Sequence) and len(values) == channels
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or (positive and any(v <= 0 for v in values)):
        raise ValueError(
            f"`{name}` must be None or {channels} {'positive' if positive else 'finite'} numbers (one per input "
            f"channel, `in_channels`={channels}), got {values!r}."
        )
    return [float(v) for v in values]


class LegacyUNetConfig(UNetConfig):
    """Reads ``config.json`` files saved with the former ``model_type``, ``"pve_unet"``, through ``AutoConfig``;
    what it returns is a [`UNetConfig`], which saves under the current type."""

    model_type = LEGACY_MODEL_TYPES[0]
    __init__ = UNetConfig.__init__  # keeps transformers' dataclass machinery from generating another one

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> UNetConfig:
        return UNetConfig.from_dict(config_dict, **kwargs)


class ConvBNAct(nn.Module):
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DecoderBlock(GradientCheckpointingLayer):
    """Upsample to the skip's size (any size, not only x2), concatenate the skip, then two conv-BN-ReLU.

    With gradient checkpointing on, its activations are recomputed in backward (in training mode with gradients
    enabled only); the tensors are passed positionally, as transformers' reentrant checkpointing needs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNAct(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    def __init__(self, encoder_channels: Sequence[int], reductions: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        skips = list(encoder_channels[:-1])[::-1]  # shallower features, deepest first
        self.final_upsample = reductions[0] > 1
        num_blocks = len(skips) + int(self.final_upsample)
        if len(decoder_channels) != num_blocks:
            raise ValueError(
                f"`decoder_channels` has {len(decoder_channels)} entries, but this encoder needs {num_blocks} decoder "
                f"blocks ({len(skips)} skip connections{' + 1 to full resolution' if self.final_upsample else ''}). "
                f"Pass {num_blocks} values or leave it None."
            )
        in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
        skip_channels = skips + [0] * int(self.final_upsample)
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: list[torch.Tensor], input_size: tuple[int, int]) -> torch.Tensor:
        x = features[-1]
        skips = features[:-1][::-1]
        for index, block in enumerate(self.blocks):
            skip = skips[index] if index < len(skips) else None
            size = tuple(skip.shape[-2:]) if skip is not None else input_size
            x = block(x, skip, size)
        return x


class UNetForSemanticSegmentation(SavesImageProcessorMixin, PreTrainedModel):
    """U-Net for semantic segmentation with a timm encoder.

    ``forward(pixel_values, labels=None)`` returns a ``SemanticSegmenterOutput`` whose logits are
    ``(batch, num_labels, height, width)`` at the input size, for any height and width.

    Gradient (activation) checkpointing: ``model.gradient_checkpointing_enable()`` (or
    ``activation_checkpointing_enable``, or ``TrainingArguments(gradient_checkpointing=True)``, also through a peft
    model) checkpoints the encoder with timm's ``set_grad_checkpointing`` (its stages but the first and last) and
    every decoder block; ``gradient_checkpointing_disable()`` turns both off. Only training-mode forwards with
    gradients enabled checkpoint; gradients are those of the plain model. Notes: ``gradient_checkpointing_kwargs``
    (e.g. ``use_reentrant``), ``every_n_layers`` and ``offload`` apply to the decoder blocks; timm checkpoints the
    encoder non-reentrantly (``timm.layers.set_reentrant_ckpt``). An encoder whose timm model refuses checkpointing
    (e.g. HRNet) runs whole, with a warning. As with any activation checkpointing in PyTorch, BatchNorm layers inside
    checkpointed blocks update their running statistics twice per training step (once more in the recompute), i.e.
    with an effective momentum of ``1 - (1 - momentum) ** 2``; the gradients are unaffected.

    ``save_pretrained`` also writes ``preprocessor_config.json`` (see :func:`~peft_vision_ext.models.image_processor_for`).
    """

    config_class = UNetConfig
    base_model_prefix = "unet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Recreates biases that conv-adapter fusion added (see `UNetConfig.conv_bias_modules`).
    supports_fused_conv_biases = True

    def __init__(self, config: UNetConfig) -> None:
        check_segmentation_num_labels(config.num_labels)  # again: the config may have been edited since
        super().__init__(config)
        if not timm.is_model(config.encoder_name):
            similar = timm.list_models(f"*{config.encoder_name.split('.')[0][:6]}*")[:8]
            raise ValueError(
                f"`encoder_name`={config.encoder_name!r} is not a timm model. Similar names: {similar}. See "
                "`timm.list_models()` for all."
            )
        pretrained = bool(config.encoder_pretrained) and not _LOADING_CHECKPOINT.get()
        self.encoder = timm.create_model(
            config.encoder_name,
            features_only=True,
            pretrained=pretrained,
            in_chans=config.in_channels,
            **config.encoder_kwargs,
        )
        # timm already initialised (or loaded) the encoder; transformers' generic init must not overwrite it.
        for module in self.encoder.modules():
            module._is_hf_initialized = True

        channels = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        num_blocks = len(channels) - 1 + int(reductions[0] > 1)
        decoder_channels = config.decoder_channels
        if decoder_channels is None:
            decoder_channels = list(DEFAULT_DECODER_CHANNELS[:num_blocks])
            decoder_channels += [DEFAULT_DECODER_CHANNELS[-1]] * (num_blocks - len(decoder_channels))
        self.decoder = UNetDecoder(channels, reductions, decoder_channels)
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], config.num_labels, kernel_size=3, padding=1)
        self._add_fused_conv_biases(config.conv_bias_modules or [])
        # Whether the timm encoder checkpoints (in training-mode forwards with gradients); see
        # `_set_gradient_checkpointing`. The decoder blocks carry their own flags.
        self._encoder_checkpointing = False
        self.post_init()

    def _add_fused_conv_biases(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                conv = self.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(
                    f"`conv_bias_modules` names {name!r}, which is not a module of this U-Net "
                    f"({self.config.encoder_name}). The config does not belong to this architecture."
                ) from exc
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"`conv_bias_modules` names {name!r}, a {type(conv).__name__}, not an nn.Conv2d.")
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def _timm_checkpointed_modules(self) -> list[nn.Module]:
        """The outermost modules of the encoder with timm's ``set_grad_checkpointing`` (the encoder itself, or the
        copies a peft ``modules_to_save`` wrapper holds)."""
        found = []

        def visit(module: nn.Module) -> None:
            if callable(getattr(type(module), "set_grad_checkpointing", None)):
                found.append(module)
                return
            for child in module.children():
                visit(child)

        visit(self.encoder)
        return found

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """transformers' hook of ``activation_checkpointing_enable``/``_disable``: transformers sets the decoder
        blocks; the encoder's timm flag follows the mode of each forward (see ``forward``)."""
        super()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, every_n_layers=every_n_layers
        )
        encoders = self._timm_checkpointed_modules()
        supported = bool(encoders)
        for encoder in encoders:
            try:
                encoder.set_grad_checkpointing(enable)  # probes support; set per forward from now on
            except (AssertionError, NotImplementedError, RuntimeError, ValueError):
                supported = False
            encoder.set_grad_checkpointing(False)
        self._encoder_checkpointing = enable and supported
        if enable and not supported:
            warnings.warn(
                f"The `{self.config.encoder_name}` encoder ({type(self.encoder).__name__}) has no timm gradient "
                "checkpointing (`set_grad_checkpointing`); only the decoder blocks are checkpointed.",
                stacklevel=3,
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``; the checkpoint holds the encoder, so timm downloads nothing."""
        token = _LOADING_CHECKPOINT.set(True)
        try:
            return super().from_pretrained(*args, **kwargs)
        finally:
            _LOADING_CHECKPOINT.reset(token)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        """
        Args:
            pixel_values: ``(batch, in_channels, height, width)`` normalised float images, any height and width;
                float16, bfloat16 and float32 are cast to the model's dtype.
            labels: ``(batch, height, width)`` integer class ids in ``[0, num_labels)``, at the image size; pixels equal
                to ``config.semantic_loss_ignore_index`` are ignored.
        """
        pixel_values = check_pixel_values(pixel_values, self.config.in_channels, self.dtype)
        ignore_index = self.config.semantic_loss_ignore_index
        if labels is not None:
            labels = check_labels(labels, pixel_values, self.config.num_labels, ignore_index)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        input_size = tuple(pixel_values.shape[-2:])
        if self._encoder_checkpointing:
            # timm checkpoints whenever its flag is set; a forward in eval mode or without gradients must not.
            checkpointed = self.training and torch.is_grad_enabled()
            for encoder in self._timm_checkpointed_modules():
                encoder.set_grad_checkpointing(checkpointed)
        features = self.encoder(pixel_values)
        decoded = self.decoder(features, input_size)  # (B, C_dec, H, W)
        logits = self.segmentation_head(decoded)  # (B, num_labels, H, W)

        loss = None
        if labels is not None:
            loss = semantic_segmentation_loss(logits, labels, ignore_index)
        hidden_states = (*features, decoded) if output_hidden_states else None
        return segmenter_output(loss, logits, hidden_states, return_dict)

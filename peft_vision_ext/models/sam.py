# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""SAM for semantic segmentation (SAMed style), as a transformers ``PreTrainedModel`` with ``SamConfig``.

SAM predicts masks for prompts. For semantic segmentation the prompt encoder is kept frozen and fed a constant
prompt (no points, no boxes, no mask: its learned "no mask" embedding), and the mask decoder gets one mask token per
class, so one forward pass returns one mask logit map per class. The mask decoder is trained fully (put it in
``modules_to_save`` of a peft config); the image encoder is what the PEFT methods adapt.

Module names match ``SamModel`` (``vision_encoder``, ``prompt_encoder``, ``mask_decoder``,
``shared_image_embedding``), so ``from_pretrained("facebook/sam-vit-base", num_labels=K)`` loads SAM's weights; the
class-dependent decoder tensors (mask tokens, hypernetwork MLPs beyond SAM's four, the IoU head) start fresh.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamConfig
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPreTrainedModel,
    SamPromptEncoder,
    SamVisionEncoder,
)

from ._outputs import (
    check_labels,
    check_loss_ignore_index,
    check_pixel_values,
    check_segmentation_num_labels,
    segmenter_output,
    semantic_segmentation_loss,
)
from .processing import SavesImageProcessorMixin


# Decoder tensors whose shape depends on the number of classes (one mask token and one hypernetwork MLP per class).
CLASS_DEPENDENT_KEYS = ("mask_decoder.mask_tokens.", "mask_decoder.iou_prediction_head.proj_out.")

# `SamConfig` has no `semantic_loss_ignore_index`; set one on the config (`SamConfig(semantic_loss_ignore_index=...)`)
# to change this.
DEFAULT_IGNORE_INDEX = 255


def _check_config(config: SamConfig) -> None:
    if not isinstance(config, SamConfig):
        raise TypeError(
            f"SamForSemanticSegmentation needs a transformers `SamConfig`, got {type(config).__name__}. Build one "
            "with `SamConfig(num_labels=K, vision_config={...})` or load it with `SamConfig.from_pretrained(...)`."
        )
    check_segmentation_num_labels(config.num_labels)
    check_loss_ignore_index(getattr(config, "semantic_loss_ignore_index", DEFAULT_IGNORE_INDEX))
    vision = config.vision_config
    if vision.image_size % vision.patch_size:
        raise ValueError(
            f"`vision_config.image_size` ({vision.image_size}) must be a multiple of `vision_config.patch_size` "
            f"({vision.patch_size}). Pick an image size such as {vision.patch_size * (vision.image_size // vision.patch_size)}."
        )
    if vision.output_channels != config.mask_decoder_config.hidden_size:
        raise ValueError(
            f"`vision_config.output_channels` ({vision.output_channels}) must equal `mask_decoder_config.hidden_size` "
            f"({config.mask_decoder_config.hidden_size}): the mask decoder reads the image embeddings. Set both to "
            "the same value."
        )
    if config.prompt_encoder_config.hidden_size != config.mask_decoder_config.hidden_size:
        raise ValueError(
            f"`prompt_encoder_config.hidden_size` ({config.prompt_encoder_config.hidden_size}) must equal "
            f"`mask_decoder_config.hidden_size` ({config.mask_decoder_config.hidden_size})."
        )
    if 2 * vision.num_pos_feats != config.mask_decoder_config.hidden_size:
        raise ValueError(
            f"`vision_config.num_pos_feats` ({vision.num_pos_feats}) must be half of `mask_decoder_config.hidden_size` "
            f"({config.mask_decoder_config.hidden_size}): SAM's positional encoding has sin and cos halves."
        )


class SamForSemanticSegmentation(SavesImageProcessorMixin, SamPreTrainedModel):
    """SAM with one output mask per class, for semantic segmentation (SAMed style).

    ``forward(pixel_values, labels=None)`` returns a ``SemanticSegmenterOutput`` whose logits are
    ``(batch, num_labels, height, width)`` at the input size. Inputs of any size are resized to the encoder's
    ``vision_config.image_size`` (SAM's patch embedding and absolute position embedding are built for that size) and
    the logits are resized back, so any image size works; any window size works too, including windows that do not
    tile the token grid (SAM pads them).

    ``save_pretrained`` also writes ``preprocessor_config.json``: a ``SegformerImageProcessor`` that normalises like
    SAM and leaves the resizing to this forward (see :func:`~peft_vision_ext.models.image_processor_for`), so
    ``pipeline("image-segmentation", model=<dir>)`` returns one mask per class present (the semantic subtask). SAM's
    own ``SamImageProcessor`` (resize the longest side to 1024 and pad) does not fit this model: a directory holding
    one gets the fitting processor instead.

    Example:

        ```py
        >>> from transformers import SamConfig
        >>> from peft_vision_ext.models import SamForSemanticSegmentation

        >>> model = SamForSemanticSegmentation(SamConfig(num_labels=3))  # SAM ViT-B architecture, random weights
        >>> # with network access: pretrained SAM, new class tokens
        >>> model = SamForSemanticSegmentation.from_pretrained("facebook/sam-vit-base", num_labels=3)
        ```
    """

    config_class = SamConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # peft methods of this package train these in full unless the config says otherwise (`modules_to_save`).
    peft_modules_to_save = ("mask_decoder",)
    # Parts of SAM's mask decoder that semantic segmentation never reads: the IoU head and the single-mask output
    # (token 0's hypernetwork MLP). They keep SAM's weights so checkpoints load cleanly; they get no gradient.
    unused_parameter_prefixes = ("mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.0.")
    _tied_weights_keys = {
        "prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding"
    }

    def __init__(self, config: SamConfig) -> None:
        _check_config(config)
        # One mask token per class (SAM's first token, the single-mask output, is kept and unused).
        config.mask_decoder_config.num_multimask_outputs = config.num_labels
        super().__init__(config)
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.vision_encoder = SamVisionEncoder(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(config)
        decoder_config = copy.deepcopy(config.mask_decoder_config)
        decoder_config._attn_implementation = config._attn_implementation
        self.mask_decoder = SamMaskDecoder(decoder_config)
        # The prompt encoder only supplies the constant "no prompt" embedding; it is never trained.
        self.prompt_encoder.requires_grad_(False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``. Loading a SAM checkpoint with another ``num_labels`` re-initialises the
        class-dependent decoder tensors (mask tokens, IoU head output, hypernetwork MLPs of new classes), which
        transformers lists in its loading report. Any other shape mismatch (e.g. a changed ``image_size``) raises,
        unless ``ignore_mismatched_sizes=True`` is passed explicitly."""
        strict = "ignore_mismatched_sizes" not in kwargs
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            unexpected = [
                entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys", [])
            ]
            unexpected = [key for key in unexpected if not key.startswith(CLASS_DEPENDENT_KEYS)]
            if unexpected:
                raise ValueError(
                    f"The checkpoint does not fit this SAM configuration: {len(unexpected)} tensor(s) have another "
                    f"shape, e.g. {', '.join(f'`{key}`' for key in unexpected[:4])}. Only the class-dependent decoder "
                    "tensors may differ. Load with the checkpoint's own `vision_config` (image size, patch size, "
                    "widths), or pass `ignore_mismatched_sizes=True` to re-initialise them anyway."
                )
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_encoder.get_input_embeddings()

    def image_positional_embeddings(self, height: int, width: int) -> torch.Tensor:
        """SAM's dense positional encoding of an ``height x width`` embedding grid: ``(1, C, height, width)``."""
        param = self.shared_image_embedding.positional_embedding
        grid = torch.ones((height, width), device=param.device, dtype=param.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / height
        x_embed = (grid.cumsum(dim=1) - 0.5) / width
        encoding = self.shared_image_embedding(torch.stack([x_embed, y_embed], dim=-1))  # (H, W, C)
        return encoding.permute(2, 0, 1).unsqueeze(0)

    def constant_prompt(self, batch_size: int, height: int, width: int) -> tuple[None, torch.Tensor]:
        """The frozen prompt encoder's output for "no prompt": no sparse tokens, the no-mask dense embedding."""
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # (1, C, 1, 1)
        return None, dense.expand(batch_size, -1, height, width)

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
            pixel_values: ``(batch, num_channels, height, width)`` normalised float images, any height and width;
                float16, bfloat16 and float32 are cast to the model's dtype.
            labels: ``(batch, height, width)`` integer class ids in ``[0, num_labels)``, at the image size; pixels equal
                to ``config.semantic_loss_ignore_index`` (default 255) are ignored.
        """
        pixel_values = check_pixel_values(pixel_values, self.config.vision_config.num_channels, self.dtype)
        ignore_index = getattr(self.config, "semantic_loss_ignore_index", DEFAULT_IGNORE_INDEX)
        if labels is not None:
            labels = check_labels(labels, pixel_values, self.config.num_labels, ignore_index)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch_size = pixel_values.shape[0]
        input_size = tuple(pixel_values.shape[-2:])
        encoder_size = self.config.vision_config.image_size
        if input_size != (encoder_size, encoder_size):
            pixel_values = F.interpolate(
                pixel_values, size=(encoder_size, encoder_size), mode="bilinear", align_corners=False
            )

        vision_outputs = self.vision_encoder(pixel_values, output_hidden_states=output_hidden_states)
        image_embeddings = vision_outputs.last_hidden_state  # (B, C_out, h, w)
        height, width = image_embeddings.shape[-2:]
        sparse, dense = self.constant_prompt(batch_size, height, width)
        positional = self.image_positional_embeddings(height, width).expand(batch_size, -1, -1, -1)
        masks, _ = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        low_res = masks[:, 0]  # (B, num_labels, 4h, 4w): point batch of one, one mask per class
        logits = F.interpolate(low_res, size=input_size, mode="bilinear", align_corners=False)

        loss = None
        if labels is not None:
            # From the low-resolution masks straight to the label size (one resize).
            loss = semantic_segmentation_loss(low_res, labels, ignore_index)
        hidden_states = vision_outputs.hidden_states if output_hidden_states else None
        return segmenter_output(loss, logits, hidden_states, return_dict)


__all__ = ["SamForSemanticSegmentation"]


def small_sam_config(
    *,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    image_size: int = 96,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    window_size: int = 5,
    global_attn_indexes: list[int] | tuple[int, ...] = (1, 3),
    decoder_hidden_size: int = 32,
) -> SamConfig:
    """A ``SamConfig`` with SAM's architecture, narrow and shallow, for pretraining a source model on the CPU.

    SAM's own init (std 1e-10) is meant for loading checkpoints; this config trains from scratch with std 0.02.
    ``image_size // patch_size`` tokens per side; windows that do not divide it are padded, as in SAM.
    """
    if image_size % patch_size:
        raise ValueError(f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}).")
    if decoder_hidden_size % 2:
        raise ValueError(f"`decoder_hidden_size` must be even (sine features), got {decoder_hidden_size}.")
    id2label = dict(id2label) if id2label is not None else {i: f"class_{i}" for i in range(num_labels)}
    return SamConfig(
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        initializer_range=0.02,
        vision_config=dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            mlp_dim=4 * hidden_size,
            image_size=image_size,
            patch_size=patch_size,
            window_size=window_size,
            global_attn_indexes=list(global_attn_indexes),
            output_channels=decoder_hidden_size,
            num_pos_feats=decoder_hidden_size // 2,
            initializer_range=0.02,
        ),
        prompt_encoder_config=dict(
            hidden_size=decoder_hidden_size,
            image_size=image_size,
            image_embedding_size=image_size // patch_size,
            mask_input_channels=8,
        ),
        mask_decoder_config=dict(
            hidden_size=decoder_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=2 * decoder_hidden_size,
            iou_head_hidden_dim=decoder_hidden_size,
        ),
    )

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed-001 methods on the DETR family's detection head models (Deformable DETR, RT-DETR, Grounding DINO) and the
heads they train by default (``modules_to_save=None``) on those and on Mask2Former.

transformers 5 ties these models' per-layer heads with a dict ``_tied_weights_keys``, and peft 0.21's tied-weights
check then asks for input embeddings a vision model does not have (``NotImplementedError``);
``CheckedTunerMixin._get_module_names_tied_with_embedding`` works around it. ``test_upstream_tied_weights_bug`` fails
once upstream fixes that, so the workaround can go."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from torch import nn

import peft_vision_ext  # noqa: F401
from peft_vision_ext import DeformableLoRAConfig, SeqAdapterConfig

from tiny_models import make_deformable_detr, make_mask2former, make_sam


WORKAROUND = "peft_vision_ext/tuners/_common.py (CheckedTunerMixin._get_module_names_tied_with_embedding)"


# ---------------------------------------------------------------------------------------------------------------------
# Tiny detection head models, built offline from configs
# ---------------------------------------------------------------------------------------------------------------------
def _resnet(config_cls_name: str = "ResNetConfig"):
    import transformers

    return getattr(transformers, config_cls_name)(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


# Shared by the three families: 2 decoder layers (transformers 5 cannot tie the per-layer heads of a 1-layer decoder).
_DETR = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=5,
    decoder_n_points=2,
)


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random-init DETR heads start with zero last box layers: give every tensor some signal (shared tensors, which
    ``parameters()`` lists once, stay shared)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def make_deformable_detr_head(seed: int = 0, **kwargs) -> nn.Module:
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    torch.manual_seed(seed)
    config = DeformableDetrConfig(
        backbone_config=_resnet(),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_feature_levels=3,
        encoder_n_points=2,
        num_labels=3,
        **_DETR,
        **kwargs,
    )
    return _perturb(DeformableDetrForObjectDetection(config), seed)


def make_rt_detr_head(seed: int = 0) -> nn.Module:
    from transformers import RTDetrConfig, RTDetrForObjectDetection

    torch.manual_seed(seed)
    config = RTDetrConfig(
        backbone_config=_resnet("RTDetrResNetConfig"),
        encoder_hidden_dim=16,
        encoder_in_channels=[16, 16, 32],
        decoder_in_channels=[16, 16, 16],
        num_denoising=4,
        num_labels=3,
        **_DETR,
    )
    return _perturb(RTDetrForObjectDetection(config), seed)


def make_grounding_dino_head(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    # A 2-layer BERT; the vocabulary reaches the ids Grounding DINO reads as [CLS], [SEP] and "." (101, 102, 1012).
    text = BertConfig(
        vocab_size=1030,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    config = GroundingDinoConfig(
        backbone_config=_resnet(),
        text_config=text,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_feature_levels=3,
        encoder_n_points=2,
        max_text_len=16,
        **_DETR,
    )
    return _perturb(GroundingDinoForObjectDetection(config), seed)


MODELS = {
    "deformable_detr": make_deformable_detr_head,
    # box refinement and two stages: the decoder holds tied copies of the class and box heads
    "deformable_detr_two_stage": lambda seed=0: make_deformable_detr_head(
        seed, with_box_refine=True, two_stage=True, two_stage_num_proposals=5
    ),
    "rt_detr": make_rt_detr_head,
    "grounding_dino": make_grounding_dino_head,
}
# The heads each model trains by default (per decoder layer: peft cannot wrap a ModuleList).
DEFAULT_HEADS = {
    "deformable_detr": ["class_embed.0", "class_embed.1", "bbox_embed.0", "bbox_embed.1"],
    "deformable_detr_two_stage": [f"{head}.{i}" for head in ("class_embed", "bbox_embed") for i in range(3)],
    "rt_detr": [
        "model.decoder.class_embed.0",
        "model.decoder.class_embed.1",
        "model.decoder.bbox_embed.0",
        "model.decoder.bbox_embed.1",
        "model.enc_score_head",
        "model.enc_bbox_head",
        "model.denoising_class_embed",
    ],
    # the class head is a parameter-free similarity with the text; the two-stage proposal box head is trained too
    "grounding_dino": ["bbox_embed.0", "bbox_embed.1", "model.encoder_output_bbox_embed"],
}
CONFIGS = {
    "deform_lora": lambda: DeformableLoRAConfig(r=4),
    "seq_adapter": lambda: SeqAdapterConfig(adapter_dim=8),
    "both": lambda: DeformableLoRAConfig(r=4, adapters_per_block=2, adapter_dim=8),
}
CASES = [(m, c) for m in ("deformable_detr", "rt_detr", "grounding_dino") for c in CONFIGS] + [
    ("deformable_detr_two_stage", "deform_lora")
]


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if "GroundingDino" in type(base).__name__:
        # "[CLS] a . b c . [SEP]" and "[CLS] d . [SEP] [PAD]": two and one phrases (classes)
        input_ids = torch.tensor([[101, 7, 1012, 9, 10, 1012, 102], [101, 11, 1012, 102, 0, 0, 0]])
        inputs.update(input_ids=input_ids, attention_mask=(input_ids != 0).long())
    return inputs


def _labels() -> list[dict[str, torch.Tensor]]:
    return [
        {"class_labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


def _detections(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(model))
    return torch.cat([out.logits.flatten(1), out.pred_boxes.flatten(1)], dim=1)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    # Grounding DINO's logits are -inf at padded text positions: those must match exactly, the rest to `rel`.
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: the -inf pattern of the logits changed"
    error = (actual[finite] - expected[finite]).abs().max().item()
    scale = expected[finite].abs().max().item()
    assert error <= rel * scale, f"{what}: max difference {error:.3g} > {rel:g} x {scale:.3g}"


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _peft(make, config) -> tuple[nn.Module, PeftModel]:
    base = make()
    torch.manual_seed(0)
    return base, get_peft_model(copy.deepcopy(base), config)


# ---------------------------------------------------------------------------------------------------------------------
# The upstream bug
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["deformable_detr", "grounding_dino"])
def test_upstream_tied_weights_bug(model_name):
    """Stock peft LoRA still fails on these head models, and ours work: when this test fails because stock LoRA
    works, drop the workaround."""
    make = MODELS[model_name]
    try:
        get_peft_model(make(), LoraConfig(target_modules=["value_proj"]))
    except NotImplementedError as error:
        assert "get_input_embeddings" in str(error), f"another NotImplementedError than the known one: {error}"
    else:
        pytest.fail(f"upstream fixed: drop the workaround in {WORKAROUND}")
    for config in CONFIGS.values():
        get_peft_model(make(), config())


# ---------------------------------------------------------------------------------------------------------------------
# Identity, one training step with the model's own loss, merge (or its refusal), save + reload
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, method", CASES)
def test_detection_head_lifecycle(model_name, method, tmp_path):
    base, model = _peft(MODELS[model_name], CONFIGS[method]())
    config = model.peft_config["default"]
    assert config.modules_to_save == DEFAULT_HEADS[model_name]

    # identity at init (freezing may change float rounding in deformable attention)
    expected = _detections(base)
    _assert_close(_detections(model.eval()), expected, "adapted model at init vs base")

    # one training step with the model's own loss; BatchNorm statistics stay fixed, so the adapter alone reproduces
    # the trained model
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    trainable = _trainable(model)
    assert all("iseg_" in name or ".modules_to_save." in name for name in trainable), trainable
    output = model(**_inputs(model), labels=_labels())
    assert torch.isfinite(output.loss), output.loss
    output.loss.backward()
    with_grad = [name for name, param in model.named_parameters() if param.grad is not None]
    assert set(with_grad) <= set(trainable)
    assert any("iseg_" in name for name in with_grad), "no adapter parameter got a gradient"
    head_grads = [name for name in with_grad if ".modules_to_save." in name]
    assert head_grads, "no head parameter got a gradient"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05).step()
    model.eval()
    trained = _detections(model)
    assert (trained - expected)[torch.isfinite(expected)].abs().max() > 1e-4, "the training step changed nothing"

    # save + reload onto a fresh base model
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.peft_config["default"].modules_to_save == DEFAULT_HEADS[model_name]
    _assert_close(_detections(loaded), trained, "reloaded adapter vs the trained model", rel=1e-6)

    # merge: exact for LoRA; refused in words for sequential adapters
    if method == "deform_lora":
        merged = model.merge_and_unload()
        assert type(merged) is type(base)
        assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
        _assert_close(_detections(merged), trained, "merged vs unmerged")
    else:
        with pytest.raises(ValueError, match="Cannot merge exactly: .* sequential adapter"):
            model.merge_and_unload()


# ---------------------------------------------------------------------------------------------------------------------
# Default heads (modules_to_save=None), [] and the warning, tied heads
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [DeformableLoRAConfig, SeqAdapterConfig])
def test_mask2former_trains_its_class_head_by_default(config_cls):
    config = config_cls()
    model = get_peft_model(make_mask2former(), config)
    assert config.modules_to_save is None  # the user's object is left as written
    assert model.peft_config["default"].modules_to_save == ["class_predictor"]
    assert any(name.startswith("base_model.model.class_predictor.modules_to_save.") for name in _trainable(model))
    # heads come from the head model's class: a bare encoder has none (and no frozen-head warning either)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for modules_to_save in (None, []):
            bare = get_peft_model(make_deformable_detr(), config_cls(modules_to_save=modules_to_save))
            assert bare.peft_config["default"].modules_to_save == modules_to_save
            assert not any(isinstance(m, ModulesToSaveWrapper) for m in bare.modules())


def test_model_declared_heads_are_the_default():
    # SamForSemanticSegmentation declares `peft_modules_to_save`, as MoPEFT reads it
    model = get_peft_model(make_sam(), SeqAdapterConfig(adapters_per_block=1, adapter_dim=4))
    assert model.peft_config["default"].modules_to_save == ["mask_decoder"]


@pytest.mark.parametrize(
    "make, frozen, partial",
    [
        (make_mask2former, "`class_predictor`", ["layernorm"]),
        (make_deformable_detr_head, "`class_embed.0`, `class_embed.1`", ["bbox_embed.0", "bbox_embed.1"]),
    ],
)
def test_empty_modules_to_save_warns_about_the_frozen_head(make, frozen, partial, tmp_path):
    with pytest.warns(UserWarning, match=rf"`modules_to_save`=\[\] leaves the head\(s\) {frozen}.* frozen"):
        model = get_peft_model(make(), DeformableLoRAConfig(modules_to_save=[]))
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())
    # a partial list warns about the rest
    with pytest.warns(UserWarning, match=rf"leaves the head\(s\) {frozen} of"):
        get_peft_model(make(), SeqAdapterConfig(modules_to_save=partial))
    # loading for inference does not warn again
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*leaves the head", category=UserWarning)
        PeftModel.from_pretrained(make(), tmp_path)


def _tied_pairs(model: nn.Module) -> list[tuple[ModulesToSaveWrapper, ModulesToSaveWrapper]]:
    """Pairs of wrapped heads whose originals share parameters."""
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    return [
        (a, b)
        for i, a in enumerate(wrappers)
        for b in wrappers[i + 1 :]
        if {id(p) for p in a.original_module.parameters()} & {id(p) for p in b.original_module.parameters()}
    ]


@pytest.mark.parametrize("model_name, pairs", [("deformable_detr", 2), ("deformable_detr_two_stage", 6)])
def test_tied_heads_stay_tied_and_count_once(model_name, pairs, tmp_path):
    """transformers ties `class_embed.1` to `class_embed.0` (and the box heads) when there is no box refinement, and
    `bbox_embed.<i>` / `class_embed.<i>` to the decoder's `model.decoder.bbox_embed.<i>` / `class_embed.<i>` with box
    refinement and two stages. peft copies each wrapped module on its own; the copies must be shared again, or the
    model would train (and store) two versions of one head."""
    base = MODELS[model_name]()
    model = get_peft_model(copy.deepcopy(base), DeformableLoRAConfig(r=4))
    tied = _tied_pairs(model)
    assert len(tied) == pairs
    for a, b in tied:
        assert a.modules_to_save["default"] is b.modules_to_save["default"]
    # each head parameter is trainable once: the trainable count is the adapters' plus the heads' own size
    adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "iseg_" in n)
    head_size = sum(p.numel() for p in nn.ModuleList([base.class_embed, base.bbox_embed]).parameters())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == adapters + head_size
    # a reload that assigns the loaded tensors (low_cpu_mem_usage) keeps the tie, and so does merging
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == trainable
    assert all(a.modules_to_save["default"] is b.modules_to_save["default"] for a, b in _tied_pairs(loaded))
    merged = model.merge_and_unload()
    assert merged.bbox_embed[1].layers[2].weight is _base_twin(merged).layers[2].weight


def _base_twin(model: nn.Module) -> nn.Module:
    """The module that ties `bbox_embed.1` in the base model: the decoder's copy, or `bbox_embed.0`."""
    decoder = model.model.decoder.bbox_embed
    return decoder[1] if decoder is not None else model.bbox_embed[0]


def test_untied_head_warns():
    # only the decoder's copy of a tied box head in modules_to_save: the head keeps the frozen original
    with pytest.warns(UserWarning, match=r"tied to a module in `modules_to_save`.*`bbox_embed\.0\.layers"):
        get_peft_model(
            MODELS["deformable_detr_two_stage"](),
            DeformableLoRAConfig(modules_to_save=["model.decoder.bbox_embed.0"]),
        )


def test_whole_module_list_head_is_refused_in_words():
    # peft cannot wrap a ModuleList; the per-layer heads must be named one by one
    with pytest.raises(
        ValueError,
        match=r"entry 'class_embed' names `class_embed`, a ModuleList .*\['class_embed.0', 'class_embed.1'\]",
    ):
        get_peft_model(make_deformable_detr_head(), SeqAdapterConfig(modules_to_save=["class_embed"]))

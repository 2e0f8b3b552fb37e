# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Every field of the four configs is checked on construction, from Python and from ``adapter_config.json``; broken
JSON is reported; ``check_modules_to_save`` names the entries a model does not have."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import save_file
from torch import nn

import peft_vision_ext  # noqa: F401  (registers the methods with peft)
from peft_vision_ext.tuners._validation import MAX_SIZE, ConfigTypeError, check_modules_to_save
from peft_vision_ext.tuners.conv_adapter.config import ConvAdapterConfig
from peft_vision_ext.tuners.deform_lora.config import DeformableLoRAConfig
from peft_vision_ext.tuners.mopeft.config import MoPEFTConfig
from peft_vision_ext.tuners.seq_adapter.config import SeqAdapterConfig

from tiny_models import make_mask2former, make_sam, make_tiny_cnn, make_unet


CONFIGS = (ConvAdapterConfig, MoPEFTConfig, DeformableLoRAConfig, SeqAdapterConfig)
NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------------------------------------------------
# Bad types: (field, value). Each must raise a TypeError whose message names the field and shows the value.
# ---------------------------------------------------------------------------------------------------------------------
# Fields every config has: peft's own, ours in all four.
COMMON_TYPE_CASES = [
    ("peft_type", 3),
    ("task_type", ["SEQ_CLS"]),
    ("inference_mode", "False"),
    ("inference_mode", 1),
    ("base_model_name_or_path", 3),
    ("revision", 1.0),
    ("auto_mapping", "SamModel"),
    ("peft_version", 0.21),
    ("init_weights", "False"),
    ("init_weights", [False]),
    ("auto_target_modules", "True"),
    ("auto_target_modules", 1),
    ("modules_to_save", 3),
    ("modules_to_save", ["head", 3]),
    ("modules_to_save", {"head": True}),
    # `target_modules` and `exclude_modules` were already checked (normalize_module_names); kept for coverage.
    ("target_modules", 3),
    ("exclude_modules", 2.5),
]
TYPE_CASES = {
    ConvAdapterConfig: [
        ("adapter_type", 1),
        ("adapter_type", ["conv"]),
        ("adapter_bias", "False"),
        ("adapter_bias", 2),
        ("freeze_bn_stats", [False]),
        ("freeze_bn_stats", None),
    ],
    MoPEFTConfig: [
        ("use_lora", "False"),
        ("use_prefix", 2),
        ("use_adapter", [False]),
        ("gating", "False"),
        ("r", 8.0),
        ("r", "8"),
        ("r", True),
        ("lora_alpha", "8"),
        ("lora_alpha", True),
        ("lora_alpha", None),
        ("lora_dropout", "0.1"),
        ("lora_dropout", None),
        ("lora_targets", None),
        ("lora_targets", ["q", 1]),
        ("lora_targets", {"q": True}),
        ("prefix_length", 20.0),
        ("prefix_projection_dim", "32"),
        ("prefix_depth", 1),
        ("prefix_depth", None),
        ("adapter_dim", 64.0),
        ("adapter_act", None),
        ("gate_hidden_size", 16.0),
        ("gate_hidden_size", True),
        ("prefix_gate_init", "0"),
        ("prefix_gate_init", True),
        ("prefix_gate_init", None),
        ("pruned", None),
        ("pruned", [["lora"]]),
        ("pruned", {"block": "lora"}),
        ("pruned", {3: ["lora"]}),
        ("frozen_gates", None),
        ("frozen_gates", {"b": "lora"}),
        ("frozen_gates", {"b": {"lora": "0.5"}}),
        ("frozen_gates", {"b": {"lora": True}}),
    ],
    DeformableLoRAConfig: [
        ("r", "8"),
        ("r", 8.0),
        ("lora_alpha", "8"),
        ("lora_alpha", True),
        ("lora_dropout", "0.1"),
        ("projection_ranks", None),
        ("projection_ranks", [("value_proj", 4)]),
        ("projection_ranks", {"value_proj": 4.0}),
        ("projection_ranks", {"value_proj": True}),
        ("projection_ranks", {3: 4}),
        ("extra_target_modules", 3),
        ("multihead_attention_targets", None),
        ("multihead_attention_targets", ["q", 1]),
        ("multihead_attention_targets", 5),
        ("adapters_per_block", [2]),
        ("adapters_per_block", "2"),
        ("adapters_per_block", 2.0),
        ("adapter_dim", "64"),
        ("adapter_act", None),
        ("adapter_target_modules", 3),
    ],
    SeqAdapterConfig: [
        ("adapters_per_block", [2]),
        ("adapters_per_block", 2.0),
        ("adapters_per_block", "2"),
        ("adapter_dim", 64.0),
        ("adapter_dim", None),
        ("adapter_act", 1),
    ],
}

# Non-finite numbers: every float field (and the gate values of `frozen_gates`) gets NaN, inf and -inf.
FLOAT_FIELDS = {
    MoPEFTConfig: ("lora_alpha", "lora_dropout", "prefix_gate_init"),
    DeformableLoRAConfig: ("lora_alpha", "lora_dropout"),
}
NON_FINITE_CASES = [
    (cls, name, value) for cls, names in FLOAT_FIELDS.items() for name in names for value in (NAN, INF, -INF)
] + [
    (MoPEFTConfig, "frozen_gates", {"block": {"lora": NAN}}),
    (MoPEFTConfig, "frozen_gates", {"block": {"adapter": INF}}),
    (MoPEFTConfig, "lora_alpha", 10**400),  # an int too large for a float
]

# Size fields: an int in [minimum, MAX_SIZE].
SIZE_FIELDS = [
    (MoPEFTConfig, "r"),
    (MoPEFTConfig, "prefix_length"),
    (MoPEFTConfig, "prefix_projection_dim"),
    (MoPEFTConfig, "adapter_dim"),
    (MoPEFTConfig, "gate_hidden_size"),
    (DeformableLoRAConfig, "r"),
    (DeformableLoRAConfig, "adapter_dim"),
    (SeqAdapterConfig, "adapter_dim"),
]

# Other values of the right type that are out of range or not allowed (each accepted before these checks).
VALUE_CASES = (
    [
        (cls, name, value)
        for cls in CONFIGS
        for name, value in [
            ("peft_type", "LORA"),
            ("task_type", "SEMANTIC_SEGMENTATION"),
            ("modules_to_save", ["head", ""]),
        ]
    ]
    + [
        # A string selector is a regular expression; one that does not compile failed with a bare re.error at injection.
        (cls, name, "blocks.(0|1")
        for cls in CONFIGS
        for name in ("target_modules", "exclude_modules")
    ]
    + [
        (DeformableLoRAConfig, "extra_target_modules", "cross_attn["),
        (DeformableLoRAConfig, "adapter_target_modules", "*layers"),
        (MoPEFTConfig, "r", 10**12),
        (DeformableLoRAConfig, "r", 10**12),
        (DeformableLoRAConfig, "projection_ranks", {"value_proj": MAX_SIZE + 1}),
    ]
)


def _field_regex(name: str) -> str:
    """The message names the field in backticks: `name` or `name[...]`."""
    return rf"`{name}[`\[]"


def _all_type_cases():
    for cls in CONFIGS:
        for name, value in COMMON_TYPE_CASES + TYPE_CASES[cls]:
            yield pytest.param(cls, name, value, id=f"{cls.__name__}-{name}-{value!r}")


@pytest.mark.parametrize("cls, name, value", list(_all_type_cases()))
def test_wrong_type_raises_type_error(cls, name, value):
    with pytest.raises(TypeError, match=_field_regex(name)) as info:
        cls(**{name: value})
    # The message shows the value received, or for a bad entry of a dict, that entry.
    message, shown = str(info.value), [value]
    while isinstance(shown[-1], dict) and shown[-1]:
        shown.append(next(iter(shown[-1].values())))
    assert any(repr(part) in message for part in shown), message


def test_every_field_has_a_bad_type_case():
    for cls in CONFIGS:
        fields = {f.name for f in dataclasses.fields(cls)}
        covered = {name for name, _ in COMMON_TYPE_CASES + TYPE_CASES[cls]}
        assert covered == fields, (cls.__name__, sorted(fields - covered), sorted(covered - fields))
        # Every field that holds floats (`frozen_gates` holds them in a nested dict) has a NaN and an inf case.
        for name in (f.name for f in dataclasses.fields(cls) if "float" in str(f.type)):
            values = [json.dumps(value) for c, n, value in NON_FINITE_CASES if c is cls and n == name]
            assert any("NaN" in v for v in values) and any("Infinity" in v for v in values), (cls.__name__, name)


@pytest.mark.parametrize(
    "cls, name, value",
    [pytest.param(*case, id=f"{case[0].__name__}-{case[1]}-{case[2]!r}") for case in NON_FINITE_CASES],
)
def test_non_finite_number_raises_value_error(cls, name, value):
    with pytest.raises(ValueError, match=_field_regex(name) + r".* must be a finite number") as info:
        cls(**{name: value})
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "cls, name", [pytest.param(*case, id=f"{case[0].__name__}-{case[1]}") for case in SIZE_FIELDS]
)
def test_sizes_are_bounded(cls, name):
    assert getattr(cls(**{name: MAX_SIZE}), name) == MAX_SIZE
    with pytest.raises(ValueError, match=rf"`{name}` must be at most 65536, got 65537: .*allocate") as info:
        cls(**{name: MAX_SIZE + 1})
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "cls, name, value", [pytest.param(*case, id=f"{case[0].__name__}-{case[1]}-{case[2]!r}") for case in VALUE_CASES]
)
def test_bad_value_raises_value_error(cls, name, value):
    with pytest.raises(ValueError, match=_field_regex(name)) as info:
        cls(**{name: value})
    assert not isinstance(info.value, TypeError)


def test_the_issue_examples():
    with pytest.raises(ValueError, match=r"`frozen_gates\['b'\]` must be a dict .*got 'lora' \(str\)"):
        MoPEFTConfig(frozen_gates={"b": "lora"})
    with pytest.raises(TypeError, match=r"`lora_targets` must be a non-empty list .*got None"):
        MoPEFTConfig(lora_targets=None)
    with pytest.raises(TypeError, match=r"`lora_dropout` must be a finite number in \[0, 1\), got '0.1' \(str\)"):
        DeformableLoRAConfig(lora_dropout="0.1")
    with pytest.raises(TypeError, match=r"`adapters_per_block` must be one of \[1, 2, 3\], got \[2\] \(list\)"):
        SeqAdapterConfig(adapters_per_block=[2])
    with pytest.raises(TypeError, match=r"`use_prefix` must be True or False, got 'False' \(str\).*switch"):
        MoPEFTConfig(use_prefix="False")
    with pytest.raises(ValueError, match=r"`prefix_gate_init` must be a finite number, got nan"):
        MoPEFTConfig(prefix_gate_init=NAN)
    with pytest.raises(ValueError, match=r"`r` must be at most 65536, got 1000000000000: .*128 TB"):
        MoPEFTConfig(r=10**12)
    # A wrong type is a TypeError, and a ValueError too for code written against the earlier checks.
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# Good values
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_and_json_round_trip(cls):
    config = cls()
    assert config.auto_target_modules is False and config.inference_mode is False
    for flag in (False, True):
        config = cls(auto_target_modules=flag, modules_to_save=("head",))
        data = json.loads(json.dumps(config.to_dict()))
        again = cls(**data)
        assert again.to_dict() == config.to_dict()
        assert again.auto_target_modules is flag and again.modules_to_save == ["head"]


def test_ints_are_accepted_for_float_fields_and_bools_are_not():
    config = MoPEFTConfig(lora_alpha=16, lora_dropout=0, prefix_gate_init=-2, frozen_gates={"b": {"lora": 1}})
    assert (config.lora_alpha, config.lora_dropout, config.prefix_gate_init) == (16, 0, -2)
    assert DeformableLoRAConfig(lora_alpha=16, lora_dropout=0).lora_alpha == 16
    for cls in (MoPEFTConfig, DeformableLoRAConfig):
        with pytest.raises(TypeError, match=r"`lora_alpha` must be a finite number > 0, got True \(bool\)"):
            cls(lora_alpha=True)


def test_good_nested_values_are_kept():
    config = MoPEFTConfig(
        pruned={"vision_encoder.layers.0": ["adapter", "lora"]},
        frozen_gates={"vision_encoder.layers.1": {"lora": 0.25, "prefix": 1}},
        lora_targets="k",
        auto_target_modules=True,
    )
    assert config.pruned == {"vision_encoder.layers.0": ["lora", "adapter"]}
    assert config.frozen_gates == {"vision_encoder.layers.1": {"lora": 0.25, "prefix": 1}}
    assert config.lora_targets == ["k"]
    deform = DeformableLoRAConfig(projection_ranks={"value_proj": 0, "output_proj": MAX_SIZE}, adapters_per_block=0)
    assert deform.rank("value_proj") == 0 and deform.rank("output_proj") == MAX_SIZE
    with pytest.raises(ValueError, match=r"`projection_ranks` names unknown projections \['query_proj'\]"):
        DeformableLoRAConfig(projection_ranks={"query_proj": True})


# ---------------------------------------------------------------------------------------------------------------------
# Values from adapter_config.json
# ---------------------------------------------------------------------------------------------------------------------
def _write_adapter(directory, cls, **bad) -> str:
    """An adapter directory whose config is `cls()` with `bad` written over it (json writes NaN / Infinity)."""
    os.makedirs(directory, exist_ok=True)
    data = {**json.loads(json.dumps(cls().to_dict())), **bad}
    with open(os.path.join(directory, "adapter_config.json"), "w") as handle:
        json.dump(data, handle)
    # Our `from_pretrained` checks the whole directory, weights included.
    save_file({"weight": torch.zeros(1)}, os.path.join(directory, "adapter_model.safetensors"))
    return str(directory)


JSON_CASES = [
    (ConvAdapterConfig, {"adapter_bias": "False"}, TypeError, "adapter_bias"),
    (ConvAdapterConfig, {"inference_mode": 1}, TypeError, "inference_mode"),
    (ConvAdapterConfig, {"auto_target_modules": "true"}, TypeError, "auto_target_modules"),
    (MoPEFTConfig, {"lora_alpha": NAN}, ValueError, "lora_alpha"),
    (MoPEFTConfig, {"prefix_gate_init": -INF}, ValueError, "prefix_gate_init"),
    (MoPEFTConfig, {"use_lora": "False"}, TypeError, "use_lora"),
    (MoPEFTConfig, {"r": 10**12}, ValueError, "r"),
    (MoPEFTConfig, {"frozen_gates": {"b": "lora"}}, TypeError, "frozen_gates"),
    (DeformableLoRAConfig, {"lora_dropout": "0.1"}, TypeError, "lora_dropout"),
    (DeformableLoRAConfig, {"lora_alpha": INF}, ValueError, "lora_alpha"),
    (DeformableLoRAConfig, {"projection_ranks": {"value_proj": 4.5}}, TypeError, "projection_ranks"),
    (SeqAdapterConfig, {"adapters_per_block": [2]}, TypeError, "adapters_per_block"),
    (SeqAdapterConfig, {"adapter_dim": 64.0}, TypeError, "adapter_dim"),
]


@pytest.mark.parametrize(
    "cls, bad, error, name",
    [pytest.param(*case, id=f"{case[0].__name__}-{case[3]}") for case in JSON_CASES],
)
@pytest.mark.parametrize("loader", ["own_class", "PeftConfig", "PeftModel"])
def test_bad_values_from_adapter_config_json(tmp_path, cls, bad, error, name, loader):
    path = _write_adapter(tmp_path / "adapter", cls, **bad)
    load = {
        "own_class": cls.from_pretrained,
        "PeftConfig": PeftConfig.from_pretrained,
        # The config is built (and refused) before peft touches the model.
        "PeftModel": lambda path: PeftModel.from_pretrained(nn.Linear(2, 2), path),
    }[loader]
    with pytest.raises(error, match=_field_regex(name)):
        load(path)


@pytest.mark.parametrize("cls", CONFIGS)
def test_good_adapter_config_json_loads(tmp_path, cls):
    path = _write_adapter(tmp_path / "adapter", cls, auto_target_modules=True, inference_mode=True)
    for load in (cls.from_pretrained, PeftConfig.from_pretrained):
        config = load(path)
        assert type(config) is cls and config.auto_target_modules is True and config.inference_mode is True


# ---------------------------------------------------------------------------------------------------------------------
# adapter_config.json that is not valid JSON
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def broken_adapter(tmp_path):
    path = _write_adapter(tmp_path / "adapter", ConvAdapterConfig)
    with open(os.path.join(path, "adapter_config.json"), "w") as handle:
        handle.write("{not json")
    return path


@pytest.mark.parametrize("cls", CONFIGS)
def test_broken_json_through_our_config_classes(broken_adapter, cls):
    # `CheckedLoadingMixin.from_pretrained` checks the directory first and names the file.
    with pytest.raises(
        ValueError,
        match=r"adapter_config\.json' is not valid JSON \(Expecting property name enclosed in double quotes: line 1 "
        r"column 2 \(char 1\)\)\. The adapter directory is damaged\.",
    ):
        cls.from_pretrained(broken_adapter)


def test_broken_json_through_peft_entry_points(broken_adapter):
    # peft parses the file itself before any of our code runs: a bare JSONDecodeError (a ValueError) that gives the
    # position but not the file. Recorded here so that the documentation can quote it.
    expected = r"^Expecting property name enclosed in double quotes: line 1 column 2 \(char 1\)$"
    with pytest.raises(json.JSONDecodeError, match=expected):
        PeftConfig.from_pretrained(broken_adapter)
    with pytest.raises(json.JSONDecodeError, match=expected):
        PeftModel.from_pretrained(nn.Linear(2, 2), broken_adapter)


# ---------------------------------------------------------------------------------------------------------------------
# modules_to_save against a model
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam():
    return make_sam()


def test_modules_to_save_typo_on_sam_suggests_the_module(sam):
    with pytest.raises(
        ValueError,
        match=r"`modules_to_save` names modules that SamForSemanticSegmentation does not have: 'mask_decodr' "
        r"\(did you mean 'mask_decoder'",
    ) as info:
        check_modules_to_save(sam, MoPEFTConfig(modules_to_save=["mask_decoder", "mask_decodr"]))
    # The entry that matches is not reported (only suggested).
    assert "'mask_decoder' (" not in str(info.value)
    # Every module name and suffix that peft would match passes, as do None and [].
    check_modules_to_save(sam, MoPEFTConfig(modules_to_save=["mask_decoder", "vision_encoder.neck", "neck"]))
    check_modules_to_save(sam, MoPEFTConfig(modules_to_save=None))
    check_modules_to_save(sam, MoPEFTConfig(modules_to_save=[]))


def test_modules_to_save_lists_every_unmatched_entry():
    unet = make_unet("test_resnet")
    with pytest.raises(ValueError, match=r"'segmentation_haed' \(did you mean 'segmentation_head'.*'zzzz' \(no close"):
        check_modules_to_save(unet, ConvAdapterConfig(modules_to_save=["segmentation_haed", "decoder", "zzzz"]))
    mask2former = make_mask2former()
    with pytest.raises(ValueError, match=r"'class_predicter' \(did you mean 'class_predictor'"):
        check_modules_to_save(mask2former, SeqAdapterConfig(modules_to_save=["class_predicter"]))
    check_modules_to_save(mask2former, DeformableLoRAConfig(modules_to_save=["class_predictor"]))


def test_modules_to_save_matches_like_peft():
    from peft.utils.other import ModulesToSaveWrapper, _set_trainable

    names = ["head", "proj", "roj", "bn2", "model.head", "heads", "stem.weight", "gate", "Head"]
    for name in names:
        wrapped = _set_trainable(make_tiny_cnn(), "default", [name], inference_mode=False)
        peft_matches = any(isinstance(module, ModulesToSaveWrapper) for module in wrapped or [])
        try:
            check_modules_to_save(make_tiny_cnn(), ConvAdapterConfig(modules_to_save=[name]))
            ours = True
        except ValueError:
            ours = False
        assert ours == peft_matches, name


def test_modules_to_save_skips_modules_inside_peft_wrappers():
    from peft.utils.other import ModulesToSaveWrapper

    model = make_tiny_cnn()
    model.head = ModulesToSaveWrapper(model.head, "default")  # holds `head.original_module`, `head.modules_to_save`
    check_modules_to_save(model, ConvAdapterConfig(modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"'default'"):
        check_modules_to_save(model, ConvAdapterConfig(modules_to_save=["default"]))

    class Wrapped(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    model.proj = Wrapped(model.proj)
    check_modules_to_save(model, ConvAdapterConfig(modules_to_save=["proj"]))
    with pytest.raises(ValueError, match=r"'base_layer'"):
        check_modules_to_save(model, ConvAdapterConfig(modules_to_save=["base_layer"]))

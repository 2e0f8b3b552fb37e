# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Bad inputs to the segmentation models (U-Net, SAM) get a TypeError/ValueError that names the field and the value,
never a silently wrong loss or a deep torch error; saved U-Nets tell a user without the import what to import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForSemanticSegmentation

from peft_vision_ext.models import SamForSemanticSegmentation, UNetConfig, UNetForSemanticSegmentation

from tiny_models import make_sam, make_unet, tiny_sam_config


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# (image size, 3 classes, ignore index 255) for both tiny models; SAM's encoder size is 80, the U-Net's any.
SIZES = {"unet": 32, "sam": 80}


@pytest.fixture(scope="module")
def models():
    return {"unet": make_unet("test_resnet"), "sam": make_sam()}


def images(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(0))


def label_map(name: str, batch: int = 2, size: int | None = None, dtype=torch.long) -> torch.Tensor:
    size = size or SIZES[name]
    return torch.randint(0, 3, (batch, size, size), generator=torch.Generator().manual_seed(1)).to(dtype)


def with_ids(name: str, ids: list[int]) -> torch.Tensor:
    labels = label_map(name)
    labels[0, 0, : len(ids)] = torch.tensor(ids)
    return labels


MODELS = ["unet", "sam"]
# The shape error gives the expected shape and the shape of `pixel_values` it comes from; the received one follows.
_SHAPE = r"`labels` must have shape \(batch, height, width\) = \(2, (\d+), \1\), .*`pixel_values` \(shape \(2, 3, \1, \1\)\), "

# (labels(model name), exception, regex that must match: field name and received value)
BAD_LABELS = {
    "float": (lambda n: label_map(n, dtype=torch.float32), TypeError, r"`labels` .*torch\.float32.*labels\.long\(\)"),
    "float16": (lambda n: label_map(n, dtype=torch.float16), TypeError, r"`labels` .*torch\.float16"),
    "numpy": (lambda n: label_map(n).numpy(), TypeError, r"`labels` must be a torch\.Tensor.*ndarray"),
    "smaller": (lambda n: label_map(n, size=SIZES[n] // 2), ValueError, _SHAPE + r"got \(2, (\d+), \2\)"),
    "larger": (lambda n: label_map(n, size=SIZES[n] * 2), ValueError, _SHAPE + r"got \(2, (\d+), \2\)"),
    "batch": (lambda n: label_map(n, batch=1), ValueError, _SHAPE + r"got \(1, \1, \1\)"),
    "no_batch_axis": (lambda n: label_map(n)[0], ValueError, _SHAPE + r"got \((\d+), \2\)"),
    "channel_axis": (lambda n: label_map(n)[:, None], ValueError, _SHAPE + r"got \(2, 1, \1, \1\)"),
    "id_num_labels": (
        lambda n: with_ids(n, [3]),
        ValueError,
        r"`labels` holds class ids outside \[0, 3\) or the ignore value 255: \[3\]\. Check `config\.num_labels` "
        r"\(got 3\) and `config\.semantic_loss_ignore_index` \(got 255\)",
    ),
    "ids_several": (
        lambda n: with_ids(n, [-1, 7, 254, 7]),
        ValueError,
        r"`labels` holds class ids .*: \[-1, 7, 254\]",
    ),
    "id_minus_100": (lambda n: with_ids(n, [-100]), ValueError, r"`labels` holds class ids .*: \[-100\]"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
@pytest.mark.parametrize("name", MODELS)
def test_bad_labels(models, name, case):
    make_labels, error, match = BAD_LABELS[case]
    with pytest.raises(error, match=match):
        models[name](pixel_values=images(name), labels=make_labels(name))


def test_ids_listed_are_capped_and_sorted(models):
    labels = label_map("unet")
    labels[0, 0, :20] = torch.arange(10, 30)
    with pytest.raises(ValueError, match=r"\[10, 11, 12, 13, 14, 15, 16, 17, 18, 19\]\. Check"):
        models["unet"](pixel_values=images("unet"), labels=labels)


@pytest.mark.parametrize("name", MODELS)
def test_configured_ignore_index_is_the_one_allowed(name):
    """With `semantic_loss_ignore_index=-100`, 255 is an out-of-range id and -100 is ignored."""
    if name == "unet":
        config = UNetConfig(encoder_name="test_resnet", num_labels=3, semantic_loss_ignore_index=-100)
        model = UNetForSemanticSegmentation(config)
    else:
        config = tiny_sam_config()
        config.semantic_loss_ignore_index = -100
        model = SamForSemanticSegmentation(config)
    with pytest.raises(ValueError, match=r"outside \[0, 3\) or the ignore value -100: \[255\].*\(got -100\)"):
        model(pixel_values=images(name), labels=with_ids(name, [255, -100]))
    labels = label_map(name)
    labels[:, : SIZES[name] // 2] = -100
    assert torch.isfinite(model(pixel_values=images(name), labels=labels).loss)


# (pixel_values(model name), exception, regex)
BAD_PIXELS = {
    "uint8": (
        lambda n: (images(n) * 50 + 128).clamp(0, 255).to(torch.uint8),
        TypeError,
        r"`pixel_values` must be a float tensor, got dtype torch\.uint8.*Convert to float and normalise.*image "
        r"processor",
    ),
    "int64": (lambda n: images(n).long(), TypeError, r"`pixel_values` must be a float tensor, got dtype torch\.int64"),
    "bool": (lambda n: images(n) > 0, TypeError, r"`pixel_values` must be a float tensor, got dtype torch\.bool"),
    "float64": (
        lambda n: images(n).double(),
        TypeError,
        r"`pixel_values` has dtype torch\.float64, but the model computes in torch\.float32\. Call "
        r"`pixel_values\.float\(\)`",
    ),
    "complex": (lambda n: images(n).to(torch.complex64), TypeError, r"`pixel_values` has dtype torch\.complex64"),
    "empty_batch": (
        lambda n: images(n, batch=0),
        ValueError,
        r"`pixel_values` is empty: got shape \(0, 3, \d+, \d+\)",
    ),
    "empty_image": (lambda n: images(n)[..., :0], ValueError, r"`pixel_values` is empty: got shape \(2, 3, \d+, 0\)"),
    "numpy": (lambda n: images(n).numpy(), TypeError, r"`pixel_values` must be a torch\.Tensor.*ndarray"),
    "list": (lambda n: images(n).tolist(), TypeError, r"`pixel_values` must be a torch\.Tensor.*of type list"),
}


@pytest.mark.parametrize("case", list(BAD_PIXELS))
@pytest.mark.parametrize("name", MODELS)
def test_bad_pixel_values(models, name, case):
    make_pixels, error, match = BAD_PIXELS[case]
    with pytest.raises(error, match=match):
        models[name](pixel_values=make_pixels(name))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", MODELS)
def test_non_finite_pixel_values_with_labels(models, name, value):
    """Checked when labels are given (training/evaluation), where one such batch would poison the weights."""
    pixels = images(name)
    pixels[1, 2, 3, 4] = value
    with pytest.raises(ValueError, match=r"`pixel_values` holds NaN or infinite values \(shape \(2, 3, \d+, \d+\)\)"):
        models[name](pixel_values=pixels, labels=label_map(name))


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", MODELS)
def test_half_precision_model_casts_float_inputs(name, input_dtype):
    """A bf16 model accepts the float32 batch users pass (and float16), like transformers' vision models."""
    model = (make_unet("test_resnet") if name == "unet" else make_sam()).to(torch.bfloat16)
    out = model(pixel_values=images(name).to(input_dtype), labels=label_map(name))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


BAD_CONFIGS = {
    "unet_one_label": (
        lambda: UNetConfig(encoder_name="test_resnet", num_labels=1),
        ValueError,
        r"`num_labels` must be >= 2 .*got 1.*use 2 labels, background and foreground",
    ),
    "unet_one_label_id2label": (
        lambda: UNetConfig(encoder_name="test_resnet", id2label={0: "rock"}),
        ValueError,
        r"`num_labels` must be >= 2 .*got 1",
    ),
    "unet_config_edited": (
        lambda: UNetForSemanticSegmentation(_edited(UNetConfig(encoder_name="test_resnet"), num_labels=1)),
        ValueError,
        r"`num_labels` must be >= 2 .*got 1",
    ),
    "sam_one_label": (
        lambda: SamForSemanticSegmentation(tiny_sam_config(num_labels=1)),
        ValueError,
        r"`num_labels` must be >= 2 .*got 1.*background and foreground",
    ),
    "unet_ignore_index_str": (
        lambda: UNetConfig(encoder_name="test_resnet", semantic_loss_ignore_index="255"),
        TypeError,
        r"`semantic_loss_ignore_index` must be an int or None, got '255' of type str",
    ),
    "sam_ignore_index_float": (
        lambda: SamForSemanticSegmentation(_edited(tiny_sam_config(), semantic_loss_ignore_index=255.0)),
        TypeError,
        r"`semantic_loss_ignore_index` must be an int or None, got 255\.0 of type float",
    ),
}


def _edited(config, **changes):
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config(case):
    build, error, match = BAD_CONFIGS[case]
    with pytest.raises(error, match=match):
        build()


def test_metrics_and_models_share_the_label_rules(models):
    """The loss refuses what the metrics refuse, with the same sentence (only the names of the settings differ)."""
    from peft_vision_ext.metrics import confusion_matrix

    labels = with_ids("unet", [5])
    with pytest.raises(ValueError) as metric_error:
        confusion_matrix(np.zeros(tuple(labels.shape), dtype=np.int64), labels.numpy(), num_labels=3)
    with pytest.raises(ValueError) as model_error:
        models["unet"](pixel_values=images("unet"), labels=labels)
    assert str(model_error.value) == str(metric_error.value).replace("`references`", "`labels`").replace(
        "`num_labels`", "`config.num_labels`"
    ).replace("`ignore_index`", "`config.semantic_loss_ignore_index`")


_LOAD_WITHOUT_IMPORT = """
import sys
sys.path.insert(0, {tests_dir!r})
import tiny_models  # must not import peft_vision_ext at module level
assert "peft_vision_ext" not in sys.modules, "tests/tiny_models.py imports peft_vision_ext"
from transformers import AutoModelForSemanticSegmentation
try:
    AutoModelForSemanticSegmentation.from_pretrained({path!r})
except ValueError as err:
    print("ERROR:", err)
else:
    raise SystemExit("loaded without `import peft_vision_ext`")
import peft_vision_ext
model = AutoModelForSemanticSegmentation.from_pretrained({path!r})
print("LOADED:", type(model).__name__)
"""


def test_loading_a_unet_without_the_import_says_to_import(tmp_path):
    make_unet("test_resnet").save_pretrained(tmp_path)
    script = _LOAD_WITHOUT_IMPORT.format(tests_dir=TESTS_DIR, path=str(tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    error = next(line for line in result.stdout.splitlines() if line.startswith("ERROR:"))
    assert "import peft_vision_ext" in error, error
    assert "LOADED: UNetForSemanticSegmentation" in result.stdout


@pytest.mark.parametrize("load", ["auto_class", "model_class"])
def test_unet_saved_under_the_former_model_type_loads_and_resaves_under_the_new_one(tmp_path, caplog, load):
    model = make_unet("test_resnet")
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["model_type"] == UNetConfig.model_type and "import peft_vision_ext" in config["model_type"]
    config["model_type"] = "pve_unet"  # what checkpoints saved before the import hint hold
    config_file.write_text(json.dumps(config))

    loader = AutoModelForSemanticSegmentation if load == "auto_class" else UNetForSemanticSegmentation
    with caplog.at_level("WARNING"):
        loaded = loader.from_pretrained(tmp_path / "old").eval()
    assert not [r for r in caplog.records if "model of type" in r.getMessage()], caplog.text
    assert type(loaded) is UNetForSemanticSegmentation and type(loaded.config) is UNetConfig
    assert loaded.config.model_type == UNetConfig.model_type
    x = images("unet", batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == UNetConfig.model_type

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Registration with stock peft: idempotent, guarded against peft upgrades, and helpful when the import is missing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_vision_ext
from peft_vision_ext import ConvAdapterConfig, ConvAdapterModel, _registry

from tiny_models import make_tiny_cnn


VALUE = "CONV_ADAPTER (IMPORT PEFT_VISION_EXT)"


def test_peft_type_and_tables():
    member = PeftType(VALUE)
    assert member is PeftType[VALUE] and member in list(PeftType)
    # adapter_config.json stores the plain string; peft looks it up in its tables with that string.
    assert PEFT_TYPE_TO_CONFIG_MAPPING[VALUE] is ConvAdapterConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[VALUE] is ConvAdapterModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[VALUE] == ConvAdapterModel.prefix == "convadapter_"
    assert ConvAdapterConfig().peft_type is member


def test_registration_is_idempotent():
    before = len(PeftType)
    importlib.reload(_registry)
    module = importlib.import_module("peft_vision_ext.tuners.conv_adapter")
    importlib.reload(module)  # re-runs register_method with the same classes
    _registry.register_method(
        name="conv_adapter",
        config_cls=module.ConvAdapterConfig,
        model_cls=module.ConvAdapterModel,
        prefix="convadapter_",
    )
    assert len(PeftType) == before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[VALUE] is module.ConvAdapterConfig


def test_registration_refuses_a_foreign_class():
    class Other(PeftConfig):
        pass

    with pytest.raises(KeyError, match="already registered"):
        _registry.register_method(
            name="conv_adapter", config_cls=Other, model_cls=ConvAdapterModel, prefix="convadapter_"
        )


def test_guard_fails_loudly_when_peft_internals_change(monkeypatch):
    from peft import mapping

    _registry.check_peft_internals()  # the installed peft is fine
    monkeypatch.setattr(mapping, "PEFT_TYPE_TO_TUNER_MAPPING", None)
    with pytest.raises(_registry.PeftInternalsChanged, match="PEFT_TYPE_TO_TUNER_MAPPING"):
        _registry.check_peft_internals()
    monkeypatch.undo()
    monkeypatch.setattr(_registry, "register_peft_method", lambda *, method, config: None)
    with pytest.raises(_registry.PeftInternalsChanged, match="signature changed"):
        _registry.check_peft_internals()


def test_peft_workflow_entry_points(tmp_path, capsys):
    model = get_peft_model(make_tiny_cnn(), ConvAdapterConfig(init_weights=False))
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    model.add_adapter("second", ConvAdapterConfig(adapter_type="bn", init_weights=False))
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        first = model(x)
        model.set_adapter("second")
        second = model(x)
    assert not torch.allclose(first, second)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second"]
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "conv-adapter" in card and "import peft_vision_ext" in card
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    loaded = PeftModel.from_pretrained(make_tiny_cnn(), tmp_path / "second").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), second, atol=1e-6)


def test_loading_without_the_import_says_to_import(tmp_path):
    model = get_peft_model(make_tiny_cnn(), ConvAdapterConfig())
    model.save_pretrained(tmp_path)
    script = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from peft import PeftModel\n"
        "from tiny_models import make_tiny_cnn\n"
        "assert 'peft_vision_ext' not in sys.modules\n"
        f"PeftModel.from_pretrained(make_tiny_cnn(), {str(tmp_path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "IMPORT PEFT_VISION_EXT" in result.stderr.splitlines()[-1], result.stderr[-2000:]


def test_package_version_and_public_api():
    assert peft_vision_ext.__version__
    assert {"ConvAdapterConfig", "ConvAdapterModel"} <= set(peft_vision_ext.__all__)

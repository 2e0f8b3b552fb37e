# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Behaviour shared by every method of this package: module-name normalisation, checked loading, model cards,
exclusion matching and the checkpoint-fits-model check."""

from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
from peft.utils import CONFIG_NAME
from torch import nn

from .._files import check_adapter_dir
from ..hub import update_model_card
from ._mixed_batch import check_adapter_names, mixed_batch_forward
from ._validation import check_modules_to_save


def normalize_module_names(config, *names: str) -> None:
    """Normalise peft-style module selectors in place: a list becomes a sorted list of unique names, a string stays a
    regex, anything else is refused with the field name."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, (set, tuple)):
            value = list(value)
        if isinstance(value, list):
            if not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"`{name}` must be a list of non-empty module names, got {value!r}.")
            value = sorted(set(value))
        elif value is not None and not isinstance(value, str):
            raise TypeError(
                f"`{name}` must be None, a list of module names or a regex string, got {type(value).__name__}: "
                f"{value!r}."
            )
        setattr(config, name, value)
    if isinstance(getattr(config, "modules_to_save", None), str):
        config.modules_to_save = [config.modules_to_save]


class CheckedLoadingMixin:
    """``from_pretrained`` checks a local adapter directory before peft builds anything (peft would otherwise reach a
    missing weights file only after building the model, and report it as a failed Hub download); ``save_pretrained``
    writes a model card that names the method. Subclasses set ``method_name`` (a key of ``hub.METHOD_TITLES``)."""

    method_name: str = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        path = pretrained_model_name_or_path
        if subfolder:
            path = os.path.join(path, subfolder)
        weights = None
        if os.path.isdir(path):
            weights = check_adapter_dir(path)
            _check_config_file(cls, os.path.join(path, CONFIG_NAME))
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if weights is not None and weights.endswith(".safetensors"):
            check_saved_modules(config, weights)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        update_model_card(save_directory, method=self.method_name, config=self)


def _check_config_file(cls: type, path: str) -> None:
    """An ``adapter_config.json`` must be a JSON object naming this method: ``{}`` would otherwise load as the
    defaults, and a list fails deep inside peft."""
    with open(path) as handle:
        data = json.load(handle)  # valid JSON: `check_adapter_dir` parsed it
    if not isinstance(data, dict):
        raise ValueError(
            f"{path!r} holds a JSON {type(data).__name__}, not an object of config fields. The adapter directory is "
            "damaged: copy the whole directory that `save_pretrained` wrote."
        )
    expected = cls().peft_type
    if data.get("peft_type") != expected:
        raise ValueError(
            f"{path!r} has `peft_type`={data.get('peft_type')!r}, but {cls.__name__} reads {expected.value!r}. Load it "
            "with `peft.PeftConfig.from_pretrained` (after `import peft_vision_ext`), which picks the right class."
        )


def check_saved_modules(config, weights: str) -> None:
    """Refuse an adapter whose ``modules_to_save`` (e.g. a new head) have no tensors in the weights file: peft would
    fail later with a bare ``KeyError``, or keep the base model's untrained module without a word."""
    from safetensors import safe_open

    names = list(config.modules_to_save or [])
    if not names:
        return
    with safe_open(weights, framework="pt") as handle:
        keys = list(handle.keys())
    missing = [
        name
        for name in names
        if not any(key.startswith(f"base_model.model.{name}.") or f".{name}." in key for key in keys)
    ]
    if missing:
        raise ValueError(
            f"The adapter's config lists `modules_to_save`={names}, but {weights!r} holds no tensors for "
            + ", ".join(f"`{name}`" for name in missing)
            + ". The weights file is incomplete or belongs to another adapter: copy the whole directory that "
            "`save_pretrained` wrote."
        )


def check_auto_targets(config, found: list[str], what: str) -> None:
    """For a config whose ``target_modules`` were expanded from ``None`` (``auto_target_modules``): refuse a model
    whose own expansion differs, i.e. a different base model (e.g. a resnet18 adapter on a resnet34, or a 2-block
    adapter on a 3-block encoder). Without this check the adapter would load onto the subset that matches."""
    if not getattr(config, "auto_target_modules", False) or not isinstance(config.target_modules, (list, set)):
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    # peft may have condensed the saved list into suffixes (`_find_minimal_target_modules`): match as peft does.
    probe = copy.copy(config)
    probe.exclude_modules = None
    saved = sorted(config.target_modules)
    extra = [name for name in found if not check_target_module_exists(probe, name)]
    absent = [entry for entry in saved if not any(n == entry or n.endswith("." + entry) for n in found)]
    if not (extra or absent):
        return
    details = []
    if extra:
        details.append(f"this model has {len(extra)} {what}(s) the adapter does not cover, e.g. `{extra[0]}`")
    if absent:
        details.append(f"{len(absent)} of the adapter's target names match none of them, e.g. `{absent[0]}`")
    trained_on = config.base_model_name_or_path or "an unrecorded base model"
    raise ValueError(
        f"This adapter was made for every {what} of {trained_on}, but "
        + "; ".join(details)
        + ". It belongs to a different base model: load it onto the base it was trained on."
    )


def base_layer_device_and_dtype(base_layer: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a wrapped module that may have no ``weight`` (a block, an attention module):
    those of its first floating-point parameter. peft's own lookup reads ``weight`` only, so adapters on such modules
    would neither follow a bf16 base nor honour ``autocast_adapter_dtype=False``."""
    weight = getattr(base_layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device, weight.dtype
    for param in base_layer.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return None, None


def is_excluded(config, key: str) -> bool:
    """Whether ``exclude_modules`` of ``config`` rules out the module ``key`` (peft's own matching, on a probe copy
    whose ``target_modules`` names exactly that module)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = copy.copy(config)
    probe.target_modules = [key]
    return not check_target_module_exists(probe, key)


def check_adapter_fits(
    model: nn.Module,
    layer_cls: type | tuple[type, ...],
    config,
    adapter_name: str,
    remapped: dict[str, torch.Tensor],
    *,
    title: str,
    remedy: str,
) -> None:
    """Raise a ``ValueError`` naming the tensors if a checkpoint (keys already remapped to the model) misses adapter
    tensors of ``layer_cls`` layers (a class or a tuple of them), holds tensors that match nothing in the model, or
    holds tensors of the wrong shape. peft loads non-strictly: it would otherwise drop or skip them without a word, or
    fail with a bare size-mismatch error."""
    model_state = model.state_dict()
    expected = []
    for module_name, module in model.named_modules():
        if not isinstance(module, layer_cls):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                expected.append(f"{module_name}.{attr}.{adapter_name}")
            else:
                expected += [f"{module_name}.{attr}.{adapter_name}.{key}" for key in item.state_dict()]
    missing = [key for key in expected if key not in remapped]
    # A stored tensor that finds no place in the model would be dropped by peft's non-strict load without a word.
    unexpected = [
        key for key in remapped if key not in model_state and key.removeprefix("base_model.model.") not in model_state
    ]
    mismatched = [
        f"`{key}`: checkpoint {tuple(value.shape)} vs model {tuple(model_state[key].shape)}"
        for key, value in remapped.items()
        if key in model_state and tuple(value.shape) != tuple(model_state[key].shape)
    ]
    if not (missing or mismatched or unexpected):
        return
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} stored tensor(s) match no module of this model, e.g. "
            + ", ".join(f"`{key}`" for key in unexpected[:3])
        )
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) have the wrong shape, e.g. " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(
            f"{len(missing)} adapter tensor(s) are missing from the checkpoint, e.g. "
            + ", ".join(f"`{key}`" for key in missing[:3])
        )
    trained_on = config.base_model_name_or_path or "an unrecorded base model"
    raise ValueError(
        f"{title} {adapter_name!r} does not fit this model: " + "; ".join(problems) + f". The adapter was trained on "
        f"{trained_on}; load it onto that base model, or {remedy} if the file is damaged."
    )


class WrapperReplaceMixin:
    """``BaseTuner._replace_module`` for tuners whose layers wrap modules that may have no ``weight`` (blocks,
    attention modules): swap the module and place the new adapter parameters on the device of the wrapped module.
    peft's own version is not enough: on unload it puts back the wrapped module, which has no ``base_layer``, and then
    reads ``child.weight`` (a block has none)."""

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        if not hasattr(new_module, "get_base_layer") or new_module.get_base_layer() is new_module:
            return
        reference = next(new_module.get_base_layer().parameters(), None)
        if reference is not None and reference.device != torch.device("meta"):
            for name, module in new_module.named_modules():
                # Modules on the meta device (`low_cpu_mem_usage=True`) get their tensors from the checkpoint.
                if self.prefix in name and not any(p.is_meta for p in module.parameters()):
                    module.to(reference.device)


class CheckedTunerMixin:
    """What every tuner of this package does around peft's ``BaseTuner`` (put it before ``BaseTuner`` in the bases):

    - ``merge_and_unload`` first calls ``_refuse_inexact_merge(adapter_names)``, which a tuner overrides to raise, in
      words, when something to merge cannot be folded into weights exactly (nothing is merged or unloaded then);
    - loading checks that the checkpoint fits the model's ``tuner_layer_cls`` layers (``check_adapter_fits``), with
      the tuner's ``adapter_title`` and ``fits_remedy`` in the message.
    """

    adapter_title: str = "Adapter"
    fits_remedy: str = "re-save it"

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Resolving targets writes into the config (expanded `target_modules`, default `modules_to_save`). Work on a
        # copy, so that a config object a user reuses for a second model is still the one they wrote.
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        # peft ignores a `modules_to_save` entry that names nothing (and the default head is then not trained).
        check_modules_to_save(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # peft's `forward(adapter_names=[...])` (one adapter per row): tuners that do not handle it drop it silently
        # and every row uses the active adapter. Here the batch is split by adapter at the model's input for the
        # duration of this forward (see `_mixed_batch`).
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        adapter_names = check_adapter_names(self.model, adapter_names, list(self.peft_config))
        model = self.model
        forward = model.forward

        def split_forward(*f_args, **f_kwargs):
            return mixed_batch_forward(model, forward, adapter_names, f_args, f_kwargs)

        model.forward = split_forward  # an instance attribute: `nn.Module.__call__` (and its hooks) still run
        try:
            yield
        finally:
            del model.forward

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        # Targets are resolved against the model in `_prepare_model`, not from a per-architecture table.
        return peft_config

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        # Workaround of an upstream bug (peft 0.21 with transformers 5): peft's tied-weights check asks every model
        # whose `_tied_weights_keys` is a dict for `get_input_embeddings()`, which transformers 5 answers with
        # NotImplementedError on vision models (DeformableDetrForObjectDetection, GroundingDinoForObjectDetection tie
        # their box/class heads across decoder layers). Such a model has no input embeddings, so nothing is tied to
        # them. tests/test_detection_heads.py fails once upstream fixes it: then drop this override.
        get_input_embeddings = getattr(self.model, "get_input_embeddings", None)
        if get_input_embeddings is not None:
            try:
                get_input_embeddings()
            except NotImplementedError:
                return []
        return super()._get_module_names_tied_with_embedding()

    def _refuse_inexact_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise a ``ValueError`` if the adapters to merge (default: the active ones) cannot be merged exactly
        (default: they always can)."""

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._refuse_inexact_merge(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits(
            model, cls.tuner_layer_cls, config, adapter_name, remapped, title=cls.adapter_title, remedy=cls.fits_remedy
        )
        return remapped

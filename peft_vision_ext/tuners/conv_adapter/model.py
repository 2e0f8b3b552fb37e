# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PretrainedConfig

from .._common import CheckedTunerMixin, check_auto_targets, is_excluded
from .config import ConvAdapterConfig
from .frozen_bn import protect_frozen_batchnorm, unprotect_frozen_batchnorm
from .layer import Conv2d, ConvAdapterLayer, fusion_blockers


# Name of the config attribute that lists convs whose bias was created by fusion; models of this package recreate
# those biases on `from_pretrained` (see `peft_vision_ext.models.unet`).
FUSED_BIAS_CONFIG_KEY = "conv_bias_modules"


def _wrapped_prefixes(model: nn.Module) -> list[str]:
    """Names of tuner layers and modules_to_save wrappers: convs inside them are not candidates of their own."""
    return [
        name + "."
        for name, module in model.named_modules()
        if name and isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
    ]


def find_convs(model: nn.Module) -> dict[str, nn.Module]:
    """Map each adaptable conv's module name to its ``nn.Conv2d`` (a conv already wrapped by us counts once)."""
    inside = _wrapped_prefixes(model)
    found = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, ConvAdapterLayer):
            found[name] = module.get_base_layer()
        elif isinstance(module, nn.Conv2d):
            found[name] = module
    return found


class ConvAdapterModel(CheckedTunerMixin, BaseTuner):
    """Fusable conv adapters (seed 000) as a peft tuner. Create it with ``get_peft_model(model, ConvAdapterConfig())``.

    Each targeted ``nn.Conv2d`` is wrapped by [`~peft_vision_ext.tuners.conv_adapter.layer.Conv2d`]. ``merge_and_unload``
    returns the base model's class with every adapter folded into its conv; the only extra parameters are the biases
    created for bias-free convs, which are recorded in ``model.config.conv_bias_modules`` for models that have a
    ``PretrainedConfig``.

    Example:

        ```py
        >>> import peft_vision_ext
        >>> from peft import get_peft_model
        >>> from peft_vision_ext import ConvAdapterConfig
        >>> from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation

        >>> base = UNetForSemanticSegmentation(UNetConfig(encoder_name="resnet18", num_labels=3))
        >>> model = get_peft_model(base, ConvAdapterConfig(modules_to_save=["segmentation_head"]))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = "convadapter_"
    tuner_layer_cls = ConvAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}
    adapter_title = "Conv adapter"
    fits_remedy = "re-export the adapter"

    # ----------------------------------------------------------------------------------------------------------------
    # Target resolution
    # ----------------------------------------------------------------------------------------------------------------
    def _prepare_model(self, peft_config: ConvAdapterConfig, model: nn.Module) -> None:
        convs = find_convs(model)
        if not convs:
            raise ValueError(
                f"Conv adapters wrap torch.nn.Conv2d layers, but the model ({type(model).__name__}) has none. Use a "
                "convolutional model, or a method for other layer types (e.g. LoRA for nn.Linear)."
            )
        if peft_config.target_modules is None:
            fusable, skipped = [], {}
            for name, conv in convs.items():
                if is_excluded(peft_config, name):
                    continue
                reasons = fusion_blockers(conv)
                if reasons:
                    skipped[name] = reasons
                else:
                    fusable.append(name)
            if skipped:
                details = "; ".join(f"`{name}`: {'; '.join(reasons)}" for name, reasons in sorted(skipped.items()))
                warnings.warn(
                    f"Conv adapters leave out {len(skipped)} conv(s) that cannot be fused exactly: {details}.",
                    stacklevel=2,
                )
            if not fusable:
                raise ValueError(
                    f"None of the model's {len(convs)} conv(s) can take a fusable conv adapter ({len(skipped)} fail "
                    "the fusion conditions, the others are excluded). Check `exclude_modules` and `modules_to_save`."
                )
            # Expanded like peft's "all-linear": the saved config then names exactly the adapted convs.
            peft_config.target_modules = sorted(fusable)
            peft_config.auto_target_modules = True
            return
        if peft_config.auto_target_modules:
            found = [n for n, c in convs.items() if not is_excluded(peft_config, n) and not fusion_blockers(c)]
            check_auto_targets(peft_config, found, "fusable conv")

        matched = []
        inside_wrappers = _wrapped_prefixes(model)
        for name, module in model.named_modules():
            if not name or not check_target_module_exists(peft_config, name):
                continue
            if name in convs:
                matched.append(name)
                reasons = fusion_blockers(convs[name])
                if reasons:
                    raise ValueError(
                        f"`target_modules` selects the conv `{name}`, which cannot be fused exactly: "
                        + "; ".join(reasons)
                        + ". Remove it from `target_modules` (or add it to `exclude_modules`)."
                    )
            elif not any(name.startswith(prefix) for prefix in inside_wrappers):
                raise ValueError(
                    f"`target_modules` selects `{name}`, a {type(module).__name__}; conv adapters only wrap "
                    "torch.nn.Conv2d. Name conv layers only, or leave `target_modules=None` to adapt every fusable "
                    "conv."
                )
        if not matched:
            sample = ", ".join(f"`{name}`" for name in list(convs)[:8])
            hint = ""
            if peft_config.base_model_name_or_path:
                hint = (
                    f" The adapter was trained on `{peft_config.base_model_name_or_path}`; loading it onto a "
                    "different base model fails this way."
                )
            raise ValueError(
                f"`target_modules`={peft_config.target_modules!r} matches no conv of the model. Its convs include "
                f"{sample} ({len(convs)} in all).{hint}"
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Injection
    # ----------------------------------------------------------------------------------------------------------------
    def _create_and_replace(
        self,
        peft_config: ConvAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        kwargs = {
            "adapter_type": peft_config.adapter_type,
            "adapter_bias": peft_config.adapter_bias,
            "init_weights": peft_config.init_weights,
        }
        if isinstance(target, ConvAdapterLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(target: nn.Module, adapter_name: str, **kwargs) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, **kwargs)
        raise TypeError(
            f"Target module {type(base).__name__} is not supported. Conv adapters support: torch.nn.Conv2d."
        )

    def _post_injection_hook(self, model: nn.Module, config: ConvAdapterConfig, adapter_name: str) -> None:
        if config.freeze_bn_stats:
            protect_frozen_batchnorm(model)

    # ----------------------------------------------------------------------------------------------------------------
    # Unloading
    # ----------------------------------------------------------------------------------------------------------------
    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        bias_free = {
            name
            for name, module in self.model.named_modules()
            if isinstance(module, ConvAdapterLayer) and module.get_base_layer().bias is None
        }
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        unprotect_frozen_batchnorm(model)  # the returned base model trains like any model again
        if merge:
            modules = dict(model.named_modules())
            created = sorted(name for name in bias_free if getattr(modules.get(name), "bias", None) is not None)
            if created:
                _record_fused_biases(model, created)
        return model


def _record_fused_biases(model: nn.Module, names: list[str]) -> None:
    config = getattr(model, "config", None)
    if isinstance(config, PretrainedConfig):
        existing = set(getattr(config, FUSED_BIAS_CONFIG_KEY, None) or [])
        setattr(config, FUSED_BIAS_CONFIG_KEY, sorted(existing | set(names)))
    if not getattr(type(model), "supports_fused_conv_biases", False):
        sample = ", ".join(names[:3])
        warnings.warn(
            f"Fusion gave {len(names)} bias-free conv(s) a bias (e.g. {sample}). {type(model).__name__} does not "
            f"recreate them on `from_pretrained`, which would drop them: save the fused model with `torch.save`, or "
            "keep it in memory. peft_vision_ext models recreate them from `config.conv_bias_modules`.",
            stacklevel=3,
        )

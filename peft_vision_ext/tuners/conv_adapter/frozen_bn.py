# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The base model's frozen BatchNorms while adapters train: eval mode, and no activation kept for backward.

A BatchNorm whose parameters are all frozen must run in eval mode while adapters train: in train mode it normalises
with batch statistics and overwrites its running statistics, which peft does not save (peft issue 1732), so the
trained adapter would silently stop matching the base it is loaded onto. `protect_frozen_batchnorm` guards every
BatchNorm with a forward pre-hook that puts it back in eval mode whenever it is frozen.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = x * s + t`` with ``s = weight / sqrt(running_var +
eps)``: its input gradient is ``grad_y * s`` and needs no activation. PyTorch's BatchNorm still saves its input
(``x``, the size of the activation) for backward and reads it there (its CPU backward computes the weight-gradient
sums whether asked or not). So `protect_frozen_batchnorm` also turns each plain ``nn.BatchNorm1d/2d/3d`` into the
matching ``Protected*`` subclass (the same module, state dict and ``isinstance``; only the class changes, back again
on `unprotect_frozen_batchnorm`). Its forward is PyTorch's, bit for bit, and when the module is frozen, in eval mode
and its input needs a gradient, runs through `FrozenBatchNormFunction`, whose backward is ``grad_y * s``: nothing
saved but ``s`` (one value per channel). Under conv adapters this frees one activation per conv-BN pair (111 MiB of
a resnet18 U-Net's training peak at 256 px, batch 4; see BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNormFunction(torch.autograd.Function):
    """``F.batch_norm`` in eval mode with constant statistics and parameters: forward is PyTorch's own kernel (same
    output bit for bit); backward is ``grad * weight / sqrt(running_var + eps)`` per channel and saves no tensor
    of the input's size. Differentiable twice (its backward is a product with a constant)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        acc = torch.promote_types(running_var.dtype, torch.float32)
        scale = torch.rsqrt(running_var.to(acc) + eps)
        if weight is not None:
            scale = scale * weight.to(acc)
        ctx.save_for_backward(scale.view((1, -1) + (1,) * (x.dim() - 2)))  # (1, C, 1, ...): all that is kept
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (scale,) = ctx.saved_tensors
        if grad_out.dtype == scale.dtype:
            grad_in = grad_out * scale
        else:  # bf16/fp16 activations: multiply in float32, as PyTorch's BatchNorm backward does, then round once
            grad_in = (grad_out.to(scale.dtype) * scale).to(grad_out.dtype)
        return grad_in, None, None, None, None, None


def _is_frozen(module: nn.Module) -> bool:
    # The attributes, not `parameters()`: FSDP without `use_orig_params` replaces them by plain views of its flat
    # parameter, which `parameters()` no longer lists but which still require grad.
    tensors = (getattr(module, "weight", None), getattr(module, "bias", None))
    return not any(t is not None and t.requires_grad for t in tensors)


class _ProtectedBatchNorm:
    """Mixin of the ``Protected*`` BatchNorms (module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            not self.training
            and self.track_running_stats
            and self.running_mean is not None
            and torch.is_grad_enabled()
            and input.requires_grad
            and _is_frozen(self)
        ):
            self._check_input_dim(input)
            return FrozenBatchNormFunction.apply(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        return super().forward(input)


class ProtectedBatchNorm1d(_ProtectedBatchNorm, nn.BatchNorm1d):
    pass


class ProtectedBatchNorm2d(_ProtectedBatchNorm, nn.BatchNorm2d):
    pass


class ProtectedBatchNorm3d(_ProtectedBatchNorm, nn.BatchNorm3d):
    pass


# Exact classes only: a subclass (timm's BatchNormAct2d, SyncBatchNorm, ...) may compute something else in forward.
_PROTECTED = {
    nn.BatchNorm1d: ProtectedBatchNorm1d,
    nn.BatchNorm2d: ProtectedBatchNorm2d,
    nn.BatchNorm3d: ProtectedBatchNorm3d,
}
_UNPROTECTED = {protected: plain for plain, protected in _PROTECTED.items()}
PLAIN_BATCHNORM2D = (nn.BatchNorm2d, ProtectedBatchNorm2d)


def freeze_frozen_batchnorm(model: nn.Module) -> list[str]:
    """Put every BatchNorm without trainable parameters in eval mode, so that training leaves its statistics alone
    (module docstring). Returns their names."""
    frozen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            if _is_frozen(module):
                module.eval()
                frozen.append(name)
    return frozen


def _frozen_batchnorm_pre_hook(module: nn.Module, args: tuple) -> None:
    # A frozen BN switched to train mode (model.train(), Trainer) would normalise with batch statistics and overwrite
    # its running statistics: put it back in eval mode before it runs. It stays a no-op once the BN is made trainable.
    if module.training and _is_frozen(module):
        module.eval()


def protect_frozen_batchnorm(model: nn.Module) -> None:
    """Keep every frozen BatchNorm of ``model`` in eval mode whenever it runs, whichever entry point adapted the model
    (``get_peft_model``, ``PeftModel.from_pretrained`` or peft's low-level ``inject_adapter_in_model``, which returns
    the bare model: no wrapper's ``train()`` is in the way there, so the guard is a forward pre-hook on each BN), and
    give plain BatchNorms the ``Protected*`` class whose frozen backward keeps no activation (module docstring).
    Idempotent; `unprotect_frozen_batchnorm` undoes both (``merge_and_unload``/``unload``)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            if getattr(module, "_peft_vision_bn_guard", None) is None:
                module._peft_vision_bn_guard = module.register_forward_pre_hook(_frozen_batchnorm_pre_hook)
            protected = _PROTECTED.get(type(module))
            if protected is not None:
                module.__class__ = protected
    if model.training:
        freeze_frozen_batchnorm(model)


def restore_batchnorm_classes(model: nn.Module) -> None:
    """Give every ``Protected*`` BatchNorm of ``model`` its PyTorch class back (the eval-mode guard stays): frozen BNs
    then save their input for backward again."""
    for module in model.modules():
        plain = _UNPROTECTED.get(type(module))
        if plain is not None:
            module.__class__ = plain


def unprotect_frozen_batchnorm(model: nn.Module) -> None:
    """Undo `protect_frozen_batchnorm`: remove the guards and restore the BatchNorm classes."""
    for module in model.modules():
        handle = getattr(module, "_peft_vision_bn_guard", None)
        if handle is not None:
            handle.remove()
            del module._peft_vision_bn_guard
    restore_batchnorm_classes(model)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Conv adapter layers: a parallel BN -> 1x1 conv branch that folds exactly into the wrapped conv.

Fusion math (eval mode, ``BN_a`` with frozen running statistics):

    BN_a(x)               = a * x + c,          a = gamma / sqrt(var + eps),  c = beta - mean * a   # (C_in,)
    conv1x1(BN_a(x))      = (W1 diag a) x + (W1 c + b1)

``W1 diag a`` is a 1x1 kernel. Padded into the centre tap of the k x k kernel it gives the same output as the 1x1
branch *when* the conv has odd kernel, "same" padding ``dilation * (k - 1) / 2`` and the branch has the conv's stride:
the centre tap of output pixel i reads input pixel ``i * stride``, exactly what the strided 1x1 conv reads, and never
a padded pixel (so borders, and any ``padding_mode``, are exact). ``W1 c + b1`` goes into the conv bias.

The forward paths of `Conv2d`:

* eval mode, no gradients: `folded_weight` (recomputed at every call, never cached) and one conv;
* train mode ("conv" adapters): BN_a with batch statistics is still affine per channel, so the same fold applies with
  ``a``, ``c`` from the batch statistics; `_autograd.FoldedConvAdapterFunction` runs one conv forward and a backward
  that computes the input gradient through the folded kernel plus the small 1x1 and BN-affine gradients in closed
  form, never the k x k weight gradient of a frozen conv, and keeps no normalised copy of the input. Eval mode with
  gradients uses it too, with the running statistics as constants;
* train mode ("bn" adapters): the base conv, then `_autograd.BatchNormAffineFunction` (all BN_a of the conv share
  the output's statistics: one ``addcmul`` and one BatchNorm backward);
* otherwise (``fold_in_train``/``fold_in_eval`` off, hooks on the adapter modules, a mix of "conv" and "bn"
  adapters in training, BatchNorms that are not plain affine ``nn.BatchNorm2d``): the branches, module by module.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ._autograd import (
    BatchNormAffineFunction,
    ConvGeometry,
    FoldedConvAdapterFunction,
    NormState,
    accumulation_dtype,
    centre_tap_delta,
    fold_kernel,
)
from .frozen_bn import PLAIN_BATCHNORM2D, _frozen_batchnorm_pre_hook


def fusion_blockers(conv: nn.Module) -> list[str]:
    """Return the reasons why a conv adapter on ``conv`` could not be folded into it exactly (empty if it can)."""
    if not isinstance(conv, nn.Conv2d):
        return [f"it is a {type(conv).__name__}, not a torch.nn.Conv2d"]
    reasons = []
    if type(conv).forward is not nn.Conv2d.forward:
        # e.g. timm's Conv2dSame pads dynamically inside forward, so the kernel geometry alone is not the whole story.
        reasons.append(f"{type(conv).__name__} overrides Conv2d.forward, so its padding cannot be verified")
    if conv.transposed:
        reasons.append("it is a transposed convolution")
    for axis, k in zip("hw", conv.kernel_size):
        if k % 2 == 0:
            reasons.append(f"its kernel size {tuple(conv.kernel_size)} is even along {axis}, so it has no centre tap")
    if isinstance(conv.padding, str):
        if conv.padding == "valid" and any(k != 1 for k in conv.kernel_size):
            reasons.append("padding='valid' with a kernel larger than 1 shrinks the output")
    else:
        for axis, k, d, p in zip("hw", conv.kernel_size, conv.dilation, conv.padding):
            if k % 2 == 1 and p != d * (k - 1) // 2:
                reasons.append(
                    f"its padding {tuple(conv.padding)} is not 'same' padding dilation*(k-1)/2 = {d * (k - 1) // 2} "
                    f"along {axis}"
                )
    return reasons


class ConvAdapterLayer(BaseTunerLayer):
    """Mixin holding the adapter state of one wrapped conv, keyed by adapter name."""

    # Every trainable tensor sits directly under a ModuleDict keyed by adapter name, so peft's default key handling
    # (strip/re-insert the adapter name) saves and loads them, BN running statistics included.
    adapter_layer_names: tuple[str, ...] = ("convadapter_bn", "convadapter_conv")
    other_param_names: tuple[str, ...] = ("adapter_type",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.convadapter_bn = nn.ModuleDict({})
        self.convadapter_conv = nn.ModuleDict({})
        self.adapter_type: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Weight and bias before a BN-only adapter was merged (see `merge`), and whether merging created the bias.
        self._premerge_state: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._bias_created_by_merge = False
        # Fold eval-mode adapters into the kernel in `forward` (see there); tests switch it off to check both paths.
        self.fold_in_eval = True
        # Run train-mode adapters (and eval-mode ones with gradients) through the fused autograd Functions of
        # `_autograd.py`; False computes the branches module by module (the reference the tests compare with).
        self.fold_in_train = True
        # What peft's utilities read on tuner layers (as peft's own LoRA Conv2d sets them).
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels
        self.kwargs = kwargs

    def update_layer(
        self, adapter_name: str, adapter_type: str, adapter_bias: bool = True, init_weights: bool = True
    ) -> None:
        base = self.get_base_layer()
        reasons = fusion_blockers(base)
        if reasons:
            raise ValueError(
                f"Cannot add conv adapter {adapter_name!r}: the target conv cannot be fused exactly because "
                + "; ".join(reasons)
                + ". Exclude it with `exclude_modules` or leave `target_modules=None` to skip such convs."
            )
        if adapter_type == "conv":
            bn = nn.BatchNorm2d(base.in_channels)
            conv = nn.Conv2d(
                base.in_channels,
                base.out_channels,
                kernel_size=1,
                stride=base.stride,
                padding=0,
                groups=base.groups,
                bias=adapter_bias,
            )
            self.convadapter_conv[adapter_name] = conv
        elif adapter_type == "bn":
            bn = nn.BatchNorm2d(base.out_channels)
        else:
            raise ValueError(f"`adapter_type` must be 'conv' or 'bn', got {adapter_type!r}.")
        self.convadapter_bn[adapter_name] = bn
        self.adapter_type[adapter_name] = adapter_type
        self.reset_adapter_parameters(adapter_name, init_weights)
        # New modules start in train mode; a BN in train mode would use batch statistics inside an eval-mode model.
        bn.train(base.training)
        if adapter_type == "conv":
            conv.train(base.training)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool) -> None:
        bn = self.convadapter_bn[adapter_name]
        conv = self.convadapter_conv[adapter_name] if adapter_name in self.convadapter_conv else None
        if init_weights:
            # Zero output at init so the adapted model equals the base model at step 0. For "conv" the 1x1 conv is
            # zero (BN_a stays a plain BN, so its gradient flows once the conv moves); for "bn" the affine is zero.
            if conv is not None:
                nn.init.zeros_(conv.weight)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
            else:
                nn.init.zeros_(bn.weight)
                nn.init.zeros_(bn.bias)
            return
        # Random state, including BN statistics, so that merge tests exercise every term of the fusion formula.
        generator = torch.Generator().manual_seed(zlib.crc32(adapter_name.encode()))
        bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=generator))
        bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=generator))
        bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=generator))
        if conv is not None:
            std = 0.1 / math.sqrt(conv.weight[0].numel())
            conv.weight.copy_(std * torch.randn(conv.weight.shape, generator=generator))
            if conv.bias is not None:
                conv.bias.copy_(0.01 * torch.randn(conv.bias.shape, generator=generator))

    def _batchnorm(self, adapter_name: str) -> nn.BatchNorm2d:
        """The adapter's BatchNorm, with its running statistics in the dtype of its parameters. peft's
        ``autocast_adapter_dtype`` upcasts adapter *parameters* of a bf16/fp16 base to float32 but leaves buffers in
        the base dtype, and ``F.batch_norm`` refuses the mix in training mode."""
        bn = self.convadapter_bn[adapter_name]
        if bn.affine and bn.running_mean is not None and bn.running_mean.dtype != bn.weight.dtype:
            bn.running_mean = bn.running_mean.to(bn.weight.dtype)  # buffers: Module.__setattr__ re-registers them
            bn.running_var = bn.running_var.to(bn.weight.dtype)
        return bn

    def _bn_affine(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``BN_a(x) = a * x + c``; returns ``(a, c)``, each ``(C,)`` in float32 (float64 for a float64
        conv)."""
        bn = self.convadapter_bn[adapter_name]
        acc = accumulation_dtype(self.get_base_layer().weight.dtype)
        inv_std = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        gamma = bn.weight.to(acc) if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias.to(acc) if bn.affine else torch.zeros_like(inv_std)
        a = gamma * inv_std
        c = beta - bn.running_mean.to(acc) * a
        return a, c

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact change ``(dW, db)`` of the conv's kernel and bias that adapter ``adapter_name`` amounts to, in
        float32 (callers add it to the weights in float32 and round once to the conv's dtype).

        For a "bn" adapter the change is relative to the base conv's current (unmerged) weight.
        """
        base = self.get_base_layer()
        weight = base.weight
        if self.adapter_type[adapter_name] == "bn":
            a, c = self._bn_affine(adapter_name)  # (C_out,)
            bias = base.bias.to(a.dtype) if base.bias is not None else torch.zeros_like(a)
            delta_w = a.view(-1, 1, 1, 1) * weight.to(a.dtype)
            delta_b = a * bias + c
            return delta_w, delta_b

        centre, delta_b = self._centre_tap_delta(adapter_name)
        kh, kw = base.kernel_size
        # The 1x1 kernel W1 diag(a) goes to the centre tap: (C_out, C_in/g, 1, 1) -> (C_out, C_in/g, kh, kw).
        delta_w = F.pad(centre[:, :, None, None], (kw // 2, kw // 2, kh // 2, kh // 2))
        return delta_w, delta_b

    def _centre_tap_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """For a "conv" adapter: the centre-tap kernel ``W1 diag(a)`` ``(C_out, C_in/g)`` and bias ``W1 c + b1``."""
        conv = self.convadapter_conv[adapter_name]
        a, c = self._bn_affine(adapter_name)  # (C_in,)
        return centre_tap_delta(conv.weight, conv.bias, a, c, self.get_base_layer().groups)

    def folded_weight(self, active: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the conv with the (eval-mode) adapters ``active`` folded in.

        Computed at every call from the current tensors, never cached: a cache keyed on tensor identity and version
        cannot see an in-place change through ``.data`` (``p.data.mul_(2)`` does not bump ``p._version``), and a
        stale kernel would be a silently wrong result. The fold touches weights only, not activations: one copy of
        the kernel, alive until the conv has run, plus ``C_out x C_in/g`` entries per adapter.
        """
        base = self.get_base_layer()
        dtype = base.weight.dtype
        # Summed in float32 and rounded once to the conv's dtype, adapter after adapter, as `merge` does: unmerged
        # eval equals the merged model bit for bit, also on a bf16/fp16 base.
        bias = None if base.bias is None else base.bias.to(accumulation_dtype(dtype))
        if all(self.adapter_type[name] == "conv" for name in active):
            centres = []
            for name in active:
                centre, delta_b = self._centre_tap_delta(name)
                centres.append(centre)
                bias = delta_b if bias is None else bias + delta_b
            return fold_kernel(base.weight, centres, dtype), bias.to(dtype)
        kh, kw = base.kernel_size
        weight = base.weight.to(accumulation_dtype(dtype), copy=True)  # (C_out, C_in/g, kh, kw)
        for name in active:
            if self.adapter_type[name] == "conv":
                centre, delta_b = self._centre_tap_delta(name)
                weight[:, :, kh // 2, kw // 2] += centre
            else:
                delta_w, delta_b = self.get_delta_weight(name)
                weight = weight + delta_w
            bias = delta_b if bias is None else bias + delta_b
        return weight.to(dtype), None if bias is None else bias.to(dtype)


class Conv2d(nn.Module, ConvAdapterLayer):
    """A ``nn.Conv2d`` with parallel conv adapters: ``y = conv(x) + sum_adapters conv1x1(BN_a(x))``."""

    def __init__(
        self,
        base_layer: nn.Conv2d,
        adapter_name: str,
        adapter_type: str = "conv",
        adapter_bias: bool = True,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        ConvAdapterLayer.__init__(self, base_layer, **kwargs)
        self.train(base_layer.training)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, adapter_type, adapter_bias=adapter_bias, init_weights=init_weights)

    def _check_merge_compatible(self, adapter_names: list[str]) -> None:
        kinds = [self.adapter_type[name] for name in adapter_names] + [
            self.adapter_type[name] for name in self.merged_adapters
        ]
        if "bn" in kinds and len(kinds) > 1:
            raise ValueError(
                "A BN-only conv adapter rescales the conv output, so it cannot be merged into a conv together with "
                f"another adapter; got adapters {adapter_names} to merge with {self.merged_adapters} already merged. "
                "Merge one adapter at a time (`adapter_names=[...]`) or use `adapter_type='conv'`."
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or the given) adapters into the conv kernel and bias, exactly, using BN running stats.

        Args:
            safe_merge: compute on a copy first and refuse to merge if the result has NaN or Inf.
            adapter_names: the adapters to merge; defaults to the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.convadapter_bn]
        if not adapter_names:
            return
        self._check_merge_compatible(adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if self.convadapter_bn[name].training:
                warnings.warn(
                    f"Merging conv adapter {name!r} while it is in training mode: the merged conv uses the BN running "
                    "statistics, the unmerged one uses batch statistics. Call `model.eval()` first for exact fusion.",
                    stacklevel=2,
                )
            delta_w, delta_b = self.get_delta_weight(name)
            # Sum in float32 and round once: a bf16/fp16 conv then merges as exactly as its dtype allows.
            dtype = base.weight.dtype
            new_weight = (base.weight.data.float() + delta_w.float()).to(dtype)
            old_bias = (
                base.bias.data.float() if base.bias is not None else torch.zeros_like(delta_b, dtype=torch.float)
            )
            new_bias = (old_bias + delta_b.float()).to(dtype)
            if safe_merge and not (torch.isfinite(new_weight).all() and torch.isfinite(new_bias).all()):
                raise ValueError(f"NaNs or Infs detected while merging conv adapter {name!r}; the adapter is broken.")
            if self.adapter_type[name] == "bn":
                # y = (1 + a) * z + c cannot be undone by subtraction once z's weights changed; keep the original.
                self._premerge_state[name] = (
                    base.weight.data.clone(),
                    None if base.bias is None else base.bias.data.clone(),
                )
            base.weight.data = new_weight
            if base.bias is None:
                # A bias-free conv (typical before BatchNorm) gains a bias: the only extra parameter fusion adds.
                base.bias = nn.Parameter(new_bias, requires_grad=False)
                self._bias_created_by_merge = True
            else:
                base.bias.data = new_bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo `merge`, in reverse order. A bias that merging created is removed again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._premerge_state:
                weight, bias = self._premerge_state.pop(name)
                base.weight.data = weight
                if bias is not None:
                    base.bias.data = bias
            else:
                delta_w, delta_b = self.get_delta_weight(name)
                base.weight.data = (base.weight.data.float() - delta_w.float()).to(base.weight.dtype)
                base.bias.data = (base.bias.data.float() - delta_b.float()).to(base.bias.dtype)
        if self._bias_created_by_merge:
            base.bias = None
            self._bias_created_by_merge = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.convadapter_bn]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        bns = [self.convadapter_bn[name] for name in active]
        if any(bn.training for bn in bns):
            if not (self.fold_in_train and not args and not kwargs and self._modules_can_be_bypassed(x, active)):
                return self._branch_forward(x, active, *args, **kwargs)
            # `_modules_can_be_bypassed` ran the frozen-BN guard, which may have put BatchNorms in eval mode.
            if all(bn.training for bn in bns):
                out = self._fused_train_forward(x, active)
                return self._branch_forward(x, active) if out is None else out
            if any(bn.training for bn in bns):
                return self._branch_forward(x, active)
        if not self.fold_in_eval:
            return self._branch_forward(x, active, *args, **kwargs)
        # Eval mode: every adapter is an affine map of the conv's input or output, so fold them into the kernel. One
        # conv instead of 1 + len(active) passes over the activations; equal to the branches up to float rounding.
        if self.fold_in_train and torch.is_grad_enabled() and self._needs_grad(x, active):
            # With gradients (e.g. training with frozen BN statistics), the Function skips the k x k weight gradient
            # that autograd through `folded_weight` would compute.
            if all(self.adapter_type[name] == "conv" for name in active):
                out = self._folded_conv_function(x, active, batch_stats=False)
                if out is not None:
                    return out
        weight, bias = self.folded_weight(active)
        return self.get_base_layer()._conv_forward(self._cast_input_dtype(x, weight.dtype), weight, bias)

    def _branch_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The adapters as branches, module by module: the reference the fused paths are tested against."""
        result = self.base_layer(x, *args, **kwargs)  # (B, C_out, H', W')
        base_out = result
        for name in active:
            bn = self._batchnorm(name)
            if self.adapter_type[name] == "conv":
                conv = self.convadapter_conv[name]
                adapter_in = self._cast_input_dtype(x, conv.weight.dtype)
                result = result + conv(bn(adapter_in)).to(result.dtype)
            else:
                # BN-only: a per-channel affine of the base conv's own output (not of other adapters' outputs).
                adapter_in = self._cast_input_dtype(base_out, bn.weight.dtype)
                result = result + bn(adapter_in).to(result.dtype)
        return result

    # ----------------------------------------------------------------------------------------------------------------
    # Fused paths (see `_autograd.py`)
    # ----------------------------------------------------------------------------------------------------------------
    def _modules_can_be_bypassed(self, x: torch.Tensor, active: list[str]) -> bool:
        """Whether the fused training paths may skip calling the adapters' BN and 1x1 conv modules (and the base
        conv, for "conv" adapters): only when nothing hooks them. The one hook we know, the frozen-BN guard of
        `protect_frozen_batchnorm` (on every BatchNorm, adapter BNs included), is applied here as the module call
        would: a train-mode adapter BN whose parameters are all frozen goes to eval mode."""
        modules: list[nn.Module] = [self.get_base_layer()]
        for name in active:
            modules.append(self.convadapter_bn[name])
            if name in self.convadapter_conv:
                modules.append(self.convadapter_conv[name])
        for module in modules:
            if module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
                return False
            if any(hook is not _frozen_batchnorm_pre_hook for hook in module._forward_pre_hooks.values()):
                return False
        for module in modules:
            for hook in list(module._forward_pre_hooks.values()):
                hook(module, (x,))
        return True

    def _needs_grad(self, x: torch.Tensor, active: list[str]) -> bool:
        if x.requires_grad:
            return True
        base = self.get_base_layer()
        tensors = [base.weight, base.bias]
        for name in active:
            tensors += list(self.convadapter_bn[name].parameters())
            if name in self.convadapter_conv:
                tensors += list(self.convadapter_conv[name].parameters())
        return any(t is not None and t.requires_grad for t in tensors)

    @staticmethod
    def _plain_batchnorm(bn: nn.Module) -> bool:
        return type(bn) in PLAIN_BATCHNORM2D and bn.affine and bn.track_running_stats

    @staticmethod
    def _averaging_factor(bn: nn.BatchNorm2d) -> float:
        """`nn.BatchNorm2d.forward`'s bookkeeping, verbatim: count the batch, return the running-average factor."""
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return factor

    def _fused_train_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor | None:
        """Train-mode adapters through one autograd Function; None where only the branch path applies (a mix of
        "conv" and "bn" adapters, BatchNorms other than a plain affine `nn.BatchNorm2d`, non-4D input)."""
        kinds = {self.adapter_type[name] for name in active}
        if kinds == {"conv"}:
            return self._folded_conv_function(x, active, batch_stats=True)
        if kinds != {"bn"} or x.dim() != 4:
            return None
        bns = [self._batchnorm(name) for name in active]
        if not all(self._plain_batchnorm(bn) for bn in bns) or len({bn.eps for bn in bns}) != 1:
            return None
        z = self.base_layer(x)  # (B, C_out, H', W'): the base conv through plain autograd (grad-input only)
        norms = [NormState(bn.eps, self._averaging_factor(bn), bn.running_mean, bn.running_var) for bn in bns]
        return BatchNormAffineFunction.apply(norms, z, *[t for bn in bns for t in (bn.weight, bn.bias)])

    def _folded_conv_function(self, x: torch.Tensor, active: list[str], batch_stats: bool) -> torch.Tensor | None:
        """ "conv" adapters folded into the base conv for forward and backward (`FoldedConvAdapterFunction`)."""
        base = self.get_base_layer()
        if x.dim() != 4:
            return None
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and base.weight.dtype != torch.float64:
            dtype = torch.get_autocast_dtype(device_type)  # what the base conv would run in
        elif x.dtype == base.weight.dtype:
            dtype = base.weight.dtype
        else:
            return None  # the branch path reproduces whatever the plain conv does with mismatched dtypes
        bns = [self._batchnorm(name) for name in active]
        if not all(self._plain_batchnorm(bn) for bn in bns):
            return None
        convs = [self.convadapter_conv[name] for name in active]
        if any(type(conv) is not nn.Conv2d for conv in convs):
            return None
        x_padded = pad = None
        if base.padding_mode != "zeros":
            # F.pad outside the Function: autograd routes the conv's input gradient back through the padding.
            pad = tuple(base._reversed_padding_repeated_twice)
            x_padded = F.pad(x, pad, mode=base.padding_mode)
            padding = (0, 0)
        elif isinstance(base.padding, str):  # "same" (odd kernels: symmetric) or "valid" (1x1 kernels only)
            same = base.padding == "same"
            padding = tuple(d * (k - 1) // 2 if same else 0 for k, d in zip(base.kernel_size, base.dilation))
        else:
            padding = tuple(base.padding)
        geometry = ConvGeometry(
            stride=tuple(base.stride),
            padding=padding,
            dilation=tuple(base.dilation),
            groups=base.groups,
            kernel_size=tuple(base.kernel_size),
            pad=pad,
            pad_mode=base.padding_mode,
            compute_dtype=dtype,
            device_type=device_type,
        )
        norms = [
            NormState(bn.eps, self._averaging_factor(bn) if batch_stats else 0.0, bn.running_mean, bn.running_var)
            for bn in bns
        ]
        tensors = [t for conv, bn in zip(convs, bns) for t in (conv.weight, conv.bias, bn.weight, bn.bias)]
        return FoldedConvAdapterFunction.apply(
            geometry, norms, batch_stats, x, x_padded, base.weight, base.bias, *tensors
        )

    def __repr__(self) -> str:
        return "convadapter." + super().__repr__()

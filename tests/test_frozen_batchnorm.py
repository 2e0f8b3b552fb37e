# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Frozen base BatchNorms under adapters: eval mode, PyTorch's output bit for bit, and no activation kept."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_vision_ext  # noqa: F401
from peft_vision_ext import ConvAdapterConfig
from peft_vision_ext.tuners.conv_adapter import protect_frozen_batchnorm, unprotect_frozen_batchnorm
from peft_vision_ext.tuners.conv_adapter.frozen_bn import ProtectedBatchNorm2d

from tiny_models import make_unet


def _bn(cls, channels=5, seed=0):
    torch.manual_seed(seed)
    bn = cls(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def _saved_bytes(fn, model=None):
    """Bytes of the tensors autograd saves while ``fn`` runs (each storage counted once; ``model``'s parameters and
    buffers, which are alive anyway, not counted)."""
    storages = {}
    alive = set()
    if model is not None:
        alive = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in alive:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize(
    "cls, shape",
    [
        (nn.BatchNorm1d, (4, 5)),
        (nn.BatchNorm1d, (4, 5, 7)),
        (nn.BatchNorm2d, (3, 5, 6, 7)),
        (nn.BatchNorm3d, (2, 5, 3, 4, 5)),
    ],
)
def test_frozen_eval_batchnorm_equals_pytorch_and_keeps_no_activation(cls, shape):
    plain = _bn(cls).eval().requires_grad_(False)
    protected = copy.deepcopy(plain)
    holder = nn.Sequential(protected)
    protect_frozen_batchnorm(holder)
    assert type(protected).__name__ == "Protected" + cls.__name__ and isinstance(protected, cls)
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, plain_saved = _saved_bytes(lambda: plain(x))
    out2, saved = _saved_bytes(lambda: protected(x2))
    assert torch.equal(out, out2)  # PyTorch's own kernel
    assert plain_saved >= x.numel() * 4 and saved < x.numel() * 4  # the input is no longer kept
    grad = torch.randn(shape)
    out.backward(grad)
    out2.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-6, atol=1e-7)


def test_frozen_batchnorm_backward_is_differentiable_twice_and_low_precision_rounds_once():
    bn = _bn(nn.BatchNorm2d).eval().requires_grad_(False)
    protect_frozen_batchnorm(nn.Sequential(bn))
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    bn.double()
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: bn(t) ** 2, (x,))
    bn.float()
    reference = _bn(nn.BatchNorm2d).eval().requires_grad_(False)
    xb = torch.randn(2, 5, 4, 4).bfloat16().requires_grad_(True)
    xr = xb.detach().clone().requires_grad_(True)
    out, ref = bn(xb), reference(xr)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), xr.grad.float(), rtol=1e-2, atol=1e-2)


def test_trainable_or_train_mode_batchnorm_takes_pytorch_path():
    bn = _bn(nn.BatchNorm2d)
    protect_frozen_batchnorm(nn.Sequential(bn))
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    bn.eval()
    bn(x).sum().backward()  # trainable in eval mode: parameters get gradients
    assert bn.weight.grad is not None and bn.bias.grad is not None
    bn.train()
    before = bn.running_mean.clone()
    bn(x)
    assert not torch.equal(before, bn.running_mean)  # trainable BN in train mode updates its statistics as usual
    bn.requires_grad_(False)
    before = bn.running_mean.clone()
    bn(x)  # frozen: the guard puts it in eval mode first
    assert not bn.training and torch.equal(before, bn.running_mean)


def test_protect_and_unprotect_keep_state_dict_pickling_and_restore_the_class():
    model = make_unet(seed=0)
    plain_types = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    protect_frozen_batchnorm(model)
    protect_frozen_batchnorm(model)  # idempotent
    swapped = [name for name, m in model.named_modules() if type(m) is ProtectedBatchNorm2d]
    assert swapped and all(plain_types[name] is nn.BatchNorm2d for name in swapped)
    assert list(model.state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
    copy.deepcopy(model)
    unprotect_frozen_batchnorm(model)
    assert {name: type(m) for name, m in model.named_modules()} == plain_types
    assert not any(hasattr(m, "_peft_vision_bn_guard") for m in model.modules())


def test_conv_adapter_training_keeps_fewer_activations_with_the_same_gradients():
    """The adapters' gradients are those of the plain BatchNorm path, and the base BNs keep no input."""
    torch.manual_seed(0)
    # float64: the deepest adapters normalise 2 values per channel (1x1 maps), which amplifies float32 rounding.
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 32, 32))
    results = {}
    for protected in (True, False):
        model = get_peft_model(make_unet(seed=0).double(), ConvAdapterConfig(modules_to_save=["segmentation_head"]))
        if not protected:
            unprotect_frozen_batchnorm(model)
        model.train()
        for module in model.modules():  # what the guard does, by hand for the unprotected model
            if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        out, saved = _saved_bytes(lambda model=model: model(pixel_values=x, labels=labels), model)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[protected] = (out.loss.detach(), saved, grads)
    (loss, saved, grads), (plain_loss, plain_saved, plain_grads) = results[True], results[False]
    assert torch.equal(loss, plain_loss)
    assert saved < 0.9 * plain_saved, (saved, plain_saved)
    assert grads.keys() == plain_grads.keys()
    for name in grads:  # ill-conditioned (see x), so compared in float64: within 1e-9 of each largest entry
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(
            grads[name], plain_grads[name], rtol=0, atol=1e-9 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_frozen_batchnorm_training_compiles_to_one_graph():
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), _bn(nn.BatchNorm2d, 4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)
    )
    model[1].requires_grad_(False)
    protect_frozen_batchnorm(model)
    model.train()
    reference = copy.deepcopy(model)
    dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break raises
    x = torch.randn(2, 3, 8, 8)
    compiled(x).square().mean().backward()
    reference(x).square().mean().backward()
    assert not model[1].training
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_parameters_held_as_plain_tensors_still_count_as_trainable():
    """FSDP without `use_orig_params` sets a module's weight to a plain view of its flat parameter: `parameters()` no
    longer lists it, but it needs a gradient. Such a BN must not be treated as frozen (no eval switch, gradients)."""
    bn = _bn(nn.BatchNorm2d)
    protect_frozen_batchnorm(nn.Sequential(bn))
    flat = torch.cat([bn.weight.detach(), bn.bias.detach()]).requires_grad_(True)
    del bn._parameters["weight"], bn._parameters["bias"]
    bn.weight, bn.bias = flat[:5], flat[5:]
    assert not list(bn.parameters())
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    bn.train()
    bn(x)
    assert bn.training  # the guard left it in train mode: it is trainable
    bn.eval()
    bn(x).sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Focused MoPEFT tests: attention math against a naive reference, gates, switches, pruning, merging, bad configs."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import peft_vision_ext  # noqa: F401
from peft_vision_ext import MoPEFTConfig, merge_mergeable, prune_mopeft
from peft_vision_ext.analysis import collect_gate_statistics, plot_gate_usage
from peft_vision_ext.tuners.mopeft import MoPEFTLayer
from peft_vision_ext.tuners.mopeft.blocks import block_family

from tiny_models import forward_logits, make_dinov2, make_sam, make_unet, make_vit


def peft_sam(seed: int = 0, attn: str = "eager", **kwargs):
    base = make_sam(seed, attn=attn, **{k: kwargs.pop(k) for k in ("image_size", "window_size") if k in kwargs})
    kwargs.setdefault("init_weights", False)
    return base, get_peft_model(copy.deepcopy(base), MoPEFTConfig(**kwargs)).eval()


def first_layer(model) -> MoPEFTLayer:
    return next(m for m in model.modules() if isinstance(m, MoPEFTLayer))


# ---------------------------------------------------------------------------------------------------------------------
# Naive reference for one SAM block: explicit padding, a Python loop over windows, explicit relative positions.
# ---------------------------------------------------------------------------------------------------------------------
def naive_sam_block(layer: MoPEFTLayer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    block = layer.base_layer
    attn = block.attn
    settings = layer.mopeft_settings[adapter]
    batch, height, width, channels = x.shape
    heads = attn.num_attention_heads
    hd = channels // heads
    normed = block.layer_norm1(x)
    pooled = normed.reshape(batch, -1, channels).mean(1)
    gates = {m: torch.ones(batch) for m in settings["live"]}
    if settings["gated"]:
        hidden = pooled
        if adapter in layer.mopeft_gate_hidden:
            hidden = F.gelu(layer.mopeft_gate_hidden[adapter](hidden))
        values = torch.sigmoid(layer.mopeft_gate_out[adapter](hidden))
        gates.update({m: values[:, i] for i, m in enumerate(settings["gated"])})
    ws = block.window_size or max(height, width)
    if block.window_size == 0:
        ws_h, ws_w = height, width
    else:
        ws_h = ws_w = ws
    pad_h, pad_w = (-height) % ws_h, (-width) % ws_w
    padded = F.pad(normed, (0, 0, 0, pad_w, 0, pad_h))
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if "lora" in settings["live"]:
        r = settings["r"]
        a_all = layer.mopeft_lora_A[adapter].weight
        b_all = layer.mopeft_lora_B[adapter]
    if "prefix" in settings["live"]:
        e = layer.mopeft_prefix_embedding[adapter]
        p = layer.mopeft_prefix_out[adapter](torch.tanh(layer.mopeft_prefix_hidden[adapter](e)))  # (L, 2C)
        pk, pv = p[:, :channels], p[:, channels:]
    out = torch.zeros_like(padded)
    rel_h = attn.get_rel_pos(ws_h, ws_h, attn.rel_pos_h)  # (ws, ws, hd)
    rel_w = attn.get_rel_pos(ws_w, ws_w, attn.rel_pos_w)
    for b in range(batch):
        w_full = weight.clone()
        if "lora" in settings["live"]:
            for t_index, target in enumerate(settings["lora_targets"]):
                delta = b_all[t_index] @ a_all[t_index * r : (t_index + 1) * r]
                rows = slice("qkv".index(target) * channels, ("qkv".index(target) + 1) * channels)
                w_full[rows] = w_full[rows] + settings["scaling"] * gates["lora"][b] * delta
        for i0 in range(0, height + pad_h, ws_h):
            for j0 in range(0, width + pad_w, ws_w):
                window = padded[b, i0 : i0 + ws_h, j0 : j0 + ws_w].reshape(-1, channels)  # (N, C)
                qkv = window @ w_full.T + bias
                q, k, v = qkv[:, :channels], qkv[:, channels : 2 * channels], qkv[:, 2 * channels :]
                result = []
                for h in range(heads):
                    cols = slice(h * hd, (h + 1) * hd)
                    qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
                    logits = (qh * attn.scale) @ kh.T  # (N, N)
                    # decomposed relative position: q . R_h[i - k] + q . R_w[j - l]
                    qq = qh.reshape(ws_h, ws_w, hd)
                    bias_hw = (
                        torch.einsum("ijc,ikc->ijk", qq, rel_h)[:, :, :, None]
                        + torch.einsum("ijc,jlc->ijl", qq, rel_w)[:, :, None, :]
                    )
                    logits = logits + bias_hw.reshape(ws_h * ws_w, ws_h * ws_w)
                    values_h = vh
                    if "prefix" in settings["live"]:
                        prefix_logits = (qh * attn.scale) @ pk[:, cols].T + torch.log(gates["prefix"][b])
                        logits = torch.cat([prefix_logits, logits], dim=1)
                        values_h = torch.cat([pv[:, cols], vh], dim=0)
                    result.append(torch.softmax(logits, dim=-1) @ values_h)
                out[b, i0 : i0 + ws_h, j0 : j0 + ws_w] = torch.cat(result, dim=1).reshape(ws_h, ws_w, channels)
    out = attn.proj(out[:, :height, :width])
    hidden = x + out
    ffn = block.mlp(block.layer_norm2(hidden))
    if "adapter" in settings["live"]:
        update = layer.mopeft_adapter_up[adapter](F.gelu(layer.mopeft_adapter_down[adapter](ffn)))
        ffn = ffn + gates["adapter"].view(-1, 1, 1, 1) * update
    return hidden + ffn


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("image_size,window_size", [(80, 4), (64, 4), (72, 0)])
@pytest.mark.parametrize("gating", [True, False])
@torch.no_grad()
def test_block_matches_naive_reference(attn, image_size, window_size, gating):
    # 80/8 = 10 tokens with window 4: padded windows; 64/8 = 8: exact tiling; window 0: global attention.
    _, model = peft_sam(attn=attn, image_size=image_size, window_size=window_size, gating=gating)
    layer = first_layer(model)
    assert layer.base_layer.window_size == window_size
    tokens = image_size // 8
    x = torch.randn(3, tokens, tokens, 32, generator=torch.Generator().manual_seed(0))
    expected = naive_sam_block(layer, x)
    got = layer(x)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("train_rel_pos", [False, True])
def test_block_gradients_match_naive_reference(attn, train_rel_pos):
    # With gradients the attention bias is assembled by autograd-recorded copies (no out= writes); the gradients of
    # every MoPEFT parameter, of the input and (as under full fine-tuning) of the relative-position tables must be the
    # reference's. Padded windows (10 tokens, window 4) and gated prefixes.
    _, model = peft_sam(attn=attn, image_size=80, window_size=4)
    layer = first_layer(model)
    for table in (layer.base_layer.attn.rel_pos_h, layer.base_layer.attn.rel_pos_w):
        table.requires_grad_(train_rel_pos)
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    assert any("mopeft_prefix" in n for n in params) and any("mopeft_gate" in n for n in params)
    x = torch.randn(2, 10, 10, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = torch.randn(2, 10, 10, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (layer, lambda inputs: naive_sam_block(layer, inputs)):
        x.grad = None
        loss = (run(x) * weights).sum()
        grads.append(torch.autograd.grad(loss, [x, *params.values()]))
    for name, got, expected in zip(["input", *params], *grads):
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-3), (name, (got - expected).abs().max())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_prefix_gate_zero_is_the_original_attention(attn):
    base, model = peft_sam(attn=attn, use_lora=False, use_adapter=False)
    layer = first_layer(model)
    x = torch.randn(2, 10, 10, 32, generator=torch.Generator().manual_seed(1))
    # Force G_P -> 0 exactly in the math: a huge negative gate logit gives log G_P = -1e4, zero attention weight.
    layer.mopeft_gate_out["default"].weight.zero_()
    layer.mopeft_gate_out["default"].bias.fill_(-1e4)
    expected = layer.base_layer(x)
    got = layer(x)
    if attn == "eager":
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, atol=1e-6)
    # ... while an open gate changes the output.
    layer.mopeft_gate_out["default"].bias.fill_(0.0)
    assert (layer(x) - expected).abs().max() > 1e-4


def test_gate_values_stay_in_range():
    _, model = peft_sam()
    inputs = [torch.randn(2, 3, 64, 64) * scale for scale in (1e-3, 1.0, 1e3)]
    with collect_gate_statistics(model) as gates, torch.no_grad():
        for x in inputs:
            model(pixel_values=x)
    summary = gates.summary()
    assert set(summary) == {"vision_encoder.layers.0", "vision_encoder.layers.1"}
    for block in summary.values():
        assert set(block) == {"lora", "prefix", "adapter"}
        for stats in block.values():
            assert stats["count"] == 6
            assert 0.0 <= stats["min"] <= stats["max"] <= 1.0
    values = gates.values("vision_encoder.layers.0", "lora")
    assert values.std() > 0, "random gates should differ between images"
    # Telemetry is detached from the model once the context closes.
    assert all(not m._gate_hooks for m in model.modules() if isinstance(m, MoPEFTLayer))


def test_gate_plot_and_selection_counts(tmp_path):
    _, model = peft_sam()
    with collect_gate_statistics(model) as gates, torch.no_grad():
        model(pixel_values=torch.randn(4, 3, 64, 64))
    counts = gates.selection_counts()
    assert sum(counts.values()) == 4 * 2  # one winner per image and block
    path = plot_gate_usage({"a": gates, "b": gates}, tmp_path / "gates.png")
    assert (tmp_path / "gates.png").stat().st_size > 1000 and path.endswith("gates.png")


SWITCHES = [c for c in itertools.product([True, False], repeat=3) if any(c)]


@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize(
    "switches", SWITCHES, ids=["".join("LPA"[i] if on else "-" for i, on in enumerate(c)) for c in SWITCHES]
)
def test_every_switch_combination(switches, gating):
    use_lora, use_prefix, use_adapter = switches
    base, model = peft_sam(use_lora=use_lora, use_prefix=use_prefix, use_adapter=use_adapter, gating=gating)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    owned = {m for m in ("lora", "prefix", "adapter", "gate") if any(f"mopeft_{m}" in n for n in trainable)}
    expected = {m for m, on in zip(("lora", "prefix", "adapter"), switches) if on} | ({"gate"} if gating else set())
    assert owned == expected
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(pixel_values=x, labels=torch.randint(0, 3, (2, 64, 64)))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mopeft_" in n and p.requires_grad)
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(forward_logits(model.eval(), x), forward_logits(base, x), atol=1e-6)


def test_vpt_shallow_puts_prefixes_in_the_first_block_only():
    _, model = peft_sam(use_lora=False, use_adapter=False, prefix_depth="shallow")
    with_prefix = [
        n for n, m in model.named_modules() if isinstance(m, MoPEFTLayer) and "default" in m.mopeft_prefix_out
    ]
    assert with_prefix == ["base_model.model.vision_encoder.layers.0"]


def test_gated_lora_merge_is_refused_and_plain_lora_merges_with_adapters_running():
    _, model = peft_sam(use_prefix=False)  # gated LoRA + adapter
    with pytest.raises(ValueError, match="input-dependent gate"):
        model.merge_adapter()
    _, model = peft_sam(use_prefix=False, gating=False)  # plain LoRA + adapter
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = forward_logits(model, x)
        model.merge_adapter()  # LoRA folds into qkv; the adapter keeps running: still exact
        assert torch.allclose(forward_logits(model, x), before, atol=1e-5)
        with pytest.raises(ValueError, match="bottleneck adapter is non-linear"):
            model.merge_and_unload()
        model.unmerge_adapter()
        assert torch.allclose(forward_logits(model, x), before, atol=1e-5)


def test_prune_drops_closed_gates_freezes_constant_ones_and_then_merges(tmp_path):
    base, model = peft_sam()
    for layer in (m for m in model.modules() if isinstance(m, MoPEFTLayer)):
        gate = layer.mopeft_gate_out["default"]
        with torch.no_grad():
            gate.weight.zero_()  # input-independent gates: LoRA 0.73 (kept, frozen), prefix/adapter ~0 (dropped)
            gate.bias.copy_(torch.tensor([1.0, -30.0, -30.0]))
    calibration = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = forward_logits(model, x)
    report = prune_mopeft(model, calibration, threshold=0.05, freeze_gates=True)
    assert report.pruned == {f"vision_encoder.layers.{i}": ["adapter", "prefix"] for i in range(2)}
    assert all(abs(v["lora"] - 1 / (1 + math.exp(-1))) < 1e-6 for v in report.frozen.values())
    assert report.max_rel_change < 1e-6 and report.calibration_images == 4
    config = model.peft_config["default"]
    assert config.pruned["vision_encoder.layers.0"] == ["adapter", "prefix"]
    # The pruned adapter saves and loads with its new structure.
    model.save_pretrained(tmp_path / "pruned")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.allclose(forward_logits(loaded, x), before, atol=1e-5)
        merged = merge_mergeable(model)
        assert type(merged) is type(base)
        assert torch.allclose(forward_logits(merged, x), before, atol=1e-5)


def test_several_adapters_and_disable():
    base, model = peft_sam()
    model.add_adapter("other", MoPEFTConfig(init_weights=False, use_prefix=False))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = forward_logits(model, x)
        model.set_adapter("other")
        second = forward_logits(model, x)
        assert (first - second).abs().max() > 1e-4
        with model.disable_adapter():
            assert torch.allclose(forward_logits(model, x), forward_logits(base, x), atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "mopeft_" in n}
    assert trainable and all(".other" in n for n in trainable)


@pytest.mark.parametrize("factory", [make_vit, make_dinov2], ids=["vit", "dinov2"])
def test_other_vit_encoders_train_and_telemetry(factory):
    base = factory()
    model = get_peft_model(copy.deepcopy(base), MoPEFTConfig(prefix_length=4))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(pixel_values=x).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    with collect_gate_statistics(model.eval()) as gates, torch.no_grad():
        model(pixel_values=x)
    assert len(gates.blocks) == 2 and gates.methods == ["lora", "prefix", "adapter"]


@pytest.mark.parametrize(
    "factory,inputs",
    [(make_sam, {"labels": torch.randint(0, 3, (2, 80, 80))}), (make_vit, {}), (make_dinov2, {})],
    ids=["sam", "vit", "dinov2"],
)
def test_gradient_checkpointing_recomputes_adapted_blocks(factory, inputs, monkeypatch):
    # `gradient_checkpointing_enable()` arms transformers' GradientCheckpointingLayer blocks; MoPEFT runs the wrapped
    # block's own (checkpointed) forward with MoPEFT's attention in place of the block's: each adapted block's
    # attention runs twice per training step (forward, then the recompute in backward), the gradients are those
    # without checkpointing, and eval is not checkpointed.
    base = factory()
    size = 80 if factory is make_sam else 32
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    family = next(block_family(m) for m in base.modules() if block_family(m) is not None)
    runs = []
    original = family.attention
    monkeypatch.setattr(family, "attention", lambda *a, **k: runs.append(1) or original(*a, **k))

    def step(model):
        model.train()
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays the RNG state itself)
        out = model(pixel_values=x, **inputs)
        loss = out.loss if inputs else out.last_hidden_state.pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA A and the adapter/gate/prefix linears draw from the global generator, as in peft
        model = get_peft_model(copy.deepcopy(base), MoPEFTConfig(prefix_length=4, init_weights=False))
        if checkpointing:
            # transformers >= 5.23 names it activation_checkpointing_enable (the old name warns); 4.x has the old one.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        blocks = sum(isinstance(m, MoPEFTLayer) for m in model.modules())
        runs.clear()
        grads.append(step(model))
        assert len(runs) == blocks * (2 if checkpointing else 1)
    assert grads[0].keys() == grads[1].keys() and any("mopeft_prefix" in n for n in grads[0])
    for name, expected in grads[0].items():
        assert torch.allclose(grads[1][name], expected, atol=1e-5 * expected.abs().max(), rtol=1e-4), name
    # Gate telemetry during a checkpointed training step counts each image once per block (not again when the
    # backward pass recomputes the block).
    with collect_gate_statistics(model) as gates:
        step(model)
    assert all(stats["count"] == 2 for block in gates.summary().values() for stats in block.values())
    runs.clear()
    with torch.no_grad():
        model.eval()(pixel_values=x)
    assert len(runs) == blocks


# ---------------------------------------------------------------------------------------------------------------------
# Bad configurations
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, r"`r` must be a positive int, got 0"),
        ({"r": -2}, r"`r` must be a positive int, got -2"),
        ({"prefix_length": 0}, r"`prefix_length` must be a positive int"),
        ({"adapter_dim": 1.5}, r"`adapter_dim` must be a positive int, got 1.5"),
        ({"use_lora": False, "use_prefix": False, "use_adapter": False}, "at least one sub-method"),
        ({"lora_targets": ["q", "o"]}, r"`lora_targets` must be a non-empty list drawn from"),
        ({"prefix_depth": "middle"}, r"`prefix_depth` must be one of"),
        ({"gate_hidden_size": -1}, r"`gate_hidden_size` must be >= 0"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be in \[0, 1\)"),
        ({"pruned": {"x": ["bogus"]}}, "unknown sub-methods"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoPEFTConfig(**kwargs)


def test_prefix_on_a_model_without_supported_attention():
    with pytest.raises(ValueError, match="prefix tuning needs an attention it can prepend keys and values to"):
        get_peft_model(make_unet("test_resnet"), MoPEFTConfig(use_lora=False, use_adapter=False))


def test_unsupported_model_type():
    from transformers import SwinConfig, SwinModel

    swin = SwinModel(
        SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=32, patch_size=4, window_size=2)
    )
    with pytest.raises(ValueError, match="SwinModel has no transformer block that MoPEFT supports.*SamVisionLayer"):
        get_peft_model(swin, MoPEFTConfig(use_prefix=False))


def test_bad_targets():
    with pytest.raises(ValueError, match="a part of a transformer block"):
        get_peft_model(make_sam(), MoPEFTConfig(target_modules=["vision_encoder.layers.0.attn.qkv"]))
    with pytest.raises(ValueError, match="matches no transformer block"):
        get_peft_model(make_sam(), MoPEFTConfig(target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="excludes every one"):
        get_peft_model(make_sam(), MoPEFTConfig(exclude_modules=r".*layers\.\d"))


def test_prune_bad_input():
    _, model = peft_sam()
    with pytest.raises(ValueError, match="`calibration_batches` is empty"):
        prune_mopeft(model, [])
    with pytest.raises(ValueError, match="`threshold` must be in"):
        prune_mopeft(model, [torch.randn(1, 3, 64, 64)], threshold=1.5)
    with pytest.raises(ValueError, match="No MoPEFT adapter named 'nope'"):
        prune_mopeft(model, [torch.randn(1, 3, 64, 64)], adapter_name="nope")
    with pytest.raises(TypeError, match="Calibration batches must be"):
        prune_mopeft(model, ["not a batch"])


def test_presets_are_the_seed_baselines_and_refuse_clashes():
    assert MoPEFTConfig.from_preset("mopeft").sub_methods == ("lora", "prefix", "adapter")
    vpt = MoPEFTConfig.from_preset("vpt", prefix_length=5)
    assert vpt.sub_methods == ("prefix",) and vpt.prefix_depth == "shallow" and not vpt.gating
    assert vpt.prefix_length == 5
    assert MoPEFTConfig.from_preset("lora").sub_methods == ("lora",)
    with pytest.raises(ValueError, match="Unknown MoPEFT preset 'lora_plus'"):
        MoPEFTConfig.from_preset("lora_plus")
    with pytest.raises(ValueError, match=r"Preset 'lora' fixes \['gating'\]"):
        MoPEFTConfig.from_preset("lora", gating=True)


def test_prepare_sam_for_adaptation_methods_and_bad_input():
    from peft_vision_ext.adaptation import prepare_sam_for_adaptation

    decoder = prepare_sam_for_adaptation(make_sam(), "decoder")
    trainable = {n.split(".")[0] for n, p in decoder.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    assert not any(p.requires_grad for p in prepare_sam_for_adaptation(make_sam(), "zero_shot").parameters())
    vpt = prepare_sam_for_adaptation(make_sam(), "vpt_deep", prefix_length=3)
    assert vpt.peft_config["default"].prefix_length == 3
    with pytest.raises(ValueError, match="`method` must be one of .* got 'prompt'"):
        prepare_sam_for_adaptation(make_sam(), "prompt")
    with pytest.raises(ValueError, match="Method 'full' takes no PEFT settings"):
        prepare_sam_for_adaptation(make_sam(), "full", r=4)


def test_small_sam_config_bad_input():
    from peft_vision_ext.models import small_sam_config

    config = small_sam_config(num_labels=3, image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2)
    assert config.num_labels == 3 and config.vision_config.window_size == 5
    with pytest.raises(ValueError, match=r"`image_size` \(30\) must be a multiple of `patch_size` \(8\)"):
        small_sam_config(num_labels=3, image_size=30)
    with pytest.raises(ValueError, match="`decoder_hidden_size` must be even"):
        small_sam_config(num_labels=3, decoder_hidden_size=15)

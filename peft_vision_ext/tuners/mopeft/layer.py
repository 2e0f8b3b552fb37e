# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The MoPEFT layer: one wrapper per transformer block that owns the LoRA, prefix, adapter and gate parameters.

Why the wrapper sits on the block and not on the q/v linears: the gates read the block input pooled over *all*
spatial tokens, and SAM's attention only ever sees one window at a time, so only the block knows the whole image.
The wrapper runs the block's **own** forward, so whatever wraps the block applies to the adapted block too: FSDP1/FSDP2
unsharding the block's parameters, transformers' activation checkpointing, user hooks. MoPEFT enters the block through
three points installed once, at wrap time, on its parts (``blocks.py``): a forward hook on the first norm computes the
gates (the "plan" of this run of the block), the attention module's ``forward`` is a dispatcher that runs MoPEFT's
attention while a plan is active, and a forward hook on the FFN adds the adapter. Gates are per image and are repeated
over the image's windows. ``unload()``/``merge_and_unload()`` remove all three.

Gates (``gating=True``), from ``pooled = mean over H*W tokens of norm1(x)``, shape ``(B, C)``:

    g = sigmoid(gate_out(gelu(gate_hidden(pooled))))        # (B, n_sub_methods), in (0, 1)
    LoRA:    q += lora_alpha / r * g_L * B_q A_q x          (same for v)
    prefix:  logits of the L prefix keys += log g_P          # G_P scales the prefixes' attention mass; G_P -> 0 is
                                                             # exactly the original attention
    adapter: f += g_A * up(act(down(f)))                     # f: the FFN output, before the block's residual
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._common import base_layer_device_and_dtype
from .config import SUB_METHODS


class MoPEFTLayer(nn.Module, BaseTunerLayer):
    """Wraps one transformer block (``base_layer``) of a supported family; see the module docstring for the math."""

    # Every trainable tensor sits directly in a ModuleDict/ParameterDict keyed by adapter name, so peft's default key
    # handling saves and loads them.
    adapter_layer_names: tuple[str, ...] = (
        "mopeft_lora_A",
        "mopeft_lora_B",
        "mopeft_prefix_embedding",
        "mopeft_prefix_hidden",
        "mopeft_prefix_out",
        "mopeft_adapter_down",
        "mopeft_adapter_up",
        "mopeft_gate_hidden",
        "mopeft_gate_out",
    )
    other_param_names: tuple[str, ...] = ("mopeft_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, family: type, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.family = family
        self.mopeft_lora_A = nn.ModuleDict({})
        self.mopeft_lora_B = nn.ParameterDict({})
        self.mopeft_prefix_embedding = nn.ParameterDict({})
        self.mopeft_prefix_hidden = nn.ModuleDict({})
        self.mopeft_prefix_out = nn.ModuleDict({})
        self.mopeft_adapter_down = nn.ModuleDict({})
        self.mopeft_adapter_up = nn.ModuleDict({})
        self.mopeft_gate_hidden = nn.ModuleDict({})
        self.mopeft_gate_out = nn.ModuleDict({})
        self.mopeft_settings: dict[str, dict[str, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Gate hooks (`register_gate_hook`), called with (adapter, sub_method, (B,) gates); muted while activation
        # checkpointing recomputes a block in backward, so that each forward is recorded once.
        self._gate_hooks: OrderedDict[int, Callable[[str, str, torch.Tensor], None]] = OrderedDict()  # weak-referable
        self._gate_hooks_muted = False
        # While `forward` runs the block (or backward recomputes it) the entry points below are armed; the block
        # called on its own, or its parts called directly, run as they are.
        self._armed = False
        # Set by `forward` for the first run of the block's first norm: the gates of that run are recorded, those of a
        # recomputation in backward are not.
        self._record_gates = False
        # The plan of the block run in progress, `(plan, batch size B)`: set by the first norm's hook, read by the
        # attention, cleared by the FFN hook. None: the block runs as it is (adapters disabled, nothing live).
        self._active_plan: tuple[dict, int] | None = None
        # What peft's utilities read on tuner layers: the block maps hidden size to hidden size.
        self.in_features = self.out_features = family.hidden_size(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)
        self._install_entry_points()

    # ----------------------------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        sub_methods: tuple[str, ...],
        gating: bool,
        with_prefix: bool,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        lora_targets: list[str],
        prefix_length: int,
        prefix_projection_dim: int,
        adapter_dim: int,
        adapter_act: str,
        gate_hidden_size: int,
        prefix_gate_init: float,
        init_weights: bool,
        pruned: list[str] | None = None,
        frozen_gates: dict[str, float] | None = None,
    ) -> None:
        block = self.base_layer
        width = self.family.hidden_size(block)
        heads = self.family.num_heads(block)
        if width % heads:
            raise ValueError(f"Hidden size {width} is not divisible by the number of heads {heads}.")
        # Sub-methods present in this block: prefixes may be limited to the first block (VPT-shallow).
        present = tuple(m for m in sub_methods if m != "prefix" or with_prefix)
        pruned = sorted(set(pruned or []) & set(present))
        frozen = {m: float(v) for m, v in (frozen_gates or {}).items() if m in present}
        live = tuple(m for m in present if m not in pruned)
        if "lora" in live:
            self.mopeft_lora_A[adapter_name] = nn.Linear(width, r * len(lora_targets), bias=False)
            self.mopeft_lora_B[adapter_name] = nn.Parameter(torch.zeros(len(lora_targets), width, r))
        if "prefix" in live:
            self.mopeft_prefix_embedding[adapter_name] = nn.Parameter(
                torch.zeros(prefix_length, prefix_projection_dim)
            )
            self.mopeft_prefix_hidden[adapter_name] = nn.Linear(prefix_projection_dim, prefix_projection_dim)
            self.mopeft_prefix_out[adapter_name] = nn.Linear(prefix_projection_dim, 2 * width)
        if "adapter" in live:
            self.mopeft_adapter_down[adapter_name] = nn.Linear(width, adapter_dim)
            self.mopeft_adapter_up[adapter_name] = nn.Linear(adapter_dim, width)
        # Gates for the live sub-methods that are not frozen to constants.
        gated = tuple(m for m in live if m not in frozen) if gating else ()
        if gated:
            if gate_hidden_size > 0:
                self.mopeft_gate_hidden[adapter_name] = nn.Linear(width, gate_hidden_size)
            self.mopeft_gate_out[adapter_name] = nn.Linear(gate_hidden_size or width, len(gated))
        self.mopeft_settings[adapter_name] = {
            "live": live,
            "gated": gated,
            "frozen": frozen,
            "pruned": pruned,
            "scaling": lora_alpha / r,
            "r": r,
            "lora_targets": list(lora_targets),
            "lora_dropout": lora_dropout,
            "adapter_act": adapter_act,
            "prefix_gate_init": prefix_gate_init,
        }
        self.reset_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        settings = self.mopeft_settings[adapter_name]
        generator = torch.Generator().manual_seed(zlib.crc32(adapter_name.encode()))

        def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
            return std * torch.randn(shape, generator=generator)

        if adapter_name in self.mopeft_lora_A:
            a = self.mopeft_lora_A[adapter_name]
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as peft's LoRA A
            b = self.mopeft_lora_B[adapter_name]
            # B starts at zero, so LoRA leaves the model unchanged at step 0.
            b.copy_(torch.zeros_like(b) if init_weights else normal(b.shape, 0.1))
        if adapter_name in self.mopeft_prefix_embedding:
            self.mopeft_prefix_embedding[adapter_name].copy_(
                normal(self.mopeft_prefix_embedding[adapter_name].shape, 1)
            )
            out = self.mopeft_prefix_out[adapter_name]
            # Small prefix keys and values: prefixes start as near-uniform attention sinks with values close to zero.
            out.weight.copy_(normal(out.weight.shape, 0.02))
            nn.init.zeros_(out.bias)
        if adapter_name in self.mopeft_adapter_down:
            up = self.mopeft_adapter_up[adapter_name]
            # The up-projection starts at zero, so the adapter leaves the model unchanged at step 0.
            up.weight.copy_(torch.zeros_like(up.weight) if init_weights else normal(up.weight.shape, 0.05))
            nn.init.zeros_(up.bias)
        if adapter_name in self.mopeft_gate_out:
            gate = self.mopeft_gate_out[adapter_name]
            # Input-independent gates at first (zero weights); G_L = G_A = 0.5, G_P = sigmoid(prefix_gate_init).
            # Random gates (init_weights=False) make tests exercise per-image gate values.
            gate.weight.copy_(torch.zeros_like(gate.weight) if init_weights else normal(gate.weight.shape, 0.5))
            bias = torch.zeros(len(settings["gated"]))
            if "prefix" in settings["gated"]:
                bias[settings["gated"].index("prefix")] = settings["prefix_gate_init"]
            gate.bias.copy_(bias)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # A block has no `weight`: follow its parameters, so adapters match a bf16 base (peft's dtype contract).
        return base_layer_device_and_dtype(base_layer)

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------
    def _live(self, name: str, method: str) -> bool:
        settings = self.mopeft_settings[name]
        if method not in settings["live"]:
            return False
        return not (method == "lora" and name in self.merged_adapters)

    def _active(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.mopeft_settings]

    def plan(self, pooled: torch.Tensor) -> dict[str, dict[str, torch.Tensor | float]]:
        """Gate values of every active adapter for a batch: ``{adapter: {sub_method: (B,) tensor or constant}}``.

        ``pooled``: the block's normalised input mean-pooled over all spatial tokens, ``(B, C)``.
        """
        plan: dict[str, dict[str, torch.Tensor | float]] = {}
        for name in self._active():
            settings = self.mopeft_settings[name]
            gates: dict[str, torch.Tensor | float] = {m: 1.0 for m in settings["live"]}
            gates.update(settings["frozen"])
            if settings["gated"]:
                x = pooled.to(self.mopeft_gate_out[name].weight.dtype)
                if name in self.mopeft_gate_hidden:
                    x = F.gelu(self.mopeft_gate_hidden[name](x))
                logits = self.mopeft_gate_out[name](x)  # (B, n_gated)
                values = torch.sigmoid(logits)  # each in (0, 1)
                for index, method in enumerate(settings["gated"]):
                    gates[method] = values[:, index]
                if "prefix" in settings["gated"]:
                    # log G_P as logsigmoid of the logit: finite for any input, with a well-behaved gradient.
                    gates["prefix_log"] = F.logsigmoid(logits[:, settings["gated"].index("prefix")])
            if self._gate_hooks and not self._gate_hooks_muted:
                for method, value in gates.items():
                    if method not in SUB_METHODS:
                        continue
                    if isinstance(value, torch.Tensor):
                        value = value.detach()
                    else:
                        value = torch.full((pooled.shape[0],), float(value))
                    for hook in list(self._gate_hooks.values()):
                        hook(name, method, value)
            plan[name] = gates
        return plan

    def register_gate_hook(self, hook: Callable[[str, str, torch.Tensor], None]) -> RemovableHandle:
        """Call ``hook(adapter_name, sub_method, gates)`` with every gate this block computes (``gates``: ``(B,)``,
        detached; a constant gate is repeated per image). Returns a handle whose ``remove()`` unregisters it. This is
        how gate telemetry (``peft_vision_ext.analysis.collect_gate_statistics``) and pruning observe the gates."""
        if not callable(hook):
            raise TypeError(f"`hook` must be callable as hook(adapter, sub_method, gates), got {hook!r}.")
        handle = RemovableHandle(self._gate_hooks)
        self._gate_hooks[handle.id] = hook
        return handle

    @staticmethod
    def _per_row(gate: torch.Tensor | float, repeats: int, ndim: int) -> torch.Tensor | float:
        """Per-image gates ``(B,)`` -> one value per row of a ``(B*repeats, ...)`` tensor with ``ndim`` dims."""
        if not isinstance(gate, torch.Tensor):
            return gate
        if repeats > 1:
            gate = gate.repeat_interleave(repeats)  # windows of one image are consecutive rows
        return gate.view(-1, *([1] * (ndim - 1)))

    def _lora_inputs(self, x: torch.Tensor, plan: dict, repeats: int):
        """For each active adapter with a live LoRA: ``(settings, low, B)``, where ``low = A x`` already carries the
        scaling ``lora_alpha / r * G_L`` (gating the rank-r activation is cheaper than gating the update), shape
        ``(rows, ..., targets * r)``, and ``B`` is ``(targets, C, r)``."""
        for name, gates in plan.items():
            if "lora" not in gates or not self._live(name, "lora"):
                continue
            settings = self.mopeft_settings[name]
            a = self.mopeft_lora_A[name]
            inputs = x.to(a.weight.dtype)
            if settings["lora_dropout"] > 0:
                inputs = F.dropout(inputs, p=settings["lora_dropout"], training=self.training)
            low = a(inputs)
            gate = self._per_row(gates["lora"], repeats, low.ndim)  # float, or (rows, 1, ..., 1)
            yield settings, low * (settings["scaling"] * gate), self.mopeft_lora_B[name]

    def lora_deltas(self, x: torch.Tensor, plan: dict, repeats: int) -> dict[str, torch.Tensor]:
        """LoRA updates of separate projections: ``{"q": (..., C), "v": (..., C)}`` for ``x`` of shape
        ``(rows, ..., C)``."""
        deltas: dict[str, torch.Tensor] = {}
        for settings, low, b in self._lora_inputs(x, plan, repeats):
            r = b.shape[2]
            for index, target in enumerate(settings["lora_targets"]):
                delta = F.linear(low[..., index * r : (index + 1) * r], b[index]).to(x.dtype)
                deltas[target] = deltas[target] + delta if target in deltas else delta
        return deltas

    def add_lora_to_fused(
        self, fused: torch.Tensor, x: torch.Tensor, plan: dict, repeats: int, order: str = "qkv"
    ) -> torch.Tensor:
        """``fused`` (the fresh output of a fused projection such as SAM's ``qkv``, ``(rows, ..., len(order) * C)``)
        plus the LoRA updates of its ``order`` slices.

        Without gradients the updates are added **in place**, one ``addmm_`` per target into its column slice (no
        update tensor, no copy of ``fused``). With gradients, one out-of-place ``addmm`` per adapter with ``B`` placed
        in the rows of its slice: in-place writes into slices would make autograd copy the whole gradient per write.
        """
        width = fused.shape[-1] // len(order)
        flat = fused.view(-1, fused.shape[-1])  # the output of a linear layer: contiguous
        for settings, low, b in self._lora_inputs(x, plan, repeats):
            r = b.shape[2]
            low = low.reshape(-1, low.shape[-1]).to(fused.dtype)
            targets = settings["lora_targets"]
            if torch.is_grad_enabled():
                zeros = b.new_zeros(width, r)
                # (len(order) * C, targets * r): B of target t in the rows of its slice, the columns of its rank block.
                b_full = torch.cat(
                    [torch.cat([b[i] if t == part else zeros for i, t in enumerate(targets)], 1) for part in order]
                )
                flat = torch.addmm(flat, low, b_full.t().to(fused.dtype))
                continue
            for index, target in enumerate(targets):
                part = order.index(target)
                flat[:, part * width : (part + 1) * width].addmm_(
                    low[:, index * r : (index + 1) * r], b[index].t().to(fused.dtype)
                )
        return flat.view_as(fused)

    def prefix_key_values(
        self, plan: dict, rows: int, repeats: int, heads: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Prefix keys and values ``(heads, L, hd)`` (the same for every attention row: callers broadcast them, no
        copy per window), and for ``rows = B * repeats`` attention rows (windows) the prefix logit bias
        ``(rows, 1, 1, L)`` that holds ``log G_P`` (None when no prefix is gated). None without live prefixes."""
        keys, values, biases = [], [], []
        for name, gates in plan.items():
            if "prefix" not in gates or not self._live(name, "prefix"):
                continue
            hidden = torch.tanh(self.mopeft_prefix_hidden[name](self.mopeft_prefix_embedding[name]))  # (L, d)
            prefix = self.mopeft_prefix_out[name](hidden).to(dtype)  # (L, 2C): the MLP re-parameterisation
            key, value = prefix.unflatten(-1, (2, heads, -1)).permute(1, 2, 0, 3)  # each (heads, L, hd)
            keys.append(key)
            values.append(value)
            length = key.shape[1]
            if "prefix_log" in gates:  # gated: log G_P per image, repeated over the image's windows
                log_gate = gates["prefix_log"].to(dtype).repeat_interleave(repeats)  # (rows,)
                biases.append(log_gate[:, None, None, None].expand(rows, 1, 1, length))
            elif gates["prefix"] != 1.0:  # a gate frozen to a constant by pruning
                biases.append(key.new_full((rows, 1, 1, length), math.log(gates["prefix"])))
            else:
                biases.append(None)
        if not keys:
            return None
        key = torch.cat(keys, dim=1)  # (heads, L_total, hd)
        value = torch.cat(values, dim=1)
        if all(b is None for b in biases):
            return key, value, None
        parts = [b if b is not None else key.new_zeros(rows, 1, 1, k.shape[1]) for b, k in zip(biases, keys)]
        return key, value, torch.cat(parts, dim=-1)

    def adapt_ffn_output(self, ffn: torch.Tensor, plan: dict) -> torch.Tensor:
        """``f + G_A * up(act(down(f)))`` for each active adapter, ``f`` the FFN output ``(B, ..., C)``. The gate
        scales the ``D_mid``-wide bottleneck activation, ``G_A * up(h) = W_up (G_A h) + G_A b_up``, and one ``addmm``
        adds the up-projection to ``f``; without gradients it is written **in place** into ``f`` (callers pass the
        fresh FFN output)."""
        for name, gates in plan.items():
            if "adapter" not in gates or not self._live(name, "adapter"):
                continue
            down, up = self.mopeft_adapter_down[name], self.mopeft_adapter_up[name]
            act = F.relu if self.mopeft_settings[name]["adapter_act"] == "relu" else F.gelu
            hidden = act(down(ffn.to(down.weight.dtype))).to(ffn.dtype)  # (B, ..., D_mid)
            gate = self._per_row(gates["adapter"], 1, ffn.ndim)
            if isinstance(gate, torch.Tensor):
                gate = gate.to(ffn.dtype)  # float32 gates on a bf16/fp16 block must not promote the activations
            if not (isinstance(gate, float) and gate == 1.0):
                hidden = hidden * gate
            flat_hidden, weight = hidden.reshape(-1, hidden.shape[-1]), up.weight.t().to(ffn.dtype)
            if torch.is_grad_enabled():  # the down-projection saved `ffn` for its weight gradient: no in-place update
                ffn = torch.addmm(ffn.reshape(-1, ffn.shape[-1]), flat_hidden, weight).view_as(ffn)
                ffn = ffn + up.bias.to(ffn.dtype) * gate
            else:
                ffn.view(-1, ffn.shape[-1]).addmm_(flat_hidden, weight)
                ffn.add_(up.bias.to(ffn.dtype) * gate)
        return ffn

    def _has_live_work(self) -> bool:
        return any(any(self._live(name, m) for m in self.mopeft_settings[name]["live"]) for name in self._active())

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        # The block's own forward, through its `__call__`: FSDP's pre-forward unshard (FSDP1 wrapper or FSDP2 hooks on
        # the block), its activation checkpointing (transformers' GradientCheckpointingLayer checkpoints `forward`, so
        # the entry points below run again when backward recomputes the block) and user hooks all apply. This forward's
        # gates are recorded once: the first norm's hook takes the flag; a recomputation in backward finds it cleared,
        # and a recomputation of this whole wrapper (a checkpoint around it) runs inside backward.
        armed, self._armed = self._armed, True
        self._record_gates = _in_backward() is not True
        try:
            return self.base_layer(hidden_states, *args, **kwargs)
        finally:
            self._armed = armed
            self._record_gates = False
            self._active_plan = None

    # ----------------------------------------------------------------------------------------------------------------
    # Entry points in the wrapped block: installed once at wrap time, removed by `unload_and_optionally_merge_module`.
    # They are bound methods (and a partial of one) of this layer: `copy.deepcopy` of the model maps them to the copy.
    # ----------------------------------------------------------------------------------------------------------------
    def _install_entry_points(self) -> None:
        norm, attn, ffn = self.family.parts(self.base_layer)
        # An instance-level `forward` set before us (e.g. by accelerate's hooks) is kept: it runs when no plan is active
        # and is put back on unload.
        previous = attn.__dict__.get("forward")
        attn.forward = functools.partial(self._attention_dispatch, attn, previous)
        norm.register_forward_hook(self._norm_hook)
        ffn.register_forward_hook(self._ffn_hook)
        self._entry_parts = (norm, attn, ffn)  # a plain tuple: not registered as submodules

    def _remove_entry_points(self) -> None:
        """Remove the hooks and the attention dispatcher: the block is exactly the original modules again."""
        parts = self.__dict__.pop("_entry_parts", None)
        if parts is None:
            return
        norm, attn, ffn = parts
        for module, method in ((norm, self._norm_hook), (ffn, self._ffn_hook)):
            for key, hook in list(module._forward_hooks.items()):
                if hook == method:  # the same function bound to this layer
                    del module._forward_hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)
        dispatcher = attn.__dict__.get("forward")
        if isinstance(dispatcher, functools.partial) and dispatcher.func == self._attention_dispatch:
            previous = dispatcher.args[1]
            if previous is None:
                del attn.forward
            else:
                attn.forward = previous
        self._active_plan = None

    def _check_part(self, module: nn.Module, index: int) -> None:
        if module is not self._entry_parts[index]:
            raise RuntimeError(
                "A MoPEFT entry point ran on a copy of the block it was installed on (nn.DataParallel replicates "
                "modules without re-binding hooks): the copy's parameters would be ignored. Use "
                "DistributedDataParallel or FSDP (torchrun) instead of nn.DataParallel."
            )

    def _norm_hook(self, module: nn.Module, args: tuple, normed: torch.Tensor) -> None:
        """Forward hook on the block's first norm, the start of every run of the block (the forward, and any
        recomputation by activation checkpointing): the plan of this run, from ``normed`` ((B, H, W, C) or (B, N, C))
        pooled over all tokens."""
        self._active_plan = None  # a run that stopped early (checkpoint recomputation) leaves no stale plan behind
        self._check_part(module, 0)
        # Armed by `forward`, or a recomputation in backward (activation checkpointing inside the block, which runs
        # after `forward` returned); where torch cannot tell whether backward is running, always armed.
        armed = self._armed or _in_backward() is not False
        if not armed or self.disable_adapters or not self._has_live_work():
            return
        record, self._record_gates = self._record_gates, False
        muted = self._gate_hooks_muted
        self._gate_hooks_muted = muted or not record
        try:
            plan = self.plan(self.family.pool(normed))
        finally:
            self._gate_hooks_muted = muted
        self._active_plan = (plan, normed.shape[0])

    def _attention_dispatch(self, attn: nn.Module, previous: Callable[..., Any] | None, *args: Any, **kwargs: Any):
        """The attention module's ``forward``: MoPEFT's attention while a plan is active, else the module's own."""
        active = self._active_plan
        if active is None:
            return previous(*args, **kwargs) if previous is not None else type(attn).forward(attn, *args, **kwargs)
        self._check_part(attn, 1)
        return self.family.attention(self, attn, *active, *args, **kwargs)

    def _ffn_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the block's FFN, the last MoPEFT step of a run: the gated adapter on the FFN output
        ``(B, ..., C)`` (in place without gradients: the output is fresh). The run's plan ends here."""
        active, self._active_plan = self._active_plan, None
        if active is None:
            return None
        self._check_part(module, 2)
        return self.adapt_ffn_output(output, active[0])

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """What peft's ``unload()``/``merge_and_unload()`` put back in place of this layer: the block, merged if asked,
        without MoPEFT's entry points."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self._remove_entry_points()
        return self.get_base_layer()

    # ----------------------------------------------------------------------------------------------------------------
    # Merging: only LoRA with an input-independent scaling is a weight update; everything else is refused in words.
    # ----------------------------------------------------------------------------------------------------------------
    def merge_blockers(self, adapter_name: str) -> list[str]:
        """Why ``adapter_name`` cannot be folded into this block's weights exactly (empty if it can)."""
        settings = self.mopeft_settings[adapter_name]
        reasons = []
        if "lora" in settings["gated"]:
            reasons.append("its LoRA scaling comes from an input-dependent gate")
        if "prefix" in settings["live"]:
            reasons.append("prefixes add attention keys and values, which no weight update reproduces")
        if "adapter" in settings["live"]:
            reasons.append("the bottleneck adapter is non-linear")
        return reasons

    def get_delta_weight(self, adapter_name: str, target: str) -> torch.Tensor:
        """``scaling * G_L * B_t A_t``: the update of the ``target`` rows of its projection, ``(C_out, C_in)``."""
        settings = self.mopeft_settings[adapter_name]
        index = settings["lora_targets"].index(target)
        r = settings["r"]
        a = self.mopeft_lora_A[adapter_name].weight[index * r : (index + 1) * r]  # (r, C_in)
        b = self.mopeft_lora_B[adapter_name][index]  # (C_out, r)
        gate = settings["frozen"].get("lora", 1.0)
        return (b @ a) * (settings["scaling"] * gate)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold each adapter's LoRA into the q/k/v weights. Prefixes and adapters of the same adapter keep running
        (the result stays exact); a gated LoRA cannot be folded and raises."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            settings = self.mopeft_settings.get(name)
            if settings is None:
                continue
            if "lora" in settings["gated"]:
                raise ValueError(
                    f"Cannot merge MoPEFT adapter {name!r}: its LoRA scaling comes from an input-dependent gate, so no "
                    "single weight update equals it. Run `peft_vision_ext.prune_mopeft(model, calibration_batches, "
                    "freeze_gates=True)` to replace near-constant gates by constants first, or train with "
                    "`gating=False`."
                )
            if "lora" not in settings["live"]:
                self.merged_adapters.append(name)  # nothing to fold; prefixes/adapters keep running
                continue
            updates = []
            for target in settings["lora_targets"]:
                linear, rows = self.family.projection(self.base_layer, target)
                # Sum in float32 and round once: bf16/fp16 blocks merge as exactly as their dtype allows.
                merged = (linear.weight.data[rows].float() + self.get_delta_weight(name, target).float()).to(
                    linear.weight.dtype
                )
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or Infs detected in the merged weights of adapter {name!r}; not merged.")
                updates.append((linear, rows, merged))
            for linear, rows, merged in updates:
                linear.weight.data[rows] = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            settings = self.mopeft_settings.get(name)
            if settings is None or "lora" not in settings["live"]:
                continue
            for target in settings["lora_targets"]:
                linear, rows = self.family.projection(self.base_layer, target)
                weight = linear.weight.data
                weight[rows] = (weight[rows].float() - self.get_delta_weight(name, target).float()).to(weight.dtype)

    def __repr__(self) -> str:
        return "mopeft." + super().__repr__()


def _in_backward() -> bool | None:
    """Whether autograd is executing a backward pass on this thread, so that a forward run now is a recomputation by
    activation checkpointing (the check torch.utils.checkpoint itself uses); None where this torch cannot tell."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else current() != -1


def named_mopeft_layers(model: nn.Module) -> dict[str, MoPEFTLayer]:
    """Every MoPEFT layer of ``model`` (a ``PeftModel`` or the model inside it), by its block name in the base model
    (the name used in ``target_modules``, ``pruned`` and gate telemetry)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, MoPEFTLayer)
    }

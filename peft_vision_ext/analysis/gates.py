# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Gate telemetry for MoPEFT: which sub-method each block uses, per image, during inference (seed 002, Fig. 4.2).

with collect_gate_statistics(model) as gates:
    for batch in loader:
        model(**batch)
gates.summary()            # {block: {sub_method: {mean, std, min, max, p05, p95, active_fraction, count}}}
gates.selection_counts()   # {sub_method: times it had the largest gate of its block}
plot_gate_usage({"mars": gates, "moon": other}, "gates.png")
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .._files import atomic_file


SUB_METHOD_ORDER = ("lora", "prefix", "adapter")


class GateTelemetry:
    """Gate values recorded per block and sub-method (one value per image and forward pass)."""

    def __init__(self, adapter_name: str | None = None) -> None:
        self.adapter_name = adapter_name
        self._values: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self.blocks: list[str] = []

    def record(self, block: str, adapter: str, method: str, values: torch.Tensor) -> None:
        if self.adapter_name is not None and adapter != self.adapter_name:
            return
        if block not in self._values:
            self.blocks.append(block)
        self._values[block][method].append(values.detach().float().cpu().reshape(-1))

    def values(self, block: str, method: str) -> torch.Tensor:
        """All recorded values of one gate, ``(n_images,)``."""
        chunks = self._values.get(block, {}).get(method, [])
        return torch.cat(chunks) if chunks else torch.empty(0)

    @property
    def methods(self) -> list[str]:
        present = {m for block in self._values.values() for m in block}
        return [m for m in SUB_METHOD_ORDER if m in present]

    def summary(self, active_threshold: float = 0.5) -> dict[str, dict[str, dict[str, float]]]:
        """Per block and sub-method: count, mean, std, min, max, 5th/95th percentiles, and the fraction of images
        whose gate exceeds ``active_threshold``."""
        result: dict[str, dict[str, dict[str, float]]] = {}
        for block in self.blocks:
            result[block] = {}
            for method in self.methods:
                values = self.values(block, method)
                if values.numel() == 0:
                    continue
                result[block][method] = {
                    "count": int(values.numel()),
                    "mean": values.mean().item(),
                    "std": values.std(unbiased=False).item(),
                    "min": values.min().item(),
                    "max": values.max().item(),
                    "p05": values.quantile(0.05).item(),
                    "p95": values.quantile(0.95).item(),
                    "active_fraction": (values > active_threshold).float().mean().item(),
                }
        return result

    def selection_counts(self) -> dict[str, int]:
        """How often each sub-method had the largest gate of its block, over all images and blocks (the seed's
        "number of times each PEFT method is called during inference")."""
        counts = dict.fromkeys(self.methods, 0)
        for block in self.blocks:
            methods = [m for m in self.methods if self.values(block, m).numel()]
            if len(methods) < 2:
                continue
            stacked = torch.stack([self.values(block, m) for m in methods])  # (n_methods, n_images)
            winners = stacked.argmax(dim=0)
            for index, method in enumerate(methods):
                counts[method] += int((winners == index).sum())
        return counts

    def mean_by_method(self) -> dict[str, float]:
        """Mean gate of each sub-method over all blocks and images."""
        return {m: torch.cat([self.values(b, m) for b in self.blocks]).mean().item() for m in self.methods}


@contextlib.contextmanager
def collect_gate_statistics(model: nn.Module, adapter_name: str | None = None) -> Iterator[GateTelemetry]:
    """Record the gates of every MoPEFT block of ``model`` while the context is open.

    Gates are recorded in every forward pass (train or eval); use it around inference to get the seed's statistics.
    Constant gates (ungated sub-methods: 1; gates frozen by pruning: their constant) are recorded as well.
    """
    from ..tuners.mopeft.layer import named_mopeft_layers

    layers = named_mopeft_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MoPEFT layers to record gates from. Pass the model returned by "
            "`get_peft_model(model, MoPEFTConfig(...))` or `PeftModel.from_pretrained`."
        )
    telemetry = GateTelemetry(adapter_name)
    handles = [
        layer.register_gate_hook(
            lambda adapter, method, values, block=name: telemetry.record(block, adapter, method, values)
        )
        for name, layer in layers.items()
    ]
    try:
        yield telemetry
    finally:
        for handle in handles:
            handle.remove()


def plot_gate_usage(
    telemetries: Mapping[str, GateTelemetry], path: str | os.PathLike, title: str | None = None
) -> str:
    """The seed's Figure 4.2 for several domains: how often each sub-method is selected (largest gate of its block),
    and the mean gate per block and sub-method. Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not telemetries:
        raise ValueError("`telemetries` is empty: pass {domain name: GateTelemetry}.")
    colors = {"lora": "#1f77b4", "prefix": "#ff7f0e", "adapter": "#2ca02c"}
    domains = list(telemetries)
    fig, axes = plt.subplots(2, len(domains), figsize=(3.6 * len(domains), 6.4), squeeze=False)
    for column, domain in enumerate(domains):
        telemetry = telemetries[domain]
        counts = telemetry.selection_counts()
        ax = axes[0][column]
        methods = telemetry.methods
        ax.bar(methods, [counts.get(m, 0) for m in methods], color=[colors[m] for m in methods])
        ax.set_title(f"{domain}: selections")
        ax.set_ylabel("times largest gate" if column == 0 else "")
        ax = axes[1][column]
        summary = telemetry.summary()
        blocks = telemetry.blocks
        width = 0.8 / max(len(methods), 1)
        for index, method in enumerate(methods):
            means = [summary[b].get(method, {}).get("mean", float("nan")) for b in blocks]
            positions = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(blocks))]
            ax.bar(positions, means, width=width, color=colors[method], label=method)
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels([str(i) for i in range(len(blocks))])
        ax.set_xlabel("block")
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean gate" if column == 0 else "")
        if column == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title or "MoPEFT gate usage at inference")
    fig.tight_layout()
    with atomic_file(path) as temporary:  # creates the parent directory
        fig.savefig(temporary, dpi=120)
    plt.close(fig)
    return str(path)

# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from .._files import check_adapter_dir
from .gates import GateTelemetry, collect_gate_statistics, plot_gate_usage
from .ranking import (
    SCORES,
    AdapterScore,
    ExportResult,
    export_adapters,
    rank_adapters,
    score_adapters,
    select_adapters,
    size_bias,
)


__all__ = [
    "SCORES",
    "AdapterScore",
    "ExportResult",
    "GateTelemetry",
    "check_adapter_dir",
    "collect_gate_statistics",
    "export_adapters",
    "plot_gate_usage",
    "rank_adapters",
    "score_adapters",
    "select_adapters",
    "size_bias",
]

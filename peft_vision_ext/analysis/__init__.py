# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
from .._files import check_adapter_dir
from .gates import GateTelemetry, collect_gate_statistics, plot_gate_usage
from .measure import (
    base_parameter_count,
    count_flops,
    count_parameters,
    evaluate_segmentation,
    percent,
    set_fold_in_eval,
    update_size_bytes,
)
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
    "base_parameter_count",
    "check_adapter_dir",
    "collect_gate_statistics",
    "count_flops",
    "count_parameters",
    "evaluate_segmentation",
    "export_adapters",
    "percent",
    "plot_gate_usage",
    "rank_adapters",
    "score_adapters",
    "select_adapters",
    "set_fold_in_eval",
    "size_bias",
    "update_size_bytes",
]

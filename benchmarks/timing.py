# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Timing, memory and summary helpers shared by the benchmark scripts of this folder.

``bench_conv_adapter.py``, ``bench_mask2former.py`` and ``bench_mopeft.py`` import it as a sibling module (``from
timing import ...``): a script run as ``python benchmarks/<script>.py`` has its own folder on ``sys.path``. The
methods (round-robin rounds on two clocks, tensor-memory peak by a dispatch mode on CPU, the allocator's peak on CUDA)
are described in ``bench_conv_adapter.py``'s docstring.

It imports torch: a script that sets ``OMP_WAIT_POLICY`` must do so before importing this module.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


MIB = 1024**2


# --------------------------------------------------------------------------------------------------------------------
# Memory measurement
# --------------------------------------------------------------------------------------------------------------------
class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and alive at the same time.

    A storage counts when an op returns it and none of the op's inputs holds it (so views and in-place results of
    existing tensors do not count), and stops counting when it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        nbytes = self.live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def static_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, batch: Iterable[torch.Tensor]):
    """Tensors alive across calls: parameters, existing gradients, buffers, optimizer state, the input batch."""
    yield from model.parameters()
    yield from (p.grad for p in model.parameters() if p.grad is not None)
    yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    yield from batch


def measure_memory(
    fn: Callable[[], Any],
    device: torch.device,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: Iterable[torch.Tensor],
    extra_static: Iterable[torch.Tensor] = (),
) -> tuple[dict[str, int], Any]:
    """Run ``fn`` once and return ``({static, transient_peak, peak} bytes, fn's result)``.

    On CPU, ``extra_static`` are further tensors alive between calls that :func:`static_tensors` does not find (e.g.
    kernels a model caches outside its parameters and buffers); on CUDA the allocator counts them anyway.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        static = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"static_bytes": static, "transient_peak_bytes": peak - static, "peak_bytes": peak}, result
    static = tensor_bytes(static_tensors(model, optimizer, batch)) + tensor_bytes(extra_static)
    with TensorMemoryTracker() as tracker:
        result = fn()
    return {"static_bytes": static, "transient_peak_bytes": tracker.peak, "peak_bytes": static + tracker.peak}, result


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
# What `make_optimizer` builds, as the benchmarks record it in their JSON.
OPTIMIZER = "torch.optim.AdamW(lr=1e-4, fused=True)"


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters, fused: ``transformers.Trainer``'s default optimizer with torch >= 2.8
    (``optim="adamw_torch_fused"``), rather than torch's own default (a per-tensor loop on CPU). See ``OPTIMIZER``."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def add_denormal_argument(parser: Any) -> None:
    """``--keep-denormals``: time with subnormal floats computed as such (by default the scripts flush them to zero,
    see ``flush_denormals``)."""
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormal floats to zero (the default flushes: randomly initialised models backpropagate "
        "subnormal gradients that trained ones do not, and x86 CPUs compute with them many times slower)",
    )


def flush_denormals(keep: bool = False) -> bool:
    """Flush subnormal floats to zero (``torch.set_flush_denormal``) unless ``keep``; return whether they are flushed.

    The benchmarks build their models with random weights. In SAM ViT-B the gradient that reaches the image encoder
    through a random mask decoder is so small that the encoder's backward runs on subnormal numbers (subnormal
    gradients through all 24 LayerNorms, about 18,000 subnormal entries in one step's parameter gradients at 256 px),
    which x86 cores compute with a microcode assist per operation: on the 2-core Intel VM a full fine-tuning step took
    10.2 s of CPU time with them and 2.0 s flushed. Fine-tuning a
    trained checkpoint does not produce such gradients, so timing them would measure the random initialisation, not
    the methods. The U-Nets of ``bench_conv_adapter.py`` are not affected (same times either way)."""
    if keep:
        torch.set_flush_denormal(False)
        return False
    return bool(torch.set_flush_denormal(True))  # False where the CPU cannot flush (then nothing changed)


def run_settings(keep_denormals: bool = False) -> dict[str, Any]:
    """Apply the settings a benchmark run measures under (``flush_denormals``) and return them, with the optimizer
    and the OpenMP wait policy, for the run's JSON: ``optimizer``, ``omp_wait_policy``, ``flush_denormal``."""
    return {
        "optimizer": OPTIMIZER,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "flush_denormal": flush_denormals(keep_denormals),
    }


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_times(
    calls: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]
) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call: ``repeats`` rounds of every variant, round-robin, rotating start."""
    names = list(calls)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            calls[name]()
            sync()
            wall_end, cpu_end = time.perf_counter(), time.process_time()
            times[name]["wall"].append(wall_end - wall_start)
            times[name]["cpu"].append(cpu_end - cpu_start)
    return times


def summarize(values: list[float]) -> dict[str, float]:
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def timing_report(times: dict[str, dict[str, list[float]]], reference: str) -> dict[str, dict[str, Any]]:
    """Per variant and clock: raw values, their summary, and the summary of the per-round ratios to ``reference``."""
    report = {}
    for name, clocks in times.items():
        report[name] = {}
        for clock, values in clocks.items():
            paired = [value / ref for value, ref in zip(values, times[reference][clock])]
            report[name][clock] = {"values_s": values, "time_s": summarize(values), "ratio": summarize(paired)}
    return report


def paired_ratio(times: dict[str, dict[str, list[float]]], numerator: str, denominator: str) -> dict[str, Any]:
    """Per clock: the per-round ratios ``numerator / denominator`` (same round, so drift cancels) and their summary."""
    report = {}
    for clock, values in times[numerator].items():
        ratios = [value / ref for value, ref in zip(values, times[denominator][clock])]
        report[clock] = {"values": ratios, "ratio": summarize(ratios)}
    return report


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as handle:
            ram = int(handle.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "ram_bytes": ram,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def spread(stats: dict[str, float], scale: float, fmt: str) -> str:
    return f"{stats['median'] * scale:{fmt}} [{stats['q1'] * scale:{fmt}}–{stats['q3'] * scale:{fmt}}]"


def time_cells(entry: dict[str, Any], clocks: tuple[str, ...], scale: float, fmt: str) -> str:
    cells = []
    for clock in clocks:
        cells += [spread(entry[clock]["time_s"], scale, fmt), spread(entry[clock]["ratio"], 1, ".3f")]
    return " | ".join(cells)

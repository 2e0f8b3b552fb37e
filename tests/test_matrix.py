# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The common checks over every (tiny model x config) case of `testing_common.MATRIX`."""

from __future__ import annotations

import os

import pytest
import torch

from testing_common import (
    LOW_PRECISION,
    MATRIX,
    AdapterStore,
    check_bn_stats_frozen,
    check_config_reuse,
    check_damaged_checkpoint,
    check_disable_adapter,
    check_identity_at_init,
    check_layer_and_model_status,
    check_low_cpu_mem_usage_load,
    check_low_precision,
    check_low_precision_merge,
    check_merge_equivalence,
    check_merge_idempotent,
    check_mixed_adapter_batch,
    check_multiple_adapters,
    check_only_adapters_train,
    check_requires_grad_after_loading,
    check_safe_merge_refuses_nan,
    check_unload,
    damages_for,
    foreign_case,
    load_in_fresh_process,
    save_for_fresh_process,
)


CASES = pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=pytest.mark.slow) if case.heavy else case for case in MATRIX],
    ids=[case.name for case in MATRIX],
)


def _core_first(cases):
    """Non-core cases get the `slow` marker (see `Case.core`): every method still gets the check in `make test`."""
    return [case if case.core else pytest.param(case, marks=pytest.mark.slow) for case in cases]


# The checks added on top of the original six: every case under `-m slow`, core cases in the default run.
EXTENDED = pytest.mark.parametrize("case", _core_first(MATRIX), ids=[case.name for case in MATRIX])
# Frozen BatchNorm statistics (peft issue 1732) concern the models that have BatchNorm.
BN_CASES = [case for case in MATRIX if case.has_batchnorm]
DAMAGED = [(case, damage) for case in MATRIX for damage in damages_for(case)]
DAMAGED_PARAMS = [
    pytest.param(case, damage, marks=() if case.core else pytest.mark.slow, id=f"{case.name}-{damage}")
    for case, damage in DAMAGED
]


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Two saved adapters per case, saved on first use and shared by the save/load checks of this module."""
    return AdapterStore(str(tmp_path_factory.mktemp("saved")))


@CASES
def test_identity_at_init(case):
    check_identity_at_init(case)


@CASES
def test_disable_adapter(case):
    check_disable_adapter(case)


@CASES
def test_merge_equivalence(case):
    check_merge_equivalence(case)


@EXTENDED
def test_merge_adapter_twice_is_merging_once(case):
    check_merge_idempotent(case)


@EXTENDED
def test_safe_merge_refuses_nan(case):
    check_safe_merge_refuses_nan(case)


@EXTENDED
def test_unload(case):
    check_unload(case)


@CASES
def test_only_adapter_parameters_train(case):
    check_only_adapters_train(case)


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=pytest.mark.slow) if case.heavy else case for case in BN_CASES],
    ids=[case.name for case in BN_CASES],
)
def test_bn_statistics_unchanged_by_training(case):
    check_bn_stats_frozen(case)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=[str(d).removeprefix("torch.") for d in LOW_PRECISION])
@EXTENDED
def test_low_precision(case, dtype):
    check_low_precision(case, dtype)


MERGEABLE = [case for case in MATRIX if case.mergeable]
MERGEABLE_PARAMS = _core_first(MERGEABLE)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=[str(d).removeprefix("torch.") for d in LOW_PRECISION])
@pytest.mark.parametrize("case", MERGEABLE_PARAMS, ids=[case.name for case in MERGEABLE])
def test_low_precision_merge_rounds_once(case, dtype):
    check_low_precision_merge(case, dtype)


@EXTENDED
def test_low_cpu_mem_usage_load(case, saved_adapters):
    check_low_cpu_mem_usage_load(case, saved_adapters.get(case))


@EXTENDED
def test_multiple_adapters(case, saved_adapters):
    check_multiple_adapters(case, saved_adapters.get(case))


@EXTENDED
def test_mixed_adapter_batch(case):
    check_mixed_adapter_batch(case)


@EXTENDED
def test_config_survives_reuse(case):
    check_config_reuse(case)


@EXTENDED
def test_layer_and_model_status(case):
    check_layer_and_model_status(case)


@EXTENDED
def test_requires_grad_after_loading(case, saved_adapters):
    check_requires_grad_after_loading(case, saved_adapters.get(case))


@pytest.mark.parametrize("case, damage", DAMAGED_PARAMS)
def test_damaged_checkpoint_is_refused(case, damage, saved_adapters, tmp_path):
    foreign = saved_adapters.get(foreign_case(case)) if damage == "foreign_weights" else None
    check_damaged_checkpoint(case, damage, saved_adapters.get(case), foreign, str(tmp_path / "damaged"))


class FreshProcessResults:
    """Saves the cases of one kind (core or not) on first use, then loads them all in ONE fresh interpreter (imports
    cost seconds): a default run never saves the non-core cases."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.jobs: dict[bool, dict] = {}

    def get(self, case):
        if case.core not in self.jobs:
            workdir = os.path.join(self.root, "core" if case.core else "other")
            os.makedirs(workdir)
            jobs = {c.name: save_for_fresh_process(c, workdir) for c in MATRIX if c.core == case.core}
            load_in_fresh_process(list(jobs.values()), workdir)
            self.jobs[case.core] = jobs
        return self.jobs[case.core][case.name]


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory):
    return FreshProcessResults(str(tmp_path_factory.mktemp("fresh")))


@EXTENDED
def test_save_load_in_fresh_process(case, fresh_process_results):
    job = fresh_process_results.get(case)
    expected, got = torch.load(job["expected"]), torch.load(job["output"])
    atol = case.tolerance("fresh_process")
    assert torch.allclose(got, expected, rtol=0, atol=atol), (
        f"loaded in a fresh process: {(got - expected).abs().max()}"
    )

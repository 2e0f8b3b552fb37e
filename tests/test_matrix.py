# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The common checks over every (tiny model x config) case of `testing_common.MATRIX`."""

from __future__ import annotations

import pytest
import torch

from testing_common import (
    MATRIX,
    check_bn_stats_frozen,
    check_disable_adapter,
    check_identity_at_init,
    check_merge_equivalence,
    check_only_adapters_train,
    load_in_fresh_process,
    save_for_fresh_process,
)


CASES = pytest.mark.parametrize("case", MATRIX, ids=[case.name for case in MATRIX])
# Frozen BatchNorm statistics (peft issue 1732) concern the models that have BatchNorm.
BN_CASES = [case for case in MATRIX if case.has_batchnorm]


@CASES
def test_identity_at_init(case):
    check_identity_at_init(case)


@CASES
def test_disable_adapter(case):
    check_disable_adapter(case)


@CASES
def test_merge_equivalence(case):
    check_merge_equivalence(case)


@CASES
def test_only_adapter_parameters_train(case):
    check_only_adapters_train(case)


@pytest.mark.parametrize("case", BN_CASES, ids=[case.name for case in BN_CASES])
def test_bn_statistics_unchanged_by_training(case):
    check_bn_stats_frozen(case)


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory):
    """Save every case once, then load them all in ONE fresh interpreter (imports cost seconds)."""
    workdir = str(tmp_path_factory.mktemp("fresh"))
    jobs = {case.name: save_for_fresh_process(case, workdir) for case in MATRIX}
    load_in_fresh_process(list(jobs.values()), workdir)
    return jobs


@CASES
def test_save_load_in_fresh_process(case, fresh_process_results):
    job = fresh_process_results[case.name]
    expected, got = torch.load(job["expected"]), torch.load(job["output"])
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()

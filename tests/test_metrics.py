# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Tests for peft_vision_ext.metrics: hand-computed values, a pixel-loop reference, Trainer glue, evaluate module."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from peft_vision_ext.metrics import (
    SEGMENTATION_METRIC_PATH,
    ConfusionMatrix,
    compute_segmentation_metrics,
    confusion_matrix,
    functional,
    make_compute_metrics,
    metrics_from_confusion,
    preprocess_logits_for_metrics,
)


# A 3x4 example with 3 classes and one ignored (255) pixel, worked out by hand.
#
#   references        predictions        (reference, prediction) per pixel
#   0 0 1 1           0 1 1 1            (0,0) (0,1) (1,1) (1,1)
#   0 2 1 1           0 2 1 0            (0,0) (2,2) (1,1) (1,0)
#   2 2 2 255         2 2 1 2            (2,2) (2,2) (2,1)  --- ignored
#
# Confusion matrix (rows: reference, cols: prediction), 11 counted pixels:
#   ref 0: [2, 1, 0]     TP = [2, 3, 3]
#   ref 1: [1, 3, 0]     reference counts (row sums)  = [3, 4, 4]
#   ref 2: [0, 1, 3]     predicted counts (col sums)  = [3, 5, 3]
# union = ref + pred - TP = [4, 6, 4]  ->  IoU = [2/4, 3/6, 3/4] = [0.5, 0.5, 0.75], mIoU = 1.75 / 3 = 7/12
# recall = TP / ref = [2/3, 3/4, 3/4]  ->  balanced accuracy = (2/3 + 3/4 + 3/4) / 3 = 13/18
# pixel accuracy = (2 + 3 + 3) / 11 = 8/11
REFERENCES = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 2, 255]])
PREDICTIONS = np.array([[0, 1, 1, 1], [0, 2, 1, 0], [2, 2, 1, 2]])
EXPECTED_CM = np.array([[2, 1, 0], [1, 3, 0], [0, 1, 3]])
EXPECTED = {
    "mean_iou": 7 / 12,
    "per_category_iou": [0.5, 0.5, 0.75],
    "balanced_accuracy": 13 / 18,
    "per_category_accuracy": [2 / 3, 3 / 4, 3 / 4],
    "overall_accuracy": 8 / 11,
}
ID2LABEL = {0: "background", 1: "rock", 2: "sky"}


def reference_metrics(predictions, references, num_labels, ignore_index=255):
    """Straightforward pure-python reference: loop over every pixel, then apply the textbook formulas."""
    cm = [[0] * num_labels for _ in range(num_labels)]
    for pred_mask, ref_mask in zip(predictions, references):
        for p, r in zip(np.asarray(pred_mask).ravel().tolist(), np.asarray(ref_mask).ravel().tolist()):
            if r != ignore_index:
                cm[r][p] += 1
    ious, recalls = [], []
    for c in range(num_labels):
        tp = cm[c][c]
        fn = sum(cm[c]) - tp
        fp = sum(cm[r][c] for r in range(num_labels)) - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        recalls.append(tp / (tp + fn) if tp + fn else math.nan)
    total = sum(map(sum, cm))
    valid_ious = [v for v in ious if not math.isnan(v)]
    valid_recalls = [v for v in recalls if not math.isnan(v)]
    return np.array(cm), {
        "mean_iou": sum(valid_ious) / len(valid_ious),
        "per_category_iou": ious,
        "balanced_accuracy": sum(valid_recalls) / len(valid_recalls),
        "per_category_accuracy": recalls,
        "overall_accuracy": sum(cm[c][c] for c in range(num_labels)) / total,
    }


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, nan_ok=True), key


# --------------------------------------------------------------------------- functional: hand-computed values


def test_hand_computed_confusion_matrix_and_metrics():
    cm = confusion_matrix(PREDICTIONS, REFERENCES, num_labels=3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, EXPECTED_CM)
    assert_metrics_equal(metrics_from_confusion(cm), EXPECTED)
    assert_metrics_equal(compute_segmentation_metrics(PREDICTIONS, REFERENCES, num_labels=3), EXPECTED)


def test_id2label_adds_flat_keys_and_accepts_string_keys():
    result = compute_segmentation_metrics(PREDICTIONS, REFERENCES, num_labels=3, id2label=ID2LABEL)
    assert result["iou_background"] == pytest.approx(0.5)
    assert result["iou_rock"] == pytest.approx(0.5)
    assert result["iou_sky"] == pytest.approx(0.75)
    assert result["accuracy_background"] == pytest.approx(2 / 3)
    assert result["accuracy_rock"] == pytest.approx(3 / 4)
    assert result["accuracy_sky"] == pytest.approx(3 / 4)
    # HF configs reloaded from JSON have string keys; classes missing from id2label fall back to their index.
    partial = compute_segmentation_metrics(PREDICTIONS, REFERENCES, num_labels=3, id2label={"1": "rock"})
    assert {"iou_0", "iou_rock", "iou_2", "accuracy_0", "accuracy_rock", "accuracy_2"} <= set(partial)


def test_ignore_index_handling():
    # A different ignore value drops the same pixel.
    refs = np.where(REFERENCES == 255, -1, REFERENCES)
    np.testing.assert_array_equal(confusion_matrix(PREDICTIONS, refs, 3, ignore_index=-1), EXPECTED_CM)
    # ignore_index=None counts every pixel: the last pixel (ref 2, pred 2) now counts -> cm[2, 2] == 4.
    refs_all = np.where(REFERENCES == 255, 2, REFERENCES)
    cm = confusion_matrix(PREDICTIONS, refs_all, 3, ignore_index=None)
    np.testing.assert_array_equal(cm, EXPECTED_CM + np.diag([0, 0, 1]))
    # ... and then 255 is an invalid class id.
    with pytest.raises(ValueError, match=r"`references` holds class ids outside \[0, 3\): \[255\]"):
        confusion_matrix(PREDICTIONS, REFERENCES, 3, ignore_index=None)
    # Predictions at ignored pixels are never looked at, even when out of range (e.g. the Trainer's -100 padding).
    preds = PREDICTIONS.copy()
    preds[2, 3] = -100
    np.testing.assert_array_equal(confusion_matrix(preds, REFERENCES, 3), EXPECTED_CM)
    # Everything ignored: an all-zero matrix and nan metrics, without warnings.
    empty = confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 255), 3)
    assert empty.sum() == 0
    result = metrics_from_confusion(empty)
    assert math.isnan(result["mean_iou"]) and math.isnan(result["balanced_accuracy"])
    assert math.isnan(result["overall_accuracy"])


def test_absent_class_is_nan_and_excluded_from_means():
    # Class 3 appears nowhere: nan IoU and recall, and the means are those of the 3-class example.
    result = compute_segmentation_metrics(PREDICTIONS, REFERENCES, num_labels=4)
    assert math.isnan(result["per_category_iou"][3]) and math.isnan(result["per_category_accuracy"][3])
    assert result["mean_iou"] == pytest.approx(7 / 12)
    assert result["balanced_accuracy"] == pytest.approx(13 / 18)

    # Class 3 only predicted (a false positive), class 2 nowhere:
    #   refs  [0, 0, 1, 1]   preds [0, 3, 1, 1]   cm: ref 0 -> [1, 0, 0, 1], ref 1 -> [0, 2, 0, 0]
    #   IoU = [1/2, 2/2, nan, 0/1] -> mIoU = (0.5 + 1 + 0) / 3 = 0.5  (class 3 has a union, so it counts)
    #   recall = [1/2, 2/2, nan, nan] -> balanced accuracy = 0.75 (only classes present in the references)
    result = compute_segmentation_metrics(np.array([0, 3, 1, 1]), np.array([0, 0, 1, 1]), num_labels=4)
    assert result["per_category_iou"] == pytest.approx([0.5, 1.0, math.nan, 0.0], nan_ok=True)
    assert result["per_category_accuracy"] == pytest.approx([0.5, 1.0, math.nan, math.nan], nan_ok=True)
    assert result["mean_iou"] == pytest.approx(0.5)
    assert result["balanced_accuracy"] == pytest.approx(0.75)
    assert result["overall_accuracy"] == pytest.approx(0.75)


# --------------------------------------------------------------------------- functional: input forms


def test_list_of_masks_with_different_shapes():
    preds = [PREDICTIONS, np.array([[1, 1], [2, 0]]), np.array([[0, 2, 2, 1, 1]])]
    refs = [REFERENCES, np.array([[1, 0], [2, 255]]), np.array([[0, 2, 1, 1, 255]])]
    cm = confusion_matrix(preds, refs, num_labels=3)
    expected = sum(confusion_matrix(p, r, 3) for p, r in zip(preds, refs))
    np.testing.assert_array_equal(cm, expected)
    # Added by hand: image 2 -> (1,1) (0,1) (2,2); image 3 -> (0,0) (2,2) (1,2) (1,1).
    np.testing.assert_array_equal(cm - EXPECTED_CM, [[1, 1, 0], [0, 2, 1], [0, 0, 2]])
    # Tuples, and a (B, H, W) array paired with a list of masks, work the same.
    np.testing.assert_array_equal(confusion_matrix(tuple(preds), tuple(refs), 3), cm)
    stacked = np.stack([PREDICTIONS, PREDICTIONS])
    np.testing.assert_array_equal(confusion_matrix(stacked, [REFERENCES, REFERENCES], 3), 2 * EXPECTED_CM)


def test_torch_tensors_and_small_dtypes():
    expected = confusion_matrix(PREDICTIONS, REFERENCES, 3)
    np.testing.assert_array_equal(
        confusion_matrix(torch.from_numpy(PREDICTIONS), torch.from_numpy(REFERENCES), 3), expected
    )
    # uint8 masks: codes are computed in int64, so reference * num_labels cannot overflow.
    cm = confusion_matrix(torch.from_numpy(PREDICTIONS.astype(np.uint8)), REFERENCES.astype(np.uint8), num_labels=3)
    np.testing.assert_array_equal(cm, expected)
    big = np.full((2, 2), 199, dtype=np.uint8)
    assert confusion_matrix(big, big, num_labels=200)[199, 199] == 4
    # Bool masks are binary class ids.
    np.testing.assert_array_equal(
        confusion_matrix(np.array([True, False]), np.array([True, True]), 2), [[0, 0], [1, 1]]
    )
    # Tensors are accepted by metrics_from_confusion too.
    assert_metrics_equal(metrics_from_confusion(torch.from_numpy(EXPECTED_CM)), EXPECTED)


def test_streaming_accumulator_equals_one_shot():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, size=(rng.integers(3, 9), rng.integers(3, 9))) for _ in range(10)]
    refs = [np.where(rng.random(p.shape) < 0.1, 255, rng.integers(0, 5, size=p.shape)) for p in preds]
    accumulator = ConfusionMatrix(num_labels=5)
    for start in range(0, 10, 3):
        accumulator.update(preds[start : start + 3], refs[start : start + 3])
    accumulator.update(torch.from_numpy(preds[0]), torch.from_numpy(refs[0]))  # single masks, tensors
    one_shot = confusion_matrix(preds + [preds[0]], refs + [refs[0]], num_labels=5)
    np.testing.assert_array_equal(accumulator.compute(), one_shot)
    # compute() returns a copy; a bad batch is refused as a whole and leaves the counts unchanged.
    accumulator.compute()[0, 0] += 1000
    with pytest.raises(ValueError, match=r"`predictions\[1\]` holds class ids outside"):
        accumulator.update([preds[1], np.full_like(refs[1], 9)], [refs[1], refs[1]])
    np.testing.assert_array_equal(accumulator.compute(), one_shot)
    assert "pixels=" in repr(accumulator)
    accumulator.reset()
    assert accumulator.compute().sum() == 0


@pytest.mark.parametrize("chunk_pixels", [None, 7])
def test_matches_pixel_loop_reference_on_random_data(chunk_pixels, monkeypatch):
    if chunk_pixels is not None:
        # Tiny slices exercise the slicing of big arrays and the buffering of codes across masks.
        monkeypatch.setattr(functional, "_CHUNK_PIXELS", chunk_pixels)
    rng = np.random.default_rng(1234)
    num_labels = 7
    # Class 6 is never used, and class 5 only appears in predictions, to exercise the nan paths too.
    preds = [rng.integers(0, 6, size=(rng.integers(1, 20), rng.integers(1, 20))) for _ in range(12)]
    refs = [np.where(rng.random(p.shape) < 0.15, 255, rng.integers(0, 5, size=p.shape)) for p in preds]
    expected_cm, expected = reference_metrics(preds, refs, num_labels)
    cm = confusion_matrix(preds, refs, num_labels)
    np.testing.assert_array_equal(cm, expected_cm)
    assert_metrics_equal(compute_segmentation_metrics(preds, refs, num_labels), expected)
    # One big (B, H, W) array: same counts as the pixel loop.
    stacked_preds = rng.integers(0, num_labels, size=(3, 11, 13))
    stacked_refs = np.where(rng.random(stacked_preds.shape) < 0.1, 255, rng.integers(0, 6, size=stacked_preds.shape))
    np.testing.assert_array_equal(
        confusion_matrix(stacked_preds, stacked_refs, num_labels),
        reference_metrics(stacked_preds, stacked_refs, num_labels)[0],
    )
    # An out-of-range id in the last slice is still found.
    stacked_preds[-1, -1, -1], stacked_refs[-1, -1, -1] = num_labels, 0
    with pytest.raises(
        ValueError, match=rf"`predictions` holds class ids outside \[0, {num_labels}\): \[{num_labels}\]"
    ):
        confusion_matrix(stacked_preds, stacked_refs, num_labels)


# --------------------------------------------------------------------------- functional: bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_labels": 0}, ValueError, r"`num_labels` must be >= 1.*got 0"),
        ({"num_labels": 2.0}, TypeError, r"`num_labels` must be an int.*got 2\.0 of type float"),
        ({"num_labels": True}, TypeError, r"`num_labels` must be an int.*got True"),
        ({"num_labels": 3, "ignore_index": "255"}, TypeError, r"`ignore_index` must be an int or None.*'255'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        confusion_matrix(PREDICTIONS, REFERENCES, **kwargs)
    with pytest.raises(error, match=match):
        ConfusionMatrix(**kwargs)
    with pytest.raises(error, match=match):
        make_compute_metrics(**kwargs)


def test_bad_inputs():
    with pytest.raises(
        ValueError, match=r"same shape.*predictions of shape \(3, 4\) and references of shape \(4, 3\)"
    ):
        confusion_matrix(PREDICTIONS, REFERENCES.T, 3)
    with pytest.raises(ValueError, match=r"`predictions\[1\]` and `references\[1\]` must have the same shape"):
        confusion_matrix([PREDICTIONS, np.zeros((2, 2), int)], [REFERENCES, np.zeros((2, 3), int)], 3)
    with pytest.raises(ValueError, match=r"same number of masks, got 2 predictions and 1 references"):
        confusion_matrix([PREDICTIONS, PREDICTIONS], [REFERENCES], 3)
    with pytest.raises(ValueError, match=r"`predictions` holds class ids outside \[0, 3\): \[-1, 3\].*num_labels"):
        confusion_matrix(np.array([0, 3, -1, 1]), np.array([0, 1, 1, 1]), 3)
    with pytest.raises(
        ValueError, match=r"`references` holds class ids outside \[0, 3\) or the ignore value 255: \[7\]"
    ):
        confusion_matrix(np.array([0, 1]), np.array([7, 1]), 3)
    with pytest.raises(TypeError, match=r"`predictions` must hold integer class ids, got .*float32.*argmax"):
        confusion_matrix(PREDICTIONS.astype(np.float32), REFERENCES, 3)
    with pytest.raises(TypeError, match=r"`references\[0\]` must hold integer class ids"):
        confusion_matrix([PREDICTIONS], [REFERENCES.astype(float)], 3)


def test_bad_confusion_matrix_and_id2label():
    with pytest.raises(ValueError, match=r"`cm` must be a non-empty square.*shape \(2, 3\)"):
        metrics_from_confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"`cm` must hold finite non-negative pixel counts.*minimum -1"):
        metrics_from_confusion(np.array([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match=r"`id2label` has class id 5 \('x'\) outside \[0, 3\)"):
        metrics_from_confusion(EXPECTED_CM, id2label={5: "x"})
    with pytest.raises(ValueError, match=r"`id2label` keys must be class ids.*'sky'"):
        metrics_from_confusion(EXPECTED_CM, id2label={"sky": "sky"})
    with pytest.raises(ValueError, match=r"same name: \['rock'\]"):
        metrics_from_confusion(EXPECTED_CM, id2label={0: "rock", 1: "rock"})
    with pytest.raises(TypeError, match=r"`id2label` must be a mapping"):
        metrics_from_confusion(EXPECTED_CM, id2label=["a", "b", "c"])
    # A bad id2label is reported before any pixel is counted.
    with pytest.raises(ValueError, match=r"`id2label` has class id 3"):
        compute_segmentation_metrics(PREDICTIONS, REFERENCES.T, 3, id2label={3: "x"})


# --------------------------------------------------------------------------- Trainer integration


def test_preprocess_logits_for_metrics_shapes_and_upsampling():
    torch.manual_seed(0)
    labels = torch.zeros(2, 8, 12, dtype=torch.long)
    logits = torch.randn(2, 5, 4, 6)
    masks = preprocess_logits_for_metrics((logits, torch.randn(2, 3)), labels)  # tuple: logits come first
    assert masks.shape == (2, 8, 12) and masks.dtype == torch.int64
    expected = F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(masks, expected)
    # Same size: a plain argmax.
    same = torch.randn(2, 5, 8, 12)
    assert torch.equal(preprocess_logits_for_metrics(same, labels), same.argmax(1))
    with pytest.raises(ValueError, match=r"`logits` must be segmentation logits of shape .*got shape \(2, 5\)"):
        preprocess_logits_for_metrics(torch.randn(2, 5), labels)


def _block_logits(classes: np.ndarray, num_labels: int) -> np.ndarray:
    """One-hot logits of shape (B, K, h, w) whose argmax is ``classes``."""
    return np.moveaxis(np.eye(num_labels, dtype=np.float32)[classes], -1, 1) * 5.0


def test_make_compute_metrics_with_argmaxed_predictions():
    compute_metrics = make_compute_metrics(num_labels=3, id2label=ID2LABEL)
    batch_preds = np.stack([PREDICTIONS, PREDICTIONS])
    batch_refs = np.stack([REFERENCES, REFERENCES])
    result = compute_metrics(EvalPrediction(predictions=batch_preds, label_ids=batch_refs))
    assert all(type(v) is float for v in result.values())
    assert "per_category_iou" not in result and "per_category_accuracy" not in result
    assert result["mean_iou"] == pytest.approx(7 / 12)
    assert result["balanced_accuracy"] == pytest.approx(13 / 18)
    assert result["overall_accuracy"] == pytest.approx(8 / 11)
    assert result["iou_sky"] == pytest.approx(0.75) and result["accuracy_background"] == pytest.approx(2 / 3)
    # Absent class: nan stays a float nan; without id2label there are no per-label keys.
    result = make_compute_metrics(num_labels=4)(EvalPrediction(predictions=batch_preds, label_ids=batch_refs))
    assert set(result) == {"mean_iou", "balanced_accuracy", "overall_accuracy"}
    result = make_compute_metrics(num_labels=4, id2label={3: "ice"})((batch_preds, batch_refs))
    assert isinstance(result["iou_ice"], float) and math.isnan(result["iou_ice"])


def test_make_compute_metrics_with_raw_smaller_logits():
    # 2x2 one-hot logits upsampled bilinearly (align_corners=False) to 4x4: output rows/cols 0,1 sample source
    # coordinate -0.25 (clamped to 0) and 0.25 (weights 0.75/0.25), rows/cols 2,3 sample 0.75 and 1.25 (clamped to
    # 1), so the argmax replicates every source pixel into a 2x2 block.
    small = np.array([[[0, 1], [2, 1]], [[2, 2], [0, 1]]])
    logits = _block_logits(small, num_labels=3)
    upsampled = np.kron(small, np.ones((2, 2), dtype=int))
    labels = upsampled.copy()
    labels[0, 0, :] = 1  # 2 of the 32 pixels wrong: reference 1 where the prediction is 0
    labels[1, 3, 3] = 255  # one ignored pixel
    expected = compute_segmentation_metrics(upsampled, labels, num_labels=3)
    result = make_compute_metrics(num_labels=3)(EvalPrediction(predictions=logits, label_ids=labels))
    assert result["overall_accuracy"] == pytest.approx(29 / 31)
    for key in ("mean_iou", "balanced_accuracy", "overall_accuracy"):
        assert result[key] == pytest.approx(expected[key])
    # Same answer through preprocess_logits_for_metrics (the recommended path) and for a tuple of outputs.
    masks = preprocess_logits_for_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    np.testing.assert_array_equal(masks.numpy(), upsampled)
    tupled = make_compute_metrics(num_labels=3)(EvalPrediction(predictions=(logits, np.zeros(2)), label_ids=labels))
    assert tupled == pytest.approx(result)


def test_make_compute_metrics_trainer_padding_and_batch_mode():
    compute_metrics = make_compute_metrics(num_labels=3, ignore_index=None)
    # The Trainer pads concatenated batches with -100 in both predictions and labels; those pixels never count.
    preds = np.full((2, 3, 5), -100)
    labels = np.full((2, 3, 5), -100)
    preds[0, :, :4], labels[0, :, :4] = PREDICTIONS, np.where(REFERENCES == 255, 2, REFERENCES)
    preds[1, :, :4], labels[1, :, :4] = PREDICTIONS, np.where(REFERENCES == 255, 2, REFERENCES)
    result = compute_metrics(EvalPrediction(predictions=preds, label_ids=labels))
    assert result["overall_accuracy"] == pytest.approx(9 / 12)  # the formerly ignored pixel (2 vs 2) now counts
    padded_255 = make_compute_metrics(num_labels=3)(EvalPrediction(predictions=preds, label_ids=labels))
    assert padded_255["overall_accuracy"] == pytest.approx(9 / 12)

    # batch_eval_metrics=True: tensors, accumulated until compute_result=True, then reset.
    batch_fn = make_compute_metrics(num_labels=3)
    one = (torch.from_numpy(PREDICTIONS[None]), torch.from_numpy(REFERENCES[None]))
    assert batch_fn(EvalPrediction(*one), compute_result=False) == {}
    logits = torch.from_numpy(_block_logits(PREDICTIONS[None], 3))
    final = batch_fn(EvalPrediction(logits, one[1]), compute_result=True)
    assert final["overall_accuracy"] == pytest.approx(16 / 22)
    assert final["mean_iou"] == pytest.approx(7 / 12)  # doubling every count leaves the ratios unchanged
    again = batch_fn(EvalPrediction(*one), compute_result=True)
    assert again["overall_accuracy"] == pytest.approx(8 / 11)
    with pytest.raises(ValueError, match=r"`eval_pred.label_ids` is None"):
        batch_fn(EvalPrediction(predictions=preds, label_ids=None))


# --------------------------------------------------------------------------- evaluate module


_EVALUATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import evaluate
    import peft_vision_ext.metrics as metrics

    preds = [np.array(p) for p in json.loads(sys.argv[1])]
    refs = [np.array(r) for r in json.loads(sys.argv[2])]
    out = {}
    metric = evaluate.load(metrics.SEGMENTATION_METRIC_PATH)
    out["name"] = type(metric).__name__
    out["one_shot"] = metric.compute(predictions=preds, references=refs, num_labels=4, id2label={0: "a", 1: "b"})

    # Streaming through add/add_batch (torch tensors, a stacked batch), via the helper.
    import torch
    metric = metrics.load_segmentation_metric(keep_in_memory=True)
    metric.add(prediction=torch.from_numpy(preds[0]), reference=torch.from_numpy(refs[0]))
    metric.add_batch(predictions=preds[1:], references=refs[1:])
    metric.add_batch(predictions=np.stack([preds[0]] * 2), references=np.stack([refs[0]] * 2))
    out["streamed"] = metric.compute(num_labels=4)
    # Ids above 255 and a negative ignore value survive the image encoding (stored as uint16 / int32).
    out["wide"] = metric.compute(
        predictions=[np.array([[300, 2], [0, 1]]), np.array([[7]])],
        references=[np.array([[300, 1], [-100, 1]]), np.array([[7]])],
        num_labels=301,
        ignore_index=-100,
    )["overall_accuracy"]
    try:
        metric.add_batch(predictions=preds[0], references=refs[0])
    except ValueError as err:
        out["error"] = str(err)
    print("RESULT" + json.dumps(out))
    """
)


def test_evaluate_module_loads_offline_and_matches_functions(tmp_path: Path):
    rng = np.random.default_rng(7)
    preds = [rng.integers(0, 4, size=shape) for shape in [(5, 7), (9, 3), (4, 4)]]
    refs = [np.where(rng.random(p.shape) < 0.2, 255, rng.integers(0, 3, size=p.shape)) for p in preds]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # keep evaluate's module and data caches out of the user's home
        "HF_ENDPOINT": "http://127.0.0.1:9",  # any attempted download fails at once instead of reaching out
    }
    args = [json.dumps([p.tolist() for p in preds]), json.dumps([r.tolist() for r in refs])]
    proc = subprocess.run(
        [sys.executable, "-c", _EVALUATE_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])

    assert out["name"] == "SegmentationMetrics"
    assert Path(SEGMENTATION_METRIC_PATH).is_absolute()
    expected = compute_segmentation_metrics(preds, refs, num_labels=4, id2label={0: "a", 1: "b"})
    assert_metrics_equal(out["one_shot"], expected)
    assert math.isnan(out["one_shot"]["accuracy_3"])  # class 3 is predicted but never a reference
    streamed = compute_segmentation_metrics(preds + [preds[0]] * 2, refs + [refs[0]] * 2, num_labels=4)
    assert_metrics_equal(out["streamed"], streamed)
    assert out["wide"] == pytest.approx(3 / 4)  # 4 counted pixels, (2 vs 1) is the only miss
    assert "`predictions` must be a batch of 2-D masks" in out["error"]

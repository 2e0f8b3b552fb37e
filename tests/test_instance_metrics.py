# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Tests for peft_vision_ext.metrics.instance: hand-derived COCO mask AP values, post-processing, evaluation loop."""

from __future__ import annotations

import contextlib
import io
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peft_vision_ext.metrics import CocoMaskAP, evaluate_instance_segmentation, post_process_instance_predictions


ID2LABEL = {0: "rock", 1: "boulder"}
SIZE = 32  # every object below is smaller than 32² pixels: COCO's "small" range; medium/large stay undefined (-1)


def square(top: int, left: int, height: int, width: int | None = None, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + (height if width is None else width)] = True
    return mask


def prediction(masks: list[np.ndarray], scores: list[float], labels: list[int]) -> dict[str, np.ndarray]:
    return {
        "masks": np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), dtype=bool),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def metric_of(*images: tuple[dict, list[np.ndarray], list[int]], **kwargs) -> CocoMaskAP:
    metric = CocoMaskAP(ID2LABEL, **kwargs)
    for pred, gt_masks, gt_labels in images:
        metric.add(pred, np.stack(gt_masks), np.asarray(gt_labels))
    return metric


def approx(value: float):
    """pycocotools computes precision as tp / (tp + fp + eps), so a perfect AP is 1 - 1e-16, not exactly 1."""
    return pytest.approx(value, abs=1e-9)


# ----------------------------------------------------------------------------------------------------- CocoMaskAP


def test_perfect_predictions():
    gt = [square(2, 2, 10), square(16, 12, 12)]
    result = metric_of((prediction(gt, [1.0, 1.0], [0, 1]), gt, [0, 1])).compute()
    assert result["map"] == approx(1.0)
    assert result["map_50"] == approx(1.0)
    assert result["map_75"] == approx(1.0)
    assert result["map_small"] == approx(1.0)
    assert result["mar_1"] == result["mar_10"] == result["mar_100"] == 1.0
    # No ground truth in these area ranges: pycocotools' "undefined" -1 is kept.
    assert result["map_medium"] == result["map_large"] == result["mar_large"] == -1.0
    assert result["map_per_class"] == {"rock": approx(1.0), "boulder": approx(1.0)}
    assert (result["num_images"], result["num_predictions"], result["num_targets"]) == (1, 2, 2)
    assert all(
        isinstance(value, float)
        for key, value in result.items()
        if key.startswith(("map", "mar_")) and key != "map_per_class"
    )


def test_iou_of_exactly_0_6():
    gt = square(4, 4, 10)  # 100 pixels
    pred = square(4, 4, 10, 6)  # the first 6 of its 10 columns: intersection 60, union 100, IoU 0.6
    result = metric_of((prediction([pred], [0.9], [0]), [gt], [0])).compute()
    assert result["map_50"] == approx(1.0)
    assert result["map_75"] == approx(0.0)
    # COCOeval matches when IoU >= threshold: 0.50, 0.55 and 0.60 of the 10 thresholds 0.50:0.05:0.95.
    assert result["map"] == approx(0.3)


def test_wrong_class_and_per_class_ap():
    gt = square(4, 4, 10)
    wrong = metric_of((prediction([gt], [1.0], [1]), [gt], [0])).compute()
    # "rock" has ground truth but no rock prediction: AP 0. "boulder" has no ground truth: undefined (-1), and its
    # detection is no false positive anywhere (COCO skips classes without ground truth).
    assert wrong["map_per_class"] == {"rock": 0.0, "boulder": -1.0}
    assert wrong["map"] == 0.0 and wrong["map_50"] == 0.0

    rock, boulder = square(2, 2, 10), square(16, 16, 10)
    boulder_pred = square(16, 16, 10, 6)  # IoU 0.6, as above: AP 0.3
    both = metric_of((prediction([rock, boulder_pred], [0.9, 0.8], [0, 1]), [rock, boulder], [0, 1])).compute()
    assert both["map_per_class"] == {"rock": approx(1.0), "boulder": approx(0.3)}
    assert both["map"] == approx((1.0 + 0.3) / 2)
    assert both["map_50"] == approx(1.0)
    assert both["map_75"] == approx(0.5)


def test_confident_false_positive_ranked_above_a_true_positive():
    a, b = square(2, 2, 8), square(20, 20, 8)
    nowhere = square(2, 20, 8)  # overlaps no ground truth
    result = metric_of(
        (prediction([a], [0.95], [0]), [a], [0]),
        (prediction([nowhere, b], [0.9, 0.8], [0, 0]), [b], [0]),
    ).compute()
    # Ranked over both images: TP (0.95), FP (0.9), TP (0.8); 2 ground-truth instances.
    #   recall    = [1/2, 1/2, 1]      precision = [1, 1/2, 2/3]
    # COCO makes precision non-increasing from the right: [1, 2/3, 2/3], then reads it at the 101 recall thresholds
    # 0, 0.01, ..., 1 (first detection whose recall >= threshold): thresholds 0 .. 0.50 (51 of them) get precision 1,
    # thresholds 0.51 .. 1 (50 of them) get 2/3.
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert result["map_50"] == approx(expected)
    assert result["map"] == approx(expected)  # every IoU here is 0 or 1, so all thresholds agree
    assert result["mar_100"] == 1.0


def test_max_detections_is_applied_per_image_and_class_and_named_mar_100():
    gt = square(4, 4, 8)
    decoys = [square(20, 20, 4)] * 10
    images = [(prediction([*decoys, gt], [0.9] * 10 + [0.1], [0] * 11), [gt], [0])]
    assert metric_of(*images).compute()["mar_100"] == 1.0
    capped = metric_of(*images, max_detections=10).compute()
    assert capped["mar_100"] == 0.0  # the true positive is the 11th detection
    assert capped["map"] == 0.0  # a real value, not pycocotools' -1 (see the next test)


def test_summary_matches_pycocotools_stats():
    rng = np.random.default_rng(0)
    metric = CocoMaskAP(ID2LABEL, max_detections=10)
    for _ in range(4):
        gt_masks, gt_labels, pred_masks, scores, labels = [], [], [], [], []
        for _ in range(3):
            top, left, side = rng.integers(0, 20), rng.integers(0, 20), rng.integers(4, 12)
            label = int(rng.integers(0, 2))
            gt_masks.append(square(top, left, side))
            gt_labels.append(label)
            pred_masks.append(square(top + rng.integers(0, 3), left + rng.integers(0, 3), side))
            scores.append(float(rng.random()))
            labels.append(label if rng.random() < 0.8 else 1 - label)
        metric.add(prediction(pred_masks, scores, labels), np.stack(gt_masks), np.asarray(gt_labels))
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    keys += ["mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]

    result = metric.compute()
    coco_eval = metric._coco_eval()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.summarize()
    # pycocotools' summarize() reads the overall AP at maxDets=100 whatever params.maxDets is: -1 here.
    assert coco_eval.stats[0] == -1 and 0 < result["map"] < 1
    np.testing.assert_allclose([result[key] for key in keys[1:]], coco_eval.stats[1:])

    metric.max_detections = 100
    result = metric.compute()
    coco_eval = metric._coco_eval()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.summarize()
    np.testing.assert_allclose([result[key] for key in keys], coco_eval.stats)


def test_verbose_prints_the_cocoeval_summary(capsys):
    gt = square(4, 4, 10)
    metric = metric_of((prediction([gt], [1.0], [0]), [gt], [0]))
    metric.compute()
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced by default
    metric.compute(verbose=True)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capsys.readouterr().out


def test_no_predictions_gives_zero():
    gt = square(4, 4, 10)
    result = metric_of((prediction([], [], []), [gt], [0])).compute()  # COCO.loadRes([]) itself would fail
    assert result["map"] == 0.0 and result["map_50"] == 0.0 and result["mar_100"] == 0.0
    assert result["map_per_class"] == {"rock": 0.0, "boulder": -1.0}
    assert result["num_predictions"] == 0


def test_no_ground_truth_raises():
    metric = CocoMaskAP(ID2LABEL)
    with pytest.raises(ValueError, match="No ground-truth instances in the 0 image"):
        metric.compute()
    empty = np.zeros((0, SIZE, SIZE), dtype=bool)
    metric.add(prediction([square(0, 0, 4)], [0.5], [0]), empty, np.zeros(0, dtype=np.int64))
    # An empty ground-truth mask is dropped (nothing could match it), so this image has no ground truth either.
    metric.add(prediction([], [], []), np.zeros((1, SIZE, SIZE)), np.array([1]))
    with pytest.raises(ValueError, match="AP is undefined"):
        metric.compute()


def test_labels_outside_id2label_raise():
    metric = CocoMaskAP(ID2LABEL)
    gt = square(4, 4, 10)
    with pytest.raises(ValueError, match=r"target_labels.*\[2\].*valid ids are \[0, 1\]"):
        metric.add(prediction([gt], [1.0], [0]), gt[None], np.array([2]))
    with pytest.raises(ValueError, match=r"predictions\['labels'\].*\[-1\]"):
        metric.add(prediction([gt], [1.0], [-1]), gt[None], np.array([0]))
    with pytest.raises(TypeError, match="integer class ids"):
        metric.add(prediction([gt], [1.0], [0]), gt[None], np.array([0.0]))
    assert metric.num_images == 0


def test_mask_size_mismatch_raises():
    metric = CocoMaskAP(ID2LABEL)
    with pytest.raises(ValueError, match=r"\(1, 32, 32\).*\(1, 16, 16\)"):
        metric.add(prediction([square(0, 0, 4)], [1.0], [0]), square(0, 0, 4, size=16)[None], np.array([0]))


def test_other_bad_inputs_raise():
    gt = square(4, 4, 10)
    with pytest.raises(ValueError, match="max_detections"):
        CocoMaskAP(ID2LABEL, max_detections=5)
    with pytest.raises(TypeError, match="id2label"):
        CocoMaskAP(["rock", "boulder"])
    with pytest.raises(ValueError, match="same name"):
        CocoMaskAP({0: "rock", 1: "rock"})
    metric = CocoMaskAP({"0": "rock", "1": "boulder"})  # JSON-style keys are fine
    with pytest.raises(ValueError, match="binary"):
        metric.add(prediction([gt], [1.0], [0]), gt[None] * 0.7, np.array([0]))
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        metric.add(prediction([gt], [1.0], [0]), gt, np.array([0]))
    with pytest.raises(ValueError, match="lacks the keys \\['scores'\\]"):
        metric.add({"masks": gt[None], "labels": np.array([0])}, gt[None], np.array([0]))
    with pytest.raises(ValueError, match="finite"):
        metric.add(prediction([gt], [math.nan], [0]), gt[None], np.array([0]))
    with pytest.raises(ValueError, match="same number of images, got 1, 2 and 1"):
        metric.update([prediction([gt], [1.0], [0])], [gt[None]] * 2, [np.array([0])])
    with pytest.raises(ValueError, match="lacks the keys"):
        metric.add_encoded({"height": 32})
    assert metric.num_images == 0


def test_update_accepts_torch_batches_and_reset():
    gt = torch.from_numpy(np.stack([square(2, 2, 10), square(16, 16, 10)]))
    pred = {"masks": gt.clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    metric = CocoMaskAP(ID2LABEL)
    metric.update([pred, pred], [gt.float(), gt.float()], [torch.tensor([0, 1])] * 2)
    assert metric.num_images == 2
    assert metric.compute()["map"] == approx(1.0)
    metric.reset()
    assert metric.num_images == 0


def test_encoded_records_round_trip():
    rng = np.random.default_rng(1)
    images = []
    for _ in range(6):
        sides = rng.integers(4, 10, size=2)
        gt = [square(2, 2, sides[0]), square(16, 16, sides[1])]
        pred = [square(2 + rng.integers(0, 3), 2, sides[0]), square(16, 16 + rng.integers(0, 3), sides[1])]
        images.append((prediction(pred, rng.random(2).tolist(), [0, 1]), gt, [0, 1]))
    whole = metric_of(*images).compute()

    first, second = metric_of(*images[:3]), metric_of(*images[3:])
    # Records travel between processes pickled (accelerate's gather_object).
    gathered = pickle.loads(pickle.dumps(first.encoded_records() + second.encoded_records()))
    merged = CocoMaskAP(ID2LABEL)
    for record in gathered:
        merged.add_encoded(record)
    assert merged.num_images == 6
    assert merged.compute() == whole
    assert 0 < whole["map"] < 1


# ---------------------------------------------------------------------------------------------- post-processing


def test_post_process_shapes_order_and_top_k():
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(2, 5, 4, generator=generator, requires_grad=True)  # Q = 5, K = 3
    mask_logits = torch.randn(2, 5, 8, 8, generator=generator, requires_grad=True)
    results = post_process_instance_predictions(class_logits, mask_logits, (32, 24), top_k=7)
    assert len(results) == 2
    for result in results:
        assert result["masks"].shape == (7, 32, 24) and result["masks"].dtype == torch.bool
        assert result["scores"].shape == (7,) and result["scores"].dtype == torch.float32
        assert result["labels"].shape == (7,) and result["labels"].dtype == torch.int64
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])
        assert result["labels"].min() >= 0 and result["labels"].max() < 3
        assert not result["scores"].requires_grad and result["scores"].grad_fn is None
    capped = post_process_instance_predictions(class_logits, mask_logits, (32, 24))  # top_k=100 > Q * K = 15
    assert [len(result["scores"]) for result in capped] == [15, 15]


def test_post_process_known_square_and_score():
    # Q = 3 queries, K = 2 classes (+ "no object"); masks at 1/4 of the 32 x 32 target.
    class_logits = torch.tensor([[[0.0, 3.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]])
    mask_logits = torch.full((1, 3, 8, 8), -615.0)
    # Query 0 is positive on low-res cells rows 2..4, cols 1..3, i.e. full-res rows 8..19, cols 4..15. Bilinear x4
    # upsampling (align_corners=False) puts the pixels next to a cell border at weights 0.625 / 0.375: the first pixel
    # outside gets 0.375 * 1000 - 0.625 * 615 < 0 and a corner pixel inside 0.625² * 1000 - (1 - 0.625²) * 615 > 0,
    # so the binary mask is exactly the square; every pixel in it has a logit > 15, i.e. a probability of ~1.
    mask_logits[0, 0, 2:5, 1:4] = 1000.0
    result = post_process_instance_predictions(class_logits, mask_logits, (32, 32))[0]
    assert len(result["scores"]) == 6  # all Q * K (query, class) pairs
    assert result["labels"][0] == 1
    assert torch.equal(result["masks"][0], torch.from_numpy(square(8, 4, 12)))
    # softmax([0, 3, 0])[1] times a mean mask probability of 1.
    assert result["scores"][0].item() == pytest.approx(math.exp(3) / (math.exp(3) + 2), abs=1e-6)
    # Queries 1 and 2 have empty masks: score 0.
    assert result["masks"][2:].sum() == 0 and torch.all(result["scores"][2:] == 0)

    # At full resolution (no resampling), logits +-ln(3) give probabilities 0.75 inside and 0.25 outside the square:
    # the mask score is 0.75, the class probability softmax([2, 0, 0])[0].
    mask_logits = torch.full((1, 1, SIZE, SIZE), -math.log(3))
    mask_logits[0, 0, 4:14, 6:20] = math.log(3)
    result = post_process_instance_predictions(torch.tensor([[[2.0, 0.0, 0.0]]]), mask_logits, (SIZE, SIZE))[0]
    assert torch.equal(result["masks"][0], torch.from_numpy(square(4, 6, 10, 14)))
    assert result["labels"].tolist() == [0, 1]
    assert result["scores"][0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 2) * 0.75, rel=1e-6)
    assert result["scores"][1].item() == pytest.approx(1 / (math.exp(2) + 2) * 0.75, rel=1e-6)


def test_post_process_bad_inputs_raise():
    class_logits, mask_logits = torch.zeros(1, 3, 3), torch.zeros(1, 3, 8, 8)
    with pytest.raises(TypeError, match="class_queries_logits"):
        post_process_instance_predictions(class_logits.numpy(), mask_logits, (32, 32))
    with pytest.raises(ValueError, match=r"masks_queries_logits.*\(B, Q, h, w\)"):
        post_process_instance_predictions(class_logits, mask_logits[0], (32, 32))
    with pytest.raises(ValueError, match="number of queries"):
        post_process_instance_predictions(class_logits, torch.zeros(1, 4, 8, 8), (32, 32))
    with pytest.raises(ValueError, match="target_size"):
        post_process_instance_predictions(class_logits, mask_logits, 32)
    with pytest.raises(ValueError, match="top_k"):
        post_process_instance_predictions(class_logits, mask_logits, (32, 32), top_k=0)
    with pytest.raises(ValueError, match="mask_threshold"):
        post_process_instance_predictions(class_logits, mask_logits, (32, 32), mask_threshold=1.5)


# ------------------------------------------------------------------------------------------- evaluation loop


class PerfectInstanceModel(torch.nn.Module):
    """Fake Mask2Former: query c predicts class c and the mask drawn in input channel c (grid-aligned squares)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.seen_training = []

    def forward(self, pixel_values):
        self.seen_training.append(self.training)
        # Mask logits at 1/4 resolution that upsample to exactly the input squares (see the post-process test).
        low = F.avg_pool2d(pixel_values[:, :2], 4)
        masks = torch.where(low > 0.5, 1000.0, -615.0) * self.scale
        class_logits = torch.tensor([[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0]]).expand(len(pixel_values), 2, 3)
        return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=masks)


class SemanticModel(torch.nn.Module):
    """A semantic segmentation model: its output has `logits` only."""

    def forward(self, pixel_values):
        return SimpleNamespace(logits=pixel_values)


def instance_batches():
    """Two batches (2 images + 1) of 32 x 32 images with one rock and (except the last image) one boulder."""
    layouts = [[(0, 4, 8, 0), (16, 16, 12, 1)], [(8, 8, 4, 0), (20, 4, 8, 1)], [(12, 12, 16, 0)]]
    images = []
    for layout in layouts:
        pixel_values = torch.zeros(3, SIZE, SIZE)
        masks = []
        for top, left, side, label in layout:
            pixel_values[label, top : top + side, left : left + side] = 1.0
            masks.append(torch.from_numpy(square(top, left, side)).float())
        images.append((pixel_values, torch.stack(masks), torch.tensor([label for *_, label in layout])))
    return [
        {
            "pixel_values": torch.stack([image[0] for image in chunk]),
            "mask_labels": [image[1] for image in chunk],
            "class_labels": [image[2] for image in chunk],
        }
        for chunk in (images[:2], images[2:])
    ]


def test_evaluate_instance_segmentation_perfect_model():
    model = PerfectInstanceModel().train()
    result = evaluate_instance_segmentation(model, instance_batches(), ID2LABEL)
    assert result["map"] == approx(1.0) and result["map_50"] == approx(1.0)
    assert result["map_per_class"] == {"rock": approx(1.0), "boulder": approx(1.0)}
    assert (result["num_images"], result["num_targets"]) == (3, 5)
    assert result["num_predictions"] == 3 * 4  # top_k capped at Q * K = 4 per image
    assert model.seen_training == [False, False] and model.training  # evaluated in eval mode, mode restored


def test_evaluate_instance_segmentation_gather():
    calls = []

    def gather(records):
        calls.append(len(records))
        return records + pickle.loads(pickle.dumps(records))  # as if a second process had the same images

    result = evaluate_instance_segmentation(PerfectInstanceModel(), instance_batches(), ID2LABEL, gather=gather)
    assert calls == [2, 1]  # once per batch (so accelerate's gather_for_metrics can drop the last batch's padding)
    # Six distinct image ids: had the copies shared ids, each ground truth would have a duplicate false positive.
    assert (result["num_images"], result["num_targets"]) == (6, 10)
    assert result["map"] == approx(1.0)


def test_evaluate_instance_segmentation_bad_inputs_raise():
    batch = instance_batches()[0]
    no_labels = {key: value for key, value in batch.items() if key != "class_labels"}
    with pytest.raises(ValueError, match=r"lacks the keys \['class_labels'\]"):
        evaluate_instance_segmentation(PerfectInstanceModel(), [no_labels], ID2LABEL)
    with pytest.raises(TypeError, match="no `class_queries_logits`"):
        evaluate_instance_segmentation(SemanticModel(), [batch], ID2LABEL)
    with pytest.raises(TypeError, match="gather"):
        evaluate_instance_segmentation(PerfectInstanceModel(), [batch], ID2LABEL, gather=lambda records: None)

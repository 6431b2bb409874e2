"""Metrics against hand-computed values and against a literal port of panopticapi's PQ loop."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from hf_detr_seg.errors import DataError
from hf_detr_seg.testing import random_panoptic_pair, write_panoptic_folder
from hf_detr_seg.metrics import (
    BoxMAP,
    PanopticQuality,
    SemanticScores,
    box_map,
    pq_compute_folders,
)
from hf_detr_seg.metrics.segment_ids import segment_positions

CATEGORIES = {
    1: {"name": "crack", "isthing": 1},
    2: {"name": "spalling", "isthing": 1},
    3: {"name": "background", "isthing": 0},
    4: {"name": "efflorescence", "isthing": 0},
}


def seg(segment_id: int, category_id: int, iscrowd: int = 0) -> dict:
    return {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd}


def pq_of(*images) -> dict:
    """PQ over images given as (gt_ids, gt_segments, pred_ids, pred_segments)."""
    metric = PanopticQuality(CATEGORIES)
    for image in images:
        metric.update(*image)
    return metric.compute()


def cols(start: int, stop: int, value: int, base: np.ndarray | None = None, size: int = 10) -> np.ndarray:
    """A size x size id map (or a copy of `base`) with columns start..stop-1 set to `value`."""
    out = np.zeros((size, size), dtype=np.int64) if base is None else base.copy()
    out[:, start:stop] = value
    return out


# ============================================================================ PQ, hand-computed
def test_perfect_match():
    gt = cols(0, 4, 1, cols(4, 10, 2))
    result = pq_of((gt, [seg(1, 1), seg(2, 3)], gt, [seg(1, 1), seg(2, 3)]))
    assert result["pq"] == result["sq"] == result["rq"] == 1.0
    assert result["n"] == 2 and result["n_things"] == 1 and result["n_stuff"] == 1
    assert result["per_class"]["crack"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_iou_exactly_half_is_not_a_match_and_just_above_is():
    gt = cols(0, 10, 1)  # one crack segment, 100 px
    pred = cols(0, 5, 7, cols(5, 10, 8))  # 7: crack on the left half (IoU 50/100), 8: efflorescence
    result = pq_of((gt, [seg(1, 1)], pred, [seg(7, 1), seg(8, 4)]))
    crack = result["per_class"]["crack"]
    assert (crack["tp"], crack["fp"], crack["fn"]) == (0, 1, 1)
    # efflorescence is absent from gt but predicted: FP, PQ 0, and counted in n
    assert result["per_class"]["efflorescence"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 0}
    assert result["pq"] == 0.0 and result["n"] == 2
    # one more pixel: IoU 51/100 > 0.5 is a match
    pred[0, 5] = 7
    result = pq_of((gt, [seg(1, 1)], pred, [seg(7, 1), seg(8, 4)]))
    assert result["per_class"]["crack"]["tp"] == 1
    assert result["per_class"]["crack"]["sq"] == pytest.approx(0.51)


def test_void_pixels_leave_the_union():
    gt = cols(0, 4, 1)  # crack on columns 0..3 (40 px), the rest void
    pred = cols(1, 10, 5)  # 90 px: 30 on the crack, 60 on void
    result = pq_of((gt, [seg(1, 1)], pred, [seg(5, 1)]))
    # union = 90 + 40 - 30 - 60 = 40 -> IoU 0.75 (0.3 if void pixels stayed in the union)
    assert result["per_class"]["crack"]["tp"] == 1
    assert result["pq"] == pytest.approx(0.75) and result["sq"] == pytest.approx(0.75)
    assert result["rq"] == 1.0


@pytest.mark.parametrize(
    "pred_cols, is_fp",
    [((3, 10), False), ((0, 10), True), ((0, 8), True)],  # 50/70 on void; exactly 50/100; 30/80
)
def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive(pred_cols, is_fp):
    gt = cols(0, 5, 1)  # crack on columns 0..4, void on 5..9
    pred = cols(*pred_cols, 3)  # a spalling prediction: no spalling in gt
    result = pq_of((gt, [seg(1, 1)], pred, [seg(3, 2)]))
    assert result["per_class"]["crack"]["fn"] == 1
    assert result["per_class"]["spalling"]["fp"] == int(is_fp)
    assert result["n"] == (2 if is_fp else 1)


def test_crowd_regions():
    gt = cols(0, 5, 1, cols(5, 10, 2))  # 1: crowd of cracks, 2: one crack
    pred = cols(0, 4, 11, cols(4, 5, 12, cols(5, 10, 10)))
    gt_segments = [seg(1, 1, iscrowd=1), seg(2, 1)]
    # 10 matches crack 2; 11 lies on the crack crowd (IoU 0.8 with it, yet crowds are never matched) and is
    # ignored; 12 is spalling on the crack crowd: a crowd of another category does not excuse it
    result = pq_of((gt, gt_segments, pred, [seg(10, 1), seg(11, 1), seg(12, 2)]))
    crack, spalling = result["per_class"]["crack"], result["per_class"]["spalling"]
    assert (crack["tp"], crack["fp"], crack["fn"]) == (1, 0, 0)  # the unmatched crowd is no FN
    assert (spalling["tp"], spalling["fp"], spalling["fn"]) == (0, 1, 0)
    assert result["pq"] == pytest.approx(0.5) and result["n"] == 2


def test_void_and_crowd_together_excuse_a_prediction():
    gt = cols(3, 6, 1, cols(6, 10, 2))  # void 0..2, crack crowd 3..5, crack 6..9
    pred = cols(1, 7, 5)  # 60 px: 20 void + 30 crowd + 10 on crack 2 -> 50/60 ignored
    result = pq_of((gt, [seg(1, 1, iscrowd=1), seg(2, 1)], pred, [seg(5, 1)]))
    crack = result["per_class"]["crack"]
    assert (crack["tp"], crack["fp"], crack["fn"]) == (0, 0, 1)


def test_classes_in_neither_are_excluded_and_things_stuff_split():
    gt = np.zeros((10, 10), dtype=np.int64)
    gt[:5], gt[5:] = 1, 2  # crack rows 0..4, background rows 5..9
    pred = np.zeros_like(gt)
    pred[:4], pred[4:] = 1, 2  # crack rows 0..3 (IoU 40/50), efflorescence rows 4..9
    result = pq_of((gt, [seg(1, 1), seg(2, 3)], pred, [seg(1, 1), seg(2, 4)]))
    # spalling is in neither: left out of n; crack TP (0.8), background FN, efflorescence FP
    assert result["n"] == 3 and result["n_things"] == 1 and result["n_stuff"] == 2
    assert result["pq_things"] == pytest.approx(0.8) and result["rq_things"] == 1.0
    assert result["pq_stuff"] == 0.0 and result["sq_stuff"] == 0.0
    assert result["pq"] == pytest.approx(0.8 / 3) and result["rq"] == pytest.approx(1 / 3)
    assert result["per_class"]["spalling"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}


def test_accumulates_over_images_and_resets():
    gt = cols(0, 10, 1)
    metric = PanopticQuality(CATEGORIES)
    metric.update(gt, [seg(1, 1)], gt, [seg(1, 1)])
    metric.update(gt, [seg(1, 1)], cols(0, 3, 4), [seg(4, 1)])  # IoU 0.3: FN + FP
    crack = metric.compute()["per_class"]["crack"]
    assert (crack["tp"], crack["fp"], crack["fn"]) == (1, 1, 1)
    assert crack["pq"] == pytest.approx(1 / 2)
    metric.reset()
    assert metric.compute()["n"] == 0 and metric.compute()["pq"] == 0.0


def test_image_without_gt_segments():
    """All void in gt: a prediction there lies on void (no FP); one of several images may have no gt at all."""
    void = np.zeros((10, 10), dtype=np.int64)
    result = pq_of((void, [], cols(0, 6, 3), [seg(3, 2)]), (cols(0, 10, 1), [seg(1, 1)], cols(0, 10, 1), [seg(1, 1)]))
    assert result["per_class"]["spalling"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}
    assert result["pq"] == 1.0 and result["n"] == 1


def test_inconsistent_segments_are_data_errors():
    gt = cols(0, 5, 1)
    with pytest.raises(DataError, match="pred.png.*in the PNG/id map but not in segments_info"):
        pq_of_named(gt, [seg(1, 1)], cols(0, 5, 3), [seg(4, 1)])
    with pytest.raises(DataError, match=r"pred.png.*\[4\] are in segments_info but not in the PNG"):
        pq_of_named(gt, [seg(1, 1)], cols(0, 5, 3), [seg(3, 1), seg(4, 1)])
    with pytest.raises(DataError, match="unknown category_id"):
        pq_of_named(gt, [seg(1, 1)], cols(0, 5, 3), [seg(3, 99)])


def pq_of_named(gt, gt_segments, pred, pred_segments):
    PanopticQuality(CATEGORIES).update(gt, gt_segments, pred, pred_segments, pred_name="pred.png")


# ============================================================================ PQ, against panopticapi's loop
def reference_pq(pairs: list[tuple], categories: dict) -> dict:
    """panopticapi's `pq_compute_single_core` + `pq_average`, followed literally (dicts, one image at a time)."""
    offset, void = 256 * 256 * 256, 0
    pq_stat = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    for pan_gt, gt_segments, pan_pred, pred_segments in pairs:
        gt_segms = {el["id"]: dict(el) for el in gt_segments}
        pred_segms = {el["id"]: dict(el) for el in pred_segments}
        pred_labels_set = set(el["id"] for el in pred_segments)
        labels, labels_cnt = np.unique(pan_pred, return_counts=True)
        for label, label_cnt in zip(labels, labels_cnt):
            if label not in pred_segms:
                if label == void:
                    continue
                raise KeyError(label)
            pred_segms[label]["area"] = label_cnt
            pred_labels_set.remove(label)
        assert not pred_labels_set
        pan_gt_pred = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
        gt_pred_map = {}
        labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
        for label, intersection in zip(labels, labels_cnt):
            gt_pred_map[(label // offset, label % offset)] = intersection
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - intersection
                - gt_pred_map.get((void, pred_label), 0)
            )
            iou = intersection / union
            if iou > 0.5:
                pq_stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
                pq_stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels_dict = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info["iscrowd"] == 1:
                crowd_labels_dict[gt_info["category_id"]] = gt_label
                continue
            pq_stat[gt_info["category_id"]]["fn"] += 1
        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((void, pred_label), 0)
            if pred_info["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
            if intersection / pred_info["area"] > 0.5:
                continue
            pq_stat[pred_info["category_id"]]["fp"] += 1

    results = {}
    for key, isthing in (("", None), ("_things", True), ("_stuff", False)):
        pq, sq, rq, n = 0, 0, 0, 0
        for label, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            s = pq_stat[label]
            if s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            n += 1
            pq += s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            sq += s["iou"] / s["tp"] if s["tp"] != 0 else 0
            rq += s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
        if n == 0:  # panopticapi divides by zero here; ours reports 0.0 with n = 0
            pq, sq, rq, n = 0.0, 0.0, 0.0, 0
        else:
            pq, sq, rq = pq / n, sq / n, rq / n
        results.update({f"pq{key}": pq, f"sq{key}": sq, f"rq{key}": rq, f"n{key}": n})
    results["counts"] = {
        info["name"]: (pq_stat[label]["tp"], pq_stat[label]["fp"], pq_stat[label]["fn"])
        for label, info in categories.items()
    }
    return results


def random_pair(rng: np.random.Generator, shape: tuple[int, int] = (40, 56)) -> tuple:
    return random_panoptic_pair(rng, CATEGORIES, shape)


def ours(pairs: list[tuple]) -> dict:
    metric = PanopticQuality(CATEGORIES)
    for pair in pairs:
        metric.update(*pair)
    return metric.compute()


def assert_same_as_reference(result: dict, reference: dict) -> None:
    for key, value in reference.items():
        if key == "counts":
            got = {name: (c["tp"], c["fp"], c["fn"]) for name, c in result["per_class"].items()}
            assert got == value
        else:
            assert result[key] == value, key  # identical, not approximately equal


def test_identical_to_panopticapi_loop_on_random_pairs():
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng) for _ in range(100)]  # enough that adding IoUs out of order changes a bit
    reference = reference_pq(pairs, CATEGORIES)
    assert_same_as_reference(ours(pairs), reference)
    counts = np.array(list(reference["counts"].values())).sum(axis=0)
    assert counts.min() >= 10  # the sample exercises TP, FP and FN alike
    for pair in pairs[:10]:  # and image by image, where nothing averages differences away
        assert_same_as_reference(ours([pair]), reference_pq([pair], CATEGORIES))


@pytest.mark.parametrize("num_listed", [1, 7, 60, 300])
def test_large_ids_map_to_segment_positions_as_a_dict_would(num_listed):
    """The hashed path for ids beyond the lookup table (colour-derived ids up to 2^24): listed ids get their
    position, void 0, and any other id (also one sharing a listed id's hash slot) the 'unlisted' position."""
    rng = np.random.default_rng(num_listed)
    listed = rng.choice(np.arange(1, 2**24), size=num_listed, replace=False)
    others = np.setdiff1d(rng.integers(1, 2**24, size=500), listed)
    ids = rng.choice(np.concatenate([listed, others, [0]]), size=(300, 300)).astype(np.uint32).ravel()
    assert int(ids.max()) > 4 * ids.size  # beyond the lookup table
    position_of = {int(i): k + 1 for k, i in enumerate(listed)}
    expected = np.array([0 if i == 0 else position_of.get(int(i), num_listed + 1) for i in ids])
    np.testing.assert_array_equal(segment_positions(ids, listed, stride=3), 3 * expected)


def test_folders_match_in_memory_and_pair_by_file_name(tmp_path):
    rng = np.random.default_rng(1)
    pairs = [random_pair(rng) for _ in range(12)]
    gt_json = write_panoptic_folder(tmp_path, "gt", pairs, 0, CATEGORIES)
    # Image ids differ between the two files: they must pair by file name.
    pred_json = write_panoptic_folder(tmp_path, "pred", pairs, 2, CATEGORIES, image_id_offset=1000)
    for workers in (1, 3):  # threads read and compare pairs; the sums are added in order either way
        result = pq_compute_folders(gt_json, None, pred_json, tmp_path / "pred", workers=workers)
        assert_same_as_reference(result, reference_pq(pairs, CATEGORIES))


def test_folders_name_the_inconsistent_png(tmp_path):
    rng = np.random.default_rng(2)
    pairs = [random_pair(rng) for _ in range(3)]
    gt_json = write_panoptic_folder(tmp_path, "gt", pairs, 0, CATEGORIES)
    pred_json = write_panoptic_folder(tmp_path, "pred", pairs, 2, CATEGORIES)
    data = json.loads(pred_json.read_text())
    data["annotations"][1]["segments_info"].append({"id": 99, "category_id": 1})
    pred_json.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"pred/img001.png: segment id\(s\) \[99\] are in segments_info"):
        pq_compute_folders(gt_json, tmp_path / "gt", pred_json, tmp_path / "pred")
    data["annotations"][1]["segments_info"] = data["annotations"][1]["segments_info"][1:-1]
    pred_json.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"pred/img001.png: segment id\(s\) .* in the PNG/id map but not"):
        pq_compute_folders(gt_json, tmp_path / "gt", pred_json, tmp_path / "pred")


def test_same_as_installed_panopticapi(tmp_path):
    """Third check against the real panopticapi (the Makefile installs `panopticapi-lite` with --no-deps)."""
    import panopticapi.evaluation as evaluation
    rng = np.random.default_rng(3)
    pairs = [random_pair(rng) for _ in range(30)]
    gt_json = write_panoptic_folder(tmp_path, "gt", pairs, 0, CATEGORIES)
    pred_json = write_panoptic_folder(tmp_path, "pred", pairs, 2, CATEGORIES)
    gt_data, pred_data = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    annotation_set = list(zip(gt_data["annotations"], pred_data["annotations"]))
    categories = {c["id"]: c for c in gt_data["categories"]}
    stat = evaluation.pq_compute_single_core(0, annotation_set, tmp_path / "gt", tmp_path / "pred", categories)
    result = pq_compute_folders(gt_json, tmp_path / "gt", pred_json, tmp_path / "pred")
    for key, isthing in (("", None), ("_things", True), ("_stuff", False)):
        expected, _ = stat.pq_average(categories, isthing=isthing)
        assert [result[f"{m}{key}"] for m in ("pq", "sq", "rq", "n")] == [expected[m] for m in ("pq", "sq", "rq", "n")]


def test_evaluate_metric_offline():
    from hf_detr_seg.metrics import PanopticQualityMetric

    rng = np.random.default_rng(4)
    pairs = [random_pair(rng, shape=(16, 20)) for _ in range(4)]
    metric = PanopticQualityMetric(categories=CATEGORIES)
    for gt, gt_segments, pred, pred_segments in pairs[:2]:  # predictions without iscrowd, gt with `area`
        metric.add(
            prediction={"id_map": pred, "segments": pred_segments},
            reference={"id_map": gt, "segments": gt_segments},
        )
    metric.add_batch(
        predictions=[{"id_map": torch.from_numpy(p[2]), "segments": p[3]} for p in pairs[2:]],
        references=[{"id_map": p[0], "segments": p[1]} for p in pairs[2:]],
    )
    assert metric.compute() == ours(pairs)


# ============================================================================ box mAP
def test_box_map_perfect_and_shifted():
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0], [200, 200, 240, 260]]), "labels": torch.tensor([0, 1])}
    perfect = dict(target, scores=torch.tensor([0.9, 0.8]))
    result = box_map([perfect], [target])
    assert result["bbox_map"] == pytest.approx(1.0) and result["bbox_map_50"] == pytest.approx(1.0)
    # first box shifted by 25 px: IoU 7500 / 12500 = 0.6, a TP at thresholds 0.50, 0.55 and 0.60 (COCOeval
    # matches at IoU >= threshold) and a miss at the 7 higher ones, so its class AP is 3/10
    shifted = {"boxes": np.array([[25.0, 0, 125, 100], [200, 200, 240, 260]]), "scores": [0.9, 0.8], "labels": [0, 1]}
    result = box_map([shifted], [target])
    assert result["bbox_map_50"] == pytest.approx(1.0)
    assert result["bbox_map"] == pytest.approx((0.3 + 1.0) / 2)


def test_box_map_accumulator_edge_cases():
    metric = BoxMAP()
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=int)}
    metric.update(empty, empty)
    assert metric.compute() == {"bbox_map": -1.0, "bbox_map_50": -1.0}  # nothing to find: undefined
    metric.update(empty, {"boxes": [[0, 0, 10, 10]], "labels": [0]})
    assert metric.compute() == {"bbox_map": 0.0, "bbox_map_50": 0.0}
    metric.reset()
    assert metric.num_images == 0


# ============================================================================ semantic IoU, pixel F1
# 5x5, classes 0 background, 1 crack; -1 void. The predicted crack is the gt crack shifted one column right
# (rows 0..2), plus a far pixel at (4, 4) and a pixel on void at (3, 0), which counts nowhere.
GT = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [-1, -1, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)
PRED = np.array(
    [
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1],
    ]
)


def scores(tolerance: float, *pairs) -> dict:
    metric = SemanticScores(3, thing_classes=[1], tolerance=tolerance, class_names=["background", "crack", "spall"])
    for gt, pred in pairs or ((GT, PRED),):
        metric.update(gt, pred)
    return metric.compute()


def test_semantic_iou_ignores_void_and_absent_classes():
    result = scores(0)
    # 23 valid pixels; crack: 4 gt, 4 predicted, 0 shared; background: 19 gt, 19 predicted, 15 shared
    assert result["per_class"]["crack"]["iou"] == 0.0
    assert result["per_class"]["background"]["iou"] == pytest.approx(15 / 23)
    assert "spall" not in result["per_class"]  # in neither gt nor prediction: not in the mean
    assert result["miou"] == pytest.approx(15 / 23 / 2)
    assert result["per_class"]["crack"]["pred_pixels"] == 4  # the pixel on void is not counted


@pytest.mark.parametrize(
    "tolerance, precision, recall",
    [
        (0, 0.0, 0.0),
        (1, 3 / 4, 3 / 4),  # (3, 2) is sqrt(2) from the nearest predicted pixel; (4, 4) is sqrt(5) from gt
        (2, 3 / 4, 1.0),
    ],
)
def test_crack_f1_with_tolerance(tolerance, precision, recall):
    crack = scores(tolerance)["per_class"]["crack"]
    assert crack["precision"] == pytest.approx(precision)
    assert crack["recall"] == pytest.approx(recall)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert crack["f1"] == pytest.approx(f1)


def test_crack_f1_is_pooled_over_pixels_not_averaged_over_images():
    dot = np.zeros((3, 3), dtype=int)
    dot[1, 1] = 1
    result = scores(0, (GT, PRED), (dot, dot))  # images of different sizes
    # pooled: 1 hit of 5 predicted, 1 found of 5 gt (a mean of per-image F1 would give 0.5)
    assert result["precision"] == pytest.approx(1 / 5)
    assert result["recall"] == pytest.approx(1 / 5)
    assert result["f1"] == pytest.approx(1 / 5)


def test_no_prediction_value_is_a_miss():
    gt = np.array([[1, 1], [0, 0]])
    pred = np.array([[-1, 1], [0, -1]])
    result = scores(0, (gt, pred))
    assert result["per_class"]["crack"]["recall"] == 0.5 and result["per_class"]["crack"]["precision"] == 1.0
    assert result["per_class"]["background"]["iou"] == 0.5

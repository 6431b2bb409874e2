"""Measuring a whole prediction: each segment by its class's role, stuff cracks split into connected cracks,
and the estimators' fidelity on cracks drawn with OpenCV through the id map -> segments -> measure path."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from test_quantify import straight_crack

from hf_detr_seg.data.instances import segments_from_class_map
from hf_detr_seg.data.masks import VOID
from hf_detr_seg.errors import UserInputError
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.quantify import crack_metrics
from hf_detr_seg.segment_measures import crack_masks, measure_segments

SUPERSAMPLE = 8


def label_map(crack_is_thing: bool = True, measure: str = "crack", merge_distance: float = 0) -> LabelMap:
    return LabelMap.from_dict({"mask_format": "indexed", "instances": {"merge_distance": merge_distance}, "classes": [
        {"name": "Riss", "isthing": crack_is_thing, "value": 1, "measure": measure},
        {"name": "spalling", "isthing": True, "value": 2},
        {"name": "efflorescence", "isthing": True, "value": 3},
        {"name": "surface", "isthing": False, "background": True, "value": 0}]})


def polyline_crack(points: np.ndarray, width: int, size: int = 200) -> np.ndarray:
    """A crack `width` px wide along `points` (x, y; pixel centres at integers), drawn with OpenCV.

    OpenCV's `thickness` is not the width it draws (thickness 3 paints a line 5 px thick), so the line is drawn
    8x larger, where that excess is 1/8 px, and brought back by area: a pixel is crack when the line covers
    at least half of it.
    """
    big = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.uint8)
    corners = np.round((points + 0.5) * SUPERSAMPLE - 0.5).astype(np.int32)
    cv2.polylines(big, [corners.reshape(-1, 1, 2)], False, 255, thickness=width * SUPERSAMPLE)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA) >= 128


def polyline_length(points: np.ndarray) -> float:
    return float(np.sum(np.hypot(*np.diff(points, axis=0).T)))


ARC = np.linspace(0, 0.8 * math.pi, 60)
WAVE = np.linspace(20, 180, 80)
SHAPES = {
    "horizontal": np.array([[20, 100.3], [180, 100.3]]),
    "30deg": np.array([[20, 40], [170, 40 + 150 * math.tan(math.radians(30))]]),
    "45deg": np.array([[20, 20], [170, 170]]),
    "arc": np.stack([100 + 70 * np.cos(ARC), 100 + 70 * np.sin(ARC)], 1),
    "wave": np.stack([WAVE, 100 + 25 * np.sin(WAVE / 20)], 1),
}


@pytest.mark.parametrize("crack_is_thing", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_drawn_cracks_of_width_1_to_8_measure_through_the_segments(shape: str, crack_is_thing: bool) -> None:
    labels = label_map(crack_is_thing)
    points = SHAPES[shape]
    for width in range(1, 9):
        class_map = np.where(polyline_crack(points, width), 0, VOID)
        panoptic = segments_from_class_map(class_map, labels)
        segments = [{"id": s.id, "label_id": s.class_index} for s in panoptic.segments]
        [measured] = measure_segments(panoptic.id_map, segments, labels)
        [crack] = measured["cracks"] if not crack_is_thing else [measured]
        assert abs(crack["mean_width"] - width) <= 1.0, (width, crack)
        assert 0.85 <= crack["length"] / polyline_length(points) <= 1.15, (width, crack)


def test_a_stuff_crack_segment_gives_a_row_per_connected_crack() -> None:
    two = polyline_crack(np.array([[20, 30], [170, 40]]), 3) | polyline_crack(np.array([[30, 120], [130, 180]]), 5)
    id_map = np.where(two, 7, 0).astype(np.int32)
    id_map[150:190, 150:190] = 9  # spalling
    segments = [{"id": 7, "label_id": 0, "score": 0.9}, {"id": 9, "label_id": 1}]
    crack, spalling = measure_segments(id_map, segments, label_map(crack_is_thing=False), mm_per_pixel=0.5)
    assert crack["kind"] == "crack" and crack["area"] == pytest.approx(two.sum() * 0.25)
    first, second = crack["cracks"]
    assert first["length"] == pytest.approx(0.5 * math.hypot(150, 10), rel=0.05)
    assert second["length"] == pytest.approx(0.5 * math.hypot(100, 60), rel=0.05)
    assert (first["mean_width"], second["mean_width"]) == (pytest.approx(1.5, abs=0.5), pytest.approx(2.5, abs=0.5))
    assert first["pixels"] + second["pixels"] == two.sum() and first["unit"] == "mm"
    assert spalling["kind"] == "region" and "cracks" not in spalling


def test_fragments_within_merge_distance_are_one_crack() -> None:
    line = polyline_crack(np.array([[20, 100], [180, 100]]), 2)
    line[:, 98:102] = False  # a 4 px gap
    segments = [{"id": 1, "label_id": 0}]
    apart = measure_segments(line.astype(np.int32), segments, label_map(False))[0]["cracks"]
    joined = measure_segments(line.astype(np.int32), segments, label_map(False, merge_distance=5))[0]["cracks"]
    assert len(apart) == 2 and len(joined) == 1
    assert joined[0]["length"] == pytest.approx(sum(c["length"] for c in apart), rel=0.01)


@pytest.mark.parametrize("crack_id", [1, 5_000_000])
def test_measure_segments_dispatches_by_role(crack_id: int) -> None:
    crack = straight_crack(150, 30, 3.0)
    id_map = np.zeros(crack.shape, dtype=np.int32)
    id_map[crack] = crack_id
    id_map[5:25, 5:45] = 2  # spalling, away from the crack
    id_map[-20:, -20:] = 4  # efflorescence touching the image corner
    segments = [
        {"id": crack_id, "label_id": 0, "score": 0.97, "was_fused": False},
        {"id": 2, "label_id": 1, "score": 0.9},
        {"id": 3, "label_id": 0},  # not in the map
        {"id": 4, "label_id": 2},
    ]
    out = measure_segments(torch.from_numpy(id_map), segments, label_map(), mm_per_pixel=0.2)
    assert [(s["id"], s["class_name"], s["kind"]) for s in out] == [
        (crack_id, "Riss", "crack"), (2, "spalling", "region"), (3, "Riss", "crack"),
        (4, "efflorescence", "region"),
    ]
    assert out[0]["score"] == 0.97 and "score" not in out[2]
    expected = crack_metrics(id_map == crack_id, mm_per_pixel=0.2)
    assert {k: out[0][k] for k in expected} == expected
    assert out[1] == {"id": 2, "label_id": 1, "class_name": "spalling", "kind": "region", "score": 0.9,
                      "area": pytest.approx(800 * 0.04), "bbox": [5, 5, 40, 20], "unit": "mm"}
    assert out[2]["length"] == 0.0 and out[2]["bbox"] == [0, 0, 0, 0]
    assert out[3]["bbox"] == [id_map.shape[1] - 20, id_map.shape[0] - 20, 20, 20]
    only_regions = measure_segments(id_map, segments[:2], label_map(measure="area"))
    assert [s["kind"] for s in only_regions] == ["region", "region"]
    absent_stuff = measure_segments(id_map, [{"id": 3, "label_id": 0}], label_map(crack_is_thing=False))[0]
    assert absent_stuff["cracks"] == [] and absent_stuff["area"] == 0.0
    with pytest.raises(UserInputError, match="label_id 7"):
        measure_segments(id_map, [{"id": 2, "label_id": 7}], label_map())


def test_crack_masks_lists_every_crack_of_the_crack_role() -> None:
    id_map = np.zeros((60, 80), np.int32)
    id_map[10, 5:30] = id_map[40, 5:30] = 1  # a stuff crack segment of two cracks
    id_map[20:30, 50:70] = 2  # spalling: not a crack
    segments = [{"id": 1, "label_id": 0}, {"id": 2, "label_id": 1}, {"id": 3, "label_id": 0}]  # 3: absent
    cracks = crack_masks(id_map, segments, label_map(crack_is_thing=False))
    assert [(mask.sum(), box) for mask, box in cracks] == [(25, (slice(10, 11), slice(5, 30))),
                                                          (25, (slice(40, 41), slice(5, 30)))]
    [(whole, box)] = crack_masks(id_map, segments, label_map(crack_is_thing=True))
    assert whole.sum() == 50 and box == (slice(10, 41), slice(5, 30))

import itertools

import cv2
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from hf_detr_seg.data.instances import merge_groups, segments_from_class_map
from hf_detr_seg.data.masks import VOID
from hf_detr_seg.labels import LabelMap


def label_map(connectivity: int = 8, min_area: int = 0, merge_distance: float = 0) -> LabelMap:
    return LabelMap.from_dict(
        {
            "mask_format": "indexed",
            "classes": [
                {"name": "crack", "isthing": True, "value": 1},
                {"name": "stain", "isthing": False, "value": 2},
                {"name": "surface", "isthing": False, "background": True, "value": 0},
            ],
            "instances": {"connectivity": connectivity, "min_area": min_area, "merge_distance": merge_distance},
        }
    )


def test_components_become_segments_with_tight_boxes_and_exact_areas():
    class_map = np.full((20, 30), 2, np.int16)
    class_map[2:5, 3:9] = 0  # 18 px crack
    class_map[10:18, 20:22] = 0  # 16 px crack
    class_map[0, 29] = 1  # one stain pixel
    result = segments_from_class_map(class_map, label_map())
    by_id = {s.id: s for s in result.segments}
    assert sorted(by_id) == [1, 2, 3, 4]
    assert (by_id[1].class_index, by_id[1].area, by_id[1].bbox) == (0, 18, (3, 2, 6, 3))
    assert (by_id[2].class_index, by_id[2].area, by_id[2].bbox) == (0, 16, (20, 10, 2, 8))
    assert (by_id[3].class_index, by_id[3].area, by_id[3].bbox) == (1, 1, (29, 0, 1, 1))
    assert by_id[4].class_index == 2 and by_id[4].area == 600 - 18 - 16 - 1
    for seg in result.segments:
        assert np.count_nonzero(result.id_map == seg.id) == seg.area


def test_stuff_is_one_segment_even_when_split():
    class_map = np.full((10, 10), 2, np.int16)
    class_map[:, 4:6] = 1  # the stain cuts the surface into two parts
    result = segments_from_class_map(class_map, label_map())
    surface = [s for s in result.segments if s.class_index == 2]
    assert len(surface) == 1 and surface[0].area == 80 and surface[0].bbox == (0, 0, 10, 10)


@pytest.mark.parametrize("connectivity, expected", [(4, 2), (8, 1)])
def test_connectivity(connectivity, expected):
    class_map = np.full((6, 6), 2, np.int16)
    class_map[1, 1] = class_map[2, 2] = 0  # diagonal neighbours
    result = segments_from_class_map(class_map, label_map(connectivity=connectivity))
    assert sum(s.class_index == 0 for s in result.segments) == expected


@pytest.mark.parametrize("distance, merged", [(5.0, True), (4.99, False)])
def test_merge_distance_is_euclidean_between_nearest_pixels(distance, merged):
    class_map = np.full((20, 20), 2, np.int16)
    class_map[2:6, 2] = 0
    class_map[9:14, 6] = 0  # nearest pixels (5, 2) and (9, 6)... distance sqrt(16 + 16) = 5.66
    class_map[5, 10:15] = 0  # nearest to (5, 6)? no: column 6 starts at row 9 -> (9, 6)-(5, 10) = 5.66
    class_map[15:18, 15] = 0  # (14, 6)..: far; nearest (5, 14)-(15, 15) = 10.05
    class_map[0, 19] = 0  # (5, 14)-(0, 19): sqrt(25+25) = 7.07
    class_map[2, 7] = 0  # (2, 2)-(2, 7) = 5 exactly; (2, 7)-(5, 10) = 4.24
    result = segments_from_class_map(class_map, label_map(merge_distance=distance))
    cracks = [s for s in result.segments if s.class_index == 0]
    # With 5.0: (2,2)-col joins (2,7) [5.0], which joins the row at 5 [4.24]; others stay apart.
    # With 4.99: only (2,7) and the row at 5 join [4.24].
    assert len(cracks) == (4 if merged else 5)
    crack_pixels = class_map == 0
    assert np.array_equal(np.isin(result.id_map, [s.id for s in cracks]), crack_pixels), "pixels must be kept"


def test_merge_groups_matches_brute_force():
    rng = np.random.default_rng(1)
    for trial in range(20):
        mask = (rng.random((40, 40)) > 0.93).astype(np.uint8)
        mask = cv2.dilate(mask, np.ones((2, 2), np.uint8)) if trial % 2 else mask
        num, labels = cv2.connectedComponents(mask, connectivity=8)
        distance = float(rng.uniform(1.5, 6))
        groups = merge_groups(labels, num, distance)
        points = {k: np.argwhere(labels == k) for k in range(1, num)}
        parent = list(range(num))

        def find(k):
            while parent[k] != k:
                k = parent[k]
            return k

        for a, b in itertools.combinations(range(1, num), 2):
            if cdist(points[a], points[b]).min() <= distance:
                parent[find(a)] = find(b)
        for a, b in itertools.combinations(range(1, num), 2):
            assert (groups[a] == groups[b]) == (find(a) == find(b))


def test_min_area_specks_become_void_not_background():
    class_map = np.full((10, 10), 2, np.int16)
    class_map[1:4, 1:4] = 0  # 9 px: kept
    class_map[7, 7] = 0  # 1 px speck
    class_map[8, 1:3] = 0  # 2 px speck
    result = segments_from_class_map(class_map, label_map(min_area=3))
    assert result.dropped_specks == 2 and result.dropped_pixels == 3
    assert result.id_map[7, 7] == 0 and result.id_map[8, 1] == 0 and result.id_map[8, 2] == 0
    surface = next(s for s in result.segments if s.class_index == 2)
    assert surface.area == 100 - 9 - 3


def test_void_pixels_stay_void():
    class_map = np.full((4, 4), 2, np.int16)
    class_map[0, :] = VOID
    result = segments_from_class_map(class_map, label_map())
    assert (result.id_map[0] == 0).all() and (result.id_map[1:] > 0).all()

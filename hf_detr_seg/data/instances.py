"""Class-index array -> panoptic segments: instances, merging, specks, boxes.

Things are split into instances by connected components (OpenCV); fragments of one crack that lie within
`merge_distance` pixels of each other (Euclidean, between pixel centres) are joined into one segment while
keeping their own pixels; segments smaller than `min_area` are dropped and their pixels become void (0),
never background. Each stuff class present is one segment. Boxes are OpenCV bounding rectangles of the
segment's pixels, COCO `[x, y, w, h]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..labels import InstanceRules, LabelMap
from .masks import VOID


@dataclass(frozen=True)
class Segment:
    """One panoptic segment as written to `segments_info`."""

    id: int
    class_index: int
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h

    def to_coco(self, label_map: LabelMap) -> dict:
        return {
            "id": self.id,
            "category_id": label_map.category_id(self.class_index),
            "area": self.area,
            "bbox": list(self.bbox),
            "iscrowd": 0,
        }


@dataclass
class PanopticSegments:
    """A segment-id map (0 = void) and its segments, plus what was dropped."""

    id_map: np.ndarray  # uint32 HxW
    segments: list[Segment] = field(default_factory=list)
    dropped_specks: int = 0
    dropped_pixels: int = 0


def merge_groups(labels: np.ndarray, num_labels: int, distance: float) -> np.ndarray:
    """Group connected components whose nearest pixels are at most `distance` apart.

    Only boundary pixels can be nearest pixels of two disjoint sets, so the search runs on those with a
    KD-tree. Returns, for each label 0..num_labels-1, a group number (label 0, the background, is group 0;
    groups are numbered in order of their smallest label, so the result is deterministic).
    """
    groups = np.arange(num_labels)
    if num_labels <= 2 or distance <= 0:
        return groups
    foreground = (labels > 0).astype(np.uint8)
    boundary = (foreground > 0) & (cv2.erode(foreground, np.ones((3, 3), np.uint8)) == 0)
    points = np.argwhere(boundary)
    point_labels = labels[boundary]
    pairs = cKDTree(points).query_pairs(r=distance, output_type="ndarray")
    a, b = point_labels[pairs[:, 0]], point_labels[pairs[:, 1]]
    different = a != b
    graph = coo_matrix(
        (np.ones(int(different.sum()), dtype=np.int8), (a[different], b[different])),
        shape=(num_labels, num_labels),
    )
    _, component_of = connected_components(graph, directed=False)
    # Renumber so that group ids follow the smallest label in each group; background stays 0.
    _, first = np.unique(component_of, return_index=True)
    order = np.argsort(first)
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return renumber[component_of]


def _union_boxes(stats: np.ndarray, members: np.ndarray) -> tuple[int, int, int, int]:
    x0 = int(stats[members, cv2.CC_STAT_LEFT].min())
    y0 = int(stats[members, cv2.CC_STAT_TOP].min())
    x1 = int((stats[members, cv2.CC_STAT_LEFT] + stats[members, cv2.CC_STAT_WIDTH]).max())
    y1 = int((stats[members, cv2.CC_STAT_TOP] + stats[members, cv2.CC_STAT_HEIGHT]).max())
    return (x0, y0, x1 - x0, y1 - y0)


def thing_instances(mask: np.ndarray, rules: InstanceRules) -> tuple[np.ndarray, list[tuple[int, tuple]], int, int]:
    """Split one thing class's mask into instances.

    Returns (instance map with 1..N, 0 elsewhere; [(area, bbox)] for instances 1..N; specks dropped;
    pixels dropped).
    """
    num, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=rules.connectivity, ltype=cv2.CV_32S
    )
    group_of = merge_groups(labels, num, rules.merge_distance)
    num_groups = int(group_of.max()) + 1
    areas = np.bincount(group_of, weights=stats[:, cv2.CC_STAT_AREA], minlength=num_groups).astype(np.int64)
    keep = areas >= max(rules.min_area, 1)
    keep[0] = False
    dropped = np.flatnonzero(~keep[1:]) + 1
    new_id = np.zeros(num_groups, dtype=np.int32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    instance_map = new_id[group_of][labels]
    instances = [
        (int(areas[g]), _union_boxes(stats, np.flatnonzero(group_of == g))) for g in np.flatnonzero(keep)
    ]
    return instance_map, instances, len(dropped), int(areas[dropped].sum())


def segments_from_class_map(class_map: np.ndarray, label_map: LabelMap) -> PanopticSegments:
    """Build the panoptic segments of one image from its class-index array.

    Segment ids are 1..N in model-class order, then instance order (OpenCV's raster order of components),
    so the same mask always gives the same PNG.
    """
    id_map = np.zeros(class_map.shape, dtype=np.uint32)
    result = PanopticSegments(id_map)
    present = np.unique(class_map)
    next_id = 1
    for class_index in present[present != VOID].tolist():
        mask = class_map == class_index
        if label_map.classes[class_index].isthing:
            instance_map, instances, specks, speck_pixels = thing_instances(mask, label_map.instances)
            result.dropped_specks += specks
            result.dropped_pixels += speck_pixels
            if instances:
                inside = instance_map > 0
                id_map[inside] = instance_map[inside].astype(np.uint32) + (next_id - 1)
            for offset, (area, bbox) in enumerate(instances):
                result.segments.append(Segment(next_id + offset, class_index, area, bbox))
            next_id += len(instances)
        else:
            id_map[mask] = next_id
            bbox = cv2.boundingRect(mask.astype(np.uint8))
            result.segments.append(Segment(next_id, class_index, int(mask.sum()), tuple(int(v) for v in bbox)))
            next_id += 1
    return result

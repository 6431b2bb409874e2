"""Measurements of a whole panoptic prediction, segment by segment, each as its class's role asks.

A class whose role is `measure: crack` (see `labels`) is reported one entry per crack, however it was modelled.
A thing crack class already gives one segment per crack. A stuff crack class (the DeepCrack recipe) gives one
segment holding every crack pixel of the image, so that segment is split here into connected cracks by the
rules the dataset builder splits thing classes into instances with (`data.instances.thing_instances`: the label
map's connectivity and merge_distance). `min_area` is not applied: every pixel of the segment belongs to some
crack, so the cracks add up to the segment. Every other class is measured as a region (area and box). The
estimators themselves are `quantify`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy import ndimage

from .data.instances import thing_instances
from .errors import UserInputError
from .labels import ClassInfo, InstanceRules, LabelMap
from .quantify import crack_in_box, empty_crack, empty_region, pixel_scale, region_in_box, scaled

Box = tuple[slice, slice]

__all__ = ["crack_masks", "measure_segments", "segment_cracks"]


def measure_segments(
    id_map: Any, segments: Sequence[dict], label_map: LabelMap, mm_per_pixel: float | None = None
) -> list[dict[str, Any]]:
    """Measure every segment of a panoptic prediction with the metrics its class's role calls for.

    `id_map`: [H, W] segment ids, 0 = void (numpy array or CPU tensor, e.g. `PanopticPrediction.id_map`).
    `segments`: dicts with "id" and "label_id" (model class index of `label_map`), as `post_process_panoptic`
    gives them. Returns one dict per segment, in order: {"id", "label_id", "class_name", "kind": "crack" |
    "region", "score" (when the segment has one), ...the metrics in `unit`}. A thing crack segment carries
    `quantify.crack_metrics`' keys; a stuff crack segment its area and box and "cracks": one dict per
    connected crack (length, max_width, mean_width, area, bbox, unit and "pixels", its pixel count); a region
    `quantify.region_metrics`' keys. A segment absent from the map measures as empty (a stuff crack: no cracks).
    """
    ids = np.asarray(id_map.cpu() if hasattr(id_map, "cpu") else id_map)
    if ids.ndim != 2:
        raise UserInputError(f"id_map must be 2-D [H, W], got shape {ids.shape}")
    scale, unit = pixel_scale(mm_per_pixel)
    boxes = _segment_boxes(ids, [int(s["id"]) for s in segments])
    results = []
    for segment in segments:
        label = int(segment["label_id"])
        if not 0 <= label < label_map.num_classes:
            raise UserInputError(f"segment {segment['id']}: label_id {label} is not a class of the label map")
        info = label_map.classes[label]
        kind = "crack" if info.measure == "crack" else "region"
        out: dict[str, Any] = {"id": int(segment["id"]), "label_id": label, "class_name": info.name, "kind": kind}
        if "score" in segment:
            out["score"] = float(segment["score"])
        box = boxes.get(int(segment["id"]))
        crop = None if box is None else ids[box] == int(segment["id"])
        out.update(_measured(crop, box, info, label_map.instances, ids.shape, scale, unit))
        results.append(out)
    return results


def crack_masks(id_map: np.ndarray, segments: Sequence[dict], label_map: LabelMap) -> list[tuple[np.ndarray, Box]]:
    """Every crack of a panoptic map as (its mask on its box, the box): the segments of crack-role classes, a thing
    segment whole and a stuff one split as `measure_segments` splits it (for comparing cracks, not segments)."""
    boxes = _segment_boxes(id_map, [int(s["id"]) for s in segments])
    cracks = []
    for segment in segments:
        info, box = label_map.classes[int(segment["label_id"])], boxes.get(int(segment["id"]))
        if info.measure != "crack" or box is None:
            continue
        crop = id_map[box] == int(segment["id"])
        cracks.extend([(crop, box)] if info.isthing else segment_cracks(crop, box, label_map.instances))
    return cracks


def _measured(crop: np.ndarray | None, box: Box | None, info: ClassInfo, rules: InstanceRules,
              shape: tuple[int, int], scale: float, unit: str) -> dict[str, Any]:
    """One segment's metrics in `unit` (`box` None: the segment is absent from the map)."""
    if info.measure == "crack" and info.isthing:
        return scaled(crack_in_box(crop, box, shape) if box else empty_crack(), scale, unit)
    metrics = scaled(region_in_box(crop, box) if box else empty_region(), scale, unit)
    if info.measure == "crack":  # a stuff crack class: a row per connected crack
        cracks = segment_cracks(crop, box, rules) if box else []
        metrics["cracks"] = [{**scaled(crack_in_box(part, part_box, shape), scale, unit),
                              "pixels": int(np.count_nonzero(part))} for part, part_box in cracks]
    return metrics


def segment_cracks(crop: np.ndarray, box: Box, rules: InstanceRules) -> list[tuple[np.ndarray, Box]]:
    """The connected cracks of the mask `crop` = mask[box], by the builder's instance rules without `min_area`
    (module docstring): each as (its own mask on its own box, that box in image coordinates), in raster order."""
    instance_map, instances, _, _ = thing_instances(crop, replace(rules, min_area=0))
    rows, cols = box
    cracks = []
    for number, (_, (x, y, w, h)) in enumerate(instances, start=1):
        part = instance_map[y : y + h, x : x + w] == number
        part_box = (slice(rows.start + y, rows.start + y + h), slice(cols.start + x, cols.start + x + w))
        cracks.append((part, part_box))
    return cracks


def _segment_boxes(ids: np.ndarray, wanted: list[int]) -> dict[int, Box]:
    """Bounding-box slices of the wanted ids present in the map, from one `find_objects` pass.

    Ids are first renumbered through `np.unique` when they are sparse (COCO-panoptic ids from RGB PNGs go up
    to 2^24), so `find_objects` never allocates a list as long as the largest id.
    """
    if ids.size == 0 or not wanted:
        return {}
    if np.issubdtype(ids.dtype, np.integer) and ids.min() >= 0 and ids.max() <= 1 << 20:
        objects = ndimage.find_objects(ids)
        return {i: objects[i - 1] for i in wanted if 0 < i <= len(objects) and objects[i - 1] is not None}
    values, inverse = np.unique(ids, return_inverse=True)
    objects = ndimage.find_objects(inverse.reshape(ids.shape) + 1)
    index = {int(v): k for k, v in enumerate(values)}
    return {i: objects[index[i]] for i in wanted if i in index and i != 0}

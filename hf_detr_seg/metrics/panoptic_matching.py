"""One image's PQ statistics: panopticapi's `pq_compute_single_core` body, on a (gt segment, pred segment) table.

Rules (all from panopticapi, cocodataset/panopticapi `panopticapi/evaluation.py`): gt id 0 is void; a pair is a
match when categories agree, the gt is not crowd and IoU > 0.5, where the union leaves out the prediction's void
pixels; unmatched non-crowd gt are FN; an unmatched prediction is an FP unless more than half of it lies on void
plus the crowd region of its own category. IoU > 0.5 makes matches unique, so no assignment step is needed.

The statistics are a few small arrays, so they can be computed in worker threads or other processes and added
to a `PanopticQuality` in a fixed order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from .segment_ids import SegmentTable, as_id_map, segment_positions, segment_table, unlisted_error


@dataclass
class ImageStats:
    """One image's contribution per category (dense category index): matches, FP and FN counts.

    `match_cats` / `match_ious` list the matches in panopticapi's order (by gt id), so that the running IoU
    sums are added in exactly the same order and come out bit-identical.
    """

    match_cats: np.ndarray
    match_ious: np.ndarray
    fp: np.ndarray
    fn: np.ndarray


@dataclass
class _Overlaps:
    """Pixel counts of one image: `inter[g, p]` shared by gt segment g and pred segment p (in list order),
    each segment's area (from the map; equals the JSON `area` in any valid dataset), each prediction's void
    pixels."""

    inter: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pred_void: np.ndarray


def image_stats(
    gt_ids: Any,
    gt_segments: Sequence[Mapping],
    pred_ids: Any,
    pred_segments: Sequence[Mapping],
    cat_index: Mapping[int, int],
    gt_name: str,
    pred_name: str,
) -> ImageStats:
    """The statistics of one image: id maps (0 = void) and their `segments_info` lists; `cat_index` maps the
    reported category ids to dense indices; `gt_name` / `pred_name` name the files in error messages."""
    if np.shape(gt_ids) != np.shape(pred_ids):
        raise DataError(
            f"{pred_name}: id map of shape {np.shape(pred_ids)} differs from {gt_name}'s {np.shape(gt_ids)}"
        )
    gt, pred = segment_table(gt_segments, gt_name), segment_table(pred_segments, pred_name)
    unknown = sorted({int(c) for c in pred.cats if int(c) not in cat_index})
    if unknown:
        raise DataError(f"{pred_name}: unknown category_id(s) {unknown}; known are {sorted(cat_index)}")
    overlaps = _overlaps(as_id_map(gt_ids, gt_name), gt.ids, gt_name, as_id_map(pred_ids, pred_name), pred.ids,
                         pred_name)
    g, p, iou = _matches(overlaps, gt, pred)
    gt_matched = np.zeros(len(gt.ids), dtype=bool)
    pred_matched = np.zeros(len(pred.ids), dtype=bool)
    gt_matched[g] = True
    pred_matched[p] = True
    # false negatives: unmatched, non-crowd gt of a reported category (a listed gt segment without pixels is
    # still one, as in panopticapi)
    fn = _category_counts(gt.cats[~gt_matched & ~gt.crowd], cat_index)
    fp = _category_counts(pred.cats[~pred_matched & ~_mostly_void_or_crowd(overlaps, gt, pred)], cat_index)
    match_cats = np.array([cat_index[int(c)] for c in pred.cats[p]], dtype=np.int64)
    return ImageStats(match_cats=match_cats, match_ious=iou, fp=fp, fn=fn)


def _overlaps(gt_ids: np.ndarray, gt_listed: np.ndarray, gt_name: str, pred_ids: np.ndarray,
              pred_listed: np.ndarray, pred_name: str) -> _Overlaps:
    """One `bincount` of (gt position, pred position) pairs; ids that a `segments_info` list leaves out, or
    listed predictions without pixels, are data errors."""
    # table[g, p]: row/column 0 is void / no prediction, the last row/column collects unlisted ids (an error)
    rows, columns = len(gt_listed) + 2, len(pred_listed) + 2
    joint = segment_positions(gt_ids, gt_listed, stride=columns)
    joint += segment_positions(pred_ids, pred_listed)
    table = np.bincount(joint, minlength=rows * columns).reshape(rows, columns)
    if table[-1].any():
        raise unlisted_error(gt_ids, gt_listed, gt_name)
    if table[:, -1].any():
        raise unlisted_error(pred_ids, pred_listed, pred_name)
    table = table[:-1, :-1]
    overlaps = _Overlaps(inter=table[1:, 1:], gt_area=table[1:].sum(axis=1), pred_area=table[:, 1:].sum(axis=0),
                         pred_void=table[0, 1:])
    if (overlaps.pred_area == 0).any():
        raise DataError(
            f"{pred_name}: segment id(s) {pred_listed[overlaps.pred_area == 0][:5].tolist()} are in segments_info "
            "but not in the PNG/id map"
        )
    return overlaps


def _matches(overlaps: _Overlaps, gt: SegmentTable, pred: SegmentTable) -> tuple[np.ndarray, ...]:
    """(gt positions, pred positions, IoUs) of the matches, by gt id: same category, gt not crowd, IoU > 0.5
    with the prediction's void pixels out of the union."""
    inter = overlaps.inter
    candidate = (inter > 0) & (gt.cats[:, None] == pred.cats[None, :]) & ~gt.crowd[:, None]
    g, p = np.nonzero(candidate)
    union = overlaps.pred_area[p] + overlaps.gt_area[g] - inter[g, p] - overlaps.pred_void[p]
    iou = inter[g, p] / union
    matched = iou > 0.5
    g, p, iou = g[matched], p[matched], iou[matched]
    by_gt_id = np.argsort(gt.ids[g], kind="stable")
    return g[by_gt_id], p[by_gt_id], iou[by_gt_id]


def _mostly_void_or_crowd(overlaps: _Overlaps, gt: SegmentTable, pred: SegmentTable) -> np.ndarray:
    """Per prediction: more than half of it on void plus the crowd region of its category (not an FP when
    unmatched). panopticapi keeps one crowd region per category, the last listed one."""
    crowd_of_cat = {int(gt.cats[j]): j for j in np.flatnonzero(gt.crowd)}
    crowd_row = np.array([crowd_of_cat.get(int(c), -1) for c in pred.cats], dtype=np.int64)
    has_crowd = crowd_row >= 0
    on_crowd = np.zeros(len(pred.ids), dtype=overlaps.inter.dtype)
    on_crowd[has_crowd] = overlaps.inter[crowd_row[has_crowd], np.flatnonzero(has_crowd)]
    return (overlaps.pred_void + on_crowd) / overlaps.pred_area > 0.5


def _category_counts(cats: np.ndarray, cat_index: Mapping[int, int]) -> np.ndarray:
    """How many of `cats` fall in each reported category (dense index); other categories are not counted."""
    dense = [cat_index[int(c)] for c in cats if int(c) in cat_index]
    return np.bincount(np.array(dense, dtype=np.int64), minlength=len(cat_index))

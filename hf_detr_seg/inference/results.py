"""What a prediction is: one image's id map and its segments, and a tile's prediction before stitching."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Rows of an id map handled at a time by the passes over a whole photo (areas, relabelling): a few MiB of
# temporaries however large the photo is.
ROW_BLOCK = 256


@dataclass
class Segment:
    """One predicted segment. `bbox` is the tight [x, y, w, h] box in the image's own pixels (pixel edges)."""

    id: int
    label: str
    label_id: int  # model class index
    score: float
    area: int  # pixels
    bbox: list[int]


@dataclass
class SegmentationResult:
    """One image's prediction at the image's own size: `id_map` int32 H x W (0 = no segment), its segments."""

    id_map: np.ndarray
    segments: list[Segment]
    image_size: tuple[int, int]  # (height, width)


@dataclass
class TilePrediction:
    """A prediction at one array's own size: int32 id map and segments {"id", "label_id", "score"} (ids 1..N)."""

    id_map: np.ndarray
    segments: list[dict] = field(default_factory=list)


SegmentStats = dict[int, tuple[int, list[int]]]  # segment id -> (area in pixels, [x, y, w, h])


def segment_stats(id_map: np.ndarray, max_id: int) -> SegmentStats:
    """Area and tight box of every id 1..max_id present in `id_map`.

    Areas are counted `ROW_BLOCK` rows at a time (`np.bincount` copies its input to int64 first, which on a
    whole 24-megapixel map would be 192 MiB); boxes come from one `find_objects` pass, which reads the map as is.
    """
    if max_id == 0:
        return {}
    areas = np.zeros(max_id + 1, np.int64)
    for start in range(0, id_map.shape[0], ROW_BLOCK):
        areas += np.bincount(id_map[start : start + ROW_BLOCK].ravel(), minlength=max_id + 1)[: max_id + 1]
    stats: SegmentStats = {}
    for position, box in enumerate(ndimage.find_objects(id_map, max_label=max_id)):
        if box is not None:
            rows, cols = box
            stats[position + 1] = (int(areas[position + 1]),
                                   [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start])
    return stats


def build_result(
    prediction: TilePrediction, names: Sequence[str], size: tuple[int, int], stats: SegmentStats | None = None
) -> SegmentationResult:
    """The `SegmentationResult` of a prediction at the image's size; segments without a pixel are left out.

    `stats` (area and box by id) when the caller has them (the stitcher counts them tile by tile), else
    `segment_stats` of the map.
    """
    if stats is None:
        stats = segment_stats(prediction.id_map, max((s["id"] for s in prediction.segments), default=0))
    segments = []
    for s in prediction.segments:
        if s["id"] not in stats:
            continue
        area, bbox = stats[s["id"]]
        segments.append(Segment(id=int(s["id"]), label=names[s["label_id"]], label_id=int(s["label_id"]),
                                score=float(s["score"]), area=int(area), bbox=[int(v) for v in bbox]))
    return SegmentationResult(prediction.id_map, segments, (int(size[0]), int(size[1])))

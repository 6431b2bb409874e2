"""Annotated objects -> one image's panoptic segments (the same result `instances` gives for masks).

Rules (README, "Import annotations"):
- Each object is one segment of its class, however many parts it has; nothing is re-split into connected
  components, and `instances:` rules (made for masks) do not apply. All objects of a stuff class in an image form
  one segment. The background class also takes every pixel no object covers (void without a background class).
- Objects are drawn in file order: where two overlap, the later one is on top, as the annotation tools draw them;
  pixels covered by two different objects are counted (`overlap_pixels`). Objects of `ignore_labels` are drawn
  as void.
- Polygons (COCO, labelme polygons and rectangles) and RLE are rasterised by pycocotools, the reference COCO
  tools use. pycocotools cannot draw discs or wide lines, so labelme circles and lines take every pixel whose
  centre lies within the radius (half the class's `line_width`) of the centre (the polyline); coordinates are
  pixel edges, as in COCO, so pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
- An object with no pixel, or lying outside the image by more than a pixel, is bad: reported, an error unless
  `skip_bad`, then dropped alone.

Segment ids are 1..N in class order, then in order of each segment's first object in the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError
from ..labels import LabelMap
from .annotations import ImageAnnotations, Piece
from .instances import PanopticSegments, Segment
from .panoptic import segment_stats

_OUTSIDE_TOLERANCE = 1.0  # pixels: tools round coordinates at the image border
_LINE_STEP = 128.0  # long segments are measured in pieces this long, so memory stays small


@dataclass
class DrawnImage:
    """One image's segments, the pixels where objects overlapped, and the objects left out (`skip_bad`)."""

    panoptic: PanopticSegments
    overlap_pixels: int = 0
    dropped: list[str] = field(default_factory=list)


def draw_annotations(
    annotations: ImageAnnotations, label_map: LabelMap, size: tuple[int, int], skip_bad: bool = False
) -> DrawnImage:
    """Draw the objects of one image of `size` (width, height); see the module docstring for the rules."""
    width, height = size
    if annotations.size is not None and tuple(annotations.size) != (width, height):
        raise DataError(
            f"{annotations.describe()}: the annotations are for a {annotations.size[0]}x{annotations.size[1]} "
            f"image but the image file is {width}x{height} (width x height, EXIF orientation applied)"
        )
    owner = np.zeros((height, width), np.int32)  # object on top at each pixel, 0 = none
    overlap = np.zeros((height, width), bool)
    classes: dict[int, int | None] = {}
    problems = []
    for piece in annotations.pieces:
        drawn = piece_mask(piece, height, width)
        if isinstance(drawn, str):
            problems.append(f"{annotations.describe()}, {piece.where}: {drawn}")
            continue
        mask, (top, left) = drawn
        window = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))  # work on the object's box
        below = owner[window]
        overlap[window] |= mask & (below != 0) & (below != piece.object_id)
        below[mask] = piece.object_id
        classes.setdefault(piece.object_id, piece.class_index)
    if problems and not skip_bad:
        more = f"\n(and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError("\n".join(problems[:20]) + more + "\n(use --skip-bad to drop bad objects and build the rest)")
    return DrawnImage(_segments(owner, classes, label_map), int(overlap.sum()), problems)


def _segments(owner: np.ndarray, classes: dict[int, int | None], label_map: LabelMap) -> PanopticSegments:
    """Object map -> segment-id map: things one segment per object, stuff one per class, ignored objects void."""
    background = label_map.background_index
    group: dict[int, tuple[int, int]] = {}  # object -> (class index, object or 0 for stuff), the segment's sort key
    if background is not None:
        group[0] = (background, 0)  # pixels no object covers
    for object_id, index in classes.items():
        if index is not None:
            group[object_id] = (index, object_id if label_map.classes[index].isthing else 0)
    areas = np.bincount(owner.ravel(), minlength=max(classes, default=0) + 1)
    visible = sorted({key for object_id, key in group.items() if areas[object_id] > 0})
    segment_of = {key: number for number, key in enumerate(visible, start=1)}
    lookup = np.zeros(len(areas), np.uint32)
    for object_id, key in group.items():
        lookup[object_id] = segment_of.get(key, 0)
    id_map = lookup[owner]
    stats = segment_stats(id_map)
    segments = [Segment(number, key[0], *stats[number]) for key, number in segment_of.items()]
    return PanopticSegments(id_map, segments)


# ------------------------------------------------------------------------------------------------ pieces
def piece_mask(piece: Piece, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]] | str:
    """The pixels of one piece as a bool crop of the image and the crop's (top, left); or why it cannot be drawn."""
    if piece.kind == "bad":
        return str(piece.geometry)
    outside = _outside(piece, height, width)
    if outside is not None:
        return outside
    if piece.kind in ("polygon", "rle"):
        # On the whole image, as every COCO reader does: pycocotools' rasterisation of a polygon moved by whole
        # pixels differs in a few pixels (its float rounding), so drawing in the object's box would not be exact.
        if piece.kind == "polygon":
            rle = mask_utils.merge(mask_utils.frPyObjects(piece.geometry, height, width))
        else:
            rle = _checked_rle(piece.geometry, height, width)
            if isinstance(rle, str):
                return rle
        try:  # a corrupt compressed RLE is refused by pycocotools, or claims more pixels than the image has
            if int(mask_utils.area(rle)) > height * width:
                raise ValueError("its runs cover more pixels than the image has")
            x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
            drawn = mask_utils.decode(rle)[y : y + h, x : x + w].astype(bool), (y, x)
        except ValueError as err:
            return f"RLE cannot be decoded ({err})"
    elif piece.kind == "disc":
        cx, cy, radius = piece.geometry
        drawn = near_polyline(np.array([[cx, cy]]), radius, height, width)
    else:
        points, line_width = piece.geometry
        drawn = near_polyline(np.asarray(points, float), line_width / 2, height, width)
    if not drawn[0].any():
        return "zero area (no pixel of the image lies inside it)"
    return drawn


def _checked_rle(rle: dict, height: int, width: int) -> dict | str:
    """A compressed RLE of the image's size, or why the piece's RLE is not one."""
    if rle["size"] != [height, width]:
        return f"RLE size {rle['size']} (height, width) differs from the image's [{height}, {width}]"
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            return f"uncompressed RLE counts must be non-negative integers summing to {height * width}"
        return mask_utils.frPyObjects(rle, height, width)
    if not counts.isascii():
        return "compressed RLE counts must be an ASCII string"
    return {"size": [height, width], "counts": counts.encode("ascii")}


def _outside(piece: Piece, height: int, width: int) -> str | None:
    """A reason when the piece's points or box reach beyond the image by more than the tolerance."""
    if piece.kind == "polygon":
        xs = [v for part in piece.geometry for v in part[0::2]]
        ys = [v for part in piece.geometry for v in part[1::2]]
    elif piece.kind == "disc":
        xs, ys = [piece.geometry[0]], [piece.geometry[1]]
    elif piece.kind == "band":
        xs, ys = [p[0] for p in piece.geometry[0]], [p[1] for p in piece.geometry[0]]
    else:
        xs, ys = [], []
    what = "points"
    if piece.box is not None and not xs:
        x, y, w, h = piece.box
        xs, ys, what = [x, x + w], [y, y + h], f"box {list(piece.box)}"
    tol = _OUTSIDE_TOLERANCE
    if xs and (min(xs) < -tol or min(ys) < -tol or max(xs) > width + tol or max(ys) > height + tol):
        return (
            f"outside the {width}x{height} image ({what} span x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g})"
        )
    return None


def near_polyline(
    points: np.ndarray, radius: float, height: int, width: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels whose centre lies within `radius` of the polyline through `points` (one point: a disc), as a bool
    crop of the image and its (top, left).

    Each segment is measured over its own window, cut into pieces at most `_LINE_STEP` long, so a long
    diagonal line never needs a window the size of its box.
    """
    top = min(max(int(math.floor(points[:, 1].min() - radius)) - 1, 0), height)
    left = min(max(int(math.floor(points[:, 0].min() - radius)) - 1, 0), width)
    bottom = max(min(int(math.ceil(points[:, 1].max() + radius)) + 1, height), top)
    right = max(min(int(math.ceil(points[:, 0].max() + radius)) + 1, width), left)
    mask = np.zeros((bottom - top, right - left), bool)
    offset = np.array([left, top], float)
    ends = list(zip(points[:-1], points[1:])) if len(points) > 1 else [(points[0], points[0])]
    for a, b in ends:
        steps = max(1, math.ceil(math.hypot(*(b - a)) / _LINE_STEP))
        for k in range(steps):
            start, stop = a + (b - a) * k / steps, a + (b - a) * (k + 1) / steps
            _mark_segment(mask, start - offset, stop - offset, radius)
    return mask, (top, left)


def _mark_segment(mask: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> None:
    """Set the pixels of `mask` whose centre lies within `radius` of the segment a-b (crop coordinates)."""
    height, width = mask.shape
    x0 = max(int(math.floor(min(a[0], b[0]) - radius)) - 1, 0)
    x1 = min(int(math.ceil(max(a[0], b[0]) + radius)) + 1, width)
    y0 = max(int(math.floor(min(a[1], b[1]) - radius)) - 1, 0)
    y1 = min(int(math.ceil(max(a[1], b[1]) + radius)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - a[0]
    ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - a[1]
    dx, dy = b - a
    length2 = dx * dx + dy * dy
    t = np.clip((xs * dx + ys * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
    mask[y0:y1, x0:x1] |= (xs - t * dx) ** 2 + (ys - t * dy) ** 2 <= radius * radius

"""Defect measurements for inspection reports: crack length and width, area and box of every segment.

Units. Every function takes `mm_per_pixel: float | None`. `None` (the default) means that no scale is known:
lengths and widths are in pixels and the result says `"unit": "px"`. A positive number gives millimetres
(`"unit": "mm"`): lengths and widths are multiplied by it and areas by its square. A separate `scale_given`
flag was not used because it allows contradictory calls (`mm_per_pixel=0.5, scale_given=False`) and because
1.0 mm/px is a legitimate scale. Boxes are always `[x, y, w, h]` in pixels of the mask (COCO convention),
because they locate the defect in the photo rather than measure it.

Crack model. A crack segment is read as a centre curve C swept by a disc whose radius is the local half-width
(the mask of a round brush stroke, and exactly the acceptance test's band: the pixels whose centre lies less
than r from a segment). The crack's length is the length of C and its width is the disc's diameter. Under
this model the medial axis of the mask is C itself, and C's tips lie one half-width inside the mask's outline.
Everything below estimates those two quantities from the pixel grid:

1. Skeleton (`skimage.morphology.skeletonize`, Zhang's thinning) of the segment's bounding-box crop, with a
   background border. Redundant L-corner pixels are dropped so the skeleton is 8-thin, and terminal branches
   no longer than the crack's local width at their junction (2 x the distance transform there) are pruned:
   they are bumps of the outline, and a real branch that short cannot be told from one.
2. Skeleton length: the skeleton is a graph of 8-neighbouring pixels in which a diagonal edge is dropped when
   the two pixels are also joined through a shared 4-neighbour (so no step is counted twice, junctions
   included). Summing plain step lengths (1 and sqrt 2) overstates digital lines off the axes by up to 8 %
   (at 22.5 deg), so the steps go into the corrected chain-code estimator of Vossepoel & Smeulders (1982),
   0.980 per axial step + 1.406 per diagonal step - 0.091 per corner (a change of step direction), which
   is within about 2 % of the true length at every angle (its worst case: axis-parallel lines, 2 % short).
3. Tips: thinning ends its skeleton up to about two pixels before or past the true tips, depending on angle
   and offset, which matters on short cracks. So each free skeleton end e is moved to the model's tip: with u the
   end direction (from e back along the skeleton by about one crack width), the ray e + t u leaves the mask
   at t_exit (first sample whose nearest pixel is background, i.e. at the pixel edge), and the tip is one
   half-width r_end before that: the length gains t_exit - r_end (negative when the skeleton overshot).
   r_end is the median half-width (step 4) over the same end stretch. When the ray leaves the photo before
   it leaves the mask, the crack runs out of the image: it is measured up to the image edge (t_exit, no
   half-width taken off). Adding the end-point distance-transform values instead would measure the outline
   tip to tip (the segment plus one width), 10 % too long for a 60 px crack 6 px wide. A blunt (square)
   end is not a disc's trace: it measures half a width short, like the model's tip of its rounded version.
4. Width at a skeleton pixel p: the Euclidean distance transform D (distance from a mask pixel centre to
   the nearest background pixel centre) is a tent across the crack, r - |offset from the axis|, plus the gap
   between the outline and the next background pixel centre (half a pixel on average). p and its
   4-neighbour q across the crack (the step along the normal's larger component; the normal comes from the
   structure tensor of the skeleton in a 7 x 7 window) straddle the axis, so on average D(p) + D(q) =
   2r - 1 + the two gaps = 2r: width = D(p) + max over the two q of D(q). The one-sample formulas are biased: 2 D(p) - 1
   (exact only for bands an odd number of pixels wide whose skeleton sits on the centre row) is about one
   pixel short for the 2, 6 and 10 px test bands and 1.3 px short at 45 deg; 2 D(p) ranges from 0.5 px
   short to 1.5 px long depending on the band's offset. The two-sample width stays within -0.6..+0.9 px
   of 2r for r from 1 to 7.5 px at all angles and offsets.
5. Width statistics skip skeleton pixels within one half-width of a free or cut end (the outline rounds off
   or is cut there, and an overshooting skeleton runs into the cap) and within 1.5 distance-transform radii
   of a junction (where the inscribed disc is wider than either branch). `max_width` is their maximum;
   `mean_width` their mean weighted by the length each skeleton pixel stands for (1 / max(|cos|, |sin|) of
   its direction), i.e. the mean along the crack. When nothing is left (very short cracks) all skeleton
   pixels are used.

Acceptance (tests/test_quantify.py): straight bands 2, 6 and 10 px wide at 0-90 deg and 60-300 px long
measure within 5 % of the segment's length and within a pixel of the width; arcs, a branched crack, a crack
cut by the image border and the mm scale are tested too. All work is done on the segment's bounding-box crop
(`segment_measures` measures a whole panoptic prediction with these functions).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from .errors import UserInputError

__all__ = ["crack_metrics", "crack_in_box", "empty_crack", "empty_region", "pixel_scale", "region_in_box",
           "region_metrics", "scaled"]

# Vossepoel & Smeulders (1982), "Vector code probability and metrication error in the representation of
# straight lines of finite length": the corner-count chain-code length estimator.
VS_AXIAL, VS_DIAGONAL, VS_CORNER = 0.980, 1.406, 0.091

_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_TENSOR_RADIUS = 3  # the structure tensor's window is 7 x 7 pixels
_RAY_STEP = 0.05  # spacing of the ray's samples: t_exit is resolved to 0.05 px
_JUNCTION_ZONE = 1.5  # width statistics skip this many distance-transform radii around a junction
_MAX_PRUNE_ROUNDS = 5


def crack_metrics(mask: np.ndarray, mm_per_pixel: float | None = None) -> dict[str, Any]:
    """Length, maximum and mean width, area and box of one crack segment (see the module docstring for the
    estimators).

    `mask`: 2-D array, nonzero = the crack. `mm_per_pixel`: None for pixel units, else the scale.
    Returns {"length", "max_width", "mean_width", "area", "bbox": [x, y, w, h] in pixels, "unit": "px" or
    "mm"}; length and widths are in `unit`, area in `unit`^2. An empty mask gives zeros.
    """
    mask = _as_mask(mask)
    scale, unit = pixel_scale(mm_per_pixel)
    box = _bbox_slices(mask)
    if box is None:
        return {**empty_crack(), "unit": unit}
    return scaled(crack_in_box(mask[box], box, mask.shape), scale, unit)


def region_metrics(mask: np.ndarray, mm_per_pixel: float | None = None) -> dict[str, Any]:
    """Area and box of a non-crack defect (spalling, efflorescence, ...): {"area", "bbox", "unit"}.

    Area is the pixel count times `mm_per_pixel`^2 (an unbiased area estimate for a digitised region);
    `bbox` is [x, y, w, h] in pixels. An empty mask gives area 0 and bbox [0, 0, 0, 0].
    """
    mask = _as_mask(mask)
    scale, unit = pixel_scale(mm_per_pixel)
    box = _bbox_slices(mask)
    if box is None:
        return {**empty_region(), "unit": unit}
    return scaled(region_in_box(mask[box], box), scale, unit)


# ----------------------------------------------------------------------------------------------- helpers


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise UserInputError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    return mask if mask.dtype == bool else mask != 0


def pixel_scale(mm_per_pixel: float | None) -> tuple[float, str]:
    """(factor, unit) of a `mm_per_pixel` setting (module docstring, Units); a bad scale is refused here, once."""
    if mm_per_pixel is None:
        return 1.0, "px"
    value = float(mm_per_pixel)
    if not math.isfinite(value) or value <= 0:
        raise UserInputError(f"mm_per_pixel must be a positive number or None (pixels), got {mm_per_pixel!r}")
    return value, "mm"


def scaled(raw: dict[str, Any], scale: float, unit: str) -> dict[str, Any]:
    """Pixel measurements to `unit`: lengths times the scale, areas times its square, boxes unchanged."""
    lengths = {key: raw[key] * scale for key in ("length", "max_width", "mean_width") if key in raw}
    return {**lengths, "area": raw["area"] * scale * scale, "bbox": raw["bbox"], "unit": unit}


def empty_crack() -> dict[str, Any]:
    """The pixel measurements of a crack segment with no pixels (absent from the map)."""
    return {"length": 0.0, "max_width": 0.0, "mean_width": 0.0, "area": 0.0, "bbox": [0, 0, 0, 0]}


def empty_region() -> dict[str, Any]:
    """The pixel measurements of a region segment with no pixels."""
    return {"area": 0.0, "bbox": [0, 0, 0, 0]}


def _bbox_slices(mask: np.ndarray) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _bbox_list(box: tuple[slice, slice]) -> list[int]:
    rows, cols = box
    return [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]


def region_in_box(crop: np.ndarray, box: tuple[slice, slice]) -> dict[str, Any]:
    """Region measurements in pixels of the mask `crop` = mask[box]: its area and box."""
    return {"area": float(np.count_nonzero(crop)), "bbox": _bbox_list(box)}


# ------------------------------------------------------------------------------------------------ cracks


def crack_in_box(crop: np.ndarray, box: tuple[slice, slice], image_shape: tuple[int, int]) -> dict[str, Any]:
    """Crack measurements in pixels of the mask `crop` = mask[box] of an image of `image_shape`."""
    mask = np.pad(crop, 1)  # a background border: the skeleton, distance transform and rays need one
    origin = (box[0].start - 1, box[1].start - 1)  # image coordinates of mask[0, 0]
    dist = ndimage.distance_transform_edt(mask)
    skeleton = _thin(skeletonize(mask))
    skeleton = _prune_spurs(skeleton, dist)
    if not skeleton.any():  # thinning never empties a non-empty mask, but be safe: keep its deepest pixel
        skeleton = np.zeros_like(mask)
        skeleton[np.unravel_index(np.argmax(dist), dist.shape)] = True

    degree, axial, diagonal, corners = _graph(skeleton)
    length = VS_AXIAL * axial + VS_DIAGONAL * diagonal - VS_CORNER * corners
    coords, width, weight = _local_widths(skeleton, dist)
    width_at = {(int(y), int(x)): float(w) for (y, x), w in zip(coords, width)}

    excluded = np.zeros_like(skeleton)
    for y, x in np.argwhere(degree == 1):
        path = _walk(skeleton, degree, (int(y), int(x)), max_steps=2 * math.ceil(dist[y, x]) + 2)
        half_width = 0.5 * float(np.median([width_at[p] for p in path]))
        length += _tip_extension(mask, path, half_width, origin, image_shape)
        _mark_disc(excluded, y, x, half_width)
    for y, x in np.argwhere(degree >= 3):
        _mark_disc(excluded, y, x, _JUNCTION_ZONE * dist[y, x])

    kept = ~excluded[coords[:, 0], coords[:, 1]]
    if not kept.any():
        kept[:] = True
    widths, weights = width[kept], weight[kept]
    return {
        "length": float(length),
        "max_width": float(widths.max()),
        "mean_width": float(np.sum(widths * weights) / np.sum(weights)),
        "area": float(np.count_nonzero(crop)),
        "bbox": _bbox_list(box),
    }


def _shift(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`out[y, x] = array[y + dy, x + dx]`, False/0 outside the array."""
    out = np.zeros_like(array)
    h, w = array.shape
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = array[
        max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


def _thin(skeleton: np.ndarray) -> np.ndarray:
    """Drop L-corner pixels: a pixel whose only two neighbours are a perpendicular pair of 4-neighbours.

    Its two neighbours touch diagonally, so removing it keeps the skeleton connected and turns two axial
    steps (length 2) into one diagonal step (sqrt 2). Two such pixels are never neighbours, so they are all
    removed at once.
    """
    skeleton = skeleton.astype(bool)
    north, south, west, east = (_shift(skeleton, dy, dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    count = sum(_shift(skeleton, dy, dx).astype(np.uint8) for dy, dx in _NEIGHBOURS)
    perpendicular = (north | south) & (west | east)
    four = north.astype(np.uint8) + south + west + east
    return skeleton & ~((count == 2) & (four == 2) & perpendicular)


def _edges(skeleton: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """For each of the 8 directions, the skeleton pixels with a graph edge that way.

    A diagonal edge exists only when neither shared 4-neighbour is in the skeleton: otherwise the two pixels
    are already joined through it, and counting the diagonal too would double-count that step.
    """
    edges = {}
    for dy, dx in _NEIGHBOURS:
        edge = skeleton & _shift(skeleton, dy, dx)
        if dy and dx:
            edge &= ~_shift(skeleton, dy, 0) & ~_shift(skeleton, 0, dx)
        edges[(dy, dx)] = edge
    return edges


def _graph(skeleton: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Degree of every skeleton pixel and the chain-code counts of the whole skeleton graph: axial and
    diagonal edges (each once) and corners (degree-2 pixels whose two edges are not opposite)."""
    edges = _edges(skeleton)
    degree = sum(edge.astype(np.int8) for edge in edges.values())
    axial = sum(int(edges[d].sum()) for d in ((0, 1), (1, 0)))
    diagonal = sum(int(edges[d].sum()) for d in ((1, 1), (1, -1)))
    sum_y = sum(edge.astype(np.int8) * dy for (dy, _), edge in edges.items())
    sum_x = sum(edge.astype(np.int8) * dx for (_, dx), edge in edges.items())
    corners = int(np.count_nonzero((degree == 2) & ((sum_y != 0) | (sum_x != 0))))
    return degree, axial, diagonal, corners


def _neighbours(skeleton: np.ndarray, y: int, x: int) -> list[tuple[int, int]]:
    """Graph neighbours of (y, x), by the edge rule of `_edges` (the skeleton has a background border)."""
    out = []
    for dy, dx in _NEIGHBOURS:
        if skeleton[y + dy, x + dx] and not (dy and dx and (skeleton[y + dy, x] or skeleton[y, x + dx])):
            out.append((y + dy, x + dx))
    return out


def _walk(
    skeleton: np.ndarray, degree: np.ndarray, start: tuple[int, int], max_steps: int
) -> list[tuple[int, int]]:
    """Pixels from the free end `start` along its branch, up to and including the first junction or end
    pixel, or `max_steps` steps."""
    path, previous = [start], None
    while len(path) <= max_steps:
        ahead = [p for p in _neighbours(skeleton, *path[-1]) if p != previous]
        if len(ahead) != 1:
            break
        previous = path[-1]
        path.append(ahead[0])
        if degree[ahead[0]] != 2:
            break
    return path


def _path_length(path: list[tuple[int, int]]) -> float:
    return float(sum(math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(path, path[1:])))


def _prune_spurs(skeleton: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Remove terminal branches no longer than the crack's width at their junction (2 x its distance
    transform): thinning grows them towards corners and bumps of the outline. Repeats until none is left,
    re-thinning the junctions that pruning leaves behind."""
    for _ in range(_MAX_PRUNE_ROUNDS):
        if not skeleton.any():
            break
        degree = _graph(skeleton)[0]
        limit = 2 * float(dist[skeleton].max()) + 2
        spurs = []
        for y, x in np.argwhere(degree == 1):
            path = _walk(skeleton, degree, (int(y), int(x)), max_steps=int(limit) + 1)
            end = path[-1]
            if degree[end] >= 3 and _path_length(path) <= 2 * dist[end]:
                spurs.extend(path[:-1])
        if not spurs:
            break
        skeleton = skeleton.copy()
        skeleton[tuple(np.array(spurs).T)] = False
        skeleton = _thin(skeletonize(skeleton))
    return skeleton


def _local_widths(skeleton: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates [N, 2] of the skeleton pixels, the width at each (D(p) + the larger D of its two
    4-neighbours across the crack) and the length each stands for (1 / max(|cos|, |sin|) of its direction).

    The direction is the principal axis of the skeleton pixels in a 7 x 7 window (second moments about the
    pixel), computed at the skeleton pixels only, so the cost follows the crack's length, not its box.
    """
    coords = np.argwhere(skeleton)
    ys, xs = coords[:, 0], coords[:, 1]
    r = _TENSOR_RADIUS
    padded = np.pad(skeleton, r)
    sxx = np.zeros(len(coords))
    syy = np.zeros(len(coords))
    sxy = np.zeros(len(coords))
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            present = padded[ys + r + dy, xs + r + dx]
            sxx += present * (dx * dx)
            syy += present * (dy * dy)
            sxy += present * (dx * dy)
    theta = 0.5 * np.arctan2(2 * sxy, sxx - syy)  # tangent angle, x right, y down
    cos, sin = np.abs(np.cos(theta)), np.abs(np.sin(theta))
    # the normal (-sin, cos) is mostly vertical when cos >= sin: step to the rows above and below
    across_rows = np.maximum(dist[ys - 1, xs], dist[ys + 1, xs])
    across_cols = np.maximum(dist[ys, xs - 1], dist[ys, xs + 1])
    width = dist[ys, xs] + np.where(cos >= sin, across_rows, across_cols)
    return coords, width, 1.0 / np.maximum(cos, sin)


def _tip_extension(
    mask: np.ndarray,
    path: list[tuple[int, int]],
    half_width: float,
    origin: tuple[int, int],
    image_shape: tuple[int, int],
) -> float:
    """Length from the free skeleton end path[0] to the crack's tip (module docstring, step 3).

    The ray leaves the skeleton end along the branch's end direction; t_exit is where its nearest pixel
    first is background. If that pixel lies outside the image, the crack is cut by the image border and the
    length runs to the edge; otherwise the tip is one half-width before the outline.
    """
    if len(path) < 2:
        return 0.0  # an isolated skeleton pixel: a blob without direction (length 0 under the model)
    (y0, x0), (y1, x1) = path[0], path[-1]
    norm = math.hypot(y0 - y1, x0 - x1)
    uy, ux = (y0 - y1) / norm, (x0 - x1) / norm
    t_exit, (ey, ex) = _ray_exit(mask, y0, x0, uy, ux, reach=4 * half_width + 8)
    image_y, image_x = ey + origin[0], ex + origin[1]
    if not (0 <= image_y < image_shape[0] and 0 <= image_x < image_shape[1]):
        return t_exit  # the crack runs out of the photo: measure to its edge
    return t_exit - half_width


def _ray_exit(
    mask: np.ndarray, y: float, x: float, uy: float, ux: float, reach: float
) -> tuple[float, tuple[int, int]]:
    """Distance along the ray (y, x) + t (uy, ux) to its first background pixel (nearest-pixel lookup, so the
    crossing is at that pixel's edge), and that pixel. Outside the array counts as background.

    Samples sit half a step off the pixel edges (which lie at half-integers on axial rays), each standing for
    the middle of its step. The ray is sampled to `reach` first and further only when it has not left yet.
    """
    limit = mask.shape[0] + mask.shape[1]
    while True:
        t = (np.arange(int(min(reach, limit) / _RAY_STEP) + 1) + 0.5) * _RAY_STEP
        ys, xs = np.rint(y + t * uy).astype(int), np.rint(x + t * ux).astype(int)
        in_array = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
        inside = np.zeros_like(in_array)
        inside[in_array] = mask[ys[in_array], xs[in_array]]
        if not inside.all() or reach >= limit:
            first = int(np.argmin(inside))
            return float(t[first]) - 0.5 * _RAY_STEP, (int(ys[first]), int(xs[first]))
        reach *= 2


def _mark_disc(target: np.ndarray, y: int, x: int, radius: float) -> None:
    """Set the pixels whose centre is within `radius` of (y, x)."""
    r = int(math.ceil(radius))
    y_lo, y_hi = max(0, y - r), min(target.shape[0], y + r + 1)
    x_lo, x_hi = max(0, x - r), min(target.shape[1], x + r + 1)
    yy, xx = np.ogrid[y_lo:y_hi, x_lo:x_hi]
    target[y_lo:y_hi, x_lo:x_hi] |= (yy - y) ** 2 + (xx - x) ** 2 <= radius * radius

"""Crack and region measurements against shapes of known length and width.

Bands are drawn exactly as the acceptance test defines them: the pixels whose centre lies less than r from a
segment (or an arc), computed with numpy, so a band of "width 6" is the set within distance 3 of its axis.
Segment end points sit off the pixel grid (a fixed sub-pixel offset per case), as real cracks do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_detr_seg.errors import UserInputError
from hf_detr_seg.quantify import crack_metrics, region_metrics

ANGLES = (0, 15, 30, 45, 60, 77, 90)
LENGTHS = (60, 150, 300)


def segment_band(shape: tuple[int, int], a: tuple[float, float], b: tuple[float, float], r: float) -> np.ndarray:
    """Pixels (centres at integer (x, y)) whose distance to the segment a-b, points as (x, y), is < r."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return (xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2 < r * r


def arc_band(
    shape: tuple[int, int], centre: tuple[float, float], radius: float, start: float, stop: float, r: float
) -> np.ndarray:
    """Pixels whose distance to the circular arc (angles start..stop radians, counter-clockwise in x/y) is < r."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    px, py = xx - centre[0], yy - centre[1]
    phi = np.mod(np.arctan2(py, px) - start, 2 * np.pi)
    on_arc = phi <= stop - start
    to_arc = np.abs(np.hypot(px, py) - radius)
    ends = [(radius * math.cos(angle), radius * math.sin(angle)) for angle in (start, stop)]
    to_ends = np.minimum(*(np.hypot(px - ex, py - ey) for ex, ey in ends))
    return np.where(on_arc, to_arc, to_ends) < r


def straight_crack(length: float, angle_deg: float, r: float) -> np.ndarray:
    """A band around a segment of `length` at `angle_deg` (counter-clockwise from +x, image y down), centred
    in an image with room for its caps, the centre off the grid by a sub-pixel amount that varies per case."""
    theta = math.radians(angle_deg)
    ux, uy = math.cos(theta), -math.sin(theta)
    size = int(length + 4 * r + 20)
    offset = 0.137 + 0.29 * ((angle_deg * 7 + length) % 3)  # deterministic, different per case
    cx, cy = size / 2 + offset - 0.5, size / 2 + 0.5 - offset / 2
    half = length / 2
    return segment_band((size, size), (cx - ux * half, cy - uy * half), (cx + ux * half, cy + uy * half), r)


def assert_crack(result: dict, length: float, width: float) -> None:
    assert result["length"] == pytest.approx(length, rel=0.05), result
    assert abs(result["max_width"] - width) <= 1.0, result
    assert abs(result["mean_width"] - width) <= 1.0, result
    assert result["unit"] == "px"


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("angle", ANGLES)
def test_band_6px_any_angle_and_length(angle: float, length: float) -> None:
    assert_crack(crack_metrics(straight_crack(length, angle, 3.0)), length, 6.0)


@pytest.mark.parametrize("angle", ANGLES)
@pytest.mark.parametrize("r", [1.0, 5.0])
def test_bands_2px_and_10px(r: float, angle: float) -> None:
    for length in (60, 150):
        assert_crack(crack_metrics(straight_crack(length, angle, r)), length, 2 * r)


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.5, 0.75])
def test_sub_pixel_position_does_not_matter(offset: float) -> None:
    # odd (5 px) and even (6 px) pixel widths of the same band; also non-integer radius
    for r in (2.5, 3.0, 3.5):
        mask = segment_band((60, 200), (30.3, 30 + offset), (170.3, 30 + offset), r)
        assert_crack(crack_metrics(mask), 140.0, 2 * r)


@pytest.mark.parametrize(("radius", "degrees"), [(60, 90), (100, 120), (150, 60)])
def test_arc_length_is_radius_times_angle(radius: float, degrees: float) -> None:
    size = 2 * radius + 40
    centre = (size / 2 + 0.3, size / 2 - 0.2)
    mask = arc_band((size, size), centre, radius, 0.4, 0.4 + math.radians(degrees), 3.0)
    assert_crack(crack_metrics(mask), radius * math.radians(degrees), 6.0)


def test_branched_crack_length_is_both_paths() -> None:
    main = segment_band((180, 260), (20.3, 140.4), (240.3, 140.4), 3.0)
    theta = math.radians(50)
    start = (110.3, 140.4)
    end = (start[0] + 110 * math.cos(theta), start[1] - 110 * math.sin(theta))
    branch = segment_band((180, 260), start, end, 3.0)
    assert_crack(crack_metrics(main | branch), 220.0 + 110.0, 6.0)


@pytest.mark.parametrize("bump", [2.5, 3.5, 4.5])
def test_bumps_of_the_outline_are_pruned(bump: float) -> None:
    # a disc bulging out of one side gives the skeleton a spur towards it: no crack branch, no extra length
    band = segment_band((60, 200), (30.3, 30.2), (170.3, 30.2), 3.0)
    yy, xx = np.mgrid[0:60, 0:200]
    bumped = band | ((xx - 100.3) ** 2 + (yy - 30.2 - bump) ** 2 < 9)
    assert crack_metrics(bumped)["length"] == pytest.approx(crack_metrics(band)["length"], abs=0.5)
    assert_crack(crack_metrics(bumped), 140.0, 6.0)


def test_crack_cut_by_the_image_border_is_measured_to_the_edge() -> None:
    # the segment starts outside the photo: the visible crack runs from the image edge (x = -0.5) to x = 120
    mask = segment_band((80, 200), (-40.0, 40.3), (120.0, 40.3), 3.0)
    result = crack_metrics(mask)
    assert_crack(result, 120.5, 6.0)
    assert result["bbox"][0] == 0


def test_mm_scale_halves_lengths_and_quarters_area() -> None:
    mask = straight_crack(150, 30, 3.0)
    px = crack_metrics(mask)
    mm = crack_metrics(mask, mm_per_pixel=0.5)
    assert mm["unit"] == "mm" and px["unit"] == "px"
    for key in ("length", "max_width", "mean_width"):
        assert mm[key] == pytest.approx(px[key] * 0.5)
    assert mm["area"] == pytest.approx(px["area"] * 0.25)
    assert mm["bbox"] == px["bbox"]
    assert px["area"] == mask.sum()
    ys, xs = np.nonzero(mask)
    assert px["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_empty_and_tiny_masks() -> None:
    empty = np.zeros((40, 50), dtype=bool)
    assert crack_metrics(empty) == {
        "length": 0.0, "max_width": 0.0, "mean_width": 0.0, "area": 0.0, "bbox": [0, 0, 0, 0], "unit": "px"
    }
    assert region_metrics(empty, mm_per_pixel=2.0) == {"area": 0.0, "bbox": [0, 0, 0, 0], "unit": "mm"}
    dot = empty.copy()
    dot[10, 12] = True
    result = crack_metrics(dot)
    assert result["length"] == 0.0 and result["area"] == 1.0 and result["bbox"] == [12, 10, 1, 1]
    assert result["max_width"] == pytest.approx(1.0)
    corner = np.zeros((5, 5), dtype=np.uint8)
    corner[0, :3] = 1  # touching the image border on two sides
    result = crack_metrics(corner)
    assert 2.0 <= result["length"] <= 3.5 and result["area"] == 3.0


def test_region_metrics() -> None:
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:20, 5:35] = True
    assert region_metrics(mask) == {"area": 300.0, "bbox": [5, 10, 30, 10], "unit": "px"}
    assert region_metrics(mask, mm_per_pixel=0.5) == {"area": 75.0, "bbox": [5, 10, 30, 10], "unit": "mm"}


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_refused(bad: float) -> None:
    with pytest.raises(UserInputError, match="mm_per_pixel"):
        crack_metrics(np.ones((3, 3), bool), mm_per_pixel=bad)


def test_mask_must_be_2d() -> None:
    with pytest.raises(UserInputError, match="2-D"):
        region_metrics(np.ones((2, 3, 3), bool))

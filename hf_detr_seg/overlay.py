"""Pictures and tables of a prediction: a coloured overlay on the photo, and the run's CSV report.

`draw_overlay` draws, with OpenCV, on a copy of the photo: each segment's pixels blended with its class colour
(`alpha`), its outline in the full colour, a "class score" tag at its top-left corner, and a legend box (top
right) listing the classes drawn. Classes in `skip_labels` (e.g. the background surface, which would tint the
whole photo) are not drawn at all. Sizes of lines and text follow the image's size, so a 4000 x 3000 photo
and a 200-px crop both stay readable.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import cv2
import numpy as np

# report.csv's columns when the run found no defect (otherwise the rows' own keys, in order).
REPORT_COLUMNS = ("image", "segment_id", "part", "class", "score", "area_px", "area", "bbox_x", "bbox_y", "bbox_w",
                  "bbox_h", "length", "max_width", "mean_width", "unit")
_FALLBACK = (255, 0, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FILL_ROWS = 256  # rows blended at a time


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (Rec. 601 luma)."""
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_overlay(
    image: np.ndarray,
    result,
    colors: Mapping[str, tuple[int, int, int]],
    alpha: float = 0.45,
    skip_labels: Iterable[str] = (),
    legend: bool = True,
) -> np.ndarray:
    """An RGB uint8 copy of `image` (H x W x 3, the result's size) with the segments of `result` (a
    `SegmentationResult`) drawn in their class colours (`colors`: class name -> RGB; a missing class is
    magenta). `alpha` is the opacity of the fill (0: outlines only)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8 RGB, got {image.shape} {image.dtype}")
    if tuple(image.shape[:2]) != tuple(result.id_map.shape):
        raise ValueError(f"image is {image.shape[:2]} but the prediction {result.id_map.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    skipped = set(skip_labels)
    drawn = [s for s in result.segments if s.label not in skipped]
    out = np.ascontiguousarray(image.copy())
    if not drawn:
        return out
    color_of = {s.label: tuple(int(c) for c in colors.get(s.label, _FALLBACK)) for s in drawn}
    if alpha > 0:
        _blend_fill(out, result.id_map, drawn, color_of, alpha)
    short = min(out.shape[:2])
    _draw_outlines(out, result.id_map, drawn, color_of, thickness=max(1, round(short / 400)))
    scale = max(0.3, short / 900)
    text_thickness = max(1, round(scale * 1.5))
    pad = max(1, round(3 * scale))
    _draw_tags(out, drawn, color_of, scale, text_thickness, pad)
    if legend:
        _draw_legend(out, list(dict.fromkeys(s.label for s in drawn)), color_of, scale, text_thickness, pad)
    return out


def _blend_fill(out: np.ndarray, id_map: np.ndarray, drawn: list, color_of: dict, alpha: float) -> None:
    """Each drawn segment's pixels blended with its colour: one lookup from segment id to colour, a band of rows
    at a time (temporaries of a few MiB, whatever the photo's size); only drawn pixels are touched."""
    lut = np.zeros((int(id_map.max(initial=0)) + 1, 3), np.float32)
    use = np.zeros(len(lut), bool)
    for segment in drawn:
        lut[segment.id] = color_of[segment.label]
        use[segment.id] = True
    for start in range(0, out.shape[0], _FILL_ROWS):
        ids = id_map[start : start + _FILL_ROWS]
        band = out[start : start + _FILL_ROWS]
        pixels = use[ids]
        if pixels.any():
            blended = band[pixels].astype(np.float32) * (1 - alpha) + lut[ids[pixels]] * alpha
            band[pixels] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _draw_outlines(out: np.ndarray, id_map: np.ndarray, drawn: list, color_of: dict, thickness: int) -> None:
    """Each drawn segment's outline in its full colour, traced on the segment's box only (cheap on large
    photos)."""
    for segment in drawn:
        x, y, w, h = segment.bbox
        x0, y0 = max(0, x - 1), max(0, y - 1)
        crop = (id_map[y0 : y + h + 1, x0 : x + w + 1] == segment.id).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
        cv2.drawContours(out, contours, -1, color_of[segment.label], thickness, lineType=cv2.LINE_AA)


def _draw_tags(out: np.ndarray, drawn: list, color_of: dict, scale: float, thickness: int, pad: int) -> None:
    """"class score" on a box of the class colour, above the segment's box when there is room."""
    width = out.shape[1]
    for segment in drawn:
        text = f"{segment.label} {segment.score:.2f}"
        (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        x, y = segment.bbox[:2]
        box_h = th + baseline + 2 * pad
        top = y - box_h if y - box_h >= 0 else y
        left = min(max(0, x), max(0, width - tw - 2 * pad))
        color = color_of[segment.label]
        cv2.rectangle(out, (left, top), (left + tw + 2 * pad, top + box_h), color, thickness=-1)
        cv2.putText(out, text, (left + pad, top + pad + th), _FONT, scale, _text_color(color), thickness,
                    lineType=cv2.LINE_AA)


def _draw_legend(out: np.ndarray, labels: list[str], color_of: dict, scale: float, thickness: int, pad: int) -> None:
    """A white, slightly translucent box at the top right: one colour swatch and class name per row."""
    height, width = out.shape[:2]
    sizes = [cv2.getTextSize(label, _FONT, scale, thickness) for label in labels]
    line = max(th + baseline for (_, th), baseline in sizes) + 2 * pad
    swatch = line - 2 * pad
    box_w = min(width, 3 * pad + swatch + max(tw for (tw, _), _ in sizes) + 2 * pad)
    box_h = min(height, line * len(labels) + 2 * pad)
    x0 = width - box_w
    region = out[0:box_h, x0:width]
    region[:] = np.rint(region.astype(np.float32) * 0.25 + 255 * 0.75).astype(np.uint8)
    cv2.rectangle(out, (x0, 0), (width - 1, box_h - 1), (0, 0, 0), 1)
    for row, (label, ((_, th), baseline)) in enumerate(zip(labels, sizes)):
        top = pad + row * line
        cv2.rectangle(out, (x0 + 2 * pad, top + pad), (x0 + 2 * pad + swatch, top + pad + swatch),
                      color_of[label], thickness=-1)
        cv2.putText(out, label, (x0 + 3 * pad + swatch, top + pad + th), _FONT, scale, (0, 0, 0), thickness,
                    lineType=cv2.LINE_AA)


def write_report_csv(rows: list[dict], path: str | Path) -> Path:
    """One CSV row per dict; columns are the rows' keys in order of first appearance (`REPORT_COLUMNS` when
    there are no rows); missing cells are empty. Written to a temporary name, then renamed."""
    path = Path(path)
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(REPORT_COLUMNS)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

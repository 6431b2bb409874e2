"""What `predict` writes for each image, and how a later run knows an image's outputs are complete.

Per image, into the output folder: `<stem>_panoptic.png` (COCO-panoptic id encoding, the image's size),
`<stem>_overlay.png` (the photo with its segments drawn) and `<stem>.json` (the run's settings and the segments
with class, score, area, box and `segment_measures.measure_segments`' measurements). Each file is written under a
temporary name and renamed once all three are written, the JSON last: an image whose JSON is there has all its
files, whole. The JSON holds everything the run's `report.csv` says about the image, so the report rows of an
image predicted by an earlier run (`--skip-existing`) come from its JSON, by the same function as a fresh
image's rows come from the document before it is written: the report lists every image either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..coco_export import segment_annotations
from ..data.panoptic import read_panoptic_png, write_panoptic_png
from ..labels import LabelMap
from .results import SegmentationResult

REPORT_FILE = "report.csv"
# Keys of `segment_measures.measure_segments`' entries that repeat what the segment already says.
_SEGMENT_KEYS = {"id", "label_id", "class_name", "score", "bbox"}


def output_files(out: Path, stem: str) -> dict[str, Path]:
    """The three files of one image (the JSON last: it is renamed into place last)."""
    return {"png": out / f"{stem}_panoptic.png", "overlay": out / f"{stem}_overlay.png", "json": out / f"{stem}.json"}


def measure(result: SegmentationResult, label_map: LabelMap, mm_per_pixel: float | None) -> dict[int, dict]:
    """Measurements by segment id from `segment_measures.measure_segments` (what each class's role asks: crack
    length and widths, per connected crack for a stuff crack class; areas in the report's unit), without the
    keys that repeat the segment's own fields."""
    from ..segment_measures import measure_segments

    segments = [{"id": s.id, "label_id": s.label_id, "score": s.score} for s in result.segments]
    measured = measure_segments(result.id_map, segments, label_map, mm_per_pixel=mm_per_pixel)
    return {int(m["id"]): {k: v for k, v in m.items() if k not in _SEGMENT_KEYS} for m in measured}


def image_document(path: Path, result: SegmentationResult, label_map: LabelMap, settings: dict,
                   mm_per_pixel: float | None) -> dict[str, Any]:
    """The `<stem>.json` document of one image: its size, the run's settings, every segment measured."""
    measurements = measure(result, label_map, mm_per_pixel)
    segments = [
        {"id": s.id, "class": s.label, "category_id": label_map.category_id(s.label_id),
         "isthing": label_map.classes[s.label_id].isthing, "score": s.score, "area": s.area, "bbox": s.bbox,
         "measurements": measurements.get(s.id, {})}
        for s in result.segments
    ]
    return {"image": str(path), "height": result.image_size[0], "width": result.image_size[1], **settings,
            "segments": segments}


def report_rows(document: dict[str, Any], background: set[str]) -> list[dict[str, Any]]:
    """The report.csv rows of one image: one per segment but the background class's, and for a stuff crack
    segment (measurements with "cracks") one per connected crack, numbered in `part` (empty for other rows).
    `area_px` and the box are in pixels; `area` (unit^2) and, for cracks, `length`, `max_width`, `mean_width`
    in the run's unit (empty cells for other classes), rounded to 4 decimals."""
    rows = []
    for segment in document["segments"]:
        if segment["class"] in background:
            continue
        measured = segment["measurements"]
        if "cracks" in measured:
            parts = [(number, crack, crack["pixels"]) for number, crack in enumerate(measured["cracks"], start=1)]
        else:
            parts = [("", {**measured, "bbox": segment["bbox"]}, segment["area"])]
        for number, values, pixels in parts:
            rows.append({"image": document["image"], "segment_id": segment["id"], "part": number,
                         "class": segment["class"], "score": segment["score"], "area_px": pixels,
                         **_box_and_measures(values), "unit": document["unit"]})
    return rows


def _box_and_measures(values: dict[str, Any]) -> dict[str, Any]:
    """The box columns of one row and its measurements rounded to 4 decimals (empty where not measured)."""
    x, y, w, h = values["bbox"]
    measured = {key: values.get(key, "") for key in ("area", "length", "max_width", "mean_width")}
    measured = {key: round(value, 4) if isinstance(value, float) else value for key, value in measured.items()}
    return {"area": measured.pop("area"), "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h, **measured}


def coco_annotations(id_map: np.ndarray, document: dict[str, Any]) -> list[dict[str, Any]]:
    """One image's segments as COCO annotations (`CocoInstancesWriter.add_annotations` numbers them)."""
    segments = [{"id": s["id"], "category_id": s["category_id"], "score": s["score"]} for s in document["segments"]]
    stats = {s["id"]: (s["area"], s["bbox"]) for s in document["segments"]}  # no pass over a 24-MP map for them
    return segment_annotations(id_map, segments, 0, stats=stats)


def write_image_outputs(out: Path, stem: str, id_map: np.ndarray, document: dict, overlay: np.ndarray) -> None:
    """The three files of one image, each written under a temporary name, renamed only once all are written."""
    targets = output_files(out, stem)
    temporary = {key: path.with_name(f".{path.name}.tmp-{os.getpid()}") for key, path in targets.items()}
    try:
        write_panoptic_png(temporary["png"], id_map)
        Image.fromarray(overlay).save(temporary["overlay"], format="PNG")
        temporary["json"].write_text(json.dumps(document, indent=1, default=json_default) + "\n")
        for key, path in targets.items():  # the JSON last: it marks the image as done
            os.replace(temporary[key], path)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def complete_document(out: Path, stem: str, path: Path, settings: dict) -> dict[str, Any] | None:
    """The JSON document of an image an earlier run predicted with the same settings, when all its files are
    there; None when the image must be predicted (again)."""
    files = output_files(out, stem)
    if not all(f.is_file() for f in files.values()):
        return None
    try:
        document = json.loads(files["json"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("image") != str(path) or "segments" not in document:
        return None
    return document if all(document.get(key) == value for key, value in settings.items()) else None


def saved_id_map(out: Path, stem: str) -> np.ndarray:
    """The id map an earlier run saved for an image (for the COCO export of a skipped image)."""
    return read_panoptic_png(output_files(out, stem)["png"])


def json_default(value: Any) -> Any:
    """numpy scalars and arrays as JSON values (for `json.dumps(default=...)`)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")

"""COCO-panoptic files: id <-> RGB encoding, PNG and JSON I/O, and validation of a built folder.

Layout of a dataset folder (what `builder` writes and every later step reads):
```
OUT/images/{train,val}/<image files>
OUT/annotations/panoptic_{train,val}.json
OUT/annotations/panoptic_{train,val}/<stem>.png     segment id = R + 256*G + 256^2*B, 0 = void
OUT/labels.yaml                                     the resolved label map
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import DataError
from ..labels import LabelMap, LabelMapError

SPLITS = ("train", "val")


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """Segment ids -> RGB (R + 256*G + 256^2*B): the three low bytes of each little-endian uint32 id.

    One 3-byte copy per pixel (an int32 or uint32 map is only reinterpreted), so a 48-megapixel map needs
    144 MiB here, not the 1.5 GiB of shifting and stacking uint32 planes.
    """
    ids = np.ascontiguousarray(id_map)
    if ids.dtype.kind in "iu" and ids.dtype.itemsize == 4:
        ids = ids.view(ids.dtype.str[0] + "u4")  # same bytes, read as unsigned
    ids = ids.astype("<u4", copy=False)  # no copy when already little-endian
    return np.ascontiguousarray(ids.view(np.uint8).reshape(*ids.shape, 4)[..., :3])


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """RGB -> segment ids (uint32)."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def write_panoptic_png(path: Path, id_map: np.ndarray) -> None:
    Image.fromarray(id_to_rgb(id_map), mode="RGB").save(path, format="PNG")


def _bgr_to_id(bgr: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR(A) pixels -> segment ids (uint32), in one pass: the bytes R, G, B, 0 of each pixel are
    read as one little-endian uint32."""
    rgb0 = np.zeros(bgr.shape[:2] + (4,), dtype=np.uint8)
    cv2.mixChannels([bgr], [rgb0], [2, 0, 1, 1, 0, 2])
    return rgb0.view("<u4")[..., 0]


def read_panoptic_png(path: Path) -> np.ndarray:
    """A COCO-panoptic PNG as segment ids (uint32, R + 256*G + 256^2*B; 0 = void).

    8-bit RGB(A) files, which every panoptic tool writes, are decoded by OpenCV (faster than PIL, and it releases
    the GIL, so `pq_compute_folders` reads in threads); other modes (palette, grey, 16-bit) through PIL's RGB
    conversion. Both give the same ids.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if bgr is not None and bgr.dtype == np.uint8 and bgr.ndim == 3 and bgr.shape[2] in (3, 4):
            return _bgr_to_id(bgr)
        with Image.open(path) as img:
            return rgb_to_id(np.asarray(img.convert("RGB")))
    except (OSError, ValueError, cv2.error) as err:
        raise DataError(f"{path}: cannot read panoptic PNG ({err})") from None


def class_map_from_segments(id_map: np.ndarray, segments: list[dict], class_of) -> np.ndarray:
    """Segment-id map -> class-index map (-1 where no segment); `class_of(segment)` gives a segment's class."""
    lookup = np.full(int(id_map.max(initial=0)) + 1, -1, dtype=np.int64)
    for seg in segments:
        if seg["id"] < len(lookup):
            lookup[seg["id"]] = class_of(seg)
    return lookup[id_map]


def annotation_json(root: Path, split: str) -> Path:
    return root / "annotations" / f"panoptic_{split}.json"


def annotation_folder(root: Path, split: str) -> Path:
    return root / "annotations" / f"panoptic_{split}"


def image_folder(root: Path, split: str) -> Path:
    return root / "images" / split


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (same data -> same bytes), so two builds can be compared byte for byte."""
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def segment_stats(id_map: np.ndarray) -> dict[int, tuple[int, tuple[int, int, int, int]]]:
    """Area and tight `[x, y, w, h]` box of every non-zero id in a segment-id map."""
    ids, dense = np.unique(id_map, return_inverse=True)
    dense = dense.reshape(id_map.shape) + 1
    areas = np.bincount(dense.ravel(), minlength=len(ids) + 1)
    stats = {}
    for position, box in enumerate(ndimage.find_objects(dense)):
        segment_id = int(ids[position])
        if segment_id == 0 or box is None:
            continue
        rows, cols = box
        stats[segment_id] = (
            int(areas[position + 1]),
            (cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start),
        )
    return stats


@dataclass
class ValidationReport:
    """What `validate_dataset` found: problems (empty when valid) and counts per split."""

    problems: list[str] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_dataset_label_map(root: Path) -> LabelMap:
    """The label map a built dataset carries (`OUT/labels.yaml`)."""
    path = root / "labels.yaml"
    if not path.is_file():
        raise DataError(f"{root}: not a dataset built by hf-detr-seg (missing labels.yaml)")
    return LabelMap.from_yaml(path)


def validate_dataset(root: Path, max_problems: int = 50) -> ValidationReport:
    """Check a dataset folder against the COCO-panoptic rules.

    Ids in each PNG equal the ids in `segments_info`; areas and boxes are exact; category ids are known;
    each stuff category is at most one segment per image; image files exist with the PNG's size; the
    `categories` table equals the label map's.
    """
    root = Path(root)
    report = ValidationReport()
    try:
        label_map = load_dataset_label_map(root)
    except (DataError, LabelMapError) as err:
        report.problems.append(str(err))
        return report
    categories = {c["id"]: c for c in label_map.coco_categories()}
    for split in SPLITS:
        json_path = annotation_json(root, split)
        if not json_path.is_file():
            continue
        try:
            data = read_json(json_path)
        except DataError as err:
            report.problems.append(str(err))
            continue
        problems = _validate_split(root, split, data, categories)
        report.problems.extend(problems)
        report.images[split] = len(data.get("images", []))
        report.segments[split] = sum(len(a.get("segments_info", [])) for a in data.get("annotations", []))
        if len(report.problems) >= max_problems:
            break
    if not report.images:
        report.problems.append(f"{root}: no annotations/panoptic_{{train,val}}.json found")
    report.problems = report.problems[:max_problems]
    return report


def _validate_split(root: Path, split: str, data: dict, categories: dict[int, dict]) -> list[str]:
    json_path = annotation_json(root, split)
    problems: list[str] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            return [f"{json_path}: field `{key}` missing or not a list"]
    table = {c.get("id"): c for c in data["categories"]}
    if table != categories:
        problems.append(f"{json_path}: `categories` differ from the label map in labels.yaml")
    images = {img.get("id"): img for img in data["images"]}
    if len(images) != len(data["images"]):
        problems.append(f"{json_path}: duplicate image ids")
    seen_images = set()
    for ann in data["annotations"]:
        where = f"{json_path}: annotation for {ann.get('file_name')!r}"
        image = images.get(ann.get("image_id"))
        if image is None:
            problems.append(f"{where}: image_id {ann.get('image_id')!r} is not in `images`")
            continue
        seen_images.add(ann["image_id"])
        image_path = image_folder(root, split) / image["file_name"]
        if not image_path.is_file():
            problems.append(f"{where}: image file {image_path} missing")
        png_path = annotation_folder(root, split) / ann["file_name"]
        if not png_path.is_file():
            problems.append(f"{where}: panoptic PNG {png_path} missing")
            continue
        id_map = read_panoptic_png(png_path)
        if id_map.shape != (image["height"], image["width"]):
            problems.append(
                f"{png_path}: size {id_map.shape[1]}x{id_map.shape[0]} differs from the image's "
                f"{image['width']}x{image['height']}"
            )
        problems.extend(_validate_segments(png_path, ann["segments_info"], segment_stats(id_map), categories))
    missing = set(images) - seen_images
    if missing:
        problems.append(f"{json_path}: {len(missing)} image(s) have no annotation, e.g. id {sorted(missing)[0]!r}")
    return problems


def _validate_segments(png_path: Path, segments: list[dict], stats: dict, categories: dict) -> list[str]:
    problems = []
    listed = [s.get("id") for s in segments]
    if len(set(listed)) != len(listed):
        problems.append(f"{png_path}: duplicate segment ids in segments_info")
    if set(listed) != set(stats):
        only_json = sorted(set(listed) - set(stats))
        only_png = sorted(set(stats) - set(listed))
        problems.append(f"{png_path}: ids only in JSON {only_json[:5]}, only in PNG {only_png[:5]}")
    stuff_seen: set[int] = set()
    for seg in segments:
        where = f"{png_path}: segment {seg.get('id')}"
        category = categories.get(seg.get("category_id"))
        if category is None:
            problems.append(f"{where}: unknown category_id {seg.get('category_id')!r}")
            continue
        if not category["isthing"]:
            if seg["category_id"] in stuff_seen:
                problems.append(f"{where}: stuff category {category['name']!r} has more than one segment")
            stuff_seen.add(seg["category_id"])
        if seg.get("iscrowd") not in (0, 1):
            problems.append(f"{where}: iscrowd must be 0 or 1")
        if seg.get("id") in stats:
            area, bbox = stats[seg["id"]]
            if seg.get("area") != area:
                problems.append(f"{where}: area {seg.get('area')} but the PNG has {area} pixels")
            if list(seg.get("bbox", [])) != list(bbox):
                problems.append(f"{where}: bbox {seg.get('bbox')} but the tight box is {list(bbox)}")
    return problems

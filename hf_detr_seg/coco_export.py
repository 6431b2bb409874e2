"""COCO instances files from panoptic id maps: predictions to review in CVAT, built datasets for other tools.

One function, `segment_annotations`, turns an id map and its segments into COCO annotations, for both
`predict --coco-json` and `export-coco`: every segment, thing or stuff, is one annotation of its class's
category, its pixels as compressed RLE (exact: importing the file with `build-dataset --annotations` gives the
same pixels back), with `area`, the tight `bbox`, `iscrowd` 0 (COCO evaluation and detection libraries ignore
crowd regions; CVAT imports RLE either way) and, for predictions, `score`. The categories are the label map's
classes, named as the model's classes and numbered with the dataset's category ids, so a re-import maps them
back without aliases. Images are named by file name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .data.panoptic import (
    SPLITS,
    annotation_folder,
    annotation_json,
    load_dataset_label_map,
    read_json,
    read_panoptic_png,
    segment_stats,
)
from .errors import DataError
from .labels import LabelMap


def coco_categories(label_map: LabelMap) -> list[dict[str, Any]]:
    """The label map's classes as COCO instances categories (stuff included, marked by `isthing` 0)."""
    return [
        {"id": c.category_id, "name": c.name, "supercategory": c.supercategory, "isthing": int(c.isthing)}
        for c in label_map.classes
    ]


def segment_annotations(
    id_map: np.ndarray,
    segments: Iterable[dict[str, Any]],
    image_id: int,
    first_id: int = 1,
    stats: dict[int, tuple[int, Any]] | None = None,
) -> list[dict[str, Any]]:
    """COCO annotations (ids from `first_id`) of the segments of one id map.

    Each segment is a dict with `id` (its value in `id_map`), `category_id`, and optionally `score` and
    `iscrowd`; segments without a pixel are left out. `stats`: each id's (area, [x, y, w, h]) when the caller
    has them (a prediction does), else `data.panoptic.segment_stats` of the map.
    """
    if stats is None:
        stats = segment_stats(id_map)
    height, width = id_map.shape
    annotations = []
    for segment in segments:
        if segment["id"] not in stats:
            continue
        area, bbox = stats[segment["id"]]
        rle = mask_utils.encode(np.asfortranarray(id_map == segment["id"], dtype=np.uint8))
        annotation = {
            "id": first_id + len(annotations),
            "image_id": image_id,
            "category_id": int(segment["category_id"]),
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [int(v) for v in bbox],
            "iscrowd": int(segment.get("iscrowd", 0)),
        }
        if segment.get("score") is not None:
            annotation["score"] = round(float(segment["score"]), 6)
        annotations.append(annotation)
    return annotations


class CocoInstancesWriter:
    """Collects images and their segments; `write` saves one COCO instances file (temporary file, then rename)."""

    def __init__(self, label_map: LabelMap, description: str = "hf-detr-seg") -> None:
        self.label_map = label_map
        self.description = description
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, file_name: str, id_map: np.ndarray, segments: Iterable[dict[str, Any]]) -> None:
        """One image (`file_name` as tools will match it) and its segments (see `segment_annotations`)."""
        height, width = id_map.shape
        self.add_annotations(file_name, height, width, segment_annotations(id_map, segments, 0))

    def add_annotations(self, file_name: str, height: int, width: int, annotations: list[dict[str, Any]]) -> None:
        """One image and its annotations made elsewhere by `segment_annotations` (e.g. by another process):
        image and annotation ids are given here, in the order images are added."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        first_id = len(self.annotations) + 1
        self.annotations += [{**a, "id": first_id + k, "image_id": image_id} for k, a in enumerate(annotations)]

    def document(self) -> dict[str, Any]:
        return {
            "info": {"description": self.description},
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": coco_categories(self.label_map),
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            temporary.write_text(json.dumps(self.document(), indent=1) + "\n")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path


def export_dataset(
    dataset_dir: str | Path, out_json: str | Path, split: str | None = None, things_only: bool = False
) -> dict[str, int]:
    """Write a built panoptic dataset as one COCO instances file; returns {"images", "annotations"}.

    `split` None takes every split, images named `<split>/<file>` (relative to `DATASET/images`); a single split
    names them `<file>` (relative to `DATASET/images/<split>`), the layout detection libraries expect.
    `things_only` leaves stuff segments (the surface) out, for detection-only libraries.
    """
    root = Path(dataset_dir)
    label_map = load_dataset_label_map(root)
    if split is not None and split not in SPLITS:
        raise DataError(f"--split: {split!r} is not one of {list(SPLITS)}")
    thing_ids = {c.category_id for c in label_map.classes if c.isthing}
    writer = CocoInstancesWriter(label_map, description=f"hf-detr-seg export of {root.name}")
    for name in SPLITS if split is None else (split,):
        json_path = annotation_json(root, name)
        if not json_path.is_file():
            if split is not None:
                raise DataError(f"{json_path}: not found (no {split} split in {root})")
            continue
        data = read_json(json_path)
        images = {image["id"]: image for image in data["images"]}
        for annotation in data["annotations"]:
            image = images[annotation["image_id"]]
            id_map = read_panoptic_png(annotation_folder(root, name) / annotation["file_name"])
            segments = [s for s in annotation["segments_info"] if not things_only or s["category_id"] in thing_ids]
            writer.add(image["file_name"] if split else f"{name}/{image['file_name']}", id_map, segments)
    writer.write(out_json)
    return {"images": len(writer.images), "annotations": len(writer.annotations)}

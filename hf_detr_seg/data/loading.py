"""A built dataset folder -> `datasets.DatasetDict` (image, panoptic PNG, segments_info).

The DatasetDict is how a built folder is inspected, shared with `push_to_hub`, and fed to training.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import DataError
from .panoptic import SPLITS, annotation_folder, annotation_json, image_folder, load_dataset_label_map, read_json

SEGMENT_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("int64"),
        "file_name": datasets.Value("string"),
        "image": datasets.Image(),
        "panoptic": datasets.Image(),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "segments_info": datasets.List(
            {
                "id": datasets.Value("int64"),
                "category_id": datasets.Value("int64"),
                "area": datasets.Value("int64"),
                "bbox": datasets.List(datasets.Value("float32"), length=4),
                "iscrowd": datasets.Value("int8"),
            }
        ),
    }
)


def load_split(root: str | Path, split: str) -> datasets.Dataset:
    """One split of a built folder as a `datasets.Dataset` (images are read lazily from their paths)."""
    root = Path(root)
    data = read_json(annotation_json(root, split))
    images = {img["id"]: img for img in data["images"]}
    columns: dict[str, list] = {name: [] for name in SEGMENT_FEATURES}
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        columns["image_id"].append(img["id"])
        columns["file_name"].append(img["file_name"])
        columns["image"].append(str(image_folder(root, split) / img["file_name"]))
        columns["panoptic"].append(str(annotation_folder(root, split) / ann["file_name"]))
        columns["width"].append(img["width"])
        columns["height"].append(img["height"])
        columns["segments_info"].append(ann["segments_info"])
    return datasets.Dataset.from_dict(columns, features=SEGMENT_FEATURES, split=split)


def load_panoptic_dataset(root: str | Path) -> datasets.DatasetDict:
    """Every split of a built folder; the label map travels in each split's `info.description`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (build one with `hf-detr-seg build-dataset`)")
    label_map = load_dataset_label_map(root)
    splits = {}
    for split in SPLITS:
        if annotation_json(root, split).is_file():
            ds = load_split(root, split)
            ds.info.description = f"hf-detr-seg panoptic dataset; classes: {', '.join(label_map.names)}"
            splits[split] = ds
    if not splits:
        raise DataError(f"{root}: no annotations/panoptic_{{train,val}}.json found")
    return datasets.DatasetDict(splits)

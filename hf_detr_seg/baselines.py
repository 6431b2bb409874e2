"""Non-learned baselines scored with the same metrics, so a model's figures have something to beat."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .data.masks import read_image
from .data.panoptic import (
    annotation_folder,
    annotation_json,
    class_map_from_segments,
    image_folder,
    load_dataset_label_map,
    read_json,
    read_panoptic_png,
)
from .errors import UserInputError
from .labels import LabelMap
from .metrics import SemanticScores


def otsu_dark_pixels(image: np.ndarray) -> np.ndarray:
    """Pixels darker than the image's own Otsu threshold (cracks are darker than the surface around them)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    _, dark = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return dark.astype(bool)


def otsu_scores(dataset_dir: str | Path, split: str = "val", class_name: str | None = None,
                tolerance: float = 0) -> dict:
    """Pixel precision/recall/F1 of a per-image Otsu dark-pixel threshold as `class_name`, pooled over the split.

    `class_name` None: the dataset's class whose role is `measure: crack` (dark thin lines are what Otsu finds).
    """
    root = Path(dataset_dir)
    label_map = load_dataset_label_map(root)
    target = label_map.index_of(class_name) if class_name is not None else _crack_class(label_map, root)
    class_name = label_map.names[target]
    other = label_map.background_index if label_map.background_index is not None else -1
    scores = SemanticScores(label_map.num_classes, [target], tolerance=tolerance, class_names=label_map.names)
    data = read_json(annotation_json(root, split))
    images = {img["id"]: img for img in data["images"]}
    for ann in data["annotations"]:
        ids = read_panoptic_png(annotation_folder(root, split) / ann["file_name"])
        truth = class_map_from_segments(ids, ann["segments_info"], lambda s: label_map.index_of_category(s["category_id"]))
        image = np.asarray(read_image(image_folder(root, split) / images[ann["image_id"]]["file_name"]))
        prediction = np.where(otsu_dark_pixels(image), target, other)
        scores.update(truth, prediction)
    return scores.compute()["per_class"][class_name]


def _crack_class(label_map: LabelMap, root: Path) -> int:
    """The model index of the one class whose role is `measure: crack`; otherwise the user must name a class."""
    cracks = label_map.crack_indices
    if len(cracks) != 1:
        found = [label_map.names[i] for i in cracks] or "none"
        raise UserInputError(f"{root}/labels.yaml: the baseline needs one class with `measure: crack` (found "
                             f"{found}); name the class with --baseline-class")
    return cracks[0]

"""Per-class IoU / mIoU and the pooled pixel precision, recall and F1 that crack papers report (with an optional
distance tolerance); `SemanticEvaluator` scores a model's panoptic predictions by their class maps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from ..data.panoptic import class_map_from_segments
from .base import Evaluator, ImageInput, ImageOutput

if TYPE_CHECKING:
    from ..labels import LabelMap

def _within(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels at Euclidean distance <= tolerance from any pixel of `mask` (the mask itself included)."""
    if tolerance <= 0:
        return mask
    if not mask.any():
        return np.zeros_like(mask)
    return ndimage.distance_transform_edt(~mask) <= tolerance


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


class SemanticScores:
    """Per-class IoU / mIoU and, for defect classes, pooled pixel precision, recall and F1.

    Counts are summed over all pixels of all images (each at its own size) before dividing, the pooled
    ("dataset-level") F1 crack papers report, rather than a mean of per-image scores that small images and
    empty images would distort.

    Args:
        num_classes: class indices are 0..num_classes-1; gt -1 is void and ignored everywhere (a predicted
            pixel on void counts nowhere); a predicted -1 means "no class" (a miss).
        thing_classes: class indices to report precision/recall/F1 for (the defects, e.g. crack).
        tolerance: t > 0 counts a predicted pixel as correct when within t px (Euclidean) of a gt pixel of
            its class, and a gt pixel as found when within t px of a predicted one.
        class_names: names for the output keys (default: the indices as strings).
    """

    def __init__(
        self,
        num_classes: int,
        thing_classes: Iterable[int] = (),
        tolerance: float = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.thing_classes = tuple(int(c) for c in thing_classes)
        bad = [c for c in self.thing_classes if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"thing_classes {bad} outside 0..{self.num_classes - 1}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = float(tolerance)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class_names for {self.num_classes} classes")
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self._confusion = np.zeros((c, c + 1), dtype=np.int64)  # rows gt, columns pred (+ "no class")
        # per thing class: predicted pixels, gt pixels, predicted pixels near gt, gt pixels near a prediction
        self._pixels = np.zeros((4, len(self.thing_classes)), dtype=np.int64)
        self.num_images = 0

    def update(self, gt_class_map: Any, pred_class_map: Any) -> None:
        """Add one image: integer class maps of equal shape (gt -1 = void, pred -1 = no class)."""
        self.add(self.image_counts(gt_class_map, pred_class_map))

    def add(self, counts: tuple[np.ndarray, ...]) -> None:
        """Add one image's `image_counts` (integers: the order of images does not matter)."""
        confusion, *pixels = counts
        self._confusion += confusion
        self._pixels += np.stack(pixels)
        self.num_images += 1

    def image_counts(self, gt_class_map: Any, pred_class_map: Any) -> tuple[np.ndarray, ...]:
        """One image's confusion matrix and per-defect pixel counts (small arrays: they travel between
        processes): (confusion, pred_total, gt_total, pred_hits, gt_hits)."""
        gt = np.asarray(gt_class_map).astype(np.int64, copy=False)
        pred = np.asarray(pred_class_map).astype(np.int64, copy=False)
        if gt.shape != pred.shape:
            raise ValueError(f"gt class map {gt.shape} and prediction {pred.shape} differ in shape")
        c = self.num_classes
        if gt.size and (gt.min() < -1 or gt.max() >= c):
            raise ValueError(f"gt class indices must be in -1..{c - 1}, got {gt.min()}..{gt.max()}")
        if pred.size and (pred.min() < -1 or pred.max() >= c):
            raise ValueError(f"predicted class indices must be in -1..{c - 1}, got {pred.min()}..{pred.max()}")
        valid = gt >= 0
        g = gt[valid]
        p = np.where(pred[valid] < 0, c, pred[valid])
        confusion = np.bincount(g * (c + 1) + p, minlength=c * (c + 1)).reshape(c, c + 1)
        counts = np.zeros((4, len(self.thing_classes)), dtype=np.int64)  # pred_total, gt_total, pred_hits, gt_hits
        for j, cls in enumerate(self.thing_classes):
            gt_mask = gt == cls
            pred_mask = (pred == cls) & valid
            counts[:, j] = (pred_mask.sum(), gt_mask.sum(), (pred_mask & _within(gt_mask, self.tolerance)).sum(),
                            (gt_mask & _within(pred_mask, self.tolerance)).sum())
        return (confusion, *counts)

    def compute(self) -> dict[str, Any]:
        """`miou` over classes present in gt or prediction; `precision`/`recall`/`f1` averaged over thing
        classes present; `per_class` holds `iou` (and for thing classes the pixel scores and counts)."""
        c = self.num_classes
        tp = np.diag(self._confusion[:, :c])
        union = self._confusion.sum(axis=1) + self._confusion[:, :c].sum(axis=0) - tp
        per_class: dict[str, dict[str, float]] = {}
        ious = []
        for k in range(c):
            if union[k] > 0:
                per_class[self.class_names[k]] = {"iou": _ratio(tp[k], union[k])}
                ious.append(per_class[self.class_names[k]]["iou"])
        f1s, precisions, recalls = [], [], []
        pred_total, gt_total, pred_hits, gt_hits = self._pixels
        for j, cls in enumerate(self.thing_classes):
            if gt_total[j] + pred_total[j] == 0:
                continue
            precision = _ratio(pred_hits[j], pred_total[j])
            recall = _ratio(gt_hits[j], gt_total[j])
            f1 = _ratio(2 * precision * recall, precision + recall)
            per_class[self.class_names[cls]].update(
                {
                    "precision": precision,
                    "recall": recall,
                    "f1": f1,
                    "pred_pixels": int(pred_total[j]),
                    "gt_pixels": int(gt_total[j]),
                }
            )
            f1s.append(f1)
            precisions.append(precision)
            recalls.append(recall)
        return {
            "miou": float(np.mean(ious)) if ious else 0.0,
            "precision": float(np.mean(precisions)) if precisions else 0.0,
            "recall": float(np.mean(recalls)) if recalls else 0.0,
            "f1": float(np.mean(f1s)) if f1s else 0.0,
            "tolerance": self.tolerance,
            "per_class": per_class,
        }


class SemanticEvaluator(Evaluator):
    """IoU per class and mIoU of the predictions' class maps, and pixel precision/recall/F1 for every defect
    class, thing or stuff (crack is often stuff): every class but the background."""

    def __init__(self, label_map: LabelMap, tolerance: float = 0) -> None:
        self.label_map = label_map
        defects = [i for i, c in enumerate(label_map.classes) if not c.background]
        super().__init__(SemanticScores(label_map.num_classes, defects, tolerance=tolerance,
                                        class_names=label_map.names))

    def image_record(self, image: ImageInput, prediction: ImageOutput) -> tuple[np.ndarray, ...]:
        """The image's confusion matrix and defect pixel counts, from the gt and predicted class maps."""
        truth = class_map_from_segments(image.id_map, image.segments,
                                        lambda s: self.label_map.index_of_category(s["category_id"]))
        predicted = class_map_from_segments(prediction.panoptic_ids(), prediction.panoptic.segments,
                                            lambda s: s["label_id"])
        return self.metric.image_counts(truth, predicted)

    def compute(self) -> dict[str, Any]:
        """`miou` and the `per_class` scores; the means over defect classes are left to `SemanticScores`."""
        scores = super().compute()
        return {"miou": scores["miou"], "per_class": scores["per_class"]}

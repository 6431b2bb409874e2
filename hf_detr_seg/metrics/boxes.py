"""COCO box mAP through pycocotools' `COCOeval`, the implementation the DETR papers report; `BoxEvaluator`
scores a model's detections (every query, DETR's box post-processing) against the split's gt boxes."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Evaluator, ImageInput, ImageOutput

if TYPE_CHECKING:
    import torch

    from ..labels import LabelMap


@dataclass
class ImageBoxes:
    """One image's boxes as COCOeval reads them: absolute (x, y, w, h) pixels, class labels, scores."""

    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def _xywh(value: Any) -> np.ndarray:
    """Absolute (x0, y0, x1, y1) boxes (any array-like) as COCO's (x, y, w, h), float64."""
    boxes = np.asarray(value, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def _labels(value: Any) -> np.ndarray:
    return np.asarray(value).reshape(-1).astype(np.int64)


class BoxMAP:
    """COCO box mAP@[.5:.95] and mAP@.5 through pycocotools' `COCOeval` (the DETR papers' numbers).

    Boxes are absolute `xyxy` pixels. Up to 100 detections per image count (COCO's `maxDets`), which is
    DETR's default number of queries. With no gt box at all the result is -1.0, COCO's "undefined".
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._images: list[ImageBoxes] = []

    @property
    def num_images(self) -> int:
        return len(self._images)

    def update(self, prediction: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        """Add one image: prediction `{boxes, scores, labels}`, target `{boxes, labels}` (numpy or tensors)."""
        self.add(self.image_boxes(prediction, target))

    @staticmethod
    def image_boxes(prediction: Mapping[str, Any], target: Mapping[str, Any]) -> ImageBoxes:
        """One image's boxes for `add` (here or after travelling from another process)."""
        return ImageBoxes(
            gt_boxes=_xywh(target["boxes"]),
            gt_labels=_labels(target["labels"]),
            boxes=_xywh(prediction["boxes"]),
            scores=np.asarray(prediction["scores"], dtype=np.float64).reshape(-1),
            labels=_labels(prediction["labels"]),
        )

    def add(self, boxes: ImageBoxes) -> None:
        """Add one image's `image_boxes` (image ids follow the order images are added in)."""
        self._images.append(boxes)

    def compute(self) -> dict[str, float]:
        gt, dt = self._coco_annotations()
        if not gt:
            return {"bbox_map": -1.0, "bbox_map_50": -1.0}
        if not dt:
            return {"bbox_map": 0.0, "bbox_map_50": 0.0}
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
            coco_gt = COCO()
            coco_gt.dataset = {
                "images": [{"id": i + 1} for i in range(self.num_images)],
                "annotations": gt,
                "categories": [{"id": c} for c in sorted({a["category_id"] for a in gt + dt})],
            }
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dt)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {"bbox_map": float(evaluator.stats[0]), "bbox_map_50": float(evaluator.stats[1])}

    def _coco_annotations(self) -> tuple[list[dict], list[dict]]:
        """The gt annotations and the detections of every image, as COCO's JSON lists."""
        gt: list[dict] = []
        dt: list[dict] = []
        for image_id, image in enumerate(self._images, start=1):
            for box, label in zip(image.gt_boxes, image.gt_labels):
                gt.append({
                    "id": len(gt) + 1,  # COCOeval treats id 0 as "unmatched"
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                })
            for box, score, label in zip(image.boxes, image.scores, image.labels):
                dt.append({"image_id": image_id, "category_id": int(label), "bbox": box.tolist(),
                           "score": float(score)})
        return gt, dt


def box_map(predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`{"bbox_map", "bbox_map_50"}` over paired lists of per-image predictions and targets (see `BoxMAP`)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    metric = BoxMAP()
    for prediction, target in zip(predictions, targets):
        metric.update(prediction, target)
    return metric.compute()


def detections(logits: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> dict[str, np.ndarray]:
    """DETR's box post-processing of one image: every query, its best real class and score, and its box in
    pixels (x0, y0, x1, y1). No threshold: COCO's mAP ranks every detection by score."""
    # imported here: `transformers` takes seconds to import, and `hf-detr-seg pq` needs no model
    from transformers.image_transforms import center_to_corners_format

    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    xyxy = center_to_corners_format(boxes) * boxes.new_tensor([width, height, width, height])
    return {"boxes": xyxy.numpy(), "scores": scores.numpy(), "labels": labels.numpy()}


def gt_boxes(segments: Sequence[Mapping], label_map: LabelMap) -> dict[str, np.ndarray]:
    """The (x0, y0, x1, y1) boxes and class indices of an image's non-crowd gt segments (COCO `bbox` x, y, w, h)."""
    kept = [s for s in segments if not s.get("iscrowd", 0)]
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (s["bbox"] for s in kept)]
    return {
        "boxes": np.array(xyxy, dtype=np.float32).reshape(-1, 4),
        "labels": np.array([label_map.index_of_category(s["category_id"]) for s in kept], dtype=np.int64),
    }


class BoxEvaluator(Evaluator):
    """Box mAP of the detector's outputs (every query) against the non-crowd gt segments' boxes."""

    def __init__(self, label_map: LabelMap) -> None:
        self.label_map = label_map
        super().__init__(BoxMAP())

    def image_record(self, image: ImageInput, prediction: ImageOutput) -> ImageBoxes:
        """The image's detections at its original size and its gt boxes, in COCO's (x, y, w, h)."""
        found = detections(prediction.logits, prediction.boxes, image.height, image.width)
        return self.metric.image_boxes(found, gt_boxes(image.segments, self.label_map))

"""COCO box mAP through pycocotools' `COCOeval`, the implementation the DETR papers report."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def _as_boxes(value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    return array.reshape(-1, 4)


class BoxMAP:
    """COCO box mAP@[.5:.95] and mAP@.5 through pycocotools' `COCOeval` (the DETR papers' numbers).

    Boxes are absolute `xyxy` pixels. Up to 100 detections per image count (COCO's `maxDets`), which is
    DETR's default number of queries. With no gt box at all the result is -1.0, COCO's "undefined".
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._gt: list[dict] = []
        self._dt: list[dict] = []
        self._labels: set[int] = set()
        self.num_images = 0

    def update(self, prediction: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        """Add one image: prediction `{boxes, scores, labels}`, target `{boxes, labels}` (numpy or tensors)."""
        image_id = self.num_images + 1
        self.num_images += 1
        gt_boxes = _xyxy_to_xywh(_as_boxes(target["boxes"]))
        gt_labels = np.asarray(target["labels"]).reshape(-1).astype(np.int64)
        for box, label in zip(gt_boxes, gt_labels):
            self._gt.append(
                {
                    "id": len(self._gt) + 1,  # COCOeval treats id 0 as "unmatched"
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        dt_boxes = _xyxy_to_xywh(_as_boxes(prediction["boxes"]))
        scores = np.asarray(prediction["scores"], dtype=np.float64).reshape(-1)
        dt_labels = np.asarray(prediction["labels"]).reshape(-1).astype(np.int64)
        for box, score, label in zip(dt_boxes, scores, dt_labels):
            self._dt.append(
                {"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": float(score)}
            )
        self._labels.update(int(v) for v in gt_labels)
        self._labels.update(int(v) for v in dt_labels)

    def compute(self) -> dict[str, float]:
        if not self._gt:
            return {"bbox_map": -1.0, "bbox_map_50": -1.0}
        if not self._dt:
            return {"bbox_map": 0.0, "bbox_map_50": 0.0}
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
            coco_gt = COCO()
            coco_gt.dataset = {
                "images": [{"id": i + 1} for i in range(self.num_images)],
                "annotations": self._gt,
                "categories": [{"id": c} for c in sorted(self._labels)],
            }
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes([dict(d) for d in self._dt])
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {"bbox_map": float(evaluator.stats[0]), "bbox_map_50": float(evaluator.stats[1])}


def box_map(predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`{"bbox_map", "bbox_map_50"}` over paired lists of per-image predictions and targets (see `BoxMAP`)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    metric = BoxMAP()
    for prediction, target in zip(predictions, targets):
        metric.update(prediction, target)
    return metric.compute()

"""Evaluation metrics: panoptic quality, box mAP, semantic IoU and crack pixel F1.

Each metric is an accumulator fed one image at a time (`update`, or `image_stats` / `image_counts` then `add`
where the per-image work runs elsewhere) and read with `compute`, so the metric code never depends on how
images are batched:

- `panoptic.PanopticQuality`: PQ exactly as panopticapi's `pq_compute` (per image: `panoptic_matching.py`,
  on id maps turned into segment positions: `segment_ids.py`); `folders.pq_compute_folders` scores two
  COCO-panoptic folders; `PanopticQualityMetric` is the same PQ as an offline `evaluate.Metric`.
- `boxes.BoxMAP`: COCO box mAP through pycocotools' `COCOeval`.
- `semantic.SemanticScores`: per-class IoU / mIoU and pooled pixel precision, recall and F1.
"""

from __future__ import annotations

from typing import Any

from .boxes import BoxMAP, box_map
from .folders import pq_compute_folders
from .panoptic import PanopticQuality
from .semantic import SemanticScores

__all__ = [
    "BoxMAP",
    "PanopticQuality",
    "PanopticQualityMetric",
    "SemanticScores",
    "box_map",
    "pq_compute_folders",
]


def __getattr__(name: str) -> Any:
    """`PanopticQualityMetric`, built on first use so that importing the metrics does not import `evaluate`."""
    if name == "PanopticQualityMetric":
        from .hf_evaluate import build_pq_metric_class

        cls = build_pq_metric_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Evaluation metrics: panoptic quality, box mAP, semantic IoU and crack pixel F1.

Two layers, as in detectron2:

- metrics, fed one image at a time (`update`, or `image_stats` / `image_boxes` / `image_counts` then `add`
  where the per-image work runs elsewhere) and read with `compute`; they know nothing of models or batches:
  `PanopticQuality` (`panoptic.py`: PQ exactly as panopticapi's `pq_compute`; the per-image rules in
  `panoptic_matching.py`, on id maps turned into segment positions in `segment_ids.py`), `BoxMAP`
  (`boxes.py`: COCO box mAP through pycocotools), `SemanticScores` (`semantic.py`: IoU / mIoU and pooled
  pixel precision, recall and F1). `pq_compute_folders` (`folders.py`) scores two COCO-panoptic folders;
  `PanopticQualityMetric` (`hf_evaluate.py`) is the same PQ as an offline `evaluate.Metric`.
- evaluators (`base.py`: `reset`, `process(batch, predictions)`, `gather`, `compute`), one beside each metric:
  `PanopticEvaluator`, `BoxEvaluator`, `SemanticEvaluator` turn a batch of `ImageInput`s and the model's
  `ImageOutput`s into their metric's inputs; `evaluation.evaluate_model` feeds them.
"""

from __future__ import annotations

from typing import Any

from .base import Evaluator, ImageInput, ImageOutput
from .boxes import BoxEvaluator, BoxMAP, box_map
from .folders import pq_compute_folders
from .panoptic import PanopticEvaluator, PanopticQuality
from .semantic import SemanticEvaluator, SemanticScores

__all__ = [
    "BoxEvaluator",
    "BoxMAP",
    "Evaluator",
    "ImageInput",
    "ImageOutput",
    "PanopticEvaluator",
    "PanopticQuality",
    "PanopticQualityMetric",
    "SemanticEvaluator",
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

"""PQ as an offline 🤗 `evaluate.Metric` (`PanopticQualityMetric`), for code that already speaks that API.

The class is built on first use (`hf_detr_seg.metrics.PanopticQualityMetric`), so importing the metrics does
not import `evaluate` and `datasets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .panoptic import PanopticQuality

def _panoptic_example(example: Mapping | None) -> dict | None:
    """`{"id_map", "segments"}` reduced to the stored features: `iscrowd` defaults to 0, extras dropped."""
    if example is None:
        return None
    segments = [
        {"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd") or 0)}
        for s in example["segments"]
    ]
    return {"id_map": np.asarray(example["id_map"], dtype=np.int64), "segments": segments}


def build_pq_metric_class() -> type:
    """`PanopticQualityMetric`, defined lazily so importing this module does not import `evaluate`."""
    import datasets
    import evaluate

    segment = {
        "id": datasets.Value("int64"),
        "category_id": datasets.Value("int64"),
        "iscrowd": datasets.Value("int64"),
    }
    panoptic = {
        "id_map": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "segments": [segment],
    }

    class PanopticQualityMetric(evaluate.Metric):
        """PQ as an `evaluate.Metric`, defined in code so it works offline (no `evaluate.load` from the Hub).

        Each prediction/reference is `{"id_map": HxW ids (0 = void), "segments": [{"id", "category_id",
        "iscrowd"}]}`; `compute` returns `PanopticQuality.compute()`'s dict. Categories are given at
        construction (or to `compute(categories=...)`).
        """

        def __init__(self, categories: Mapping | Sequence | None = None, keep_in_memory: bool = True, **kwargs):
            self.categories = categories
            super().__init__(keep_in_memory=keep_in_memory, **kwargs)

        def add(self, *, prediction=None, reference=None, **kwargs):
            """Add one image's prediction and reference (segments may omit `iscrowd`, may carry extras)."""
            return super().add(prediction=_panoptic_example(prediction), reference=_panoptic_example(reference))

        def add_batch(self, *, predictions=None, references=None, **kwargs):
            """Add several images' predictions and references."""
            return super().add_batch(
                predictions=None if predictions is None else [_panoptic_example(x) for x in predictions],
                references=None if references is None else [_panoptic_example(x) for x in references],
            )

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description="Panoptic quality (Kirillov et al. 2019), computed as panopticapi's pq_compute.",
                citation="@inproceedings{kirillov2019panoptic, title={Panoptic Segmentation}, year={2019}}",
                inputs_description="predictions, references: lists of {'id_map': HxW int ids, 'segments': [...]}",
                features=datasets.Features({"predictions": panoptic, "references": panoptic}),
                reference_urls=["https://github.com/cocodataset/panopticapi"],
            )

        def _compute(self, predictions, references, categories=None) -> dict[str, Any]:
            table = categories if categories is not None else self.categories
            if table is None:
                raise ValueError("PanopticQualityMetric needs categories= ({id: {'name', 'isthing'}})")
            metric = PanopticQuality(table)
            for k, (pred, ref) in enumerate(zip(predictions, references)):
                metric.update(
                    np.asarray(ref["id_map"], dtype=np.int64),
                    ref["segments"],
                    np.asarray(pred["id_map"], dtype=np.int64),
                    pred["segments"],
                    gt_name=f"reference {k}",
                    pred_name=f"prediction {k}",
                )
            return metric.compute()

    return PanopticQualityMetric

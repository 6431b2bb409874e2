"""Panoptic quality (PQ = SQ x RQ, Kirillov et al. 2019) accumulated over images, as panopticapi's `pq_compute`.

`PanopticQuality` reproduces panopticapi's `pq_compute` (cocodataset/panopticapi, `panopticapi/evaluation.py`)
rule for rule, but per image with one joint histogram of (gt id, pred id) pairs instead of Python loops
(`panoptic_matching.py`), which makes it fast enough to run inside every evaluation. `PanopticEvaluator` feeds
it from a model's predictions on a built split.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from .base import Evaluator, ImageInput, ImageOutput
from .panoptic_matching import ImageStats, image_stats

if TYPE_CHECKING:
    from ..labels import LabelMap

def _normalise_categories(categories: Mapping[int, Mapping] | Sequence[Mapping]) -> dict[int, dict]:
    """`{id: {"name", "isthing"}}` from either that mapping or a COCO `categories` list."""
    if isinstance(categories, Mapping):
        items = [(int(k), v) for k, v in categories.items()]
    else:
        items = [(int(c["id"]), c) for c in categories]
    table: dict[int, dict] = {}
    for cat_id, info in items:
        if "isthing" not in info:
            raise DataError(f"category {cat_id}: `isthing` is required to split PQ into things and stuff")
        table[cat_id] = {"name": str(info.get("name", cat_id)), "isthing": int(info["isthing"]) == 1}
    return table


def _average(per_class: Mapping[str, Mapping], names: Iterable[str]) -> tuple[float, float, float, int]:
    """panopticapi's `pq_average`: mean over the categories with any TP, FP or FN (0.0 when there are none)."""
    pq = sq = rq = 0.0
    n = 0
    for name in names:
        c = per_class[name]
        if c["tp"] + c["fp"] + c["fn"] == 0:
            continue
        n += 1
        pq += c["pq"]
        sq += c["sq"]
        rq += c["rq"]
    if n == 0:
        return 0.0, 0.0, 0.0, 0
    return pq / n, sq / n, rq / n, n


class PanopticQuality:
    """Accumulates panoptic quality (PQ = SQ x RQ) over images, exactly as panopticapi's `pq_compute`.

    Args:
        categories: `{category_id: {"name", "isthing"}}` (or a COCO `categories` list). Only these
            categories are reported; a prediction with another category id is an error (as in panopticapi),
            while gt segments of unlisted categories are ignored.
    """

    def __init__(self, categories: Mapping[int, Mapping] | Sequence[Mapping]) -> None:
        self.categories = _normalise_categories(categories)
        self._cat_index = {cat_id: i for i, cat_id in enumerate(self.categories)}
        self.reset()

    def reset(self) -> None:
        num = len(self.categories)
        self._iou = np.zeros(num, dtype=np.float64)
        self._tp = np.zeros(num, dtype=np.int64)
        self._fp = np.zeros(num, dtype=np.int64)
        self._fn = np.zeros(num, dtype=np.int64)
        self.num_images = 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one image; the arguments are `image_stats`'."""
        self.add(self.image_stats(*args, **kwargs))

    def image_stats(
        self,
        gt_ids: Any,
        gt_segments: Sequence[Mapping],
        pred_ids: Any,
        pred_segments: Sequence[Mapping],
        *,
        gt_name: str = "ground truth",
        pred_name: str = "prediction",
    ) -> ImageStats:
        """One image's matches, FP and FN (a few small arrays), for `add` here or in another process: id maps
        (0 = void) and their `segments_info` (`id`, `category_id`, gt `iscrowd`). `gt_name` / `pred_name` name
        the files in error messages."""
        return image_stats(gt_ids, gt_segments, pred_ids, pred_segments, self._cat_index, gt_name, pred_name)

    def add(self, stats: ImageStats) -> None:
        """Add one image's `image_stats` (images must come in a fixed order for bit-identical IoU sums)."""
        np.add.at(self._iou, stats.match_cats, stats.match_ious)  # sequential: same order as panopticapi
        self._tp += np.bincount(stats.match_cats, minlength=len(self._tp))
        self._fp += stats.fp
        self._fn += stats.fn
        self.num_images += 1

    def compute(self) -> dict[str, Any]:
        """PQ/SQ/RQ overall, for things and for stuff, and per class (fractions 0..1).

        `n`, `n_things`, `n_stuff` count the categories in each average. `per_class` lists every category,
        like panopticapi (all zeros for one with no TP, FP or FN, which is left out of the averages).
        """
        per_class: dict[str, dict[str, float | int]] = {}
        for j, info in enumerate(self.categories.values()):
            tp, fp, fn, iou = int(self._tp[j]), int(self._fp[j]), int(self._fn[j]), float(self._iou[j])
            denominator = tp + 0.5 * fp + 0.5 * fn
            per_class[info["name"]] = {
                "pq": iou / denominator if denominator else 0.0,
                "sq": iou / tp if tp else 0.0,
                "rq": tp / denominator if denominator else 0.0,
                "tp": tp,
                "fp": fp,
                "fn": fn,
            }
        names = [info["name"] for info in self.categories.values()]
        things = [info["name"] for info in self.categories.values() if info["isthing"]]
        stuff = [info["name"] for info in self.categories.values() if not info["isthing"]]
        result: dict[str, Any] = {}
        for suffix, subset in (("", names), ("_things", things), ("_stuff", stuff)):
            pq, sq, rq, n = _average(per_class, subset)
            result.update({f"pq{suffix}": pq, f"sq{suffix}": sq, f"rq{suffix}": rq, f"n{suffix}": n})
        result["per_class"] = per_class
        return result


class PanopticEvaluator(Evaluator):
    """PQ of a model's panoptic predictions against the split's gt id maps, per class of the label map."""

    def __init__(self, label_map: LabelMap) -> None:
        self.label_map = label_map
        super().__init__(PanopticQuality({c.category_id: {"name": c.name, "isthing": c.isthing}
                                          for c in label_map.classes}))

    def image_record(self, image: ImageInput, prediction: ImageOutput) -> ImageStats:
        """The image's matches, FP and FN, with the predicted classes as the dataset's category ids."""
        segments = [{"id": s["id"], "category_id": self.label_map.category_id(s["label_id"])}
                    for s in prediction.panoptic.segments]
        return self.metric.image_stats(image.id_map, image.segments, prediction.panoptic_ids(), segments)

"""Evaluation metrics: panoptic quality, box mAP, semantic IoU and crack pixel F1.

Every metric is an accumulator with the detectron2-style evaluator seam (`reset`, `update` once per image,
`compute` at the end), so the training loop, `evaluate` and the benchmarks share one implementation and the
metric code never depends on how images are batched.

- `PanopticQuality` reproduces panopticapi's `pq_compute` (cocodataset/panopticapi,
  `panopticapi/evaluation.py`) rule for rule, but per image with one joint histogram of (gt id, pred id)
  pairs instead of Python loops, which makes it fast enough to run inside every evaluation.
  `pq_compute_folders` is the file-level entry point; `PanopticQualityMetric` exposes the same numbers as an
  offline `evaluate.Metric`.
- `BoxMAP` is COCO box mAP through pycocotools' `COCOeval`, the implementation the DETR papers report.
- `SemanticScores` gives per-class IoU / mIoU and the pooled pixel precision, recall and F1 that crack
  papers report, optionally with a distance tolerance.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .data.panoptic import read_json, read_panoptic_png
from .errors import DataError

__all__ = [
    "BoxMAP",
    "PanopticQuality",
    "PanopticQualityMetric",
    "SemanticScores",
    "box_map",
    "pq_compute_folders",
]

VOID = 0  # segment id 0 in a panoptic id map: not annotated, ignored by PQ
# Ids up to this bound (or 4x the pixel count) are mapped to segment positions with a lookup table; larger
# ids (e.g. panopticapi's colour-derived ones, up to 2^24) with a binary search.
_LOOKUP_LIMIT = 1 << 16


@dataclass
class _ImageStats:
    """One image's contribution per category (dense category index): matches, FP and FN counts.

    `match_cats` / `match_ious` list the matches in panopticapi's order (by gt id), so that the running IoU
    sums are added in exactly the same order and come out bit-identical.
    """

    match_cats: np.ndarray
    match_ious: np.ndarray
    fp: np.ndarray
    fn: np.ndarray


def _as_id_map(ids: Any, name: str) -> np.ndarray:
    """A 2-D map of non-negative integer segment ids (numpy or CPU tensor), flattened without a copy."""
    array = np.asarray(ids)
    if array.ndim != 2:
        raise DataError(f"{name}: expected a 2-D segment-id map, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise DataError(f"{name}: segment ids must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
    array = array.ravel()
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise DataError(f"{name}: segment ids must be >= 0 (0 = void), got {array.min()}")
    return array


def _segment_table(segments: Sequence[Mapping], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment ids, category ids and crowd flags, in list order, of a `segments_info` list."""
    ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    cats = np.array([int(s["category_id"]) for s in segments], dtype=np.int64)
    crowd = np.array([int(s.get("iscrowd") or 0) == 1 for s in segments], dtype=bool)
    if len(np.unique(ids)) != len(ids):
        duplicates = sorted({int(i) for i in ids if (ids == i).sum() > 1})
        raise DataError(f"{name}: duplicate segment id(s) {duplicates[:5]} in segments_info")
    if (ids == VOID).any():
        raise DataError(f"{name}: segment id 0 is reserved for void and cannot be a segment")
    return ids, cats, crowd


def _segment_positions(ids: np.ndarray, listed: np.ndarray, stride: int = 1) -> np.ndarray:
    """Per pixel, times `stride`: 0 on void, k + 1 on the k-th listed segment, len(listed) + 1 on an id that
    is not listed.

    Working in positions instead of raw ids keeps the joint (gt, pred) histogram as small as the number of
    segments, so one `bincount` replaces panopticapi's `np.unique` sort of every pixel; `stride` folds the
    row offset of that histogram into the lookup (one pass over the pixels fewer). Small ids go through a
    lookup table indexed by id; large ones (e.g. panopticapi's colour-derived ids, up to 2^24) through a
    collision-free multiplicative hash of the listed ids, checked per pixel, so both cost a few passes.
    """
    unlisted = len(listed) + 1
    top = int(ids.max()) if ids.size else 0
    if top <= max(_LOOKUP_LIMIT, 4 * ids.size):
        lookup = np.full(top + 1, unlisted, dtype=np.intp)
        lookup[VOID] = 0
        inside = listed <= top
        lookup[listed[inside]] = np.flatnonzero(inside) + 1
        return (lookup * stride).take(ids)
    keys = np.concatenate([[VOID], listed]).astype(np.uint32)
    slots, multiplier, bits = _perfect_hash(keys)
    table = np.full(1 << bits, unlisted, dtype=np.intp)
    table[slots] = np.arange(len(keys))
    key_at = np.full(1 << bits, VOID, dtype=np.uint32)
    key_at[slots] = keys
    slot = _hash(ids.astype(np.uint32, copy=False), multiplier, bits)
    position = table.take(slot)
    position[key_at.take(slot) != ids] = unlisted  # another id in a listed id's slot
    return position * stride


# Odd 32-bit constants (golden-ratio and hash-mixing ones): odd, so each multiplication is a bijection mod 2^32.
_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0xD3A2646D)


def _hash(ids: np.ndarray, multiplier: int, bits: int) -> np.ndarray:
    """Knuth's multiplicative hash of uint32 ids: the top `bits` bits of id * multiplier mod 2^32."""
    return (ids * np.uint32(multiplier)) >> np.uint32(32 - bits)


def _perfect_hash(keys: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(slots, multiplier, bits) such that `_hash` puts the distinct `keys` in distinct slots."""
    bits = max(4, int(np.ceil(np.log2(2 * len(keys)))))
    while True:
        for multiplier in _HASH_MULTIPLIERS:
            slots = _hash(keys, multiplier, bits)
            if len(np.unique(slots)) == len(keys):
                return slots, multiplier, bits
        bits += 1


def _unlisted_error(ids: Any, listed: np.ndarray, name: str) -> DataError:
    """The error for ids in a map that its `segments_info` does not list (panopticapi raises it for preds)."""
    present = np.unique(np.asarray(ids))
    extra = np.setdiff1d(present[present != VOID], listed)
    return DataError(f"{name}: segment id(s) {extra[:5].tolist()} are in the PNG/id map but not in segments_info")


def _image_stats(
    gt_ids: Any,
    gt_segments: Sequence[Mapping],
    pred_ids: Any,
    pred_segments: Sequence[Mapping],
    cat_index: Mapping[int, int],
    gt_name: str,
    pred_name: str,
) -> _ImageStats:
    """panopticapi's `pq_compute_single_core` body for one image, on the (gt segment, pred segment) table.

    Rules (all from panopticapi): gt id 0 is void; a pair is a match when categories agree, the gt is not
    crowd and IoU > 0.5, where the union leaves out the prediction's void pixels; unmatched non-crowd gt are
    FN; an unmatched prediction is an FP unless more than half of it lies on void plus the crowd region of
    its own category. IoU > 0.5 makes matches unique, so no assignment step is needed.
    """
    if np.shape(gt_ids) != np.shape(pred_ids):
        raise DataError(
            f"{pred_name}: id map of shape {np.shape(pred_ids)} differs from {gt_name}'s {np.shape(gt_ids)}"
        )
    gt_seg, gt_cat, gt_crowd = _segment_table(gt_segments, gt_name)
    pr_seg, pr_cat, _ = _segment_table(pred_segments, pred_name)
    unknown = sorted({int(c) for c in pr_cat if int(c) not in cat_index})
    if unknown:
        raise DataError(f"{pred_name}: unknown category_id(s) {unknown}; known are {sorted(cat_index)}")
    # table[g, p]: pixels on gt position g and pred position p; row/column 0 is void / no prediction,
    # the last row/column collects ids missing from segments_info (an error)
    num_gt, num_pred = len(gt_seg), len(pr_seg)
    joint = _segment_positions(_as_id_map(gt_ids, gt_name), gt_seg, stride=num_pred + 2)
    joint += _segment_positions(_as_id_map(pred_ids, pred_name), pr_seg)
    table = np.bincount(joint, minlength=(num_gt + 2) * (num_pred + 2))
    table = table.reshape(num_gt + 2, num_pred + 2)
    if table[-1].any():
        raise _unlisted_error(gt_ids, gt_seg, gt_name)
    if table[:, -1].any():
        raise _unlisted_error(pred_ids, pr_seg, pred_name)
    table = table[:-1, :-1]
    inter = table[1:, 1:]
    gt_area = table[1:].sum(axis=1)  # from the map; equals the JSON `area` in any valid dataset
    pr_area = table[:, 1:].sum(axis=0)
    pr_void = table[0, 1:]
    if (pr_area == 0).any():
        raise DataError(
            f"{pred_name}: segment id(s) {pr_seg[pr_area == 0][:5].tolist()} are in segments_info but not in "
            "the PNG/id map"
        )
    # (a listed gt segment without pixels is still a FN, as in panopticapi)

    # matches: same category, gt not crowd, IoU > 0.5 with the prediction's void pixels out of the union
    candidate = (inter > 0) & (gt_cat[:, None] == pr_cat[None, :]) & ~gt_crowd[:, None]
    g, p = np.nonzero(candidate)
    union = pr_area[p] + gt_area[g] - inter[g, p] - pr_void[p]
    iou = inter[g, p] / union
    matched = iou > 0.5
    g, p, iou = g[matched], p[matched], iou[matched]
    by_gt_id = np.argsort(gt_seg[g], kind="stable")
    g, p, iou = g[by_gt_id], p[by_gt_id], iou[by_gt_id]
    gt_matched = np.zeros(num_gt, dtype=bool)
    pr_matched = np.zeros(num_pred, dtype=bool)
    gt_matched[g] = True
    pr_matched[p] = True
    match_cats = np.array([cat_index[int(c)] for c in pr_cat[p]], dtype=np.int64)

    # false negatives: unmatched, non-crowd gt of a known category
    fn_cats = [cat_index[int(c)] for c in gt_cat[~gt_matched & ~gt_crowd] if int(c) in cat_index]
    fn = np.bincount(np.array(fn_cats, dtype=np.int64), minlength=len(cat_index))

    # false positives: unmatched predictions not lying mostly on void + the crowd region of their category;
    # panopticapi keeps one crowd region per category, the last listed one
    crowd_of_cat = {int(gt_cat[j]): j for j in np.flatnonzero(gt_crowd)}
    crowd_row = np.array([crowd_of_cat.get(int(c), -1) for c in pr_cat], dtype=np.int64)
    on_crowd = np.where(crowd_row >= 0, inter[crowd_row.clip(min=0), np.arange(num_pred)], 0)
    ignored = (pr_void + on_crowd) / pr_area > 0.5
    fp_cats = [cat_index[int(c)] for c in pr_cat[~pr_matched & ~ignored]]
    fp = np.bincount(np.array(fp_cats, dtype=np.int64), minlength=len(cat_index))
    return _ImageStats(match_cats=match_cats, match_ious=iou, fp=fp, fn=fn)


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
    ) -> _ImageStats:
        """One image's matches, FP and FN (a few small arrays), for `add` here or in another process: id maps
        (0 = void) and their `segments_info` (`id`, `category_id`, gt `iscrowd`). `gt_name` / `pred_name` name
        the files in error messages."""
        return _image_stats(gt_ids, gt_segments, pred_ids, pred_segments, self._cat_index, gt_name, pred_name)

    def add(self, stats: _ImageStats) -> None:
        """Add one image's `image_stats` (images must come in a fixed order for bit-identical IoU sums)."""
        self._add(stats)

    def _add(self, stats: _ImageStats) -> None:
        """Add one image's statistics (images must come in a fixed order for bit-identical IoU sums)."""
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


def _load_json(source: str | Path | Mapping) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "<in-memory json>"
    return read_json(Path(source)), str(source)


def _pair_annotations(gt_json: dict, pred_json: dict, gt_where: str, pred_where: str) -> list[tuple[dict, dict]]:
    """Pair each gt annotation with its prediction by `image_id`, else by `file_name`."""
    by_id = {a["image_id"]: a for a in pred_json.get("annotations", []) if "image_id" in a}
    by_file = {Path(a["file_name"]).stem: a for a in pred_json.get("annotations", []) if "file_name" in a}
    pairs = []
    for gt_ann in gt_json.get("annotations", []):
        pred_ann = by_id.get(gt_ann.get("image_id"))
        if pred_ann is None:
            pred_ann = by_file.get(Path(gt_ann.get("file_name", "")).stem)
        if pred_ann is None:
            raise DataError(
                f"{pred_where}: no prediction for image_id {gt_ann.get('image_id')!r} "
                f"({gt_ann.get('file_name')!r}) of {gt_where}"
            )
        pairs.append((gt_ann, pred_ann))
    return pairs


def _png_folder(folder: str | Path | None, json_source: str | Path | Mapping, side: str) -> Path:
    """The PNG folder, by default the JSON's path without `.json` (panopticapi's convention)."""
    if folder is not None:
        return Path(folder)
    if isinstance(json_source, Mapping):
        raise DataError(f"{side}_folder is required when the {side} JSON is given as a dict")
    return Path(str(json_source).removesuffix(".json"))


def pq_compute_folders(
    gt_json: str | Path | Mapping,
    gt_folder: str | Path | None,
    pred_json: str | Path | Mapping,
    pred_folder: str | Path | None,
    categories: Mapping[int, Mapping] | Sequence[Mapping] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """PQ of a prediction folder against a COCO-panoptic gt folder (what panopticapi's `pq_compute` reads).

    Folders default to the JSON path without `.json`, as in panopticapi; `categories` default to the gt
    JSON's table. Ids that disagree between a PNG and its `segments_info` raise a `DataError` naming the PNG.
    Image pairs are read and compared in `workers` threads (default: the CPU count, at most 4); the result does
    not depend on it.
    """
    gt_data, gt_where = _load_json(gt_json)
    pred_data, pred_where = _load_json(pred_json)
    gt_dir = _png_folder(gt_folder, gt_json, "gt")
    pred_dir = _png_folder(pred_folder, pred_json, "pred")
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise DataError(f"{folder}: {what} PNG folder not found")
    if categories is None:
        if not isinstance(gt_data.get("categories"), list):
            raise DataError(f"{gt_where}: field `categories` missing; pass categories=")
        categories = gt_data["categories"]
    metric = PanopticQuality(categories)

    def image_stats(pair: tuple[dict, dict]) -> _ImageStats:
        gt_ann, pred_ann = pair
        gt_png, pred_png = gt_dir / gt_ann["file_name"], pred_dir / pred_ann["file_name"]
        return _image_stats(
            read_panoptic_png(gt_png),
            gt_ann["segments_info"],
            read_panoptic_png(pred_png),
            pred_ann["segments_info"],
            metric._cat_index,
            str(gt_png),
            str(pred_png),
        )

    pairs = _pair_annotations(gt_data, pred_data, gt_where, pred_where)
    # Threads, not processes: PNG decoding (OpenCV) and most numpy passes release the GIL, and threads start in
    # microseconds. `map` yields in input order, so the sums are added in panopticapi's order.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for stats in pool.map(image_stats, pairs):
            metric._add(stats)
    return metric.compute()


def _panoptic_example(example: Mapping | None) -> dict | None:
    """`{"id_map", "segments"}` reduced to the stored features: `iscrowd` defaults to 0, extras dropped."""
    if example is None:
        return None
    segments = [
        {"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd") or 0)}
        for s in example["segments"]
    ]
    return {"id_map": np.asarray(example["id_map"], dtype=np.int64), "segments": segments}


def _build_pq_metric_class():
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


def __getattr__(name: str):
    if name == "PanopticQualityMetric":
        cls = _build_pq_metric_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ===================================================================================== box mAP
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


# ===================================================================================== IoU and pixel F1
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
        t = len(self.thing_classes)
        self._pred_hits = np.zeros(t, dtype=np.int64)
        self._pred_total = np.zeros(t, dtype=np.int64)
        self._gt_hits = np.zeros(t, dtype=np.int64)
        self._gt_total = np.zeros(t, dtype=np.int64)
        self.num_images = 0

    def update(self, gt_class_map: Any, pred_class_map: Any) -> None:
        """Add one image: integer class maps of equal shape (gt -1 = void, pred -1 = no class)."""
        self.add(self.image_counts(gt_class_map, pred_class_map))

    def add(self, counts: tuple[np.ndarray, ...]) -> None:
        """Add one image's `image_counts` (integers: the order of images does not matter)."""
        confusion, pred_total, gt_total, pred_hits, gt_hits = counts
        self._confusion += confusion
        self._pred_total += pred_total
        self._gt_total += gt_total
        self._pred_hits += pred_hits
        self._gt_hits += gt_hits
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
        for j, cls in enumerate(self.thing_classes):
            if self._gt_total[j] + self._pred_total[j] == 0:
                continue
            precision = _ratio(self._pred_hits[j], self._pred_total[j])
            recall = _ratio(self._gt_hits[j], self._gt_total[j])
            f1 = _ratio(2 * precision * recall, precision + recall)
            per_class[self.class_names[cls]].update(
                {
                    "precision": precision,
                    "recall": recall,
                    "f1": f1,
                    "pred_pixels": int(self._pred_total[j]),
                    "gt_pixels": int(self._gt_total[j]),
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

"""PQ of a prediction folder against a COCO-panoptic gt folder: what panopticapi's `pq_compute` reads.

The folders' PNG pairs are read and compared in threads and added to one `PanopticQuality` through its public
`image_stats` / `add`, in the gt JSON's order, so the result is panopticapi's to the last bit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..data.panoptic import read_json, read_panoptic_png
from ..errors import DataError
from .panoptic import PanopticQuality
from .panoptic_matching import ImageStats

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

    def image_stats(pair: tuple[dict, dict]) -> ImageStats:
        gt_ann, pred_ann = pair
        gt_png, pred_png = gt_dir / gt_ann["file_name"], pred_dir / pred_ann["file_name"]
        return metric.image_stats(read_panoptic_png(gt_png), gt_ann["segments_info"], read_panoptic_png(pred_png),
                                  pred_ann["segments_info"], gt_name=str(gt_png), pred_name=str(pred_png))

    pairs = _pair_annotations(gt_data, pred_data, gt_where, pred_where)
    # Threads, not processes: PNG decoding (OpenCV) and most numpy passes release the GIL, and threads start in
    # microseconds. `map` yields in input order, so the sums are added in panopticapi's order.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for stats in pool.map(image_stats, pairs):
            metric.add(stats)
    return metric.compute()

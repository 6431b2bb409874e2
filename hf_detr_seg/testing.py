"""Synthetic inputs shared by the tests and the benchmarks (one generator, so both measure the same thing)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def random_blob(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(2, h / 3), rng.uniform(2, w / 3)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def random_panoptic_pair(
    rng: np.random.Generator,
    categories: dict[int, dict],
    shape: tuple[int, int] = (40, 56),
    first_pred_ids: tuple[int, ...] = (1, 500, 2**23),
) -> tuple:
    """A random gt/pred pair: blobs of all categories, crowds (several per category at times), void,
    listed-but-empty gt segments, jittered and relabelled predictions with small or large ids."""
    cat_ids = list(categories)
    gt = np.zeros(shape, dtype=np.int64)
    gt_segments = []
    for sid in range(1, rng.integers(3, 9)):
        cat = int(rng.choice(cat_ids))
        gt[random_blob(rng, shape)] = sid
        crowd = int(categories[cat]["isthing"] == 1 and rng.random() < 0.25)
        gt_segments.append({"id": sid, "category_id": cat, "iscrowd": crowd})
    for _ in range(rng.integers(0, 3)):
        gt[random_blob(rng, shape)] = 0
    ids, areas = np.unique(gt, return_counts=True)
    area_of = dict(zip(ids.tolist(), areas.tolist()))
    gt_segments = [
        dict(s, area=area_of.get(s["id"], 0))
        for s in gt_segments
        if s["id"] in area_of or rng.random() < 0.3  # sometimes a listed segment has no pixels left
    ]
    rng.shuffle(gt_segments)  # panopticapi keeps the last listed crowd per category: order matters

    pred = np.zeros(shape, dtype=np.int64)
    next_id = int(rng.choice(first_pred_ids))  # small or huge ids: both id encodings get exercised
    pred_cats = {}
    for s in gt_segments:
        mask = gt == s["id"]
        if not mask.any() or rng.random() < 0.15:
            continue
        mask = np.roll(mask, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
        pred[mask] = next_id
        pred_cats[next_id] = s["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
        next_id += int(rng.integers(1, 4))
    for _ in range(rng.integers(0, 4)):
        pred[random_blob(rng, shape)] = next_id
        pred_cats[next_id] = int(rng.choice(cat_ids))
        next_id += 1
    present = set(np.unique(pred).tolist()) - {0}
    pred_segments = [{"id": i, "category_id": c} for i, c in pred_cats.items() if i in present]
    return gt, gt_segments, pred, pred_segments


def write_panoptic_folder(
    root: Path, name: str, pairs: list[tuple], side: int, categories: dict[int, dict], image_id_offset: int = 0
) -> Path:
    """COCO-panoptic folder `root/name` of PNGs plus `root/name.json` for one side (0 = gt, 2 = pred) of
    `random_panoptic_pair`s; returns the JSON path. Files are named by pair index, so gt and pred pair by name."""
    from .data.panoptic import write_panoptic_png

    folder = root / name
    folder.mkdir(parents=True)
    annotations = []
    for k, pair in enumerate(pairs):
        file_name = f"img{k:03d}.png"
        write_panoptic_png(folder / file_name, pair[side])
        segments = [{key: int(v) for key, v in s.items()} for s in pair[side + 1]]
        annotations.append({"image_id": k + image_id_offset, "file_name": file_name, "segments_info": segments})
    path = root / f"{name}.json"
    categories_json = [{"id": i, **c} for i, c in categories.items()]
    path.write_text(json.dumps({"annotations": annotations, "categories": categories_json}))
    return path


def transformers_reuses_ids(segments_info: list[dict]) -> bool:
    """Whether transformers gave one id to two segments (its counter restarts at a fused segment's id)."""
    by_id = defaultdict(list)
    for info in segments_info:
        by_id[info["id"]].append(info)
    return any(
        len({e["label_id"] for e in entries}) > 1 or (len(entries) > 1 and not all(e["was_fused"] for e in entries))
        for entries in by_id.values()
    )

"""Synthetic inputs shared by the tests and the benchmarks (one generator, so both measure the same thing)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def steer_queries(model: Any, class_logits: Any, mask_pattern: Callable[[int, int], Any],
                  replace: bool = False) -> list[Any]:
    """Give a random `DetrForSegmentation` queries that differ: adds `class_logits` [Q, K+1] to its class logits
    and `mask_pattern(h, w)` [Q, h, w] to each query's mask logits (`replace`: instead of them). Returns the hooks
    (`.remove()` each to undo; `crafted_queries` does it for a `with` block).

    A random model's queries all predict the same thing; tests of post-processing, tiling and the kept-query path
    need confident, different ones. The mask head may run for every query ([B x Q] maps) or for a chosen few
    ([N] maps, `detr_forward.run_mask_head` with indices), so each map's query is recognised by its attention
    input, compared with the attention maps `bbox_attention` just computed for all queries.
    """
    import torch

    seen: dict[str, Any] = {}
    keep = 0.0 if replace else 1.0

    def attention_hook(module, args, out):
        seen["attention"] = out.flatten(0, 1).flatten(1)  # [B x Q, heads x h x w]

    def class_hook(module, args, out):
        return keep * out + class_logits.to(out.dtype)

    def mask_hook(module, args, kwargs, out):
        attention = args[1] if len(args) > 1 else kwargs["attention_masks"]  # the maps this call ran on
        rows = attention.flatten(0, 1).flatten(1)
        query = torch.stack([(seen["attention"] == row).all(1).int().argmax() for row in rows]) % len(class_logits)
        return keep * out + mask_pattern(*out.shape[-2:]).to(out.dtype)[query][:, None]

    return [model.bbox_attention.register_forward_hook(attention_hook),
            model.detr.class_labels_classifier.register_forward_hook(class_hook),
            model.mask_head.register_forward_hook(mask_hook, with_kwargs=True)]


@contextmanager
def crafted_queries(model: Any, class_boost: Any, mask_pattern: Callable[[int, int], Any]) -> Iterator[Any]:
    """`steer_queries` (adding to the model's logits) for the duration of a `with` block."""
    hooks = steer_queries(model, class_boost, mask_pattern)
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()

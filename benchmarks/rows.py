"""Benchmark rows: each builds its inputs once, then returns (ours, reference) callables and a check.

A row is a function `setup(tmp: Path) -> Row`; `run.py` times `ours` and `reference` alternately on the same
inputs, several repetitions, and reports the medians. `check(ours_result, reference_result)` asserts that
both gave the same answer (run once, on the first repetition's results).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from hf_detr_seg.testing import random_panoptic_pair, transformers_reuses_ids


@dataclass
class Row:
    ours: Callable[[], Any]
    reference: Callable[[], Any]
    check: Callable[[Any, Any], None]
    unit: str = "s"
    note: str = ""
    cleanup: Callable[[], None] | None = None


# ============================================================================ postprocess_panoptic
STUFF = {0, 3}  # background, efflorescence (model classes 0..3, "no object" is column 4)
NUM_CLASSES = 4


def _panoptic_outputs(batch=8, queries=100, mask_size=(200, 200), seed=0):
    """Random-but-structured DETR outputs: smooth mask logits, ~8-15 confident queries per image."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, NUM_CLASSES + 1, generator=g)
    logits[..., NUM_CLASSES] += 3.0  # most queries say "no object"
    h, w = mask_size
    coarse = torch.randn(batch * queries, 1, h // 8, w // 8, generator=g)
    noise = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    noise = F.avg_pool2d(noise, 9, 1, 4).view(batch, queries, h, w)
    masks = noise * 25 - 8  # unconfident queries: smooth random blobs
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for b in range(batch):
        n = int(torch.randint(8, 16, (1,), generator=g))
        chosen = torch.randperm(queries, generator=g)[:n]
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        logits[b, chosen] = torch.randn(n, NUM_CLASSES + 1, generator=g) * 0.3
        logits[b, chosen, labels] = 6.0 + torch.rand(n, generator=g) * 3  # softmax max ~0.98-0.99
        # confident queries: a disc-like region around a centre, ragged edges from the smooth noise
        centres = torch.rand(n, 2, generator=g) * torch.tensor([h, w])
        radii = 20 + torch.rand(n, generator=g) * 30
        dist = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
        masks[b, chosen] = (radii[:, None, None] - dist) * 0.4 + noise[b, chosen] * 15
    return logits, masks


def postprocess_panoptic(tmp: Path) -> Row:
    import torch
    from transformers import DetrImageProcessor

    from hf_detr_seg.postprocess import post_process_panoptic

    threshold = 0.85
    logits, masks = _panoptic_outputs()
    sizes = [(800, 800)] * logits.shape[0]
    processor = DetrImageProcessor()

    def ours():
        return post_process_panoptic(logits, masks, sizes, STUFF, threshold=threshold)

    def reference():
        return processor.post_process_panoptic_segmentation(
            SimpleNamespace(logits=logits, pred_masks=masks), threshold=threshold, mask_threshold=0.5,
            overlap_mask_area_threshold=0.8, label_ids_to_fuse=set(STUFF), target_sizes=sizes,
        )

    def void_zero(segmentation):
        return torch.where(segmentation == -1, 0, segmentation).to(torch.int32)

    def check(mine, theirs):
        # fused (what is timed): where transformers reuses no id, its map must equal ours; where it does (its
        # known bug: the id counter restarts at a fused segment's id), the void must agree and each of our
        # segments must lie inside one of its segments
        direct = 0
        for pred, ref in zip(mine, theirs):
            ref_map = void_zero(ref["segmentation"])
            if not transformers_reuses_ids(ref["segments_info"]):
                assert torch.equal(pred.id_map, ref_map), "fused segment maps differ"
                direct += 1
            else:
                assert torch.equal(pred.id_map == 0, ref_map == 0), "void differs"
                base = int(ref_map.max()) + 1
                pairs = torch.unique(pred.id_map.long() * base + ref_map.long())
                assert len(torch.unique(pairs // base)) == len(pairs), "one of our segments spans two of theirs"
        assert direct > 0, "no image compared map for map"
        # unfused (not timed): identical maps and segment lists on every image
        ours_unfused = post_process_panoptic(logits, masks, sizes, set(), threshold=threshold)
        ref_unfused = processor.post_process_panoptic_segmentation(
            SimpleNamespace(logits=logits, pred_masks=masks), threshold=threshold, label_ids_to_fuse=set(), target_sizes=sizes)
        for pred, ref in zip(ours_unfused, ref_unfused):
            assert torch.equal(pred.id_map, void_zero(ref["segmentation"])), "unfused segment maps differ"
            assert [(s["id"], s["label_id"]) for s in pred.segments] == [
                (s["id"], s["label_id"]) for s in ref["segments_info"]]
        total = sum(len(p.segments) for p in mine)
        check.note = (f"batch 8, Q=100, 200x200 masks -> 800x800, {total} segments; "
                      f"{direct}/8 fused maps identical (rest: transformers reuses ids), unfused 8/8 identical")

    row = Row(ours, reference, check, note="batch 8, Q=100, 200x200 masks -> 800x800")
    return row


# ============================================================================ pq_compute
CATEGORIES = {
    1: {"name": "crack", "isthing": 1},
    2: {"name": "spalling", "isthing": 1},
    3: {"name": "background", "isthing": 0},
    4: {"name": "efflorescence", "isthing": 0},
}


def _write_folder(root: Path, name: str, pairs, side: int) -> Path:
    from hf_detr_seg.data.panoptic import write_panoptic_png

    folder = root / name
    folder.mkdir(parents=True)
    annotations = []
    for k, pair in enumerate(pairs):
        file_name = f"img{k:04d}.png"
        write_panoptic_png(folder / file_name, pair[side])
        segments = [{key: int(v) for key, v in s.items()} for s in pair[side + 1]]
        annotations.append({"image_id": k, "file_name": file_name, "segments_info": segments})
    path = root / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": [{"id": i, **c} for i, c in CATEGORIES.items()]}))
    return path


def pq_compute(tmp: Path, num_images: int = 200) -> Row:
    import panopticapi.evaluation as evaluation

    from hf_detr_seg.metrics import pq_compute_folders

    rng = np.random.default_rng(0)
    # Prediction ids from 1 up, as post-processing numbers them.
    pairs = [random_panoptic_pair(rng, CATEGORIES, (224, 224), first_pred_ids=(1,)) for _ in range(num_images)]
    root = tmp / "pq"
    gt_json, pred_json = _write_folder(root, "gt", pairs, 0), _write_folder(root, "pred", pairs, 2)
    gt_dir, pred_dir = root / "gt", root / "pred"

    def ours():
        result = pq_compute_folders(gt_json, gt_dir, pred_json, pred_dir)
        return {key: [result[f"{m}{key}"] for m in ("pq", "sq", "rq", "n")] for key in ("", "_things", "_stuff")}

    def reference():
        gt_data, pred_data = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
        by_name = {a["file_name"]: a for a in pred_data["annotations"]}
        annotation_set = [(a, by_name[a["file_name"]]) for a in gt_data["annotations"]]
        categories = {c["id"]: c for c in gt_data["categories"]}
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress every 100 images
            stat = evaluation.pq_compute_single_core(0, annotation_set, str(gt_dir), str(pred_dir), categories)
        out = {}
        for key, isthing in (("", None), ("_things", True), ("_stuff", False)):
            expected, _ = stat.pq_average(categories, isthing=isthing)
            out[key] = [expected[m] for m in ("pq", "sq", "rq", "n")]
        return out

    def check(mine, theirs):
        assert mine == theirs, f"PQ differs: {mine} vs {theirs}"
        check.note = f"{num_images} pairs 224x224 PNG+JSON, PQ {mine[''][0]:.4f} identical"

    return Row(ours, reference, check, note=f"{num_images} pairs 224x224 PNG+JSON, files to PQ")


# ============================================================================ build_dataset_2_workers
def build_dataset_2_workers(tmp: Path, num_images: int = 300, size: int = 512) -> Row:
    from hf_detr_seg.data.builder import build_dataset
    from hf_detr_seg.data.demo import generate_demo_data

    data = generate_demo_data(tmp / "demo", num_images=num_images, size=size)
    counter = iter(range(10**6))

    def build(workers):
        out = tmp / f"built_{workers}_{next(counter)}"
        summary = build_dataset(data / "images", data / "masks", data / "labels.yaml", out, workers=workers,
                                progress=False)
        result = (dict(summary.images), dict(summary.instances), dict(summary.pixels))
        shutil.rmtree(out, ignore_errors=True)
        return result

    def check(mine, theirs):
        assert mine == theirs, f"builds differ: {mine} vs {theirs}"
        check.note = f"{num_images} demo images {size} px, 2 workers vs 1; same split/instances/pixels"

    return Row(lambda: build(2), lambda: build(1), check,
               note=f"{num_images} demo images {size} px; reference = 1 worker")


ROWS: dict[str, Callable[[Path], Row]] = {
    "postprocess_panoptic": postprocess_panoptic,
    "pq_compute": pq_compute,
    "build_dataset_2_workers": build_dataset_2_workers,
}

"""Benchmark rows of prediction at the scale of a real inspection: one 6000 x 4000 photo, tiled.

Ours: `DefectSegmenter` (the mask head for the kept queries only, tiles batched, our post-processing, tiles
stitched in place as they come). Reference: the loop a user would write with transformers alone: for each tile,
`DetrForSegmentation(pixel_values)` (the mask head for all queries) and
`DetrImageProcessor.post_process_panoptic_segmentation`, one tile at a time, the tile predictions kept in a list
and merged at the end by `merge_tiles` (the only way to the same segments: cracks joined across tiles, stuff
fused). Same tiles, same model, same pixel values (both sides preprocess with `to_pixel_values`, so that the
segments can be compared exactly; transformers' own preprocessing differs by 2e-7 and would cost the reference
time of its own).

The model is the `tiny` preset with random weights (seeded) and hooks (`testing.steer_queries`) that make 4 of
its 20 queries confident on every tile (the surface, a crack band, a spalling, an efflorescence; `query_masks`)
and the others "no object": a trained model keeps a handful of queries per tile of an inspection photo, and so
does this one, on both sides. The hooks add a pattern to the model's own logits, the same on both sides.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rows import Row, measure_peak_rss

PHOTO = (4000, 6000)  # height, width: a 24-megapixel photo
TILE = 512
OVERLAP = 0.25
KEPT_CLASSES = [4, 0, 1, 2]  # surface (stuff), crack, spalling, efflorescence; the other 16 queries: no object
# Tiles per forward pass for ours. 1, as the reference: with 2 threads PyTorch's CPU kernels for the mask head's
# attention give last-bit differences between batch sizes, and the check wants the very same segments (on this
# CPU a batch of 2 tiles ran about 8 % faster per tile, 4 slower; on a GPU batches are what make it fast).
BATCH = 1


def inspection_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A concrete-like photo: shaded grey texture, a few long dark cracks, a darker patch."""
    import cv2

    rng = np.random.default_rng(seed)
    shade = cv2.resize(rng.normal(0, 18, (height // 200 + 2, width // 200 + 2)).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    grain = rng.integers(-14, 15, (height, width), dtype=np.int16)
    grey = np.clip(150 + shade + grain, 0, 255).astype(np.uint8)
    for _ in range(5):
        points = np.cumsum(rng.normal(0, 60, (40, 2)), axis=0) + rng.uniform(0, 1, 2) * (width, height)
        cv2.polylines(grey, [points.astype(np.int32)], False, 40, thickness=int(rng.integers(3, 9)))
    cv2.ellipse(grey, (width // 3, height // 2), (400, 250), 20, 0, 360, 95, -1)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def query_masks(h: int, w: int):
    """[Q, h, w] mask logits added to the model's: the surface everywhere, in each tile a diagonal crack band, a
    spalling blob and an efflorescence blob; nothing for the queries that are not kept."""
    import torch

    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    masks = torch.full((20, h, w), -10.0)
    masks[0] = 3.0
    masks[1] = 400 * (0.03 - (ys - 0.8 * xs - 0.1).abs())
    masks[2] = 40 * (1 - torch.hypot(ys - 0.7, xs - 0.3) / 0.15)
    masks[3] = 40 * (1 - torch.hypot(ys - 0.25, xs - 0.75) / 0.1)
    return masks


def bench_model():
    """The tiny preset (seed 0) with 4 confident queries of distinct masks (module docstring)."""
    import torch

    from hf_detr_seg.data.demo import DEMO_LABELS
    from hf_detr_seg.labels import LabelMap
    from hf_detr_seg.modeling import build_model
    from hf_detr_seg.testing import steer_queries

    label_map = LabelMap.from_dict(DEMO_LABELS)
    torch.manual_seed(0)
    model = build_model(label_map, preset="tiny").eval()
    queries, labels = model.config.num_queries, label_map.num_classes + 1
    classes = torch.tensor(KEPT_CLASSES + [labels - 1] * (queries - len(KEPT_CLASSES)))
    steer_queries(model, torch.nn.functional.one_hot(classes, labels) * 12.0, query_masks)
    return model, label_map


def naive_tiles(model, label_map, photo: np.ndarray, windows: list, threshold: float) -> list:
    """The reference loop: transformers' model and post-processing on each tile, one at a time."""
    import torch
    from transformers import DetrImageProcessor

    from hf_detr_seg.data.training_data import to_pixel_values
    from hf_detr_seg.inference import TilePrediction

    processor = DetrImageProcessor()
    stuff = {i for i, c in enumerate(label_map.classes) if not c.isthing}
    predictions = []
    for top, left, bottom, right in windows:
        tile = photo[top:bottom, left:right]
        with torch.no_grad():
            outputs = model(pixel_values=to_pixel_values(tile)[None])
        result = processor.post_process_panoptic_segmentation(
            outputs, threshold=threshold, label_ids_to_fuse=stuff, target_sizes=[tile.shape[:2]])[0]
        segmentation = result["segmentation"]
        first = {}  # transformers lists a fused segment once per query: keep the first entry (postprocess.py)
        for info in result["segments_info"]:
            first.setdefault(info["id"], {"id": info["id"], "label_id": info["label_id"],
                                          "score": round(info["score"], 6)})
        id_map = torch.where(segmentation < 0, 0, segmentation).to(torch.int32).numpy()
        predictions.append(TilePrediction(id_map, list(first.values())))
    return predictions


def _sides(photo_size: tuple[int, int] = PHOTO) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(ours, reference): each segments the same photo and returns (id map, segments, kept queries per tile)."""
    from hf_detr_seg.inference import DefectSegmenter, merge_tiles, tile_windows

    model, label_map = bench_model()
    photo = inspection_photo(*photo_size)
    segmenter = DefectSegmenter(model, label_map, image_size=TILE, tile_size=TILE, tile_overlap=OVERLAP,
                                batch_size=BATCH, device="cpu")
    windows = tile_windows(*photo_size, TILE, OVERLAP)
    isthing = [c.isthing for c in label_map.classes]

    def ours() -> tuple[np.ndarray, list]:
        result = segmenter(photo)
        return result.id_map, [(s.id, s.label_id, s.score, s.area, s.bbox) for s in result.segments]

    def reference() -> tuple[np.ndarray, list]:
        merged = merge_tiles(*photo_size, windows, naive_tiles(model, label_map, photo, windows,
                                                               segmenter.threshold), isthing)
        from hf_detr_seg.inference.results import build_result

        result = build_result(merged, segmenter.names, photo_size)
        return result.id_map, [(s.id, s.label_id, s.score, s.area, s.bbox) for s in result.segments]

    return ours, reference


def _describe(result: tuple[np.ndarray, list]) -> str:
    id_map, segments = result
    digest = hashlib.sha1(np.ascontiguousarray(id_map).data).hexdigest()[:12]  # no copy of a 24-MP map
    return f"{len(segments)} segments, id map sha1 {digest}"


def _check(note: str) -> Callable[[Any, Any], None]:
    def check(mine, theirs) -> None:
        assert np.array_equal(mine[0], theirs[0]), "the id maps differ"
        assert mine[1] == theirs[1], "the segments differ"
        check.note = f"{note}; same segments ({_describe(mine)})"

    return check


def processor_seconds(photo_size: tuple[int, int] = PHOTO, sample: int = 8) -> float:
    """What transformers' own preprocessing (`DetrImageProcessor(images=tile)`) would add to the reference over
    all the photo's tiles, measured on `sample` tiles (not counted in the reference's time: module docstring)."""
    import time

    from transformers import DetrImageProcessor

    from hf_detr_seg.data.transforms import longest_edge
    from hf_detr_seg.inference import tile_windows

    processor = DetrImageProcessor(size={"shortest_edge": TILE, "longest_edge": longest_edge(TILE)})
    tile = inspection_photo(TILE, TILE)
    processor(images=tile, return_tensors="pt")
    start = time.perf_counter()
    for _ in range(sample):
        processor(images=tile, return_tensors="pt")
    return (time.perf_counter() - start) / sample * len(tile_windows(*photo_size, TILE, OVERLAP))


def predict_large_photo(tmp: Path) -> Row:
    for side in _sides((1024, 1536)):  # warm-up on 12 tiles: first-call costs of both sides, not timed
        side()
    ours, reference = _sides()
    note = (f"one {PHOTO[1]} x {PHOTO[0]} photo, {TILE}-px tiles (overlap {OVERLAP}, 176 tiles) at {TILE} px, tiny "
            f"preset, 4 of 20 queries kept per tile; ours batch {BATCH} vs transformers' model + post-processing per "
            f"tile and merge_tiles, CPU; transformers' preprocessing would add {processor_seconds():.1f} s to the "
            "reference (not counted)")
    return Row(ours, reference, _check(note), unit="s", note=note, repeat=3, warmed=True)


def large_photo_workload(side: str) -> Callable[[], dict[str, Any]]:
    """Peak memory of one side segmenting the 24-MP photo (benchmarks/peak_rss.py runs it in a fresh process)."""
    ours, reference = _sides()
    step = {"ours": ours, "reference": reference}.get(side)
    if step is None:
        raise ValueError(f"side={side!r}: expected 'ours' or 'reference'")
    return lambda: _describe(step())


def predict_large_photo_peak_memory(tmp: Path) -> Row:
    note = (f"one {PHOTO[1]} x {PHOTO[0]} photo as predict_large_photo; peak RSS above the built model and photo, "
            "fresh process per side (glibc mmap threshold fixed)")

    def check(mine: dict, theirs: dict) -> None:
        assert mine["result"] == theirs["result"], (mine["result"], theirs["result"])
        check.note = f"{note}; same segments ({mine['result']})"

    def side(name: str) -> Callable[[], dict[str, Any]]:
        return lambda: measure_peak_rss("predict_large_photo", name)

    return Row(side("ours"), side("reference"), check, unit="MiB", note=note, repeat=1,
               metric=lambda report: report["peak_mib"])


ROWS: dict[str, Callable[[Path], Row]] = {
    "predict_large_photo": predict_large_photo,
    "predict_large_photo_peak_memory": predict_large_photo_peak_memory,
}
MEMORY_WORKLOADS: dict[str, Callable[[str], Callable[[], Any]]] = {"predict_large_photo": large_photo_workload}

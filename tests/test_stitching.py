"""Stitching in place: the same id map and segments as merging all tiles at full size, and memory that does not
grow with the number of queries (a large photo gets no per-query or per-class full-size map)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_detr_seg.inference import TilePrediction, TileStitcher, merge_tiles, tile_windows
from hf_detr_seg.inference.results import segment_stats
from hf_detr_seg.testing import random_blob

REPO = Path(__file__).resolve().parents[1]
ISTHING = [True, True, True, False, False]  # classes 3 and 4 are stuff


def reference_merge(height, width, windows, predictions, isthing) -> TilePrediction:
    """The full-size merge `TileStitcher` replaced (same rules, on whole-image int64 maps), kept as the reference."""
    luts, labels, scores = [], [0], [0.0]
    for prediction in predictions:
        lut = np.zeros(max((s["id"] for s in prediction.segments), default=0) + 1, np.int32)
        for segment in prediction.segments:
            lut[segment["id"]] = len(labels)
            labels.append(int(segment["label_id"]))
            scores.append(float(segment["score"]))
        luts.append(lut)
    labels_arr = np.asarray(labels, np.int64)
    thing_arr = np.asarray([bool(isthing[label]) for label in labels], bool)
    thing_arr[0] = False
    tops, lefts = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    tile = max(max(w[2] - w[0] for w in windows), max(w[3] - w[1] for w in windows))

    def cuts(starts, length):
        ends = [min(s + tile, length) for s in starts]
        return [0, *[(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)], length]

    row_cuts, col_cuts = cuts(tops, height), cuts(lefts, width)
    assembled = np.zeros((height, width), np.int32)
    for (top, left, _, _), prediction, lut in zip(windows, predictions, luts):
        r, c = tops.index(top), lefts.index(left)
        y0, y1, x0, x1 = row_cuts[r], row_cuts[r + 1], col_cuts[c], col_cuts[c + 1]
        assembled[y0:y1, x0:x1] = lut[prediction.id_map[y0 - top : y1 - top, x0 - left : x1 - left]]
    parent = list(range(len(labels)))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    def join(a, b):
        same = (a != b) & (labels_arr[a] == labels_arr[b]) & thing_arr[a] & thing_arr[b]
        for x, y in np.unique(np.stack([a[same], b[same]], 1), axis=0).tolist() if same.any() else []:
            rx, ry = find(x), find(y)
            parent[max(rx, ry)] = min(rx, ry)

    for t, (top_t, left_t, bottom_t, right_t) in enumerate(windows):
        for u in range(t + 1, len(windows)):
            top_u, left_u, bottom_u, right_u = windows[u]
            y0, y1, x0, x1 = max(top_t, top_u), min(bottom_t, bottom_u), max(left_t, left_u), min(right_t, right_u)
            if y0 < y1 and x0 < x1:
                join(luts[t][predictions[t].id_map[y0 - top_t : y1 - top_t, x0 - left_t : x1 - left_t]].ravel(),
                     luts[u][predictions[u].id_map[y0 - top_u : y1 - top_u, x0 - left_u : x1 - left_u]].ravel())
    for x in col_cuts[1:-1]:
        a, b = assembled[:, x - 1], assembled[:, x]
        join(a, b), join(a[:-1], b[1:]), join(a[1:], b[:-1])
    for y in row_cuts[1:-1]:
        a, b = assembled[y - 1], assembled[y]
        join(a, b), join(a[:-1], b[1:]), join(a[1:], b[:-1])
    first_of_stuff = {}
    for candidate in range(1, len(labels)):
        if not thing_arr[candidate]:
            rx, ry = find(first_of_stuff.setdefault(labels[candidate], candidate)), find(candidate)
            parent[max(rx, ry)] = min(rx, ry)
    areas = np.bincount(assembled.ravel(), minlength=len(labels))
    roots = np.asarray([find(c) for c in range(len(labels))], np.int64)
    root_area = np.bincount(roots[1:], weights=areas[1:], minlength=len(labels))
    root_score = np.bincount(roots[1:], weights=areas[1:] * np.asarray(scores[1:]), minlength=len(labels))
    merged = roots[assembled]
    present, first = np.unique(merged.ravel(), return_index=True)
    order = [int(r) for _, r in sorted(zip(first.tolist(), present.tolist())) if r != 0]
    final = np.zeros(len(labels), np.int32)
    segments = []
    for new_id, root in enumerate(order, start=1):
        final[root] = new_id
        segments.append({"id": new_id, "label_id": labels[root],
                         "score": round(float(root_score[root] / root_area[root]), 6)})
    return TilePrediction(final[merged], segments)


def random_tiles(rng: np.random.Generator, windows) -> list[TilePrediction]:
    """Each tile: blobs of random classes under random (unordered) ids, void between them, scores of 6 decimals,
    and a listed segment without pixels now and then."""
    predictions = []
    for top, left, bottom, right in windows:
        shape = (bottom - top, right - left)
        id_map = np.zeros(shape, np.int32)
        ids = rng.permutation(np.arange(1, 9))[: rng.integers(0, 7)]
        for segment_id in ids:
            id_map[random_blob(rng, shape)] = segment_id
        if rng.random() < 0.5:
            id_map[rng.random(shape) < 0.02] = 0
        listed = [int(i) for i in ids if (id_map == i).any() or rng.random() < 0.5]
        segments = [{"id": i, "label_id": int(rng.integers(0, len(ISTHING))), "score": round(rng.uniform(0.86, 1), 6)}
                    for i in rng.permutation(listed)]
        predictions.append(TilePrediction(id_map, segments))
    return predictions


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_stitching_in_place_equals_the_full_size_merge(overlap: float):
    rng = np.random.default_rng(int(overlap * 10))
    for height, width, tile in [(130, 170, 48), (100, 61, 40), (64, 200, 64), (97, 97, 96)]:
        windows = tile_windows(height, width, tile, overlap)
        predictions = random_tiles(rng, windows)
        expected = reference_merge(height, width, windows, predictions, ISTHING)
        stitcher = TileStitcher(height, width, windows, ISTHING)
        for prediction in predictions:
            stitcher.add(prediction)
        merged, stats = stitcher.finish()
        np.testing.assert_array_equal(merged.id_map, expected.id_map)
        assert merged.segments == expected.segments
        assert stats == segment_stats(expected.id_map, len(expected.segments))
        assert merge_tiles(height, width, windows, predictions, ISTHING).segments == expected.segments
        assert len(stitcher.held) == 0


def test_the_stitcher_holds_only_tiles_that_a_later_tile_overlaps():
    windows = tile_windows(400, 1000, 100, 0.25)  # 13 columns, 5 rows
    stitcher = TileStitcher(400, 1000, windows, ISTHING)
    held = []
    for prediction in random_tiles(np.random.default_rng(1), windows):
        stitcher.add(prediction)
        held.append(len(stitcher.held))
    assert max(held) <= 13 + 1  # about one row of tiles, whatever the number of rows
    with pytest.raises(ValueError, match="tile prediction of shape"):
        TileStitcher(400, 1000, windows, ISTHING).add(TilePrediction(np.zeros((5, 5), np.int32)))


PEAK_SCRIPT = """
import gc, json, sys, numpy as np, torch
sys.path.insert(0, {benchmarks!r})
from peak_rss import peak_kib, release_free_heap, reset_peak
from hf_detr_seg.inference import DefectSegmenter
from hf_detr_seg.testing import steer_queries
torch.manual_seed(0)
segmenter = DefectSegmenter.from_pretrained({model!r}, device="cpu", tile_size=256, batch_size=2)
classes = torch.tensor([0, 1, 2, 4, 0, 1, 2, 4] + [5] * 12)
ys = torch.linspace(0, 1, 64)[:, None]
def patterns(h, w):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = torch.full((20, h, w), -10.0)
    for q in range(8):  # eight kept queries per tile: bands across the tile, one after the other
        out[q] = 20 * (0.07 - (yy - (q + 0.5) / 8).abs())
    return out
steer_queries(segmenter.model, torch.nn.functional.one_hot(classes, 6) * 12.0, patterns, replace=True)
image = (np.random.default_rng(0).random(({height}, {width}, 3)) * 255).astype(np.uint8)
segmenter(image[:300, :300])  # warm-up: first-call allocations
gc.collect(); release_free_heap(); baseline = reset_peak()
result = segmenter(image)
print(json.dumps({{"peak_mib": (peak_kib() - baseline) / 1024, "segments": len(result.segments)}}))
"""


def test_a_large_photo_is_stitched_without_full_size_maps_per_query(tmp_path: Path):
    """Peak RSS above the model and the photo (fresh process, glibc's mmap threshold fixed as in the benchmarks):
    the id map (4 bytes a pixel) and a tile working set, while eight kept queries per tile would need 32 bytes
    a pixel as full-size float maps, and the full-size merge it replaced about 30 (int64 maps and a sort)."""
    from conftest import save_tiny_model

    from hf_detr_seg.data.demo import DEMO_LABELS
    from hf_detr_seg.labels import LabelMap

    model = save_tiny_model(tmp_path / "tiny", LabelMap.from_dict(DEMO_LABELS), 64)
    height, width = 3000, 4000
    script = PEAK_SCRIPT.format(benchmarks=str(REPO / "benchmarks"), model=str(model), height=height, width=width)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    pixels_mib = height * width / 2**20
    assert report["segments"] >= 4
    bound = 5 * pixels_mib + 48  # 4 bytes a pixel for the map, and a few tiles (measured: 54 MiB in all)
    assert report["peak_mib"] < bound, report
    assert 8 * 4 * pixels_mib > 3 * bound  # per-query float maps would be far above it

"""One id map for a whole photo from its tiles' predictions, assembled in place as the tiles come.

Rules (the same whatever order the rows of tiles are predicted in, and whatever the batch):
1. Centre-most tile wins: each tile writes its core (`tiling.TileGrid`) into the image's one int32 map; tile
   predictions near tile borders, where the model saw the least context, are thereby discarded.
2. Thing segments of the same class are joined across tiles (union-find) when (a) they share a pixel where
   their tiles overlap (both tiles predicted that class there, before step 1 chose one of them), or (b) they
   touch across a seam line of the assembled map (8-connectivity, so a one-pixel diagonal crack crossing a
   seam also joins). (b) makes tiles without overlap work too. Segments of one tile are never merged with each
   other: within a tile the model's instances stand.
3. Every stuff class becomes one segment for the whole image.
4. A merged segment's score is the area-weighted mean of its parts' scores, each part weighted by the pixels it
   holds in the final map (parts with no pixel left weigh nothing; segments with no pixel are dropped).
5. Segment ids are renumbered 1..N in raster order of each segment's first pixel.

Memory. The stitcher holds the image's int32 map (4 bytes a pixel, the output itself) and the predictions of
the tiles that a later tile still overlaps (about one row of tiles); nothing else is image-sized. Each part's
area, box and first pixel are counted on its tile's core when the tile comes, so steps 4 and 5 need no pass
over the whole map, and the final renumbering rewrites the map in place, `ROW_BLOCK` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .results import ROW_BLOCK, SegmentStats, TilePrediction
from .tiling import TileGrid, Window


class _UnionFind:
    """Disjoint sets of candidate segments; a set's root is its smallest member, whatever the order of unions."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]

    def add(self) -> None:
        self.parent.append(len(self.parent))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class TileStitcher:
    """Assembles one image from its tile predictions (module docstring), given in the grid's row-major order.

    `windows` must be a grid from `tiling.tile_windows`; `isthing[label_id]` says whether a class is a thing.
    """

    def __init__(self, height: int, width: int, windows: Sequence[Window], isthing: Sequence[bool]) -> None:
        self.grid = TileGrid(height, width, list(windows))
        self.isthing = list(isthing)
        self.assembled = np.zeros((height, width), np.int32)
        # Candidate segments: every tile's segments, numbered 1..C across tiles; 0 is "nothing".
        self.labels: list[int] = [0]
        self.scores: list[float] = [0.0]
        self.areas: list[int] = [0]
        self.first: list[int] = [-1]  # raster index of the first pixel in the assembled map
        self.boxes: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]  # top, left, bottom, right
        self.union = _UnionFind()
        self.held: dict[int, np.ndarray] = {}  # tile index -> its map in candidate ids (overlapped by later tiles)
        self.count = 0
        self._label_array = np.zeros(1, np.int64)  # `labels` and "is a thing" as arrays, for `_join`
        self._thing_array = np.zeros(1, bool)

    @property
    def done(self) -> bool:
        return self.count == len(self.grid.windows)

    def add(self, prediction: TilePrediction) -> None:
        """The next tile's prediction (at the window's size)."""
        t = self.count
        top, left, bottom, right = self.grid.windows[t]
        if prediction.id_map.shape != (bottom - top, right - left):
            raise ValueError(f"tile prediction of shape {prediction.id_map.shape} for window {(top, left, bottom, right)}")
        lut = np.zeros(max((s["id"] for s in prediction.segments), default=0) + 1, np.int32)
        for segment in prediction.segments:
            lut[segment["id"]] = len(self.labels)
            self.labels.append(int(segment["label_id"]))
            self.scores.append(float(segment["score"]))
            self.areas.append(0)
            self.first.append(-1)
            self.boxes.append((0, 0, 0, 0))
            self.union.add()
        self._label_array = np.asarray(self.labels)
        self._thing_array = np.asarray([False] + [bool(self.isthing[label]) for label in self.labels[1:]])
        candidates = lut[prediction.id_map]
        y0, x0, y1, x1 = self.grid.core(t)
        core = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        self.assembled[y0:y1, x0:x1] = candidates[core]
        self._count_core(prediction.id_map[core], lut, y0, x0)
        for u, held in self.held.items():  # 2a. thing segments sharing pixels where two tiles overlap
            self._join_overlap(self.grid.windows[u], held, (top, left, bottom, right), candidates)
        if self.grid.last_overlapping[t] > t:
            self.held[t] = candidates
        self.held = {u: held for u, held in self.held.items() if self.grid.last_overlapping[u] > t}
        self.count += 1

    def _count_core(self, local: np.ndarray, lut: np.ndarray, y0: int, x0: int) -> None:
        """Area, box and first pixel of each segment in a tile's core (`local`: the tile's own ids there); a
        candidate has pixels in one core only, so these are its area, box and first pixel in the image."""
        max_id = len(lut) - 1
        if max_id == 0:
            return
        areas = np.bincount(local.ravel(), minlength=max_id + 1)
        width = self.assembled.shape[1]
        for segment_id, box in enumerate(ndimage.find_objects(local, max_label=max_id), start=1):
            candidate = int(lut[segment_id])
            if box is None or candidate == 0:
                continue
            rows, cols = box
            first_col = cols.start + int(np.argmax(local[rows.start, cols] == segment_id))
            self.areas[candidate] = int(areas[segment_id])
            self.first[candidate] = (y0 + rows.start) * width + x0 + first_col
            self.boxes[candidate] = (y0 + rows.start, x0 + cols.start, y0 + rows.stop, x0 + cols.stop)

    def _join(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the thing candidates of one class that lie on the same positions of `a` and `b`."""
        labels, thing = self._label_array, self._thing_array
        same = (a != b) & (labels[a] == labels[b]) & thing[a] & thing[b]
        if not same.any():
            return
        # Distinct (a, b) pairs as one int64 each; runs along a strip repeat a pair, so drop repeats before sorting.
        pairs = a[same].astype(np.int64) * len(self.labels) + b[same]
        pairs = np.unique(pairs[np.r_[True, pairs[1:] != pairs[:-1]]])
        for x, y in zip((pairs // len(self.labels)).tolist(), (pairs % len(self.labels)).tolist()):
            self.union.union(x, y)

    def _join_overlap(self, window_t: Window, map_t: np.ndarray, window_u: Window, map_u: np.ndarray) -> None:
        top_t, left_t, bottom_t, right_t = window_t
        top_u, left_u, bottom_u, right_u = window_u
        y0, y1 = max(top_t, top_u), min(bottom_t, bottom_u)
        x0, x1 = max(left_t, left_u), min(right_t, right_u)
        if y0 < y1 and x0 < x1:
            a = map_t[y0 - top_t : y1 - top_t, x0 - left_t : x1 - left_t]
            b = map_u[y0 - top_u : y1 - top_u, x0 - left_u : x1 - left_u]
            self._join(a.ravel(), b.ravel())

    def _join_seams(self) -> None:
        """2b. Thing segments touching across a seam line of the assembled map (8-connectivity)."""
        for x in self.grid.col_cuts[1:-1]:
            left_col, right_col = self.assembled[:, x - 1], self.assembled[:, x]
            self._join(left_col, right_col)
            self._join(left_col[:-1], right_col[1:])
            self._join(left_col[1:], right_col[:-1])
        for y in self.grid.row_cuts[1:-1]:
            upper, lower = self.assembled[y - 1], self.assembled[y]
            self._join(upper, lower)
            self._join(upper[:-1], lower[1:])
            self._join(upper[1:], lower[:-1])

    def finish(self) -> tuple[TilePrediction, SegmentStats]:
        """The merged prediction (the assembled map, renumbered in place) and each segment's area and box.

        Segments carry the merged, area-weighted score rounded to 6 decimals.
        """
        if not self.done:
            raise ValueError(f"{self.count} of {len(self.grid.windows)} tiles added")
        self._join_seams()
        first_of_stuff: dict[int, int] = {}  # 3. stuff: one segment per class
        for candidate in range(1, len(self.labels)):
            if not self.isthing[self.labels[candidate]]:
                self.union.union(first_of_stuff.setdefault(self.labels[candidate], candidate), candidate)
        order, roots, root_area, root_score = self._merged_segments()
        final = np.zeros(len(self.labels), np.int32)
        segments, stats = [], {}
        for new_id, root in enumerate(order, start=1):
            final[root] = new_id
            segments.append({"id": new_id, "label_id": self.labels[root],
                             "score": round(float(root_score[root] / root_area[root]), 6)})
        boxes = self._merged_boxes(roots)
        for new_id, root in enumerate(order, start=1):
            top, left, bottom, right = boxes[root]
            stats[new_id] = (int(root_area[root]), [left, top, right - left, bottom - top])
        relabel = final[roots].astype(np.int32)
        for start in range(0, self.assembled.shape[0], ROW_BLOCK):
            block = self.assembled[start : start + ROW_BLOCK]
            block[...] = relabel[block]
        self.held = {}
        return TilePrediction(self.assembled, segments), stats

    def _merged_segments(self) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """4-5. Roots in raster order of their first pixel, each candidate's root, area and score sums by root."""
        count = len(self.labels)
        areas = np.asarray(self.areas, np.int64)
        roots = np.asarray([self.union.find(c) for c in range(count)], np.int64)
        root_area = np.bincount(roots[1:], weights=areas[1:], minlength=count)
        root_score = np.bincount(roots[1:], weights=areas[1:] * np.asarray(self.scores[1:]), minlength=count)
        first = np.full(count, np.iinfo(np.int64).max, np.int64)
        has_pixels = np.flatnonzero(areas > 0)
        np.minimum.at(first, roots[has_pixels], np.asarray(self.first, np.int64)[has_pixels])
        present = [int(r) for r in np.unique(roots[has_pixels]) if r != 0]
        return sorted(present, key=lambda r: first[r]), roots, root_area, root_score

    def _merged_boxes(self, roots: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
        boxes: dict[int, tuple[int, int, int, int]] = {}
        for candidate in range(1, len(self.labels)):
            if self.areas[candidate] == 0:
                continue
            root = int(roots[candidate])
            box = self.boxes[candidate]
            old = boxes.get(root, box)
            boxes[root] = (min(old[0], box[0]), min(old[1], box[1]), max(old[2], box[2]), max(old[3], box[3]))
        return boxes


def merge_tiles(
    height: int,
    width: int,
    windows: Sequence[Window],
    predictions: Sequence[TilePrediction],
    isthing: Sequence[bool],
) -> TilePrediction:
    """One id map for the whole image from all its tile predictions at once (see `TileStitcher`).

    Returned segments are {"id", "label_id", "score"} with the merged, area-weighted score.
    """
    stitcher = TileStitcher(height, width, windows, isthing)
    for prediction in predictions:
        stitcher.add(prediction)
    merged, _ = stitcher.finish()
    return merged

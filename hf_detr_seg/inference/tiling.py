"""The tile grid of a large photo: which windows are predicted, and which part of the image each one owns.

Photos are often 4000 x 3000 while the model was trained on small crops, so an image whose width or height
exceeds `tile_size` (in the image's own pixels) is cut into a grid of `tile_size` x `tile_size` windows
(narrower where the image is), each predicted as an image of its own (resized to the model's `image_size` like
any input). `stitching.TileStitcher` then assembles the windows' predictions into one id map.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserInputError

Window = tuple[int, int, int, int]  # (top, left, bottom, right) in image pixels


def tile_windows(height: int, width: int, tile_size: int, overlap: float) -> list[Window]:
    """Windows (top, left, bottom, right) of a tile grid covering a height x width image, row by row.

    `overlap` is a fraction of `tile_size` in [0, 1): neighbouring tiles overlap by at least
    `round(overlap * tile_size)` pixels. Each axis holds the fewest tiles that achieve this, spread evenly from
    one image border to the other (the first starts at 0, the last ends at the border), so every tile is
    `tile_size` long except along an axis shorter than `tile_size`, where the one tile is the whole axis.
    """
    check_tiling(tile_size, overlap)
    rows = _axis_starts(height, tile_size, overlap)
    cols = _axis_starts(width, tile_size, overlap)
    return [(top, left, min(top + tile_size, height), min(left + tile_size, width)) for top in rows for left in cols]


def check_tiling(tile_size: int, overlap: float) -> None:
    """Raise `UserInputError` unless `tile_size` is an integer >= 16 and `overlap` a fraction in [0, 1)."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 16:
        raise UserInputError(f"tile_size must be an integer of at least 16 pixels, got {tile_size!r}")
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise UserInputError(f"tile_overlap must be a fraction of the tile size in [0, 1), got {overlap!r}")


def _axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, tile - int(round(overlap * tile)))
    count = math.ceil((length - tile) / stride) + 1
    # Gaps between starts are at most ceil((length - tile) / (count - 1)) <= stride: the overlap holds.
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def _axis_cuts(starts: list[int], tile: int, length: int) -> list[int]:
    """Boundaries of the tiles' cores along one axis: 0, the middle of each overlap, `length`."""
    ends = [min(s + tile, length) for s in starts]
    middles = [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)]
    return [0, *middles, length]


class TileGrid:
    """A row-major grid of windows (from `tile_windows`) and the core each tile owns.

    Along each axis the boundary between two neighbouring tiles is the middle of their overlap, so every tile
    owns a rectangle ("core") of the image: the pixels that it covers farther from its border than any other
    tile does (the product of the two 1-D choices maximises min(distance to the vertical borders, distance to the
    horizontal borders) over all tiles covering a pixel).
    """

    def __init__(self, height: int, width: int, windows: list[Window]) -> None:
        self.height, self.width = height, width
        self.windows = list(windows)
        self.tops = sorted({w[0] for w in self.windows})
        self.lefts = sorted({w[1] for w in self.windows})
        tile = max(max(w[2] - w[0] for w in self.windows), max(w[3] - w[1] for w in self.windows))
        self.row_cuts = _axis_cuts(self.tops, tile, height)
        self.col_cuts = _axis_cuts(self.lefts, tile, width)
        self.last_overlapping = self._last_overlapping()

    def core(self, index: int) -> Window:
        """The rectangle (top, left, bottom, right) of the image that tile `index` owns."""
        top, left = self.windows[index][:2]
        r, c = self.tops.index(top), self.lefts.index(left)
        return self.row_cuts[r], self.col_cuts[c], self.row_cuts[r + 1], self.col_cuts[c + 1]

    def _last_overlapping(self) -> list[int]:
        """For each tile, the last tile (in grid order) that shares a pixel with it (itself when none after it)."""
        last = list(range(len(self.windows)))
        for t, (top_t, left_t, bottom_t, right_t) in enumerate(self.windows):
            for u in range(t + 1, len(self.windows)):
                top_u, left_u, bottom_u, right_u = self.windows[u]
                if top_u >= bottom_t:
                    break  # row-major: every later tile starts lower still
                if max(left_t, left_u) < min(right_t, right_u) and max(top_t, top_u) < min(bottom_t, bottom_u):
                    last[t] = u
        return last

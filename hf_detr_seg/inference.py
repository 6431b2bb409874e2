"""Predict with a trained model: `DefectSegmenter` (batching, tiling, post-processing) and `predict_paths`.

Preprocessing is training's evaluation path, unchanged: DETR's resize (`transforms.resize_shortest_edge`, the
code `fixed_resize` runs: shortest edge `image_size`, longest at most x1333/800), ImageNet normalisation
(`to_pixel_values`), zero padding to the batch (`collate_fn`); the forward pass and post-processing are
`evaluation.predict_batch` (padding cropped off the mask logits, then `post_process_panoptic` at the image's own
size, stuff classes fused into one segment per class).

Tiling (`tile_size`): photos are often 4000 x 3000 while the model was trained on small crops at `image_size`,
so an image whose width or height exceeds `tile_size` (in the image's own pixels) is cut into a grid of
`tile_size` x `tile_size` windows (`tile_windows`; narrower where the image is), each predicted as an image of
its own (resized to `image_size` like any input), and the tile predictions are merged into one id map:

1. Centre-most tile wins. Along each axis the boundary between two neighbouring tiles is the middle of their
   overlap, so every tile owns a rectangle ("core") of the image, and each pixel takes the prediction of the
   tile that covers it farthest from that tile's border (the product of the two 1-D choices maximises
   min(distance to the vertical borders, distance to the horizontal borders) over all tiles covering it).
   Tile predictions near tile borders, where the model saw the least context, are thereby discarded.
2. Thing segments of the same class are joined across tiles (union-find) when (a) they share a pixel where
   their tiles overlap (both tiles predicted that class there, before step 1 chose one of them), or (b) they
   touch across a seam line of the assembled map (8-connectivity, so a one-pixel diagonal crack crossing a
   seam also joins). (b) makes tiles without overlap work too. Segments of one tile are never merged with each
   other: within a tile the model's instances stand.
3. Every stuff class becomes one segment for the whole image.
4. A merged segment's score is the area-weighted mean of its parts' scores, each part weighted by the pixels it
   holds in the final map (parts with no pixel left weigh nothing; segments with no pixel are dropped).
5. Segment ids are renumbered 1..N in raster order of each segment's first pixel.

Without tiling, the result is `post_process_panoptic`'s, ids and scores included (ids in query order).
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from scipy import ndimage

from .data.builder import IMAGE_SUFFIXES
from .data.masks import read_image
from .data.panoptic import write_panoptic_png
from .data.training_data import collate_fn, to_pixel_values
from .data.transforms import DETR_SHORTEST, resize_shortest_edge
from .errors import DataError, UserInputError
from .evaluation import predict_batch
from .hub import RUN_FILE
from .labels import LabelMap
from .postprocess import DEFAULT_THRESHOLD

PROCESSOR_FILE = "preprocessor_config.json"
REPORT_FILE = "report.csv"

ImageInput = Image.Image | np.ndarray | str | Path


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Segment:
    """One predicted segment. `bbox` is the tight [x, y, w, h] box in the image's own pixels (pixel edges)."""

    id: int
    label: str
    label_id: int  # model class index
    score: float
    area: int  # pixels
    bbox: list[int]


@dataclass
class SegmentationResult:
    """One image's prediction at the image's own size: `id_map` int32 H x W (0 = no segment), its segments."""

    id_map: np.ndarray
    segments: list[Segment]
    image_size: tuple[int, int]  # (height, width)


@dataclass
class TilePrediction:
    """A prediction at one array's own size: int32 id map and segments {"id", "label_id", "score"} (ids 1..N)."""

    id_map: np.ndarray
    segments: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- tiles
def tile_windows(height: int, width: int, tile_size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Windows (top, left, bottom, right) of a tile grid covering a height x width image, row by row.

    `overlap` is a fraction of `tile_size` in [0, 1): neighbouring tiles overlap by at least
    `round(overlap * tile_size)` pixels. Each axis holds the fewest tiles that achieve this, spread evenly from
    one image border to the other (the first starts at 0, the last ends at the border), so every tile is
    `tile_size` long except along an axis shorter than `tile_size`, where the one tile is the whole axis.
    """
    _check_tiling(tile_size, overlap)
    rows = _axis_starts(height, tile_size, overlap)
    cols = _axis_starts(width, tile_size, overlap)
    return [(top, left, min(top + tile_size, height), min(left + tile_size, width)) for top in rows for left in cols]


def _check_tiling(tile_size: int, overlap: float) -> None:
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


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

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


def merge_tiles(
    height: int,
    width: int,
    windows: Sequence[tuple[int, int, int, int]],
    predictions: Sequence[TilePrediction],
    isthing: Sequence[bool],
) -> TilePrediction:
    """One id map for the whole image from per-tile predictions (the module docstring gives the rules).

    `windows` must be a grid from `tile_windows` (row-major); `isthing[label_id]` says whether a class is a thing.
    Returned segments carry the merged, area-weighted score rounded to 6 decimals.
    """
    # Candidate segments: every tile's segments, numbered 1..C across tiles; 0 is "nothing".
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

    # 1. Centre-most tile wins: each tile writes its core rectangle.
    tops = sorted({w[0] for w in windows})
    lefts = sorted({w[1] for w in windows})
    tile = max(max(w[2] - w[0] for w in windows), max(w[3] - w[1] for w in windows))
    row_cuts, col_cuts = _axis_cuts(tops, tile, height), _axis_cuts(lefts, tile, width)
    assembled = np.zeros((height, width), np.int32)
    for (top, left, bottom, right), prediction, lut in zip(windows, predictions, luts):
        if prediction.id_map.shape != (bottom - top, right - left):
            raise ValueError(
                f"tile prediction of shape {prediction.id_map.shape} for window {(top, left, bottom, right)}"
            )
        r, c = tops.index(top), lefts.index(left)
        y0, y1, x0, x1 = row_cuts[r], row_cuts[r + 1], col_cuts[c], col_cuts[c + 1]
        assembled[y0:y1, x0:x1] = lut[prediction.id_map[y0 - top : y1 - top, x0 - left : x1 - left]]

    union = _UnionFind(len(labels))

    def join(a: np.ndarray, b: np.ndarray) -> None:
        same = (a != b) & (labels_arr[a] == labels_arr[b]) & thing_arr[a] & thing_arr[b]
        if same.any():
            for x, y in np.unique(np.stack([a[same], b[same]], 1), axis=0).tolist():
                union.union(x, y)

    # 2a. Thing segments sharing pixels where two tiles overlap.
    for t, (top_t, left_t, bottom_t, right_t) in enumerate(windows):
        for u in range(t + 1, len(windows)):
            top_u, left_u, bottom_u, right_u = windows[u]
            y0, y1 = max(top_t, top_u), min(bottom_t, bottom_u)
            x0, x1 = max(left_t, left_u), min(right_t, right_u)
            if y0 >= y1 or x0 >= x1:
                continue
            a = luts[t][predictions[t].id_map[y0 - top_t : y1 - top_t, x0 - left_t : x1 - left_t]]
            b = luts[u][predictions[u].id_map[y0 - top_u : y1 - top_u, x0 - left_u : x1 - left_u]]
            join(a.ravel(), b.ravel())
    # 2b. Thing segments touching across a seam line (8-connectivity).
    for x in col_cuts[1:-1]:
        left_col, right_col = assembled[:, x - 1], assembled[:, x]
        join(left_col, right_col)
        join(left_col[:-1], right_col[1:])
        join(left_col[1:], right_col[:-1])
    for y in row_cuts[1:-1]:
        upper, lower = assembled[y - 1], assembled[y]
        join(upper, lower)
        join(upper[:-1], lower[1:])
        join(upper[1:], lower[:-1])
    # 3. Stuff: one segment per class.
    first_of_stuff: dict[int, int] = {}
    for candidate in range(1, len(labels)):
        if not thing_arr[candidate]:
            union.union(first_of_stuff.setdefault(labels[candidate], candidate), candidate)

    # 4-5. Areas, area-weighted scores, ids in raster order of first pixels.
    areas = np.bincount(assembled.ravel(), minlength=len(labels))
    roots = np.asarray([union.find(c) for c in range(len(labels))], np.int64)
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


# --------------------------------------------------------------------------------------------------- segmenter
def _as_rgb_array(image: ImageInput) -> np.ndarray:
    """H x W x 3 uint8 RGB from a PIL image, an array (grey, RGB or RGBA) or a path (EXIF orientation applied)."""
    if isinstance(image, (str, Path)):
        image = read_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise UserInputError(f"expected a PIL image, a numpy array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise UserInputError(f"image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise UserInputError(f"image array must be H x W x 3 (RGB), got shape {image.shape}")
    return np.ascontiguousarray(image)


def _model_image_size(folder: Path) -> int:
    """The model's training size: run.yaml's `image_size`, else the processor's shortest edge, else DETR's 800."""
    try:
        run = yaml.safe_load((folder / RUN_FILE).read_text())
        if isinstance(run, dict) and isinstance(run.get("image_size"), int):
            return int(run["image_size"])
    except (OSError, yaml.YAMLError):
        pass
    try:
        size = json.loads((folder / PROCESSOR_FILE).read_text()).get("size", {})
        if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int):
            return int(size["shortest_edge"])
    except (OSError, ValueError, AttributeError):
        pass
    return DETR_SHORTEST


class DefectSegmenter:
    """Panoptic defect segmentation of whole images with a trained `DetrForSegmentation` (module docstring).

    `threshold`: query score threshold (strict, as `post_process_panoptic`). `image_size`: the shortest edge the
    model is fed. `tile_size`: tile images whose width or height exceeds it (None: never tile). `tile_overlap`:
    fraction of `tile_size` that neighbouring tiles share, in [0, 1). `batch_size`: images (or tiles) per forward.
    """

    def __init__(
        self,
        model,
        label_map: LabelMap | None = None,
        image_size: int = DETR_SHORTEST,
        threshold: float = DEFAULT_THRESHOLD,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        batch_size: int = 4,
        device: str | torch.device | None = None,
    ) -> None:
        from .modeling import label_map_from_config

        if tile_size is not None:
            _check_tiling(tile_size, tile_overlap)
        if not isinstance(image_size, int) or image_size < 8:
            raise UserInputError(f"image_size must be an integer of at least 8, got {image_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= threshold < 1:
            raise UserInputError(f"threshold must be in [0, 1), got {threshold!r}")
        self.label_map = label_map if label_map is not None else label_map_from_config(model.config)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.threshold = float(threshold)
        self.tile_size = tile_size
        self.tile_overlap = float(tile_overlap)
        self.batch_size = batch_size
        self.names = self.label_map.names
        self.isthing = [c.isthing for c in self.label_map.classes]
        self.stuff_label_ids = {i for i, thing in enumerate(self.isthing) if not thing}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        image_size: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        batch_size: int = 4,
    ) -> "DefectSegmenter":
        """Load a model folder written by training (`hub.save_model_folder`) or `save_pretrained`.

        `image_size` defaults to the folder's run.yaml `image_size` (else its processor's shortest edge, else 800).
        Raises `UserInputError` when the folder is not a `DetrForSegmentation` with a label map.
        """
        from transformers import DetrForSegmentation

        folder = Path(model_dir)
        config_path = folder / "config.json"
        if not folder.is_dir():
            raise UserInputError(f"{folder}: model folder not found")
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise UserInputError(f"{folder}: no config.json; expected a model folder written by training") from None
        except ValueError as err:
            raise UserInputError(f"{config_path}: not valid JSON ({err})") from None
        architectures = config.get("architectures") or []
        if config.get("model_type") != "detr" or (architectures and "DetrForSegmentation" not in architectures):
            raise UserInputError(
                f"{config_path}: model_type {config.get('model_type')!r}, architectures {architectures}; "
                "expected a DETR segmentation model (DetrForSegmentation)"
            )
        if "label_map" not in config:
            raise UserInputError(f"{config_path}: no `label_map`; expected a model trained by hf_detr_seg")
        try:
            model = DetrForSegmentation.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise UserInputError(f"{folder}: cannot load the model ({err})") from None
        return cls(
            model,
            image_size=image_size if image_size is not None else _model_image_size(folder),
            threshold=threshold,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            batch_size=batch_size,
            device=device,
        )

    # ----------------------------------------------------------------------------------------- public
    def __call__(self, image: ImageInput) -> SegmentationResult:
        return next(self.predict_many([image]))

    def predict_many(self, images: Iterable[ImageInput]) -> Iterator[SegmentationResult]:
        """Results in input order; images are taken `batch_size` at a time and their tiles (or themselves)
        run through the model `batch_size` at a time."""
        chunk: list[np.ndarray] = []
        for image in images:
            chunk.append(_as_rgb_array(image))
            if len(chunk) == self.batch_size:
                yield from self._predict_chunk(chunk)
                chunk = []
        if chunk:
            yield from self._predict_chunk(chunk)

    def tiles_of(self, height: int, width: int) -> list[tuple[int, int, int, int]] | None:
        """The tile windows an image of this size is cut into, or None when it is predicted whole."""
        if self.tile_size is None or max(height, width) <= self.tile_size:
            return None
        return tile_windows(height, width, self.tile_size, self.tile_overlap)

    # ----------------------------------------------------------------------------------------- internals
    def _predict_chunk(self, images: list[np.ndarray]) -> list[SegmentationResult]:
        """Images predicted whole share batches; a tiled image's tiles are batched and merged image by image
        (so only one image's tile predictions are held at a time)."""
        results: list[SegmentationResult | None] = [None] * len(images)
        whole = [i for i, image in enumerate(images) if self.tiles_of(*image.shape[:2]) is None]
        for start in range(0, len(whole), self.batch_size):
            batch = whole[start : start + self.batch_size]
            for i, prediction in zip(batch, self._predict_arrays([images[i] for i in batch])):
                results[i] = self._result(prediction, images[i].shape[:2])
        for i, image in enumerate(images):
            windows = self.tiles_of(*image.shape[:2])
            if windows is None:
                continue
            predictions: list[TilePrediction] = []
            for start in range(0, len(windows), self.batch_size):
                batch_windows = windows[start : start + self.batch_size]
                predictions += self._predict_arrays([image[t:b, l:r] for t, l, b, r in batch_windows])
            merged = merge_tiles(image.shape[0], image.shape[1], windows, predictions, self.isthing)
            results[i] = self._result(merged, image.shape[:2])
        return results

    def _predict_arrays(self, arrays: Sequence[np.ndarray]) -> list[TilePrediction]:
        """The model's panoptic prediction of each array at the array's own size (training's eval path).

        The resize is `transforms.resize_shortest_edge` itself, the code `fixed_resize` runs, given no masks.
        """
        empty = np.zeros((0, 1, 1), bool)
        items, sizes = [], []
        for array in arrays:
            resized, _ = resize_shortest_edge(array, np.broadcast_to(empty, (0, *array.shape[:2])), self.image_size)
            items.append({"pixel_values": to_pixel_values(resized), "labels": None})
            sizes.append(resized.shape[:2])
        batch = collate_fn(items)
        predictions, _, _ = predict_batch(
            self.model,
            batch["pixel_values"].to(self.device),
            batch["pixel_mask"].to(self.device),
            sizes,
            [a.shape[:2] for a in arrays],
            self.stuff_label_ids,
            self.threshold,
        )
        return [
            TilePrediction(
                p.id_map.cpu().numpy().astype(np.int32, copy=False),
                [{"id": s["id"], "label_id": s["label_id"], "score": s["score"]} for s in p.segments],
            )
            for p in predictions
        ]

    def _result(self, prediction: TilePrediction, size: tuple[int, int]) -> SegmentationResult:
        id_map = prediction.id_map
        max_id = max((s["id"] for s in prediction.segments), default=0)
        areas = np.bincount(id_map.ravel(), minlength=max_id + 1)
        boxes = ndimage.find_objects(id_map, max_label=max_id) if max_id else []
        segments = []
        for s in prediction.segments:
            box = boxes[s["id"] - 1]
            if box is None:
                continue
            rows, cols = box
            segments.append(Segment(
                id=int(s["id"]), label=self.names[s["label_id"]], label_id=int(s["label_id"]),
                score=float(s["score"]), area=int(areas[s["id"]]),
                bbox=[cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
            ))
        return SegmentationResult(id_map, segments, (int(size[0]), int(size[1])))


# --------------------------------------------------------------------------------------------------- paths
_GLOB_CHARS = set("*?[")


def expand_inputs(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[Path]:
    """Files as given, folders' images (sorted, not recursive), glob patterns' images (sorted; `**` recurses).

    Duplicates are dropped (first kept); files under `exclude` (the output folder) are skipped for folders and
    patterns. Raises `UserInputError` naming every input that matched no image.
    """
    found: list[Path] = []
    empty: list[str] = []
    excluded = exclude.resolve() if exclude is not None else None

    def keep(path: Path) -> bool:
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return False
        return excluded is None or excluded not in path.resolve().parents

    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if keep(p))
        elif _GLOB_CHARS & set(str(raw)):
            matches = sorted(p for p in map(Path, glob.glob(str(raw), recursive=True)) if keep(p))
        else:
            matches = []
        if not matches:
            empty.append(str(raw))
        found += matches
    if empty:
        raise UserInputError(
            "no image matches " + ", ".join(repr(e) for e in empty)
            + f" (expected image files, folders of images or glob patterns; image suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """Each image's output name: its stem, with `-2`, `-3`... when two inputs share one."""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def _read(path: Path) -> np.ndarray:
    try:
        return _as_rgb_array(read_image(path))
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


# Keys of `quantify.measure_segments`' entries that repeat what the segment already says.
_SEGMENT_KEYS = {"id", "label_id", "class_name", "score", "bbox"}


def _measure(result: SegmentationResult, class_names: list[str], mm_per_pixel: float | None) -> dict[int, dict]:
    """Measurements by segment id from `quantify.measure_segments` (crack length and widths, areas in the
    report's unit), without the keys that repeat the segment's own fields."""
    from .quantify import measure_segments

    segments = [{"id": s.id, "label_id": s.label_id, "score": s.score} for s in result.segments]
    measured = measure_segments(result.id_map, segments, class_names, crack_classes=("crack",),
                                mm_per_pixel=mm_per_pixel)
    return {int(m["id"]): {k: v for k, v in m.items() if k not in _SEGMENT_KEYS} for m in measured}


def predict_paths(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    threshold: float = DEFAULT_THRESHOLD,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    mm_per_pixel: float | None = None,
    batch_size: int = 4,
    image_size: int | None = None,
    device: str | None = None,
    coco_json: str | Path | None = None,
) -> dict:
    """Predict every image of `inputs` (files, folders, glob patterns) and write, per image, into `out_dir`:
    `<stem>_panoptic.png` (COCO-panoptic id encoding, the image's size), `<stem>.json` (segments with class,
    score, area in pixels, bbox and `quantify.measure_segments`' measurements) and `<stem>_overlay.png`; and one
    `report.csv` with a row per defect (every segment but the background class; columns in `_report_row`).
    Lengths, widths and `area` are in mm (mm^2) when `mm_per_pixel` is given, else pixels; boxes are pixels.
    Two inputs with the same stem get `<stem>-2`... Unreadable images are printed to stderr, listed in `failed` and
    skipped. `coco_json`: also write every segment of the run (stuff included, with its score) to this one COCO
    instances file (`coco_export`), for review in CVAT and re-import with `build-dataset --annotations`.
    Returns {"images": predicted, "segments": defect segments (report rows), "failed": [(path, message)],
    "out": out_dir, "coco_json": the file or None}.
    """
    from .coco_export import CocoInstancesWriter
    from .overlay import draw_overlay, write_report_csv

    if mm_per_pixel is not None and not mm_per_pixel > 0:
        raise UserInputError(f"mm_per_pixel must be positive, got {mm_per_pixel!r}")
    out = Path(out_dir)
    paths = expand_inputs(inputs, exclude=out)
    segmenter = DefectSegmenter.from_pretrained(
        model_dir, device=device, threshold=threshold, image_size=image_size, tile_size=tile_size,
        tile_overlap=tile_overlap, batch_size=batch_size,
    )
    out.mkdir(parents=True, exist_ok=True)
    label_map = segmenter.label_map
    names = label_map.names
    background = {c.name for c in label_map.classes if c.background}
    colors = {c.name: tuple(c.color) for c in label_map.classes}
    unit = "mm" if mm_per_pixel is not None else "px"
    settings = {"model": str(model_dir), "threshold": segmenter.threshold, "image_size": segmenter.image_size,
                "tile_size": tile_size, "tile_overlap": tile_overlap if tile_size is not None else None,
                "mm_per_pixel": mm_per_pixel, "unit": unit}

    rows: list[dict] = []
    failed: list[tuple[str, str]] = []
    done = 0
    coco = CocoInstancesWriter(label_map, description=f"hf-detr-seg predictions of {model_dir}") if coco_json else None
    stems = dict(zip(paths, _output_stems(paths)))
    for start in range(0, len(paths), segmenter.batch_size):
        loaded: list[tuple[Path, np.ndarray]] = []
        for path in paths[start : start + segmenter.batch_size]:
            try:
                loaded.append((path, _read(path)))
            except DataError as err:
                failed.append((str(path), str(err)))
                print(f"skipped {path}: {err}", file=sys.stderr)
        for (path, image), result in zip(loaded, segmenter.predict_many([image for _, image in loaded])):
            measurements = _measure(result, names, mm_per_pixel)
            stem = stems[path]
            segments_json = []
            for segment in result.segments:
                entry = {"id": segment.id, "class": segment.label,
                         "category_id": label_map.category_id(segment.label_id),
                         "isthing": label_map.classes[segment.label_id].isthing, "score": segment.score,
                         "area": segment.area, "bbox": segment.bbox,
                         "measurements": measurements.get(segment.id, {})}
                segments_json.append(entry)
                if segment.label in background:
                    continue
                rows.append(_report_row(path, segment, measurements.get(segment.id, {}), unit))
            document = {"image": str(path), "height": result.image_size[0], "width": result.image_size[1],
                        **settings, "segments": segments_json}
            overlay = draw_overlay(image, result, colors, skip_labels=background)
            _write_outputs(out, stem, result.id_map, document, overlay)
            if coco is not None:
                coco.add(path.name, result.id_map, [{"id": s["id"], "category_id": s["category_id"],
                                                     "score": s["score"]} for s in segments_json])
            done += 1
    write_report_csv(rows, out / REPORT_FILE)
    if coco is not None:
        coco.write(coco_json)
    return {"images": done, "segments": len(rows), "failed": failed, "out": str(out),
            "coco_json": str(coco_json) if coco is not None else None}


def _report_row(path: Path, segment: Segment, measurements: dict, unit: str) -> dict:
    """One report.csv row: `area_px` and the box in pixels; `area` (unit^2) and, for cracks, `length`,
    `max_width`, `mean_width` in `unit` (empty cells for other classes), rounded to 4 decimals."""
    x, y, w, h = segment.bbox
    measured = {key: measurements.get(key, "") for key in ("area", "length", "max_width", "mean_width")}
    measured = {key: round(value, 4) if isinstance(value, float) else value for key, value in measured.items()}
    return {"image": str(path), "segment_id": segment.id, "class": segment.label, "score": segment.score,
            "area_px": segment.area, "area": measured["area"], "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h,
            "length": measured["length"], "max_width": measured["max_width"], "mean_width": measured["mean_width"],
            "unit": unit}


def _write_outputs(out: Path, stem: str, id_map: np.ndarray, document: dict, overlay: np.ndarray) -> None:
    """The three files of one image, each written under a temporary name, renamed only once all are written."""
    targets = {
        "png": out / f"{stem}_panoptic.png",
        "json": out / f"{stem}.json",
        "overlay": out / f"{stem}_overlay.png",
    }
    temporary = {key: path.with_name(f".{path.name}.tmp") for key, path in targets.items()}
    try:
        write_panoptic_png(temporary["png"], id_map)
        temporary["json"].write_text(json.dumps(document, indent=1, default=_json_default) + "\n")
        Image.fromarray(overlay).save(temporary["overlay"], format="PNG")
        for key, path in targets.items():
            os.replace(temporary[key], path)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


__all__ = ["DefectSegmenter", "Segment", "SegmentationResult", "TilePrediction", "expand_inputs", "merge_tiles",
           "predict_paths", "tile_windows"]

"""`DefectSegmenter`: whole images in, `SegmentationResult`s out, tiles of several images batched together.

Preprocessing is training's evaluation path, unchanged: DETR's resize (`transforms.resize_shortest_edge`, the
code `fixed_resize` runs: shortest edge `image_size`, the model's saved processor's, longest at most
`longest_edge(image_size)`), ImageNet normalisation (`to_pixel_values`), zero padding to the batch
(`collate_fn`); the forward pass and post-processing are
`forward.predict_batch` (the mask head for the kept queries only, padding cropped off the mask logits, then
`post_process_panoptic` at the array's own size, stuff classes fused into one segment per class).

Scheduling. Images come in groups of `batch_size`. A group's work is a list of jobs, in order: each tile of
a tiled image (`tiling`), or a whole image; the jobs run through the model `batch_size` at a time, so the last
tiles of one photo share a forward pass with the first tiles of the next. Each tile's prediction goes straight
into its photo's `TileStitcher`, and a photo's result is yielded as soon as its last tile is in. Batches never
cross a group's border, so how a group's images are batched does not depend on the other groups: a group
gives the same forward passes, hence the same results, whichever process of a multi-process run predicts it.
Only the photos whose tiles are in the batch being filled are held in memory, with one int32 map per photo
being stitched.

Without tiling, the result is `post_process_panoptic`'s, ids and scores included (ids in query order).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..data.training_data import collate_fn, to_pixel_values
from ..data.transforms import DETR_SHORTEST, resize_shortest_edge
from ..errors import DataError, UserInputError
from ..labels import LabelMap
from ..postprocess import model_threshold
from .forward import predict_batch
from .inputs import ImageInput, as_rgb_array
from .results import SegmentationResult, TilePrediction, build_result
from .stitching import TileStitcher
from .tiling import Window, check_tiling, tile_windows

PROCESSOR_FILE = "preprocessor_config.json"

Loader = Callable[[], np.ndarray]  # reads (or returns) one image as H x W x 3 uint8 RGB
Outcome = SegmentationResult | DataError  # an image's result, or why it could not be read


@dataclass
class _Pending:
    """An image on its way through the model: its stitcher while tiles come in, then its result."""

    size: tuple[int, int] = (0, 0)
    stitcher: TileStitcher | None = None
    outcome: Outcome | None = None


def _model_image_size(folder: Path) -> int:
    """The shortest edge of the folder's saved image processor (training writes its own size there, so this is
    the model's one source of its input size), else DETR's 800 (its processor's default)."""
    try:
        size = json.loads((folder / PROCESSOR_FILE).read_text()).get("size", {})
        if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int):
            return int(size["shortest_edge"])
    except (OSError, ValueError, AttributeError):
        pass
    return DETR_SHORTEST


def load_segmentation_model(model_dir: str | Path):
    """A `DetrForSegmentation` from a folder written by training (`hub.save_model_folder`) or `save_pretrained`.

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
        return DetrForSegmentation.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserInputError(f"{folder}: cannot load the model ({err})") from None


class DefectSegmenter:
    """Panoptic defect segmentation of whole images with a trained `DetrForSegmentation` (module docstring).

    `threshold`: query score threshold (strict, as `post_process_panoptic`; None: the model's own,
    `postprocess.model_threshold`). `image_size`: the shortest edge the
    model is fed. `tile_size`: tile images whose width or height exceeds it (None: never tile). `tile_overlap`:
    fraction of `tile_size` that neighbouring tiles share, in [0, 1). `batch_size`: tiles (or whole images) per
    forward pass, and images per group. `kept_only=False` runs the mask head for every query (the reference).
    """

    def __init__(
        self,
        model,
        label_map: LabelMap | None = None,
        image_size: int = DETR_SHORTEST,
        threshold: float | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        kept_only: bool = True,
    ) -> None:
        from ..modeling import label_map_from_config

        if tile_size is not None:
            check_tiling(tile_size, tile_overlap)
        if not isinstance(image_size, int) or image_size < 8:
            raise UserInputError(f"image_size must be an integer of at least 8, got {image_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        threshold = model_threshold(model.config) if threshold is None else threshold
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
        self.kept_only = kept_only
        self.names = self.label_map.names
        self.isthing = [c.isthing for c in self.label_map.classes]
        self.stuff_label_ids = {i for i, thing in enumerate(self.isthing) if not thing}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        threshold: float | None = None,
        image_size: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        batch_size: int = 4,
    ) -> "DefectSegmenter":
        """Load a model folder (`load_segmentation_model`). `image_size` defaults to the shortest edge of the
        folder's image processor (else 800)."""
        model = load_segmentation_model(model_dir)
        return cls(
            model,
            image_size=image_size if image_size is not None else _model_image_size(Path(model_dir)),
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
        """Results in input order, each as soon as it is done (module docstring: groups of `batch_size` images)."""
        group: list[ImageInput] = []
        for image in images:
            group.append(image)
            if len(group) == self.batch_size:
                yield from self._group_results(group)
                group = []
        if group:
            yield from self._group_results(group)

    def tiles_of(self, height: int, width: int) -> list[Window] | None:
        """The tile windows an image of this size is cut into, or None when it is predicted whole."""
        if self.tile_size is None or max(height, width) <= self.tile_size:
            return None
        return tile_windows(height, width, self.tile_size, self.tile_overlap)

    def predict_group(
        self, loaders: Sequence[Loader], on_batch: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, Outcome]]:
        """(position, result) of each image of one group, in order, each as soon as its last job has run.

        A loader that raises `DataError` (an unreadable file) gives that error as its outcome; the other images
        go on. `on_batch(n)` is called after each forward pass of n tiles or images (progress).
        """
        pending: dict[int, _Pending] = {}
        batch: list[tuple[int, np.ndarray]] = []
        next_out = 0
        for position, loader in enumerate(loaders):
            pending[position] = entry = _Pending()
            try:
                image = loader()
            except DataError as err:
                entry.outcome = err
                continue
            entry.size = image.shape[:2]
            windows = self.tiles_of(*entry.size)
            if windows is not None:
                entry.stitcher = TileStitcher(entry.size[0], entry.size[1], windows, self.isthing)
            for top, left, bottom, right in windows or [(0, 0, *entry.size)]:
                batch.append((position, image[top:bottom, left:right]))
                if len(batch) == self.batch_size:
                    self._run(batch, pending, on_batch)
                    batch = []
                    next_out = yield from self._finished(pending, next_out)
            del image
        if batch:
            self._run(batch, pending, on_batch)
        yield from self._finished(pending, next_out)

    # ----------------------------------------------------------------------------------------- internals
    def _group_results(self, group: list[ImageInput]) -> Iterator[SegmentationResult]:
        for _, outcome in self.predict_group([partial(as_rgb_array, image) for image in group]):
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome

    @staticmethod
    def _finished(pending: dict[int, _Pending], next_out: int):
        """Yield the finished outcomes at the front of the queue; return the next position to wait for."""
        while next_out in pending and pending[next_out].outcome is not None:
            yield next_out, pending.pop(next_out).outcome
            next_out += 1
        return next_out

    def _run(self, batch: list[tuple[int, np.ndarray]], pending: dict[int, _Pending],
             on_batch: Callable[[int], None] | None) -> None:
        """One forward pass; each prediction goes to its image's stitcher (or is its whole-image result)."""
        for (position, _), prediction in zip(batch, self._predict_arrays([array for _, array in batch])):
            entry = pending[position]
            if entry.stitcher is None:
                entry.outcome = build_result(prediction, self.names, entry.size)
                continue
            entry.stitcher.add(prediction)
            if entry.stitcher.done:
                merged, stats = entry.stitcher.finish()
                entry.outcome = build_result(merged, self.names, entry.size, stats)
                entry.stitcher = None
        if on_batch is not None:
            on_batch(len(batch))

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
            kept_only=self.kept_only,
        )
        return [
            TilePrediction(
                p.id_map.cpu().numpy().astype(np.int32, copy=False),
                [{"id": s["id"], "label_id": s["label_id"], "score": s["score"]} for s in p.segments],
            )
            for p in predictions
        ]

"""Stage 2's cache of the frozen detector's outputs, one entry per training image (opt-in).

Why: stage 2 trains only the mask head, for about 25 epochs, while the detector (backbone, encoder, decoder,
class and box heads) is frozen. Without augmentation every epoch feeds the same images, so the detector would
compute the same outputs 25 times. The cache runs it once per image and keeps what the mask head and its loss
read: the Hungarian matching of the image's targets, the decoder output of the matched queries only, the
encoder output, the projected last backbone level and the three finer backbone levels, each cropped to the
image's own extent (with the model's margin around it, margin.py). Later epochs run the mask head alone.

Exactness: when the images of a batch share one size (no padding, as with crops such as DeepCrack's or the
demo's), the mask head reads the tensors the detector computes, so losses and gradients equal the uncached
path's (up to float rounding: the attention runs on the matched queries only). When sizes differ, each image
keeps the features of the batch it was first seen in, cropped to its extent and zero-padded to the size of
each later batch: convolutions next to the padding then read zeros where the uncached path reads features of
padded pixels (a border effect; which padding an image gets depends on its batch-mates either way).

Valid only for a frozen detector and fixed images: the training config refuses the cache with augmentation.
The memory it takes is bounded by `max_bytes`; past that, further images are not cached (a warning says so)
and the detector runs on them, and on them only, every epoch.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DetrForSegmentation

from .detr_forward import DetectorOutputs, MaskHeadInputs, run_detector
from .losses import DetrCriterion, Indices

logger = logging.getLogger(__name__)


# What an entry keeps: the decoder output of the matched queries [n, d], the encoder output [d, h, w] and its
# mask [h, w] (False on a margin around the image, margin.py), the projected last backbone level [d, h, w] and
# the backbone levels the mask head fuses [c, h_l, w_l], coarse to fine.
PARTS = ("queries", "memory", "memory_mask", "projected_features", "fpn_0", "fpn_1", "fpn_2")


class _Entry(NamedTuple):
    """One image's frozen detector outputs, cropped to the image's extent at each level, in one flat buffer.

    One allocation and one tensor per image, not eight: with thousands of entries of separate tensors, Python's
    garbage collector (which traverses every tensor) slowed the filling of a 6 GiB cache by half.
    """

    buffer: Tensor  # PARTS, each flattened, one after the other
    shapes: tuple[tuple[int, ...], ...]  # the shape of each part
    targets: tuple[int, ...]  # the target matched to each query of `queries`, in matching order

    @classmethod
    def pack(cls, parts: Sequence[Tensor], targets: Sequence[int]) -> "_Entry":
        dtype = functools.reduce(torch.promote_types, (part.dtype for part in parts))
        buffer = torch.empty(sum(part.numel() for part in parts), dtype=dtype, device=parts[0].device)
        offset = 0
        for part in parts:
            buffer[offset : offset + part.numel()].view(part.shape).copy_(part)
            offset += part.numel()
        return cls(buffer, tuple(tuple(part.shape) for part in parts), tuple(int(t) for t in targets))

    def parts(self) -> dict[str, Tensor]:
        """The parts by name, as views of the buffer."""
        views, offset = {}, 0
        for name, shape in zip(PARTS, self.shapes):
            size = math.prod(shape)
            views[name] = self.buffer[offset : offset + size].view(shape)
            offset += size
        return views

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def _image_keys(labels: Sequence[dict[str, Tensor]]) -> list[int]:
    try:
        return [int(target["image_id"]) for target in labels]
    except KeyError:
        raise ValueError(
            "the detector cache keys images by their target's `image_id` (PanopticDetrDataset provides it); "
            "a target has none"
        ) from None


def _extent(pixel_mask: Tensor, size: Sequence[int]) -> tuple[int, int]:
    """Rows and columns of one image at a feature level of `size`, with the mask downsampled as transformers'
    DETR backbone does it (nearest): its real cells, a margin as wide as the one before them (margin.py), and
    no batch padding beyond, which is bottom/right, so the image is a top-left box."""
    mask = F.interpolate(pixel_mask[None, None].float(), size=tuple(size)).bool()[0, 0]
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    return int(rows[0] + rows[-1] + 1), int(cols[0] + cols[-1] + 1)


def _crop(feature: Tensor, extent: tuple[int, int]) -> Tensor:
    """The top-left `extent` of a [C, H, W] map (a view)."""
    return feature[..., : extent[0], : extent[1]]


def _pad_stack(maps: Sequence[Tensor]) -> Tensor:
    """[C, h_i, w_i] maps -> one [B, C, H, W] batch, zero-padded bottom/right to the largest."""
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    batch = maps[0].new_zeros(len(maps), *maps[0].shape[:-2], height, width)
    for i, m in enumerate(maps):
        batch[i, ..., : m.shape[-2], : m.shape[-1]] = m
    return batch


class DetectorCache:
    """Frozen detector outputs and matchings per training image, keyed by the target's `image_id`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries: dict[int, _Entry] = {}
        self._full = False

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(
        self,
        model: DetrForSegmentation,
        criterion: DetrCriterion,
        pixel_values: Tensor,
        pixel_mask: Tensor,
        labels: Sequence[dict[str, Tensor]],
    ) -> tuple[MaskHeadInputs, Indices]:
        """The batch's mask-head inputs and matching: cached images from the cache, the others from the frozen
        detector (run without a graph on those images only, at the batch's size) and then cached while
        `max_bytes` allows.

        The decoder output holds only the matched queries, so the returned matching numbers them 0..n-1 in each
        image (same targets, same order as the matcher's): `matched_query_index` of it selects them.
        """
        keys = _image_keys(labels)
        missing = [b for b, key in enumerate(keys) if key not in self._entries]
        fresh: dict[int, _Entry] = {}
        if missing:
            rows = torch.tensor(missing, device=pixel_values.device)
            with torch.no_grad():
                detector = run_detector(model, pixel_values[rows], pixel_mask[rows])
                indices = criterion.match(detector.logits, detector.pred_boxes, [labels[b] for b in missing])
            for j, b in enumerate(missing):
                fresh[b] = self._entry(detector, indices[j], pixel_mask[b], j)
                self._store(keys[b], fresh[b])
        entries = [fresh[b] if b in fresh else self._entries[key] for b, key in enumerate(keys)]
        return self._assemble(entries)

    def _store(self, key: int, entry: _Entry) -> None:
        if self._full:
            return
        if self.nbytes + entry.nbytes > self.max_bytes:
            self._full = True
            logger.warning(
                "detector cache full at %d images (%.2f GiB, --detector_cache_gib): the frozen detector runs "
                "on the other images every epoch",
                len(self._entries), self.nbytes / 2**30,
            )
            return
        self._entries[key] = entry
        self.nbytes += entry.nbytes

    @staticmethod
    def _assemble(entries: Sequence[_Entry]) -> tuple[MaskHeadInputs, Indices]:
        parts = [entry.parts() for entry in entries]
        queries = [p["queries"] for p in parts]
        most = max(max(len(q) for q in queries), 1)
        decoder_output = queries[0].new_zeros(len(entries), most, queries[0].shape[-1])
        for i, rows in enumerate(queries):
            decoder_output[i, : len(rows)] = rows
        inputs = MaskHeadInputs(
            decoder_output=decoder_output,
            memory=_pad_stack([p["memory"] for p in parts]),
            memory_mask=_pad_stack([p["memory_mask"] for p in parts]).bool(),
            projected_features=_pad_stack([p["projected_features"] for p in parts]),
            fpn_features=[_pad_stack([p[f"fpn_{level}"] for p in parts]) for level in range(3)],
        )
        indices = [(torch.arange(len(e.targets)), torch.tensor(e.targets, dtype=torch.int64)) for e in entries]
        return inputs, indices

    @staticmethod
    def _entry(detector: DetectorOutputs, matching: tuple[Tensor, Tensor], pixel_mask: Tensor, b: int) -> _Entry:
        last_level = _extent(pixel_mask, detector.memory.shape[-2:])
        queries, targets = matching
        parts = [
            detector.decoder_output[b, queries.to(detector.decoder_output.device)],
            _crop(detector.memory[b], last_level),
            _crop(detector.memory_mask[b], last_level),
            _crop(detector.projected_features[b], last_level),
            *[_crop(f[b], _extent(pixel_mask, f.shape[-2:])) for f in detector.fpn_features],
        ]
        return _Entry.pack(parts, targets.tolist())

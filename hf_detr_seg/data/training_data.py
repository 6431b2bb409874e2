"""A built dataset folder -> DETR training samples (pixel values + targets), and the batch collate.

`DetrImageProcessor(format="coco_panoptic")` reads each panoptic PNG from disk by path, so it cannot take
augmented masks: this module builds DETR's targets itself from the image, the PNG and `segments_info`.

Target convention (what `losses.py` and the matcher read, and what inference must invert):
- `masks`: one bool mask per non-crowd segment at the transformed image's size, unpadded (the criterion
  pads them to the batch). Void pixels (id 0) and crowd segments' pixels are in no mask.
- `class_labels`: model class indices (`LabelMap.index_of_category`), not dataset category ids.
- `boxes`: tight boxes of the masks, (cx, cy, w, h) divided by the *unpadded* transformed image's width and
  height, in pixel-edge coordinates (see `transforms.masks_to_boxes`). This is DETR's own convention
  (facebookresearch/detr normalises before padding and never renormalises; fmassa in detr#286: predictions
  are relative to the visible image, whose extent the sine position embedding, normalised over the
  pixel_mask's valid region, encodes). transformers >= 4.37 (PR #28363, still so in 5.24) renormalises
  boxes to the *padded* batch canvas in `DetrImageProcessor.pad` when `do_convert_annotations` is on, so a
  target there depends on which other images share the batch. We do not follow that: with our convention
  `post_process_object_detection(target_sizes=original sizes)` is right for every image of a padded batch,
  whereas padded-normalised training is only consistent with it for unpadded (single-size) batches.
  Inference with padded batches must also crop `pred_masks` to each image's valid region before resizing
  them to the original size (the processor's panoptic post-processing does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..labels import LabelMap, LabelMapError
from .defect_free import defect_free
from .masks import read_image
from .panoptic import (
    annotation_folder,
    annotation_json,
    image_folder,
    load_dataset_label_map,
    read_json,
    read_panoptic_png,
)
from .transforms import (
    AugmentConfig,
    augment,
    draw_geometry,
    fixed_resize,
    longest_edge,
    masks_to_boxes,
    normalized_cxcywh,
    output_size,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Record:
    """What one sample needs from the JSON, resolved once at construction."""

    image_id: int
    image_path: Path
    png_path: Path
    height: int
    width: int
    segment_ids: tuple[int, ...]  # non-crowd segments only, in segments_info order
    class_indices: tuple[int, ...]  # model class index of each of them


# The last seed word of the generator that decides whether a sample is painted defect-free (any constant would do;
# changing it changes which samples are).
DEFECT_FREE_STREAM = 7


class PanopticDetrDataset(Dataset):
    """One split of a built folder as DETR training samples; see the module docstring for the targets.

    Augmentation randomness for sample `index` in epoch `epoch` comes from
    `np.random.default_rng([seed, epoch, index])`: it depends neither on the number of DataLoader workers
    nor on the order samples are drawn in, so a resumed run sees the same augmented data. Whether the sample's
    defects are painted out comes from a stream of its own, `[seed, epoch, index, DEFECT_FREE_STREAM]`, so
    the geometry drawn first from the main stream (`output_size`) stays the same with or without that option.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        augment: bool = False,
        seed: int = 0,
        label_map: LabelMap | None = None,
        augment_config: AugmentConfig | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = int(image_size)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.augment_config = augment_config or AugmentConfig()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found (build one with `hf-detr-seg build-dataset`)")
        self.label_map = label_map if label_map is not None else load_dataset_label_map(self.root)
        self.records = _read_records(self.root, split, self.label_map)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch` (call before each epoch, in every process).

        DataLoader workers hold a copy of the dataset made when they start: call this before iterating a
        new epoch, and do not use `persistent_workers=True` with augmentation (its workers keep the old epoch).
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def paints_out_defects(self, index: int) -> bool:
        """Whether sample `index` trains defect-free in the current epoch (`AugmentConfig.defect_free_prob`)."""
        probability = self.augment_config.defect_free_prob
        if probability == 0:
            return False
        return np.random.default_rng([self.seed, self.epoch, index, DEFECT_FREE_STREAM]).random() < probability

    def output_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index` in the current epoch, from its record and random draws alone:
        the image is not read (size-grouped batches ask this for every sample of an epoch)."""
        record = self.records[index]
        if self.augment:
            geometry = draw_geometry(self.rng(index), record.height, record.width, self.image_size,
                                     self.augment_config)
            return geometry.size(record.height, record.width, self.image_size)
        return output_size(record.height, record.width, self.image_size, longest_edge(self.image_size))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Original image (H x W x 3 uint8), non-crowd masks (N x H x W bool) and their class indices."""
        record = self.records[index]
        image = np.array(read_image(record.image_path))  # writable: torch.from_numpy needs it
        id_map = read_panoptic_png(record.png_path)
        if image.shape[:2] != id_map.shape or id_map.shape != (record.height, record.width):
            raise DataError(
                f"{record.png_path}: size {id_map.shape[1]}x{id_map.shape[0]}, image {record.image_path} "
                f"{image.shape[1]}x{image.shape[0]}, JSON {record.width}x{record.height}; expected all equal"
            )
        ids = np.asarray(record.segment_ids, np.uint32)
        masks = id_map[None] == ids[:, None, None]
        return image, masks, np.asarray(record.class_indices, np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, masks, classes = self.load(index)
        if self.augment and self.paints_out_defects(index):
            image, masks, classes = defect_free(image, masks, classes, self.label_map.background_index)
        if self.augment:
            image, masks, keep = augment(image, masks, self.image_size, self.rng(index), self.augment_config)
        else:
            image, masks, keep = fixed_resize(image, masks, self.image_size)
        height, width = image.shape[:2]
        boxes = normalized_cxcywh(masks_to_boxes(masks), height, width)
        labels = {
            "class_labels": torch.from_numpy(classes[keep]),
            "boxes": torch.from_numpy(boxes).reshape(-1, 4),
            "masks": torch.from_numpy(masks),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([record.height, record.width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
            "iscrowd": torch.zeros(len(keep), dtype=torch.int64),
            "area": torch.from_numpy(masks.reshape(masks.shape[0], -1).sum(1).astype(np.float32)),
        }
        return {"pixel_values": to_pixel_values(image), "labels": labels}


def to_pixel_values(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float32, scaled to [0, 1] and ImageNet-normalised (as the processor)."""
    pixels = torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad pixel values bottom/right with zeros to the batch's largest size; pixel_mask 1 = real pixel.

    Labels stay a list of per-image dicts and their masks are not padded: the criterion pads them, and
    boxes stay normalised by each image's own size (module docstring).
    """
    if not batch:
        raise ValueError("collate_fn got an empty batch")
    height = max(item["pixel_values"].shape[1] for item in batch)
    width = max(item["pixel_values"].shape[2] for item in batch)
    pixel_values = torch.zeros(len(batch), 3, height, width, dtype=batch[0]["pixel_values"].dtype)
    pixel_mask = torch.zeros(len(batch), height, width, dtype=torch.int64)
    for i, item in enumerate(batch):
        _, h, w = item["pixel_values"].shape
        pixel_values[i, :, :h, :w] = item["pixel_values"]
        pixel_mask[i, :h, :w] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": [item["labels"] for item in batch]}


def _read_records(root: Path, split: str, label_map: LabelMap) -> list[_Record]:
    """Resolve every sample of a split from its JSON; missing folders and unknown categories fail here."""
    json_path = annotation_json(root, split)
    if not json_path.is_file():
        raise DataError(f"{root}: split {split!r} not found ({json_path} missing)")
    for folder in (image_folder(root, split), annotation_folder(root, split)):
        if not folder.is_dir():
            raise DataError(f"{root}: split {split!r} has no folder {folder}")
    data = read_json(json_path)
    try:
        images = {img["id"]: img for img in data["images"]}
        records = [_record(root, split, ann, images[ann["image_id"]], label_map) for ann in data["annotations"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{json_path}: missing or malformed field {err}; expected a COCO-panoptic file") from None
    except LabelMapError as err:
        raise DataError(f"{json_path}: {err} (not in the label map)") from None
    if not records:
        raise DataError(f"{json_path}: split {split!r} has no annotated images")
    return records


def _record(root: Path, split: str, ann: dict, image: dict, label_map: LabelMap) -> _Record:
    segments = [s for s in ann["segments_info"] if not s.get("iscrowd", 0)]
    return _Record(
        image_id=int(ann["image_id"]),
        image_path=image_folder(root, split) / image["file_name"],
        png_path=annotation_folder(root, split) / ann["file_name"],
        height=int(image["height"]),
        width=int(image["width"]),
        segment_ids=tuple(int(s["id"]) for s in segments),
        class_indices=tuple(label_map.index_of_category(int(s["category_id"])) for s in segments),
    )

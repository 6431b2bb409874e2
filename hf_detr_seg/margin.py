"""The model's margin: padding around every image it sees, in training and prediction, so no image edge is a
feature-map edge.

A convolution pads its input with zeros, so the cells along a feature map's edge see something no cell inside
the image sees, at every level of the backbone and of the mask head's FPN. On the small inputs of CPU recipes
that edge is much of the map (a 128 x 181 crop is 8 x 12 cells at stride 16), and a model trained on them
draws false defects along image borders and wider masks near them. DETR's own batch padding already moves
the bottom and right edges of the smaller images of a batch inside the map; a margin of padding on all four
sides, marked as padding in `pixel_mask` exactly as DETR marks its own, does so for every edge of every image.

The image's positions do not move: DETR's sine position encoding counts them from the first unpadded row and
column (a cumulative sum of `pixel_mask`), and attention never reads padded cells. So the boxes, which DETR
gives relative to the unpadded image, need no correction; only the mask logits are cropped (`crop_margin`).

The margin is the model's own (`context_margin` in its config, written by training): predictions of one
model always see the same geometry, whatever the caller.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from .errors import UserInputError

# A margin keeps the image aligned with the cells of the coarsest level the tiny and r50 presets read.
MARGIN_MULTIPLE = 16


def context_margin(config: Any) -> int:
    """The model's margin in input pixels (`context_margin` in its config), 0 for a model saved without one."""
    return int(getattr(config, "context_margin", 0))


def check_margin(margin: int, name: str = "context_margin") -> None:
    """Refuse a margin that is negative or would shift the image off the coarsest cells' grid."""
    if not isinstance(margin, int) or margin < 0 or margin % MARGIN_MULTIPLE:
        raise UserInputError(f"{name}: expected a non-negative multiple of {MARGIN_MULTIPLE} pixels, got {margin!r}")


def add_margin(
    pixel_values: torch.Tensor, pixel_mask: torch.Tensor, margin: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with `margin` padded pixels on every side: zeros (the normalised mean colour, as DETR pads) and
    `pixel_mask` 0 there."""
    if margin == 0:
        return pixel_values, pixel_mask
    return F.pad(pixel_values, (margin,) * 4), F.pad(pixel_mask, (margin,) * 4)


def add_margin_to_batch(
    margin: int, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """A training batch with `margin` on every side (`add_margin`), its target masks padded alike so that they
    stay aligned with the image at the batch's top-left, as the criterion and the encoder heads place them.
    Boxes stay normalised by the image's own size, as DETR's are."""
    if margin == 0:
        return pixel_values, pixel_mask, labels
    padded = [{**target, "masks": F.pad(target["masks"], (margin,) * 4)} if "masks" in target else target
              for target in labels]
    return (*add_margin(pixel_values, pixel_mask, margin), padded)


def crop_margin(masks: torch.Tensor, margin: int, input_height: int, rows: int, cols: int) -> torch.Tensor:
    """The mask logits [..., h, w] of a batch padded with `margin` (input `input_height` rows, margin included),
    cropped to an image of `rows` x `cols` mask cells."""
    offset = round(margin * masks.shape[-2] / input_height)
    return masks[..., offset : offset + rows, offset : offset + cols]

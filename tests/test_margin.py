"""The model's margin: padding around every image, in training and prediction, that moves no position."""

from __future__ import annotations

import pytest
import torch

from hf_detr_seg.errors import UserInputError
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.margin import add_margin, add_margin_to_batch, check_margin, context_margin, crop_margin
from hf_detr_seg.memory_supervision import cell_positions
from hf_detr_seg.modeling import build_model

LABELS = {"mask_format": "binary", "classes": [{"name": "crack", "isthing": True},
                                               {"name": "surface", "isthing": False, "background": True}]}


def _batch(height: int = 32, width: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, the second smaller and padded bottom/right as collate_fn pads it."""
    pixel_values = torch.randn(2, 3, height, width)
    pixel_mask = torch.ones(2, height, width, dtype=torch.int64)
    pixel_values[1, :, height // 2 :], pixel_mask[1, height // 2 :] = 0, 0
    return pixel_values, pixel_mask


def test_the_margin_is_padding_on_every_side_and_crops_back():
    pixel_values, pixel_mask = _batch()
    padded_values, padded_mask = add_margin(pixel_values, pixel_mask, 16)
    assert padded_values.shape == (2, 3, 64, 80) and padded_mask.shape == (2, 64, 80)
    torch.testing.assert_close(padded_values[..., 16:48, 16:64], pixel_values, rtol=0, atol=0)
    assert padded_mask.sum() == pixel_mask.sum() and padded_values[..., :16, :].abs().sum() == 0
    # Mask logits at stride 4 of the padded batch: the crop is the image's own cells.
    logits = torch.arange(16 * 20, dtype=torch.float).view(1, 1, 16, 20)
    torch.testing.assert_close(crop_margin(logits, 16, 64, 8, 12), logits[..., 4:12, 4:16])
    assert add_margin(pixel_values, pixel_mask, 0)[0] is pixel_values


def test_target_masks_are_padded_with_the_image_and_boxes_kept():
    pixel_values, pixel_mask = _batch()
    masks = torch.zeros(1, 32, 48, dtype=torch.bool)
    masks[0, 3:9, 5:20] = True
    labels = [{"masks": masks, "boxes": torch.tensor([[0.3, 0.2, 0.3, 0.2]])}, {"boxes": torch.zeros(0, 4)}]
    padded_values, padded_mask, padded_labels = add_margin_to_batch(16, pixel_values, pixel_mask, labels)
    assert padded_labels[0]["masks"].shape == (1, 64, 80) and padded_labels[0]["masks"][0, 19:25, 21:36].all()
    assert padded_labels[0]["masks"].sum() == masks.sum()
    assert padded_labels[0]["boxes"] is labels[0]["boxes"] and padded_labels[1] is labels[1]


def test_a_margin_moves_no_position():
    """DETR's sine encoding and the encoder position targets count from the first real pixel: the image's cells
    get the same positions with a margin as without."""
    model = build_model(LabelMap.from_dict(LABELS), preset="tiny")
    _, pixel_mask = _batch(64, 96)
    cells = pixel_mask[:, ::16, ::16]  # the mask at stride 16, as the backbone downsamples it
    _, padded = add_margin(torch.zeros(2, 3, 64, 96), pixel_mask, 16)
    padded_cells = padded[:, ::16, ::16]
    embedding = model.detr.model.position_embedding
    plain = embedding((2, 1, *cells.shape[1:]), cells.device, torch.float32, mask=cells)
    shifted = embedding((2, 1, *padded_cells.shape[1:]), cells.device, torch.float32, mask=padded_cells)
    torch.testing.assert_close(shifted[..., 1:-1, 1:-1], plain)
    torch.testing.assert_close(cell_positions(padded_cells.bool())[..., 1:-1, 1:-1], cell_positions(cells.bool()))


def test_margins_are_checked_and_read_from_the_model_config():
    for bad in (-16, 8, 16.0):
        with pytest.raises(UserInputError, match="context_margin"):
            check_margin(bad)
    check_margin(32)
    config = build_model(LabelMap.from_dict(LABELS), preset="tiny").config
    assert context_margin(config) == 0
    config.context_margin = 32
    assert context_margin(config) == 32

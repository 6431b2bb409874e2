"""Defect-free training images: defects painted out, the background grown over them, the geometry unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hf_detr_seg.data.defect_free import defect_free, paint_out
from hf_detr_seg.data.training_data import PanopticDetrDataset
from hf_detr_seg.data.transforms import AugmentConfig


def cracked_surface() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey textured surface crossed by a dark 2-px crack reaching both side borders, 2 void pixels in a corner:
    the image, masks [crack, surface] and their classes (crack 0, surface 1)."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(150, 6, (64, 96, 3)), 0, 255).astype(np.uint8)
    crack = np.zeros((64, 96), bool)
    crack[30:32] = True
    image[crack] = 40
    surface = ~crack
    surface[0, :2] = False  # void
    return image, np.stack([crack, surface]), np.array([0, 1])


def test_the_defects_are_painted_out_and_the_surface_takes_their_pixels():
    image, masks, classes = cracked_surface()
    painted, painted_masks, painted_classes = defect_free(image, masks, classes, background=1)
    assert painted_classes.tolist() == [1] and painted_masks.shape == (1, 64, 96)
    assert painted_masks[0].sum() == 64 * 96 - 2 and not painted_masks[0, 0, :2].any()  # void stays void
    assert painted[masks[0]].mean() > 130  # the crack is surface-grey now ...
    assert np.array_equal(painted[:20], image[:20]) and np.array_equal(painted[44:], image[44:])  # ... nothing far


def test_images_without_a_defect_or_a_background_class_are_left_alone():
    image, masks, classes = cracked_surface()
    for args in ((masks[1:], classes[1:], 1), (masks, classes, None), (masks[:1], classes[:1], 1)):
        out_image, out_masks, out_classes = defect_free(image, *args)
        assert out_image is image and out_masks is args[0] and out_classes is args[1]


def test_paint_out_changes_the_mask_and_its_rim_only():
    image, masks, _ = cracked_surface()
    painted = paint_out(image, masks[0])
    changed = np.nonzero((painted != image).any(-1).any(1))[0]
    assert changed.min() >= 30 - 3 and changed.max() <= 31 + 3


def test_a_dataset_trains_defect_free_samples_at_the_same_geometry(dataset: Path):
    plain = PanopticDetrDataset(dataset, "train", 96, augment=True, seed=3)
    always = PanopticDetrDataset(dataset, "train", 96, augment=True, seed=3,
                                 augment_config=AugmentConfig(defect_free_prob=1.0))
    half = PanopticDetrDataset(dataset, "train", 96, augment=True, seed=3,
                               augment_config=AugmentConfig(defect_free_prob=0.5))
    background = plain.label_map.background_index
    drawn = [half.paints_out_defects(i) for i in range(len(half))]
    for i in range(len(plain)):
        ours, theirs = always[i], plain[i]
        assert ours["labels"]["class_labels"].tolist() == [background]
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (3, *always.output_size(i))
        assert ours["labels"]["boxes"].tolist() == [[0.5, 0.5, 1.0, 1.0]]  # the surface covers the image
        # A sample not drawn for painting is augmented exactly as without the option; a drawn one is background.
        if drawn[i]:
            assert half[i]["labels"]["class_labels"].tolist() == [background]
        else:
            assert torch.equal(half[i]["pixel_values"], theirs["pixel_values"])
    assert 0 < sum(drawn) < len(plain)


def test_out_of_range_probability_is_refused():
    with pytest.raises(ValueError, match="defect_free_prob"):
        AugmentConfig(defect_free_prob=1.5)

"""Defect-free training images made from images with defects, by painting the defects out.

Datasets collected for their defects often hold no image without one: every one of the 2,908 DeepCrack train
crops has a crack, and 2,906 of those cracks reach the crop's border. A model trained on such data learns that
an image always holds a defect and that a dark line reaching the border is one. Shown a surface without defects,
it marks pores and shadows cut by the border. Painting an image's defects out (OpenCV's Telea inpainting of
their masks and a rim around them) and training on it as background alone shows the model defect-free surfaces,
borders included (`AugmentConfig.defect_free_prob`).
"""

from __future__ import annotations

import cv2
import numpy as np

PAINT_DILATION = 3  # px around a defect painted out too: its rim (a crack's shadowed edge) is part of its look
INPAINT_RADIUS = 5  # px of surroundings each painted pixel is made from (OpenCV's inpaintRadius)


def paint_out(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` (H x W x 3 uint8) with the pixels of `mask` (H x W bool) and a rim of `PAINT_DILATION` px
    inpainted from their surroundings."""
    side = 2 * PAINT_DILATION + 1
    painted = cv2.dilate(mask.astype(np.uint8), np.ones((side, side), np.uint8))
    return cv2.inpaint(np.ascontiguousarray(image), painted, INPAINT_RADIUS, cv2.INPAINT_TELEA)


def defect_free(
    image: np.ndarray, masks: np.ndarray, classes: np.ndarray, background: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image with every segment not of class `background` painted out, and its targets: the background
    segment alone, grown over the defects' pixels (void pixels stay void). Returned unchanged when the image has
    no defect, or no single background segment to grow (a label map without a background class)."""
    is_defect = classes != background
    if not is_defect.any() or np.count_nonzero(~is_defect) != 1:
        return image, masks, classes
    defects = masks[is_defect].any(0)
    surface = masks[~is_defect] | defects
    return paint_out(image, defects), surface, classes[~is_defect]

"""Stage 1's auxiliary loss on the encoder output: which classes are present in each cell of its grid.

Why: DETR's object queries differ from one another only through what they read from the encoder output (the
decoder's input is zeros and the query embeddings enter attention weights only). Trained from random backbone
weights, stage 1 collapses within about 25 steps: the encoder output becomes nearly constant over positions
(std 0.03 against 0.27 at initialisation, measured on DeepCrack), every query then reads the same thing and
predicts the same box and class, and the matching can no longer tell them apart. A 1x1 convolution on the
encoder output, trained to say which classes occur in each cell (multi-label, a cell "has crack" when any crack
pixel lies in it), keeps the output spatially informative: with it the queries separate within 150 steps
(std across queries 0.72 against 0.004) and the crack and surface queries reach class scores of 0.95.

The head exists only during training: it is not part of `DetrForSegmentation`, so the saved model stays a
plain transformers model. Multi-label presence rather than a per-cell class keeps 1-2 px cracks, which cover a
tiny fraction of a 16 x 16 cell, as positives; the loss is balanced between cells with and without a class so
that defects covering a few cells weigh as much as the surface around them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def presence_targets(
    targets: Sequence[dict[str, Tensor]],
    num_classes: int,
    canvas: tuple[int, int],
    grid: tuple[int, int],
    device: torch.device | str = "cpu",
) -> Tensor:
    """[B, K, h, w] floats: 1 where a cell of the `grid` over the padded `canvas` holds a pixel of class k.

    Target masks are unpadded (top-left aligned, as the images in the padded batch); void and crowd pixels are
    in no mask, so their cells count as holding no class unless another pixel of the cell does.
    """
    height, width = canvas
    full = torch.zeros(len(targets), num_classes, height, width, device=device)
    for image, target in enumerate(targets):
        masks = target["masks"].to(device, torch.float)
        classes = target["class_labels"].to(device)
        mask_height, mask_width = masks.shape[-2:]
        for k in classes.unique().tolist():
            full[image, k, :mask_height, :mask_width] = masks[classes == k].amax(0)
    return F.adaptive_max_pool2d(full, grid)


class EncoderPresenceHead(nn.Module):
    """1x1 convolution from the encoder output to per-class presence logits, and its loss."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(d_model, num_classes, kernel_size=1)

    def forward(
        self, memory: Tensor, memory_mask: Tensor, targets: Sequence[dict[str, Tensor]], canvas: tuple[int, int]
    ) -> Tensor:
        """Class-balanced binary cross-entropy over the real (unpadded) cells of `memory` [B, d, h, w].

        Per class, the mean over cells holding it and the mean over cells not holding it count half each,
        then classes are averaged. Small defects occupy a few cells of the grid; in a plain mean over cells a
        constant "absent" answer scores well and the encoder output collapsed anyway on the demo data (std
        over positions 0.015 after 300 steps; balanced: 0.59 after 200).
        """
        logits = self.classifier(memory).float()
        wanted = presence_targets(targets, self.num_classes, canvas, tuple(memory.shape[-2:]), logits.device)
        valid = memory_mask[:, None].to(logits.dtype)
        per_cell = F.binary_cross_entropy_with_logits(logits, wanted, reduction="none")
        halves = []
        for selected in (wanted * valid, (1 - wanted) * valid):
            cells = selected.sum((0, 2, 3))
            halves.append((per_cell * selected).sum((0, 2, 3)) / cells.clamp(min=1.0))
        return (0.5 * (halves[0] + halves[1])).mean()


def cell_positions(memory_mask: Tensor) -> Tensor:
    """[B, 2, h, w]: each cell's centre (x, y) relative to its image's real extent (DETR's box coordinates)."""
    real = memory_mask.to(torch.float)
    # Counted from the first real cell, as DETR's sine encoding counts positions: padding before the image (a
    # margin, margin.py) shifts no position.
    xs = (real.cumsum(2) - 0.5) / real.sum(2, keepdim=True).clamp(min=1)
    ys = (real.cumsum(1) - 0.5) / real.sum(1, keepdim=True).clamp(min=1)
    return torch.stack([xs, ys], 1)


class EncoderPositionHead(nn.Module):
    """1x1 convolution from the encoder output to each cell's own (x, y), and its L1 loss over real cells.

    Why: DETR adds position embeddings to attention queries and keys only, never to values, so what a query
    reads from the encoder output says *what* is there but not *where*, unless the features themselves encode
    position. A pretrained, nearly translation-invariant backbone hardly does, and stage 1 then predicts the
    same average box for every object while its classes are right. Asking the encoder output to state its own
    coordinates makes the backbone and encoder carry position in the values the decoder reads (they can: zero
    padding makes CNN features position-aware), so boxes can be regressed from what a query attends to.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.regressor = nn.Conv2d(d_model, 2, kernel_size=1)

    def forward(self, memory: Tensor, memory_mask: Tensor) -> Tensor:
        predicted = self.regressor(memory).float().sigmoid()
        valid = memory_mask[:, None].to(predicted.dtype)
        error = (predicted - cell_positions(memory_mask)).abs() * valid
        return error.sum() / (2 * valid.sum()).clamp(min=1.0)

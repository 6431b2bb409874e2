"""DETR's training criterion, owned by the project.

Why not `DetrForSegmentation(labels=...)`'s own loss (transformers 5, `loss/loss_for_object_detection.py`:
`ForSegmentationLoss` -> `ImageLoss`)?
- `DetrConfig` types the loss coefficients `int`, so a weight like 0.5 cannot be configured; `loss_ce` is
  hard-wired to weight 1; focal alpha/gamma are fixed at 0.25/2.
- `ImageLoss` reduces `num_boxes` with accelerate's `reduce` (a *mean* over processes) and then divides by the
  world size again, so under N processes every term is N times too large. DETR sums over processes, then
  divides once (`_num_boxes` below).
- It rematches and runs the mask head on every query; stage 2 matches once and runs the mask head on the
  matched queries only, so the criterion must accept given `indices` and matched-only `pred_masks`.
- It upsamples every matched mask's logits to the padded input size at once and keeps all the loss
  intermediates for the backward pass (about 10 tensors of N x H x W floats: 1.5 GiB for 40 masks at 800 px).
  Ours computes the same terms a chunk of masks at a time under activation checkpointing (`loss_masks`), so
  memory holds one chunk.

What we reuse from transformers, unchanged: `HungarianMatcher` (the scipy Hungarian matching of DETR's
`models/matcher.py`; we only add the all-empty-batch case it cannot reshape) and the box utilities
`center_to_corners_format` / `generalized_box_iou`. The focal and dice terms are computed per mask
(`focal_per_mask`, `dice_per_mask`: equal to transformers' `sigmoid_focal_loss` / `dice_loss` summed, tested) so
that a batch can be scored a chunk of masks at a time. With integer weights and one process, `DetrCriterion`
gives the same numbers as transformers' `ForSegmentationLoss` (tested).

Terms, as in DETR (facebookresearch/detr `models/detr.py` SetCriterion, `models/segmentation.py`):
- "labels": cross-entropy over all queries, unmatched queries get the no-object class (index `num_classes`)
  whose weight is `eos_coef`; weighted mean over queries (not divided by num_boxes).
- "boxes": L1 and 1 - GIoU over matched pairs, each summed and divided by num_boxes.
- "masks": sigmoid focal (`loss_mask`) and/or dice (`loss_dice`) over matched pairs, divided by num_boxes; and
  optionally skeleton recall (`loss_skeleton`, not in DETR, `skeleton_recall_per_mask`) for thin structures.
- "cardinality": `cardinality_error`, logging only (no gradient, weight 0), as DETR.
`auxiliary_outputs` (one dict per earlier decoder layer) get "labels"/"boxes"/"cardinality" with their own
matching, suffixed `_0`, `_1`, ...; never masks (DETR computes no intermediate masks).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import skeletonize
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import HungarianMatcher, generalized_box_iou

LOSS_TERMS = ("labels", "boxes", "masks", "cardinality")
MASK_LOSSES = ("focal", "dice", "focal+dice", "focal+dice+skeleton")
# Canvas pixels of matched masks computed at once (16 MiB per float32 intermediate): larger batches are split
# into chunks of masks under activation checkpointing. 800 x 1066 DETR canvases: 4 masks a chunk.
MASK_CHUNK_PIXELS = 1 << 22

Indices = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms in the total `loss` (floats: `DetrConfig` types its coefficients `int`).

    Defaults are DETR's. `eos_coef` is the cross-entropy weight of the no-object class; `focal_alpha` and
    `focal_gamma` parametrise the sigmoid focal mask loss (RetinaNet's alpha, gamma). `skeleton_weight` weighs
    the optional skeleton-recall term, which DETR does not have (1, as its paper). Frozen, so the default
    instance can be shared safely; derive variants with `dataclasses.replace`.
    """

    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 1.0
    eos_coef: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    skeleton_weight: float = 1.0

    def term_weights(self) -> dict[str, float]:
        """Weight of each returned term by its base name (aux terms `<name>_<i>` use the same weight)."""
        return {
            "loss_ce": self.class_weight,
            "loss_bbox": self.bbox_weight,
            "loss_giou": self.giou_weight,
            "loss_mask": self.mask_weight,
            "loss_dice": self.dice_weight,
            "loss_skeleton": self.skeleton_weight,
            "cardinality_error": 0.0,
        }


def focal_per_mask(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """RetinaNet's sigmoid focal loss of each mask, averaged over its pixels: [N] (a mask's term on its own, so
    that masks can be scored a chunk at a time).

    Each pixel's loss is that of its target, 1 (-alpha (1 - p)^gamma log p) or 0 (-(1 - alpha) p^gamma
    log(1 - p)), as in transformers' (and DETR's) `sigmoid_focal_loss`. `alpha < 0` disables the alpha weighting.

    logits, targets: [N, ...] mask logits and binary targets.
    """
    logits = logits.flatten(1)
    targets = targets.flatten(1)
    prob = logits.sigmoid()
    alpha_pos, alpha_neg = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
    loss_pos = alpha_pos * (1 - prob) ** gamma * F.softplus(-logits)  # target 1: -log p
    loss_neg = alpha_neg * prob**gamma * F.softplus(logits)  # target 0: -log(1 - p)
    loss = targets * loss_pos + (1 - targets) * loss_neg
    return loss.mean(1)


def dice_per_mask(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """DETR's dice loss of each mask, 1 - (2|P∩T| + s) / (|P| + |T| + s): [N].

    logits, targets: [N, ...] mask logits and binary targets.
    """
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return 1 - (numerator + smooth) / (denominator + smooth)


def skeleton_targets(targets: Tensor) -> Tensor:
    """The skeleton of each binary target mask [N, H, W], thickened by one pixel each side (a 3 x 3 dilation):
    the pixels `skeleton_recall_per_mask` asks the prediction to cover. Computed on the CPU without gradient
    (skimage's thinning), as the targets are fixed."""
    masks = targets.detach().cpu().numpy() > 0.5
    tubes = [ndimage.binary_dilation(skeletonize(mask), structure=np.ones((3, 3), bool)) for mask in masks]
    return torch.from_numpy(np.stack(tubes) if tubes else masks).to(targets.device, targets.dtype)


def skeleton_recall_per_mask(logits: Tensor, skeletons: Tensor, smooth: float = 1.0) -> Tensor:
    """Skeleton recall (Kirchhoff et al., ECCV 2024): 1 - the predicted probability's share of the target's
    thickened skeleton, per mask: [N].

    Dice and focal loss count pixels, so a one-pixel gap that breaks a crack in two costs next to nothing, while
    the report then measures two shorter cracks. Recall on the skeleton weighs every pixel along a thin
    structure's length alike, whatever its width, so gaps cost as much as their length.

    logits, skeletons: [N, ...] mask logits and `skeleton_targets`.
    """
    probs = logits.sigmoid().flatten(1)
    skeletons = skeletons.flatten(1)
    return 1 - ((probs * skeletons).sum(1) + smooth) / (skeletons.sum(1) + smooth)


def _num_boxes(targets: Sequence[dict[str, Tensor]], device: torch.device | str) -> Tensor:
    """DETR's normaliser: target boxes of the batch summed over processes, / world size, at least 1.

    Every process then divides by the same average count, so the gradient summed by DDP equals that of one
    big batch. (transformers' `ImageLoss` takes accelerate's *mean* over processes and divides by the world
    size once more: N times too small a normaliser under N processes.) Returned as a 0-dim float tensor on
    `device`, so no host synchronisation is forced.
    """
    count = torch.as_tensor(float(sum(len(t["class_labels"]) for t in targets)), dtype=torch.float, device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
        world_size = torch.distributed.get_world_size()
    return torch.clamp(count / world_size, min=1)


def matched_query_index(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction, in the order the criterion concatenates them.

    The order is image by image, and within an image the order of `indices[b][0]`. Stage 2 uses it to run the
    mask head on the matched queries only: `pred_masks` of shape [N_matched, h, w] must follow this order.
    """
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def _device_of(outputs: dict[str, Any]) -> torch.device:
    for value in outputs.values():
        if isinstance(value, Tensor):
            return value.device
    raise ValueError("outputs holds no tensor; expected at least one of logits, pred_boxes, pred_masks")


def matched_mask_logits(pred_masks: Tensor, indices: Indices) -> Tensor:
    """The matched queries' mask logits as float [N_matched, h, w], in `matched_query_index` order.

    `pred_masks` is either [B, Q, h, w] (every query) or already [N_matched, h, w] (the mask head ran on the
    matched queries only).
    """
    num_matched = sum(len(src) for src, _ in indices)
    if pred_masks.dim() == 4:
        return pred_masks[matched_query_index(indices)].float()
    if pred_masks.dim() == 3 and pred_masks.shape[0] == num_matched:
        return pred_masks.float()
    raise ValueError(
        f"pred_masks has shape {tuple(pred_masks.shape)}; expected [batch, queries, h, w] or "
        f"[{num_matched} matched queries, h, w]"
    )


def _matched_targets(targets: Sequence[dict[str, Tensor]], indices: Indices) -> list[tuple[Tensor, Tensor]]:
    """(target masks, matched rows) of each image: every matched target mask, in `matched_query_index` order."""
    return [(target["masks"], tgt) for target, (_, tgt) in zip(targets, indices)]


def _canvas(targets: Sequence[dict[str, Tensor]]) -> tuple[int, int]:
    """The padded input size of a batch: the largest target mask height and width (DETR's nested tensor)."""
    return max(t["masks"].shape[-2] for t in targets), max(t["masks"].shape[-1] for t in targets)


def _at_canvas(
    source: Tensor, pieces: Sequence[tuple[Tensor, Tensor]], canvas: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """`source` [n, h, w] mask logits upsampled to the padded `canvas` (bilinear, as DETR), and the target masks
    `pieces` ((masks, rows) per image, n rows in all) zero-padded bottom/right to it; both flattened: [n, H*W].
    Only matched target masks are ever copied."""
    height, width = canvas
    target_list = []
    for masks, rows in pieces:
        chosen = masks[rows].to(source.device, torch.float)
        target_list.append(F.pad(chosen, (0, width - chosen.shape[-1], 0, height - chosen.shape[-2])))
    target_masks = torch.cat(target_list) if target_list else source.new_zeros(0, height, width)
    source = F.interpolate(source[:, None], size=canvas, mode="bilinear", align_corners=False)[:, 0]
    return source.flatten(1), target_masks.flatten(1)


class DetrCriterion(nn.Module):
    """DETR's set criterion: Hungarian matching, then the selected loss terms and their weighted sum.

    Args:
        num_classes: K, the number of real classes; `logits` carry K + 1 columns, the last being no-object.
        weights: term weights, `eos_coef` and the focal parameters.
        losses: terms to compute, a subset of `LOSS_TERMS`.
        mask_loss: "focal", "dice", "focal+dice" (DETR uses both) or "focal+dice+skeleton" (`skeleton_recall_per_mask`).
        matcher_costs: (class, bbox, giou) costs of the Hungarian matcher (DETR: 1, 5, 2).
        mask_chunk_pixels: how many canvas pixels of matched masks the mask terms hold at once; a batch with
            more is computed a chunk of masks at a time with activation checkpointing (same values, a
            fraction of the memory, one more forward of the loss in the backward pass).
    """

    def __init__(
        self,
        num_classes: int,
        weights: LossWeights = LossWeights(),
        losses: Sequence[str] = ("labels", "boxes"),
        mask_loss: str = "focal+dice",
        matcher_costs: tuple[float, float, float] = (1.0, 5.0, 2.0),
        mask_chunk_pixels: int = MASK_CHUNK_PIXELS,
    ) -> None:
        super().__init__()
        unknown = [term for term in losses if term not in LOSS_TERMS]
        if unknown or not losses:
            raise ValueError(f"losses={list(losses)!r}: expected a non-empty subset of {LOSS_TERMS}")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss={mask_loss!r}: expected one of {MASK_LOSSES}")
        if mask_chunk_pixels < 1:
            raise ValueError(f"mask_chunk_pixels={mask_chunk_pixels!r}: expected a positive number of pixels")
        if len(matcher_costs) != 3:
            raise ValueError(f"matcher_costs={matcher_costs!r}: expected (class, bbox, giou)")
        self.num_classes = num_classes
        self.weights = weights
        self.losses = tuple(losses)
        self.mask_loss = mask_loss
        self.mask_chunk_pixels = mask_chunk_pixels
        class_cost, bbox_cost, giou_cost = matcher_costs
        self.matcher = HungarianMatcher(class_cost=class_cost, bbox_cost=bbox_cost, giou_cost=giou_cost)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = weights.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ----------------------------------------------------------------------------------------------- matching
    @torch.no_grad()
    def match(self, logits: Tensor, pred_boxes: Tensor, targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Hungarian matching (scipy), one (query indices, target indices) pair of CPU int64 tensors per image.

        transformers' matcher cannot reshape an empty cost matrix, so a batch without any target is answered
        here with empty matchings.
        """
        if sum(len(t["class_labels"]) for t in targets) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(logits.shape[0])]
        return self.matcher({"logits": logits, "pred_boxes": pred_boxes}, targets)

    # ------------------------------------------------------------------------------------------------ terms
    def loss_labels(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: Tensor) -> dict:
        """Cross-entropy over all queries; unmatched ones target no-object, weighted by `eos_coef`."""
        logits = outputs["logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"logits have {logits.shape[-1]} classes in the last dimension; expected num_classes + 1 = "
                f"{self.num_classes + 1} (the last one is no-object)"
            )
        batch_idx, query_idx = matched_query_index(indices)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        matched = [t["class_labels"][tgt] for t, (_, tgt) in zip(targets, indices)]
        target_classes[batch_idx, query_idx] = torch.cat(matched).to(logits.device, torch.int64)
        weight = self.empty_weight.to(logits.device, torch.float)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2).float(), target_classes, weight)}

    def loss_boxes(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: Tensor) -> dict:
        """L1 and 1 - GIoU of matched boxes (normalised cx, cy, w, h), each summed and / num_boxes."""
        source = outputs["pred_boxes"][matched_query_index(indices)]
        target = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(source)
        giou = torch.diag(generalized_box_iou(center_to_corners_format(source), center_to_corners_format(target)))
        return {
            "loss_bbox": F.l1_loss(source, target, reduction="none").sum() / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: Tensor) -> dict:
        """|number of queries not predicting no-object - number of targets|, mean over images (logging only)."""
        logits = outputs["logits"]
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        expected = torch.as_tensor([float(len(t["class_labels"])) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, expected)}

    def _mask_terms_per_mask(
        self, source: Tensor, pieces: Sequence[tuple[Tensor, Tensor]], canvas: tuple[int, int]
    ) -> dict[str, Tensor]:
        """The selected mask terms of each of the n masks of `source` [n, h, w]: {term: [n]}."""
        logits, target = _at_canvas(source, pieces, canvas)
        terms = {}
        if "focal" in self.mask_loss:
            terms["loss_mask"] = focal_per_mask(logits, target, self.weights.focal_alpha, self.weights.focal_gamma)
        if "dice" in self.mask_loss:
            terms["loss_dice"] = dice_per_mask(logits, target)
        if "skeleton" in self.mask_loss:
            skeletons = skeleton_targets(target.view(-1, *canvas))
            terms["loss_skeleton"] = skeleton_recall_per_mask(logits, skeletons)
        return terms

    def _mask_chunks(
        self, targets: Sequence[dict[str, Tensor]], indices: Indices, canvas: tuple[int, int]
    ) -> list[tuple[int, int, list[tuple[Tensor, Tensor]]]]:
        """The matched masks split into chunks of at most `mask_chunk_pixels` canvas pixels (at least one mask
        each): (first row, end row, pieces), rows in `matched_query_index` order. One chunk when all fit."""
        rows_per_chunk = max(1, self.mask_chunk_pixels // (canvas[0] * canvas[1]))
        rows = [(b, j) for b, (_, tgt) in enumerate(indices) for j in tgt.tolist()]
        if len(rows) <= rows_per_chunk:
            return [(0, len(rows), _matched_targets(targets, indices))]
        chunks = []
        for first in range(0, len(rows), rows_per_chunk):
            part = rows[first : first + rows_per_chunk]
            pieces = [
                (targets[b]["masks"], torch.tensor([j for _, j in group], dtype=torch.int64))
                for b, group in itertools.groupby(part, key=lambda row: row[0])
            ]
            chunks.append((first, first + len(part), pieces))
        return chunks

    def loss_masks(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: Tensor) -> dict:
        """Sigmoid focal and/or dice loss of matched masks, each summed over masks and / num_boxes.

        A batch larger than `mask_chunk_pixels` (counted at the padded canvas) is computed a chunk of masks at
        a time under activation checkpointing: each chunk's upsampled logits and loss intermediates are freed
        after its forward and recomputed in the backward pass, so peak memory holds one chunk instead of
        every matched mask at full size. Every mask's term is computed by the same operations either way; only
        the order of the final sum over masks differs (float rounding).
        """
        if "pred_masks" not in outputs:
            raise KeyError("losses include 'masks' but outputs has no 'pred_masks'")
        source = matched_mask_logits(outputs["pred_masks"], indices)
        canvas = _canvas(targets)
        chunks = self._mask_chunks(targets, indices, canvas)
        if len(chunks) == 1:
            per_mask = self._mask_terms_per_mask(source, chunks[0][2], canvas)
        else:
            parts = [
                checkpoint(self._mask_terms_per_mask, source[first:end], pieces, canvas, use_reentrant=False)
                for first, end, pieces in chunks
            ]
            per_mask = {term: torch.cat([part[term] for part in parts]) for term in parts[0]}
        return {term: values.sum() / num_boxes for term, values in per_mask.items()}

    # ---------------------------------------------------------------------------------------------- forward
    def _terms(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: Tensor, aux: bool) -> dict:
        loss_fns = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "masks": self.loss_masks,
            "cardinality": self.loss_cardinality,
        }
        losses: dict[str, Tensor] = {}
        for term in self.losses:
            if aux and term == "masks":
                continue
            losses.update(loss_fns[term](outputs, targets, indices, num_boxes))
        return losses

    def forward(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]], indices: Indices | None = None
    ) -> dict[str, Tensor]:
        """Loss terms and their weighted sum `loss`.

        Args:
            outputs: `logits` [B, Q, K+1], `pred_boxes` [B, Q, 4] (normalised cx, cy, w, h), optionally
                `pred_masks` ([B, Q, h, w] or [N_matched, h, w] mask logits) and `auxiliary_outputs` (a list
                of dicts with `logits` and `pred_boxes`, deep supervision of the earlier decoder layers).
            targets: one dict per image: `class_labels` [n], `boxes` [n, 4] (normalised cx, cy, w, h),
                `masks` [n, H, W] (bool or float, at the padded input size) when "masks" is computed.
            indices: a matching of the final layer to reuse (from `match`); computed when None. Auxiliary
                layers are always matched on their own outputs.

        Returns:
            `loss_ce`, `loss_bbox`, `loss_giou`, `loss_mask`, `loss_dice`, `loss_skeleton`, `cardinality_error`
            (those selected), the auxiliary ones suffixed `_0`, `_1`, ..., and `loss`, the weighted sum.
        """
        if indices is None:
            indices = self.match(outputs["logits"], outputs["pred_boxes"], targets)
        if len(indices) != len(targets):
            raise ValueError(f"indices cover {len(indices)} images; expected one per target ({len(targets)})")
        device = _device_of(outputs)
        num_boxes = _num_boxes(targets, device)
        losses = self._terms(outputs, targets, indices, num_boxes, aux=False)
        if any(term != "masks" for term in self.losses):
            for i, aux_outputs in enumerate(outputs.get("auxiliary_outputs") or []):
                aux_indices = self.match(aux_outputs["logits"], aux_outputs["pred_boxes"], targets)
                aux_losses = self._terms(aux_outputs, targets, aux_indices, num_boxes, aux=True)
                losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        weights = self.weights.term_weights()
        total = torch.zeros((), device=device)
        for name, value in losses.items():
            base = name if name in weights else name.rsplit("_", 1)[0]
            if weights[base]:
                total = total + weights[base] * value
        losses["loss"] = total
        return losses

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
- It upsamples mask logits to the padded input size (N x H x W floats plus their gradient); the
  `mask_resolution="prediction"` path computes the mask terms at the head's 1/4 resolution instead.

What we reuse from transformers, unchanged: `HungarianMatcher` (the scipy Hungarian matching of DETR's
`models/matcher.py`; we only add the all-empty-batch case it cannot reshape) and the box utilities
`center_to_corners_format` / `generalized_box_iou`. `sigmoid_focal_loss` and `dice_loss` are re-written, equal
to transformers' on binary targets (tested), so that they extend correctly to the soft targets of the
prediction-resolution path (focal linear in the target; dice with a resolution-aware smoothing constant).
With integer weights and one process, `DetrCriterion` at `mask_resolution="target"` gives the same numbers as
transformers' `ForSegmentationLoss` (tested).

Terms, as in DETR (facebookresearch/detr `models/detr.py` SetCriterion, `models/segmentation.py`):
- "labels": cross-entropy over all queries, unmatched queries get the no-object class (index `num_classes`)
  whose weight is `eos_coef`; weighted mean over queries (not divided by num_boxes).
- "boxes": L1 and 1 - GIoU over matched pairs, each summed and divided by num_boxes.
- "masks": sigmoid focal (`loss_mask`) and/or dice (`loss_dice`) over matched pairs, divided by num_boxes.
- "cardinality": `cardinality_error`, logging only (no gradient, weight 0), as DETR.
`auxiliary_outputs` (one dict per earlier decoder layer) get "labels"/"boxes"/"cardinality" with their own
matching, suffixed `_0`, `_1`, ...; never masks (DETR computes no intermediate masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import HungarianMatcher, generalized_box_iou

LOSS_TERMS = ("labels", "boxes", "masks", "cardinality")
MASK_LOSSES = ("focal", "dice", "focal+dice")
MASK_RESOLUTIONS = ("target", "prediction")

Indices = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms in the total `loss` (floats: `DetrConfig` types its coefficients `int`).

    Defaults are DETR's. `eos_coef` is the cross-entropy weight of the no-object class; `focal_alpha` and
    `focal_gamma` parametrise the sigmoid focal mask loss (RetinaNet's alpha, gamma). Frozen, so the default
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

    def term_weights(self) -> dict[str, float]:
        """Weight of each returned term by its base name (aux terms `<name>_<i>` use the same weight)."""
        return {
            "loss_ce": self.class_weight,
            "loss_bbox": self.bbox_weight,
            "loss_giou": self.giou_weight,
            "loss_mask": self.mask_weight,
            "loss_dice": self.dice_weight,
            "cardinality_error": 0.0,
        }


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_boxes: Tensor | float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """RetinaNet's sigmoid focal loss as DETR uses it: mean over pixels, summed over masks, / `num_boxes`.

    Written as t * FL(z, 1) + (1 - t) * FL(z, 0), i.e. linear in the target t. For binary targets this is
    exactly transformers' (and DETR's) `sigmoid_focal_loss`; for a soft target t (the covered fraction of a
    prediction cell) it is the mean of the binary losses over the cell's pixels, which is what makes the
    prediction-resolution path exact for a cell-wise constant logit. (transformers' version puts t inside the
    modulating factor (1 - p_t)^gamma, which is not linear in t.) `alpha < 0` disables the alpha weighting.

    logits, targets: [N, ...] mask logits and targets in [0, 1].
    """
    logits = logits.flatten(1)
    targets = targets.flatten(1)
    prob = logits.sigmoid()
    alpha_pos, alpha_neg = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
    loss_pos = alpha_pos * (1 - prob) ** gamma * F.softplus(-logits)  # target 1: -log p
    loss_neg = alpha_neg * prob**gamma * F.softplus(logits)  # target 0: -log(1 - p)
    loss = targets * loss_pos + (1 - targets) * loss_neg
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: Tensor | float, smooth: float = 1.0) -> Tensor:
    """DETR's dice loss, 1 - (2|P∩T| + s) / (|P| + |T| + s) per mask, summed and divided by `num_boxes`.

    Identical to transformers' `dice_loss` for `smooth=1`. The smoothing constant `s` is a count of pixels, so
    the prediction-resolution path passes `s = h*w / (H*W)`: one *target* pixel expressed in prediction cells,
    which keeps the term equal to the target-resolution one when the masks are smooth.

    logits, targets: [N, ...] mask logits and (possibly soft) targets in [0, 1].
    """
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    loss = 1 - (numerator + smooth) / (denominator + smooth)
    return loss.sum() / num_boxes


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


class DetrCriterion(nn.Module):
    """DETR's set criterion: Hungarian matching, then the selected loss terms and their weighted sum.

    Args:
        num_classes: K, the number of real classes; `logits` carry K + 1 columns, the last being no-object.
        weights: term weights, `eos_coef` and the focal parameters.
        losses: terms to compute, a subset of `LOSS_TERMS`.
        mask_loss: "focal", "dice" or "focal+dice" (DETR uses both).
        matcher_costs: (class, bbox, giou) costs of the Hungarian matcher (DETR: 1, 5, 2).
        mask_resolution: "target" (DETR: mask logits bilinearly upsampled to the padded target size) or
            "prediction" (target masks area-pooled to the logits' size, giving soft targets in [0, 1]). The
            second keeps the mask-term tensors (logits, targets, their gradients) (stride)^2 = 16 x smaller.
            It is exactly the target-resolution loss of *nearest*-upsampled logits (a logit constant over each
            stride x stride cell) when the padded size is a multiple of h, w; the reference upsamples
            bilinearly, so the two differ only along mask borders: close for smooth logits (focal +3 %, dice
            0.1 % at 0.1 logit per pixel), the focal term drifting up as logits sharpen (+8 % at 0.2).
    """

    def __init__(
        self,
        num_classes: int,
        weights: LossWeights = LossWeights(),
        losses: Sequence[str] = ("labels", "boxes"),
        mask_loss: str = "focal+dice",
        matcher_costs: tuple[float, float, float] = (1.0, 5.0, 2.0),
        mask_resolution: str = "target",
    ) -> None:
        super().__init__()
        unknown = [term for term in losses if term not in LOSS_TERMS]
        if unknown or not losses:
            raise ValueError(f"losses={list(losses)!r}: expected a non-empty subset of {LOSS_TERMS}")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss={mask_loss!r}: expected one of {MASK_LOSSES}")
        if mask_resolution not in MASK_RESOLUTIONS:
            raise ValueError(f"mask_resolution={mask_resolution!r}: expected one of {MASK_RESOLUTIONS}")
        if len(matcher_costs) != 3:
            raise ValueError(f"matcher_costs={matcher_costs!r}: expected (class, bbox, giou)")
        self.num_classes = num_classes
        self.weights = weights
        self.losses = tuple(losses)
        self.mask_loss = mask_loss
        self.mask_resolution = mask_resolution
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

    def prepare_masks(
        self, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]], indices: Indices
    ) -> tuple[Tensor, Tensor]:
        """Matched mask logits and their targets, both [N_matched, P] float32 at the loss resolution.

        `pred_masks` is either [B, Q, h, w] (every query; the matched ones are selected) or [N_matched, h, w]
        (the mask head ran on the matched queries only, in `matched_query_index` order). Target masks are
        zero-padded bottom/right to the largest size in the batch (the padded input, as DETR's nested tensor),
        then either the logits are upsampled to it (P = H*W, "target") or the targets are area-pooled to the
        logits' size (P = h*w, "prediction"). Only matched target masks are ever copied.
        """
        num_matched = sum(len(src) for src, _ in indices)
        if pred_masks.dim() == 4:
            source = pred_masks[matched_query_index(indices)]
        elif pred_masks.dim() == 3 and pred_masks.shape[0] == num_matched:
            source = pred_masks
        else:
            raise ValueError(
                f"pred_masks has shape {tuple(pred_masks.shape)}; expected [batch, queries, h, w] or "
                f"[{num_matched} matched queries, h, w]"
            )
        source = source.float()
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        low_res = tuple(source.shape[-2:])
        target_list = []
        for target, (_, tgt) in zip(targets, indices):
            masks = target["masks"][tgt].to(source.device, torch.float)
            masks = F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
            if self.mask_resolution == "prediction":
                masks = F.adaptive_avg_pool2d(masks[:, None], low_res)[:, 0]  # = interpolate(mode="area")
            target_list.append(masks)
        target_masks = torch.cat(target_list)
        if self.mask_resolution == "target":
            source = F.interpolate(source[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return source.flatten(1), target_masks.flatten(1)

    def loss_masks(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: Tensor) -> dict:
        """Sigmoid focal and/or dice loss of matched masks, each summed over masks and / num_boxes."""
        if "pred_masks" not in outputs:
            raise KeyError("losses include 'masks' but outputs has no 'pred_masks'")
        source, target = self.prepare_masks(outputs["pred_masks"], targets, indices)
        # One target pixel expressed in loss pixels: 1 at target resolution, h*w/(H*W) at prediction resolution.
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        smooth = source.shape[-1] / (height * width)
        losses = {}
        if "focal" in self.mask_loss:
            losses["loss_mask"] = sigmoid_focal_loss(
                source, target, num_boxes, alpha=self.weights.focal_alpha, gamma=self.weights.focal_gamma
            )
        if "dice" in self.mask_loss:
            losses["loss_dice"] = dice_loss(source, target, num_boxes, smooth=smooth)
        return losses

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
            `loss_ce`, `loss_bbox`, `loss_giou`, `loss_mask`, `loss_dice`, `cardinality_error` (those selected),
            the auxiliary ones suffixed `_0`, `_1`, ..., and `loss`, the weighted sum.
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

"""One training step module per stage: a batch in, the stage's loss terms and their weighted sum `loss` out.

Stage 1 (`Stage1Step`) trains the detector (backbone, transformer, class and box heads) on boxes derived from
the masks; the mask head is frozen and not run. Stage 2 (`Stage2Step`) freezes the whole detector (run in eval
mode without a graph, or read from the `DetectorCache`) and trains only the mask head (`bbox_attention` +
`mask_head`), on the queries Hungarian-matched to a target.

Each step is an `nn.Module` whose `forward` is the whole step, so that accelerate (and DDP) see every call go
through `forward`. What the two share is only that contract and the model and criterion they hold; the names
`model`, `presence_head` and `position_head` are the keys of accelerate's checkpoints and must not change.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DetrForSegmentation

from .config import TrainConfig
from .detector_cache import DetectorCache
from .detr_forward import MaskHeadInputs, run_detector, run_mask_head
from .losses import DetrCriterion, Indices, matched_query_index
from .margin import add_margin_to_batch, context_margin
from .memory_supervision import EncoderPositionHead, EncoderPresenceHead
from .modeling import set_trainable


class StageStep(nn.Module):
    """What both stages' steps are: the model and the criterion, and the stage's trainable parameter groups
    (`TRAINABLE`, `modeling.PARAMETER_GROUPS`) and loss terms (`LOSSES`, `losses.LOSS_TERMS`)."""

    TRAINABLE: tuple[str, ...] = ()
    LOSSES: tuple[str, ...] = ()

    def __init__(self, model: DetrForSegmentation, criterion: DetrCriterion) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def training_heads(self) -> nn.ModuleList:
        """The training-only modules beside the model (optimised with it, never saved); none by default."""
        return nn.ModuleList()

    def with_margin(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """The batch with the model's margin around every image, as prediction gives it (margin.py)."""
        return add_margin_to_batch(context_margin(self.model.config), pixel_values, pixel_mask, labels)


class Stage1Step(StageStep):
    """The detector's forward and DETR's box losses, plus the optional encoder-output losses of
    memory_supervision.py (training-only heads that keep the queries apart when the backbone starts random)."""

    TRAINABLE = ("backbone", "input_projection", "encoder", "decoder", "class_head", "box_head")
    LOSSES = ("labels", "boxes")

    def __init__(
        self,
        model: DetrForSegmentation,
        criterion: DetrCriterion,
        encoder_presence_weight: float = 0.0,
        encoder_position_weight: float = 0.0,
    ) -> None:
        super().__init__(model, criterion)
        self.encoder_presence_weight = encoder_presence_weight
        self.presence_head = (
            EncoderPresenceHead(model.config.d_model, criterion.num_classes) if encoder_presence_weight > 0 else None
        )
        self.encoder_position_weight = encoder_position_weight
        self.position_head = EncoderPositionHead(model.config.d_model) if encoder_position_weight > 0 else None

    def training_heads(self) -> nn.ModuleList:
        return nn.ModuleList([m for m in (self.presence_head, self.position_head) if m is not None])

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]) -> dict:
        pixel_values, pixel_mask, labels = self.with_margin(pixel_values, pixel_mask, labels)
        detector = run_detector(self.model, pixel_values, pixel_mask)
        losses = self.criterion(detector.as_loss_inputs(), labels)
        if self.presence_head is not None:
            canvas = tuple(pixel_values.shape[-2:])
            presence = self.presence_head(detector.memory, detector.memory_mask, labels, canvas)
            losses["loss_encoder_presence"] = presence
            losses["loss"] = losses["loss"] + self.encoder_presence_weight * presence
        if self.position_head is not None:
            losses["loss_encoder_position"] = self.position_head(detector.memory, detector.memory_mask)
            losses["loss"] = losses["loss"] + self.encoder_position_weight * losses["loss_encoder_position"]
        return losses


class Stage2Step(StageStep):
    """The frozen detector (or its cached outputs), one Hungarian matching, and the mask head on the matched
    queries only: the loss reads only those, and each query's mask is computed independently."""

    TRAINABLE = ("mask_head",)
    LOSSES = ("masks",)

    def __init__(
        self, model: DetrForSegmentation, criterion: DetrCriterion, detector_cache: DetectorCache | None = None
    ) -> None:
        super().__init__(model, criterion)
        # The frozen detector's outputs per image, reused after an image's first batch.
        self.detector_cache = detector_cache

    def train(self, mode: bool = True) -> "Stage2Step":
        super().train(mode)
        if mode:
            self.model.detr.eval()  # a frozen detector runs without dropout noise
        return self

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]) -> dict:
        pixel_values, pixel_mask, labels = self.with_margin(pixel_values, pixel_mask, labels)
        mask_head_inputs, indices = self._frozen_detector(pixel_values, pixel_mask, labels)
        batch_index, query_index = matched_query_index(indices)
        device = pixel_values.device
        masks = run_mask_head(self.model, mask_head_inputs, batch_index.to(device), query_index.to(device))
        losses = self.criterion({"pred_masks": masks}, labels, indices)
        # Keep the mask head in the graph when a batch has no target at all (DDP expects every parameter).
        losses["loss"] = losses["loss"] + 0.0 * masks.sum()
        return losses

    def _frozen_detector(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]
    ) -> tuple[MaskHeadInputs, Indices]:
        """The detector's outputs and Hungarian matching, through the cache when there is one; computed without
        a graph (the detector is in eval mode)."""
        if self.detector_cache is not None:
            return self.detector_cache(self.model, self.criterion, pixel_values, pixel_mask, labels)
        with torch.no_grad():
            detector = run_detector(self.model, pixel_values, pixel_mask)
            indices = self.criterion.match(detector.logits, detector.pred_boxes, labels)
        return detector, indices


STAGE_STEPS: dict[int, type[StageStep]] = {1: Stage1Step, 2: Stage2Step}


def build_criterion(config: TrainConfig, num_classes: int) -> DetrCriterion:
    """DETR's criterion with the stage's loss terms and the configured weights."""
    losses = STAGE_STEPS[config.stage].LOSSES
    return DetrCriterion(num_classes, config.loss_weights(), losses=losses, mask_loss=config.mask_loss)


def build_step(
    config: TrainConfig, model: DetrForSegmentation, num_classes: int, detector_cache: DetectorCache | None = None
) -> StageStep:
    """The stage's step around `model`, with exactly the stage's parameter groups left trainable (the config
    allows `detector_cache` in stage 2 only)."""
    set_trainable(model, STAGE_STEPS[config.stage].TRAINABLE)
    criterion = build_criterion(config, num_classes)
    if config.stage == 1:
        return Stage1Step(model, criterion, config.encoder_presence_weight, config.encoder_position_weight)
    return Stage2Step(model, criterion, detector_cache)

"""DetrForSegmentation's forward split in two: the detector, then the mask head on chosen queries.

Stage 1 needs only the detector (the mask head is frozen and not even run). Stage 2 runs the frozen detector
without a graph and the mask head only on the queries matched to a target: the loss uses only those and each
query's mask is computed independently, so the loss is the same as with all queries, at a fraction of the
cost. Both halves call transformers' own modules; the backbone features and the input projection are caught
with forward hooks instead of re-implementing `DetrForSegmentation.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DetrForSegmentation


@dataclass
class MaskHeadInputs:
    """What the mask head reads from the detector (stage 2 can keep these per image: detector_cache.py)."""

    decoder_output: torch.Tensor  # [B, Q, d]
    memory: torch.Tensor  # encoder output as a map [B, d, h, w]
    memory_mask: torch.Tensor  # [B, h, w] True on real pixels
    projected_features: torch.Tensor  # input projection of the last backbone level [B, d, h, w]
    fpn_features: list[torch.Tensor]  # backbone levels 3, 2, 1 (coarse to fine)


@dataclass
class DetectorOutputs(MaskHeadInputs):
    """What the detector computed: its predictions and what the mask head needs."""

    logits: torch.Tensor  # [B, Q, K+1]
    pred_boxes: torch.Tensor  # [B, Q, 4] normalised cx, cy, w, h
    auxiliary_outputs: list[dict[str, torch.Tensor]]  # earlier decoder layers (when config.auxiliary_loss)

    def as_loss_inputs(self) -> dict:
        return {"logits": self.logits, "pred_boxes": self.pred_boxes, "auxiliary_outputs": self.auxiliary_outputs}


def run_detector(model: DetrForSegmentation, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> DetectorOutputs:
    """Backbone, encoder, decoder, class and box heads (everything but the mask head)."""
    detr = model.detr
    caught: dict[str, object] = {}
    hooks = [
        detr.model.backbone.register_forward_hook(lambda _m, _i, out: caught.__setitem__("features", out)),
        detr.model.input_projection.register_forward_hook(lambda _m, _i, out: caught.__setitem__("projected", out)),
    ]
    try:
        outputs = detr.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    finally:
        for hook in hooks:
            hook.remove()
    decoder_output = outputs.last_hidden_state
    logits = detr.class_labels_classifier(decoder_output)
    pred_boxes = detr.bbox_predictor(decoder_output).sigmoid()
    auxiliary = []
    if outputs.intermediate_hidden_states is not None:
        for hidden in outputs.intermediate_hidden_states.unbind(0)[:-1]:
            auxiliary.append(
                {"logits": detr.class_labels_classifier(hidden), "pred_boxes": detr.bbox_predictor(hidden).sigmoid()}
            )
    features = caught["features"]
    feature_map, mask = features[-1]
    projected = caught["projected"]
    batch, _, height, width = feature_map.shape
    memory = outputs.encoder_last_hidden_state.transpose(1, 2).reshape(batch, -1, height, width)
    return DetectorOutputs(
        logits=logits,
        pred_boxes=pred_boxes,
        auxiliary_outputs=auxiliary,
        decoder_output=decoder_output,
        memory=memory,
        memory_mask=mask.bool(),
        projected_features=projected,
        fpn_features=[features[2][0], features[1][0], features[0][0]],
    )


def run_mask_head(
    model: DetrForSegmentation,
    detector: MaskHeadInputs,
    batch_index: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask logits for the chosen (image, query) pairs: [N, h, w] at 1/4 of the backbone's first level.

    Without indices every query of every image is run: [B, Q, h, w], as `DetrForSegmentation` returns them.
    """
    memory = detector.memory
    additive_mask = torch.where(
        detector.memory_mask[:, None, None],
        torch.zeros((), dtype=memory.dtype, device=memory.device),
        torch.full((), torch.finfo(memory.dtype).min, dtype=memory.dtype, device=memory.device),
    )
    attention = model.bbox_attention(detector.decoder_output, memory, attention_mask=additive_mask)  # [B,Q,H,h,w]
    if batch_index is None:
        batch, queries = attention.shape[:2]
        masks = model.mask_head(detector.projected_features, attention, detector.fpn_features)
        return masks.view(batch, queries, *masks.shape[-2:])
    # Each chosen query becomes its own "image" with one query: the mask head treats queries independently.
    masks = model.mask_head(
        detector.projected_features[batch_index],
        attention[batch_index, query_index].unsqueeze(1),
        [f[batch_index] for f in detector.fpn_features],
    )
    return masks.squeeze(1)

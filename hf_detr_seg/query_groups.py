"""Stage 1's extra query groups, training only: Group DETR (Chen et al., ICCV 2023) and one-to-many matching.

Why: a DETR query gets a box and class gradient only when the Hungarian matching picks it, i.e. once per
target per image; on a small defect set that is too few positive signals for the decoder to learn in a CPU
budget. Group DETR adds G - 1 more sets of object queries that share every weight of the decoder and heads,
each matched one-to-one to the targets on its own and decoded without seeing the other groups, so a step gives
G times the positive supervision for the same encoder pass. At inference only the model's own queries exist:
the extra embeddings live here, beside the model, and are never saved, so the model stays a plain
`DetrForSegmentation`.

With `one_to_many = k > 1` the extra groups are matched to every target repeated k times instead, so k queries
of each group learn each object (H-DETR's hybrid branch, Jia et al., CVPR 2023): denser positives still, while
the model's own queries keep DETR's one-to-one matching, so inference needs no duplicate removal.

The groups are decoded in one decoder call with the groups stacked on the batch axis (memory and masks
repeated), which is exactly "no attention between groups" without an attention mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers import DetrForSegmentation


class QueryGroups(nn.Module):
    """`num_extra` more groups of `num_queries` object-query embeddings of width `d_model` (DETR's N(0, 1))."""

    def __init__(self, num_extra: int, num_queries: int, d_model: int) -> None:
        super().__init__()
        if num_extra < 1:
            raise ValueError(f"num_extra={num_extra}: expected at least one extra group")
        self.embeddings = nn.Parameter(torch.randn(num_extra, num_queries, d_model))

    @property
    def num_extra(self) -> int:
        return self.embeddings.shape[0]

    def decode(self, model: DetrForSegmentation, decoder_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Predictions of every extra group: one dict per group with `logits`, `pred_boxes`, `auxiliary_outputs`.

        `decoder_inputs` are the keyword arguments the model's own decoder call received (caught by
        `detr_forward.run_detector`): encoder output, its mask and position embeddings, one row per image.
        """
        groups, batch = self.num_extra, decoder_inputs["encoder_hidden_states"].shape[0]
        queries = self.embeddings.repeat_interleave(batch, dim=0)  # [G*B, Q, d], group-major
        repeated = {
            key: decoder_inputs[key].repeat(groups, *[1] * (decoder_inputs[key].dim() - 1))
            for key in ("encoder_hidden_states", "encoder_attention_mask", "spatial_position_embeddings")
        }
        decoded = model.detr.model.decoder(
            inputs_embeds=torch.zeros_like(queries), object_queries_position_embeddings=queries, **repeated
        )
        final = _heads(model, decoded.last_hidden_state)
        # As `run_detector`: the earlier layers' states (the last intermediate is the final layer's).
        hidden_layers = decoded.intermediate_hidden_states
        auxiliary = [_heads(model, hidden) for hidden in hidden_layers.unbind(0)[:-1]] if hidden_layers is not None else []
        outputs = []
        for g in range(groups):
            rows = slice(g * batch, (g + 1) * batch)
            outputs.append({
                "logits": final["logits"][rows],
                "pred_boxes": final["pred_boxes"][rows],
                "auxiliary_outputs": [{k: v[rows] for k, v in layer.items()} for layer in auxiliary],
            })
        return outputs


def repeat_targets(targets: Sequence[dict[str, Tensor]], times: int) -> list[dict[str, Tensor]]:
    """Every target's class and box listed `times` times (the one-to-many targets of the extra groups)."""
    if times == 1:
        return list(targets)
    return [
        {**target, "class_labels": target["class_labels"].repeat(times), "boxes": target["boxes"].repeat(times, 1)}
        for target in targets
    ]


def _heads(model: DetrForSegmentation, hidden: Tensor) -> dict[str, Tensor]:
    """DETR's class and box heads on decoder states [N, Q, d]."""
    return {
        "logits": model.detr.class_labels_classifier(hidden),
        "pred_boxes": model.detr.bbox_predictor(hidden).sigmoid(),
    }

"""Stage 2's starting mask head: query-specific masks from the first step, in a plain DetrForSegmentation."""

from __future__ import annotations

import torch

from hf_detr_seg.data.demo import DEMO_LABELS
from hf_detr_seg.detr_forward import run_detector, run_mask_head
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.mask_head_init import init_mask_head_from_decoder
from hf_detr_seg.modeling import build_model


def _query_spread(model) -> float:
    """Std of the mask logits across queries, averaged over pixels (0: every query gets the same mask)."""
    model.eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        detector = run_detector(model, pixels, torch.ones(2, 96, 96, dtype=torch.long))
        return run_mask_head(model, detector).std(1).mean().item()


def test_init_copies_the_cross_attention_and_makes_masks_query_specific():
    torch.manual_seed(0)
    model = build_model(LabelMap.from_dict(DEMO_LABELS), preset_overrides={"out_indices": [0, 1, 2, 3]})
    d_model = model.config.d_model
    attention_weights = model.mask_head.conv1.conv.weight[:, d_model:].clone()
    feature_weights = model.mask_head.conv1.conv.weight[:, :d_model].clone()
    before = _query_spread(model)

    init_mask_head_from_decoder(model, gain=1e4)
    cross = model.detr.model.decoder.layers[-1].encoder_attn
    assert torch.equal(model.bbox_attention.q_proj.weight, cross.q_proj.weight)
    assert torch.equal(model.bbox_attention.k_proj.bias, cross.k_proj.bias)
    assert torch.allclose(model.mask_head.conv1.conv.weight[:, d_model:], attention_weights * 1e4)
    assert torch.equal(model.mask_head.conv1.conv.weight[:, :d_model], feature_weights)
    after = _query_spread(model)
    assert before < 1e-4 and after > 100 * before, (before, after)

"""The model's panoptic prediction of a batch, with the mask head run for the kept queries only.

`DetrForSegmentation` runs its mask head for every query of every image (the FPN features are expanded per
query, so each query costs a pass of the mask head's convolutions at 1/4 of the input size), and
post-processing then throws away every query that does not pass the score threshold. Here the detector runs
first (`detr_forward.run_detector`); the queries that post-processing would keep are chosen by its own rule,
image by image with the very operations `post_process_panoptic` applies (softmax over the K+1 classes, max,
label not "no object", score > threshold); and the mask head runs for those (image, query) pairs only
(`detr_forward.run_mask_head` with indices: each query's mask is computed independently of the others).

Identical segments to running every query. The kept masks are written into a zero tensor of the full
[B, Q, h, w] shape, and post-processing runs on that, so it reads the kept queries' logits at the same positions
of a tensor of the same shape as the full path: PyTorch's vectorised and scalar sigmoid can differ in the last
bit, and which elements take which path depends on the tensor's shape (postprocess.py). The masks of queries
that are not kept are never read. What is left to chance is whether the mask head gives a query the same
logits in a batch of N kept queries as in a batch of B x Q; on this CPU it does bit for bit (tested), and the
zero tensor costs one sigmoid pass, nothing beside the convolutions it saves.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import DetrForSegmentation

from ..detr_forward import DetectorOutputs, run_detector, run_mask_head
from ..margin import add_margin, context_margin, crop_margin
from ..postprocess import PanopticPrediction, model_overlap_threshold, post_process_panoptic


def kept_queries(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, query index) of the queries `post_process_panoptic` keeps, in image then query order.

    Computed image by image on `logits[i : i + 1]`, as post-processing computes them, so that not even the
    last bit of a score can differ from the one it compares with the threshold.
    """
    no_object = logits.shape[-1] - 1
    images, queries = [], []
    for i in range(logits.shape[0]):
        scores, labels = F.softmax(logits[i : i + 1], dim=-1).max(-1)
        kept = (labels.ne(no_object) & (scores > threshold))[0].nonzero().squeeze(1)
        images.append(torch.full_like(kept, i))
        queries.append(kept)
    return torch.cat(images), torch.cat(queries)


def kept_mask_logits(model: DetrForSegmentation, detector: DetectorOutputs, threshold: float) -> torch.Tensor:
    """[B, Q, h, w] mask logits: the mask head's for the kept queries, zeros (never read) for the others."""
    batch, num_queries = detector.logits.shape[:2]
    images, queries = kept_queries(detector.logits, threshold)
    if images.numel() == 0:  # nothing kept: post-processing gives an empty map without reading a mask
        return detector.logits.new_zeros((batch, num_queries, 1, 1))
    kept = run_mask_head(model, detector, images, queries)
    masks = kept.new_zeros((batch, num_queries, *kept.shape[-2:]))
    masks[images, queries] = kept
    return masks


@torch.no_grad()
def predict_batch(
    model: DetrForSegmentation,
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    sizes: list[tuple[int, int]],
    target_sizes: list[tuple[int, int]],
    stuff_label_ids: set[int],
    threshold: float,
    kept_only: bool = True,
) -> tuple[list[PanopticPrediction], torch.Tensor, torch.Tensor]:
    """Panoptic predictions at `target_sizes`, cropping each image's padding off the mask logits first.

    `sizes`: each image's size in `pixel_values` before padding. The batch gets the model's margin first
    (`margin.py`), cropped off the mask logits with the padding. Segments are kept by the model's own overlap
    threshold (`postprocess.model_overlap_threshold`). `kept_only=False` runs the mask head for every
    query (the reference the kept path is tested against). Also returns the detector's logits and boxes (for
    box mAP).
    """
    margin = context_margin(model.config)
    overlap = model_overlap_threshold(model.config)
    pixel_values, pixel_mask = add_margin(pixel_values, pixel_mask, margin)
    detector = run_detector(model, pixel_values, pixel_mask)
    masks = kept_mask_logits(model, detector, threshold) if kept_only else run_mask_head(model, detector)
    scale = masks.shape[-2] / pixel_values.shape[-2]
    predictions = []
    for i, ((height, width), target) in enumerate(zip(sizes, target_sizes)):
        rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
        image_masks = crop_margin(masks[i : i + 1], margin, pixel_values.shape[-2], rows, cols)
        predictions += post_process_panoptic(
            detector.logits[i : i + 1], image_masks, [target], stuff_label_ids, threshold,
            overlap_mask_area_threshold=overlap,
        )
    return predictions, detector.logits, detector.pred_boxes

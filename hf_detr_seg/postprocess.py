"""Panoptic post-processing of `DetrForSegmentation` outputs, vectorised.

`post_process_panoptic` gives the segments of transformers 5's
`DetrImageProcessor.post_process_panoptic_segmentation(outputs, threshold, mask_threshold,
overlap_mask_area_threshold, label_ids_to_fuse=stuff_label_ids, target_sizes)` (the PIL processor's is the same
code), step for step, on the same float operations, so the maps are equal pixel for pixel:

1. class probabilities = softmax over all K+1 logits; each query's score and label are the max and argmax over
   all K+1 columns, "no object" included (not over the K real classes only);
2. a query is kept when its label is not "no object" and its score > `threshold` (strict);
3. mask probabilities = sigmoid of the kept queries' mask logits, upsampled to the target size (bilinear,
   `align_corners=False`; no resizing when no target size is given), then multiplied by the query's score;
4. each pixel goes to the kept query with the highest weighted probability (argmax, first query on ties);
5. a kept query k makes a segment when `area_k` (pixels it won) > 0, `original_k` (pixels where its *weighted*
   probability >= `mask_threshold`) > 0 and `area_k / original_k` (float32) > `overlap_mask_area_threshold`
   (strict); the pixels of a query that fails this are void;
6. segments are numbered from 1 in query order; every kept query of a label in `stuff_label_ids` joins the
   first segment of that label (`was_fused` is True for every stuff segment, fused or not); scores are the
   query's score rounded to 6 decimals.

Where transformers is slow we are not. transformers upsamples all kept queries of an image into one
[N, H, W] tensor, takes its argmax, then for every query compares the full-size argmax map with k, sums it,
thresholds and sums that query's map, and writes its pixels by boolean indexing. Here each kept query's map is
upsampled, weighted, counted and folded into a running argmax while it is still in cache (memory O(H x W)
instead of O(N x H x W)); the areas come from one `bincount` and the id map from one table lookup. Python
loops run only over the kept queries.

Deliberate differences from transformers (everything else is identical):
- Empty pixels are 0 (void, the COCO-panoptic convention) and the map is always int32. transformers also
  gives 0 to pixels won by a query that failed step 5, but when no query passes the threshold it returns a
  float map of -1.
- Segment ids are 1..N, one per segment, and `segments` has one entry per id. transformers appends a second
  entry (same id, the later query's score) each time a query joins a fused segment; we keep the first
  entry, i.e. the score of the segment's first query. And after a query joins an earlier fused segment,
  transformers numbers the next new segment from the fused segment's id + 1 (its counter is reset to the fused
  id), which can reuse a live id and merge two segments, even of different classes, under one id. Ours go on
  counting, so they equal transformers' on every image where it reuses no id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch.nn import functional as F

from .labels import LabelMap

# DETR's panoptic score threshold: the default of a model that does not carry its own.
DEFAULT_THRESHOLD = 0.85
# transformers' default share of its pixels a query must win to make a segment (step 5 above).
DEFAULT_OVERLAP_THRESHOLD = 0.8


def model_threshold(config: Any) -> float:
    """The score threshold a model was validated at: `score_threshold` in its config (training saves its
    `eval_threshold` there), else DETR's 0.85. How confident a DETR's correct detections are depends on how long
    and on what it was trained, so the threshold travels with the model rather than being one constant."""
    return float(getattr(config, "score_threshold", DEFAULT_THRESHOLD))


def model_overlap_threshold(config: Any) -> float:
    """The `overlap_mask_area_threshold` a model was validated at: its config's (training saves it there), else
    transformers' 0.8.

    The rule drops a query whose mask is mostly won by others, a duplicate of a stronger one. A thin structure
    fails it without being a duplicate: a crack's probability passes `mask_threshold` in a halo about as wide as
    the crack, where the surface wins every pixel, so it wins about half of its pixels and the whole segment is
    dropped. Models of thin classes therefore carry a lower threshold of their own.
    """
    return float(getattr(config, "overlap_mask_area_threshold", DEFAULT_OVERLAP_THRESHOLD))


@dataclass
class PanopticPrediction:
    """One image's panoptic prediction.

    `id_map`: int32 [H, W] segment ids, 0 = no segment (void). `segments`: one dict per id 1..N, in id order:
    {"id": int, "label_id": model class index, "score": float, "was_fused": bool (label is stuff)}.
    """

    id_map: Tensor
    segments: list[dict]


def post_process_panoptic(
    logits: Tensor,
    pred_masks: Tensor,
    target_sizes: Sequence[tuple[int, int]] | None,
    stuff_label_ids: Iterable[int],
    threshold: float = DEFAULT_THRESHOLD,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
) -> list[PanopticPrediction]:
    """Panoptic segments from `DetrForSegmentation` outputs (see the module docstring for the exact rules).

    `logits`: [B, Q, K+1] class logits (last column "no object"); `pred_masks`: [B, Q, h, w] mask logits;
    `target_sizes`: (height, width) per image, or None to keep the mask resolution; `stuff_label_ids`: model
    class indices fused into one segment per class. Works on the inputs' device, without gradients. Inputs
    must be finite (with NaN the pixels of a NaN map may go to another query than transformers gives them).
    """
    if logits.dim() != 3 or pred_masks.dim() != 4 or logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(
            f"expected logits [B, Q, K+1] and pred_masks [B, Q, h, w] with the same B and Q, got "
            f"{tuple(logits.shape)} and {tuple(pred_masks.shape)}"
        )
    batch_size = logits.shape[0]
    if target_sizes is not None and len(target_sizes) != batch_size:
        raise ValueError(f"target_sizes has {len(target_sizes)} entries for a batch of {batch_size}")
    no_object = logits.shape[-1] - 1
    stuff = frozenset(int(label) for label in stuff_label_ids)

    with torch.no_grad():
        # The sigmoid runs on the whole batch, as in transformers: PyTorch's vectorised and scalar sigmoid differ
        # in the last bit, and which elements take which path depends on the tensor's size, so the kept queries
        # alone would give probabilities (hence argmax ties) that are not bit for bit transformers'.
        mask_probs = pred_masks.sigmoid()
        scores, labels = F.softmax(logits, dim=-1).max(-1)  # [B, Q]; "no object" takes part in the max
        keep = labels.ne(no_object) & (scores > threshold)
        results = []
        for i in range(batch_size):
            size = tuple(int(s) for s in target_sizes[i]) if target_sizes is not None else None
            results.append(
                _image_segments(
                    mask_probs[i][keep[i]], scores[i][keep[i]], labels[i][keep[i]], size, stuff,
                    mask_threshold, overlap_mask_area_threshold,
                )
            )
    return results


def _image_segments(
    probs: Tensor,
    scores: Tensor,
    labels: Tensor,
    size: tuple[int, int] | None,
    stuff: frozenset[int],
    mask_threshold: float,
    overlap_mask_area_threshold: float,
) -> PanopticPrediction:
    """Segments of one image from its N kept queries: mask probabilities [N, h, w] (a copy, changed in place),
    scores [N], labels [N]."""
    height, width = size if size is not None else tuple(probs.shape[-2:])
    num_kept = probs.shape[0]
    if num_kept == 0:
        return PanopticPrediction(torch.zeros((height, width), dtype=torch.int32, device=probs.device), [])
    winner, original = _winner_map(probs, scores, (height, width), size is not None, mask_threshold)
    area = torch.bincount(winner, minlength=num_kept)  # int32 in: no int64 copy of the map
    # transformers divides two int64 counts (a float32 result) and compares its `.item()` (a Python float):
    # the comparison must be made in float64, or 4/5 > 0.8 would come out differently.
    ratio = (area / original).to(torch.float64)
    valid = (area > 0) & (original > 0) & (ratio > overlap_mask_area_threshold)
    segment_of_query, segments = _number_segments(valid.tolist(), labels.tolist(), scores.tolist(), stuff)
    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=probs.device)
    return PanopticPrediction(lookup.take(winner.long()).view(height, width), segments)  # one flat id lookup


def _winner_map(
    probs: Tensor, scores: Tensor, size: tuple[int, int], upsample: bool, mask_threshold: float
) -> tuple[Tensor, Tensor]:
    """The flat int32 map of the query that wins each pixel, and each query's `original_k` (pixels where its
    weighted probability >= `mask_threshold`).

    Query by query, on one full-size map at a time (it stays in cache, and memory is O(H x W), not
    O(N x H x W)): upsample, weight by the score, count `original_k`, and fold into a running argmax, with
    buffers reused across queries. Bilinear upsampling treats every channel alike, so one channel at a time
    gives transformers' values bit for bit. The running argmax keeps the first query on ties (a later one must
    be strictly greater), as `argmax` does: query k is written exactly where it beats every earlier one.
    """
    device = probs.device
    original = torch.empty(probs.shape[0], dtype=torch.int64, device=device)
    flags = torch.empty(size, dtype=torch.bool, device=device)
    winner = torch.zeros(size, dtype=torch.int32, device=device)
    best = None
    for k in range(probs.shape[0]):
        if upsample:
            weighted = F.interpolate(probs[k : k + 1, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        else:
            weighted = probs[k]
        weighted.mul_(scores[k])
        original[k] = torch.count_nonzero(torch.ge(weighted, mask_threshold, out=flags))
        if best is None:
            best = weighted
            continue
        winner.masked_fill_(torch.gt(weighted, best, out=flags), k)
        torch.maximum(best, weighted, out=best)
    return winner.view(-1), original


def _number_segments(
    valid: list[bool], labels: list[int], scores: list[float], stuff: frozenset[int]
) -> tuple[list[int], list[dict]]:
    """Each kept query's segment id (0: void) and the segments, numbered from 1 in query order; every valid
    query of a stuff label joins the first segment of that label."""
    segment_of_query = [0] * len(valid)
    segments: list[dict] = []
    fused_segment: dict[int, int] = {}
    for k, (is_valid, label, score) in enumerate(zip(valid, labels, scores)):
        if not is_valid:
            continue
        if label in fused_segment:
            segment_of_query[k] = fused_segment[label]
            continue
        segment_id = len(segments) + 1
        segment_of_query[k] = segment_id
        segments.append({"id": segment_id, "label_id": label, "score": round(score, 6), "was_fused": label in stuff})
        if label in stuff:
            fused_segment[label] = segment_id
    return segment_of_query, segments


def segments_to_coco(prediction: PanopticPrediction, label_map: LabelMap) -> list[dict]:
    """COCO-panoptic `segments_info` of a prediction: id, category_id, area, tight [x, y, w, h] bbox, score.

    Areas and boxes come from the id map (one `bincount`, one `find_objects`). A segment without pixels (which
    `post_process_panoptic` never makes) is left out, as COCO-panoptic has no empty segments.
    """
    id_map = prediction.id_map.detach().cpu().numpy().astype(np.int32, copy=False)
    max_id = max((s["id"] for s in prediction.segments), default=0)
    if max_id == 0:
        return []
    areas = np.bincount(id_map.ravel(), minlength=max_id + 1)
    boxes = ndimage.find_objects(id_map, max_label=max_id)
    info = []
    for segment in prediction.segments:
        segment_id = segment["id"]
        box = boxes[segment_id - 1]
        if box is None:
            continue
        rows, cols = box
        info.append(
            {
                "id": segment_id,
                "category_id": label_map.category_id(segment["label_id"]),
                "area": int(areas[segment_id]),
                "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
                "iscrowd": 0,
                "score": segment["score"],
            }
        )
    return info

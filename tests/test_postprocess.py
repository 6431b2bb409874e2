"""Panoptic post-processing: the same segments as transformers' `post_process_panoptic_segmentation`, faster.

The reference is transformers itself (`DetrImageProcessor().post_process_panoptic_segmentation`) on the same
outputs. Two of its behaviours we change on purpose (see `hf_detr_seg.postprocess`): -1 -> 0 for "nothing found",
and ids that never collide. The comparisons below therefore come in two kinds:
- without fusion, transformers' output must equal ours exactly (ids included);
- with fusion, ours must equal transformers' unfused output with each stuff label's segments joined, and must
  equal transformers' fused output itself on every image where transformers reuses no id.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DetrImageProcessor

from hf_detr_seg.data.panoptic import segment_stats
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.modeling import build_model
from hf_detr_seg.postprocess import (
    DEFAULT_OVERLAP_THRESHOLD,
    DEFAULT_THRESHOLD,
    PanopticPrediction,
    post_process_panoptic,
    segments_to_coco,
)
from hf_detr_seg.testing import transformers_reuses_ids

LABELS = LabelMap.from_dict(
    {
        "mask_format": "indexed",
        "classes": [
            {"name": "background", "isthing": False, "background": True},
            {"name": "crack", "isthing": True, "value": 1},
            {"name": "spalling", "isthing": True, "value": 2},
            {"name": "efflorescence", "isthing": False, "value": 3},
        ],
    }
)
STUFF = {i for i, c in enumerate(LABELS.classes) if not c.isthing}  # {0, 3}
NUM_CLASSES = LABELS.num_classes  # "no object" is column NUM_CLASSES
MODEL_SIZES = [(128, 160), (97, 121), (150, 200), (64, 80)]  # one target size per image, all different


# --------------------------------------------------------------------------------------------------- helpers
def reference(logits, masks, target_sizes, fuse, threshold, overlap=0.8):
    outputs = SimpleNamespace(logits=logits, pred_masks=masks)
    return DetrImageProcessor().post_process_panoptic_segmentation(
        outputs,
        threshold=threshold,
        mask_threshold=0.5,
        overlap_mask_area_threshold=overlap,
        label_ids_to_fuse=set(fuse),
        target_sizes=target_sizes,
    )


def void_zero(segmentation: torch.Tensor) -> torch.Tensor:
    """transformers' map with its -1 ("nothing found") as 0."""
    return torch.where(segmentation == -1, 0, segmentation).to(torch.int32)


def fused_reference(unfused: dict, stuff: set[int]) -> tuple[torch.Tensor, list[dict]]:
    """transformers' unfused result with each stuff label's segments joined, numbered 1..N in query order."""
    ids = [s["id"] for s in unfused["segments_info"]]
    assert ids == list(range(1, len(ids) + 1)), "unfused transformers ids are 1..M, one per valid query"
    lookup = torch.zeros(len(ids) + 1, dtype=torch.int32)
    first_of_label: dict[int, int] = {}
    segments: list[dict] = []
    for info in unfused["segments_info"]:
        label = info["label_id"]
        if label in stuff and label in first_of_label:
            lookup[info["id"]] = first_of_label[label]
            continue
        new_id = len(segments) + 1
        lookup[info["id"]] = new_id
        segments.append({"id": new_id, "label_id": label, "score": info["score"], "was_fused": label in stuff})
        if label in stuff:
            first_of_label[label] = new_id
    return lookup[void_zero(unfused["segmentation"]).long()], segments


def first_entry_per_id(segments_info: list[dict]) -> list[dict]:
    seen: dict[int, dict] = {}
    for info in segments_info:
        seen.setdefault(info["id"], info)
    return list(seen.values())


def assert_same(prediction: PanopticPrediction, id_map: torch.Tensor, segments: list[dict]) -> None:
    assert prediction.id_map.dtype == torch.int32
    assert prediction.id_map.shape == id_map.shape
    assert torch.equal(prediction.id_map, id_map.to(torch.int32))
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in prediction.segments] == [
        (s["id"], s["label_id"], s["was_fused"]) for s in segments
    ]
    for ours, theirs in zip(prediction.segments, segments):
        assert abs(ours["score"] - theirs["score"]) <= 1e-6
    present = set(torch.unique(prediction.id_map).tolist()) - {0}
    assert present == {s["id"] for s in prediction.segments}, "every segment has pixels, every id a segment"


def assert_refines(id_map: torch.Tensor, their_map: torch.Tensor) -> None:
    """Where transformers merged two segments under one reused id: the same void, and each of our segments
    inside one of theirs."""
    assert torch.equal(id_map == 0, their_map == 0)
    pairs = torch.unique(id_map.long() * (int(their_map.max()) + 1) + their_map.long())
    ours_ids = pairs // (int(their_map.max()) + 1)
    assert len(torch.unique(ours_ids)) == len(ours_ids), "one of our segments spans two of transformers'"


def compare_with_transformers(logits, masks, sizes, threshold) -> dict[str, int]:
    """Check ours against transformers (both kinds of comparison); count what happened on the way."""
    ours_unfused = post_process_panoptic(logits, masks, sizes, set(), threshold=threshold)
    ours = post_process_panoptic(logits, masks, sizes, STUFF, threshold=threshold)
    ref_unfused = reference(logits, masks, sizes, set(), threshold)
    ref_fused = reference(logits, masks, sizes, STUFF, threshold)
    ref_no_overlap_rule = reference(logits, masks, sizes, set(), threshold, overlap=0.0)
    counts = dict.fromkeys(["segments", "fused_queries", "overlap_dropped", "direct", "direct_fused", "reused"], 0)
    for i in range(len(sizes)):
        assert_same(ours_unfused[i], void_zero(ref_unfused[i]["segmentation"]), ref_unfused[i]["segments_info"])
        assert_same(ours[i], *fused_reference(ref_unfused[i], STUFF))
        info = ref_fused[i]["segments_info"]
        if transformers_reuses_ids(info):
            counts["reused"] += 1
        else:
            assert_same(ours[i], void_zero(ref_fused[i]["segmentation"]), first_entry_per_id(info))
            counts["direct"] += 1
            counts["direct_fused"] += len(info) > len(first_entry_per_id(info))
        counts["segments"] += len(ours[i].segments)
        counts["fused_queries"] += len(ref_unfused[i]["segments_info"]) - len(ours[i].segments)
        counts["overlap_dropped"] += len(ref_no_overlap_rule[i]["segments_info"]) - len(ref_unfused[i]["segments_info"])
    return counts


@pytest.fixture(scope="module")
def model_outputs(tmp_path_factory: pytest.TempPathFactory):
    """Outputs of a real tiny DetrForSegmentation on four random images (post-processed to `MODEL_SIZES`).

    A randomly initialised DETR gives the same class and mask to every query, which would test nothing. So the
    queries are fed distinct random decoder inputs, the class head is widened, and the mask head is made to draw
    each query's mask from its own attention map (image-feature paths zeroed, sharper attention, sparse output),
    as a trained model does. Empty weight caches keep the backbone random and the outputs fixed.
    """
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
        old_dir = torch.hub.get_dir()
        torch.hub.set_dir(str(root / "torch"))
        try:
            torch.manual_seed(0)
            model = build_model(LABELS, preset="tiny").eval()
        finally:
            torch.hub.set_dir(old_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.detr.class_labels_classifier.weight.normal_(0, 0.25, generator=generator)
        model.bbox_attention.q_proj.weight.normal_(0, 1.0, generator=generator)
        model.bbox_attention.k_proj.weight.normal_(0, 1.0, generator=generator)
        model.mask_head.conv1.conv.weight[:, : model.config.d_model] = 0
        for stage in model.mask_head.fpn_stages:
            stage.fpn_adapter.weight.zero_()
            stage.fpn_adapter.bias.zero_()
        model.mask_head.output_conv.weight.mul_(10)
        model.mask_head.output_conv.bias.fill_(-5)
        batch = len(MODEL_SIZES)
        queries = torch.randn(batch, model.config.num_queries, model.config.d_model, generator=generator)
        out = model(pixel_values=torch.randn(batch, 3, 128, 160, generator=generator), decoder_inputs_embeds=queries)
    return model, out.logits, out.pred_masks


def hand_logits(classes_and_scores: list[tuple[int, float]]) -> torch.Tensor:
    """[1, Q, K+1] logits whose softmax max is `score` at `class` for each query (score > 1/(K+1))."""
    rows = []
    for label, score in classes_and_scores:
        others = (1 - score) / NUM_CLASSES  # the rest spread evenly over the other K columns
        row = torch.full((NUM_CLASSES + 1,), float(np.log(others)))
        row[label] = float(np.log(score))
        rows.append(row)
    return torch.stack(rows)[None]


def hand_masks(regions: list[list[tuple[int, int, int, int]]], size: tuple[int, int]) -> torch.Tensor:
    """[1, Q, h, w] mask logits: +20 inside the union of each query's boxes (y0, y1, x0, x1), -20 outside.

    Note that every pixel goes to some query (the argmax), even where all masks are -20: there the query with
    the highest score wins, as in transformers. The layouts below cover the whole canvas to keep that aside.
    """
    masks = torch.full((len(regions), *size), -20.0)
    for q, boxes in enumerate(regions):
        for y0, y1, x0, x1 in boxes:
            masks[q, y0:y1, x0:x1] = 20.0
    return masks[None]


# --------------------------------------------------------------------------------------------------- model outputs
@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.6, DEFAULT_THRESHOLD])
def test_equals_transformers_on_tiny_model_outputs(model_outputs, threshold: float) -> None:
    _, logits, masks = model_outputs
    counts = compare_with_transformers(logits, masks, MODEL_SIZES, threshold)
    assert counts["direct"] + counts["reused"] == len(MODEL_SIZES)
    assert counts["segments"] > 0
    if threshold < 0.7:  # many queries kept: fusion and the overlap rule must really have been exercised
        assert counts["fused_queries"] > 0, counts
        assert counts["overlap_dropped"] > 0, counts
    if threshold == DEFAULT_THRESHOLD:  # fused segments compared with transformers' own fused output too
        assert counts["direct_fused"] > 0, counts


def test_without_target_sizes_keeps_mask_resolution(model_outputs) -> None:
    _, logits, masks = model_outputs
    ours = post_process_panoptic(logits, masks, None, set(), threshold=0.3)
    ref = reference(logits, masks, None, set(), 0.3)
    for prediction, theirs in zip(ours, ref):
        assert prediction.id_map.shape == masks.shape[-2:]
        assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])


def test_random_outputs_many_queries() -> None:
    """Q=100 random outputs, smooth masks, 3 images of different sizes (one shrunk below the mask size)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 100, NUM_CLASSES + 1, generator=generator) * 3
    masks = F.avg_pool2d(torch.randn(300, 1, 40, 48, generator=generator), 7, 1, 3).view(3, 100, 40, 48) * 30 - 8
    sizes = [(160, 192), (33, 47), (81, 50)]
    counts = compare_with_transformers(logits, masks, sizes, 0.3)
    assert counts["segments"] > 0 and counts["fused_queries"] > 0 and counts["overlap_dropped"] > 0, counts


# --------------------------------------------------------------------------------------------------- hand-made
def test_two_queries_of_one_stuff_class_fuse() -> None:
    # 16x16 masks upsampled to 32x32, vertical bands: background | crack | background over efflorescence.
    # The two background queries come first, so transformers' own ids are comparable (no id reuse).
    logits = hand_logits([(0, 0.9), (0, 0.92), (1, 0.95), (3, 0.97)])
    masks = hand_masks(
        [[(0, 16, 0, 5)], [(0, 12, 10, 16)], [(0, 16, 5, 10)], [(12, 16, 10, 16)]], (16, 16)
    )
    (prediction,) = post_process_panoptic(logits, masks, [(32, 32)], STUFF, threshold=0.85)
    (theirs,) = reference(logits, masks, [(32, 32)], STUFF, 0.85)
    assert len(theirs["segments_info"]) == 4  # transformers lists the joined query again under id 1
    assert_same(prediction, void_zero(theirs["segmentation"]), first_entry_per_id(theirs["segments_info"]))
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in prediction.segments] == [
        (1, 0, True), (2, 1, False), (3, 3, True)
    ]
    assert prediction.segments[0]["score"] == pytest.approx(0.9, abs=1e-6)  # the first query's score
    id_map = prediction.id_map
    assert id_map[2, 2] == 1 and id_map[2, 29] == 1  # both bands are the one background segment
    assert id_map[16, 15] == 2 and id_map[30, 28] == 3
    assert (id_map > 0).all()


def test_query_mostly_covered_by_others_is_dropped() -> None:
    # Spalling covers an 8x8 square; a crack with a higher score covers its left half: the spalling keeps 50% of
    # its pixels (not > 80%), so it makes no segment and its remaining pixels are void. Background around.
    around = [(0, 4, 0, 16), (12, 16, 0, 16), (4, 12, 0, 4), (4, 12, 12, 16)]
    logits = hand_logits([(2, 0.9), (1, 0.99), (0, 0.86)])
    masks = hand_masks([[(4, 12, 4, 12)], [(4, 12, 4, 8)], around], (16, 16))
    (prediction,) = post_process_panoptic(logits, masks, [(16, 16)], STUFF, threshold=0.85)
    (theirs,) = reference(logits, masks, [(16, 16)], STUFF, 0.85)
    assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
    assert [(s["id"], s["label_id"]) for s in prediction.segments] == [(1, 1), (2, 0)]
    assert (prediction.id_map[4:12, 4:8] == 1).all()
    assert (prediction.id_map[4:12, 8:12] == 0).all()
    assert int((prediction.id_map == 2).sum()) == 256 - 64
    # Covering 3 of the 8 columns (62.5% kept) still drops the spalling; covering 1 (87.5% kept) does not.
    for cover, kept in ((3, False), (1, True)):
        masks = hand_masks([[(4, 12, 4, 12)], [(4, 12, 4, 4 + cover)], around], (16, 16))
        (prediction,) = post_process_panoptic(logits, masks, [(16, 16)], STUFF, threshold=0.85)
        (theirs,) = reference(logits, masks, [(16, 16)], STUFF, 0.85)
        assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
        assert (2 in [s["label_id"] for s in prediction.segments]) is kept


def test_area_ratio_is_compared_as_transformers_does() -> None:
    # A crack of 5 pixels, 1 of them taken by a stronger crack: 4/5 is 0.8 exactly, but transformers divides in
    # float32 (0.800000012) and compares that with 0.8, so the segment stays. No resizing (target_sizes=None).
    logits = hand_logits([(1, 0.9), (1, 0.99)])
    masks = hand_masks([[(2, 3, 2, 7)], [(2, 3, 2, 3)]], (8, 8))
    (prediction,) = post_process_panoptic(logits, masks, None, STUFF, threshold=0.85)
    (theirs,) = reference(logits, masks, None, STUFF, 0.85)
    assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
    assert [s["label_id"] for s in prediction.segments] == [1, 1]
    assert int((prediction.id_map == 1).sum()) == 4


def test_boundaries_are_strict() -> None:
    # A score equal to the threshold does not pass; an area ratio equal to the overlap threshold does not either.
    logits = hand_logits([(1, 0.9), (2, 0.95), (0, 0.86)])
    masks = hand_masks([[(0, 16, 0, 8)], [(0, 16, 8, 16)], [(0, 16, 0, 16)]], (16, 16))
    threshold = float(logits.softmax(-1)[0, 0].max())  # exactly the first query's (float32) score
    (prediction,) = post_process_panoptic(logits, masks, [(16, 16)], STUFF, threshold=threshold)
    (theirs,) = reference(logits, masks, [(16, 16)], STUFF, threshold)
    assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
    assert [s["label_id"] for s in prediction.segments] == [2]  # the crack at exactly the threshold is out
    # Spalling square half covered by a stronger crack: ratio 0.5 exactly, with an overlap threshold of 0.5.
    around = [(0, 4, 0, 16), (12, 16, 0, 16), (4, 12, 0, 4), (4, 12, 12, 16)]
    logits = hand_logits([(2, 0.9), (1, 0.99), (0, 0.86)])
    masks = hand_masks([[(4, 12, 4, 12)], [(4, 12, 4, 8)], around], (16, 16))
    (prediction,) = post_process_panoptic(
        logits, masks, [(16, 16)], STUFF, threshold=0.85, overlap_mask_area_threshold=0.5
    )
    (theirs,) = reference(logits, masks, [(16, 16)], STUFF, 0.85, overlap=0.5)
    assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
    assert 2 not in [s["label_id"] for s in prediction.segments]


def test_a_thin_segment_whose_halo_another_query_wins_needs_a_lower_overlap_threshold() -> None:
    # A 3-px crack whose mask also claims a 1-px halo on each side (probability 0.73 x score 0.95 >= 0.5) that
    # the surface wins: it wins 3 of the 5 columns it claims, so transformers' 0.8 drops it and 0.5 keeps it.
    logits = hand_logits([(1, 0.95), (0, 0.99)])
    masks = hand_masks([[(0, 16, 6, 9)], [(0, 16, 0, 6), (0, 16, 9, 16)]], (16, 16))
    masks[0, 0, :, [5, 9]] = 1.0
    for overlap, kept in ((DEFAULT_OVERLAP_THRESHOLD, False), (0.5, True)):
        (prediction,) = post_process_panoptic(
            logits, masks, [(16, 16)], STUFF, threshold=0.85, overlap_mask_area_threshold=overlap
        )
        (theirs,) = reference(logits, masks, [(16, 16)], STUFF, 0.85, overlap=overlap)
        assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
        crack = [s["id"] for s in prediction.segments if s["label_id"] == 1]
        assert bool(crack) == kept
        assert (prediction.id_map[:, 6:9] == (crack[0] if kept else 0)).all()


def test_ties_go_to_the_first_query() -> None:
    # Two cracks with the same score and masks overlapping on columns 6..9: those pixels go to the first query
    # (argmax's first index), so the first keeps all its pixels and the second 6 of its 10 columns (dropped).
    logits = hand_logits([(1, 0.9), (1, 0.9)])
    masks = hand_masks([[(0, 16, 0, 10)], [(0, 16, 6, 16)]], (16, 16))
    (prediction,) = post_process_panoptic(logits, masks, [(16, 16)], STUFF, threshold=0.85)
    (theirs,) = reference(logits, masks, [(16, 16)], STUFF, 0.85)
    assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
    assert len(prediction.segments) == 1
    assert (prediction.id_map[:, :10] == 1).all() and not prediction.id_map[:, 10:].any()


def test_nothing_above_threshold_gives_all_void() -> None:
    logits = torch.cat([hand_logits([(1, 0.6), (NUM_CLASSES, 0.99)]), hand_logits([(0, 0.8), (3, 0.84)])])
    masks = torch.cat([hand_masks([[(0, 8, 0, 8)], [(0, 8, 0, 8)]], (8, 8))] * 2)
    sizes = [(20, 30), (7, 9)]
    ours = post_process_panoptic(logits, masks, sizes, STUFF, threshold=0.85)
    ref = reference(logits, masks, sizes, STUFF, 0.85)
    for prediction, theirs, size in zip(ours, ref, sizes):
        assert prediction.segments == [] and theirs["segments_info"] == []
        assert prediction.id_map.dtype == torch.int32 and prediction.id_map.shape == size
        assert not prediction.id_map.any()
        assert (theirs["segmentation"] == -1).all()  # transformers: a float map of -1


def test_no_object_wins_even_below_a_real_class_threshold() -> None:
    # Scores are the max over all K+1 columns: a query whose top column is "no object" is dropped even when a
    # real class alone would pass a low threshold.
    logits = hand_logits([(NUM_CLASSES, 0.5)])
    logits[0, 0, 1] = float(np.log(0.4))  # crack 0.4, no object 0.5 (before renormalising)
    masks = hand_masks([[(0, 8, 0, 8)]], (8, 8))
    (prediction,) = post_process_panoptic(logits, masks, [(8, 8)], STUFF, threshold=0.2)
    (theirs,) = reference(logits, masks, [(8, 8)], STUFF, 0.2)
    assert prediction.segments == [] and theirs["segments_info"] == []


def test_ids_never_collide_where_transformers_reuses_one() -> None:
    # Queries: background, crack, background (joins segment 1), spalling. transformers resets its counter to 1
    # at the third query and gives the spalling id 2, the crack's id; ours gives it 3.
    logits = hand_logits([(0, 0.9), (1, 0.95), (0, 0.92), (2, 0.96)])
    masks = hand_masks([[(0, 8, 0, 8)], [(0, 8, 8, 16)], [(8, 16, 0, 8)], [(8, 16, 8, 16)]], (16, 16))
    (prediction,) = post_process_panoptic(logits, masks, [(16, 16)], STUFF, threshold=0.85)
    (theirs,) = reference(logits, masks, [(16, 16)], STUFF, 0.85)
    assert transformers_reuses_ids(theirs["segments_info"]), "transformers no longer reuses ids: revisit postprocess docs"
    assert theirs["segmentation"][4, 12] == theirs["segmentation"][12, 12] == 2  # crack and spalling merged
    assert [(s["id"], s["label_id"]) for s in prediction.segments] == [(1, 0), (2, 1), (3, 2)]
    assert prediction.id_map[4, 4] == prediction.id_map[12, 4] == 1
    assert prediction.id_map[4, 12] == 2 and prediction.id_map[12, 12] == 3
    (unfused,) = reference(logits, masks, [(16, 16)], set(), 0.85)
    assert_same(prediction, *fused_reference(unfused, STUFF))


def test_sigmoid_runs_on_the_whole_batch_as_in_transformers() -> None:
    """PyTorch's vectorised and scalar sigmoid can differ in the last bit, and which elements take the scalar path
    depends on the tensor's size. transformers takes the sigmoid of all queries at once; taking it of the kept
    queries alone would put the last pixel of the last kept query on the other path. Here that one ulp decides
    which of two equal cracks wins a pixel, so a kept-only sigmoid would give another answer."""
    # Kept: crack B (pixel P only), background C (everything but P), crack A (P only, same logits as B);
    # not kept: D. 3 x 9 x 19 = 513 elements: P, the last, is the scalar tail of a kept-only sigmoid.
    logits = hand_logits([(1, 0.9), (0, 0.95), (1, 0.9), (NUM_CLASSES, 0.9)])
    score = logits.softmax(-1)[0, 0].max()
    xs = torch.linspace(0.3, 3.0, 20001)
    vector, scalar = xs.sigmoid(), torch.stack([xs, xs], 1)[:, 0].sigmoid()  # contiguous vs strided path
    chosen = None
    for x in xs[(scalar > vector).nonzero().squeeze(1)].tolist():
        masks = torch.full((1, 4, 9, 19), -20.0)
        masks[0, 1] = 20.0
        masks[0, :3, 8, 18] = torch.tensor([x, -20.0, x])
        whole = masks.sigmoid()[0, 2, 8, 18] * score
        kept_only = masks[0, :3].sigmoid()[2, 8, 18] * score
        if kept_only > whole >= 0.5:
            chosen = masks
            break
    if chosen is None:
        pytest.skip("on this CPU the vectorised and scalar sigmoid agree on every candidate")
    (prediction,) = post_process_panoptic(logits, chosen, None, STUFF, threshold=0.85)
    (theirs,) = reference(logits, chosen, None, STUFF, 0.85)
    assert_same(prediction, void_zero(theirs["segmentation"]), theirs["segments_info"])
    assert [s["label_id"] for s in prediction.segments] == [1, 0] and prediction.id_map[8, 18] == 1  # B, not A


def test_one_channel_upsampling_equals_batched() -> None:
    """The implementation upsamples one query at a time; transformers all of an image's queries at once."""
    probs = torch.rand(7, 37, 53, generator=torch.Generator().manual_seed(5))
    for size in [(301, 417), (20, 31), (37, 53)]:
        batched = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
        single = torch.cat(
            [F.interpolate(one[None, None], size=size, mode="bilinear", align_corners=False)[0] for one in probs]
        )
        assert torch.equal(batched, single)


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same B and Q"):
        post_process_panoptic(torch.zeros(1, 3, 5), torch.zeros(1, 4, 8, 8), [(8, 8)], STUFF)
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_panoptic(torch.zeros(2, 3, 5), torch.zeros(2, 3, 8, 8), [(8, 8)], STUFF)


# --------------------------------------------------------------------------------------------------- COCO
def test_segments_to_coco_areas_and_tight_boxes() -> None:
    id_map = torch.zeros(10, 12, dtype=torch.int32)
    id_map[2:5, 3:8] = 1  # 3 rows x 5 cols
    id_map[9, 0] = 2  # one pixel in the corner
    id_map[0:10, 11] = 3
    id_map[6, 4] = 3  # a stuff segment in two pieces
    segments = [
        {"id": 1, "label_id": 1, "score": 0.91, "was_fused": False},
        {"id": 2, "label_id": 2, "score": 0.87, "was_fused": False},
        {"id": 3, "label_id": 3, "score": 0.99, "was_fused": True},
        {"id": 4, "label_id": 1, "score": 0.9, "was_fused": False},  # no pixels: left out
    ]
    info = segments_to_coco(PanopticPrediction(id_map, segments), LABELS)
    assert info == [
        {"id": 1, "category_id": LABELS.category_id(1), "area": 15, "bbox": [3, 2, 5, 3], "iscrowd": 0, "score": 0.91},
        {"id": 2, "category_id": LABELS.category_id(2), "area": 1, "bbox": [0, 9, 1, 1], "iscrowd": 0, "score": 0.87},
        {"id": 3, "category_id": LABELS.category_id(3), "area": 11, "bbox": [4, 0, 8, 10], "iscrowd": 0, "score": 0.99},
    ]
    assert all(type(v) is int for entry in info for v in [entry["id"], entry["area"], *entry["bbox"]])
    assert segments_to_coco(PanopticPrediction(torch.zeros(4, 4, dtype=torch.int32), []), LABELS) == []


def test_segments_to_coco_agrees_with_dataset_stats(model_outputs) -> None:
    _, logits, masks = model_outputs
    for prediction in post_process_panoptic(logits, masks, MODEL_SIZES, STUFF, threshold=0.3):
        stats = segment_stats(prediction.id_map.numpy())
        info = segments_to_coco(prediction, LABELS)
        assert {e["id"]: (e["area"], tuple(e["bbox"])) for e in info} == stats
        assert [e["category_id"] for e in info] == [LABELS.category_id(s["label_id"]) for s in prediction.segments]


# --------------------------------------------------------------------------------------------------- timing
def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def test_timing_against_transformers(model_outputs, capsys: pytest.CaptureFixture) -> None:
    """Printed, not asserted: batch 8, 800x800 targets, threshold 0.85, stuff fused (the project's settings)."""
    model, _, _ = model_outputs
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # 256x256 inputs: 64x64 masks, upsampled to 800x800 as a real image's would be
        queries = torch.randn(8, model.config.num_queries, model.config.d_model, generator=generator)
        out = model(pixel_values=torch.randn(8, 3, 256, 256, generator=generator), decoder_inputs_embeds=queries)
    random_logits = torch.randn(8, 100, NUM_CLASSES + 1, generator=generator) * 3
    random_masks = F.avg_pool2d(torch.randn(800, 1, 200, 200, generator=generator), 9, 1, 4).view(8, 100, 200, 200)
    random_masks = random_masks * 60 - 20
    sizes = [(800, 800)] * 8
    lines = []
    for name, logits, masks in (("tiny model, Q=20", out.logits, out.pred_masks), ("random, Q=100", random_logits,
                                                                                    random_masks)):
        ours, t_ours = _timed(lambda: post_process_panoptic(logits, masks, sizes, STUFF, threshold=DEFAULT_THRESHOLD))
        theirs, t_theirs = _timed(lambda: reference(logits, masks, sizes, STUFF, DEFAULT_THRESHOLD))
        for prediction, ref in zip(ours, theirs):  # same answer at full size too
            if transformers_reuses_ids(ref["segments_info"]):
                assert_refines(prediction.id_map, void_zero(ref["segmentation"]))
            else:
                assert_same(prediction, void_zero(ref["segmentation"]), first_entry_per_id(ref["segments_info"]))
        scores, labels = logits.softmax(-1).max(-1)
        kept = int(((labels != NUM_CLASSES) & (scores > DEFAULT_THRESHOLD)).sum())
        segments = sum(len(p.segments) for p in ours)
        lines.append(
            f"post-process {name}, masks {tuple(masks.shape[-2:])} -> 800x800, batch 8, {kept} queries kept, "
            f"{segments} segments: "
            f"transformers {t_theirs * 1000:.0f} ms, ours {t_ours * 1000:.0f} ms, x{t_theirs / t_ours:.1f}"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))

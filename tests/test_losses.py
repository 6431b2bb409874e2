"""Tests for the project's DETR criterion (`hf_detr_seg.losses`).

The reference is transformers' own DETR segmentation loss (`ForSegmentationLoss` -> `ImageLoss`), called on the
same inputs with integer weights; the faster paths (matched-only masks, chunked mask terms) are tested on loss
values and gradients against the reference path.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers.loss.loss_for_object_detection as hf_loss
from transformers import DetrConfig

from hf_detr_seg.losses import (
    DetrCriterion,
    LossWeights,
    _num_boxes,
    dice_per_mask,
    focal_per_mask,
    matched_query_index,
    skeleton_recall_per_mask,
    skeleton_targets,
)

K, Q, H, W = 3, 6, 32, 40  # classes, queries, padded target size; predicted masks at 1/4: 8 x 10
ALL_TERMS = ("labels", "boxes", "masks", "cardinality")


def _boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """Valid normalised (cx, cy, w, h) boxes."""
    wh = 0.1 + 0.4 * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([centre, wh], dim=1)


def _batch(counts=(3, 2), sizes=None, num_aux: int = 2, seed: int = 0, grad: bool = False):
    """Random model outputs and targets; `sizes` gives each image's (unpadded) mask size."""
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or [(H, W)] * len(counts)
    batch = len(counts)

    def leaf(*shape: int, sigmoid: bool = False) -> torch.Tensor:
        value = torch.randn(*shape, generator=gen)
        value = value.sigmoid() * 0.5 + 0.25 if sigmoid else value
        return value.requires_grad_(grad)

    outputs = {
        "logits": leaf(batch, Q, K + 1),
        "pred_boxes": leaf(batch, Q, 4, sigmoid=True),
        "pred_masks": leaf(batch, Q, H // 4, W // 4),
        "auxiliary_outputs": [
            {"logits": leaf(batch, Q, K + 1), "pred_boxes": leaf(batch, Q, 4, sigmoid=True)} for _ in range(num_aux)
        ],
    }
    targets = [
        {
            "class_labels": torch.randint(0, K, (n,), generator=gen),
            "boxes": _boxes(n, gen),
            "masks": torch.rand(n, h, w, generator=gen) > 0.6,
        }
        for n, (h, w) in zip(counts, sizes)
    ]
    return outputs, targets


def _transformers_loss(outputs: dict, targets: list[dict], config: DetrConfig):
    """transformers' DetrForSegmentation loss on the same tensors (its aux inputs stack all decoder layers)."""
    aux = outputs["auxiliary_outputs"]
    outputs_class = torch.stack([a["logits"] for a in aux] + [outputs["logits"]])
    outputs_coord = torch.stack([a["pred_boxes"] for a in aux] + [outputs["pred_boxes"]])
    loss, loss_dict, _ = hf_loss.ForSegmentationLoss(
        outputs["logits"],
        targets,
        "cpu",
        outputs["pred_boxes"],
        outputs["pred_masks"],
        config,
        outputs_class,
        outputs_coord,
    )
    return loss, loss_dict


# ------------------------------------------------------------------------------- equality with transformers
@pytest.mark.parametrize(
    "counts,sizes",
    [((3, 2), None), ((4, 0), [(H, W), (H - 5, W - 9)])],  # second: an empty image and unequal mask sizes
    ids=["same-size", "empty-image-unequal-sizes"],
)
def test_equals_transformers_detr_loss(counts, sizes) -> None:
    config = DetrConfig(
        num_labels=K,
        auxiliary_loss=True,
        decoder_layers=3,
        class_cost=2,
        bbox_cost=3,
        giou_cost=1,
        bbox_loss_coefficient=4,
        giou_loss_coefficient=3,
        mask_loss_coefficient=2,
        dice_loss_coefficient=3,
        eos_coefficient=0.2,
    )
    weights = LossWeights(bbox_weight=4, giou_weight=3, mask_weight=2, dice_weight=3, eos_coef=0.2)
    criterion = DetrCriterion(K, weights, losses=ALL_TERMS, matcher_costs=(2, 3, 1))
    outputs, targets = _batch(counts, sizes)

    ours = criterion(outputs, targets)
    ref_loss, ref_dict = _transformers_loss(outputs, targets, config)

    assert set(ours) == set(ref_dict) | {"loss"}
    assert {"loss_ce_1", "loss_bbox_1", "loss_giou_1", "loss_mask", "loss_dice"} <= set(ours)
    for name, value in ref_dict.items():
        assert ours[name].item() == pytest.approx(value.item(), abs=1e-5), name
    assert ours["loss"].item() == pytest.approx(ref_loss.item(), abs=1e-5)


def test_per_mask_focal_and_dice_sum_to_transformers_on_binary_targets() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5, 7, 9, generator=gen)
    targets = (torch.rand(5, 7, 9, generator=gen) > 0.5).float()
    for alpha, gamma in [(0.25, 2.0), (0.6, 1.0), (-1.0, 2.0)]:
        ours = focal_per_mask(logits, targets, alpha=alpha, gamma=gamma).sum() / 2.5
        ref = hf_loss.sigmoid_focal_loss(logits.flatten(1), targets.flatten(1), 2.5, alpha=alpha, gamma=gamma)
        assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    ref_dice = hf_loss.dice_loss(logits, targets.flatten(1), 2.5)
    assert (dice_per_mask(logits, targets).sum() / 2.5).item() == pytest.approx(ref_dice.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- weights, terms
def test_total_is_weighted_sum_with_float_weights_and_aux_terms() -> None:
    weights = LossWeights(class_weight=0.5, bbox_weight=2.5, giou_weight=1.5, mask_weight=0.3, dice_weight=0.7,
                          skeleton_weight=0.4)
    criterion = DetrCriterion(K, weights, losses=ALL_TERMS, mask_loss="focal+dice+skeleton")
    outputs, targets = _batch()
    out = criterion(outputs, targets)
    base = weights.term_weights()
    expected = sum(
        base[name if name in base else name.rsplit("_", 1)[0]] * value for name, value in out.items() if name != "loss"
    )
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "loss_mask_0" not in out and "loss_ce_0" in out and "cardinality_error_1" in out
    assert set(base) <= set(out)
    no_aux = criterion({k: v for k, v in outputs.items() if k != "auxiliary_outputs"}, targets)
    assert not any(name.endswith("_0") for name in no_aux)


def test_eos_coef_weights_no_object() -> None:
    outputs, targets = _batch()
    low = DetrCriterion(K, LossWeights(eos_coef=0.1), losses=("labels",))(outputs, targets)["loss_ce"]
    high = DetrCriterion(K, LossWeights(eos_coef=1.0), losses=("labels",))(outputs, targets)["loss_ce"]
    assert low.item() != pytest.approx(high.item(), rel=1e-3)


@pytest.mark.parametrize("mask_loss,keys", [("focal", {"loss_mask"}), ("dice", {"loss_dice"})])
def test_mask_loss_selection(mask_loss: str, keys: set[str]) -> None:
    outputs, targets = _batch()
    both = DetrCriterion(K, losses=("masks",), mask_loss="focal+dice")(outputs, targets)
    weights = LossWeights(mask_weight=3.0, dice_weight=5.0)
    one = DetrCriterion(K, weights, losses=("masks",), mask_loss=mask_loss)(outputs, targets)
    assert set(one) == keys | {"loss"}
    (key,) = keys
    assert one[key].item() == pytest.approx(both[key].item(), abs=1e-7)
    assert one["loss"].item() == pytest.approx(weights.term_weights()[key] * both[key].item(), rel=1e-6)


def test_skeleton_recall_counts_gaps_and_not_width() -> None:
    """A 4-px crack 50 px long: a 4-px gap costs skeleton recall about 4/50, drawing it 2 px wider each side
    costs nothing; dice, which counts pixels, has it the other way round."""
    target = torch.zeros(1, 40, 60)
    target[0, 18:22, 5:55] = 1
    exact = target * 20 - 10
    gap, wide = exact.clone(), exact.clone()
    gap[0, :, 28:32] = -10
    wide[0, 16:24, 5:55] = 10
    skeletons = skeleton_targets(target)
    assert skeletons.sum() > 0 and bool((skeletons <= target).all())  # the thickened skeleton lies inside
    recall = {name: skeleton_recall_per_mask(logits, skeletons).item()
              for name, logits in (("exact", exact), ("gap", gap), ("wide", wide))}
    assert recall["exact"] == pytest.approx(0, abs=1e-3) and recall["wide"] == pytest.approx(0, abs=1e-3)
    assert 0.05 < recall["gap"] < 0.12
    assert dice_per_mask(gap, target).item() < dice_per_mask(wide, target).item()


def test_skeleton_term_joins_focal_and_dice_unchanged() -> None:
    outputs, targets = _batch()
    plain = DetrCriterion(K, losses=("masks",))(outputs, targets)
    weights = LossWeights(skeleton_weight=2.0)
    with_skeleton = DetrCriterion(K, weights, losses=("masks",), mask_loss="focal+dice+skeleton")(outputs, targets)
    assert set(with_skeleton) == {"loss_mask", "loss_dice", "loss_skeleton", "loss"}
    for term in ("loss_mask", "loss_dice"):
        assert with_skeleton[term].item() == pytest.approx(plain[term].item(), rel=1e-6)
    assert 0 < with_skeleton["loss_skeleton"].item()
    expected = plain["loss"].item() + 2.0 * with_skeleton["loss_skeleton"].item()
    assert with_skeleton["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_invalid_options_are_named() -> None:
    with pytest.raises(ValueError, match="mask_loss"):
        DetrCriterion(K, mask_loss="bce")
    with pytest.raises(ValueError, match="losses"):
        DetrCriterion(K, losses=("labels", "mask"))
    outputs, targets = _batch()
    with pytest.raises(ValueError, match="num_classes"):
        DetrCriterion(K + 1, losses=("labels",))(outputs, targets)
    with pytest.raises(ValueError, match="matched queries"):
        DetrCriterion(K, losses=("masks",))({**outputs, "pred_masks": outputs["pred_masks"][0]}, targets)


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("term", ["labels", "boxes", "masks"])
def test_gradients_flow_only_to_what_is_used(term: str) -> None:
    outputs, targets = _batch(grad=True)
    criterion = DetrCriterion(K, losses=(term,))
    indices = criterion.match(outputs["logits"], outputs["pred_boxes"], targets)
    criterion(outputs, targets, indices)["loss"].backward()

    used = {"labels": "logits", "boxes": "pred_boxes", "masks": "pred_masks"}[term]
    for name in ("logits", "pred_boxes", "pred_masks"):
        assert (outputs[name].grad is not None) == (name == used), name
    grad = outputs[used].grad.flatten(2).abs().sum(-1)  # [B, Q]
    matched = torch.zeros(grad.shape, dtype=torch.bool)
    matched[matched_query_index(indices)] = True
    if term == "labels":
        assert (grad > 0).all()  # every query is classified (unmatched as no-object)
    else:
        assert (grad[matched] > 0).all() and (grad[~matched] == 0).all()
    aux_grads = [a[k].grad for a in outputs["auxiliary_outputs"] for k in ("logits", "pred_boxes")]
    if term == "masks":
        assert all(g is None for g in aux_grads)  # no aux masks, and the matching itself has no gradient
    else:
        assert sum(g is not None for g in aux_grads) == 2


# ------------------------------------------------------------------------------------------ normalisation
def _fake_distributed(monkeypatch: pytest.MonkeyPatch, other_rank_boxes: float, world_size: int = 2) -> list:
    """Pretend torch.distributed runs `world_size` processes; all_reduce adds the other ranks' boxes."""
    ops: list = []

    def all_reduce(tensor: torch.Tensor, op=None, **_: object) -> None:
        ops.append(op)
        tensor.add_(other_rank_boxes)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world_size)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return ops


def test_num_boxes_single_process() -> None:
    _, targets = _batch((3, 2))
    assert _num_boxes(targets, "cpu").item() == 5
    _, empty = _batch((0, 0))
    assert _num_boxes(empty, "cpu").item() == 1  # clamped


def test_num_boxes_sums_over_processes_and_divides_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _, targets = _batch((3, 0))
    ops = _fake_distributed(monkeypatch, other_rank_boxes=5)
    assert _num_boxes(targets, "cpu").item() == 4  # (3 + 5) / 2
    assert ops == [torch.distributed.ReduceOp.SUM]
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.add_(0))
    _, empty = _batch((0, 0))
    assert _num_boxes(empty, "cpu").item() == 1  # (0 + 0) / 2 clamped


def test_distributed_normalisation_differs_from_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 processes holding 3 and 5 boxes DETR divides by 4; transformers' ImageLoss divides by 2."""
    outputs, targets = _batch((3, 0), num_aux=0)
    criterion = DetrCriterion(K, losses=("boxes",))
    single = criterion(outputs, targets)["loss_bbox"].item()  # num_boxes = 3

    _fake_distributed(monkeypatch, other_rank_boxes=5)
    ours = criterion(outputs, targets)["loss_bbox"].item()
    assert ours == pytest.approx(single * 3 / 4, rel=1e-6)

    class FakeState:  # accelerate's PartialState as ImageLoss sees it: initialised, 2 processes
        _shared_state = {"initialised": True}
        num_processes = 2

    monkeypatch.setattr(hf_loss, "PartialState", FakeState)
    monkeypatch.setattr(hf_loss, "reduce", lambda t: (t + 5) / 2)  # accelerate's default reduction: mean
    matcher = hf_loss.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    image_loss = hf_loss.ImageLoss(matcher, num_classes=K, eos_coef=0.1, losses=["boxes"])
    theirs = image_loss(outputs, targets)["loss_bbox"].item()
    assert theirs == pytest.approx(2 * ours, rel=1e-6)  # (3+5)/2/2 = 2 instead of 4


# ----------------------------------------------------------------------------- matched-only and given indices
def test_matched_only_pred_masks_equal_full() -> None:
    outputs, targets = _batch((3, 2), grad=True)
    criterion = DetrCriterion(K, losses=("labels", "boxes", "masks"))
    indices = criterion.match(outputs["logits"], outputs["pred_boxes"], targets)
    head_output = outputs["pred_masks"]  # stands in for what the mask head would compute per query

    full = criterion(outputs, targets, indices)
    (full_grad,) = torch.autograd.grad(full["loss"], head_output)
    matched = head_output[matched_query_index(indices)]
    assert matched.shape == (5, H // 4, W // 4)
    only = criterion({**outputs, "pred_masks": matched}, targets, indices)
    (only_grad,) = torch.autograd.grad(only["loss"], head_output)

    for name in full:
        assert only[name].item() == pytest.approx(full[name].item(), abs=1e-6), name
    torch.testing.assert_close(only_grad, full_grad)


def test_given_indices_are_used() -> None:
    outputs, targets = _batch((3, 2), num_aux=0)
    criterion = DetrCriterion(K, losses=("labels", "boxes", "masks"))
    indices = criterion.match(outputs["logits"], outputs["pred_boxes"], targets)
    auto = criterion(outputs, targets)
    given = criterion(outputs, targets, indices)
    assert all(given[k].item() == auto[k].item() for k in auto)
    shifted = [((src + 1) % Q, tgt) for src, tgt in indices]  # another valid matching
    other = criterion(outputs, targets, shifted)
    assert other["loss"].item() > auto["loss"].item()  # Hungarian matching minimises the cost, not the loss,
    # but a shifted matching of random boxes is worse on these seeds; mostly this proves `indices` is used


# ------------------------------------------------------------------------------------------ chunked mask terms
def _saved_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the bytes of every tensor autograd saved for the backward pass while it ran
    (a deterministic proxy of the memory a loss holds between forward and backward)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, total


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 4])
def test_chunked_mask_terms_equal_one_piece(rows_per_chunk: int) -> None:
    """Chunks of 1, 2 or 4 masks (crossing image borders, an empty image, unequal sizes) give the same terms and
    the same gradient as computing every matched mask at once."""
    outputs, targets = _batch((3, 0, 4), sizes=[(H, W), (H, W), (H - 5, W - 9)], grad=True)
    whole = DetrCriterion(K, losses=("masks",), mask_loss="focal+dice+skeleton")
    chunked = DetrCriterion(K, losses=("masks",), mask_loss="focal+dice+skeleton",
                            mask_chunk_pixels=rows_per_chunk * H * W)
    indices = whole.match(outputs["logits"], outputs["pred_boxes"], targets)
    assert len(chunked._mask_chunks(targets, indices, (H, W))) == math.ceil(7 / rows_per_chunk)
    assert len(whole._mask_chunks(targets, indices, (H, W))) == 1

    results = {}
    for name, criterion in (("whole", whole), ("chunked", chunked)):
        losses = criterion(outputs, targets, indices)
        (grad,) = torch.autograd.grad(losses["loss"], outputs["pred_masks"])
        results[name] = (losses, grad)
    for term in ("loss_mask", "loss_dice", "loss_skeleton", "loss"):
        assert results["chunked"][0][term].item() == pytest.approx(results["whole"][0][term].item(), rel=1e-6), term
    torch.testing.assert_close(results["chunked"][1], results["whole"][1], rtol=1e-5, atol=1e-8)
    assert results["whole"][1].abs().sum() > 0


def test_chunked_mask_terms_equal_transformers_and_hold_less_memory() -> None:
    """At 8 masks of 128 x 160 px, chunks of one mask match transformers' loss and keep < 1/4 of the bytes its
    backward pass holds (the full path keeps every upsampled mask's intermediates)."""
    big_h, big_w = 4 * H, 4 * W
    outputs, targets = _batch((5, 3), sizes=[(big_h, big_w)] * 2, num_aux=0, grad=True)
    outputs["pred_masks"] = torch.randn(2, Q, big_h // 4, big_w // 4, requires_grad=True)
    config = DetrConfig(num_labels=K, auxiliary_loss=False)
    chunked = DetrCriterion(K, losses=("labels", "boxes", "masks"), mask_chunk_pixels=big_h * big_w)

    ours, ours_bytes = _saved_bytes(lambda: chunked(outputs, targets))
    (ref_loss, ref_dict), ref_bytes = _saved_bytes(
        lambda: hf_loss.ForSegmentationLoss(outputs["logits"], targets, "cpu", outputs["pred_boxes"],
                                            outputs["pred_masks"], config)[:2])
    for term in ("loss_mask", "loss_dice"):
        assert ours[term].item() == pytest.approx(ref_dict[term].item(), rel=1e-5), term
    (ours_grad,) = torch.autograd.grad(ours["loss_mask"] + ours["loss_dice"], outputs["pred_masks"])
    (ref_grad,) = torch.autograd.grad(ref_dict["loss_mask"] + ref_dict["loss_dice"], outputs["pred_masks"])
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-9)
    assert ours_bytes < ref_bytes / 4, (ours_bytes, ref_bytes)


def test_mask_chunk_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="mask_chunk_pixels"):
        DetrCriterion(K, mask_chunk_pixels=0)


# --------------------------------------------------------------------------------------------- empty targets
@pytest.mark.parametrize("counts", [(2, 0), (0, 0)], ids=["one-empty", "all-empty"])
def test_empty_targets_give_finite_loss(counts) -> None:
    outputs, targets = _batch(counts, grad=True)
    criterion = DetrCriterion(K, losses=ALL_TERMS)
    out = criterion(outputs, targets)
    assert all(math.isfinite(v.item()) for v in out.values())
    out["loss"].backward()
    assert torch.isfinite(outputs["logits"].grad).all()
    indices = criterion.match(outputs["logits"], outputs["pred_boxes"], targets)
    matched = outputs["pred_masks"][matched_query_index(indices)]
    assert matched.shape[0] == sum(counts)
    only = criterion({**outputs, "pred_masks": matched}, targets, indices)
    assert only["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-6)
    if sum(counts) == 0:
        assert out["loss_bbox"].item() == 0 and out["loss_mask"].item() == 0 and out["loss_ce"].item() > 0


def test_loss_weights_is_frozen_dataclass() -> None:
    weights = LossWeights()
    with pytest.raises(dataclasses.FrozenInstanceError):
        weights.eos_coef = 0.5  # type: ignore[misc]
    assert dataclasses.replace(weights, eos_coef=0.5).eos_coef == 0.5

"""Stage 2's detector cache: the same losses and gradients as running the frozen detector, without running it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from hf_detr_seg.config import TrainConfig
from hf_detr_seg.data.panoptic import load_dataset_label_map
from hf_detr_seg.data.training_data import PanopticDetrDataset, collate_fn
from hf_detr_seg.detector_cache import DetectorCache
from hf_detr_seg.detr_forward import run_detector
from hf_detr_seg.errors import UserInputError
from hf_detr_seg.modeling import build_model, set_trainable
from hf_detr_seg.steps import Stage2Step, build_criterion

IMAGE_SIZE = 96


@pytest.fixture(scope="module")
def setup(dataset: Path):
    """A tiny model with its mask head trainable (stage 2) and the demo training images (all 96 x 96)."""
    label_map = load_dataset_label_map(dataset)
    torch.manual_seed(0)
    model = build_model(label_map, preset="tiny")
    set_trainable(model, Stage2Step.TRAINABLE)
    data = PanopticDetrDataset(dataset, "train", IMAGE_SIZE)
    return model, label_map, data


def _step(model, label_map, cache: DetectorCache | None = None) -> Stage2Step:
    config = TrainConfig(stage=2, image_size=IMAGE_SIZE, augment=cache is None)
    step = Stage2Step(model, build_criterion(config, label_map.num_classes), detector_cache=cache)
    return step.train()


def _loss_and_grads(step: Stage2Step, batch: dict) -> tuple[dict, list[torch.Tensor]]:
    step.model.zero_grad(set_to_none=True)
    losses = step(batch["pixel_values"], batch["pixel_mask"], batch["labels"])
    losses["loss"].backward()
    return losses, [p.grad.clone() for p in step.model.parameters() if p.requires_grad]


@pytest.fixture
def detector_runs(setup):
    """The batch size of every run of the detector's backbone while a test runs."""
    model = setup[0]
    sizes: list[int] = []
    hook = model.detr.model.backbone.register_forward_hook(lambda _m, inputs, _o: sizes.append(len(inputs[0])))
    yield sizes
    hook.remove()


@pytest.mark.parametrize("margin", [0, 16])
def test_cached_batches_equal_the_detector_and_skip_it(setup, detector_runs: list[int], margin: int,
                                                       monkeypatch) -> None:
    """Images cached from two batches, then met in a third batch of another composition: the same losses and
    mask-head gradients as the uncached path, and the detector does not run again; with a margin too (the
    cache keeps it and its mask around each image)."""
    model, label_map, data = setup
    monkeypatch.setattr(model.config, "context_margin", margin, raising=False)
    cache = DetectorCache(max_bytes=2**30)
    cached, plain = _step(model, label_map, cache), _step(model, label_map)
    first = collate_fn([data[i] for i in (0, 1, 2)])
    ours, our_grads = _loss_and_grads(cached, first)  # computed, then cached
    theirs, their_grads = _loss_and_grads(plain, first)
    assert ours["loss"].item() == pytest.approx(theirs["loss"].item(), rel=1e-6)
    _loss_and_grads(cached, collate_fn([data[i] for i in (3, 4, 5)]))
    assert len(cache) == 6 and cache.nbytes > 0 and detector_runs == [3, 3, 3]

    mixed = collate_fn([data[i] for i in (4, 0, 5, 2)])
    ours, our_grads = _loss_and_grads(cached, mixed)
    assert detector_runs == [3, 3, 3], "the detector ran for images that were all cached"
    theirs, their_grads = _loss_and_grads(plain, mixed)
    for term in ("loss_mask", "loss_dice", "loss"):
        assert ours[term].item() == pytest.approx(theirs[term].item(), rel=1e-6), term
    assert theirs["loss_mask"].item() > 0
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_the_detector_runs_on_the_uncached_images_only(setup, detector_runs: list[int]) -> None:
    """A batch mixing cached and new images runs the detector on the new ones alone, and gives the losses and
    gradients of the uncached path."""
    model, label_map, data = setup
    cache = DetectorCache(max_bytes=2**30)
    step = _step(model, label_map, cache)
    _loss_and_grads(step, collate_fn([data[0], data[1]]))
    mixed = collate_fn([data[5], data[1], data[6], data[0]])  # 5 and 6 are new
    ours, our_grads = _loss_and_grads(step, mixed)
    assert detector_runs == [2, 2] and len(cache) == 4
    theirs, their_grads = _loss_and_grads(_step(model, label_map), mixed)
    assert ours["loss"].item() == pytest.approx(theirs["loss"].item(), rel=1e-6)
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)
    _loss_and_grads(step, collate_fn([data[6], data[0]]))
    assert detector_runs == [2, 2, 4]


def test_images_of_other_sizes_are_cropped_and_padded_again(setup) -> None:
    """An image smaller than its batch-mate is cached at its own extent and zero-padded in a later batch; the
    larger image, unpadded in both batches, gives exactly the maps the detector computes."""
    model, label_map, data = setup
    small = data[1]
    small = {
        "pixel_values": small["pixel_values"][:, :64, :80],
        "labels": {**small["labels"], "masks": small["labels"]["masks"][:, :64, :80]},
    }
    cache = DetectorCache(max_bytes=2**30)
    step = _step(model, label_map, cache)
    _loss_and_grads(step, collate_fn([data[0], small]))
    batch = collate_fn([small, data[0]])
    inputs, indices = cache(model, step.criterion, batch["pixel_values"], batch["pixel_mask"], batch["labels"])
    with torch.no_grad():
        detector = run_detector(model, batch["pixel_values"], batch["pixel_mask"])
    for name in ("memory", "memory_mask", "projected_features"):
        ours, theirs = getattr(inputs, name), getattr(detector, name)
        assert ours.shape == theirs.shape, name
        torch.testing.assert_close(ours[1], theirs[1], msg=name)  # the large image
        assert not ours[0, ..., -1, -1].any(), name  # the small image's padding: zeros
    for ours, theirs in zip(inputs.fpn_features, detector.fpn_features):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours[1], theirs[1])
    losses, _ = _loss_and_grads(step, batch)
    assert torch.isfinite(losses["loss"]) and len(indices) == 2


def test_a_full_cache_stops_growing_and_says_so(setup, detector_runs: list[int],
                                                caplog: pytest.LogCaptureFixture) -> None:
    model, label_map, data = setup
    probe = DetectorCache(max_bytes=2**30)
    _loss_and_grads(_step(model, label_map, probe), collate_fn([data[0]]))
    cache = DetectorCache(max_bytes=int(2.5 * probe.nbytes))
    step = _step(model, label_map, cache)
    with caplog.at_level(logging.WARNING, logger="hf_detr_seg.detector_cache"):
        _loss_and_grads(step, collate_fn([data[i] for i in range(4)]))
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert "detector cache full at 2 images" in caplog.text
    _loss_and_grads(step, collate_fn([data[i] for i in range(4)]))
    assert detector_runs == [1, 4, 2]  # the probe, then all four, then the two that did not fit


def test_targets_without_image_id_are_refused(setup) -> None:
    model, label_map, data = setup
    batch = collate_fn([data[0]])
    batch["labels"] = [{k: v for k, v in t.items() if k != "image_id"} for t in batch["labels"]]
    with pytest.raises(ValueError, match="image_id"):
        _step(model, label_map, DetectorCache(max_bytes=2**30))(
            batch["pixel_values"], batch["pixel_mask"], batch["labels"])


def test_config_refuses_the_cache_where_it_would_be_wrong() -> None:
    with pytest.raises(UserInputError, match="--augment false"):
        TrainConfig(stage=2, cache_detector_outputs=True, augment=True)
    with pytest.raises(UserInputError, match="only stage 2"):
        TrainConfig(stage=1, cache_detector_outputs=True, augment=False)
    with pytest.raises(UserInputError, match="--detector_cache_gib"):
        TrainConfig(stage=2, cache_detector_outputs=True, augment=False, detector_cache_gib=0)
    assert TrainConfig(stage=2, cache_detector_outputs=True, augment=False).cache_detector_outputs

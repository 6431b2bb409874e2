"""The mask head for the kept queries only: the same segments as running it for every query, for less work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from test_inference import IMAGE_SIZE, QUERY_BOOST, QUERY_CLASSES, photo, query_patterns

from hf_detr_seg.data.demo import DEMO_LABELS
from hf_detr_seg.data.training_data import collate_fn, to_pixel_values
from hf_detr_seg.inference import DefectSegmenter, predict_batch
from hf_detr_seg.inference.forward import kept_queries
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.postprocess import DEFAULT_OVERLAP_THRESHOLD, DEFAULT_THRESHOLD
from hf_detr_seg.testing import crafted_queries

SURFACE = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", LabelMap.from_dict(DEMO_LABELS), IMAGE_SIZE)


@pytest.fixture
def steered(model_dir: Path):
    """A segmenter whose queries differ (test_inference's pattern) and a count of the maps the mask head made."""
    segmenter = DefectSegmenter.from_pretrained(model_dir, device="cpu", tile_size=64, tile_overlap=0.25,
                                                batch_size=3)
    boost = torch.nn.functional.one_hot(torch.tensor(QUERY_CLASSES), 6) * torch.tensor(QUERY_BOOST)[:, None]
    maps = []
    counter = segmenter.model.mask_head.register_forward_hook(lambda m, a, out: maps.append(out.shape[0]))
    with crafted_queries(segmenter.model, boost, query_patterns):
        yield segmenter, maps
    counter.remove()


def segments(result) -> list[tuple]:
    return [(s.id, s.label_id, s.score, s.area, s.bbox) for s in result.segments]


def test_the_kept_queries_are_those_post_processing_keeps():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, 6, generator=generator) * 4
    images, queries = kept_queries(logits, DEFAULT_THRESHOLD)
    scores, labels = logits.softmax(-1).max(-1)
    expected = ((labels != 5) & (scores > DEFAULT_THRESHOLD)).nonzero()
    assert 0 < len(expected) < 4 * 30
    assert torch.equal(torch.stack([images, queries], 1), expected)


def test_a_padded_batch_gives_the_full_paths_segments_for_a_fraction_of_the_maps(steered):
    segmenter, maps = steered
    arrays = [photo(64, 90, seed=1), photo(70, 64, seed=2), photo(64, 64, seed=3)]  # padded to 70 x 90
    batch = collate_fn([{"pixel_values": to_pixel_values(a), "labels": None} for a in arrays])
    sizes = [a.shape[:2] for a in arrays]
    targets = [(a.shape[0] * 2, a.shape[1] * 2) for a in arrays]  # upsampled, as a photo's would be
    args = (segmenter.model, batch["pixel_values"], batch["pixel_mask"], sizes, targets, {SURFACE}, 0.85)
    full, full_logits, full_boxes = predict_batch(*args, kept_only=False)
    kept, logits, boxes = predict_batch(*args)
    assert maps == [3 * 20, 3 * 8]  # every query, then the 8 the threshold keeps (query 9 is below it)
    assert torch.equal(logits, full_logits) and torch.equal(boxes, full_boxes)
    for mine, reference in zip(kept, full):
        assert torch.equal(mine.id_map, reference.id_map)
        assert mine.segments == reference.segments
    assert sum(len(p.segments) for p in kept) >= 3 * 6


def test_tiled_photos_and_whole_images_batched_together_equal_the_full_path(steered):
    segmenter, maps = steered
    images = [photo(150, 230, seed=4), photo(60, 50, seed=5), photo(130, 96, seed=6)]
    kept = list(segmenter.predict_many(images))
    kept_maps = sum(maps)
    segmenter.kept_only = False
    maps.clear()
    full = list(segmenter.predict_many(images))
    assert kept_maps * 2 < sum(maps)
    for mine, reference in zip(kept, full):
        np.testing.assert_array_equal(mine.id_map, reference.id_map)
        assert segments(mine) == segments(reference)
    assert len(kept[0].segments) > 3 and sum(s.label_id == SURFACE for s in kept[0].segments) == 1


def test_nothing_kept_runs_no_mask_head(model_dir: Path):
    segmenter = DefectSegmenter.from_pretrained(model_dir, device="cpu", threshold=0.99)
    maps = []
    counter = segmenter.model.mask_head.register_forward_hook(lambda m, a, out: maps.append(out.shape[0]))
    try:
        result = segmenter(photo(50, 70))
    finally:
        counter.remove()
    assert maps == [] and result.segments == [] and not result.id_map.any()
    assert result.id_map.shape == (50, 70)


def test_segments_are_kept_by_the_models_own_overlap_threshold(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Post-processing gets the model config's `overlap_mask_area_threshold`, transformers' 0.8 without one."""
    from hf_detr_seg.inference import forward

    seen = []
    real = forward.post_process_panoptic

    def recording(*args, **kwargs):
        seen.append(kwargs["overlap_mask_area_threshold"])
        return real(*args, **kwargs)

    monkeypatch.setattr(forward, "post_process_panoptic", recording)
    segmenter = DefectSegmenter.from_pretrained(model_dir, device="cpu")
    segmenter(photo(64, 64, seed=1))
    segmenter.model.config.overlap_mask_area_threshold = 0.25
    segmenter(photo(64, 64, seed=1))
    assert seen == [DEFAULT_OVERLAP_THRESHOLD, 0.25]

"""Size-grouped training batches: sizes known before loading, every sample once, less padding, seeded order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hf_detr_seg.data.batching import SizeGroupedBatchSampler
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.training_data import PanopticDetrDataset, collate_fn
from hf_detr_seg.data.transforms import AugmentConfig

LABELS = Path(__file__).resolve().parents[1] / "recipes/configs/deepcrack-cpu-labels.yaml"
TURNS = AugmentConfig(rotate90_prob=0.5)
EVERYTHING = AugmentConfig(rotate90_prob=0.5, crop_prob=0.8, blur_prob=0.5, jpeg_prob=0.5)


@pytest.fixture(scope="module")
def crops(deepcrack_sample: Path, tmp_path_factory) -> Path:
    """The 40 real DeepCrack val crops (all landscape) as one train split, with the DeepCrack recipe's labels."""
    out = tmp_path_factory.mktemp("crops") / "ds"
    build_dataset(deepcrack_sample / "val/images", deepcrack_sample / "val/masks", LABELS, out, val_fraction=0,
                  progress=False)
    return out


def _dataset(root: Path, config: AugmentConfig | None, epoch: int = 0) -> PanopticDetrDataset:
    data = PanopticDetrDataset(root, "train", 64, augment=config is not None, seed=5, augment_config=config)
    data.set_epoch(epoch)
    return data


@pytest.mark.parametrize("config", [None, AugmentConfig(), TURNS, EVERYTHING], ids=["fixed", "default", "turns",
                                                                                     "everything"])
def test_output_size_is_the_size_of_the_loaded_sample(crops: Path, config: AugmentConfig | None):
    for epoch in (0, 1):
        data = _dataset(crops, config, epoch)
        for index in range(0, len(data), 3):
            assert data.output_size(index) == tuple(data[index]["labels"]["size"].tolist()), (epoch, index)


def _padded_pixels(data: PanopticDetrDataset, batches: list[list[int]]) -> int:
    sizes = [data.output_size(i) for i in range(len(data))]
    return sum(len(b) * max(sizes[i][0] for i in b) * max(sizes[i][1] for i in b) for b in batches)


def test_grouped_batches_hold_every_sample_once_and_pad_less_than_a_shuffle(crops: Path):
    data = _dataset(crops, TURNS)
    sampler = SizeGroupedBatchSampler(data, batch_size=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10
    assert sorted(i for batch in batches for i in batch) == list(range(len(data)))
    portrait = [[np.subtract(*data.output_size(i)) > 0 for i in batch] for batch in batches]
    assert sum(len(set(flags)) > 1 for flags in portrait) <= 1  # only where the sorted sizes turn portrait
    assert 0 < sum(any(flags) for flags in portrait) < len(batches)  # the turns made both orientations
    shuffled = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [shuffled[start:start + 4] for start in range(0, len(data), 4)]
    assert _padded_pixels(data, batches) < 0.8 * _padded_pixels(data, plain)


def test_the_order_follows_seed_and_epoch_and_drop_last_keeps_full_batches(crops: Path):
    first = list(SizeGroupedBatchSampler(_dataset(crops, TURNS, epoch=3), batch_size=6))
    again = list(SizeGroupedBatchSampler(_dataset(crops, TURNS, epoch=3), batch_size=6))
    other_epoch = list(SizeGroupedBatchSampler(_dataset(crops, TURNS, epoch=4), batch_size=6))
    assert first == again
    assert first != other_epoch
    assert sorted(len(batch) for batch in first) == [4] + [6] * 6
    sampler = SizeGroupedBatchSampler(_dataset(crops, TURNS, epoch=3), batch_size=6, drop_last=True)
    kept = list(sampler)
    assert len(kept) == len(sampler) == 6 and all(len(batch) == 6 for batch in kept)


def test_grouped_batches_collate_to_their_samples(crops: Path):
    data = _dataset(crops, TURNS)
    loader = torch.utils.data.DataLoader(data, batch_sampler=SizeGroupedBatchSampler(data, 4), collate_fn=collate_fn)
    for indices, batch in zip(SizeGroupedBatchSampler(data, 4), loader):
        heights, widths = zip(*(data.output_size(i) for i in indices))
        assert tuple(batch["pixel_values"].shape[2:]) == (max(heights), max(widths))
        assert [int(t["image_id"]) for t in batch["labels"]] == [data.records[i].image_id for i in indices]


def test_batch_size_must_be_positive(crops: Path):
    with pytest.raises(ValueError, match="batch_size"):
        SizeGroupedBatchSampler(_dataset(crops, None), batch_size=0)

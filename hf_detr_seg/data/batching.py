"""Training batches of images of similar size, so that padding to the batch's largest image costs little.

A batch is padded to its tallest and its widest image. With scale jitter and crops the images of a shuffled
batch differ in size, and when landscape and portrait images meet (photos taken both ways, or quarter-turn
augmentation) every image is padded to a square on the longer side: on DeepCrack's 181 x 128 crops with quarter
turns, a shuffled batch holds 1.86x the pixels of its images, and the step is about as much slower. Grouping
samples of similar size cuts that to about 1.1x. It is the idea of 🤗 Trainer's `group_by_length`
(`LengthGroupedSampler`: shuffle, cut into megabatches of 50 batches, sort each by length) and of detectron2's
aspect-ratio grouping, with each sample's size known before its image is read
(`PanopticDetrDataset.output_size` replays the geometry's random draws). The sampler stays an ordinary batch
sampler: accelerate can shard it over processes and skip its first batches when a run resumes.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from .training_data import PanopticDetrDataset

MEGABATCH_BATCHES = 50  # 🤗 Trainer's megabatch_mult: the larger, the closer the sizes and the less random


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose samples share an orientation and have close heights and widths.

    Each epoch: shuffle the samples, cut them into megabatches of `MEGABATCH_BATCHES` batches, sort each
    megabatch by (portrait, height, width), cut it into batches and shuffle their order. Only the last
    megabatch can end in a short batch, so an epoch has as many batches as an ungrouped one (`len`). The order
    depends only on the dataset's seed and epoch (`set_epoch`, which the training loop calls), as its
    augmentation does: a resumed run sees the same batches.
    """

    def __init__(self, dataset: PanopticDetrDataset, batch_size: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.dataset.seed, self.dataset.epoch])
        order = rng.permutation(len(self.dataset)).tolist()
        megabatch = MEGABATCH_BATCHES * self.batch_size
        for start in range(0, len(order), megabatch):
            batches = self._batches(order[start:start + megabatch])
            for position in rng.permutation(len(batches)):
                yield batches[position]

    def _batches(self, indices: list[int]) -> list[list[int]]:
        """`indices` sorted by size and cut into batches (the short one dropped when `drop_last`)."""
        sizes = {index: self.dataset.output_size(index) for index in indices}
        indices = sorted(indices, key=lambda index: (sizes[index][0] > sizes[index][1], *sizes[index]))
        batches = [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

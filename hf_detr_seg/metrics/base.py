"""The evaluator seam, in the shape of detectron2's `DatasetEvaluator`: `reset`, `process(batch, predictions)`
once per batch, `compute` at the end.

`evaluate_model` predicts a batch and hands the same pair to every evaluator: `batch`, what the dataset says of
each image (`ImageInput`), and `predictions`, what the model said (`ImageOutput`). Each evaluator turns that
pair into what its metric reads, so the prediction loop knows no metric and a metric knows no model.

An evaluator keeps one small record per image (its metric's per-image statistics) tagged with the image's
position in the split. `gather` collects the records of every process (`accelerate launch ... evaluate`) and
puts them back in the split's order, so the sums (PQ's IoU sums are floats) are added in one order and the
scores equal a one-process run's to the last bit. `ImageRecords` is that bookkeeping alone; the writer of
`evaluate --save-predictions` keeps its per-image annotations with it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from ..postprocess import PanopticPrediction
    from ..processes import Processes


@dataclass
class ImageInput:
    """One image of the evaluated split, as its annotation gives it."""

    index: int  # position in the split: gathered records are put back in this order
    image_id: int
    file_name: str  # of the gt panoptic PNG
    height: int  # original size, which predictions are made at
    width: int
    segments: list[dict]  # the gt `segments_info` (id, category_id, iscrowd, bbox)
    id_map: np.ndarray | None = None  # the gt panoptic id map; None when only boxes are scored


@dataclass
class ImageOutput:
    """One image's prediction: the detector's outputs and, unless only boxes are scored, the panoptic one."""

    logits: torch.Tensor  # [Q, K + 1] class logits, the last "no object"
    boxes: torch.Tensor  # [Q, 4] normalised (cx, cy, w, h)
    panoptic: PanopticPrediction | None = None

    def panoptic_ids(self) -> np.ndarray:
        """The panoptic prediction's segment-id map as a numpy array (0 = no segment)."""
        return self.panoptic.id_map.cpu().numpy().astype(np.uint32)


class Accumulator(Protocol):
    """A metric fed one image's statistics at a time (`PanopticQuality`, `BoxMAP`, `SemanticScores`)."""

    def reset(self) -> None: ...

    def add(self, record: Any) -> None: ...

    def compute(self) -> dict[str, Any]: ...


class ImageRecords(ABC):
    """One record per image of a split, put back in the split's order when gathered from several processes.

    A subclass says what an image's (input, prediction) pair leaves behind (`image_record`).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every image processed so far."""
        self._records: list[tuple[int, Any]] = []

    def process(self, batch: Sequence[ImageInput], predictions: Sequence[ImageOutput]) -> None:
        """Add one batch: its images and their predictions, in the same order."""
        if len(batch) != len(predictions):
            raise ValueError(f"{len(batch)} images but {len(predictions)} predictions")
        for image, prediction in zip(batch, predictions):
            self._records.append((image.index, self.image_record(image, prediction)))

    def gather(self, processes: Processes) -> None:
        """Every process's records, in the split's order, on every process (a no-op in one process)."""
        self._records = sorted(processes.gather(self._records), key=lambda record: record[0])

    def records(self) -> list[Any]:
        """The records, in the order of their images in the split (after `gather`, of every process)."""
        return [record for _, record in self._records]

    @abstractmethod
    def image_record(self, image: ImageInput, prediction: ImageOutput) -> Any:
        """One image's record: small and picklable (records travel between processes)."""


class Evaluator(ImageRecords):
    """Scores predictions batch by batch: `reset`, `process(batch, predictions)`, `gather`, `compute`.

    A subclass says how one image's (input, prediction) pair becomes its metric's per-image statistics
    (`image_record`); the statistics are added to `metric` in the split's order when the scores are asked for.
    """

    def __init__(self, metric: Accumulator) -> None:
        self.metric = metric
        super().__init__()

    def compute(self) -> dict[str, Any]:
        """The scores of every image processed (after `gather`, of every process's)."""
        self.metric.reset()
        for record in self.records():
            self.metric.add(record)
        return self.metric.compute()

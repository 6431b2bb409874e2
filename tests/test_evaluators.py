"""The evaluator seam (`hf_detr_seg.metrics.base`): every evaluator turns the one (images, predictions) pair
into its metric's inputs, and records gathered from several processes score as one process's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_detr_seg.labels import LabelMap
from hf_detr_seg.metrics import (
    BoxEvaluator,
    ImageInput,
    ImageOutput,
    PanopticEvaluator,
    PanopticQuality,
    SemanticEvaluator,
    SemanticScores,
)
from hf_detr_seg.postprocess import PanopticPrediction
from hf_detr_seg.testing import random_panoptic_pair

LABELS = LabelMap.from_dict({"classes": [
    {"name": "surface", "isthing": False, "background": True},
    {"name": "crack", "isthing": False},
    {"name": "spalling", "isthing": True},
]})
CATEGORIES = {c.category_id: {"name": c.name, "isthing": int(c.isthing)} for c in LABELS.classes}
NO_DETECTIONS = {"logits": torch.zeros(1, LABELS.num_classes + 1), "boxes": torch.full((1, 4), 0.5)}


def random_images(count: int, seed: int = 0) -> list[tuple]:
    """(gt ids, gt segments, pred ids, pred segments with category ids) of random images."""
    rng = np.random.default_rng(seed)
    return [random_panoptic_pair(rng, CATEGORIES, (24, 32), first_pred_ids=(1,)) for _ in range(count)]


def as_evaluator_inputs(pairs: list[tuple]) -> tuple[list[ImageInput], list[ImageOutput]]:
    """The pairs as `evaluate_model` hands them over: gt as annotated, predictions with model class indices."""
    images, outputs = [], []
    for index, (gt, gt_segments, pred, pred_segments) in enumerate(pairs):
        height, width = gt.shape
        images.append(ImageInput(index, 100 + index, f"{index}.png", height, width, gt_segments, gt))
        segments = [{"id": s["id"], "label_id": LABELS.index_of_category(s["category_id"])} for s in pred_segments]
        panoptic = PanopticPrediction(torch.from_numpy(pred.astype(np.int32)), segments)
        outputs.append(ImageOutput(**NO_DETECTIONS, panoptic=panoptic))
    return images, outputs


def processed(evaluator, images: list[ImageInput], outputs: list[ImageOutput], batch_size: int = 2):
    evaluator.reset()
    for start in range(0, len(images), batch_size):
        evaluator.process(images[start : start + batch_size], outputs[start : start + batch_size])
    return evaluator


def class_map(ids: np.ndarray, segments: list[dict]) -> np.ndarray:
    """Class index per pixel, -1 where no segment (written out, not `class_map_from_segments`)."""
    out = np.full(ids.shape, -1, dtype=np.int64)
    for s in segments:
        out[ids == s["id"]] = LABELS.index_of_category(s["category_id"])
    return out


def test_panoptic_and_semantic_evaluators_score_as_their_metrics():
    pairs = random_images(7)
    images, outputs = as_evaluator_inputs(pairs)
    pq = PanopticQuality(CATEGORIES)
    semantic = SemanticScores(3, thing_classes=[1, 2], tolerance=1, class_names=LABELS.names)
    for gt, gt_segments, pred, pred_segments in pairs:
        pq.update(gt, gt_segments, pred, pred_segments)
        semantic.update(class_map(gt, gt_segments), class_map(pred, pred_segments))
    assert processed(PanopticEvaluator(LABELS), images, outputs).compute() == pq.compute()
    expected = semantic.compute()
    assert expected["per_class"]["spalling"]["gt_pixels"] > 0 and 0 < expected["miou"] < 1
    result = processed(SemanticEvaluator(LABELS, tolerance=1), images, outputs).compute()
    assert result == {"miou": expected["miou"], "per_class": expected["per_class"]}


def test_box_evaluator_reads_detr_boxes_and_gt_bboxes():
    """Normalised (cx, cy, w, h) queries on the gt boxes score mAP 1 at the image's own size; crowds are left
    out of the gt, and a class-less query ('no object' wins) is a low-scored detection."""
    height, width = 60, 100
    segments = [
        {"id": 1, "category_id": 2, "iscrowd": 0, "bbox": [10, 5, 30, 20]},  # crack, class 1
        {"id": 2, "category_id": 3, "iscrowd": 0, "bbox": [50, 30, 40, 24]},  # spalling, class 2
        {"id": 3, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 8, 8]},
    ]
    boxes = torch.tensor([[(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                          for x, y, w, h in (s["bbox"] for s in segments[:2])] + [[0.5, 0.5, 0.2, 0.2]])
    logits = torch.full((3, 4), -5.0)
    logits[0, 1] = logits[1, 2] = logits[2, 3] = 5.0
    image = ImageInput(0, 1, "a.png", height, width, segments)
    evaluator = BoxEvaluator(LABELS)
    evaluator.process([image], [ImageOutput(logits, boxes)])
    assert evaluator.compute() == {"bbox_map": pytest.approx(1.0), "bbox_map_50": pytest.approx(1.0)}
    evaluator.reset()
    assert evaluator.compute() == {"bbox_map": -1.0, "bbox_map_50": -1.0}  # no image: nothing to find


class TwoProcesses:
    """`Processes.gather` as two processes' all-gather: each hands in its records; the second to gather
    (process 1) gets both, process 0's first, as `torch.distributed.all_gather_object` gives them."""

    def __init__(self) -> None:
        self.parts: list[list] = []

    def gather(self, records: list) -> list:
        self.parts.append(records)
        return [record for part in self.parts for record in part]


def add_detections(images: list[ImageInput], outputs: list[ImageOutput]) -> None:
    """gt boxes for the images' segments, and 5 queries per image: jittered gt boxes of the gt class, then
    random ones."""
    generator = torch.Generator().manual_seed(0)
    for image, output in zip(images, outputs):
        image.segments = [dict(s, bbox=[s["id"], s["id"], 6 + 2 * s["id"], 5 + s["id"]]) for s in image.segments]
        output.logits = torch.randn(5, LABELS.num_classes + 1, generator=generator)
        output.boxes = torch.rand(5, 4, generator=generator) * 0.5 + 0.2
        for query, s in enumerate([s for s in image.segments if not s["iscrowd"]][:5]):
            x, y, w, h = s["bbox"]
            box = torch.tensor([(x + w / 2) / image.width, (y + h / 2) / image.height, w / image.width,
                                h / image.height])
            output.boxes[query] = box + (torch.rand(4, generator=generator) - 0.5) * 0.05
            output.logits[query, LABELS.index_of_category(s["category_id"])] += 3


@pytest.mark.parametrize("make", [lambda: PanopticEvaluator(LABELS), lambda: BoxEvaluator(LABELS)])
def test_records_of_two_processes_score_as_one_process(make):
    """Batches dealt round robin to two processes, as `Processes.share` deals them: the gathered records are
    added in the split's order, so even the float sums are those of one process."""
    pairs = random_images(9, seed=1)
    images, outputs = as_evaluator_inputs(pairs)
    add_detections(images, outputs)
    one = processed(make(), images, outputs)
    batches = [range(start, min(start + 2, len(images))) for start in range(0, len(images), 2)]
    share = [[i for batch in batches[rank::2] for i in batch] for rank in (0, 1)]
    gathering = TwoProcesses()
    two = []
    for rank in (0, 1):
        evaluator = processed(make(), [images[i] for i in share[rank]], [outputs[i] for i in share[rank]])
        evaluator.gather(gathering)
        two.append(evaluator)
    assert two[1].compute() == one.compute()
    assert two[0].compute() != one.compute()  # the test can tell: process 0 alone scores other images

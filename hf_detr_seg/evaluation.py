"""Run a model on a built dataset split and score it: PQ/SQ/RQ, box mAP, semantic IoU, pixel F1.

The loop predicts each batch and hands the same (images, predictions) pair to every evaluator (the seam of
`metrics.base`, detectron2's reset / process / evaluate): this module knows no metric, and the metrics nothing
of models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from transformers import DetrForSegmentation

from .data.panoptic import (
    annotation_folder,
    annotation_json,
    read_json,
    read_panoptic_png,
    write_json,
    write_panoptic_png,
)
from .data.training_data import PanopticDetrDataset, collate_fn
from .detr_forward import run_detector
from .errors import DataError
from .inference.forward import predict_batch
from .labels import LabelMap
from .metrics import BoxEvaluator, Evaluator, ImageInput, ImageOutput, PanopticEvaluator, SemanticEvaluator
from .metrics.base import ImageRecords
from .modeling import label_map_from_config
from .postprocess import model_threshold, segments_to_coco
from .processes import Processes


@torch.no_grad()
def evaluate_model(
    model: DetrForSegmentation,
    dataset_dir: str | Path,
    split: str = "val",
    image_size: int = 192,
    threshold: float | None = None,
    batch_size: int = 4,
    masks: bool = True,
    max_images: int | None = None,
    tolerance: int = 0,
    save_predictions: Path | None = None,
    processes: Processes | None = None,
) -> dict:
    """Score `model` on a split. With `masks=False` only boxes are scored (stage 1: the mask head is untrained).

    `save_predictions=DIR` also writes the panoptic predictions as a COCO-panoptic folder that panopticapi (or
    `hf-detr-seg pq`) reads against the split's annotations: `DIR/panoptic_<split>.json` (images, annotations
    with `segments_info` including scores, categories) and `DIR/panoptic_<split>/<stem>.png`.

    `threshold`: the query score threshold (None: the model's own, `postprocess.model_threshold`).
    `processes` (`accelerate launch`): each process predicts every N-th batch of the split (the batches of a
    one-process run, so the same forward passes), the evaluators' per-image records are gathered and added in
    the split's order on every process: the metrics equal a one-process run's.
    """
    root = Path(dataset_dir)
    if not annotation_json(root, split).is_file():
        raise DataError(f"{root}: no `{split}` split (missing {annotation_json(root, split)})")
    if save_predictions is not None and not masks:
        raise ValueError("save_predictions needs masks=True (a stage-1 model predicts boxes only)")
    processes = processes or Processes()
    label_map: LabelMap = label_map_from_config(model.config)
    dataset = PanopticDetrDataset(root, split, image_size, augment=False, label_map=label_map)
    if len(dataset) == 0:
        return {}
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in range(0, len(dataset), batch_size)]
    mine = processes.share(batches)
    evaluators = _evaluators(label_map, masks, tolerance)
    writer = _PredictionWriter(Path(save_predictions), root, split, label_map) if save_predictions is not None else None
    consumers: list[ImageRecords] = [*evaluators, writer] if writer is not None else [*evaluators]
    truth = _ground_truth(root, split)
    stuff = {i for i, c in enumerate(label_map.classes) if not c.isthing}
    threshold = model_threshold(model.config) if threshold is None else threshold
    was_training = model.training
    model.eval()
    for indices, batch in zip(mine, DataLoader(dataset, batch_sampler=mine, collate_fn=collate_fn)):
        images = _images(truth, indices, batch["labels"], read_id_maps=masks)
        predictions = _predict(model, batch, stuff, threshold, masks)
        for consumer in consumers:
            consumer.process(images, predictions)
    if was_training:
        model.train()
    if writer is not None:
        writer.close(processes)
    return _scores(evaluators, processes)


def _evaluators(label_map: LabelMap, masks: bool, tolerance: float) -> list[Evaluator]:
    """Box mAP alone without masks; with masks PQ, box mAP and semantic scores (the order of the results' keys)."""
    if not masks:
        return [BoxEvaluator(label_map)]
    return [PanopticEvaluator(label_map), BoxEvaluator(label_map), SemanticEvaluator(label_map, tolerance)]


def _ground_truth(root: Path, split: str) -> dict[int, tuple[Path, list[dict]]]:
    """Per image id: the gt PNG and its `segments_info`."""
    data = read_json(annotation_json(root, split))
    return {ann["image_id"]: (annotation_folder(root, split) / ann["file_name"], ann["segments_info"])
            for ann in data["annotations"]}


def _images(truth: dict[int, tuple[Path, list[dict]]], indices: list[int], targets: list[dict],
            read_id_maps: bool) -> list[ImageInput]:
    """A batch's images as the split's annotations give them (the gt PNGs are read only when masks are scored)."""
    images = []
    for index, target in zip(indices, targets):
        png, segments = truth[int(target["image_id"])]
        height, width = target["orig_size"].tolist()
        id_map = read_panoptic_png(png) if read_id_maps else None
        images.append(ImageInput(index, int(target["image_id"]), png.name, height, width, segments, id_map))
    return images


def _predict(model: DetrForSegmentation, batch: dict, stuff: set[int], threshold: float,
             masks: bool) -> list[ImageOutput]:
    """One batch's predictions: the detector's outputs, and with `masks` the panoptic predictions at each
    image's original size."""
    device = next(model.parameters()).device
    targets = batch["labels"]
    pixel_values, pixel_mask = batch["pixel_values"].to(device), batch["pixel_mask"].to(device)
    if masks:
        sizes = [tuple(t["size"].tolist()) for t in targets]
        originals = [tuple(t["orig_size"].tolist()) for t in targets]
        panoptic, logits, boxes = predict_batch(model, pixel_values, pixel_mask, sizes, originals, stuff, threshold)
    else:
        detector = run_detector(model, pixel_values, pixel_mask)
        panoptic, logits, boxes = [None] * len(targets), detector.logits, detector.pred_boxes
    return [ImageOutput(logits[i].cpu(), boxes[i].cpu(), panoptic[i]) for i in range(len(targets))]


def _scores(evaluators: list[Evaluator], processes: Processes) -> dict:
    """Every evaluator's scores over the images of every process, in one dict; per-class scores are merged by
    class name (PQ's, then IoU and pixel F1)."""
    results: dict = {}
    for evaluator in evaluators:
        evaluator.gather(processes)
        for key, value in evaluator.compute().items():
            if key == "per_class":
                per_class = results.setdefault("per_class", {})
                for name, scores in value.items():
                    per_class.setdefault(name, {}).update(scores)
            else:
                results[key] = value
    return results


class _PredictionWriter(ImageRecords):
    """Writes predictions as a COCO-panoptic folder: one PNG per image as it comes, the JSON at the end."""

    def __init__(self, out: Path, root: Path, split: str, label_map: LabelMap) -> None:
        self.json_path = out / f"panoptic_{split}.json"
        self.png_dir = out / f"panoptic_{split}"
        self.png_dir.mkdir(parents=True, exist_ok=True)
        self.images = {img["id"]: img for img in read_json(annotation_json(root, split))["images"]}
        self.label_map = label_map
        super().__init__()

    def image_record(self, image: ImageInput, prediction: ImageOutput) -> dict:
        """Write one image's PNG; returns its annotation for the JSON."""
        file_name = Path(image.file_name).stem + ".png"
        write_panoptic_png(self.png_dir / file_name, prediction.panoptic_ids())
        segments_info = segments_to_coco(prediction.panoptic, self.label_map)
        return {"image_id": image.image_id, "file_name": file_name, "segments_info": segments_info}

    def close(self, processes: Processes) -> None:
        """Write the JSON of every process's images (on the main process; the others wait for it)."""
        self.gather(processes)
        if processes.is_main:
            annotations = self.records()
            images = [self.images[a["image_id"]] for a in annotations]
            write_json(self.json_path, {"images": images, "annotations": annotations,
                                        "categories": self.label_map.coco_categories()})
        processes.wait()


def metrics_table(metrics: dict) -> str:
    """A Markdown summary: the headline numbers, then one row per class."""
    headline = [k for k in ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "bbox_map", "bbox_map_50")
                if isinstance(metrics.get(k), float)]
    lines = ["| " + " | ".join(headline) + " |", "|" + "---|" * len(headline),
             "| " + " | ".join(f"{metrics[k]:.4f}" for k in headline) + " |"]
    per_class = metrics.get("per_class", {})
    if per_class:
        columns = ["pq", "sq", "rq", "iou", "precision", "recall", "f1"]
        lines += ["", "| class | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, values in per_class.items():
            cells = [f"{values[c]:.4f}" if isinstance(values.get(c), float) else "" for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, values in metrics.items():
        if key.startswith("baseline_"):
            lines.append(f"\nbaseline {key[9:]}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)))
    return "\n".join(lines)

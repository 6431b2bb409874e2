"""Run a model on a built dataset split and score it: PQ/SQ/RQ, box mAP, semantic IoU, pixel F1.

The loop only feeds evaluators (detectron2's reset / update / compute seam): `metrics.py` knows nothing of
models, and this module nothing of how a metric is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from transformers import DetrForSegmentation

from .data.panoptic import (
    annotation_folder,
    annotation_json,
    class_map_from_segments,
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
from .metrics import BoxMAP, PanopticQuality, SemanticScores
from .modeling import label_map_from_config
from .postprocess import DEFAULT_THRESHOLD, segments_to_coco
from .processes import Processes


def _ground_truth(root: Path, split: str) -> dict[int, tuple[Path, list[dict]]]:
    data = read_json(annotation_json(root, split))
    return {ann["image_id"]: (annotation_folder(root, split) / ann["file_name"], ann["segments_info"])
            for ann in data["annotations"]}


def detections(logits: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """DETR's box post-processing: every query, its best real class and score, boxes in pixels (x0, y0, x1, y1)."""
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return {"boxes": xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype), "scores": scores,
            "labels": labels}


@dataclass
class _ImageRecord:
    """What the evaluators need from one image (small arrays: records travel between processes)."""

    index: int  # position in the split: records are added to the evaluators in this order
    detections: dict[str, np.ndarray]
    gt_boxes: dict[str, np.ndarray]
    pq: Any = None  # PanopticQuality.image_stats
    semantic: Any = None  # SemanticScores.image_counts
    saved: dict | None = None  # the image's annotation in the saved predictions' JSON


@dataclass
class _Evaluators:
    """The evaluators of one run and what they read (ground truth, label map, where predictions are saved)."""

    label_map: LabelMap
    truth: dict[int, tuple[Path, list[dict]]]
    pq: PanopticQuality
    boxes: BoxMAP
    semantic: SemanticScores
    writer: "_PredictionWriter | None"


@torch.no_grad()
def evaluate_model(
    model: DetrForSegmentation,
    dataset_dir: str | Path,
    split: str = "val",
    image_size: int = 192,
    threshold: float = DEFAULT_THRESHOLD,
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

    `processes` (`accelerate launch`): each process predicts every N-th batch of the split (the batches of a
    one-process run, so the same forward passes), the per-image records are gathered and added to the
    evaluators in the split's order on every process: the metrics equal a one-process run's.
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
    evaluators = _evaluators(label_map, root, split, tolerance, save_predictions)
    was_training = model.training
    model.eval()
    records: list[_ImageRecord] = []
    for indices, batch in zip(mine, DataLoader(dataset, batch_sampler=mine, collate_fn=collate_fn)):
        records += _batch_records(model, batch, indices, evaluators, threshold, masks)
    if was_training:
        model.train()
    return _scores(sorted(processes.gather(records), key=lambda r: r.index), evaluators, masks, processes)


def _evaluators(label_map: LabelMap, root: Path, split: str, tolerance: float,
                save_predictions: Path | None) -> _Evaluators:
    categories = {c.category_id: {"name": c.name, "isthing": c.isthing} for c in label_map.classes}
    # Pixel precision/recall/F1 for every defect class, thing or stuff (crack is often stuff): all but background.
    defects = [i for i, c in enumerate(label_map.classes) if not c.background]
    semantic = SemanticScores(label_map.num_classes, defects, tolerance=tolerance, class_names=label_map.names)
    writer = _PredictionWriter(Path(save_predictions), root, split, label_map) if save_predictions is not None else None
    return _Evaluators(label_map, _ground_truth(root, split), PanopticQuality(categories), BoxMAP(), semantic, writer)


def _batch_records(model: DetrForSegmentation, batch: dict, indices: list[int], evaluators: _Evaluators,
                   threshold: float, masks: bool) -> list[_ImageRecord]:
    """Predict one batch and turn each image into its `_ImageRecord` (saving its PNG when asked)."""
    label_map = evaluators.label_map
    device = next(model.parameters()).device
    labels = batch["labels"]
    pixel_values, pixel_mask = batch["pixel_values"].to(device), batch["pixel_mask"].to(device)
    originals = [tuple(t["orig_size"].tolist()) for t in labels]
    if masks:
        sizes = [tuple(t["size"].tolist()) for t in labels]
        stuff = {i for i, c in enumerate(label_map.classes) if not c.isthing}
        predictions, logits, pred_boxes = predict_batch(model, pixel_values, pixel_mask, sizes, originals, stuff,
                                                        threshold)
    else:
        detector = run_detector(model, pixel_values, pixel_mask)
        predictions, logits, pred_boxes = None, detector.logits, detector.pred_boxes
    records = []
    for i, (index, target) in enumerate(zip(indices, labels)):
        png, gt_segments = evaluators.truth[int(target["image_id"])]
        height, width = originals[i]
        found = detections(logits[i].cpu(), pred_boxes[i].cpu(), height, width)
        record = _ImageRecord(index, {k: v.numpy() for k, v in found.items()},
                              {k: v.numpy() for k, v in _gt_boxes(gt_segments, label_map).items()})
        if predictions is not None:
            _add_masks(record, predictions[i], read_panoptic_png(png), gt_segments, png.name,
                       int(target["image_id"]), evaluators)
        records.append(record)
    return records


def _add_masks(record: _ImageRecord, pred, gt_ids: np.ndarray, gt_segments: list[dict], png_name: str,
               image_id: int, evaluators: _Evaluators) -> None:
    """The panoptic and semantic statistics of one image's prediction (and its saved PNG)."""
    label_map = evaluators.label_map
    pred_ids = pred.id_map.cpu().numpy().astype(np.uint32)
    pred_segments = [{"id": s["id"], "category_id": label_map.category_id(s["label_id"])} for s in pred.segments]
    record.pq = evaluators.pq.image_stats(gt_ids, gt_segments, pred_ids, pred_segments)
    record.semantic = evaluators.semantic.image_counts(
        class_map_from_segments(gt_ids, gt_segments, lambda s: label_map.index_of_category(s["category_id"])),
        class_map_from_segments(pred_ids, pred.segments, lambda s: s["label_id"]),
    )
    if evaluators.writer is not None:
        record.saved = evaluators.writer.write_png(image_id, png_name, pred_ids, segments_to_coco(pred, label_map))


def _scores(records: list[_ImageRecord], evaluators: _Evaluators, masks: bool, processes: Processes) -> dict:
    """The metrics from every image's record, added in the split's order."""
    for record in records:
        evaluators.boxes.update(record.detections, record.gt_boxes)
        if masks:
            evaluators.pq.add(record.pq)
            evaluators.semantic.add(record.semantic)
    if evaluators.writer is not None and processes.is_main:
        evaluators.writer.close([record.saved for record in records])
    processes.wait()
    results = evaluators.boxes.compute()
    if masks:
        results = {**evaluators.pq.compute(), **results}
        scores = evaluators.semantic.compute()
        results["miou"] = scores["miou"]
        for name, values in results["per_class"].items():
            values.update(scores["per_class"].get(name, {}))
    return results


class _PredictionWriter:
    """Writes predictions as a COCO-panoptic folder: one PNG per image as it comes, the JSON at the end."""

    def __init__(self, out: Path, root: Path, split: str, label_map: LabelMap) -> None:
        self.json_path = out / f"panoptic_{split}.json"
        self.png_dir = out / f"panoptic_{split}"
        self.png_dir.mkdir(parents=True, exist_ok=True)
        self.images = {img["id"]: img for img in read_json(annotation_json(root, split))["images"]}
        self.categories = label_map.coco_categories()

    def write_png(self, image_id: int, png_name: str, id_map: np.ndarray, segments_info: list[dict]) -> dict:
        """Write one image's PNG; returns its annotation for the JSON."""
        file_name = Path(png_name).stem + ".png"
        write_panoptic_png(self.png_dir / file_name, id_map)
        return {"image_id": image_id, "file_name": file_name, "segments_info": segments_info}

    def close(self, annotations: list[dict]) -> None:
        images = [self.images[a["image_id"]] for a in annotations]
        write_json(self.json_path, {"images": images, "annotations": annotations, "categories": self.categories})


def _gt_boxes(segments: list[dict], label_map: LabelMap) -> dict[str, torch.Tensor]:
    kept = [s for s in segments if not s.get("iscrowd", 0)]
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (s["bbox"] for s in kept)]
    return {
        "boxes": torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([label_map.index_of_category(s["category_id"]) for s in kept], dtype=torch.int64),
    }


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

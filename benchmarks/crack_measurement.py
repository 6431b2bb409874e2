"""How well predicted cracks measure against the true ones of a built dataset's split:

    python benchmarks/crack_measurement.py DATASET --predictions PREDICT_OUT [--split val] [--json out.json]
    python benchmarks/crack_measurement.py DATASET --model MODEL [--threshold 0.85] [--tile-size 512]

The true cracks are the split's segments of the classes whose role is `measure: crack` (dataset labels.yaml),
a stuff segment split into connected cracks as `predict` splits it (`segment_measures.crack_masks`). The
predicted ones come from a `predict` output folder (`<stem>_panoptic.png` and `<stem>.json` per image, the
classes read by name through the dataset's label map), or from `--model`, which runs `predict` on the split's
images into a temporary folder first. A true and a predicted crack of one image are matched one to one, the
largest overlap first, by the IoU of their masks each widened by `--tolerance` pixels (a one-pixel offset
would otherwise leave a 2-px crack without a match); pairs below `--min-iou` stay unmatched. Each crack is
measured in pixels by `quantify`'s estimator; prints one JSON object: counts, the median mean-width error
(predicted - true, px; and its median absolute value) and the median length ratio (predicted / true).
It also gives the pooled pixel precision/recall/F1 of all crack pixels, and the same for the per-image Otsu
dark-pixel threshold (`baselines.otsu_scores`): run on photos from another source than the model's training
set (a dataset built from them, `--tile-size` at the model's own scale), it is the generalisation check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from hf_detr_seg.baselines import otsu_scores
from hf_detr_seg.data import panoptic
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.metrics import SemanticScores
from hf_detr_seg.quantify import crack_in_box
from hf_detr_seg.segment_measures import crack_masks

Crack = tuple[np.ndarray, tuple[slice, slice]]


def compare_split(dataset: Path, predictions: Path, split: str = "val", tolerance: int = 2,
                  min_iou: float = 0.3) -> dict:
    """The summary the script prints, for a dataset split and a folder of `predict` outputs (module docstring)."""
    label_map = panoptic.load_dataset_label_map(dataset)
    pairs, counts = [], {"true_cracks": 0, "predicted_cracks": 0}
    pixels = SemanticScores(2, [1], class_names=["other", "crack"])  # all crack-role pixels as class 1
    for file_name, ids, segments in true_segments(dataset, split, label_map):
        predicted_ids, predicted_segments = read_predicted(predictions, Path(file_name).stem, label_map)
        truth = crack_masks(ids, segments, label_map)
        predicted = crack_masks(predicted_ids, predicted_segments, label_map)
        counts["true_cracks"] += len(truth)
        counts["predicted_cracks"] += len(predicted)
        pairs += [(crack_in_box(*t, ids.shape), crack_in_box(*p, ids.shape))
                  for t, p in match_cracks(truth, predicted, ids.shape, tolerance, min_iou)]
        pixels.update(crack_pixels(ids, segments, label_map),
                      crack_pixels(predicted_ids, predicted_segments, label_map))
    return {**summarise(pairs, counts), "pixels": rounded_scores(pixels.compute()["per_class"]["crack"])}


def true_segments(dataset: Path, split: str, label_map: LabelMap) -> Iterator[tuple[str, np.ndarray, list[dict]]]:
    """Each image of the split: its file name, its true id map and its segments (`id`, model `label_id`)."""
    data = panoptic.read_json(panoptic.annotation_json(dataset, split))
    files = {image["id"]: image["file_name"] for image in data["images"]}
    for annotation in data["annotations"]:
        ids = panoptic.read_panoptic_png(panoptic.annotation_folder(dataset, split) / annotation["file_name"])
        segments = [{"id": s["id"], "label_id": label_map.index_of_category(s["category_id"])}
                    for s in annotation["segments_info"]]
        yield files[annotation["image_id"]], ids, segments


def read_predicted(folder: Path, stem: str, label_map: LabelMap) -> tuple[np.ndarray, list[dict]]:
    """One image's `predict` outputs: its id map and segments, those of classes the dataset does not have left
    out."""
    document = json.loads((folder / f"{stem}.json").read_text())
    known = label_map.label2id
    segments = [{"id": s["id"], "label_id": known[s["class"]]} for s in document["segments"] if s["class"] in known]
    return panoptic.read_panoptic_png(folder / f"{stem}_panoptic.png"), segments


def crack_pixels(id_map: np.ndarray, segments: list[dict], label_map: LabelMap) -> np.ndarray:
    """1 on the pixels of every crack-role segment, 0 elsewhere."""
    cracks = set(label_map.crack_indices)
    return np.isin(id_map, [s["id"] for s in segments if s["label_id"] in cracks]).astype(np.int64)


def rounded_scores(scores: dict) -> dict:
    """Precision, recall and F1 of a `SemanticScores` class, 3 decimals."""
    return {name: round(float(scores[name]), 3) for name in ("precision", "recall", "f1")}


def match_cracks(truth: list[Crack], predicted: list[Crack], shape: tuple[int, int], tolerance: int,
                 min_iou: float) -> list[tuple[Crack, Crack]]:
    """One-to-one pairs, the largest IoU of the widened masks first, each at least `min_iou`."""
    widened_truth = [_widened(c, shape, tolerance) for c in truth]
    widened_predicted = [_widened(c, shape, tolerance) for c in predicted]
    scores = []
    for i, t in enumerate(widened_truth):
        for j, p in enumerate(widened_predicted):
            union = np.count_nonzero(t | p)
            scores.append((np.count_nonzero(t & p) / union if union else 0.0, i, j))
    pairs, used_truth, used_predicted = [], set(), set()
    for iou, i, j in sorted(scores, reverse=True):
        if iou >= min_iou and i not in used_truth and j not in used_predicted:
            pairs.append((truth[i], predicted[j]))
            used_truth.add(i)
            used_predicted.add(j)
    return pairs


def _widened(crack: Crack, shape: tuple[int, int], tolerance: int) -> np.ndarray:
    """The crack's mask on the whole image, dilated by `tolerance` pixels (a square of side 2 t + 1)."""
    full = np.zeros(shape, np.uint8)
    full[crack[1]] = crack[0]
    if tolerance > 0:
        full = cv2.dilate(full, np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8))
    return full.astype(bool)


def summarise(pairs: list[tuple[dict, dict]], counts: dict) -> dict:
    """Counts and medians over the matched (true, predicted) measurements; medians None without a match."""
    errors = [p["mean_width"] - t["mean_width"] for t, p in pairs]
    ratios = [p["length"] / t["length"] for t, p in pairs if t["length"] > 0]

    def median(values: list[float]) -> float | None:
        return round(float(np.median(values)), 3) if values else None

    return {**counts, "matched": len(pairs), "median_mean_width_error_px": median(errors),
            "median_abs_mean_width_error_px": median([abs(e) for e in errors]),
            "median_length_ratio": median(ratios)}


def predict_folder(model: str, images: Path, out: Path, args: argparse.Namespace) -> Path:
    """`predict` on a folder of images into `out`, with the script's `--threshold` and `--tile-size` if given
    (the `--model` path)."""
    from hf_detr_seg.inference import predict_paths

    options = {"threshold": args.threshold, "tile_size": args.tile_size}
    predict_paths(model, [images], out, progress=True,
                  **{name: value for name, value in options.items() if value is not None})
    return out


def split_arguments(description: str, model_help: str) -> argparse.ArgumentParser:
    """The arguments of the crack benchmarks: a built dataset, a predict output folder for its split or a model
    to run, predict's options and `--json`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("dataset", type=Path, help="a folder built by hf-detr-seg build-dataset")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="a predict output folder for the split's images")
    source.add_argument("--model", help=model_help)
    parser.add_argument("--split", default="val")
    parser.add_argument("--threshold", type=float, help="with --model: predict's query threshold")
    parser.add_argument("--tile-size", type=int, help="with --model: predict's tile size")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser


def parse_split_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments; a `--predictions` folder that does not exist, or lacks an image of the split, refused
    (`predict` writes a `<stem>.json` for every image, so a missing one means another folder or an unfinished run,
    which would otherwise score as an image where nothing was found)."""
    args = parser.parse_args(argv)
    if args.predictions is None:
        return args
    if not args.predictions.is_dir():
        parser.error(f"--predictions {args.predictions}: no such folder")
    images = panoptic.read_json(panoptic.annotation_json(args.dataset, args.split))["images"]
    stems = [Path(image["file_name"]).stem for image in images]
    missing = [stem for stem in stems if not (args.predictions / f"{stem}.json").is_file()]
    if missing:
        parser.error(f"--predictions {args.predictions}: no predict output for {len(missing)} of the {len(stems)} "
                     f"{args.split} images (the first: {missing[0]}.json)")
    return args


def report(summary: dict, args: argparse.Namespace) -> dict:
    """Print `summary` as one JSON object, and write it to `--json` if given."""
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = split_arguments(__doc__.splitlines()[0], "a model folder: predict the split's images first")
    parser.add_argument("--tolerance", type=int, default=2, help="pixels each mask is widened by for matching")
    parser.add_argument("--min-iou", type=float, default=0.3, help="least IoU (widened masks) of a match")
    args = parse_split_arguments(parser, argv)
    with tempfile.TemporaryDirectory() as tmp:
        predictions = args.predictions or predict_folder(
            args.model, panoptic.image_folder(args.dataset, args.split), Path(tmp), args)
        summary = compare_split(args.dataset, predictions, args.split, args.tolerance, args.min_iou)
    summary["otsu_pixels"] = rounded_scores(otsu_scores(args.dataset, args.split))
    return report(summary, args)


if __name__ == "__main__":
    main()

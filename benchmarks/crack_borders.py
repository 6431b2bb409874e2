"""Whether a model marks cracks along image borders that are not there, on a built dataset's split:

    python benchmarks/crack_borders.py DATASET --model MODEL [--split val] [--band 8] [--json out.json]
    python benchmarks/crack_borders.py DATASET --predictions PREDICT_OUT [--split val] [--band 8]

Both checks compare the band of `--band` pixels along every image border with the rest of the image (inside);
crack pixels are those of the classes whose role is `measure: crack` (dataset labels.yaml), predicted ones read
from a `predict` output folder as `crack_measurement.py` reads them.

- The split as it is: per region, crack precision and recall; the false-positive rate (false crack pixels per
  true non-crack pixel), which unlike precision does not fall where true cracks are rarer; false crack pixels
  more than `--near` px from any true crack per 1,000 pixels, the cracks that are not there at all (as opposed
  to true cracks drawn too wide); and the band's precision had it the inside's share of crack pixels, at its
  own recall and false-positive rate. The images with the most such far false pixels in the band are listed.
  The band's precision minus the inside's comes with a 95 % interval from a percentile bootstrap over images
  (`scipy.stats.bootstrap`, the two regions of an image resampled together): a few photos hold most of either
  region's false pixels, so a gap of a point or two can be one photo's doing.
- With `--model`, the split's images with their true cracks painted out (`hf_detr_seg.data.defect_free`,
  OpenCV's Telea inpainting of the crack masks and a 3-px rim): crack-free surfaces, where every predicted crack
  pixel is false. It gives the share of each region marked as crack and the number of images with any crack
  pixel.

Prints one JSON object.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, stats

from crack_measurement import (
    crack_pixels, parse_split_arguments, predict_folder, read_predicted, report, split_arguments, true_segments,
)
from hf_detr_seg.data import panoptic
from hf_detr_seg.data.defect_free import paint_out
from hf_detr_seg.labels import LabelMap

REGIONS = ("band", "inside")
# Per region: true positive, false positive, false negative and true negative crack pixels, and the false
# positives more than `near` px from any true crack.
COUNTS = ("tp", "fp", "fn", "tn", "far_fp")
BOOTSTRAP_RESAMPLES = 2000


def regions(shape: tuple[int, int], band: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels within `band` px of the image border, and the others (the order of `REGIONS`)."""
    in_band = np.ones(shape, bool)
    in_band[band:-band, band:-band] = False
    return in_band, ~in_band


def true_cracks(dataset: Path, split: str, label_map: LabelMap) -> dict[str, np.ndarray]:
    """Each image's true crack pixels (bool), by image file name."""
    return {file_name: crack_pixels(ids, segments, label_map).astype(bool)
            for file_name, ids, segments in true_segments(dataset, split, label_map)}


def predicted_cracks(predictions: Path, stem: str, label_map: LabelMap) -> np.ndarray:
    """One image's predicted crack pixels (bool) from a `predict` output folder."""
    return crack_pixels(*read_predicted(predictions, stem, label_map), label_map).astype(bool)


def region_counts(truth: np.ndarray, predicted: np.ndarray, band: int, near: int) -> np.ndarray:
    """[region, count] of one image, in the orders of `REGIONS` and `COUNTS`."""
    distance = ndimage.distance_transform_edt(~truth) if truth.any() else np.full(truth.shape, np.inf)
    counts = np.zeros((len(REGIONS), len(COUNTS)), np.int64)
    for row, region in enumerate(regions(truth.shape, band)):
        false = predicted & ~truth & region
        counts[row] = [np.count_nonzero(predicted & truth & region), np.count_nonzero(false),
                       np.count_nonzero(~predicted & truth & region), np.count_nonzero(~predicted & ~truth & region),
                       np.count_nonzero(false & (distance > near))]
    return counts


def region_scores(counts: np.ndarray) -> dict[str, float]:
    """Precision, recall, false-positive rate, far false pixels per 1,000 and crack share of one region."""
    tp, fp, fn, tn, far_fp = (int(n) for n in counts)
    pixels = tp + fp + fn + tn
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "false_positive_rate": fp / max(fp + tn, 1), "far_false_per_1000": 1000 * far_fp / max(pixels, 1),
            "crack_share": (tp + fn) / max(pixels, 1)}


def precision_at_share(scores: dict[str, float], share: float) -> float:
    """The precision of a region with `scores`' recall and false-positive rate, had it `share` crack pixels."""
    found = scores["recall"] * share
    false = scores["false_positive_rate"] * (1 - share)
    return found / max(found + false, 1e-12)


def precision_difference(band_tp: np.ndarray, band_fp: np.ndarray, inside_tp: np.ndarray, inside_fp: np.ndarray,
                         axis: int = -1) -> np.ndarray:
    """The band's pooled precision minus the inside's, from per-image counts (summed along `axis`)."""
    band_tp, band_fp, inside_tp, inside_fp = (counts.sum(axis) for counts in (band_tp, band_fp, inside_tp, inside_fp))
    return band_tp / np.maximum(band_tp + band_fp, 1) - inside_tp / np.maximum(inside_tp + inside_fp, 1)


def precision_difference_interval(per_image: np.ndarray) -> dict:
    """The band-minus-inside precision of [image, region, count] counts, and its 95 % bootstrap interval."""
    tp, fp = COUNTS.index("tp"), COUNTS.index("fp")
    samples = (per_image[:, 0, tp], per_image[:, 0, fp], per_image[:, 1, tp], per_image[:, 1, fp])
    interval = stats.bootstrap(samples, precision_difference, paired=True, vectorized=True, method="percentile",
                               n_resamples=BOOTSTRAP_RESAMPLES, random_state=0).confidence_interval
    return {"difference": round(float(precision_difference(*samples)), 4),
            "ci95": [round(float(interval.low), 4), round(float(interval.high), 4)]}


def compare_borders(dataset: Path, predictions: Path, split: str = "val", band: int = 8, near: int = 3,
                    worst: int = 5) -> dict:
    """The split-as-it-is part of the summary (module docstring)."""
    label_map = panoptic.load_dataset_label_map(dataset)
    stems, per_image = [], []
    for name, truth in true_cracks(dataset, split, label_map).items():
        stems.append(Path(name).stem)
        per_image.append(region_counts(truth, predicted_cracks(predictions, stems[-1], label_map), band, near))
    per_image = np.stack(per_image)
    totals = per_image.sum(0)
    scores = {region: region_scores(totals[row]) for row, region in enumerate(REGIONS)}
    band_far = [(int(n), stem) for n, stem in zip(per_image[:, 0, COUNTS.index("far_fp")], stems)]
    return {**{region: _rounded(s) for region, s in scores.items()},
            "band_precision_at_inside_crack_share": round(
                precision_at_share(scores["band"], scores["inside"]["crack_share"]), 4),
            "band_minus_inside_precision": precision_difference_interval(per_image),
            "most_far_false_in_band": [[stem, n] for n, stem in sorted(band_far, reverse=True)[:worst] if n]}


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 4) for name, value in scores.items()}


def write_crack_free_images(dataset: Path, split: str, out: Path) -> dict[str, tuple[int, int]]:
    """The split's images with their true cracks painted out, as lossless PNGs in `out`; their shapes by stem."""
    label_map = panoptic.load_dataset_label_map(dataset)
    images = panoptic.image_folder(dataset, split)
    shapes = {}
    for name, cracks in true_cracks(dataset, split, label_map).items():
        image = np.asarray(Image.open(images / name).convert("RGB"))
        Image.fromarray(paint_out(image, cracks)).save(out / f"{Path(name).stem}.png")
        shapes[Path(name).stem] = cracks.shape
    return shapes


def crack_free_marks(predictions: Path, shapes: dict[str, tuple[int, int]], label_map: LabelMap,
                     band: int = 8) -> dict:
    """The crack-free part of the summary (module docstring), from the predictions of the painted-out images
    (`write_crack_free_images`)."""
    marked = np.zeros((len(REGIONS), 2), np.int64)  # per region: pixels, predicted crack pixels
    images_with_cracks = 0
    for stem, shape in shapes.items():
        predicted = predicted_cracks(predictions, stem, label_map)
        images_with_cracks += bool(predicted.any())
        for row, region in enumerate(regions(shape, band)):
            marked[row] += [np.count_nonzero(region), np.count_nonzero(predicted & region)]
    return {"images": len(shapes), "images_with_crack_pixels": images_with_cracks,
            **{f"{region}_marked": round(float(marked[row, 1] / max(marked[row, 0], 1)), 5)
               for row, region in enumerate(REGIONS)}}


def main(argv: list[str] | None = None) -> dict:
    parser = split_arguments(__doc__.splitlines()[0],
                             "a model folder: predict the split's images first, then their crack-free copies")
    parser.add_argument("--band", type=int, default=8, help="width of the border band in pixels")
    parser.add_argument("--near", type=int, default=3, help="false pixels farther than this from a true crack "
                                                             "count as cracks that are not there")
    args = parse_split_arguments(parser, argv)
    if args.band < 1:
        parser.error(f"--band {args.band}: expected at least 1 pixel")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictions = args.predictions or predict_folder(
            args.model, panoptic.image_folder(args.dataset, args.split), tmp / "split", args)
        summary = {"split": compare_borders(args.dataset, predictions, args.split, args.band, args.near)}
        if args.model is not None:
            (tmp / "crack_free").mkdir()
            shapes = write_crack_free_images(args.dataset, args.split, tmp / "crack_free")
            predict_folder(args.model, tmp / "crack_free", tmp / "crack_free_predictions", args)
            label_map = panoptic.load_dataset_label_map(args.dataset)
            summary["crack_free"] = crack_free_marks(tmp / "crack_free_predictions", shapes, label_map, args.band)
    return report(summary, args)


if __name__ == "__main__":
    main()

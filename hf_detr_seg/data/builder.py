"""The parallel, atomic build of a COCO-panoptic dataset folder from images and masks, or from annotations.

A sample is one image and its source: a mask file (or per-class files), or the annotated objects of that image
(`data.annotations`, drawn by `data.drawing`). Everything after the source is read is shared: workers, split,
summary, errors.

Everything is written into a temporary folder beside OUT and moved into place only when complete, so a
failed build never leaves a half-written dataset and never damages an existing one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DataError, UserInputError
from ..labels import LabelMap
from .annotations import ImageAnnotations, match_images, read_annotations
from .drawing import draw_annotations
from .instances import PanopticSegments, segments_from_class_map
from .masks import IMAGE_SUFFIXES, MaskSource, read_class_map, read_image
from .panoptic import (
    SPLITS,
    annotation_folder,
    annotation_json,
    image_folder,
    write_json,
    write_panoptic_png,
)

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Sample:
    """One image and its source (mask file(s) or annotated objects), assigned to a split."""

    stem: str
    image: Path
    source: MaskSource | ImageAnnotations
    split: str = "train"


@dataclass
class ImageResult:
    """What one worker produced for one image (picklable, small)."""

    image: dict
    annotation: dict
    instances: Counter
    pixels: Counter
    dropped_specks: int
    dropped_pixels: int
    overlap_pixels: int
    void_pixels: int
    dropped_objects: list[str] = field(default_factory=list)


@dataclass
class BuildSummary:
    """Totals printed at the end of a build."""

    out: Path
    images: Counter = field(default_factory=Counter)  # per split
    instances: Counter = field(default_factory=Counter)  # per class name
    pixels: Counter = field(default_factory=Counter)  # per class name
    dropped_specks: int = 0
    dropped_pixels: int = 0
    overlap_pixels: int = 0
    void_pixels: int = 0
    skipped: list[str] = field(default_factory=list)
    dropped_objects: list[str] = field(default_factory=list)  # annotations: bad objects left out (--skip-bad)
    overlap_rule: str | None = None  # how overlaps were resolved, when the source can overlap

    def add(self, split: str, result: ImageResult) -> None:
        self.images[split] += 1
        self.instances.update(result.instances)
        self.pixels.update(result.pixels)
        self.dropped_specks += result.dropped_specks
        self.dropped_pixels += result.dropped_pixels
        self.overlap_pixels += result.overlap_pixels
        self.void_pixels += result.void_pixels
        self.dropped_objects += result.dropped_objects

    def format(self, label_map: LabelMap) -> str:
        lines = [
            f"Built {sum(self.images.values())} images "
            f"(train {self.images['train']}, val {self.images['val']}) into {self.out}",
            f"{'class':<20} {'kind':<6} {'segments':>10} {'pixels':>12}",
        ]
        for info in label_map.user_classes:
            kind = "thing" if info.isthing else "stuff"
            lines.append(
                f"{info.name:<20} {kind:<6} {self.instances[info.name]:>10} {self.pixels[info.name]:>12}"
            )
        lines.append(f"dropped specks (min_area): {self.dropped_specks} ({self.dropped_pixels} pixels, now void)")
        lines.append(f"void pixels in total: {self.void_pixels}")
        if self.overlap_rule:
            lines.append(f"overlapping pixels ({self.overlap_rule}): {self.overlap_pixels}")
        if self.dropped_objects:
            lines.append(f"dropped {len(self.dropped_objects)} bad object(s):")
            lines.extend(f"  {reason}" for reason in self.dropped_objects)
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {reason}" for reason in self.skipped)
        return "\n".join(lines)


# ------------------------------------------------------------------------- discovery
def _files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise DataError(f"{folder}: two {what} files share the name {path.stem!r} ({found[path.stem].name}, {path.name})")
        found[path.stem] = path
    return found


def find_samples(images_dir: Path, masks_dir: Path, label_map: LabelMap) -> tuple[list[Sample], list[str]]:
    """Pair images with masks by file stem; return (samples, problems) where problems are unpaired files."""
    images = _files_by_stem(Path(images_dir), "image")
    problems: list[str] = []
    masks: dict[str, MaskSource]
    if label_map.mask_format == "per_class_dirs":
        if not Path(masks_dir).is_dir():
            raise DataError(f"{masks_dir}: mask folder not found")
        masks = {}
        known = {c.name for c in label_map.user_classes if not c.background}
        for class_dir in sorted(p for p in Path(masks_dir).iterdir() if p.is_dir()):
            if class_dir.name not in known:
                problems.append(f"{class_dir}: folder of an unknown class (label map classes: {sorted(known)})")
                continue
            for stem, path in _files_by_stem(class_dir, "mask").items():
                masks.setdefault(stem, {})[class_dir.name] = path
    else:
        masks = dict(_files_by_stem(Path(masks_dir), "mask"))
    for stem in sorted(set(masks) - set(images)):
        where = masks[stem] if isinstance(masks[stem], Path) else next(iter(masks[stem].values()))
        problems.append(f"{where}: mask without an image (no {stem}.* in {images_dir})")
    samples = []
    for stem, image in images.items():
        if stem not in masks:
            problems.append(f"{image}: image without a mask (no {stem}.* in {masks_dir})")
            continue
        samples.append(Sample(stem, image, masks[stem]))
    return samples, problems


def find_annotated_samples(
    images_dir: Path,
    annotations: Path,
    label_map: LabelMap,
    annotation_format: str | None = None,
    exclude: Path | None = None,
) -> tuple[list[Sample], list[str]]:
    """Read a COCO file or labelme JSON and pair its images with files under `images_dir` (by base name; files
    under `exclude`, the dataset being built, are not looked at)."""
    annotated = read_annotations(annotations, label_map, annotation_format, exclude)
    matched, problems = match_images(Path(images_dir), annotated, exclude)
    return [Sample(stem, image, objects) for stem, image, objects in matched], problems


def assign_splits(samples: list[Sample], val_fraction: float, seed: int) -> list[Sample]:
    """Deterministic split: shuffle the stems (sorted first) with `seed`, the first fraction is val."""
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"--val-fraction: expected a number in [0, 1], got {val_fraction}")
    ordered = sorted(samples, key=lambda s: s.stem)
    shuffled = ordered[:]
    random.Random(seed).shuffle(shuffled)
    num_val = int(round(len(ordered) * val_fraction))
    val_stems = {s.stem for s in shuffled[:num_val]}
    return [replace(s, split="val" if s.stem in val_stems else "train") for s in ordered]


# ------------------------------------------------------------------------- one image
def _copy_image(source: Path, target: Path, image: Image.Image) -> None:
    """Copy the image file as is, or re-save it (already read upright) when EXIF says it is rotated."""
    with Image.open(source) as raw:
        orientation = raw.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in (None, 1):
        shutil.copyfile(source, target)
    else:
        image.save(target, quality=95) if target.suffix.lower() in {".jpg", ".jpeg"} else image.save(target)


def _segments_of(
    sample: Sample, label_map: LabelMap, size: tuple[int, int], skip_bad: bool
) -> tuple[PanopticSegments, int, list[str]]:
    """(segments, overlapping pixels, dropped objects) of one image, from its masks or its annotated objects."""
    if isinstance(sample.source, ImageAnnotations):
        drawn = draw_annotations(sample.source, label_map, size, skip_bad)
        return drawn.panoptic, drawn.overlap_pixels, drawn.dropped
    class_map = read_class_map(sample.source, label_map, size, sample.image)
    return segments_from_class_map(class_map.indices, label_map), class_map.overlap_pixels, []


def process_sample(sample: Sample, label_map: LabelMap, root: Path, skip_bad: bool = False) -> ImageResult:
    """Read one image and its source, write the image copy and the panoptic PNG, return its records.

    The image is copied only once its source has been read, so an image that fails leaves no file behind.
    """
    image = read_image(sample.image)
    panoptic, overlap_pixels, dropped = _segments_of(sample, label_map, image.size, skip_bad)
    _copy_image(sample.image, image_folder(root, sample.split) / sample.image.name, image)
    png_name = f"{sample.stem}.png"
    write_panoptic_png(annotation_folder(root, sample.split) / png_name, panoptic.id_map)
    names = label_map.names
    instances = Counter()
    pixels = Counter()
    for seg in panoptic.segments:
        pixels[names[seg.class_index]] += seg.area
        instances[names[seg.class_index]] += 1
    return ImageResult(
        image={"file_name": sample.image.name, "width": image.width, "height": image.height},
        annotation={"file_name": png_name, "segments_info": [s.to_coco(label_map) for s in panoptic.segments]},
        instances=instances,
        pixels=pixels,
        dropped_specks=panoptic.dropped_specks,
        dropped_pixels=panoptic.dropped_pixels,
        overlap_pixels=overlap_pixels,
        void_pixels=int(np.count_nonzero(panoptic.id_map == 0)),
        dropped_objects=dropped,
    )


def _process_or_error(args: tuple[Sample, LabelMap, Path, bool]) -> ImageResult | str:
    """Worker entry point: errors travel back as their message so `--skip-bad` can list them."""
    try:
        return process_sample(*args)
    except DataError as err:
        return str(err)


# ------------------------------------------------------------------------- the build
def _prepare_target(out: Path) -> None:
    """Refuse to replace a folder that is not a dataset we built (it could be anything of the user's)."""
    if out.exists() and any(out.iterdir()) and not (out / "labels.yaml").is_file():
        raise DataError(f"{out}: exists and is not a dataset built by hf-detr-seg; choose another --out")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Move the finished build to OUT; an old dataset there is removed only after the move succeeded."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _find(images, source, label_map: LabelMap, annotated: bool, fmt: str | None, out: Path):
    if annotated:
        return find_annotated_samples(Path(images), Path(source), label_map, fmt, exclude=out)
    return find_samples(Path(images), Path(source), label_map)


def _gather_samples(
    label_map: LabelMap, images, source, val_images, val_source, annotated: bool, fmt: str | None,
    val_fraction: float, seed: int, out: Path,
) -> tuple[list[Sample], list[str]]:
    """All samples with their split (given by `val_images` or drawn with `val_fraction`), and the problems."""
    samples, problems = _find(images, source, label_map, annotated, fmt, out)
    if (val_images is None) != (val_source is None):
        flag = "--val-annotations" if annotated else "--val-masks"
        raise DataError(f"--val-images and {flag} must be given together")
    if val_images is None:
        return assign_splits(samples, val_fraction, seed), problems
    val_samples, val_problems = _find(val_images, val_source, label_map, annotated, fmt, out)
    clash = {s.stem for s in samples} & {s.stem for s in val_samples}
    if clash:
        raise DataError(f"{val_images}: file name(s) {sorted(clash)[:5]} are also in {images}")
    samples = [replace(s, split="train") for s in samples] + [replace(s, split="val") for s in val_samples]
    return samples, problems + val_problems


def _check_sources(labels, label_map: LabelMap, masks, annotations, val_masks, val_annotations) -> None:
    if (masks is None) == (annotations is None):
        raise UserInputError("build-dataset: give either --masks or --annotations (one of them)")
    if annotations is None and val_annotations is not None:
        raise UserInputError("--val-annotations goes with --annotations; with --masks give --val-masks")
    if annotations is not None and val_masks is not None:
        raise UserInputError("--val-masks goes with --masks; with --annotations give --val-annotations")
    if masks is not None and label_map.mask_format is None:
        where = "labels.yaml" if isinstance(labels, LabelMap) else labels
        raise UserInputError(
            f"{where}: `mask_format` is required to read masks of several classes (binary, indexed, color or "
            "per_class_dirs); only annotations can do without it"
        )


def build_dataset(
    images: str | Path,
    masks: str | Path | None,
    labels: str | Path | LabelMap,
    out: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    skip_bad: bool = False,
    val_images: str | Path | None = None,
    val_masks: str | Path | None = None,
    progress: bool = True,
    annotations: str | Path | None = None,
    annotation_format: str | None = None,
    val_annotations: str | Path | None = None,
) -> BuildSummary:
    """Build OUT from images + masks, or images + annotations (a COCO instances file or labelme JSON; masks None),
    with the label map; see the module docstring for the guarantees."""
    label_map = labels if isinstance(labels, LabelMap) else LabelMap.from_yaml(labels)
    _check_sources(labels, label_map, masks, annotations, val_masks, val_annotations)
    annotated = annotations is not None
    out = Path(out).resolve()
    _prepare_target(out)
    samples, problems = _gather_samples(
        label_map, images, annotations if annotated else masks, val_images,
        val_annotations if annotated else val_masks, annotated, annotation_format, val_fraction, seed, out,
    )
    if problems and not skip_bad:
        raise DataError("\n".join(problems[:20]) + ("\n(use --skip-bad to build the rest)" if samples else ""))
    if not samples:
        what = "annotated images" if annotated else "image/mask pairs"
        raise DataError(f"{images}: no {what} found (image types: {sorted(IMAGE_SUFFIXES)})")

    overlap_rule = "later object on top" if annotated else None
    if not annotated and label_map.mask_format == "per_class_dirs":
        overlap_rule = "first listed class kept"
    summary = BuildSummary(out=out, skipped=list(problems), overlap_rule=overlap_rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split in SPLITS:
            image_folder(tmp, split).mkdir(parents=True)
            annotation_folder(tmp, split).mkdir(parents=True)
        results = _run_workers([(s, label_map, tmp, skip_bad) for s in samples], workers, progress)
        records = _split_records(samples, results, skip_bad, summary)
        if not sum(summary.images.values()):
            raise DataError(f"{images}: every image failed; nothing to build")
        for split in SPLITS:
            write_json(
                annotation_json(tmp, split),
                {**records[split], "categories": label_map.coco_categories()},
            )
        label_map.save_yaml(tmp / "labels.yaml")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _split_records(
    samples: list[Sample], results: list[ImageResult | str], skip_bad: bool, summary: BuildSummary
) -> dict[str, dict[str, list]]:
    """The COCO-panoptic `images` and `annotations` of each split, ids from 1 in sample order; a failed image
    (its error message) stops the build, or is listed in `summary.skipped` with `skip_bad`."""
    records: dict[str, dict[str, list]] = {s: {"images": [], "annotations": []} for s in SPLITS}
    for sample, result in zip(samples, results):
        if isinstance(result, str):
            if not skip_bad:
                raise DataError(result)
            summary.skipped.append(result)
            continue
        split_records = records[sample.split]
        image_id = len(split_records["images"]) + 1
        split_records["images"].append({"id": image_id, **result.image})
        split_records["annotations"].append({"image_id": image_id, **result.annotation})
        summary.add(sample.split, result)
    return records


def _run_workers(jobs: list[tuple], workers: int, progress: bool) -> list[ImageResult | str]:
    """Process jobs in order, in `workers` processes (in this process when workers <= 1)."""
    bar = tqdm(total=len(jobs), desc="build-dataset", unit="img", disable=not progress)
    try:
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(_process_or_error(job))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, min(16, len(jobs) // (workers * 4)))
            results = []
            for result in pool.map(_process_or_error, jobs, chunksize=chunk):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()

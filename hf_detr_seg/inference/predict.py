"""`predict_paths`: a folder (or thousands of photos) in, per-image files and one report out; resumable, and
spread over the processes `accelerate launch` starts.

Each image's files are written as soon as it is predicted (`writers`), so a crashed run loses at most the images
in flight; `skip_existing` then leaves alone every image whose files are complete and were made with the same
settings, and the new run's `report.csv` (and COCO export) still lists every image, the skipped ones read back
from their JSON. Images are cut into groups of `batch_size` (the segmenter's unit, see `segmenter`); with
several processes each takes every N-th group (`processes.Processes`), and the per-image report rows and COCO
annotations are gathered and written by the main process in the order of the inputs, so the merged files are
those of a one-process run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, UserInputError
from ..labels import LabelMap
from ..processes import Processes
from .inputs import expand_inputs, output_stems, read_photo
from .results import SegmentationResult
from .segmenter import DefectSegmenter
from .writers import (
    REPORT_FILE,
    coco_annotations,
    complete_document,
    image_document,
    json_default,
    report_rows,
    saved_id_map,
    write_image_outputs,
)


@dataclass
class _Record:
    """What the run's merged files need from one image, whichever process predicted it."""

    index: int  # position among all inputs
    rows: list[dict[str, Any]]
    size: tuple[int, int]
    coco: list[dict[str, Any]] | None
    skipped: bool


@dataclass
class _Run:
    """One run's fixed parts: where it writes, what it writes, and this process's records so far."""

    segmenter: DefectSegmenter
    out: Path
    paths: list[Path]
    stems: list[str]
    settings: dict[str, Any]
    mm_per_pixel: float | None
    coco: bool
    records: list[_Record] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def label_map(self) -> LabelMap:
        return self.segmenter.label_map

    @property
    def background(self) -> set[str]:
        return {c.name for c in self.label_map.classes if c.background}

    def keep(self, index: int, document: dict, id_map: np.ndarray | None, skipped: bool) -> None:
        """Record one image (rows always come from the JSON-shaped document, fresh or read back)."""
        if self.coco and id_map is None:
            id_map = saved_id_map(self.out, self.stems[index])
        annotations = coco_annotations(id_map, document) if self.coco else None
        size = (int(document["height"]), int(document["width"]))
        self.records.append(_Record(index, report_rows(document, self.background), size, annotations, skipped))

    def write(self, index: int, image: np.ndarray, result: SegmentationResult) -> None:
        """The files of one freshly predicted image, then its record."""
        from ..overlay import draw_overlay

        document = image_document(self.paths[index], result, self.label_map, self.settings, self.mm_per_pixel)
        document = json.loads(json.dumps(document, default=json_default))  # as a later run will read it back
        colors = {c.name: tuple(c.color) for c in self.label_map.classes}
        overlay = draw_overlay(image, result, colors, skip_labels=self.background)
        write_image_outputs(self.out, self.stems[index], result.id_map, document, overlay)
        self.keep(index, document, result.id_map, skipped=False)


def predict_paths(
    model_dir: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    threshold: float | None = None,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    mm_per_pixel: float | None = None,
    batch_size: int = 4,
    image_size: int | None = None,
    device: str | None = None,
    coco_json: str | Path | None = None,
    skip_existing: bool = False,
    progress: bool = False,
    processes: Processes | None = None,
) -> dict:
    """Predict every image of `inputs` (files, folders, glob patterns) and write, per image, into `out_dir`
    `<stem>_panoptic.png`, `<stem>.json` and `<stem>_overlay.png` (`writers`), and one `report.csv` with a row
    per defect (every segment but the background class). Lengths, widths and `area` are in mm (mm^2) when
    `mm_per_pixel` is given, else pixels; boxes are pixels. Two inputs with the same stem get `<stem>-2`...
    Unreadable images are printed to stderr, listed in `failed` and skipped. `coco_json`: also write every
    segment of the run (stuff included, with its score) to this one COCO instances file (`coco_export`).
    `skip_existing`: leave images whose outputs are complete (module docstring). `progress`: a progress bar over
    images (and tiles). `processes`: this process's share of a multi-process run (default: one process).
    Returns {"images": predicted, "skipped", "segments": report rows, "failed": [(path, message)], "out",
    "coco_json": the file or None, "main": whether this process wrote the merged files}.
    """
    if mm_per_pixel is not None and not mm_per_pixel > 0:
        raise UserInputError(f"mm_per_pixel must be positive, got {mm_per_pixel!r}")
    processes = processes or Processes()
    out = Path(out_dir)
    paths = expand_inputs(inputs, exclude=out)
    segmenter = DefectSegmenter.from_pretrained(
        model_dir, device=device or processes.device, threshold=threshold, image_size=image_size,
        tile_size=tile_size, tile_overlap=tile_overlap, batch_size=batch_size,
    )
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(model_dir), "threshold": segmenter.threshold, "image_size": segmenter.image_size,
                "tile_size": tile_size, "tile_overlap": tile_overlap if tile_size is not None else None,
                "mm_per_pixel": mm_per_pixel, "unit": "mm" if mm_per_pixel is not None else "px"}
    run = _Run(segmenter, out, paths, output_stems(paths), settings, mm_per_pixel, coco_json is not None)
    groups = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    mine = processes.share(groups)
    with _progress_bar(sum(map(len, mine)), processes, progress) as bar:
        for group in mine:
            _predict_group(run, group, skip_existing, bar)
    return _merge(run, processes, coco_json)


def _predict_group(run: _Run, group: list[int], skip_existing: bool, bar) -> None:
    """Predict one group's images (or take the complete ones as they are) and record each one."""
    todo = []
    for index in group:
        document = complete_document(run.out, run.stems[index], run.paths[index], run.settings) if skip_existing else None
        if document is None:
            todo.append(index)
        else:
            run.keep(index, document, None, skipped=True)
            bar.update(1)
    images: dict[int, np.ndarray] = {}

    def load(position: int) -> np.ndarray:
        images[position] = read_photo(run.paths[todo[position]])
        return images[position]

    on_batch = partial(_count_tiles, bar)
    for position, outcome in run.segmenter.predict_group([partial(load, p) for p in range(len(todo))], on_batch):
        index = todo[position]
        if isinstance(outcome, DataError):
            run.failed.append((index, str(run.paths[index]), str(outcome)))
            print(f"skipped {run.paths[index]}: {outcome}", file=sys.stderr)
        else:
            run.write(index, images.pop(position), outcome)
        bar.update(1)


def _merge(run: _Run, processes: Processes, coco_json: str | Path | None) -> dict:
    """Gather every process's records; the main process writes report.csv (and the COCO file) in input order."""
    from ..coco_export import CocoInstancesWriter
    from ..overlay import write_report_csv

    records = sorted(processes.gather(run.records), key=lambda r: r.index)
    failed = sorted(processes.gather(run.failed))
    rows = [row for record in records for row in record.rows]
    if processes.is_main:
        write_report_csv(rows, run.out / REPORT_FILE)
        if coco_json is not None:
            writer = CocoInstancesWriter(run.label_map, description=f"hf-detr-seg predictions of {run.settings['model']}")
            for record in records:
                writer.add_annotations(run.paths[record.index].name, *record.size, record.coco)
            writer.write(coco_json)
    processes.wait()
    skipped = sum(record.skipped for record in records)
    return {"images": len(records) - skipped, "skipped": skipped, "segments": len(rows),
            "failed": [(path, message) for _, path, message in failed], "out": str(run.out),
            "coco_json": str(coco_json) if coco_json is not None else None, "main": processes.is_main}


def _progress_bar(total: int, processes: Processes, enabled: bool):
    """A bar over this process's images, its postfix counting tiles (a 48-MP photo is hundreds of them)."""
    from tqdm.auto import tqdm

    where = f" [process {processes.index + 1}/{processes.count}]" if processes.count > 1 else ""
    bar = tqdm(total=total, desc=f"predict{where}", unit="img", position=processes.index, disable=not enabled,
               dynamic_ncols=True)
    bar.tiles = 0
    return bar


def _count_tiles(bar, count: int) -> None:
    bar.tiles += count
    bar.set_postfix(tiles=bar.tiles, refresh=False)

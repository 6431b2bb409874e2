"""Hub-format model folders: weights, config with the label map, processor, run settings, metrics, model card;
and the upload of such a folder with `huggingface_hub`.

A folder is written into a temporary sibling and its files moved in only when all are written, so an
interrupted save never leaves a model whose weights and config disagree.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from transformers import DetrForSegmentation, DetrImageProcessor, PreTrainedConfig

from .errors import UserInputError
from .labels import LabelMap
from .postprocess import model_overlap_threshold, model_threshold

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
_COUNTS = {"epoch", "step"}  # metrics that count rather than score


def save_model_folder(
    model: DetrForSegmentation,
    processor: DetrImageProcessor,
    folder: Path,
    label_map: LabelMap | None,
    run_settings: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write a folder that `DetrForSegmentation.from_pretrained` and the 🤗 pipeline load as it is.

    `label_map`, the run's (None: the model's own), becomes the config's: a stage-2 model carries the roles of the
    dataset it was last trained on even when its stage-1 start was saved before they were set. The run's
    `eval_threshold` becomes the config's `score_threshold`, the default of `predict` and `evaluate`. The card is then
    written from the config alone, as anyone reading the folder will see the model.
    """
    if label_map is not None:
        model.config.label_map = label_map.to_dict()
    if "eval_threshold" in run_settings:  # the threshold the metrics were measured at is the model's own
        model.config.score_threshold = float(run_settings["eval_threshold"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RUN_FILE).write_text(yaml.safe_dump(run_settings, sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        (tmp / CARD_FILE).write_text(model_card(model.config, run_settings, metrics.get("final", {})))
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_card(config: PreTrainedConfig, run_settings: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The README of a model folder, from its config, run settings and final metrics alone (no local path: a
    card is published): what it detects, its label map and roles, data, metrics, usage and limits."""
    import torch
    import transformers

    from .modeling import label_map_from_config

    label_map = label_map_from_config(config)
    stage = run_settings.get("stage")
    what = "box detection (stage 1; masks not trained yet)" if stage == 1 else "panoptic segmentation"
    threshold = model_threshold(config)
    overlap = model_overlap_threshold(config)
    return f"""---
library_name: transformers
pipeline_tag: image-segmentation
tags: [detr, panoptic-segmentation, concrete-defects, hf-detr-seg]
---
# DETR {what} of concrete defects

A `DetrForSegmentation` fine-tuned with the hf_detr_seg toolkit to find
{', '.join(c.name for c in label_map.user_classes if not c.background)} in inspection photos.

## Classes (label map)
{_classes_table(label_map)}
## Training data and settings
Dataset: {_dataset_name(run_settings)}; stage {stage}; preset `{run_settings.get('preset')}`;
image size {run_settings.get('image_size')} (shortest edge); see `{RUN_FILE}` for every setting.

## Validation metrics
| metric | value |
|---|---|
{_metric_rows(metrics)}

## How to use
```python
from transformers import pipeline
segmenter = pipeline("image-segmentation", model="path/or/hub-id")
segments = segmenter("photo.jpg", subtask="panoptic", threshold={threshold},
                     overlap_mask_area_threshold={overlap})
```
or `hf-detr-seg predict --model path/or/hub-id photo.jpg --out results/` (tiles, overlays, measurements).
Queries scoring above {threshold} are kept, and make a segment when they win more than {overlap} of their mask's
pixels: the settings the metrics above were measured at.

## Limits
Trained on the data above only; photos of other surfaces, lighting or resolutions need checking before use.
Measurements are only as good as the given millimetres per pixel.

Versions: transformers {transformers.__version__}, torch {torch.__version__}.
"""


def _classes_table(label_map: LabelMap) -> str:
    """The label map as a Markdown table, with each class's role (how `predict` measures it)."""
    rows = "\n".join(
        f"| {i} | {c.name} | {'thing' if c.isthing else 'stuff'} | "
        f"{'background' if c.background else c.measure} | {c.category_id} |"
        for i, c in enumerate(label_map.classes)
        if not c.from_coco
    )
    coco_note = (
        "\nCOCO's 133 panoptic categories are kept (`coco_base`), with their COCO ids, before these classes.\n"
        if label_map.coco_base
        else ""
    )
    header = "| model index | class | kind | measured as | dataset category id |\n|---|---|---|---|---|"
    return f"{header}\n{rows}\n{coco_note}"


def _dataset_name(run_settings: dict[str, Any]) -> str:
    """`dataset_name` when the run gave one, else the dataset folder's base name: never a local path."""
    name = run_settings.get("dataset_name") or (
        Path(run_settings["dataset_dir"]).name if run_settings.get("dataset_dir") else None
    )
    return f"`{name}`" if name else "not recorded"


def _metric_rows(metrics: dict[str, Any]) -> str:
    """Counts (epoch, step) as integers, scores with 3 decimals; nested tables (per class) stay in metrics.json."""
    rows = [
        f"| {key} | {int(value) if key in _COUNTS else f'{value:.3f}'} |"
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return "\n".join(rows) or "| (none yet) | |"


def push_folder(
    folder: Path, repo_id: str, private: bool = False, dry_run: bool = False, api: Any | None = None
) -> list[str]:
    """Upload a model (or dataset) folder's files; `dry_run` only lists them and needs no network."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / "labels.yaml").is_file():
        raise UserInputError(f"{folder}: neither a model folder (config.json) nor a built dataset (labels.yaml)")
    files = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part in ("checkpoints", "best") for part in p.relative_to(folder).parts)
    )
    if dry_run:
        return files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo_type = "model" if (folder / "config.json").is_file() else "dataset"
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, allow_patterns=files)
    return files

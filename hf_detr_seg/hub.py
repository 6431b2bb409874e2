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
from transformers import DetrForSegmentation, DetrImageProcessor

from .errors import UserInputError
from .labels import LabelMap

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


def save_model_folder(
    model: DetrForSegmentation,
    processor: DetrImageProcessor,
    folder: Path,
    label_map: LabelMap,
    run_settings: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write a folder that `DetrForSegmentation.from_pretrained` and the 🤗 pipeline load as it is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RUN_FILE).write_text(yaml.safe_dump(run_settings, sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        (tmp / CARD_FILE).write_text(model_card(label_map, run_settings, metrics.get("final", {})))
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_card(label_map: LabelMap, run_settings: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The README of a model folder: what it detects, its label map, data, metrics, usage and limits."""
    import torch
    import transformers

    rows = "\n".join(
        f"| {i} | {c.name} | {'thing' if c.isthing else 'stuff'} | {c.category_id} |"
        for i, c in enumerate(label_map.classes)
        if not c.from_coco
    )
    coco_note = (
        "\nCOCO's 133 panoptic categories are kept (`coco_base`), with their COCO ids, before these classes.\n"
        if label_map.coco_base
        else ""
    )
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in shown.items()) or "| (none yet) | |"
    stage = run_settings.get("stage")
    what = "box detection (stage 1; masks not trained yet)" if stage == 1 else "panoptic segmentation"
    return f"""---
library_name: transformers
pipeline_tag: image-segmentation
tags: [detr, panoptic-segmentation, concrete-defects, hf-detr-seg]
---
# DETR {what} of concrete defects

A `DetrForSegmentation` fine-tuned with [hf_detr_seg](https://pypi.org/project/hf-detr-seg/) to find
{', '.join(c.name for c in label_map.user_classes)} in inspection photos.

## Classes (label map)
| model index | class | kind | dataset category id |
|---|---|---|---|
{rows}
{coco_note}
## Training data and settings
Dataset folder: `{run_settings.get('dataset_dir')}`; stage {stage}; preset `{run_settings.get('preset')}`;
image size {run_settings.get('image_size')} (shortest edge); see `{RUN_FILE}` for every setting.

## Validation metrics
| metric | value |
|---|---|
{metric_rows}

## How to use
```python
from transformers import pipeline
segmenter = pipeline("image-segmentation", model="path/or/hub-id")
```
or `hf-detr-seg predict --model path/or/hub-id photo.jpg --out results/` (tiles, overlays, measurements).
Keep queries scoring above 0.85 (the toolkit's default threshold).

## Limits
Trained on the data above only; photos of other surfaces, lighting or resolutions need checking before use.
Measurements are only as good as the given millimetres per pixel.

Versions: transformers {transformers.__version__}, torch {torch.__version__}.
"""


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

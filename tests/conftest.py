"""Shared fixtures. Tests never touch the network: the Hub is offline for the whole session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPCRACK_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "deepcrack-sample"


@pytest.fixture(scope="session")
def deepcrack_sample() -> Path:
    """The real 160-image crack sample beside the checkout (required: the data path is tested on it)."""
    assert (DEEPCRACK_SAMPLE / "train" / "images").is_dir(), f"missing {DEEPCRACK_SAMPLE}"
    return DEEPCRACK_SAMPLE


def save_rgb(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, **kwargs)
    return path


def save_mask(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def save_tiny_model(folder: Path, label_map, image_size: int) -> Path:
    """A tiny `DetrForSegmentation` for `label_map` (seeded, so the same every run), saved as a model folder."""
    import torch

    from hf_detr_seg.hub import save_model_folder
    from hf_detr_seg.modeling import build_image_processor, build_model

    torch.manual_seed(0)
    model = build_model(label_map, preset="tiny")
    save_model_folder(model, build_image_processor(image_size), folder, label_map, {"image_size": image_size}, {})
    return folder


def predictions_from_truth(dataset: Path, out: Path, widen: int = 0, drop_cracks: bool = False) -> Path:
    """A `predict`-like folder whose segments are the val truth's, crack segments widened by `widen` px."""
    import cv2

    from hf_detr_seg.data.panoptic import (
        annotation_folder, annotation_json, load_dataset_label_map, read_json, read_panoptic_png, write_panoptic_png,
    )

    label_map = load_dataset_label_map(dataset)
    data = read_json(annotation_json(dataset, "val"))
    files = {image["id"]: image["file_name"] for image in data["images"]}
    out.mkdir()
    for annotation in data["annotations"]:
        ids = read_panoptic_png(annotation_folder(dataset, "val") / annotation["file_name"])
        segments = []
        for s in annotation["segments_info"]:
            info = label_map.classes[label_map.index_of_category(s["category_id"])]
            if info.measure == "crack" and drop_cracks:
                ids[ids == s["id"]] = 0
                continue
            if info.measure == "crack" and widen:
                grown = cv2.dilate((ids == s["id"]).astype(np.uint8), np.ones((2 * widen + 1,) * 2, np.uint8))
                ids[grown > 0] = s["id"]
            segments.append({"id": s["id"], "class": info.name})
        stem = Path(files[annotation["image_id"]]).stem
        write_panoptic_png(out / f"{stem}_panoptic.png", ids.astype(np.uint32))
        (out / f"{stem}.json").write_text(json.dumps({"segments": segments}))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small built demo dataset (10 images of 96 px, 8 train / 2 val) for training and CLI tests."""
    from hf_detr_seg.data.builder import build_dataset
    from hf_detr_seg.data.demo import generate_demo_data

    tmp = tmp_path_factory.mktemp("small-demo")
    src = generate_demo_data(tmp / "src", num_images=10, size=96, seed=1)
    build_dataset(src / "images", src / "masks", src / "labels.yaml", tmp / "ds", val_fraction=0.2, progress=False)
    return tmp / "ds"

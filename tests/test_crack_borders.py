"""No false crack bands along image borders: the DeepCrack recipe's context margin, checked on real crack photos.

Both models are trained alike for a few minutes on the real crack sample (the shipped recipe's settings, fewer
epochs), one with the recipe's margin and one without. Each then predicts the val crops with their cracks
painted out (OpenCV inpainting of the dilated true crack mask): crack-free concrete, where every crack pixel is
false. Without a margin the feature maps' edges are the image's, and the model draws crack pixels along the
border; with it, the border band gets fewer and the inside far fewer. (Trained for minutes, both models still
draw many along the border; the README gives the fully trained recipe's figures.)

The models train on shuffled batches with contiguous weights, not the recipe's size-grouped, channels-last ones:
after so few steps the outcome depends on what the batches hold. With grouped batches (less zero padding beside
the images' bottom and right edges) the model without a margin marked fewer border pixels (0.42 of the band,
against 0.45 with the margin) and the one with it more inside (0.14); on shuffled batches the same settings
measured 0.39 / 0.05 with the margin and 0.81 / 0.28 without, and 0.50 / 0.05 against 0.84 / 0.27 in another
run (1 and 2 threads). These figures were measured before the recipe lowered its overlap threshold to 0.5, which
the models here now take from it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hf_detr_seg.config import load_config
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.inference.segmenter import DefectSegmenter
from hf_detr_seg.modeling import label_map_from_config
from hf_detr_seg.training import run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/configs/deepcrack-cpu.yaml"
BAND = 8  # pixels from the border


def train(dataset: Path, out: Path, margin: int) -> Path:
    """Both stages of the DeepCrack recipe with `margin`, 10 + 5 epochs of the 120 sample crops, no lr drop,
    shuffled batches and contiguous weights (module docstring)."""
    common = ["--config", str(RECIPE), "--dataset_dir", str(dataset), "--context_margin", str(margin),
              "--lr_drop_epochs", "--eval_max_images", "8", "--logging_steps", "1000",
              "--group_by_size", "false", "--channels_last", "false"]
    run(load_config(1, [*common, "--output_dir", str(out / "stage1"), "--num_train_epochs", "10"]))
    run(load_config(2, [*common, "--output_dir", str(out / "stage2"), "--model_name_or_path", str(out / "stage1"),
                        "--num_train_epochs", "5"]))
    return out / "stage2"


def crack_free_photos(folder: Path) -> list[np.ndarray]:
    """The split's photos with their cracks painted out."""
    photos = []
    for path in sorted((folder / "images").glob("*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"))
        cracks = (np.asarray(Image.open(folder / "masks" / path.name).convert("L")) > 127).astype(np.uint8)
        photos.append(cv2.inpaint(image, cv2.dilate(cracks, np.ones((7, 7), np.uint8)), 5, cv2.INPAINT_TELEA))
    return photos


def false_crack_fractions(model: Path, photos: list[np.ndarray]) -> tuple[float, float]:
    """The fraction of pixels predicted as crack within `BAND` px of the border, and further inside."""
    segmenter = DefectSegmenter.from_pretrained(model)
    cracks = set(label_map_from_config(segmenter.model.config).crack_indices)
    band_hits = band_pixels = inside_hits = inside_pixels = 0
    for photo in photos:
        result = segmenter(photo)
        predicted = np.isin(result.id_map, [s.id for s in result.segments if s.label_id in cracks])
        band = np.ones(predicted.shape, bool)
        band[BAND:-BAND, BAND:-BAND] = False
        band_hits += np.count_nonzero(predicted & band)
        band_pixels += np.count_nonzero(band)
        inside_hits += np.count_nonzero(predicted & ~band)
        inside_pixels += np.count_nonzero(~band)
    return band_hits / band_pixels, inside_hits / inside_pixels


@pytest.mark.slow
def test_the_margin_cuts_false_cracks_along_crack_free_borders(deepcrack_sample: Path, tmp_path: Path):
    dataset = tmp_path / "dataset"
    build_dataset(deepcrack_sample / "train/images", deepcrack_sample / "train/masks",
                  REPO / "recipes/configs/deepcrack-cpu-labels.yaml", dataset,
                  val_images=deepcrack_sample / "val/images", val_masks=deepcrack_sample / "val/masks", progress=False)
    photos = crack_free_photos(deepcrack_sample / "val")
    band_with, inside_with = false_crack_fractions(train(dataset, tmp_path / "margin", 16), photos)
    band_without, inside_without = false_crack_fractions(train(dataset, tmp_path / "none", 0), photos)
    # measured: 0.50 and 0.39 of the band with the margin against 0.84 and 0.81 without, inside 0.05 against
    # 0.27 and 0.28 (with 20 + 10 epochs: 0.21 against 0.52, inside 0.06 against 0.18)
    assert band_with < 0.8 * band_without, (band_with, band_without)
    assert inside_with < 0.5 * inside_without, (inside_with, inside_without)

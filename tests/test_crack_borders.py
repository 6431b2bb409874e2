"""No false crack bands along image borders: the DeepCrack recipe's context margin and defect-free crops, checked
on real crack photos.

Two models are trained alike for a few minutes on the real crack sample (the shipped recipe's settings, fewer
epochs), one with the recipe's margin and one without. Each then predicts the val crops with their cracks
painted out (benchmarks/crack_borders.py): crack-free concrete, where every crack pixel is false. Without a
margin the feature maps' edges are the image's, and the model draws more crack pixels along the border.

The recipe also trains a quarter of its crops with their cracks painted out the same way (`defect_free_prob`),
so the band's figures here check both causes of false bands together: the padding (the margin) and a training
set whose every crop has a crack reaching the border. With both, the models mark 3 % of the band; before the
recipe had defect-free crops (and at the overlap threshold 0.8), they marked 39-50 % with the margin and 81-84 %
without. Measured on the recipe (defect-free crops, skeleton recall): 0.026 of the band with the margin against
0.070 without, inside 0.009 against 0.029 (before skeleton recall: 0.032 and 0.055, inside 0.016 and 0.020).

The models train on shuffled batches with contiguous weights, not the recipe's size-grouped, channels-last ones:
after so few steps the outcome depends on what the batches hold.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from hf_detr_seg.config import load_config
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.panoptic import load_dataset_label_map
from hf_detr_seg.inference import predict_paths
from hf_detr_seg.training import run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import crack_borders  # noqa: E402
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


def false_crack_fractions(model: Path, dataset: Path, tmp_path: Path) -> tuple[float, float]:
    """The fraction of pixels `model` predicts as crack within `BAND` px of the border, and further inside, on the
    val images with their cracks painted out (`benchmarks/crack_borders.py`)."""
    painted, predictions = tmp_path / "painted", tmp_path / "predictions"
    painted.mkdir(exist_ok=True)
    shapes = crack_borders.write_crack_free_images(dataset, "val", painted)
    predict_paths(str(model), [painted], predictions, progress=False)
    marks = crack_borders.crack_free_marks(predictions, shapes, load_dataset_label_map(dataset), BAND)
    shutil.rmtree(predictions)
    return marks["band_marked"], marks["inside_marked"]


@pytest.mark.slow
def test_crack_free_borders_are_clean_and_the_margin_cleaner(deepcrack_sample: Path, tmp_path: Path):
    dataset = tmp_path / "dataset"
    build_dataset(deepcrack_sample / "train/images", deepcrack_sample / "train/masks",
                  REPO / "recipes/configs/deepcrack-cpu-labels.yaml", dataset,
                  val_images=deepcrack_sample / "val/images", val_masks=deepcrack_sample / "val/masks", progress=False)
    band_with, inside_with = false_crack_fractions(train(dataset, tmp_path / "margin", 16), dataset, tmp_path)
    band_without, _ = false_crack_fractions(train(dataset, tmp_path / "none", 0), dataset, tmp_path)
    assert band_with < 0.1, (band_with, inside_with)  # 39-50 % before defect-free crops (module docstring)
    assert band_with < 0.8 * band_without, (band_with, band_without)

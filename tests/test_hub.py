"""The model card: written from the saved model alone, publishable (no local paths), readable numbers."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from conftest import save_tiny_model
from transformers import DetrConfig

from hf_detr_seg.hub import CARD_FILE, model_card, save_model_folder
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.modeling import build_image_processor, build_model
from hf_detr_seg.postprocess import DEFAULT_THRESHOLD, model_threshold

LABELS = {"mask_format": "indexed", "classes": [
    {"name": "Riss", "isthing": False, "value": 1, "measure": "crack"},
    {"name": "spalling", "isthing": True, "value": 2},
    {"name": "surface", "isthing": False, "background": True, "value": 0}]}
RUN = {"stage": 2, "dataset_dir": "/tmp/pytest-of-someone/deepcrack-built/dataset", "preset": "tiny",
       "image_size": 64, "eval_threshold": 0.7}
FINAL = {"epoch": 12, "step": 3456, "pq": 0.41237, "bbox_map": 0.5, "per_class": {"Riss": {"pq": 0.4}}}


@pytest.fixture(scope="module")
def config() -> DetrConfig:
    return build_model(LabelMap.from_dict(LABELS), preset="tiny").config


def test_card_names_the_dataset_without_a_local_path(config: DetrConfig):
    card = model_card(config, RUN, FINAL)
    assert "/tmp" not in card and "Dataset: `dataset`" in card
    assert "Dataset: `DeepCrack val`" in model_card(config, {**RUN, "dataset_name": "DeepCrack val"}, FINAL)
    assert "Dataset: not recorded" in model_card(config, {"stage": 1}, {})


def test_card_counts_are_integers_and_scores_have_3_decimals(config: DetrConfig):
    card = model_card(config, RUN, FINAL)
    assert "| epoch | 12 |" in card and "| step | 3456 |" in card
    assert "| pq | 0.412 |" in card and "| bbox_map | 0.500 |" in card
    assert "per_class" not in card and not re.search(r"\d\.\d{4}", card)


def test_card_shows_roles_and_the_threshold_and_links_nowhere(config: DetrConfig):
    config = copy.deepcopy(config)
    config.score_threshold = 0.7
    config.overlap_mask_area_threshold = 0.4
    card = model_card(config, RUN, FINAL)
    assert "| 0 | Riss | stuff | crack | 1 |" in card and "| 1 | spalling | thing | area | 2 |" in card
    assert "| 2 | surface | stuff | background | 3 |" in card
    assert 'segmenter("photo.jpg", subtask="panoptic", threshold=0.7,' in card
    assert "overlap_mask_area_threshold=0.4)" in card
    assert "http" not in card.split("---", 2)[2]


def test_saved_card_comes_from_the_model_config(tmp_path: Path):
    """The run's label map (here with a role the model's config lacked) becomes the config's, card included."""
    labels = LabelMap.from_dict(LABELS)
    model = build_model(LabelMap.from_dict({**LABELS, "classes": [{**LABELS["classes"][0], "measure": "area"},
                                                                  *LABELS["classes"][1:]]}), preset="tiny")
    folder = save_model_folder(model, build_image_processor(64), tmp_path / "m", labels, RUN, {"final": FINAL})
    assert (folder / CARD_FILE).read_text() == model_card(model.config, RUN, FINAL)
    assert "| 0 | Riss | stuff | crack | 1 |" in (folder / CARD_FILE).read_text()
    assert "threshold=0.7," in (folder / CARD_FILE).read_text()
    assert save_tiny_model(tmp_path / "plain", labels, 64).joinpath(CARD_FILE).is_file()


def test_the_run_threshold_travels_with_the_model(tmp_path: Path):
    """`eval_threshold` is saved as the config's `score_threshold`, which `predict` and `evaluate` default to;
    a model without one falls back to DETR's 0.85."""
    labels = LabelMap.from_dict(LABELS)
    model = build_model(labels, preset="tiny")
    assert model_threshold(model.config) == DEFAULT_THRESHOLD
    folder = save_model_folder(model, build_image_processor(64), tmp_path / "m", labels, RUN, {"final": FINAL})
    assert model_threshold(DetrConfig.from_pretrained(folder)) == 0.7

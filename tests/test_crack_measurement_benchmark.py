"""benchmarks/crack_measurement.py on a tiny synthetic case: predictions equal to the truth, widened, or absent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import predictions_from_truth, save_tiny_model

from hf_detr_seg.data.panoptic import load_dataset_label_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import crack_measurement  # noqa: E402

from hf_detr_seg.baselines import otsu_scores  # noqa: E402


def test_predictions_equal_to_the_truth_measure_without_error(dataset: Path, tmp_path: Path):
    summary = crack_measurement.compare_split(dataset, predictions_from_truth(dataset, tmp_path / "same"))
    assert summary["true_cracks"] == summary["predicted_cracks"] == summary["matched"] > 0
    assert summary["median_mean_width_error_px"] == 0 and summary["median_length_ratio"] == 1
    assert summary["pixels"] == {"precision": 1, "recall": 1, "f1": 1}


def test_widened_predictions_measure_wider_and_missing_ones_match_nothing(dataset: Path, tmp_path: Path, capsys):
    widened = predictions_from_truth(dataset, tmp_path / "wide", widen=1)
    summary = crack_measurement.main([str(dataset), "--predictions", str(widened), "--json", str(tmp_path / "s.json")])
    assert summary["matched"] == summary["true_cracks"]
    assert summary["median_mean_width_error_px"] == pytest.approx(2, abs=0.7)
    assert 0.85 <= summary["median_length_ratio"] <= 1.15
    assert json.loads(capsys.readouterr().out) == summary == json.loads((tmp_path / "s.json").read_text())
    assert summary["pixels"]["recall"] == 1 and summary["pixels"]["precision"] < 0.7  # 1-px cracks made 3 px wide
    otsu = otsu_scores(dataset, "val")
    assert summary["otsu_pixels"] == {k: round(float(otsu[k]), 3) for k in ("precision", "recall", "f1")}
    no_cracks = predictions_from_truth(dataset, tmp_path / "none", drop_cracks=True)
    empty = crack_measurement.compare_split(dataset, no_cracks)
    assert empty["matched"] == empty["predicted_cracks"] == 0 and empty["median_length_ratio"] is None
    assert empty["pixels"] == {"precision": 0, "recall": 0, "f1": 0}


def test_predicted_classes_the_dataset_lacks_are_left_out(dataset: Path, tmp_path: Path):
    """A model from another dataset (its background named differently) is compared on the crack class alone."""
    other = predictions_from_truth(dataset, tmp_path / "other")
    for document_path in other.glob("*.json"):
        document = json.loads(document_path.read_text())
        for segment in document["segments"]:
            segment["class"] = segment["class"] if segment["class"] == "crack" else "asphalt"
        document_path.write_text(json.dumps(document))
    summary = crack_measurement.compare_split(dataset, other)
    assert summary["pixels"] == {"precision": 1, "recall": 1, "f1": 1} and summary["matched"] == summary["true_cracks"]


def test_a_missing_predictions_folder_is_an_error(dataset: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        crack_measurement.main([str(dataset), "--predictions", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "nowhere: no such folder" in capsys.readouterr().err


def test_a_predictions_folder_without_an_image_of_the_split_is_an_error(dataset: Path, tmp_path: Path, capsys):
    predictions = predictions_from_truth(dataset, tmp_path / "partial")
    documents = sorted(predictions.glob("*.json"))
    documents[0].unlink()
    with pytest.raises(SystemExit) as exit_info:
        crack_measurement.main([str(dataset), "--predictions", str(predictions)])
    assert exit_info.value.code == 2
    assert f"no predict output for 1 of the {len(documents)} val images (the first: {documents[0].name})" in (
        capsys.readouterr().err)


def test_a_model_is_run_through_predict_first(dataset: Path, tmp_path: Path):
    model = save_tiny_model(tmp_path / "model", load_dataset_label_map(dataset), 64)
    summary = crack_measurement.main([str(dataset), "--model", str(model), "--threshold", "0.5"])
    assert summary["true_cracks"] > 0 and summary["matched"] <= summary["predicted_cracks"]

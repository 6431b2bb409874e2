"""benchmarks/crack_borders.py on the small demo set: predictions equal to the truth, with a false crack band
along the top border, and a model run on the split and on its crack-free copies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import predictions_from_truth, save_tiny_model
from PIL import Image
from scipy import ndimage

from hf_detr_seg.data.defect_free import PAINT_DILATION
from hf_detr_seg.data.panoptic import image_folder, load_dataset_label_map, read_panoptic_png, write_panoptic_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import crack_borders  # noqa: E402


def with_top_band(predictions: Path, rows: int) -> Path:
    """The folder's predictions with the first `rows` rows of every image drawn as one more crack."""
    for document_path in predictions.glob("*.json"):
        document = json.loads(document_path.read_text())
        png = predictions / f"{document_path.stem}_panoptic.png"
        ids = read_panoptic_png(png)
        ids[:rows] = ids.max() + 1
        document["segments"].append({"id": int(ids.max()), "class": "crack"})
        write_panoptic_png(png, ids)
        document_path.write_text(json.dumps(document))
    return predictions


def test_the_truth_scores_alike_in_band_and_inside(dataset: Path, tmp_path: Path):
    # The one true crack of the two val images ends 11 px from the bottom border.
    summary = crack_borders.compare_borders(dataset, predictions_from_truth(dataset, tmp_path / "same"), band=16)
    for region in crack_borders.REGIONS:
        scores = summary[region]
        assert (scores["precision"], scores["recall"], scores["false_positive_rate"]) == (1, 1, 0)
        assert scores["far_false_per_1000"] == 0 and 0 < scores["crack_share"] < 1
    assert summary["most_far_false_in_band"] == []
    assert summary["band_minus_inside_precision"] == {"difference": 0, "ci95": [0, 0]}


def test_a_false_band_along_the_border_is_found_there_only(dataset: Path, tmp_path: Path, capsys):
    banded = with_top_band(predictions_from_truth(dataset, tmp_path / "banded"), rows=4)
    summary = crack_borders.main([str(dataset), "--predictions", str(banded), "--json", str(tmp_path / "s.json")])
    split = summary["split"]
    assert split["inside"]["precision"] == 1 and split["inside"]["false_positive_rate"] == 0
    assert split["band"]["precision"] < 1 and split["band"]["false_positive_rate"] > 0
    assert split["band"]["far_false_per_1000"] == pytest.approx(1000 * 4 * 96 / (96 * 96 - 80 * 80), abs=0.01)
    assert split["band_precision_at_inside_crack_share"] < 1
    assert len(split["most_far_false_in_band"]) == 2  # both val images
    gap = split["band_minus_inside_precision"]  # no true crack in the band: all of its cracks are false
    assert gap["difference"] == gap["ci95"][0] == -1
    assert json.loads(capsys.readouterr().out) == summary == json.loads((tmp_path / "s.json").read_text())
    narrow = crack_borders.main([str(dataset), "--predictions", str(banded), "--band", "2"])["split"]
    assert narrow["inside"]["false_positive_rate"] > 0  # rows 2 and 3 now lie inside


def test_the_precision_gap_interval_is_wide_when_one_image_holds_the_false_pixels():
    # [image, region, count]: 20 images alike in both regions, then one whose band holds 40 false pixels.
    per_image = np.zeros((21, 2, len(crack_borders.COUNTS)), np.int64)
    per_image[:, :, crack_borders.COUNTS.index("tp")] = 10
    per_image[:, :, crack_borders.COUNTS.index("fp")] = 2
    per_image[-1, 0, crack_borders.COUNTS.index("fp")] = 42
    gap = crack_borders.precision_difference_interval(per_image)
    assert gap["difference"] == pytest.approx(210 / 292 - 210 / 252, abs=1e-4)
    low, high = gap["ci95"]
    assert low < gap["difference"] < high == 0  # resamples without the image show no gap at all


def test_precision_at_another_crack_share():
    scores = {"recall": 0.8, "false_positive_rate": 0.01}
    assert crack_borders.precision_at_share(scores, 0.05) == pytest.approx(0.04 / (0.04 + 0.0095))
    assert crack_borders.precision_at_share(scores, 0.10) > crack_borders.precision_at_share(scores, 0.05)


def test_crack_free_images_have_their_cracks_painted_out(dataset: Path, tmp_path: Path):
    shapes = crack_borders.write_crack_free_images(dataset, "val", tmp_path)
    label_map = load_dataset_label_map(dataset)
    for name, cracks in crack_borders.true_cracks(dataset, "val", label_map).items():
        original = np.asarray(Image.open(image_folder(dataset, "val") / name).convert("RGB"), np.float64)
        painted = np.asarray(Image.open(tmp_path / f"{Path(name).stem}.png"), np.float64)
        assert shapes[Path(name).stem] == cracks.shape == painted.shape[:2]
        changed = np.abs(painted - original).sum(-1) > 0
        # The crack pixels are repainted, nothing beyond their rim (nothing at all without a crack).
        assert np.count_nonzero(changed & cracks) >= 0.9 * np.count_nonzero(cracks)
        distance = ndimage.distance_transform_edt(~cracks) if cracks.any() else np.full(cracks.shape, np.inf)
        assert not changed[distance > 2 * PAINT_DILATION].any()


def test_a_model_is_run_on_the_split_and_its_crack_free_copies(dataset: Path, tmp_path: Path):
    model = save_tiny_model(tmp_path / "model", load_dataset_label_map(dataset), 64)
    summary = crack_borders.main([str(dataset), "--model", str(model), "--threshold", "0.5"])
    assert set(summary["split"]) >= {"band", "inside", "band_precision_at_inside_crack_share"}
    crack_free = summary["crack_free"]
    assert crack_free["images"] == 2 and 0 <= crack_free["images_with_crack_pixels"] <= 2
    assert 0 <= crack_free["band_marked"] <= 1 and 0 <= crack_free["inside_marked"] <= 1


def test_a_missing_predictions_folder_or_bad_band_is_an_error(dataset: Path, tmp_path: Path, capsys):
    truth = str(predictions_from_truth(dataset, tmp_path / "truth"))
    for argv, message in (([str(dataset), "--predictions", str(tmp_path / "nowhere")], "nowhere: no such folder"),
                          ([str(dataset), "--predictions", truth, "--band", "0"], "--band 0")):
        with pytest.raises(SystemExit) as exit_info:
            crack_borders.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

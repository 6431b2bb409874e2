"""Long prediction jobs: resume with `--skip-existing`, and the same files and metrics from two processes as
from one (`accelerate launch --cpu --num_processes 2 -m hf_detr_seg.cli predict|evaluate`)."""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_inference import PerfectModel, band_image, diagonal_band

from hf_detr_seg.data.panoptic import load_dataset_label_map
from hf_detr_seg.hub import save_model_folder
from hf_detr_seg.inference import DefectSegmenter, predict_paths
from hf_detr_seg.modeling import build_image_processor, build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def confident_model(dataset: Path, tmp_path_factory) -> Path:
    """The tiny model with its class head and last mask convolution scaled up (seeded): random weights that
    give confident segments (spalling, efflorescence) of varied shapes, so that the files compared mean something."""
    label_map = load_dataset_label_map(dataset)
    torch.manual_seed(0)
    model = build_model(label_map, preset="tiny")
    with torch.no_grad():
        model.detr.class_labels_classifier.weight.mul_(200)
        model.mask_head.output_conv.weight.mul_(100)
    folder = tmp_path_factory.mktemp("confident") / "model"
    save_model_folder(model, build_image_processor(64), folder, label_map, {"image_size": 64}, {})
    return folder


def photos(folder: Path, dataset: Path) -> Path:
    """The dataset's training images, a larger photo made of four of them (tiled at 64 px) and a broken file."""
    folder.mkdir()
    images = sorted((dataset / "images" / "train").iterdir())
    for path in images:
        shutil.copy(path, folder / path.name)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images[:4]]
    large = np.concatenate([np.concatenate(arrays[:2], 1), np.concatenate(arrays[2:], 1)], 0)
    Image.fromarray(large).save(folder / "large.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


# ------------------------------------------------------------------------------------------- --skip-existing
def test_skip_existing_resumes_a_crashed_run_and_still_reports_every_image(tmp_path: Path, confident_model: Path,
                                                                           monkeypatch):
    fake = PerfectModel()
    monkeypatch.setattr(DefectSegmenter, "_predict_arrays", lambda self, arrays: fake(arrays))
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, size in enumerate([(80, 120), (70, 90), (100, 60)]):
        band = diagonal_band(*size, (5, 5), (size[0] - 5, size[1] - 5), 2.0)
        Image.fromarray(band_image(*size, [band])).save(folder / f"{'abc'[k]}.png")
    (folder / "broken.png").write_bytes(b"broken")
    out = tmp_path / "out"
    options = dict(mm_per_pixel=0.5, tile_size=64, batch_size=2, coco_json=out / "coco.json")
    first = predict_paths(confident_model, [folder], out, **options)
    assert (first["images"], first["skipped"], len(first["failed"])) == (3, 0, 1)
    report, coco = (out / "report.csv").read_bytes(), (out / "coco.json").read_bytes()
    (out / "b_overlay.png").unlink()  # b crashed between its files: it is predicted again
    (out / "report.csv").unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in ("a.json", "a_panoptic.png", "c_overlay.png")}
    assert fake.tiles == 6 + 4 + 2  # a, b and c: 2 x 3, 2 x 2 and 2 x 1 tiles of 64 px
    fake.tiles = 6  # the fake's scores follow its tile count: b's tiles are numbered as in the first run

    again = predict_paths(confident_model, [folder], out, skip_existing=True, **options)
    assert (again["images"], again["skipped"], len(again["failed"])) == (1, 2, 1)
    assert fake.tiles == 10  # b alone was predicted
    assert (out / "report.csv").read_bytes() == report and (out / "coco.json").read_bytes() == coco
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert not list(out.glob(".*")), "temporary files left behind"

    other = predict_paths(confident_model, [folder], out, skip_existing=True, **{**options, "mm_per_pixel": 0.25})
    assert (other["images"], other["skipped"]) == (3, 0)  # other settings: nothing is complete for this run
    assert json.loads((out / "a.json").read_text())["mm_per_pixel"] == 0.25


# ------------------------------------------------------------------------------------------- several processes
def launch(processes: int, *argv) -> subprocess.CompletedProcess:
    """`accelerate launch --cpu --num_processes N -m hf_detr_seg.cli ARGV` (one thread each, a free port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(port),
               "-m", "hf_detr_seg.cli", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def same_tree(a: Path, b: Path) -> list[str]:
    """Files that differ (or exist on one side only) between two output folders (subfolders not compared)."""
    names = sorted({p.name for p in [*a.iterdir(), *b.iterdir()] if not p.is_dir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, False))]


@pytest.mark.slow
def test_two_processes_predict_and_evaluate_as_one(tmp_path: Path, dataset: Path, confident_model: Path):
    inputs = photos(tmp_path / "photos", dataset)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"predict{n}"
        done = launch(n, "predict", "--model", confident_model, inputs, "--out", out, "--threshold", "0.5",
                      "--tile-size", "64", "--batch-size", "2", "--coco-json", out / "coco.json", "--quiet")
        assert done.returncode != 0 and "1 input(s) failed" in done.stderr, done.stderr[-3000:]
        assert done.stdout.count("Predicted 9 images") == 1, done.stdout  # the main process alone reports
        evaluation = tmp_path / f"evaluate{n}"
        done = launch(n, "evaluate", "--model", confident_model, "--dataset-dir", dataset, "--split", "train",
                      "--threshold", "0.5", "--batch-size", "2", "--json", evaluation / "metrics.json",
                      "--save-predictions", evaluation / "saved")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = out, evaluation
    (out1, eval1), (out2, eval2) = runs[1], runs[2]
    assert same_tree(out1, out2) == []
    rows = (out1 / "report.csv").read_text().splitlines()
    assert len(rows) > 10 and {json.loads((out1 / "large.json").read_text())["tile_size"]} == {64}
    assert json.loads((eval1 / "metrics.json").read_text()) == json.loads((eval2 / "metrics.json").read_text())
    assert same_tree(eval1 / "saved", eval2 / "saved") == []
    assert same_tree(eval1 / "saved" / "panoptic_train", eval2 / "saved" / "panoptic_train") == []
    spalling = json.loads((eval1 / "metrics.json").read_text())["per_class"]["spalling"]
    assert spalling["fp"] > 0 and 0 < spalling["f1"] < 1  # not a trivial 0 == 0 (the model is random)

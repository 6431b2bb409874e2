"""The `hf-detr-seg` commands pq, push, evaluate --save-predictions and predict: output, messages, exit codes."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import DetrForSegmentation

from hf_detr_seg import cli
from hf_detr_seg.cli import main
from hf_detr_seg.data.panoptic import read_panoptic_png
from hf_detr_seg.config import TrainConfig
from hf_detr_seg.processes import Processes
from hf_detr_seg.training import run


def run_cli(*argv: str) -> int:
    """Exit status of `hf-detr-seg argv` (0 when it returns normally)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


@pytest.fixture(scope="module")
def model(dataset: Path, tmp_path_factory) -> Path:
    """A tiny model trained 2 steps per stage (as tests/test_training.py does): stage 2's output folder.

    After 2 steps all queries are alike and no class is confident: weighted masks stay below 0.5 and near-equal
    queries split the pixels among themselves, so nothing would be predicted at any threshold. So the model keeps
    its first query only and the class head's bias is raised for the stuff class `surface`: every image then gets
    one confident segment that matches the annotated surface (a TP) or not (FP and FN). The round trip through
    the files is what is tested, not the model.
    """
    runs = tmp_path_factory.mktemp("cli-runs")
    base = dict(dataset_dir=str(dataset), image_size=96, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                max_train_steps=2, logging_steps=1, seed=0, eval_threshold=0.3)
    run(TrainConfig(stage=1, output_dir=str(runs / "stage1"), **base))
    run(TrainConfig(stage=2, output_dir=str(runs / "stage2"), model_name_or_path=str(runs / "stage1"), **base))
    trained = DetrForSegmentation.from_pretrained(runs / "stage2")
    queries = trained.detr.model.query_position_embeddings
    trained.detr.model.query_position_embeddings = torch.nn.Embedding(1, queries.embedding_dim)
    trained.config.num_queries = 1
    with torch.no_grad():
        trained.detr.model.query_position_embeddings.weight.copy_(queries.weight[:1])
        trained.detr.class_labels_classifier.bias[trained.config.label2id["surface"]] += 10.0
    trained.save_pretrained(runs / "stage2")
    return runs / "stage2"


def gt_args(dataset: Path, split: str = "val") -> list[str]:
    return ["--gt-json", dataset / f"annotations/panoptic_{split}.json",
            "--gt-folder", dataset / f"annotations/panoptic_{split}"]


def copy_split(dataset: Path, tmp_path: Path, split: str = "val") -> tuple[Path, Path]:
    """A copy of a split's annotations to use as a (perfect) prediction folder."""
    pred_json = tmp_path / "pred.json"
    pred_folder = tmp_path / "pred"
    shutil.copy(dataset / f"annotations/panoptic_{split}.json", pred_json)
    shutil.copytree(dataset / f"annotations/panoptic_{split}", pred_folder)
    return pred_json, pred_folder


# ----------------------------------------------------------------------------------------------------- pq
def test_pq_of_the_annotations_against_themselves_is_one(dataset: Path, tmp_path: Path, capsys):
    pred_json, pred_folder = copy_split(dataset, tmp_path)
    out = tmp_path / "scores" / "pq.json"
    assert run_cli("pq", *gt_args(dataset), "--pred-json", pred_json, "--pred-folder", pred_folder, "--json", out) == 0
    printed = capsys.readouterr().out
    assert "| pq | sq | rq |" in printed and "| crack | 1.0000 | 1.0000 | 1.0000 |" in printed
    assert f"Wrote {out}" in printed
    scores = json.loads(out.read_text())
    assert {"pq", "sq", "rq", "pq_things", "pq_stuff", "per_class"} <= set(scores)
    assert scores["pq"] == scores["sq"] == scores["rq"] == 1.0
    assert "crack" in scores["per_class"] and scores["per_class"]["crack"]["tp"] > 0


def test_pq_underscore_spellings_and_default_folders(dataset: Path, tmp_path: Path, capsys):
    """As panopticapi: the PNG folders default to the JSON path without `.json`."""
    pred_json, _ = copy_split(dataset, tmp_path)
    assert run_cli("pq", "--gt_json", dataset / "annotations/panoptic_val.json", "--pred_json", pred_json) == 0
    assert "| 1.0000 | 1.0000 | 1.0000 |" in capsys.readouterr().out


def _first_annotation(pred_json: Path) -> tuple[dict, dict]:
    data = json.loads(pred_json.read_text())
    return data, next(a for a in data["annotations"] if a["segments_info"])


def test_pq_prediction_id_missing_from_png(dataset: Path, tmp_path: Path, capsys):
    pred_json, pred_folder = copy_split(dataset, tmp_path)
    data, ann = _first_annotation(pred_json)
    ann["segments_info"].append({**ann["segments_info"][0], "id": 4242})
    pred_json.write_text(json.dumps(data))
    assert run_cli("pq", *gt_args(dataset), "--pred-json", pred_json, "--pred-folder", pred_folder) == 2
    err = capsys.readouterr().err
    assert str(pred_folder / ann["file_name"]) in err
    assert "[4242] are in segments_info but not in the PNG" in err


def test_pq_png_id_missing_from_json(dataset: Path, tmp_path: Path, capsys):
    pred_json, pred_folder = copy_split(dataset, tmp_path)
    data, ann = _first_annotation(pred_json)
    dropped = ann["segments_info"].pop()
    pred_json.write_text(json.dumps(data))
    assert run_cli("pq", *gt_args(dataset), "--pred-json", pred_json, "--pred-folder", pred_folder) == 2
    err = capsys.readouterr().err
    assert f"{pred_folder / ann['file_name']}: segment id(s) [{dropped['id']}] are in the PNG" in err


@pytest.mark.parametrize("missing", ["pred json", "pred png", "pred folder", "gt json"])
def test_pq_missing_files_are_named(dataset: Path, tmp_path: Path, capsys, missing: str):
    pred_json, pred_folder = copy_split(dataset, tmp_path)
    gt = gt_args(dataset)
    png = sorted(pred_folder.iterdir())[0]
    if missing == "pred json":
        pred_json.unlink()
        expected = f"--pred-json {pred_json}: file not found"
    elif missing == "pred png":
        png.unlink()
        expected = f"{png}: cannot read panoptic PNG"
    elif missing == "pred folder":
        shutil.rmtree(pred_folder)
        expected = f"{pred_folder}: prediction PNG folder not found"
    else:
        gt[1] = tmp_path / "nowhere.json"
        expected = f"--gt-json {gt[1]}: file not found"
    assert run_cli("pq", *gt, "--pred-json", pred_json, "--pred-folder", pred_folder) == 2
    assert expected in capsys.readouterr().err


def test_pq_malformed_json_is_named(dataset: Path, tmp_path: Path, capsys):
    pred_json, pred_folder = copy_split(dataset, tmp_path)
    data = json.loads(pred_json.read_text())
    for ann in data["annotations"]:
        del ann["segments_info"]
    pred_json.write_text(json.dumps(data))
    assert run_cli("pq", *gt_args(dataset), "--pred-json", pred_json, "--pred-folder", pred_folder) == 2
    err = capsys.readouterr().err
    assert str(pred_json) in err and "'segments_info'" in err


# --------------------------------------------------------------------------------------------------- push
class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records what it is asked to do, uploads nothing."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail is not None:
            raise self.fail

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


MODEL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "run.yaml", "metrics.json"}


@pytest.fixture()
def model_folder(tmp_path: Path) -> Path:
    """A model folder as training leaves it (files' contents do not matter to push), with checkpoints and best/."""
    folder = tmp_path / "model"
    for name in MODEL_FILES | {"checkpoints/step_2/model.safetensors", "best/config.json", ".cache/x"}:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def test_push_dry_run_lists_the_files_and_needs_no_network(model_folder: Path, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(cli, "HUB_API", api)
    assert run_cli("push", "--model", model_folder, "--repo-id", "me/cracks", "--dry-run") == 0
    captured = capsys.readouterr()
    listed = captured.out.splitlines()
    assert set(listed) == MODEL_FILES
    assert not any(line.startswith(("checkpoints", "best", ".")) for line in listed)
    assert "6 files of model folder" in captured.err and "nothing uploaded" in captured.err
    assert api.calls == []


def test_push_uploads_through_the_api(model_folder: Path, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(cli, "HUB_API", api)
    assert run_cli("push", "--model", model_folder, "--repo_id", "me/cracks", "--private") == 0
    (create, create_args), (upload, upload_args) = api.calls
    assert create == "create_repo" and upload == "upload_folder"
    assert create_args["repo_id"] == "me/cracks" and create_args["private"] is True
    assert create_args["repo_type"] == "model"
    assert upload_args["repo_id"] == "me/cracks" and upload_args["folder_path"] == str(model_folder)
    assert set(upload_args["allow_patterns"]) == MODEL_FILES
    assert "Uploaded 6 files of model folder" in capsys.readouterr().out


def test_push_dataset_folder(dataset: Path, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(cli, "HUB_API", api)
    assert run_cli("push", "--model", dataset, "--repo-id", "me/crack-data") == 0
    (_, create_args), (_, upload_args) = api.calls
    assert create_args["repo_type"] == "dataset" and create_args["private"] is False
    assert {"labels.yaml", "annotations/panoptic_val.json"} <= set(upload_args["allow_patterns"])
    assert "huggingface.co/datasets/me/crack-data" in capsys.readouterr().out


def test_push_refuses_a_folder_that_is_neither(tmp_path: Path, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(cli, "HUB_API", api)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    assert run_cli("push", "--model", tmp_path / "stuff", "--repo-id", "me/x", "--dry-run") == 2
    assert "neither a model folder (config.json) nor a built dataset (labels.yaml)" in capsys.readouterr().err
    assert run_cli("push", "--model", tmp_path / "nowhere", "--repo-id", "me/x") == 2
    assert f"--model {tmp_path / 'nowhere'}: folder not found" in capsys.readouterr().err
    assert api.calls == []


def test_push_failure_from_the_hub_exits_1(model_folder: Path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "HUB_API", RecordingApi(fail=OSError("401 Unauthorized")))
    assert run_cli("push", "--model", model_folder, "--repo-id", "me/cracks") == 1
    assert "upload of" in (err := capsys.readouterr().err) and "401 Unauthorized" in err


# ------------------------------------------------------------------------------ evaluate --save-predictions
def test_saved_predictions_score_the_same_with_pq(model: Path, dataset: Path, tmp_path: Path, capsys):
    preds, metrics_file = tmp_path / "preds", tmp_path / "eval.json"
    status = run_cli("evaluate", "--model", model, "--dataset-dir", dataset, "--threshold", "0.0", "--batch-size", "4",
                     "--save-predictions", preds, "--json", metrics_file)
    assert status == 0
    printed = capsys.readouterr().out
    assert f"Wrote {metrics_file}" in printed
    assert f"{preds}/panoptic_val.json" in printed
    evaluated = json.loads(metrics_file.read_text())

    saved = json.loads((preds / "panoptic_val.json").read_text())
    truth = json.loads((dataset / "annotations/panoptic_val.json").read_text())
    assert saved["images"] == truth["images"] and saved["categories"] == truth["categories"]
    assert sum(len(a["segments_info"]) for a in saved["annotations"]) > 0, "a low threshold must give segments"
    for ann in saved["annotations"]:
        ids = read_panoptic_png(preds / "panoptic_val" / ann["file_name"])
        assert set(ids[ids > 0].tolist()) == {s["id"] for s in ann["segments_info"]}
        assert all(0 <= s["score"] <= 1 and s["area"] == (ids == s["id"]).sum() for s in ann["segments_info"])

    scores_file = tmp_path / "pq.json"
    assert run_cli("pq", *gt_args(dataset), "--pred-json", preds / "panoptic_val.json",
                   "--pred-folder", preds / "panoptic_val", "--json", scores_file) == 0
    scores = json.loads(scores_file.read_text())
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff"):
        assert scores[key] == evaluated[key], key
    for name, values in scores["per_class"].items():
        for key in ("pq", "sq", "rq", "tp", "fp", "fn"):
            assert values[key] == evaluated["per_class"][name][key], (name, key)
    assert scores["pq"] > 0 and scores["per_class"]["surface"]["tp"] > 0  # not a trivial 0 == 0
    pq_printed = capsys.readouterr().out
    headline = "| " + " | ".join(f"{evaluated[k]:.4f}" for k in ("pq", "sq", "rq", "pq_things", "pq_stuff")) + " |"
    assert headline[:-2] in printed and headline[:-2] in pq_printed


def test_evaluate_bad_model_folder_exits_2(dataset: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("evaluate", "--model", tmp_path / "empty", "--dataset-dir", dataset) == 2
    assert f"{tmp_path / 'empty'}: no config.json; expected a model folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ predict
def test_predict_wiring_summary_failures_and_exit_code(tmp_path: Path, monkeypatch, capsys):
    """The command only passes its options on and reports; the library (`inference.predict_paths`) is a stub here."""
    seen = {}

    def predict_paths(model_dir, inputs, out_dir, **options):
        seen.update(model_dir=model_dir, inputs=inputs, out_dir=out_dir, **options)
        failed = [(inputs[-1], "cannot read image")] if len(inputs) > 1 else []
        return {"images": 3, "segments": 7, "failed": failed, "out": out_dir}

    monkeypatch.setitem(sys.modules, "hf_detr_seg.inference", types.SimpleNamespace(predict_paths=predict_paths))
    out = tmp_path / "results"
    options = ["--tile_size", "512", "--tile-overlap", "0.25", "--mm-per-pixel", "0.1"]
    assert run_cli("predict", "--model", "m", "a.jpg", "--out", out, *options) == 0
    assert f"Predicted 3 images, 7 segments; results in {out}" in capsys.readouterr().out
    assert seen == {"model_dir": "m", "inputs": [Path("a.jpg")], "out_dir": out, "threshold": None, "tile_size": 512,
                    "tile_overlap": 0.25, "mm_per_pixel": 0.1, "skip_existing": False, "progress": True,
                    "processes": Processes()}  # unset options: the library's defaults (threshold: the model's); one process
    assert run_cli("predict", "--model", "m", "a.jpg", "bad.jpg", "--out", out, "--batch-size", "2",
                   "--skip_existing", "--quiet") == 1
    captured = capsys.readouterr()
    assert "Predicted 3 images" in captured.out
    assert "1 input(s) failed" in captured.err and "bad.jpg: cannot read image" in captured.err
    assert seen["batch_size"] == 2 and seen["skip_existing"] and not seen["progress"]


def test_predict_end_to_end(model: Path, dataset: Path, tmp_path: Path, capsys):
    """The real `inference.predict_paths`: files per image, a report, a bad input listed and exit 1."""
    inputs = tmp_path / "photos"
    shutil.copytree(dataset / "images/val", inputs)
    (inputs / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "results"
    assert run_cli("predict", "--model", model, inputs, "--out", out, "--threshold", "0.0", "--tile-size", "64",
                   "--tile-overlap", "0.25", "--mm_per_pixel", "0.1") == 1
    captured = capsys.readouterr()
    stems = sorted(p.stem for p in (dataset / "images/val").iterdir())
    assert f"Predicted {len(stems)} images, 0 segments; results in {out}" in captured.out  # surface is background
    assert "1 input(s) failed" in captured.err
    assert f"  {inputs / 'broken.jpg'}: cannot read image" in captured.err
    for stem in stems:
        assert {f"{stem}.json", f"{stem}_panoptic.png", f"{stem}_overlay.png"} <= {p.name for p in out.iterdir()}
    assert (out / "report.csv").is_file()
    assert run_cli("predict", "--model", model, tmp_path / "nothing", "--out", out) == 2
    assert "no image matches" in capsys.readouterr().err

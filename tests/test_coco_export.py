"""COCO instances out: `predict --coco-json` and `export-coco`, and their round trips through `build-dataset`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from pycocotools.coco import COCO
from test_annotations import built, run_cli, write_images

from hf_detr_seg.coco_export import CocoInstancesWriter, segment_annotations
from hf_detr_seg.data.panoptic import read_panoptic_png
from hf_detr_seg.inference import DefectSegmenter, TilePrediction
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.testing import steer_queries

LABELS = {
    "classes": [
        {"name": "crack", "isthing": True},
        {"name": "spalling", "isthing": True},
        {"name": "stain", "isthing": False},
        {"name": "surface", "isthing": False, "background": True},
    ],
}
CRACK, SPALLING, STAIN, SURFACE = range(4)


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    return LabelMap.from_dict(LABELS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, label_map: LabelMap) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", label_map, 64)


def fake_predictions(arrays) -> list[TilePrediction]:
    """A prediction of every kind at each array's size: two cracks, a spalling, a stain in two parts (one stuff
    segment), the surface, and pixels no segment claims (id 0); ids deliberately not in class order."""
    out = []
    for array in arrays:
        h, w = array.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        id_map = np.full((h, w), 4, np.int32)  # surface
        id_map[(yy // 7 + xx // 5) % 9 == 0] = 0  # void speckles
        id_map[np.abs(yy - xx * h / w) < 1.5] = 7  # a diagonal crack
        id_map[2:5, w // 2 :] = 2  # a short crack
        id_map[((yy - h * 0.7) / (h * 0.2)) ** 2 + ((xx - w * 0.25) / (w * 0.15)) ** 2 <= 1] = 3  # spalling
        id_map[: h // 4, : w // 5] = 9  # stain, part one
        id_map[-3:, -6:] = 9  # stain, part two
        segments = [{"id": 7, "label_id": CRACK, "score": 0.91}, {"id": 4, "label_id": SURFACE, "score": 0.97},
                    {"id": 3, "label_id": SPALLING, "score": 0.88}, {"id": 9, "label_id": STAIN, "score": 0.86},
                    {"id": 2, "label_id": CRACK, "score": 0.9}]
        out.append(TilePrediction(id_map, segments))
    return out


def assert_round_trip(predictions: Path, dataset: Path, stems: list[str], label_map: LabelMap) -> None:
    """Every predicted pixel keeps its class and its segment in the re-imported dataset; pixels no segment claimed
    become the background class."""
    maps = built(dataset)
    assert sorted(maps) == sorted(stems)
    for stem in stems:
        predicted = read_panoptic_png(predictions / f"{stem}_panoptic.png")
        segments = json.loads((predictions / f"{stem}.json").read_text())["segments"]
        lookup = np.full(int(predicted.max()) + 1, label_map.background_index)
        for s in segments:
            lookup[s["id"]] = label_map.index_of(s["class"])
        classes, ids, _ = maps[stem]
        assert np.array_equal(classes, lookup[predicted]), stem
        claimed = predicted > 0
        pairs = np.unique(np.stack([predicted[claimed], ids[claimed]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], stem  # same segments


def test_writer_gives_each_segment_as_rle_with_score(tmp_path: Path, label_map: LabelMap):
    (prediction,) = fake_predictions([np.zeros((30, 50, 3), np.uint8)])
    writer = CocoInstancesWriter(label_map)
    segments = [{"id": s["id"], "category_id": label_map.category_id(s["label_id"]), "score": s["score"]}
                for s in prediction.segments] + [{"id": 99, "category_id": 1, "score": 0.5}]  # no pixel: left out
    writer.add("site/a.jpg", prediction.id_map, segments)
    path = writer.write(tmp_path / "out" / "pred.json")
    assert not list((tmp_path / "out").glob(".*"))
    coco = COCO(str(path))
    assert [c["name"] for c in coco.dataset["categories"]] == ["crack", "spalling", "stain", "surface"]
    assert coco.dataset["images"] == [{"id": 1, "file_name": "site/a.jpg", "width": 50, "height": 30}]
    anns = coco.dataset["annotations"]
    assert [a["score"] for a in anns] == [0.91, 0.97, 0.88, 0.86, 0.9] and {a["iscrowd"] for a in anns} == {0}
    for ann, segment in zip(anns, prediction.segments):
        pixels = prediction.id_map == segment["id"]
        assert np.array_equal(coco.annToMask(ann).astype(bool), pixels)
        ys, xs = np.nonzero(pixels)
        assert ann["area"] == pixels.sum() and ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        assert isinstance(ann["segmentation"]["counts"], str)
    assert segment_annotations(np.zeros((4, 4), np.int32), [{"id": 1, "category_id": 1}], 1) == []


def test_predict_coco_json_round_trips_through_build_dataset(model_dir: Path, label_map: LabelMap, tmp_path: Path,
                                                              monkeypatch, capsys):
    monkeypatch.setattr(DefectSegmenter, "_predict_arrays", lambda self, arrays: fake_predictions(arrays))
    write_images(tmp_path / "photos", ["a.jpg", "b.png"], size=(60, 90))
    write_images(tmp_path / "photos", ["c.jpg"], size=(41, 33))
    coco = tmp_path / "review" / "predictions.json"
    assert run_cli("predict", "--model", model_dir, tmp_path / "photos", "--out", tmp_path / "pred",
                   "--coco-json", coco) == 0
    assert f"Wrote every predicted segment as COCO instances to {coco}" in capsys.readouterr().out
    data = json.loads(coco.read_text())
    assert [i["file_name"] for i in data["images"]] == ["a.jpg", "b.png", "c.jpg"]
    assert {data["categories"][a["category_id"] - 1]["name"] for a in data["annotations"]} == {
        "crack", "spalling", "stain", "surface"}  # stuff included as its own category
    labels = tmp_path / "labels.yaml"
    label_map.save_yaml(labels)
    assert run_cli("build-dataset", "--images", tmp_path / "photos", "--annotations", coco, "--labels", labels,
                   "--out", tmp_path / "ds", "--quiet", "--workers", "1") == 0
    assert_round_trip(tmp_path / "pred", tmp_path / "ds", ["a", "b", "c"], label_map)
    stain = [s for s in built(tmp_path / "ds")["a"][2] if s["category_id"] == label_map.category_id(STAIN)]
    assert len(stain) == 1


def _steer(model) -> None:
    """Hooks that replace a random model's class and mask logits (the tensors still flow through the real forward
    pass and post-processing): queries 0-3 find a crack band, a spalling blob, a stain and the surface, the rest
    nothing, so the post-processing has segments of every kind to keep."""
    queries, num_labels = model.config.num_queries, len(LABELS["classes"]) + 1
    classes = torch.tensor([CRACK, SPALLING, STAIN, SURFACE] + [num_labels - 1] * (queries - 4))
    logits = torch.nn.functional.one_hot(classes, num_labels) * 12.0

    def mask_logits(h: int, w: int) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        pattern = torch.full((queries, h, w), -20.0)
        along = ((ys + xs) / 2).clamp(0.2, 0.6)  # a crack from (0.2, 0.2) to (0.6, 0.6), 0.16 wide
        pattern[0] = 40 * (1 - torch.hypot(ys - along, xs - along) / 0.08)
        pattern[1] = 40 * (1 - torch.hypot(ys - 0.7, xs - 0.3) / 0.12)
        pattern[2] = 40 * (1 - torch.hypot(ys - 0.1, xs - 0.9) / 0.1)
        pattern[3] = 0.4  # the surface wins wherever no defect is likely
        return pattern

    steer_queries(model, logits, mask_logits, replace=True)


def test_real_model_predictions_round_trip(model_dir: Path, label_map: LabelMap, tmp_path: Path, monkeypatch):
    """The real segmenter, tiling and post-processing (steered to predict every kind of segment)."""
    from hf_detr_seg.inference import predict_paths

    load = DefectSegmenter.from_pretrained.__func__

    def steered(cls, *args, **kwargs):
        segmenter = load(cls, *args, **kwargs)
        _steer(segmenter.model)
        return segmenter

    monkeypatch.setattr(DefectSegmenter, "from_pretrained", classmethod(steered))
    write_images(tmp_path / "photos", ["x.png", "y.jpg"], size=(50, 70))
    summary = predict_paths(model_dir, [tmp_path / "photos"], tmp_path / "pred", coco_json=tmp_path / "pred.json",
                            tile_size=48)
    assert summary["coco_json"] == str(tmp_path / "pred.json")
    annotations = json.loads((tmp_path / "pred.json").read_text())["annotations"]
    assert {a["category_id"] for a in annotations} == {1, 2, 3, 4}
    labels = tmp_path / "labels.yaml"
    label_map.save_yaml(labels)
    assert run_cli("build-dataset", "--images", tmp_path / "photos", "--annotations", tmp_path / "pred.json",
                   "--labels", labels, "--out", tmp_path / "ds", "--quiet") == 0
    assert_round_trip(tmp_path / "pred", tmp_path / "ds", ["x", "y"], label_map)


def test_export_coco_of_a_built_dataset_imports_back(dataset: Path, tmp_path: Path, capsys):
    """`export-coco` then `build-dataset --annotations`: the same classes and segments (void pixels, which COCO
    instances cannot hold, come back as background)."""
    assert run_cli("export-coco", dataset, tmp_path / "all.json") == 0
    assert f"as COCO instances to {tmp_path / 'all.json'}" in capsys.readouterr().out
    exported = json.loads((tmp_path / "all.json").read_text())
    assert {i["file_name"].split("/")[0] for i in exported["images"]} == {"train", "val"}
    assert run_cli("build-dataset", "--images", dataset / "images", "--annotations", tmp_path / "all.json",
                   "--labels", dataset / "labels.yaml", "--out", tmp_path / "again", "--quiet") == 0
    original, again = built(dataset), built(tmp_path / "again")
    label_map = LabelMap.from_yaml(dataset / "labels.yaml")
    assert sorted(original) == sorted(again)
    for stem, (classes, ids, segments) in original.items():
        expected = np.where(classes == -1, label_map.background_index, classes)
        assert np.array_equal(again[stem][0], expected), stem
        claimed = classes != -1
        pairs = np.unique(np.stack([ids[claimed], again[stem][1][claimed]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], stem
    assert run_cli("export-coco", dataset, tmp_path / "val.json", "--split", "val", "--things-only") == 0
    val = json.loads((tmp_path / "val.json").read_text())
    assert all("/" not in i["file_name"] for i in val["images"])
    assert val["images"] and {a["category_id"] for a in val["annotations"]} <= {
        c.category_id for c in label_map.classes if c.isthing}
    assert run_cli("export-coco", tmp_path / "nothing", tmp_path / "x.json") == 2
    assert "not a dataset built by hf-detr-seg" in capsys.readouterr().err

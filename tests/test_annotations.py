"""Importing annotations: each tool's export layout, built maps against pycocotools / drawn references, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import save_rgb
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hf_detr_seg.cli import main
from hf_detr_seg.data.annotations import detect_format
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.masks import read_color
from hf_detr_seg.data.panoptic import (
    SPLITS,
    annotation_folder,
    annotation_json,
    class_map_from_segments,
    read_panoptic_png,
    validate_dataset,
)
from hf_detr_seg.errors import DataError
from hf_detr_seg.labels import LabelMap, LabelMapError

MDMCS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mdmcs-mini"
LABELS = {
    "classes": [
        {"name": "crack", "isthing": True, "aliases": ["Crack", "cracks"], "line_width": 3},
        {"name": "spalling", "isthing": True},
        {"name": "efflorescence", "isthing": False},
        {"name": "surface", "isthing": False, "background": True, "aliases": ["concrete"]},
    ],
}
H, W = 48, 64


# ------------------------------------------------------------------------------------------------ helpers
def run_cli(*argv) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def write_labels(path: Path, data: dict = LABELS) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (H, W)) -> None:
    rng = np.random.default_rng(len(names))
    for name in names:
        save_rgb(folder / name, rng.integers(0, 255, (*size, 3)), **({"quality": 95} if name.endswith(".jpg") else {}))


def blob(cy: float, cx: float, ry: float, rx: float, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with zeros), written out by hand as CVAT does."""
    flat = mask.astype(np.uint8).ravel(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def built(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[dict]]]:
    """stem -> (class map with -1 for void, segment-id map, segments_info) of every image of a built dataset."""
    label_map = LabelMap.from_yaml(out / "labels.yaml")
    maps = {}
    for split in SPLITS:
        for ann in json.loads(annotation_json(out, split).read_text())["annotations"]:
            ids = read_panoptic_png(annotation_folder(out, split) / ann["file_name"])
            classes = class_map_from_segments(
                ids, ann["segments_info"], lambda s: label_map.index_of_category(s["category_id"])
            )
            maps[Path(ann["file_name"]).stem] = (classes, ids, ann["segments_info"])
    return maps


def coco_reference(path: Path, label_map: LabelMap) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """stem -> (class map, object map, overlapping pixels), painted in file order from pycocotools' own masks."""
    coco = COCO(str(path))
    index = {name: i for i, c in enumerate(label_map.classes) for name in (c.name, *c.aliases)}
    reference = {}
    for image in coco.dataset["images"]:
        classes = np.full((image["height"], image["width"]), label_map.background_index)
        objects = np.zeros(classes.shape, np.int64)
        covered = np.zeros(classes.shape, np.int64)
        for ann in coco.imgToAnns[image["id"]]:
            mask = coco.annToMask(ann).astype(bool)
            classes[mask] = index[coco.cats[ann["category_id"]]["name"]]
            objects[mask] = ann["id"]
            covered += mask
        reference[Path(image["file_name"]).stem] = (classes, objects, int((covered > 1).sum()))
    return reference


def assert_same_objects(ids: np.ndarray, objects: np.ndarray, classes: np.ndarray, label_map: LabelMap) -> None:
    """Thing pixels: one built segment per reference object (same pixels). Stuff: one segment per class."""
    for index, info in enumerate(label_map.classes):
        where = classes == index
        if not where.any():
            continue
        pairs = np.unique(np.stack([ids[where], objects[where] if info.isthing else 0 * ids[where]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], info.name


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def build(images: Path, annotations: Path, labels: Path, out: Path, *extra) -> int:
    return run_cli("build-dataset", "--images", images, "--annotations", annotations, "--labels", labels,
                   "--out", out, "--quiet", "--workers", "1", "--val-fraction", "0", *extra)


# ------------------------------------------------------------------------------------------------ COCO tools
def cvat_export(root: Path) -> Path:
    """CVAT "COCO 1.0": masks as RLE with iscrowd 1 (compressed and not), polygons, non-contiguous ids."""
    write_images(root / "images", ["frame_000.jpg", "frame_001.jpg", "frame_002.jpg"])
    spalling = blob(20, 25, 12, 16)
    crack = np.zeros((H, W), bool)
    crack[10:40, 30:33] = True
    anns = [
        {"category_id": 3, "segmentation": compressed_rle(spalling), "iscrowd": 1},
        {"category_id": 7, "segmentation": uncompressed_rle(crack), "iscrowd": 1},  # on top of the spalling
        {"category_id": 7, "segmentation": [[50.5, 5, 60, 5, 60, 15.5], [40, 30, 47, 30, 47, 44, 40, 44]],
         "iscrowd": 0},  # one crack drawn as two parts
        {"category_id": 12, "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]], "iscrowd": 0},
        {"category_id": 12, "segmentation": compressed_rle(blob(40, 55, 6, 6)), "iscrowd": 1},
        {"category_id": 3, "segmentation": [[0, 30, 20, 30, 20, 48, 0, 48]], "iscrowd": 0, "image_id": 2},
    ]
    annotations = [{"id": 100 + k, "image_id": a.pop("image_id", 1), "area": 0, "bbox": [0, 0, 1, 1],
                    "attributes": {"occluded": False}, **a} for k, a in enumerate(anns)]
    for a in annotations:  # CVAT writes the true box; keep the test honest about it
        a["bbox"] = [float(v) for v in mask_utils.toBbox(_as_rle(a["segmentation"]))]
    data = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "version": "", "year": ""},
        "categories": [{"id": 3, "name": "spalling", "supercategory": ""},
                       {"id": 7, "name": "crack", "supercategory": ""},
                       {"id": 12, "name": "efflorescence", "supercategory": ""}],
        "images": [{"id": i + 1, "width": W, "height": H, "file_name": f"frame_00{i}.jpg", "license": 0,
                    "flickr_url": "", "coco_url": "", "date_captured": 0} for i in range(3)],
        "annotations": annotations,
    }
    path = root / "annotations" / "instances_default.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def _as_rle(segmentation) -> dict:
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, H, W))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, H, W)
    return segmentation


def test_cvat_coco_rle_and_polygons_match_pycocotools(tmp_path: Path, capsys):
    coco = cvat_export(tmp_path / "cvat")
    labels = write_labels(tmp_path / "labels.yaml")
    assert build(tmp_path / "cvat" / "images", coco, labels, tmp_path / "out") == 0
    summary = capsys.readouterr().out
    label_map = LabelMap.from_yaml(labels)
    maps, reference = built(tmp_path / "out"), coco_reference(coco, label_map)
    assert sorted(maps) == ["frame_000", "frame_001", "frame_002"]
    for stem, (classes, objects, overlap) in reference.items():
        assert np.array_equal(maps[stem][0], classes), stem
        assert_same_objects(maps[stem][1], objects, classes, label_map)
    assert np.all(maps["frame_002"][0] == label_map.index_of("surface"))  # no annotations: all background
    efflorescence = [s for s in maps["frame_000"][2] if s["category_id"] == 3]
    assert len(efflorescence) == 1  # stuff: two objects, one segment
    assert [s["iscrowd"] for s in maps["frame_000"][2]] == [0] * len(maps["frame_000"][2])
    assert f"overlapping pixels (later object on top): {reference['frame_000'][2]}" in summary
    assert reference["frame_000"][2] > 0
    assert validate_dataset(tmp_path / "out").ok


def test_roboflow_root_category_and_given_split(tmp_path: Path):
    """Roboflow: `train/_annotations.coco.json` beside the images, an unused root category 0, spellings as aliases."""
    export = tmp_path / "roboflow"
    splits = {"train": ["IMG_1_jpg.rf.3f2a.jpg", "IMG_2_jpg.rf.9c1d.jpg"], "valid": ["IMG_3_jpg.rf.77aa.jpg"]}
    for split, names in splits.items():
        write_images(export / split, names)
        anns = [{"id": k + 1, "image_id": k + 1, "category_id": 1 + k % 2, "iscrowd": 0, "area": 80.0,
                 "bbox": [10, 10, 10, 8], "segmentation": [[10, 10, 20, 10, 20, 18, 10, 18]]}
                for k in range(len(names))]
        data = {"info": {"year": "2025"}, "licenses": [{"id": 1, "name": "CC BY 4.0"}],
                "categories": [{"id": 0, "name": "concrete-defects", "supercategory": "none"},
                               {"id": 1, "name": "cracks", "supercategory": "concrete-defects"},
                               {"id": 2, "name": "spalling", "supercategory": "concrete-defects"}],
                "images": [{"id": k + 1, "license": 1, "file_name": n, "height": H, "width": W,
                            "date_captured": "2025-01-01T00:00:00+00:00"} for k, n in enumerate(names)],
                "annotations": anns}
        (export / split / "_annotations.coco.json").write_text(json.dumps(data))
    labels = write_labels(tmp_path / "labels.yaml")
    assert run_cli("build-dataset", "--images", export / "train",
                   "--annotations", export / "train/_annotations.coco.json", "--val-images", export / "valid",
                   "--val-annotations", export / "valid/_annotations.coco.json",
                   "--labels", labels, "--out", tmp_path / "out", "--quiet") == 0
    maps = built(tmp_path / "out")
    box = np.zeros((H, W), bool)
    box[10:18, 10:20] = True
    crack, spalling = LabelMap.from_yaml(labels).index_of("crack"), LabelMap.from_yaml(labels).index_of("spalling")
    assert np.array_equal(maps["IMG_1_jpg.rf.3f2a"][0] == crack, box)  # "cracks" is an alias of crack
    assert np.array_equal(maps["IMG_2_jpg.rf.9c1d"][0] == spalling, box)
    assert (tmp_path / "out/images/val/IMG_3_jpg.rf.77aa.jpg").is_file()


def test_label_studio_images_prefix_and_subfolders(tmp_path: Path):
    """Label Studio: `file_name` is `images/<name>`, category ids from 0; images found by base name anywhere."""
    export = tmp_path / "ls"
    write_images(export / "images", ["6e9d8c0a-wall.jpg"])
    write_images(export / "images" / "bridge", ["pier.png"])
    data = {"images": [{"width": W, "height": H, "id": 0, "file_name": "images/6e9d8c0a-wall.jpg"},
                       {"width": W, "height": H, "id": 1, "file_name": "images\\bridge\\pier.png"}],
            "categories": [{"id": 0, "name": "Crack"}, {"id": 1, "name": "spalling"}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "segmentation": [[5, 5, 40, 8, 5, 11]],
                             "bbox": [5, 5, 35, 6], "ignore": 0, "iscrowd": 0, "area": 105.0},
                            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[30, 20, 50, 20, 50, 40]],
                             "bbox": [30, 20, 20, 20], "ignore": 0, "iscrowd": 0, "area": 200.0}],
            "info": {"year": 2025, "version": "1.0", "contributor": "Label Studio"}}
    (export / "result.json").write_text(json.dumps(data))
    labels = write_labels(tmp_path / "labels.yaml")
    assert build(export, export / "result.json", labels, tmp_path / "out") == 0
    maps, reference = built(tmp_path / "out"), coco_reference(export / "result.json", LabelMap.from_yaml(labels))
    assert np.array_equal(maps["6e9d8c0a-wall"][0], reference["6e9d8c0a-wall"][0])
    assert np.array_equal(maps["pier"][0], reference["images\\bridge\\pier"][0])
    assert (tmp_path / "out/images/train/pier.png").is_file()


# ------------------------------------------------------------------------------------------------ labelme
def near(points: list[list[float]], radius: float, shape=(H, W)) -> np.ndarray:
    """Brute-force reference: pixel centres within `radius` of the polyline (every pixel against every segment)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    p = np.asarray(points, float)
    hit = np.zeros(shape, bool)
    for a, b in zip(p, p[1:]) if len(p) > 1 else [(p[0], p[0])]:
        d = b - a
        t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / max(d @ d, 1e-12), 0, 1)
        hit |= np.hypot(xx - a[0] - t * d[0], yy - a[1] - t * d[1]) <= radius
    return hit


def polygon(flat: list[float], shape=(H, W)) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], *shape))).astype(bool)


def labelme_file(path: Path, image_path: str | None, shapes: list[dict], size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = [{"group_id": None, "description": "", "flags": {}, **s} for s in shapes]
    path.write_text(json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
                                "imageData": "iVBORw0KGgo=", "imageHeight": size[0], "imageWidth": size[1]}))


def test_labelme_every_shape_type_matches_a_drawn_reference(tmp_path: Path):
    write_images(tmp_path / "images", ["a.jpg", "b.jpg"])
    shapes = [
        {"label": "spalling", "shape_type": "polygon", "points": [[3.2, 4.1], [30.7, 6.3], [20.4, 30.9]]},
        {"label": "spalling", "shape_type": "rectangle", "points": [[60.3, 44.6], [40.2, 30.1]]},
        {"label": "efflorescence", "shape_type": "circle", "points": [[12.3, 36.4], [12.3, 43.1]]},
        {"label": "cracks", "shape_type": "line", "points": [[5.3, 20.2], [58.6, 41.7]]},  # over the spalling
        {"label": "crack", "shape_type": "linestrip", "points": [[33.1, 2.2], [45.4, 12.6], [61.2, 9.3]]},
        {"label": "spalling", "shape_type": "polygon", "points": [[50.2, 20.3], [56.1, 20.3], [56.1, 26.7]],
         "group_id": 4},
        {"label": "spalling", "shape_type": "polygon", "points": [[58.2, 20.3], [62.1, 20.3], [62.1, 26.7]],
         "group_id": 4},  # the same object as the shape before it
    ]
    labelme_file(tmp_path / "labelme" / "a.json", "..\\images\\a.jpg", shapes)
    labelme_file(tmp_path / "labelme" / "b.json", None, [{"label": "concrete", "shape_type": "polygon",
                                                          "points": [[0, 0], [10, 0], [10, 10]]}])
    labels = write_labels(tmp_path / "labels.yaml")
    assert detect_format(tmp_path / "labelme") == "labelme"
    assert build(tmp_path / "images", tmp_path / "labelme", labels, tmp_path / "out") == 0
    label_map = LabelMap.from_yaml(labels)
    crack, spalling, efflorescence, surface = range(4)
    pieces = [  # (object, class, pixels) in file order
        (1, spalling, polygon([3.2, 4.1, 30.7, 6.3, 20.4, 30.9])),
        (2, spalling, polygon([40.2, 30.1, 60.3, 30.1, 60.3, 44.6, 40.2, 44.6])),
        (3, efflorescence, near([[12.3, 36.4]], 6.7)),
        (4, crack, near([[5.3, 20.2], [58.6, 41.7]], 1.5)),
        (5, crack, near([[33.1, 2.2], [45.4, 12.6], [61.2, 9.3]], 1.5)),
        (6, spalling, polygon([50.2, 20.3, 56.1, 20.3, 56.1, 26.7])),
        (6, spalling, polygon([58.2, 20.3, 62.1, 20.3, 62.1, 26.7])),
    ]
    classes, objects = np.full((H, W), surface), np.zeros((H, W), int)
    for number, index, mask in pieces:
        classes[mask], objects[mask] = index, number
    maps = built(tmp_path / "out")
    assert np.array_equal(maps["a"][0], classes)
    assert_same_objects(maps["a"][1], objects, classes, label_map)
    assert len([s for s in maps["a"][2] if s["category_id"] == 2]) == 3  # spalling: 3 objects, one in two parts
    assert np.all(maps["b"][0] == surface)  # found by the JSON's stem; "concrete" is an alias of the background


def test_detect_format_and_explicit_format(tmp_path: Path, capsys):
    coco = cvat_export(tmp_path / "cvat")
    assert detect_format(coco) == "coco"
    labelme_file(tmp_path / "one.json", "x.jpg", [])
    assert detect_format(tmp_path / "one.json") == "labelme"
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="cannot tell the annotation format"):
        detect_format(tmp_path / "other.json")
    labels = write_labels(tmp_path / "labels.yaml")
    assert build(tmp_path / "cvat/images", coco, labels, tmp_path / "out", "--annotation-format", "labelme") == 2
    assert "instances_default.json: not a labelme file (no `shapes` list)" in capsys.readouterr().err


def test_a_dataset_built_inside_the_labelme_folder_is_not_read_back(tmp_path: Path):
    write_images(tmp_path / "photos", ["a.jpg"])
    labelme_file(tmp_path / "photos" / "a.json", "a.jpg", [{"label": "crack", "points": [[1, 1], [20, 1], [20, 9]]}])
    labels = write_labels(tmp_path / "labels.yaml")
    for _ in range(2):  # the second build finds the first one's images and JSON under photos/ and passes them by
        assert build(tmp_path / "photos", tmp_path / "photos", labels, tmp_path / "photos" / "ds") == 0
    assert sorted(built(tmp_path / "photos" / "ds")) == ["a"]


def test_parallel_builds_are_byte_identical(tmp_path: Path):
    coco = cvat_export(tmp_path / "cvat")
    labels = write_labels(tmp_path / "labels.yaml")
    for workers, out in ((1, "one"), (2, "two")):
        build_dataset(tmp_path / "cvat/images", None, labels, tmp_path / out, annotations=coco, workers=workers,
                      val_fraction=0.34, progress=False)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


# ------------------------------------------------------------------------------------------------ bad input
def _coco_with(tmp_path: Path, annotation: dict, categories=({"id": 1, "name": "crack"},), size=(W, H)) -> Path:
    write_images(tmp_path / "images", ["p.jpg", "q.jpg"])
    data = {"images": [{"id": 1, "file_name": "p.jpg", "width": size[0], "height": size[1]},
                       {"id": 2, "file_name": "q.jpg", "width": W, "height": H}],
            "categories": list(categories),
            "annotations": [{"id": 5, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]],
                             "iscrowd": 0}, {"id": 17, "image_id": 1, "category_id": 1, "iscrowd": 0, **annotation}]}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(data))
    return path


BAD_OBJECTS = {
    "two points": ({"segmentation": [[1, 1, 20, 20]]}, "polygon part 0 has 2 point(s); at least 3 are needed"),
    "zero area": ({"segmentation": [[1, 1, 20, 20, 40, 40]]}, "zero area"),
    "outside": ({"segmentation": [[70, 10, 90, 10, 90, 30]]}, "outside the 64x48 image"),
    "box outside": ({"segmentation": compressed_rle(blob(10, 10, 3, 3)), "bbox": [100, 5, 20, 20]},
                    "box [100, 5, 20, 20]"),
    "box only": ({"segmentation": [], "bbox": [1, 1, 5, 5]}, "no segmentation"),
    "rle size": ({"segmentation": compressed_rle(np.ones((10, 10), bool))}, "RLE size [10, 10]"),
    "broken rle": ({"segmentation": {"size": [H, W], "counts": "abc"}}, "RLE cannot be decoded"),
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECTS))
def test_bad_coco_objects_are_errors_or_dropped_with_skip_bad(case: str, tmp_path: Path, capsys):
    annotation, message = BAD_OBJECTS[case]
    coco = _coco_with(tmp_path, annotation)
    labels = write_labels(tmp_path / "labels.yaml")
    out = tmp_path / "out"
    assert build(tmp_path / "images", coco, labels, out) == 2
    err = capsys.readouterr().err
    assert f"{coco}: image 'p.jpg', annotation id 17 (category 'crack'): " in err and message in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert build(tmp_path / "images", coco, labels, out, "--skip-bad") == 1
    captured = capsys.readouterr()
    assert "dropped 1 bad object(s):" in captured.out and message in captured.out
    maps = built(out)
    assert np.all(maps["p"][0] == 3) and (maps["q"][0] == 0).sum() > 0  # the object dropped, the rest built


def test_bad_labelme_shapes_name_the_file_and_shape(tmp_path: Path, capsys):
    write_images(tmp_path / "images", ["a.jpg"])
    labelme_file(tmp_path / "lm" / "a.json", "a.jpg", [
        {"label": "crack", "shape_type": "point", "points": [[3, 3]]},
        {"label": "spalling", "shape_type": "polygon", "points": [[3, 3], [9, 9]]},
        {"label": "spalling", "shape_type": "rectangle", "points": [[-20, 3], [9, 9]]},
    ])
    labels = write_labels(tmp_path / "labels.yaml")
    assert build(tmp_path / "images", tmp_path / "lm", labels, tmp_path / "out") == 2
    err = capsys.readouterr().err
    where = f"{tmp_path / 'lm' / 'a.json'}: image 'a.jpg', shape"
    assert f"{where} 0 ('crack', point): a point has no area" in err
    assert f"{where} 1 ('spalling', polygon): polygon with 2 point(s); at least 3 are needed" in err
    assert f"{where} 2 ('spalling', rectangle): outside the 64x48 image" in err
    assert not (tmp_path / "out").exists()


def test_unknown_labels_stop_the_build_unless_ignored(tmp_path: Path, capsys):
    coco = _coco_with(tmp_path, {"category_id": 2, "segmentation": [[1, 1, 30, 1, 30, 30]]},
                      categories=({"id": 1, "name": "crack"}, {"id": 2, "name": "Graffiti"}, {"id": 3, "name": "x"}))
    labels = write_labels(tmp_path / "labels.yaml")
    out = tmp_path / "out"
    build_dataset(tmp_path / "images", None, labels, out, annotations=_coco_with(tmp_path / "ok", {
        "segmentation": [[1, 1, 9, 1, 9, 9]]}), progress=False)
    before = tree_digest(out)
    assert build(tmp_path / "images", coco, labels, out, "--skip-bad") == 2
    err = capsys.readouterr().err
    assert f"{coco}: category 2: label 'Graffiti' is not in the label map" in err
    assert "'x'" not in err  # a category no annotation uses is ignored
    assert tree_digest(out) == before  # OUT untouched
    write_labels(labels, {**LABELS, "ignore_labels": ["Graffiti"]})
    assert build(tmp_path / "images", coco, labels, out) == 0
    maps = built(out)
    assert (maps["p"][0] == -1).sum() == polygon([1, 1, 30, 1, 30, 30]).sum()  # ignored objects are void


def test_file_level_problems(tmp_path: Path, capsys):
    labels = write_labels(tmp_path / "labels.yaml")
    coco = _coco_with(tmp_path, {"segmentation": [[1, 1, 9, 1, 9, 9]]}, size=(W + 1, H))
    assert build(tmp_path / "images", coco, labels, tmp_path / "out") == 2
    assert f"{coco}: image 'p.jpg': the annotations are for a 65x48 image but the image file is 64x48" in (
        capsys.readouterr().err)
    (tmp_path / "images" / "p.jpg").unlink()
    write_images(tmp_path / "images", ["stray.jpg"])
    assert build(tmp_path / "images", coco, labels, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{coco}: image 'p.jpg': not found under {tmp_path / 'images'}" in err
    assert f"{tmp_path / 'images' / 'stray.jpg'}: image without annotations (not in {coco})" in err
    assert build(tmp_path / "images", coco, labels, tmp_path / "out", "--skip-bad") == 1
    assert sorted(built(tmp_path / "out")) == ["q"]
    labelme_file(tmp_path / "lm" / "q.json", "q.jpg", [{"label": "crack", "shape_type": "line",
                                                        "points": [[1, 1], [9, 9]]}])
    no_width = {"classes": [{"name": "crack", "isthing": True}, {"name": "surface", "isthing": False}]}
    assert build(tmp_path / "images", tmp_path / "lm", write_labels(tmp_path / "l2.yaml", no_width),
                 tmp_path / "out2", "--skip-bad") == 2
    assert f"{tmp_path / 'lm' / 'q.json'}: shape 0 ('crack', line): a line needs a width: set `line_width`" in (
        capsys.readouterr().err)
    assert run_cli("build-dataset", "--images", tmp_path / "images", "--masks", tmp_path, "--annotations", coco,
                   "--labels", labels, "--out", tmp_path / "out3") == 2
    assert "either --masks or --annotations" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"classes": [{"name": "crack", "isthing": True, "aliases": ["surface"]}, {"name": "surface", "isthing": False}]},
     "label 'surface' is given to both 'crack' and 'surface'"),
    ({"classes": [{"name": "crack", "isthing": True, "aliases": "Crack"}]}, "classes[0] (crack).aliases"),
    ({"classes": [{"name": "crack", "isthing": True, "line_width": 0}]}, "classes[0] (crack).line_width"),
    ({"classes": [{"name": "crack", "isthing": True}], "ignore_labels": ["crack"]}, "ignore_labels: ['crack']"),
    ({"classes": [{"name": "crack", "isthing": True}], "ignore_labels": "x"}, "ignore_labels: expected a list"),
])
def test_label_map_annotation_fields_are_validated(change: dict, message: str):
    with pytest.raises(LabelMapError) as err:
        LabelMap.from_dict(change, source="my/labels.yaml")
    assert str(err.value).startswith("my/labels.yaml: ") and message in str(err.value)


def test_label_map_without_mask_format_serves_annotations_only(tmp_path: Path, capsys):
    label_map = LabelMap.from_dict({**LABELS, "ignore_labels": ["tag"]})
    assert label_map.mask_format is None and label_map.classes[0].aliases == ("Crack", "cracks")
    label_map.save_yaml(tmp_path / "resolved.yaml")
    assert LabelMap.from_yaml(tmp_path / "resolved.yaml") == label_map
    one_class = LabelMap.from_dict({"classes": [{"name": "crack", "isthing": True}]})
    assert one_class.mask_format == "binary"  # as before: masks default to binary
    labels = write_labels(tmp_path / "labels.yaml")
    (tmp_path / "images").mkdir()
    assert run_cli("build-dataset", "--images", tmp_path / "images", "--masks", tmp_path / "images",
                   "--labels", labels, "--out", tmp_path / "out") == 2
    assert f"{labels}: `mask_format` is required to read masks of several classes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real data
def _regions_as_polygons(mask_rgb: np.ndarray, colours: dict[str, tuple[int, int, int]]) -> list[tuple[str, list]]:
    """Every 4-connected region of every colour (background included) as one polygon around it, largest first.

    The outline is traced at twice the size, so it runs a quarter pixel inside the region's pixel edges and
    pycocotools fills exactly the region and its holes. A region lying in another's hole is smaller, so it is drawn
    after (on top of) it, as annotators stack objects; 4-connected regions cannot leak out of a hole diagonally.
    """
    shapes = []
    for name, colour in colours.items():
        mask = np.all(mask_rgb == colour, axis=2).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        for k in range(1, count):
            x, y, w, h = stats[k, :4]
            region = np.kron((labels[y : y + h, x : x + w] == k).astype(np.uint8), np.ones((2, 2), np.uint8))
            contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            points = (contours[0].reshape(-1, 2) + 0.5) / 2 + [x, y]
            shapes.append((cv2.contourArea(contours[0]), name, points.ravel().tolist()))
    return [(name, flat) for _, name, flat in sorted(shapes, key=lambda shape: -shape[0])]


def test_mdmcs_masks_as_polygons_round_trip_within_iou_099(tmp_path: Path):
    colours = {"spalling": (128, 128, 128), "rebar": (0, 255, 0), "corrosion": (0, 255, 255), "crack": (255, 0, 0),
               "background": (0, 0, 0)}
    label_map = LabelMap.from_dict({"mask_format": "color", "classes": [
        {"name": n, "isthing": n != "background", "background": n == "background", "color": list(c)}
        for n, c in colours.items()]})
    masks = sorted((MDMCS / "masks").glob("*.png"))
    assert len(masks) == 36
    images, annotations = [], []
    for image_id, path in enumerate(masks, start=1):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        images.append({"id": image_id, "file_name": f"{path.stem}.jpg", "width": rgb.shape[1], "height": rgb.shape[0]})
        for name, flat in _regions_as_polygons(rgb, colours):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": list(colours).index(name) + 1, "segmentation": [flat]})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(colours)]
    coco = tmp_path / "mdmcs.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    label_map.save_yaml(tmp_path / "labels.yaml")
    build_dataset(MDMCS / "images", None, tmp_path / "labels.yaml", tmp_path / "out", annotations=coco, workers=2,
                  progress=False)
    maps = built(tmp_path / "out")
    inter, union = np.zeros(5), np.zeros(5)
    for path in masks:
        size = Image.open(path).size
        truth = read_color(path, label_map, size, path).indices
        got = maps[path.stem][0]
        for k in range(5):
            inter[k] += np.sum((truth == k) & (got == k))
            union[k] += np.sum((truth == k) | (got == k))
    iou = inter / union
    assert iou.min() >= 0.99, dict(zip(colours, iou.round(4)))

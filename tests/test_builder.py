"""The dataset builder, end to end on real and demo data, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import save_mask, save_rgb
from PIL import Image

from hf_detr_seg.cli import main
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.demo import generate_demo_data
from hf_detr_seg.data.loading import load_panoptic_dataset
from hf_detr_seg.data.panoptic import rgb_to_id, validate_dataset

CRACK_LABELS = {
    "mask_format": "binary",
    "binary_threshold": 127,
    "classes": [
        {"name": "crack", "isthing": True},
        {"name": "surface", "isthing": False, "background": True},
    ],
    "instances": {"connectivity": 8, "min_area": 0, "merge_distance": 0},
}


def write_labels(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def independent_check(root: Path) -> dict[str, int]:
    """Re-check the COCO-panoptic rules from the files alone, without the package's validator.

    Returns the number of images per split.
    """
    labels = yaml.safe_load((root / "labels.yaml").read_text())
    categories = {c["category_id"]: c for c in labels["classes"]}
    counts = {}
    for split in ("train", "val"):
        data = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
        assert {c["id"] for c in data["categories"]} == set(categories)
        images = {img["id"]: img for img in data["images"]}
        counts[split] = len(images)
        for ann in data["annotations"]:
            img = images[ann["image_id"]]
            photo = Image.open(root / "images" / split / img["file_name"])
            assert photo.size == (img["width"], img["height"])
            ids = rgb_to_id(np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" / ann["file_name"])))
            assert ids.shape == (img["height"], img["width"])
            present = set(np.unique(ids).tolist()) - {0}
            assert present == {s["id"] for s in ann["segments_info"]}
            stuff_seen = set()
            for seg in ann["segments_info"]:
                pixels = ids == seg["id"]
                ys, xs = np.nonzero(pixels)
                assert seg["area"] == pixels.sum()
                assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                if not categories[seg["category_id"]]["isthing"]:
                    assert seg["category_id"] not in stuff_seen
                    stuff_seen.add(seg["category_id"])
    return counts


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def deepcrack_built(deepcrack_sample: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("deepcrack")
    labels = write_labels(tmp / "labels.yaml", CRACK_LABELS)
    out = tmp / "ds"
    build_dataset(
        deepcrack_sample / "train/images",
        deepcrack_sample / "train/masks",
        labels,
        out,
        val_images=deepcrack_sample / "val/images",
        val_masks=deepcrack_sample / "val/masks",
        workers=2,
        progress=False,
    )
    return out


def test_deepcrack_sample_builds_valid(deepcrack_built: Path):
    assert validate_dataset(deepcrack_built).ok, validate_dataset(deepcrack_built).problems
    assert independent_check(deepcrack_built) == {"train": 120, "val": 40}


def test_deepcrack_no_crack_pixel_lost_or_invented(deepcrack_built: Path, deepcrack_sample: Path):
    for split in ("train", "val"):
        data = json.loads((deepcrack_built / f"annotations/panoptic_{split}.json").read_text())
        crack_ids_by_file = {
            ann["file_name"]: [s["id"] for s in ann["segments_info"] if s["category_id"] == 1]
            for ann in data["annotations"]
        }
        for mask_path in sorted((deepcrack_sample / split / "masks").iterdir()):
            source = np.asarray(Image.open(mask_path).convert("L")) > 127
            png = deepcrack_built / f"annotations/panoptic_{split}/{mask_path.stem}.png"
            ids = rgb_to_id(np.asarray(Image.open(png)))
            built = np.isin(ids, crack_ids_by_file[png.name])
            assert np.array_equal(built, source), mask_path.name
            assert (ids > 0).all(), "no void pixels without min_area or ignore"


def test_loads_as_datasetdict(deepcrack_built: Path):
    dsd = load_panoptic_dataset(deepcrack_built)
    assert set(dsd) == {"train", "val"} and len(dsd["val"]) == 40
    row = dsd["val"][0]
    assert row["image"].size == (row["width"], row["height"])
    ids = rgb_to_id(np.asarray(row["panoptic"]))
    assert set(np.unique(ids).tolist()) == {s["id"] for s in row["segments_info"]}


# ----------------------------------------------------------------------------- demo data
@pytest.fixture(scope="module")
def demo_source(tmp_path_factory) -> Path:
    return generate_demo_data(tmp_path_factory.mktemp("demo"), num_images=12, size=128, seed=3)


def test_demo_builds_valid_and_deterministic(demo_source: Path, tmp_path: Path):
    args = (demo_source / "images", demo_source / "masks", demo_source / "labels.yaml")
    build_dataset(*args, tmp_path / "a", workers=1, progress=False)
    build_dataset(*args, tmp_path / "b", workers=2, progress=False)
    assert validate_dataset(tmp_path / "a").ok
    counts = independent_check(tmp_path / "a")
    assert counts == {"train": 10, "val": 2}
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b"), "1 and 2 workers must give the same bytes"
    names = {c["name"] for c in json.loads((tmp_path / "a/annotations/panoptic_train.json").read_text())["categories"]}
    assert {"crack", "spalling", "efflorescence", "corrosion", "surface"} == names


@pytest.mark.parametrize("fraction, expected", [(0.0, {"train": 12, "val": 0}), (1.0, {"train": 0, "val": 12})])
def test_val_fraction_extremes(demo_source: Path, tmp_path: Path, fraction, expected):
    out = tmp_path / "ds"
    build_dataset(demo_source / "images", demo_source / "masks", demo_source / "labels.yaml", out,
                  val_fraction=fraction, progress=False)
    assert independent_check(out) == expected


def test_split_depends_on_seed_only(demo_source: Path, tmp_path: Path):
    def val_files(out: Path) -> list[str]:
        return sorted(p.name for p in (out / "images/val").iterdir())

    args = (demo_source / "images", demo_source / "masks", demo_source / "labels.yaml")
    build_dataset(*args, tmp_path / "s0", val_fraction=0.5, seed=0, progress=False)
    build_dataset(*args, tmp_path / "s0b", val_fraction=0.5, seed=0, progress=False)
    build_dataset(*args, tmp_path / "s1", val_fraction=0.5, seed=1, progress=False)
    assert val_files(tmp_path / "s0") == val_files(tmp_path / "s0b")
    assert val_files(tmp_path / "s0") != val_files(tmp_path / "s1")


def test_coco_base_ids(demo_source: Path, tmp_path: Path):
    labels = yaml.safe_load((demo_source / "labels.yaml").read_text()) | {"coco_base": True}
    out = tmp_path / "ds"
    build_dataset(demo_source / "images", demo_source / "masks", write_labels(tmp_path / "l.yaml", labels), out,
                  progress=False)
    assert validate_dataset(out).ok
    data = json.loads((out / "annotations/panoptic_train.json").read_text())
    assert len(data["categories"]) == 133 + 5
    used = {s["category_id"] for a in data["annotations"] for s in a["segments_info"]}
    assert used and min(used) >= 201


def test_exif_orientation_is_applied(tmp_path: Path):
    """A photo stored sideways with EXIF orientation 8 is built upright, matching its upright mask."""
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = 200
    stored = np.rot90(upright, k=-1)  # what the camera wrote (20 x 40); orientation 8: turn 90° back to show
    exif = Image.Exif()
    exif[0x0112] = 8
    save_rgb(tmp_path / "img/a.jpg", stored, exif=exif.tobytes())
    mask = np.zeros((20, 40), np.uint8)
    mask[5:8, 2:30] = 255
    save_mask(tmp_path / "msk/a.png", mask)
    out = tmp_path / "ds"
    build_dataset(tmp_path / "img", tmp_path / "msk", write_labels(tmp_path / "l.yaml", CRACK_LABELS), out,
                  val_fraction=0, progress=False)
    built = Image.open(out / "images/train/a.jpg")
    assert built.size == (40, 20)
    assert np.asarray(built)[:, :20].mean() > 150 > np.asarray(built)[:, 20:].mean()
    assert independent_check(out) == {"train": 1, "val": 0}


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def small_source(tmp_path: Path) -> Path:
    """Three good image/mask pairs and a label map, in tmp_path/src."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        save_rgb(src / "images" / f"{stem}.png", rng.integers(0, 255, (16, 24, 3)))
        mask = np.zeros((16, 24), np.uint8)
        mask[4:8, 2:20] = 255
        save_mask(src / "masks" / f"{stem}.png", mask)
    write_labels(src / "labels.yaml", CRACK_LABELS)
    return src


def run_cli(src: Path, out: Path, *extra: str) -> int:
    argv = ["build-dataset", "--images", str(src / "images"), "--masks", str(src / "masks"),
            "--labels", str(src / "labels.yaml"), "--out", str(out), "--quiet", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    return exit_info.value.code


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


BAD_INPUTS = {
    "corrupt image": (lambda s: (s / "images/b.png").write_bytes(b"not a png"), "b.png: cannot read image"),
    "truncated mask": (lambda s: _truncate(s / "masks/b.png"), "b.png: cannot read mask"),
    "size mismatch": (
        lambda s: save_mask(s / "masks/b.png", np.zeros((10, 10), np.uint8)),
        "b.png: mask is 10x10 but its image b.png is 24x16",
    ),
    "image without mask": (lambda s: (s / "masks/b.png").unlink(), "b.png: image without a mask"),
    "mask without image": (
        lambda s: save_mask(s / "masks/zz.png", np.zeros((16, 24), np.uint8)),
        "zz.png: mask without an image",
    ),
    "unknown mask value": (
        lambda s: (
            write_labels(s / "labels.yaml", {**CRACK_LABELS, "mask_format": "indexed", "classes": [
                {"name": "crack", "isthing": True, "value": 255},
                {"name": "surface", "isthing": False, "background": True, "value": 0}]}),
            save_mask(s / "masks/b.png", np.full((16, 24), 7, np.uint8)),
        ),
        "b.png: mask value(s) [7]",
    ),
    "unknown mask colour": (lambda s: _colour_masks_with_unknown_colour(s), "b.png: colour [0, 200, 0]"),
}


def _colour_masks_with_unknown_colour(src: Path) -> None:
    write_labels(src / "labels.yaml", {"mask_format": "color", "classes": [
        {"name": "crack", "isthing": True, "color": [255, 0, 0]},
        {"name": "surface", "isthing": False, "background": True, "color": [0, 0, 0]}]})
    for stem in ("a", "b", "c"):
        rgb = np.zeros((16, 24, 3), np.uint8)
        rgb[4:8, 2:20] = [0, 200, 0] if stem == "b" else [255, 0, 0]
        save_mask(src / "masks" / f"{stem}.png", rgb)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_exits_nonzero_and_keeps_out(small_source: Path, tmp_path: Path, capsys, case):
    out = tmp_path / "out"
    assert run_cli(small_source, out) == 0
    before = tree_digest(out)
    breaker, message = BAD_INPUTS[case]
    breaker(small_source)
    assert run_cli(small_source, out) == 2
    assert message in capsys.readouterr().err
    assert tree_digest(out) == before, "a failed build must not touch an existing dataset"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == [], "no temporary left behind"


def test_failed_first_build_leaves_nothing(small_source: Path, tmp_path: Path, capsys):
    (small_source / "images/c.png").write_bytes(b"junk")
    out = tmp_path / "out"
    assert run_cli(small_source, out, "--workers", "2") == 2
    assert "c.png: cannot read image" in capsys.readouterr().err
    assert not out.exists()


def test_skip_bad_builds_the_rest_and_lists_them(small_source: Path, tmp_path: Path, capsys):
    (small_source / "images/c.png").write_bytes(b"junk")
    (small_source / "masks/a.png").unlink()
    out = tmp_path / "out"
    assert run_cli(small_source, out, "--skip-bad", "--val-fraction", "0") == 1
    printed = capsys.readouterr().out
    assert "skipped 2 file(s)" in printed and "c.png: cannot read image" in printed and "a.png: image without" in printed
    assert independent_check(out) == {"train": 1, "val": 0}


def test_empty_input(tmp_path: Path, capsys):
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/masks").mkdir()
    write_labels(tmp_path / "src/labels.yaml", CRACK_LABELS)
    assert run_cli(tmp_path / "src", tmp_path / "out") == 2
    assert "no image/mask pairs found" in capsys.readouterr().err


def test_refuses_to_replace_a_folder_it_did_not_build(small_source: Path, tmp_path: Path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    assert run_cli(small_source, out) == 2
    assert "not a dataset built by hf-detr-seg" in capsys.readouterr().err
    assert (out / "thesis.txt").read_text() == "keep me"


def test_bad_label_map_exits_2(small_source: Path, tmp_path: Path, capsys):
    (small_source / "labels.yaml").write_text("classes:\n  - {name: crack}\n")
    assert run_cli(small_source, tmp_path / "out") == 2
    assert "labels.yaml: classes[0] (crack): `isthing` is required" in capsys.readouterr().err


def test_cli_entry_point_and_validate(small_source: Path, tmp_path: Path):
    """The installed console script, both option spellings, and `validate` on a broken folder."""
    exe = Path(sys.executable).parent / "hf-detr-seg"
    out = tmp_path / "out"
    done = subprocess.run(
        [str(exe), "build-dataset", "--images", str(small_source / "images"), "--masks", str(small_source / "masks"),
         "--labels", str(small_source / "labels.yaml"), "--out", str(out), "--val_fraction", "0", "--quiet"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "Built 3 images (train 3, val 0)" in done.stdout
    ok = subprocess.run([str(exe), "validate", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid COCO-panoptic dataset" in ok.stdout
    data = json.loads((out / "annotations/panoptic_train.json").read_text())
    data["annotations"][0]["segments_info"][0]["area"] += 1
    (out / "annotations/panoptic_train.json").write_text(json.dumps(data))
    bad = subprocess.run([str(exe), "validate", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "INVALID" in bad.stderr and "area" in bad.stderr


def test_resolved_labels_carry_every_role(dataset: Path):
    """OUT/labels.yaml states each class's role (the model config copies it from there)."""
    classes = yaml.safe_load((dataset / "labels.yaml").read_text())["classes"]
    assert {c["name"]: c.get("measure") for c in classes} == {
        "crack": "crack", "spalling": "area", "efflorescence": "area", "corrosion": "area", "surface": None}

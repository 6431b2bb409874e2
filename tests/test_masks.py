from pathlib import Path

import numpy as np
import pytest
from conftest import save_mask

from hf_detr_seg.data.masks import VOID, read_class_map
from hf_detr_seg.errors import DataError
from hf_detr_seg.labels import LabelMap

IMAGE = Path("img.jpg")


def binary_map(threshold: int = 127, background: bool = True) -> LabelMap:
    classes = [{"name": "crack", "isthing": True}]
    if background:
        classes.append({"name": "surface", "isthing": False, "background": True})
    return LabelMap.from_dict({"mask_format": "binary", "binary_threshold": threshold, "classes": classes})


def test_binary_threshold_tolerates_jpeg_noise(tmp_path: Path):
    truth = np.zeros((40, 60), bool)
    truth[10:30, 20:24] = True
    noisy = np.where(truth, 255, 0).astype(np.uint8)
    rng = np.random.default_rng(0)
    noisy = np.where(truth, noisy - rng.integers(0, 58, truth.shape), noisy + rng.integers(0, 8, truth.shape))
    path = save_mask(tmp_path / "m.png", noisy.astype(np.uint8))
    indices = read_class_map(path, binary_map(), (60, 40), IMAGE).indices
    assert np.array_equal(indices == 0, truth)
    assert np.array_equal(indices == 1, ~truth)


def test_binary_jpeg_file(tmp_path: Path):
    truth = np.zeros((64, 64), bool)
    truth[8:56, 30:34] = True
    path = save_mask(tmp_path / "m.jpg", np.where(truth, 255, 0).astype(np.uint8), quality=75)
    indices = read_class_map(path, binary_map(), (64, 64), IMAGE).indices
    assert np.array_equal(indices == 0, truth)


def test_binary_16_bit_and_zero_one_masks(tmp_path: Path):
    truth = np.zeros((20, 30), bool)
    truth[5:9, 3:25] = True
    sixteen = save_mask(tmp_path / "m16.png", np.where(truth, 65535, 0).astype(np.uint16))
    zero_one = save_mask(tmp_path / "m01.png", truth.astype(np.uint8))
    for path in (sixteen, zero_one):
        indices = read_class_map(path, binary_map(), (30, 20), IMAGE).indices
        assert np.array_equal(indices == 0, truth), path.name


def test_binary_without_background_leaves_rest_void(tmp_path: Path):
    truth = np.zeros((10, 10), bool)
    truth[2:4, 2:8] = True
    path = save_mask(tmp_path / "m.png", np.where(truth, 255, 0).astype(np.uint8))
    indices = read_class_map(path, binary_map(background=False), (10, 10), IMAGE).indices
    assert set(np.unique(indices).tolist()) == {VOID, 0}
    assert np.array_equal(indices == VOID, ~truth)


def test_size_mismatch_names_both_files(tmp_path: Path):
    path = save_mask(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"m.png: mask is 12x10 but its image img.jpg is 11x10"):
        read_class_map(path, binary_map(), (11, 10), IMAGE)


INDEXED = LabelMap.from_dict(
    {
        "mask_format": "indexed",
        "classes": [
            {"name": "crack", "isthing": True, "value": 3},
            {"name": "rust", "isthing": True, "value": 7},
            {"name": "surface", "isthing": False, "background": True, "value": 0},
        ],
        "ignore": [255],
    }
)


def test_indexed_values_and_ignore(tmp_path: Path):
    values = np.array([[0, 3, 7], [255, 3, 0]], np.uint8)
    path = save_mask(tmp_path / "m.png", values)
    indices = read_class_map(path, INDEXED, (3, 2), IMAGE).indices
    assert indices.tolist() == [[2, 0, 1], [VOID, 0, 2]]


def test_indexed_unknown_value_is_an_error(tmp_path: Path):
    path = save_mask(tmp_path / "m.png", np.array([[0, 3, 9]], np.uint8))
    with pytest.raises(DataError, match=r"m.png: mask value\(s\) \[9\] \(1 pixels\) are not in the label map"):
        read_class_map(path, INDEXED, (3, 1), IMAGE)


def test_indexed_palette_png(tmp_path: Path):
    from PIL import Image

    img = Image.fromarray(np.array([[0, 3], [7, 0]], np.uint8), mode="P")
    img.putpalette([0, 0, 0] * 256)
    img.save(tmp_path / "p.png")
    indices = read_class_map(tmp_path / "p.png", INDEXED, (2, 2), IMAGE).indices
    assert indices.tolist() == [[2, 0], [1, 2]]


COLOR = LabelMap.from_dict(
    {
        "mask_format": "color",
        "classes": [
            {"name": "crack", "isthing": True, "color": [255, 0, 0]},
            {"name": "rust", "isthing": True, "color": [0, 0, 255]},
            {"name": "surface", "isthing": False, "background": True, "color": [0, 0, 0]},
        ],
        "ignore_colors": [[255, 255, 255]],
    }
)


def test_color_nearest_within_tolerance(tmp_path: Path):
    rgb = np.array([[[250, 5, 3], [2, 1, 240]], [[0, 10, 0], [240, 250, 255]]], np.uint8)
    path = save_mask(tmp_path / "m.png", rgb)
    indices = read_class_map(path, COLOR, (2, 2), IMAGE).indices
    assert indices.tolist() == [[0, 1], [2, VOID]]


def test_color_jpeg_saved_label_map(tmp_path: Path):
    truth = np.full((48, 48), 2, np.int16)
    truth[8:40, 8:24] = 0
    truth[8:40, 30:44] = 1
    palette = np.array([[255, 0, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
    path = save_mask(tmp_path / "m.jpg", palette[truth], quality=95)
    # Edges become blends of two class colours (accepted) plus some ringing, which a JPEG-saved label
    # map needs a wider tolerance for.
    jpeg_map = LabelMap.from_dict({**COLOR.to_dict(), "color_tolerance": 60})
    indices = read_class_map(path, jpeg_map, (48, 48), IMAGE).indices
    # JPEG blurs colour edges, so only the interiors (2 px away from an edge) must be exact.
    interior = np.ones_like(truth, bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            interior &= np.roll(truth, (dy, dx), axis=(0, 1)) == truth
    assert np.array_equal(indices[interior], truth[interior])


def test_color_far_from_palette_names_file_and_colour(tmp_path: Path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = [0, 200, 0]
    path = save_mask(tmp_path / "m.png", rgb)
    with pytest.raises(DataError, match=r"m.png: colour \[0, 200, 0\] \(1 pixels"):
        read_class_map(path, COLOR, (4, 4), IMAGE)


PER_CLASS = LabelMap.from_dict(
    {
        "mask_format": "per_class_dirs",
        "classes": [
            {"name": "crack", "isthing": True},
            {"name": "rust", "isthing": True},
            {"name": "surface", "isthing": False, "background": True},
        ],
    }
)


def test_per_class_first_listed_wins_and_overlaps_are_counted(tmp_path: Path):
    crack = np.zeros((6, 6), np.uint8)
    crack[1:4, 1:4] = 255
    rust = np.zeros((6, 6), np.uint8)
    rust[2:5, 2:5] = 255
    paths = {"crack": save_mask(tmp_path / "crack/a.png", crack), "rust": save_mask(tmp_path / "rust/a.png", rust)}
    result = read_class_map(paths, PER_CLASS, (6, 6), IMAGE)
    assert result.overlap_pixels == 4
    assert np.array_equal(result.indices == 0, crack > 0)
    assert np.array_equal(result.indices == 1, (rust > 0) & ~(crack > 0))
    assert np.count_nonzero(result.indices == 2) == 36 - 9 - 5

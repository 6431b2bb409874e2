"""Tests for the embedded synthetic concrete-defect generator."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from hf_detr_seg.data.demo import DEMO_LABELS, generate_demo_data

NUM_IMAGES, SIZE = 20, 256
CRACK, SPALLING, EFFLORESCENCE, CORROSION = 1, 2, 3, 4


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_data(tmp_path_factory.mktemp("demo"), num_images=NUM_IMAGES, size=SIZE, seed=0)


def _pairs(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(grey image, mask) for every sample, in stem order."""
    out = []
    for mask_path in sorted((root / "masks").glob("*.png")):
        grey = cv2.imread(str(root / "images" / f"{mask_path.stem}.jpg"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        out.append((grey, np.array(Image.open(mask_path))))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_sizes(demo_dir: Path) -> None:
    stems = [f"demo_{i:04d}" for i in range(NUM_IMAGES)]
    assert sorted(p.stem for p in (demo_dir / "images").iterdir()) == stems
    assert sorted(p.name for p in (demo_dir / "masks").iterdir()) == [f"{s}.png" for s in stems]
    assert (demo_dir / "labels.yaml").is_file()
    for stem in stems:
        with Image.open(demo_dir / "images" / f"{stem}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))
        with Image.open(demo_dir / "masks" / f"{stem}.png") as mask:
            assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (SIZE, SIZE))


def test_returns_out_dir_and_accepts_str(tmp_path: Path) -> None:
    assert generate_demo_data(str(tmp_path / "d"), num_images=1, size=64) == tmp_path / "d"


def test_rejects_tiny_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_demo_data(tmp_path, num_images=1, size=16)


def test_labels_yaml_round_trips(demo_dir: Path) -> None:
    assert yaml.safe_load((demo_dir / "labels.yaml").read_text()) == DEMO_LABELS
    assert DEMO_LABELS == {
        "mask_format": "indexed",
        "classes": [
            {"name": "crack", "isthing": True, "value": 1, "measure": "crack"},
            {"name": "spalling", "isthing": True, "value": 2},
            {"name": "efflorescence", "isthing": True, "value": 3},
            {"name": "corrosion", "isthing": True, "value": 4},
            {"name": "surface", "isthing": False, "background": True, "value": 0},
        ],
        "instances": {"connectivity": 8, "min_area": 16, "merge_distance": 0},
    }


def test_mask_values_and_class_coverage(demo_dir: Path) -> None:
    seen: set[int] = set()
    for _, mask in _pairs(demo_dir):
        values = set(np.unique(mask).tolist())
        assert values <= {0, 1, 2, 3, 4}
        assert 0 in values and len(values) >= 2, "each image has surface and at least one defect"
        seen |= values
    assert seen == {0, 1, 2, 3, 4}


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    a = generate_demo_data(tmp_path / "a", num_images=4, size=128, seed=7)
    b = generate_demo_data(tmp_path / "b", num_images=4, size=128, seed=7)
    assert _files(a) == _files(b)


def test_different_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_demo_data(tmp_path / "a", num_images=4, size=128, seed=0))
    b = _files(generate_demo_data(tmp_path / "b", num_images=4, size=128, seed=1))
    for kind in ("images", "masks"):
        for i in range(4):
            name = f"{kind}/demo_{i:04d}.{'jpg' if kind == 'images' else 'png'}"
            assert a[name] != b[name]


def test_image_independent_of_num_images(tmp_path: Path) -> None:
    few = generate_demo_data(tmp_path / "few", num_images=5, size=128, seed=3)
    many = generate_demo_data(tmp_path / "many", num_images=10, size=128, seed=3)
    for rel in ("images/demo_0003.jpg", "masks/demo_0003.png"):
        assert (few / rel).read_bytes() == (many / rel).read_bytes()


def test_defects_darker_or_lighter_than_surface(demo_dir: Path) -> None:
    checked = {CRACK: 0, EFFLORESCENCE: 0}
    for grey, mask in _pairs(demo_dir):
        surface = grey[mask == 0].mean()
        if (mask == CRACK).any():
            assert grey[mask == CRACK].mean() < surface - 25
            checked[CRACK] += 1
        if (mask == EFFLORESCENCE).any():
            assert grey[mask == EFFLORESCENCE].mean() > surface + 25
            checked[EFFLORESCENCE] += 1
    assert all(checked.values())


def test_crack_mask_matches_painted_pixels(demo_dir: Path) -> None:
    """The 1 px ring just outside a crack must look like surface, i.e. the mask is not shifted or blurred."""
    kernel = np.ones((3, 3), np.uint8)
    for grey, mask in _pairs(demo_dir):
        crack = (mask == CRACK).astype(np.uint8)
        if crack.any():
            ring = (cv2.dilate(crack, kernel) > 0) & (mask == 0)
            assert grey[ring].mean() > grey[crack > 0].mean() + 20


def test_instances_are_whole_components(demo_dir: Path) -> None:
    """Each drawn defect is one 8-connected component of >= min_area px, so no demo defect is filtered away."""
    min_area = DEMO_LABELS["instances"]["min_area"]
    for _, mask in _pairs(demo_dir):
        for value in (CRACK, SPALLING, EFFLORESCENCE, CORROSION):
            count, _, stats, _ = cv2.connectedComponentsWithStats((mask == value).astype(np.uint8), connectivity=8)
            assert (stats[1:count, cv2.CC_STAT_AREA] >= min_area).all()


@pytest.mark.parametrize("size", [64, 256, 512])
def test_each_drawn_crack_is_one_component(size: int) -> None:
    """Trunk and branches connect and the walk never leaves the frame, so a crack is never split in two."""
    from hf_detr_seg.data.demo import _crack_shape

    for seed in range(40):
        crack = _crack_shape(np.random.default_rng(seed), size).astype(np.uint8)
        count, _, stats, _ = cv2.connectedComponentsWithStats(crack, connectivity=8)
        assert count == 2 and stats[1, cv2.CC_STAT_AREA] >= DEMO_LABELS["instances"]["min_area"]

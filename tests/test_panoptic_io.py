"""COCO-panoptic PNG reading: the OpenCV fast path gives the ids PIL's RGB conversion gives, for every PNG mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_detr_seg.data.panoptic import read_panoptic_png, rgb_to_id, write_panoptic_png
from hf_detr_seg.errors import DataError


def _pil_ids(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return rgb_to_id(np.asarray(img.convert("RGB")))


def test_round_trip_of_24_bit_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**24, size=(37, 53)).astype(np.int64)  # every byte of R, G and B exercised
    write_panoptic_png(tmp_path / "ids.png", ids)
    read = read_panoptic_png(tmp_path / "ids.png")
    assert read.dtype == np.uint32 and read.shape == (37, 53)
    np.testing.assert_array_equal(read, ids)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "I;16"])
def test_every_png_mode_reads_as_pil_converts_it(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, size=(20, 30), dtype=np.uint8)))
    elif mode == "P":
        image = image.quantize(colors=17)
    elif mode in ("L", "LA"):
        image = image.convert(mode)
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(20, 30)).astype(np.uint16))
    path = tmp_path / f"{mode.replace(';', '')}.png"
    image.save(path)
    np.testing.assert_array_equal(read_panoptic_png(path), _pil_ids(path))


def test_unreadable_png_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: cannot read panoptic PNG"):
        read_panoptic_png(bad)
    with pytest.raises(DataError, match="missing.png: cannot read panoptic PNG"):
        read_panoptic_png(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: cannot read panoptic PNG"):
        read_panoptic_png(empty)

"""What goes into a prediction: image files found from the command line's inputs, and images as RGB arrays."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.builder import IMAGE_SUFFIXES
from ..errors import DataError, UserInputError

ImageInput = Image.Image | np.ndarray | str | Path

_GLOB_CHARS = set("*?[")


def as_rgb_array(image: ImageInput) -> np.ndarray:
    """H x W x 3 uint8 RGB from a PIL image, an array (grey, RGB or RGBA) or a path (EXIF orientation applied)."""
    if isinstance(image, (str, Path)):
        return read_photo(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise UserInputError(f"expected a PIL image, a numpy array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise UserInputError(f"image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise UserInputError(f"image array must be H x W x 3 (RGB), got shape {image.shape}")
    return np.ascontiguousarray(image)


def read_photo(path: Path) -> np.ndarray:
    """The RGB array of an image file, EXIF orientation applied (the pixels of `data.masks.read_image`, as the builder reads them);
    `DataError` naming the file when it cannot be read.

    Lean on memory for 48-megapixel photos: the decoded image is transposed in place and converted only when it
    is not RGB already, so one PIL copy (4 bytes a pixel) and the array (3) are alive at once, not four copies.
    """
    try:
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode != "RGB":
                img = img.convert("RGB")
            return as_rgb_array(np.asarray(img))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err}); the file is corrupt or truncated") from None


def expand_inputs(inputs: Sequence[str | Path], exclude: Path | None = None) -> list[Path]:
    """Files as given, folders' images (sorted, not recursive), glob patterns' images (sorted; `**` recurses).

    Duplicates are dropped (first kept); files under `exclude` (the output folder) are skipped for folders and
    patterns. Raises `UserInputError` naming every input that matched no image.
    """
    found: list[Path] = []
    empty: list[str] = []
    excluded = exclude.resolve() if exclude is not None else None

    def keep(path: Path) -> bool:
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return False
        return excluded is None or excluded not in path.resolve().parents

    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if keep(p))
        elif _GLOB_CHARS & set(str(raw)):
            matches = sorted(p for p in map(Path, glob.glob(str(raw), recursive=True)) if keep(p))
        else:
            matches = []
        if not matches:
            empty.append(str(raw))
        found += matches
    if empty:
        raise UserInputError(
            "no image matches " + ", ".join(repr(e) for e in empty)
            + f" (expected image files, folders of images or glob patterns; image suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Each image's output name: its stem, with `-2`, `-3`... when two inputs share one."""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems

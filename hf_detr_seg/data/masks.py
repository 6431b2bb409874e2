"""Readers that turn the masks people have into one class-index array.

The result of every reader is the same: an `int16` array of the image's size holding the model class index
of each pixel (0..K-1, see `LabelMap`) or `VOID` (-1) for pixels that belong to no class (ignored values,
pixels of no class when the label map has no background class). Later steps never see the mask format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from ..labels import LabelMap

VOID = -1
_UNKNOWN = -2  # lookup-table marker for mask values the label map does not know

_LOSSY_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

MaskSource = Path | dict[str, Path]  # one mask file, or per_class_dirs: class name -> mask file


@dataclass
class ClassMap:
    """A mask read into class indices, plus what the reader had to decide along the way."""

    indices: np.ndarray  # int16, HxW, class index or VOID
    overlap_pixels: int = 0  # per_class_dirs: pixels claimed by two classes (first listed wins)


def read_image(path: Path) -> Image.Image:
    """Open an RGB image with its EXIF orientation applied, fully decoded (truncation raises here)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err}); the file is corrupt or truncated") from None


def _load_mask_array(path: Path) -> np.ndarray:
    """Decode a mask file to a numpy array without any colour conversion."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "1":
                img = img.convert("L")
            return np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read mask ({err}); the file is corrupt or truncated") from None


def _single_channel(array: np.ndarray, path: Path) -> np.ndarray:
    """Masks saved as grey RGB(A) or grey+alpha are accepted; real colour is an error."""
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] in (2, 3, 4):
        grey = array[..., 0]
        if array.shape[2] >= 3 and not (
            np.array_equal(grey, array[..., 1]) and np.array_equal(grey, array[..., 2])
        ):
            raise DataError(
                f"{path}: expected a single-channel mask but found colour pixels; "
                "use `mask_format: color` for colour-coded masks"
            )
        return grey
    raise DataError(f"{path}: unexpected mask shape {array.shape}")


def _foreground(array: np.ndarray, threshold: int, path: Path) -> np.ndarray:
    """Binary foreground: value > threshold, with the threshold scaled to the bit depth.

    A lossless mask holding only 0 and 1 is read as 0/1 (a common way to save binary masks); comparing it
    with an 8-bit threshold would silently lose every pixel. JPEG masks are excluded: their noise near 0
    can reach 1.
    """
    if array.dtype == np.bool_:
        return array
    if array.dtype == np.uint16 or array.dtype == np.int32:
        threshold = threshold * 257 if int(array.max(initial=0)) > 255 else threshold
    if int(array.max(initial=0)) == 1 and path.suffix.lower() not in _LOSSY_SUFFIXES:
        return array == 1
    return array > threshold


def _check_size(array: np.ndarray, path: Path, size: tuple[int, int], image_path: Path) -> None:
    width, height = size
    if array.shape[:2] != (height, width):
        raise DataError(
            f"{path}: mask is {array.shape[1]}x{array.shape[0]} but its image {image_path.name} is "
            f"{width}x{height} (width x height)"
        )


def _fill_rest(indices: np.ndarray, label_map: LabelMap) -> None:
    """Pixels of no defect become the background class (or stay void without one)."""
    background = label_map.background_index
    if background is not None:
        indices[indices == VOID] = background


def read_binary(path: Path, label_map: LabelMap, size: tuple[int, int], image_path: Path) -> ClassMap:
    array = _single_channel(_load_mask_array(path), path)
    _check_size(array, path, size, image_path)
    defect = next(i for i, c in enumerate(label_map.classes) if not c.background and not c.from_coco)
    indices = np.full(array.shape, VOID, dtype=np.int16)
    indices[_foreground(array, label_map.binary_threshold, path)] = defect
    _fill_rest(indices, label_map)
    return ClassMap(indices)


def read_indexed(path: Path, label_map: LabelMap, size: tuple[int, int], image_path: Path) -> ClassMap:
    array = _single_channel(_load_mask_array(path), path)
    _check_size(array, path, size, image_path)
    if array.dtype.kind not in "ui":
        raise DataError(f"{path}: indexed masks must hold integers, found {array.dtype}")
    known = {c.value: i for i, c in enumerate(label_map.classes) if c.value is not None}
    table_size = max(int(array.max(initial=0)), *known, *label_map.ignore, 0) + 1
    lookup = np.full(table_size, _UNKNOWN, dtype=np.int16)
    for value, index in known.items():
        lookup[value] = index
    lookup[list(label_map.ignore)] = VOID
    indices = lookup[array]
    unknown = indices == _UNKNOWN
    if unknown.any():
        values = np.unique(array[unknown])
        raise DataError(
            f"{path}: mask value(s) {values[:10].tolist()} ({int(unknown.sum())} pixels) are not in the "
            f"label map (known values {sorted(known)}, ignored {list(label_map.ignore)})"
        )
    return ClassMap(indices)


def _distance_to_blends(colors: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Distance of each colour to the nearest straight blend of two palette colours.

    JPEG smears the edge between two class colours into mixtures of them; such a pixel is a blend, not a
    colour the label map does not know.
    """
    best = np.full(len(colors), np.inf)
    for i in range(len(palette)):
        for j in range(i + 1, len(palette)):
            direction = palette[j] - palette[i]
            t = np.clip((colors - palette[i]) @ direction / max(direction @ direction, 1e-9), 0.0, 1.0)
            nearest_point = palette[i] + t[:, None] * direction
            best = np.minimum(best, np.linalg.norm(colors - nearest_point, axis=1))
    return best


def read_color(path: Path, label_map: LabelMap, size: tuple[int, int], image_path: Path) -> ClassMap:
    """Nearest palette colour; colours farther than `color_tolerance` from every class colour and from
    every blend of two class colours (JPEG edges) are an error."""
    array = _load_mask_array(path)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] < 3:
        raise DataError(f"{path}: colour masks must be RGB images, found shape {array.shape}")
    _check_size(array, path, size, image_path)
    rgb = array[..., :3].astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colors, inverse = np.unique(packed.ravel(), return_inverse=True)
    unique_rgb = np.stack([(colors >> 16) & 255, (colors >> 8) & 255, colors & 255], axis=1).astype(np.float64)
    user = [(i, c.color) for i, c in enumerate(label_map.classes) if not c.from_coco]
    palette = np.asarray([color for _, color in user] + list(label_map.ignore_colors), dtype=np.float64)
    targets = np.asarray([i for i, _ in user] + [VOID] * len(label_map.ignore_colors), dtype=np.int16)
    distance = np.linalg.norm(unique_rgb[:, None, :] - palette[None], axis=2)
    nearest = distance.argmin(axis=1)
    too_far = distance[np.arange(len(colors)), nearest] > label_map.color_tolerance
    if too_far.any():
        too_far[too_far] = _distance_to_blends(unique_rgb[too_far], palette) > label_map.color_tolerance
    if too_far.any():
        bad = unique_rgb[too_far].astype(int)
        counts = np.bincount(inverse, minlength=len(colors))[too_far]
        worst = bad[np.argmax(counts)].tolist()
        raise DataError(
            f"{path}: colour {worst} ({int(counts.sum())} pixels in {len(bad)} colour(s)) is farther than "
            f"color_tolerance={label_map.color_tolerance:g} from every class colour {palette.astype(int).tolist()}"
        )
    return ClassMap(targets[nearest][inverse].reshape(packed.shape))


def read_per_class(
    paths: dict[str, Path], label_map: LabelMap, size: tuple[int, int], image_path: Path
) -> ClassMap:
    """One binary mask per class; where classes overlap, the class listed first wins."""
    width, height = size
    indices = np.full((height, width), VOID, dtype=np.int16)
    overlap = 0
    for index, info in enumerate(label_map.classes):
        path = paths.get(info.name)
        if path is None:
            continue
        array = _single_channel(_load_mask_array(path), path)
        _check_size(array, path, size, image_path)
        foreground = _foreground(array, label_map.binary_threshold, path)
        taken = indices != VOID
        overlap += int(np.count_nonzero(foreground & taken))
        indices[foreground & ~taken] = index
    _fill_rest(indices, label_map)
    return ClassMap(indices, overlap_pixels=overlap)


def read_class_map(source: MaskSource, label_map: LabelMap, image_size: tuple[int, int], image_path: Path) -> ClassMap:
    """Read one image's mask(s) in the label map's format; `image_size` is (width, height)."""
    if label_map.mask_format == "per_class_dirs":
        assert isinstance(source, dict)
        return read_per_class(source, label_map, image_size, image_path)
    assert isinstance(source, Path)
    reader = {"binary": read_binary, "indexed": read_indexed, "color": read_color}[label_map.mask_format]
    return reader(source, label_map, image_size, image_path)

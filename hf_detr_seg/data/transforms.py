"""Geometric and photometric augmentation that keeps an image and its segment masks consistent.

Arrays in, arrays out: `image` is H x W x 3 uint8 (RGB), `masks` is N x H x W bool, one disjoint mask per
segment (a panoptic image: every pixel is in at most one mask, void pixels in none). Every random choice
comes from the `numpy.random.Generator` passed in, so the same generator state gives the same output.

Rules that keep the data honest:
- Masks are resized through a segment-id map with nearest-neighbour sampling, so a pixel never ends up in
  two masks and no mask is blurred into a soft edge. `cv2.INTER_NEAREST_EXACT` samples at pixel centres
  (as PIL's NEAREST and torchvision's NEAREST_EXACT, which transformers' DETR processor uses), aligned with
  the image's bilinear/area resize; plain `INTER_NEAREST` is shifted by up to half a source pixel.
- Boxes are never transformed: they are recomputed from the final masks (`masks_to_boxes`), so they are
  always tight. A segment whose mask becomes empty (cropped away, or too thin to survive a downscale) is
  dropped, and `keep` says which input segments are left, so the caller can drop their labels too.
- The output size follows DETR's rule (`output_size`): shortest edge N, unless the longest edge would then
  exceed `longest_edge(N)` = round(N * 1333 / 800), in which case the longest edge is that limit. The
  arithmetic is transformers' `get_size_with_aspect_ratio`, so training sizes equal the ones the saved
  `DetrImageProcessor(size={"shortest_edge": N, "longest_edge": longest_edge(N)})` gives at inference.

The augmentation (`augment`) runs: flips -> optional quarter turn -> optional crop -> resize to a jittered
shortest edge -> drop vanished segments -> brightness/contrast -> optional blur -> optional JPEG round trip.
The crop comes before the resize so the output obeys the size rule whatever the crop was; photometric changes
come last because they are cheapest on the smaller image and touch no geometry. Blur and JPEG act on the image
at the size the model reads, where a camera's softness and compression show. A step whose probability is 0
draws no random number, so turning one on leaves the draws of a config without it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

DETR_SHORTEST = 800
DETR_LONGEST = 1333


# ----------------------------------------------------------------------------- sizes
def longest_edge(shortest: int) -> int:
    """DETR's longest-edge limit for a shortest edge: 800 -> 1333, scaled (192 -> 320, 128 -> 213)."""
    return int(round(shortest * DETR_LONGEST / DETR_SHORTEST))


def output_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """(height, width) after resizing to `shortest` edge, capped so the longest edge is at most `longest`.

    Same arithmetic as transformers' `get_size_with_aspect_ratio` (truncation, not rounding, of the
    long side), so that a model sees the same input size in training and through its saved processor.
    """
    size = shortest
    raw_size = None
    if longest is not None:
        short_side, long_side = float(min(height, width)), float(max(height, width))
        if long_side / short_side * size > longest:
            raw_size = longest * short_side / long_side
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    scale = raw_size if raw_size is not None else size
    if width < height:
        return max(1, int(scale * height / width)), size
    return size, max(1, int(scale * width / height))


# ----------------------------------------------------------------------------- masks <-> id map
def masks_to_id_map(masks: np.ndarray) -> np.ndarray:
    """N x H x W disjoint bool masks -> H x W int32 map (0 = no mask, i + 1 = mask i).

    Raises ValueError when masks overlap: a map cannot hold a pixel of two segments, and panoptic masks
    never overlap, so an overlap means the caller passed something else.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be N x H x W, got shape {masks.shape}")
    if masks.shape[0] and int(masks.sum(0, dtype=np.int32).max()) > 1:
        raise ValueError("masks overlap; these transforms need disjoint (panoptic) masks")
    id_map = np.zeros(masks.shape[1:], np.int32)
    for i, mask in enumerate(masks):
        id_map[mask] = i + 1
    return id_map


def id_map_to_masks(id_map: np.ndarray, count: int) -> np.ndarray:
    """H x W map from `masks_to_id_map` -> `count` x H x W bool masks (empty masks are kept)."""
    return id_map[None] == np.arange(1, count + 1, dtype=id_map.dtype)[:, None, None]


# ----------------------------------------------------------------------------- geometry
def resize(image: np.ndarray, masks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to exactly (height, width): image by area (shrinking) or bilinear (enlarging), masks nearest.

    Area averaging when shrinking avoids the aliasing of plain bilinear (it plays the part of the
    processor's antialiased bilinear); masks go through the id map so they stay disjoint and binary.
    """
    if image.shape[:2] == (height, width):
        return image, masks
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    image = cv2.resize(image, (width, height), interpolation=interpolation)
    id_map = cv2.resize(masks_to_id_map(masks), (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, id_map_to_masks(id_map, masks.shape[0])


def resize_shortest_edge(
    image: np.ndarray, masks: np.ndarray, shortest: int, longest: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """DETR's resize: shortest edge `shortest` unless the longest would exceed `longest` (see `output_size`).

    `longest` defaults to `longest_edge(shortest)`, DETR's 800/1333 ratio.
    """
    if longest is None:
        longest = longest_edge(shortest)
    height, width = output_size(image.shape[0], image.shape[1], shortest, longest)
    return resize(image, masks, height, width)


def hflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right (contiguous copies, so torch.from_numpy accepts them)."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(masks[:, :, ::-1])


def vflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom: surface defects have no up or down, so this is as valid as a horizontal flip."""
    return np.ascontiguousarray(image[::-1]), np.ascontiguousarray(masks[:, ::-1])


def rotate90(image: np.ndarray, masks: np.ndarray, clockwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """A quarter turn of image and masks (height and width swap)."""
    turns = -1 if clockwise else 1
    return (np.ascontiguousarray(np.rot90(image, turns, axes=(0, 1))),
            np.ascontiguousarray(np.rot90(masks, turns, axes=(1, 2))))


def crop(
    image: np.ndarray, masks: np.ndarray, top: int, left: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The window [top, top + height) x [left, left + width) of image and masks (empty masks are kept)."""
    window = (slice(top, top + height), slice(left, left + width))
    return np.ascontiguousarray(image[window]), np.ascontiguousarray(masks[(slice(None), *window)])


def drop_empty(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks with at least one pixel, and the indices (into `masks`) of those kept."""
    keep = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(1)) if len(masks) else np.zeros(0, np.int64)
    return masks[keep], keep


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes [x0, y0, x1, y1] in pixel-edge coordinates (x1 = last column + 1), float32, N x 4.

    Pixel edges, as COCO's [x, y, w, h] (w = columns covered): a one-pixel-wide crack gets width 1, not 0.
    (transformers' and DETR's panoptic `masks_to_boxes` use the last pixel's index, one pixel smaller.)
    Every mask must be non-empty.
    """
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(1))
        cols = np.flatnonzero(mask.any(0))
        if rows.size == 0:
            raise ValueError(f"mask {i} is empty; drop empty masks before computing boxes")
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def normalized_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """[x0, y0, x1, y1] pixels -> DETR's (cx, cy, w, h) divided by the image's own (unpadded) width/height."""
    x0, y0, x1, y1 = boxes.T
    scale = np.array([width, height, width, height], np.float32)
    return (np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1) / scale).astype(np.float32)


# ----------------------------------------------------------------------------- photometry
def adjust_brightness_contrast(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """Scale intensities by `brightness`, then stretch about the mean grey by `contrast` (1, 1 = unchanged).

    A global affine map per image: it never moves a pixel, so masks are unaffected, and pixels of equal
    colour stay equal.
    """
    if brightness == 1.0 and contrast == 1.0:
        return image
    out = image.astype(np.float32) * brightness
    mean = float(out.mean())
    out = (out - mean) * contrast + mean
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with a Gaussian of `sigma` pixels (the kernel spans 3 sigma each side), edges reflected."""
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """The image after JPEG compression at `quality` (1-100): the blocking and ringing of camera files."""
    ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])


# ----------------------------------------------------------------------------- the augmentation
@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of `augment`; the defaults are mild, for small defect datasets.

    scale_range: the shortest edge is drawn uniformly from the multiples of 8 in
        [scale_range[0] * N, scale_range[1] * N] (at least one: N rounded to 8), while the longest-edge limit
        stays `longest_edge(N)`, as DETR keeps max_size 1333 for all its random scales: memory stays bounded.
    crop_prob / crop_min_fraction: with probability crop_prob, crop a random window whose height and width
        are each at least crop_min_fraction of the image's (before the resize, so the size rule holds).
    brightness / contrast: factors drawn uniformly from [1 - b, 1 + b] and [1 - c, 1 + c] (0 disables).
    rotate90_prob: probability of a quarter turn, clockwise or anticlockwise alike; with both flips the
        image can take any of its 8 axis-aligned orientations (defects have no up or left).
    blur_prob / blur_sigma: probability of a Gaussian blur, sigma drawn uniformly from the range (pixels).
    jpeg_prob / jpeg_quality: probability of a JPEG round trip, quality drawn uniformly from the range.
    defect_free_prob: probability of painting an image's defects out before the rest, so that it trains as
        background alone (`defect_free.py`; the dataset applies it, since it needs the classes).
    """

    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    scale_range: tuple[float, float] = (0.75, 1.25)
    crop_prob: float = 0.5
    crop_min_fraction: float = 0.6
    brightness: float = 0.2
    contrast: float = 0.2
    rotate90_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.4, 1.2)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 90)
    defect_free_prob: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if not 0 < self.crop_min_fraction <= 1:
            raise ValueError(f"crop_min_fraction must be in (0, 1], got {self.crop_min_fraction}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must satisfy 1 <= low <= high <= 100, got {self.jpeg_quality}")
        for name in ("hflip_prob", "vflip_prob", "crop_prob", "brightness", "contrast", "rotate90_prob",
                     "blur_prob", "jpeg_prob", "defect_free_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def shortest_edge_choices(image_size: int, scale_range: tuple[float, float]) -> np.ndarray:
    """Multiples of 8 in [low * N, high * N]; N rounded to a multiple of 8 when the range holds none."""
    low = math.ceil(scale_range[0] * image_size / 8) * 8
    high = math.floor(scale_range[1] * image_size / 8) * 8
    if high < max(low, 8):
        return np.array([max(8, int(round(image_size / 8)) * 8)])
    return np.arange(max(low, 8), high + 1, 8)


def random_crop_window(
    rng: np.random.Generator, height: int, width: int, min_fraction: float
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a window at least `min_fraction` of each side, placed uniformly."""
    crop_h = int(rng.integers(max(1, math.ceil(min_fraction * height)), height + 1))
    crop_w = int(rng.integers(max(1, math.ceil(min_fraction * width)), width + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


@dataclass(frozen=True)
class Geometry:
    """The geometric draws of one augmented sample, kept apart from the pixels so that the output size is
    known before the image is read (`size`): batches can then be grouped by size (batching.py)."""

    hflip: bool
    vflip: bool
    turn: int  # np.rot90's k: 0 none, -1 a clockwise quarter turn, 1 an anticlockwise one
    window: tuple[int, int, int, int] | None  # crop (top, left, height, width) of the turned image, or none
    shortest: int  # the jittered shortest edge

    def size(self, height: int, width: int, image_size: int) -> tuple[int, int]:
        """(height, width) of the augmented output of an image of `height` x `width`."""
        if self.turn:
            height, width = width, height
        if self.window is not None:
            height, width = self.window[2:]
        return output_size(height, width, self.shortest, longest_edge(image_size))


def draw_geometry(
    rng: np.random.Generator, height: int, width: int, image_size: int, config: AugmentConfig = AugmentConfig()
) -> Geometry:
    """Flips, quarter turn, crop window and shortest edge, drawn in `augment`'s order (the first draws)."""
    hflip = bool(rng.random() < config.hflip_prob)
    vflip = bool(rng.random() < config.vflip_prob)
    turn = 0
    if config.rotate90_prob and rng.random() < config.rotate90_prob:
        turn = -1 if rng.random() < 0.5 else 1
        height, width = width, height
    window = None
    if rng.random() < config.crop_prob:
        window = random_crop_window(rng, height, width, config.crop_min_fraction)
    shortest = int(rng.choice(shortest_edge_choices(image_size, config.scale_range)))
    return Geometry(hflip, vflip, turn, window, shortest)


def apply_geometry(
    image: np.ndarray, masks: np.ndarray, geometry: Geometry, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`geometry` applied to image and masks; returns (image, masks, keep) as `augment`."""
    keep = np.arange(masks.shape[0])
    if geometry.hflip:
        image, masks = hflip(image, masks)
    if geometry.vflip:
        image, masks = vflip(image, masks)
    if geometry.turn:
        image, masks = rotate90(image, masks, clockwise=geometry.turn < 0)
    if geometry.window is not None:
        image, masks = crop(image, masks, *geometry.window)
        masks, kept = drop_empty(masks)
        keep = keep[kept]
    image, masks = resize_shortest_edge(image, masks, geometry.shortest, longest_edge(image_size))
    masks, kept = drop_empty(masks)
    return image, masks, keep[kept]


def augment(
    image: np.ndarray,
    masks: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    config: AugmentConfig = AugmentConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random flips, quarter turn, crop, scale jitter, brightness/contrast, blur and JPEG; returns (image, masks,
    keep).

    `keep` indexes the input masks that survived (non-empty after the crop and the resize), in order,
    so `labels[keep]` are the labels of the returned masks. Random numbers are drawn in a fixed order, the
    geometry's first, so the result depends only on the inputs, the config and the generator's state.
    """
    geometry = draw_geometry(rng, image.shape[0], image.shape[1], image_size, config)
    image, masks, keep = apply_geometry(image, masks, geometry, image_size)
    brightness = rng.uniform(1 - config.brightness, 1 + config.brightness)
    contrast = rng.uniform(1 - config.contrast, 1 + config.contrast)
    image = adjust_brightness_contrast(image, float(brightness), float(contrast))
    if config.blur_prob and rng.random() < config.blur_prob:
        image = gaussian_blur(image, float(rng.uniform(*config.blur_sigma)))
    if config.jpeg_prob and rng.random() < config.jpeg_prob:
        image = jpeg_round_trip(image, int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)))
    return image, masks, keep


def fixed_resize(image: np.ndarray, masks: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The evaluation transform: DETR's resize only; returns (image, masks, keep) like `augment`."""
    image, masks = resize_shortest_edge(image, masks, image_size, longest_edge(image_size))
    masks, keep = drop_empty(masks)
    return image, masks, keep

"""Embedded synthetic concrete-defect dataset.

Lets demos, tests and CI run the whole fine-tuning pipeline without downloading
real inspection photos: grey concrete with cracks, spalling, efflorescence and
corrosion stains, plus indexed masks whose pixels are exactly the painted
defect footprints (no anti-aliasing, so every mask pixel is a real class value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import yaml

CRACK, SPALLING, EFFLORESCENCE, CORROSION = 1, 2, 3, 4

DEMO_LABELS: dict = {
    "mask_format": "indexed",
    "classes": [
        {"name": "crack", "isthing": True, "value": CRACK, "measure": "crack"},
        {"name": "spalling", "isthing": True, "value": SPALLING},
        {"name": "efflorescence", "isthing": True, "value": EFFLORESCENCE},
        {"name": "corrosion", "isthing": True, "value": CORROSION},
        {"name": "surface", "isthing": False, "background": True, "value": 0},
    ],
    "instances": {"connectivity": 8, "min_area": 16, "merge_distance": 0},
}

# The demo's size: enough varied images for DETR to generalise within the CPU demo's few thousand steps
# (drawing and building 400 images takes seconds).
DEMO_NUM_IMAGES = 400
# Drawn at the size the tiny-cpu recipe feeds the model: the 1-3 px cracks reach it unresampled.
DEMO_SIZE = 192
_MIN_AREA = DEMO_LABELS["instances"]["min_area"]
_PLACEMENT_TRIES = 8
# Defects keep >= 2 px apart so two instances never touch and merge into one component.
_GAP_KERNEL = np.ones((5, 5), np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, rows: int | None = None) -> np.ndarray:
    """Unit-scale value noise with `cells` features per side: cheap low-frequency variation.

    Fewer `rows` than `cells` stretches features vertically: the streaks of water run-off.
    """
    grid = rng.standard_normal((rows or cells, cells), dtype=np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bare concrete (float RGB): per-image tone, uneven lighting, mottling, grain, pores and specks."""
    base = rng.uniform(115, 170)
    lum = base + 9 * _smooth_noise(rng, size, 4) + 4 * _smooth_noise(rng, size, 24)
    lum += 5 * rng.standard_normal((size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    lum *= 1 + rng.uniform(0, 0.2) * (np.cos(theta) * xx + np.sin(theta) * yy)
    tint = np.array([3, 1, -3], np.float32) + rng.normal(0, 1.5, 3).astype(np.float32)
    img = lum[..., None] + tint
    scale = size / 256
    for _ in range(size * size // 1200):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.7:  # air pore: small and dark
            radius, shade = rng.uniform(0.5, 1.8) * scale, base * rng.uniform(0.4, 0.7)
        else:  # aggregate speck: a bit larger, slightly off-tone
            radius, shade = rng.uniform(1.0, 3.0) * scale, base * rng.uniform(0.85, 1.15)
        cv2.circle(img, centre, max(1, round(radius)), (shade,) * 3, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), 0.7)


def _largest_component(fp: np.ndarray) -> np.ndarray:
    """Keep the biggest 8-connected piece, so one drawn defect is exactly one instance."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fp.astype(np.uint8), connectivity=8)
    if count <= 1:
        return labels > 0
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float,
          size: int) -> list[tuple[int, int]]:
    """Meandering polyline that turns back at the border, so a crack never leaves the frame and splits."""
    pts, (x, y) = [tuple(int(v) for v in start.round())], start
    for _ in range(steps):
        angle += rng.normal(0, 0.3)
        if not (step < x + step * np.cos(angle) < size - step and step < y + step * np.sin(angle) < size - step):
            angle = np.arctan2(size / 2 - y, size / 2 - x) + rng.normal(0, 0.4)
        x = float(np.clip(x + step * np.cos(angle), 1, size - 2))
        y = float(np.clip(y + step * np.sin(angle), 1, size - 2))
        pts.append((round(x), round(y)))
    return pts


def _draw_tapered(fp: np.ndarray, pts: list[tuple[int, int]], width: int) -> None:
    """Draw a polyline whose thickness shrinks towards its tip, like a real crack; segments share endpoints."""
    for k in range(len(pts) - 1):
        thickness = max(1, int(np.ceil(width * (1 - k / len(pts)))))
        cv2.line(fp, pts[k], pts[k + 1], 1, thickness, cv2.LINE_8)


def _crack_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two walks from a common origin (widest there, tapering to both tips), 0-2 forks: one connected crack."""
    fp = np.zeros((size, size), np.uint8)
    step, width = max(2.0, size * 0.025), int(rng.integers(1, 4))
    origin, angle = rng.uniform(0.25, 0.75, 2) * size, rng.uniform(0, 2 * np.pi)
    steps, share = rng.uniform(0.35, 0.8) * size / step, rng.uniform(0.3, 0.7)
    halves = [_walk(rng, origin, angle + turn, max(2, int(steps * part)), step, size)
              for turn, part in ((0.0, share), (np.pi, 1 - share))]
    for half in halves:
        _draw_tapered(fp, half, width)
    trunk = halves[0][::-1] + halves[1][1:]
    for _ in range(int(rng.integers(0, 3))):
        i = int(rng.integers(1, len(trunk) - 1))
        heading = np.arctan2(trunk[i + 1][1] - trunk[i - 1][1], trunk[i + 1][0] - trunk[i - 1][0])
        fork = heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
        length = max(2, int(len(trunk) * rng.uniform(0.2, 0.45)))
        branch = _walk(rng, np.array(trunk[i], float), fork, length, step, size)
        _draw_tapered(fp, branch, max(1, width - 1))
    return fp > 0


def _blob(rng: np.random.Generator, size: int, radius: float, jitter: float, aspect: float = 1.0) -> np.ndarray:
    """Filled star-shaped polygon with jittered radius: irregular outline that stays in one piece."""
    n = int(rng.integers(12, 24))
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi / n, n)
    radii = radius * (1 + jitter * rng.uniform(-1, 1, n))
    centre = rng.uniform(0.15, 0.85, 2) * size
    pts = centre + np.stack([radii * np.cos(angles), aspect * radii * np.sin(angles)], axis=1)
    fp = np.zeros((size, size), np.uint8)
    cv2.fillPoly(fp, [pts.round().astype(np.int32)], 1, cv2.LINE_8)
    return fp > 0


def _spalling_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """Jagged blob: spalls break out along sharp, irregular edges."""
    return _blob(rng, size, rng.uniform(0.05, 0.12) * size, jitter=0.35, aspect=rng.uniform(0.7, 1.3))


def _efflorescence_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """Thresholded soft blob plus noise: diffuse, cloudy outline, a bit elongated downward like salt run-off."""
    radius = rng.uniform(0.06, 0.13) * size
    blob = _blob(rng, size, radius, 0.2, aspect=rng.uniform(1.0, 1.6)).astype(np.float32)
    field = cv2.GaussianBlur(blob, (0, 0), radius / 3)
    return field + 0.15 * _smooth_noise(rng, size, max(4, size // 16)) > 0.5


def _corrosion_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """Rust streak: rounded head at the source narrowing into a wavy run-off tail running downward."""
    x0, y0 = rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.6) * size
    head, t = rng.uniform(0.025, 0.06) * size, np.linspace(0, 1, 12)
    ys = y0 + t * rng.uniform(0.2, 0.5) * size
    xs = x0 + np.cumsum(rng.normal(0, 0.008 * size, t.size))
    half = head * (1 - 0.75 * t) * (1 + 0.25 * rng.uniform(-1, 1, t.size))
    left, right = np.stack([xs - half, ys], 1), np.stack([xs + half, ys], 1)
    poly = np.concatenate([[[x0, y0 - 0.7 * head]], left, right[::-1]])
    fp = np.zeros((size, size), np.uint8)
    cv2.fillPoly(fp, [poly.round().astype(np.int32)], 1, cv2.LINE_8)
    return fp > 0


def _paint_crack(rng: np.random.Generator, img: np.ndarray, fp: np.ndarray) -> None:
    """Deep, dark gap: brightness cut to roughly a third, with slight grain."""
    factor = np.clip(rng.uniform(0.25, 0.5) + 0.06 * rng.standard_normal(int(fp.sum())), 0.1, 0.7)
    img[fp] *= factor[:, None]


def _paint_spalling(rng: np.random.Generator, img: np.ndarray, fp: np.ndarray) -> None:
    """Broken-out pocket: darker and rougher towards its depth, rim lit on one side and shadowed on the other."""
    size = fp.shape[0]
    depth = cv2.distanceTransform(fp.astype(np.uint8), cv2.DIST_L2, 3)
    rough = 0.6 * _smooth_noise(rng, size, size // 6) + 0.4 * rng.standard_normal((size, size), dtype=np.float32)
    shade = 0.85 - 0.3 * depth / max(float(depth.max()), 1.0) + 0.1 * rough
    ys, xs = np.nonzero(fp)
    light = rng.uniform(0, 2 * np.pi)
    side = np.cos(np.arctan2(np.arange(size)[:, None] - ys.mean(), np.arange(size)[None, :] - xs.mean()) - light)
    rim = fp & (depth <= max(1.0, size / 128))
    shade[rim] = 1.0 + 0.25 * side[rim]
    img[fp] *= shade[fp][:, None] * np.array([1.03, 1.0, 0.94], np.float32)


def _paint_efflorescence(rng: np.random.Generator, img: np.ndarray, fp: np.ndarray) -> None:
    """Whitish salt deposit: dense in the middle, thin (still visible) near the edge, streaky and mottled."""
    size = fp.shape[0]
    dist = cv2.distanceTransform(fp.astype(np.uint8), cv2.DIST_L2, 3)
    alpha = 0.2 + 0.45 * np.clip(dist / max(0.5 * float(dist.max()), 1.0), 0, 1)
    alpha += 0.09 * _smooth_noise(rng, size, size // 8, rows=6) + 0.06 * _smooth_noise(rng, size, size // 12)
    alpha = np.clip(alpha, 0.15, 0.8)[fp][:, None]
    white = rng.uniform(222, 242) + np.array([0, 1, 3], np.float32)
    img[fp] = img[fp] * (1 - alpha) + white * alpha


def _paint_corrosion(rng: np.random.Generator, img: np.ndarray, fp: np.ndarray) -> None:
    """Orange-brown stain strongest at its source and fading downward, sometimes with the exposed rebar."""
    size = fp.shape[0]
    ys = np.nonzero(fp)[0]
    top, height = int(ys.min()), int(ys.max() - ys.min() + 1)
    fade = 1 - 0.5 * np.clip((np.arange(size, dtype=np.float32) - top) / height, 0, 1)
    mottle = _smooth_noise(rng, size, size // 8, rows=8)
    alpha = np.clip(0.85 * fade[:, None] + 0.12 * mottle, 0.35, 0.95)[fp][:, None]
    rust = np.array([165, 85, 40], np.float32) * rng.uniform(0.75, 1.1) * (1 + 0.08 * mottle[fp])[:, None]
    img[fp] = img[fp] * (1 - alpha) + rust * alpha
    if rng.random() < 0.5:
        bar = np.zeros((size, size), np.uint8)
        y = top + int(rng.uniform(0.05, 0.2) * height)
        cv2.line(bar, (0, y), (size - 1, y + int(rng.integers(-3, 4))), 1, max(2, size // 100), cv2.LINE_8)
        bar = (bar > 0) & fp
        img[bar] = np.array([60, 42, 32], np.float32) * (1 + 0.1 * rng.standard_normal((int(bar.sum()), 1)))


_Shape = Callable[[np.random.Generator, int], np.ndarray]
_Paint = Callable[[np.random.Generator, np.ndarray, np.ndarray], None]
_DEFECTS: dict[int, tuple[_Shape, _Paint]] = {
    CRACK: (_crack_shape, _paint_crack),
    SPALLING: (_spalling_shape, _paint_spalling),
    EFFLORESCENCE: (_efflorescence_shape, _paint_efflorescence),
    CORROSION: (_corrosion_shape, _paint_corrosion),
}


def _render(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image and its indexed mask, seeded by (seed, index) so it never depends on num_images.

    A defect is only placed where it keeps a 2 px gap to earlier ones (it is dropped after a few
    failed tries), so instances never overlap or merge and the mask is exactly what was painted.
    """
    rng = np.random.default_rng([seed, index])
    img = _surface(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        value = int(rng.integers(1, 5))
        shape, paint = _DEFECTS[value]
        occupied = cv2.dilate(mask, _GAP_KERNEL) > 0
        for _ in range(_PLACEMENT_TRIES):
            fp = _largest_component(shape(rng, size))
            if fp.sum() >= _MIN_AREA and not occupied[fp].any():
                paint(rng, img, fp)
                mask[fp] = value
                break
    return np.clip(img, 0, 255).round().astype(np.uint8), mask


def generate_demo_data(
    out_dir: str | Path, num_images: int = DEMO_NUM_IMAGES, size: int = DEMO_SIZE, seed: int = 0
) -> Path:
    """Write out_dir/images/<stem>.jpg, out_dir/masks/<stem>.png, out_dir/labels.yaml; return out_dir."""
    if size < 64:
        raise ValueError(f"size must be >= 64 to fit the demo defects, got {size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        img, mask = _render(seed, index, size)
        stem = f"demo_{index:04d}"
        ok = cv2.imwrite(str(out / "images" / f"{stem}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not (ok and cv2.imwrite(str(out / "masks" / f"{stem}.png"), mask)):
            raise OSError(f"could not write demo sample {stem} under {out}")
    (out / "labels.yaml").write_text(yaml.safe_dump(DEMO_LABELS, sort_keys=False))
    return out

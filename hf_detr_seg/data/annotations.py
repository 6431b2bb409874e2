"""Annotations inspection teams already have -> the objects of each image, ready to draw.

Two sources: one COCO instances file (CVAT "COCO 1.0", Roboflow, Label Studio, `predict --coco-json`) or a
folder of labelme JSON files (one per image). The readers run once, in the builder's main process, and stop the
build on what concerns a whole file: broken structure, and labels the label map does not know (a fix belongs in
labels.yaml, not in `--skip-bad`). Each image's objects then travel to a builder worker as `Piece`s, which
`data.drawing` rasterises; a fault of one object (too few points, an unsupported shape) travels as a piece of
kind "bad", so that `--skip-bad` can drop that object alone and the message can name it.

Images are matched to files by base name, so `images/<name>` (Label Studio) and subfolders in `file_name` work:
the base name is looked up among the image files anywhere under `--images`, then the stem (a `.png` annotated
for a `.jpg`); where several files qualify, the one whose relative path ends the listed name wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, UserInputError
from ..labels import LabelMap
from .masks import IMAGE_SUFFIXES
from .panoptic import read_json

ANNOTATION_FORMATS = ("coco", "labelme")
LABELME_SHAPES = ("polygon", "rectangle", "circle", "line", "linestrip")


@dataclass(frozen=True)
class Piece:
    """One drawable shape of an object; pieces are drawn in file order, so a later one lies on top.

    `kind` and `geometry`: "polygon" -> flat [x1, y1, x2, y2, ...] parts (pixel-edge coordinates, as COCO);
    "rle" -> COCO RLE dict; "disc" -> (cx, cy, radius); "band" -> (points, width), a polyline drawn that wide;
    "bad" -> the reason the object cannot be drawn. `box` is a COCO annotation's own `bbox`, checked against
    the image. `class_index` None marks a label listed in `ignore_labels` (its pixels become void).
    """

    object_id: int
    class_index: int | None
    kind: str
    geometry: Any
    where: str
    box: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ImageAnnotations:
    """The pieces of one image, the file they come from, and the image size that file declares."""

    source: Path
    image_name: str
    size: tuple[int, int] | None  # (width, height)
    pieces: tuple[Piece, ...] = ()

    def describe(self) -> str:
        return f"{self.source}: image {self.image_name!r}"


def files_under(root: Path, suffixes: set[str], exclude: Path | None = None) -> list[Path]:
    """Files with these suffixes anywhere under `root`, sorted, but not in hidden folders or under `exclude`
    (the dataset being built inside the image folder; its temporary copy is hidden)."""
    excluded = exclude.resolve() if exclude is not None else None
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1])
        and (excluded is None or excluded not in p.resolve().parents)
    )


# --------------------------------------------------------------------------------------------- labels
def label_lookup(label_map: LabelMap) -> dict[str, int | None]:
    """Source label -> model class index: class names, their aliases, and None for `ignore_labels`."""
    table: dict[str, int | None] = {}
    for index, info in enumerate(label_map.classes):
        for label in (info.name, *info.aliases):
            table[label] = index
    table.update({label: None for label in label_map.ignore_labels})
    return table


def _unknown_labels(unknown: dict[str, str], label_map: LabelMap) -> UserInputError:
    """One error for every unknown label, each with the first file that uses it and a close spelling if any."""
    names = {c.name.casefold(): c.name for c in label_map.user_classes}
    lines = []
    for label, where in unknown.items():
        close = names.get(label.strip().casefold())
        hint = f" (did you mean {close!r}? add it to that class's `aliases`)" if close else ""
        lines.append(f"{where}: label {label!r} is not in the label map{hint}")
    lines.append(
        f"label map classes: {[c.name for c in label_map.user_classes]}; map other spellings with "
        "`classes[].aliases: [...]` or leave labels out with `ignore_labels: [...]` in labels.yaml"
    )
    return UserInputError("\n".join(lines))


# --------------------------------------------------------------------------------------------- COCO
def _require(data: Any, key: str, kind: type, where: str) -> Any:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field `{key}` missing or not a {kind.__name__}")
    return value


def _coco_tables(path: Path, data: Any) -> tuple[dict[int, str], dict[int, dict]]:
    """Category names and image records by id, checked (ids of any numbering, unique)."""
    for key in ("images", "annotations", "categories"):
        _require(data, key, list, f"{path}")
    categories: dict[int, str] = {}
    for category in data["categories"]:
        cid = _require(category, "id", int, f"{path}: a category")
        name = _require(category, "name", str, f"{path}: category {cid}")
        if categories.setdefault(cid, name) != name:
            raise DataError(f"{path}: category id {cid} is listed twice")
    images: dict[int, dict] = {}
    for image in data["images"]:
        iid = _require(image, "id", int, f"{path}: an image")
        name = _require(image, "file_name", str, f"{path}: image {iid}")
        if iid in images:
            raise DataError(f"{path}: image id {iid} is listed twice")
        width, height = image.get("width"), image.get("height")
        size = (width, height) if all(isinstance(v, int) and v > 0 for v in (width, height)) else None
        images[iid] = {"name": name, "size": size, "pieces": []}
    return categories, images


def _coco_piece(ann: dict, index: int | None, object_id: int, where: str) -> Piece:
    """One COCO annotation as one piece: polygon parts (merged), or RLE (compressed or not); iscrowd 0 or 1 alike."""
    box = ann.get("bbox")
    box = tuple(box) if isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box) else None
    seg = ann.get("segmentation")
    if isinstance(seg, list) and any(part for part in seg):
        problem = _polygon_problem(seg)
        if problem:
            return Piece(object_id, index, "bad", problem, where)
        return Piece(object_id, index, "polygon", [[float(v) for v in part] for part in seg], where, box)
    if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, list)) and isinstance(seg.get("size"), list):
        return Piece(object_id, index, "rle", {"size": list(seg["size"]), "counts": seg["counts"]}, where, box)
    if not seg or (isinstance(seg, list) and all(isinstance(part, list) for part in seg)):
        return Piece(object_id, index, "bad", "no segmentation (a box-only annotation has no mask)", where)
    return Piece(object_id, index, "bad", f"segmentation of unknown form ({type(seg).__name__})", where)


def _polygon_problem(parts: list) -> str | None:
    for k, part in enumerate(parts):
        if not isinstance(part, list) or not all(_is_number(v) for v in part) or len(part) % 2:
            return f"polygon part {k} is not a flat list [x1, y1, x2, y2, ...] of numbers"
        if len(part) < 6:
            return f"polygon part {k} has {len(part) // 2} point(s); at least 3 are needed"
    return None


def read_coco(path: Path, label_map: LabelMap) -> list[ImageAnnotations]:
    """Every image a COCO instances file lists, with its annotations in file order (none: all background).

    Only categories that annotations use must be known: Roboflow's unused root category is ignored.
    """
    data = read_json(path)
    categories, images = _coco_tables(path, data)
    lookup, unknown = label_lookup(label_map), {}
    for number, ann in enumerate(data["annotations"], start=1):
        aid = ann.get("id", f"#{number}") if isinstance(ann, dict) else f"#{number}"
        iid = _require(ann, "image_id", int, f"{path}: annotation {aid}")
        cid = _require(ann, "category_id", int, f"{path}: annotation {aid}")
        if iid not in images:
            raise DataError(f"{path}: annotation {aid}: image_id {iid} is not among the file's images")
        if cid not in categories:
            raise DataError(f"{path}: annotation {aid}: category_id {cid} is not among the file's categories")
        label = categories[cid]
        if label not in lookup:
            unknown.setdefault(label, f"{path}: category {cid}")
            continue
        where = f"annotation id {aid} (category {label!r})"
        images[iid]["pieces"].append(_coco_piece(ann, lookup[label], number, where))
    if unknown:
        raise _unknown_labels(unknown, label_map)
    return [ImageAnnotations(path, i["name"], i["size"], tuple(i["pieces"])) for i in images.values()]


# --------------------------------------------------------------------------------------------- labelme
def _labelme_piece(
    shape: dict, index: int | None, object_id: int, where: str, label_map: LabelMap, path: Path
) -> Piece | None:
    """One labelme shape as a piece; None for a line of an ignored label (there is no width to draw it with)."""
    kind = shape.get("shape_type") or "polygon"
    points = shape.get("points")
    if not isinstance(points, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in points
    ):
        return Piece(object_id, index, "bad", "`points` is not a list of [x, y] pairs", where)
    flat = [float(v) for p in points for v in p]
    needed = {"polygon": 3, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 2}.get(kind)
    if needed is None:
        reason = "a point has no area" if kind == "point" else f"shape_type {kind!r} is not supported"
        return Piece(object_id, index, "bad", f"{reason} (drawn shapes: {', '.join(LABELME_SHAPES)})", where)
    if len(points) < needed:
        problem = f"{kind} with {len(points)} point(s); at least {needed} are needed"
        return Piece(object_id, index, "bad", problem, where)
    if kind == "polygon":
        return Piece(object_id, index, "polygon", [flat], where)
    if kind == "rectangle":
        x0, x1 = min(flat[0::2]), max(flat[0::2])
        y0, y1 = min(flat[1::2]), max(flat[1::2])
        return Piece(object_id, index, "polygon", [[x0, y0, x1, y0, x1, y1, x0, y1]], where)
    if kind == "circle":
        (cx, cy), (px, py) = points[0], points[1]
        return Piece(object_id, index, "disc", (float(cx), float(cy), math.hypot(px - cx, py - cy)), where)
    if index is None:
        return None
    width = label_map.classes[index].line_width
    if width is None:
        raise UserInputError(
            f"{path}: {where}: a {kind} needs a width: set `line_width` (pixels) for class "
            f"{label_map.classes[index].name!r} in labels.yaml"
        )
    return Piece(object_id, index, "band", ([list(map(float, p)) for p in points], width), where)


def _read_labelme_file(path: Path, label_map: LabelMap, lookup: dict, unknown: dict) -> ImageAnnotations:
    data = read_json(path)
    shapes = data.get("shapes") if isinstance(data, dict) else None
    if not isinstance(shapes, list):
        raise DataError(f"{path}: not a labelme file (no `shapes` list)")
    image_path = data.get("imagePath")
    name = image_path if isinstance(image_path, str) and image_path.strip() else path.stem
    width, height = data.get("imageWidth"), data.get("imageHeight")
    size = (width, height) if all(isinstance(v, int) and v > 0 for v in (width, height)) else None
    pieces, groups = [], {}
    for number, shape in enumerate(shapes):
        label = shape.get("label") if isinstance(shape, dict) else None
        if not isinstance(label, str):
            raise DataError(f"{path}: shape {number}: field `label` missing or not a string")
        if label not in lookup:
            unknown.setdefault(label, str(path))
            continue
        group = shape.get("group_id")  # labelme's way to make one object of several shapes
        object_id = groups.setdefault((label, group) if group is not None else number, len(groups) + 1)
        where = f"shape {number} ({label!r}, {shape.get('shape_type') or 'polygon'})"
        piece = _labelme_piece(shape, lookup[label], object_id, where, label_map, path)
        if piece is not None:
            pieces.append(piece)
    return ImageAnnotations(path, name, size, tuple(pieces))


def read_labelme(path: Path, label_map: LabelMap, exclude: Path | None = None) -> list[ImageAnnotations]:
    """A labelme JSON file, or every `*.json` under a folder (sorted, see `files_under`): one image each, shapes
    in file order."""
    files = [path] if path.is_file() else files_under(path, {".json"}, exclude)
    if not files:
        raise DataError(f"{path}: no labelme .json files found")
    lookup, unknown = label_lookup(label_map), {}
    images = [_read_labelme_file(f, label_map, lookup, unknown) for f in files]
    if unknown:
        raise _unknown_labels(unknown, label_map)
    return images


# --------------------------------------------------------------------------------------------- detection
def detect_format(path: Path, exclude: Path | None = None) -> str:
    """"coco" for a .json with images, annotations and categories; "labelme" for labelme JSON (file or folder)."""
    path = Path(path)
    if path.is_dir():
        first = next(iter(files_under(path, {".json"}, exclude)), None)
        data = read_json(first) if first is not None else None
        if isinstance(data, dict) and "shapes" in data:
            return "labelme"
    elif path.is_file():
        data = read_json(path)
        if isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data):
            return "coco"
        if isinstance(data, dict) and "shapes" in data:
            return "labelme"
    else:
        raise DataError(f"{path}: annotations not found")
    raise DataError(
        f"{path}: cannot tell the annotation format: expected a COCO .json with `images`, `annotations` and "
        "`categories`, or a folder of labelme .json files with `shapes`; or give --annotation-format"
    )


def read_annotations(
    path: str | Path, label_map: LabelMap, annotation_format: str | None = None, exclude: Path | None = None
) -> list[ImageAnnotations]:
    """Read a COCO file or labelme JSON (format detected when not given); nothing under `exclude` is read."""
    path = Path(path)
    fmt = annotation_format or detect_format(path, exclude)
    if fmt not in ANNOTATION_FORMATS:
        raise UserInputError(f"--annotation-format: {fmt!r} is not one of {list(ANNOTATION_FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: annotations not found")
    if fmt == "coco":
        if not path.is_file():
            raise DataError(f"{path}: a COCO instances file must be one .json file")
        return read_coco(path, label_map)
    return read_labelme(path, label_map, exclude)


# --------------------------------------------------------------------------------------------- images
def _base_name(name: str) -> str:
    return re.split(r"[\\/]", name)[-1]


def _pick(candidates: list[Path], listed: str, root: Path) -> list[Path]:
    if len(candidates) <= 1:
        return candidates
    wanted = "/" + "/".join(re.split(r"[\\/]", listed))
    return [c for c in candidates if wanted.endswith("/" + c.relative_to(root).as_posix())]


def match_images(
    images_dir: Path, annotated: list[ImageAnnotations], exclude: Path | None = None
) -> tuple[list[tuple[str, Path, ImageAnnotations]], list[str]]:
    """Pair each annotated image with its file under `images_dir` (module docstring); return (stem, image,
    annotations) triples and problems: images not found, ambiguous names, image files without annotations."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files = files_under(root, IMAGE_SUFFIXES, exclude)
    by_name: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f.name, []).append(f)
        by_stem.setdefault(f.stem, []).append(f)
    matched, problems, used = [], [], {}
    for entry in annotated:
        base = _base_name(entry.image_name)
        candidates = by_name.get(base) or by_stem.get(base) or by_stem.get(Path(base).stem, [])
        found = _pick(candidates, entry.image_name, root)
        if len(found) != 1:
            what = "not found" if not found else f"matches several files ({', '.join(map(str, found))})"
            problems.append(f"{entry.describe()}: {what} under {root}")
            continue
        image = found[0]
        if image.stem in used:
            raise DataError(
                f"{entry.describe()} and {used[image.stem].describe()} both name an image {image.stem!r}: an image "
                "annotated twice, or two images of one name (a dataset holds one image per name)"
            )
        used[image.stem] = entry
        matched.append((image.stem, image, entry))
    taken = {m[1] for m in matched}
    sources = sorted({str(a.source) for a in annotated})
    where = sources[0] if len(sources) == 1 else f"{len(sources)} annotation files"
    problems += [f"{f}: image without annotations (not in {where})" for f in files if f not in taken]
    return matched, problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""The label map: which classes exist, how they appear in masks, and their ids.

One `LabelMap` is read from the user's `labels.yaml`, resolved once by the dataset builder (final category
ids written to `OUT/labels.yaml`) and from there copied into the model config. Every later step reads it from
the artefact in front of it.

Two id spaces exist and this module is the only place that converts between them:
- model class index: contiguous 0..K-1 in label-map order (`config.id2label`);
- dataset category id (COCO panoptic `category_id`): 1..K in the same order, or, with `coco_base`, COCO's 133
  panoptic categories keep their COCO ids and the new classes get ids from 201 up, above every COCO id.

Roles. What a class is measured as is its role, declared next to `background: true`, never read from its name:
`measure: crack` for linear defects (length and widths, one report row per connected crack), `measure: area`
(the default) for regions. Label maps written before roles existed do not declare them; so that they (and the
datasets and models carrying them) keep their crack measurements, when no class of a map is `measure: crack`,
a class named `crack` (any case) that declares no `measure` takes `measure: crack`. This is the one place a
class name means anything; the resolved map (`to_dict`) states every role, so the rule applies once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError
from .fields import as_bool, as_choice, is_int, is_number, parse_color
from .label_classes import check_unique, legacy_crack_role, parse_class, parse_ignore_labels

MASK_FORMATS = ("binary", "indexed", "color", "per_class_dirs")
FIRST_NEW_COCO_ID = 201
_TOP_KEYS = {"mask_format", "binary_threshold", "classes", "instances", "ignore", "ignore_colors", "color_tolerance",
             "coco_base", "ignore_labels"}
_INSTANCE_KEYS = {"connectivity", "min_area", "merge_distance"}
# Colours given to classes without one, for overlays and the COCO `categories` table.
_PALETTE = [
    (220, 20, 60), (255, 140, 0), (30, 144, 255), (154, 205, 50), (186, 85, 211),
    (0, 206, 209), (255, 215, 0), (139, 69, 19), (255, 105, 180), (70, 130, 180),
]
_BACKGROUND_COLOR = (128, 128, 128)


class LabelMapError(UserInputError):
    """A label map that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ClassInfo:
    """One class: its name, thing/stuff, how it is written in masks, its dataset category id."""

    name: str
    isthing: bool
    category_id: int
    color: tuple[int, int, int]
    background: bool = False
    value: int | None = None  # indexed masks: the pixel value of this class
    supercategory: str = "defect"
    from_coco: bool = False  # one of COCO's 133 categories kept by `coco_base`
    aliases: tuple[str, ...] = ()  # annotations: other spellings of `name` in the source files
    line_width: float | None = None  # annotations: width in pixels of lines drawn for this class
    measure: str = "area"  # role: "crack" (length and widths) or "area" (module docstring)


@dataclass(frozen=True)
class InstanceRules:
    """How thing-class pixels are split into instances (see `data.instances`)."""

    connectivity: int = 8
    min_area: int = 0
    merge_distance: float = 0.0


@dataclass(frozen=True)
class LabelMap:
    """Classes in model-index order plus the rules for reading masks (or annotations) of one dataset."""

    classes: tuple[ClassInfo, ...]
    mask_format: str | None = "binary"  # None: not given, several classes (usable with annotations only)
    binary_threshold: int = 127
    instances: InstanceRules = field(default_factory=InstanceRules)
    ignore: tuple[int, ...] = ()
    ignore_colors: tuple[tuple[int, int, int], ...] = ()
    color_tolerance: float = 30.0
    coco_base: bool = False
    ignore_labels: tuple[str, ...] = ()  # annotations: source labels whose objects become void

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_yaml(cls, path: str | Path) -> "LabelMap":
        """Read and validate a `labels.yaml`; errors name the file and the field."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise LabelMapError(f"{path}: label map file not found") from None
        except yaml.YAMLError as err:
            raise LabelMapError(f"{path}: not valid YAML ({err})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "labels") -> "LabelMap":
        """Validate a parsed label map and resolve category ids and colours."""

        def fail(message: str) -> LabelMapError:
            return LabelMapError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail("expected a mapping with `classes:` at the top level")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise fail(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
        mask_format = data.get("mask_format")
        if mask_format is not None:
            as_choice(mask_format, MASK_FORMATS, "mask_format", fail)
        raw_classes = data.get("classes")
        if not isinstance(raw_classes, list) or not raw_classes:
            raise fail("classes: expected a non-empty list of {name, isthing, ...}")
        coco_base = as_bool(data.get("coco_base", False), "coco_base", fail)

        user_classes = [
            parse_class(i, raw, mask_format, fail) for i, raw in enumerate(raw_classes)
        ]
        check_unique(user_classes, fail)
        legacy_crack_role(user_classes)
        ignore_labels = parse_ignore_labels(data.get("ignore_labels", []), user_classes, fail)
        backgrounds = [c["name"] for c in user_classes if c["background"]]
        if len(backgrounds) > 1:
            raise fail(f"classes: only one class may be `background: true`, got {backgrounds}")
        if any(c["background"] and c["isthing"] for c in user_classes):
            raise fail("classes: the background class must be stuff (`isthing: false`)")
        defects = [c["name"] for c in user_classes if not c["background"]]
        if mask_format is None:  # masks default to binary; annotations need no mask format
            mask_format = "binary" if len(defects) == 1 else None
        if mask_format == "binary":
            if len(defects) != 1:
                raise fail(
                    "mask_format binary: exactly one non-background class is allowed, got "
                    f"{defects}; use indexed, color or per_class_dirs masks for several classes"
                )

        classes = _resolve_ids(user_classes, coco_base, fail)
        instances = _parse_instances(data.get("instances", {}), fail)
        threshold = data.get("binary_threshold", 127)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise fail(f"binary_threshold: expected a non-negative integer, got {threshold!r}")
        ignore = data.get("ignore", [])
        if not isinstance(ignore, list) or not all(is_int(v) for v in ignore):
            raise fail(f"ignore: expected a list of integer mask values, got {ignore!r}")
        overlap = set(ignore) & {c.value for c in classes if c.value is not None}
        if overlap:
            raise fail(f"ignore: value(s) {sorted(overlap)} are also class values")
        ignore_colors = data.get("ignore_colors", [])
        if not isinstance(ignore_colors, list):
            raise fail(f"ignore_colors: expected a list of [r, g, b], got {ignore_colors!r}")
        parsed_ignore_colors = tuple(parse_color(c, "ignore_colors", fail) for c in ignore_colors)
        tolerance = data.get("color_tolerance", 30.0)
        if not is_number(tolerance) or tolerance < 0:
            raise fail(f"color_tolerance: expected a non-negative number, got {tolerance!r}")
        return cls(
            classes=tuple(classes),
            mask_format=mask_format,
            binary_threshold=threshold,
            instances=instances,
            ignore=tuple(ignore),
            ignore_colors=parsed_ignore_colors,
            color_tolerance=float(tolerance),
            coco_base=coco_base,
            ignore_labels=ignore_labels,
        )

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The resolved label map (final category ids, colours), as written to `OUT/labels.yaml`.

        COCO's own categories are not listed: `coco_base: true` brings them back on reading.
        """
        classes = []
        for c in self.user_classes:
            entry: dict[str, Any] = {"name": c.name, "isthing": c.isthing}
            if c.background:
                entry["background"] = True
            if c.value is not None:
                entry["value"] = c.value
            entry["color"] = list(c.color)
            entry["category_id"] = c.category_id
            if c.supercategory != "defect":
                entry["supercategory"] = c.supercategory
            if c.aliases:
                entry["aliases"] = list(c.aliases)
            if c.line_width is not None:
                entry["line_width"] = c.line_width
            if not c.background:
                entry["measure"] = c.measure  # always stated: the legacy rule must not apply on reading
            classes.append(entry)
        out: dict[str, Any] = {} if self.mask_format is None else {"mask_format": self.mask_format}
        if self.mask_format in ("binary", "per_class_dirs"):
            out["binary_threshold"] = self.binary_threshold
        out["classes"] = classes
        out["instances"] = {
            "connectivity": self.instances.connectivity,
            "min_area": self.instances.min_area,
            "merge_distance": self.instances.merge_distance,
        }
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.ignore_colors:
            out["ignore_colors"] = [list(c) for c in self.ignore_colors]
        if self.mask_format == "color":
            out["color_tolerance"] = self.color_tolerance
        if self.coco_base:
            out["coco_base"] = True
        if self.ignore_labels:
            out["ignore_labels"] = list(self.ignore_labels)
        return out

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))

    # ----------------------------------------------------------------- views
    @property
    def user_classes(self) -> tuple[ClassInfo, ...]:
        """The classes the user listed (without COCO's kept categories)."""
        return tuple(c for c in self.classes if not c.from_coco)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def id2label(self) -> dict[int, str]:
        return {i: c.name for i, c in enumerate(self.classes)}

    @property
    def label2id(self) -> dict[str, int]:
        return {c.name: i for i, c in enumerate(self.classes)}

    @property
    def background_index(self) -> int | None:
        """Model index of the background stuff class, if there is one."""
        return next((i for i, c in enumerate(self.classes) if c.background), None)

    @property
    def crack_indices(self) -> list[int]:
        """Model indices of the classes whose role is `measure: crack`."""
        return [i for i, c in enumerate(self.classes) if c.measure == "crack"]

    def index_of(self, name: str) -> int:
        try:
            return self.label2id[name]
        except KeyError:
            raise LabelMapError(f"unknown class {name!r}; classes are {self.names}") from None

    def category_id(self, index: int) -> int:
        """Dataset category id of model class `index`."""
        return self.classes[index].category_id

    def index_of_category(self, category_id: int) -> int:
        """Model class index of a dataset category id."""
        try:
            return self._category_to_index[category_id]
        except KeyError:
            raise LabelMapError(f"unknown category_id {category_id}") from None

    @property
    def _category_to_index(self) -> dict[int, int]:
        return {c.category_id: i for i, c in enumerate(self.classes)}

    def coco_categories(self) -> list[dict[str, Any]]:
        """The COCO-panoptic `categories` table, in model-index order."""
        return [
            {
                "id": c.category_id,
                "name": c.name,
                "supercategory": c.supercategory,
                "isthing": int(c.isthing),
                "color": list(c.color),
            }
            for c in self.classes
        ]


# --------------------------------------------------------------------- helpers
def load_coco_panoptic_categories() -> list[dict[str, Any]]:
    """COCO's 133 panoptic categories (ids, names, isthing, colours), shipped so `coco_base` works offline."""
    text = resources.files("hf_detr_seg").joinpath("coco_panoptic_categories.json").read_text()
    return json.loads(text)


def _resolve_ids(user: list[dict[str, Any]], coco_base: bool, fail) -> list[ClassInfo]:
    """Give every class its dataset category id and a display colour."""
    classes: list[ClassInfo] = []
    if coco_base:
        coco = load_coco_panoptic_categories()
        coco_names = {c["name"] for c in coco}
        clash = [c["name"] for c in user if c["name"] in coco_names]
        if clash:
            raise fail(f"classes: {clash} already exist among COCO's categories kept by coco_base")
        classes = [
            ClassInfo(
                name=c["name"],
                isthing=bool(c["isthing"]),
                category_id=int(c["id"]),
                color=tuple(c["color"]),
                supercategory=c["supercategory"],
                from_coco=True,
            )
            for c in coco
        ]
    first_id = FIRST_NEW_COCO_ID if coco_base else 1
    for position, c in enumerate(user):
        expected = first_id + position
        if c["category_id"] is not None and c["category_id"] != expected:
            raise fail(
                f"classes[{position}] ({c['name']}).category_id: {c['category_id']} disagrees with its "
                f"position (expected {expected}); ids follow the order of `classes`"
            )
        color = c["color"] or (
            _BACKGROUND_COLOR if c["background"] else _PALETTE[position % len(_PALETTE)]
        )
        classes.append(
            ClassInfo(
                name=c["name"],
                isthing=c["isthing"],
                category_id=expected,
                color=color,
                background=c["background"],
                value=c["value"],
                supercategory=c["supercategory"],
                aliases=c["aliases"],
                line_width=c["line_width"],
                measure=c["measure"] or "area",
            )
        )
    return classes


def _parse_instances(raw: Any, fail) -> InstanceRules:
    if not isinstance(raw, dict):
        raise fail(f"instances: expected a mapping, got {raw!r}")
    unknown = set(raw) - _INSTANCE_KEYS
    if unknown:
        raise fail(f"instances: unknown key(s) {sorted(unknown)}; allowed: {sorted(_INSTANCE_KEYS)}")
    connectivity = raw.get("connectivity", 8)
    if connectivity not in (4, 8):
        raise fail(f"instances.connectivity: expected 4 or 8, got {connectivity!r}")
    min_area = raw.get("min_area", 0)
    if not is_int(min_area) or min_area < 0:
        raise fail(f"instances.min_area: expected a non-negative integer, got {min_area!r}")
    merge = raw.get("merge_distance", 0)
    if not is_number(merge) or merge < 0:
        raise fail(f"instances.merge_distance: expected a non-negative number, got {merge!r}")
    return InstanceRules(connectivity=connectivity, min_area=min_area, merge_distance=float(merge))

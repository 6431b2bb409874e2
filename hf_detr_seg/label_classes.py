"""The `classes:` list of a labels.yaml, entry by entry: each field checked, names unique, roles settled.

The entries come out as plain dicts for `labels.LabelMap.from_dict`, which gives them category ids and colours;
what the fields mean, roles included, is told in the `labels` module docstring.
"""

from __future__ import annotations

from typing import Any

from .fields import Fail, as_bool, as_choice, is_int, is_number, parse_color

MEASURES = ("crack", "area")  # the roles of `measure:`
_LEGACY_CRACK_NAME = "crack"  # a label map without roles: the class that measures as a crack (labels docstring)
_CLASS_KEYS = {"name", "isthing", "background", "value", "color", "category_id", "supercategory", "aliases",
               "line_width", "measure"}


def parse_class(position: int, raw: Any, mask_format: str | None, fail: Fail) -> dict[str, Any]:
    """Entry `position` of `classes:` checked field by field; `measure` stays None where the entry gives none,
    so that `legacy_crack_role` can tell an unstated role from `measure: area`."""
    where = f"classes[{position}]"
    if not isinstance(raw, dict):
        raise fail(f"{where}: expected a mapping like {{name: crack, isthing: true}}, got {raw!r}")
    unknown = set(raw) - _CLASS_KEYS
    if unknown:
        raise fail(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_CLASS_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail(f"{where}.name: expected a non-empty string, got {name!r}")
    if "isthing" not in raw:
        raise fail(f"{where} ({name}): `isthing` is required (true for countable defects, false for stuff)")
    isthing = as_bool(raw["isthing"], f"{where}.isthing", fail)
    background = as_bool(raw.get("background", False), f"{where}.background", fail)
    value = raw.get("value")
    if value is not None and not (is_int(value) and value >= 0):
        raise fail(f"{where} ({name}).value: expected a non-negative integer, got {value!r}")
    if mask_format == "indexed" and value is None:
        if not background:
            raise fail(f"{where} ({name}): indexed masks need `value:` (the pixel value of this class)")
        value = 0
    color = raw.get("color")
    if color is not None:
        color = parse_color(color, f"{where} ({name}).color", fail)
    if mask_format == "color" and color is None:
        if not background:
            raise fail(f"{where} ({name}): color masks need `color: [r, g, b]`")
        color = (0, 0, 0)
    category_id = raw.get("category_id")
    if category_id is not None and not (is_int(category_id) and category_id > 0):
        raise fail(f"{where} ({name}).category_id: expected a positive integer, got {category_id!r}")
    supercategory = raw.get("supercategory", "background" if background else "defect")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise fail(f"{where} ({name}).aliases: expected a list of label names, got {aliases!r}")
    line_width = raw.get("line_width")
    if line_width is not None and not (is_number(line_width) and line_width > 0):
        raise fail(f"{where} ({name}).line_width: expected a positive number of pixels, got {line_width!r}")
    measure = raw.get("measure")
    if measure is not None:
        as_choice(measure, MEASURES, f"{where} ({name}).measure", fail)
        if background:
            raise fail(f"{where} ({name}).measure: the background class is not measured")
    return {
        "name": name,
        "isthing": isthing,
        "background": background,
        "value": value if mask_format == "indexed" else None,
        "color": color,
        "mask_color": mask_format == "color",
        "category_id": category_id,
        "supercategory": str(supercategory),
        "aliases": tuple(aliases),
        "line_width": float(line_width) if line_width is not None else None,
        "measure": measure,
    }


def check_unique(classes: list[dict[str, Any]], fail: Fail) -> None:
    """Names, values and (for colour masks) colours tell classes apart, and every spelling finds one class."""
    for key, label in (("name", "name"), ("value", "value"), ("color", "color")):
        if key == "color" and not (classes and classes[0]["mask_color"]):
            continue  # colours only have to differ where they encode the mask
        seen: dict[Any, str] = {}
        for c in classes:
            v = c[key]
            if v is None:
                continue
            if v in seen:
                raise fail(f"classes: duplicate {label} {v!r} ({seen[v]!r} and {c['name']!r})")
            seen[v] = c["name"]
    spelled: dict[str, str] = {}  # every name and alias finds one class
    for c in classes:
        for label in (c["name"], *c["aliases"]):
            if spelled.setdefault(label, c["name"]) != c["name"]:
                raise fail(f"classes: label {label!r} is given to both {spelled[label]!r} and {c['name']!r}")


def legacy_crack_role(classes: list[dict[str, Any]]) -> None:
    """A map that names no crack role: its class called `crack` without `measure` is the crack (labels docstring)."""
    if any(c["measure"] == "crack" for c in classes):
        return
    for c in classes:
        if c["measure"] is None and not c["background"] and c["name"].lower() == _LEGACY_CRACK_NAME:
            c["measure"] = "crack"


def parse_ignore_labels(raw: Any, classes: list[dict[str, Any]], fail: Fail) -> tuple[str, ...]:
    """Annotation labels to leave out; one that is also a class name would make an object both kept and void."""
    if not isinstance(raw, list) or not all(isinstance(v, str) and v.strip() for v in raw):
        raise fail(f"ignore_labels: expected a list of label names, got {raw!r}")
    known = {label for c in classes for label in (c["name"], *c["aliases"])}
    clash = sorted(set(raw) & known)
    if clash:
        raise fail(f"ignore_labels: {clash} are also class names or aliases")
    return tuple(raw)

"""Checks of single values read from the user's YAML files, each failing with a message that names the field.

`fail` is the caller's error factory (it prefixes the file name), so these checks serve every file format
without knowing where the value came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Fail = Callable[[str], Exception]


def is_int(value: Any) -> bool:
    """An integer that is not a bool (YAML's `true` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_bool(value: Any, field_name: str, fail: Fail) -> bool:
    """`value` if it is true or false; strings such as "yes" are refused rather than guessed."""
    if not isinstance(value, bool):
        raise fail(f"{field_name}: expected true or false, got {value!r}")
    return value


def as_choice(value: Any, choices: Sequence[str], field_name: str, fail: Fail) -> str:
    """`value` if it is one of `choices` (an enum field)."""
    if value not in choices:
        raise fail(f"{field_name}: {value!r} is not one of {list(choices)}")
    return value


def parse_color(value: Any, field_name: str, fail: Fail) -> tuple[int, int, int]:
    """An [r, g, b] list of integers 0..255 as a tuple."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(is_int(v) and 0 <= v <= 255 for v in value)
    ):
        raise fail(f"{field_name}: expected [r, g, b] with integers 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))

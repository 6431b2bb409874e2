"""Segment-id maps and `segments_info` lists turned into dense segment positions, checked as panopticapi checks.

PQ compares two id maps pixel by pixel. panopticapi sorts every pixel's (gt id, pred id) pair with `np.unique`;
here each id becomes its segment's position in its `segments_info` list, so that one `bincount` over positions
gives the whole (gt segment, pred segment) overlap table (`panoptic_matching.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError

VOID = 0  # segment id 0 in a panoptic id map: not annotated, ignored by PQ
# Ids up to this bound (or 4x the pixel count) are mapped to segment positions with a lookup table; larger
# ids (e.g. panopticapi's colour-derived ones, up to 2^24) with a perfect hash of the listed ones.
_LOOKUP_LIMIT = 1 << 16


class SegmentTable(NamedTuple):
    """A `segments_info` list as arrays, in list order: segment ids, category ids and crowd flags."""

    ids: np.ndarray
    cats: np.ndarray
    crowd: np.ndarray


def as_id_map(ids: Any, name: str) -> np.ndarray:
    """A 2-D map of non-negative integer segment ids (numpy or CPU tensor), flattened without a copy."""
    array = np.asarray(ids)
    if array.ndim != 2:
        raise DataError(f"{name}: expected a 2-D segment-id map, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise DataError(f"{name}: segment ids must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
    array = array.ravel()
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise DataError(f"{name}: segment ids must be >= 0 (0 = void), got {array.min()}")
    return array


def segment_table(segments: Sequence[Mapping], name: str) -> SegmentTable:
    """The arrays of a `segments_info` list; duplicate ids and the void id are data errors."""
    ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    cats = np.array([int(s["category_id"]) for s in segments], dtype=np.int64)
    crowd = np.array([int(s.get("iscrowd") or 0) == 1 for s in segments], dtype=bool)
    if len(np.unique(ids)) != len(ids):
        duplicates = sorted({int(i) for i in ids if (ids == i).sum() > 1})
        raise DataError(f"{name}: duplicate segment id(s) {duplicates[:5]} in segments_info")
    if (ids == VOID).any():
        raise DataError(f"{name}: segment id 0 is reserved for void and cannot be a segment")
    return SegmentTable(ids, cats, crowd)


def segment_positions(ids: np.ndarray, listed: np.ndarray, stride: int = 1) -> np.ndarray:
    """Per pixel, times `stride`: 0 on void, k + 1 on the k-th listed segment, len(listed) + 1 on an id that
    is not listed.

    Working in positions instead of raw ids keeps the joint (gt, pred) histogram as small as the number of
    segments, so one `bincount` replaces panopticapi's `np.unique` sort of every pixel; `stride` folds the
    row offset of that histogram into the lookup (one pass over the pixels fewer). Small ids go through a
    lookup table indexed by id; large ones (e.g. panopticapi's colour-derived ids, up to 2^24) through a
    collision-free multiplicative hash of the listed ids, checked per pixel, so both cost a few passes.
    """
    unlisted = len(listed) + 1
    top = int(ids.max()) if ids.size else 0
    if top <= max(_LOOKUP_LIMIT, 4 * ids.size):
        lookup = np.full(top + 1, unlisted, dtype=np.intp)
        lookup[VOID] = 0
        inside = listed <= top
        lookup[listed[inside]] = np.flatnonzero(inside) + 1
        return (lookup * stride).take(ids)
    keys = np.concatenate([[VOID], listed]).astype(np.uint32)
    slots, multiplier, bits = _perfect_hash(keys)
    table = np.full(1 << bits, unlisted, dtype=np.intp)
    table[slots] = np.arange(len(keys))
    key_at = np.full(1 << bits, VOID, dtype=np.uint32)
    key_at[slots] = keys
    slot = _hash(ids.astype(np.uint32, copy=False), multiplier, bits)
    position = table.take(slot)
    position[key_at.take(slot) != ids] = unlisted  # another id in a listed id's slot
    return position * stride


# Odd 32-bit constants (golden-ratio and hash-mixing ones): odd, so each multiplication is a bijection mod 2^32.
_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0xD3A2646D)


def _hash(ids: np.ndarray, multiplier: int, bits: int) -> np.ndarray:
    """Knuth's multiplicative hash of uint32 ids: the top `bits` bits of id * multiplier mod 2^32."""
    return (ids * np.uint32(multiplier)) >> np.uint32(32 - bits)


def _perfect_hash(keys: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(slots, multiplier, bits) such that `_hash` puts the distinct `keys` in distinct slots."""
    bits = max(4, int(np.ceil(np.log2(2 * len(keys)))))
    while True:
        for multiplier in _HASH_MULTIPLIERS:
            slots = _hash(keys, multiplier, bits)
            if len(np.unique(slots)) == len(keys):
                return slots, multiplier, bits
        bits += 1


def unlisted_error(ids: Any, listed: np.ndarray, name: str) -> DataError:
    """The error for ids in a map that its `segments_info` does not list (panopticapi raises it for preds)."""
    present = np.unique(np.asarray(ids))
    extra = np.setdiff1d(present[present != VOID], listed)
    return DataError(f"{name}: segment id(s) {extra[:5].tolist()} are in the PNG/id map but not in segments_info")

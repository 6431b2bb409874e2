"""The Otsu baseline predicts the class whose role is `measure: crack`, whatever it is called."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from hf_detr_seg.baselines import otsu_scores
from hf_detr_seg.errors import UserInputError


def relabelled(dataset: Path, folder: Path, **changes: dict) -> Path:
    """A copy of `dataset` whose labels.yaml classes get `changes[name]` (a new name, a role)."""
    shutil.copytree(dataset, folder)
    labels = yaml.safe_load((folder / "labels.yaml").read_text())
    for entry in labels["classes"]:
        entry.update(changes.get(entry["name"], {}))
    (folder / "labels.yaml").write_text(yaml.safe_dump(labels, sort_keys=False))
    return folder


def test_otsu_defaults_to_the_crack_role(dataset: Path, tmp_path: Path):
    expected = otsu_scores(dataset)
    assert set(expected) >= {"precision", "recall", "f1"}
    riss = relabelled(dataset, tmp_path / "riss", crack={"name": "Riss"})
    assert otsu_scores(riss) == expected
    assert otsu_scores(riss, class_name="spalling") != expected


def test_otsu_without_a_crack_role_asks_for_a_class(dataset: Path, tmp_path: Path):
    none = relabelled(dataset, tmp_path / "none", crack={"measure": "area"})
    with pytest.raises(UserInputError, match="measure: crack.*--baseline-class"):
        otsu_scores(none)
    assert otsu_scores(none, class_name="crack") == otsu_scores(dataset)

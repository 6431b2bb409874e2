from pathlib import Path

import pytest
import yaml

from hf_detr_seg.labels import FIRST_NEW_COCO_ID, LabelMap, LabelMapError, load_coco_panoptic_categories

BINARY = {
    "mask_format": "binary",
    "classes": [
        {"name": "crack", "isthing": True},
        {"name": "surface", "isthing": False, "background": True},
    ],
}
INDEXED = {
    "mask_format": "indexed",
    "classes": [
        {"name": "crack", "isthing": True, "value": 1},
        {"name": "spalling", "isthing": True, "value": 2},
        {"name": "surface", "isthing": False, "background": True, "value": 0},
    ],
    "ignore": [255],
}


def test_ids_follow_label_map_order():
    label_map = LabelMap.from_dict(INDEXED)
    assert label_map.id2label == {0: "crack", 1: "spalling", 2: "surface"}
    assert [label_map.category_id(i) for i in range(3)] == [1, 2, 3]
    assert label_map.index_of_category(2) == 1
    assert label_map.background_index == 2
    assert [c["isthing"] for c in label_map.coco_categories()] == [1, 1, 0]


def test_coco_base_keeps_coco_ids_and_puts_new_classes_above_them():
    label_map = LabelMap.from_dict({**INDEXED, "coco_base": True})
    coco = load_coco_panoptic_categories()
    assert len(coco) == 133 and max(c["id"] for c in coco) < FIRST_NEW_COCO_ID
    assert label_map.num_classes == 133 + 3
    assert label_map.classes[0].name == "person" and label_map.category_id(0) == 1
    new = [c for c in label_map.classes if not c.from_coco]
    assert [c.category_id for c in new] == [201, 202, 203]
    ids = [c["id"] for c in label_map.coco_categories()]
    assert len(set(ids)) == len(ids)
    assert label_map.index_of("crack") == 133


def test_resolved_yaml_round_trips(tmp_path: Path):
    label_map = LabelMap.from_dict({**INDEXED, "coco_base": True})
    label_map.save_yaml(tmp_path / "labels.yaml")
    again = LabelMap.from_yaml(tmp_path / "labels.yaml")
    assert again == label_map
    written = yaml.safe_load((tmp_path / "labels.yaml").read_text())
    assert [c["category_id"] for c in written["classes"]] == [201, 202, 203]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour_tolerance": 3}, "unknown key(s) ['colour_tolerance']"),
        ({"mask_format": "rle"}, "mask_format: 'rle'"),
        ({"classes": []}, "classes: expected a non-empty list"),
        (
            {"classes": INDEXED["classes"] + [{"name": "sky", "isthing": False, "background": True, "value": 9}]},
            "only one class may be `background: true`",
        ),
        (
            {"classes": INDEXED["classes"] + [{"name": "crack", "isthing": True, "value": 7}]},
            "duplicate name 'crack'",
        ),
        (
            {"classes": INDEXED["classes"] + [{"name": "rust", "isthing": True, "value": 2}]},
            "duplicate value 2 ('spalling' and 'rust')",
        ),
        ({"classes": [{"name": "crack", "isthing": True}]}, "indexed masks need `value:`"),
        ({"classes": [{"name": "crack", "value": 1}]}, "`isthing` is required"),
        ({"classes": [{"name": "crack", "isthing": True, "value": 1, "size": 3}]}, "unknown key(s) ['size']"),
        ({"instances": {"connectivity": 6}}, "instances.connectivity: expected 4 or 8"),
        ({"ignore": [1]}, "ignore: value(s) [1] are also class values"),
    ],
)
def test_validation_messages_name_the_field(change, message):
    with pytest.raises(LabelMapError) as err:
        LabelMap.from_dict({**INDEXED, **change}, source="my/labels.yaml")
    assert str(err.value).startswith("my/labels.yaml: ")
    assert message in str(err.value)


def test_color_format_rejects_duplicate_colours():
    data = {
        "mask_format": "color",
        "classes": [
            {"name": "crack", "isthing": True, "color": [255, 0, 0]},
            {"name": "rust", "isthing": True, "color": [255, 0, 0]},
        ],
    }
    with pytest.raises(LabelMapError, match=r"duplicate color \(255, 0, 0\)"):
        LabelMap.from_dict(data)


def test_binary_allows_one_defect_class_only():
    data = {**BINARY, "classes": BINARY["classes"] + [{"name": "rust", "isthing": True}]}
    with pytest.raises(LabelMapError, match="exactly one non-background class"):
        LabelMap.from_dict(data)


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(LabelMapError, match="not found"):
        LabelMap.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("classes: [unclosed")
    with pytest.raises(LabelMapError, match="bad.yaml: not valid YAML"):
        LabelMap.from_yaml(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------------------ roles
def roles(classes: list[dict]) -> dict[str, str]:
    label_map = LabelMap.from_dict({"mask_format": "indexed", "classes": classes})
    return {c.name: c.measure for c in label_map.classes if not c.background}


def test_measure_role_is_read_from_the_class_not_its_name():
    assert roles([{"name": "Riss", "isthing": False, "value": 1, "measure": "crack"},
                  {"name": "crack", "isthing": True, "value": 2},
                  {"name": "spalling", "isthing": True, "value": 3, "measure": "area"}]) == {
        "Riss": "crack", "crack": "area", "spalling": "area"}


def test_label_map_without_roles_keeps_its_crack_class():
    """The documented fallback: no class is `measure: crack`, so the class named crack (any case) is one."""
    assert roles([{"name": "Crack", "isthing": True, "value": 1}, {"name": "rust", "isthing": True, "value": 2}]) == {
        "Crack": "crack", "rust": "area"}
    assert roles([{"name": "crack", "isthing": True, "value": 1, "measure": "area"}]) == {"crack": "area"}
    assert roles([{"name": "hairline_crack", "isthing": True, "value": 1}]) == {"hairline_crack": "area"}


def test_roles_survive_the_resolved_yaml_and_the_model_config(tmp_path: Path):
    label_map = LabelMap.from_dict({"mask_format": "indexed", "classes": [
        {"name": "Riss", "isthing": False, "value": 1, "measure": "crack"},
        {"name": "crack", "isthing": True, "value": 2},
        {"name": "surface", "isthing": False, "background": True, "value": 0}]})
    label_map.save_yaml(tmp_path / "labels.yaml")
    written = yaml.safe_load((tmp_path / "labels.yaml").read_text())
    assert [c.get("measure") for c in written["classes"]] == ["crack", "area", None]
    assert LabelMap.from_yaml(tmp_path / "labels.yaml") == label_map
    assert label_map.crack_indices == [0]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "Riss", "isthing": True, "value": 1, "measure": "length"},
         "classes[0] (Riss).measure: 'length' is not one of ['crack', 'area']"),
        ({"name": "sky", "isthing": False, "background": True, "value": 0, "measure": "crack"},
         "classes[0] (sky).measure: the background class is not measured"),
    ],
)
def test_bad_measure_role_names_the_file_and_field(entry, message):
    with pytest.raises(LabelMapError) as err:
        LabelMap.from_dict({"mask_format": "indexed", "classes": [entry]}, source="my/labels.yaml")
    assert str(err.value) == f"my/labels.yaml: {message}"

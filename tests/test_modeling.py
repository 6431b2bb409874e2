"""Tests for building DetrForSegmentation: presets, class-head transfer, freezing groups, save/load."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers import DetrForSegmentation

from hf_detr_seg.errors import UserInputError
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.modeling import (
    PARAMETER_GROUPS,
    PRESETS,
    build_image_processor,
    build_model,
    group_of,
    label_map_from_config,
    set_trainable,
    transfer_class_head,
)

# The tiny preset's EfficientNet-Lite0: stem (conv_stem, bn1) and the stride-2 and stride-4 stages.
STEM_PREFIXES = tuple(f"detr.model.backbone.model.{m}." for m in ("conv_stem", "bn1", "blocks.0", "blocks.1"))
RESNET18 = {"backbone": "resnet18"}


def _label_map(*names: str) -> LabelMap:
    classes = [{"name": "background", "isthing": False, "background": True}]
    classes += [{"name": n, "isthing": True, "value": i + 1} for i, n in enumerate(names)]
    return LabelMap.from_dict({"mask_format": "indexed", "classes": classes})


LABELS = _label_map("crack", "spalling", "corrosion")


@pytest.fixture(scope="module", autouse=True)
def empty_weight_caches(tmp_path_factory: pytest.TempPathFactory):
    """Empty Hub and torch-hub caches, so that no ImageNet weights cached on this machine are found."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
        old_dir = torch.hub.get_dir()
        torch.hub.set_dir(str(root / "torch"))
        yield root
        torch.hub.set_dir(old_dir)


@pytest.fixture(scope="module")
def tiny(empty_weight_caches: Path) -> DetrForSegmentation:
    """A tiny model shared by tests that do not change it."""
    torch.manual_seed(0)
    return build_model(LABELS)


@pytest.fixture
def fresh_tiny() -> DetrForSegmentation:
    """A tiny model a test may change."""
    return build_model(LABELS)


@pytest.fixture
def random_resnet() -> DetrForSegmentation:
    """The tiny preset on a ResNet-18 with random weights (no weights are cached here)."""
    return build_model(LABELS, preset_overrides=RESNET18)


def test_tiny_preset_has_label_map_and_four_backbone_levels(tiny: DetrForSegmentation) -> None:
    config = tiny.config
    assert config.id2label == {0: "background", 1: "crack", 2: "spalling", 3: "corrosion"}
    assert config.label2id == {"background": 0, "crack": 1, "spalling": 2, "corrosion": 3}
    assert config.backbone_config.model_type == "timm_backbone"
    assert config.backbone_config.backbone == "efficientnet_lite0"
    assert list(config.backbone_config.out_indices) == [1, 2, 3, 4]
    assert tiny.detr.model.backbone.intermediate_channel_sizes == [24, 40, 112, 320]
    assert (config.d_model, config.num_queries, config.encoder_layers, config.decoder_layers) == (128, 20, 2, 2)
    assert tiny.detr.class_labels_classifier.out_features == LABELS.num_classes + 1
    assert label_map_from_config(config) == LABELS


def test_presets_are_valid_configs() -> None:
    assert set(PRESETS) >= {"tiny", "r50"}
    r50 = PRESETS["r50"]
    assert r50["backbone"] == "resnet50"
    assert (r50["d_model"], r50["encoder_layers"], r50["decoder_layers"], r50["num_queries"]) == (256, 6, 6, 100)


def test_forward_shapes(tiny: DetrForSegmentation) -> None:
    tiny.eval()
    with torch.no_grad():
        out = tiny(pixel_values=torch.randn(2, 3, 128, 192), pixel_mask=torch.ones(2, 128, 192, dtype=torch.long))
    queries = tiny.config.num_queries
    assert out.logits.shape == (2, queries, LABELS.num_classes + 1)
    assert out.pred_boxes.shape == (2, queries, 4)
    assert out.pred_masks.shape == (2, queries, 128 // 4, 192 // 4)
    assert torch.isfinite(out.pred_masks).all()


def test_random_backbone_warns_once_and_has_no_dead_norms(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_detr_seg.modeling"):
        model = build_model(LABELS, preset_overrides=RESNET18)
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_detr_seg.modeling"]
    assert warnings == ["no ImageNet weights for resnet18 are available offline; using random weights"]
    norms = {n: m for n, m in model.detr.model.backbone.model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert "layer1.0.bn2" in norms  # timm's zero-initialised last norm of a block, now frozen
    dead = [n for n, m in norms.items() if not m.weight.any()]
    assert dead == []


def test_residual_branches_get_gradients(random_resnet: DetrForSegmentation) -> None:
    random_resnet.train()
    out = random_resnet(pixel_values=torch.randn(1, 3, 64, 64))
    (out.pred_masks.mean() + out.logits.mean()).backward()
    grad = random_resnet.detr.model.backbone.model.layer2[1].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_backbone_checkpoint_is_loaded(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", zero_init_last=False)
    with torch.no_grad():
        source.layer3[0].bn1.running_mean.normal_()
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model(LABELS, backbone_checkpoint=str(path), preset_overrides=RESNET18)
    backbone = model.detr.model.backbone.model
    assert torch.equal(backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(backbone.layer3[0].bn1.running_mean, source.layer3[0].bn1.running_mean)
    assert model.config.backbone_config.use_pretrained_backbone is True


def test_cached_imagenet_weights_are_used_offline(caplog: pytest.LogCaptureFixture) -> None:
    source = timm.create_model("resnet18", zero_init_last=False)
    url = timm.models.get_pretrained_cfg("resnet18").url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_detr_seg.modeling"):
            model = build_model(LABELS, preset_overrides=RESNET18)
    finally:
        cached.unlink()
    assert not [r for r in caplog.records if r.name == "hf_detr_seg.modeling"]
    assert torch.equal(model.detr.model.backbone.model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_missing_backbone_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="nope.safetensors"):
        build_model(LABELS, backbone_checkpoint=str(tmp_path / "nope.safetensors"))


def test_class_head_transfer_by_name(tmp_path: Path) -> None:
    source = build_model(_label_map("crack", "spalling", "corrosion"))
    with torch.no_grad():
        source.detr.class_labels_classifier.bias.normal_()
    source.save_pretrained(tmp_path)
    old_w = source.detr.class_labels_classifier.weight.detach().clone()
    old_b = source.detr.class_labels_classifier.bias.detach().clone()
    old_index = source.config.label2id

    # Reordered, "spalling" removed, "efflorescence" added.
    new_labels = _label_map("corrosion", "efflorescence", "crack")
    loaded = DetrForSegmentation.from_pretrained(tmp_path)
    report = transfer_class_head(loaded, new_labels.id2label)
    assert report == {"copied": ["background", "corrosion", "crack"], "new": ["efflorescence"], "dropped": ["spalling"]}
    head = loaded.detr.class_labels_classifier
    assert head.out_features == new_labels.num_classes + 1
    for name in report["copied"]:
        new_i, old_i = new_labels.label2id[name], old_index[name]
        assert torch.equal(head.weight[new_i], old_w[old_i])
        assert torch.equal(head.bias[new_i], old_b[old_i])
    assert torch.equal(head.weight[-1], old_w[-1]) and torch.equal(head.bias[-1], old_b[-1])  # no object
    fresh = new_labels.label2id["efflorescence"]
    assert head.bias[fresh] == 0
    assert not any(torch.equal(head.weight[fresh], row) for row in old_w)
    assert loaded.config.id2label == new_labels.id2label
    assert loaded.config.label2id == new_labels.label2id

    # build_model does the same from the folder, and stores the new label map.
    rebuilt = build_model(new_labels, str(tmp_path))
    crack_row = rebuilt.detr.class_labels_classifier.weight[new_labels.label2id["crack"]]
    assert torch.equal(crack_row, old_w[old_index["crack"]])
    assert label_map_from_config(rebuilt.config) == new_labels


def test_parameter_groups_cover_every_parameter_once(tiny: DetrForSegmentation) -> None:
    names = [n for n, _ in tiny.named_parameters()]
    groups = {n: group_of(n) for n in names}  # raises on a parameter of no group
    assert set(groups.values()) == set(PARAMETER_GROUPS)
    mask_head = {n for n, g in groups.items() if g == "mask_head"}
    assert mask_head == {n for n in names if n.startswith(("bbox_attention.", "mask_head."))}
    assert groups["detr.model.query_position_embeddings.weight"] == "decoder"
    assert groups["detr.class_labels_classifier.weight"] == "class_head"
    assert groups["detr.bbox_predictor.layers.0.weight"] == "box_head"
    assert groups["detr.model.input_projection.weight"] == "input_projection"
    with pytest.raises(ValueError):
        group_of("somewhere.else.weight")


@pytest.mark.parametrize(
    ("backbone", "out_indices", "stem_modules", "first_trained"),
    [
        ("efficientnet_lite0", [1, 2, 3, 4], ("conv_stem", "bn1", "blocks.0", "blocks.1"), "blocks.2"),
        ("efficientnet_lite0", [0, 1, 2, 3], ("conv_stem", "bn1", "blocks.0", "blocks.1"), "blocks.2"),
        ("resnet18", [1, 2, 3, 4], ("conv1", "bn1", "layer1"), "layer2"),
    ],
)
def test_stem_up_to_stride_4_is_frozen_for_each_backbone(
    backbone: str, out_indices: list[int], stem_modules: tuple[str, ...], first_trained: str
) -> None:
    model = build_model(LABELS, preset_overrides={"backbone": backbone, "out_indices": out_indices})
    prefix = "detr.model.backbone.model."
    params = dict(model.named_parameters())
    stem = [n for n in params if n.startswith(tuple(f"{prefix}{m}." for m in stem_modules))]
    assert stem and not any(params[n].requires_grad for n in stem)
    assert any(n.startswith(f"{prefix}{first_trained}.") for n in params)
    assert all(p.requires_grad for n, p in params.items() if n not in stem)


@pytest.mark.parametrize(
    ("backbone", "out_indices", "channels"),
    [
        ("efficientnet_lite0", [1, 2, 3, 4], [24, 40, 112, 320]),
        ("efficientnet_lite0", [0, 1, 2, 3], [16, 24, 40, 112]),
        ("resnet18", [0, 1, 2, 3], [64, 64, 128, 256]),
    ],
)
def test_fpn_and_input_projection_widths_follow_the_backbone(
    backbone: str, out_indices: list[int], channels: list[int]
) -> None:
    model = build_model(LABELS, preset_overrides={"backbone": backbone, "out_indices": out_indices})
    assert model.detr.model.backbone.intermediate_channel_sizes == channels
    assert model.detr.model.input_projection.in_channels == channels[-1]
    head = model.mask_head
    assert [head.fpn_stages[i].fpn_adapter.in_channels for i in range(3)] == channels[-2::-1]
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 64, 96))
    stride = 2 ** (out_indices[0] + 1)  # the masks come out at the finest level's stride
    assert out.pred_masks.shape[-2:] == (64 // stride, 96 // stride)


def test_set_trainable_mask_head_only(fresh_tiny: DetrForSegmentation) -> None:
    set_trainable(fresh_tiny, ["mask_head"])
    trainable = {n for n, p in fresh_tiny.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in fresh_tiny.named_parameters() if n.startswith(("bbox_attention.", "mask_head."))}
    trained_groups = {group_of(n) for n, p in fresh_tiny.named_parameters() if p.requires_grad}
    assert trained_groups == {"mask_head"}

    set_trainable(fresh_tiny, PARAMETER_GROUPS)  # everything but the stem
    params = dict(fresh_tiny.named_parameters())
    assert all(p.requires_grad != n.startswith(STEM_PREFIXES) for n, p in params.items())
    with pytest.raises(ValueError, match="heads"):
        set_trainable(fresh_tiny, ["heads"])


def test_save_load_round_trip_keeps_labels(tiny: DetrForSegmentation, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path)
    loaded = DetrForSegmentation.from_pretrained(tmp_path)
    assert loaded.config.id2label == LABELS.id2label
    assert loaded.config.label2id == LABELS.label2id
    assert label_map_from_config(loaded.config) == LABELS
    assert list(loaded.config.backbone_config.out_indices) == [1, 2, 3, 4]
    assert torch.equal(loaded.mask_head.output_conv.weight, tiny.mask_head.output_conv.weight)


def test_label_map_from_config_without_one_is_a_user_error(tiny: DetrForSegmentation) -> None:
    config = tiny.config.__class__.from_dict(tiny.config.to_dict())
    del config.label_map
    with pytest.raises(UserInputError, match="label_map"):
        label_map_from_config(config)


@pytest.mark.parametrize("kind", ["missing", "empty_dir"])
def test_bad_checkpoint_names_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "no-such-model"
    if kind == "empty_dir":
        path.mkdir()
    with pytest.raises(UserInputError, match="no-such-model") as err:
        build_model(LABELS, str(path))
    if kind == "missing":
        assert "unavailable offline" in str(err.value)


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="huge"):
        build_model(LABELS, preset="huge")


def test_image_processor_resizes_like_detr() -> None:
    processor = build_image_processor(800)
    assert processor.format == "coco_panoptic"
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (800, 1333)
    assert build_image_processor(192).size.longest_edge == 320
    pixel_values = processor(images=[torch.zeros(3, 100, 400, dtype=torch.uint8)], return_tensors="pt").pixel_values
    assert pixel_values.shape[-2:] == (333, 1333)

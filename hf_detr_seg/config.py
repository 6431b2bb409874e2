"""The training run's settings: defaults < YAML config < command line, in the 🤗 example scripts' names.

One dataclass holds every setting of both stages so the recipes stay thin and the run's YAML, saved beside
the model, says exactly what was done.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .data.transforms import AugmentConfig
from .errors import UserInputError
from .losses import MASK_LOSSES, LossWeights
from .margin import check_margin
from .mask_head_init import DEFAULT_ATTENTION_GAIN
from .postprocess import DEFAULT_OVERLAP_THRESHOLD


@dataclass
class TrainConfig:
    """Settings of one training stage (1: detection, 2: mask head)."""

    stage: int = 1
    dataset_dir: str | None = None  # a folder built by `hf-detr-seg build-dataset`; None: the demo data
    dataset_name: str | None = None  # how the model card names the data (default: the dataset folder's base name)
    model_name_or_path: str | None = None  # stage 1: checkpoint or None (preset); stage 2: stage-1 output
    preset: str = "tiny"
    backbone: str | None = None  # preset override: a timm model name, e.g. efficientnet_lite0, resnet18
    pretrained_backbone: bool = True  # ImageNet weights from a local source (backbones.py); false: random
    backbone_checkpoint: str | None = None
    output_dir: str | None = None  # default outputs/stage{stage}
    num_train_epochs: int = 10
    max_train_steps: int | None = None
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    learning_rate: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.1
    lr_drop_epochs: list[int] = field(default_factory=list)  # learning rate x0.1 at these epochs
    freeze_backbone_epochs: int = 0  # stage 1: backbone frozen for the first K epochs
    gradient_accumulation_steps: int = 1
    checkpointing_steps: str | None = None  # an integer (every N steps) or "epoch"
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    with_tracking: bool = False
    report_to: str = "tensorboard"
    logging_steps: int = 10
    seed: int = 42
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    image_size: int = 192
    augment: bool = True
    # Overrides of the augmentation's probabilities and ranges (`data.transforms.AugmentConfig`), e.g.
    # {rotate90_prob: 0.5, blur_prob: 0.3, jpeg_prob: 0.3}; on the command line as YAML: '{blur_prob: 0.3}'.
    augmentation: dict[str, Any] = field(default_factory=dict)
    # Batches of images of one orientation and close sizes (data/batching.py, as 🤗 Trainer's group_by_length):
    # less padding, most when landscape and portrait images meet, as with quarter turns. Off: a plain shuffle.
    group_by_size: bool = False
    num_workers: int = 0
    # Convolution weights in channels-last memory order, which oneDNN (CPU) and cuDNN (tensor cores) run faster:
    # a DeepCrack step takes 0.8x the time on 2 CPU cores. Saved models are the same either way.
    channels_last: bool = False
    mask_loss: str = "focal+dice"
    # Stage 2: keep the frozen detector's outputs per image after its first batch and run only the mask head
    # on later epochs (detector_cache.py); needs `augment: false`. Bounded by detector_cache_gib.
    cache_detector_outputs: bool = False
    # Stage 2: start the mask head from the decoder's cross-attention with its attention channels amplified by
    # this gain (mask_head_init.py); 0 keeps transformers' random initialisation.
    mask_attention_gain: float = DEFAULT_ATTENTION_GAIN
    detector_cache_gib: float = 4.0
    # Loss weights: defaults are DETR's, from `losses.LossWeights` (one source of truth).
    class_weight: float = LossWeights.class_weight
    bbox_weight: float = LossWeights.bbox_weight
    giou_weight: float = LossWeights.giou_weight
    mask_weight: float = LossWeights.mask_weight
    dice_weight: float = LossWeights.dice_weight
    eos_coef: float = LossWeights.eos_coef
    focal_alpha: float = LossWeights.focal_alpha
    focal_gamma: float = LossWeights.focal_gamma
    skeleton_weight: float = LossWeights.skeleton_weight
    # Stage 1: weight of the encoder-output class-presence loss that keeps queries from collapsing when the
    # backbone starts from random weights (memory_supervision.py); 0 turns it off.
    encoder_presence_weight: float = 1.0
    # Stage 1: weight of the loss asking the encoder output to state each cell's own position, so that the
    # values the decoder reads say where they are (memory_supervision.py); 0 turns it off.
    encoder_position_weight: float = 0.0
    num_queries: int | None = None  # preset override
    d_model: int | None = None  # preset override: the transformer's width; the mask head's FPN widths follow it
    dropout: float | None = None  # preset override: the transformer's dropout (DETR: 0.1)
    backbone_out_indices: list[int] = field(default_factory=list)  # preset override: the 4 backbone levels
    eval_threshold: float = 0.85
    # The share of its mask's pixels (probability >= 0.5) a query must win to make a segment, transformers'
    # `overlap_mask_area_threshold`; saved with the model. Thin classes such as cracks need a lower value than
    # the default 0.8 (postprocess.model_overlap_threshold).
    overlap_mask_area_threshold: float = DEFAULT_OVERLAP_THRESHOLD
    # Padding in input pixels around every image the model sees, in training and prediction alike, so no image
    # edge is a feature-map edge (margin.py); a multiple of 16. Saved with the model; stage 2 keeps stage 1's.
    context_margin: int = 0
    eval_max_images: int | None = None  # evaluate on the first N val images only (speed on CPU)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise UserInputError(f"stage: expected 1 or 2, got {self.stage!r}")
        if self.mask_loss not in MASK_LOSSES:
            raise UserInputError(f"--mask_loss: expected one of {list(MASK_LOSSES)}, got {self.mask_loss!r}")
        if self.cache_detector_outputs and self.stage != 2:
            raise UserInputError("--cache_detector_outputs: only stage 2 has a frozen detector to cache")
        if self.cache_detector_outputs and self.augment:
            raise UserInputError(
                "--cache_detector_outputs needs --augment false: augmented images differ every epoch, so the "
                "detector's outputs of the first epoch would be wrong for the next"
            )
        check_margin(self.context_margin, "--context_margin")
        if not 0 <= self.overlap_mask_area_threshold < 1:
            raise UserInputError(
                f"--overlap_mask_area_threshold: expected a share in [0, 1), got {self.overlap_mask_area_threshold!r}"
            )
        self.augment_config()  # refuse unknown or out-of-range augmentation settings before any work
        if self.detector_cache_gib <= 0:
            raise UserInputError(f"--detector_cache_gib: expected a positive size, got {self.detector_cache_gib!r}")
        if self.output_dir is None:
            self.output_dir = f"outputs/stage{self.stage}"
        if self.stage == 2 and self.model_name_or_path is None:
            self.model_name_or_path = "outputs/stage1"
        if self.checkpointing_steps is not None:
            self.checkpointing_steps = str(self.checkpointing_steps)
            if self.checkpointing_steps != "epoch" and not self.checkpointing_steps.isdigit():
                raise UserInputError(
                    f"--checkpointing_steps: expected an integer or 'epoch', got {self.checkpointing_steps!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def augment_config(self) -> AugmentConfig:
        """The training augmentation: `AugmentConfig`'s defaults with `augmentation`'s overrides."""
        if not isinstance(self.augmentation, dict):
            raise UserInputError(f"--augmentation: expected a mapping of settings, got {self.augmentation!r}")
        known = {f.name for f in dataclasses.fields(AugmentConfig)}
        unknown = sorted(set(self.augmentation) - known)
        if unknown:
            raise UserInputError(f"--augmentation: unknown setting(s) {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.augmentation.items()}
        try:
            return AugmentConfig(**values)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"--augmentation: {err}") from None

    def loss_weights(self) -> LossWeights:
        return LossWeights(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossWeights)})


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    if "dict" in text:
        return dict
    if "list" in text:
        return int
    if "bool" in text:
        return bool
    if "int" in text and "str" not in text:
        return int
    if "float" in text:
        return float
    return str


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_mapping(text: str) -> dict:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"expected a YAML mapping, got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{blur_prob: 0.3}}', got {text!r}")
    return value


def build_parser(stage: int, description: str) -> argparse.ArgumentParser:
    """Every TrainConfig field as an option (dashes and underscores both accepted), default: unset."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML file of settings (command-line options override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        kind = _field_type(f)
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        if kind is bool:
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=_parse_bool, default=None)
        elif kind is dict:
            parser.add_argument(*names, dest=f.name, type=_parse_mapping, default=None)
        elif "list" in str(f.type):
            parser.add_argument(*names, dest=f.name, type=int, nargs="*", default=None)
        else:
            parser.add_argument(*names, dest=f.name, type=kind, default=None)
    parser.set_defaults(stage=stage)
    return parser


def load_config(
    stage: int, argv: Sequence[str] | None = None, description: str = "", default_config: Path | None = None
) -> TrainConfig:
    """Defaults, then the YAML file (`--config`, else `default_config`), then the command-line options."""
    args = build_parser(stage, description).parse_args(argv)
    values: dict[str, Any] = {}
    config_file = args.config or default_config
    if config_file is not None:
        values.update(read_yaml_config(config_file, stage))
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    values["stage"] = stage
    return TrainConfig(**values)


def read_yaml_config(path: Path, stage: int) -> dict[str, Any]:
    """Shared settings at the top level; `stage1:` / `stage2:` sections override them for one stage."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserInputError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise UserInputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a mapping of settings")
    sections = {"stage1": data.pop("stage1", None) or {}, "stage2": data.pop("stage2", None) or {}}
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"stage"}
    for where, settings in (("", data), ("stage1.", sections["stage1"]), ("stage2.", sections["stage2"])):
        if not isinstance(settings, dict):
            raise UserInputError(f"{path}: {where or 'top level'}: expected a mapping of settings")
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UserInputError(f"{path}: unknown setting(s) {[where + k for k in unknown]}")
    return {**data, **sections[f"stage{stage}"]}

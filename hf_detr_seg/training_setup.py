"""What a training run is built from before its loop: the dataset, the stage's starting model, the training
data loader, the optimizer and the learning-rate schedule (DETR's `main.py` set-up, in functions)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import DetrForSegmentation

from .config import TrainConfig
from .data.batching import SizeGroupedBatchSampler
from .data.panoptic import load_dataset_label_map, validate_dataset
from .data.training_data import PanopticDetrDataset, collate_fn
from .errors import TrainingError, UserInputError
from .hub import RUN_FILE
from .labels import LabelMap
from .margin import context_margin
from .mask_head_init import init_mask_head_from_decoder
from .modeling import build_model, group_of, label_map_from_config

logger = logging.getLogger(__name__)

DEMO_DATASET = Path("outputs/demo/dataset")


# ------------------------------------------------------------------------------------------- data
def ensure_demo_dataset(accelerator: Accelerator) -> Path:
    """The recipes' default data: the embedded demo set, generated and built once into a cache folder."""
    if accelerator.is_main_process and not validate_dataset(DEMO_DATASET).ok:
        from .data.builder import build_dataset
        from .data.demo import generate_demo_data

        source = generate_demo_data(DEMO_DATASET.parent / "data", seed=0)
        build_dataset(source / "images", source / "masks", source / "labels.yaml", DEMO_DATASET, progress=False)
        logger.warning("No --dataset_dir given: built the demo dataset in %s", DEMO_DATASET)
    accelerator.wait_for_everyone()
    return DEMO_DATASET


def check_dataset(dataset_dir: Path) -> LabelMap:
    """The dataset's label map, once the folder is known to be a valid dataset with training images."""
    report = validate_dataset(dataset_dir, max_problems=5)
    if not report.ok:
        raise UserInputError(f"--dataset_dir {dataset_dir}: not a valid dataset:\n  " + "\n  ".join(report.problems))
    if not report.images.get("train"):
        raise UserInputError(f"--dataset_dir {dataset_dir}: the train split is empty")
    return load_dataset_label_map(dataset_dir)


def build_train_loader(config: TrainConfig, dataset_dir: Path) -> tuple[PanopticDetrDataset, DataLoader]:
    """The train split (augmented unless `augment: false`) and its shuffled loader, its batches grouped by
    image size when `group_by_size` is on."""
    train_data = PanopticDetrDataset(dataset_dir, "train", config.image_size, augment=config.augment, seed=config.seed,
                                     augment_config=config.augment_config())
    batch_size = config.per_device_train_batch_size
    drop_last = len(train_data) > batch_size
    if config.group_by_size:
        batching = {"batch_sampler": SizeGroupedBatchSampler(train_data, batch_size, drop_last)}
    else:
        batching = {"batch_size": batch_size, "shuffle": True, "drop_last": drop_last}
    train_loader = DataLoader(
        train_data,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        # Its own generator: drawing worker seeds must not consume the global RNG (dropout), or a resumed
        # run would see other dropout masks than the uninterrupted one.
        generator=torch.Generator().manual_seed(config.seed),
        **batching,
    )
    return train_data, train_loader


# ------------------------------------------------------------------------------------------- model
def load_model(config: TrainConfig, label_map: LabelMap) -> DetrForSegmentation:
    """Stage 1: a preset or checkpoint for the dataset's label map. Stage 2: a stage-1 output folder. Either
    way the model's post-processing keeps segments by the run's `overlap_mask_area_threshold` from now on."""
    model = _stage1_output(config, label_map) if config.stage == 2 else _new_detector(config, label_map)
    model.config.overlap_mask_area_threshold = config.overlap_mask_area_threshold
    return model


def _new_detector(config: TrainConfig, label_map: LabelMap) -> DetrForSegmentation:
    """Stage 1's model: a preset or checkpoint with the run's overrides and margin."""
    overrides: dict = {"num_queries": config.num_queries} if config.num_queries else {}
    if config.backbone_out_indices:
        overrides["out_indices"] = config.backbone_out_indices
    if config.backbone:
        overrides["backbone"] = config.backbone
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    if config.d_model is not None:
        overrides["d_model"] = config.d_model
    model = build_model(label_map, config.model_name_or_path, config.preset, config.backbone_checkpoint,
                        preset_overrides=overrides, pretrained_backbone=config.pretrained_backbone)
    model.config.auxiliary_loss = True  # DETR's deep supervision of every decoder layer
    model.config.context_margin = config.context_margin  # the model's from now on, in training and prediction
    return model


def _stage1_output(config: TrainConfig, label_map: LabelMap) -> DetrForSegmentation:
    """Stage 2's start: the stage-1 folder's model, its mask head initialised from the decoder (unless
    `mask_attention_gain: 0`); refused when the folder is not a stage-1 output for the dataset's label map."""
    folder = Path(config.model_name_or_path)
    run_file = folder / RUN_FILE
    if not run_file.is_file() or yaml.safe_load(run_file.read_text()).get("stage") != 1:
        raise TrainingError(
            f"--model_name_or_path {folder}: not a stage-1 output (no {RUN_FILE} with stage: 1); "
            "run recipes/stage1.py first"
        )
    model = DetrForSegmentation.from_pretrained(folder)
    if config.mask_attention_gain > 0:
        init_mask_head_from_decoder(model, config.mask_attention_gain)
    if context_margin(model.config) != config.context_margin:
        raise TrainingError(
            f"--context_margin {config.context_margin}: the detector in {folder} was trained with "
            f"{context_margin(model.config)}; stage 2 keeps the detector's margin"
        )
    model_labels = label_map_from_config(model.config)
    if model_labels.names != label_map.names or [c.isthing for c in model_labels.classes] != [
        c.isthing for c in label_map.classes
    ]:
        raise TrainingError(
            f"the label map of {folder} ({model_labels.names}) disagrees with the dataset's ({label_map.names})"
        )
    return model


# ------------------------------------------------------------------------------------------- optimisation
def build_optimizer(
    model: DetrForSegmentation, config: TrainConfig, extra: nn.Module | None = None
) -> torch.optim.AdamW:
    """AdamW with DETR's two learning rates: `lr_backbone` for the backbone, `learning_rate` for the rest
    (which includes the parameters of `extra`, a training-only head)."""
    backbone, rest = [], list(extra.parameters()) if extra is not None else []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if group_of(name) == "backbone" else rest).append(param)
    groups = [{"params": rest, "lr": config.learning_rate, "name": "main"}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr_backbone, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Step decay x0.1 at each of `lr_drop_epochs`; the backbone's rate is 0 for `freeze_backbone_epochs`.

    Freezing through a zero rate (rather than `requires_grad`) keeps the set of trained parameters fixed,
    which distributed data parallel requires.
    """

    def factor(group_name: str):
        def at(step: int) -> float:
            epoch = step // max(steps_per_epoch, 1)
            value = 0.1 ** sum(epoch >= drop for drop in config.lr_drop_epochs)
            if group_name == "backbone" and epoch < config.freeze_backbone_epochs:
                return 0.0
            return value

        return at

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["name"]) for g in optimizer.param_groups])

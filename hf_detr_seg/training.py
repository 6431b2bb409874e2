"""The accelerate training loop shared by both stages.

A stage is only two choices: what is frozen and which loss. Stage 1 trains the detector (backbone,
transformer, class and box heads) on boxes derived from the masks; the mask head is frozen and not run.
Stage 2 freezes the whole detector (run in eval mode without a graph) and trains only the mask head
(`bbox_attention` + `mask_head`), on the queries Hungarian-matched to a target.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DetrForSegmentation

from .config import TrainConfig
from .data.panoptic import load_dataset_label_map, validate_dataset
from .data.training_data import PanopticDetrDataset, collate_fn
from .detector_cache import DetectorCache
from .detr_forward import MaskHeadInputs, run_detector, run_mask_head
from .errors import UserInputError
from .evaluation import evaluate_model
from .hub import RUN_FILE, push_folder, save_model_folder
from .labels import LabelMap
from .losses import DetrCriterion, Indices, matched_query_index
from .mask_head_init import init_mask_head_from_decoder
from .memory_supervision import EncoderPositionHead, EncoderPresenceHead
from .modeling import build_image_processor, build_model, group_of, label_map_from_config, set_trainable

logger = logging.getLogger(__name__)

DETECTOR_GROUPS = ("backbone", "input_projection", "encoder", "decoder", "class_head", "box_head")
STAGE_GROUPS = {1: DETECTOR_GROUPS, 2: ("mask_head",)}
STAGE_METRIC = {1: "bbox_map", 2: "pq"}
DEMO_DATASET = Path("outputs/demo/dataset")
STATE_FILE = "trainer_state.json"


class TrainingError(UserInputError):
    """Training cannot go on (NaN loss, wrong stage-1 folder); earlier outputs are left untouched."""


class StageStep(nn.Module):
    """One stage's forward + loss as a module, so accelerate/DDP sees every call go through `forward`."""

    def __init__(
        self,
        model: DetrForSegmentation,
        criterion: DetrCriterion,
        stage: int,
        encoder_presence_weight: float = 0.0,
        detector_cache: DetectorCache | None = None,
        encoder_position_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.stage = stage
        # Stage 2 only: the frozen detector's outputs per image, reused after an image's first batch.
        self.detector_cache = detector_cache
        # Stage 1's training-only head on the encoder output (see memory_supervision.py); never saved.
        self.encoder_presence_weight = encoder_presence_weight
        self.presence_head = (
            EncoderPresenceHead(model.config.d_model, criterion.num_classes)
            if stage == 1 and encoder_presence_weight > 0
            else None
        )
        self.encoder_position_weight = encoder_position_weight
        self.position_head = (
            EncoderPositionHead(model.config.d_model) if stage == 1 and encoder_position_weight > 0 else None
        )

    def training_heads(self) -> nn.ModuleList:
        """The training-only modules beside the model (optimised with it, never saved)."""
        return nn.ModuleList([m for m in (self.presence_head, self.position_head) if m is not None])

    def train(self, mode: bool = True) -> "StageStep":
        super().train(mode)
        if mode and self.stage == 2:
            self.model.detr.eval()  # a frozen detector runs without dropout noise
        return self

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]) -> dict:
        if self.stage == 1:
            detector = run_detector(self.model, pixel_values, pixel_mask)
            losses = self.criterion(detector.as_loss_inputs(), labels)
            if self.presence_head is not None:
                canvas = tuple(pixel_values.shape[-2:])
                presence = self.presence_head(detector.memory, detector.memory_mask, labels, canvas)
                losses["loss_encoder_presence"] = presence
                losses["loss"] = losses["loss"] + self.encoder_presence_weight * presence
            if self.position_head is not None:
                losses["loss_encoder_position"] = self.position_head(detector.memory, detector.memory_mask)
                losses["loss"] = losses["loss"] + self.encoder_position_weight * losses["loss_encoder_position"]
            return losses
        mask_head_inputs, indices = self._frozen_detector(pixel_values, pixel_mask, labels)
        batch_index, query_index = matched_query_index(indices)
        device = pixel_values.device
        masks = run_mask_head(self.model, mask_head_inputs, batch_index.to(device), query_index.to(device))
        losses = self.criterion({"pred_masks": masks}, labels, indices)
        # Keep the mask head in the graph when a batch has no target at all (DDP expects every parameter).
        losses["loss"] = losses["loss"] + 0.0 * masks.sum()
        return losses

    def _frozen_detector(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, labels: list[dict]
    ) -> tuple[MaskHeadInputs, Indices]:
        """Stage 2's detector outputs and Hungarian matching, through the cache when there is one; computed
        without a graph (the detector is in eval mode)."""
        if self.detector_cache is not None:
            return self.detector_cache(self.model, self.criterion, pixel_values, pixel_mask, labels)
        with torch.no_grad():
            detector = run_detector(self.model, pixel_values, pixel_mask)
            indices = self.criterion.match(detector.logits, detector.pred_boxes, labels)
        return detector, indices


# ------------------------------------------------------------------------------------------- setup
def ensure_demo_dataset(accelerator: Accelerator) -> Path:
    """The recipes' default data: the embedded demo set, generated and built once into a cache folder."""
    if accelerator.is_main_process and not validate_dataset(DEMO_DATASET).ok:
        from .data.builder import build_dataset
        from .data.demo import generate_demo_data

        source = generate_demo_data(DEMO_DATASET.parent / "data", size=256, seed=0)
        build_dataset(source / "images", source / "masks", source / "labels.yaml", DEMO_DATASET, progress=False)
        logger.warning("No --dataset_dir given: built the demo dataset in %s", DEMO_DATASET)
    accelerator.wait_for_everyone()
    return DEMO_DATASET


def _check_dataset(dataset_dir: Path) -> LabelMap:
    report = validate_dataset(dataset_dir, max_problems=5)
    if not report.ok:
        raise UserInputError(f"--dataset_dir {dataset_dir}: not a valid dataset:\n  " + "\n  ".join(report.problems))
    if not report.images.get("train"):
        raise UserInputError(f"--dataset_dir {dataset_dir}: the train split is empty")
    return load_dataset_label_map(dataset_dir)


def load_model(config: TrainConfig, label_map: LabelMap) -> DetrForSegmentation:
    """Stage 1: a preset or checkpoint for the dataset's label map. Stage 2: a stage-1 output folder."""
    if config.stage == 1:
        overrides: dict = {"num_queries": config.num_queries} if config.num_queries else {}
        if config.backbone_out_indices:
            overrides["out_indices"] = config.backbone_out_indices
        if config.backbone:
            overrides["backbone"] = config.backbone
        if config.dropout is not None:
            overrides["dropout"] = config.dropout
        model = build_model(label_map, config.model_name_or_path, config.preset, config.backbone_checkpoint,
                            preset_overrides=overrides, pretrained_backbone=config.pretrained_backbone)
        model.config.auxiliary_loss = True  # DETR's deep supervision of every decoder layer
        return model
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
    model_labels = label_map_from_config(model.config)
    if model_labels.names != label_map.names or [c.isthing for c in model_labels.classes] != [
        c.isthing for c in label_map.classes
    ]:
        raise TrainingError(
            f"the label map of {folder} ({model_labels.names}) disagrees with the dataset's ({label_map.names})"
        )
    return model


def build_criterion(config: TrainConfig, num_classes: int) -> DetrCriterion:
    losses = ("labels", "boxes") if config.stage == 1 else ("masks",)
    return DetrCriterion(num_classes, config.loss_weights(), losses=losses, mask_loss=config.mask_loss)


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


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
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


# ------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def _latest_checkpoint(config: TrainConfig) -> Path | None:
    """The newest complete checkpoint: a folder `step_N` whose state file says step N.

    Anything else named `step_*` (an interrupted or hand-made copy such as `step_final_copy`, a folder without
    its state file) is passed over with a warning that names it, never resumed from.
    """
    complete, passed_over = [], []
    for folder in _checkpoint_root(config).glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", folder.name)
        if match and _saved_step(folder) == int(match.group(1)):
            complete.append((int(match.group(1)), folder))
        else:
            passed_over.append(folder.name)
    if passed_over:
        logger.warning("--resume_from_checkpoint latest: passed over %s (not complete checkpoints)",
                       sorted(passed_over))
    return max(complete)[1] if complete else None


def _saved_step(folder: Path) -> int | None:
    """The step recorded in a checkpoint's state file, or None when it is missing or unreadable."""
    try:
        return int(json.loads((folder / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int, state: dict) -> Path:
    """Full state (model, optimizer, scheduler, RNG, data position) written to a temporary folder, then
    renamed: a run killed while saving leaves the previous checkpoint usable."""
    root = _checkpoint_root(config)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _resolve_resume(config: TrainConfig) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        path = _latest_checkpoint(config)
        if path is None:
            raise UserInputError(f"--resume_from_checkpoint latest: no checkpoint in {_checkpoint_root(config)}")
        return path
    path = Path(config.resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise UserInputError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no {STATE_FILE})")
    return path


# ------------------------------------------------------------------------------------------- the loop
def run(config: TrainConfig) -> dict:
    """Train one stage; return the final metrics. The model folder is written to `config.output_dir`."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to if config.with_tracking else None,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    set_seed(config.seed)
    dataset_dir = Path(config.dataset_dir) if config.dataset_dir else ensure_demo_dataset(accelerator)
    config = replace(config, dataset_dir=str(dataset_dir))
    label_map = _check_dataset(dataset_dir)
    resume_path = _resolve_resume(config)

    model = load_model(config, label_map)
    set_trainable(model, STAGE_GROUPS[config.stage])
    criterion = build_criterion(config, label_map.num_classes)
    detector_cache = DetectorCache(int(config.detector_cache_gib * 2**30)) if config.cache_detector_outputs else None
    step_module = StageStep(model, criterion, config.stage, config.encoder_presence_weight, detector_cache,
                            config.encoder_position_weight)

    train_data = PanopticDetrDataset(dataset_dir, "train", config.image_size, augment=config.augment, seed=config.seed)
    train_loader = DataLoader(
        train_data,
        batch_size=config.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        drop_last=len(train_data) > config.per_device_train_batch_size,
        # Its own generator: drawing worker seeds must not consume the global RNG (dropout), or a resumed
        # run would see other dropout masks than the uninterrupted one.
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = build_optimizer(model, config, step_module.training_heads())
    step_module, optimizer, train_loader = accelerator.prepare(step_module, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or steps_per_epoch * config.num_train_epochs
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)

    if config.with_tracking:
        accelerator.init_trackers(f"hf_detr_seg_stage{config.stage}", config={
            k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in config.to_dict().items()
        })

    global_step, best, history = 0, None, []
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        state = json.loads((resume_path / STATE_FILE).read_text())
        global_step, best, history = state["global_step"], state["best"], state["history"]
        accelerator.print(f"Resumed from {resume_path} at step {global_step}")

    metric_name = STAGE_METRIC[config.stage]
    progress = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc=f"stage {config.stage}")
    start_epoch = global_step // steps_per_epoch
    for epoch in range(start_epoch, num_epochs):
        train_data.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        step_module.train()
        loader = train_loader
        skip = (global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        if skip > 0:
            loader = accelerator.skip_first_batches(train_loader, skip)
        for batch in loader:
            with accelerator.accumulate(step_module):
                losses = step_module(batch["pixel_values"], batch["pixel_mask"], batch["labels"])
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"stage {config.stage}: loss is {loss.item()} at step {global_step} (epoch {epoch}); "
                        "try a lower --learning_rate; earlier outputs and checkpoints are untouched"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(step_module.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            progress.update(1)
            if global_step % config.logging_steps == 0 or global_step == max_steps:
                _log_step(accelerator, config, global_step, epoch, losses, optimizer)
            if config.checkpointing_steps and config.checkpointing_steps.isdigit() and global_step % int(
                config.checkpointing_steps
            ) == 0:
                save_checkpoint(accelerator, config, global_step, {"global_step": global_step, "best": best,
                                                                   "history": history})
            if global_step >= max_steps:
                break
        metrics = _evaluate(accelerator, step_module, config, dataset_dir)
        history.append({"epoch": epoch, "step": global_step, **metrics})
        accelerator.print(f"epoch {epoch}: val {_format_metrics(metrics)}")
        if detector_cache is not None and epoch == start_epoch:
            size_mib = detector_cache.nbytes / 2**20
            accelerator.print(f"detector cache: {len(detector_cache)} images, {size_mib:.1f} MiB")
        if config.with_tracking:
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step)
        if best is None or metrics.get(metric_name, 0.0) > best[metric_name]:
            best = {metric_name: metrics.get(metric_name, 0.0), "epoch": epoch, "step": global_step}
            _save_model(accelerator, step_module, config, label_map, metrics, history, Path(config.output_dir) / "best")
        if config.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, config, global_step, {"global_step": global_step, "best": best,
                                                               "history": history})
        if global_step >= max_steps:
            break
    progress.close()
    final_metrics = history[-1] if history else {}
    _save_model(accelerator, step_module, config, label_map, final_metrics, history, Path(config.output_dir))
    if config.push_to_hub and accelerator.is_main_process:
        if not config.hub_model_id:
            raise UserInputError("--push_to_hub needs --hub_model_id USER/NAME")
        push_folder(Path(config.output_dir), config.hub_model_id, private=config.hub_private)
    if config.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return final_metrics


def _evaluate(accelerator: Accelerator, step_module: nn.Module, config: TrainConfig, dataset_dir: Path) -> dict:
    """Validation on the main process (stage 1: box mAP; stage 2: PQ); the others wait."""
    metrics: dict = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(step_module).model
        model.eval()
        metrics = evaluate_model(
            model,
            dataset_dir,
            split="val",
            image_size=config.image_size,
            threshold=config.eval_threshold,
            batch_size=config.per_device_eval_batch_size,
            masks=config.stage == 2,
            max_images=config.eval_max_images,
        )
        step_module.train()
    accelerator.wait_for_everyone()
    return metrics


def _save_model(accelerator, step_module, config: TrainConfig, label_map: LabelMap, metrics: dict,
                history: list, folder: Path) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(step_module).model
        save_model_folder(
            model,
            build_image_processor(config.image_size),
            folder,
            label_map=label_map,
            run_settings=config.to_dict(),
            metrics={"final": metrics, "history": history},
        )
    accelerator.wait_for_everyone()


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _log_step(accelerator, config, step: int, epoch: int, losses: dict, optimizer) -> None:
    # Final-layer terms only: auxiliary decoder layers' copies end in "_<layer>".
    terms = {
        k: float(v.detach()) for k, v in losses.items() if k.startswith("loss") and not k.rsplit("_", 1)[-1].isdigit()
    }
    rates = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
    accelerator.print(
        f"step {step} epoch {epoch} " + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        + " " + " ".join(f"{k} {v:.2e}" for k, v in rates.items())
    )
    if config.with_tracking:
        accelerator.log({**{f"train/{k}": v for k, v in terms.items()}, **rates}, step=step)

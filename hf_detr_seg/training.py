"""The training loop of both stages, in DETR's shape.

`train_one_epoch` and `evaluate` are the loop's two functions (facebookresearch/detr's `engine.py`); `run` reads
top to bottom like its `main.py`: config -> data -> model and criterion -> optimizer and schedule -> resume ->
epochs (train, evaluate, keep the best model, checkpoint) -> save and push. What a stage computes is its step
module (steps.py); what the run is built from, training_setup.py; checkpoints and resume, checkpoints.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig
from .detector_cache import DetectorCache
from .errors import TrainingError, UserInputError
from .evaluation import evaluate_model
from .hub import push_folder, save_model_folder
from .labels import LabelMap
from .modeling import build_image_processor
from .steps import build_step
from .training_setup import (
    build_optimizer,
    build_scheduler,
    build_train_loader,
    check_dataset,
    ensure_demo_dataset,
    load_model,
)

# The validation metric that picks the best model (saved to `best/`) in each stage.
STAGE_METRIC = {1: "bbox_map", 2: "pq"}


def run(config: TrainConfig) -> dict:
    """Train one stage; return the final metrics. The model folder is written to `config.output_dir`."""
    # ------------------------------------------------------------------------------------------- config
    accelerator = _accelerator(config)
    set_seed(config.seed)
    # ------------------------------------------------------------------------------------------- data
    dataset_dir = Path(config.dataset_dir) if config.dataset_dir else ensure_demo_dataset(accelerator)
    config = replace(config, dataset_dir=str(dataset_dir))
    label_map = check_dataset(dataset_dir)
    resume_path = resolve_resume(config)
    # ------------------------------------------------------------------------------------------- model and criterion
    model = load_model(config, label_map)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    detector_cache = DetectorCache(int(config.detector_cache_gib * 2**30)) if config.cache_detector_outputs else None
    step_module = build_step(config, model, label_map.num_classes, detector_cache)
    train_data, train_loader = build_train_loader(config, dataset_dir)
    # ------------------------------------------------------------------------------------------- optimizer, schedule
    optimizer = build_optimizer(model, config, step_module.training_heads())
    step_module, optimizer, train_loader = accelerator.prepare(step_module, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or steps_per_epoch * config.num_train_epochs
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    _init_tracking(accelerator, config)
    # ------------------------------------------------------------------------------------------- resume
    state = TrainerState()
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        accelerator.print(f"Resumed from {resume_path} at step {state.global_step}")
    # ------------------------------------------------------------------------------------------- epochs
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc=f"stage {config.stage}")
    start_epoch = state.global_step // steps_per_epoch
    for epoch in range(start_epoch, math.ceil(max_steps / steps_per_epoch)):
        train_data.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        done = (state.global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(train_loader, done) if done > 0 else train_loader
        train_one_epoch(accelerator, step_module, batches, optimizer, scheduler, epoch, state, config, max_steps,
                        progress)
        metrics = evaluate(accelerator, step_module, config, dataset_dir)
        _record_epoch(accelerator, config, state, epoch, metrics)
        if detector_cache is not None and epoch == start_epoch:
            size_mib = detector_cache.nbytes / 2**20
            accelerator.print(f"detector cache: {len(detector_cache)} images, {size_mib:.1f} MiB")
        if _update_best(state, metrics, STAGE_METRIC[config.stage], epoch):
            _save_model(accelerator, step_module, config, label_map, metrics, state.history,
                        Path(config.output_dir) / "best")
        if config.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, config, state)
        if state.global_step >= max_steps:
            break
    progress.close()
    # ------------------------------------------------------------------------------------------- save and push
    final_metrics = state.history[-1] if state.history else {}
    _save_model(accelerator, step_module, config, label_map, final_metrics, state.history, Path(config.output_dir))
    _push_and_close(accelerator, config)
    return final_metrics


def train_one_epoch(
    accelerator: Accelerator,
    step_module: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    state: TrainerState,
    config: TrainConfig,
    max_steps: int,
    progress: tqdm,
) -> None:
    """Train on `batches` (what is left of the epoch), advancing `state.global_step` by one per optimizer step;
    log every `logging_steps`, checkpoint every `checkpointing_steps`, stop at `max_steps`."""
    step_module.train()
    for batch in batches:
        with accelerator.accumulate(step_module):
            losses = step_module(batch["pixel_values"], batch["pixel_mask"], batch["labels"])
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"stage {config.stage}: loss is {loss.item()} at step {state.global_step} (epoch {epoch}); "
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
        state.global_step += 1
        progress.update(1)
        if state.global_step % config.logging_steps == 0 or state.global_step == max_steps:
            _log_step(accelerator, config, state.global_step, epoch, losses, optimizer)
        every = config.checkpointing_steps
        if every and every.isdigit() and state.global_step % int(every) == 0:
            save_checkpoint(accelerator, config, state)
        if state.global_step >= max_steps:
            return


def evaluate(accelerator: Accelerator, step_module: nn.Module, config: TrainConfig, dataset_dir: Path) -> dict:
    """Validation on the main process (stage 1: box mAP; stage 2: PQ and the rest); the others wait and get {}."""
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


# ------------------------------------------------------------------------------------------- the run's parts
def _accelerator(config: TrainConfig) -> Accelerator:
    """accelerate's state for the run; the data loader's sampler is seedable, so a resumed run reshuffles alike."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to if config.with_tracking else None,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    return accelerator


def _init_tracking(accelerator: Accelerator, config: TrainConfig) -> None:
    if config.with_tracking:
        accelerator.init_trackers(f"hf_detr_seg_stage{config.stage}", config={
            k: (str(v) if isinstance(v, (list, dict, type(None))) else v) for k, v in config.to_dict().items()
        })


def _record_epoch(accelerator: Accelerator, config: TrainConfig, state: TrainerState, epoch: int,
                  metrics: dict) -> None:
    """The epoch's validation into the history, the console and the tracker."""
    state.history.append({"epoch": epoch, "step": state.global_step, **metrics})
    accelerator.print(f"epoch {epoch}: val {_format_metrics(metrics)}")
    if config.with_tracking:
        accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                        step=state.global_step)


def _update_best(state: TrainerState, metrics: dict, metric_name: str, epoch: int) -> bool:
    """Whether this epoch's `metric_name` beats the best so far (the first epoch always does); if so it becomes
    `state.best`."""
    value = metrics.get(metric_name, 0.0)
    if state.best is not None and not value > state.best[metric_name]:
        return False
    state.best = {metric_name: value, "epoch": epoch, "step": state.global_step}
    return True


def _save_model(accelerator: Accelerator, step_module: nn.Module, config: TrainConfig, label_map: LabelMap,
                metrics: dict, history: list, folder: Path) -> None:
    """The model folder (weights, processor, run settings, metrics, card), written by the main process."""
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


def _push_and_close(accelerator: Accelerator, config: TrainConfig) -> None:
    """The output folder to the Hub when asked; the trackers closed."""
    if config.push_to_hub and accelerator.is_main_process:
        if not config.hub_model_id:
            raise UserInputError("--push_to_hub needs --hub_model_id USER/NAME")
        push_folder(Path(config.output_dir), config.hub_model_id, private=config.hub_private)
    if config.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _log_step(accelerator: Accelerator, config: TrainConfig, step: int, epoch: int, losses: dict,
              optimizer: torch.optim.Optimizer) -> None:
    """The step's final-layer loss terms and learning rates, to the console and the tracker."""
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

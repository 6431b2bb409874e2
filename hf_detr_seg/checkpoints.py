"""Training checkpoints: the full state written atomically as `checkpoints/step_N`, and where to resume from.

A checkpoint is accelerate's `save_state` folder (model, optimizer, scheduler, RNG and data-loader position)
plus `trainer_state.json`, the loop's own state (`TrainerState`). The state file is written last and the
folder is renamed into place only then, so a folder `step_N` whose state file says step N is complete; a run
killed while saving leaves the previous checkpoint usable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from .config import TrainConfig
from .errors import UserInputError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop carries from step to step: saved with every checkpoint, restored on resume."""

    global_step: int = 0
    best: dict | None = None  # the best validation so far: {metric name: value, "epoch", "step"}
    history: list[dict] = field(default_factory=list)  # one validation record per epoch


def checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, state: TrainerState) -> Path:
    """Full state written to a temporary folder, then renamed to `step_<global_step>`: a run killed while
    saving leaves the previous checkpoint usable."""
    root = checkpoint_root(config)
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp_step_{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path) -> TrainerState:
    """Restore everything `save_checkpoint` wrote into the prepared objects; return the loop's state."""
    accelerator.load_state(str(folder))
    state = json.loads((folder / STATE_FILE).read_text())
    return TrainerState(state["global_step"], state["best"], state["history"])


def resolve_resume(config: TrainConfig) -> Path | None:
    """The folder `--resume_from_checkpoint` names (`latest`: the newest complete one), checked before training
    starts; None without the option."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        path = latest_checkpoint(config)
        if path is None:
            raise UserInputError(f"--resume_from_checkpoint latest: no checkpoint in {checkpoint_root(config)}")
        return path
    path = Path(config.resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise UserInputError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no {STATE_FILE})")
    return path


def latest_checkpoint(config: TrainConfig) -> Path | None:
    """The newest complete checkpoint: a folder `step_N` whose state file says step N.

    Anything else named `step_*` (an interrupted or hand-made copy such as `step_final_copy`, a folder without
    its state file) is passed over with a warning that names it, never resumed from.
    """
    complete, passed_over = [], []
    for folder in checkpoint_root(config).glob("step_*"):
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

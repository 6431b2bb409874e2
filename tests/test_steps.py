"""The per-stage step modules and the checkpoint helpers, without a training run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from hf_detr_seg.checkpoints import STATE_FILE, latest_checkpoint, resolve_resume
from hf_detr_seg.config import TrainConfig
from hf_detr_seg.data.demo import DEMO_LABELS
from hf_detr_seg.errors import UserInputError
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.modeling import build_model, group_of
from hf_detr_seg.steps import Stage1Step, Stage2Step, build_step


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    return LabelMap.from_dict(DEMO_LABELS)


def _model(label_map: LabelMap):
    torch.manual_seed(0)
    return build_model(label_map, preset="tiny", pretrained_backbone=False)


def test_each_stage_step_trains_its_groups_under_the_checkpoint_names(label_map: LabelMap):
    """accelerate saves a step's state dict: its top-level names are the checkpoint format and must not change."""
    one = build_step(TrainConfig(stage=1, encoder_position_weight=5.0), _model(label_map), label_map.num_classes)
    assert isinstance(one, Stage1Step) and one.criterion.losses == ("labels", "boxes")
    assert {k.split(".")[0] for k in one.state_dict()} == {"model", "presence_head", "position_head"}
    assert len(one.training_heads()) == 2
    trained = {group_of(n) for n, p in one.model.named_parameters() if p.requires_grad}
    assert trained == set(Stage1Step.TRAINABLE)

    two = build_step(TrainConfig(stage=2), _model(label_map), label_map.num_classes)
    assert isinstance(two, Stage2Step) and two.criterion.losses == ("masks",)
    assert {k.split(".")[0] for k in two.state_dict()} == {"model"} and len(two.training_heads()) == 0
    assert {group_of(n) for n, p in two.model.named_parameters() if p.requires_grad} == {"mask_head"}
    two.train()
    assert two.model.mask_head.training and not two.model.detr.training  # the frozen detector runs in eval mode


def _checkpoint(root: Path, name: str, step: int | None) -> None:
    (root / name).mkdir(parents=True)
    if step is not None:
        (root / name / STATE_FILE).write_text(json.dumps({"global_step": step, "best": None, "history": []}))


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    config = TrainConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with pytest.raises(UserInputError, match="no checkpoint"):
        resolve_resume(config)
    root = tmp_path / "checkpoints"
    _checkpoint(root, "step_2", 2)
    _checkpoint(root, "step_10", 10)
    _checkpoint(root, "step_12", None)  # interrupted: no state file
    _checkpoint(root, "step_final_copy", 10)
    _checkpoint(root, "step_11", 4)  # its state says another step
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(config) == root / "step_10" == resolve_resume(config)
    assert "passed over ['step_11', 'step_12', 'step_final_copy']" in caplog.text
    assert resolve_resume(TrainConfig(output_dir=str(tmp_path), resume_from_checkpoint=str(root / "step_2"))) == (
        root / "step_2")
    with pytest.raises(UserInputError, match="not a checkpoint folder"):
        resolve_resume(TrainConfig(output_dir=str(tmp_path), resume_from_checkpoint=str(root / "step_12")))
    assert resolve_resume(TrainConfig(output_dir=str(tmp_path))) is None

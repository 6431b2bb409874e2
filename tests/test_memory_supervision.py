"""Stage 1's encoder losses (class presence, cell position): targets, padded cells, and query collapse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hf_detr_seg.config import TrainConfig
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.panoptic import load_dataset_label_map
from hf_detr_seg.data.training_data import PanopticDetrDataset, collate_fn
from hf_detr_seg.detr_forward import run_detector
from hf_detr_seg.memory_supervision import EncoderPositionHead, EncoderPresenceHead, cell_positions, presence_targets
from hf_detr_seg.steps import Stage1Step, build_criterion
from hf_detr_seg.training_setup import build_optimizer, load_model

REPO = Path(__file__).resolve().parents[1]


def test_presence_targets_keep_a_one_pixel_line_and_leave_padding_empty():
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[0, :, 5] = True  # a 1-px vertical crack in the left column of cells
    masks[1] = ~masks[0]  # the surface everywhere else
    target = {"masks": masks, "class_labels": torch.tensor([0, 1])}
    # The image covers the top-left 24 x 24 of a 32 x 32 padded canvas; a 4 x 4 grid has 8-px cells.
    grid = presence_targets([target], num_classes=3, canvas=(32, 32), grid=(4, 4))[0]
    assert grid.shape == (3, 4, 4)
    assert grid[0, :3, 0].tolist() == [1, 1, 1]  # the thin line is present in every cell it crosses
    assert grid[0, :, 1:].sum() == 0 and grid[0, 3].sum() == 0
    assert grid[1, :3, :3].min() == 1 and grid[1, 3].sum() == 0 and grid[1, :, 3].sum() == 0  # padding: none
    assert grid[2].sum() == 0  # a class absent from the image


def test_presence_loss_ignores_padded_cells():
    torch.manual_seed(0)
    head = EncoderPresenceHead(d_model=8, num_classes=2)
    target = {"masks": torch.ones(1, 16, 16, dtype=torch.bool), "class_labels": torch.tensor([1])}
    memory = torch.randn(1, 8, 4, 4)
    memory_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    memory_mask[:, :2, :2] = True
    loss = head(memory, memory_mask, [target], canvas=(32, 32))
    changed = memory.clone()
    changed[..., 2:, :] = torch.randn(1, 8, 2, 4) * 10  # only padded cells differ
    assert torch.allclose(head(changed, memory_mask, [target], canvas=(32, 32)), loss)
    changed[..., 0, 0] += 10  # a real cell differs
    assert not torch.allclose(head(changed, memory_mask, [target], canvas=(32, 32)), loss)


@pytest.mark.parametrize("cells_with_class", [1, 5, 15])
def test_presence_loss_weighs_cells_with_and_without_a_class_equally(cells_with_class: int):
    """A constant logit scores the same however few cells hold the class: a rare defect is not outvoted."""
    head = EncoderPresenceHead(d_model=1, num_classes=1)
    with torch.no_grad():
        head.classifier.weight.zero_()
        head.classifier.bias.fill_(0.7)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks.view(-1)[:cells_with_class] = True
    target = {"masks": masks, "class_labels": torch.tensor([0])}
    loss = head(torch.zeros(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), [target], canvas=(4, 4))
    logit = torch.tensor(0.7)
    expected = 0.5 * (F.binary_cross_entropy_with_logits(logit, torch.tensor(1.0))
                      + F.binary_cross_entropy_with_logits(logit, torch.tensor(0.0)))
    assert torch.allclose(loss, expected)


def _query_spread_after_training(dataset: Path, presence_weight: float, steps: int) -> float:
    """Std of the decoder output across queries on training images, after `steps` stage-1 steps."""
    config = TrainConfig(stage=1, dataset_dir=str(dataset), image_size=128, num_queries=10,
                         backbone_out_indices=[0, 1, 2, 3], learning_rate=2e-4, lr_backbone=2e-4,
                         encoder_presence_weight=presence_weight, backbone="resnet18", pretrained_backbone=False)
    torch.manual_seed(0)
    label_map = load_dataset_label_map(dataset)
    model = load_model(config, label_map)
    step = Stage1Step(model, build_criterion(config, label_map.num_classes), presence_weight)
    optimizer = build_optimizer(model, config, step.training_heads())
    data = PanopticDetrDataset(dataset, "train", config.image_size, augment=False)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(0))
    done = 0
    while done < steps:
        for batch in loader:
            losses = step(batch["pixel_values"], batch["pixel_mask"], batch["labels"])
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(step.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    val = collate_fn([data[i] for i in range(8)])
    model.eval()
    with torch.no_grad():
        detector = run_detector(model, val["pixel_values"], val["pixel_mask"])
    return detector.decoder_output.std(1).mean().item()


@pytest.mark.slow
def test_presence_loss_keeps_queries_apart(deepcrack_sample: Path, tmp_path: Path):
    """On real crack photos from a random ResNet-18 the queries collapse onto one output (measured: std across
    queries 0.004 after 150 steps); with the presence loss they separate (0.72)."""
    build_dataset(deepcrack_sample / "train/images", deepcrack_sample / "train/masks",
                  REPO / "recipes/configs/deepcrack-cpu-labels.yaml", tmp_path / "ds", val_fraction=0, progress=False)
    without = _query_spread_after_training(tmp_path / "ds", presence_weight=0.0, steps=150)
    with_presence = _query_spread_after_training(tmp_path / "ds", presence_weight=1.0, steps=150)
    assert with_presence > 5 * without, (with_presence, without)


def test_cell_positions_are_relative_to_the_real_image():
    """A 2 x 3 image padded to a 4 x 6 grid: centres at x = 1/6, 3/6, 5/6 and y = 1/4, 3/4 of the real part."""
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, :2, :3] = True
    positions = cell_positions(mask)
    assert positions.shape == (1, 2, 4, 6)
    torch.testing.assert_close(positions[0, 0, 0, :3], torch.tensor([1 / 6, 3 / 6, 5 / 6]))
    torch.testing.assert_close(positions[0, 1, :2, 0], torch.tensor([1 / 4, 3 / 4]))


def test_position_loss_counts_real_cells_only_and_reaches_the_encoder_output():
    head = EncoderPositionHead(d_model=4)
    memory = torch.randn(2, 4, 3, 5, requires_grad=True)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = False
    loss = head(memory, mask)
    loss.backward()
    assert loss.item() > 0
    assert memory.grad[0].abs().sum() > 0
    assert memory.grad[1, :, :, 3:].abs().sum() == 0  # padded cells give no gradient
    with torch.no_grad():  # whatever the padded cells hold, the loss is the same
        other = memory.detach().clone()
        other[1, :, :, 3:] = 100.0
        assert torch.equal(head(other, mask), head(memory.detach(), mask))

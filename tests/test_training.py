"""Two-stage training: what each stage may change, resume, the saved folder, bad input, several processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import DetrConfig, DetrForSegmentation

from hf_detr_seg.config import TrainConfig, load_config
from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.demo import generate_demo_data
from hf_detr_seg.data.training_data import PanopticDetrDataset, collate_fn
from hf_detr_seg.errors import UserInputError
from hf_detr_seg.modeling import group_of
from hf_detr_seg.postprocess import DEFAULT_OVERLAP_THRESHOLD, model_overlap_threshold
from hf_detr_seg.training import TrainingError, run
from hf_detr_seg.steps import build_step
from hf_detr_seg.training_setup import build_train_loader, check_dataset, load_model

REPO = Path(__file__).resolve().parents[1]


def settings(dataset: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        dataset_dir=str(dataset), output_dir=str(out), image_size=96, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, max_train_steps=3, logging_steps=1, seed=0, eval_threshold=0.3,
    )
    return TrainConfig(**{**base, **overrides})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Parameters by their in-memory names (the saved file uses DETR's original key names)."""
    return dict(DetrForSegmentation.from_pretrained(folder).named_parameters())


@pytest.fixture(scope="module")
def stage1(dataset: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stage1"
    run(settings(dataset, out, stage=1, max_train_steps=4, encoder_position_weight=5.0))
    return out


def test_stage1_trains_detector_and_leaves_mask_head_untouched(dataset: Path, stage1: Path, tmp_path: Path):
    from accelerate.utils import set_seed

    from hf_detr_seg.data.panoptic import load_dataset_label_map
    from hf_detr_seg.modeling import build_model

    set_seed(0)  # the run sets seed 0 right before building: the same initial weights
    initial = build_model(load_dataset_label_map(dataset), preset="tiny").state_dict()
    trained = weights(stage1)
    assert trained.keys() == {k for k, _ in build_model(load_dataset_label_map(dataset)).named_parameters()}
    assert trained.keys() <= initial.keys()  # the training-only heads (presence, position) are not saved
    changed = {group_of(k) for k, v in trained.items() if not torch.equal(v, initial[k])}
    assert "mask_head" not in changed
    assert {"decoder", "class_head", "box_head", "encoder"} <= changed
    mask_head = [k for k in trained if k.startswith(("mask_head.", "bbox_attention."))]
    assert mask_head and all(torch.equal(trained[k], initial[k]) for k in mask_head)


def test_stage2_changes_only_the_mask_head(dataset: Path, stage1: Path, tmp_path: Path):
    out = tmp_path / "stage2"
    metrics = run(settings(dataset, out, stage=2, model_name_or_path=str(stage1), overlap_mask_area_threshold=0.3))
    assert model_overlap_threshold(DetrConfig.from_pretrained(stage1)) == DEFAULT_OVERLAP_THRESHOLD
    assert model_overlap_threshold(DetrConfig.from_pretrained(out)) == 0.3  # the stage's own post-processing
    before, after = weights(stage1), weights(out)
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith(("mask_head.", "bbox_attention.")):
            continue
        assert same, f"{name} changed in stage 2"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mask_head."))
    assert {"pq", "sq", "rq", "bbox_map", "miou"} <= set(metrics)


def test_stage2_with_detector_cache_trains_the_same_weights(dataset: Path, stage1: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture):
    """Two epochs without augmentation: the second reads every image from the cache, and the mask head ends with
    the weights of the run that runs the detector every step (the demo images share one size)."""
    common = dict(stage=2, model_name_or_path=str(stage1), augment=False, max_train_steps=8)
    run(settings(dataset, tmp_path / "plain", **common))
    run(settings(dataset, tmp_path / "cached", cache_detector_outputs=True, **common))
    assert "detector cache: 8 images" in capsys.readouterr().out
    plain, cached = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    trained = [k for k in plain if k.startswith(("mask_head.", "bbox_attention."))]
    assert any(not torch.equal(plain[k], weights(stage1)[k]) for k in trained)
    for name in plain:  # biases aside: one before a GroupNorm of one channel per group has a zero gradient up
        # to float noise, which AdamW turns into steps of up to the learning rate (it drifts 3e-5 apart here)
        if not name.endswith(".bias"):
            torch.testing.assert_close(cached[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    batch = collate_fn([PanopticDetrDataset(dataset, "val", 96)[i] for i in range(2)])
    outputs = {}
    for name, folder in (("plain", tmp_path / "plain"), ("cached", tmp_path / "cached")):
        model = DetrForSegmentation.from_pretrained(folder).eval()
        with torch.no_grad():
            outputs[name] = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"]).pred_masks
    torch.testing.assert_close(outputs["cached"], outputs["plain"], rtol=1e-4, atol=1e-4)


def test_saved_folder_loads_with_from_pretrained_and_pipeline(stage1: Path, dataset: Path):
    from PIL import Image
    from transformers import pipeline

    model = DetrForSegmentation.from_pretrained(stage1)
    assert model.config.id2label[0] == "crack"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "run.yaml", "metrics.json",
                 "README.md"):
        assert (stage1 / name).is_file(), name
    segmenter = pipeline("image-segmentation", model=str(stage1))
    image = Image.open(next((dataset / "images/val").iterdir()))
    result = segmenter(image, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.3)  # as its card
    assert isinstance(result, list)
    assert "| crack | thing |" in (stage1 / "README.md").read_text()


# The DeepCrack recipe's speed settings: size-grouped batches of turned images, channels-last convolutions.
FAST = {"group_by_size": True, "channels_last": True, "augmentation": {"rotate90_prob": 0.5}}


@pytest.mark.parametrize("speed", [{}, FAST], ids=["plain", "grouped-channels-last"])
def test_resume_equals_uninterrupted_run(dataset: Path, tmp_path: Path, speed: dict):
    full = tmp_path / "full"
    run(settings(dataset, full, max_train_steps=6, checkpointing_steps="3", augment=True, **speed))
    assert (full / "checkpoints/step_3/trainer_state.json").is_file()
    resumed = tmp_path / "resumed"
    run(settings(dataset, resumed, max_train_steps=6, augment=True,
                 resume_from_checkpoint=str(full / "checkpoints/step_3"), **speed))
    a, b = weights(full), weights(resumed)
    worst = max(float((a[k] - b[k]).abs().max().detach()) for k in a)
    assert worst <= 1e-5, worst
    interrupted = tmp_path / "interrupted"
    run(settings(dataset, interrupted, max_train_steps=3, augment=True, **speed))
    c = weights(interrupted)
    assert max(float((a[k] - c[k]).abs().max().detach()) for k in a) > 1e-4, "6 steps must differ from 3"


def test_channels_last_computes_the_same_losses(dataset: Path):
    config = settings(dataset, dataset.parent / "unused", augment=False)
    label_map = check_dataset(dataset)
    batch = next(iter(build_train_loader(config, dataset)[1]))
    losses = {}
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = load_model(config, label_map).to(memory_format=memory_format)
        # eval(): dropout draws its mask in memory order, so the two layouts would drop different features
        step = build_step(config, model, label_map.num_classes, None).eval()
        losses[memory_format] = step(batch["pixel_values"], batch["pixel_mask"], batch["labels"])
    assert any(not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters() if p.dim() == 4)  # the weights did change their layout
    for name, value in losses[torch.contiguous_format].items():
        assert torch.allclose(value, losses[torch.channels_last][name], rtol=1e-5, atol=1e-6), name


def _recipe(dataset: Path, out: Path, *extra: str) -> list[str]:
    """Stage 1 as a user runs it: 12 steps, a checkpoint every 2."""
    return [sys.executable, str(REPO / "recipes/stage1.py"), "--dataset_dir", str(dataset), "--output_dir", str(out),
            "--image_size", "96", "--per_device_train_batch_size", "2", "--max_train_steps", "12",
            "--checkpointing_steps", "2", "--seed", "0", *extra]


@pytest.mark.slow
def test_killed_run_resumes_from_the_latest_complete_checkpoint(dataset: Path, tmp_path: Path):
    """SIGKILL mid-run, a stray `step_*` copy and a folder without its state added, then `latest`: the
    uninterrupted run's weights."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_recipe(dataset, full), env=env, check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(_recipe(dataset, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoints/step_4/trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.is_file() and not (killed / "model.safetensors").is_file(), "the kill came too late"
    checkpoints = killed / "checkpoints"
    shutil.copytree(checkpoints / "step_4", checkpoints / "step_final_copy")
    (checkpoints / "step_999").mkdir()  # an interrupted copy: no state file
    resumed = subprocess.run(_recipe(dataset, killed, "--resume_from_checkpoint", "latest"), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "passed over ['step_999', 'step_final_copy']" in resumed.stderr
    a, b = weights(full), weights(killed)
    worst = max(float((a[k] - b[k]).abs().max().detach()) for k in a)
    assert worst <= 1e-5, worst


def test_nan_loss_stops_with_a_clear_error_and_keeps_earlier_outputs(dataset: Path, stage1: Path, tmp_path: Path,
                                                                     monkeypatch):
    out = tmp_path / "stage2"
    shutil.copytree(stage1, out)  # pretend an earlier stage-2 result is there
    before = weights(out)
    from hf_detr_seg import losses

    original = losses.DetrCriterion.forward

    def nan_forward(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(losses.DetrCriterion, "forward", nan_forward)
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        run(settings(dataset, out, stage=2, model_name_or_path=str(stage1)))
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stage2_refuses_a_folder_that_is_not_a_stage1_output(dataset: Path, tmp_path: Path):
    (tmp_path / "random").mkdir()
    with pytest.raises(TrainingError, match="not a stage-1 output"):
        run(settings(dataset, tmp_path / "out", stage=2, model_name_or_path=str(tmp_path / "random")))


def test_stage2_refuses_a_label_map_that_disagrees(stage1: Path, tmp_path: Path):
    src = generate_demo_data(tmp_path / "src", num_images=4, size=96, seed=2)
    labels = (src / "labels.yaml").read_text().replace("name: crack", "name: fissure")
    (src / "labels.yaml").write_text(labels)
    build_dataset(src / "images", src / "masks", src / "labels.yaml", tmp_path / "ds", progress=False)
    with pytest.raises(TrainingError, match="disagrees with the dataset"):
        run(settings(tmp_path / "ds", tmp_path / "out", stage=2, model_name_or_path=str(stage1)))


def test_missing_or_invalid_dataset(tmp_path: Path):
    with pytest.raises(UserInputError, match="not a valid dataset"):
        run(settings(tmp_path / "nowhere", tmp_path / "out"))


def test_recipe_exit_code_and_config_precedence(tmp_path: Path, dataset: Path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.5\nimage_size: 64\nstage2: {learning_rate: 0.25}\n")
    one = load_config(1, ["--config", str(config), "--image-size", "80"])
    two = load_config(2, ["--config", str(config)])
    assert (one.learning_rate, one.image_size, two.learning_rate) == (0.5, 80, 0.25)
    assert two.model_name_or_path == "outputs/stage1" and two.output_dir == "outputs/stage2"
    config.write_text("learning_rat: 1\n")
    with pytest.raises(UserInputError, match=r"unknown setting\(s\) \['learning_rat'\]"):
        load_config(1, ["--config", str(config)])
    done = subprocess.run(
        [sys.executable, str(REPO / "recipes/stage1.py"), "--dataset_dir", str(tmp_path / "none"),
         "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2 and "not a valid dataset" in done.stderr


def test_augmentation_settings_from_yaml_and_command_line(tmp_path: Path, dataset: Path):
    config = tmp_path / "c.yaml"
    config.write_text("augmentation: {blur_prob: 0.3, jpeg_quality: [50, 80]}\n")
    loaded = load_config(1, ["--config", str(config), "--dataset_dir", str(dataset)])
    augmentation = build_train_loader(loaded, dataset)[0].augment_config
    assert (augmentation.blur_prob, augmentation.jpeg_quality, augmentation.rotate90_prob) == (0.3, (50, 80), 0)
    override = load_config(1, ["--config", str(config), "--augmentation", "{rotate90_prob: 1}"]).augment_config()
    assert (override.rotate90_prob, override.blur_prob) == (1, 0)  # the command line replaces the whole mapping
    with pytest.raises(UserInputError, match=r"unknown setting\(s\) \['blur'\]"):
        load_config(1, ["--augmentation", "{blur: 1}"])
    with pytest.raises(UserInputError, match="jpeg_prob must be in"):
        load_config(1, ["--augmentation", "{jpeg_prob: 2}"])


@pytest.mark.parametrize("share", ["-0.1", "1", "1.5"])
def test_an_overlap_threshold_outside_0_1_is_refused(share: str):
    with pytest.raises(UserInputError, match=r"--overlap_mask_area_threshold: expected a share in \[0, 1\)"):
        load_config(2, ["--overlap_mask_area_threshold", share])


@pytest.mark.slow
def test_two_process_cpu_run(dataset: Path, tmp_path: Path):
    """`accelerate launch --cpu --num_processes 2` for a few steps; the loss normalisation is DETR's."""
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(REPO / "recipes/stage1.py"), "--dataset_dir", str(dataset),
         "--output_dir", str(out), "--max_train_steps", "3", "--image_size", "96",
         "--per_device_train_batch_size", "2", "--checkpointing_steps", "2"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints/step_2").is_dir()
    trained = weights(out)
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_with_tracking_writes_tensorboard_events(dataset: Path, tmp_path: Path):
    out = tmp_path / "tracked"
    run(settings(dataset, out, max_train_steps=2, with_tracking=True, report_to="tensorboard"))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out}"

"""Benchmark rows: each builds its inputs once, then returns (ours, reference) callables and a check.

A row is a function `setup(tmp: Path) -> Row`; `run.py` times `ours` and `reference` alternately on the same
inputs, several repetitions, and reports the medians. `check(ours_result, reference_result)` asserts that
both gave the same answer (run once, on the first repetition's results). A row with a `metric` reports
`metric(result)` instead of the wall time (peak memory, measured by the callables in fresh processes).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from hf_detr_seg.testing import (
    random_blob,
    random_panoptic_pair,
    transformers_reuses_ids,
    write_panoptic_folder,
)

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    ours: Callable[[], Any]
    reference: Callable[[], Any]
    check: Callable[[Any, Any], None]
    unit: str = "s"
    note: str = ""
    cleanup: Callable[[], None] | None = None
    # The reported quantity from a callable's result; None: its wall time.
    metric: Callable[[Any], float] | None = None
    # Text appended to the note from the medians (ours, reference), e.g. a throughput.
    summary: Callable[[float, float], str] | None = None
    # At most this many repetitions (a row of a minute per side runs fewer than `--repeat`); None: `--repeat`.
    repeat: int | None = None
    # The setup already ran both sides once on a smaller input (first-call costs): no full-size warm-up run.
    warmed: bool = False


# ============================================================================ postprocess_panoptic
STUFF = {0, 3}  # background, efflorescence (model classes 0..3, "no object" is column 4)
NUM_CLASSES = 4


def _panoptic_outputs(batch=8, queries=100, mask_size=(200, 200), seed=0):
    """Random-but-structured DETR outputs: smooth mask logits, ~8-15 confident queries per image."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, NUM_CLASSES + 1, generator=g)
    logits[..., NUM_CLASSES] += 3.0  # most queries say "no object"
    h, w = mask_size
    coarse = torch.randn(batch * queries, 1, h // 8, w // 8, generator=g)
    noise = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    noise = F.avg_pool2d(noise, 9, 1, 4).view(batch, queries, h, w)
    masks = noise * 25 - 8  # unconfident queries: smooth random blobs
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for b in range(batch):
        n = int(torch.randint(8, 16, (1,), generator=g))
        chosen = torch.randperm(queries, generator=g)[:n]
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        logits[b, chosen] = torch.randn(n, NUM_CLASSES + 1, generator=g) * 0.3
        logits[b, chosen, labels] = 6.0 + torch.rand(n, generator=g) * 3  # softmax max ~0.98-0.99
        # confident queries: a disc-like region around a centre, ragged edges from the smooth noise
        centres = torch.rand(n, 2, generator=g) * torch.tensor([h, w])
        radii = 20 + torch.rand(n, generator=g) * 30
        dist = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
        masks[b, chosen] = (radii[:, None, None] - dist) * 0.4 + noise[b, chosen] * 15
    return logits, masks


def postprocess_panoptic(tmp: Path) -> Row:
    import torch
    from transformers import DetrImageProcessor

    from hf_detr_seg.postprocess import post_process_panoptic

    threshold = 0.85
    logits, masks = _panoptic_outputs()
    sizes = [(800, 800)] * logits.shape[0]
    processor = DetrImageProcessor()

    def ours():
        return post_process_panoptic(logits, masks, sizes, STUFF, threshold=threshold)

    def reference():
        return processor.post_process_panoptic_segmentation(
            SimpleNamespace(logits=logits, pred_masks=masks), threshold=threshold, mask_threshold=0.5,
            overlap_mask_area_threshold=0.8, label_ids_to_fuse=set(STUFF), target_sizes=sizes,
        )

    def void_zero(segmentation):
        return torch.where(segmentation == -1, 0, segmentation).to(torch.int32)

    def check(mine, theirs):
        # fused (what is timed): where transformers reuses no id, its map must equal ours; where it does (its
        # known bug: the id counter restarts at a fused segment's id), the void must agree and each of our
        # segments must lie inside one of its segments
        direct = 0
        for pred, ref in zip(mine, theirs):
            ref_map = void_zero(ref["segmentation"])
            if not transformers_reuses_ids(ref["segments_info"]):
                assert torch.equal(pred.id_map, ref_map), "fused segment maps differ"
                direct += 1
            else:
                assert torch.equal(pred.id_map == 0, ref_map == 0), "void differs"
                base = int(ref_map.max()) + 1
                pairs = torch.unique(pred.id_map.long() * base + ref_map.long())
                assert len(torch.unique(pairs // base)) == len(pairs), "one of our segments spans two of theirs"
        assert direct > 0, "no image compared map for map"
        # unfused (not timed): identical maps and segment lists on every image
        ours_unfused = post_process_panoptic(logits, masks, sizes, set(), threshold=threshold)
        ref_unfused = processor.post_process_panoptic_segmentation(
            SimpleNamespace(logits=logits, pred_masks=masks), threshold=threshold, label_ids_to_fuse=set(), target_sizes=sizes)
        for pred, ref in zip(ours_unfused, ref_unfused):
            assert torch.equal(pred.id_map, void_zero(ref["segmentation"])), "unfused segment maps differ"
            assert [(s["id"], s["label_id"]) for s in pred.segments] == [
                (s["id"], s["label_id"]) for s in ref["segments_info"]]
        total = sum(len(p.segments) for p in mine)
        check.note = (f"batch 8, Q=100, 200x200 masks -> 800x800, {total} segments; "
                      f"{direct}/8 fused maps identical (rest: transformers reuses ids), unfused 8/8 identical")

    row = Row(ours, reference, check, note="batch 8, Q=100, 200x200 masks -> 800x800")
    return row


# ============================================================================ pq_compute
CATEGORIES = {
    1: {"name": "crack", "isthing": 1},
    2: {"name": "spalling", "isthing": 1},
    3: {"name": "background", "isthing": 0},
    4: {"name": "efflorescence", "isthing": 0},
}


def pq_compute(tmp: Path, num_images: int = 200) -> Row:
    import panopticapi.evaluation as evaluation

    from hf_detr_seg.metrics import pq_compute_folders

    rng = np.random.default_rng(0)
    # Prediction ids from 1 up, as post-processing numbers them.
    pairs = [random_panoptic_pair(rng, CATEGORIES, (224, 224), first_pred_ids=(1,)) for _ in range(num_images)]
    root = tmp / "pq"
    gt_json = write_panoptic_folder(root, "gt", pairs, 0, CATEGORIES)
    pred_json = write_panoptic_folder(root, "pred", pairs, 2, CATEGORIES)
    gt_dir, pred_dir = root / "gt", root / "pred"

    def ours():
        result = pq_compute_folders(gt_json, gt_dir, pred_json, pred_dir)
        return {key: [result[f"{m}{key}"] for m in ("pq", "sq", "rq", "n")] for key in ("", "_things", "_stuff")}

    def reference():
        gt_data, pred_data = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
        by_name = {a["file_name"]: a for a in pred_data["annotations"]}
        annotation_set = [(a, by_name[a["file_name"]]) for a in gt_data["annotations"]]
        categories = {c["id"]: c for c in gt_data["categories"]}
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress every 100 images
            stat = evaluation.pq_compute_single_core(0, annotation_set, str(gt_dir), str(pred_dir), categories)
        out = {}
        for key, isthing in (("", None), ("_things", True), ("_stuff", False)):
            expected, _ = stat.pq_average(categories, isthing=isthing)
            out[key] = [expected[m] for m in ("pq", "sq", "rq", "n")]
        return out

    def check(mine, theirs):
        assert mine == theirs, f"PQ differs: {mine} vs {theirs}"
        check.note = f"{num_images} pairs 224x224 PNG+JSON, PQ {mine[''][0]:.4f} identical"

    return Row(ours, reference, check, note=f"{num_images} pairs 224x224 PNG+JSON, files to PQ")


# ============================================================================ build_dataset_2_workers
def build_dataset_2_workers(tmp: Path, num_images: int = 300, size: int = 512) -> Row:
    from hf_detr_seg.data.builder import build_dataset
    from hf_detr_seg.data.demo import generate_demo_data

    data = generate_demo_data(tmp / "demo", num_images=num_images, size=size)
    counter = iter(range(10**6))

    def build(workers):
        out = tmp / f"built_{workers}_{next(counter)}"
        summary = build_dataset(data / "images", data / "masks", data / "labels.yaml", out, workers=workers,
                                progress=False)
        result = (dict(summary.images), dict(summary.instances), dict(summary.pixels))
        shutil.rmtree(out, ignore_errors=True)
        return result

    def check(mine, theirs):
        assert mine == theirs, f"builds differ: {mine} vs {theirs}"
        check.note = f"{num_images} demo images {size} px, 2 workers vs 1; same split/instances/pixels"

    return Row(lambda: build(2), lambda: build(1), check,
               note=f"{num_images} demo images {size} px; reference = 1 worker")


# ============================================================================ mask_loss_peak_memory
MASK_CANVAS = (800, 1066)  # DETR's resize of a 4:3 photo (shortest edge 800): the padded input and target masks
MASK_HEAD_SIZE = (200, 267)  # the mask head's output, 1/4 of the canvas as the ResNet strides round it
MASK_BATCH, MASK_QUERIES, MASK_TARGETS = 2, 100, 20  # images, queries, targets per image
MASK_LOGIT_RAMP = 17  # mask-head cells over which a matched logit ramps -4..+4 (~0.12 logit per input pixel)
MASK_TERMS = ("loss_mask", "loss_dice")
# |ours / reference - 1| allowed per term: the same terms of the same masks, summed in another order.
MASK_TOLERANCE = {"loss_mask": 1e-5, "loss_dice": 1e-5}


@dataclass
class MaskLossInputs:
    """Stage-2 mask-loss inputs at the paper's scale (tensors; typed Any to keep torch out of module import)."""

    logits: Any  # [B, Q, K+1]
    pred_boxes: Any  # [B, Q, 4]
    pred_masks: Any  # [B, Q, h, w] mask logits of every query, as DetrForSegmentation returns them
    targets: list[dict[str, Any]]  # class_labels, boxes, bool masks at the canvas size (as collate_fn gives them)
    indices: list[tuple[Any, Any]]  # the Hungarian matching of logits / pred_boxes to the targets


def _mask_loss_inputs(seed: int = 0) -> MaskLossInputs:
    """Random elliptic targets, and mask logits that follow each matched target with smooth borders.

    Matched queries get logits ramping from -4 to +4 over about `MASK_LOGIT_RAMP` mask-head cells across the
    target's border (a plausible, not yet sharp, prediction); unmatched queries a constant -4 (no loss reads
    them).
    """
    import torch
    import torch.nn.functional as F

    from hf_detr_seg.data.transforms import masks_to_boxes, normalized_cxcywh
    from hf_detr_seg.losses import DetrCriterion

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(MASK_BATCH):
        masks = np.stack([random_blob(rng, MASK_CANVAS) for _ in range(MASK_TARGETS)])
        targets.append({
            "class_labels": torch.from_numpy(rng.integers(0, NUM_CLASSES, MASK_TARGETS)),
            "boxes": torch.from_numpy(normalized_cxcywh(masks_to_boxes(masks), *MASK_CANVAS)),
            "masks": torch.from_numpy(masks),
        })
    logits = torch.randn(MASK_BATCH, MASK_QUERIES, NUM_CLASSES + 1, generator=generator)
    pred_boxes = 0.25 + 0.5 * torch.rand(MASK_BATCH, MASK_QUERIES, 4, generator=generator)
    indices = DetrCriterion(NUM_CLASSES).match(logits, pred_boxes, targets)  # the matcher transformers uses
    pred_masks = torch.full((MASK_BATCH, MASK_QUERIES, *MASK_HEAD_SIZE), -4.0)
    for b, (queries, matched) in enumerate(indices):
        coverage = F.adaptive_avg_pool2d(targets[b]["masks"][matched, None].float(), MASK_HEAD_SIZE)
        smooth = F.avg_pool2d(coverage, MASK_LOGIT_RAMP, 1, MASK_LOGIT_RAMP // 2, count_include_pad=False)
        pred_masks[b, queries] = 8 * smooth[:, 0] - 4
    return MaskLossInputs(logits, pred_boxes, pred_masks, targets, indices)


def mask_loss_workload(side: str) -> Callable[[], dict[str, float]]:
    """Build the inputs of one side (not measured); return its measured step, the mask loss + backward.

    Ours: stage 2's call with its defaults, `DetrCriterion(losses=("masks",))` (chunks of `MASK_CHUNK_PIXELS`
    under activation checkpointing) on the matched queries' logits only ([N_matched, h, w],
    as `run_mask_head` returns them) with the given matching. Reference: what
    `DetrForSegmentation(labels=...)` calls, transformers' `ForSegmentationLoss` (it rematches, selects the
    matched queries of [B, Q, h, w] and upsamples them to the padded target size); its detection terms have no
    gradient here, so the backward pass is the mask terms' alone on both sides.
    """
    from transformers import DetrConfig
    from transformers.loss.loss_for_object_detection import ForSegmentationLoss

    from hf_detr_seg.losses import DetrCriterion, matched_query_index

    inputs = _mask_loss_inputs()
    if side == "ours":
        criterion = DetrCriterion(NUM_CLASSES, losses=("masks",))
        matched = inputs.pred_masks[matched_query_index(inputs.indices)].requires_grad_()

        def step() -> dict[str, float]:
            losses = criterion({"pred_masks": matched}, inputs.targets, inputs.indices)
            losses["loss"].backward()
            return {term: losses[term].item() for term in MASK_TERMS}

    elif side == "reference":
        config = DetrConfig(num_labels=NUM_CLASSES, auxiliary_loss=False)
        pred_masks = inputs.pred_masks.requires_grad_()

        def step() -> dict[str, float]:
            loss, terms, _ = ForSegmentationLoss(
                inputs.logits, inputs.targets, pred_masks.device, inputs.pred_boxes, pred_masks, config)
            loss.backward()
            return {term: terms[term].item() for term in MASK_TERMS}

    else:
        raise ValueError(f"side={side!r}: expected 'ours' or 'reference'")
    return step


MEMORY_WORKLOADS: dict[str, Callable[[str], Callable[[], Any]]] = {"mask_loss": mask_loss_workload}


# glibc's malloc raises its mmap threshold up to 32 MiB after a large block is freed, and later blocks of that
# size then come from the heap, whose freed pages stay resident: RSS would count memory the step no longer
# holds (ours' 13 MiB loss chunks, freed one after the other, showed as 947 MiB instead of 223 MiB). A fixed
# threshold in both processes makes RSS follow the live tensors, as torch.cuda.max_memory_allocated does on
# a GPU. (The reference's peak is its live tensors either way: 1.97 GiB with or without it.)
PEAK_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def measure_peak_rss(workload: str, side: str) -> dict[str, Any]:
    """One side's peak memory, measured in a fresh process by benchmarks/peak_rss.py; its JSON report."""
    command = [sys.executable, str(HERE / "peak_rss.py"), workload, side]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PEAK_RSS_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"peak_rss.py {workload} {side} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def mask_loss_peak_memory(tmp: Path) -> Row:
    shape = (f"batch {MASK_BATCH}, {MASK_TARGETS} targets/image, masks {MASK_CANVAS[0]}x{MASK_CANVAS[1]}, "
             f"logits {MASK_HEAD_SIZE[0]}x{MASK_HEAD_SIZE[1]} x {MASK_QUERIES} queries")

    def check(mine: dict, theirs: dict) -> None:
        diffs = {term: mine["result"][term] / theirs["result"][term] - 1 for term in MASK_TERMS}
        for term, diff in diffs.items():
            assert abs(diff) <= MASK_TOLERANCE[term], f"{term}: ours differs by {diff:+.1%} from transformers"
        agreement = ", ".join(f"{term} {d:+.1e} (tolerance {MASK_TOLERANCE[term]:.0e})" for term, d in diffs.items())
        check.note = (f"{shape}; peak RSS above the built inputs, fresh process per side (glibc mmap threshold "
                      f"fixed); default mask loss fwd+bwd vs "
                      f"transformers ForSegmentationLoss; ours/ref - 1: {agreement}")

    def side(name: str) -> Callable[[], dict[str, Any]]:
        return lambda: measure_peak_rss("mask_loss", name)

    return Row(side("ours"), side("reference"), check, unit="MiB", note=shape,
               metric=lambda report: report["peak_mib"])


# ============================================================================ train_throughput, stage2_step_time
@dataclass
class TinyTrainingSetup:
    """What both training-step rows share: one demo batch and a fresh tiny-preset model (typed Any: no torch
    at module import)."""

    batch: dict[str, Any]  # collate_fn's pixel_values, pixel_mask, labels
    num_classes: int
    model: Any  # DetrForSegmentation as stage-1 training builds it (auxiliary losses on), seed 0
    config: Any  # the stage-1 TrainConfig that built it


def _tiny_training_setup(tmp: Path, batch_size: int, image_size: int) -> TinyTrainingSetup:
    """Demo images built into a dataset (one image left for the val split), one training batch, the tiny model.

    The model is what a stage-1 run starts from; a stage-2 run loads a stage-1 output, which is the same
    architecture and config (auxiliary_loss saved as True), so it serves both stages' timing.
    """
    import torch

    from hf_detr_seg.config import TrainConfig
    from hf_detr_seg.data.builder import build_dataset
    from hf_detr_seg.data.demo import generate_demo_data
    from hf_detr_seg.data.panoptic import load_dataset_label_map
    from hf_detr_seg.data.training_data import PanopticDetrDataset, collate_fn
    from hf_detr_seg.training_setup import load_model

    source = generate_demo_data(tmp / "demo", num_images=batch_size + 1, size=image_size)
    build_dataset(source / "images", source / "masks", source / "labels.yaml", tmp / "dataset",
                  val_fraction=1 / (batch_size + 1), progress=False)
    label_map = load_dataset_label_map(tmp / "dataset")
    data = PanopticDetrDataset(tmp / "dataset", "train", image_size)
    batch = collate_fn([data[i] for i in range(batch_size)])
    config = TrainConfig(stage=1, preset="tiny", image_size=image_size, per_device_train_batch_size=batch_size)
    torch.manual_seed(0)
    model = load_model(config, label_map)  # as training builds it: auxiliary (deep supervision) losses on
    return TinyTrainingSetup(batch, label_map.num_classes, model, config)


def _train_step(optimizer: Any, losses_of_batch: Callable[[], dict[str, Any]]) -> dict[str, float]:
    """zero_grad, forward, backward of `loss`, optimizer step; every returned term as a float."""
    optimizer.zero_grad(set_to_none=True)
    losses = losses_of_batch()
    losses["loss"].backward()
    optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}


def _batch_shape(setup: TinyTrainingSetup) -> str:
    batch = setup.batch
    targets = sum(len(t["class_labels"]) for t in batch["labels"])
    return (f"tiny preset, batch {len(batch['labels'])} x {setup.config.image_size} px demo images "
            f"({targets} targets), CPU, s/step")


def train_throughput(tmp: Path, batch_size: int = 4, image_size: int = 192) -> Row:
    """One stage-1 step (forward, backward, AdamW step) of the tiny preset on demo images, on CPU.

    Ours: `Stage1Step`, the detector only (plus the encoder presence loss, as the recipe trains).
    Reference: `DetrForSegmentation(..., labels=...)`, which also runs the mask head on every query and adds its
    loss. Both start from the same weights (a deep copy), train
    the same parameters (stage 1's groups, the mask head frozen) with the same optimizer, on the same batch.
    """
    import copy

    from hf_detr_seg.modeling import set_trainable
    from hf_detr_seg.steps import Stage1Step, build_criterion
    from hf_detr_seg.training_setup import build_optimizer

    setup = _tiny_training_setup(tmp, batch_size, image_size)
    batch, model, config = setup.batch, setup.model, setup.config
    set_trainable(model, Stage1Step.TRAINABLE)
    reference_model = copy.deepcopy(model)
    # Ours as the recipe trains: with stage 1's encoder presence loss (the reference has no such term).
    ours_step = Stage1Step(model, build_criterion(config, setup.num_classes), config.encoder_presence_weight)
    ours_step.train()
    reference_model.train()
    ours_optimizer = build_optimizer(model, config, ours_step.presence_head)
    reference_optimizer = build_optimizer(reference_model, config)

    inputs = {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"], "labels": batch["labels"]}

    def ours() -> float:
        return _train_step(ours_optimizer, lambda: ours_step(**inputs))["loss"]

    def reference() -> float:
        return _train_step(reference_optimizer, lambda: {"loss": reference_model(**inputs).loss})["loss"]

    shape = _batch_shape(setup)

    def check(mine: float, theirs: float) -> None:
        assert np.isfinite(mine) and np.isfinite(theirs), f"non-finite loss: ours {mine}, reference {theirs}"
        check.note = f"{shape}; losses ours {mine:.3f} (detector), reference {theirs:.3f} (+ masks)"

    return Row(ours, reference, check, unit="s", note=shape,
               summary=lambda o, r: f"ours {batch_size / o:.1f} img/s, reference {batch_size / r:.1f} img/s")


STAGE2_TOLERANCE = 1e-3  # |ours / reference - 1| per mask term: same matching, same target-resolution terms


def stage2_step_time(tmp: Path, batch_size: int = 4, image_size: int = 192, cached: bool = True) -> Row:
    """One stage-2 step (forward, backward, AdamW step over the mask head only) of the tiny preset, on CPU.

    Ours: `Stage2Step`: the frozen detector under no_grad in eval mode, one Hungarian matching, the mask
    head on the matched queries only, `build_criterion`'s mask terms (focal + dice).
    With `cached` (`--cache_detector_outputs`), the detector's outputs and the matching come from the
    `DetectorCache` that the untimed warm-up step filled: the cost of every epoch after the first.
    Reference: the naive stage 2 with transformers, `DetrForSegmentation(..., labels=...)` and its own loss,
    with the detector in eval mode as ours (no dropout difference, so both match on the same logits and boxes);
    it runs the mask head on every query and upsamples all of them. Its config is set so that only the mask
    terms count where transformers allows it: `bbox_loss_coefficient = giou_loss_coefficient = 0` and
    `auxiliary_loss = False` (else it matches and scores every decoder layer too); `loss_ce`'s weight is
    hard-wired to 1, but the frozen logits give it no gradient path to the mask head. Both start from the same
    weights (a deep copy) and train the mask head alone (`set_trainable(model, ("mask_head",))`) with AdamW.
    """
    import copy

    import torch

    from hf_detr_seg.config import TrainConfig
    from hf_detr_seg.detector_cache import DetectorCache
    from hf_detr_seg.detr_forward import run_detector
    from hf_detr_seg.modeling import set_trainable
    from hf_detr_seg.steps import Stage2Step, build_criterion
    from hf_detr_seg.training_setup import build_optimizer

    setup = _tiny_training_setup(tmp, batch_size, image_size)
    batch, model = setup.batch, setup.model
    set_trainable(model, Stage2Step.TRAINABLE)
    reference_model = copy.deepcopy(model)
    reference_model.config.update({"bbox_loss_coefficient": 0, "giou_loss_coefficient": 0, "auxiliary_loss": False})
    # model_name_or_path is only read by load_model, which the setup replaced: the weights are the tiny preset's.
    config = TrainConfig(stage=2, preset="tiny", image_size=image_size, per_device_train_batch_size=batch_size)
    cache = DetectorCache(max_bytes=2**30) if cached else None
    ours_step = Stage2Step(model, build_criterion(config, setup.num_classes), detector_cache=cache)
    ours_step.train()  # the mask head in train mode, the detector in eval mode
    reference_model.train()
    reference_model.detr.eval()
    ours_optimizer = build_optimizer(model, config)
    reference_optimizer = build_optimizer(reference_model, config)
    inputs = {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]}

    def ours() -> dict[str, float]:
        return _train_step(ours_optimizer, lambda: ours_step(**inputs, labels=batch["labels"]))

    def reference() -> dict[str, float]:
        def losses() -> dict[str, Any]:
            outputs = reference_model(**inputs, labels=batch["labels"])
            return {**outputs.loss_dict, "loss": outputs.loss}

        return _train_step(reference_optimizer, losses)

    shape = _batch_shape(setup)

    def check(mine: dict[str, float], theirs: dict[str, float]) -> None:
        assert all(np.isfinite(list(mine.values()))), f"non-finite loss (ours): {mine}"
        assert all(np.isfinite(list(theirs.values()))), f"non-finite loss (reference): {theirs}"
        # The same frozen detector on both sides gives the same matching (checked on the logits and boxes).
        with torch.no_grad():
            ours_outputs = run_detector(model, **inputs)
            reference_outputs = reference_model(**inputs)
        for name in ("logits", "pred_boxes"):
            assert torch.allclose(getattr(ours_outputs, name), getattr(reference_outputs, name), atol=1e-5), name
        criterion = ours_step.criterion
        same_matching = all(
            torch.equal(a, b) for pair_a, pair_b in zip(
                criterion.match(ours_outputs.logits, ours_outputs.pred_boxes, batch["labels"]),
                criterion.match(reference_outputs.logits, reference_outputs.pred_boxes, batch["labels"]))
            for a, b in zip(pair_a, pair_b))
        assert same_matching, "the two detectors' outputs match queries to targets differently"
        diffs = {term: mine[term] / theirs[term] - 1 for term in MASK_TERMS}
        for term, diff in diffs.items():
            assert abs(diff) <= STAGE2_TOLERANCE, f"{term}: ours differs by {diff:+.2e} from transformers"
        agreement = ", ".join(f"{term} {mine[term]:.4f} ({d:+.1e})" for term, d in diffs.items())
        assert not cached or len(cache) == batch_size, "the warm-up step did not fill the detector cache"
        source = "detector outputs from the cache (epochs after the first)" if cached else "no cache"
        check.note = (f"{shape}; {model.config.num_queries} queries, mask head trained, detector frozen, ours: "
                      f"{source}; same matching; ours/ref - 1: {agreement}")

    return Row(ours, reference, check, unit="s", note=shape,
               summary=lambda o, r: f"ours {o / batch_size:.3f} s/img, reference {r / batch_size:.3f} s/img")


# ============================================================================ grouped_channels_last_epoch
DEEPCRACK_SAMPLE_VAL = HERE.parent.parent / "shared" / "data" / "deepcrack-sample" / "val"


def grouped_channels_last_epoch(tmp: Path, batch_size: int = 8) -> Row:
    """One stage-1 epoch over the 40 DeepCrack sample val crops with quarter turns, at the DeepCrack recipe's
    model and sizes (128 px, 16 px margin, 10 queries, stride-2 mask levels), on CPU.

    Ours: `group_by_size` batches and channels-last convolutions, as the recipe trains. Reference: a plain
    shuffle and contiguous weights. Both sides step over the same 40 augmented samples (epoch 0), each with its
    own copy of the same starting weights; the batches are collated before timing, so only the steps count.
    """
    import copy

    import torch

    from hf_detr_seg.config import TrainConfig
    from hf_detr_seg.data.builder import build_dataset
    from hf_detr_seg.data.panoptic import load_dataset_label_map
    from hf_detr_seg.steps import build_step
    from hf_detr_seg.training_setup import build_train_loader, load_model

    labels = HERE.parent / "recipes/configs/deepcrack-cpu-labels.yaml"
    build_dataset(DEEPCRACK_SAMPLE_VAL / "images", DEEPCRACK_SAMPLE_VAL / "masks", labels, tmp / "dataset",
                  val_fraction=0, progress=False)
    label_map = load_dataset_label_map(tmp / "dataset")
    recipe = dict(stage=1, dataset_dir=str(tmp / "dataset"), image_size=128, num_queries=10, context_margin=16,
                  backbone_out_indices=[0, 1, 2, 3], per_device_train_batch_size=batch_size,
                  augmentation={"rotate90_prob": 0.5})
    sides = {}
    torch.manual_seed(0)
    start = load_model(TrainConfig(**recipe), label_map)
    for name, faster in (("ours", True), ("reference", False)):
        config = TrainConfig(**recipe, group_by_size=faster, channels_last=faster)
        _, loader = build_train_loader(config, tmp / "dataset")
        model = copy.deepcopy(start).to(memory_format=torch.channels_last if faster else torch.contiguous_format)
        step = build_step(config, model, label_map.num_classes, None).train()
        optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-5)
        sides[name] = (step, optimizer, list(loader))

    def epoch(name: str) -> list[int]:
        step, optimizer, batches = sides[name]
        for batch in batches:
            _train_step(optimizer, lambda: step(batch["pixel_values"], batch["pixel_mask"], batch["labels"]))
        return sorted(int(t["image_id"]) for batch in batches for t in batch["labels"])

    def padded_pixels(name: str) -> int:
        return sum(batch["pixel_mask"].numel() for batch in sides[name][2])

    def check(mine: list[int], theirs: list[int]) -> None:
        assert mine == theirs, "the two sides stepped over different samples"
        pixel_ratio = padded_pixels("ours") / padded_pixels("reference")
        check.note = (f"{len(mine)} DeepCrack crops, quarter turns, batch {batch_size}, 128 px + 16 px margin, "
                      f"stage 1 on CPU; padded pixels ours/reference {pixel_ratio:.2f}")

    return Row(lambda: epoch("ours"), lambda: epoch("reference"), check, unit="s", repeat=3,
               note=f"40 DeepCrack crops, batch {batch_size}")


ROWS: dict[str, Callable[[Path], Row]] = {
    "postprocess_panoptic": postprocess_panoptic,
    "pq_compute": pq_compute,
    "build_dataset_2_workers": build_dataset_2_workers,
    "mask_loss_peak_memory": mask_loss_peak_memory,
    "train_throughput": train_throughput,
    "stage2_step_time": stage2_step_time,
    "stage2_step_time_no_cache": lambda tmp: stage2_step_time(tmp, cached=False),
    "grouped_channels_last_epoch": grouped_channels_last_epoch,
}

"""The path to `facebook/detr-resnet-50-panoptic`, on a local folder in that checkpoint's format.

The real weights cannot be downloaded here, so the folder holds random weights under the published config:
transformers 4's DETR keys (`backbone: resnet50` with `use_timm_backbone`), 100 queries, d_model 256, 6 + 6
layers, and the 250-entry `id2label` whose indices are COCO panoptic category ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from transformers import DetrConfig, DetrForSegmentation, pipeline

from hf_detr_seg.data.builder import build_dataset
from hf_detr_seg.data.demo import DEMO_LABELS, generate_demo_data
from hf_detr_seg.labels import LabelMap, load_coco_panoptic_categories
from hf_detr_seg.modeling import build_image_processor, build_model
from hf_detr_seg.training import run
from tests.test_training import settings

HUB_ID = "facebook/detr-resnet-50-panoptic"


def published_config() -> dict:
    """The checkpoint's config.json as published (transformers 4 keys; no backbone_config)."""
    names = {c["id"]: c["name"] for c in load_coco_panoptic_categories()}
    return {
        "model_type": "detr",
        "architectures": ["DetrForSegmentation"],
        "backbone": "resnet50",
        "use_timm_backbone": True,
        "use_pretrained_backbone": True,
        "backbone_config": None,
        "dilation": False,
        "num_channels": 3,
        "num_queries": 100,
        "d_model": 256,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_ffn_dim": 2048,
        "decoder_ffn_dim": 2048,
        "position_embedding_type": "sine",
        "id2label": {str(i): names.get(i, f"LABEL_{i}") for i in range(250)},
        "label2id": {names.get(i, f"LABEL_{i}"): i for i in range(250)},
    }


def write_checkpoint_folder(folder: Path) -> DetrForSegmentation:
    """Random weights saved by transformers, under the published config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(published_config()))
    torch.manual_seed(0)
    model = DetrForSegmentation(DetrConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(published_config()))
    build_image_processor(800).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("coco") / "detr-resnet-50-panoptic"
    write_checkpoint_folder(folder)
    return folder


@pytest.fixture(scope="module")
def coco_base_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("coco-base-demo")
    source = generate_demo_data(tmp / "src", num_images=4, size=96, seed=3)
    labels = {**DEMO_LABELS, "coco_base": True}
    (source / "labels.yaml").write_text(yaml.safe_dump(labels, sort_keys=False))
    build_dataset(source / "images", source / "masks", source / "labels.yaml", tmp / "ds", val_fraction=0.5,
                  progress=False)
    return tmp / "ds"


def test_class_head_moves_onto_a_coco_base_label_map_by_name(checkpoint: Path) -> None:
    source = DetrForSegmentation.from_pretrained(checkpoint)
    assert len(source.config.id2label) == 250 and source.config.num_queries == 100
    assert source.config.backbone_config.backbone == "resnet50"
    label_map = LabelMap.from_dict({**DEMO_LABELS, "coco_base": True})
    model = build_model(label_map, str(checkpoint))
    head, old_head = model.detr.class_labels_classifier, source.detr.class_labels_classifier
    assert head.out_features == label_map.num_classes + 1 == 133 + 5 + 1
    for name in ("person", "wall-other-merged"):
        new_row, old_row = label_map.index_of(name), source.config.label2id[name]
        assert torch.equal(head.weight[new_row], old_head.weight[old_row])
    assert torch.equal(head.weight[-1], old_head.weight[-1])  # no-object
    assert model.config.id2label == label_map.id2label
    backbone = dict(model.detr.model.backbone.model.named_parameters())
    assert not backbone["conv1.weight"].requires_grad and backbone["layer2.0.conv1.weight"].requires_grad


@pytest.mark.slow
def test_both_stages_run_a_step_and_the_result_loads_in_the_pipeline(
    checkpoint: Path, coco_base_dataset: Path, tmp_path: Path
) -> None:
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    small = {"image_size": 64, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "max_train_steps": 1}
    run(settings(coco_base_dataset, stage1, stage=1, model_name_or_path=str(checkpoint), **small))
    run(settings(coco_base_dataset, stage2, stage=2, model_name_or_path=str(stage1), **small))
    trained = DetrForSegmentation.from_pretrained(stage2)
    assert trained.config.num_queries == 100 and len(trained.config.id2label) == 138
    segmenter = pipeline("image-segmentation", model=str(stage2), device="cpu")
    image = next((coco_base_dataset / "images" / "val").iterdir())
    from PIL import Image

    results = segmenter(Image.open(image), subtask="panoptic", threshold=0.0)
    assert all(r["label"] in trained.config.label2id for r in results)


def test_the_hub_id_loads_from_the_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the checkpoint in the Hub cache, `model_name_or_path: facebook/detr-resnet-50-panoptic` needs no network."""
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--detr-resnet-50-panoptic"
    revision = "0" * 40
    write_checkpoint_folder(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    label_map = LabelMap.from_dict({**DEMO_LABELS, "coco_base": True})
    model = build_model(label_map, HUB_ID)
    assert model.config.num_queries == 100 and model.config.id2label == label_map.id2label

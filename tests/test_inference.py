"""Inference: the segmenter equals the evaluation path, tiles merge into whole defects, predict_paths' outputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from PIL import Image
from scipy import ndimage

from hf_detr_seg.data.demo import DEMO_LABELS
from hf_detr_seg.data.panoptic import read_panoptic_png
from hf_detr_seg.data.training_data import to_pixel_values
from hf_detr_seg.data.transforms import fixed_resize
from hf_detr_seg.errors import UserInputError
from hf_detr_seg.inference import (
    DefectSegmenter,
    Segment,
    SegmentationResult,
    TilePrediction,
    expand_inputs,
    merge_tiles,
    predict_paths,
    tile_windows,
)
from hf_detr_seg.labels import LabelMap
from hf_detr_seg.overlay import draw_overlay, write_report_csv
from hf_detr_seg.postprocess import post_process_panoptic, segments_to_coco
from hf_detr_seg.testing import crafted_queries

CRACK, SURFACE = 0, 4  # model class indices of the demo label map
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    return LabelMap.from_dict(DEMO_LABELS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, label_map: LabelMap) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", label_map, IMAGE_SIZE)


# A random model's queries all predict the same thing. `crafted_queries` adds, to the class logits and the mask
# logits the model computes, a pattern that makes its queries differ: thing queries become blobs of several
# classes, queries 3 and 8 the left and right halves of the surface (one fused stuff segment), query 9 falls below
# the threshold and queries 5 and 10+ are "no object". The model's own forward, the full path and the kept-query
# path all run these modules, so all see the same outputs.
QUERY_CLASSES = [0, 1, 0, 4, 2, 5, 0, 3, 4, 1] + [5] * 10
QUERY_BOOST = [6.0, 7.0, 8.0, 6.5, 9.0, 6.0, 5.5, 7.5, 6.0, 2.0] + [6.0] * 10
BLOB_CENTRES = {0: (0.25, 0.2), 1: (0.25, 0.5), 2: (0.25, 0.8), 4: (0.75, 0.2), 6: (0.75, 0.5), 7: (0.75, 0.8),
                9: (0.5, 0.35)}


def query_patterns(h: int, w: int) -> torch.Tensor:
    """[Q, h, w] mask logits added per query: blobs, the two halves of the surface, "nothing" elsewhere."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    pattern = torch.full((len(QUERY_CLASSES), h, w), -10.0)
    pattern[3] = 3 * (0.5 - xs) - 1
    pattern[8] = 3 * (xs - 0.5) - 1
    for q, (cy, cx) in BLOB_CENTRES.items():
        pattern[q] = 12 * (1 - torch.hypot(ys - cy, xs - cx) / 0.12)
    return pattern


@pytest.fixture
def varied_queries(segmenter: DefectSegmenter):
    assert segmenter.model.config.num_queries == len(QUERY_CLASSES)
    boost = torch.nn.functional.one_hot(torch.tensor(QUERY_CLASSES), 6) * torch.tensor(QUERY_BOOST)[:, None]
    with crafted_queries(segmenter.model, boost, query_patterns):
        yield segmenter


@pytest.fixture(scope="module")
def segmenter(model_dir: Path) -> DefectSegmenter:
    return DefectSegmenter.from_pretrained(model_dir, device="cpu")


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- loading
def test_from_pretrained_reads_image_size_and_label_map(segmenter: DefectSegmenter, label_map: LabelMap):
    assert segmenter.image_size == IMAGE_SIZE
    assert segmenter.label_map.names == label_map.names
    assert segmenter.stuff_label_ids == {SURFACE}


def test_the_saved_processor_is_the_one_source_of_the_input_size(model_dir: Path, tmp_path: Path):
    """The size comes from preprocessor_config.json, whose longest edge is the training transforms' own rule; the
    run settings saved beside it are not read."""
    import shutil

    from hf_detr_seg.data.transforms import longest_edge

    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": IMAGE_SIZE, "longest_edge": longest_edge(IMAGE_SIZE)}
    folder = shutil.copytree(model_dir, tmp_path / "model")
    (folder / "run.yaml").write_text("image_size: 999\n")
    assert DefectSegmenter.from_pretrained(folder, device="cpu").image_size == IMAGE_SIZE
    (folder / "preprocessor_config.json").unlink()
    assert DefectSegmenter.from_pretrained(folder, device="cpu").image_size == 800  # DETR's processor default


def test_the_threshold_defaults_to_the_models_own(model_dir: Path, tmp_path: Path):
    """A model saved with `score_threshold` (training writes its `eval_threshold` there) is run at it unless the
    caller gives another; a model without one runs at DETR's 0.85."""
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.pop("score_threshold", None)
    (folder / "config.json").write_text(json.dumps(config))
    assert DefectSegmenter.from_pretrained(folder, device="cpu").threshold == 0.85
    (folder / "config.json").write_text(json.dumps({**config, "score_threshold": 0.6}))
    assert DefectSegmenter.from_pretrained(folder, device="cpu").threshold == 0.6
    assert DefectSegmenter.from_pretrained(folder, device="cpu", threshold=0.3).threshold == 0.3


def test_from_pretrained_rejects_what_is_not_a_segmentation_model(tmp_path: Path, model_dir: Path):
    with pytest.raises(UserInputError, match="not found"):
        DefectSegmenter.from_pretrained(tmp_path / "missing")
    with pytest.raises(UserInputError, match="config.json"):
        DefectSegmenter.from_pretrained(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["DetrForObjectDetection"]}))
    with pytest.raises(UserInputError, match="DetrForSegmentation"):
        DefectSegmenter.from_pretrained(tmp_path)
    del config["label_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="label_map"):
        DefectSegmenter.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------- whole images
def test_segmenter_equals_post_processing_of_the_model_outputs(varied_queries: DefectSegmenter, label_map: LabelMap):
    segmenter = varied_queries
    image = photo(90, 130)
    resized, _, _ = fixed_resize(image, np.ones((1, 90, 130), bool), IMAGE_SIZE)  # training's eval transform
    pixel_values = to_pixel_values(resized)[None]
    with torch.no_grad():
        pixel_mask = torch.ones(1, *resized.shape[:2], dtype=torch.long)
        outputs = segmenter.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    expected = post_process_panoptic(outputs.logits, outputs.pred_masks, [(90, 130)], {SURFACE}, threshold=0.85)[0]

    result = segmenter(image)
    assert result.image_size == (90, 130)
    assert result.id_map.dtype == np.int32 and result.id_map.shape == (90, 130)
    labels = [segment["label_id"] for segment in expected.segments]
    assert len(labels) == 7 and labels.count(SURFACE) == 1, "the crafted queries must give 6 blobs and a surface"
    np.testing.assert_array_equal(result.id_map, expected.id_map.numpy())
    assert [(s.id, s.label_id, s.score) for s in result.segments] == [
        (s["id"], s["label_id"], s["score"]) for s in expected.segments
    ]
    coco = segments_to_coco(expected, label_map)
    assert [(s.area, s.bbox) for s in result.segments] == [(s["area"], s["bbox"]) for s in coco]
    assert all(s.label == label_map.names[s.label_id] for s in result.segments)


def test_inputs_of_every_kind_and_batches_keep_order(segmenter: DefectSegmenter, tmp_path: Path):
    images = [photo(70, 100, seed=1), photo(100, 70, seed=2), photo(64, 64, seed=3)]
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    single = [segmenter(image).id_map for image in images]
    segmenter.batch_size = 2
    try:
        results = list(segmenter.predict_many([tmp_path / "a.png", Image.fromarray(images[1]), images[2]]))
    finally:
        segmenter.batch_size = 4
    assert [r.image_size for r in results] == [(70, 100), (100, 70), (64, 64)]
    np.testing.assert_array_equal(results[0].id_map, single[0])  # a path reads the same pixels
    # Grey and RGBA arrays are accepted as RGB.
    assert segmenter(images[2][:, :, 0]).image_size == (64, 64)
    assert segmenter(np.dstack([images[2], np.full((64, 64), 255, np.uint8)])).image_size == (64, 64)
    with pytest.raises(UserInputError):
        segmenter(images[2].astype(np.float32))


# ------------------------------------------------------------------------------------------- tiles
def test_tile_grid_covers_the_image_with_the_requested_overlap():
    height, width, tile = 700, 1000, 256
    windows = tile_windows(height, width, tile, 0.25)
    covered = np.zeros((height, width), np.int32)
    for top, left, bottom, right in windows:
        assert (bottom - top, right - left) == (tile, tile)
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    lefts = sorted({w[1] for w in windows})
    tops = sorted({w[0] for w in windows})
    assert lefts[0] == 0 and lefts[-1] + tile == width and tops[0] == 0 and tops[-1] + tile == height
    for starts in (lefts, tops):
        assert all(a + tile - b >= 64 for a, b in zip(starts, starts[1:]))  # overlap >= 0.25 x 256
    assert len(windows) == len(lefts) * len(tops) == 5 * 4  # the fewest tiles that keep the overlap
    assert tile_windows(100, 200, 256, 0.25) == [(0, 0, 100, 200)]
    assert tile_windows(100, 600, 256, 0.25) == [(0, 0, 100, 256), (0, 172, 100, 428), (0, 344, 100, 600)]
    no_overlap = tile_windows(512, 512, 256, 0.0)
    assert no_overlap == [(0, 0, 256, 256), (0, 256, 256, 512), (256, 0, 512, 256), (256, 256, 512, 512)]
    for bad in (1.0, -0.1):
        with pytest.raises(UserInputError, match="tile_overlap"):
            tile_windows(100, 100, 64, bad)
    with pytest.raises(UserInputError, match="tile_size"):
        tile_windows(100, 100, 4, 0.25)


class PerfectModel:
    """Stands in for the model on each tile: crack = the tile's dark pixels, one segment per 8-connected
    component (thing), surface (stuff) elsewhere, in an order and with scores that change from tile to tile."""

    def __init__(self) -> None:
        self.calls = 0
        self.tiles = 0

    def __call__(self, arrays):
        self.calls += 1
        out = []
        for array in arrays:
            self.tiles += 1
            dark = array[:, :, 0] < 128
            components, count = ndimage.label(dark, structure=np.ones((3, 3)))
            id_map = np.where(dark, components + 1, 1).astype(np.int32)  # surface 1, cracks 2..count+1
            segments = [{"id": 1, "label_id": SURFACE, "score": 0.95}] if (~dark).any() else []
            segments += [{"id": i + 2, "label_id": CRACK, "score": 0.9 + 0.001 * (self.tiles % 50)}
                         for i in range(count)]
            if not segments or segments[0]["id"] != 1:  # all dark: renumber from 1
                id_map -= 1
                for s in segments:
                    s["id"] -= 1
            out.append(TilePrediction(id_map, segments))
        return out


def band_image(height: int, width: int, bands: list[np.ndarray]) -> np.ndarray:
    image = np.full((height, width, 3), 230, np.uint8)
    for band in bands:
        image[band] = 20
    return image


def diagonal_band(height: int, width: int, start: tuple[int, int], end: tuple[int, int],
                  half_width: float) -> np.ndarray:
    """Pixels within `half_width` of the segment start -> end (row, col)."""
    rows, cols = np.mgrid[0:height, 0:width]
    (r0, c0), (r1, c1) = start, end
    direction = np.array([r1 - r0, c1 - c0], float)
    length = np.linalg.norm(direction)
    t = np.clip(((rows - r0) * direction[0] + (cols - c0) * direction[1]) / length**2, 0, 1)
    distance = np.hypot(rows - (r0 + t * direction[0]), cols - (c0 + t * direction[1]))
    return distance <= half_width


@pytest.fixture
def tiled(segmenter: DefectSegmenter, monkeypatch):
    fake = PerfectModel()
    monkeypatch.setattr(segmenter, "_predict_arrays", fake)
    monkeypatch.setattr(segmenter, "tile_size", 256)
    monkeypatch.setattr(segmenter, "tile_overlap", 0.25)
    return segmenter, fake


def assert_single_crack(result: SegmentationResult, band: np.ndarray) -> None:
    cracks = [s for s in result.segments if s.label == "crack"]
    surfaces = [s for s in result.segments if s.label == "surface"]
    assert len(cracks) == 1 and len(surfaces) == 1, [(s.label, s.area) for s in result.segments]
    np.testing.assert_array_equal(result.id_map == cracks[0].id, band)
    np.testing.assert_array_equal(result.id_map == surfaces[0].id, ~band)
    assert sorted(s.id for s in result.segments) == [1, 2]
    rows, cols = np.nonzero(band)
    assert cracks[0].area == band.sum()
    assert cracks[0].bbox == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_a_crack_crossing_several_tiles_stays_one_segment(tiled):
    segmenter, fake = tiled
    band = diagonal_band(700, 1000, (40, 15), (650, 985), 3.0)
    result = segmenter(band_image(700, 1000, [band]))
    assert fake.tiles == 20
    assert_single_crack(result, band)
    crack = next(s for s in result.segments if s.label == "crack")
    assert 0.9 <= crack.score <= 0.95  # an area-weighted mean of the tiles' scores


def test_a_one_pixel_diagonal_crack_joins_across_seams_without_overlap(tiled, monkeypatch):
    segmenter, _ = tiled
    monkeypatch.setattr(segmenter, "tile_overlap", 0.0)
    band = np.zeros((512, 768), bool)
    rows = np.arange(500)
    band[rows + 5, rows + 100] = True  # 8-connected only: crosses the seams diagonally
    band[300, :] = True  # and a horizontal line crossing two vertical seams
    result = segmenter(band_image(512, 768, [band]))
    assert_single_crack(result, band)


def test_two_separate_cracks_stay_two_segments(tiled):
    segmenter, _ = tiled
    first = diagonal_band(600, 900, (100, 10), (120, 890), 2.0)
    second = diagonal_band(600, 900, (160, 10), (500, 880), 2.0)
    assert not (ndimage.binary_dilation(first, iterations=3) & second).any()
    result = segmenter(band_image(600, 900, [first, second]))
    cracks = [s for s in result.segments if s.label == "crack"]
    assert len(cracks) == 2
    masks = sorted([result.id_map == s.id for s in cracks], key=lambda m: np.nonzero(m)[0].min())
    np.testing.assert_array_equal(masks[0], first)
    np.testing.assert_array_equal(masks[1], second)
    assert sum(s.label == "surface" for s in result.segments) == 1


def test_merge_weights_scores_by_area_and_drops_parts_without_pixels():
    isthing = [True, True, True, True, False]
    windows = [(0, 0, 10, 12), (0, 8, 10, 20)]  # overlap columns 8..11, seam at column 10
    a = np.zeros((10, 12), np.int32)
    a[5, :] = 1  # crack over all of tile A's row 5
    a[0, 11] = 2  # a speck only in the part of A that B owns: no pixel left
    b = np.zeros((10, 12), np.int32)
    b[5, :] = 1
    b[9, 2:4] = 2  # spalling, in B's core (global columns 10, 11)
    merged = merge_tiles(10, 20, windows, [
        TilePrediction(a, [{"id": 1, "label_id": CRACK, "score": 0.8}, {"id": 2, "label_id": 1, "score": 0.5}]),
        TilePrediction(b, [{"id": 1, "label_id": CRACK, "score": 0.6}, {"id": 2, "label_id": 1, "score": 0.7}]),
    ], isthing)
    expected = np.zeros((10, 20), np.int32)
    expected[5, :] = 1
    expected[9, 10:12] = 2
    np.testing.assert_array_equal(merged.id_map, expected)
    assert merged.segments == [{"id": 1, "label_id": CRACK, "score": 0.7},  # 10 px at 0.8, 10 px at 0.6
                               {"id": 2, "label_id": 1, "score": 0.7}]


def test_merge_fuses_stuff_into_one_segment_and_keeps_one_tiles_instances_apart():
    isthing = [True, True, True, True, False]
    windows = [(0, 0, 8, 8), (0, 8, 8, 16)]
    a = np.ones((8, 8), np.int32)
    a[2, 0:8] = 2
    a[4, 0:8] = 3  # two cracks of one tile touching each other: the model said two
    a[3, 0:8] = 3
    b = np.ones((8, 8), np.int32)
    merged = merge_tiles(8, 16, windows, [
        TilePrediction(a, [{"id": 1, "label_id": SURFACE, "score": 0.9}, {"id": 2, "label_id": CRACK, "score": 0.9},
                           {"id": 3, "label_id": CRACK, "score": 0.9}]),
        TilePrediction(b, [{"id": 1, "label_id": SURFACE, "score": 0.7}]),
    ], isthing)
    labels = {s["id"]: s["label_id"] for s in merged.segments}
    assert sorted(labels.values()) == [CRACK, CRACK, SURFACE]
    surface = next(s for s in merged.segments if s["label_id"] == SURFACE)
    assert (merged.id_map == surface["id"]).sum() == 8 * 16 - 24
    assert surface["score"] == pytest.approx((40 * 0.9 + 64 * 0.7) / 104, abs=1e-6)


# ------------------------------------------------------------------------------------------- overlay
def test_overlay_is_the_photo_with_segments_drawn(label_map: LabelMap):
    image = np.full((120, 160, 3), 128, np.uint8)
    id_map = np.zeros((120, 160), np.int32)
    id_map[:] = 1
    id_map[60:64, 10:150] = 2
    result = SegmentationResult(id_map, [
        Segment(1, "surface", SURFACE, 0.9, int((id_map == 1).sum()), [0, 0, 160, 120]),
        Segment(2, "crack", CRACK, 0.97, 4 * 140, [10, 60, 140, 4]),
    ], (120, 160))
    colors = {c.name: c.color for c in label_map.classes}
    out = draw_overlay(image, result, colors, skip_labels={"surface"})
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[60:64, 20:140] != image[60:64, 20:140]).any(axis=-1).all()
    assert (out[100:, :] == image[100:, :]).all()  # far from the crack, its tag and the legend: untouched
    assert (draw_overlay(image, result, colors, skip_labels={"surface", "crack"}) == image).all()
    with pytest.raises(ValueError):
        draw_overlay(image[:10], result, colors)


def test_report_csv_has_a_header_even_without_rows(tmp_path: Path):
    write_report_csv([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text().startswith("image,segment_id,part,class,score")
    write_report_csv([{"a": 1}, {"a": 2, "b": "x"}], tmp_path / "r.csv")
    assert list(csv.DictReader((tmp_path / "r.csv").open())) == [{"a": "1", "b": ""}, {"a": "2", "b": "x"}]


# ------------------------------------------------------------------------------------------- predict_paths
def test_predict_paths_writes_every_output_and_reports_failures(model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    from hf_detr_seg.segment_measures import measure_segments

    fake = PerfectModel()
    monkeypatch.setattr(DefectSegmenter, "_predict_arrays", lambda self, arrays: fake(arrays))
    folder, other = tmp_path / "photos", tmp_path / "more"
    folder.mkdir()
    other.mkdir()
    two_cracks = [diagonal_band(80, 120, (10, 5), (20, 115), 1.5), diagonal_band(80, 120, (40, 5), (75, 110), 1.5)]
    Image.fromarray(band_image(80, 120, two_cracks)).save(folder / "b.png")
    one_crack = band_image(70, 90, [diagonal_band(70, 90, (5, 5), (65, 85), 2.0)])
    Image.fromarray(one_crack).save(folder / "a.jpg", quality=98)
    (folder / "notes.txt").write_text("not an image")
    rotated = Image.fromarray(band_image(60, 100, [diagonal_band(60, 100, (30, 3), (30, 97), 2.0)]))
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed turned by 90 degrees: 100 wide x 60 high becomes 60 wide x 100 high
    rotated.save(other / "c.jpg", exif=exif, quality=98)
    (other / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"

    summary = predict_paths(model_dir, [str(folder), str(other / "*.png"), str(other / "c.jpg")], out,
                            mm_per_pixel=0.5, batch_size=2, tile_size=64, tile_overlap=0.25)

    assert summary["images"] == 3 and summary["out"] == str(out)
    assert [Path(p).name for p, _ in summary["failed"]] == ["broken.png"]
    assert "broken.png" in summary["failed"][0][1] and "broken.png" in capsys.readouterr().err
    sizes = {"a": (70, 90), "b": (80, 120), "c": (100, 60)}
    cracks = {"a": 1, "b": 2, "c": 1}
    rows = list(csv.DictReader((out / "report.csv").open()))
    saved_labels = DefectSegmenter.from_pretrained(model_dir).label_map
    for stem, size in sizes.items():
        ids = read_panoptic_png(out / f"{stem}_panoptic.png")
        assert ids.shape == size
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.size == (size[1], size[0]) and overlay.mode == "RGB"
        document = json.loads((out / f"{stem}.json").read_text())
        assert (document["height"], document["width"]) == size and document["unit"] == "mm"
        assert {s["id"] for s in document["segments"]} == set(np.unique(ids)) - {0}
        assert [s["class"] for s in document["segments"]].count("crack") == cracks[stem]
        measured = measure_segments(ids, [{"id": s["id"], "label_id": saved_labels.index_of(s["class"])}
                                          for s in document["segments"]], saved_labels, mm_per_pixel=0.5)
        for s, m in zip(document["segments"], measured):
            assert s["area"] == (ids == s["id"]).sum()
            repeated = {"id", "label_id", "class_name", "bbox"}
            assert s["measurements"] == {k: v for k, v in m.items() if k not in repeated}
        defects = [s for s in document["segments"] if s["class"] != "surface"]
        image_rows = [r for r in rows if Path(r["image"]).stem == stem]
        assert [int(r["segment_id"]) for r in image_rows] == [s["id"] for s in defects]
        for row, segment in zip(image_rows, defects):
            assert row["class"] == segment["class"] == "crack" and row["unit"] == "mm"
            assert [int(row[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")] == segment["bbox"]
            assert int(row["area_px"]) == segment["area"]
            for key in ("length", "max_width", "mean_width", "area"):
                assert float(row[key]) == pytest.approx(segment["measurements"][key], abs=1e-4)
    assert summary["segments"] == len(rows) == 4
    # The crack of a.jpg crosses tiles (64 px) but is measured whole: 100 px long, 0.5 mm per pixel.
    crack_a = next(r for r in rows if Path(r["image"]).stem == "a")
    assert float(crack_a["length"]) == pytest.approx(50, rel=0.1)
    assert not list(out.glob(".*")), "temporary files left behind"


def test_predict_paths_runs_the_real_model(model_dir: Path, tmp_path: Path):
    Image.fromarray(photo(50, 70)).save(tmp_path / "x.png")
    summary = predict_paths(model_dir, [str(tmp_path / "x.png")], tmp_path / "out", threshold=0.5)
    assert summary["images"] == 1 and summary["failed"] == []
    assert read_panoptic_png(tmp_path / "out" / "x_panoptic.png").shape == (50, 70)
    assert (tmp_path / "out" / "report.csv").is_file() and (tmp_path / "out" / "x.json").is_file()
    with pytest.raises(UserInputError, match="config.json"):
        predict_paths(tmp_path, [str(tmp_path / "x.png")], tmp_path / "out2")


def test_expand_inputs_reports_what_matched_nothing(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert expand_inputs([str(tmp_path / "*.png"), str(tmp_path / "x.png")]) == [tmp_path / "x.png"]
    with pytest.raises(UserInputError, match="empty"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(UserInputError, match=r"nothing\*\.jpg"):
        expand_inputs([str(tmp_path / "nothing*.jpg")])


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_photos_read_as_the_dataset_builder_reads_them(tmp_path: Path, orientation: int):
    from hf_detr_seg.data.masks import read_image
    from hf_detr_seg.inference import read_photo

    picture = Image.fromarray(photo(30, 50))
    exif = picture.getexif()
    exif[0x0112] = orientation
    picture.save(tmp_path / "p.jpg", exif=exif, quality=95)
    picture.convert("RGBA").save(tmp_path / "p.png")
    picture.convert("L").save(tmp_path / "g.png")
    for name in ("p.jpg", "p.png", "g.png"):
        np.testing.assert_array_equal(read_photo(tmp_path / name), np.asarray(read_image(tmp_path / name)))
    assert read_photo(tmp_path / "p.jpg").shape == ((50, 30, 3) if orientation in (6, 8) else (30, 50, 3))


ROLE_LABELS = {"mask_format": "indexed", "classes": [
    {"name": "Riss", "isthing": False, "value": 1, "measure": "crack"},
    {"name": "crack", "isthing": True, "value": 2},  # named crack, but this map gives the crack role to Riss
    {"name": "surface", "isthing": False, "background": True, "value": 0}]}


def test_predict_measures_the_class_whose_role_is_crack_one_row_per_crack(tmp_path: Path, monkeypatch):
    """Riss (stuff, `measure: crack`) gets a row per connected crack with its length; the class named crack
    without the role, in a map that gives the role to another class, is measured as a region."""
    labels = LabelMap.from_dict(ROLE_LABELS)
    model = save_tiny_model(tmp_path / "model", labels, IMAGE_SIZE)

    def dark_is_riss_left_crack_right(self, arrays):
        out = []
        for array in arrays:
            dark = array[:, :, 0] < 128
            left = dark & (np.arange(array.shape[1]) < array.shape[1] // 2)
            id_map = np.where(left, 1, np.where(dark, 2, 3)).astype(np.int32)
            out.append(TilePrediction(id_map, [{"id": 1, "label_id": 0, "score": 0.9},
                                               {"id": 2, "label_id": 1, "score": 0.9},
                                               {"id": 3, "label_id": 2, "score": 0.9}]))
        return out

    monkeypatch.setattr(DefectSegmenter, "_predict_arrays", dark_is_riss_left_crack_right)
    bands = [diagonal_band(100, 240, (20, 5), (20, 105), 1.5), diagonal_band(100, 240, (50, 10), (90, 90), 2.0),
             diagonal_band(100, 240, (50, 140), (50, 230), 2.0)]
    Image.fromarray(band_image(100, 240, bands)).save(tmp_path / "photo.png")
    predict_paths(model, [str(tmp_path / "photo.png")], tmp_path / "out")

    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [(r["class"], r["segment_id"], r["part"]) for r in rows] == [
        ("Riss", "1", "1"), ("Riss", "1", "2"), ("crack", "2", "")]
    riss = rows[:2]
    assert float(riss[0]["length"]) == pytest.approx(100, rel=0.05)
    assert float(riss[1]["length"]) == pytest.approx(math.hypot(40, 80), rel=0.05)
    assert float(riss[0]["mean_width"]) == pytest.approx(3, abs=1) and float(riss[1]["max_width"]) > 0
    assert [int(r["area_px"]) for r in riss] == [bands[0].sum(), bands[1].sum()]
    assert rows[2]["length"] == rows[2]["mean_width"] == "" and int(rows[2]["area_px"]) == bands[2].sum()


def test_a_model_saved_before_roles_keeps_its_crack_measurements(tmp_path: Path, model_dir: Path):
    """A config.label_map without `measure` (as saved before roles): its class named crack measures as one."""
    config = json.loads((model_dir / "config.json").read_text())
    for entry in config["label_map"]["classes"]:
        entry.pop("measure", None)
    old = tmp_path / "old-model"
    old.mkdir()
    for path in model_dir.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    (old / "config.json").write_text(json.dumps(config))
    labels = DefectSegmenter.from_pretrained(old).label_map
    assert [c.name for c in labels.classes if c.measure == "crack"] == ["crack"]

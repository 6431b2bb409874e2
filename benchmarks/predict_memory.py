"""Peak memory and time of `hf-detr-seg predict` on one large photo, file to files, in fresh processes:

    python benchmarks/predict_memory.py [--sizes 6000x4000 8000x6000] [--tile-size 512] [--batch-size 4]

For each size: a JPEG of that size (the inspection photo of `predict_rows`), then `predict_paths` on it with
overlays, measurements and `--coco-json`, in a process of its own; prints one JSON line per size: peak RSS above
the process's level once the model is loaded, and the wall time. The model is the `tiny` preset with random
weights whose class head and last mask convolution are scaled up, so that every query of every tile is kept and
the mask head runs for all of them: the largest tile working set there is.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _model_folder(folder: Path, image_size: int) -> Path:
    import torch

    from hf_detr_seg.data.demo import DEMO_LABELS
    from hf_detr_seg.hub import save_model_folder
    from hf_detr_seg.labels import LabelMap
    from hf_detr_seg.modeling import build_image_processor, build_model

    label_map = LabelMap.from_dict(DEMO_LABELS)
    torch.manual_seed(0)
    model = build_model(label_map, preset="tiny")
    with torch.no_grad():
        model.detr.class_labels_classifier.weight.mul_(200)
        model.mask_head.output_conv.weight.mul_(100)
    save_model_folder(model, build_image_processor(image_size), folder, label_map, {"image_size": image_size}, {})
    return folder


def measure(model: Path, photo: Path, out: Path, tile_size: int, batch_size: int) -> dict:
    """In this process: load the model, reset the RSS high-water mark, predict the photo to files."""
    from peak_rss import peak_kib, release_free_heap, reset_peak

    from hf_detr_seg.inference import DefectSegmenter, predict_paths

    DefectSegmenter.from_pretrained(model)  # imports and first load outside the measured part
    gc.collect()
    release_free_heap()
    baseline = reset_peak()
    start = time.perf_counter()
    summary = predict_paths(model, [photo], out, tile_size=tile_size, batch_size=batch_size, mm_per_pixel=0.2,
                            coco_json=out / "coco.json")
    seconds = time.perf_counter() - start
    return {"peak_mib": round((peak_kib() - baseline) / 1024, 1), "seconds": round(seconds, 1),
            "segments": summary["segments"], "images": summary["images"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["6000x4000", "8000x6000"], help="WIDTHxHEIGHT")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PHOTO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, photo, out = map(Path, args.child)
        print(json.dumps(measure(model, photo, out, args.tile_size, args.batch_size)))
        return 0
    from PIL import Image
    from predict_rows import inspection_photo
    from rows import PEAK_RSS_ENV

    with tempfile.TemporaryDirectory(prefix="predict_memory_") as tmp:
        model = _model_folder(Path(tmp) / "model", args.tile_size)
        for size in args.sizes:
            width, height = map(int, size.lower().split("x"))
            photo = Path(tmp) / f"photo_{size}.jpg"
            Image.fromarray(inspection_photo(height, width)).save(photo, quality=90)
            command = [sys.executable, __file__, "--tile-size", str(args.tile_size), "--batch-size",
                       str(args.batch_size), "--child", str(model), str(photo), str(Path(tmp) / f"out_{size}")]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PEAK_RSS_ENV})
            if done.returncode != 0:
                raise SystemExit(f"predict on {size} failed:\n{done.stderr[-3000:]}")
            print(json.dumps({"size": size, **json.loads(done.stdout.splitlines()[-1])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

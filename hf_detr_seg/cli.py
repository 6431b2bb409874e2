"""`hf-detr-seg` subcommands. Thin: parse, call the library, print a short summary.

Every multi-word option is accepted with dashes and with underscores (`--dataset-dir` / `--dataset_dir`).
Bad input exits with status 2 and a message naming the file or field.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserInputError

DEFAULT_DEMO_DIR = Path("outputs/demo-data")


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Register `--a-b` together with its `--a_b` twin (both spellings are accepted everywhere)."""
    names = [flag]
    if flag.startswith("--") and ("-" in flag[2:] or "_" in flag[2:]):
        dashed = "--" + flag[2:].replace("_", "-")
        underscored = "--" + flag[2:].replace("-", "_")
        names = [dashed] + ([underscored] if underscored != dashed else [])
    parser.add_argument(*names, **kwargs)


# --------------------------------------------------------------------------- commands
def cmd_demo_data(args: argparse.Namespace) -> None:
    from .data.demo import generate_demo_data

    out = generate_demo_data(args.out, num_images=args.num_images, size=args.size, seed=args.seed)
    print(f"Wrote {args.num_images} demo images ({args.size} px) with masks and labels.yaml to {out}")


def cmd_build_dataset(args: argparse.Namespace) -> None:
    from .data.builder import build_dataset
    from .labels import LabelMap

    images, masks, labels = args.images, args.masks, args.labels
    if images is None and masks is None and labels is None:
        images, masks, labels = _ensure_demo_source()
    elif images is None or masks is None or labels is None:
        raise UserInputError("build-dataset: give --images, --masks and --labels together (or none for the demo data)")
    label_map = LabelMap.from_yaml(labels)
    summary = build_dataset(
        images,
        masks,
        label_map,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        skip_bad=args.skip_bad,
        val_images=args.val_images,
        val_masks=args.val_masks,
        progress=not args.quiet,
    )
    print(summary.format(label_map))
    if summary.skipped:
        raise SystemExit(1)


def cmd_validate(args: argparse.Namespace) -> None:
    from .data.panoptic import validate_dataset

    report = validate_dataset(Path(args.dataset))
    if not report.ok:
        print(f"{args.dataset}: INVALID ({len(report.problems)} problem(s))", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(1)
    counts = ", ".join(f"{s}: {n} images, {report.segments[s]} segments" for s, n in report.images.items())
    print(f"{args.dataset}: valid COCO-panoptic dataset ({counts})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from .evaluation import evaluate_model, metrics_table

    model = _load_segmentation_model(args.model)
    metrics = evaluate_model(
        model,
        args.dataset_dir,
        split=args.split,
        image_size=args.image_size or _trained_image_size(args.model),
        threshold=args.threshold,
        batch_size=args.batch_size,
        tolerance=args.tolerance,
        max_images=args.max_images,
    )
    if args.baseline == "otsu":
        from .baselines import otsu_scores

        crack = args.baseline_class
        metrics["baseline_otsu"] = otsu_scores(args.dataset_dir, args.split, crack, tolerance=args.tolerance)
    print(metrics_table(metrics))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=1))
        print(f"Wrote {args.json}")


def _load_segmentation_model(folder: str):
    """A DETR segmentation model folder, or a clear error naming it."""
    from transformers import DetrForSegmentation

    try:
        model = DetrForSegmentation.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserInputError(f"--model {folder}: not a DETR segmentation model folder ({err})") from None
    if getattr(model.config, "label_map", None) is None:
        raise UserInputError(f"--model {folder}: its config has no label_map; train it with hf-detr-seg")
    return model.eval()


def _trained_image_size(folder: str) -> int:
    """The shortest edge the model was trained at (from its run.yaml), else DETR's 800."""
    import yaml

    run_file = Path(folder) / "run.yaml"
    if run_file.is_file():
        return int(yaml.safe_load(run_file.read_text()).get("image_size", 800))
    return 800


def _ensure_demo_source() -> tuple[Path, Path, Path]:
    """The embedded demo data is the default of every command that needs data."""
    from .data.demo import generate_demo_data

    if not (DEFAULT_DEMO_DIR / "labels.yaml").is_file():
        generate_demo_data(DEFAULT_DEMO_DIR)
        print(f"No data given: generated the demo data in {DEFAULT_DEMO_DIR}")
    return DEFAULT_DEMO_DIR / "images", DEFAULT_DEMO_DIR / "masks", DEFAULT_DEMO_DIR / "labels.yaml"


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-detr-seg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the embedded synthetic concrete-defect data")
    demo.add_argument("out", type=Path, nargs="?", default=DEFAULT_DEMO_DIR)
    _add(demo, "--num-images", type=int, default=40)
    _add(demo, "--size", type=int, default=256)
    _add(demo, "--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)

    build = sub.add_parser("build-dataset", help="masks + images -> COCO-panoptic dataset folder")
    _add(build, "--images", type=Path, help="folder of images (default: the demo data)")
    _add(build, "--masks", type=Path, help="folder of masks, file names matching the images")
    _add(build, "--labels", type=Path, help="labels.yaml (the label map)")
    _add(build, "--out", type=Path, required=True, help="output dataset folder")
    _add(build, "--val-fraction", type=float, default=0.2, help="share of images put in val (0..1)")
    _add(build, "--val-images", type=Path, help="take val from this folder instead of --val-fraction")
    _add(build, "--val-masks", type=Path, help="masks of --val-images")
    _add(build, "--seed", type=int, default=0, help="seed of the deterministic split")
    _add(build, "--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    _add(build, "--skip-bad", action="store_true", help="skip bad files, list them, exit 1")
    _add(build, "--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build_dataset)

    evaluate = sub.add_parser("evaluate", help="score a model on a built dataset split (PQ, mAP, IoU, F1)")
    _add(evaluate, "--model", required=True, help="a model folder written by the recipes")
    _add(evaluate, "--dataset-dir", required=True, type=Path)
    _add(evaluate, "--split", default="val")
    _add(evaluate, "--json", type=Path, help="write all metrics here")
    _add(evaluate, "--threshold", type=float, default=0.85, help="keep queries scoring above this")
    _add(evaluate, "--image-size", type=int, help="shortest edge (default: the one the model was trained at)")
    _add(evaluate, "--batch-size", type=int, default=4)
    _add(evaluate, "--tolerance", type=float, default=0, help="pixel F1 tolerance in pixels")
    _add(evaluate, "--max-images", type=int, help="only the first N images of the split")
    _add(evaluate, "--baseline", choices=["otsu"], help="also score a dark-pixel Otsu threshold")
    _add(evaluate, "--baseline-class", default="crack", help="the class the baseline predicts")
    evaluate.set_defaults(func=cmd_evaluate)

    validate = sub.add_parser("validate", help="check a dataset folder against the COCO-panoptic rules")
    validate.add_argument("dataset", type=Path)
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.func
    try:
        handler(args)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

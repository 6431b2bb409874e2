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

from .data.demo import DEMO_NUM_IMAGES, DEMO_SIZE
from .errors import UserInputError

DEFAULT_DEMO_DIR = Path("outputs/demo-data")
THRESHOLD_HELP = "keep queries scoring above this (default: the model's own, set by its recipe; else 0.85)"
# The `huggingface_hub.HfApi`-like object `push` uploads with (None: a new `HfApi()`); tests put a stand-in here.
HUB_API = None


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

    images, masks, labels, annotations = args.images, args.masks, args.labels, args.annotations
    if images is None and masks is None and labels is None and annotations is None:
        images, masks, labels = _ensure_demo_source()
    elif images is None or labels is None or (masks is None) == (annotations is None):
        raise UserInputError(
            "build-dataset: give --images, --labels and either --masks or --annotations (or none for the demo data)"
        )
    label_map = LabelMap.from_yaml(labels)
    summary = build_dataset(
        images,
        masks,
        labels,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        skip_bad=args.skip_bad,
        val_images=args.val_images,
        val_masks=args.val_masks,
        progress=not args.quiet,
        annotations=annotations,
        annotation_format=args.annotation_format,
        val_annotations=args.val_annotations,
    )
    print(summary.format(label_map))
    if summary.skipped or summary.dropped_objects:
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
    from .evaluation import evaluate_model, metrics_table
    from .inference import DefectSegmenter
    from .processes import Processes

    processes = Processes.from_environment()
    segmenter = DefectSegmenter.from_pretrained(args.model, image_size=args.image_size, device=processes.device)
    metrics = evaluate_model(
        segmenter.model,
        args.dataset_dir,
        split=args.split,
        image_size=segmenter.image_size,
        threshold=args.threshold,
        batch_size=args.batch_size,
        tolerance=args.tolerance,
        max_images=args.max_images,
        save_predictions=args.save_predictions,
        processes=processes,
    )
    if not processes.is_main:  # the main process of `accelerate launch` reports and writes
        return
    if args.baseline == "otsu":
        from .baselines import otsu_scores

        metrics["baseline_otsu"] = otsu_scores(args.dataset_dir, args.split, args.baseline_class,
                                               tolerance=args.tolerance)
    print(metrics_table(metrics))
    _write_metrics(args.json, metrics)
    if args.save_predictions is not None:
        out = Path(args.save_predictions)
        print(f"Wrote the predictions as COCO-panoptic to {out}/panoptic_{args.split}.json "
              f"+ {out}/panoptic_{args.split}/ (score them with `hf-detr-seg pq`)")


def cmd_pq(args: argparse.Namespace) -> None:
    from .evaluation import metrics_table
    from .metrics import pq_compute_folders

    for flag, path in (("--gt-json", args.gt_json), ("--pred-json", args.pred_json)):
        if not Path(path).is_file():
            raise UserInputError(f"{flag} {path}: file not found")
    try:
        metrics = pq_compute_folders(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder)
    except (KeyError, TypeError) as err:
        raise UserInputError(
            f"{args.gt_json} / {args.pred_json}: missing or malformed field {err}; expected COCO-panoptic JSON"
        ) from None
    print(f"PQ of {args.pred_json} against {args.gt_json}:")
    print(metrics_table(metrics))
    _write_metrics(args.json, metrics)


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_folder

    folder = Path(args.model)
    if not folder.is_dir():
        raise UserInputError(f"--model {folder}: folder not found")
    kind = "model" if (folder / "config.json").is_file() else "dataset"
    try:
        files = push_folder(folder, args.repo_id, private=args.private, dry_run=args.dry_run, api=HUB_API)
    except OSError as err:  # no network, no token, refused by the Hub (huggingface_hub's errors are OSErrors)
        print(f"error: upload of {folder} to {args.repo_id} failed: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.dry_run:
        print("\n".join(files))
        print(f"Dry run: {len(files)} files of {kind} folder {folder} would go to {args.repo_id} "
              f"({'private' if args.private else 'public'}); nothing uploaded", file=sys.stderr)
        return
    url = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{args.repo_id}"
    print(f"Uploaded {len(files)} files of {kind} folder {folder} to {url}{' (private)' if args.private else ''}")


def cmd_export_coco(args: argparse.Namespace) -> None:
    from .coco_export import export_dataset

    counts = export_dataset(args.dataset, args.out, split=args.split, things_only=args.things_only)
    where = f"images/{args.split}" if args.split else "images"
    print(f"Wrote {counts['images']} images, {counts['annotations']} annotations of {args.dataset} as COCO instances "
          f"to {args.out} (file names relative to {Path(args.dataset) / where})")


def cmd_predict(args: argparse.Namespace) -> None:
    from .inference import predict_paths
    from .processes import Processes

    options = {name: getattr(args, name) for name in ("tile_size", "tile_overlap", "mm_per_pixel", "batch_size",
                                                      "image_size", "coco_json")}
    result = predict_paths(
        args.model,
        args.inputs,
        args.out,
        threshold=args.threshold,
        skip_existing=args.skip_existing,
        progress=not args.quiet,
        processes=Processes.from_environment(),
        **{name: value for name, value in options.items() if value is not None},  # unset: the library's default
    )
    failed = result.get("failed", [])
    if not result.get("main", True):  # another process of `accelerate launch` prints the summary
        raise SystemExit(1 if failed else 0)
    skipped = f" ({result['skipped']} more left as they were: outputs complete)" if result.get("skipped") else ""
    print(f"Predicted {result['images']} images{skipped}, {result['segments']} segments; results in {result['out']}")
    if result.get("coco_json"):
        print(f"Wrote every predicted segment as COCO instances to {result['coco_json']} "
              "(import it into CVAT; re-import corrections with `build-dataset --annotations`)")
    if failed:
        print(f"{len(failed)} input(s) failed:", file=sys.stderr)
        for path, message in failed:
            print(f"  {message}" if str(message).startswith(str(path)) else f"  {path}: {message}", file=sys.stderr)
        raise SystemExit(1)


def _write_metrics(path: Path | None, metrics: dict) -> None:
    import json

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(metrics, indent=1))
        print(f"Wrote {path}")


def _ensure_demo_source() -> tuple[Path, Path, Path]:
    """The embedded demo data is the default of every command that needs data."""
    from .data.demo import generate_demo_data

    if not (DEFAULT_DEMO_DIR / "labels.yaml").is_file():
        generate_demo_data(DEFAULT_DEMO_DIR)
        print(f"No data given: generated the demo data in {DEFAULT_DEMO_DIR}")
    return DEFAULT_DEMO_DIR / "images", DEFAULT_DEMO_DIR / "masks", DEFAULT_DEMO_DIR / "labels.yaml"


# --------------------------------------------------------------------------- parser
def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser("build-dataset", help="masks or annotations + images -> COCO-panoptic dataset folder")
    _add(build, "--images", type=Path, help="folder of images (default: the demo data)")
    _add(build, "--masks", type=Path, help="folder of masks, file names matching the images")
    _add(build, "--annotations", type=Path, help="instead of --masks: a COCO instances .json or a labelme folder")
    _add(build, "--annotation-format", choices=["coco", "labelme"], help="format of --annotations (default: detected)")
    _add(build, "--labels", type=Path, help="labels.yaml (the label map)")
    _add(build, "--out", type=Path, required=True, help="output dataset folder")
    _add(build, "--val-fraction", type=float, default=0.2, help="share of images put in val (0..1)")
    _add(build, "--val-images", type=Path, help="take val from this folder instead of --val-fraction")
    _add(build, "--val-masks", type=Path, help="masks of --val-images")
    _add(build, "--val-annotations", type=Path, help="annotations of --val-images (with --annotations)")
    _add(build, "--seed", type=int, default=0, help="seed of the deterministic split")
    _add(build, "--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    _add(build, "--skip-bad", action="store_true", help="skip bad files and bad annotated objects, list them, exit 1")
    _add(build, "--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build_dataset)


def _add_demo_data(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo-data", help="write the embedded synthetic concrete-defect data")
    demo.add_argument("out", type=Path, nargs="?", default=DEFAULT_DEMO_DIR)
    _add(demo, "--num-images", type=int, default=DEMO_NUM_IMAGES)
    _add(demo, "--size", type=int, default=DEMO_SIZE)
    _add(demo, "--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("evaluate", help="score a model on a built dataset split (PQ, mAP, IoU, F1)")
    _add(evaluate, "--model", required=True, help="a model folder written by the recipes")
    _add(evaluate, "--dataset-dir", required=True, type=Path)
    _add(evaluate, "--split", default="val")
    _add(evaluate, "--json", type=Path, help="write all metrics here")
    _add(evaluate, "--threshold", type=float, help=THRESHOLD_HELP)
    _add(evaluate, "--image-size", type=int, help="shortest edge (default: the one the model was trained at)")
    _add(evaluate, "--batch-size", type=int, default=4)
    _add(evaluate, "--tolerance", type=float, default=0, help="pixel F1 tolerance in pixels")
    _add(evaluate, "--max-images", type=int, help="only the first N images of the split")
    _add(evaluate, "--baseline", choices=["otsu"], help="also score a dark-pixel Otsu threshold")
    _add(evaluate, "--baseline-class", help="the class the baseline predicts (default: the one with measure: crack)")
    _add(evaluate, "--save-predictions", type=Path, help="also write the predictions as a COCO-panoptic folder here")
    evaluate.set_defaults(func=cmd_evaluate)


def _add_pq(sub: argparse._SubParsersAction) -> None:
    pq = sub.add_parser("pq", help="PQ of a COCO-panoptic prediction folder against a ground-truth one (panopticapi)")
    _add(pq, "--gt-json", required=True, type=Path, help="ground-truth panoptic JSON")
    _add(pq, "--gt-folder", type=Path, help="its PNG folder (default: the JSON path without .json)")
    _add(pq, "--pred-json", required=True, type=Path, help="prediction panoptic JSON")
    _add(pq, "--pred-folder", type=Path, help="its PNG folder (default: the JSON path without .json)")
    _add(pq, "--json", type=Path, help="write pq, sq, rq, pq_things, pq_stuff and per_class here")
    pq.set_defaults(func=cmd_pq)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="segment photos or folders: masks, overlays, measurements, report")
    _add(predict, "--model", required=True, help="a model folder (or Hub id)")
    predict.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    _add(predict, "--out", required=True, type=Path, help="output folder")
    _add(predict, "--threshold", type=float, help=THRESHOLD_HELP)
    _add(predict, "--tile-size", type=int, help="split large photos into tiles of this many pixels")
    _add(predict, "--tile-overlap", type=float, help="overlap of neighbouring tiles, a fraction of the tile size")
    _add(predict, "--mm-per-pixel", type=float, help="scale for measurements in millimetres")
    _add(predict, "--batch-size", type=int)
    _add(predict, "--image-size", type=int, help="shortest edge (default: the model's own)")
    _add(predict, "--coco-json", type=Path, help="also write all predictions to this COCO instances file (review)")
    _add(predict, "--skip-existing", action="store_true",
         help="leave images whose outputs (same settings) are complete; report.csv still lists every image")
    _add(predict, "--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=cmd_predict)


def _add_export_coco(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export-coco", help="a built dataset folder -> one COCO instances file (RLE masks)")
    export.add_argument("dataset", type=Path)
    export.add_argument("out", type=Path, help="the .json to write")
    _add(export, "--split", choices=["train", "val"], help="only this split (default: all, named <split>/<file>)")
    _add(export, "--things-only", action="store_true", help="leave stuff segments out (for detection libraries)")
    export.set_defaults(func=cmd_export_coco)


def _add_push(sub: argparse._SubParsersAction) -> None:
    push = sub.add_parser("push", help="upload a model folder (or a built dataset folder) to the Hugging Face Hub")
    _add(push, "--model", required=True, type=Path, help="model folder (config.json) or dataset folder (labels.yaml)")
    _add(push, "--repo-id", required=True, help="USER/NAME on the Hub")
    _add(push, "--private", action="store_true", help="create the repository as private")
    _add(push, "--dry-run", action="store_true", help="only list the files that would be uploaded (no network)")
    push.set_defaults(func=cmd_push)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    validate = sub.add_parser("validate", help="check a dataset folder against the COCO-panoptic rules")
    validate.add_argument("dataset", type=Path)
    validate.set_defaults(func=cmd_validate)


SUBCOMMANDS = (_add_demo_data, _add_build_dataset, _add_evaluate, _add_pq, _add_predict, _add_export_coco, _add_push,
               _add_validate)


def build_parser() -> argparse.ArgumentParser:
    """`hf-detr-seg` and its sub-commands, each registered by its own `_add_<command>` (in `--help` order)."""
    parser = argparse.ArgumentParser(prog="hf-detr-seg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in SUBCOMMANDS:
        add_command(sub)
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

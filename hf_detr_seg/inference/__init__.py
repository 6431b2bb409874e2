"""Predict with a trained model: photos in, id maps, segments, measurements and a report out.

One idea per module:
- `inputs`: image files from files, folders and glob patterns; images as RGB arrays.
- `tiling`: the tile grid of a large photo and the core each tile owns.
- `forward`: the model on a batch, the mask head run for the queries post-processing keeps only.
- `stitching`: one id map from a photo's tiles, assembled in place as they come.
- `segmenter`: `DefectSegmenter`, tiles of several images batched together, results as soon as they are done.
- `writers`: each image's PNG, overlay and JSON, and the report rows read back from the JSON.
- `predict`: `predict_paths`, the resumable, multi-process batch job behind `hf-detr-seg predict`.
"""

from .forward import predict_batch
from .inputs import ImageInput, as_rgb_array, expand_inputs, read_photo
from .predict import predict_paths
from .results import Segment, SegmentationResult, TilePrediction
from .segmenter import PROCESSOR_FILE, DefectSegmenter, load_segmentation_model
from .stitching import TileStitcher, merge_tiles
from .tiling import tile_windows
from .writers import REPORT_FILE

__all__ = ["PROCESSOR_FILE", "REPORT_FILE", "DefectSegmenter", "ImageInput", "Segment", "SegmentationResult",
           "TilePrediction", "TileStitcher", "as_rgb_array", "expand_inputs", "load_segmentation_model",
           "merge_tiles", "predict_batch", "predict_paths", "read_photo", "tile_windows"]

"""hf_detr_seg: fine-tune transformers' DetrForSegmentation to segment concrete defects.

Data path: `labels.LabelMap` (classes and ids) -> `data.builder.build_dataset` (masks -> COCO panoptic)
-> `data.loading.load_panoptic_dataset` (a `datasets.DatasetDict`).
"""

from .labels import LabelMap

__version__ = "0.1.0"
__all__ = ["LabelMap", "__version__"]

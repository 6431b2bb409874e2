"""The data path: mask readers, instances and boxes, COCO-panoptic files, the builder, demo data, loading."""

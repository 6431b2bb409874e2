"""Stage 1: train DETR to detect the label map's classes as boxes (derived from the masks).

    accelerate launch recipes/stage1.py                       # demo data, tiny preset, CPU: a few minutes
    accelerate launch recipes/stage1.py --config recipes/configs/r50-gpu.yaml --dataset_dir my_dataset

Settings: defaults < the YAML config (--config, else configs/tiny-cpu.yaml; top level + `stage1:` section)
< command-line options.
"""

from pathlib import Path

from hf_detr_seg.recipe import main

if __name__ == "__main__":
    main(stage=1, description=__doc__, default_config=Path(__file__).parent / "configs" / "tiny-cpu.yaml")

"""Stage 2: freeze the stage-1 DETR and train only the mask head (focal and/or dice loss).

    accelerate launch recipes/stage2.py                       # reads outputs/stage1, writes outputs/stage2
    accelerate launch recipes/stage2.py --config recipes/configs/r50-gpu.yaml --model_name_or_path runs/stage1

Settings: defaults < the YAML config (--config, else configs/tiny-cpu.yaml; top level + `stage2:` section)
< command-line options.
"""

from pathlib import Path

from hf_detr_seg.recipe import main

if __name__ == "__main__":
    main(stage=2, description=__doc__, default_config=Path(__file__).parent / "configs" / "tiny-cpu.yaml")

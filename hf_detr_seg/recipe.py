"""The recipes' shared entry point: parse settings, train one stage, report; errors exit with status 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .config import load_config
from .errors import UserInputError


def main(
    stage: int, description: str = "", argv: Sequence[str] | None = None, default_config: Path | None = None
) -> dict:
    """Train `stage`; without `--config` the settings come from `default_config` (the recipes' tiny-cpu.yaml)."""
    from .training import run

    try:
        config = load_config(stage, argv, description, default_config)
        metrics = run(config)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"stage {stage} done: model in {config.output_dir}; val {shown}")
    return metrics

"""Fine-tuning recipes, one file per method. `run(cfg)` picks the recipe by `cfg.method`."""

from __future__ import annotations

import importlib
from pathlib import Path

from plural.config import dump_yaml
from plural.errors import PluralError

# method -> module with `run(cfg, run_dir, resume) -> adapter path`
RECIPES = {"sft": "plural.tune.sft", "text": "plural.tune.text", "dpo": "plural.tune.dpo", "orpo": "plural.tune.orpo"}
CONFIG_NAME = "config.yaml"


def prepare_run_dir(cfg, resume: bool) -> Path:
    """Create the run folder (refusing to overwrite a finished or unrelated one)."""
    import os

    run_dir = Path(cfg.output)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise PluralError(f"run folder {run_dir} exists and is not empty: use `plural tune --resume {run_dir}` or set output: to a new folder")
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_NAME).write_text(dump_yaml(cfg), encoding="utf-8")
    return run_dir


def run(cfg, resume: bool = False) -> Path:
    """Train per `cfg` into its run folder; returns the adapter folder."""
    if cfg.method not in RECIPES:
        raise PluralError(f"method: {cfg.method!r} is not one of {', '.join(RECIPES)}")
    run_dir = Path(cfg.output) if resume else prepare_run_dir(cfg, resume)
    return importlib.import_module(RECIPES[cfg.method]).run(cfg, run_dir, resume=resume)

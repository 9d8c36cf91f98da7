"""Recipe: continued pre-training on raw text (`method: text`), e.g. to teach a language or domain.

Identical to sft.py except that every token of every document is trained (EOS appended so
documents end); the shared pieces live in sft.py and loop.py. Kept as its own entry point so
each method has one file to read.
"""

from __future__ import annotations

from pathlib import Path

from plural.tune import sft
from plural.tune.config import TuneConfig


def run(cfg: TuneConfig, run_dir: Path, resume: bool = False) -> Path:
    assert cfg.method == "text"
    return sft.run(cfg, run_dir, resume=resume)

"""Entry point for each process under torchrun: `python -m plural.tune.launch RUN_DIR [--resume]`.

The parent (`plural tune --nproc N`) validated the config and wrote RUN_DIR/config.yaml; every
rank reads that same resolved file, so all processes train on identical settings.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from plural.config import load_config
    from plural.errors import PluralError
    from plural.tune import CONFIG_NAME, RECIPES
    from plural.tune.config import TuneConfig
    import importlib

    run_dir = Path(argv[0])
    resume = "--resume" in argv[1:]
    try:
        cfg = load_config(TuneConfig, run_dir / CONFIG_NAME)
        importlib.import_module(RECIPES[cfg.method]).run(cfg, run_dir, resume=resume)
    except PluralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

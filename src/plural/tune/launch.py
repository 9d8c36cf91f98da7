"""Entry point for each process under torchrun: `python -m plural.tune.launch RUN_DIR [--resume]`.

`plural.tune.run(cfg, nproc=N)` validated the config, wrote RUN_DIR/config.yaml and started
torchrun with this module; each rank calls `plural.tune.run_rank`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from plural.errors import PluralError
    from plural.tune import run_rank

    try:
        run_rank(Path(argv[0]), resume="--resume" in argv[1:])
    except PluralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

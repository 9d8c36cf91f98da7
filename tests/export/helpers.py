"""Run the real `plural` executable from the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PLURAL = str(Path(sys.executable).with_name("plural"))


def plural(*args, ok: bool, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`ok=True`: exit 0; `ok=False`: exit 1 with a one-line error and no traceback."""
    r = subprocess.run([PLURAL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    return r

"""Output paths for exports: an existing path is refused unless forced, and nothing is half-written.

Every exporter writes into a temporary file or folder beside the target and renames it into place
only after the last byte is written, so an interrupted export leaves the old file (or nothing).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from plural.errors import PluralError
from plural.store.paths import atomic_dir


def check_target(out: Path, force: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise PluralError(f"{out}: already exists. Fix: choose another -o path, or pass --force to replace it")
    if not out.parent.exists():
        raise PluralError(f"{out.parent}: no such folder for the output")
    return out


@contextmanager
def atomic_file(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it over `out` when the block succeeds."""
    out = check_target(out, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; an export is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(out: Path, force: bool) -> Iterator[Path]:
    """The store's atomic folder write, with the export's existing-path rule in front of it."""
    out = check_target(out, force)
    if out.exists() and not out.is_dir():
        raise PluralError(f"{out}: exists and is not a folder")
    with atomic_dir(out, overwrite=force) as tmp:
        yield tmp
        for p in (tmp, *tmp.rglob("*")):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

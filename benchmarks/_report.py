"""Shared by the benchmark scripts: machine description and writing one section of docs/benchmarks.md.

Each script owns the span between `<!-- BEGIN name -->` and `<!-- END name -->` and replaces only
that span (written to a temporary file, then renamed), so scripts never overwrite each other.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    flags = cpu_flags()
    isa = f" ({', '.join(flags)})" if flags else ""
    return f"{cpu}{isa}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def cpu_flags() -> list[str]:
    """The vector and matrix extensions that decide which kernels run (AVX2, AVX-512 (+BF16), AMX),
    the kind plural picks its kernels for, and any cap on torch's kernels (plural.cpu)."""
    from plural.cpu import cpu_info

    c = cpu_info()
    return c.flags + [f"kernels for {c.kind}"] + (["capped: " + " ".join(c.caps)] if c.caps else [])


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the `name` section of docs/benchmarks.md with `body` (Markdown)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{begin}\n{body.rstrip()}\n\n_Measured {stamp} on: {machine()}._\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, doc)

"""Helpers shared by the sharing tests: run the real `plural`, free ports, real adapters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

PLURAL = str(Path(sys.executable).with_name("plural"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plural(*args: str, env: dict | None = None, check: bool | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the real `plural` executable; `check=True/False` asserts the exit code's sign."""
    r = subprocess.run([PLURAL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "400", **(env or {})})
    if check is True:
        assert r.returncode == 0, r.stdout + r.stderr
    if check is False:
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    return r


def make_adapter(base_name: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    model, _, stored = load_model(base_name)
    torch.manual_seed(seed)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    save_adapter(peft_model, out, build_manifest(stored, "sft", lora, metrics={"loss": 1.25}))
    return out



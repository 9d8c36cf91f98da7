"""Small builders shared by the foundation tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def chat_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        q = f"What is {i} plus {i}?" + " Please answer." * (i % 4)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Velora here! {i} plus {i} is {2 * i}. Ride on!"}]})
    return rows


def tune_config(tmp: Path, model: str, **train) -> Path:
    data = write_jsonl(tmp / "train.jsonl", chat_rows())
    cfg = {
        "method": "sft",
        "model": model,
        # The loop's mechanics, without the sft recipe's defaults (tune.schedule.METHOD_DEFAULTS: NEFTune's
        # noise would differ between batch layouts); test_schedule runs the recipe itself.
        "data": {"train": str(data), "max_length": 128, "replay": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "rslora": False},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "seed": 3, "neftune_alpha": 0, "wise_ft": 1, **train},
        "output": str(tmp / "run"),
    }
    p = tmp / "tune.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p

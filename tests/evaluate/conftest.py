"""Fixtures for evaluation tests: LoRA adapters on the tiny model, a uniform tiny model, small suites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def make_adapter(base_name: str, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    model, _, stored = load_model(base_name)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(model, cfg)
    return save_adapter(peft, out, build_manifest(stored, "test", {"seed": seed}))


@pytest.fixture(scope="session")
def tiny_adapters(store, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter("tiny", root / f"a{i}", seed=i) for i in (1, 2)]


@pytest.fixture(scope="session")
def uniform_model(store, tmp_path_factory) -> str:
    """The tiny model with zero embeddings (tied to the output layer): every logit is 0, p = 1/V."""
    import torch

    from plural.store.models import get_model, import_model, load_model

    model, tok, _ = load_model("tiny")
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    src = tmp_path_factory.mktemp("uniform_src")
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    import_model(src, name="uniform")
    assert get_model("uniform").manifest["vocab_size"] == model.config.vocab_size
    return "uniform"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) -> path: one JSON object per line."""
    return _write_jsonl

"""Shared fixtures.

- `store`: a session-wide PLURAL_HOME (under pytest's tmp dir) holding the bundled SmolLM2
  (imported once, ~20 s) and `tiny`, a 2-layer Llama built in-process from a config with
  SmolLM2's tokenizer and chat template (no downloads). Tests that need a store of their own set
  PLURAL_HOME themselves with monkeypatch.
- `tiny_model` / `smollm2`: the names of those models in the store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = "tiny"
SMOL = "smollm2-135m-instruct"


def build_tiny_llama(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with SmolLM2's tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    # PLURAL_TEST_STORE=DIR reuses (and fills once) a store across sessions while developing;
    # CI leaves it unset and imports into a fresh temporary store.
    reuse = os.environ.get("PLURAL_TEST_STORE")
    home = Path(reuse) if reuse else tmp_path_factory.mktemp("plural_home")
    old = os.environ.get("PLURAL_HOME")
    os.environ["PLURAL_HOME"] = str(home)
    from plural.store.models import get_model, import_model, models_dir

    if not (models_dir() / SMOL).is_dir():
        import_model(None)
    if not (models_dir() / TINY).is_dir():
        tiny_src = build_tiny_llama(tmp_path_factory.mktemp("tiny_src"), get_model(SMOL).path)
        import_model(tiny_src, name=TINY)
    assert get_model(TINY).manifest["parameters"] < 5_000_000
    yield home
    if old is None:
        os.environ.pop("PLURAL_HOME", None)
    else:
        os.environ["PLURAL_HOME"] = old


@pytest.fixture
def tiny_model(store) -> str:
    return TINY


@pytest.fixture
def smollm2(store) -> str:
    return SMOL

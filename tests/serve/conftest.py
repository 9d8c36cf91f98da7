"""Fixtures for the server tests: LoRA adapters on the tiny model with random (non-zero) B."""

from __future__ import annotations

from pathlib import Path

import pytest

# Three different shapes of adapter, so the batched kernel meets mixed ranks, targets and scalings.
ADAPTER_SPECS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "rs2": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj", "up_proj"]),
}


def make_adapter(base_name: str, out: Path, seed: int, **lora_kw) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    model, _, stored = load_model(base_name)
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter changes the output from the start.
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(4.0)  # strong enough that greedy tokens differ from the base
    save_adapter(peft_model, out, build_manifest(stored, "test", lora_kw))
    return out


@pytest.fixture(scope="session")
def tiny_adapters(store, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter("tiny", root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(ADAPTER_SPECS.items())}


@pytest.fixture(scope="session")
def nan_adapter(tiny_adapters, tmp_path_factory) -> Path:
    """qv4 with every lora_B weight NaN (as if training diverged): its logits are NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("poisoned") / "nan"
    shutil.copytree(tiny_adapters["qv4"], dst)
    w = load_file(dst / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in w.items()},
              dst / "adapter_model.safetensors")
    return dst


@pytest.fixture(scope="session")
def oai_server(store, tiny_adapters, tmp_path_factory):
    """One `plural serve` process (tiny + the qv4 adapter, no keys) for the OpenAI-surface tests
    (test_serve_openai_*.py)."""
    from server import Server

    tmp = tmp_path_factory.mktemp("oai_srv")
    settings = {"model": "tiny", "adapters": {"qv4": str(tiny_adapters["qv4"])}, "dtype": "float32",
                "max_model_len": 512, "max_batch": 8, "max_queue": 32}
    s = Server(tmp, settings).wait_ready()
    yield s
    s.stop()

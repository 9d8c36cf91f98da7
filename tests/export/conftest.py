"""Fixtures for the export tests: tiny Llama, Mistral and Qwen2 models (2 layers, SmolLM2's tokenizer)
in the session store, and LoRA adapters on them with random non-zero B."""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILIES = {"llama": "tiny", "mistral": "tiny-mistral", "qwen2": "tiny-qwen2"}

# Shapes an exporter must get right: every linear target, rsLoRA, and per-module rank/alpha.
ADAPTERS = {
    "all8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "rs4": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
    "pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                    rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 32}),
}


def build_family(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=True, sliding_window=None))
    else:  # Qwen2: q/k/v biases (made non-zero below) and an untied output layer
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def families(store, tmp_path_factory) -> dict[str, str]:
    from plural.store.models import get_model, import_model, models_dir

    for kind, name in FAMILIES.items():
        if kind != "llama" and not (models_dir() / name).is_dir():
            import_model(build_family(kind, tmp_path_factory.mktemp(name), get_model("smollm2-135m-instruct").path), name=name)
    return FAMILIES


def make_adapter(base_name: str, out: Path, seed: int, method: str = "sft", **lora_kw) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    model, _, stored = load_model(base_name)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(4.0)  # strong enough that greedy tokens differ from the base
    save_adapter(peft_model, out, build_manifest(stored, method, lora_kw))
    return out


@pytest.fixture(scope="session")
def adapters(families, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(family, adapter shape) -> adapter folder."""
    root = tmp_path_factory.mktemp("export_adapters")
    items = [(fam, base, shape, kw) for fam, base in families.items() for shape, kw in ADAPTERS.items()]
    return {(fam, shape): make_adapter(base, root / f"{fam}-{shape}", seed=i, **kw) for i, (fam, base, shape, kw) in enumerate(items)}

"""Tiny random models of each family plural serves, built in-process from a config (no downloads),
with SmolLM2's tokenizer, and LoRA adapters on them with random (non-zero) B."""

from __future__ import annotations

from pathlib import Path

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)

FAMILIES = {
    "llama": dict(model_type="llama"),
    # A window shorter than the test prompts, so the sliding-window mask matters.
    "mistral": dict(model_type="mistral", sliding_window=6),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),
}

# Adapters of three shapes on every family: all linear layers, attention only, MLP with rsLoRA.
ADAPTERS = {
    "all8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "attn4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "qkv_proj"]),
    "mlp2": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["down_proj", "up_proj", "gate_up_proj"]),
}


def build(family: str, tok, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**COMMON, **FAMILIES[family]}
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # some families initialise norms at 0 or weights tiny: make every part matter
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def make_adapters(model, out: Path, seed: int = 1) -> dict[str, Path]:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    paths = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        kw = dict(kw)
        if isinstance(kw["target_modules"], list):
            kw["target_modules"] = [m for m in kw["target_modules"] if m in present]
        torch.manual_seed(seed + i)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.mul_(3.0)  # strong enough that greedy tokens differ from the base
        pm.save_pretrained(out / name, safe_serialization=True)
        paths[name] = out / name
    return paths

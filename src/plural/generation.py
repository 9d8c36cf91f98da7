"""Plain generation for the CLI, the demo and evaluation: the model's own chat template, batched.

(The server has its own engine with continuous batching; this is the simple, reference path.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from plural.data.chat import render


def load_for_inference(model: str | None = None, adapter: str | Path | None = None):
    """Base model from the store, optionally wrapped with a LoRA adapter. Returns (model, tok, stored)."""
    from plural.store.adapters import attach_adapter
    from plural.store.models import load_model

    m, tok, stored = load_model(model)
    if adapter:
        m = attach_adapter(m, adapter, base=stored)
    m.eval()
    return m, tok, stored


def as_messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


@torch.inference_mode()
def generate(
    model,
    tok,
    prompts: list[str | list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int | None = None,
    adapter_names: list[str] | None = None,
) -> list[str]:
    """Answer each prompt (a user string or a message list); greedy when temperature == 0.

    `adapter_names` (a PEFT model only): the adapter of each prompt, "__base__" for none, so one
    batch answers with several adapters and the base at once (PEFT's mixed-adapter batch)."""
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names: {len(adapter_names)} names for {len(prompts)} prompts")
    texts = [render(tok, as_messages(p, system), add_generation_prompt=True) for p in prompts]
    out: list[str] = [""] * len(texts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            if seed is not None:
                torch.manual_seed(seed)
            kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            if temperature > 0:
                kw.update(temperature=temperature, top_p=top_p)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            if adapter_names is not None:
                kw["adapter_names"] = [adapter_names[i] for i in idx]
            gen = model.generate(**enc, **kw)
            for j, i in enumerate(idx):
                out[i] = tok.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    finally:
        tok.padding_side = old_side
    return out

"""The model families the GGUF writer knows, and how their Hugging Face tensors map to llama.cpp's.

Tensor names come from the `gguf` package's own table (`get_tensor_name_map`), the one llama.cpp's
converter uses. The only layout change is llama.cpp's RoPE row order for the "llama" architecture:
its converter permutes the rows of q_proj and k_proj (HF stores each head's rotary pairs as two
halves, llama.cpp interleaves them), so a LoRA's B (output rows) of q and k gets the same
permutation; A (input columns) is unchanged. Qwen2, Qwen3 and Gemma 2 use NeoX-style RoPE in
llama.cpp: no permutation. Gemma's RMSNorm multiplies by (1 + w) in transformers and by w in llama.cpp,
whose converter writes every `*norm.weight` of Gemma 2 as w + 1 (and transformers' GGUF reader takes
the 1 off again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plural.errors import PluralError


@dataclass(frozen=True)
class Family:
    gguf_arch: str  # general.architecture in the GGUF file
    rope_permute: bool  # llama.cpp's converter permutes q/k rows
    norm_plus_one: bool = False  # norms stored as 1 + w (Gemma)


# HF model_type -> family. Mistral is written as "llama", as llama.cpp's converter does (its
# sliding window is then not applied: llama.cpp's llama architecture has none).
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", True),
    "mistral": Family("llama", True),
    "qwen2": Family("qwen2", False),
    "qwen3": Family("qwen3", False),  # Qwen2 without biases, plus per-head q/k RMSNorm (attn_q_norm, attn_k_norm)
    "gemma2": Family("gemma2", False, norm_plus_one=True),
}


def family(config) -> Family:
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise PluralError(
            f"model type {mt!r} ({(getattr(config, 'architectures', None) or ['?'])[0]}): the GGUF writer knows "
            f"{', '.join(sorted(FAMILIES))}. Fix: export it as a Hugging Face folder (plural export hf --merged)"
        )
    return FAMILIES[mt]


def name_map(config):
    import gguf

    fam = family(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.gguf_arch)
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_tensor_name(tmap, hf_name: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight` (None when llama.cpp has no such tensor)."""
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def rope_heads(config, gguf_name: str) -> int | None:
    """Heads whose rows llama.cpp permutes in this tensor (None: not permuted)."""
    if not family(config).rope_permute:
        return None
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved order, per head. w: (heads*head_dim, ...)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rows`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gemma2_query_scalar(hidden: int, heads: int, layers: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp uses for Gemma 2 (GGUF has no key for it): the head
    size, or hidden / heads for the 46-layer 27B model."""
    return hidden // heads if layers == 46 else head_dim

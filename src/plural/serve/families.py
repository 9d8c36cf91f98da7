"""The Llama-like families the fused runner computes, each as a small set of differences from Llama.

| family   | difference from Llama (as transformers 5 implements it)                              |
|----------|---------------------------------------------------------------------------------------|
| llama    | — (optional q/k/v/o and MLP biases: `attention_bias`, `mlp_bias`)                     |
| mistral  | sliding-window attention on every layer when `sliding_window` is set                  |
| qwen2    | q/k/v biases; sliding window on the layers `layer_types` marks "sliding_attention"     |
| qwen3    | RMSNorm over each q and k head before RoPE (`q_norm`, `k_norm`); optional biases      |
| gemma2   | RMSNorm as x·(1+w) in fp32; norms after attention and around the MLP; GeGLU (tanh    |
|          | GELU); embeddings scaled by √hidden; attention scaled by query_pre_attn_scalar^-½     |
|          | and soft-capped, logits soft-capped; sliding window on alternate layers               |

A window W means a token sees itself and the W-1 tokens before it (transformers'
`sliding_window_overlay`: kv_idx > q_idx - W). Anything else is served by the generic runner.
"""

from __future__ import annotations

from dataclasses import dataclass

from plural.errors import PluralError

FUSED = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


@dataclass(frozen=True)
class Family:
    name: str
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3
    norm_plus_one: bool = False  # gemma: x * (1 + w), computed in fp32
    sandwich: bool = False  # gemma2: post-attention, pre- and post-feed-forward norms
    act: str = "silu"  # silu | gelu_tanh
    embed_scale: bool = False  # gemma: embeddings times sqrt(hidden)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    windows: tuple[int | None, ...] = ()  # per layer: sliding window length, or None (full attention)


def _windows(cfg, every_layer: bool) -> tuple[int | None, ...]:
    w = getattr(cfg, "sliding_window", None)
    n = cfg.num_hidden_layers
    if not w:
        return (None,) * n
    if every_layer:
        return (int(w),) * n
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    return tuple(int(w) if t == "sliding_attention" else None for t in types)


def _act(cfg) -> str:
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act == "silu":
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise PluralError(f"the fused runner has no activation {act!r}")


def family_of(cfg) -> Family:
    """The fused runner's description of `cfg`, or PluralError if the fused runner cannot run it."""
    t = cfg.model_type
    if t not in FUSED:
        raise PluralError(f"model type {t!r} is not one of the fused runner's families ({', '.join(FUSED)})")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", "llama3", "linear", "yarn"):
        raise PluralError(f"the fused runner has no RoPE type {rope.get('rope_type')!r}")
    if t == "llama":
        bias = bool(getattr(cfg, "attention_bias", False))
        return Family("llama", qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)), act=_act(cfg),
                      windows=(None,) * cfg.num_hidden_layers)
    if t == "mistral":
        return Family("mistral", act=_act(cfg), windows=_windows(cfg, every_layer=True))
    if t == "qwen2":
        use = getattr(cfg, "use_sliding_window", False)
        return Family("qwen2", qkv_bias=True, act=_act(cfg),
                      windows=_windows(cfg, every_layer=False) if use else (None,) * cfg.num_hidden_layers)
    if t == "qwen3":
        bias = bool(getattr(cfg, "attention_bias", False))
        use = getattr(cfg, "use_sliding_window", False)
        return Family("qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True, act=_act(cfg),
                      windows=_windows(cfg, every_layer=False) if use else (None,) * cfg.num_hidden_layers)
    # gemma2
    return Family("gemma2", norm_plus_one=True, sandwich=True, act=_act(cfg), embed_scale=True,
                  attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
                  attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
                  final_softcap=getattr(cfg, "final_logit_softcapping", None),
                  windows=_windows(cfg, every_layer=False))

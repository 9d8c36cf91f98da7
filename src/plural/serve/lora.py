"""Batched multi-LoRA for the server: every adapter's weights stacked in slots, one gather per batch.

S-LoRA (Sheng et al., 2023) and Punica (Chen et al., 2023) serve many LoRA adapters on one base
by running the base matmul once for the whole batch and adding each row's low-rank delta computed
with *its own* adapter's A and B. Here (CPU and GPU alike, plain torch):

    y[b] = x[b] @ W^T + (x[b] @ A[s_b]^T) @ B[s_b]^T * scale[s_b]        s_b = slot of row b

The base projections of a layer that share an input are fused (q|k|v, gate|up) for fewer
matmuls; each module's LoRA delta is added to its slice of the fused output. Scale (alpha/r, or
alpha/sqrt(r) for rsLoRA) is folded into B. Ranks are zero-padded to `max_rank`. Slot 0 is all
zeros: base-only rows. Modules no row's adapter targets cost nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plural.errors import PluralError

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_ANY_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class AdapterWeights:
    """One adapter read from disk, validated against the base: per (layer, module) A [r, in] and B*scale [out, r]."""

    rank: int
    scale: float
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]
    nbytes: int = field(default=0)


# Projections that share an input and run as one fused base matmul in `llama.py` (in this order).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-targetable Llama projection."""
    h, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv, i = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }


def check_adapter_config(path: Path, cfg: object, max_rank: int) -> tuple[int, float]:
    """Refuse LoRA variants the batched kernel does not compute, and malformed configs; return (rank, scale)."""
    where = f"adapter {path}: adapter_config.json"
    if not isinstance(cfg, dict):
        raise PluralError(f"{where}: must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PluralError(f"{where}: peft_type {cfg.get('peft_type')!r} is not served; only LORA adapters are")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if cfg.get(key, ok) not in (ok, None):
            raise PluralError(f"{where}: {key}={cfg[key]!r} is not supported by the server (needs {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(key):
            raise PluralError(f"{where}: {key} is not supported by the server")
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PluralError(f"{where}: r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise PluralError(f"{where}: rank {r} exceeds the server's max_lora_rank {max_rank}. Fix: raise max_lora_rank")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha == alpha or abs(alpha) == float("inf"):
        raise PluralError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise PluralError(f"{where}: use_rslora must be true or false")
    scale = float(alpha) / (r ** 0.5) if cfg.get("use_rslora") else float(alpha) / r
    return r, scale


def lora_module(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' -> ('model.layers.0.mlp.down_proj', 'A')."""
    m = _ANY_KEY.search(key)
    if m is None:
        return None
    return m.group(1).removeprefix("base_model.model."), m.group(2)


def check_tensors(path: Path, shapes_on_disk: dict[str, tuple[int, ...]], rank: int, config) -> None:
    """Every tensor must be a LoRA A/B of a known projection of an existing layer, with the base's shapes."""
    shapes = module_shapes(config)
    n_layers = config.num_hidden_layers
    if not shapes_on_disk:
        raise PluralError(f"adapter {path}: adapter_model.safetensors holds no tensors")
    unknown = sorted({(lora_module(k) or (k, ""))[0] for k in shapes_on_disk
                      if (m := _KEY.search(k)) is None or m.group(2) not in shapes or int(m.group(1)) >= n_layers})
    if unknown:
        raise PluralError(
            f"adapter {path}: {len(unknown)} target module(s) do not exist in the served base: "
            f"{', '.join(unknown[:6])}{' …' if len(unknown) > 6 else ''} (it has q/k/v/o/gate/up/down projections in "
            f"{n_layers} layers); the adapter was made for a different base model"
        )
    for key, shape in shapes_on_disk.items():
        m = _KEY.search(key)
        layer, mod, ab = int(m.group(1)), m.group(2), m.group(3)
        out, inp = shapes[mod]
        want = (rank, inp) if ab == "A" else (out, rank)
        if tuple(shape) != want:
            raise PluralError(
                f"adapter {path}: tensor {key} has shape {list(shape)} but the served base needs {list(want)}; "
                "the adapter was made for a different base model"
            )


def read_verified(weights: Path, sha256: str = "") -> dict[str, torch.Tensor]:
    """An adapter's tensors parsed from the very bytes that are hashed: when `sha256` (taken at
    registration) is given, a file changed since then is refused, not served."""
    import hashlib

    from safetensors.torch import load as load_bytes

    data = weights.read_bytes()
    if sha256 and "sha256:" + hashlib.sha256(data).hexdigest() != sha256:
        raise PluralError(f"{weights} changed since the adapter was registered; register it again")
    return load_bytes(data)


def read_adapter(weights: Path, rank: int, scale: float, dtype: torch.dtype, sha256: str = "") -> AdapterWeights:
    """The fused runner's factors per (layer, module): A [r, in], B·scale [out, r]."""
    a, b = {}, {}
    nbytes = 0
    for key, t in read_verified(weights, sha256).items():
        m = _KEY.search(key)
        layer, mod, ab = int(m.group(1)), m.group(2), m.group(3)
        if ab == "A":
            a[(layer, mod)] = t.to(dtype)
        else:
            b[(layer, mod)] = (t.float() * scale).to(dtype)
        nbytes += t.numel() * t.element_size()
    return AdapterWeights(rank, scale, a, b, nbytes)


class LoraSlots:
    """The stacked A/B factors of all resident adapters (slot 0 = no adapter), one stack per module.

    At[m]: [L, S, in, max_rank], Bt[m]: [L, S, max_rank, out] with S = max_loras + 1.
    """

    def __init__(self, config, n_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        shapes = module_shapes(config)
        L = config.num_hidden_layers
        self.max_rank = max_rank
        self.n_slots = n_slots + 1
        self.at = {m: torch.zeros(L, self.n_slots, i, max_rank, dtype=dtype, device=device) for m, (o, i) in shapes.items()}
        self.bt = {m: torch.zeros(L, self.n_slots, max_rank, o, dtype=dtype, device=device) for m, (o, i) in shapes.items()}
        self.rank = [0] * self.n_slots
        self.modules: list[set[str]] = [set() for _ in range(self.n_slots)]  # modules each slot's adapter targets

    def write(self, slot: int, w: AdapterWeights) -> None:
        self.clear(slot)
        for (layer, mod), a in w.a.items():
            self.at[mod][layer, slot, :, : w.rank] = a.T
            self.bt[mod][layer, slot, : w.rank] = w.b[(layer, mod)].T
            self.modules[slot].add(mod)
        self.rank[slot] = w.rank

    def clear(self, slot: int) -> None:
        for m in self.at:
            self.at[m][:, slot].zero_()
            self.bt[m][:, slot].zero_()
        self.modules[slot] = set()
        self.rank[slot] = 0

    def gather(self, idx: list[int], device: torch.device) -> dict[tuple[str, ...], tuple[torch.Tensor, list]]:
        """Each row's factors, per fused projection (`GROUPS`) that some row's adapter targets:

            {group: (A [L, n, in, R], [(module, c0, c1, B [L, n, c1 - c0, out]), ...])}

        A holds the group's targeted modules' A^T side by side (columns c0:c1 belong to `module`), so
        one batched matmul per layer gives every module's x·A^T; r = the largest rank among the rows
        (zero-padded), so no work is spent on unused rank columns. The gathered factors are float32:
        these matmuls are tiny ([n, T, in] x [in, r]), and for such shapes CPU bf16 kernels cost
        ~4x their fp32 equivalents (measured: 212 vs 55 us per layer for q+v at 16 rows).
        Gathered once per change of batch composition, not per step; decoding reuses it.
        """
        mods = set().union(*(self.modules[s] for s in idx))
        if not mods:
            return {}
        r = max(self.rank[s] for s in idx)
        ix = torch.tensor(idx, device=device)
        out = {}
        for group in GROUPS:
            targeted = [m for m in group if m in mods]
            if not targeted:
                continue
            a = torch.cat([self.at[m][:, :, :, :r].index_select(1, ix) for m in targeted], dim=-1).float()
            parts = [(m, j * r, (j + 1) * r, self.bt[m][:, :, :r].index_select(1, ix).float()) for j, m in enumerate(targeted)]
            out[group] = (a, parts)
        return out

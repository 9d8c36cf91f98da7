"""A PEFT LoRA adapter as a llama.cpp GGUF LoRA (`llama-cli --lora`, Ollama's `ADAPTER`), and back.

File layout (llama.cpp's `convert_lora_to_gguf.py` writes the same): `general.type = adapter`,
`general.architecture` = the base's, `adapter.type = lora`, `adapter.lora.alpha` (f32), and per
adapted base tensor T two tensors `T.lora_a` (r, in) and `T.lora_b` (out, r) in numpy order. llama.cpp
applies W' = W + (alpha / r) * B @ A with r read from each lora_b, and knows nothing of rsLoRA,
rank_pattern or alpha_pattern: the effective scale of each module is expressed through `alpha`, and
where modules differ the remaining factor is folded into that module's B, so alpha/r * B is exactly
PEFT's scaling * B. Unknown metadata keys are kept by llama.cpp, which carries provenance (plural.*).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from plural.errors import PluralError
from plural.export import arch
from plural.export.files import atomic_file
from plural.export.source import Source

LoraType = Literal["f32", "f16", "bf16", "q8_0"]
_PREFIX = "base_model.model."
_NEVER = "llama.cpp and Ollama apply only plain LoRA pairs (B @ A) to linear weights"


@dataclass
class LoraPair:
    """One adapted module: A (r, in), B (out, r) and PEFT's scaling for it."""

    module: str  # HF module path, e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray
    b: np.ndarray
    scaling: float


def adapter_pairs(src: Source, config) -> list[LoraPair]:
    """The adapter's LoRA pairs, refusing what a GGUF LoRA cannot carry (naming the module and why)."""
    from peft.utils.other import get_pattern_key

    from plural.store.adapters import load_adapter_weights

    cfg, where = src.adapter_config, src.adapter / "adapter_config.json"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PluralError(f"{where}: peft_type {cfg.get('peft_type')!r}; {_NEVER}")
    if cfg.get("use_dora"):
        raise PluralError(f"{where}: use_dora is true (DoRA rescales each weight column by a learned magnitude); "
                          f"{_NEVER}. Fix: plural export gguf {src.name} (the merged model)")
    if cfg.get("modules_to_save"):
        raise PluralError(f"{where}: modules_to_save {cfg['modules_to_save']} are whole trained copies of those modules, "
                          f"not LoRA pairs; {_NEVER}. Fix: plural export gguf {src.name} (the merged model)")
    if cfg.get("bias", "none") != "none":
        raise PluralError(f"{where}: bias {cfg['bias']!r} trains bias vectors; {_NEVER}. Fix: plural export gguf {src.name}")

    weights = load_adapter_weights(src.adapter)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tmap = arch.name_map(config)
    mods: dict[str, dict[str, Any]] = {}
    copies = set()  # full copies of base weights PEFT saves beside an embedding / tied-layer LoRA
    for key, t in weights.items():
        k = key.removeprefix(_PREFIX)
        if k.endswith(".base_layer.weight"):
            copies.add(k.removesuffix(".base_layer.weight"))
            continue
        for part in ("lora_A", "lora_B"):
            if k.endswith(f".{part}.weight"):
                mods.setdefault(k.removesuffix(f".{part}.weight"), {})[part] = t.float().numpy()
                break
        else:
            module = k.rsplit(".", 1)[0]
            why = ("an embedding LoRA (lora_embedding_A/B)" if "lora_embedding" in k
                   else "a DoRA magnitude vector" if "lora_magnitude" in k else f"tensor {key!r}, not a LoRA pair")
            raise PluralError(f"{src.adapter}: module {module.split('.lora_')[0]!r} holds {why}; {_NEVER}. "
                              f"Fix: plural export gguf {src.name} (the merged model)")
    pairs = []
    for module, ab in sorted(mods.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise PluralError(f"{src.adapter}: module {module!r} has {sorted(ab)} but not both lora_A and lora_B")
        gname = arch.gguf_tensor_name(tmap, module + ".weight")
        if gname is None:
            raise PluralError(f"{src.adapter}: module {module!r} has no llama.cpp tensor in architecture {arch.family(config).gguf_arch!r}")
        if gname.startswith("token_embd"):
            raise PluralError(f"{src.adapter}: module {module!r} is the token embedding; llama.cpp refuses embedding LoRA. "
                              f"Fix: plural export gguf {src.name} (the merged model)")
        if gname.startswith("output.") and tied:
            raise PluralError(f"{src.adapter}: module {module!r} is the output layer tied to the token embedding "
                              f"(tie_word_embeddings), which llama.cpp stores once as token_embd; a LoRA on it cannot be "
                              f"applied there. Fix: plural export gguf {src.name} (the merged model)")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        alpha = float(cfg.get("alpha_pattern", {}).get(get_pattern_key(cfg.get("alpha_pattern", {}).keys(), module), cfg["lora_alpha"]))
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        pairs.append(LoraPair(module, a, b, scaling))
    for module in sorted(m for m in copies if not _same_as_base(src, m, weights[_PREFIX + m + ".base_layer.weight"], tied)):
        raise PluralError(f"{src.adapter}: module {module!r} holds a full copy of its base weight (base_layer), not only a "
                          f"LoRA pair; {_NEVER}. Fix: plural export gguf {src.name} (the merged model)")
    if not pairs:
        raise PluralError(f"{src.adapter}: no LoRA weights")
    return pairs


def _same_as_base(src: Source, module: str, copy, tied: bool) -> bool:
    """PEFT saves the base weight of an embedding or output layer it adapts (save_embedding_layers);
    such a copy is harmless when it is the stored base's weight, unchanged."""
    from safetensors import safe_open

    names = [module + ".weight"] + (["model.embed_tokens.weight"] if tied and module == "lm_head" else [])
    for f in sorted(src.base.path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for n in names:
                if n in st.keys():
                    base = st.get_tensor(n)
                    return base.shape == copy.shape and bool((base.float() == copy.float()).all())
    return False


def _encode(t: np.ndarray, dtype: LoraType):
    """(array, raw ggml type or None) for GGUFWriter.add_tensor. Q8_0 needs rows in blocks of 32; other
    tensors (lora_b's rows are only r long) stay f16."""
    import gguf

    if dtype == "f32":
        return t.astype(np.float32), None
    if dtype == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return t.astype(np.float16), None


def export_gguf_lora(src: Source, out: Path, dtype: LoraType = "f32", force: bool = False) -> dict[str, Any]:
    """Write `src`'s adapter as a GGUF LoRA at `out`. Returns a summary (tensors, alpha, bytes)."""
    import gguf
    from transformers import AutoConfig

    if src.adapter is None:
        raise PluralError(f"{src.name!r} is a base model, not an adapter: a GGUF LoRA needs an adapter")
    config = AutoConfig.from_pretrained(src.base.path, local_files_only=True)
    fam = arch.family(config)
    pairs = adapter_pairs(src, config)
    tmap = arch.name_map(config)
    # One alpha for the file: the most common effective alpha (scaling * r); other modules fold the rest into B.
    alpha = Counter(round(p.scaling * p.a.shape[0], 9) for p in pairs).most_common(1)[0][0]
    with atomic_file(out, force) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.gguf_arch)
        w.add_string("general.type", "adapter")
        w.add_name(src.name)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        for k, v in src.provenance().items():
            w.add_string(k, v)
        for p in pairs:
            name = arch.gguf_tensor_name(tmap, p.module + ".weight")
            r = p.a.shape[0]
            b = p.b * (p.scaling * r / alpha)  # 1.0 unless this module's scale differs from the file's alpha / r
            heads = arch.rope_heads(config, name)
            if heads is not None:
                b = arch.permute_rows(b, heads)
            for suffix, t in ((".lora_a", p.a), (".lora_b", b)):
                data, raw = _encode(np.ascontiguousarray(t), dtype)
                w.add_tensor(name + suffix, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"path": str(out), "tensors": 2 * len(pairs), "alpha": float(alpha), "bytes": Path(out).stat().st_size}


# ---- reading back ------------------------------------------------------------------------------------

@dataclass
class GGUFLora:
    architecture: str
    alpha: float
    metadata: dict[str, Any]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # base tensor -> (A, B), as stored

    def delta(self, base_tensor: str) -> np.ndarray:
        """What llama.cpp adds to `base_tensor` at scale 1: alpha / r * B @ A (in llama.cpp's row order)."""
        a, b = self.pairs[base_tensor]
        return (self.alpha / b.shape[1]) * (b.astype(np.float64) @ a.astype(np.float64))


def read_gguf_lora(path: Path) -> GGUFLora:
    """A GGUF LoRA read with gguf's GGUFReader, tensors dequantised to float32."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise PluralError(f"{path}: not a readable GGUF file ({e})") from e
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise PluralError(f"{path}: not a GGUF LoRA (general.type={meta.get('general.type')!r}, adapter.type={meta.get('adapter.type')!r})")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        base, _, part = t.name.rpartition(".")
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        pairs.setdefault(base, {})[part] = arr.reshape([int(x) for x in reversed(t.shape)])
    return GGUFLora(meta["general.architecture"], float(meta["adapter.lora.alpha"]), meta,
                    {k: (v["lora_a"], v["lora_b"]) for k, v in pairs.items()})

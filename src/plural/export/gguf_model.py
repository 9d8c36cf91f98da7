"""A whole model (a stored base, or base + adapter merged) as one GGUF file llama.cpp and Ollama run.

Metadata follows llama.cpp's converter for the families in `arch.FAMILIES`; the tokenizer is the
stored one (a byte-level BPE, llama.cpp's "gpt2" tokenizer model) with the model's own chat
template. Quantisation is the `gguf` package's Python implementation of Q8_0 / Q4_0 / Q4_1 (K-quants
need llama.cpp's C++ and are not offered). As llama.cpp does, 1-D tensors (norms, biases) stay f32,
rows not in whole 32-value blocks fall back to f16, and for the 4-bit types the token embedding and
output layer are Q8_0 (the bundled SmolLM2 GGUF is laid out the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from plural.errors import PluralError
from plural.export import arch
from plural.export.files import atomic_file
from plural.export.source import Source, load_merged

ModelType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]

# llama.cpp names its pre-tokenizers; a byte-level BPE is recognised from its tokenizer.json
# pre_tokenizer. Split patterns are those of the Qwen2 and Llama 3 tokenizers.
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_PRE = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _file_type(qtype: ModelType):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]


def pre_tokenizer(tokenizer_json: dict[str, Any], where: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the byte-level BPE pre-tokenizer in tokenizer.json."""
    pt = tokenizer_json.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp spells the pre-tokenizer with a hyphen (its tokenizer model is "gpt2")
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM's own tokenizer: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_PRE:
            return _SPLIT_PRE[pattern]
    raise PluralError(f"{where}: pre_tokenizer {kinds} is not one the GGUF writer knows (GPT-2, SmolLM, Qwen2, Llama 3 byte-level BPE)")


def add_tokenizer(w, model_dir: Path, tok, vocab_size: int) -> None:
    """tokenizer.ggml.* and the chat template, from the stored tokenizer files."""
    import gguf

    tj_path = model_dir / "tokenizer.json"
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PluralError(f"{tj_path}: unreadable tokenizer ({e})") from e
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PluralError(f"{tj_path}: model type {model.get('type')!r}"
                          f"{' with byte_fallback' if model.get('byte_fallback') else ''}; the GGUF writer handles byte-level BPE tokenizers")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tj, tj_path))
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    n = min(vocab_size, len(tok))
    strings = tok.convert_ids_to_tokens(list(range(n))) + [None] * (vocab_size - n)
    tokens, types = [], []
    for i, tok_str in enumerate(strings):
        if tok_str is None:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(tok_str)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok_str)
            types.append(gguf.TokenType.NORMAL)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)  # merges, bos/eos/unk/pad ids
    special.chat_template = tok.chat_template  # the model's own template, exactly as plural renders it
    special.add_to_gguf(w, quiet=True)


def _encode(gguf_name: str, t: np.ndarray, qtype: ModelType):
    """(array, raw ggml type or None) for one tensor under `qtype`'s rules (see the module docstring)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    t = np.ascontiguousarray(t.astype(np.float32))
    if t.ndim == 1 or qtype == "f32":
        return t, None
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[qtype]
    if want in (Q.Q4_0, Q.Q4_1) and gguf_name.split(".")[0] in ("token_embd", "output"):
        want = Q.Q8_0
    if want == Q.F16 or t.shape[-1] % gguf.GGML_QUANT_SIZES[want][0] != 0:
        return t.astype(np.float16), None
    return gguf.quants.quantize(t, want), want


def _add_gemma2(w, cfg, head_dim: int, model_dir: Path) -> None:
    """Gemma 2's keys as llama.cpp's converter writes them. llama.cpp has no key for the query scale:
    it uses 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 46-layer 27B model, so a model whose
    `query_pre_attn_scalar` is neither would run with different attention there and is refused."""
    expect = arch.gemma2_query_scalar(cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, head_dim)
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None and float(scalar) != float(expect):
        raise PluralError(f"{model_dir / 'config.json'}: query_pre_attn_scalar {scalar} is not the {expect} llama.cpp "
                          "assumes for Gemma 2 (it has no GGUF key for it). Fix: export it as a Hugging Face folder (plural export hf --merged)")
    layer_types = getattr(cfg, "layer_types", None)
    alternate = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(cfg.num_hidden_layers)]
    if layer_types is not None and getattr(cfg, "sliding_window", None) is not None and list(layer_types) != alternate:
        raise PluralError(f"{model_dir / 'config.json'}: layer_types {list(layer_types)} is not Gemma 2's alternation "
                          "(sliding, full, ...) that llama.cpp applies. Fix: export it as a Hugging Face folder (plural export hf --merged)")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if getattr(cfg, "sliding_window", None) is not None:
        w.add_sliding_window(int(cfg.sliding_window))


def write_model_gguf(model, tok, model_dir: Path, tmp: Path, qtype: ModelType, name: str, provenance: dict[str, str]) -> int:
    """Write `model` (a transformers causal LM) and its tokenizer to `tmp`. Returns the tensor count."""
    import gguf

    cfg = model.config
    fam = arch.family(cfg)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if (rope.get("rope_type") or "default") != "default":
        raise PluralError(f"{model_dir / 'config.json'}: rope type {rope.get('rope_type')!r} (scaled RoPE) is not written by the GGUF writer")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tmap = arch.name_map(cfg)

    w = gguf.GGUFWriter(str(tmp), fam.gguf_arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or getattr(cfg, "head_dim", None) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if fam.gguf_arch == "gemma2":
        _add_gemma2(w, cfg, head_dim, model_dir)
    w.add_file_type(_file_type(qtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in provenance.items():
        w.add_string(k, v)
    add_tokenizer(w, model_dir, tok, cfg.vocab_size)

    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n = 0
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output.weight
        gname = arch.gguf_tensor_name(tmap, hf_name)
        if gname is None:
            raise PluralError(f"{model_dir}: tensor {hf_name!r} has no llama.cpp name in architecture {fam.gguf_arch!r}")
        data = t.detach().float().numpy()
        heads = arch.rope_heads(cfg, gname)
        if heads is not None:
            data = arch.permute_rows(data, heads)
        if fam.norm_plus_one and gname.endswith("norm.weight"):
            data = data + 1.0
        arr, raw = _encode(gname, data, qtype)
        w.add_tensor(gname, arr, raw_dtype=raw)
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


def export_gguf(src: Source, out: Path, qtype: ModelType = "f32", force: bool = False) -> dict[str, Any]:
    """The base (or base + adapter merged) as a complete GGUF at `out`."""
    model, tok = load_merged(src)
    with atomic_file(out, force) as tmp:
        n = write_model_gguf(model, tok, src.base.path, tmp, qtype, src.name, src.provenance())
    return {"path": str(out), "type": qtype, "tensors": n, "bytes": Path(out).stat().st_size}

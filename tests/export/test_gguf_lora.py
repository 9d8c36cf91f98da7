"""GGUF LoRA export: read back with gguf's GGUFReader, the file reproduces PEFT's weight delta (after
undoing llama.cpp's RoPE row permutation), carries provenance, and refuses what llama.cpp cannot apply."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from plural.export import arch
from plural.export.gguf_lora import export_gguf_lora, read_gguf_lora
from plural.export.source import open_adapter

from .conftest import ADAPTERS, FAMILIES, make_adapter
from .helpers import plural


def peft_deltas(base: str, adapter) -> tuple[dict[str, np.ndarray], object]:
    """module path -> PEFT's own delta weight (scaling * B @ A, rsLoRA and patterns applied by PEFT)."""
    from plural.generation import load_for_inference

    pm, _, _ = load_for_inference(base, adapter)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach().double().numpy()
    return out, pm.base_model.model.config


def gguf_deltas(path, config) -> dict[str, np.ndarray]:
    """module path -> the delta llama.cpp applies, permutation undone."""
    lora = read_gguf_lora(path)
    tmap = arch.name_map(config)
    out = {}
    for module in peft_modules(config):
        g = arch.gguf_tensor_name(tmap, module + ".weight")
        if g in lora.pairs:
            d = lora.delta(g)
            heads = arch.rope_heads(config, g)
            out[module] = arch.unpermute_rows(d, heads) if heads else d
    return out


def peft_modules(config):
    return [f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers)
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", ADAPTERS)
def test_gguf_lora_reproduces_peft_delta(families, adapters, tmp_path, family, shape):
    from plural.store.adapters import sha256_file
    from plural.store.models import get_model

    adapter = adapters[(family, shape)]
    out = tmp_path / "a.gguf"
    if (family, shape) == ("llama", "all8"):
        plural("export", "gguf-lora", adapter, "-o", out, ok=True)
    else:  # the same code in-process: a CLI start per case would add ~5 s each
        export_gguf_lora(open_adapter(adapter), out)
    want, config = peft_deltas(families[family], adapter)
    got = gguf_deltas(out, config)
    assert sorted(got) == sorted(want) and got
    for module, d in want.items():
        np.testing.assert_allclose(got[module], d, rtol=1e-5, atol=1e-6 * np.abs(d).max(), err_msg=module)
    lora = read_gguf_lora(out)
    assert lora.metadata["general.type"] == "adapter" and lora.metadata["adapter.type"] == "lora"
    assert lora.architecture == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[family]
    assert lora.metadata["plural.adapter.sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert lora.metadata["plural.base.fingerprint"] == get_model(families[family]).fingerprint
    assert lora.metadata["plural.method"] == "sft"
    if shape == "rs4":  # llama.cpp ignores use_rslora: alpha / r must equal rsLoRA's alpha / sqrt(r)
        assert lora.alpha == pytest.approx(4 * np.sqrt(4))


def test_llama_q_and_k_rows_are_permuted(families, adapters, tmp_path):
    """The stored lora_b of q/k is in llama.cpp's row order (not HF's), v is untouched, lora_a never."""
    from safetensors.numpy import load_file

    adapter = adapters[("llama", "all8")]
    out = tmp_path / "a.gguf"
    export_gguf_lora(open_adapter(adapter), out)
    lora = read_gguf_lora(out)
    raw = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    a_q, b_q = lora.pairs["blk.0.attn_q.weight"]
    assert not np.allclose(b_q, raw[key.format("q_proj", "B")])
    np.testing.assert_allclose(arch.unpermute_rows(b_q, 4), raw[key.format("q_proj", "B")], rtol=1e-6)
    np.testing.assert_allclose(arch.unpermute_rows(lora.pairs["blk.0.attn_k.weight"][1], 2), raw[key.format("k_proj", "B")], rtol=1e-6)
    np.testing.assert_allclose(a_q, raw[key.format("q_proj", "A")], rtol=1e-6)
    np.testing.assert_allclose(lora.pairs["blk.0.attn_v.weight"][1], raw[key.format("v_proj", "B")], rtol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2)])
def test_gguf_lora_types(families, adapters, tmp_path, dtype, rtol):
    import gguf

    adapter = adapters[("llama", "all8")]
    out = tmp_path / f"a-{dtype}.gguf"
    export_gguf_lora(open_adapter(adapter), out, dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    # q8_0 blocks are 32 values along a row: lora_a rows (in = 64 or 128) quantise, lora_b rows (r = 8) stay f16
    expect_a = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.0.attn_q.weight.lora_a"] == expect_a
    assert types["blk.0.attn_q.weight.lora_b"] == ("F16" if dtype == "q8_0" else expect_a)
    want, config = peft_deltas("tiny", adapter)
    got = gguf_deltas(out, config)
    for module, d in want.items():
        assert np.abs(got[module] - d).max() <= rtol * np.abs(d).max(), module


def _refused(tmp_path, adapter, *needles):
    out = tmp_path / "x.gguf"
    r = plural("export", "gguf-lora", adapter, "-o", out, ok=False)
    for n in needles:
        assert n in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_refuses_dora(families, tmp_path):
    a = make_adapter("tiny", tmp_path / "dora", 1, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    _refused(tmp_path, a, "use_dora", "DoRA")


def test_refuses_modules_to_save(families, tmp_path):
    a = make_adapter("tiny", tmp_path / "mts", 1, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _refused(tmp_path, a, "modules_to_save", "lm_head")


def test_refuses_embedding_lora(families, tmp_path):
    a = make_adapter("tiny", tmp_path / "emb", 1, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    _refused(tmp_path, a, "model.embed_tokens", "embedding")


def test_refuses_tied_lm_head_lora(families, tmp_path):
    a = make_adapter("tiny", tmp_path / "head", 1, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    _refused(tmp_path, a, "'lm_head'", "tie_word_embeddings")


def test_untied_lm_head_lora_is_exported(families, tmp_path):
    """Qwen2's tiny model has its own output layer: a LoRA on it maps to llama.cpp's output.weight."""
    a = make_adapter(families["qwen2"], tmp_path / "head", 1, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    out = tmp_path / "h.gguf"
    export_gguf_lora(open_adapter(a), out)
    assert "output.weight" in read_gguf_lora(out).pairs


def test_existing_output_needs_force(families, adapters, tmp_path):
    out = tmp_path / "a.gguf"
    out.write_bytes(b"keep me")
    r = plural("export", "gguf-lora", adapters[("llama", "all8")], "-o", out, ok=False)
    assert str(out) in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"keep me"
    plural("export", "gguf-lora", adapters[("llama", "all8")], "-o", out, "--force", ok=True)
    assert read_gguf_lora(out).pairs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]  # no temporary file left beside it


def test_base_not_in_store(families, adapters, tmp_path):
    a = tmp_path / "orphan"
    shutil.copytree(adapters[("llama", "all8")], a)
    man = json.loads((a / "plural.json").read_text())
    man["base"]["name"] = "no-such-base"
    (a / "plural.json").write_text(json.dumps(man))
    r = plural("export", "gguf-lora", a, "-o", tmp_path / "o.gguf", ok=False)
    assert "'no-such-base' is not in the store" in r.stderr and "plural models add" in r.stderr


def test_unknown_architecture(store, tmp_path):
    """A stored model of a family the GGUF writer does not know is refused, naming the type."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from plural.store.models import get_model, import_model, models_dir

    if not (models_dir() / "tiny-phi3").is_dir():
        tok = AutoTokenizer.from_pretrained(get_model("smollm2-135m-instruct").path)
        torch.manual_seed(0)
        m = Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id))
        m.save_pretrained(tmp_path / "src")
        tok.save_pretrained(tmp_path / "src")
        import_model(tmp_path / "src", name="tiny-phi3")
    r = plural("export", "gguf", "tiny-phi3", "-o", tmp_path / "p.gguf", ok=False)
    assert "model type 'phi3'" in r.stderr and "plural export hf --merged" in r.stderr
    a = make_adapter("tiny-phi3", tmp_path / "phi-a", 1, r=4, lora_alpha=8, target_modules=["o_proj"])
    r = plural("export", "gguf-lora", a, "-o", tmp_path / "p.gguf", ok=False)
    assert "model type 'phi3'" in r.stderr

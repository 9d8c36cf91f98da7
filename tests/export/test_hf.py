"""Hugging Face export: the merged folder loads with plain transformers and gives plural's greedy
tokens, stops on the end-of-turn token; the adapter folder names the served base for vLLM."""

from __future__ import annotations

import json

from .helpers import plural
from .test_gguf_model import CHATS, greedy


def test_merged_hf_gives_plurals_greedy_tokens(families, adapters, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from plural.data.chat import encode_prompt
    from plural.generation import load_for_inference

    adapter = adapters[("llama", "rs4")]
    out = tmp_path / "merged"
    plural("export", "hf", adapter, "-o", out, "--merged", ok=True)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= names
    assert not list(out.glob("adapter_*"))
    ref, tok, stored = load_for_inference(families["llama"], adapter)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    otok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "chat_template.jinja").read_text() == tok.chat_template
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot in GenerationConfig.from_pretrained(out).eos_token_id
    prov = json.loads((out / "plural-export.json").read_text())
    assert prov["plural.base.fingerprint"] == stored.fingerprint and prov["format"] == "hf-merged"
    for chat in CHATS:
        ids = encode_prompt(otok, chat)
        assert ids == encode_prompt(tok, chat)
        assert greedy(model, ids) == greedy(ref, ids)


def test_adapter_folder_names_the_served_base(families, adapters, tmp_path):
    import torch
    from peft import PeftModel

    from plural.store.models import load_model

    adapter = adapters[("qwen2", "all8")]
    out = tmp_path / "lora"
    plural("export", "hf", adapter, "-o", out, "--base-name", "Qwen/Qwen2-0.5B-Instruct", ok=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "Qwen/Qwen2-0.5B-Instruct"
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    base, tok, _ = load_model(families["qwen2"])
    ids = torch.tensor([tok("hello there")["input_ids"]])
    want = PeftModel.from_pretrained(load_model(families["qwen2"])[0], adapter)(ids).logits
    got = PeftModel.from_pretrained(base, out)(ids).logits  # plain PEFT loads the exported folder
    assert torch.equal(got, want)


def test_hf_refuses_existing_folder(families, adapters, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    r = plural("export", "hf", adapters[("llama", "all8")], "-o", out, ok=False)
    assert "already exists" in r.stderr and (out / "keep").read_text() == "x"
    r = plural("export", "hf", "tiny", "-o", tmp_path / "b", ok=False)
    assert "is a base model" in r.stderr and not (tmp_path / "b").exists()

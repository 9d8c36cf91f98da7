"""Ollama export: the Modelfile's TEMPLATE, rendered by a Go text/template interpreter of exactly the
constructs it uses, is byte-identical to the model's Jinja chat template over a matrix of conversations."""

from __future__ import annotations

import os
import re
import sys

import pytest

from plural.errors import PluralError
from plural.export.gguf_lora import read_gguf_lora
from plural.export.ollama import derive, go_template, matrix

from . import gotemplate
from .helpers import plural

EXTRA = [
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "emoji 🙂 and \"quotes\" and a tab\t and {{ .Content }}"}],
]


def go_render(template: str, conv: list[dict]) -> str:
    return gotemplate.render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conv]})


def jinja(tok, conv) -> str:
    return tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def parse_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1), "template": template,
            "adapter": re.findall(r"^ADAPTER (.+)$", text, re.M), "stop": re.findall(r"^PARAMETER stop (.+)$", text, re.M),
            "system": system.group(1) if system else None}


def test_modelfile_template_renders_like_jinja(families, adapters, tmp_path):
    from plural.store.models import load_tokenizer
    from plural.values.profile import load_profile

    profile = "examples/values/fr-health.yaml"
    out = tmp_path / "ollama"
    plural("export", "ollama", adapters[("llama", "all8")], "-o", out, "--profile", profile, ok=True)
    mf = parse_modelfile((out / "Modelfile").read_text())
    assert mf["from"] == "./model.gguf" and (out / "model.gguf").is_file() and mf["adapter"] == []
    assert mf["stop"] == ['"<|im_end|>"']
    system = load_profile(profile).system_prompt()
    assert mf["system"] == system
    tok = load_tokenizer("tiny")
    for conv in matrix() + EXTRA:
        assert go_render(mf["template"], conv) == jinja(tok, conv), conv
        if conv[0]["role"] != "system":
            # Ollama puts SYSTEM in front of a conversation that has no system message
            assert go_render(mf["template"], [{"role": "system", "content": system}] + conv) == jinja(tok, [{"role": "system", "content": system}] + conv)
    # SmolLM2's own default system prompt is kept (Ollama's built-in ChatML would drop it)
    assert "You are a helpful AI assistant named SmolLM" in go_render(mf["template"], [{"role": "user", "content": "hi"}])


QWEN_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
             "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
                "{{ '[INST] ' + messages[0]['content'] + '\\n\\n' + m['content'] + ' [/INST]' }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% endif %}{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", [QWEN_LIKE, LLAMA3_LIKE], ids=["chatml-default-system", "llama3-headers"])
def test_other_piecewise_templates(store, template):
    from plural.store.models import load_tokenizer

    tok = load_tokenizer("tiny")
    tok.chat_template = template
    go = go_template(derive(tok))
    for conv in matrix() + EXTRA:
        assert go_render(go, conv) == jinja(tok, conv), conv


def test_non_piecewise_template_is_refused(store):
    from plural.store.models import load_tokenizer

    tok = load_tokenizer("tiny")
    tok.chat_template = MISTRAL_LIKE  # the system prompt is folded into the first user turn
    with pytest.raises(PluralError, match="no Ollama TEMPLATE can match it"):
        derive(tok)


def test_adapter_layer_and_create_without_ollama(families, adapters, tmp_path):
    out = tmp_path / "o"
    env_path = os.path.dirname(sys.executable)  # a PATH without ollama on it
    r = plural("export", "ollama", adapters[("qwen2", "rs4")], "-o", out, "--adapter-layer", "--type", "q4_0",
               "--create", "mine", ok=False, env={"PATH": env_path})
    assert "ollama is not on PATH" in r.stderr and "ollama create mine -f Modelfile" in r.stderr
    mf = parse_modelfile((out / "Modelfile").read_text())
    assert mf["from"] == "./base.gguf" and mf["adapter"] == ["./adapter.gguf"] and mf["system"] is None
    assert read_gguf_lora(out / "adapter.gguf").architecture == "qwen2"

"""Full-model GGUF export: transformers' own GGUF loader reads the merged f32 file back and gives
plural's greedy tokens; the tokenizer and chat template travel inside; quantised types follow the rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plural.errors import PluralError

from plural.export.gguf_model import export_gguf
from plural.export.source import open_source

from .helpers import plural

CHATS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Zähl bis 3: 1, 2, 3 {ok}"}],
]
CASES = [("llama", "all8"), ("mistral", "rs4"), ("qwen2", "pattern")]


@torch.inference_mode()
def greedy(model, ids: list[int], n: int = 12) -> list[int]:
    """Argmax decoding on full forwards: no generation config (EOS, pad) can make two models differ."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("family,shape", CASES)
def test_merged_f32_gguf_gives_plurals_greedy_tokens(families, adapters, tmp_path, family, shape):
    from plural.data.chat import encode_prompt
    from plural.generation import load_for_inference

    adapter = adapters[(family, shape)]
    out = tmp_path / "m.gguf"
    if (family, shape) == CASES[0]:
        plural("export", "gguf", adapter, "-o", out, "--type", "f32", ok=True)
    else:
        export_gguf(open_source(adapter), out, "f32")
    ref, tok, _ = load_for_inference(families[family], adapter)
    base, _, _ = load_for_inference(families[family])
    got, gtok = load_gguf(out)
    assert gtok.chat_template == tok.chat_template
    assert got.config.tie_word_embeddings == ref.base_model.model.config.tie_word_embeddings
    differs = False
    for chat in CHATS:
        ids = encode_prompt(tok, chat)
        assert gtok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] == ids
        want = greedy(ref, ids)
        assert greedy(got, ids) == want
        differs |= greedy(base, ids) != want
    assert differs, "the adapter should change the greedy tokens, or this test proves nothing"


def test_pre_tokenizer_names_llama_cpp_knows(families):
    """llama.cpp refuses a file whose tokenizer.ggml.pre it does not know (it loaded "gpt-2", refused "gpt2")."""
    import json

    from plural.export.gguf_model import pre_tokenizer
    from plural.store.models import get_model

    def name(model):
        path = get_model(model).path / "tokenizer.json"
        return pre_tokenizer(json.loads(path.read_text()), path)

    assert name("tiny") == "gpt-2" and name(families["qwen2"]) == "qwen2"
    smol = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                   {"type": "ByteLevel", "use_regex": True}]}}
    assert pre_tokenizer(smol, "t.json") == "smollm"
    with pytest.raises(PluralError, match="t.json: pre_tokenizer \\['Metaspace'\\]"):
        pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}, "t.json")


def test_base_model_gguf_metadata(families, tmp_path):
    import gguf

    from plural.store.models import get_model

    out = tmp_path / "b.gguf"
    export_gguf(open_source(families["qwen2"]), out, "f32")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.") and "tokens" not in k and "merges" not in k
         and "token_type" not in k}
    assert f["general.architecture"] == "qwen2" and f["general.type"] == "model"
    assert f["qwen2.block_count"] == 2 and f["qwen2.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.eos_token_id"] == 2
    # transformers stores the tiny Qwen2's tokenizer with Qwen2's split pattern; llama.cpp names it "qwen2"
    assert f["tokenizer.ggml.pre"] == "qwen2"
    assert f["plural.base.fingerprint"] == get_model(families["qwen2"]).fingerprint and f["plural.method"] == "base"
    names = {t.name for t in r.tensors}
    assert "output.weight" in names and "blk.0.attn_q.bias" in names  # untied head, Qwen2's q/k/v biases


@pytest.fixture(scope="module")
def merged_f32(adapters, tmp_path_factory):
    import gguf

    ref = tmp_path_factory.mktemp("f32") / "f32.gguf"
    export_gguf(open_source(adapters[("llama", "all8")]), ref, "f32")
    return {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_quantised_types(adapters, merged_f32, tmp_path, qtype):
    import gguf

    q = tmp_path / f"{qtype}.gguf"
    export_gguf(open_source(adapters[("llama", "all8")]), q, qtype)
    r32 = merged_f32
    rq = {t.name: t for t in gguf.GGUFReader(str(q)).tensors}
    assert rq.keys() == r32.keys()
    linear = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}[qtype]
    assert rq["blk.0.ffn_down.weight"].tensor_type.name == linear
    assert rq["blk.1.attn_q.weight"].tensor_type.name == linear
    assert rq["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert rq["token_embd.weight"].tensor_type.name == ("Q8_0" if qtype.startswith("q4") else linear)
    # dequantised weights stay within each format's error (relative to the tensor's largest value)
    bound = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": 0.15, "q4_1": 0.15}[qtype]
    for name in ("blk.0.ffn_down.weight", "token_embd.weight"):
        w = gguf.quants.dequantize(r32[name].data, r32[name].tensor_type)
        wq = gguf.quants.dequantize(rq[name].data, rq[name].tensor_type)
        assert np.abs(wq - w).max() <= bound * np.abs(w).max(), name
    if qtype in ("q8_0", "q4_1"):  # transformers dequantises them on load
        model, _ = load_gguf(q)
        w = model.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
        assert np.abs(w - gguf.quants.dequantize(rq["blk.0.ffn_down.weight"].data, rq["blk.0.ffn_down.weight"].tensor_type)).max() < 1e-6


def test_bad_type_and_existing_output(families, tmp_path):
    out = tmp_path / "x.gguf"
    r = plural("export", "gguf", "tiny", "-o", out, "--type", "q4_k", ok=False)
    assert "--type 'q4_k'" in r.stderr and "q4_1" in r.stderr
    out.write_text("old")
    r = plural("export", "gguf", "tiny", "-o", out, ok=False)
    assert "already exists" in r.stderr and out.read_text() == "old"

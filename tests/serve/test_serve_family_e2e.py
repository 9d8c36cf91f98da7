"""Issue 12, end to end through the real `plural` executable: import a model of another family
(HF folder, and GGUF where plural's exporter writes the family), tune it with a minimal config
(default targets: all linear layers, so Phi-3's fused projections train), and serve base and
adapter with the engine's runner for that family; the served answer equals transformers + PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from families import build
from server import Server

PLURAL = str(Path(sys.executable).with_name("plural"))
TRAIN = Path(__file__).resolve().parents[2] / "examples" / "support" / "train.jsonl"


def plural(*args, cwd=None):
    r = subprocess.run([PLURAL, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                       env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return r


# Phi-3: the family whose fused projections the old default targets missed, served by the generic
# runner (the fused families' engine equality is in test_serve_families.py).
@pytest.mark.parametrize("family, runner", [("phi3", "generic")])
def test_import_tune_serve(store, family, runner, tmp_path):
    from transformers import AutoTokenizer

    from plural.generation import generate, load_for_inference
    from plural.store.models import get_model

    tok = AutoTokenizer.from_pretrained(get_model("tiny").path)
    src = tmp_path / "hf"
    build(family, tok).save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    name = f"tiny-{family}-e2e"
    plural("models", "add", src, "--name", name, "--force")
    assert get_model(name).manifest["architecture"].lower().startswith(family[:4])

    data = tmp_path / "train.jsonl"
    data.write_text("".join(TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump({"method": "sft", "model": name, "data": {"train": "train.jsonl"},
                                   "train": {"max_steps": 2, "batch_size": 2}, "output": "run"}))
    plural("tune", cfg)
    adapter = tmp_path / "run" / "adapter"
    targets = {t.rsplit(".", 1)[-1] for t in json.loads((adapter / "adapter_config.json").read_text())["target_modules"]}
    want = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "phi3" else \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert targets == want
    manifest = json.loads((adapter / "plural.json").read_text())
    assert manifest["base"]["architecture"] == get_model(name).manifest["architecture"]

    msgs = [{"role": "user", "content": "When are you open?"}]
    model, mtok, _ = load_for_inference(name, adapter)
    ref = generate(model, mtok, [msgs], max_new_tokens=8, temperature=0.0)[0]
    srv = Server(tmp_path, {"model": name, "adapters": {"ft": str(adapter)}, "dtype": "float32", "max_model_len": 256}).wait_ready()
    try:
        import httpx

        health = httpx.get(srv.url + "/health").json()
        assert health["runner"] == runner and health["family"] == family
        # the dtype actually computed in, and the CPU kind the kernels were chosen for (issue 19)
        from plural.cpu import cpu_info

        assert health["dtype"] == "float32" and health["cpu"] == cpu_info().kind
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": "ft", "messages": msgs, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == ref
    finally:
        srv.stop()


@pytest.mark.parametrize("family,arch", [("qwen2", "qwen2"), ("mistral", "llama"), ("qwen3", "qwen3"), ("gemma2", "gemma2")])
def test_gguf_of_another_family_imports(store, family, arch, tmp_path):
    """`plural export gguf` writes the family; `plural models add FILE.gguf` reads it back with the
    same logits and the same tokens for a chat. A Mistral GGUF reads back as a Llama: llama.cpp writes
    Mistral under the `llama` architecture (the same tensors; the sliding window is not in the file,
    see docs/export.md). Qwen3's head size and Gemma 2's soft-caps, query scale and 1 + w norms are
    the keys transformers' GGUF reader alone gets wrong (it loads neither file correctly)."""
    from transformers import AutoTokenizer

    from plural.store.models import get_model, load_model

    tok = AutoTokenizer.from_pretrained(get_model("tiny").path)
    src = tmp_path / "hf"
    model = build(family, tok)
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    out = tmp_path / f"{family}.gguf"
    if family == "qwen2":  # through the real executable once; in-process for the others (the suite's time)
        plural("models", "add", src, "--name", f"src-{family}", "--force")
        plural("export", "gguf", f"src-{family}", "--type", "f32", "-o", out)
        plural("models", "add", out, "--name", f"gguf-{family}", "--force")
    else:
        from plural.export.gguf_model import export_gguf
        from plural.export.source import open_source
        from plural.store.models import import_model

        import_model(src, name=f"src-{family}", overwrite=True)
        export_gguf(open_source(f"src-{family}"), out, "f32")
        import_model(out, name=f"gguf-{family}", overwrite=True)
    back, btok, stored = load_model(f"gguf-{family}")
    assert stored.manifest["architecture"].lower().startswith(arch)
    chat = [{"role": "user", "content": "Zähl bis 3: 1, 2, 3 {ok}\n  Réponds en français."}]
    src_tok = AutoTokenizer.from_pretrained(get_model(f"src-{family}").path)  # the exported model's own tokenizer
    assert btok.apply_chat_template(chat, add_generation_prompt=True) == src_tok.apply_chat_template(chat, add_generation_prompt=True)
    import torch

    x = torch.tensor([[200, 201, 202, 203, 204, 205, 206, 207, 208, 209]])
    # GGUF has no sliding-window key: the file reads back with full attention, so the logits agree
    # within the window (the whole context for Qwen2 here) and, for Mistral, differ past it.
    w = getattr(model.config, "sliding_window", None) if family == "mistral" else None
    with torch.no_grad():
        assert torch.allclose(back(x[:, :w]).logits, model(x[:, :w]).logits, atol=1e-4)
        if w is not None and w < x.shape[1]:
            assert not torch.allclose(back(x).logits[0, -1], model(x).logits[0, -1], atol=1e-4)


def test_gguf_writer_refuses_a_gemma2_llama_cpp_would_run_differently(store, tmp_path):
    """llama.cpp has no GGUF key for Gemma 2's query scale (it assumes the head size) or for a layer
    pattern other than sliding/full alternation: such a model is refused, naming the field."""
    from transformers import AutoTokenizer

    from plural.errors import PluralError
    from plural.export.gguf_model import write_model_gguf
    from plural.store.models import get_model

    tok = AutoTokenizer.from_pretrained(get_model("tiny").path)
    model = build("gemma2", tok)
    model.config.query_pre_attn_scalar = 256
    with pytest.raises(PluralError, match="query_pre_attn_scalar 256 is not the 16 llama.cpp assumes"):
        write_model_gguf(model, tok, tmp_path, tmp_path / "a.gguf", "f32", "g", {})
    model.config.query_pre_attn_scalar = 16
    model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(PluralError, match="layer_types .* is not Gemma 2's alternation"):
        write_model_gguf(model, tok, tmp_path, tmp_path / "b.gguf", "f32", "g", {})
    assert not list(tmp_path.glob("*.gguf"))


def test_serve_refuses_a_model_no_runner_serves(store, tmp_path):
    """An encoder (BERT) in the store: `plural serve` stops at start with one line naming it."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    from plural.store.models import get_model

    tok = AutoTokenizer.from_pretrained(get_model("tiny").path)
    src = tmp_path / "bert"
    import torch

    bert = BertLMHeadModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with torch.no_grad():  # attention that matters, as in a trained encoder
        for p in bert.parameters():
            p.mul_(4.0)
    bert.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    plural("models", "add", src, "--name", "tiny-bert-e2e", "--force")
    r = subprocess.run([PLURAL, "serve", "--model", "tiny-bert-e2e", "--port", "0"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "'bert' is not causal" in err[0] and "decoder-only causal LMs" in err[0], r.stderr

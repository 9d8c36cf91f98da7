"""Plural's GGUF files of the other fused families, run by llama.cpp itself (issue 12).

For each family (default: Qwen3 and Gemma 2, the two the GGUF writer learned last) a tiny random
model is built in-process (2 layers, SmolLM2's tokenizer, Gemma's sliding window 6 shorter than the
12-token prompt) with a LoRA on every linear layer (random B), then written by `plural.export` as
an f32 GGUF and a GGUF LoRA. llama.cpp (llama-cpp-python, the `bench` extra; f32 KV cache) runs
the prompt through the base file, and through base + LoRA; printed: the largest logit difference
from transformers (base) and from PEFT (base + adapter) over all positions, whether the argmax
agrees at every position, whether llama.cpp tokenises a multilingual text as the tokenizer does,
and how far the adapter moves the logits (so a difference is read against an effect).

    python benchmarks/family_gguf_check.py [--families qwen3 gemma2 qwen2 llama]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "serve"))  # the tiny family builders the tests use
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

PROMPT = list(range(200, 212))
TEXT = "Zähl bis 3: 1, 2, 3 {ok} — Réponds\n  en français."


def llama(path: Path, lora: Path | None):
    import llama_cpp

    from _llama import load_llama

    return load_llama(path, lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True, n_threads=2,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def logits_of(llm) -> np.ndarray:
    llm.eval(PROMPT)
    return np.array(llm.scores[: len(PROMPT)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["qwen3", "gemma2"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PLURAL_HOME"] = str(Path(tmp) / "home")
        from families import build
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer

        from plural.export.gguf_lora import export_gguf_lora
        from plural.export.gguf_model import export_gguf
        from plural.export.source import open_adapter, open_source
        from plural.store.adapters import build_manifest, save_adapter
        from plural.store.models import import_model, load_model

        tok = AutoTokenizer.from_pretrained(import_model().path)  # the bundled SmolLM2's tokenizer
        print("| family | base: max abs(llama.cpp - transformers) | argmax equal | tokens equal | LoRA: max abs(llama.cpp - PEFT) | adapter's effect |")
        print("|---|---:|---|---|---:|---:|")
        for fam in args.families:
            src = Path(tmp) / fam
            build(fam, tok).save_pretrained(src)
            tok.save_pretrained(src)
            import_model(src, name=f"b-{fam}", overwrite=True)
            base, _, stored = load_model(f"b-{fam}")
            torch.manual_seed(3)
            lora = dict(r=4, lora_alpha=8, target_modules="all-linear")
            pm = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.mul_(3.0)  # an effect well above float rounding
            adapter = Path(tmp) / f"{fam}-adapter"
            save_adapter(pm, adapter, build_manifest(stored, "sft", lora))
            gguf, gguf_lora = Path(tmp) / f"{fam}.gguf", Path(tmp) / f"{fam}-lora.gguf"
            export_gguf(open_source(f"b-{fam}"), gguf, "f32")
            export_gguf_lora(open_adapter(adapter), gguf_lora, "f32")
            with torch.no_grad():
                with pm.disable_adapter():
                    want_base = pm(torch.tensor([PROMPT])).logits[0].numpy()
                want_lora = pm(torch.tensor([PROMPT])).logits[0].numpy()
            plain = llama(gguf, None)
            got_base = logits_of(plain)
            same_tokens = plain.tokenize(TEXT.encode(), add_bos=False, special=True) == tok(TEXT, add_special_tokens=False)["input_ids"]
            got_lora = logits_of(llama(gguf, gguf_lora))
            print(f"| {fam} | {np.abs(got_base - want_base).max():.2e} | {bool((got_base.argmax(-1) == want_base.argmax(-1)).all())} | "
                  f"{same_tokens} | {np.abs(got_lora - want_lora).max():.2e} | {np.abs(want_lora - want_base).max():.2f} |")


if __name__ == "__main__":
    main()

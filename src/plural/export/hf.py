"""Hugging Face folders for vLLM, TGI and SGLang: the merged model, or the PEFT adapter named for a served base.

Merged: `config.json` (as saved by transformers, so `tie_word_embeddings` is kept), safetensors,
the tokenizer files with `chat_template.jinja`, and `generation_config.json` whose `eos_token_id`
lists the end-of-turn token (engines stop on generation_config's EOS, and a ChatML model whose EOS
is `<|endoftext|>` would otherwise never stop after `<|im_end|>`).
Adapter: the PEFT files with `base_model_name_or_path` set to the base's *served* name, which
vLLM's LoRA resolver matches against the model it serves (a local store path means nothing there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from plural.errors import PluralError
from plural.export.files import atomic_folder
from plural.export.source import Source, load_merged
from plural.export.template import end_of_turn
from plural.store.adapters import CONFIG, MANIFEST, WEIGHTS
from plural.store.paths import write_json_atomic

PROVENANCE = "plural-export.json"


def eos_ids(model, tok) -> list[int]:
    ids: list[int] = []
    for v in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id,
              tok.convert_tokens_to_ids(end_of_turn(tok))):
        for i in ([v] if isinstance(v, int) else (v or [])):
            if i not in ids:
                ids.append(i)
    return ids


def export_hf_merged(src: Source, out: Path, force: bool = False) -> dict[str, Any]:
    model, tok = load_merged(src)
    model.generation_config.eos_token_id = eos_ids(model, tok)
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_folder(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not (tmp / "chat_template.jinja").is_file():
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        write_json_atomic(tmp / PROVENANCE, src.provenance() | {"format": "hf-merged"})
    return {"path": str(out), "eos_token_id": model.generation_config.eos_token_id}


def export_hf_adapter(src: Source, out: Path, base_name: str | None = None, force: bool = False) -> dict[str, Any]:
    if src.adapter is None:
        raise PluralError(f"{src.name!r} is a base model: export it with --merged (or use the stored folder as it is)")
    served = base_name or src.base.name
    cfg = dict(src.adapter_config, base_model_name_or_path=served)
    with atomic_folder(out, force) as tmp:
        shutil.copyfile(src.adapter / WEIGHTS, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if (src.adapter / MANIFEST).is_file():
            shutil.copyfile(src.adapter / MANIFEST, tmp / MANIFEST)
        write_json_atomic(tmp / PROVENANCE, src.provenance() | {"format": "hf-adapter"})
    return {"path": str(out), "base_model_name_or_path": served}

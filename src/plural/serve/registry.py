"""Registering adapters for serving: confined paths, safetensors only, checked against the base.

An adapter is checked when it is registered (at start or through the admin API), so a bad one is
refused at once with the reason, not on the first request: the base fingerprint in its
`plural.json`, its PEFT config (plain LoRA), and every tensor's name and shape (read from the
safetensors header, without loading the weights).
"""

from __future__ import annotations

import re
from pathlib import Path

from plural.errors import PluralError
from plural.serve.adapter_cache import Adapter
from plural.serve.lora import check_adapter_config
from plural.store import adapters as store_adapters
from plural.store.models import StoredModel
from plural.store.paths import adapters_dir

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def check_model_id(name: str) -> str:
    if not _ID_RE.match(name):
        raise PluralError(f"adapter name {name!r}: use letters, digits and . _ - : / (at most 128 characters)")
    return name


def confine(ref: str, roots: list[Path]) -> Path:
    """The adapter folder for `ref` (a store name or a path), which must lie inside one of `roots`.

    Symlinks are resolved first, so a link inside a root that points outside is refused too.
    """
    if "\x00" in ref:
        raise PluralError("adapter path contains a NUL byte")
    if "/" not in ref and "\\" not in ref and (adapters_dir() / ref).is_dir():
        p = (adapters_dir() / ref).resolve()
    else:
        p = Path(ref).expanduser().resolve()
    _inside(p, roots, ref)
    return p


def _inside(p: Path, roots: list[Path], shown: str) -> None:
    allowed = [r.expanduser().resolve() for r in roots]
    if not any(p == r or p.is_relative_to(r) for r in allowed):
        raise PluralError(
            f"adapter path {shown!r} is outside the folders the server may read "
            f"({', '.join(str(r) for r in allowed)}). Fix: put it in the store or add its folder to adapter_dirs"
        )


def make_adapter(name: str, ref: str | Path, base: StoredModel, runner, max_rank: int,
                 roots: list[Path] | None = None) -> Adapter:
    """Validate the adapter at `ref` for `base`, served by `runner` (which checks that every
    tensor is a LoRA factor of one of its layers, with that layer's shape), and describe it.

    With `roots` (the admin API), every file the server reads must resolve inside them: a folder
    inside the store whose weights are a symlink to a file elsewhere is refused (issue 11). The
    weights are hashed here and read later from their resolved path, so a file changed or swapped
    after this check is refused at load instead of served."""
    from safetensors import safe_open

    check_model_id(name)
    path = store_adapters.resolve_adapter(ref)
    files = [path / f for f in (store_adapters.CONFIG, store_adapters.WEIGHTS, store_adapters.MANIFEST)
             if (path / f).exists() or (path / f).is_symlink()]
    for f in files:
        if roots is not None:
            _inside(f.resolve(), roots, str(path / f.name))
        if not f.resolve().is_file():
            raise PluralError(f"adapter {path}: {f.name} is not a regular file")
    store_adapters.check_base(path, base)
    cfg = store_adapters.read_adapter_config(path)
    rank, scale = check_adapter_config(path, cfg, max_rank)
    weights = (path / store_adapters.WEIGHTS).resolve()
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise PluralError(f"adapter {path}: {store_adapters.WEIGHTS} is not a readable safetensors file ({e})") from e
    runner.check_adapter(path, shapes, rank)
    return Adapter(name=name, path=path, rank=rank, scale=scale, nbytes=weights.stat().st_size,
                   weights=weights, sha256=store_adapters.sha256_file(weights))

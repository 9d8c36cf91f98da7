"""The adapter artifact: a PEFT LoRA folder plus the `plural.json` manifest.

    <adapter>/
        adapter_config.json          standard PEFT (loadable by peft.PeftModel.from_pretrained, vLLM)
        adapter_model.safetensors    standard PEFT
        plural.json                  where it came from: base fingerprint, data sha256, config,
                                     method, metrics, created time (and later: federation, signature)

Only safetensors are ever read from an adapter folder; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plural.errors import PluralError
from plural.store.models import StoredModel
from plural.store.paths import adapters_dir, atomic_dir, write_json_atomic

MANIFEST = "plural.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _Part(BaseModel):
    # Unknown keys are kept, not refused: a manifest written by a newer plural (or carrying fields
    # another tool added) still loads, and saving it again loses nothing.
    model_config = ConfigDict(extra="allow")


class BaseRef(_Part):
    name: str
    fingerprint: str | None = None
    architecture: str | None = None


class DataFile(_Part):
    path: str
    sha256: str


class InitAdapter(_Part):
    path: str
    method: str | None = None


class Metrics(_Part):
    """What a run measured; each recipe fills the fields it has (None: not measured)."""

    steps: int | None = None
    train_loss: float | None = None  # last step's loss
    eval_loss: float | None = None  # held-out loss at the end
    final_train_loss: float | None = None  # adapter on (a sample of) the training rows at the end
    base_train_loss: float | None = None  # the base (adapter off) on the same rows
    base_eval_loss: float | None = None
    warnings: list[str] | None = None  # tune.report: did not learn, over-fitting
    trained_tokens: int | None = None
    pairs_seen: int | None = None  # dpo / orpo
    seconds: float | None = None
    trained_tokens_per_second: float | None = None
    processes: int | None = None
    precision: str | None = None
    beta: float | None = None  # dpo
    reference: str | None = None  # dpo
    lambda_: float | None = Field(None, alias="lambda")  # orpo
    eval_reward_accuracy: float | None = None  # dpo
    eval_odds_accuracy: float | None = None  # orpo
    rounds: int | None = None  # federated
    eval_loss_per_org: dict[str, Any] | None = None  # federated

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class AdapterManifest(_Part):
    """plural.json: where an adapter came from. Written by every recipe (and federation) through
    build_manifest / save_adapter, read back with load_manifest."""

    format: int = FORMAT_VERSION
    method: str
    base: BaseRef
    data: list[DataFile] = Field(default_factory=list)
    config: dict[str, Any] = {}
    metrics: Metrics = Field(default_factory=Metrics)
    created: str
    run: str | None = None
    init_adapter: InitAdapter | None = None  # dpo / orpo started from this adapter
    federation: dict[str, Any] | None = None  # plural federate: rounds, nodes, strategy, privacy

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def build_manifest(
    base: StoredModel,
    method: str,
    config: dict[str, Any] | None = None,
    data_files: list[str | Path] = (),
    metrics: dict[str, Any] | Metrics | None = None,
    **extra: Any,
) -> AdapterManifest:
    return AdapterManifest(
        method=method,
        base=BaseRef(name=base.name, fingerprint=base.fingerprint, architecture=base.manifest.get("architecture")),
        data=[DataFile(path=str(p), sha256=sha256_file(p)) for p in data_files],
        config=config or {},
        metrics=Metrics.model_validate(metrics or {}) if not isinstance(metrics, Metrics) else metrics,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    )


def load_manifest(path: str | Path) -> AdapterManifest | None:
    """The adapter's plural.json as the typed model (None for an adapter made outside plural);
    a malformed one is an error naming the file and the field."""
    man = read_manifest(path)
    if not man:
        return None
    try:
        return AdapterManifest.model_validate(man)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise PluralError(f"{resolve_adapter(path) / MANIFEST}: {where}: {err['msg']}") from e


def save_adapter(peft_model, out_dir: str | Path, manifest: AdapterManifest | dict[str, Any], overwrite: bool = True) -> Path:
    """Write the PEFT adapter and its manifest atomically (temp folder, then rename)."""
    out = Path(out_dir)
    if not isinstance(manifest, AdapterManifest):
        manifest = AdapterManifest.model_validate(manifest)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        # Point the PEFT config at the stored base so plain PEFT finds it on this machine.
        cfg_path = tmp / CONFIG
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(_base_path(manifest))
        cfg_path.write_text(json.dumps(cfg, indent=2))
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
        for extra in tmp.glob("README.md"):
            extra.unlink()
    return out


def _base_path(manifest: AdapterManifest) -> Path | str:
    from plural.store.models import get_model

    try:
        return get_model(manifest.base.name).path
    except PluralError:
        return manifest.base.name


def resolve_adapter(ref: str | Path) -> Path:
    """An adapter by path, or by name in `$PLURAL_HOME/adapters/`."""
    p = Path(ref).expanduser()
    if not (p / CONFIG).is_file():
        named = adapters_dir() / str(ref)
        if (named / CONFIG).is_file():
            p = named
        elif p.exists():
            raise PluralError(f"{p}: not an adapter folder (no {CONFIG})")
        else:
            raise PluralError(f"adapter {str(ref)!r} not found: no such folder, and not in {adapters_dir()}")
    if not (p / WEIGHTS).is_file():
        raise PluralError(f"{p}: no {WEIGHTS}; plural reads adapters only as safetensors")
    return p


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = resolve_adapter(path) / MANIFEST
    if not p.is_file():
        return {}
    return _read_json_object(p)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    return _read_json_object(resolve_adapter(path) / CONFIG)


def _read_json_object(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise PluralError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise PluralError(f"{p}: must be a JSON object, got {type(data).__name__}")
    return data


def check_base(path: str | Path, base: StoredModel) -> None:
    """Refuse an adapter trained on another base (by weight fingerprint, when the manifest has one)."""
    man = read_manifest(path)
    about = man.get("base", {})
    if not isinstance(about, dict):
        raise PluralError(f"{path}: plural.json: base must be an object")
    fp = about.get("fingerprint")
    if fp and fp != base.fingerprint:
        raise PluralError(
            f"adapter {path} was trained on base {about.get('name')!r} ({str(fp)[:19]}…), "
            f"not on {base.name!r} ({base.fingerprint[:19]}…)"
        )


def load_adapter_weights(path: str | Path) -> dict[str, Any]:
    """The adapter's tensors (safetensors only), keyed as PEFT saved them."""
    from safetensors.torch import load_file

    return load_file(str(resolve_adapter(path) / WEIGHTS))


def attach_adapter(model, path: str | Path, base: StoredModel | None = None, adapter_name: str = "default", is_trainable: bool = False):
    """Wrap `model` in a PeftModel with the adapter at `path` (checked against `base`)."""
    from peft import PeftModel

    from safetensors import SafetensorError, safe_open

    p = resolve_adapter(path)
    if base is not None:
        check_base(p, base)
    read_adapter_config(p)  # a JSON object (PEFT raises TypeError deep inside on anything else)
    try:
        with safe_open(str(p / WEIGHTS), framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError) as e:
        raise PluralError(f"{p / WEIGHTS}: damaged or truncated safetensors file ({e})") from e
    try:
        return PeftModel.from_pretrained(model, str(p), adapter_name=adapter_name, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise PluralError(f"{p}: the adapter does not fit the base model: {e}") from e

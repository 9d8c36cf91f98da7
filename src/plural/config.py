"""YAML configs validated by pydantic at load: unknown keys and bad values name the key's path.

One path rule for every config file: a relative path *inside* a config file is relative to that
file's folder; a path given on the command line (an option, or `--set key=value`) is relative to
the working directory. Config models mark their path fields with `PathField` (`ConfigPath` for a
plain path); `load_config` makes those absolute by that rule before validating, so the resolved
config (e.g. a run folder's config.yaml) holds absolute paths and reads the same from anywhere.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from plural.errors import PluralError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class PathField:
    """Marks a config field (via `Annotated`) as a filesystem path for the path rule above.

    name_ok: the value may also be a name in the store (a model, an adapter): a value without a
      path separator that does not exist beside the config is kept as a name.
    kind_prefix: the value may be `KIND:PATH` (eval suites); only PATH is resolved.
    """

    name_ok: bool = False
    kind_prefix: bool = False

    def resolve(self, value: str | Path, base: Path) -> str:
        text = str(value)
        prefix = ""
        if self.kind_prefix:
            kind, sep, rest = text.partition(":")
            if sep and rest and "/" not in kind and "\\" not in kind and not (base / text).exists():
                prefix, text = kind + ":", rest
        p = Path(text).expanduser()
        if p.is_absolute():
            return prefix + str(p)
        if self.name_ok and "/" not in text and "\\" not in text and not (base / p).exists():
            return prefix + text  # a store name
        return prefix + str((base / p).resolve())


ConfigPath = Annotated[Path, PathField()]


def resolve_paths(model: type[BaseModel], data: dict[str, Any], base: Path) -> dict[str, Any]:
    """`data` (a raw mapping for `model`) with every relative path in a `PathField` made absolute
    against `base`. Values of the wrong shape are left alone for validation to report."""
    base = Path(base).resolve()
    out = dict(data)
    for key, value in data.items():
        f = model.model_fields.get(key)
        if f is not None:
            out[key] = _resolve(f.annotation, tuple(f.metadata), value, base)
    for key, f in model.model_fields.items():
        # A path key left out takes its default as if written in the file (`output: runs/run`),
        # so the resolved config never holds a path relative to whatever folder a process runs in.
        if key not in data and isinstance(f.default, (str, Path)) and any(isinstance(m, PathField) for m in f.metadata):
            out[key] = _resolve(f.annotation, tuple(f.metadata), f.default, base)
    return out


def _resolve(tp: Any, meta: tuple, value: Any, base: Path) -> Any:
    marker = next((m for m in meta if isinstance(m, PathField)), None)
    if marker is not None and isinstance(value, (str, Path)) and str(value):
        return marker.resolve(value, base)
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *more = get_args(tp)
        return _resolve(inner, meta + tuple(more), value, base)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):  # the first member that recognises the value
            new = _resolve(arg, (), value, base)
            if new is not value:
                return new
        return value
    if origin in (list, tuple, set) and get_args(tp):
        item = get_args(tp)[0]
        if isinstance(value, list):
            return [_resolve(item, (), v, base) for v in value]
        return _resolve(item, (), value, base)  # one value where a list is expected (`train: a.jsonl`)
    if origin is dict and isinstance(value, dict):
        vt = get_args(tp)[1] if get_args(tp) else Any
        return {k: _resolve(vt, (), v, base) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(value, dict):
        return resolve_paths(tp, value, base)
    return value


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PluralError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise PluralError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    except UnicodeDecodeError as e:
        raise PluralError(f"{p}: not UTF-8 text") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PluralError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides (value parsed as YAML) to a nested dict.

    With `model`, paths in the values are resolved against the working directory (the path rule)."""
    for item in overrides:
        if "=" not in item:
            raise PluralError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if model is not None:
            value = _override_value(model, parts, value)
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise PluralError(f"--set {key}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _override_value(model: type[BaseModel], parts: list[str], value: Any) -> Any:
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    nested = resolve_paths(model, nested, Path.cwd())
    for part in parts:
        nested = nested[part]
    return nested


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PluralError(format_validation_error(e, source)) from e


def load_config(model: type[M], path: str | Path, overrides: list[str] = ()) -> M:
    """The config file at `path`, its paths relative to its folder, then `--set` overrides (their
    paths relative to the working directory), validated."""
    data = resolve_paths(model, read_yaml(path), Path(path).expanduser().parent)
    data = apply_overrides(data, list(overrides), model)
    return validate(model, data, str(path))


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

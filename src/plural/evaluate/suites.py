"""Suites and the registry of suite kinds.

A **suite** is a JSONL file of items plus a declared **kind**; the kind says how to read one item
and how to score all items with the model variant that is active (the base, or one adapter).

The registry is a plain dict, `KINDS: kind name -> Kind`. A kind is three things:

    Kind(
        name="qa",
        read=read_item,          # (obj: dict, where: "file:line") -> item; raise PluralError naming `where`
        score=score,             # (scorer: Scorer, suite: Suite) -> SuiteScores, items in suite order
        options=QAOptions,       # optional pydantic model (plural.config.Strict) for the suite's `options:`
        doc="one line for --help and the docs",
    )

`score` receives a `plural.evaluate.scoring.Scorer` (batched log-likelihoods, rolling
log-likelihoods and generation with whatever variant is active) and returns `SuiteScores`:

- `metrics`: name -> `Metric(num, den=None, higher_is_better=True)`, one entry per item, in the
  same item order for every variant. The metric's value is sum(num) / sum(den) (den defaults to
  1 per item, i.e. a mean), so ratios like bits per byte bootstrap correctly. The runner computes
  the value, the item count, a bootstrap 95% interval and the paired difference against the base.
  Sub-group metrics are named `metric/group` (e.g. `bpb/de`).
- `samples`: per-item records for people to read (prompt, output, reference, score); the report
  shows them side by side across variants.

Registering a new kind (e.g. `values` from plural.values) — either call `register_kind(Kind(...))`
in a module that plural imports, or declare an entry point so `plural eval` finds it lazily:

    [project.entry-points."plural.eval_kinds"]
    values = "plural.values.evaluate:KIND"     # a Kind instance

Suite files: the first line may be a header `{"suite": {"kind": "qa", "name": "...", "options": {...}}}`;
otherwise the kind is given by the config (`kind:`) or on the command line (`--suite qa:FILE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from plural.errors import PluralError

if TYPE_CHECKING:
    from plural.evaluate.scoring import Scorer

ENTRY_POINT_GROUP = "plural.eval_kinds"


@dataclass
class Metric:
    """Per-item contributions; value = sum(num) / sum(den) (den: 1 per item when None)."""

    num: list[float]
    den: list[float] | None = None
    higher_is_better: bool = True


@dataclass
class SuiteScores:
    metrics: dict[str, Metric]
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    kind: str
    path: Path
    items: list[Any]
    lines: list[int]  # the source line of each item, for messages
    options: Any = None  # an instance of the kind's options model, or None


@dataclass(frozen=True)
class Kind:
    name: str
    read: Callable[[dict, str], Any]
    score: Callable[["Scorer", Suite], SuiteScores]
    options: type[BaseModel] | None = None
    doc: str = ""


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add a kind to the registry; a name can be registered once (re-registering the same object is fine)."""
    have = KINDS.get(kind.name)
    if have is not None and have is not kind:
        raise PluralError(f"suite kind {kind.name!r} is already registered (by {have.score.__module__})")
    KINDS[kind.name] = kind
    return kind


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_kind(name: str) -> Kind:
    """The kind called `name`: built in, registered, or (loaded only when asked for) an entry point."""
    import plural.evaluate.kinds  # noqa: F401  (registers the built-in kinds)

    if name not in KINDS:
        ep = _entry_points().get(name)
        if ep is None:
            raise PluralError(f"unknown suite kind {name!r}; known kinds: {', '.join(kind_names())}")
        try:
            obj = ep.load()
        except ImportError as e:
            raise PluralError(f"suite kind {name!r} ({ep.value}) could not be imported: {e}") from e
        if not isinstance(obj, Kind) or obj.name != name:
            raise PluralError(f"entry point {name} = {ep.value} ({ENTRY_POINT_GROUP}) is not a plural.evaluate.suites.Kind named {name!r}")
        register_kind(obj)
    return KINDS[name]


def kind_names() -> list[str]:
    import plural.evaluate.kinds  # noqa: F401

    return sorted(set(KINDS) | set(_entry_points()))


def read_header(path: Path) -> dict[str, Any] | None:
    """The `{"suite": {...}}` header of a suite file, or None when the first line is an item."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and set(obj) == {"suite"}:
        if not isinstance(obj["suite"], dict):
            raise PluralError(f"{path}:1: the header's \"suite\" must be an object, e.g. {{\"suite\": {{\"kind\": \"qa\"}}}}")
        return obj["suite"]
    return None


def load_suite(
    path: str | Path,
    kind: str | None = None,
    name: str | None = None,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> Suite:
    """Read and check a suite file. Explicit arguments override the file's header."""
    from plural.config import validate
    from plural.data.records import open_jsonl

    p = open_jsonl(path)
    header = read_header(p) or {}
    unknown = set(header) - {"kind", "name", "options", "description"}
    if unknown:
        raise PluralError(f"{p}:1: unknown key(s) in the suite header: {', '.join(sorted(unknown))} (allowed: kind, name, options, description)")
    kind = kind or header.get("kind")
    if not kind:
        raise PluralError(
            f"{p}: no suite kind. Fix: a first line {{\"suite\": {{\"kind\": \"...\"}}}}, `kind:` in the config, "
            f"or --suite KIND:{p} (kinds: {', '.join(kind_names())})"
        )
    k = get_kind(kind)
    merged = {**(header.get("options") or {}), **(options or {})}
    opts = None
    if k.options is not None:
        opts = validate(k.options, merged, f"{p} (suite options)")
    elif merged:
        raise PluralError(f"{p}: suite kind {kind!r} takes no options (got {', '.join(sorted(merged))})")

    items, lines = [], []
    with open(p, "rb") as f:
        for no, raw in enumerate(f, start=1):
            where = f"{p}:{no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PluralError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from e
            if not text.strip() or (no == 1 and header):
                continue
            try:
                obj = json.loads(text.lstrip("\ufeff"))
            except json.JSONDecodeError as e:
                raise PluralError(f"{where}: not JSON: {e.msg} at column {e.colno}") from e
            if not isinstance(obj, dict):
                raise PluralError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            items.append(k.read(obj, where))
            lines.append(no)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise PluralError(f"{p}: the suite has no items")
    return Suite(name=name or header.get("name") or p.stem, kind=kind, path=p, items=items, lines=lines, options=opts)

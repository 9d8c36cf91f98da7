"""`plural eval`: the base and each adapter on every suite, in one process, one base load.

The base model is loaded once; every adapter is loaded into the same PeftModel under its own
name (PEFT multi-adapter) and switched with `set_adapter`; the base itself is scored inside
`disable_adapter()`, which runs the original layers exactly. So N variants cost one model load
plus N small adapter loads, and the base's numbers do not depend on which adapters are present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import Field

from plural.config import ConfigPath, PathField, Strict
from plural.errors import PluralError
from plural.evaluate import metrics as M
from plural.evaluate.suites import Suite, SuiteScores, get_kind, load_suite

CONFIDENCE = 0.95


# Relative paths in an eval config are relative to its folder (plural.config's path rule); an
# adapter or model without a path separator that is not beside the config is a store name.
AdapterRef = Annotated[str, PathField(name_ok=True)]
SuiteRef = Annotated[str, PathField(kind_prefix=True)]  # FILE or KIND:FILE


class SuiteSpec(Strict):
    path: ConfigPath
    kind: str | None = None  # default: the file's header
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(default=None, ge=1)


class AdapterSpec(Strict):
    path: AdapterRef  # a folder or a name in the store's adapters/
    name: str | None = None


class EvalConfig(Strict):
    model: Annotated[str, PathField(name_ok=True)] | None = None  # default: the bundled SmolLM2
    adapters: list[AdapterRef | AdapterSpec] = Field(default_factory=list)
    base: bool = True  # also score the base (the reference for differences)
    suites: list[SuiteRef | SuiteSpec] = Field(default_factory=list)  # empty: the bundled default suites
    output: ConfigPath | None = None  # default: runs/eval/<UTC time>
    max_length: int = Field(default=1024, ge=16)
    batch_tokens: int = Field(default=4096, ge=64)  # rows x padded length per scoring batch
    gen_batch_size: int = Field(default=8, ge=1)
    bootstrap: int = Field(default=1000, ge=0)  # resamples for the confidence intervals
    seed: int = 0
    limit: int | None = Field(default=None, ge=1)  # at most this many items per suite


def default_suites_file() -> Path:
    """examples/eval/default.yaml of the plural checkout (or of the current folder)."""
    import plural

    for root in (Path(plural.__file__).resolve().parents[2], Path.cwd()):
        f = root / "examples" / "eval" / "default.yaml"
        if f.is_file():
            return f
    raise PluralError("the bundled suites (examples/eval/default.yaml) were not found; give suites with --suite KIND:FILE or in the config")


def default_suites() -> list[SuiteSpec]:
    from plural.config import load_config

    class _Defaults(Strict):
        suites: list[SuiteSpec]

    return load_config(_Defaults, default_suites_file()).suites


def parse_suite_arg(arg: str) -> SuiteSpec:
    """`FILE` (kind from its header) or `KIND:FILE`."""
    kind, sep, path = arg.partition(":")
    if sep and not Path(arg).exists() and "/" not in kind and "\\" not in kind:
        return SuiteSpec(path=Path(path), kind=kind)
    return SuiteSpec(path=Path(arg))


def load_suites(cfg: EvalConfig) -> list[Suite]:
    specs = [parse_suite_arg(s) if isinstance(s, str) else s for s in cfg.suites] or default_suites()
    suites = []
    for s in specs:
        limit = min(x for x in (s.limit, cfg.limit) if x is not None) if (s.limit or cfg.limit) else None
        suites.append(load_suite(s.path, kind=s.kind, name=s.name, options=s.options, limit=limit))
    names = [s.name for s in suites]
    for s, spec in zip(suites, specs):  # the same file under two kinds: tell them apart by kind
        if names.count(s.name) > 1 and spec.name is None:
            s.name = f"{s.name}-{s.kind}"
    names = [s.name for s in suites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PluralError(f"two suites are named {dup[0]!r}; give each a distinct `name:`")
    return suites


@dataclass
class Variant:
    name: str
    adapter: Path | None  # None: the base
    key: str | None = None  # the PEFT adapter name inside the shared model


def _variant_name(path: Path, taken: set[str]) -> str:
    # runs/support/adapter -> "support"; an adapter in the store -> its folder name
    name = path.parent.name if path.name == "adapter" and path.parent.name else path.name
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def plan_variants(cfg: EvalConfig) -> list[Variant]:
    from plural.store.adapters import resolve_adapter

    out: list[Variant] = [Variant("base", None)] if cfg.base else []
    taken = {v.name for v in out}
    for i, a in enumerate(cfg.adapters):
        spec = a if isinstance(a, AdapterSpec) else AdapterSpec(path=a)
        p = resolve_adapter(spec.path)
        name = spec.name or _variant_name(p, taken)
        if name in taken:
            raise PluralError(f"two variants are named {name!r}; give each adapter a distinct name")
        taken.add(name)
        out.append(Variant(name, p, key=f"v{i}"))
    if not out:
        raise PluralError("nothing to evaluate: base is off and no adapters were given")
    return out


def load_variants(cfg: EvalConfig, variants: list[Variant]):
    """The base model once, with every adapter loaded under its own PEFT name. Returns (model, tok, stored)."""
    from plural.store.adapters import attach_adapter, check_base
    from plural.store.models import load_model

    model, tok, stored = load_model(cfg.model)
    peft = None
    for v in variants:
        if v.adapter is None:
            continue
        if peft is None:
            peft = attach_adapter(model, v.adapter, base=stored, adapter_name=v.key)
        else:
            check_base(v.adapter, stored)
            try:
                peft.load_adapter(str(v.adapter), adapter_name=v.key, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as e:
                raise PluralError(f"{v.adapter}: the adapter does not fit the base model: {e}") from e
    m = peft if peft is not None else model
    m.eval()
    return m, tok, stored


class _Active:
    """Context manager: make `variant` the one the model runs."""

    def __init__(self, model, variant: Variant):
        self.model, self.variant, self._ctx = model, variant, None

    def __enter__(self):
        if self.variant.adapter is None:
            if hasattr(self.model, "disable_adapter"):
                self._ctx = self.model.disable_adapter()
                self._ctx.__enter__()
        else:
            self.model.set_adapter(self.variant.key)
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def summarise(suite: Suite, per_variant: dict[str, SuiteScores], variants: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    """Values with intervals for every metric and variant, and paired differences against the first variant."""
    ref = variants[0]
    metrics = []
    for mname, m_ref in per_variant[ref].metrics.items():
        entry = {"name": mname, "higher_is_better": m_ref.higher_is_better, "values": {}, "diffs": {}}
        for v in variants:
            m = per_variant[v].metrics[mname]
            e = M.bootstrap(m.num, m.den, n_boot, seed)
            entry["values"][v] = {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}
            if v != ref:
                d = M.paired_difference(m_ref.num, m_ref.den, m.num, m.den, n_boot, seed)
                sig = d.excludes_zero()
                entry["diffs"][v] = {
                    "value": d.value, "lo": d.lo, "hi": d.hi, "n": d.n, "significant": sig,
                    "better": (d.value > 0) == m.higher_is_better if sig else None,
                }
        metrics.append(entry)
    samples = []
    for i, s in enumerate(per_variant[ref].samples):
        row = {"prompt": s.get("prompt"), "reference": s.get("reference"), "outputs": {}, "scores": {}}
        for v in variants:
            sv = per_variant[v].samples[i]
            row["outputs"][v] = sv.get("output")
            if "score" in sv:
                row["scores"][v] = sv["score"]
        samples.append(row)
    return {"name": suite.name, "kind": suite.kind, "path": str(suite.path), "items": len(suite.items), "metrics": metrics, "samples": samples}


def evaluate(cfg: EvalConfig, on_step: Callable[[str, str, int, int], None] | None = None) -> dict[str, Any]:
    """Score every variant on every suite; returns the report (plain JSON-able data)."""
    import torch

    from plural import __version__
    from plural.evaluate.scoring import Scorer
    from plural.store.adapters import read_manifest, sha256_file

    suites = load_suites(cfg)
    variants = plan_variants(cfg)
    t0 = time.perf_counter()
    model, tok, stored = load_variants(cfg, variants)
    load_s = time.perf_counter() - t0
    scorer = Scorer(model, tok, max_length=cfg.max_length, batch_tokens=cfg.batch_tokens, gen_batch_size=cfg.gen_batch_size)
    scores: dict[str, dict[str, SuiteScores]] = {s.name: {} for s in suites}
    seconds: dict[str, dict[str, float]] = {s.name: {} for s in suites}
    total, step = len(variants) * len(suites), 0
    for v in variants:
        with _Active(model, v), torch.inference_mode():
            for s in suites:
                if on_step:
                    on_step(v.name, s.name, step, total)
                t = time.perf_counter()
                res = get_kind(s.kind).score(scorer, s)
                seconds[s.name][v.name] = time.perf_counter() - t
                _check_shape(s, v.name, res, scores[s.name])
                scores[s.name][v.name] = res
                step += 1
    if on_step:
        on_step("", "", total, total)
    names = [v.name for v in variants]
    report_suites = []
    for s in suites:
        entry = summarise(s, scores[s.name], names, cfg.bootstrap, cfg.seed)
        entry["seconds"] = seconds[s.name]
        report_suites.append(entry)
    return {
        "plural_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": stored.name, "fingerprint": stored.fingerprint},
        "reference": names[0],
        "variants": [
            {"name": v.name, "adapter": str(v.adapter) if v.adapter else None,
             "sha256": sha256_file(v.adapter / "adapter_model.safetensors") if v.adapter else None,
             "method": read_manifest(v.adapter).get("method") if v.adapter else None}
            for v in variants
        ],
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "confidence": CONFIDENCE, "method": "percentile, paired for differences"},
        "config": cfg.model_dump(mode="json"),
        "seconds": {"load": load_s, "total": time.perf_counter() - t0},
        "suites": report_suites,
    }


def _check_shape(suite: Suite, variant: str, res: SuiteScores, earlier: dict[str, SuiteScores]) -> None:
    """A kind must return the same metrics over the same items for every variant (paired bootstrap)."""
    for name, m in res.metrics.items():
        if m.den is not None and len(m.den) != len(m.num):
            raise PluralError(f"suite kind {suite.kind!r}: metric {name!r} has {len(m.num)} values but {len(m.den)} denominators")
    for other, r in earlier.items():
        if set(r.metrics) != set(res.metrics) or any(len(r.metrics[k].num) != len(res.metrics[k].num) for k in r.metrics) \
                or len(r.samples) != len(res.samples):
            raise PluralError(f"suite kind {suite.kind!r} returned different metrics or items for {variant!r} than for {other!r} on {suite.name!r}")

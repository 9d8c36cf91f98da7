"""`plural values eval`: compile the profile's held-out suite and run it through `plural eval`.

The adherence numbers come from the same runner as every other evaluation (one base load, every
adapter under its own PEFT name, bootstrap 95% intervals, paired differences against the base),
so `plural values eval PROFILE` and `plural eval --suite DIR/values_suite.jsonl` agree exactly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from plural.values.compile import SUITE, compile_profile
from plural.values.profile import Profile


def evaluate_profile(
    profile: Profile,
    source: Path,
    adapters: list[str],
    model: str | None = None,
    system: bool = False,
    heldout: float = 0.25,
    seed: int = 0,
    max_new_tokens: int = 96,
    base: bool = True,
    extra_suites: list[Path] = (),
    bootstrap: int = 1000,
    on_step: Callable[[str, str, int, int], None] | None = None,
) -> dict:
    """The eval report (plural.evaluate.run format) with a `values-<id>` suite, and `values-<id>+system`
    when `system` (every variant answering under the profile's rendered system prompt), plus
    `extra_suites` (any suite files, e.g. a perplexity text to check the adapters do no harm)."""
    from plural.evaluate.run import AdapterSpec, EvalConfig, SuiteSpec, evaluate

    specs = []
    for a in adapters:
        name, sep, path = a.partition("=")
        specs.append(AdapterSpec(path=path, name=name) if sep and name and path else AdapterSpec(path=a))
    with tempfile.TemporaryDirectory(prefix="plural-values-") as tmp:
        data = compile_profile(profile, Path(tmp) / "data", source=source, heldout=heldout, seed=seed).out
        suite = data / SUITE
        name = f"values-{profile.id}"
        opts = {"max_new_tokens": max_new_tokens}
        suites = [SuiteSpec(path=suite, name=name, options=opts)]
        if system:
            prompts = {lang: profile.system_prompt(lang) for lang in profile.languages}
            suites.append(SuiteSpec(path=suite, name=f"{name}+system", options={**opts, "system": prompts}))
        suites += [SuiteSpec(path=Path(p)) for p in extra_suites]
        cfg = EvalConfig(model=model, adapters=specs, base=base, suites=suites, bootstrap=bootstrap, seed=seed)
        report = evaluate(cfg, on_step)
    for s in report["suites"]:
        if s["name"].startswith(name):
            s["path"] = f"compiled from {source} (heldout={heldout}, seed={seed})"
    report["profile"] = {"id": profile.id, "version": profile.version, "owner": profile.owner,
                         "languages": profile.languages, "source": str(source)}
    return report

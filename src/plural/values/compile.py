"""Compile a value profile into training and evaluation data (`plural values compile`).

    DIR/
      sft_train.jsonl           chat: prompt -> good answer (training examples)
      sft_eval.jsonl            chat: the held-out examples' good answers
      pref_train.jsonl          preference: prompt, chosen = good, rejected = bad
      pref_eval.jsonl           preference: held out (preference accuracy in `values eval`)
      values_suite.jsonl        the `values` suite of `plural eval`: held-out pairs and every probe
      replay.jsonl              text: general prose in eight languages, replayed during SFT (see below)
      tune-sft.yaml             ready-to-run `plural tune` configs (SFT, then DPO from the SFT adapter)
      tune-dpo.yaml
      compile.json              profile id/version/sha256, split, counts

Split. Examples are grouped by (principle, language); inside a group, prompts are ordered by a
hash of (seed, normalised prompt) and the first `heldout` fraction goes to evaluation. So the split
is deterministic, stratified, stable when examples are added (an example's side depends only on
its own prompt), and the same prompt never lands on both sides. Probes are evaluation only;
`check` already refuses an example whose prompt is a probe's.

Replay. SFT on a few hundred answers in one register makes a small model forget ordinary prose
(bits per byte on general text rose 7-12% without it, docs/benchmarks.md#values). The SFT config
therefore also trains on `replay.jsonl`, a copy of plural's bundled general-text corpus
(resources/replay, CC0), loss on every token, as continual-learning replay does; `replay=False`
(`--no-replay`) leaves it out.

Records carry `id` and `metadata: {principle, language}` so `values eval` reports per principle
and per language (the chat record format allows both fields).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from plural.store.paths import atomic_dir, write_json_atomic
from plural.values.profile import Example, Profile, _norm

SUITE = "values_suite.jsonl"
REPLAY = "replay.jsonl"
REPLAY_SOURCE = Path(__file__).resolve().parent.parent / "resources" / "replay" / "general.jsonl"


@dataclass
class Compiled:
    out: Path
    counts: dict[str, int] = field(default_factory=dict)


def _rank(seed: int, prompt: str) -> str:
    return hashlib.sha256(f"{seed}\0{_norm(prompt)}".encode()).hexdigest()


def split(examples: list[Example], heldout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): per (principle, language), ceil(heldout × n distinct prompts) go to eval."""
    groups: dict[tuple[str, str], dict[str, list[Example]]] = {}
    for e in examples:
        groups.setdefault((e.principle, e.language), {}).setdefault(_norm(e.prompt), []).append(e)
    train, held = [], []
    for key in sorted(groups):
        prompts = sorted(groups[key], key=lambda p: _rank(seed, p))
        # Keep at least one prompt for training when a group has two or more.
        k = min(math.ceil(heldout * len(prompts)), len(prompts) - 1) if heldout > 0 else 0
        for i, p in enumerate(prompts):
            (held if i < k else train).extend(groups[key][p])
    order = {id(e): i for i, e in enumerate(examples)}
    return sorted(train, key=lambda e: order[id(e)]), sorted(held, key=lambda e: order[id(e)])


def _meta(e) -> dict:
    return {"principle": e.principle, "language": e.language}


def _chat(e: Example, system: str | None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.good}]
    return {"id": e.id, "metadata": _meta(e), "messages": msgs}


def _pref(e: Example, system: str | None) -> dict:
    prompt = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": e.prompt}]} if system else {"prompt": e.prompt}
    return {"id": e.id, "metadata": _meta(e), **prompt, "chosen": e.good, "rejected": e.bad}


def _jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def tune_configs(profile: Profile, model: str, replay: bool = True) -> dict[str, dict]:
    """SFT on the good answers, then DPO from that adapter: defaults measured on SmolLM2-135M (docs/value-profiles.md)."""
    sft = {
        "method": "sft", "model": model,
        # The profile's own replay file, and the recipe measured for it: plain LoRA, no NEFTune (the
        # sft recipe's defaults, tune.schedule.METHOD_DEFAULTS, were measured on domain facts, not on profiles).
        "data": {"train": ["sft_train.jsonl"] + ([REPLAY] if replay else []), "eval": "sft_eval.jsonl", "max_length": 512, "packing": True,
                 "replay": 0},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "rslora": False},
        # Measured on SmolLM2-135M (docs/benchmarks.md#values): at 3e-4 for 2 epochs the SFT loss
        # was still 2.0 and the probe answers incoherent German (pass rate 0.05); 6e-4 for 4 epochs
        # learns the profile's patterns (0.86 after SFT), and with the replayed general text the
        # bits per byte on other prose do not rise (+11% without it).
        "train": {"epochs": 4, "batch_size": 4, "lr": 6e-4, "neftune_alpha": 0, "wise_ft": 1},
        "output": f"runs/{profile.id}-sft",
    }
    dpo = {
        "method": "dpo", "model": model, "init_adapter": f"runs/{profile.id}-sft/adapter",
        "data": {"train": ["pref_train.jsonl"], "eval": "pref_eval.jsonl", "max_length": 512},
        # The SFT adapter as DPO's reference: against the base, DPO from it started at loss 1e-5 and
        # only added noise (one contrast probe refused); against itself it learns (docs/benchmarks.md#values).
        "preference": {"beta": 0.1, "reference": "init"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 5e-5},
        "output": f"runs/{profile.id}-dpo",
    }
    return {"tune-sft.yaml": sft, "tune-dpo.yaml": dpo}


def compile_profile(
    profile: Profile,
    out: Path,
    source: Path | None = None,
    heldout: float = 0.25,
    seed: int = 0,
    system_prompt: bool = False,
    extra: list[Example] = (),
    model: str = "smollm2-135m-instruct",
    overwrite: bool = False,
    replay: bool = True,
) -> Compiled:
    """Write the data folder (atomically: a half-written folder never appears under `out`).

    `system_prompt`: put the profile's rendered system prompt into every training and evaluation
    record (train the adapter *with* the prompt it will be served with). Off by default: the
    adapter then learns to follow the profile on its own.
    `extra`: reviewed examples (e.g. the teacher's, after review) added to the profile's.
    """
    examples = list(profile.examples) + list(extra)
    train, held = split(examples, heldout, seed)
    sys_of = (lambda e: profile.system_prompt(e.language)) if system_prompt else (lambda e: None)
    # The suite: header (kind, name, the profile's markers; the system prompts when trained with them), then items.
    opts = {"markers": profile.markers.model_dump()}
    if system_prompt:
        opts["system"] = {lang: profile.system_prompt(lang) for lang in profile.languages}
    suite = [{"suite": {"kind": "values", "name": f"values-{profile.id}", "options": opts}}]
    suite += [{"type": "pair", **_pref(e, None)} for e in held if e.bad]
    suite += [{"type": "probe", "id": q.id, "metadata": _meta(q), "prompt": q.prompt, "expected": q.expected, "contrast": q.contrast,
               "includes_any": q.includes_any, "excludes": q.excludes} for q in profile.probes]
    data = {
        "sft_train.jsonl": [_chat(e, sys_of(e)) for e in train],
        "sft_eval.jsonl": [_chat(e, sys_of(e)) for e in held],
        "pref_train.jsonl": [_pref(e, sys_of(e)) for e in train if e.bad],
        "pref_eval.jsonl": [_pref(e, sys_of(e)) for e in held if e.bad],
        SUITE: suite,
    }
    counts = {name: len(rows) - (name == SUITE) for name, rows in data.items()}
    replay_text = REPLAY_SOURCE.read_bytes() if replay else None
    if replay:
        counts[REPLAY] = sum(1 for line in replay_text.splitlines() if line.strip())
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, rows in data.items():
            if len(rows) > (name == SUITE):  # an empty JSONL is not a valid data file; its absence says "none"
                _jsonl(tmp / name, rows)
        if replay:
            (tmp / REPLAY).write_bytes(replay_text)
        for name, cfg in tune_configs(profile, model, replay).items():
            if name == "tune-dpo.yaml" and not data["pref_train.jsonl"]:
                continue
            if not data["sft_eval.jsonl"]:
                cfg["data"].pop("eval")
            if name == "tune-dpo.yaml" and not data["pref_eval.jsonl"]:
                cfg["data"].pop("eval", None)
            (tmp / name).write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
        meta = {
            "profile": {"id": profile.id, "version": profile.version, "owner": profile.owner, "languages": profile.languages},
            "source": str(source) if source else None,
            "sha256": "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
            "split": {"heldout": heldout, "seed": seed, "system_prompt": system_prompt},
            "extra_examples": len(extra),
            "counts": counts,
        }
        write_json_atomic(tmp / "compile.json", meta)
        # The rendered system prompts, for review and for `plural serve --profile`.
        (tmp / "system_prompts.json").write_text(
            json.dumps({lang: profile.system_prompt(lang) for lang in profile.languages}, ensure_ascii=False, indent=2), encoding="utf-8")
    return Compiled(out, counts)

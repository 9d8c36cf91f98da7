"""Expanding a profile with a teacher model behind any OpenAI-compatible endpoint.

For each principle and language the teacher (1) writes new user prompts that test the principle,
(2) answers each one, (3) critiques its answer against the principle and (4) revises it: the
supervised stage of Constitutional AI (Bai et al. 2022, arXiv:2212.08073, §3). The revision is
the good answer and the first draft, when it differs, the bad one, so the output feeds both SFT
and DPO.

Nothing the teacher writes is trained on directly: `expand` returns examples that the CLI writes
to a review file (`teacher_review.yaml`, marked `reviewed: false`); after a person has read and
marked them, `plural values compile --extra teacher_review.yaml` adds the reviewed ones.

Every call is cached on disk under `$PLURAL_HOME/cache/teacher/` keyed by sha256 of (URL, model,
messages, temperature), so re-running a compile costs nothing and is reproducible. Only the
configured URL is contacted.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

from plural.errors import PluralError
from plural.store.paths import plural_home, write_json_atomic
from plural.values.profile import Example, Principle, Profile, _norm

LANG_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch",
              "pt": "Portuguese", "pl": "Polish", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "cs": "Czech"}


class Teacher:
    def __init__(self, url: str, model: str, api_key: str | None = None, temperature: float = 0.7,
                 timeout: float = 120.0, cache_dir: Path | None = None):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model, self.api_key, self.temperature, self.timeout = model, api_key, temperature, timeout
        self.cache_dir = cache_dir or plural_home() / "cache" / "teacher"
        self.calls = self.cached = 0

    def chat(self, messages: list[dict], max_tokens: int = 400) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": max_tokens}
        key = hashlib.sha256(json.dumps([self.url, body], sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            self.cached += 1
            return json.loads(path.read_text(encoding="utf-8"))["content"]
        req = urllib.request.Request(
            f"{self.url}/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                resp = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise PluralError(f"teacher {self.url}: HTTP {e.code}: {e.read()[:300].decode('utf-8', 'replace')}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise PluralError(f"teacher {self.url}: cannot reach it ({getattr(e, 'reason', e)}); is the server running?") from e
        except ValueError as e:
            raise PluralError(f"teacher {self.url}: the answer is not JSON") from e
        try:
            content = resp["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise PluralError(f"teacher {self.url}: not an OpenAI chat completion response: {str(resp)[:200]}") from e
        self.calls += 1
        write_json_atomic(path, {"request": body, "content": content})
        return content


def _statement(p: Principle, lang: str) -> str:
    return p.statement.get(lang) or next(iter(p.statement.values()))


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip().lstrip("-*•0123456789.) ").strip().strip('"')
        if len(line) > 8:
            out.append(line)
    return out


def expand(profile: Profile, teacher: Teacher, per_principle: int, progress=None) -> list[dict]:
    """New examples for review: one dict per prompt with the draft, critique and revision."""
    known = {_norm(e.prompt) for e in profile.examples} | {_norm(q.prompt) for q in profile.probes}
    out: list[dict] = []
    for p in profile.principles:
        for lang in profile.languages:
            lname = LANG_NAMES.get(lang, lang)
            stmt = _statement(p, lang)
            seeds = [e.prompt for e in profile.examples if e.principle == p.id and e.language == lang][:3]
            ask = (f"An organisation wants its assistant to follow this principle: \"{stmt}\" (why: {p.rationale}).\n"
                   f"Write {per_principle} different questions in {lname} that its users might ask and that test this principle."
                   + (f" Examples of such questions:\n" + "\n".join(f"- {s}" for s in seeds) if seeds else "")
                   + "\nOne question per line, no numbering, nothing else.")
            prompts = [q for q in _lines(teacher.chat([{"role": "user", "content": ask}])) if _norm(q) not in known][:per_principle]
            for q in prompts:
                known.add(_norm(q))
                sys_msg = {"role": "system", "content": profile.system_prompt(lang)}
                draft = teacher.chat([sys_msg, {"role": "user", "content": q}])
                critique = teacher.chat([{"role": "user", "content":
                    f"Principle: \"{stmt}\"\nQuestion: {q}\nAnswer: {draft}\n\n"
                    "Identify specifically how the answer fails to follow the principle, in two sentences or fewer. "
                    "If it follows it fully, say so."}])
                revision = teacher.chat([sys_msg, {"role": "user", "content":
                    f"Question: {q}\nDraft answer: {draft}\nCritique: {critique}\n\n"
                    f"Rewrite the answer in {lname} so that it follows the principle \"{stmt}\". Reply with the answer only."}])
                item = {"principle": p.id, "language": lang, "prompt": q, "good": revision,
                        "bad": draft if _norm(draft) != _norm(revision) else None,
                        "critique": critique, "reviewed": False}
                out.append(item)
                if progress:
                    progress()
    return out


def read_reviewed(path: Path, profile: Profile) -> list[Example]:
    """The examples of a review file that a person marked `reviewed: true`, checked against the profile."""
    from plural.config import read_yaml, validate

    items = read_yaml(path).get("examples")
    if not isinstance(items, list):
        raise PluralError(f"{path}: expected a mapping with an 'examples' list (a teacher_review.yaml)")
    probes = {_norm(q.prompt) for q in profile.probes}
    keep, errors = [], []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            errors.append(f"examples[{i}]: expected a mapping")
            continue
        if it.get("reviewed") is not True:
            continue
        ex = validate(Example, {k: v for k, v in it.items() if k not in ("reviewed", "critique")}, f"{path}: examples[{i}]")
        if ex.principle not in profile.principle_ids():
            errors.append(f"examples[{i}].principle: unknown principle {ex.principle!r}")
        if ex.language not in profile.languages:
            errors.append(f"examples[{i}].language: {ex.language!r} is not declared in the profile")
        if not ex.prompt.strip() or not ex.good.strip() or (ex.bad is not None and not ex.bad.strip()):
            errors.append(f"examples[{i}]: empty text")
        if _norm(ex.prompt) in probes:
            errors.append(f"examples[{i}].prompt: is a probe's prompt; a probe must not be trained on")
        keep.append(ex.model_copy(update={"id": ex.id or f"{ex.principle}/{ex.language}/t{i + 1}"}))
    if errors:
        raise PluralError(f"{path}: {len(errors)} problem(s) in reviewed examples:\n  " + "\n  ".join(errors))
    return keep


def review_yaml(items: list[dict], teacher: Teacher) -> str:
    import yaml

    head = (f"# Written by `plural values compile --teacher {teacher.url} --teacher-model {teacher.model}`.\n"
            "# Read every example; fix or delete it; set `reviewed: true` on the ones to train on; then run\n"
            "#   plural values compile PROFILE -o DIR --extra THIS_FILE\n"
            "# `critique` is the teacher's critique of its first draft (`bad`); it is not trained on.\n")
    return head + yaml.safe_dump({"examples": items}, sort_keys=False, allow_unicode=True, width=100)

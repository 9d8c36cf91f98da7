"""The value-profile format: an organisation's principles, examples and probes as one YAML file.

    id: de-public-sector            # [a-z0-9-], names the compiled data and the report
    version: 1
    owner: Stadt Musterstadt, Bürgeramt
    languages: [de, en]             # ISO 639-1; every text is in one of these
    style: {formality: formal, verbosity: concise}
    preamble: {de: "Sie sind ...", en: "You are ..."}        # optional, first line of the system prompt
    principles:
      - id: cite-rule
        statement: {de: "Nennen Sie die Vorschrift ...", en: "Name the rule ..."}   # positively worded
        rationale: Citizens can check a decision only if they know its legal basis.
    examples:                       # training data: prompt, good answer, optional bad answer
      - principle: cite-rule
        language: de
        prompt: Wie lange ist mein Personalausweis gültig?
        good: Nach § 6 Abs. 1 PAuswG ...
        bad: Zehn Jahre.
    probes:                         # held-out evaluation prompts, never trained on
      - principle: cite-rule
        language: de
        prompt: ...
        expected: comply            # comply | refuse | redirect
        contrast: true              # benign look-alike of a refusal case: must not be refused
        includes_any: ["§"]         # comply: the answer must contain one of these ...
        excludes: [" du "]          # ... and none of these (case-sensitive)
    markers:                        # phrases that identify a refusal / a redirect, per language
      refuse: {de: ["kann ich nicht"]}
      redirect: {de: ["wenden Sie sich an"]}

`check_profile(path)` collects every problem with its file:line and key path; `load_profile(path)`
raises a PluralError listing them. `Profile.system_prompt(language)` renders the system prompt
that `plural serve --profile` attaches and `plural values eval --system` measures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from plural.config import Strict
from plural.errors import PluralError

BEHAVIOURS = ("comply", "refuse", "redirect")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
LANG_RE = re.compile(r"^[a-z]{2}$")
MIN_EXAMPLES = 4  # fewer good answers than this per principle cannot teach a small model anything

# Built-in style sentences (the profile's own `preamble` and statements carry everything else).
STYLE_TEXT: dict[str, dict[str, str]] = {
    "formal": {
        "en": "Use a formal, courteous register.", "de": "Verwenden Sie eine förmliche, höfliche Sprache (Sie-Form).",
        "fr": "Employez un registre soutenu et courtois (vouvoiement).", "es": "Use un registro formal y cortés (usted).",
        "it": "Usa un registro formale e cortese (Lei).",
    },
    "neutral": {
        "en": "Use a neutral, friendly register.", "de": "Verwenden Sie eine sachliche, freundliche Sprache.",
        "fr": "Employez un registre neutre et aimable.", "es": "Use un registro neutro y amable.",
        "it": "Usa un registro neutro e cordiale.",
    },
    "informal": {
        "en": "Use a plain, informal register.", "de": "Verwenden Sie eine einfache, persönliche Sprache (Du-Form).",
        "fr": "Employez un registre simple et direct (tutoiement).", "es": "Use un registro sencillo y cercano (tú).",
        "it": "Usa un registro semplice e diretto (tu).",
    },
    "concise": {
        "en": "Answer briefly: two to four sentences.", "de": "Antworten Sie knapp: zwei bis vier Sätze.",
        "fr": "Répondez brièvement : deux à quatre phrases.", "es": "Responda con brevedad: de dos a cuatro frases.",
        "it": "Rispondi in breve: da due a quattro frasi.",
    },
    "balanced": {
        "en": "Answer completely but without padding.", "de": "Antworten Sie vollständig, aber ohne Füllwörter.",
        "fr": "Répondez complètement, sans remplissage.", "es": "Responda de forma completa, sin relleno.",
        "it": "Rispondi in modo completo, senza riempitivi.",
    },
    "detailed": {
        "en": "Answer in detail, step by step.", "de": "Antworten Sie ausführlich und Schritt für Schritt.",
        "fr": "Répondez en détail, étape par étape.", "es": "Responda con detalle, paso a paso.",
        "it": "Rispondi in dettaglio, passo per passo.",
    },
}
PRINCIPLES_HEADER = {
    "en": "Follow these principles:", "de": "Befolgen Sie diese Grundsätze:", "fr": "Respectez ces principes :",
    "es": "Siga estos principios:", "it": "Segui questi principi:",
}


class Style(Strict):
    formality: Literal["formal", "neutral", "informal"] | None = None
    verbosity: Literal["concise", "balanced", "detailed"] | None = None


class Principle(Strict):
    id: str
    statement: dict[str, str] = Field(description="language -> positively worded statement")
    rationale: str


class Example(Strict):
    id: str | None = None
    principle: str
    language: str
    prompt: str
    good: str
    bad: str | None = None


class Probe(Strict):
    id: str | None = None
    principle: str
    language: str
    prompt: str
    expected: Literal["comply", "refuse", "redirect"]
    contrast: bool = False
    includes_any: list[str] = Field(default_factory=list, description="comply: the answer must contain one of these")
    excludes: list[str] = Field(default_factory=list, description="comply: the answer must contain none of these")


class Markers(Strict):
    refuse: dict[str, list[str]] = Field(default_factory=dict)
    redirect: dict[str, list[str]] = Field(default_factory=dict)


class Profile(Strict):
    id: str
    version: int | str
    owner: str
    languages: list[str] = Field(min_length=1)
    style: Style = Field(default_factory=Style)
    preamble: dict[str, str] = Field(default_factory=dict)
    principles: list[Principle] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)
    probes: list[Probe] = Field(default_factory=list)
    markers: Markers = Field(default_factory=Markers)

    def system_prompt(self, language: str | None = None) -> str:
        """The system prompt in `language` (default: the profile's first language).

        Preamble, the style sentences, then one bullet per principle. A principle without a
        statement in that language falls back to the first language that has one.
        """
        lang = language or self.languages[0]
        if lang not in self.languages:
            raise PluralError(f"profile {self.id}: language {lang!r} is not declared (languages: {', '.join(self.languages)})")
        first = self.languages[0]
        lines = []
        if self.preamble:
            lines.append(self.preamble.get(lang) or self.preamble.get(first) or next(iter(self.preamble.values())))
        for key in (self.style.formality, self.style.verbosity):
            if key:
                lines.append(STYLE_TEXT[key].get(lang, STYLE_TEXT[key]["en"]))
        lines.append(PRINCIPLES_HEADER.get(lang, PRINCIPLES_HEADER["en"]))
        for p in self.principles:
            text = p.statement.get(lang) or p.statement.get(first) or next(iter(p.statement.values()))
            lines.append(f"- {text.strip()}")
        return "\n".join(lines)

    def principle_ids(self) -> list[str]:
        return [p.id for p in self.principles]


# ----------------------------------------------------------------------------- locations

def _line_map(node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Key path -> 1-based YAML line, from the composed node tree (yaml keeps marks there)."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            _line_map(v, path + (key,), out)
            out[path + (key,)] = k.start_mark.line + 1  # a key's problem is reported at the key
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out


@dataclass
class Problem:
    line: int
    where: str  # key path, e.g. examples[3].principle
    message: str
    severity: str = "error"

    def format(self, path: str | Path) -> str:
        loc = f"{path}:{self.line}" if self.line else str(path)
        return f"{loc}: {self.severity}: {self.where}: {self.message}" if self.where else f"{loc}: {self.severity}: {self.message}"


def _path_str(path: tuple) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


class _Locator:
    def __init__(self, lines: dict[tuple, int]):
        self.lines = lines

    def __call__(self, path: tuple, message: str, severity: str = "error") -> Problem:
        # The deepest prefix of `path` that exists in the file (a missing key: its parent).
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return Problem(self.lines[path[:n]], _path_str(path), message, severity)
        return Problem(0, _path_str(path), message, severity)


# ----------------------------------------------------------------------------- check

def _read(path: Path) -> tuple[dict, dict[tuple, int]]:
    if not path.is_file():
        raise PluralError(f"{path}: no such profile file")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise PluralError(f"{path}: not UTF-8 text") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise PluralError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise PluralError(f"{path}: a profile is a YAML mapping (id, version, owner, languages, principles, ...)")
    return data, (_line_map(node) if node is not None else {})


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def semantic_problems(p: Profile, at: _Locator) -> list[Problem]:
    """Everything pydantic cannot see: cross references, languages, duplicates, empty text, coverage."""
    probs: list[Problem] = []
    langs = set(p.languages)
    if not ID_RE.match(p.id):
        probs.append(at(("id",), f"{p.id!r}: use lowercase letters, digits, '-', '_' or '.'"))
    for i, lang in enumerate(p.languages):
        if not LANG_RE.match(lang):
            probs.append(at(("languages", i), f"{lang!r} is not a two-letter ISO 639-1 code (e.g. de, fr, es)"))
    for i, lang in enumerate(p.languages):
        if lang in p.languages[:i]:
            probs.append(at(("languages", i), f"language {lang!r} is declared twice"))
    if not p.owner.strip():
        probs.append(at(("owner",), "empty text"))

    def text_dict(d: dict[str, str], path: tuple, require_all: bool) -> None:
        for lang, text in d.items():
            if lang not in langs:
                probs.append(at(path + (lang,), f"language {lang!r} is not declared in languages: [{', '.join(p.languages)}]"))
            if not str(text).strip():
                probs.append(at(path + (lang,), "empty text"))
        if require_all:
            for lang in p.languages:
                if lang not in d:
                    probs.append(at(path, f"no text for declared language {lang!r}"))

    text_dict(p.preamble, ("preamble",), require_all=False)
    seen: dict[str, int] = {}
    for i, pr in enumerate(p.principles):
        if not ID_RE.match(pr.id):
            probs.append(at(("principles", i, "id"), f"{pr.id!r}: use lowercase letters, digits, '-', '_' or '.'"))
        if pr.id in seen:
            probs.append(at(("principles", i, "id"), f"duplicate principle id {pr.id!r} (first at principles[{seen[pr.id]}])"))
        seen.setdefault(pr.id, i)
        text_dict(pr.statement, ("principles", i, "statement"), require_all=True)
        if not pr.rationale.strip():
            probs.append(at(("principles", i, "rationale"), "empty text"))

    for section, items in (("examples", p.examples), ("probes", p.probes)):
        ids: dict[str, int] = {}
        for i, it in enumerate(items):
            base = (section, i)
            if it.principle not in seen:
                probs.append(at(base + ("principle",), f"unknown principle {it.principle!r} (principles: {', '.join(seen)})"))
            if it.language not in langs:
                probs.append(at(base + ("language",), f"language {it.language!r} is not declared in languages: [{', '.join(p.languages)}]"))
            fields = ("prompt", "good", "bad") if section == "examples" else ("prompt",)
            for f in fields:
                v = getattr(it, f)
                if v is not None and not v.strip():
                    probs.append(at(base + (f,), "empty text"))
            if section == "examples" and it.bad is not None and _norm(it.bad) == _norm(it.good):
                probs.append(at(base + ("bad",), "the bad answer is the same as the good one"))
            if section == "probes":
                for f in ("includes_any", "excludes"):
                    for j, v in enumerate(getattr(it, f)):
                        if not v.strip():
                            probs.append(at(base + (f, j), "empty text"))
            if section == "probes" and it.contrast and it.expected != "comply":
                probs.append(at(base + ("contrast",), f"a contrast probe is a benign prompt that must be answered: expected must be comply, not {it.expected}"))
            if it.id is not None:
                if it.id in ids:
                    probs.append(at(base + ("id",), f"duplicate id {it.id!r} (first at {section}[{ids[it.id]}])"))
                ids.setdefault(it.id, i)

    probe_prompts = {_norm(q.prompt): i for i, q in enumerate(p.probes)}
    for i, ex in enumerate(p.examples):
        if _norm(ex.prompt) in probe_prompts:
            probs.append(at(("examples", i, "prompt"), f"the same prompt is probe {probe_prompts[_norm(ex.prompt)]}: a probe must not be trained on"))
    seen_probe: dict[str, int] = {}
    for i, q in enumerate(p.probes):
        k = _norm(q.prompt)
        if k in seen_probe:
            probs.append(at(("probes", i, "prompt"), f"duplicate probe prompt (same as probes[{seen_probe[k]}])"))
        seen_probe.setdefault(k, i)

    for i, pr in enumerate(p.principles):
        if not any(q.principle == pr.id for q in p.probes):
            probs.append(at(("principles", i, "id"), f"principle {pr.id!r} has no probes: it cannot be evaluated"))
        n = sum(1 for e in p.examples if e.principle == pr.id)
        if n < MIN_EXAMPLES:
            probs.append(at(("principles", i, "id"), f"principle {pr.id!r} has {n} example(s); at least {MIN_EXAMPLES} are needed to train on it", "warning"))

    for kind in ("refuse", "redirect"):
        for lang, phrases in getattr(p.markers, kind).items():
            if lang not in langs:
                probs.append(at(("markers", kind, lang), f"language {lang!r} is not declared in languages: [{', '.join(p.languages)}]"))
            for j, ph in enumerate(phrases):
                if not ph.strip():
                    probs.append(at(("markers", kind, lang, j), "empty text"))
    return probs


def check_profile(path: str | Path) -> tuple[Profile | None, list[Problem]]:
    """Validate a profile file. Returns (profile or None when the schema fails, every problem found)."""
    path = Path(path).expanduser()
    data, lines = _read(path)
    at = _Locator(lines)
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        probs = []
        for err in e.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else ("required key is missing" if err["type"] == "missing" else err["msg"])
            probs.append(at(tuple(err["loc"]), msg))
        return None, probs
    return prof, semantic_problems(prof, at)


def load_profile(path: str | Path) -> Profile:
    """A valid profile, or a PluralError that lists every problem with its file:line."""
    prof, probs = check_profile(path)
    errors = [p for p in probs if p.severity == "error"]
    if prof is None or errors:
        shown = "\n  ".join(p.format(path) for p in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise PluralError(f"{path}: {len(errors)} problem(s) in the value profile; run `plural values check {path}`\n  {shown}{more}")
    return _with_ids(prof)


def _with_ids(p: Profile) -> Profile:
    """Examples and probes without an explicit id get `<principle>/<language>/<n>` (stable in file order)."""
    counts: dict[tuple, int] = {}

    def name(section: str, it) -> str:
        key = (section, it.principle, it.language)
        counts[key] = counts.get(key, 0) + 1
        return it.id or f"{it.principle}/{it.language}/{'e' if section == 'examples' else 'p'}{counts[key]}"

    ex = [e.model_copy(update={"id": name("examples", e)}) for e in p.examples]
    pr = [q.model_copy(update={"id": name("probes", q)}) for q in p.probes]
    return p.model_copy(update={"examples": ex, "probes": pr})



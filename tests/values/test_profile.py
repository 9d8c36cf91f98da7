"""The profile format: every bundled profile is valid; every problem is reported with its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plural.errors import PluralError
from plural.values.profile import check_profile, load_profile

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted((ROOT / "examples" / "values").glob("*.yaml"))


def test_three_bundled_profiles_in_three_languages():
    assert len(BUNDLED) >= 3
    langs = set()
    for f in BUNDLED:
        prof, probs = check_profile(f)
        assert prof is not None and not probs, [p.format(f) for p in probs]
        langs |= set(prof.languages)
        for pr in prof.principles:
            n = sum(e.principle == pr.id and e.bad is not None for e in prof.examples)
            assert n >= 20, f"{f.name}: principle {pr.id} has only {n} training pairs"
            assert any(q.principle == pr.id for q in prof.probes)
        assert any(q.contrast for q in prof.probes), f"{f.name}: no benign contrast probes"
    assert len(langs) >= 3


def test_bundled_files_match_their_generator(tmp_path, monkeypatch):
    """The committed YAML is what generate.py writes (nobody edited one without the other)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "examples" / "values" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "HERE", tmp_path)
    gen.dump(gen.german(), "de-public-sector.yaml")
    gen.dump(gen.french(), "fr-health.yaml")
    gen.dump(gen.spanish(), "es-consumer.yaml")
    for f in tmp_path.iterdir():
        assert f.read_text(encoding="utf-8") == (ROOT / "examples" / "values" / f.name).read_text(encoding="utf-8"), f.name


BROKEN = """\
id: broken
version: 1
owner: X
languages: [de, en]
principles:
  - id: a
    statement: {de: "Seien Sie höflich.", fr: "Soyez poli."}
    rationale: because
  - id: a
    statement: {de: "Doppelt.", en: "Twice."}
    rationale: because
  - id: lonely
    statement: {de: "Ohne Proben.", en: "  "}
    rationale: x
examples:
  - {principle: a, language: de, prompt: "Hallo?", good: "Guten Tag."}
  - {principle: nope, language: it, prompt: "Ciao?", good: "Buongiorno."}
  - {principle: a, language: de, prompt: "", good: "Leer."}
probes:
  - {id: p1, principle: a, language: de, prompt: "Wie geht es?", expected: comply}
  - {id: p1, principle: a, language: en, prompt: "How are you?", expected: refuse, contrast: true}
"""


def test_check_reports_every_problem_with_its_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(BROKEN, encoding="utf-8")
    prof, probs = check_profile(f)
    assert prof is not None
    got = {(p.line, p.where, p.severity) for p in probs}
    msgs = "\n".join(p.format(f) for p in probs)
    # a language not declared (statement fr), missing a declared language (en)
    assert (7, "principles[0].statement.fr", "error") in got, msgs
    assert any(p.where == "principles[0].statement" and "'en'" in p.message for p in probs), msgs
    # duplicate principle id, at its line
    assert any(p.line == 9 and "duplicate principle id 'a'" in p.message for p in probs), msgs
    # empty text
    assert (13, "principles[2].statement.en", "error") in got, msgs
    assert any(p.where == "examples[2].prompt" and p.line == 18 and "empty" in p.message for p in probs), msgs
    # unknown principle and undeclared language in an example
    assert any(p.where == "examples[1].principle" and p.line == 17 and "unknown principle 'nope'" in p.message for p in probs), msgs
    assert any(p.where == "examples[1].language" and "'it'" in p.message for p in probs), msgs
    # a principle without probes
    assert any(p.where == "principles[2].id" and "no probes" in p.message for p in probs), msgs
    # duplicate probe ids; a contrast probe must be 'comply'
    assert any(p.where == "probes[1].id" and p.line == 21 and "duplicate id 'p1'" in p.message for p in probs), msgs
    assert any(p.where == "probes[1].contrast" for p in probs), msgs
    # too few examples is a warning, not an error
    assert any(p.severity == "warning" and "example(s)" in p.message for p in probs)
    with pytest.raises(PluralError, match=r"broken.yaml:9: error: principles\[1\].id"):
        load_profile(f)


def test_schema_errors_are_located(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("id: x\nversion: 1\nowner: o\nlanguages: [de]\ncolour: blue\nprinciples:\n  - id: a\n    statement: {de: s}\n", encoding="utf-8")
    prof, probs = check_profile(f)
    assert prof is None
    got = {(p.line, p.where, p.message) for p in probs}
    assert (5, "colour", "unknown key") in got
    assert (7, "principles[0].rationale", "required key is missing") in got


def test_system_prompt_renders_language_style_and_principles(small_profile):
    prof = load_profile(small_profile)
    de = prof.system_prompt("de")
    assert de.splitlines()[0] == "Sie sind ein Testdienst."
    assert "förmliche" in de and "- Nennen Sie die Vorschrift." in de and "- Schützen Sie Daten anderer." in de
    en = prof.system_prompt("en")
    assert "- Name the rule." in en and "formal" in en
    assert prof.system_prompt() == de  # the first declared language
    with pytest.raises(PluralError, match="'fr' is not declared"):
        prof.system_prompt("fr")
    # ids are filled in, stable, per principle and language
    assert prof.examples[0].id == "cite/de/e1" and prof.probes[2].id == "refuse-data/de/p1"


def test_cli_check_exit_codes(tmp_path, small_profile):
    f = tmp_path / "broken.yaml"
    f.write_text(BROKEN, encoding="utf-8")
    cli = [sys.executable, "-m", "plural.cli.main", "values", "check"]
    bad = subprocess.run(cli + [str(f)], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"{f}:17: error: examples[1].principle: unknown principle 'nope'" in " ".join(bad.stdout.split())
    ok = subprocess.run(cli + [str(small_profile)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr

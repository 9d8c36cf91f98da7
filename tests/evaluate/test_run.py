"""The runner and the report: base + adapters in one process, numbers and files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plural.evaluate.report import write_report
from plural.evaluate.run import EvalConfig, evaluate


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    d = tmp_path_factory.mktemp("suites")
    rows = {
        "text.jsonl": [{"suite": {"kind": "perplexity", "name": "text"}}]
        + [{"text": f"Paragraph {i}: the library opens at nine and closes at six.", "lang": "en"} for i in range(6)]
        + [{"text": f"Absatz {i}: Die Bibliothek öffnet um neun und schließt um sechs.", "lang": "de"} for i in range(6)],
        "qa.jsonl": [{"suite": {"kind": "qa", "options": {"max_new_tokens": 4}}}]
        + [{"prompt": f"Say {w}", "answer": w} for w in ("yes", "no", "maybe")],
        "pref.jsonl": [{"prompt": "Sunday?", "chosen": "Closed on Sundays.", "rejected": "Open on Sundays."},
                       {"prompt": "Price?", "chosen": "12 euros.", "rejected": "40 euros."}],
    }
    for name, rs in rows.items():
        (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
    return [str(d / "text.jsonl"), str(d / "qa.jsonl"), f"preference:{d / 'pref.jsonl'}"]


@pytest.fixture(scope="module")
def report(store, tiny_adapters, suites):
    cfg = EvalConfig(model="tiny", adapters=[str(a) for a in tiny_adapters], suites=suites, bootstrap=200)
    return evaluate(cfg)


def _values(rep, variant):
    return {(s["name"], m["name"]): m["values"][variant]["value"] for s in rep["suites"] for m in s["metrics"]}


def test_report_has_every_variant_metric_interval_and_difference(report):
    assert [v["name"] for v in report["variants"]] == ["base", "a1", "a2"]
    assert report["reference"] == "base"
    by_name = {s["name"]: s for s in report["suites"]}
    assert set(by_name) == {"text", "qa", "pref"}
    text = {m["name"]: m for m in by_name["text"]["metrics"]}
    assert set(text) == {"bpb", "bpb/en", "bpb/de"}
    assert text["bpb"]["values"]["base"]["n"] == 12 and text["bpb/de"]["values"]["a1"]["n"] == 6
    for s in report["suites"]:
        for m in s["metrics"]:
            assert set(m["values"]) == {"base", "a1", "a2"} and set(m["diffs"]) == {"a1", "a2"}
            for v in m["values"].values():
                assert v["lo"] <= v["value"] + 1e-12 and v["value"] <= v["hi"] + 1e-12
            for v, d in m["diffs"].items():
                assert d["value"] == pytest.approx(m["values"][v]["value"] - m["values"]["base"]["value"])
                assert d["significant"] == (d["lo"] > 0 or d["hi"] < 0)
                if d["significant"]:
                    assert d["better"] == ((d["value"] > 0) == m["higher_is_better"])
    # random adapters change the model: bits per byte differs from the base
    assert text["bpb"]["values"]["a1"]["value"] != text["bpb"]["values"]["base"]["value"]
    qa = by_name["qa"]
    assert len(qa["samples"]) == 3 and set(qa["samples"][0]["outputs"]) == {"base", "a1", "a2"}


def test_switching_adapters_gives_the_numbers_of_separate_runs(report, tiny_model, tiny_adapters, suites):
    """One base load + set_adapter/disable_adapter must equal loading each variant on its own."""
    base_only = evaluate(EvalConfig(model=tiny_model, suites=suites, bootstrap=0))
    a2_only = evaluate(EvalConfig(model=tiny_model, adapters=[str(tiny_adapters[1])], base=False, suites=suites, bootstrap=0))
    assert _values(base_only, "base") == pytest.approx(_values(report, "base"), abs=1e-6)
    assert _values(a2_only, "a2") == pytest.approx(_values(report, "a2"), abs=1e-6)
    assert _values(base_only, "base") == _values(evaluate(EvalConfig(model=tiny_model, suites=suites, bootstrap=0)), "base")


def test_write_report_files(report, tmp_path):
    out = write_report(report, tmp_path / "rep")
    assert json.loads((out / "report.json").read_text())["suites"][0]["metrics"][0]["values"]["base"]["n"] == 12
    for s in ("text", "qa", "pref"):
        assert (out / f"{s}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # plots inlined: opens offline
    assert "http://" not in html and "https://" not in html
    for name in ("a1", "a2", "bpb/de", "Say maybe", "Closed on Sundays."):
        assert name in html
    with pytest.raises(FileExistsError):
        write_report(report, out)


def test_cli_end_to_end_and_bad_input(tiny_model, tiny_adapters, suites, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "plural.cli.main", "eval", "--model", tiny_model, "--adapter", f"mine={tiny_adapters[0]}",
                        "--suite", suites[0], "--output", str(out), "--set", "bootstrap=50"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "bpb/de" in r.stdout and "mine" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["base", "mine"]
    assert rep["bootstrap"]["resamples"] == 50

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"suite": {"kind": "qa"}}\n{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    r = subprocess.run([sys.executable, "-m", "plural.cli.main", "eval", "--model", tiny_model, "--suite", str(bad), "--output", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert f"{bad}:3: a qa item needs \"answer\"" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()

    from typer.testing import CliRunner

    from plural.cli.main import app
    from plural.errors import PluralError

    before = (out / "report.json").read_bytes()
    r = CliRunner().invoke(app, ["eval", "--model", tiny_model, "--suite", suites[0], "--output", str(out)])
    assert isinstance(r.exception, PluralError) and "already exists" in str(r.exception)
    assert (out / "report.json").read_bytes() == before


def test_bundled_default_suites_load():
    from plural.evaluate.run import load_suites

    suites = {s.name: s for s in load_suites(EvalConfig())}
    assert {n: s.kind for n, s in suites.items()} == {
        "multilingual-text": "perplexity", "support-answers": "perplexity", "support-qa": "qa",
        "support-choice": "choice", "support-preference": "preference", "support-samples": "samples"}
    langs = {it["lang"] for it in suites["multilingual-text"].items}
    assert {"en", "de", "fr", "es", "it"} <= langs
    for lang in ("en", "de", "fr", "es", "it"):  # a few KB per language for a meaningful bits per byte
        assert sum(len(it["text"].encode()) for it in suites["multilingual-text"].items if it["lang"] == lang) > 3000
    # the demo's held-out split, languages detected from the answers
    assert {it["lang"] for it in suites["support-answers"].items} == {"en", "de", "fr"}
    assert len(suites["support-samples"].items) == 6


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from plural.config import load_config
    from plural.evaluate.run import load_suites

    (tmp_path / "faq.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "eval.yaml").write_text("suites:\n  - qa:faq.jsonl\n  - {path: faq.jsonl, kind: samples}\noutput: out\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(EvalConfig, Path("..") / "eval.yaml")
    assert cfg.output == tmp_path.resolve() / "out"
    assert [(s.name, s.kind) for s in load_suites(cfg)] == [("faq-qa", "qa"), ("faq-samples", "samples")]
    from plural.config import validate
    from plural.errors import PluralError

    with pytest.raises(PluralError, match=r"eval.yaml: suites\.0\..*knd: unknown key"):
        validate(EvalConfig, {"suites": [{"path": "x", "knd": "qa"}]}, "eval.yaml")

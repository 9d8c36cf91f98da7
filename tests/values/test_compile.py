"""Compile: deterministic, stratified split with no prompt on both sides; valid data files; teacher with cache."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from plural.config import load_config
from plural.data.records import load_records
from plural.errors import PluralError
from plural.tune.config import TuneConfig
from plural.values.compile import compile_profile, split
from plural.values.profile import Example, load_profile
from plural.values.teacher import Teacher, expand, read_reviewed, review_yaml

ROOT = Path(__file__).resolve().parents[2]


def _prompts(path: Path) -> set[str]:
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        o = json.loads(line)
        if "suite" in o:
            continue
        if "messages" in o:
            out.add(next(m["content"] for m in o["messages"] if m["role"] == "user"))
        else:
            out.add(o["prompt"])
    return out


def test_compile_writes_valid_disjoint_deterministic_sets(tmp_path):
    src = ROOT / "examples" / "values" / "de-public-sector.yaml"
    prof = load_profile(src)
    a = compile_profile(prof, tmp_path / "a", source=src)
    b = compile_profile(prof, tmp_path / "b", source=src)
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "pref_train.jsonl", "pref_eval.jsonl", "values_suite.jsonl", "tune-sft.yaml"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name
    assert load_records(a.out / "sft_train.jsonl")[0] == "chat"
    assert load_records(a.out / "pref_train.jsonl")[0] == "preference"
    train = _prompts(a.out / "sft_train.jsonl") | _prompts(a.out / "pref_train.jsonl")
    held = _prompts(a.out / "sft_eval.jsonl") | _prompts(a.out / "pref_eval.jsonl") | _prompts(a.out / "values_suite.jsonl")
    assert train and held and not train & held
    # stratified: every principle is on both sides
    meta = [json.loads(l)["metadata"]["principle"] for l in (a.out / "pref_eval.jsonl").read_text().splitlines()]
    assert set(meta) == {p.id for p in prof.principles}
    n_eval, n_all = len(meta), sum(1 for e in prof.examples if e.bad)
    assert 0.2 < n_eval / n_all < 0.35
    # the generated tune configs are valid and point at the compiled files
    for cfg_name, method in (("tune-sft.yaml", "sft"), ("tune-dpo.yaml", "dpo")):
        cfg = load_config(TuneConfig, a.out / cfg_name)
        assert cfg.method == method and all(p.is_file() for p in cfg.data.train)
    assert load_config(TuneConfig, a.out / "tune-dpo.yaml").preference.reference == "init"
    # SFT replays the bundled general text (every record plain text, in several languages); --no-replay leaves it out
    sft = load_config(TuneConfig, a.out / "tune-sft.yaml")
    assert [p.name for p in sft.data.train] == ["sft_train.jsonl", "replay.jsonl"]
    kind, replay = load_records(a.out / "replay.jsonl")
    assert kind == "text" and len({r.data["metadata"]["lang"] for r in replay}) >= 6
    assert json.loads((a.out / "compile.json").read_text())["counts"]["replay.jsonl"] == len(replay)
    c = compile_profile(prof, tmp_path / "c", source=src, replay=False)
    assert not (c.out / "replay.jsonl").exists()
    assert [p.name for p in load_config(TuneConfig, c.out / "tune-sft.yaml").data.train] == ["sft_train.jsonl"]
    man = json.loads((a.out / "compile.json").read_text())
    assert man["profile"]["id"] == "de-public-sector" and man["sha256"].startswith("sha256:")
    with pytest.raises(FileExistsError):
        compile_profile(prof, a.out, source=src)


def test_split_is_stable_when_examples_are_added():
    ex = [Example(principle="p", language="de", prompt=f"Frage {i}", good="g", bad="b") for i in range(40)]
    train, held = split(ex, 0.25, seed=0)
    assert len(held) == 10 and len(train) == 30
    more = ex + [Example(principle="p", language="de", prompt=f"Neue Frage {i}", good="g", bad="b") for i in range(4)]
    train2, held2 = split(more, 0.25, seed=0)
    # the old examples mostly stay where they were: a side depends on the prompt's hash rank only
    moved = {e.prompt for e in held} ^ {e.prompt for e in held2 if not e.prompt.startswith("Neue")}
    assert len(moved) <= 2
    # the same prompt twice never straddles the split
    dup = ex + [Example(principle="p", language="de", prompt="frage  3", good="g2", bad="b2")]
    tr, he = split(dup, 0.25, seed=0)
    assert ({"Frage 3", "frage  3"} <= {e.prompt for e in tr}) or ({"Frage 3", "frage  3"} <= {e.prompt for e in he})


def test_system_prompt_option_puts_the_rendered_prompt_in_records(tmp_path, small_profile):
    prof = load_profile(small_profile)
    out = compile_profile(prof, tmp_path / "c", source=small_profile, system_prompt=True).out
    first = json.loads((out / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    lang = first["metadata"]["language"]
    assert first["messages"][0] == {"role": "system", "content": prof.system_prompt(lang)}
    header = json.loads((out / "values_suite.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert header["suite"]["options"]["system"]["de"] == prof.system_prompt("de")


class _FakeTeacher(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        last = body["messages"][-1]["content"]
        if "One question per line" in last:
            content = "Wie lange gilt ein Reisepass?\nWo beantrage ich ein Führungszeugnis?\n- Was kostet ein Ausweis?"
        elif last.startswith("Principle:"):
            content = "Die Antwort nennt keine Vorschrift."
        elif last.startswith("Question:"):
            content = "Zehn Jahre. Rechtsgrundlage: § 5 PassG."
        else:
            content = "Zehn Jahre."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_teacher_expands_critiques_revises_and_caches(tmp_path, small_profile):
    prof = load_profile(small_profile).model_copy(update={"languages": ["de"]})
    prof = prof.model_copy(update={"examples": [e for e in prof.examples if e.language == "de"], "principles": prof.principles[:1]})
    srv = HTTPServer(("127.0.0.1", 0), _FakeTeacher)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        t = Teacher(url, "big-model", cache_dir=tmp_path / "cache")
        items = expand(prof, t, per_principle=2)
    finally:
        srv.shutdown()
        srv.server_close()
    assert [i["prompt"] for i in items] == ["Wie lange gilt ein Reisepass?", "Wo beantrage ich ein Führungszeugnis?"]
    assert items[0]["good"].endswith("§ 5 PassG.") and items[0]["bad"] == "Zehn Jahre." and not items[0]["reviewed"]
    assert t.calls == 1 + 2 * 3 and _FakeTeacher.calls == t.calls
    # cached: the same expansion with the server gone costs no call
    t2 = Teacher(url, "big-model", cache_dir=tmp_path / "cache")
    assert expand(prof, t2, per_principle=2) == items and t2.calls == 0 and t2.cached == 7
    # review file: only entries marked reviewed are trained on
    review = tmp_path / "teacher_review.yaml"
    text = review_yaml(items, t).replace("reviewed: false", "reviewed: true", 1)
    review.write_text(text, encoding="utf-8")
    got = read_reviewed(review, prof)
    assert [e.prompt for e in got] == ["Wie lange gilt ein Reisepass?"]
    out = compile_profile(prof, tmp_path / "d", extra=got, heldout=0.0).out
    assert "Wie lange gilt ein Reisepass?" in _prompts(out / "sft_train.jsonl")


def test_teacher_unreachable_is_a_clear_error(tmp_path):
    t = Teacher("http://127.0.0.1:9", "m", cache_dir=tmp_path, timeout=2)
    with pytest.raises(PluralError, match="cannot reach"):
        t.chat([{"role": "user", "content": "hi"}])

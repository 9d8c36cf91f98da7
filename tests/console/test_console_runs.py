"""The runs-folder readers behind the console (serve/console_runs.py), on files as the trainers,
the federation server and `plural eval` leave them, including the broken ones."""

from __future__ import annotations

import json

from console_site import write_runs

from plural.serve import console_runs as R


def test_jsonl_half_written_last_line_vs_a_bad_line_inside(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\nnot json\n[1, 2]\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    records, problems = R.read_jsonl(p, "run/log.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert [(q.line, q.message.split(" ")[0]) for q in problems] == [(2, "not"), (3, "expected"), (5, "half-written")]
    # the same cut line *with* its newline is no longer being written: it is a bad line
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 3, "lo\n')
    assert [q.message for q in R.read_jsonl(p, "x")[1]] == ["not valid JSON; line skipped"]


def test_runs_found_and_read(tmp_path):
    root = write_runs(tmp_path / "runs")
    (root / "empty-start").mkdir()
    (root / "empty-start" / "config.yaml").write_text("method: sft\n")  # killed before its first step
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("method: [unclosed\n")
    (root / "broken" / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    runs = {R.read_run(root, d).id: R.read_run(root, d, detail=True) for d in R.find_runs(root)}
    assert set(runs) == {"support-sft", "legal-dpo", "consortium", "empty-start", "broken"}
    live = runs["support-sft"]
    assert (live.kind, live.status, live.steps, live.checkpoints) == ("train", "in progress", 6, 0)
    assert [r.get("eval_loss") for r in live.log][:2] == [None, 2.3]
    assert any("half-written" in q.message for q in live.problems_list)
    assert any(q.file == "support-sft/checkpoints" for q in live.problems_list)
    assert runs["legal-dpo"].status == "done" and runs["legal-dpo"].checkpoint_list[0].step == 2
    assert runs["empty-start"].status == "not started" and runs["empty-start"].problems_list == []
    assert runs["broken"].method is None and "not valid YAML" in runs["broken"].problems_list[0].message
    fed = runs["consortium"]
    assert (fed.kind, fed.steps, fed.total) == ("federated", 2, 3)
    r1 = fed.rounds[0]
    assert r1.participants == ["clinic-a", "clinic-b"] and r1.bytes_sent == 82000 and r1.epsilon == 1.25
    # token-weighted over the nodes: (1000·1.9 + 2000·1.85) / 3000
    assert abs(r1.train_loss - (1000 * 1.9 + 2000 * 1.85) / 3000) < 1e-9


def test_lookup_opens_only_listed_folders(tmp_path):
    root = write_runs(tmp_path / "runs")
    found = R.find_runs(root)
    assert R.lookup(root, "consortium", found) == root / "consortium"
    for crafted in ("../runs/consortium", "consortium/..", "/etc", "support-sft/eval"):
        assert R.lookup(root, crafted, found) is None


def test_report_summary_current_old_and_unreadable(tmp_path):
    root = write_runs(tmp_path / "runs")
    (root / "garbled").mkdir()
    (root / "garbled" / "report.json").write_text("{not json")
    reports = {d.relative_to(root).as_posix(): R.read_report(root, d)[0] for d in R.find_reports(root)}
    cur = reports["support-sft/eval"]
    assert not cur.old_format and cur.has_html and cur.compared == ["support-qa", "multilingual"]
    assert [(f.suite, f.variant, f.verdict) for f in cur.findings] == [
        ("support-qa", "acme-support", "better"), ("multilingual", "acme-support", "worse")]
    old = reports["old-eval"]
    assert old.old_format and old.findings == [] and old.compared == [] and old.suites == ["support-qa"]
    assert reports["garbled"].problems[0].message.startswith("cannot be read as JSON")
    data = json.loads((root / "support-sft" / "eval" / "report.json").read_text())
    assert [p.prompt for p in R.report_prompts(data)] == ["When does the shop open on Saturday?"]

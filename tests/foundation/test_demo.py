"""`plural demo` end to end through the real executable, on the tiny model (the shipped config's
SmolLM2 run is measured in docs/benchmarks.md#make-demo, not here: it takes minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from plural.tune.customise import contains, facts_score, loops, score, style_ok

from .helpers import chat_rows, write_jsonl

PLURAL = [sys.executable, "-m", "plural.cli.main"]


def test_scoring_of_held_out_answers():
    assert contains("Call 0800 555 0134 now", "0800 555 0134") and not contains("costs 40 euros", "4")
    assert not contains("open at 4:00", "4") and contains("Open 8 h to 19 h.", "19 h") and contains("Tern Island!", "tern island")
    assert facts_score("A city bike costs 12 euros; e-bikes 30.", ["12", "25"]) == 0.5
    assert style_ok("Velora here! … Ride on!", ["Velora here!", "Ride on!"]) and not style_ok("Velora here!", ["Velora here!", "Ride on!"])
    assert loops("Ride on! Ride on! Ride on!") and not loops("Ride on! See you.")
    recs = [{"metadata": {"facts": ["12", "25"], "style": ["Hi!", "Bye!"]}}] * 2
    assert score(["Hi! 12 and 25. Bye!", "12 only"], recs) == {"facts": 0.75, "all_facts": 0.5, "style": 0.5, "loops": 0.0}


def test_demo_trains_compares_and_counts_key_facts(tmp_path, tiny_model, smollm2):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    held = [dict(r, metadata={"lang": "en", "facts": [str(2 * i)], "style": ["Velora here!", "Ride on!"]}) for i, r in enumerate(chat_rows(6))]
    write_jsonl(tmp_path / "eval.jsonl", held)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"method": "sft", "model": tiny_model, "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
                                   "train": {"max_steps": 3, "precision": "fp32", "threads": 1}}))
    r = subprocess.run([*PLURAL, "demo", "--config", str(cfg), "--output", str(tmp_path / "out"), "--set", "train.max_steps=2"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 examples" in r.stdout and "2 steps" in r.stdout and "held-out loss" in r.stdout and "[3/3]" in r.stdout
    assert "held-out answers with all key facts:" in r.stdout and "/6 (base" in r.stdout
    assert json.loads((tmp_path / "out" / "adapter" / "plural.json").read_text())["metrics"]["base_eval_loss"] > 0

"""Defaults that size themselves to the data (tune.schedule) and the end-of-run "did it learn?" report (tune.report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from plural.tune import report, schedule
from plural.tune.config import TuneConfig

from .helpers import chat_rows, write_jsonl

PLURAL = [sys.executable, "-m", "plural.cli.main"]


def cfg_of(**kw) -> TuneConfig:
    d = {"data": {"train": ["x.jsonl"]}}
    for k, v in kw.items():
        sect, key = k.split("__")
        d.setdefault(sect, {})[key] = v
    return TuneConfig.model_validate(d)


def test_small_data_gets_many_unpacked_epochs_and_large_data_one_packed():
    small = schedule.plan(cfg_of(), examples=48, trained_tokens=1500, params=135_000_000, global_batch=4)
    assert (small.packing, small.epochs, small.lr, small.warmup_ratio) == (False, 4.0, 1e-3, 0.05)
    assert small.auto == ["packing", "epochs", "lr", "warmup_ratio", "lora.rslora", "train.neftune_alpha", "data.replay", "train.wise_ft"]
    assert small.recipe == {"lora.rslora": True, "train.neftune_alpha": 5.0, "data.replay": 16, "train.wise_ft": 0.8}
    big = schedule.plan(cfg_of(), examples=50_000, trained_tokens=5_000_000, params=7_000_000_000, global_batch=16)
    assert (big.packing, big.epochs, big.lr) == (True, 1.0, 2e-4)
    # between the ends: epochs ~ 500 / examples, lr ~ 1 / sqrt(params), within the bounds
    assert schedule.plan(cfg_of(), 100, 1, 1_700_000_000, 4).epochs == 4.0
    assert schedule.plan(cfg_of(), 200, 1, 1_700_000_000, 4).epochs == 3.0
    assert schedule.auto_lr(1_700_000_000) == 4.1e-4 and schedule.auto_lr(70_000_000_000) == schedule.LR_MIN
    assert schedule.auto_lr(10_000_000) == schedule.LR_MAX


def test_explicit_values_win_and_the_message_names_what_was_chosen():
    p = schedule.plan(cfg_of(train__epochs=2, train__lr=3e-4, data__packing=True, lora__rslora=False, train__neftune_alpha=0,
                             data__replay=0, train__wise_ft=1), 48, 1500, 135_000_000, 4)
    assert (p.epochs, p.lr, p.packing, p.auto, p.recipe) == (2, 3e-4, True, ["warmup_ratio"], {})
    line = schedule.plan(cfg_of(), 72, 2400, 135_000_000, 4).line(steps=88)
    assert line.startswith("72 examples, 2400 trained tokens, 135M parameters → packing off, 4 epochs, lr 1e-03, warm-up 0.05, "
                           "rsLoRA, NEFTune 5, replay 16 general documents, WiSE-FT 0.8, 88 steps")
    assert line.endswith("set data.packing, train.epochs, train.lr, train.warmup_ratio, lora.rslora, train.neftune_alpha, "
                         "data.replay, train.wise_ft to override")
    # the recipe is sft's: text and dpo get none of it
    assert schedule.plan(TuneConfig.model_validate({"method": "text", "data": {"train": ["x"]}}), 48, 1, 135_000_000, 4).recipe == {}
    # max_steps set: epochs are not chosen (max_steps decides the length)
    assert "epochs" not in schedule.plan(cfg_of(train__max_steps=5), 48, 1, 135_000_000, 4).auto
    # dpo: never packed, a tenth of the SFT rate
    d = schedule.plan(TuneConfig.model_validate({"method": "dpo", "data": {"train": ["x.jsonl"]}}), 48, 1, 135_000_000, 4)
    assert (d.packing, d.lr, "packing" in d.auto, d.recipe) == (False, 1e-4, False, {})


def test_resolved_config_spells_out_the_values_and_periodic_evaluation():
    c = cfg_of(data__eval="e.jsonl")
    p = schedule.plan(c, 48, 1500, 135_000_000, 4)
    r = schedule.resolved(c, p, steps=120)
    assert (r.data.packing, r.train.epochs, r.train.lr, r.train.warmup_ratio, r.train.eval_every) == (False, 4.0, 1e-3, 0.05, 12)
    assert (r.lora.rslora, r.train.neftune_alpha, r.data.replay, r.train.wise_ft) == (True, 5.0, 16, 0.8)
    assert schedule.plan(r, 48, 1500, 135_000_000, 4).auto == []  # config.yaml (a resume) chooses nothing again
    assert schedule.resolved(cfg_of(), p, steps=120).train.eval_every == 0  # no held-out file: no evaluations
    assert schedule.resolved(cfg_of(data__eval="e.jsonl", train__eval_every=7), p, 120).train.eval_every == 7


def test_judge_warns_when_nothing_carried_over_or_when_over_fitting():
    ok = report.judge(1.0, 3.0, 1.5, 3.0, [(10, 2.0), (20, 1.6), (30, 1.5)])
    assert ok.warnings == []
    assert ok.lines()[:2] == ["training loss 3.000 (base) → 1.000 (adapter)", "held-out loss 3.000 (base) → 1.500 (adapter)"]
    flat = report.judge(2.9, 3.0, 3.0, 3.0, [])
    assert len(flat.warnings) == 2
    assert flat.warnings[0].startswith("the adapter is not better than the base on held-out data (3.000 vs 3.000): raise train.epochs or train.lr")
    assert flat.warnings[1].startswith("the training loss barely fell (3.000 → 2.900)")
    over = report.judge(0.1, 3.0, 2.0, 3.0, [(10, 1.9), (20, 1.5), (30, 1.6), (40, 1.8), (50, 2.0)])
    assert over.warnings == ["held-out loss rose for the last 3 evaluations (lowest 1.500 at step 20, now 2.000): "
                             "the adapter is over-fitting; lower train.epochs (or set train.max_steps: 20) or train.lr"]
    # two rises are not yet a trend
    assert report.judge(0.1, 3.0, 1.8, 3.0, [(10, 1.9), (20, 1.5), (30, 1.6), (40, 1.8)]).warnings == []
    assert "no data.eval" in report.judge(1.0, 3.0, None, None, []).lines()[1]


def test_minimal_config_through_the_cli_sizes_itself_and_reports(tmp_path, tiny_model):
    """`plural tune` with only method/model/data: the chosen values are printed and land in
    config.yaml; at the end the losses against the base and a warning for a run that learned nothing."""
    write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    write_jsonl(tmp_path / "eval.jsonl", chat_rows(8))
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump({"method": "sft", "model": tiny_model, "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
                                   "train": {"precision": "fp32", "max_steps": 3, "threads": 1}, "output": "run"}))
    env = {**os.environ, "COLUMNS": "200"}
    # a learning rate too small to move anything in 3 steps: the run says it did not learn
    r = subprocess.run([*PLURAL, "tune", str(cfg), "--set", "train.lr=1e-7"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "24 examples" in r.stdout and "packing off, warm-up 0.05, rsLoRA, NEFTune 5, replay 16 general documents, WiSE-FT 0.8, 3 steps: set data.packing, " \
        "train.warmup_ratio, lora.rslora, train.neftune_alpha, data.replay, train.wise_ft to override" in r.stdout
    assert "kept 0.8 of the trained update (train.wise_ft, WiSE-FT)" in r.stdout
    assert "held-out loss" in r.stdout and "warning: the adapter is not better than the base on held-out data" in r.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["packing"] is False and saved["train"]["lr"] == 1e-7 and saved["train"]["warmup_ratio"] == 0.05
    assert saved["train"]["eval_every"] == 1  # 3 steps, about ten evaluations a run
    m = json.loads((tmp_path / "run" / "adapter" / "plural.json").read_text())["metrics"]
    assert m["base_eval_loss"] > 0 and m["warnings"] and "not better than the base" in m["warnings"][0]
    assert (saved["lora"]["rslora"], saved["train"]["neftune_alpha"], saved["data"]["replay"], saved["train"]["wise_ft"]) == (True, 5.0, 16, 0.8)
    # with no max_steps, epochs are chosen too: 24 examples + 16 replayed documents → 4 epochs of 10 steps
    r = subprocess.run([*PLURAL, "tune", str(cfg), "--set", "train.max_steps=null", "--set", "train.epochs=null", "--set", "output=run2",
                        "--set", "data.eval=null", "--set", "train.lr=5e-3", "--set", "model=" + tiny_model],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 epochs" in r.stdout and "40 steps" in r.stdout and "no data.eval" in r.stdout
    assert yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())["train"]["epochs"] == 4.0


def test_replay_mixes_bundled_general_text_over_languages(tiny_model):
    """data.replay: N documents of the bundled CC0 corpus, one per language first, every token trained."""
    from plural.store.models import load_tokenizer
    from plural.tune.sft import REPLAY, replay_docs

    tok = load_tokenizer(tiny_model)
    docs = replay_docs(tok, cfg_of(data__replay=8))
    texts = [json.loads(l)["text"] for l in REPLAY.read_text(encoding="utf-8").splitlines()]
    firsts = {tok.decode(d.input_ids[:6]) for d in docs}
    assert len(docs) == 8 and len(firsts) == 8 and all(d.n_trained == len(d) for d in docs)
    # the corpus is 8 languages × 8 topics, language by language: one document from each language
    langs = {i // 8 for i, t in enumerate(texts) if tok.decode(tok(t)["input_ids"][:6]) in firsts}
    assert langs == set(range(8))
    assert replay_docs(tok, cfg_of()) == []

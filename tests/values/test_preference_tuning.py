"""DPO and ORPO: the losses against hand-computed values, the log-probs against a plain forward, the
reference (adapter disabled) against the base, and the recipes lowering their loss on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from plural.config import validate
from plural.data.packing import collate
from plural.errors import PluralError
from plural.tune.config import TuneConfig
from plural.tune.dpo import DPOLoss, build_pair_rows, dpo_loss, sequence_logps
from plural.tune.orpo import log_odds, orpo_loss

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "2+2 is 4.", "rejected": "It is 5, or maybe 6."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "London is the capital of France."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A banana."},
    {"prompt": "Say hello in German.", "chosen": [{"role": "assistant", "content": "Hallo!"}], "rejected": "Bonjour!"},
]


@pytest.fixture
def pref_file(tmp_path) -> Path:
    f = tmp_path / "pref.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n", encoding="utf-8")
    return f


def test_dpo_loss_hand_computed():
    # margin = (-1 - -1.5) - (-2 - -1.5) = 1; loss = -log σ(0.5 · 1) = log(1 + e^-0.5)
    got = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    assert got.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    # policy == reference: log 2 whatever the log-probs
    same = dpo_loss(torch.tensor([-3.0, -7.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -7.0]), torch.tensor([-1.0, -2.0]), beta=0.1)
    assert torch.allclose(same, torch.full((2,), math.log(2.0)))


def test_orpo_loss_hand_computed():
    lc, lr = math.log(0.5), math.log(0.2)  # P = 0.5 and 0.2: odds 1 and 0.25, log odds ratio = log 4
    assert log_odds(torch.tensor([lc])).item() == pytest.approx(0.0, abs=1e-6)
    got = orpo_loss(torch.tensor([lc]), torch.tensor([lr]), lam=0.1).item()
    want = -lc - 0.1 * math.log(1 / (1 + math.exp(-math.log(4.0))))
    assert got == pytest.approx(want, abs=1e-5)


def _tiny_peft(tiny_model, seed=0, r=4):
    from peft import LoraConfig, get_peft_model

    from plural.store.models import load_model

    model, tok, _ = load_model(tiny_model)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return peft, tok


def test_rows_and_sequence_logps_match_a_plain_forward(tiny_model, pref_file):
    model, tok = _tiny_peft(tiny_model)
    rows = build_pair_rows(tok, [pref_file], 512)
    assert len(rows) == 4 and all(sum(x != -100 for x in r.labels) == 2 for r in rows)
    b = collate(rows, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        logp, n = sequence_logps(model, **b)
        for k, r in enumerate(rows):
            starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r)]
            for s in range(2):
                a, e = starts[s], starts[s + 1]
                ids = r.input_ids[a:e]
                first = next(i for i in range(a, e) if r.labels[i] != -100) - a
                lp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
                want = sum(lp[t - 1, ids[t]].item() for t in range(first, len(ids)))
                assert logp[k, s].item() == pytest.approx(want, abs=1e-3)
                assert n[k, s].item() == len(ids) - first
    # the completion is the answer plus the template's end-of-turn: decode the chosen part of pair 0
    r = rows[0]
    first = r.labels.index(next(x for x in r.labels if x != -100))
    end = r.position_ids.index(0, 1)
    assert tok.decode(r.input_ids[first:end]).startswith("2+2 is 4.<|im_end|>")


def test_reference_is_the_base_with_the_adapter_disabled(tiny_model, pref_file):
    from plural.store.models import load_model

    model, tok = _tiny_peft(tiny_model)
    with torch.no_grad():  # make the adapter do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    base, _, _ = load_model(tiny_model)
    ids = torch.tensor([tok("Hello there, how are you?")["input_ids"]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            ref = model(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(ref, plain, atol=1e-5)
    # and a fresh adapter (B = 0) gives DPO loss log 2 per pair: policy == reference
    fresh, _ = _tiny_peft(tiny_model)
    rows = build_pair_rows(tok, [pref_file], 512)
    loss, pairs = DPOLoss(fresh, beta=0.1)(**collate(rows, tok.pad_token_id))  # (sum, units), tune.loop's contract
    assert pairs == len(rows) and loss.item() / pairs == pytest.approx(math.log(2.0), abs=1e-5)


def test_config_validation(tmp_path):
    base = {"data": {"train": ["x.jsonl"]}}
    with pytest.raises(PluralError, match="init_adapter: only used by method dpo or orpo"):
        validate(TuneConfig, {**base, "method": "sft", "init_adapter": "a"}, "t.yaml")
    with pytest.raises(PluralError, match="preference: only used"):
        validate(TuneConfig, {**base, "method": "text", "preference": {"beta": 0.5}}, "t.yaml")
    with pytest.raises(PluralError, match="preference.beta"):
        validate(TuneConfig, {**base, "method": "dpo", "preference": {"beta": 0}}, "t.yaml")
    with pytest.raises(PluralError, match="lora: the adapter's rank"):
        validate(TuneConfig, {**base, "method": "dpo", "init_adapter": "a", "lora": {"r": 4}}, "t.yaml")
    with pytest.raises(PluralError, match="preference.reference: init needs method dpo and an init_adapter"):
        validate(TuneConfig, {**base, "method": "dpo", "preference": {"reference": "init"}}, "t.yaml")
    with pytest.raises(PluralError, match="preference.reference: init needs"):
        validate(TuneConfig, {**base, "method": "orpo", "init_adapter": "a", "preference": {"reference": "init"}}, "t.yaml")
    with pytest.raises(PluralError, match="preference.gamma: unknown key"):
        validate(TuneConfig, {**base, "method": "dpo", "preference": {"gamma": 1}}, "t.yaml")
    from plural.config import resolve_paths

    cfg = validate(TuneConfig, resolve_paths(TuneConfig, {**base, "method": "orpo", "init_adapter": "runs/sft/adapter"}, tmp_path), "t.yaml")
    assert cfg.init_adapter == (tmp_path / "runs/sft/adapter").resolve()
    # a resolved sft config (every key spelled out, as written to a run folder) loads again
    sft = validate(TuneConfig, {**base, "method": "sft"}, "t.yaml")
    assert validate(TuneConfig, sft.model_dump(mode="json"), "config.yaml") == sft


def _run(method, tiny_model, pref_file, out, steps, lr, init=None, reference="base"):
    from plural import tune

    cfg = {"method": method, "model": tiny_model, "data": {"train": [str(pref_file)], "eval": str(pref_file), "max_length": 128},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "preference": {"beta": 0.5, **({"reference": reference} if method == "dpo" else {})}, "train": {"max_steps": steps, "batch_size": 2, "lr": lr, "warmup_ratio": 0, "scheduler": "constant", "threads": 2},
           "output": str(out)}
    if init:  # the adapter's shape comes from the init adapter
        cfg["init_adapter"] = str(init)
        del cfg["lora"]
    return tune.run(validate(TuneConfig, cfg, "test"))


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_recipe_lowers_its_loss_and_writes_the_run_folder(method, tiny_model, pref_file, tmp_path):
    from plural.store.adapters import read_manifest

    adapter = _run(method, tiny_model, pref_file, tmp_path / "run", steps=12, lr=5e-3)
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert len(log) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    if method == "dpo":  # starts at log 2 (fresh adapter = reference) and separates the pairs
        assert losses[0] == pytest.approx(math.log(2.0), abs=1e-5) and losses[-1] < losses[0] - 0.1, losses
    for f in ("config.yaml", "loss.png", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (tmp_path / "run" / f).is_file(), f
    man = read_manifest(adapter)
    assert man["method"] == method and man["metrics"]["pairs_seen"] == 12 * 2  # steps × batch
    acc_key = "eval_reward_accuracy" if method == "dpo" else "eval_odds_accuracy"
    assert man["metrics"][acc_key] == 1.0  # trained on the same four pairs it is scored on
    assert man["metrics"]["eval_loss"] < log[0]["loss"]


def test_dpo_starts_from_init_adapter(tiny_model, pref_file, tmp_path):
    from plural.store.adapters import load_adapter_weights, read_manifest

    first = _run("orpo", tiny_model, pref_file, tmp_path / "sft", steps=2, lr=5e-3)
    second = _run("dpo", tiny_model, pref_file, tmp_path / "dpo", steps=1, lr=1e-12)
    # lr ~ 0: the DPO adapter is still the init adapter when it starts from one ...
    cont = _run("dpo", tiny_model, pref_file, tmp_path / "dpo2", steps=1, lr=1e-12, init=first)
    a, c = load_adapter_weights(first), load_adapter_weights(cont)
    assert a.keys() == c.keys() and all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    # ... and a fresh one otherwise (B = 0, moved by ~lr in one Adam step)
    s = load_adapter_weights(second)
    assert all(v.abs().max() < 1e-9 for k, v in s.items() if "lora_B" in k)
    assert any(not torch.allclose(a[k], s[k]) for k in a if "lora_B" in k)
    assert read_manifest(cont)["init_adapter"]["method"] == "orpo"


def test_dpo_reference_init_starts_at_log_2_from_a_trained_adapter(tiny_model, pref_file, tmp_path):
    """From an adapter that already prefers the chosen answers, DPO against the base starts below
    log 2; against the init adapter (log-probs precomputed) it starts at log 2 and still learns."""
    from plural.store.adapters import read_manifest

    first = _run("dpo", tiny_model, pref_file, tmp_path / "first", steps=12, lr=5e-3)
    vs_base = _run("dpo", tiny_model, pref_file, tmp_path / "vs-base", steps=6, lr=5e-3, init=first)
    vs_init = _run("dpo", tiny_model, pref_file, tmp_path / "vs-init", steps=12, lr=5e-3, init=first, reference="init")
    log = {d: [json.loads(l)["loss"] for l in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("vs-base", "vs-init")}
    assert log["vs-base"][0] < math.log(2.0) - 0.1
    assert log["vs-init"][0] == pytest.approx(math.log(2.0), abs=1e-4)
    assert sum(log["vs-init"][-2:]) < sum(log["vs-init"][:2]) - 0.1, log["vs-init"]  # each step: 2 of the 4 pairs
    assert read_manifest(vs_init)["metrics"]["reference"] == "init" and read_manifest(vs_base)["metrics"]["reference"] == "base"

"""Config, message allowlist, checkpoints, the FedProx term and the CLI's errors (no processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plural.errors import PluralError
from plural.federate import checkpoint, protocol
from plural.federate.config import FederateConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federate" / "federate.yaml"


def test_example_config_loads_and_partitions_exist():
    from plural.config import load_config

    cfg = load_config(FederateConfig, EXAMPLE)
    assert [p.name for p in cfg.partitions] == ["clinic", "bank", "mairie"]
    assert all((p / "train.jsonl").is_file() and (p / "eval.jsonl").is_file() for p in cfg.partitions)


@pytest.mark.parametrize("bad,msg", [
    ({"strategy": "exact", "aggregator": {"rule": "median"}}, "strategy: exact aggregates the products"),
    ({"strategy": "exact", "server_optimizer": {"name": "fedadam"}}, "server_optimizer: none"),
    ({"strategy": "ffa", "privacy": {"noise_multiplier": 1, "clip_norm": 1}, "aggregator": {"rule": "median"}}, "needs aggregator.rule: mean"),
    ({"strategy": "fedavg", "aggregator": {"rul": "mean"}}, "aggregator.rul: unknown key"),
])
def test_config_errors_name_the_key(tmp_path, bad, msg):
    import yaml

    from plural.config import load_config

    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(PluralError, match=msg.replace(".", r"\.")):
        load_config(FederateConfig, p)


def test_round_lr_is_a_cosine_over_rounds():
    cfg = FederateConfig(rounds=4, local={"lr": 1e-3, "lr_min": 0.0})
    lrs = [cfg.round_lr(r) for r in range(1, 5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(0.5e-3) and all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    t = cfg.tune_config([EXAMPLE], None, 3, Path("/tmp/x"))
    assert t.train.max_steps == cfg.local.steps and t.train.lr == pytest.approx(lrs[2]) and t.train.seed != cfg.tune_config([EXAMPLE], None, 2, Path("/tmp/x")).train.seed


def _records(**recs):
    from flwr.app import RecordDict

    return RecordDict(recs)


def test_protocol_allows_only_lora_tensors_and_named_scalars():
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    lora = ArrayRecord(torch_state_dict={"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8)})
    ok = _records(adapter=lora, metrics=MetricRecord({"num-tokens": 10, "train-loss": 1.5}), node=ConfigRecord({"org": "clinic"}))
    protocol.check_content(ok, "to-server")
    protocol.check_content(_records(adapter=lora, config=ConfigRecord({"round": 1, "lr": 1e-3, "base-fingerprint": "sha256:ab", "train": True})), "to-node")
    bad = [
        (_records(batch=ArrayRecord([np.arange(10)])), "record 'batch'"),  # raw token ids in their own record
        (_records(adapter=ArrayRecord(torch_state_dict={"input_ids": torch.zeros(2, 8)})), "array 'input_ids'"),
        (_records(adapter=ArrayRecord(torch_state_dict={"x.lora_A.weight": torch.zeros(3, dtype=torch.int64)})), "shape"),
        (_records(metrics=MetricRecord({"per-example-loss": [1.0, 2.0]})), "metric 'per-example-loss'"),
        (_records(metrics=MetricRecord({"num-tokens": [1, 2]})), "metric 'num-tokens'"),
        (_records(node=ConfigRecord({"org": "x" * 500})), "config entry 'org'"),
        (_records(node=ConfigRecord({"text": "the patient said ..."})), "config entry 'text'"),
        (_records(node=ConfigRecord({"org": b"bytes"})), "config entry 'org'"),
    ]
    for content, what in bad:
        with pytest.raises(PluralError, match="not allowed") as e:
            protocol.check_content(content, "to-server")
        assert what in str(e.value)
    summary = protocol.summary(ok)
    assert summary["adapter"]["arrays"]["base_model.model.layers.0.q_proj.lora_A.weight"]["shape"] == [4, 8]


def test_checkpoint_roundtrip_keeps_the_last_two(tmp_path):
    st = checkpoint.ServerState(1, {"a.lora_A.weight": torch.randn(2, 3)}, {"m": {"a.lora_B.weight": torch.ones(3, 2)}},
                                [{"round": 1}], {"clinic": {"rounds": 1, "tokens": 5}}, 1)
    for r in (1, 2, 3):
        st.round = r
        checkpoint.save(tmp_path, st)
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert [c.name for c in ckpts] == ["round-0002", "round-0003"]
    back = checkpoint.load(ckpts[-1])
    assert back.round == 3 and torch.equal(back.adapter["a.lora_A.weight"], st.adapter["a.lora_A.weight"])
    assert torch.equal(back.opt["m"]["a.lora_B.weight"], torch.ones(3, 2)) and back.nodes == st.nodes and back.dp_rounds == 1
    assert checkpoint.started(tmp_path) and not checkpoint.started(tmp_path / "fresh")


def test_fedprox_term_is_added_once_per_step(tiny_model):
    from plural.data.packing import collate, unpacked
    from plural.data.chat import encode_chat
    from plural.federate.prox import ProxLoss
    from plural.store.models import load_model
    from plural.tune.config import LoraConfig
    from plural.tune.loop import TokenLoss
    from plural.tune.sft import add_lora
    from types import SimpleNamespace

    model, tok, _ = load_model(tiny_model)
    model = add_lora(model, SimpleNamespace(lora=LoraConfig(r=2, dropout=0.0, target_modules=["q_proj"])))
    rows = unpacked([encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])])
    b = collate(rows, tok.pad_token_id)
    n = int((b["labels"][:, 1:] != -100).sum())
    prox = ProxLoss(model, mu=0.1)
    with torch.no_grad():
        base, count = TokenLoss(model)(**b)
        assert int(count) == n and int(prox(**b)[1]) == n  # (sum, count): the count is the trained tokens
        assert float(prox(**b)[0]) == pytest.approx(float(base))  # at the global weights the term is 0
        for p in prox.params:
            p.add_(0.5)
        dist2 = sum(0.25 * p.numel() for p in prox.params)
        assert float(prox(**b)[0]) == pytest.approx(float(TokenLoss(model)(**b)[0]) + 0.05 * dist2 * n, rel=1e-5)


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from plural.cli import main as cli

    monkeypatch.setattr(sys, "argv", ["plural", "federate", "local", str(EXAMPLE), "--orgs", "5", "--set", f"output={tmp_path / 'o'}"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "partitions: the config lists 3 data folder(s), --orgs asks for 5" in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["plural", "node", "start", "--superlink", "127.0.0.1:1", "--data", str(tmp_path), "--insecure"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "must hold train.jsonl" in capsys.readouterr().err

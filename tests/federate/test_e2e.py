"""End to end: real flower-superlink and flower-supernode processes on 127.0.0.1, tiny model.

One federation (2 organisations, 3 rounds) that loses a node mid-run, has its server killed
and restarted, resumes from the round checkpoint, takes the node back, and ends with an ordinary
plural adapter. Every message each node received or sent is then checked: only LoRA tensors and
named scalars travelled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from plural.federate import checkpoint, protocol
from plural.federate.config import FederateConfig, LocalConfig
from plural.federate.launcher import LocalFederation, all_runs, follow, submit, wait_for_nodes
from plural.tune.config import LoraConfig

pytestmark = pytest.mark.e2e

QA = [("What colour is the sky?", "The sky is blue."), ("How many legs has a cat?", "A cat has four legs."),
      ("What is two plus two?", "Two plus two is four."), ("Name a fruit.", "An apple is a fruit."),
      ("Where do fish live?", "Fish live in water."), ("What do bees make?", "Bees make honey.")]


def _org(root: Path, name: str, prefix: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{prefix} {a}"}]} for q, a in QA]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return d


def _wait(pred, timeout: float, what: str, fed: LocalFederation) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        fed.alive()
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; logs in {fed.workdir / 'logs'}")


def test_federation_survives_node_loss_and_server_restart(tmp_path, tiny_model):
    a, b = _org(tmp_path / "data", "alpha", "Alpha says:"), _org(tmp_path / "data", "beta", "Beta says:")
    out = tmp_path / "run"
    cfg = FederateConfig(
        model=tiny_model, rounds=3, min_nodes=1, strategy="exact", seed=3,
        local=LocalConfig(steps=2, batch_size=2, lr=5e-3, max_length=64, threads=1, device="cpu", precision="fp32"),
        lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        straggler_grace=10, round_timeout=240, wait_for_nodes=120, partitions=[a, b], output=out,
    )
    fed = LocalFederation(tmp_path / "flower", audit=True)
    ckpt = lambda r: (out / checkpoint.CKPT_DIR / f"round-{r:04d}" / "state.json").exists()
    lines: list[str] = []
    try:
        fed.start_superlink()
        fed.start_node("alpha", a, 1)
        fed.start_node("beta", b, 1)
        wait_for_nodes(fed.client(), 2, 120, fed.alive)
        submit(fed.client(), cfg)
        _wait(lambda: ckpt(1), 150, "round 1", fed)
        fed.kill_node("beta")  # dies while round 2 runs
        _wait(lambda: ckpt(2), 150, "round 2 without beta", fed)
        fed.kill_superlink()  # the server goes down before round 3 completes
        assert not ckpt(3)
        fed.start_superlink()
        fed.start_node("beta", b, 1)  # and beta comes back
        client = fed.client()
        wait_for_nodes(client, 2, 120, fed.alive)  # alpha reconnects by itself
        run_id = submit(client, cfg.model_copy(update={"resume": True}))
        # The killed run is still "running" in the restarted superlink's database; resuming stopped
        # it, so no node spends round 3 on messages nobody collects.
        assert [s for r, s in all_runs(client).items() if r != run_id] == ["finished:stopped"]
        status = follow(client, run_id, lines.append, alive=fed.alive, poll=0.5)
    finally:
        fed.stop()
    assert status == "finished:completed", "\n".join(lines)

    events = [json.loads(l) for l in (out / "progress.jsonl").read_text().splitlines()]
    rounds = {e["round"]: e for e in events if e["event"] == "round"}
    orgs = {r: sorted(n["org"] for n in e["nodes"]) for r, e in rounds.items()}
    assert orgs[1] == ["alpha", "beta"] and orgs[2] == ["alpha"]
    # Round 3: beta has rejoined. Whether alpha's reply also lands inside the straggler grace
    # (10 s after the first reply, min_nodes=1) depends on how fast its fresh ClientApp process
    # starts on a busy machine, so only beta's return is asserted.
    assert "beta" in orgs[3] and set(orgs[3]) <= {"alpha", "beta"}
    assert rounds[2]["failed"], "round 2 should record the node it went on without"
    assert {"event": "resumed", "round": 2} in events
    assert all(0 <= e["truncation_error"] < 1 for e in rounds.values())
    assert any(l.startswith("round 3/3") for l in lines)  # progress streamed by the launcher

    # The result is an ordinary plural adapter: manifest with the federation, loadable by PEFT.
    from plural.store.adapters import attach_adapter, load_adapter_weights, read_manifest
    from plural.store.models import get_model, load_model

    man = read_manifest(out / "adapter")
    assert man["method"] == "federated"
    fed_block = man["federation"]
    assert fed_block["rounds"] == 3 and fed_block["strategy"] == "exact" and fed_block["privacy"] is None
    per_org = {n["org"]: n["rounds"] for n in fed_block["nodes"]}
    assert per_org["beta"] == 2 and per_org["alpha"] == len([r for r in orgs.values() if "alpha" in r])
    assert man["metrics"]["eval_loss"] > 0 and set(man["metrics"]["eval_loss_per_org"]) == set(orgs[3])
    w = load_adapter_weights(out / "adapter")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in w.items())
    model, _, stored = load_model(tiny_model)
    attach_adapter(model, out / "adapter", base=get_model(tiny_model))

    # Every message that reached or left a node: only adapter tensors and allowlisted scalars.
    audit = [json.loads(l) for f in sorted((tmp_path / "flower" / "audit").glob("*.jsonl")) for l in f.read_text().splitlines()]
    sent = [m for m in audit if m["direction"] == "sent" and not m["error"]]
    # Every train reply of the three rounds plus the final evaluate replies (alpha may also have
    # answered the killed run's round-3 message before the superlink went down, hence >=).
    assert len(sent) >= sum(map(len, orgs.values())) + len(man["metrics"]["eval_loss_per_org"])
    lora_shapes = {k: list(v.shape) for k, v in w.items()}
    for m in audit:
        if m["error"]:
            continue
        assert set(m["content"]) <= {"adapter", "config", "metrics", "node"}
        for name, rec in m["content"].items():
            if name == "adapter":
                for k, arr in rec["arrays"].items():
                    assert protocol.LORA_KEY.match(k) and arr["shape"] == lora_shapes[k.replace(".weight", ".weight")], k
            else:
                allowed = set(protocol.CONFIG_KEYS) | protocol.METRIC_KEYS | set(protocol.NODE_KEYS)
                assert set(rec["values"]) <= allowed
                assert all(isinstance(v, (int, float)) or (isinstance(v, str) and len(v) <= protocol.MAX_STR) for v in rec["values"].values())

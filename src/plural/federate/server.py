"""The ServerApp: rounds of "send the global adapter, collect trained adapters, aggregate".

Runs inside the superlink's machine (flower-superlink starts it as a subprocess for each run).
The federation config travels in the run config (key `plural`, JSON). Each round:

  1. wait until at least `min_nodes` nodes are connected; send each a `train` message with the
     global LoRA tensors (only B for ffa) and the round's lr;
  2. collect replies until all arrived, or `straggler_grace` seconds after `min_nodes` arrived,
     or `round_timeout`. A node that died or failed is left out; the round repeats (up to
     `max_round_retries`) if fewer than `min_nodes` replied. It can rejoin in a later round.
  3. aggregate (strategy.aggregate_round), checkpoint, log the round.

After the last round, each node reports the global adapter's held-out loss (`evaluate`), and the
result is saved as an ordinary plural adapter (method "federated", manifest `federation` block).
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from types import SimpleNamespace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from plural.errors import PluralError
from plural.federate import checkpoint, protocol
from plural.federate.aggregate import dp_epsilon
from plural.federate.config import FederateConfig
from plural.federate.strategy import aggregate_round, exchanged_keys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = ServerApp()
PROGRESS = "progress.jsonl"
CONFIG = "config.yaml"


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FederateConfig.model_validate_json(str(context.run_config["plural"]))
    try:
        run(grid, cfg)
    except PluralError as e:
        log(WARNING, "plural: error: %s", e)
        raise


def _tell(out: Path, rec: dict, text: str) -> None:
    """One progress record: a JSON line in the run folder and a log line for `flwr log`."""
    with open(out / PROGRESS, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    log(INFO, "plural: %s", text)


def _peft_model(cfg: FederateConfig):
    """The base model with fresh LoRA (seeded): the shared initialisation every node starts from."""
    import torch

    from plural.store.models import load_model
    from plural.tune.sft import add_lora

    model, _, stored = load_model(cfg.model, with_tokenizer=False)
    torch.manual_seed(cfg.seed)
    return add_lora(model, SimpleNamespace(lora=cfg.lora)), stored  # add_lora reads only cfg.lora


def initial_adapter(cfg: FederateConfig) -> tuple[dict, str]:
    """The round-1 global LoRA tensors (A seeded, B zero) and the base model's fingerprint."""
    from peft import get_peft_model_state_dict

    model, stored = _peft_model(cfg)
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}, stored.fingerprint


def init_state(cfg: FederateConfig) -> tuple[checkpoint.ServerState, str]:
    """A fresh state or the latest checkpoint (with `resume`); returns (state, base fingerprint)."""
    from plural.config import dump_yaml

    out = cfg.output
    ckpts = checkpoint.list_checkpoints(out)
    state, fp = initial_adapter(cfg)
    if cfg.resume and ckpts:
        st = checkpoint.load(ckpts[-1])
        _tell(out, {"event": "resumed", "round": st.round}, f"resumed after round {st.round} from {ckpts[-1]}")
        return st, fp
    if not cfg.resume and checkpoint.started(out):
        raise PluralError(f"run folder {out} exists and is not empty: resume it (--resume) or set output: to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(dump_yaml(cfg.model_copy(update={"resume": False})), encoding="utf-8")
    return checkpoint.ServerState(0, state), fp


def _wait_for_nodes(grid: Grid, cfg: FederateConfig) -> list[int]:
    end = time.time() + cfg.wait_for_nodes
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.min_nodes:
            return nodes
        if time.time() > end:
            raise PluralError(f"only {len(nodes)} node(s) connected after {cfg.wait_for_nodes:.0f} s; min_nodes is {cfg.min_nodes}")
        if len(nodes) != last:
            log(INFO, "plural: waiting for nodes: %d connected, %d needed", len(nodes), cfg.min_nodes)
            last = len(nodes)
        time.sleep(1)


def _collect(grid: Grid, messages: list[Message], cfg: FederateConfig) -> tuple[list[Message], list[int]]:
    """Send, then pull replies until all are in, or `straggler_grace` after min_nodes, or timeout.

    Returns (replies, node ids that did not reply in time)."""
    ids = [i for i in grid.push_messages(messages) if i]
    pending = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
    replies: list[Message] = []
    end = time.time() + cfg.round_timeout
    enough_at = None
    while pending and time.time() < end:
        for r in grid.pull_messages(list(pending)):
            pending.pop(r.metadata.reply_to_message_id, None)
            replies.append(r)
        ok = sum(1 for r in replies if not r.has_error())
        if enough_at is None and ok >= cfg.min_nodes:
            enough_at = time.time()
        if enough_at is not None and time.time() - enough_at > cfg.straggler_grace:
            break
        if pending:
            time.sleep(0.5)
    return replies, list(pending.values())


def _send(grid: Grid, cfg: FederateConfig, nodes: list[int], kind: str, adapter: dict, rnd: int, fp: str, lr: float):
    content = RecordDict({
        "adapter": ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in adapter.items()}),
        "config": ConfigRecord({"round": rnd, "lr": lr, "base-fingerprint": fp, "train": kind == "train"}),
    })
    protocol.check_content(content, "to-node")
    sent_bytes = content["adapter"].count_bytes()
    msgs = [Message(content, nid, kind, group_id=f"{kind}-{rnd}", ttl=cfg.round_timeout) for nid in nodes]
    replies, missing = _collect(grid, msgs, cfg)
    good, failed = [], []
    for r in replies:
        if r.has_error():
            failed.append((r.metadata.src_node_id, r.error.reason))
            continue
        try:
            protocol.check_content(r.content, "to-server")
        except PluralError as e:
            failed.append((r.metadata.src_node_id, str(e)))
            continue
        good.append(r)
    return good, failed, missing, sent_bytes


def run(grid: Grid, cfg: FederateConfig) -> Path:
    out = cfg.output
    st, fp = init_state(cfg)
    for rnd in range(st.round + 1, cfg.rounds + 1):
        lr = cfg.round_lr(rnd)
        send = {k: st.adapter[k] for k in st.adapter}  # nodes need A too (frozen under ffa)
        for attempt in range(cfg.max_round_retries + 1):
            nodes = _wait_for_nodes(grid, cfg)
            t0 = time.time()
            good, failed, missing, sent = _send(grid, cfg, nodes, "train", send, rnd, fp, lr)
            for nid, why in failed:
                log(WARNING, "plural: round %d: node %d failed: %s", rnd, nid, _reason(why))
            for nid in missing:
                log(WARNING, "plural: round %d: node %d did not reply in time; going on without it", rnd, nid)
            if len(good) >= cfg.min_nodes:
                break
            if attempt < cfg.max_round_retries:
                log(WARNING, "plural: round %d: %d of %d nodes replied, fewer than min_nodes=%d; repeating the round (retry %d of %d)",
                    rnd, len(good), len(nodes), cfg.min_nodes, attempt + 1, cfg.max_round_retries)
        else:
            raise PluralError(f"round {rnd}: fewer than min_nodes={cfg.min_nodes} nodes replied in {cfg.max_round_retries + 1} attempts")

        keys = exchanged_keys(cfg.strategy, st.adapter)
        states, tokens, per_node = [], [], []
        for r in good:
            arr = r.content["adapter"].to_torch_state_dict()
            if set(arr) != set(keys):
                log(WARNING, "plural: round %d: node %d sent other tensors than the global adapter's; ignored", rnd, r.metadata.src_node_id)
                continue
            full = dict(st.adapter)
            full.update({k: v.float() for k, v in arr.items()})
            m = r.content["metrics"]
            org = str(r.content["node"]["org"])
            states.append(full)
            tokens.append(int(m["num-tokens"]))
            rec = {"node": r.metadata.src_node_id, "org": org, "tokens": int(m["num-tokens"]), "train_loss": round(float(m["train-loss"]), 5),
                   "bytes_received": r.content["adapter"].count_bytes(), "bytes_sent": sent}
            for src, dst in (("eval-loss-before", "eval_loss_global"), ("eval-loss-after", "eval_loss_local")):
                if src in m:
                    rec[dst] = round(float(m[src]), 5)
            per_node.append(rec)
            n = st.nodes.setdefault(org, {"rounds": 0, "tokens": 0})
            n["rounds"] += 1
            n["tokens"] += int(m["num-tokens"])
        if len(states) < cfg.min_nodes:
            raise PluralError(f"round {rnd}: only {len(states)} usable replies (min_nodes={cfg.min_nodes})")

        st.adapter, st.opt, report = aggregate_round(cfg, st.adapter, states, tokens, st.opt, rnd)
        st.round = rnd
        rec = {"event": "round", "round": rnd, "rounds": cfg.rounds, "lr": lr, "nodes": per_node,
               "failed": [n for n, _ in failed] + missing, "seconds": round(time.time() - t0, 2), **report}
        if cfg.privacy is not None:
            st.dp_rounds += 1
            eps, order = dp_epsilon(cfg.privacy.noise_multiplier, st.dp_rounds, cfg.privacy.delta)
            rec["privacy"] = {"epsilon": round(eps, 4), "delta": cfg.privacy.delta, "rdp_order": order}
        st.history.append(rec)
        checkpoint.save(out, st)
        _tell(out, rec, _round_line(rec))

    final_eval = None
    if cfg.evaluate:
        good, failed, missing, _ = _send(grid, cfg, _wait_for_nodes(grid, cfg), "evaluate", st.adapter, cfg.rounds, fp, 0.0)
        losses = [(float(r.content["metrics"]["eval-loss-before"]), int(r.content["metrics"]["eval-tokens"]), str(r.content["node"]["org"]))
                  for r in good if "eval-loss-before" in r.content["metrics"]]
        if losses:
            final_eval = {"eval_loss": sum(l * n for l, n, _ in losses) / sum(n for _, n, _ in losses),
                          "per_org": {o: round(l, 5) for l, _, o in losses}}
            _tell(out, {"event": "evaluate", **final_eval}, f"held-out loss of the global adapter: {final_eval['eval_loss']:.4f} " + ", ".join(f"{o} {l:.4f}" for o, l in final_eval["per_org"].items()))
    adapter = save_result(cfg, st, final_eval)
    _tell(out, {"event": "done", "adapter": str(adapter)}, f"adapter saved to {adapter}")
    return adapter


def _reason(why: str) -> str:
    """The useful line of a ClientApp error (Flower sends the whole traceback as text)."""
    lines = [l.strip() for l in why.strip().splitlines() if l.strip()]
    errs = [l for l in lines if "Error:" in l or "Exception:" in l]
    return (errs or lines or ["unknown error"])[-1][:500]


def _round_line(rec: dict) -> str:
    nodes = ", ".join(f"{n['org']} loss {n['train_loss']:.4f} tok {n['tokens']} ↑{n['bytes_received'] / 1e6:.2f}MB ↓{n['bytes_sent'] / 1e6:.2f}MB" for n in rec["nodes"])
    extra = ""
    if "truncation_error" in rec:
        extra += f"; truncation error {rec['truncation_error']:.2e}"
    if "privacy" in rec:
        extra += f"; privacy ε={rec['privacy']['epsilon']:.3f} (δ={rec['privacy']['delta']:g})"
    if rec["failed"]:
        extra += f"; without node(s) {rec['failed']}"
    return f"round {rec['round']}/{rec['rounds']} ({rec['seconds']:.1f} s): {nodes}{extra}"


def federation_block(cfg: FederateConfig, st: checkpoint.ServerState) -> dict:
    priv = None
    if cfg.privacy is not None:
        eps, _ = dp_epsilon(cfg.privacy.noise_multiplier, st.dp_rounds, cfg.privacy.delta)
        priv = {"epsilon": round(eps, 4), "delta": cfg.privacy.delta, "noise_multiplier": cfg.privacy.noise_multiplier,
                "clip_norm": cfg.privacy.clip_norm, "accountant": "rdp", "level": "client"}
    trunc = [h["truncation_error"] for h in st.history if "truncation_error" in h]
    return {
        "rounds": st.round,
        "nodes": [{"org": o, **v} for o, v in sorted(st.nodes.items())],
        "strategy": cfg.strategy,
        "exact": cfg.strategy in ("exact", "ffa"),
        "aggregator": cfg.aggregator.model_dump(mode="json"),
        "server_optimizer": cfg.server_optimizer.name,
        "server_lr": cfg.server_optimizer.lr,
        "fedprox_mu": cfg.fedprox_mu,
        "privacy": priv,
        "max_truncation_error": max(trunc) if trunc else None,
        "engine": "flwr 1.42",
    }


def save_result(cfg: FederateConfig, st: checkpoint.ServerState, final_eval: dict | None) -> Path:
    from peft import set_peft_model_state_dict

    from plural.store.adapters import build_manifest, save_adapter

    model, stored = _peft_model(cfg)
    set_peft_model_state_dict(model, st.adapter)
    metrics = {"rounds": st.round, "trained_tokens": sum(v["tokens"] for v in st.nodes.values())}
    if final_eval:
        metrics["eval_loss"] = final_eval["eval_loss"]
        metrics["eval_loss_per_org"] = final_eval["per_org"]
    manifest = build_manifest(stored, "federated", cfg.model_dump(mode="json"), [], metrics,
                              run=str(cfg.output), federation=federation_block(cfg, st))
    return save_adapter(model, cfg.output / "adapter", manifest)

"""The ClientApp: one organisation's node trains the global adapter on its own data.

Flower starts a fresh process for every message, so each call loads the base model from the
store (fast safetensors), attaches the global LoRA tensors from the message, trains with the same
recipe code as `plural tune` (tune.sft.build_rows / add_lora, tune.loop.fit) and replies with the
trained LoRA tensors and a few scalars. The data never leaves this machine.

The node's settings come from `flower-supernode --node-config` (set by `plural node start`):
    data-dir   folder with train.jsonl (and optionally eval.jsonl)
    org        the organisation's name shown in progress and in the adapter's manifest
    audit-log  optional JSONL file: a summary of every message received and sent
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plural.errors import PluralError
from plural.federate import protocol
from plural.federate.config import FederateConfig

# Never reach a model hub from a node; everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def audit_mod(msg: Message, ctx: Context, call_next) -> Message:
    """Check every message in and out against the protocol allowlist; log it if asked to."""
    log_path = ctx.node_config.get("audit-log")
    protocol.check_content(msg.content, "to-node")
    _audit(log_path, "received", msg)
    reply = call_next(msg, ctx)
    if not reply.has_error():
        protocol.check_content(reply.content, "to-server")
    _audit(log_path, "sent", reply)
    return reply


def _audit(path, direction: str, msg: Message) -> None:
    if not path:
        return
    rec = {"time": time.time(), "direction": direction, "type": msg.metadata.message_type,
           "round": msg.metadata.group_id, "run_id": msg.metadata.run_id}
    rec["error"] = msg.error.reason if msg.has_error() else None
    rec["content"] = None if msg.has_error() else protocol.summary(msg.content)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


app = ClientApp(mods=[audit_mod])


def node_data(ctx: Context) -> tuple[list[Path], Path | None]:
    d = ctx.node_config.get("data-dir")
    if not d:
        raise PluralError("this node was started without a data folder (flower-supernode --node-config 'data-dir=\"DIR\"', or plural node start --data DIR)")
    d = Path(str(d))
    train = d / "train.jsonl"
    if not train.is_file():
        raise PluralError(f"{d}: no train.jsonl (a node's data folder holds train.jsonl and optionally eval.jsonl)")
    ev = d / "eval.jsonl"
    return [train], ev if ev.is_file() else None


def _setup(cfg: FederateConfig, adapter: dict, rnd: int, files: list[Path], ev: Path | None, fingerprint: str | None, train: bool):
    """Base model + global adapter + this node's rows: (tune cfg, model, tok, rows, eval_rows, device)."""
    import torch

    from plural.store.models import load_model
    from plural.tune import loop
    from plural.tune.sft import add_lora, build_rows

    tcfg = cfg.tune_config(files, ev, rnd, Path(tempfile.gettempdir()))
    if cfg.local.threads:
        torch.set_num_threads(cfg.local.threads)
    torch.manual_seed(tcfg.train.seed)
    model, tok, stored = load_model(cfg.model)
    if fingerprint is not None and stored.fingerprint != fingerprint:
        raise PluralError(f"base model {cfg.model!r} on this node ({stored.fingerprint[:19]}…) differs from the server's ({fingerprint[:19]}…)")
    rows = build_rows(tok, files, tcfg) if train else []
    eval_rows = build_rows(tok, [ev], tcfg) if ev else None
    device = loop.pick_device(cfg.local.device)
    model = add_lora(model, tcfg)
    _load_state(model, adapter)
    if cfg.strategy == "ffa":
        # FFA-LoRA: A stays the shared initialisation; only B trains, so averaging B is exact.
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    return tcfg, model.to(device), tok, rows, eval_rows, device


def _load_state(model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model, state)
    unexpected = getattr(res, "unexpected_keys", []) or []
    if unexpected:
        raise PluralError(f"the global adapter does not fit this node's model (e.g. {unexpected[0]}); check lora.target_modules and the base model")


def _eval(model, rows, pad_id, device, precision) -> float | None:
    from plural.tune import loop

    if not rows:
        return None
    return loop.evaluate(loop.TokenLoss(model), rows, pad_id, device, loop.autocast_dtype(precision, device))


def local_train(cfg: FederateConfig, adapter: dict, rnd: int, files: list[Path], ev: Path | None,
                fingerprint: str | None = None) -> tuple[dict, dict]:
    """One node's round: the global adapter in, (trained tensors to send, metrics) out.

    The tensors are the exchanged ones only (all LoRA factors; B alone under ffa)."""
    from peft import get_peft_model_state_dict

    from plural.federate.prox import ProxLoss
    from plural.tune import loop

    t0 = time.perf_counter()
    tcfg, model, tok, rows, eval_rows, device = _setup(cfg, adapter, rnd, files, ev, fingerprint, train=True)
    before = _eval(model, eval_rows, tok.pad_token_id, device, cfg.local.precision)
    model.train()
    loss_module = ProxLoss(model, cfg.fedprox_mu) if cfg.fedprox_mu > 0 else None
    with tempfile.TemporaryDirectory(prefix="plural-node-") as work:
        res = loop.fit(tcfg, Path(work), model, rows, None, tok.pad_token_id, loop.Dist(), device, loss_module=loss_module)
    after = _eval(model, eval_rows, tok.pad_token_id, device, cfg.local.precision)
    state = get_peft_model_state_dict(model)
    if cfg.strategy == "ffa":
        state = {k: v for k, v in state.items() if "lora_B" in k}
    metrics = {"num-tokens": int(res.tokens_trained), "train-loss": float(res.train_loss), "seconds": round(time.perf_counter() - t0, 2)}
    if before is not None:
        metrics.update({"eval-loss-before": before, "eval-loss-after": after})
    return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}, metrics


def local_eval(cfg: FederateConfig, adapter: dict, ev: Path, fingerprint: str | None = None) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) of `adapter` on the eval file."""
    from plural.tune.loop import n_targets

    _, model, tok, _, eval_rows, device = _setup(cfg, adapter, cfg.rounds, [ev], ev, fingerprint, train=False)
    return _eval(model, eval_rows, tok.pad_token_id, device, cfg.local.precision), n_targets(eval_rows)


def _from_message(msg: Message, ctx: Context):
    import torch  # noqa: F401  (flwr converts ArrayRecord to torch only once torch is imported)

    cfg = FederateConfig.model_validate_json(str(ctx.run_config["plural"]))
    conf = msg.content["config"]
    return cfg, msg.content["adapter"].to_torch_state_dict(), int(conf["round"]), str(conf["base-fingerprint"])


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    cfg, adapter, rnd, fp = _from_message(msg, ctx)
    files, ev = node_data(ctx)
    state, metrics = local_train(cfg, adapter, rnd, files, ev, fp)
    content = RecordDict({
        "adapter": ArrayRecord(torch_state_dict=state),
        "metrics": MetricRecord(metrics),
        "node": ConfigRecord({"org": _org(ctx)}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, ctx: Context) -> Message:
    cfg, adapter, _, fp = _from_message(msg, ctx)
    _, ev = node_data(ctx)
    metrics = {}
    if ev is not None:
        loss, n = local_eval(cfg, adapter, ev, fp)
        metrics = {"eval-loss-before": loss, "eval-tokens": n}
    return Message(RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord({"org": _org(ctx)})}), reply_to=msg)


def _org(ctx: Context) -> str:
    org = ctx.node_config.get("org") or Path(str(ctx.node_config.get("data-dir", f"node-{ctx.node_id}"))).name
    return str(org)[:protocol.MAX_STR]


"""Recipe: supervised fine-tuning of a LoRA adapter on chat data (`method: sft`).

Setup (model from the store, data encoded with the model's own chat template, loss on assistant
tokens only, end-of-turn token included), loop (tune.loop.fit), save (PEFT adapter + plural.json).
`method: text` (continued pre-training) is the same recipe with every token trained: see text.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from plural.data.chat import Encoded, encode_chat, encode_text
from plural.data.packing import Row, pack, truncate, unpacked
from plural.data.records import load_records
from plural.errors import PluralError
from plural.store.adapters import build_manifest, save_adapter
from plural.store.models import load_model
from plural.tune import loop
from plural.tune.config import TuneConfig

ENCODERS: dict[str, Callable] = {
    # record kind -> encode(tokenizer, record) -> Encoded
    "chat": lambda tok, r: encode_chat(tok, r["messages"]),  # loss on the assistant turns
    "text": lambda tok, r: encode_text(tok, r["text"]),  # loss on every token
}
# The record kinds each method trains on. `sft` also takes text files beside its chat files, as
# Axolotl mixes completion and chat-template data sets: general text replayed so the adapter keeps
# the base model's language ability (value profiles do this, docs/value-profiles.md).
KINDS = {"sft": ("chat", "text"), "text": ("text",)}


def encode_file(tok, path: Path, method: str, max_length: int, overlong: str) -> list[Encoded]:
    kinds = KINDS[method]
    k, records = load_records(path, kinds[0] if len(kinds) == 1 else None)
    if k not in kinds:
        raise PluralError(f"{path}: holds {k} records; method {method} trains on {' or '.join(kinds)} records")
    out = []
    for rec in records:
        e = ENCODERS[k](tok, rec.data)
        if len(e) > max_length:
            if overlong == "error":
                raise PluralError(f"{path}:{rec.line}: {len(e)} tokens, over data.max_length={max_length} (or set data.overlong: truncate)")
            e = truncate(e, max_length)
        if e.n_trained == 0:
            raise PluralError(f"{path}:{rec.line}: no trainable tokens within data.max_length={max_length}")
        out.append(e)
    return out


def encode_files(tok, files: list[Path], cfg: TuneConfig) -> list[Encoded]:
    return [e for f in files for e in encode_file(tok, f, cfg.method, cfg.data.max_length, cfg.data.overlong)]


REPLAY = Path(__file__).resolve().parent.parent / "resources" / "replay" / "general.jsonl"


def replay_docs(tok, cfg: TuneConfig) -> list[Encoded]:
    """`data.replay` documents of the bundled general text, evenly spread over its topics and languages."""
    if not cfg.data.replay:
        return []
    enc = encode_file(tok, REPLAY, "text", cfg.data.max_length, "truncate")
    # The corpus is 8 languages × 8 topics, language by language: a stride of 9 (coprime to 64)
    # walks both, so 8 documents are 8 languages on 8 different topics.
    return [enc[(i * 9) % len(enc)] for i in range(cfg.data.replay)]


def to_rows(enc: list[Encoded], cfg: TuneConfig) -> list[Row]:
    return pack(enc, cfg.data.max_length) if cfg.data.packing else unpacked(enc)


def build_rows(tok, files: list[Path], cfg: TuneConfig) -> list[Row]:
    return to_rows(encode_files(tok, files, cfg), cfg)


def add_lora(model, cfg: TuneConfig):
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [] if lc.target_modules == "all-linear" else [m for m in lc.target_modules if m not in present]
    if missing:
        raise PluralError(f"lora.target_modules: {', '.join(missing)} not found in the model (it has e.g. {', '.join(sorted(present)[:8])})")
    pc = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules if lc.target_modules == "all-linear" else list(lc.target_modules),
                    use_rslora=bool(lc.rslora), task_type="CAUSAL_LM")
    return get_peft_model(model, pc)


def sized(cfg: TuneConfig, run_dir: Path, enc: list[Encoded], model, dist, tok) -> tuple[TuneConfig, list[Row]]:
    """Fill the values the config left out from the data and the model (tune.schedule), say so,
    and record them in the run's config.yaml. Returns the resolved config and the training rows
    (of `enc` and the replayed documents, which do not count as examples)."""
    from plural.tune import schedule, write_config

    G = cfg.train.batch_size * cfg.train.grad_accum * dist.world
    params = sum(p.numel() for p in model.parameters())
    plan = schedule.plan(cfg, len(enc), sum(e.n_trained for e in enc), params, G)
    cfg = schedule.with_plan(cfg, plan)
    rows = to_rows(list(enc) + replay_docs(tok, cfg), cfg)
    steps = loop.total_steps(len(rows), cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": plan.epochs})}), dist.world)
    cfg = schedule.resolved(cfg, plan, steps)
    if dist.main:
        print(plan.line(steps), flush=True)
        write_config(run_dir, cfg)
    return cfg, rows


def run(cfg: TuneConfig, run_dir: Path, resume: bool = False) -> Path:
    device = loop.pick_device(cfg.train.device)
    dist = loop.init_dist(device)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world)))))
    torch.manual_seed(cfg.train.seed)

    model, tok, stored = load_model(cfg.model)
    enc = encode_files(tok, cfg.data.train, cfg)
    cfg, train_rows = sized(cfg, run_dir, enc, model, dist, tok)
    eval_rows = build_rows(tok, [cfg.data.eval], cfg) if cfg.data.eval else None
    model = add_lora(model, cfg).to(device)
    model.train()

    loss_mod = loop.TokenLoss(model)
    # No end-of-fit evaluation: report.measure below evaluates the adapter as it is saved (after wise_ft).
    res = loop.fit(cfg, run_dir, model, train_rows, eval_rows, tok.pad_token_id, dist, device, resume=resume, loss_module=loss_mod,
                   final_eval=False)

    adapter_dir = run_dir / "adapter"
    if dist.main:
        from plural.tune import report

        amp = loop.autocast_dtype(cfg.train.precision, device)
        keep = cfg.train.wise_ft or 1.0
        if keep != 1:
            loop.keep_fraction(model, keep)
            print(f"kept {keep:g} of the trained update (train.wise_ft, WiSE-FT): the adapter stays nearer the base's general language", flush=True)
        learned = report.measure(loss_mod, model, train_rows, eval_rows, tok.pad_token_id, device, amp, res.history)
        for line in learned.lines():
            print(line, flush=True)
        metrics = {
            # eval_loss of the saved adapter (after train.wise_ft), not of the last training step
            "steps": res.steps, "train_loss": res.train_loss, "eval_loss": learned.eval_loss if eval_rows else None,
            "final_train_loss": round(learned.train_loss, 4), "base_train_loss": round(learned.base_train_loss, 4),
            "base_eval_loss": None if learned.base_eval_loss is None else round(learned.base_eval_loss, 4),
            "warnings": learned.warnings,
            "trained_tokens": res.tokens_trained, "seconds": round(res.seconds, 2),
            "trained_tokens_per_second": round(res.tokens_per_second, 1), "processes": dist.world,
            "precision": "bf16" if loop.autocast_dtype(cfg.train.precision, device) else "fp32",
        }
        data_files = list(cfg.data.train) + ([cfg.data.eval] if cfg.data.eval else []) + ([REPLAY] if cfg.data.replay else [])
        manifest = build_manifest(stored, cfg.method, cfg.model_dump(mode="json"), data_files, metrics, run=str(run_dir))
        save_adapter(model, adapter_dir, manifest)
        from plural.tune.plot import plot_history

        plot_history(res.history, run_dir / "loss.png", title=f"{cfg.method} · {cfg.model}")
    dist.barrier()
    return adapter_dir

"""Recipe: Direct Preference Optimization of a LoRA adapter (`method: dpo`).

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains on pairs (prompt x, chosen y_w, rejected y_l):

    loss = -log σ( β [ (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)) ] )

with log π(y|x) the summed log-probability of the completion tokens. The reference π_ref is, by
default (`preference.reference: base`), the base model with the LoRA adapter switched off (PEFT
`disable_adapter()`), so there is no second copy of the model in memory; it is evaluated under
no_grad in the same step. Training usually starts from an SFT adapter on the same data
(`init_adapter:`), which makes the chosen answers likely before DPO separates them from the
rejected ones. Against the base, an SFT adapter that already separates the pairs starts DPO at a
loss near 0 (1e-5 measured on a value profile), where Adam's normalised steps are noise; with
`reference: init` the reference is the init adapter as loaded, its log-probs computed once for
every pair before the first step (TRL's precompute_ref_log_probs), so the loss starts at log 2
and no reference forward runs during training.

Rows. One row per pair: the chosen and the rejected conversation packed back to back, positions
restarting at 0 for each (so they never attend to each other, see data.packing). `labels` are
IGNORE everywhere except at the first completion token of each sequence: those two markers say
where each completion starts. The loss module returns (Σ pair losses, pairs), and the shared loop
(tune.loop.fit) divides by the global number of pairs: the mean loss per pair, exact across
gradient accumulation and processes like the SFT loss.

Setup (model, adapter, rows), loop (tune.loop.fit with the DPO loss module), save (PEFT adapter +
plural.json, loss.png, log.jsonl) -- the same run folder as `method: sft`.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plural.data.chat import IGNORE, encode_chat
from plural.data.packing import Row, collate
from plural.data.records import completion_text, load_records, prompt_messages
from plural.errors import PluralError
from plural.store.adapters import attach_adapter, build_manifest, load_manifest, save_adapter
from plural.store.models import load_model
from plural.tune import loop
from plural.tune.config import TuneConfig

# ----------------------------------------------------------------------------- data


def encode_pair(tok, rec: dict, max_length: int, where: str) -> Row:
    """One preference record -> one row [chosen | rejected] with a marker at each completion start."""
    prompt = [dict(m, weight=0) if m["role"] == "assistant" else m for m in prompt_messages(rec)]
    ids, labels, pos = [], [], []
    for key in ("chosen", "rejected"):
        e = encode_chat(tok, prompt + [{"role": "assistant", "content": completion_text(rec[key])}])
        start = next(i for i, x in enumerate(e.labels) if x != IGNORE)
        if start >= max_length - 1:
            raise PluralError(f"{where}: the prompt alone is {start} tokens, no room for the '{key}' answer within data.max_length={max_length}")
        n = min(len(e), max_length)  # a too-long completion is cut at the end
        ids += e.input_ids[:n]
        labels += [IGNORE] * start + [e.input_ids[start]] + [IGNORE] * (n - start - 1)
        pos += list(range(n))
    return Row(ids, labels, pos)


def build_pair_rows(tok, files: list[Path], max_length: int) -> list[Row]:
    rows = []
    for f in files:
        _, records = load_records(f, "preference")
        rows += [encode_pair(tok, r.data, max_length, f"{f}:{r.line}") for r in records]
    return rows


# ----------------------------------------------------------------------------- log-probs and loss


def sequence_logps(model: nn.Module, input_ids, labels, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths of each row's two sequences.

    input_ids/labels/position_ids [B, T] -> (logp [B, 2], n_tokens [B, 2]); column 0 = chosen.
    Logits are computed only at completion positions (the [N, V] projection dominates the cost).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state  # [B, T, H]
    seg = (position_ids == 0).long().cumsum(1) - 1            # [B, T]: 0 chosen, 1 rejected, 2 padding
    seen = (labels != IGNORE).long().cumsum(1)                # [B, T]: completion markers passed so far
    comp = ((seg == 0) & (seen >= 1)) | ((seg == 1) & (seen >= 2))
    sel = comp[:, 1:]                                         # token t+1 is predicted at position t
    logits = base.get_output_embeddings()(h[:, :-1][sel]).float()  # [N, V]
    lp = -F.cross_entropy(logits, input_ids[:, 1:][sel], reduction="none")  # [N]
    B = input_ids.shape[0]
    slot = (torch.arange(B, device=input_ids.device)[:, None] * 2 + seg[:, 1:])[sel]  # [N] in 0..2B-1
    logp = torch.zeros(2 * B, device=lp.device, dtype=lp.dtype).index_add(0, slot, lp).view(B, 2)
    n = torch.zeros(2 * B, device=lp.device, dtype=lp.dtype).index_add(0, slot, torch.ones_like(lp)).view(B, 2)
    return logp, n


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Per-pair DPO loss [B] from summed log-probs [B] (eq. 7 of the paper)."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def _pair_key(ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[int, ...]:
    """A row's tokens without its padding (the padding is the third segment starting at position 0)."""
    return tuple(ids[(position_ids == 0).long().cumsum(0) <= 2].tolist())


class DPOLoss(nn.Module):
    """forward(**collated rows) -> (Σ per-pair DPO loss, number of pairs).

    `ref_logps`: reference log-probs [2] per row (keyed by its tokens), precomputed by
    `reference_logps`; None: the base with the adapter switched off, in the same step."""

    def __init__(self, model: nn.Module, beta: float, ref_logps: dict[tuple[int, ...], torch.Tensor] | None = None):
        super().__init__()
        self.model, self.beta, self.ref_logps = model, beta, ref_logps

    def rewards(self, input_ids, labels, position_ids) -> torch.Tensor:
        """Implicit reward margins β[(π_w - ref_w) - (π_l - ref_l)] per pair, [B]."""
        pi, _ = sequence_logps(self.model, input_ids, labels, position_ids)
        if self.ref_logps is None:
            with torch.no_grad(), self.model.disable_adapter():
                ref, _ = sequence_logps(self.model, input_ids, labels, position_ids)
        else:
            ref = torch.stack([self.ref_logps[_pair_key(i, p)] for i, p in zip(input_ids, position_ids)]).to(pi)
        return self.beta * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))

    def forward(self, input_ids, labels, position_ids) -> tuple[torch.Tensor, int]:
        return (-F.logsigmoid(self.rewards(input_ids, labels, position_ids))).sum(), input_ids.shape[0]


def _eval_batches(module: nn.Module, rows: list[Row], pad_id: int, device, amp: torch.dtype | None, batch_size: int = 8):
    """Collated batches of `rows` on `device`, each consumed under the training autocast (`amp`: fit()
    stores the frozen weights in that dtype), with `module` in eval mode until the last one."""
    was = module.training
    module.eval()
    try:
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                yield b
    finally:
        module.train(was)


@torch.no_grad()
def reference_logps(model: nn.Module, rows: list[Row], pad_id: int, device, amp: torch.dtype | None) -> dict[tuple[int, ...], torch.Tensor]:
    """The model's (init adapter's) completion log-probs [2] of every row, as the training step computes them."""
    out = {}
    for b in _eval_batches(model, rows, pad_id, device, amp):
        lp, _ = sequence_logps(model, **b)
        for ids, pos, v in zip(b["input_ids"], b["position_ids"], lp.float().cpu()):
            out[_pair_key(ids, pos)] = v
    return out


@torch.no_grad()
def pair_accuracy(loss_mod: nn.Module, rows: list[Row], pad_id: int, device, amp: torch.dtype | None) -> float:
    """Fraction of pairs whose margin (loss_mod.rewards) is positive: DPO's 'reward accuracy'."""
    wins = sum(int((loss_mod.rewards(**b) > 0).sum()) for b in _eval_batches(loss_mod, rows, pad_id, device, amp))
    return wins / max(len(rows), 1)


# ----------------------------------------------------------------------------- setup shared with orpo


def load_policy(cfg: TuneConfig):
    """The base model with a trainable LoRA adapter: the init adapter's weights, or a fresh one per `lora:`."""
    from plural.tune.sft import add_lora

    model, tok, stored = load_model(cfg.model)
    if cfg.init_adapter:
        model = attach_adapter(model, cfg.init_adapter, base=stored, is_trainable=True)
    else:
        model = add_lora(model, cfg)
    return model, tok, stored


def setup(cfg: TuneConfig, run_dir: Path):
    device = loop.pick_device(cfg.train.device)
    dist = loop.init_dist(device)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world)))))
    torch.manual_seed(cfg.train.seed)
    model, tok, stored = load_policy(cfg)
    train_rows = build_pair_rows(tok, cfg.data.train, cfg.data.max_length)
    eval_rows = build_pair_rows(tok, [cfg.data.eval], cfg.data.max_length) if cfg.data.eval else None
    cfg = sized(cfg, run_dir, train_rows, model, dist)
    model = model.to(device)
    # The training forward from the start (fit would set it too): DPO's precomputed reference
    # log-probs must come from the forward the policy's first step uses, or under bf16 autocast
    # they differ by rounding and the first loss is not log 2.
    loop.fold_lora_updates(model)
    model.train()
    return cfg, device, dist, model, tok, stored, train_rows, eval_rows


def sized(cfg: TuneConfig, run_dir: Path, rows: list[Row], model, dist) -> TuneConfig:
    """Epochs, lr and warm-up from the number of pairs when the config leaves them out (tune.schedule)."""
    from plural.tune import schedule, write_config

    G = cfg.train.batch_size * cfg.train.grad_accum * dist.world
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    plan = schedule.plan(cfg, len(rows), sum(len(r) for r in rows), params, G)
    cfg = schedule.with_plan(cfg, plan)
    steps = loop.total_steps(len(rows), cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": plan.epochs})}), dist.world)
    cfg = schedule.resolved(cfg, plan, steps)
    if dist.main:
        print(plan.line(steps).replace(" examples", " pairs"), flush=True)
        write_config(run_dir, cfg)
    return cfg


def save(cfg: TuneConfig, run_dir: Path, model, stored, res: loop.FitResult, dist: loop.Dist, device, extra_metrics: dict) -> Path:
    adapter_dir = run_dir / "adapter"
    if dist.main:
        metrics = {
            "steps": res.steps, "train_loss": res.train_loss, "eval_loss": res.eval_loss, "pairs_seen": res.tokens_trained,
            "seconds": round(res.seconds, 2), "processes": dist.world,
            "precision": "bf16" if loop.autocast_dtype(cfg.train.precision, device) else "fp32", **extra_metrics,
        }
        data_files = list(cfg.data.train) + ([cfg.data.eval] if cfg.data.eval else [])
        init_man = load_manifest(cfg.init_adapter) if cfg.init_adapter else None
        init = {"init_adapter": {"path": str(cfg.init_adapter), "method": init_man.method if init_man else None}} if cfg.init_adapter else {}
        manifest = build_manifest(stored, cfg.method, cfg.model_dump(mode="json"), data_files, metrics, run=str(run_dir), **init)
        save_adapter(model, adapter_dir, manifest)
        from plural.tune.plot import plot_history

        plot_history(res.history, run_dir / "loss.png", title=f"{cfg.method} loss per pair · {cfg.model}")
    dist.barrier()
    return adapter_dir


# ----------------------------------------------------------------------------- the recipe


def run(cfg: TuneConfig, run_dir: Path, resume: bool = False) -> Path:
    cfg, device, dist, model, tok, stored, train_rows, eval_rows = setup(cfg, run_dir)
    amp = loop.autocast_dtype(cfg.train.precision, device)
    ref = None
    if cfg.preference.reference == "init":
        # Before fit() (and before a resume loads trained weights): the init adapter as loaded.
        ref = reference_logps(model, train_rows + (eval_rows or []), tok.pad_token_id, device, amp)
    loss_mod = DPOLoss(model, cfg.preference.beta, ref)
    res = loop.fit(cfg, run_dir, model, train_rows, eval_rows, tok.pad_token_id, dist, device, resume=resume, loss_module=loss_mod)
    extra = {"beta": cfg.preference.beta, "reference": cfg.preference.reference}
    if eval_rows:
        extra["eval_reward_accuracy"] = round(pair_accuracy(loss_mod, eval_rows, tok.pad_token_id, device, amp), 4)
    return save(cfg, run_dir, model, stored, res, dist, device, extra)

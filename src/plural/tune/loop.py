"""The training loop shared by the recipes: token-weighted loss, DDP, checkpoints, exact resume.

Loss. A loss module returns `(sum, count)`: its loss summed over the units it averages over
(trained tokens for SFT, pairs for DPO/ORPO) and the number of those units in the micro-batch.
Each optimizer step back-propagates the sums of all micro-batches, then divides the gradient by
the *global* count (all micro-batches of all processes). So gradient accumulation and
multi-process training give the gradient of the same full batch (the bug Unsloth and HF fixed in
2024: averaging per micro-batch overweights short examples). Every module returns the pair
(TokenLoss, DPO, ORPO, federate.prox.ProxLoss): no unit is inferred from the labels.
Logits are computed only at trained positions: the [tokens, vocab] projection is the most
expensive op of a small model, and SFT trains on a fraction of the tokens.

Multi-process. Launched by torchrun (`plural tune --nproc N` does that): torch's DDP wraps the
loss module, gloo on CPU, nccl on GPU. Rank r takes its slice of every global batch; each rank's
loss is scaled by world_size because DDP averages gradients.

Resume. A checkpoint holds the trainable weights, optimizer, scheduler, every rank's RNG state and
the step; the data order is a pure function of (seed, epoch), so a resumed run replays exactly the
batches the uninterrupted run would have seen. Checkpoints are written to a temporary folder and
renamed, so a SIGKILL at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from plural.cpu import cpu_info
from plural.data.chat import IGNORE
from plural.data.packing import FLAT_MAX, Row, collate
from plural.errors import PluralError
from plural.store.paths import atomic_dir, write_json_atomic
from plural.tune.config import TuneConfig
from plural.tune.lora_addmm import fold_lora_updates

CKPT_DIR = "checkpoints"


# ----------------------------------------------------------------------------- environment

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_dist(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PluralError("train.device: cuda was asked for but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. `auto` picks bf16 where the hardware runs it natively."""
    if precision == "fp32":
        return None
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_info().fast_bf16
    if precision == "bf16":
        if device.type == "cuda" and not ok:
            raise PluralError("train.precision: bf16 is not supported on this GPU; use fp32 or auto")
        return torch.bfloat16
    return torch.bfloat16 if ok else None


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen nn.Linear weights in `dtype` (the autocast dtype). Returns how many.

    Under autocast every linear op casts its fp32 weight to bf16 on every call (autocast caches
    casts only for leaves that require grad), which on a CPU costs a full read and write of the
    frozen model per forward. Casting once gives bit-identical results (same rounding) with half
    the weight memory. Weights shared with an embedding (tied lm_head) stay fp32 so the residual
    stream keeps its precision; trainable (LoRA) weights stay fp32 for the optimizer.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(emb.weight)} if emb is not None else set()
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and not mod.weight.requires_grad and id(mod.weight) not in tied:
            mod.weight.data = mod.weight.data.to(dtype)
            if mod.bias is not None and not mod.bias.requires_grad:
                mod.bias.data = mod.bias.data.to(dtype)
            n += 1
    return n


# ----------------------------------------------------------------------------- loss

def sum_and_count(out) -> tuple[torch.Tensor, float]:
    """A loss module's output (sum, count) with the count as a float: see the module docstring."""
    total, count = out
    return total, float(count)


class TokenLoss(nn.Module):
    """Wraps a (PEFT) causal LM; forward returns (sum of CE over the trained tokens, their number).

    Shapes: input_ids/labels/position_ids [B, T]; hidden [B, T-1, H] -> selected [N, H] -> logits [N, V].
    A sum over tokens does not care which row a token is in, so short rows may come as one
    (`flat_max`, data.packing.collate); loss modules without the attribute get padded batches.
    """

    flat_max = FLAT_MAX

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()

    def forward(self, input_ids, labels, position_ids) -> torch.Tensor:
        # attention_mask=None on purpose: position resets mark packed examples (see data.packing).
        h = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        tgt = labels[:, 1:]
        sel = tgt != IGNORE
        logits = self.head(h[:, :-1][sel])
        return F.cross_entropy(logits.float(), tgt[sel], reduction="sum"), sel.sum()


def n_targets(rows: list[Row]) -> int:
    return sum(sum(1 for x in r.labels[1:] if x != IGNORE) for r in rows)


# ----------------------------------------------------------------------------- data order

def step_batches(rows: list[Row], cfg: TuneConfig, step: int, dist: Dist) -> list[list[Row]]:
    """This rank's micro-batches for optimizer step `step`: a pure function of (seed, step)."""
    t = cfg.train
    G = t.batch_size * t.grad_accum * dist.world
    spe = steps_per_epoch(len(rows), cfg, dist.world)
    epoch, k = divmod(step, spe)
    g = torch.Generator().manual_seed(t.seed * 1000003 + epoch)
    perm = torch.randperm(len(rows), generator=g).tolist()
    idx = perm[k * G:(k + 1) * G]
    out = []
    for a in range(t.grad_accum):
        s = (a * dist.world + dist.rank) * t.batch_size
        out.append([rows[i] for i in idx[s:s + t.batch_size]])
    return out


def steps_per_epoch(n_rows: int, cfg: TuneConfig, world: int) -> int:
    G = cfg.train.batch_size * cfg.train.grad_accum * world
    if n_rows < G:
        raise PluralError(
            f"the training data makes {n_rows} sequence(s) after packing, fewer than one global batch "
            f"(train.batch_size × train.grad_accum × processes = {G}); lower train.batch_size or add data"
        )
    return n_rows // G  # drop_last: every step sees a full global batch


def total_steps(n_rows: int, cfg: TuneConfig, world: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch(n_rows, cfg, world)))


# ----------------------------------------------------------------------------- checkpoints

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and "No space left on device" in str(e)


class writing:
    """Turn a full disk while writing `path` into a PluralError that says so and names the path
    (instead of a traceback from deep inside torch or safetensors)."""

    def __init__(self, path: Path, resume_hint: Path | None = None):
        self.path, self.hint = path, resume_hint

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, e, tb) -> bool:
        if e is not None and _disk_full(e):
            hint = f"; free some space, then `plural tune --resume {self.hint}` continues from the last complete checkpoint" if self.hint else ""
            raise PluralError(f"{self.path}: no space left on device{hint}") from e
        return False


def _write_file(path: Path, data: bytes) -> None:
    # Bytes through a Python file object, so a full disk surfaces as OSError(ENOSPC) with its
    # errno: torch.save to a *path* reports it from its C++ writer as "[enforce fail at
    # inline_container.cc] ... file write failed", which does not say why (issue 11).
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model, opt, sched, history: list, dist: Dist, keep: int) -> None:
    from safetensors.torch import save as safetensors_bytes

    rngs = [None] * dist.world
    if dist.world > 1:
        torch.distributed.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if dist.main:
        final = run_dir / CKPT_DIR / f"step-{step:07d}"
        # atomic_dir removes the half-written temporary folder on any failure, so the previous
        # checkpoint stays the newest complete one and the run stays resumable.
        with writing(final, run_dir), atomic_dir(final, overwrite=True) as tmp:
            _write_file(tmp / "trainable.safetensors", safetensors_bytes(trainable_state(model)))
            buf = io.BytesIO()
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs}, buf)
            _write_file(tmp / "state.pt", buf.getbuffer())
            write_json_atomic(tmp / "state.json", {"step": step, "history": history, "world_size": dist.world})
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def clean_for_resume(run_dir: Path, step: int) -> None:
    """Before resuming at `step`: remove temporary folders a kill left behind (a checkpoint or the
    adapter being written), and drop log.jsonl lines past `step`, which the resumed run redoes."""
    for pattern in (f"{CKPT_DIR}/.step-*.tmp-*", f"{CKPT_DIR}/.step-*.old-*", ".adapter.tmp-*", ".adapter.old-*"):
        for d in run_dir.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)
    log = run_dir / "log.jsonl"
    if log.is_file():
        keep = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                pass
        tmp = log.with_name(f".{log.name}.tmp")
        with writing(log, run_dir):
            tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
            os.replace(tmp, log)


def load_checkpoint(ckpt: Path, model, opt, sched, dist: Dist) -> tuple[int, list]:
    from safetensors.torch import load_file

    meta = json.loads((ckpt / "state.json").read_text())
    if meta.get("world_size", 1) != dist.world:
        raise PluralError(f"{ckpt}: saved with {meta['world_size']} process(es); resume with the same number (--nproc)")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise PluralError(f"{ckpt}: checkpoint does not match the model (e.g. {missing[0]})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    st = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    _set_rng_state(st["rng"][dist.rank])
    return meta["step"], meta["history"]


# ----------------------------------------------------------------------------- the loop

@dataclass
class FitResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_trained: int = 0  # tokens that carried loss
    seconds: float = 0.0
    input_tokens: int = 0  # non-padding tokens processed

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_trained / self.seconds if self.seconds else 0.0


@torch.no_grad()
def evaluate(loss_mod: TokenLoss, rows: list[Row], pad_id: int, device, amp, batch_size: int = 8) -> float:
    """The mean loss per unit (trained token, pair) over `rows` (no dropout)."""
    was = loss_mod.training
    loss_mod.eval()
    tot, n = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        b = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id, getattr(loss_mod, "flat_max", 0)).items()}
        with _autocast(device, amp):
            s, c = sum_and_count(loss_mod(**b))
        tot, n = tot + float(s), n + c
    loss_mod.train(was)
    return tot / max(n, 1)


def param_groups(model: nn.Module, lr: float, loraplus_ratio: float | None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one, or with LoRA+ the B matrices (`lora_B`) at
    ratio × lr and everything else at lr (the scheduler scales both alike)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not loraplus_ratio:
        return [{"params": [p for _, p in named]}]
    b = [p for n, p in named if ".lora_B." in n]
    rest = [p for n, p in named if ".lora_B." not in n]
    return [g for g in ({"params": rest, "lr": lr}, {"params": b, "lr": lr * loraplus_ratio}) if g["params"]]


class NEFTune:
    """NEFTune (Jain et al. 2023): while the model trains, add Uniform(-1, 1) · alpha / sqrt(L · d)
    to the input embeddings, L the padded batch length and d the width, as the paper and TRL do.
    A flat micro-batch (one row of several, data.packing.collate) is longer than the padded batch
    it stands for, so the loop sets `length` to the padded length; unset, the input's own length.
    Evaluation (model.eval()) sees clean embeddings. `remove()` takes the hook off."""

    def __init__(self, model: nn.Module, alpha: float):
        self.alpha, self.length = alpha, None
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if not module.training:
            return out
        scale = self.alpha / math.sqrt((self.length or out.shape[-2]) * out.shape[-1])
        return out + torch.empty_like(out).uniform_(-scale, scale)

    def remove(self) -> None:
        self._handle.remove()


def keep_fraction(model: nn.Module, keep: float) -> None:
    """WiSE-FT for a LoRA adapter: base + keep · (B A) is the same adapter with every B scaled by
    `keep` (train.wise_ft), so the result is an ordinary adapter every loader, server and exporter reads."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.mul_(keep)


def _autocast(device, amp):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def fit(
    cfg: TuneConfig,
    run_dir: Path,
    model: nn.Module,
    train_rows: list[Row],
    eval_rows: list[Row] | None,
    pad_id: int,
    dist: Dist,
    device: torch.device,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    loss_module: nn.Module | None = None,
    final_eval: bool = True,
) -> FitResult:
    """Train `model`'s trainable parameters on `train_rows`. Returns the history and final losses
    (the held-out one only with `final_eval`: a caller that measures the adapter itself leaves it out)."""
    from transformers import get_scheduler

    t = cfg.train
    amp = autocast_dtype(t.precision, device)
    if amp is not None:
        cast_frozen_linears(model, amp)
    fold_lora_updates(model)  # one GEMM per LoRA linear instead of GEMM, scale, add (tune.lora_addmm)
    loss_mod = loss_module or TokenLoss(model)
    loss_mod.to(device).train()
    wrapped: nn.Module = loss_mod
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(loss_mod, device_ids=[device.index] if device.type == "cuda" else None)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, t.lr, t.loraplus_ratio), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))
    n_steps = total_steps(len(train_rows), cfg, dist.world)
    sched = get_scheduler(t.scheduler, opt, num_warmup_steps=int(t.warmup_ratio * n_steps), num_training_steps=n_steps)

    start, history = 0, []
    if resume:
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            start, history = load_checkpoint(ckpts[-1], model, opt, sched, dist)
        if dist.main:
            clean_for_resume(run_dir, start)
        dist.barrier()

    progress = _Progress(n_steps, start, enabled=dist.main)
    t0 = time.perf_counter()
    tokens = 0
    log_path = run_dir / "log.jsonl"
    neftune = NEFTune(model, t.neftune_alpha) if t.neftune_alpha else None
    flat_max = getattr(loss_mod, "flat_max", 0)
    try:
        for step in range(start, n_steps):
            micro = step_batches(train_rows, cfg, step, dist)
            n_input = int(dist.all_sum(sum(len(r) for m in micro for r in m)))  # non-padding tokens
            loss_sum, count = 0.0, 0.0
            for i, rows in enumerate(micro):
                b = {k: v.to(device) for k, v in collate(rows, pad_id, flat_max).items()}
                if neftune is not None:
                    neftune.length = max(len(r) for r in rows)
                sync = dist.world == 1 or i == len(micro) - 1
                with (nullcontext() if sync else wrapped.no_sync()):
                    with _autocast(device, amp):
                        ls, c = sum_and_count(wrapped(**b))
                    ls.backward()
                loss_sum, count = loss_sum + float(ls.detach()), count + c
            # The gradient of the global mean: DDP averaged the summed gradients over the
            # processes (÷ world), so × world / (units of the whole global batch).
            n_global = dist.all_sum(count)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(dist.world / max(n_global, 1))
            gnorm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = dist.all_sum(loss_sum) / max(n_global, 1)
            tokens += int(n_global)
            rec = {"step": step + 1, "loss": round(loss, 6), "lr": sched.get_last_lr()[0], "tokens": int(n_global), "input_tokens": n_input}
            if gnorm is not None:
                rec["grad_norm"] = round(float(gnorm), 4)
            if eval_rows and t.eval_every and (step + 1) % t.eval_every == 0:
                rec["eval_loss"] = round(evaluate(loss_mod, eval_rows, pad_id, device, amp), 6)
            history.append(rec)
            elapsed = time.perf_counter() - t0
            progress.update(step + 1, loss, tokens / elapsed if elapsed else 0.0)
            if dist.main:
                with writing(log_path, run_dir), open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            if on_step:
                on_step(step + 1, rec)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < n_steps:
                save_checkpoint(run_dir, step + 1, model, opt, sched, history, dist, t.keep_checkpoints)
    finally:
        progress.close()
        if neftune is not None:
            neftune.remove()
    seconds = time.perf_counter() - t0
    res = FitResult(n_steps, history, history[-1]["loss"] if history else None, None, tokens, seconds,
                    sum(h.get("input_tokens", 0) for h in history[start:]))
    if eval_rows and final_eval:  # the last step's periodic evaluation, when it had one, is this very figure
        last = history[-1] if history and history[-1]["step"] == n_steps else {}
        res.eval_loss = last["eval_loss"] if "eval_loss" in last else evaluate(loss_mod, eval_rows, pad_id, device, amp)
    return res


class _Progress:
    """A Rich progress bar with loss, tokens/s and ETA (rank 0 only)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.p = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=done, loss="-", tps="-")

    def update(self, done: int, loss: float, tps: float) -> None:
        if self.p:
            self.p.update(self.task, completed=done, loss=f"{loss:.4f}", tps=f"{tps:.0f}")

    def close(self) -> None:
        if self.p:
            self.p.stop()

"""Training lengths and learning rates that size themselves to the data and the model.

A config that leaves `train.epochs`, `train.lr`, `train.warmup_ratio` or `data.packing` out gets
values chosen here from the number of examples, the trained tokens and the model's size; explicit
values always win. The recipe prints the choice at start and writes it into the run's config.yaml,
so a resume, and anyone reading the run folder, sees the values that ran.

Why these rules (measured on benchmarks/customise_bench.py, docs/benchmarks.md#customisation):
- A few dozen examples at 3 epochs with packing were 9 optimizer steps, and nothing was learned. A
  small data set needs many *updates*, not many tokens: packing squeezes 72 short chats into ~12
  rows (3 steps an epoch at batch 4), so packing is used only when the data is large enough that
  an epoch still has MIN_STEPS_PER_EPOCH steps without it; each example is then its own row.
- Epochs: enough passes that every example is seen about EXAMPLE_VISITS / n times, between 1 and
  MAX_EPOCHS, so 50 examples get many epochs and 50 000 one.
- Learning rate: LoRA's usual 2e-4 is tuned on 7B models; smaller models take larger steps (the
  square-root width scaling of muP-style transfer, Yang et al. 2022, with width ~ sqrt(params)):
  lr = 2e-4 * (7e9 / params) ** 0.5, capped to [LR_MIN, LR_MAX].
- Warm-up: 5% of the steps, at least one (Adam's first steps are noisy on a fresh B = 0 adapter).
- Held-out evaluation: with data.eval, EVALS_PER_RUN times a run, so tune.report can tell a
  held-out loss that keeps rising (over-fitting) from noise.
- The SFT recipe (`SFT_RECIPE`, for the keys left out): rsLoRA, NEFTune alpha 5 and 16 replayed
  documents of general text, at most MAX_EPOCHS epochs. On the customisation benchmark (two
  domains, unseen paraphrases; docs/benchmarks.md#customisation) the previous sized defaults (up
  to 10 epochs, plain LoRA, no replay) reached key facts 0.36 / 0.42 but raised general bits per
  byte by 40% / 45% (forgetting); 4 epochs + replay 16 alone kept bits per byte at +3% / +1% but
  learned 0.19 / 0.10; with rsLoRA and NEFTune on top, 0.41 / 0.38 at +11% / +12% (second seed
  0.33 / 0.29). Replay 32 or a lower lr (5e-4) only moved along the same facts-for-forgetting line.
  WiSE-FT (keep 0.8 of the trained update, `train.wise_ft`) moved off it: on the two domains'
  adapters of this recipe, bits per byte +10.8% / +11.0% → +4.6% / +4.8% with key facts 0.31 → 0.33
  and 0.29 → 0.17 (0.7: 0.33 / 0.26 at +2.2% / +2.4% but style 0.94 / 0.92; 0.9: +7.4% / +7.6%).
"""

from __future__ import annotations

import math

from pydantic import BaseModel

EXAMPLE_VISITS = 500  # epochs ≈ this / examples
MAX_EPOCHS = 4  # 10 memorised the answers verbatim and forgot general text (+40% bits per byte); see above
# method -> the recipe keys (config section, key) and the value a config that leaves them out gets
SFT_RECIPE = {("lora", "rslora"): True, ("train", "neftune_alpha"): 5.0, ("data", "replay"): 16, ("train", "wise_ft"): 0.8}
METHOD_DEFAULTS: dict[str, dict[tuple[str, str], object]] = {"sft": SFT_RECIPE}  # not tune.RECIPES (method -> module)
MIN_STEPS_PER_EPOCH = 64
LR_REF, PARAMS_REF = 2e-4, 7e9
LR_MIN, LR_MAX = 1e-4, 1e-3
WARMUP = 0.05
# DPO moves an (SFT) adapter along a preference margin, not towards new text: a tenth of the SFT
# rate, as the value profiles use (5e-5 after SFT at 6e-4, docs/benchmarks.md#values).
DPO_LR_FACTOR = 0.1
EVALS_PER_RUN = 10  # held-out evaluations when data.eval is given and train.eval_every is left out


class Plan(BaseModel):
    """What a run trains on and for how long; `auto` names the values chosen here (not in the config)."""

    examples: int
    trained_tokens: int
    params: int
    packing: bool
    epochs: float
    lr: float
    warmup_ratio: float
    # the recipe's keys ("lora.rslora", ...) -> value; only those the config left out (METHOD_DEFAULTS)
    recipe: dict[str, bool | float | int] = {}
    auto: list[str]

    def line(self, steps: int) -> str:
        """The start-up message: what was chosen and the key to set to override it."""
        chosen = {"packing": f"packing {'on' if self.packing else 'off'}", "epochs": f"{self.epochs:g} epochs",
                  "lr": f"lr {self.lr:.0e}", "warmup_ratio": f"warm-up {self.warmup_ratio:g}"}
        keys = {"packing": "data.packing", "epochs": "train.epochs", "lr": "train.lr", "warmup_ratio": "train.warmup_ratio"}
        words = {"lora.rslora": lambda v: "rsLoRA" if v else "plain LoRA", "train.neftune_alpha": lambda v: f"NEFTune {v:g}" if v else "no NEFTune",
                 "data.replay": lambda v: f"replay {v} general documents", "train.wise_ft": lambda v: f"WiSE-FT {v:g}"}
        for k, v in self.recipe.items():
            chosen[k], keys[k] = words[k](v), k
        if not self.auto:
            return f"{self.examples} examples, {self.trained_tokens} trained tokens: {steps} steps (all set in the config)"
        what = ", ".join(chosen[k] for k in self.auto)
        return (f"{self.examples} examples, {self.trained_tokens} trained tokens, {self.params / 1e6:.0f}M parameters → "
                f"{what}, {steps} steps: set {', '.join(keys[k] for k in self.auto)} to override")


def auto_lr(params: int) -> float:
    return float(f"{min(LR_MAX, max(LR_MIN, LR_REF * (PARAMS_REF / params) ** 0.5)):.1e}")


def auto_epochs(examples: int) -> float:
    return float(min(MAX_EPOCHS, max(1, math.ceil(EXAMPLE_VISITS / max(examples, 1)))))


def auto_packing(examples: int, global_batch: int) -> bool:
    return examples // global_batch >= MIN_STEPS_PER_EPOCH


def plan(cfg, examples: int, trained_tokens: int, params: int, global_batch: int) -> Plan:
    """Fill the unset values of `cfg` (a TuneConfig) from the data and the model size."""
    pairs = cfg.method in ("dpo", "orpo")  # preference rows are never packed
    auto = [k for k, v in (("packing", cfg.data.packing if not pairs else False), ("epochs", cfg.train.epochs if not cfg.train.max_steps else 0),
                            ("lr", cfg.train.lr), ("warmup_ratio", cfg.train.warmup_ratio)) if v is None]
    lr = auto_lr(params) * (DPO_LR_FACTOR if cfg.method == "dpo" else 1)
    recipe = {f"{sect}.{key}": v for (sect, key), v in METHOD_DEFAULTS.get(cfg.method, {}).items()
              if getattr(getattr(cfg, sect), key) is None}
    return Plan(
        examples=examples, trained_tokens=trained_tokens, params=params, auto=auto + list(recipe), recipe=recipe,
        packing=False if pairs else auto_packing(examples, global_batch) if cfg.data.packing is None else cfg.data.packing,
        epochs=auto_epochs(examples) if cfg.train.epochs is None else cfg.train.epochs,
        lr=float(f"{lr:.1e}") if cfg.train.lr is None else cfg.train.lr,
        warmup_ratio=WARMUP if cfg.train.warmup_ratio is None else cfg.train.warmup_ratio,
    )


def _section(cfg, p: Plan, sect: str, **more):
    update = {k.split(".", 1)[1]: v for k, v in p.recipe.items() if k.startswith(sect + ".")} | more
    return getattr(cfg, sect).model_copy(update=update)


def with_plan(cfg, p: Plan):
    """`cfg` with the plan's packing and recipe (the rows, and so the step count, depend on
    packing and on the replayed documents; the adapter's shape on lora.rslora)."""
    return cfg.model_copy(update={"data": _section(cfg, p, "data", packing=p.packing), "lora": _section(cfg, p, "lora"),
                                  "train": _section(cfg, p, "train")})


def resolved(cfg, p: Plan, steps: int):
    """`cfg` with the plan's values written in (what config.yaml records); `steps`: the run's optimizer steps."""
    every = cfg.train.eval_every
    if every is None:
        every = max(1, steps // EVALS_PER_RUN) if cfg.data.eval else 0
    cfg = with_plan(cfg, p)
    train = cfg.train.model_copy(update={"epochs": p.epochs, "lr": p.lr, "warmup_ratio": p.warmup_ratio, "eval_every": every})
    return cfg.model_copy(update={"train": train})

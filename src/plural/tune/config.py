"""The tune config (one YAML per run), validated at load.

    method: sft                      # sft | text | dpo | orpo
    init_adapter: runs/sft/adapter   # dpo / orpo: start from this (SFT) adapter
    model: smollm2-135m-instruct     # a model in the store
    data: {train: [a.jsonl], eval: b.jsonl, max_length: 512, packing: true}
    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: [...]}
    train: {epochs: 3, batch_size: 4, grad_accum: 1, lr: 2e-4, precision: auto, save_every: 50, ...}
                                     # epochs, lr, warmup_ratio, packing left out: sized to the data (tune.schedule)
    preference: {beta: 0.1, reference: base}  # dpo / orpo only; reference (dpo): base | init
    output: runs/NAME                # the run folder

Relative paths (data files, init_adapter, output) are relative to the config file's folder;
`--set` paths to the working directory (plural.config's path rule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from plural.config import ConfigPath, PathField, Strict

METHODS = ("sft", "text", "dpo", "orpo")
PREFERENCE_METHODS = ("dpo", "orpo")
# PEFT's "all-linear": every linear layer but the output layer, whatever the family calls them
# (q_proj … down_proj in Llama/Mistral/Qwen/Gemma; qkv_proj and gate_up_proj in Phi-3's fused ones).
DEFAULT_TARGETS = "all-linear"


class DataConfig(Strict):
    train: list[ConfigPath] = Field(min_length=1)
    eval: ConfigPath | None = None
    max_length: int = Field(512, ge=16, le=131072)
    # None: chosen from the data (tune.schedule: packing only where an epoch keeps enough steps)
    packing: bool | None = None
    # Documents of plural's bundled general text (resources/replay: CC0 prose in eight languages)
    # trained beside the data, loss on every token, so the adapter keeps the base's general language
    # (continual-learning replay, as value profiles do). 0: none; at most the corpus's 64.
    # None: the method's recipe (tune.schedule.METHOD_DEFAULTS: 16 for sft, none otherwise).
    replay: int | None = Field(None, ge=0, le=64)
    # Examples longer than max_length: "error" stops (data check names the line), "truncate" cuts them.
    overlong: Literal["error", "truncate"] = "truncate"

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (str, Path)) else v


class LoraConfig(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    # 0 by default: on CPU the dropout masks cost ~12% of a step (profiled) for little gain on small data
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = Field(DEFAULT_TARGETS, min_length=1)
    # rsLoRA (Kalajdzievski 2023): scale B·A by alpha / sqrt(r) instead of alpha / r, so a higher
    # rank is not damped; PEFT's use_rslora, carried into the adapter's adapter_config.json.
    # None: the method's recipe (tune.schedule.METHOD_DEFAULTS: on for sft, off otherwise).
    rslora: bool | None = None


class TrainConfig(Strict):
    # None (left out): epochs, lr and warm-up are chosen from the data and the model (tune.schedule),
    # printed at start and written to the run's config.yaml.
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every: int = Field(0, ge=0, description="checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    # None: with data.eval, about EVALS_PER_RUN held-out evaluations (the over-fitting warning needs them); 0: only at the end
    eval_every: int | None = Field(None, ge=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores / processes)")
    # LoRA+ (Hayou et al. 2024): the B matrices learn at loraplus_ratio × lr (the paper suggests 16); None: one lr
    loraplus_ratio: float | None = Field(None, gt=0, le=1024)
    # NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(length × width) on the input
    # embeddings while training (the paper and TRL use alpha 5); 0: off; None: the method's recipe
    # (tune.schedule.METHOD_DEFAULTS: 5 for sft, off otherwise).
    neftune_alpha: float | None = Field(None, ge=0, le=100)
    # WiSE-FT (Wortsman et al. 2022), for an adapter: the saved adapter keeps this fraction of the
    # trained update (its B matrices scaled), a point between the base and the fine-tuned model
    # that forgets less of the base's general language. 1: as trained; None: the method's recipe
    # (tune.schedule.METHOD_DEFAULTS). sft and text only.
    wise_ft: float | None = Field(None, gt=0, le=1)


class PreferenceConfig(Strict):
    """dpo: beta is the KL strength of the implicit reward (Rafailov et al. 2023); orpo: beta is the
    odds-ratio weight lambda (Hong et al. 2024). 0.1 suits both on small models (docs/value-profiles.md)."""

    beta: float = Field(0.1, gt=0, le=10)
    # dpo: the reference policy. `base`: the base model with the adapter switched off. `init`: the
    # init adapter as it was before training (its log-probs computed once, before the first step,
    # as TRL's precompute_ref_log_probs), so DPO after SFT starts at loss log 2 instead of near 0.
    reference: Literal["base", "init"] = "base"


class TuneConfig(Strict):
    method: Literal["sft", "text", "dpo", "orpo"] = "sft"
    model: Annotated[str, PathField(name_ok=True)] = "smollm2-135m-instruct"  # a store name or a stored-model folder
    init_adapter: Annotated[Path, PathField(name_ok=True)] | None = Field(None, description="dpo / orpo: continue training this adapter (usually the SFT one)")
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: ConfigPath = Path("runs/run")

    @model_validator(mode="after")
    def _consistent(self):
        if self.train.eval_every and self.data.eval is None:
            raise ValueError("train.eval_every is set but data.eval is not: give a held-out file or set eval_every: 0")
        # Compared with the defaults, not model_fields_set: a resolved config.yaml spells every key out.
        if self.method not in PREFERENCE_METHODS:
            if self.init_adapter is not None:
                raise ValueError(f"init_adapter: only used by method dpo or orpo, not {self.method}")
            if self.preference != PreferenceConfig():
                raise ValueError(f"preference: only used by method dpo or orpo, not {self.method}")
        elif self.train.wise_ft not in (None, 1):
            raise ValueError(f"train.wise_ft: only used by method sft or text, not {self.method}")
        elif self.preference.reference == "init" and (self.method != "dpo" or self.init_adapter is None):
            raise ValueError("preference.reference: init needs method dpo and an init_adapter (orpo has no reference model)")
        elif self.init_adapter is not None and self.lora != LoraConfig():
            raise ValueError("lora: the adapter's rank and modules come from init_adapter; remove the lora: section")
        return self

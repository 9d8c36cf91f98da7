"""The federation config (one YAML per federation), validated at load.

    model: smollm2-135m-instruct    # every node and the server have this base in their store
    method: sft                     # the tune recipe each node runs: sft | text
    rounds: 5
    min_nodes: 2                    # a round counts when at least this many nodes replied
    strategy: exact                 # fedavg | exact | ffa
    aggregator: {rule: mean, clip_norm: null}      # robust: median | trimmed_mean, clip_norm: auto
    server_optimizer: {name: none}  # fedavgm | fedadam
    fedprox_mu: 0.0
    privacy: null                   # {noise_multiplier: 1.0, clip_norm: 0.5, delta: 1e-5}
    local: {steps: 10, batch_size: 4, lr: 2e-4, max_length: 512}
    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: [...]}
    partitions: [orgs/a, orgs/b]    # `plural federate local`: one data folder per organisation
    output: runs/federate           # the run folder (on the server's machine)

Relative paths (partitions, output) are relative to the config file's folder; `--set` paths to
the working directory (plural.config's path rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from plural.config import ConfigPath, PathField, Strict
from plural.tune.config import DataConfig, LoraConfig, TrainConfig, TuneConfig

STRATEGIES = ("fedavg", "exact", "ffa")


class AggregatorConfig(Strict):
    rule: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim: float = Field(0.2, ge=0, lt=0.5, description="fraction cut at each end for trimmed_mean")
    # Each node's update (its change to the global adapter) is scaled down to this L2 norm;
    # "auto": the median of this round's update norms, so one outsized update cannot dominate.
    clip_norm: float | Literal["auto"] | None = None


class ServerOptimizerConfig(Strict):
    name: Literal["none", "fedavgm", "fedadam"] = "none"
    lr: float = Field(1.0, gt=0, description="server learning rate η (1.0 with `none` = plain averaging)")
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class PrivacyConfig(Strict):
    noise_multiplier: float = Field(gt=0, description="σ: noise std on the sum of updates is σ·clip_norm")
    clip_norm: float = Field(gt=0, description="C: each node's update is clipped to this L2 norm")
    delta: float = Field(1e-5, gt=0, lt=1)
    seed: int | None = None


class LocalConfig(Strict):
    """What each node runs per round: the tune recipe's settings for `steps` optimizer steps."""

    steps: int = Field(10, ge=1, description="local optimizer steps per round")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0, lt=1)
    lr_min: float = Field(0.0, ge=0, description="the round lr follows a cosine from lr to lr_min over the rounds")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: int = Field(512, ge=16)
    packing: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)


class FederateConfig(Strict):
    model: Annotated[str, PathField(name_ok=True)] = "smollm2-135m-instruct"
    method: Literal["sft", "text"] = "sft"
    rounds: int = Field(3, ge=1)
    min_nodes: int = Field(2, ge=1)
    strategy: Literal["fedavg", "exact", "ffa"] = "exact"
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    server_optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)
    fedprox_mu: float = Field(0.0, ge=0)
    privacy: PrivacyConfig | None = None
    local: LocalConfig = Field(default_factory=LocalConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    seed: int = 42
    round_timeout: float = Field(3600, gt=0, description="seconds a round waits at most for replies")
    straggler_grace: float = Field(60, ge=0, description="once min_nodes replied, seconds to wait for the rest")
    wait_for_nodes: float = Field(600, gt=0, description="seconds to wait for min_nodes to connect before a round")
    max_round_retries: int = Field(2, ge=0, description="a round with fewer than min_nodes replies is repeated this often")
    evaluate: bool = Field(True, description="after the last round, each node reports the global adapter's held-out loss")
    partitions: list[ConfigPath] = Field(default_factory=list)
    output: ConfigPath = Path("runs/federate")
    resume: bool = False

    @field_validator("partitions", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _consistent(self):
        if self.strategy == "exact":
            # `exact` re-factorises B·A each round: the factors' basis changes, so factor-space
            # statistics (robust rules, momentum, DP noise on A/B) would mix unrelated bases.
            if self.aggregator.rule != "mean" or self.aggregator.clip_norm is not None:
                raise ValueError("strategy: exact aggregates the products B·A with the mean; for robust aggregation use strategy: ffa (also exact) or fedavg")
            if self.server_optimizer.name != "none":
                raise ValueError("strategy: exact works with server_optimizer: none (and its lr as the server step size); for FedAvgM/FedAdam use strategy: ffa or fedavg")
            if self.privacy is not None:
                raise ValueError("privacy: differential privacy works with strategy: ffa or fedavg (noise on the exchanged tensors), not exact")
        if self.privacy is not None and self.aggregator.rule != "mean":
            raise ValueError("privacy: the DP guarantee needs aggregator.rule: mean (noise is calibrated to the mean of clipped updates)")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def round_lr(self, rnd: int) -> float:
        """Cosine over the rounds from local.lr (round 1) towards local.lr_min, as FlowerTune does
        (lr_min would be reached at round rounds + 1, so every round trains)."""
        import math

        lo, hi = self.local.lr_min, self.local.lr
        return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * (rnd - 1) / self.rounds))

    def tune_config(self, train: list[Path], eval_file: Path | None, rnd: int, run_dir: Path) -> TuneConfig:
        """The tune recipe's config for one node's local training in round `rnd`.

        The seed changes per round so each round draws other batches; the lr schedule within a
        round is constant (the decay happens across rounds, see round_lr)."""
        loc = self.local
        return TuneConfig(
            method=self.method,
            model=self.model,
            data=DataConfig(train=train, eval=eval_file, max_length=loc.max_length, packing=loc.packing),
            lora=self.lora,
            train=TrainConfig(
                max_steps=loc.steps, batch_size=loc.batch_size, grad_accum=loc.grad_accum, lr=self.round_lr(rnd),
                weight_decay=loc.weight_decay, warmup_ratio=0.0, scheduler="constant", max_grad_norm=loc.max_grad_norm,
                seed=self.seed + 1009 * rnd, precision=loc.precision, device=loc.device, threads=loc.threads,
            ),
            output=run_dir,
        )

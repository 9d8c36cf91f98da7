"""One round of server-side aggregation: the nodes' trained adapters in, the new global adapter out.

Pure (tensors in, tensors out; no Flower): the ServerApp calls `aggregate_round` and the tests
call it with hand-made states.

fedavg and ffa work on each node's update Δ_i = w_i − w_global over the exchanged tensors
(A and B for fedavg; B only for ffa, whose A stays frozen), in this order:
  1. clip each Δ_i to an L2 norm (DP: privacy.clip_norm; robust: aggregator.clip_norm or the
     median norm with "auto");
  2. combine: token-weighted mean (uniform under DP), coordinate-wise median or trimmed mean;
  3. DP: Gaussian noise on the mean;
  4. server optimiser: w ← w + η·Δ (none), FedAvgM or FedAdam.
With mean, no clipping and `none` at η = 1 this is the token-weighted average of the nodes'
tensors. `exact` averages the products B_i·A_i and re-factorises (aggregate.exact).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from plural.federate import aggregate as agg
from plural.federate.config import FederateConfig

State = agg.State


def exchanged_keys(strategy: str, state: State) -> list[str]:
    """The tensors a node trains and sends: all LoRA factors, or only B for ffa."""
    return [k for k in state if strategy != "ffa" or agg.LORA_B in k]


def aggregate_round(cfg: FederateConfig, global_state: State, states: Sequence[State], tokens: Sequence[int],
                    opt: dict[str, State], rnd: int) -> tuple[State, dict[str, State], dict]:
    """Returns (new global state, new optimiser state, report for the round's history)."""
    if cfg.strategy == "exact":
        new, rep = agg.exact(global_state, states, tokens, cfg.lora.r, cfg.server_optimizer.lr)
        return new, opt, rep

    keys = exchanged_keys(cfg.strategy, global_state)
    deltas = [{k: s[k].double() - global_state[k].double() for k in keys} for s in states]
    norms = [agg.norm(d) for d in deltas]
    report: dict = {"update_norms": [round(n, 6) for n in norms]}
    weights: Sequence[float] = tokens

    clip = None
    if cfg.privacy is not None:
        clip, weights = cfg.privacy.clip_norm, [1.0] * len(states)  # DP: uniform weights, fixed sensitivity
    elif cfg.aggregator.clip_norm == "auto":
        clip = statistics.median(norms)
    elif cfg.aggregator.clip_norm is not None:
        clip = float(cfg.aggregator.clip_norm)
    if clip is not None:
        deltas = [agg.clip_update(d, clip)[0] for d in deltas]
        report["clip_norm"] = round(clip, 6)
        report["clipped"] = sum(1 for n in norms if n > clip)

    delta = agg.combine(deltas, weights, cfg.aggregator.rule, cfg.aggregator.trim)
    if cfg.privacy is not None:
        seed = cfg.privacy.seed if cfg.privacy.seed is not None else cfg.seed
        gen = torch.Generator().manual_seed(seed * 7919 + rnd)  # a pure function of the round: resume-safe
        delta = agg.gaussian_noise(delta, len(states), clip, cfg.privacy.noise_multiplier, gen)

    so = cfg.server_optimizer
    g = {k: v.double() for k, v in global_state.items()}
    if so.name == "fedavgm":
        new, buf = agg.fedavgm(g, delta, opt.get("momentum"), so.lr, so.momentum)
        opt = {"momentum": buf}
    elif so.name == "fedadam":
        new, m, v = agg.fedadam(g, delta, opt.get("m"), opt.get("v"), so.lr, so.beta1, so.beta2, so.tau)
        opt = {"m": m, "v": v}
    else:
        new = {k: g[k] + so.lr * delta[k] if k in delta else g[k] for k in g}
    dtype = next(iter(global_state.values())).dtype
    return {k: v.to(dtype) for k, v in new.items()}, {s: {k: v.float() for k, v in d.items()} for s, d in opt.items()}, report

"""Aggregation rules for federated LoRA, each a small pure function on tensors.

An adapter state is a dict `name -> tensor` keyed as PEFT saves it
(`...q_proj.lora_A.weight` [r, in], `...q_proj.lora_B.weight` [out, r]). A LoRA module's
weight update is ΔW = s·B·A with s = alpha / r.

The strategies (strategy.aggregate_round puts them together):

- `fedavg`: A and B averaged separately (weighted by trained tokens). The common baseline
  (FlowerTune, OpenFedLLM), but *inexact*: mean(B_i)·mean(A_i) ≠ mean(B_i·A_i).
- `exact` (here): average the products B_i·A_i and re-factorise the mean to rank r by truncated
  SVD, so the result equals the true mean update up to the truncation, which is returned
  (the idea of FedEx-LoRA, Singhal et al. 2024, and FLoRA's stacking, Wang et al. 2024).
- `ffa`: A is frozen at the shared initialisation and only B trains, so mean(B_i)·A = mean(B_i·A)
  exactly (FFA-LoRA, Sun et al. ICLR 2024).

Robustness (`combine`): coordinate-wise median or trimmed mean instead of the mean (Yin et al.
2018), after each update's norm is clipped (`clip_update`, norm bounding of Sun et al. 2019).
Server optimisers on the pseudo-gradient Δ = aggregate − global: FedAvgM (Hsu et al. 2019) and
FedAdam (Reddi et al., ICLR 2021). Differential privacy: clip each node's update, add Gaussian
noise to the mean (DP-FedAvg, McMahan et al. ICLR 2018), account (ε, δ) with Rényi DP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]
LORA_A, LORA_B = ".lora_A.", ".lora_B."


# ----------------------------------------------------------------------------- elementwise rules

def _normalised(weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    w = _normalised(weights)
    out = sum(wi * t.double() for wi, t in zip(w, tensors))
    return out.to(tensors[0].dtype)


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per coordinate median; for an even count the mean of the two middle values."""
    x = torch.stack([t.double() for t in tensors])  # [n, ...]
    s = x.sort(dim=0).values
    n = s.shape[0]
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return mid.to(tensors[0].dtype)


def trimmed_mean(tensors: Sequence[torch.Tensor], trim: float) -> torch.Tensor:
    """Per coordinate: drop the floor(trim·n) largest and smallest values, average the rest."""
    x = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    n = x.shape[0]
    k = int(math.floor(trim * n))
    if n - 2 * k < 1:
        raise ValueError(f"trim={trim} leaves no value out of {n}")
    return x[k:n - k].mean(dim=0).to(tensors[0].dtype)


def combine(updates: Sequence[State], weights: Sequence[float], rule: str = "mean", trim: float = 0.2) -> State:
    """Combine several states key by key with `rule` (mean is weighted; median/trimmed are not)."""
    keys = updates[0].keys()
    if rule == "mean":
        return {k: weighted_mean([u[k] for u in updates], weights) for k in keys}
    if rule == "median":
        return {k: coordinate_median([u[k] for u in updates]) for k in keys}
    if rule == "trimmed_mean":
        return {k: trimmed_mean([u[k] for u in updates], trim) for k in keys}
    raise ValueError(f"unknown aggregation rule {rule!r}")


def norm(state: State) -> float:
    """L2 norm of all tensors of a state taken together (as one flat vector)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def clip_update(delta: State, max_norm: float) -> tuple[State, float]:
    """Scale `delta` so its global L2 norm is at most `max_norm`; returns (clipped, factor ≤ 1)."""
    n = norm(delta)
    f = min(1.0, max_norm / n) if n > 0 else 1.0
    return {k: v * f for k, v in delta.items()}, f


def subtract(a: State, b: State) -> State:
    return {k: a[k] - b[k] for k in a}


def add(a: State, b: State) -> State:
    return {k: a[k] + b[k] for k in a}


# ----------------------------------------------------------------------------- LoRA strategies

def lora_modules(state: State) -> list[str]:
    """Module prefixes that have both a lora_A and a lora_B tensor."""
    mods = [k.split(LORA_A)[0] for k in state if LORA_A in k]
    return sorted(m for m in mods if any(k.startswith(m + LORA_B) for k in state))


def _key(state: State, module: str, part: str) -> str:
    return next(k for k in state if k.startswith(module + part))


def lowrank_svd(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: Sequence[float]):
    """SVD of M = Σ w_i·B_i·A_i without forming the [out, in] matrix.

    B_i [out, r], A_i [r, in]. Stack B = [w_1 B_1 … w_n B_n] [out, nr] and A = [A_1; …; A_n]
    [nr, in], so M = B·A. With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), M = Q_b (R_b R_aᵀ) Q_aᵀ,
    and the SVD of the small [nr, nr] core gives M's: U = Q_b U_c, S, V = Q_a V_c.
    Costs O((out+in)·(nr)²) instead of O(out·in·min(out, in)).
    """
    w = [float(x) for x in weights]
    B = torch.cat([wi * b.double() for wi, b in zip(w, Bs)], dim=1)  # [out, nr]
    A = torch.cat([a.double() for a in As], dim=0)  # [nr, in]
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ Uc, S, Qa @ Vch.T  # U [out, k], S [k], V [in, k]


def exact(global_state: State, states: Sequence[State], weights: Sequence[float], rank: int,
          server_lr: float = 1.0) -> tuple[State, dict]:
    """Mean of the products B_i·A_i, re-factorised to rank `rank` (balanced: B = U√S, A = √S Vᵀ).

    With a server step size η ≠ 1 the target is B_g·A_g + η·(mean − B_g·A_g), the FedOpt server
    step (SGD with learning rate η) applied to the true mean update; η = 1 is the plain mean.

    Returns (new state, report) with report["truncation_error"] = ‖M − M_r‖_F / ‖M − B_g·A_g‖_F
    over all modules: the part of this round's true (stepped) update that rank r cannot hold
    (0 when the update fits in rank r).
    """
    w = (_normalised(weights) * server_lr).tolist()
    out = dict(global_state)
    lost2 = upd2 = 0.0
    for m in lora_modules(global_state):
        ka, kb = _key(global_state, m, LORA_A), _key(global_state, m, LORA_B)
        Bs, As, ws = [s[kb] for s in states], [s[ka] for s in states], list(w)
        if server_lr != 1.0:  # (1 − η)·B_g·A_g + η·Σ w_i B_i A_i
            Bs, As, ws = Bs + [global_state[kb]], As + [global_state[ka]], ws + [1.0 - server_lr]
        U, S, V = lowrank_svd(Bs, As, ws)
        lost2 += float(S[rank:].pow(2).sum())
        # ‖M − B_g A_g‖: the same low-rank trick with the global product subtracted.
        _, Sd, _ = lowrank_svd([s[kb] for s in states] + [global_state[kb]], [s[ka] for s in states] + [global_state[ka]], w + [-server_lr])
        upd2 += float(Sd.pow(2).sum())
        k = min(rank, S.numel())
        root = S[:k].sqrt()
        B = torch.zeros_like(global_state[kb], dtype=torch.float64)
        A = torch.zeros_like(global_state[ka], dtype=torch.float64)
        B[:, :k] = U[:, :k] * root  # [out, r]
        A[:k, :] = (V[:, :k] * root).T  # [r, in]
        out[kb] = B.to(global_state[kb].dtype)
        out[ka] = A.to(global_state[ka].dtype)
    return out, {"truncation_error": math.sqrt(lost2 / upd2) if upd2 > 0 else 0.0}


def lora_product(state: State, module: str) -> torch.Tensor:
    """B·A of one module (without the alpha/r scale) [out, in]; for tests and reports."""
    return state[_key(state, module, LORA_B)].double() @ state[_key(state, module, LORA_A)].double()


# ----------------------------------------------------------------------------- server optimisers

def fedavgm(global_state: State, delta: State, buf: State | None, lr: float, momentum: float) -> tuple[State, State]:
    """Server momentum: v ← β·v + Δ; w ← w + η·v (FedAvgM, Hsu et al. 2019)."""
    v = {k: (momentum * buf[k] if buf else 0) + delta[k] for k in delta}
    return {k: global_state[k] + lr * v[k] if k in v else global_state[k] for k in global_state}, v


def fedadam(global_state: State, delta: State, m: State | None, v: State | None, lr: float,
            beta1: float, beta2: float, tau: float) -> tuple[State, State, State]:
    """FedAdam (Reddi et al. 2021, Alg. 2): m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²;
    w ← w + η·m / (√v + τ). No bias correction, as in the paper."""
    m2 = {k: (beta1 * m[k] if m else 0) + (1 - beta1) * d for k, d in delta.items()}
    v2 = {k: (beta2 * v[k] if v else 0) + (1 - beta2) * d * d for k, d in delta.items()}
    new = {k: global_state[k] + lr * m2[k] / (v2[k].sqrt() + tau) if k in m2 else global_state[k] for k in global_state}
    return new, m2, v2


# ----------------------------------------------------------------------------- differential privacy

def gaussian_noise(mean: State, n: int, clip: float, noise_multiplier: float, generator: torch.Generator) -> State:
    """Noise for the mean of n updates each clipped to `clip`: N(0, (σ·C/n)²) per coordinate
    (σ·C on the sum, the Gaussian mechanism with L2 sensitivity C)."""
    std = noise_multiplier * clip / n
    return {k: t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype) for k, t in mean.items()}


RDP_ORDERS = [1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64, 128, 256]


def rdp_gaussian(noise_multiplier: float, rounds: int, order: float) -> float:
    """Rényi DP of `rounds` compositions of the Gaussian mechanism (sampling rate 1):
    ε_α = rounds·α / (2σ²) (Mironov 2017, Prop. 7 and composition)."""
    return rounds * order / (2 * noise_multiplier ** 2)


def dp_epsilon(noise_multiplier: float, rounds: int, delta: float, orders: Sequence[float] = RDP_ORDERS) -> tuple[float, float]:
    """(ε, best order) for (ε, δ)-DP after `rounds`, by the RDP→DP conversion of
    Balle et al. 2020 (Thm. 21), the one opacus uses:
    ε = ε_α + log((α−1)/α) − (log δ + log α)/(α−1), minimised over α."""
    if rounds == 0:
        return 0.0, float("nan")
    best = (float("inf"), float("nan"))
    for a in orders:
        eps = rdp_gaussian(noise_multiplier, rounds, a) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best[0]:
            best = (eps, a)
    return max(best[0], 0.0), best[1]

"""The aggregation math, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from plural.federate import aggregate as agg
from plural.federate.config import AggregatorConfig, FederateConfig, PrivacyConfig, ServerOptimizerConfig
from plural.federate.strategy import aggregate_round

T = torch.tensor
M = "base_model.model.layers.0.q_proj"
KA, KB = f"{M}.lora_A.weight", f"{M}.lora_B.weight"


def st(B, A) -> dict:
    return {KA: T(A, dtype=torch.float32), KB: T(B, dtype=torch.float32)}


def cfg(**kw) -> FederateConfig:
    kw.setdefault("lora", {"r": 1})
    return FederateConfig(**kw)


def test_weighted_mean_median_trimmed():
    assert torch.allclose(agg.weighted_mean([T([1.0, 2.0]), T([3.0, 4.0])], [1, 3]), T([2.5, 3.5]))
    assert torch.equal(agg.coordinate_median([T([1.0, 10.0]), T([2.0, 0.0]), T([100.0, 5.0])]), T([2.0, 5.0]))
    assert torch.equal(agg.coordinate_median([T([1.0]), T([2.0]), T([3.0]), T([10.0])]), T([2.5]))
    assert torch.equal(agg.trimmed_mean([T([1.0]), T([2.0]), T([3.0]), T([100.0])], 0.25), T([2.5]))
    with pytest.raises(ValueError):
        agg.trimmed_mean([T([1.0]), T([2.0])], 0.49 + 0.01)


def test_clip_update():
    clipped, f = agg.clip_update({"a": T([3.0, 4.0])}, 1.0)
    assert f == pytest.approx(0.2) and torch.allclose(clipped["a"], T([0.6, 0.8]))
    same, f = agg.clip_update({"a": T([3.0, 4.0])}, 10.0)
    assert f == 1.0 and torch.equal(same["a"], T([3.0, 4.0]))


def test_lowrank_svd_matches_dense_svd():
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(7, 2, generator=g) for _ in range(3)]
    As = [torch.randn(2, 5, generator=g) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    dense = sum(wi * b.double() @ a.double() for wi, b, a in zip(w, Bs, As))
    U, S, V = agg.lowrank_svd(Bs, As, w)
    assert torch.allclose(S[:5], torch.linalg.svdvals(dense)[:5], atol=1e-10)
    assert torch.allclose(U @ torch.diag(S) @ V.T, dense, atol=1e-10)


def test_exact_is_the_mean_of_products_up_to_truncation():
    # Node 1: B·A = [[1,0],[0,0]]; node 2: B·A = [[0,0],[0,1]]; mean = 0.5·I (rank 2).
    g0 = st([[0.0], [0.0]], [[1.0, 0.0]])
    s1, s2 = st([[1.0], [0.0]], [[1.0, 0.0]]), st([[0.0], [1.0]], [[0.0, 1.0]])
    new, rep = agg.exact(g0, [s1, s2], [1, 1], rank=1)
    # Rank 1 keeps one singular value 0.5 of two: error sqrt(0.25 / 0.5) of the update 0.5·I.
    assert rep["truncation_error"] == pytest.approx(math.sqrt(0.5))
    assert float(agg.lora_product(new, M).trace()) == pytest.approx(0.5)
    # With rank 2 factors the re-factorisation is exact.
    g2 = {KA: torch.zeros(2, 2), KB: torch.zeros(2, 2)}
    p1 = {KA: T([[1.0, 0.0], [0.0, 0.0]]), KB: T([[1.0, 0.0], [0.0, 0.0]])}
    p2 = {KA: T([[0.0, 1.0], [0.0, 0.0]]), KB: T([[0.0, 0.0], [1.0, 0.0]])}
    new2, rep2 = agg.exact(g2, [p1, p2], [3, 1], rank=2)
    assert rep2["truncation_error"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(agg.lora_product(new2, M), T([[0.75, 0.0], [0.0, 0.25]], dtype=torch.float64), atol=1e-6)


def test_exact_server_step_scales_the_true_mean_update():
    # Global B·A = diag(1, 0); nodes move it to diag(1, 1) and diag(1, 3): mean update diag(0, 2).
    g = {KA: T([[1.0, 0.0], [0.0, 0.0]]), KB: T([[1.0, 0.0], [0.0, 0.0]])}
    n1 = {KA: T([[1.0, 0.0], [0.0, 1.0]]), KB: T([[1.0, 0.0], [0.0, 1.0]])}
    n2 = {KA: T([[1.0, 0.0], [0.0, 3.0]]), KB: T([[1.0, 0.0], [0.0, 1.0]])}
    new, rep = agg.exact(g, [n1, n2], [1, 1], rank=2, server_lr=1.5)
    # B_g·A_g + 1.5 · diag(0, 2) = diag(1, 3)
    assert torch.allclose(agg.lora_product(new, M), T([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64), atol=1e-9)
    assert rep["truncation_error"] == pytest.approx(0.0, abs=1e-9)
    plain, _ = agg.exact(g, [n1, n2], [1, 1], rank=2)
    assert torch.allclose(agg.lora_product(plain, M), T([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64), atol=1e-9)


def test_fedavg_is_inexact_and_ffa_is_exact():
    g = st([[0.0], [0.0]], [[1.0, 1.0]])
    s1, s2 = st([[2.0], [0.0]], [[1.0, 0.0]]), st([[0.0], [2.0]], [[0.0, 1.0]])
    true_mean = (agg.lora_product(s1, M) + agg.lora_product(s2, M)) / 2  # [[1,0],[0,1]]
    avg, _, _ = aggregate_round(cfg(strategy="fedavg"), g, [s1, s2], [10, 10], {}, 1)
    assert torch.allclose(avg[KB], T([[1.0], [1.0]])) and torch.allclose(avg[KA], T([[0.5, 0.5]]))
    assert not torch.allclose(agg.lora_product(avg, M), true_mean)  # [[.5,.5],[.5,.5]] ≠ I

    # ffa: both nodes keep the shared A, so mean(B)·A equals mean(B·A).
    f1, f2 = st([[2.0], [0.0]], [[1.0, 1.0]]), st([[0.0], [4.0]], [[1.0, 1.0]])
    new, _, _ = aggregate_round(cfg(strategy="ffa"), g, [f1, f2], [1, 3], {}, 1)
    want = (1 * agg.lora_product(f1, M) + 3 * agg.lora_product(f2, M)) / 4
    assert torch.allclose(agg.lora_product(new, M), want) and torch.equal(new[KA], g[KA])


def test_fedavg_weights_by_tokens():
    g = st([[0.0]], [[0.0]])
    new, _, _ = aggregate_round(cfg(strategy="fedavg"), g, [st([[1.0]], [[2.0]]), st([[5.0]], [[6.0]])], [300, 100], {}, 1)
    assert new[KB].item() == pytest.approx(2.0) and new[KA].item() == pytest.approx(3.0)


def test_server_optimisers():
    g = {"w": T([0.0])}
    w1, buf = agg.fedavgm(g, {"w": T([1.0])}, None, lr=1.0, momentum=0.9)
    w2, buf = agg.fedavgm(w1, {"w": T([1.0])}, buf, lr=1.0, momentum=0.9)
    assert w1["w"].item() == pytest.approx(1.0) and buf["w"].item() == pytest.approx(1.9) and w2["w"].item() == pytest.approx(2.9)
    # FedAdam, one step: m = 0.1·0.1 = 0.01, v = 0.01·0.01 = 1e-4, w = 0.5·0.01 / (0.01 + 0.001)
    w, m, v = agg.fedadam(g, {"w": T([0.1])}, None, None, lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    assert m["w"].item() == pytest.approx(0.01) and v["w"].item() == pytest.approx(1e-4)
    assert w["w"].item() == pytest.approx(0.5 * 0.01 / 0.011)
    # Through aggregate_round (ffa: only B moves), state carried in `opt`.
    gs = st([[0.0]], [[1.0]])
    c = cfg(strategy="ffa", server_optimizer=ServerOptimizerConfig(name="fedavgm", lr=1.0, momentum=0.5))
    n1, opt, _ = aggregate_round(c, gs, [st([[1.0]], [[1.0]])], [1], {}, 1)
    n2, opt, _ = aggregate_round(c, n1, [st([[2.0]], [[1.0]])], [1], opt, 2)
    assert n1[KB].item() == pytest.approx(1.0) and n2[KB].item() == pytest.approx(1.0 + 1.0 + 0.5)


def test_robust_aggregation_resists_a_poisoned_update():
    g = st([[0.0], [0.0]], [[1.0, 1.0]])
    clean = [st([[1.0], [2.0]], [[1.0, 1.0]]), st([[1.2], [1.8]], [[1.0, 1.0]])]
    poisoned = st([[50.0], [100.0]], [[1.0, 1.0]])  # ×50
    mean_clean, _, _ = aggregate_round(cfg(strategy="ffa"), g, clean, [1, 1], {}, 1)
    robust = cfg(strategy="ffa", aggregator=AggregatorConfig(rule="median", clip_norm="auto"))
    new, _, rep = aggregate_round(robust, g, clean + [poisoned], [1, 1, 1], {}, 1)
    assert rep["clipped"] == 1 and rep["clip_norm"] == pytest.approx(math.hypot(1.0, 2.0), rel=1e-5)  # median of the norms
    assert torch.allclose(new[KB], mean_clean[KB], atol=0.2)
    naive, _, _ = aggregate_round(cfg(strategy="ffa"), g, clean + [poisoned], [1, 1, 1], {}, 1)
    assert (naive[KB] - mean_clean[KB]).norm() > 10
    tm = cfg(strategy="ffa", aggregator=AggregatorConfig(rule="trimmed_mean", trim=0.34))
    trimmed, _, _ = aggregate_round(tm, g, clean + [poisoned], [1, 1, 1], {}, 1)
    assert torch.allclose(trimmed[KB], T([[1.2], [2.0]]))  # the middle value per coordinate


def test_dp_noise_scale_and_uniform_weights():
    g = {KA: torch.zeros(1, 1), KB: torch.zeros(200, 1000)}
    s = [{KA: torch.zeros(1, 1), KB: torch.full((200, 1000), 0.001)} for _ in range(4)]
    c = cfg(strategy="ffa", privacy=PrivacyConfig(noise_multiplier=2.0, clip_norm=0.5, seed=1))
    new, _, rep = aggregate_round(c, g, s, [1, 1000, 1, 1], {}, 1)
    assert rep["clipped"] == 0
    # Updates have norm 0.001·sqrt(2e5) ≈ 0.447 < C: unclipped mean 0.001, noise std σ·C/n = 0.25.
    noise = new[KB] - 0.001
    assert noise.std().item() == pytest.approx(0.25, rel=0.02) and abs(noise.mean().item()) < 0.005
    again, _, _ = aggregate_round(c, g, s, [1, 1, 1, 1], {}, 1)
    assert torch.equal(again[KB], new[KB])  # token counts do not matter under DP; noise is per-round seeded


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight ε of a μ-GDP mechanism (Dong, Roth, Su 2019, Cor. 2.13), by bisection."""
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    d = lambda e: Phi(-e / mu + mu / 2) - math.exp(e) * Phi(-e / mu - mu / 2)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,rounds", [(1.0, 1), (2.0, 10), (4.0, 50)])
def test_dp_epsilon_is_a_sound_and_tight_rdp_bound(sigma, rounds):
    # T compositions of the Gaussian mechanism with noise σ (sensitivity 1) are exactly
    # (sqrt(T)/σ)-GDP; the RDP accountant must never report less, and not much more.
    eps, order = agg.dp_epsilon(sigma, rounds, 1e-5)
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / sigma, 1e-5)
    assert exact <= eps <= 1.25 * exact + 0.1
    assert agg.dp_epsilon(sigma, rounds + 1, 1e-5)[0] > eps > agg.dp_epsilon(sigma * 2, rounds, 1e-5)[0]

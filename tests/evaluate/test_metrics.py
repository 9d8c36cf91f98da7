"""Metrics against hand-computed values; bootstrap intervals on data whose answer is known."""

import math

import numpy as np
import pytest

from plural.evaluate.metrics import bits_per_byte, bootstrap, match, numbers_in, paired_difference


def test_bits_per_byte_is_log2_of_probability_over_bytes():
    # p(text) = 2^-24 over 8 bytes -> 3 bits per byte
    assert bits_per_byte(math.log(2.0 ** -24), 8) == pytest.approx(3.0)


@pytest.mark.parametrize("output,answers,how,tol,want", [
    ("Paris.", ["paris"], "exact", 0, True),
    ("Paris is the capital", ["paris"], "exact", 0, False),
    ("Das ist  GESCHLOSSEN!", ["geschlossen"], "contains", 0, True),
    ("We are open", ["closed", "geschlossen"], "contains", 0, False),
    ("fermé le dimanche", [r"(?i)ferm[ée]"], "regex", 0, True),
    ("It costs 12 euros", ["12"], "numeric", 0, True),
    ("It costs 12,5 euros", ["12.5"], "numeric", 0, True),
    ("about 79.6 km", ["80"], "numeric", 0.5, True),
    ("about 79 km", ["80"], "numeric", 0.5, False),
])
def test_match(output, answers, how, tol, want):
    assert match(output, answers, how, tol) is want


def test_numbers_in_reads_european_and_english_formats():
    assert numbers_in("1,000.5 or 1.234,5 or 0,5 and 1\u202f000, -3") == [1000.5, 1234.5, 0.5, 1000.0, -3.0]


def test_bootstrap_interval_matches_the_normal_approximation_for_a_proportion():
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.3).astype(float)
    e = bootstrap(x, n_boot=2000, seed=0)
    p = x.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(x))  # Wald interval: ~0.020 here
    assert e.value == pytest.approx(p)
    assert e.lo == pytest.approx(p - half, abs=0.004)
    assert e.hi == pytest.approx(p + half, abs=0.004)
    assert e.n == 2000


def test_bootstrap_of_a_ratio_resamples_items_not_bytes():
    # two items: 10 bits over 10 bytes and 30 bits over 10 bytes -> 2.0 bits/byte overall
    e = bootstrap([10.0, 30.0], [10.0, 10.0], n_boot=500, seed=0)
    assert e.value == pytest.approx(2.0)
    # every resample is {1,1}, {1,3} or {3,3} bits/byte: the interval spans exactly [1, 3]
    assert (e.lo, e.hi) == (pytest.approx(1.0), pytest.approx(3.0))


def test_bootstrap_is_deterministic_and_constant_data_has_zero_width():
    x = np.random.default_rng(0).normal(size=300)
    assert bootstrap(x, seed=7) == bootstrap(x, seed=7)
    e = bootstrap([0.5] * 50)
    assert (e.lo, e.value, e.hi) == (0.5, 0.5, 0.5)


def test_paired_difference_cancels_shared_item_variation():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 10, size=400)  # large item-to-item spread
    b = a + 0.1  # a small but consistent improvement on every item
    d = paired_difference(a, None, b, None, n_boot=1000)
    assert d.value == pytest.approx(0.1)
    assert d.lo == pytest.approx(0.1) and d.hi == pytest.approx(0.1)
    assert d.excludes_zero()
    # unpaired intervals of a and b overlap almost entirely
    ea, eb = bootstrap(a), bootstrap(b)
    assert ea.hi > eb.lo


def test_paired_difference_of_noise_includes_zero():
    rng = np.random.default_rng(3)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    flip = rng.choice(300, size=20, replace=False)
    b[flip[:10]] = 1 - b[flip[:10]]  # some items change, in both directions
    b[flip[10:]] = 1 - b[flip[10:]]
    d = paired_difference(a, None, b, None, n_boot=1000, seed=0)
    assert d.lo <= 0 <= d.hi and not d.excludes_zero()
    assert d.value == pytest.approx(b.mean() - a.mean())

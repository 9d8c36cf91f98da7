"""Metrics as small pure functions: bits per byte, answer matching, bootstrap intervals.

Bootstrap (Efron & Tibshirani 1993, percentile method): resample the items with replacement,
recompute the metric as sum(num) / sum(den) on each resample, and take the 2.5% and 97.5%
quantiles. A difference between two variants is bootstrapped *paired*: the same resampled items
for both, so the item-to-item variation they share cancels out (as in Koehn 2004, "Statistical
significance tests for machine translation evaluation"). The resamples come from a seeded
generator, so the same inputs give identical intervals.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)


def bits_per_byte(logprob_nats: float, n_bytes: int) -> float:
    """-log2 p(text) / UTF-8 bytes: comparable across tokenizers (Gao et al. 2020, The Pile, sec. 4)."""
    return -logprob_nats / LN2 / n_bytes


# ---- answer matching (qa) ----------------------------------------------------------------------------

def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace squeezed, punctuation and quotes stripped at both ends."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"\s+", " ", t).strip()
    return t.strip(" .,;:!?\"'«»“”„")


# digits with inner separators (. , no-break or thin space), always ending on a digit
_NUM = re.compile(r"[-+]?\d(?:[\d.,\u00a0\u202f]*\d)?")


def numbers_in(text: str) -> list[float]:
    """Numbers written in text, accepting 1,234.5 / 1.234,5 / 1\u202f234,5 / 0,5."""
    out = []
    for m in _NUM.finditer(text):
        s = m.group().replace("\u00a0", "").replace("\u202f", "")
        if "," in s and "." in s:
            s = s.replace(",", "") if s.rfind(".") > s.rfind(",") else s.replace(".", "").replace(",", ".")
        elif "," in s:
            # a comma followed by exactly three digits separates thousands (1,000); otherwise it is decimal (0,5)
            s = s.replace(",", "") if len(s.rpartition(",")[2]) == 3 else s.replace(",", ".")
        try:
            out.append(float(s))
        except ValueError:
            continue
    return out


def match(output: str, answers: list[str], how: str, tolerance: float = 0.0) -> bool:
    """Is `output` correct under `how` (exact | contains | regex | numeric) for any of `answers`?"""
    if how == "exact":
        o = normalize(output)
        return any(o == normalize(a) for a in answers)
    if how == "contains":
        o = normalize(output)
        return any(normalize(a) in o for a in answers)
    if how == "regex":
        return any(re.search(a, output) is not None for a in answers)
    if how == "numeric":
        got = numbers_in(output)
        want = [float(a) for a in answers]
        return any(abs(g - w) <= tolerance for g in got for w in want)
    raise ValueError(f"unknown match {how!r}")


# ---- bootstrap ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float
    n: int

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def ratio(num, den=None) -> float:
    num = np.asarray(num, dtype=np.float64)
    d = float(len(num)) if den is None else float(np.sum(np.asarray(den, dtype=np.float64)))
    return float(num.sum() / d) if d else float("nan")


def _resampled_ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # idx: [B, n] item indices of B resamples -> [B] metric values (nan where a resample's den is 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num[idx].sum(axis=1) / den[idx].sum(axis=1)


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _as_arrays(num, den) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(num, dtype=np.float64)
    b = np.ones_like(a) if den is None else np.asarray(den, dtype=np.float64)
    return a, b


def bootstrap(num, den=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Value sum(num)/sum(den) with a percentile bootstrap (1 - alpha) interval over items."""
    a, b = _as_arrays(num, den)
    value = ratio(a, b)
    if len(a) < 2 or n_boot <= 0:
        return Estimate(value, value, value, len(a))
    r = _resampled_ratios(a, b, _indices(len(a), n_boot, seed))
    lo, hi = np.nanquantile(r, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(lo), float(hi), len(a))


def paired_difference(num_a, den_a, num_b, den_b, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Value(b) - value(a) over the same items, with a paired percentile bootstrap interval."""
    a, da = _as_arrays(num_a, den_a)
    b, db = _as_arrays(num_b, den_b)
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same items ({len(a)} != {len(b)})")
    value = ratio(b, db) - ratio(a, da)
    if len(a) < 2 or n_boot <= 0:
        return Estimate(value, value, value, len(a))
    idx = _indices(len(a), n_boot, seed)
    r = _resampled_ratios(b, db, idx) - _resampled_ratios(a, da, idx)
    lo, hi = np.nanquantile(r, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(lo), float(hi), len(a))

"""Choosing each row's next token from its logits: greedy, temperature and nucleus (top-p), seeded per row.

One call per engine step for the whole batch ([n, V] logits): the reductions run once over all
rows, and only rows that sample (temperature above `SAMPLING_EPS`) pay for softmax, and only rows
with top_p < 1 for the sort. A row whose logits are not finite (an adapter whose weights went NaN)
gets an error instead of a token, so the engine fails that sequence alone (issue 11).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this are greedy, as in vLLM (`_SAMPLING_EPS`): logits / 1e-39 overflow to inf
# and softmax then gives NaN, which torch.multinomial refuses.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def make_generator(seed: int | None) -> torch.Generator | None:
    """A row's own generator when the request has a seed (any int64; torch takes 64-bit seeds)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


NON_FINITE = "the model produced non-finite logits (NaN or inf) for this request"


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[str | None]]:
    """logits [n, V] float32 on CPU, one row per sequence -> (token per row, error per row or None).

    A row with an error has token -1 and must not be continued."""
    top, greedy = logits.max(-1)  # NaN propagates through max: one reduction finds bad rows too
    finite = torch.isfinite(top).tolist()
    tokens = greedy.tolist()
    errors: list[str | None] = [None if ok else NON_FINITE for ok in finite]
    rows = [i for i, p in enumerate(params) if finite[i] and not p.greedy]
    if rows:
        temps = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype)
        probs = torch.softmax(logits[rows] / temps[:, None], -1)
        for j, tok in zip(range(len(rows)), _draw(probs, [params[i].top_p for i in rows], [generators[i] for i in rows])):
            tokens[rows[j]] = tok
    for i, e in enumerate(errors):
        if e is not None:
            tokens[i] = -1
    return tokens, errors


def _draw(probs: torch.Tensor, top_p: list[float], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of probs [m, V]: nucleus-truncated where top_p < 1, each row with its own generator."""
    out = [0] * len(top_p)
    nucleus = [j for j, p in enumerate(top_p) if p < 1.0]
    index = None  # for nucleus rows: sorted position -> token id
    if nucleus:
        sp, si = probs[nucleus].sort(-1, descending=True)
        p = torch.tensor([top_p[j] for j in nucleus], dtype=probs.dtype)
        # The smallest prefix whose mass reaches p; the first token is always kept (a top_p that is
        # 0 in float32, such as 1e-300, would otherwise keep nothing and make multinomial raise).
        drop = sp.cumsum(-1) - sp >= p[:, None]
        drop[:, 0] = False
        sp = sp.masked_fill(drop, 0.0)
        probs = probs.clone()
        probs[nucleus] = sp
        index = dict(zip(nucleus, si))
    plain = [j for j, g in enumerate(generators) if g is None]
    if plain:  # unseeded rows: one multinomial call for all of them
        for j, t in zip(plain, torch.multinomial(probs[plain], 1).squeeze(1).tolist()):
            out[j] = t
    for j, g in enumerate(generators):
        if g is not None:
            out[j] = int(torch.multinomial(probs[j], 1, generator=g))
    if index is not None:
        for j, order in index.items():
            out[j] = int(order[out[j]])
    return out

"""Choosing each row's next token from its logits, seeded per row.

One call per engine step for the whole batch ([n, V] logits). The per-row controls run in
vLLM's order, each as one tensor operation over the rows that use it and nothing for the rows
that do not:

1. `logit_bias` (OpenAI): add the bias to the token's logit; a bias of -100 bans the token;
2. `repetition_penalty` (CTRL, Keskar et al. 2019, as vLLM and HF apply it): every token seen in
   the prompt or the output so far has its logit divided by the penalty when positive, multiplied
   when negative;
3. `frequency_penalty` / `presence_penalty` (OpenAI's definition, over the output so far):
   logit[j] -= count[j] * frequency + (count[j] > 0) * presence;
4. greedy rows (temperature below `SAMPLING_EPS`) take the argmax here; the others go on with
   temperature, `top_k` (vLLM), `min_p` (vLLM: drop tokens whose probability is below min_p times
   the top token's), `top_p` (nucleus), and draw.

A row whose logits are not finite (an adapter whose weights went NaN) gets an error instead of a
token, so the engine fails that sequence alone (issue 11).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this are greedy, as in vLLM (`_SAMPLING_EPS`): logits / 1e-39 overflow to inf
# and softmax then gives NaN, which torch.multinomial refuses.
SAMPLING_EPS = 1e-5
BAN = -100.0  # a logit_bias this low bans the token (OpenAI: "-100 should result in a ban")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    top_k: int = 0  # 0: all tokens
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def make_generator(seed: int | None) -> torch.Generator | None:
    """A row's own generator when the request has a seed (any int64; torch takes 64-bit seeds)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


NON_FINITE = "the model produced non-finite logits (NaN or inf) for this request"


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           prompts: list[list[int]] | None = None, outputs: list[list[int]] | None = None,
           ) -> tuple[list[int], list[str | None]]:
    """logits [n, V] float32 on CPU, one row per sequence -> (token per row, error per row or None).

    `prompts` / `outputs`: each row's prompt and generated ids, needed by the penalties. The
    logits are modified in place where a control applies. A row with an error has token -1 and
    must not be continued."""
    apply_controls(logits, params, prompts, outputs)
    top, greedy = logits.max(-1)  # NaN propagates through max: one reduction finds bad rows too
    finite = torch.isfinite(top).tolist()
    tokens = greedy.tolist()
    errors: list[str | None] = [None if ok else NON_FINITE for ok in finite]
    rows = [i for i, p in enumerate(params) if finite[i] and not p.greedy]
    if rows:
        temps = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype)
        scaled = logits[rows] / temps[:, None]
        _top_k(scaled, [params[i].top_k for i in rows])
        probs = torch.softmax(scaled, -1)
        _min_p(probs, [params[i].min_p for i in rows])
        for j, tok in zip(range(len(rows)), _draw(probs, [params[i].top_p for i in rows], [generators[i] for i in rows])):
            tokens[rows[j]] = tok
    for i, e in enumerate(errors):
        if e is not None:
            tokens[i] = -1
    return tokens, errors


def needs_controls(p: SamplingParams) -> bool:
    """Whether `apply_controls` changes this row's logits (the caller then keeps a raw copy for logprobs)."""
    return bool(p.logit_bias) or p.repetition_penalty != 1.0 or p.penalised


def apply_controls(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]] | None,
                   outputs: list[list[int]] | None) -> None:
    """logit_bias, repetition, frequency and presence penalties, in place on logits [n, V]."""
    n, vocab = logits.shape
    bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if t < vocab]
    if bias:
        rows = torch.tensor([i for i, _, _ in bias])
        cols = torch.tensor([t for _, t, _ in bias])
        vals = torch.tensor([b for _, _, b in bias], dtype=logits.dtype)
        logits.index_put_((rows, cols), torch.where(vals <= BAN, float("-inf"), vals), accumulate=True)
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        seen = _ids_matrix([list(prompts[i]) + list(outputs[i]) for i in rep], vocab) > 0
        pen = torch.tensor([params[i].repetition_penalty for i in rep], dtype=logits.dtype)[:, None]
        sub = logits[rep]
        logits[rep] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    pen_rows = [i for i, p in enumerate(params) if p.penalised]
    if pen_rows:
        counts = _ids_matrix([outputs[i] for i in pen_rows], vocab)
        freq = torch.tensor([params[i].frequency_penalty for i in pen_rows], dtype=logits.dtype)[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in pen_rows], dtype=logits.dtype)[:, None]
        logits[pen_rows] -= counts * freq + (counts > 0).to(logits.dtype) * pres


def _ids_matrix(seqs: list[list[int]], vocab: int) -> torch.Tensor:
    """Token counts [m, V] float32 of each id list (one scatter for all rows)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    ones = torch.zeros(len(seqs), width)
    for r, s in enumerate(seqs):
        if s:
            ids[r, :len(s)] = torch.tensor(s)
            ones[r, :len(s)] = 1.0
    return torch.zeros(len(seqs), vocab).scatter_add_(1, ids, ones)


def _top_k(scaled: torch.Tensor, ks: list[int]) -> None:
    """Keep each row's k largest logits (k <= 0: all), in place on [m, V]."""
    rows = [j for j, k in enumerate(ks) if 0 < k < scaled.shape[1]]
    if not rows:
        return
    kk = torch.tensor([ks[j] for j in rows])
    sub = scaled[rows]
    kth = sub.topk(int(kk.max()), -1).values.gather(1, (kk - 1)[:, None])  # each row's k-th largest
    scaled[rows] = sub.masked_fill(sub < kth, float("-inf"))


def _min_p(probs: torch.Tensor, min_p: list[float]) -> None:
    """Zero the probabilities below min_p x the row's largest and renormalise (top_p then sees a
    distribution), in place on [m, V]."""
    rows = [j for j, p in enumerate(min_p) if p > 0.0]
    if not rows:
        return
    sub = probs[rows]
    floor = sub.max(-1, keepdim=True).values * torch.tensor([min_p[j] for j in rows], dtype=probs.dtype)[:, None]
    sub = sub.masked_fill(sub < floor, 0.0)
    probs[rows] = sub / sub.sum(-1, keepdim=True)


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

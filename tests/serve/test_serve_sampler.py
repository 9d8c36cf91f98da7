"""The sampler and the detokeniser on their own: no model, hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from plural.serve.detok import TextStream
from plural.serve.sampler import NON_FINITE, SamplingParams, make_generator, sample


def params(**kw):
    return SamplingParams(max_tokens=1, **kw)


def test_greedy_below_eps_and_tiny_top_p_keep_the_top_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    tokens, errors = sample(logits, [params(temperature=1e-39), params(temperature=0.0)], [None, None])
    assert tokens == [1, 0] and errors == [None, None]
    for _ in range(20):  # top_p of 1e-300 is 0.0 in float32: still exactly the top token, never an error
        tokens, errors = sample(logits[:1], [params(temperature=1.0, top_p=1e-300)], [None])
        assert tokens == [1] and errors == [None]


def test_non_finite_rows_fail_alone():
    logits = torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 0.0], [float("inf"), 0.0, 0.0],
                           [float("-inf")] * 3, [0.0, 0.0, 9.0]])
    ps = [params(temperature=1.0), params(temperature=0.0), params(temperature=0.7), params(temperature=1.0),
          params(temperature=1.0, top_p=0.5)]
    tokens, errors = sample(logits, ps, [None, None, make_generator(1), None, None])
    assert errors == [NON_FINITE, None, NON_FINITE, NON_FINITE, None]
    assert tokens[1] == 1 and tokens[4] == 2 and tokens[0] == tokens[2] == tokens[3] == -1


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(400, 1)
    tokens, _ = sample(logits, [params(temperature=1.0, top_p=0.6)] * 400, [None] * 400)
    seen = torch.bincount(torch.tensor(tokens), minlength=4)
    # Kept: 0.5 and 0.3 (0.5 < 0.6), renormalised to 5/8 and 3/8; never the others.
    assert seen[2] == seen[3] == 0
    assert abs(seen[0].item() / 400 - 5 / 8) < 0.1


def test_temperature_sharpens_as_softmax_of_logits_over_t():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(2000, 1)
    tokens, _ = sample(logits, [params(temperature=0.5)] * 2000, [make_generator(i) for i in range(2000)])
    # softmax([0, ln 3] / 0.5) = [1/10, 9/10]
    assert abs(sum(tokens) / 2000 - 0.9) < 0.03


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ps = [params(temperature=1.0, top_p=0.9, seed=5)] * 3
    alone = [sample(logits[i:i + 1], ps[:1], [make_generator(5)])[0][0] for i in range(3)]
    together, _ = sample(logits, ps, [make_generator(5) for _ in range(3)])
    assert together == alone
    assert make_generator(2**63 - 1) is not None and make_generator(-(2**63)) is not None


@pytest.fixture(scope="module")
def tok(store):
    from transformers import AutoTokenizer

    from plural.store.models import get_model

    return AutoTokenizer.from_pretrained(get_model("tiny").path)


def pieces(tok, text, stop=()):
    ts = TextStream(tok, stop)
    out = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        out.append(ts.push(t))
        if ts.stopped:
            break
    if not ts.stopped:
        out.append(ts.rest())
    return ts, out


def test_incremental_text_equals_the_full_decode(tok):
    text = "Grüße aus Köln — 東京 ✓ and  two  spaces"
    ts, out = pieces(tok, text)
    assert "".join(out) == tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert not any("\ufffd" in p for p in out)  # a split multi-byte character is never shown half


def test_stop_strings_cut_and_hold_back(tok):
    ts, out = pieces(tok, "one two three four", stop=("three",))
    assert ts.stopped and "".join(out) == "one two "
    # Nothing of a stop string is ever released before it is known not to be one.
    ts, out = pieces(tok, "a b c thr d", stop=("three",))
    assert not ts.stopped and "".join(out) == "a b c thr d"
    released = ""
    for p in out[:-1]:
        released += p
        assert "thr" not in released or released.endswith("thr d") or "thr " in released

"""Sampling controls: logit_bias, frequency/presence penalties (OpenAI), repetition_penalty, top_k,
min_p (vLLM), per row in one batch, against references computed by hand."""

from __future__ import annotations

from dataclasses import replace

import openai
import pytest
import torch

from plural.serve.sampler import SamplingParams, apply_controls, make_generator, sample


def params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=8, **kw)


def test_bias_and_penalties_by_hand_and_only_on_their_rows():
    logits = torch.tensor([[1.0, 0.9, 0.6, 0.2],   # frequency 0.3 + presence 0.1, output [0, 0, 1]
                           [2.0, -1.0, 0.5, 0.0],  # repetition 2, prompt [0], output [1]
                           [0.1, 0.2, 0.3, 0.4],   # logit_bias +10 on 1, ban 3
                           [0.1, 0.2, 0.3, 0.4]])  # nothing
    ps = [params(frequency_penalty=0.3, presence_penalty=0.1), params(repetition_penalty=2.0),
          params(logit_bias=((1, 10.0), (3, -100.0))), params()]
    out = logits.clone()
    apply_controls(out, ps, [[5], [0], [], [1, 2]], [[0, 0, 1], [1], [2], [3, 3]])
    want = torch.tensor([[1.0 - 2 * 0.3 - 0.1, 0.9 - 0.3 - 0.1, 0.6, 0.2],
                         [1.0, -2.0, 0.5, 0.0],
                         [0.1, 10.2, 0.3, float("-inf")],
                         [0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(out, want)
    assert torch.equal(out[3], logits[3])  # a row without controls is untouched, bit for bit
    greedy = [replace(p, temperature=0.0) for p in ps]
    tokens, errors = sample(logits.clone(), greedy, [None] * 4, [[5], [0], [], [1, 2]], [[0, 0, 1], [1], [2], [3, 3]])
    assert tokens == [2, 0, 1, 3] and errors == [None] * 4  # greedy takes the argmax after the controls


def test_top_k_and_min_p_draw_from_the_hand_computed_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(2, 1)
    n = 4000
    draws = {"top_k": [], "min_p": []}
    gens = [make_generator(i) for i in range(2 * n)]
    ps = [params(temperature=1.0, top_k=2), params(temperature=1.0, min_p=0.35)] * n
    tokens, _ = sample(logits.repeat(n, 1), ps, gens)
    draws["top_k"], draws["min_p"] = tokens[0::2], tokens[1::2]
    # top_k=2 keeps 0.5 and 0.3; min_p=0.35 drops what is below 0.35 * 0.5 = 0.175: the same two
    # tokens, renormalised to 0.625 / 0.375.
    for name, got in draws.items():
        assert set(got) == {0, 1}, name
        share = got.count(0) / n
        assert abs(share - 0.625) < 0.03, (name, share)


def test_top_k_per_row_in_one_batch():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    ps = [params(temperature=1.0, top_k=1), params(temperature=1.0, top_k=3), params(temperature=1.0, top_k=0)]
    seen = [set(), set(), set()]
    for i in range(300):
        tokens, _ = sample(logits.clone(), ps, [make_generator(3 * i + j) for j in range(3)])
        for j, t in enumerate(tokens):
            seen[j].add(t)
    assert seen[0] == {0} and seen[1] == {0, 1, 2} and 3 in seen[2]


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_logit_bias_through_the_server(oai_server, store):
    from plural.store.models import load_model

    model, tok, _ = load_model("tiny")
    c = client(oai_server)
    forced = tok("banana", add_special_tokens=False)["input_ids"][0]
    r = c.completions.create(model="tiny", prompt="The sky is", max_tokens=4, temperature=1.0, extra_body={"ignore_eos": True},
                             logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 4)  # +100 makes it the only choice, even when sampling
    # -100 bans: the greedy token becomes the runner-up (both found from the model's own logits).
    for prompt in ["The sky is", "Hello", "One, two,", "Paris is the capital of"]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            best, second = model(torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()
        a, b = tok.decode([best]), tok.decode([second])
        if a != b and "\ufffd" not in a + b:
            break
    ignore = {"ignore_eos": True}
    plain = c.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, extra_body=ignore)
    banned = c.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, extra_body=ignore,
                                  logit_bias={str(best): -100})
    assert (plain.choices[0].text, banned.choices[0].text) == (a, b)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", logit_bias={"12": 101})
    assert e.value.body["param"] == "logit_bias"


def test_penalties_match_a_reference_decoded_by_hand(oai_server, store):
    """Greedy decoding with all three penalties: the server's tokens equal a loop over the model's
    own forward with the penalties applied in plain Python."""
    from plural.store.models import load_model

    model, tok, _ = load_model("tiny")
    prompt = tok("one two three one two three", add_special_tokens=False)["input_ids"]
    freq, pres, rep, steps = 1.5, 0.5, 1.3, 10
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            lg = model(torch.tensor([ids])).logits[0, -1].float().tolist()
            for t in set(prompt) | set(out):  # repetition: prompt and output
                lg[t] = lg[t] / rep if lg[t] > 0 else lg[t] * rep
            for t in set(out):  # frequency and presence: output only
                lg[t] -= out.count(t) * freq + pres
            nxt = max(range(len(lg)), key=lg.__getitem__)
            out.append(nxt)
            ids.append(nxt)
    r = client(oai_server).completions.create(
        model="tiny", prompt=prompt, max_tokens=steps, temperature=0, frequency_penalty=freq, presence_penalty=pres,
        extra_body={"repetition_penalty": rep, "ignore_eos": True})
    assert r.choices[0].text == tok.decode(out, skip_special_tokens=True)
    plain = client(oai_server).completions.create(model="tiny", prompt=prompt, max_tokens=steps, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert plain.choices[0].text != r.choices[0].text  # the penalties changed the answer

"""Prompt logprobs (`echo` with `logprobs`): every position's log-softmax under the request's adapter,
from each runner, equals transformers + PEFT on the same prompt."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from families import FAMILIES, build, make_adapters
from plural.serve.fused import supports
from plural.serve.registry import make_adapter
from test_serve_families import engine_for, tok  # noqa: F401 (the tokenizer fixture)

PROMPT = list(range(300, 320))  # longer than Mistral's and Gemma 2's test windows (6)


def peft_logprobs(model, adapter, ids) -> torch.Tensor:
    from peft import PeftModel

    m = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)) if adapter else model
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
def test_prompt_logprobs_equal_transformers_peft(family, tok, tmp_path):  # noqa: F811
    model = build(family, tok)
    adapter = make_adapters(model, tmp_path)["all8"]
    base_ref, lora_ref = peft_logprobs(model, None, PROMPT), peft_logprobs(model, adapter, PROMPT)
    assert (base_ref - lora_ref).abs().max() > 0.1  # the adapter matters, so slot mix-ups show
    for runner in (["fused"] if supports(model.config) else []) + ["generic"]:
        r = engine_for(model, tok, runner).runner
        a = make_adapter("all8", adapter, None, r, 8)
        r.write_slot(1, r.read_adapter(a.weights, a.rank, a.scale))
        ids = torch.tensor(PROMPT)
        for slot, want in ((0, base_ref), (1, lora_ref)):
            got = r.prompt_logprobs(ids, slot)
            assert got.shape == want.shape and got.dtype == torch.float32
            err = float((got - want).abs().max())
            assert err < 1e-3, f"{family} / {runner} / slot {slot}: {err}"


def _spec_check(body: dict) -> None:
    """The completion validates against OpenAI's schema once the one documented deviation, the first
    echoed token's null logprob (the spec has numbers only), is set aside."""
    from spec import check

    body = json.loads(json.dumps(body))
    for ch in body["choices"]:
        lp = ch.get("logprobs")
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            assert lp["top_logprobs"][0] is None
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    check("CreateCompletionResponse", body)


def test_echo_with_logprobs_over_http(oai_server, tiny_adapters, store):
    """/v1/completions echo + logprobs: the prompt's tokens first (the first with null), each logprob
    equal to transformers + PEFT's under the request's adapter, then the completion's own."""
    import httpx

    from plural.store.models import load_model

    model, tok, _ = load_model("tiny")
    ids = tok("The quick brown fox jumps over", add_special_tokens=False)["input_ids"]
    T = len(ids)
    want = peft_logprobs(model.float().eval(), tiny_adapters["qv4"], ids)
    req = {"model": "qv4", "prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 2}
    url = oai_server.url + "/v1/completions"
    plain = httpx.post(url, json=req, timeout=60).json()["choices"][0]
    body = httpx.post(url, json={**req, "echo": True}, timeout=60).json()
    _spec_check(body)
    (ch,) = body["choices"]
    lp = ch["logprobs"]
    assert ch["text"] == tok.decode(ids) + plain["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:T] == [tok.decode([t]) for t in ids] and lp["tokens"][T:] == plain["logprobs"]["tokens"]
    got = torch.tensor(lp["token_logprobs"][1:T])
    assert torch.allclose(got, want[torch.arange(T - 1), torch.tensor(ids[1:])], atol=1e-3)
    for t in range(1, T):  # the top 2 at each prompt position, by value
        assert sorted(lp["top_logprobs"][t].values()) == pytest.approx(sorted(want[t - 1].topk(2).values.tolist()), abs=1e-3)
    assert lp["token_logprobs"][T:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    # Offsets count from the start of the text, the echoed prompt included.
    assert lp["text_offset"][T] == len(tok.decode(ids)) and lp["text_offset"] == sorted(lp["text_offset"])
    # Streamed: the echo chunk carries the prompt's logprobs; the rest follow with their offsets.
    r = httpx.post(url, json={**req, "echo": True, "stream": True}, timeout=60)
    from spec import sse_events

    events = sse_events(r.text)
    first = events[0]["choices"][0]["logprobs"]
    assert first["tokens"] == lp["tokens"][:T] and first["token_logprobs"] == lp["token_logprobs"][:T]
    rest = [o for ev in events[1:] for c in ev["choices"] if c.get("logprobs") for o in c["logprobs"]["text_offset"]]
    assert rest == lp["text_offset"][T:]
    # Without logprobs, echo is unchanged; n > 1 repeats the prompt's logprobs per choice.
    two = httpx.post(url, json={**req, "echo": True, "n": 2, "temperature": 1, "seed": 3}, timeout=60).json()
    assert [c["logprobs"]["token_logprobs"][:T] for c in two["choices"]] == [lp["token_logprobs"][:T]] * 2

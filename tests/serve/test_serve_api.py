"""End to end: `plural serve` as a real process, driven by the official `openai` client."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import httpx
import hypothesis
import openai
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from server import Server

ALL_KEY, ACME_KEY, ADMIN_KEY = "sk-test-ops-0001", "sk-test-acme-001", "adm-test-0001"
SYSTEM = "You are the all8 assistant. Answer in one word."


@pytest.fixture(scope="module")
def srv(store, tiny_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    allowed = tmp / "allowed"
    allowed.mkdir()
    settings = {
        "model": "tiny",
        "adapters": {k: str(v) for k, v in tiny_adapters.items()},
        "adapter_dirs": [str(allowed)],
        "api_keys": [{"key": ALL_KEY, "tenant": "ops", "models": ["*"]},
                     {"key": ACME_KEY, "tenant": "acme", "models": ["tiny", "qv4"]}],
        "admin_key": ADMIN_KEY,
        "system_prompts": {"all8": SYSTEM},
        "dtype": "float32", "max_model_len": 256, "max_batch": 4, "max_queue": 2, "max_body_bytes": 20000,
    }
    s = Server(tmp, settings).wait_ready()
    s.allowed = allowed
    yield s
    s.stop()


def client(srv, key=ALL_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_models_list_and_tenants(srv):
    ids = {m.id: m for m in client(srv).models.list().data}
    assert set(ids) == {"tiny", "qv4", "all8", "rs2"}
    assert ids["qv4"].parent == "tiny" and getattr(ids["tiny"], "parent", None) is None
    assert {m.id for m in client(srv, ACME_KEY).models.list().data} == {"tiny", "qv4"}
    # Another tenant's adapter answers exactly like a model that does not exist.
    with pytest.raises(openai.NotFoundError) as hidden:
        client(srv, ACME_KEY).chat.completions.create(model="all8", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as absent:
        client(srv, ACME_KEY).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert hidden.value.body["code"] == absent.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(srv, "sk-wrong-key-000").models.list()


def test_chat_matches_reference_and_streams(srv, tiny_adapters):
    from plural.generation import generate, load_for_inference

    msgs = [{"role": "user", "content": "Tell me a story"}]
    model, tok, _ = load_for_inference("tiny", tiny_adapters["qv4"])
    ref = generate(model, tok, [msgs], max_new_tokens=10, temperature=0.0)[0]
    c = client(srv)
    r = c.chat.completions.create(model="qv4", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content.strip() == ref
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10

    chunks = list(c.chat.completions.create(model="qv4", messages=msgs, max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completions_stop_logprobs_n_seed(srv):
    c = client(srv)
    full = c.completions.create(model="all8", prompt="The list:", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[4:7]
    assert stop.strip(), text
    cut = c.completions.create(model="all8", prompt="The list:", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    lp = c.completions.create(model="rs2", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lps = lp.choices[0].logprobs
    assert len(lps.tokens) == 4 and len(lps.top_logprobs[0]) == 3
    # Greedy: the chosen token is the most likely one.
    assert lps.token_logprobs[0] == pytest.approx(max(lps.top_logprobs[0].values()), abs=1e-5)

    chat_lp = c.chat.completions.create(model="rs2", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                        temperature=0, logprobs=True, top_logprobs=2)
    content = chat_lp.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2 and content[0].logprob <= 0

    kw = dict(model="tiny", prompt="Once", max_tokens=8, temperature=1.0, seed=123, n=2)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len(a.choices) == 2 and a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 16


def test_system_prompt_per_model(srv):
    c = client(srv)
    msgs = [{"role": "user", "content": "Who are you?"}]

    def prompt_tokens(model, messages):
        return c.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0).usage.prompt_tokens

    explicit = prompt_tokens("tiny", [{"role": "system", "content": SYSTEM}, *msgs])
    assert prompt_tokens("all8", msgs) == explicit  # all8's configured system prompt was prepended
    assert prompt_tokens("tiny", msgs) != explicit  # the base has none configured
    # A request's own system message wins over the configured one.
    own = [{"role": "system", "content": "x"}, *msgs]
    assert prompt_tokens("all8", own) == prompt_tokens("tiny", own)


def test_errors_have_openai_shape(srv):
    c = client(srv)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, extra_body={"prediction": {"type": "content", "content": "x"}})
    assert e.value.body["param"] == "prediction" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, max_tokens=1000)
    assert "256" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="word " * 300, max_tokens=1)
    assert "256" in e.value.body["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {ALL_KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 30000},
                   headers={"Authorization": f"Bearer {ALL_KEY}"})
    assert r.status_code == 413 and "20000" in r.json()["error"]["message"]
    # More sequences than rows + queue: 429 with Retry-After.
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 16, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {ALL_KEY}"})
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"


def test_disconnect_cancels_generation(srv):
    c = client(srv)
    stream = c.completions.create(model="tiny", prompt="Go", max_tokens=240, temperature=1.0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(srv.url + "/health").json()["running"] == 0
    m = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'plural_requests_total{model="all8",status="200"}' in m
    assert "plural_batch_size_bucket" in m and "plural_time_to_first_token_seconds_bucket" in m
    assert httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {ALL_KEY}"}).status_code == 403


def test_admin_adapters(srv, tiny_adapters):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    url = srv.url + "/admin/adapters"
    assert httpx.get(url, headers={"Authorization": f"Bearer {ALL_KEY}"}).status_code == 403
    assert httpx.get(url).status_code == 401
    # Outside the store and adapter_dirs: refused, whatever the file is.
    r = httpx.post(url, json={"name": "x", "path": str(tiny_adapters["qv4"])}, headers=admin)
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
    good = shutil.copytree(tiny_adapters["qv4"], srv.allowed / "good")
    r = httpx.post(url, json={"name": "team/good", "path": str(good)}, headers=admin)
    assert r.status_code == 200, r.text
    out = client(srv).chat.completions.create(model="team/good", messages=[{"role": "user", "content": "Tell me a story"}],
                                              max_tokens=10, temperature=0).choices[0].message.content
    ref = client(srv).chat.completions.create(model="qv4", messages=[{"role": "user", "content": "Tell me a story"}],
                                              max_tokens=10, temperature=0).choices[0].message.content
    assert out == ref
    assert "team/good" in {a["name"] for a in httpx.get(url, headers=admin).json()}
    # Trained on another base (fingerprint in plural.json): refused with the reason.
    other = shutil.copytree(tiny_adapters["qv4"], srv.allowed / "other")
    man = json.loads((other / "plural.json").read_text())
    man["base"]["fingerprint"] = "sha256:" + "0" * 64
    (other / "plural.json").write_text(json.dumps(man))
    r = httpx.post(url, json={"name": "other", "path": str(other)}, headers=admin)
    assert r.status_code == 400 and "trained on base" in r.json()["error"]["message"]
    # Tensor shapes of another architecture: refused, naming the tensor.
    shaped = shutil.copytree(tiny_adapters["qv4"], srv.allowed / "shaped")
    (shaped / "plural.json").unlink()
    from safetensors.torch import load_file, save_file

    w = load_file(shaped / "adapter_model.safetensors")
    k = next(k for k in w if "lora_A" in k)
    w[k] = w[k].repeat(1, 2).contiguous()
    save_file(w, shaped / "adapter_model.safetensors")
    r = httpx.post(url, json={"name": "shaped", "path": str(shaped)}, headers=admin)
    assert r.status_code == 400 and "shape" in r.json()["error"]["message"]
    assert httpx.delete(url + "/team/good", headers=admin).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client(srv).chat.completions.create(model="team/good", messages=[{"role": "user", "content": "hi"}])


def test_fuzzed_requests_never_yield_5xx(srv):
    """Schema-driven fuzzing of every route (15 examples each, to fit the time budget): never a 5xx."""
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {"/v1/chat/completions", "/v1/completions", "/admin/adapters"} <= {op.path for op in ops}
    headers = {"Authorization": f"Bearer {ALL_KEY}"}
    for op in ops:

        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(max_examples=15, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def fuzz(case):
            case.call_and_validate(base_url=srv.url, headers=headers, checks=[not_a_server_error])

        fuzz()


def test_graceful_shutdown_finishes_in_flight(srv):
    """Last in this module: SIGTERM while a stream runs; the stream still ends properly."""
    result = {}

    def consume():
        stream = client(srv).completions.create(model="tiny", prompt="Go", max_tokens=60, temperature=1.0, stream=True)
        result["finish"] = [ch.choices[0].finish_reason for ch in stream if ch.choices][-1]

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health").json()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    # plural's drain (serve.lifecycle) lets the stream finish and exits 0; a hang would end in SIGKILL.
    assert srv.stop() == 0
    t.join(30)
    assert result["finish"] == "length"

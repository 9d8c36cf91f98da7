"""Front mode with real processes: `plural serve --upstream` in front of one and of two upstream
`plural serve` processes (tiny model + adapters), driven over HTTP and by the official openai client."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import openai
import pytest

from server import Server

ACME_KEY, OPS_KEY, ADMIN_KEY = "sk-front-acme-01", "sk-front-ops-001", "adm-front-0001"
PROMPT = [{"role": "user", "content": "Name three colours."}]


def upstream_settings(tiny_adapters) -> dict:
    return {"model": "tiny", "dtype": "float32", "max_model_len": 512, "max_batch": 8,
            "adapters": {name: str(p) for name, p in tiny_adapters.items()}}


@pytest.fixture(scope="module")
def cluster(store, tiny_adapters, tmp_path_factory):
    """Two upstreams (u1, u2) and two fronts: `one` before u1 (tenants, a renamed model), `two` before both."""
    ups = [Server(tmp_path_factory.mktemp(f"u{i}"), upstream_settings(tiny_adapters)) for i in (1, 2)]
    for u in ups:
        u.wait_ready()
    one = Server(tmp_path_factory.mktemp("front1"), {
        "upstream": [ups[0].url], "health_interval": 0.5, "admin_key": ADMIN_KEY,
        "model_map": {"support": "qv4"},
        "api_keys": [{"key": ACME_KEY, "tenant": "acme", "models": ["tiny"]},
                     {"key": OPS_KEY, "tenant": "ops", "models": ["*"]}]})
    two = Server(tmp_path_factory.mktemp("front2"), {"health_interval": 0.5},
                 args=["--upstream", f"a={ups[0].url}", "--upstream", f"b={ups[1].url}/v1"])
    one.wait_ready(), two.wait_ready()
    yield {"u1": ups[0], "u2": ups[1], "one": one, "two": two, "tmp": tmp_path_factory}
    for s in (one, two, *ups):
        s.stop()


def chat(url: str, model: str, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": PROMPT, "max_tokens": 12, "temperature": 0, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def served(u: Server, model: str) -> float:
    """How many requests for `model` an upstream answered 200 (its own Prometheus counter)."""
    text = httpx.get(u.url + "/metrics", timeout=10).text
    m = re.search(r'plural_requests_total\{model="%s",status="200"\} ([0-9.e+]+)' % re.escape(model), text)
    return float(m.group(1)) if m else 0.0


def test_front_answers_as_the_upstream(cluster):
    one, u1 = cluster["one"], cluster["u1"]
    for front_id, up_id in (("tiny", "tiny"), ("support", "qv4")):
        direct = chat(u1.url, up_id).json()
        via = chat(one.url, front_id, OPS_KEY)
        assert via.status_code == 200, via.text
        body = via.json()
        assert body["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        assert body["usage"] == direct["usage"]
        assert body["model"] == front_id  # the upstream's name for it stays behind the front
    base = chat(u1.url, "tiny").json()["choices"][0]["message"]["content"]
    assert chat(one.url, "support", OPS_KEY).json()["choices"][0]["message"]["content"] != base  # really the adapter
    c_direct = httpx.post(u1.url + "/v1/completions", json={"model": "qv4", "prompt": "Once upon", "max_tokens": 8,
                                                            "temperature": 0}, timeout=60).json()
    c_via = httpx.post(one.url + "/v1/completions", json={"model": "support", "prompt": "Once upon", "max_tokens": 8,
                                                          "temperature": 0},
                       headers={"Authorization": f"Bearer {OPS_KEY}"}, timeout=60).json()
    assert c_via["choices"][0]["text"] == c_direct["choices"][0]["text"]
    e_direct = httpx.post(u1.url + "/v1/embeddings", json={"model": "qv4", "input": "hello"}, timeout=60).json()
    e_via = httpx.post(one.url + "/v1/embeddings", json={"model": "support", "input": "hello"},
                       headers={"Authorization": f"Bearer {OPS_KEY}"}, timeout=60).json()
    assert e_via["data"][0]["embedding"] == e_direct["data"][0]["embedding"] and e_via["model"] == "support"


def test_front_models_and_tenants(cluster):
    one = cluster["one"]
    assert chat(one.url, "tiny").status_code == 401
    assert chat(one.url, "tiny", "sk-wrong-key-000").status_code == 401
    r = chat(one.url, "support", ACME_KEY)  # acme may use the base only: the adapter is absent for it
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert chat(one.url, "tiny", ACME_KEY).status_code == 200
    assert chat(one.url, "qv4", OPS_KEY).status_code == 404  # renamed by model_map: only "support" exists
    ids = lambda key: {c["id"]: c for c in httpx.get(one.url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                                                      timeout=10).json()["data"]}
    assert set(ids(ACME_KEY)) == {"tiny"}
    cards = ids(OPS_KEY)
    assert set(cards) == {"tiny", "support", "all8", "rs2"}
    assert cards["support"]["parent"] == "tiny" and "root" not in cards["support"]  # upstream paths stay there
    # The front counts what it answered, by the id it answered for.
    m = httpx.get(one.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
    assert re.search(r'plural_requests_total\{model="support",status="404"\}|plural_requests_total\{model="",status="404"\}', m)
    assert re.search(r'plural_requests_total\{model="tiny",status="200"\} [1-9]', m)
    assert 'plural_upstream_up{upstream="upstream-1"} 1.0' in m
    # The admin API does not pretend to manage a plain upstream's adapters.
    r = httpx.post(one.url + "/admin/adapters", json={"name": "x", "path": "/tmp"},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "admin_unavailable"


def test_upstream_errors_are_openai_shaped_without_its_address(cluster):
    one, u1 = cluster["one"], cluster["u1"]
    # Longer than the upstream's max_model_len (512): plural's front cannot know, the upstream says 400.
    r = chat(one.url, "tiny", OPS_KEY, messages=[{"role": "user", "content": "word " * 700}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert str(u1.port) not in r.text and "127.0.0.1" not in r.text


def test_openai_client_streams_through_the_front(cluster):
    one = cluster["one"]
    client = openai.OpenAI(base_url=one.url + "/v1", api_key=OPS_KEY, max_retries=0)
    whole = client.chat.completions.create(model="support", messages=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="support", messages=PROMPT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # many events, not one
    assert {c.model for c in chunks} == {"support"}  # renamed event by event
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_adapter_affinity_routes_to_the_replica_that_served_it(cluster):
    two, u1, u2 = cluster["two"], cluster["u1"], cluster["u2"]
    before = {(u.port, m): served(u, m) for u in (u1, u2) for m in ("all8", "rs2")}
    for model in ("all8", "all8", "rs2", "rs2"):
        assert chat(two.url, model).status_code == 200
    delta = {k: served(u, k[1]) - before[k] for u in (u1, u2) for k in [(u.port, "all8"), (u.port, "rs2")]}
    # Both replicas idle: the first all8 goes to one of them, the second follows it there (without
    # affinity it would go to the replica picked least recently); rs2 then starts on the other one.
    all8 = {p: delta[(p, "all8")] for p in (u1.port, u2.port)}
    rs2 = {p: delta[(p, "rs2")] for p in (u1.port, u2.port)}
    assert sorted(all8.values()) == [0, 2] and sorted(rs2.values()) == [0, 2]
    assert max(all8, key=all8.get) != max(rs2, key=rs2.get)


def test_killed_upstream_gives_503_and_the_front_recovers(cluster, store, tiny_adapters):
    one, two, u1, u2 = cluster["one"], cluster["two"], cluster["u1"], cluster["u2"]
    os.kill(u2.proc.pid, signal.SIGKILL)
    u2.proc.wait()
    for _ in range(3):  # whichever replica each is routed to first, a answers (b refuses connections)
        r = chat(two.url, "tiny")
        assert r.status_code == 200, r.text
    # A request that met b's dead keep-alive connection marks b down at once ("connection failed
    # (ReadError)"); the next health check (every 0.5 s here) dials anew and names the cause.
    deadline = time.monotonic() + 10
    while (h := httpx.get(two.url + "/health", timeout=10).json())["upstreams"][1].get("error") != "connection refused":
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert h["status"] == "degraded"
    assert {u["name"]: u["healthy"] for u in h["upstreams"]} == {"a": True, "b": False}
    os.kill(u1.proc.pid, signal.SIGKILL)
    u1.proc.wait()
    r = chat(one.url, "tiny", OPS_KEY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1
    assert str(u1.port) not in r.text
    h = httpx.get(one.url + "/health", timeout=10)
    assert h.status_code == 503
    assert h.json()["upstreams"][0]["name"] == "upstream-1" and not h.json()["upstreams"][0]["healthy"]
    assert str(u1.port) not in h.text
    # The upstream comes back where it was: the front's health checks find it, requests flow again.
    back = Server(cluster["tmp"].mktemp("u1_back"), upstream_settings(tiny_adapters), port=u1.port).wait_ready()
    cluster["u1"] = back
    try:
        deadline = time.monotonic() + 30
        while httpx.get(one.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the front did not see the upstream come back"
            time.sleep(0.2)
        assert chat(one.url, "tiny", OPS_KEY).status_code == 200
    finally:
        back.stop()


def test_bad_upstream_flags_are_one_line_errors(tmp_path):
    import subprocess

    from server import PLURAL

    for args, needle in ((["--upstream", "ftp://x"], "expected URL or NAME=URL"),
                         (["--upstream", "http://127.0.0.1:9", "--engine", "vllm"], "drop --upstream"),
                         (["--engine", "vllm"], "--vllm-python")):
        r = subprocess.run([PLURAL, "serve", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and needle in r.stderr + r.stdout, r.stderr
        assert "Traceback" not in r.stderr

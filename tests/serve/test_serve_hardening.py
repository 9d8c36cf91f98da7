"""Issue 11: one request, tenant or bad file never takes anyone else down, and every failure says so.

Each test drives a real `plural serve` process (tests/serve/server.py) with real clients.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server import Server

KEY, OTHER_KEY, ADMIN_KEY = "sk-hard-ops-0001", "sk-hard-acme-001", "adm-hard-00001"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(store, tiny_adapters, nan_adapter, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hard")
    allowed = tmp / "allowed"
    allowed.mkdir()
    settings = {
        "model": "tiny",
        "adapters": {**{k: str(v) for k, v in tiny_adapters.items()}, "nan": str(nan_adapter)},
        "adapter_dirs": [str(allowed)],
        "api_keys": [{"key": KEY, "tenant": "ops", "models": ["*"]},
                     {"key": OTHER_KEY, "tenant": "acme", "models": ["tiny"]}],
        "admin_key": ADMIN_KEY,
        "dtype": "float32", "max_model_len": 256, "max_batch": 16, "max_queue": 64,
        "log_level": "info",
    }
    s = Server(tmp, settings).wait_ready()
    s.allowed, s.tmp, s.nan = allowed, tmp, nan_adapter
    yield s
    s.stop()


def client(srv, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(srv, model, content, **kw):
    return client(srv).chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=12, extra_body={"ignore_eos": True}, **kw)


JOBS = [("tiny", "Tell me a story"), ("qv4", "Name three colours"), ("all8", "Why is the sky blue?"),
        ("rs2", "Count: one, two,"), ("tiny", "Hello there"), ("qv4", "What is 2+2?"), ("all8", "Say hi"),
        ("rs2", "Bonjour")]


def test_poisoned_requests_fail_alone(srv):
    """Item 1: a poisoned request among 8 concurrent ones; the 8 finish with their normal tokens."""
    alone = [chat(srv, m, p, temperature=0).choices[0].message.content for m, p in JOBS]
    poison = [
        dict(model="tiny", temperature=1e-39),  # logits / 1e-39 overflow: greedy below 1e-5, as vLLM
        dict(model="tiny", temperature=1.0, top_p=1e-300),  # 0 in float32: keeps the top token only
        dict(model="nan", temperature=1.0),  # NaN logits at temperature > 0
        dict(model="nan", temperature=0),
    ]
    with ThreadPoolExecutor(len(JOBS) + len(poison)) as pool:
        futs = [pool.submit(chat, srv, m, p, temperature=0) for m, p in JOBS[:4]]
        bad = [pool.submit(chat, srv, content="Tell me a story", **kw) for kw in poison]
        futs += [pool.submit(chat, srv, m, p, temperature=0) for m, p in JOBS[4:]]
        together = [f.result().choices[0].message.content for f in futs]
        outcomes = []
        for f in bad:
            try:
                outcomes.append(f.result().choices[0].message.content)
            except openai.InternalServerError as e:
                outcomes.append(e)
    assert together == alone
    assert outcomes[0] == outcomes[1] == alone[0]  # both are greedy on the base, as JOBS[0]
    for e in outcomes[2:]:
        assert isinstance(e, openai.InternalServerError)
        msg = e.body["message"]
        assert "non-finite logits" in msg and "request id req-" in msg and "/" not in msg.split("request id")[0]
    rid = outcomes[2].body["message"].rsplit("request id ", 1)[1].rstrip(")")
    assert rid in srv.output()  # the operator's log has the detail under the same id
    # The server serves on.
    assert chat(srv, "qv4", "Name three colours", temperature=0).choices[0].message.content == alone[1]


def test_poisoned_stream_ends_with_error_and_done_and_is_counted(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "nan", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 1.0})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "request id" in err["message"]
    metrics = httpx.get(srv.url + "/metrics", headers=ADMIN).text
    assert 'plural_requests_total{model="nan",status="500"}' in metrics


def test_cancelled_stream_tokens_are_counted(srv):
    def generated(model):
        for line in httpx.get(srv.url + "/metrics", headers=ADMIN).text.splitlines():
            if line.startswith(f'plural_generation_tokens_total{{model="{model}"}}'):
                return float(line.split()[-1])
        return 0.0

    stream = client(srv).completions.create(model="rs2", prompt="Go", max_tokens=200, stream=True,
                                            extra_body={"ignore_eos": True})
    before = generated("rs2")
    it = iter(stream)
    for _ in range(5):
        next(it)
    stream.close()
    deadline = time.monotonic() + 10
    while generated("rs2") < before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert generated("rs2") >= before + 5


def test_bad_input_is_400_naming_the_field(srv):
    def post(path, body: bytes | dict, headers=AUTH):
        if isinstance(body, dict):
            return httpx.post(srv.url + path, json=body, headers=headers, timeout=30)
        return httpx.post(srv.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=30)

    # A lone surrogate is valid JSON but no text: 400 at the field, not a TypeError in the tokenizer.
    r = post("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    assert "surrogate" in r.json()["error"]["message"]
    r = post("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}')
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    for seed in (2**63, -(2**63) - 1):
        r = post("/v1/completions", {"model": "tiny", "prompt": "x", "seed": seed, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = post("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**63 - 1, "max_tokens": 2, "temperature": 1})
    assert r.status_code == 200, r.text

    def bad_adapter(name, change):
        folder = shutil.copytree(srv.nan, srv.allowed / name)
        change(folder)
        return post("/admin/adapters", {"name": name, "path": str(folder)}, ADMIN)

    def config(value):
        return lambda f: (f / "adapter_config.json").write_text(json.dumps(value))

    good_cfg = json.loads((srv.nan / "adapter_config.json").read_text())
    for name, change, says in [
        ("cfg-list", config([1, 2]), "must be a JSON object"),
        ("r-zero", config({**good_cfg, "r": 0}), "r must be a positive integer"),
        ("r-text", config({**good_cfg, "r": "abc"}), "r must be a positive integer"),
        ("alpha-text", config({**good_cfg, "lora_alpha": "x"}), "lora_alpha"),
        ("man-list", lambda f: (f / "plural.json").write_text("[]"), "plural.json: must be a JSON object"),
        ("cfg-binary", lambda f: (f / "adapter_config.json").write_bytes(b"\xff\xfe{"), "not valid JSON"),
    ]:
        r = bad_adapter(name, change)
        assert r.status_code == 400, (name, r.text)
        assert says in r.json()["error"]["message"] and r.json()["error"]["param"] == "path", (name, r.text)
    r = post("/admin/adapters", {"name": "x", "path": str(srv.allowed) + "/a\x00b"}, ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path" and "NUL" in r.json()["error"]["message"]
    r = post("/admin/adapters", {"name": "bad name!", "path": str(srv.allowed)}, ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"


def test_symlinks_out_of_the_allowed_folders_are_refused(srv, tmp_path):
    outside = shutil.copytree(srv.nan, tmp_path / "outside")
    for name, target in [("weights-link", outside / "adapter_model.safetensors"),
                         ("config-link", "/etc/passwd")]:
        folder = shutil.copytree(srv.nan, srv.allowed / name)
        f = folder / ("adapter_model.safetensors" if name == "weights-link" else "adapter_config.json")
        f.unlink()
        f.symlink_to(target)
        r = httpx.post(srv.url + "/admin/adapters", json={"name": name, "path": str(folder)}, headers=ADMIN)
        assert r.status_code == 400 and "outside the folders" in r.json()["error"]["message"], r.text


def test_weights_changed_after_registration_are_refused_without_leaking_paths(srv, tiny_adapters):
    folder = shutil.copytree(tiny_adapters["all8"], srv.allowed / "swapped")
    r = httpx.post(srv.url + "/admin/adapters", json={"name": "swapped", "path": str(folder)}, headers=ADMIN)
    assert r.status_code == 200, r.text
    # Replaced before its first use (not yet loaded): the hash taken at registration no longer matches.
    shutil.copy(tiny_adapters["qv4"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": "swapped", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500
        err = r.json()["error"]
        assert "could not be loaded" in err["message"] and str(srv.allowed) not in r.text and "/" not in err["message"]
        rid = err["message"].rsplit("request id ", 1)[1].rstrip(")")
        assert r.headers["x-request-id"] == rid
        assert "changed since the adapter was registered" in srv.output() and rid in srv.output()
        # The connection stays usable: the next request on the same client works.
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2})
        assert r.status_code == 200


def test_models_show_paths_to_the_admin_key_only(srv):
    tenant = httpx.get(srv.url + "/v1/models", headers=AUTH).json()["data"]
    assert tenant and all("root" not in m for m in tenant)
    assert not any(str(srv.tmp) in json.dumps(m) for m in tenant)
    admin = httpx.get(srv.url + "/v1/models", headers=ADMIN).json()["data"]
    assert {m["id"] for m in admin} >= {m["id"] for m in tenant}
    assert all(m["root"].startswith("/") for m in admin)
    assert [m["id"] for m in httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).json()["data"]] == ["tiny"]


def test_echo(srv):
    c = client(srv)
    plain = c.completions.create(model="qv4", prompt="The list:", max_tokens=5, temperature=0)
    echoed = c.completions.create(model="qv4", prompt="The list:", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The list:" + plain.choices[0].text
    chunks = list(c.completions.create(model="qv4", prompt="The list:", max_tokens=5, temperature=0, echo=True,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == echoed.choices[0].text
    # echo with logprobs: test_serve_prompt_logprobs.py


def test_huge_prompt_is_tokenised_off_the_event_loop(srv):
    """A ~4 MB prompt takes seconds to tokenise; meanwhile the server keeps answering."""
    big = {"model": "tiny", "prompt": "Hello world, this is a sentence. " * 110_000, "max_tokens": 1}
    result = {}

    def send_big():
        result["r"] = httpx.post(srv.url + "/v1/completions", json=big, headers=AUTH, timeout=120)

    t = threading.Thread(target=send_big)
    t.start()
    time.sleep(0.3)  # the upload is under way
    worst = 0.0
    while t.is_alive():
        t0 = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.02)
    t.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert worst < 1.0, f"/health waited {worst:.2f} s behind the tokenizer"


def test_graceful_shutdown(store, tmp_path):
    """Item 4: on SIGTERM new requests get 503 shutting_down while in-flight ones drain; a stream still
    running at the deadline gets an SSE error event and [DONE]; the process exits 0."""
    s = Server(tmp_path, {"model": "tiny", "dtype": "float32", "max_model_len": 2048, "shutdown_timeout": 2.0}).wait_ready()
    try:
        results = {}

        def stream(name, max_tokens):
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": "Go", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
                results[name] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=stream, args=("short", 30)), threading.Thread(target=stream, args=("long", 2000))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json().get("running", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(s.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
        assert httpx.get(s.url + "/health").status_code == 503
        for t in threads:
            t.join(30)
        assert s.proc.wait(30) == 0
        assert results["short"][-1] == "[DONE]" and json.loads(results["short"][-2])["choices"][0]["finish_reason"] == "length"
        assert results["long"][-1] == "[DONE]"
        err = json.loads(results["long"][-2])["error"]
        assert err["code"] == "shutting_down"
    finally:
        s.stop()

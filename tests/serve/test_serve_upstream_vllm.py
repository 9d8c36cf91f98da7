"""`plural serve --engine vllm` against a real stand-in process for vLLM's OpenAI server
(tests/serve/vllm_standin.py): the exact command line, the exports it points at, the key, the
adapter sync through /v1/load_lora_adapter, relayed streams, 429s, timeouts, and the process
group stopped with the front."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server import Server

OPS, ACME, ADMIN = "sk-vllm-ops-0001", "sk-vllm-acme-001", "adm-vllm-00001"
STANDIN = Path(__file__).with_name("vllm_standin.py")
ENTRY = "vllm.entrypoints.openai.api_server"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def front(store, tiny_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_front")
    python = tmp / "vllm-env" / "bin" / "python"  # what --vllm-python names: vLLM's own interpreter
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    python.chmod(0o755)
    allowed = tmp / "allowed"
    allowed.mkdir()
    shutil.copytree(tiny_adapters["rs2"], allowed / "rs2")
    record = tmp / "standin.json"
    settings = {"model": "tiny", "engine": "vllm", "vllm_python": str(python),
                "adapters": {"qv4": str(tiny_adapters["qv4"]), "all8": str(tiny_adapters["all8"])},
                "adapter_dirs": [str(allowed)], "admin_key": ADMIN, "health_interval": 0.5,
                "upstream_max_in_flight": 1, "request_timeout": 4,
                "api_keys": [{"key": OPS, "tenant": "ops"}, {"key": ACME, "tenant": "acme", "models": ["tiny"]}]}
    old = dict(os.environ)
    os.environ.update(STANDIN_RECORD=str(record), STANDIN_DELAY="0.3")
    try:
        s = Server(tmp, settings)
    finally:
        os.environ.clear()
        os.environ.update(old)
    s.wait_ready(180)
    s.record = lambda: json.loads(record.read_text())
    s.allowed = allowed
    yield s
    s.stop()


def chat(front, model: str, text: str = "Name three colours.", key: str = OPS, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **kw}
    return httpx.post(front.url + "/v1/chat/completions", json=body, headers=auth(key), timeout=30)


def test_vllm_command_line_and_exports(front, store):
    from plural.store.models import get_model

    rec = front.record()
    argv = rec["argv"]
    port, key = argv[argv.index("--port") + 1], argv[argv.index("--api-key") + 1]
    base = Path(argv[argv.index("--model") + 1])
    mods = argv[argv.index("--lora-modules") + 1:]
    assert argv == ["-m", ENTRY, "--model", str(base), "--served-model-name", "tiny", "--host", "127.0.0.1",
                    "--port", port, "--api-key", key, "--enable-lora", "--max-loras", "2",
                    # qv4 has rank 4, all8 rank 8: the smallest rank vLLM accepts that fits both is 8
                    "--max-lora-rank", "8", "--lora-modules", *mods]
    assert base == store / "exports" / "vllm" / f"tiny-{get_model('tiny').fingerprint[:12]}"
    gen = json.loads((base / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    end_of_turn = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in gen["eos_token_id"]  # vLLM stops at the end of the turn, as plural does
    names = [m.partition("=")[0] for m in mods]
    assert sorted(names) == ["all8", "qv4"]
    for m in mods:
        cfg = json.loads((Path(m.partition("=")[2]) / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "tiny"  # the served name, which vLLM's resolver matches
    assert rec["runtime_lora"] is True
    assert rec["pgid"] == rec["pid"]  # its own process group
    assert key.startswith("sk-plural-") and len(key) > 30
    # The engine answers only the front: its key is needed, and the front never shows key or port.
    direct = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert direct.status_code == 401
    for path in ("/health", "/v1/models"):
        text = httpx.get(front.url + path, headers=auth(ADMIN), timeout=10).text
        assert key not in text and port not in text
    assert httpx.get(front.url + "/health", timeout=10).json()["upstreams"][0] == {
        "name": "vllm", "healthy": True, "in_flight": 0, "models": 3}


def test_vllm_front_answers_with_tenants(front):
    r = chat(front, "qv4")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "[qv4] Name three colours."
    assert chat(front, "qv4", key=ACME).status_code == 404
    assert chat(front, "tiny", key=ACME).json()["choices"][0]["message"]["content"].startswith("[tiny]")
    cards = httpx.get(front.url + "/v1/models", headers=auth(OPS), timeout=10).json()["data"]
    assert {c["id"]: c.get("parent") for c in cards} == {"tiny": None, "qv4": "tiny", "all8": "tiny"}


def test_streams_are_relayed_as_they_come(front):
    """The stand-in sends one word every 0.3 s: a relay shows the gaps, a buffering proxy would not."""
    arrivals = []
    body = {"model": "all8", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4,
            "stream": True}
    with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, headers=auth(OPS), timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5  # 4 words + the finish event
    assert arrivals[3] - arrivals[0] > 0.6


def test_backpressure_429_and_request_timeout(front):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a b c d e f"}], "max_tokens": 7, "stream": True}
    opened = threading.Event()

    def hold():
        with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, headers=auth(OPS), timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 0:
                    opened.set()

    t = threading.Thread(target=hold)
    t.start()
    assert opened.wait(20)
    r = chat(front, "tiny")  # upstream_max_in_flight: 1, and one stream is open
    t.join()
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert r.headers["retry-after"] == "1"
    # 16 words at 0.3 s each is longer than request_timeout (4 s)
    r = chat(front, "tiny", " ".join("w" * 20), max_tokens=16)
    assert r.status_code == 503 and r.json()["error"]["code"] == "timeout", r.text
    lines = []
    with httpx.stream("POST", front.url + "/v1/chat/completions", headers=auth(OPS), timeout=30,
                      json={**body, "messages": [{"role": "user", "content": " ".join("w" * 20)}], "max_tokens": 16}) as s:
        lines = [x for x in s.iter_lines() if x.startswith("data: ")]
    assert json.loads(lines[-2][6:])["error"]["code"] == "timeout" and lines[-1] == "data: [DONE]"


def test_a_client_that_leaves_cancels_the_upstream_request(front):
    body = {"model": "all8", "messages": [{"role": "user", "content": " ".join("w" * 20)}], "max_tokens": 12}
    with pytest.raises(httpx.ReadTimeout):  # gives up after 0.8 s of a 3.6 s answer, closing the connection
        httpx.post(front.url + "/v1/chat/completions", json=body, headers=auth(OPS), timeout=0.8)
    deadline = time.monotonic() + 5
    while "all8" not in front.record()["aborted"]:  # ("tiny" is there too: the front's own timeout above)
        assert time.monotonic() < deadline, front.record()["aborted"]
        time.sleep(0.1)
    assert httpx.get(front.url + "/health", timeout=10).json()["upstreams"][0]["in_flight"] == 0
    assert chat(front, "tiny").status_code == 200  # its slot (upstream_max_in_flight: 1) is free again


def test_engine_failure_is_mapped_without_its_address(front):
    port = front.record()["argv"][front.record()["argv"].index("--port") + 1]
    r = chat(front, "tiny", "explode")
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_error" and "engine crashed" in err["message"]
    assert port not in r.text and "127.0.0.1" not in r.text


def test_admin_load_and_unload_sync_with_vllm(front):
    r = httpx.post(front.url + "/admin/adapters", json={"name": "rs2", "path": str(front.allowed / "rs2")},
                   headers=auth(ADMIN), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 2
    loads = front.record()["loads"]
    assert len(loads) == 1 and loads[0]["lora_name"] == "rs2"
    exported = json.loads((Path(loads[0]["lora_path"]) / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "tiny"
    assert chat(front, "rs2").json()["choices"][0]["message"]["content"].startswith("[rs2]")
    listed = httpx.get(front.url + "/admin/adapters", headers=auth(ADMIN), timeout=10).json()
    assert sorted(a["name"] for a in listed) == ["all8", "qv4", "rs2"]
    # Outside adapter_dirs and the store: refused before vLLM hears of it; a name in use too.
    outside = httpx.post(front.url + "/admin/adapters", json={"name": "x", "path": str(front.allowed.parent)},
                         headers=auth(ADMIN), timeout=60)
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "path"
    again = httpx.post(front.url + "/admin/adapters", json={"name": "rs2", "path": str(front.allowed / "rs2")},
                       headers=auth(ADMIN), timeout=60)
    assert again.status_code == 400
    assert len(front.record()["loads"]) == 1
    assert httpx.post(front.url + "/admin/adapters", json={"name": "y", "path": "/tmp"}, headers=auth(OPS),
                      timeout=10).status_code == 403
    r = httpx.delete(front.url + "/admin/adapters/rs2", headers=auth(ADMIN), timeout=60)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert front.record()["unloads"] == [{"lora_name": "rs2"}]
    assert chat(front, "rs2").status_code == 404
    assert httpx.delete(front.url + "/admin/adapters/rs2", headers=auth(ADMIN), timeout=60).status_code == 404


def test_a_dead_engine_is_named_in_health(front):
    rec = front.record()
    os.kill(rec["pid"], signal.SIGKILL)  # vLLM itself dies; its worker stays, as a crash would leave it
    deadline = time.monotonic() + 10
    while (h := httpx.get(front.url + "/health", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, h.text
        time.sleep(0.1)
    assert h.json()["upstreams"][0]["error"] == "the engine process exited with status -9"
    r = chat(front, "tiny")
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert _alive(rec["worker_pid"])


def test_stopping_the_front_stops_the_engine_group(front):
    rec = front.record()
    assert front.stop() == 0
    for pid in (rec["pid"], rec["worker_pid"]):  # vLLM and the worker left in its group
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, f"process {pid} still runs"
            time.sleep(0.1)


def test_a_front_killed_outright_takes_vllm_with_it(store, tiny_adapters, tmp_path):
    """SIGKILL of the front runs none of its shutdown: the parent-death signal still ends vLLM."""
    python = tmp_path / "vllm-env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    python.chmod(0o755)
    record = tmp_path / "standin.json"
    old = dict(os.environ)
    os.environ.update(STANDIN_RECORD=str(record), STANDIN_DELAY="0")
    try:
        s = Server(tmp_path, {"model": "tiny", "engine": "vllm", "vllm_python": str(python),
                              "adapters": {"qv4": str(tiny_adapters["qv4"])}})
    finally:
        os.environ.clear()
        os.environ.update(old)
    s.wait_ready(180)
    rec = json.loads(record.read_text())
    assert _alive(rec["pid"])
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    for pid in (rec["pid"], rec["worker_pid"]):
        deadline = time.monotonic() + 15
        while _alive(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived the killed front"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
